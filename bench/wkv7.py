"""WKV-7 forward and forward+backward times on one GPU: pallas, xla_chunked, fla and RWKV-PEFT's CUDA kernel.

Inputs as a state-tuning step sees them: bf16 r, k, v, a, b (a = -kk, b = kk *
iclr, kk L2-normalised per head), the fp32 log decay w = -exp(-0.5) *
sigmoid(z), one fp32 initial state [H, V, K] shared over the batch, and
gradients of every input. Each peer runs the same recurrence:
  fla       chunk_rwkv7 as RWKV-PEFT's `--op fla` calls it (bf16 w, its state
            key-major [B, H, K, V] expanded from the shared one, scale 1.0);
  fla_safe  the same with safe_gate=True, lower_bound=-exp(-0.5), as fla's own
            RWKV-7 layer calls it;
  cuda      RWKV-PEFT's rwkv7_state_clampw (bf16, built from --peft_repo with
            RWKV-PEFT's own flags): it takes the raw z (decay exp(-exp(-0.5) *
            sigmoid(z))) and a value-major state repeated over the batch, and
            returns y only (no final state, so its backward gets dy alone).
The JAX implementations and fla get cotangents on y and the final state.

  python bench/wkv7.py [--out DIR ...] [--impls ...] [--peft_repo .peer/RWKV-PEFT]

Writes wkv7_<card>_<date>.json and .md into each --out directory (default
bench/results) after every row, and prints the table. The error column is the
worst relative error, ||x - ref|| / ||ref|| over y, the final state and every
gradient, against the fp32 `scan` at (2, 256, 4, 64), same inputs.
"""
import argparse
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import report  # pylint: disable=g-import-not-at-top
from pallas_kernels.wkv7 import wkv7  # pylint: disable=g-import-not-at-top

SHAPES = ((1, 1024, 32, 64), (8, 512, 32, 64), (8, 4096, 64, 64))
W_SCALE = float(np.exp(-0.5))
ERROR_SHAPE = (2, 256, 4, 64)
NAMES = ('y', 'sT', 'dr', 'dw', 'dk', 'dv', 'da', 'db', 'ds0')


def make_inputs(B, T, H, K, seed=0):
  """(z, (r, w, k, v, a, b, s0), (dy, dsT)) as numpy fp32, every input but s0 and dsT rounded to
  bf16 (w too, so that fla's bf16 w is the w the others get)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  bf16 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  r, k, v = (bf16(0.5 * normal(B, T, H, K)) for _ in range(3))
  kk = normal(B, T, H, K)
  kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
  iclr = 1 / (1 + np.exp(-normal(B, T, H, K)))
  z = bf16(normal(B, T, H, K))
  w = bf16(log_decay(z))
  s0 = normal(H, K, K)
  dy, dsT = bf16(normal(B, T, H, K)), normal(B, H, K, K)
  return z, (r, w, k, v, bf16(-kk), bf16(kk * iclr), s0), (dy, dsT)


def log_decay(z):
  """The model's log decay from the raw z, as RWKV-PEFT's clampw kernel forms it."""
  return (-W_SCALE / (1 + np.exp(-z.astype(np.float64)))).astype(np.float32)


def jax_args(inputs, cts):
  r, w, k, v, a, b, s0 = inputs
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  return (bf(r), jnp.asarray(w), bf(k), bf(v), bf(a), bf(b), jnp.asarray(s0)), (bf(cts[0]), jnp.asarray(cts[1]))


def jax_fns(impl):
  op = functools.partial(wkv7, implementation=impl)

  def fwd_bwd(args, cts):
    # y and sT returned too, as a training step needs them, and the cotangents given.
    out, vjp = jax.vjp(op, *args)
    return out, vjp(cts)

  return jax.jit(op), jax.jit(fwd_bwd)


def bench_jax(impl, shape, reps):
  args, cts = jax_args(*make_inputs(*shape)[1:])
  fwd, fwd_bwd = jax_fns(impl)
  return report.time_jax(fwd, args, reps), report.time_jax(fwd_bwd, (args, cts), reps)


def error_jax(impl):
  """Outputs and gradients of impl at ERROR_SHAPE, as numpy fp64, in NAMES order."""
  args, cts = jax_args(*make_inputs(*ERROR_SHAPE)[1:])
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(jax_fns(impl)[1](args, cts))]


def reference(for_cuda=False):
  """The fp32 scan's outputs and gradients at ERROR_SHAPE. For the CUDA kernel, which forms w from z
  itself and has no final state: w unrounded and no cotangent on the final state."""
  z, inputs, (dy, dsT) = make_inputs(*ERROR_SHAPE)
  if for_cuda:
    inputs, dsT = (inputs[0], log_decay(z)) + inputs[2:], np.zeros_like(dsT)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  out = jax_fns('scan')[1](tuple(map(f32, inputs)), (f32(dy), f32(dsT)))
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(out)]


def dw_dz():
  """d(log decay)/dz at ERROR_SHAPE, to compare the CUDA kernel's dz."""
  sig = 1 / (1 + np.exp(-make_inputs(*ERROR_SHAPE)[0].astype(np.float64)))
  return -W_SCALE * sig * (1 - sig)


# ----------------------------------------------------------------------------- torch peers


def _torch():
  import torch  # pylint: disable=g-import-not-at-top
  return torch


def _leaves(shape, peer):
  """Torch leaves (r, w-or-z, k, v, a, b, s0) and cotangents for `peer` on the GPU."""
  torch = _torch()
  z, (r, w, k, v, a, b, s0), (dy, dsT) = make_inputs(*shape)
  t = lambda x, dtype=torch.bfloat16: torch.from_numpy(np.ascontiguousarray(x)).to('cuda', dtype)
  decay_input = z if peer == 'cuda' else w  # fla takes the log decay, the CUDA kernel the raw z
  leaves = [t(x).requires_grad_() for x in (r, decay_input, k, v, a, b)]
  s0_leaf = t(s0 if peer == 'cuda' else np.swapaxes(s0, -1, -2), torch.float32).requires_grad_()  # fla: key-major
  return leaves + [s0_leaf], (t(dy), t(np.swapaxes(dsT, -1, -2), torch.float32))


def fla_fn(shape, safe):
  from fla.ops.rwkv7 import chunk_rwkv7  # pylint: disable=g-import-not-at-top
  B = shape[0]
  extra = dict(safe_gate=True, lower_bound=-W_SCALE) if safe else {}

  def run(r, w, k, v, a, b, s0):
    return chunk_rwkv7(r=r, w=w, k=k, v=v, a=a, b=b, scale=1.0, initial_state=s0.expand(B, *s0.shape),
                       output_final_state=True, **extra)

  return run


def cuda_fn(peft_repo, K):
  """RWKV-PEFT's rwkv7_state_clampw, built as its rwkvop.py builds it (bf16, 16-step chunks)."""
  torch = _torch()
  from torch.utils.cpp_extension import load  # pylint: disable=g-import-not-at-top
  chunk = 16
  src = pathlib.Path(peft_repo) / 'cuda'
  flags = ['-res-usage', f'-D_N_={K}', f'-D_CHUNK_LEN_={chunk}', '--use_fast_math', '-O3', '-Xptxas -O3',
           '--extra-device-vectorization']
  load(name='rwkv7_state_clampw', sources=[str(src / 'rwkv7_state_clampw.cu'), str(src / 'rwkv7_state_clampw.cpp')],
       is_python_module=False, verbose=False, extra_cuda_cflags=flags)
  ops = torch.ops.rwkv7_state_clampw

  class Op(torch.autograd.Function):
    """y from (s0 [B,H,V,K] fp32, r, z, k, v, a, b [B,T,H,K] bf16); gradients of all seven."""

    @staticmethod
    def forward(ctx, s0, r, z, k, v, a, b):
      B, T, H, C = r.shape
      y = torch.empty_like(v)
      states = torch.empty(B, H, T // chunk, C, C, dtype=torch.float32, device=r.device)
      sa = torch.empty(B, T, H, C, dtype=torch.float32, device=r.device)
      ops.forward(s0, r, z, k, v, a, b, y, states, sa)
      ctx.save_for_backward(r, z, k, v, a, b, states, sa)
      return y

    @staticmethod
    def backward(ctx, dy):
      r, z, k, v, a, b, states, sa = ctx.saved_tensors
      B, _, H, C = r.shape
      grads = [torch.empty_like(x) for x in (r, z, k, v, a, b)]
      ds0 = torch.empty(B, H, C, C, dtype=torch.float32, device=r.device)
      ops.backward(r, z, k, v, a, b, dy.contiguous(), states, sa, ds0, *grads)
      return (ds0, *grads)

  def run(r, z, k, v, a, b, s0):
    return Op.apply(s0.repeat(r.shape[0], 1, 1, 1), r, z, k, v, a, b), None

  return run


def bench_torch(run, shape, peer):
  torch = _torch()
  import triton  # pylint: disable=g-import-not-at-top
  leaves, (dy, dsT) = _leaves(shape, peer)

  def fwd_bwd():
    y, sT = run(*leaves)
    outs, cts = ((y,), (dy,)) if sT is None else ((y, sT), (dy, dsT))
    torch.autograd.backward(outs, cts)

  fwd = lambda: run(*leaves)
  bench = functools.partial(triton.testing.do_bench, warmup=25, rep=200, return_mode='median')
  with torch.no_grad():
    fwd_ms = float(bench(fwd))
  return fwd_ms, float(bench(fwd_bwd, grad_to_none=leaves))


def error_torch(run, peer):
  """Outputs and gradients at ERROR_SHAPE in NAMES order, value-major; None where the peer has none."""
  torch = _torch()
  leaves, (dy, dsT) = _leaves(ERROR_SHAPE, peer)
  y, sT = run(*leaves)
  torch.autograd.backward((y,) if sT is None else (y, sT), (dy,) if sT is None else (dy, dsT))
  np64 = lambda x: x.detach().float().cpu().numpy().astype(np.float64)
  grads = [np64(x.grad) for x in leaves]
  if peer != 'cuda':
    sT, grads[-1] = np.swapaxes(np64(sT), -1, -2), np.swapaxes(grads[-1], -1, -2)  # key-major -> value-major
  return [np64(y), sT] + grads


def worst_error(got, want, dw_scale=None):
  """(largest ||x - ref|| / ||ref||, its name); a peer that returns dz is compared with dw * dw_scale."""
  errors = {}
  for name, x, ref in zip(NAMES, got, want):
    if x is None:
      continue
    if name == 'dw' and dw_scale is not None:
      ref = ref * dw_scale
    errors[name] = float(np.linalg.norm(x - ref) / np.linalg.norm(ref))
  name = max(errors, key=errors.get)
  return errors[name], name


# ----------------------------------------------------------------------------- report


def _table(results):
  lines = ['| impl | B | T | H | K | fwd ms | fwd+bwd ms | worst rel. error |', '|---|---|---|---|---|---|---|---|']
  fmt = lambda x: '—' if x is None else f'{x:.3f}'
  for r in results:
    err = '—' if r['error'] is None else f"{r['error']:.1e} ({r['error_of']})"
    lines.append(f"| {r['impl']} | {r['B']} | {r['T']} | {r['H']} | {r['K']} | {fmt(r['fwd_ms'])} | "
                 f"{fmt(r['fwd_bwd_ms'])} | {err} |")
  return '\n'.join(lines)


def write_results(out_dirs, name, record):
  markdown = (f'# WKV-7 on {record["card"]}, {record["date"]}\n\n{_table(record["results"])}\n\n'
              f'peers: {record["peers"]}\n' f'versions: {record["versions"]}\n')
  report.write(out_dirs, name, record, markdown)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', nargs='+', default=['bench/results'], help='output directories')
  parser.add_argument('--reps', type=int, default=20)
  parser.add_argument('--impls', default='pallas,cuda,fla,xla_chunked',
                      help='comma-separated subset of pallas, xla_chunked, fla, fla_safe, cuda')
  parser.add_argument('--peft_repo', help='RWKV-PEFT checkout holding cuda/rwkv7_state_clampw.* (for cuda)')
  parser.add_argument('--shapes', nargs='+', default=[','.join(map(str, s)) for s in SHAPES],
                      help='B,T,H,K ... (default: the three published shapes)')
  args = parser.parse_args()
  shapes = [tuple(int(x) for x in s.split(',')) for s in args.shapes]
  impls = args.impls.split(',')
  if 'cuda' in impls and not args.peft_repo:
    parser.error('cuda needs --peft_repo')

  card = jax.devices()[0].device_kind
  date = report.today()
  stem = report.stem('wkv7', card, date)
  commit = pathlib.Path(str(args.peft_repo or '') + '.commit')
  peers = {'cuda': commit.read_text().strip() if commit.is_file() else args.peft_repo}
  want = reference()
  results = []
  for impl in impls:
    try:
      if impl in ('fla', 'fla_safe', 'cuda'):
        make = (lambda shape: cuda_fn(args.peft_repo, shape[3])) if impl == 'cuda' else (
            lambda shape: fla_fn(shape, safe=impl == 'fla_safe'))
        peer = 'cuda' if impl == 'cuda' else 'fla'
        got = error_torch(make(ERROR_SHAPE), peer)
        error = worst_error(got, reference(for_cuda=True), dw_dz()) if impl == 'cuda' else worst_error(got, want)
        timed = lambda shape: bench_torch(make(shape), shape, peer)
      else:
        error = worst_error(error_jax(impl), want)
        timed = lambda shape: bench_jax(impl, shape, args.reps)
    except Exception as e:  # pylint: disable=broad-except
      print(f'{impl}: failed: {type(e).__name__}: {str(e)[:300]}', flush=True)
      continue
    for shape in shapes:
      fwd = fwd_bwd = None
      try:
        fwd, fwd_bwd = timed(shape)
      except Exception as e:  # pylint: disable=broad-except
        print(f'{impl} {shape}: failed: {type(e).__name__}: {str(e)[:300]}', flush=True)
      B, T, H, K = shape
      results.append(dict(impl=impl, B=B, T=T, H=H, K=K, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd,
                          error=error[0], error_of=error[1]))
      print(results[-1], flush=True)
      write_results(args.out, stem, dict(card=card, date=date, versions=report.versions(), peers=peers, results=results))
  print(_table(results))


if __name__ == '__main__':
  main()
