"""Where a state-tuning step's time and memory go, on one GPU.

  python bench/profile_step.py [--model 1.6B --ctx_len 1024 --micro_bsz 1 --grad_cp 1 --quant none]
                               [--implementation pallas] [--wkv B,T,H,K [--wkv_version 7]] [--out DIR]

Memory: the compiled step's own accounting (arguments, temporaries, outputs),
bytes in use once the weights exist, and the process peak after the timed steps
(XLA_PYTHON_CLIENT_PREALLOCATE=false). The step is compiled before the weights
are drawn, so compile-time scratch never sits on top of them.

Time: a jax.profiler trace of a few steps, GPU kernel time summed by kernel name
(stream events only), with the share of the step each takes. --wkv profiles the
WKV-6 (or, with --wkv_version 7, WKV-7) forward and forward+backward alone at one
shape instead of a whole step.

Writes profile_<what>.txt (and the trace) into --out.
"""
import os

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # before jax: the peak must be the step's own

import argparse  # pylint: disable=g-import-not-at-top,g-bad-import-order
import collections
import gzip
import json
import pathlib
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'bench'))
import train_step  # pylint: disable=g-import-not-at-top
import wkv6 as wkv6_bench  # pylint: disable=g-import-not-at-top
import wkv7 as wkv7_bench  # pylint: disable=g-import-not-at-top
from rwkv_jax import quant, train  # pylint: disable=g-import-not-at-top

GB = 1e9


def kernel_times(trace_dir: str, n_calls: int) -> tuple[list[tuple[str, float, int]], float]:
  """[(kernel name, ms per call, launches per call)], and the summed kernel ms per call."""
  path = next(pathlib.Path(trace_dir).rglob('*.trace.json.gz'))
  events = json.load(gzip.open(path))['traceEvents']
  processes = {e['pid']: e['args']['name'] for e in events if e.get('ph') == 'M' and e['name'] == 'process_name'}
  threads = {(e['pid'], e['tid']): e['args']['name'] for e in events
             if e.get('ph') == 'M' and e['name'] == 'thread_name'}
  on_stream = lambda e: ('GPU' in processes.get(e['pid'], '') and
                         threads.get((e['pid'], e['tid']), '').startswith('Stream'))
  totals = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    if e.get('ph') == 'X' and on_stream(e):
      totals[e['name']][0] += e['dur'] / 1e3
      totals[e['name']][1] += 1
  rows = sorted(((name, ms / n_calls, count // n_calls) for name, (ms, count) in totals.items()),
                key=lambda row: -row[1])
  return rows, sum(row[1] for row in rows)


def profile(fn, args, n_calls: int, trace_dir: str):
  jax.block_until_ready(fn(*args))
  with jax.profiler.trace(trace_dir):
    for _ in range(n_calls):
      out = fn(*args)
    jax.block_until_ready(out)
  return kernel_times(trace_dir, n_calls)


def table(rows, total_ms, wall_ms, top=40) -> list[str]:
  lines = [f'GPU kernel time {total_ms:.3f} ms per call (wall {wall_ms:.3f} ms); top {top}:',
           '  ms/call   share  launches  kernel']
  for name, ms, count in rows[:top]:
    lines.append(f'  {ms:7.3f}  {ms / total_ms:6.1%}  {count:8d}  {name[:110]}')
  return lines


def memory_lines(compiled, before_weights, after_weights) -> list[str]:
  m = compiled.memory_analysis()
  stats = jax.devices()[0].memory_stats() or {}
  return [
      f'compiled: arguments {m.argument_size_in_bytes / GB:.3f} GB, temporaries {m.temp_size_in_bytes / GB:.3f} GB, '
      f'outputs {m.output_size_in_bytes / GB:.3f} GB (aliased {m.alias_size_in_bytes / GB:.3f} GB)',
      f'bytes in use: before weights {before_weights / GB:.3f} GB, with weights {after_weights / GB:.3f} GB',
      f'process peak after the steps: {stats.get("peak_bytes_in_use", 0) / GB:.3f} GB',
  ]


def wall_ms(fn, args, reps=10) -> float:
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(reps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / reps * 1e3


def profile_step(args, trace_dir) -> list[str]:
  case = train_step.Case(args.model, args.ctx_len, args.micro_bsz, args.grad_cp, args.quant)
  cfg = train_step.MODELS[case.model]
  in_use = lambda: (jax.devices()[0].memory_stats() or {}).get('bytes_in_use', 0)
  opt = train.optimizer(train.schedule('cos', 1.0, 0.01, 10, 1000))
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, case.micro_bsz, case.ctx_len + 1), np.int32)
  before = in_use()
  model = train_step.random_model(cfg, case.quant, implementation=args.implementation)
  embedding = train.host_embedding(model)  # as bench/train_step.py and the trainer: the step gets rows
  graphdef, states, weights = train.split(model)
  after = in_use()
  step = train.make_train_step(graphdef, opt, remat=bool(case.grad_cp))
  targets = jax.device_put(tokens[..., 1:])
  train_state = [train.init_train_state(states, opt)]
  t0 = time.perf_counter()
  compiled = step.lower(train_state[0], weights, quant.take_rows(embedding, tokens[..., :-1]), targets).compile()
  compile_s = time.perf_counter() - t0

  def call():  # the step donates its train state, so each call hands on the new one
    inputs = jax.device_put(quant.take_rows(embedding, tokens[..., :-1]))
    train_state[0], loss = compiled(train_state[0], weights, inputs, targets)
    return loss

  wall = wall_ms(call, ())
  rows, total = profile(call, (), 3, trace_dir)
  return [f'step {case.name}, WKV {args.implementation or "default"}, XLA_FLAGS {args.xla_flags!r}, '
          f'compiled in {compile_s:.1f} s'] + \
      memory_lines(compiled, before, after) + table(rows, total, wall)


def profile_wkv(args, trace_dir) -> list[str]:
  shape = tuple(int(x) for x in args.wkv.split(','))
  impl = args.implementation or 'pallas'
  if args.wkv_version == 7:  # the inputs and calls of bench/wkv7.py
    primals, cotangents = wkv7_bench.jax_args(*wkv7_bench.make_inputs(*shape)[1:])
    fwd, grad = wkv7_bench.jax_fns(impl)
  else:
    fwd, grad = wkv6_bench.jax_fns(lambda *a: wkv6_bench.wkv6(*a, implementation=impl))
    primals, cotangents = wkv6_bench.make_inputs(*shape)
  lines = [f'WKV-{args.wkv_version} {impl} at (B,T,H,K) = {shape}']
  for name, fn, fn_args in (('forward', fwd, primals), ('forward+backward', grad, (primals, cotangents))):
    rows, total = profile(fn, fn_args, 10, f'{trace_dir}_{len(lines)}')
    lines += [name] + table(rows, total, wall_ms(fn, fn_args, 20), top=15)
  return lines


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='1.6B', choices=sorted(train_step.MODELS))
  p.add_argument('--ctx_len', type=int, default=1024)
  p.add_argument('--micro_bsz', type=int, default=1)
  p.add_argument('--grad_cp', type=int, default=1)
  p.add_argument('--quant', default='none', choices=('none', 'int8', 'nf4'))
  p.add_argument('--implementation', help='WKV implementation (default: the platform default)')
  p.add_argument('--wkv', help='profile WKV fwd+bwd alone at B,T,H,K instead of a step')
  p.add_argument('--wkv_version', type=int, choices=(6, 7), default=6, help='which WKV --wkv profiles')
  p.add_argument('--out', default='.', help='directory for profile_*.txt')
  p.add_argument('--dump', action='store_true', help="also copy XLA's memory-usage report of the step into --out")
  p.add_argument('--tag', default='', help='appended to the output file names')
  args = p.parse_args()
  args.xla_flags = os.environ.get('XLA_FLAGS', '')
  dump_dir = tempfile.mkdtemp()
  if args.dump:  # read when the backend starts, i.e. at the first jax call below
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_dump_to={dump_dir} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_step')
  what = f'wkv{args.wkv_version}_{args.wkv.replace(",", "x")}' if args.wkv else \
      f'{args.model}-{args.ctx_len}x{args.micro_bsz}-cp{args.grad_cp}-{args.quant}'
  what += args.tag
  trace_dir = tempfile.mkdtemp()
  lines = (profile_wkv if args.wkv else profile_step)(args, f'{trace_dir}/trace')
  text = '\n'.join([f'{jax.devices()[0].device_kind}, jax {jax.__version__}'] + lines) + '\n'
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / f'profile_{what}.txt').write_text(text)
  for report in pathlib.Path(dump_dir).glob('*jit_step*memory-usage-report.txt'):
    shutil.copy(report, out / f'memory_{what}.txt')
  print(text, flush=True)
  shutil.rmtree(trace_dir, ignore_errors=True)
  shutil.rmtree(dump_dir, ignore_errors=True)


if __name__ == '__main__':
  main()
