"""WKV-7 implementations against an fp64 numpy recurrence with a hand-written backward.

Every run draws fresh inputs (the seed is printed on failure) the way RWKV-7
makes them: a = -kk, b = kk * iclr with kk L2-normalised per head and iclr
uniform in (0, 1); log decays w uniform over a range that is either the
model's (-exp(-0.5), 0), a steep one, or one next to 0 (decay ~1); T not a
multiple of the chunk; a nonzero initial state (shared over a batch or one per
sequence) and random cotangents on both y and the final state. CPU runs the
Pallas kernels in interpret mode; `pytest -m gpu` runs them compiled on a GPU.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import IMPLEMENTATIONS, default_implementation
from pallas_kernels.wkv7 import wkv7
from pallas_kernels.wkv7_chunked import wkv7_chunked
from pallas_kernels.wkv7_pallas import MIN_LOG_DECAY, Config, wkv7_pallas

# Relative RMS, ||x - ref|| / ||ref||. bf16 inputs: y and the gradients that
# are sums of bf16-rounded products carry bf16's rounding (~2e-3).
TOL = {'float32': 1e-4, 'bfloat16': 5e-3}
NAMES = ('y', 'sT', 'dr', 'dw', 'dk', 'dv', 'da', 'db', 'ds0')
MODEL_W = (-float(np.exp(-0.5)), 0.0)  # the model's log decays: -exp(-0.5) * sigmoid(.)

on_gpu = pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU')


def reference_fp64(r, w, k, v, a, b, s0_BxHxVxK, dy, dsT):
  """Forward and backward of the recurrence in fp64, one step at a time. Returns (y, sT, grads)."""
  r, w, k, v, a, b, s, dy, dS = (np.asarray(x, np.float64) for x in (r, w, k, v, a, b, s0_BxHxVxK, dy, dsT))
  decay = np.exp(w)
  states, sas, y = [], [], np.zeros(v.shape)
  for t in range(r.shape[1]):
    states.append(s)
    sas.append(np.einsum('bhvk,bhk->bhv', s, a[:, t]))  # S_{t-1} a_t
    s = (s * decay[:, t, :, None, :] + sas[t][..., None] * b[:, t, :, None, :]
         + v[:, t, :, :, None] * k[:, t, :, None, :])
    y[:, t] = np.einsum('bhvk,bhk->bhv', s, r[:, t])
  sT = s
  dr, dw, dk, dv, da, db = (np.zeros_like(x) for x in (r, w, k, v, a, b))
  for t in reversed(range(r.shape[1])):
    dS = dS + dy[:, t, :, :, None] * r[:, t, :, None, :]  # dS is now d/dS_t
    dr[:, t] = np.einsum('bhvk,bhv->bhk', s, dy[:, t])
    dv[:, t] = np.einsum('bhvk,bhk->bhv', dS, k[:, t])
    dk[:, t] = np.einsum('bhvk,bhv->bhk', dS, v[:, t])
    dsa = np.einsum('bhvk,bhk->bhv', dS, b[:, t])
    db[:, t] = np.einsum('bhvk,bhv->bhk', dS, sas[t])
    s = states[t]
    dw[:, t] = np.sum(dS * s, axis=2) * decay[:, t]
    da[:, t] = np.einsum('bhvk,bhv->bhk', s, dsa)
    dS = dS * decay[:, t, :, None, :] + dsa[..., None] * a[:, t, :, None, :]
  return y, sT, (dr, dw, dk, dv, da, db, dS)


def _rel_rms(x, ref):
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))


def random_case(B, T, H, K, dtype='float32', shared_s0=True, w_range=MODEL_W):
  """Fresh random inputs (r, w, k, v, a, b rounded to dtype but w, fp32), cotangents of y and the
  final state, and the fp64 reference's outputs and gradients. Returns (seed, inputs,
  cotangents, expected), numpy float32 arrays and (y, sT, dr, dw, dk, dv, da, db, ds0)."""
  seed = int(np.random.SeedSequence().entropy % 2**31)
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  # Round to the tested dtype first so the reference sees the same inputs.
  rounded = lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
  r, k, v = (rounded(normal(B, T, H, K)) for _ in range(3))
  kk = normal(B, T, H, K)
  kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
  iclr = rng.uniform(0, 1, (B, T, H, K)).astype(np.float32)
  a, b = rounded(-kk), rounded(kk * iclr)
  w = rng.uniform(*w_range, (B, T, H, K)).astype(np.float32)
  s0 = normal(H, K, K) if shared_s0 else normal(B, H, K, K)
  dy = rounded(normal(B, T, H, K))  # y comes back in the inputs' dtype, and so does its cotangent
  dsT = normal(B, H, K, K)
  y, sT, grads = reference_fp64(r, w, k, v, a, b, np.broadcast_to(s0, (B, H, K, K)), dy, dsT)
  if shared_s0:
    grads = grads[:-1] + (grads[-1].sum(0),)
  return seed, (r, w, k, v, a, b, s0), (dy, dsT), (y, sT) + grads


def check(fn, B, T, H, K, dtype='float32', shared_s0=True, w_range=MODEL_W):
  """Runs fn(r, w, k, v, a, b, s0) forward and backward against the fp64 reference."""
  seed, inputs, (dy, dsT), expected = random_case(B, T, H, K, dtype, shared_s0, w_range)
  dtypes = (dtype, 'float32', dtype, dtype, dtype, dtype, 'float32')  # w and s0 are fp32
  args = [jnp.asarray(x, d) for x, d in zip(inputs, dtypes)]
  (y_out, sT_out), vjp = jax.vjp(fn, *args)
  assert y_out.dtype == jnp.dtype(dtype), f'y is {y_out.dtype} for {dtype} inputs'
  grads = vjp((jnp.asarray(dy, dtype), jnp.asarray(dsT)))
  for arg, grad in zip(args, grads):
    assert grad.dtype == arg.dtype and grad.shape == arg.shape, (arg.dtype, grad.dtype, arg.shape, grad.shape)
  outs = (y_out, sT_out) + tuple(grads)
  errors = {name: _rel_rms(o, ref) for name, o, ref in zip(NAMES, outs, expected)}
  nans = [name for name, o in zip(NAMES, outs) if not np.all(np.isfinite(np.asarray(o, np.float32)))]
  print(f'seed={seed} {dtype} B={B} T={T} H={H} K={K} w in {w_range}: '
        + ' '.join(f'{n}={e:.1e}' for n, e in errors.items()))
  assert not nans, f'non-finite {nans} (seed {seed})'
  bad = {n: e for n, e in errors.items() if not e <= TOL[dtype]}
  assert not bad, f'relative RMS error above {TOL[dtype]}: {bad} (seed {seed})'


def _via_api(implementation):
  return functools.partial(wkv7, implementation=implementation)


def _pallas(**config):
  return functools.partial(wkv7_pallas, config=Config(**config))


# ----------------------------------------------------------------------------- CPU


def test_scan_reference_matches_fp64():
  check(_via_api('scan'), B=2, T=23, H=2, K=16, shared_s0=False, w_range=(-5.0, 0.0))


# xla_chunked forms every pairwise decay directly, so it takes any w <= 0.
@pytest.mark.parametrize('dtype,shared_s0,w_range', [('float32', True, MODEL_W), ('float32', False, (-30.0, 0.0)),
                                                     ('bfloat16', False, MODEL_W), ('float32', True, (-1e-3, 0.0))])
def test_xla_chunked(dtype, shared_s0, w_range):
  check(_via_api('xla_chunked'), B=3, T=77, H=2, K=32, dtype=dtype, shared_s0=shared_s0, w_range=w_range)


# One sub-chunk a chunk (pairwise exponentials only), and 2-row sub-chunks with steep decays.
@pytest.mark.parametrize('chunk,sub,T,w_range', [(16, 16, 1, MODEL_W), (8, 2, 30, (-30.0, 0.0))])
def test_xla_chunked_tilings(chunk, sub, T, w_range):
  fn = functools.partial(wkv7_chunked, chunk=chunk, sub=sub)
  check(lambda *args: fn(*args[:6], jnp.broadcast_to(args[6], (2,) + args[6].shape)), B=2, T=T, H=2, K=16,
        w_range=w_range)


def test_xla_chunked_many_heads():
  check(_via_api('xla_chunked'), B=4, T=40, H=16, K=16, shared_s0=True, w_range=(-5.0, 0.0))


@pytest.mark.parametrize('dtype,w_range', [('float32', (MIN_LOG_DECAY, 0.0)), ('bfloat16', MODEL_W)])
def test_pallas_interpret_via_api(dtype, w_range):
  check(_via_api('pallas'), B=2, T=45, H=2, K=32, dtype=dtype, shared_s0=dtype == 'float32', w_range=w_range)


def test_pallas_interpret_steepest_decay():
  """Every step within 1 of MIN_LOG_DECAY: near the split factors' widest span. dw is then a
  small difference of sums of O(1) terms (every decay product is tiny): 1.5e-5 to 2.1e-5 in
  fp32 (4 draws); MIN_LOG_DECAY at every step also passes, at 3.6e-5 to 5.2e-5 (3 draws)."""
  check(_via_api('pallas'), B=1, T=40, H=1, K=32, w_range=(MIN_LOG_DECAY, MIN_LOG_DECAY + 1.0))


# One V-tile a state program, one chunk a state step, decays next to 1.
def test_pallas_interpret_tiling():
  check(_pallas(block_v=32, state_steps=1), B=1, T=20, H=3, K=32, shared_s0=False, w_range=(-1e-3, 0.0))


def test_implementations_listed():
  assert set(IMPLEMENTATIONS) == {'scan', 'xla_chunked', 'pallas'}
  assert default_implementation(1) == 'scan'
  with pytest.raises(ValueError):
    wkv7(*[jnp.zeros((1, 2, 1, 16))] * 6, jnp.zeros((1, 16, 16)), implementation='cuda')


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('implementation,B,T,H,w_range', [
    ('pallas', 2, 1000, 4, MODEL_W), ('pallas', 3, 77, 2, (MIN_LOG_DECAY, 0.0)), ('pallas', 4, 96, 32, MODEL_W),
    ('xla_chunked', 3, 77, 2, (-30.0, 0.0))])
def test_gpu(implementation, B, T, H, w_range, dtype):
  """B * H = 128 takes default_config's one-V-tile state programs."""
  check(_via_api(implementation), B=B, T=T, H=H, K=64, dtype=dtype, shared_s0=B > 2, w_range=w_range)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize('block_v,state_steps,dots', [(64, 2, 'bf16x3'), (32, 1, 'tf32x3'), (16, 4, 'bf16x3')])
def test_gpu_pallas_tilings(block_v, state_steps, dots):
  check(_pallas(block_v=block_v, state_steps=state_steps, dots=dots), B=2, T=300, H=2, K=64, dtype='bfloat16',
        shared_s0=False)
