"""RWKV-6 WKV as chunked Pallas GPU kernels (Triton lowering), forward and backward.

Lowering: Pallas' Triton backend (`pltriton.CompilerParams`). It is deprecated
in JAX 0.11 but it is the Pallas GPU path that runs on Ampere and Ada (RTX
3090/4090, A100) as well as Hopper, where most state tuning happens; Mosaic GPU
is Hopper-and-newer. The chunk math below uses only 2-D dots, elementwise ops
and row/column reductions, so it can move to another lowering. Measured on an
H100 (bench/results/wkv6_*_2026-11-28e), fwd+bwd with bf16 inputs: 0.36 /
1.00 / 14.5 ms at (B,T,H,K) = (1,1024,32,64) / (8,512,32,64) / (8,4096,64,64),
fla's chunk_rwkv6 1.91 / 2.19 / 14.7 ms in the same run. Not yet measured on
an Ampere or Ada card; a Mosaic GPU (wgmma) variant for Hopper is not built.

Algorithm (per head, state S value-major [V, K], log decay g = -exp(w) <= 0,
chunk-local cumulative sums gi (inclusive) and ge = gi - g (exclusive), G the
chunk total; every exponent evaluated is <= 0, see wkv6_chunked.py):

  state kernel  (grid B x H x V-tiles, sequential over chunks, state in
                 registers): stores each chunk's start state and the final one.
                 S <- S * exp(G) + v^T (k * exp(G - gi))
  chunk kernel  (grid chunks x B x H, fully parallel): one chunk of rows,
                 o = (r * exp(ge)) S^T + A v, the causal in-chunk A as a dot of
                 factors split at the chunk's middle row where its decay span
                 allows (in the forward, per half where it does not), else as
                 pairwise exponentials a key row at a time (see DOT_SPAN), as
                 [L, K] tiles rather than an [L, L, K] block.
  backward      the same two shapes: a reverse state kernel carries dS (its
                 final value is d s0) and stores each chunk's end-state gradient;
                 a parallel chunk kernel recomputes A from the stored states and
                 returns dr, dk, dv and the log-decay gradient
                 dg_m = sum_{t>m} r_t dr_t - sum_{t>=m} k_t dk_t + dG
                 (bonus-free gradients, dG = colsum(S_end * dS_end)).

The bonus u (elementwise, in XLA inside the custom VJP), the chain rule through
-exp(w) and the padding of T to a whole number of state steps (k = v = r = 0,
g = 0, i.e. decay 1) are plain JAX.
Dots run at HIGHEST (IEEE fp32) for fp32 inputs and as bf16x3 (see _dot) for
bf16 inputs.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config:
  """Static kernel configuration (hashable: it is a custom_vjp nondiff argument).

  Defaults from bench/wkv6.py --sweep on an H100 (bench/results/wkv6_sweep_*),
  fwd+bwd at (1,1024,32,64) / (8,512,32,64), same-call comparisons: 3xTF32
  dots 0.82 / 2.80 ms, bf16x3 dots 0.50 / 1.54 ms (the worst error stays the
  bf16 rounding of dv, 1.7e-3; the decay gradient's goes from 1e-5 to ~3e-4).
  16-row chunks (bench/results/wkv6_sweep_session5_*): the 32-row backward ran
  at ptxas' 255-register cap with 1.3 KB spilled; at 16 rows it holds half the
  live tiles, and fwd+bwd went 0.52 / 1.57 / 23.0 -> 0.41 / 1.00 / 14.6 ms,
  adding (8,4096,64,64), though its forward is slower (twice the stored states
  and state steps; a 32-row chunk now gives 0.15 / 0.41 / 5.7 ms forward and
  0.42 / 1.28 / 17.4 fwd+bwd). Two state steps a loop iteration: 0.40 -> 0.37
  ms at (1,1024), 0.98 -> 1.02 at (8,512). 8 warps were slower.
  Plain TF32 dots are ~5% faster but put the decay gradient at 4e-3 to 1.2e-2
  relative RMS, over the 5e-3 bound for bf16 inputs.
  """
  chunk: int = 16           # rows of a parallel program and of a state step (Triton dots need >= 16)
  block_v: int = 32         # V-tile of the sequential state kernels (more tiles, more programs)
  state_steps: int = 2      # chunks per loop iteration of the state kernels (T is padded to a multiple)
  exact: bool = True        # fp32 inputs: IEEE fp32 dots (set from the input dtypes)
  dots: str = 'bf16x3'      # dots for bf16 inputs: 'bf16x3', 'tf32x3', 'tf32' or 'ieee' (see _dot)
  diag: str = 'auto'        # the in-chunk term: 'auto' (one dot where the decay span allows, see DOT_SPAN) or 'rows'
  interpret: bool = False
  warps_state: int = 4
  warps_out: int = 4
  warps_bwd: int = 4        # ptxas reports spills at 4 warps, yet it is faster than 8
  stages: int = 2

  def params(self, warps):
    return pltriton.CompilerParams(num_warps=warps, num_stages=self.stages)


def _split_bf16(x):
  """x as bf16 parts whose sum holds 16 significant bits; a bf16 input is exact as one part."""
  if x.dtype == jnp.bfloat16:
    return (x,)
  hi = x.astype(jnp.bfloat16)
  return hi, (x - hi.astype(f32)).astype(jnp.bfloat16)


def _dot(a, b, mode, trans_a=False, trans_b=False):
  """a @ b in fp32 by one of the modes of Config.dots (see _mode)."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  if mode == 'bf16x3':
    # (a_hi + a_lo)(b_hi + b_lo) less a_lo * b_lo: ~2^-16 relative error from
    # bf16 MMAs; two products when one side is already bf16 (raw r, k, v).
    parts = [(x, y) for i, x in enumerate(_split_bf16(a)) for j, y in enumerate(_split_bf16(b)) if i + j < 2]
    return sum(lax.dot_general(x, y, dims, preferred_element_type=f32) for x, y in parts)
  precision = {'ieee': lax.Precision.HIGHEST, 'tf32': lax.Precision.DEFAULT,
               'tf32x3': lax.DotAlgorithmPreset.TF32_TF32_F32_X3}[mode]
  return lax.dot_general(a.astype(f32), b.astype(f32), dims, precision=precision, preferred_element_type=f32)


def _mode(cfg):
  # Plain TF32 is too coarse for the log-decay gradient, a difference of
  # accumulated products. fp32 inputs get IEEE fp32 dots. CPUs (interpret
  # mode) have no TF32 and run those modes as IEEE; bf16x3 runs as written.
  if cfg.exact or (cfg.interpret and cfg.dots != 'bf16x3'):
    return 'ieee'
  return cfg.dots


def _masked_exp(mask, x):
  # -inf (not a select after exp) so masked lanes never hold inf.
  return jnp.exp(jnp.where(mask, x, -jnp.inf))


def _strictly_lower(a_LxL):
  row = lax.broadcasted_iota(jnp.int32, a_LxL.shape, 0)
  return jnp.where(row > lax.broadcasted_iota(jnp.int32, a_LxL.shape, 1), a_LxL, 0.0)


# The causal in-chunk term, A[t,s] = sum_j r_tj k_sj exp(ge_tj - gi_sj) for s < t.
# A is one dot split at the chunk's middle row `ref` (per channel),
# (r exp(ge - ref)) (k exp(ref - gi))^T, wherever both factors stay within
# exp(+-DOT_SPAN), far inside fp32: the middle halves the largest exponent the
# start row would give. Where the span is wider, the forward tries two dots
# (see _diagonal_fwd's by_halves), which halve it again; past that (decay
# below exp(-60) within a quarter chunk: rare in trained models, common in the
# tests) one key row s is taken per step, so the pairwise exponentials live as
# an [L, K] tile at a time rather than an [L, L, K] block.
DOT_SPAN = 60.0


def _mid(gi_ref, start, rows):
  """ge of the middle row of `rows` rows from `start` (= gi of the row before it)."""
  return gi_ref[start + rows // 2 - 1:start + rows // 2, :]


def _by_span(cfg, gi_ref, gi, ge, by_dot, by_rows, operand, by_halves=None):
  if cfg.diag == 'rows':
    return by_rows(operand)
  L = gi.shape[0]
  span = lambda ref: jnp.maximum(jnp.max(ge - ref), jnp.max(ref - gi))
  fallback = by_rows
  if by_halves is not None:
    top = lax.broadcasted_iota(jnp.int32, gi.shape, 0) < L // 2
    ref_LxK = jnp.where(top, _mid(gi_ref, 0, L // 2), _mid(gi_ref, L // 2, L // 2))
    fallback = lambda x: lax.cond(span(ref_LxK) <= DOT_SPAN, functools.partial(by_halves, ref_LxK), by_rows, x)
  ref = _mid(gi_ref, 0, L)
  return lax.cond(span(ref) <= DOT_SPAN, functools.partial(by_dot, ref), fallback, operand)


def _diagonal_fwd(cfg, refs, r, k, v, gi, ge, o):
  """Adds the causal in-chunk term sum_{s<t} A[t,s] v_s to o."""
  k_ref, v_ref, gi_ref = refs
  mode = _mode(cfg)
  L = r.shape[0]

  def by_dot(ref, o):
    a = _strictly_lower(_dot(r * jnp.exp(ge - ref), k * jnp.exp(ref - gi), mode, trans_b=True))
    return o + _dot(a, v, mode)

  def by_halves(ref_LxK, o):
    # Pairs within a half use that half's middle row (ref_LxK, per row); pairs
    # across the halves use the boundary, where both factors are <= 1. Each
    # dot's entries for the other kind of pair may overflow and are selected away.
    within = _dot(r * jnp.exp(ge - ref_LxK), k * jnp.exp(ref_LxK - gi), mode, trans_b=True)
    edge = _mid(gi_ref, 0, L)
    across = _dot(r * jnp.exp(jnp.minimum(ge - edge, 0.0)), k * jnp.exp(jnp.minimum(edge - gi, 0.0)), mode,
                  trans_b=True)
    row = lax.broadcasted_iota(jnp.int32, (L, L), 0) < L // 2
    col = lax.broadcasted_iota(jnp.int32, (L, L), 1) < L // 2
    return o + _dot(_strictly_lower(jnp.where(row == col, within, across)), v, mode)

  def by_rows(o):
    row_LxK = lax.broadcasted_iota(jnp.int32, r.shape, 0)

    def body(s, o):
      row = pl.ds(s, 1)
      e = _masked_exp(row_LxK > s, ge - gi_ref[row, :])
      a_col = jnp.sum(r * k_ref[row, :].astype(f32) * e, axis=1, keepdims=True)
      return o + a_col * v_ref[row, :].astype(f32)

    return lax.fori_loop(0, r.shape[0], body, o)

  return _by_span(cfg, gi_ref, gi, ge, by_dot, by_rows, o, by_halves)


def _diagonal_bwd(cfg, refs, r, k, v, gi, ge, do):
  """The in-chunk terms of (dr, dk, dv)."""
  k_ref, v_ref, gi_ref = refs
  mode = _mode(cfg)

  def by_dot(ref, _):
    q, kq = r * jnp.exp(ge - ref), k * jnp.exp(ref - gi)
    a = _strictly_lower(_dot(q, kq, mode, trans_b=True))
    da = _strictly_lower(_dot(do, v, mode, trans_b=True))
    return (jnp.exp(ge - ref) * _dot(da, kq, mode), jnp.exp(ref - gi) * _dot(da, q, mode, trans_a=True),
            _dot(a, do, mode, trans_a=True))

  def by_rows(grads):
    row_LxK = lax.broadcasted_iota(jnp.int32, r.shape, 0)
    row_LxV = lax.broadcasted_iota(jnp.int32, do.shape, 0)

    def body(s, grads):
      dr, dk, dv = grads
      row = pl.ds(s, 1)
      k_s = k_ref[row, :].astype(f32)
      e = _masked_exp(row_LxK > s, ge - gi_ref[row, :])
      dA_col = jnp.sum(do * v_ref[row, :].astype(f32), axis=1, keepdims=True)
      a_col = jnp.sum(r * k_s * e, axis=1, keepdims=True)
      dr += dA_col * k_s * e
      dk += jnp.where(row_LxK == s, jnp.sum(dA_col * r * e, axis=0, keepdims=True), 0.0)
      dv += jnp.where(row_LxV == s, jnp.sum(a_col * do, axis=0, keepdims=True), 0.0)
      return dr, dk, dv

    return lax.fori_loop(0, r.shape[0], body, grads)

  zeros = (jnp.zeros(r.shape, f32), jnp.zeros(k.shape, f32), jnp.zeros(do.shape, f32))
  return _by_span(cfg, gi_ref, gi, ge, by_dot, by_rows, zeros)


# ----------------------------------------------------------------------------- forward


def _over_chunks(cfg, n_chunks, step, carry):
  """step(n, carry) for n = 0 .. n_chunks-1, Config.state_steps chunks a loop iteration: a
  chunk's loads and dot do not depend on the carried state, so unrolled they overlap the
  previous chunk's update instead of waiting for the loop's next turn."""
  def body(i, carry):
    for j in range(cfg.state_steps):
      carry = step(i * cfg.state_steps + j, carry)
    return carry

  return lax.fori_loop(0, n_chunks // cfg.state_steps, body, carry)


def _state_fwd_kernel(k_ref, gi_ref, v_ref, s0_ref, h_ref, sT_ref, *, cfg, n_chunks):
  L, mode = cfg.chunk, _mode(cfg)

  def body(n, s_VxK):
    h_ref[n] = s_VxK
    start = pl.multiple_of(n * L, L)
    gi = gi_ref[pl.ds(start, L), :]
    G = gi_ref[pl.ds(start + L - 1, 1), :]
    kd = k_ref[pl.ds(start, L), :].astype(f32) * jnp.exp(G - gi)
    v = v_ref[pl.ds(start, L), :]
    return s_VxK * jnp.exp(G) + _dot(v, kd, mode, trans_a=True)

  sT_ref[...] = _over_chunks(cfg, n_chunks, body, s0_ref[...])


def _out_fwd_kernel(r_ref, k_ref, v_ref, g_ref, gi_ref, h_ref, o_ref, *, cfg):
  r, k, v, gi = r_ref[...], k_ref[...], v_ref[...], gi_ref[...]  # r, k, v stay raw for bf16x3
  ge = gi - g_ref[...]
  o = _dot(r * jnp.exp(ge), h_ref[...], _mode(cfg), trans_b=True)
  o_ref[...] = _diagonal_fwd(cfg, (k_ref, v_ref, gi_ref), r, k, v, gi, ge, o)


# ----------------------------------------------------------------------------- backward


def _state_bwd_kernel(r_ref, g_ref, gi_ref, do_ref, dsT_ref, dh_ref, ds0_ref, *, cfg, n_chunks):
  L, mode = cfg.chunk, _mode(cfg)

  def body(i, ds_VxK):
    n = n_chunks - 1 - i
    dh_ref[n] = ds_VxK
    start = pl.multiple_of(n * L, L)
    gi = gi_ref[pl.ds(start, L), :]
    G = gi_ref[pl.ds(start + L - 1, 1), :]
    rq = r_ref[pl.ds(start, L), :].astype(f32) * jnp.exp(gi - g_ref[pl.ds(start, L), :])
    return ds_VxK * jnp.exp(G) + _dot(do_ref[pl.ds(start, L), :], rq, mode, trans_a=True)

  ds0_ref[...] = _over_chunks(cfg, n_chunks, body, dsT_ref[...])


def _chunk_bwd_kernel(r_ref, k_ref, v_ref, g_ref, gi_ref, do_ref, h_ref, dh_ref,
                      dr_ref, dk_ref, dv_ref, dg_ref, *, cfg):
  L, mode = cfg.chunk, _mode(cfg)
  r, k, v, do, gi = r_ref[...], k_ref[...], v_ref[...], do_ref[...], gi_ref[...]  # r, k, v stay raw for bf16x3
  ge = gi - g_ref[...]
  G = gi_ref[L - 1:L, :]
  # In-chunk terms first, then each state term is added as its gradient is
  # stored (fewer live tiles: the kernel runs at the 255-register cap).
  dr, dk, dv = _diagonal_bwd(cfg, (k_ref, v_ref, gi_ref), r, k, v, gi, ge, do)
  dv_ref[...] = dv + _dot(k * jnp.exp(G - gi), dh_ref[...], mode, trans_b=True)
  dk_end = jnp.exp(G - gi) * _dot(v, dh_ref[...], mode)  # through the chunk's end state
  dk = dk + dk_end
  dk_ref[...] = dk
  dr = dr + jnp.exp(ge) * _dot(do, h_ref[...], mode)
  dr_ref[...] = dr
  # Log-decay gradient: reverse cumsum of r*dr - k*dk (r part exclusive), plus
  # every row's share in the chunk's end state, d/dG = colsum(S_end * dS_end),
  # whose in-chunk part is sum_s k_s * dk_end_s.
  dge = r * dr
  x = dge - k * dk
  upper_LxL = (lax.broadcasted_iota(jnp.int32, (L, L), 1) >= lax.broadcasted_iota(jnp.int32, (L, L), 0)).astype(f32)
  dg_ref[...] = (_dot(upper_LxL, x, 'ieee') - dge + jnp.sum(k * dk_end, axis=0, keepdims=True)
                 + jnp.exp(G) * jnp.sum(h_ref[...] * dh_ref[...], axis=0, keepdims=True))


# ----------------------------------------------------------------------------- pallas_calls


def _state_call(kernel, name, cfg, kv_inputs, v_input, s_in):
  """The sequential state kernels: grid B x H x V-tiles over [B, T, H, K] inputs
  (one [B, T, H, V] input tiled along V) and a start state [B, H, V, K]. Returns
  (the state at each chunk boundary [B, H, n_chunks, V, K], the last state)."""
  B, T, H, K = kv_inputs[0].shape
  V = v_input.shape[-1]
  bv = min(cfg.block_v, V)
  n_chunks = T // cfg.chunk
  full = pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h, 0))
  vtile = pl.BlockSpec((None, T, None, bv), lambda b, h, j: (b, 0, h, j))
  state = pl.BlockSpec((None, None, bv, K), lambda b, h, j: (b, h, j, 0))
  states = pl.BlockSpec((None, None, n_chunks, bv, K), lambda b, h, j: (b, h, 0, j, 0))
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg, n_chunks=n_chunks),
      grid=(B, H, V // bv),
      in_specs=[full] * len(kv_inputs) + [vtile, state],
      out_specs=[states, state],
      out_shape=[jax.ShapeDtypeStruct((B, H, n_chunks, V, K), f32),
                 jax.ShapeDtypeStruct((B, H, V, K), f32)],
      compiler_params=cfg.params(cfg.warps_state),
      interpret=cfg.interpret,
      name=name,
  )(*kv_inputs, v_input, s_in)


def _chunk_specs(cfg, K, V):
  L = cfg.chunk
  tile = lambda width: pl.BlockSpec((None, L, None, width), lambda n, b, h: (b, n, h, 0))
  state = pl.BlockSpec((None, None, None, V, K), lambda n, b, h: (b, h, n, 0, 0))
  return tile(K), tile(V), state


def _out_fwd(cfg, r, k, v, g, gi, h):
  B, T, H, K = r.shape
  V = v.shape[-1]
  tk, tv, state = _chunk_specs(cfg, K, V)
  return pl.pallas_call(
      functools.partial(_out_fwd_kernel, cfg=cfg),
      grid=(T // cfg.chunk, B, H),
      in_specs=[tk, tk, tv, tk, tk, state],
      out_specs=tv,
      out_shape=jax.ShapeDtypeStruct((B, T, H, V), f32),
      compiler_params=cfg.params(cfg.warps_out),
      interpret=cfg.interpret,
      name='wkv6_out_fwd',
  )(r, k, v, g, gi, h)


def _chunk_bwd(cfg, r, k, v, g, gi, do, h, dh):
  B, T, H, K = r.shape
  V = v.shape[-1]
  tk, tv, state = _chunk_specs(cfg, K, V)
  return pl.pallas_call(
      functools.partial(_chunk_bwd_kernel, cfg=cfg),
      grid=(T // cfg.chunk, B, H),
      in_specs=[tk, tk, tv, tk, tk, tv, state, state],
      out_specs=[tk, tk, tv, tk],
      out_shape=[jax.ShapeDtypeStruct((B, T, H, K), f32), jax.ShapeDtypeStruct((B, T, H, K), f32),
                 jax.ShapeDtypeStruct((B, T, H, V), f32), jax.ShapeDtypeStruct((B, T, H, K), f32)],
      compiler_params=cfg.params(cfg.warps_bwd),
      interpret=cfg.interpret,
      name='wkv6_chunk_bwd',
  )(r, k, v, g, gi, do, h, dh)


# ----------------------------------------------------------------------------- custom VJP


def _chunk_cumsum(cfg, g_BxTxHxK):
  B, T, H, K = g_BxTxHxK.shape
  L = cfg.chunk
  return jnp.cumsum(g_BxTxHxK.reshape(B, T // L, L, H, K), axis=2).reshape(B, T, H, K)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _wkv(cfg, r, k, v, g, u, s0):
  return _wkv_fwd(cfg, r, k, v, g, u, s0)[0]


def _bonus(r, k, u):
  """sum_j r_j u_j k_j per step: [B, T, H, 1] fp32 (the current token's own term)."""
  return jnp.sum(r.astype(f32) * u * k.astype(f32), axis=-1, keepdims=True)


def _wkv_fwd(cfg, r, k, v, g, u, s0):
  gi = _chunk_cumsum(cfg, g)
  h, sT = _state_call(_state_fwd_kernel, 'wkv6_state_fwd', cfg, (k, gi), v, s0)
  o = _out_fwd(cfg, r, k, v, g, gi, h) + _bonus(r, k, u) * v.astype(f32)
  return (o, sT), (r, k, v, g, u, gi, h)


def _wkv_bwd(cfg, residuals, cotangents):
  # The bonus terms are added here in fp32 so that bf16 gradients are rounded once.
  r, k, v, g, u, gi, h = residuals
  do, dsT = cotangents
  dh, ds0 = _state_call(_state_bwd_kernel, 'wkv6_state_bwd', cfg, (r, g, gi), do, dsT)
  dr, dk, dv, dg = _chunk_bwd(cfg, r, k, v, g, gi, do, h, dh)
  rf, kf = r.astype(f32), k.astype(f32)
  do_v = jnp.sum(do * v.astype(f32), axis=-1, keepdims=True)
  dr += do_v * u * kf
  dk += do_v * u * rf
  dv += _bonus(r, k, u) * do
  du = jnp.sum(do_v * rf * kf, axis=(0, 1))
  return dr.astype(r.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, du, ds0


_wkv.defvjp(_wkv_fwd, _wkv_bwd)


@functools.partial(jax.jit, static_argnames=('interpret', 'config'))
def wkv6_pallas(r_BxTxHxK, k_BxTxHxK, v_BxTxHxV, w_BxTxHxK, u_HxK, s0_BxHxVxK, *,
                interpret=None, config=None):
  """WKV-6 with Pallas kernels. Returns (y [B,T,H,V] fp32, final state [B,H,V,K] fp32).

  r, k, v may be bf16 or fp32 (their gradients come back in the same dtype);
  decays, states and accumulations are fp32. `interpret` defaults to True on
  CPU. `config` overrides the tiling (its `exact` and `interpret` fields are
  set here).
  """
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  B, T, H, _ = r_BxTxHxK.shape
  exact = all(x.dtype == f32 for x in (r_BxTxHxK, k_BxTxHxK, v_BxTxHxV))
  # The state kernels are sequential over T: with few sequences * heads, split
  # V finer so that there are enough programs to fill the GPU.
  cfg = config or Config(block_v=16 if B * H < 128 else 32)
  cfg = dataclasses.replace(cfg, exact=exact, interpret=interpret)
  pad = ((0, 0), (0, -T % (cfg.chunk * cfg.state_steps)), (0, 0), (0, 0))
  g = -jnp.exp(w_BxTxHxK.astype(f32))
  r, k, v, g = (jnp.pad(x, pad) for x in (r_BxTxHxK, k_BxTxHxK, v_BxTxHxV, g))
  o, sT = _wkv(cfg, r, k, v, g, u_HxK.astype(f32), s0_BxHxVxK.astype(f32))
  return o[:, :T], sT
