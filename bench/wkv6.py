"""WKV-6 forward and forward+backward times on one GPU: pallas, xla_chunked, scan and fla.

Inputs as a state-tuning step sees them: bf16 r, k, v, w (raw) and u, one fp32
initial state [H, V, K] shared over the batch, cotangents on y and the final
state; gradients of all six inputs. fla's chunk_rwkv6 gets the same tensors
(w as a bf16 log decay -exp(w) leaf, its state key-major, scale 1.0).

  python bench/wkv6.py [--out DIR ...] [--sweep]
  python bench/wkv6.py --registers [SM ...]   # needs triton (and with jax 0.11, a GPU)

Writes wkv6_<card>_<date>.json and .md into each --out directory (default
bench/results) and prints the table. --sweep also times pallas tilings at each
shape.
"""
import argparse
import dataclasses
import functools
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import report  # pylint: disable=g-import-not-at-top
from pallas_kernels.wkv6 import wkv6  # pylint: disable=g-import-not-at-top
from pallas_kernels.wkv6_pallas import Config, default_config, wkv6_pallas  # pylint: disable=g-import-not-at-top

SHAPES = ((1, 1024, 32, 64), (8, 512, 32, 64), (8, 4096, 64, 64))
SCAN_MAX_TOKENS = 8 * 512  # B * T above which the scan is skipped (too slow)


def make_inputs(B, T, H, K, seed=0):
  rng = np.random.default_rng(seed)
  bf16 = lambda *shape, scale=1.0: jnp.asarray(rng.standard_normal(shape) * scale, jnp.bfloat16)
  r, k, v = (bf16(B, T, H, K, scale=0.5) for _ in range(3))
  w = jnp.asarray(rng.uniform(-6.0, -1.0, (B, T, H, K)), jnp.bfloat16)
  u = bf16(H, K, scale=0.5)
  s0 = jnp.asarray(rng.standard_normal((H, K, K)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.bfloat16)  # y is bf16 for bf16 inputs
  dsT = jnp.asarray(rng.standard_normal((B, H, K, K)), jnp.float32)
  return (r, k, v, w, u, s0), (dy, dsT)


def jax_fns(op):
  fwd = jax.jit(op)

  def fwd_bwd(args, cts):
    # y and sT too, as a training step needs them (with the gradients alone XLA
    # would drop whatever computes y), and the cotangents given, as fla's
    # backward gets them (a loss reduced to a scalar would add XLA's reduction).
    out, vjp = jax.vjp(op, *args)
    return out, vjp(jax.tree.map(lambda ct, o: ct.astype(o.dtype), cts, out))

  return fwd, jax.jit(fwd_bwd)


def bench_jax(impl, shape, reps, op=None):
  args, cts = make_inputs(*shape)
  fwd, grad = jax_fns(op or functools.partial(wkv6, implementation=impl))
  return report.time_jax(fwd, args, reps), report.time_jax(lambda a, c: grad(a, c), (args, cts), reps)


def bench_fla(shape):
  import torch  # pylint: disable=g-import-not-at-top
  import triton  # pylint: disable=g-import-not-at-top
  from fla.ops.rwkv6 import chunk_rwkv6  # pylint: disable=g-import-not-at-top
  B, T, H, K = shape
  (r, k, v, w, u, s0), (dy, dsT) = make_inputs(*shape)
  dev = 'cuda'
  t = lambda x, grad=True: torch.from_numpy(np.asarray(x.astype(jnp.float32))).to(dev).requires_grad_(grad)
  r_t, k_t, v_t, u_t = (t(x).to(torch.bfloat16).detach().requires_grad_() for x in (r, k, v, u))
  g_t = (-torch.exp(t(w, False))).to(torch.bfloat16).requires_grad_()  # fla takes the log decay
  h0 = t(jnp.swapaxes(s0, -1, -2))  # fla's state is key-major [K, V]
  dy_t, dh_t = t(dy, False).to(torch.bfloat16), t(jnp.swapaxes(dsT, -1, -2), False)

  def fwd():
    return chunk_rwkv6(r_t, k_t, v_t, g_t, u_t, scale=1.0, initial_state=h0.expand(B, H, K, K),
                       output_final_state=True)

  def fwd_bwd():
    o, hT = fwd()
    torch.autograd.backward((o, hT), (dy_t.to(o.dtype), dh_t))

  ms = lambda f: float(triton.testing.do_bench(f, warmup=25, rep=200, return_mode='median'))
  leaves = [r_t, k_t, v_t, g_t, u_t, h0]
  return ms(lambda: fwd()), float(triton.testing.do_bench(
      fwd_bwd, warmup=25, rep=200, grad_to_none=leaves, return_mode='median'))


def _table(results):
  lines = ['| impl | B | T | H | K | fwd ms | fwd+bwd ms |', '|---|---|---|---|---|---|---|']
  fmt = lambda x: '—' if x is None else f'{x:.3f}'
  for r in results:
    lines.append(f"| {r['impl']} | {r['B']} | {r['T']} | {r['H']} | {r['K']} | {fmt(r['fwd_ms'])} | "
                 f"{fmt(r['fwd_bwd_ms'])} |")
  return '\n'.join(lines)


SWEEP_VARIANTS = ({}, dict(chunk=16), dict(state_steps=1), dict(block_v=32),
                  dict(warps_chunk=8), dict(warps_state=8), dict(dots='tf32x3'), dict(dots='tf32'), dict(diag='rows'))


def worst_error(op, B=2, T=300, H=4, K=64):
  """(largest relative RMS error, which output) of op's outputs and gradients against the fp32 scan,
  with bf16 r, k, v and w over [-8, 3] as in tests/test_wkv6.py."""
  rng = np.random.default_rng(1)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  args = [normal(B, T, H, K).astype(jnp.bfloat16) for _ in range(3)]
  args += [jnp.asarray(rng.uniform(-8.0, 3.0, (B, T, H, K)), jnp.float32), normal(H, K), normal(H, K, K)]
  dy, dsT = normal(B, T, H, K).astype(jnp.bfloat16), normal(B, H, K, K)  # dy in y's dtype, bf16 here
  f32_args = [x.astype(jnp.float32) for x in args]
  reference = lambda r, k, v, w, u, s0: wkv6(r, k, v, w, u, s0, implementation='scan')
  (want, want_vjp), (got, got_vjp) = (jax.vjp(f, *a) for f, a in ((reference, f32_args), (op, args)))
  got_grads, want_grads = got_vjp((dy.astype(got[0].dtype), dsT)), want_vjp((dy.astype(jnp.float32), dsT))
  errors = {}
  for name, x, ref in zip(('y', 'sT', 'dr', 'dk', 'dv', 'dw', 'du', 'ds0'), got + got_grads, want + want_grads):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    errors[name] = float(np.sqrt(np.mean((x - ref) ** 2) / np.mean(ref ** 2)))
  name = max(errors, key=errors.get)
  return errors[name], name


def sweep(shape, reps, budget_s):
  """Times pallas configurations at one shape and checks each one's error (for tuning Config's defaults)."""
  print(f'pallas configurations at {shape}: fwd ms, fwd+bwd ms, worst relative RMS error (bf16 inputs)')
  t0 = time.perf_counter()
  base = default_config(shape[0], shape[2])
  for change in SWEEP_VARIANTS:
    if time.perf_counter() - t0 > budget_s:
      print(f'  sweep stopped after {budget_s} s')
      break
    cfg = dataclasses.replace(base, **change)
    op = lambda r, k, v, w, u, s0, cfg=cfg: wkv6_pallas(
        r, k, v, w, u, jnp.broadcast_to(s0, (r.shape[0],) + s0.shape), config=cfg)
    try:
      fwd, fb = bench_jax('pallas', shape, reps, op=op)
      error, name = worst_error(op)
      print(f'  {change or "default"}: {fwd:.3f} {fb:.3f} {error:.1e} ({name})', flush=True)
    except Exception as e:  # pylint: disable=broad-except
      print(f'  {change}: failed: {type(e).__name__}: {str(e)[:200]}', flush=True)


def registers(shape, compute_capability=None):
  """Registers and spills of each Pallas kernel as triton builds it for sm_<compute_capability>
  (`ptxas -v`; needs triton, and with jax 0.11 a GPU; see pallas_kernels/triton_builds.py)."""
  from pallas_kernels import triton_builds  # pylint: disable=g-import-not-at-top
  cfg = Config(block_v=16)
  args, _ = make_inputs(*shape)
  loss = lambda *a: sum(jnp.sum(o) for o in wkv6_pallas(
      *a[:5], jnp.broadcast_to(a[5], (shape[0],) + a[5].shape), interpret=False, config=cfg))
  cc = compute_capability or int(getattr(jax.devices()[0], 'compute_capability', '9.0').replace('.', ''))
  for lowered in sorted(triton_builds.kernels(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)), *args), key=lambda k: k.name):
    kernel, log = triton_builds.build(lowered, cc, cc)
    print(f'sm_{cc} {lowered.name} warps={kernel.metadata.num_warps}:',
          ', '.join(re.findall(r'Used \d+ registers|\d+ bytes spill \w+', log)), f'shared={kernel.metadata.shared}', flush=True)


def write_results(out_dirs, name, record):
  markdown = (f'# WKV-6 on {record["card"]}, {record["date"]}\n\n{_table(record["results"])}\n\n'
              f'versions: {record["versions"]}\n')
  report.write(out_dirs, name, record, markdown)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', nargs='+', default=['bench/results'], help='output directories')
  parser.add_argument('--reps', type=int, default=20)
  parser.add_argument('--sweep', action='store_true', help='also time pallas tilings at every shape')
  parser.add_argument('--impls', default='pallas,xla_chunked,scan,fla', help='comma-separated subset to time')
  parser.add_argument('--sweep-seconds', type=float, default=90.0, help='time box of --sweep')
  parser.add_argument('--shapes', nargs='+', default=[','.join(map(str, s)) for s in SHAPES],
                      help='B,T,H,K ... (default: the three published shapes)')
  parser.add_argument('--registers', nargs='*', type=int, metavar='SM',
                      help='only report registers/spills of the Pallas kernels (for SM, e.g. 80 86 90)')
  args = parser.parse_args()
  shapes = [tuple(int(x) for x in s.split(',')) for s in args.shapes]
  if args.registers is not None:
    for cc in args.registers or [None]:
      registers(shapes[0], cc)
    return

  card = jax.devices()[0].device_kind
  date = report.today()
  stem = report.stem('wkv6', card, date)
  results = []
  for shape in shapes:
    B, T, H, K = shape
    for impl in args.impls.split(','):
      fwd = fwd_bwd = None
      try:
        if impl == 'fla':
          fwd, fwd_bwd = bench_fla(shape)
        elif impl != 'scan' or B * T <= SCAN_MAX_TOKENS:
          fwd, fwd_bwd = bench_jax(impl, shape, args.reps)
      except Exception as e:  # pylint: disable=broad-except
        print(f'{impl} {shape}: failed: {type(e).__name__}: {str(e)[:300]}', flush=True)
      results.append(dict(impl=impl, B=B, T=T, H=H, K=K, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd))
      print(results[-1], flush=True)
      # Written after every row, so a run cut short by its time limit keeps what it measured.
      write_results(args.out, stem, dict(card=card, date=date, versions=report.versions(), results=results))
  print(_table(results))
  if args.sweep:
    for shape in shapes:
      sweep(shape, max(5, args.reps // 2), args.sweep_seconds / len(shapes))


if __name__ == '__main__':
  main()
