"""RWKV-7 WKV as chunked Pallas GPU kernels (Triton lowering), forward and backward.

The algebra is that of wkv7_chunked.py (read it first): per chunk of L rows,
U = T (A_ak V + (a * exp(ge)) S0^T) with T = (I - A_ab)^-1, y = (r * exp(gi))
S0^T + A_rk V + A_rb U, S_L = S0 diag(exp(G)) + V^T kd + U^T bd, where kd = k *
exp(G - gi) and bd = b * exp(G - gi). Triton tiles are 2-D, so the in-chunk
matrices are dots of factors split at a reference row c = gi[L/2 - 1] (per
channel): A_xy = (x * exp(q - c)) (y * exp(c - gi))^T. Each factor's exponent
is at most about L/2 * |w| (the masked entries' products L * |w|), which fp32
holds for L = 16 while w >= MIN_LOG_DECAY; RWKV-7's decays (w > -0.61) are far
inside. T is formed by forward substitution, a row a step.

Everything that does not depend on the carried state is formed by parallel
programs (grid chunks x B x H), so that the sequential state kernels (grid B x
H x V-tiles, state in registers) take two dependent dots a chunk:

  prep (fwd)    T by forward substitution, a row a step; W = T (a * exp(ge)),
                U_V = T A_ak V (so U = W S0^T + U_V), P = T^T bd and T, as
                fp32 rows of [B, T, H, X] arrays.
  state (fwd)   S <- S diag(exp(G)) + V^T kd + (W S^T + U_V)^T bd; stores each
                chunk's start state and returns the last one.
  output        y of one chunk from its start state.
  prep (bwd)    Q = T^T A_rb^T dy, so that dR = T^T dU = Q + P dS_L^T, where
                dU = A_rb^T dy + bd dS_L^T is the gradient of U.
  state (bwd)   dS <- dS diag(exp(G)) + dy^T (r * exp(gi)) + dR^T (a * exp(ge))
                in reverse (its last value is d s0); stores each chunk's
                end-state gradient dS_L.
  gradients     dr, dw, dk, dv, da, db of one chunk from its start state and
                dS_L: the in-chunk matrices' gradients dA_rk = dy V^T, dA_rb =
                dy U^T, dA_ak = dR V^T, dA_ab = dR U^T (masked), taken through
                the split factors, and the log-decay gradient from the exponent
                each factor carries: d/dgi = r dr - k dk - b db, d/dge = a da,
                d/dG = the chunk-end terms, so dw_m = sum_{t>=m} d/dgi_t +
                sum_{t>m} d/dge_t + d/dG. (The reference row c cancels from
                every A, so it adds nothing.)

Packed rows (doc_starts) change only the two state kernels, as in wkv6_pallas: a
chunk that starts a document starts from s0, and its start gradient goes to d s0.

Dots run at IEEE fp32 for fp32 inputs and as bf16x3 for bf16 inputs (see
common.dot); the state copies the chunk kernels read are bf16 for bf16 inputs,
as in wkv6_pallas. Padding T to whole state steps (r = k = v = a = b = 0,
w = 0) is plain JAX.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import (KernelConfig, backward_pass, chunk_starts, dot, dot_mode, forward_pass, row,
                                   state_call, strictly_lower, sum_rows)

f32 = jnp.float32
# The steepest log decay a step may have with 16-row chunks: the split factors
# then stay within about exp(+-8 * 5) (the masked products, discarded, within
# exp(75)). A constant -10 already puts dw off by 5e-3 in fp32; -12 gives NaN.
MIN_LOG_DECAY = -5.0


@dataclasses.dataclass(frozen=True)
class Config(KernelConfig):
  """KernelConfig with WKV-7's defaults: 16-row chunks and one chunk a state step (the tiling
  sweep that chose them, and default_config's V-tiles: docs/performance.md)."""
  chunk: int = 16  # the split factors' exponents grow with the chunk: see MIN_LOG_DECAY
  state_steps: int = 1


def _lower(a_LxL):
  """a with its upper triangle zeroed (diagonal kept): the mask of the inclusive in-chunk terms."""
  rows = lax.broadcasted_iota(jnp.int32, a_LxL.shape, 0)
  return jnp.where(rows >= lax.broadcasted_iota(jnp.int32, a_LxL.shape, 1), a_LxL, 0.0)


def _unit_lower_inverse(nT_LxL):
  """(I - N)^-1 for strictly lower N, given as N^T, by forward substitution:
  row i of T is e_i + sum_{j<i} N[i, j] T[j], N's row i taken as a column of
  N^T (masked to j < i) so that it broadcasts over T's rows."""
  L = nT_LxL.shape[0]
  rows = lax.broadcasted_iota(jnp.int32, (L, L), 0)
  cols = lax.broadcasted_iota(jnp.int32, (L, L), 1)

  def body(i, t_LxL):
    n_i_Lx1 = jnp.sum(jnp.where((cols == i) & (rows < i), nT_LxL, 0.0), axis=1, keepdims=True)
    return jnp.where(rows == i, t_LxL + jnp.sum(n_i_Lx1 * t_LxL, axis=0, keepdims=True), t_LxL)

  return lax.fori_loop(1, L, body, (rows == cols).astype(f32))


class _Chunk:
  """One chunk's decays and split factors from its rows ([L, K]) of w and of those of r, k, a, b
  given (None where a kernel needs no term of it); the in-chunk matrices as methods."""

  def __init__(self, w, mode, r=None, k=None, a=None, b=None):
    L = w.shape[0]
    self.mode = mode
    self.gi = sum_rows(w.astype(f32), lambda t, s: s <= t, mode)
    self.ge = self.gi - w.astype(f32)
    self.G = row(self.gi, L - 1)
    self.c = row(self.gi, L // 2 - 1)  # the reference row of the split factors
    end = jnp.exp(self.G - self.gi)
    key = jnp.exp(self.c - self.gi)
    if r is not None:
      self.r = r.astype(f32)
      self.rq, self.rg = self.r * jnp.exp(self.gi - self.c), self.r * jnp.exp(self.gi)
    if k is not None:
      self.k = k.astype(f32)
      self.kc, self.kd = self.k * key, self.k * end
    if a is not None:
      self.a = a.astype(f32)
      self.aq, self.ag = self.a * jnp.exp(self.ge - self.c), self.a * jnp.exp(self.ge)
    if b is not None:
      self.b = b.astype(f32)
      self.bc, self.bd = self.b * key, self.b * end

  def a_ab(self):
    return strictly_lower(dot(self.aq, self.bc, self.mode, trans_b=True))

  def a_ak(self):
    return strictly_lower(dot(self.aq, self.kc, self.mode, trans_b=True))

  def a_rk(self):
    return _lower(dot(self.rq, self.kc, self.mode, trans_b=True))

  def a_rb(self):
    return _lower(dot(self.rq, self.bc, self.mode, trans_b=True))

  def inverse(self):
    """T = (I - A_ab)^-1, from A_ab^T."""
    return _unit_lower_inverse(dot(self.bc, self.aq, self.mode, trans_b=True))


# ----------------------------------------------------------------------------- forward


def _prep_fwd_kernel(w_ref, k_ref, a_ref, b_ref, v_ref, wy_ref, uv_ref, p_ref, t_ref, *, cfg):
  """One chunk's state-independent parts: W = T ag and U_V = T A_ak v (U = W S0^T + U_V),
  P = T^T bd (for the backward) and T itself, as rows of [L, X] tiles."""
  mode = dot_mode(cfg)
  c = _Chunk(w_ref[...], mode, k=k_ref[...], a=a_ref[...], b=b_ref[...])
  t = c.inverse()
  wy_ref[...] = dot(t, c.ag, mode)
  uv_ref[...] = dot(t, dot(c.a_ak(), v_ref[...], mode), mode)
  p_ref[...] = dot(t, c.bd, mode, trans_a=True)
  t_ref[...] = t


def _state_fwd_kernel(w_ref, k_ref, b_ref, wy_ref, v_ref, uv_ref, s0_ref, h_ref, sT_ref, *, cfg, n_chunks,
                      starts_ref):
  """S <- S exp(G) + v^T kd + U^T bd with U = W S^T + U_V, a chunk a step; stores each start state."""
  L, mode = cfg.chunk, dot_mode(cfg)

  def body(n, s_VxK):
    h_ref[n] = s_VxK.astype(h_ref.dtype)
    rows = pl.ds(pl.multiple_of(n * L, L), L)
    c = _Chunk(w_ref[rows, :], mode, k=k_ref[rows, :], b=b_ref[rows, :])
    v = v_ref[rows, :]
    u = dot(wy_ref[rows, :], s_VxK, mode, trans_b=True) + uv_ref[rows, :]
    return s_VxK * jnp.exp(c.G) + dot(v, c.kd, mode, trans_a=True) + dot(u, c.bd, mode, trans_a=True)

  sT_ref[...] = forward_pass(cfg, n_chunks, body, s0_ref, starts_ref)


def _out_kernel(r_ref, w_ref, k_ref, b_ref, v_ref, wy_ref, uv_ref, h_ref, y_ref, *, cfg):
  mode = dot_mode(cfg)
  c = _Chunk(w_ref[...], mode, r=r_ref[...], k=k_ref[...], b=b_ref[...])
  v, s_VxK = v_ref[...], h_ref[...]
  u = dot(wy_ref[...], s_VxK, mode, trans_b=True) + uv_ref[...]
  y = dot(c.rg, s_VxK, mode, trans_b=True) + dot(c.a_rk(), v, mode) + dot(c.a_rb(), u, mode)
  y_ref[...] = y.astype(y_ref.dtype)


# ----------------------------------------------------------------------------- backward


def _prep_bwd_kernel(r_ref, w_ref, b_ref, dy_ref, t_ref, q_ref, *, cfg):
  """Q = T^T A_rb^T dy: the dy part of dR = T^T dU (dR = Q + P dS_L^T)."""
  mode = dot_mode(cfg)
  c = _Chunk(w_ref[...], mode, r=r_ref[...], b=b_ref[...])
  q_ref[...] = dot(t_ref[...], dot(c.a_rb(), dy_ref[...], mode, trans_a=True), mode, trans_a=True)


def _state_bwd_kernel(r_ref, w_ref, a_ref, p_ref, dy_ref, q_ref, dsT_ref, dh_ref, ds0_ref, *, cfg, n_chunks,
                      starts_ref):
  """dS <- dS exp(G) + dy^T rg + dR^T ag with dR = Q + P dS^T, a chunk a step in reverse;
  stores each chunk's end-state gradient."""
  L, mode = cfg.chunk, dot_mode(cfg)

  def body(n, ds_VxK):
    dh_ref[n] = ds_VxK.astype(dh_ref.dtype)
    rows = pl.ds(pl.multiple_of(n * L, L), L)
    c = _Chunk(w_ref[rows, :], mode, r=r_ref[rows, :], a=a_ref[rows, :])
    d_rhs = q_ref[rows, :] + dot(p_ref[rows, :], ds_VxK, mode, trans_b=True)
    return ds_VxK * jnp.exp(c.G) + dot(dy_ref[rows, :], c.rg, mode, trans_a=True) + dot(d_rhs, c.ag, mode,
                                                                                         trans_a=True)

  ds0_ref[...] = backward_pass(cfg, n_chunks, body, dsT_ref[...], starts_ref)


def _grads_kernel(r_ref, w_ref, k_ref, a_ref, b_ref, v_ref, dy_ref, wy_ref, uv_ref, p_ref, q_ref, h_ref, dh_ref,
                  dr_ref, dw_ref, dk_ref, dv_ref, da_ref, db_ref, *, cfg):
  """One chunk's dr, dw, dk, dv, da, db from its start state h and end-state gradient dh."""
  mode = dot_mode(cfg)
  c = _Chunk(w_ref[...], mode, r=r_ref[...], k=k_ref[...], a=a_ref[...], b=b_ref[...])
  v, dy, s_VxK, ds_VxK = v_ref[...], dy_ref[...], h_ref[...], dh_ref[...]
  u = dot(wy_ref[...], s_VxK, mode, trans_b=True) + uv_ref[...]
  d_rhs = q_ref[...] + dot(p_ref[...], ds_VxK, mode, trans_b=True)  # dR: the gradient of U's right-hand side
  # The in-chunk matrices' gradients.
  da_rk = _lower(dot(dy, v, mode, trans_b=True))
  da_rb = _lower(dot(dy, u, mode, trans_b=True))
  da_ak = strictly_lower(dot(d_rhs, v, mode, trans_b=True))
  da_ab = strictly_lower(dot(d_rhs, u, mode, trans_b=True))
  dv = (dot(c.a_rk(), dy, mode, trans_a=True) + dot(c.a_ak(), d_rhs, mode, trans_a=True)
        + dot(c.kd, ds_VxK, mode, trans_b=True))
  dv_ref[...] = dv.astype(dv_ref.dtype)
  # Through the chunk's start state, the split factors and the end state.
  dkd, dbd = dot(v, ds_VxK, mode), dot(u, ds_VxK, mode)
  query, key, end = jnp.exp(c.gi - c.c), jnp.exp(c.c - c.gi), jnp.exp(c.G - c.gi)
  dr = jnp.exp(c.gi) * dot(dy, s_VxK, mode) + query * (dot(da_rk, c.kc, mode) + dot(da_rb, c.bc, mode))
  da = (jnp.exp(c.ge) * dot(d_rhs, s_VxK, mode)
        + jnp.exp(c.ge - c.c) * (dot(da_ak, c.kc, mode) + dot(da_ab, c.bc, mode)))
  dk = end * dkd + key * (dot(da_rk, c.rq, mode, trans_a=True) + dot(da_ak, c.aq, mode, trans_a=True))
  db = end * dbd + key * (dot(da_rb, c.rq, mode, trans_a=True) + dot(da_ab, c.aq, mode, trans_a=True))
  dr_ref[...] = dr.astype(dr_ref.dtype)
  da_ref[...] = da.astype(da_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  db_ref[...] = db.astype(db_ref.dtype)
  # Log decays: each factor's exponent takes x * dx of what it scales.
  dgi = c.r * dr - c.k * dk - c.b * db
  dge = c.a * da
  dG = (jnp.sum(c.kd * dkd + c.bd * dbd, axis=0, keepdims=True)
        + jnp.exp(c.G) * jnp.sum(s_VxK.astype(f32) * ds_VxK.astype(f32), axis=0, keepdims=True))
  dw_ref[...] = (sum_rows(dgi + dge, lambda t, s: s >= t, mode) - dge + dG).astype(dw_ref.dtype)


# ----------------------------------------------------------------------------- pallas_calls


def _chunk_call(kernel, name, cfg, row_inputs, state_inputs, out_shape):
  """A parallel chunk kernel: grid chunks x B x H over [B, T, H, X] row inputs
  and [B, H, n_chunks, V, K] states, writing [B, T, H, X] outputs."""
  B, T, H, _ = row_inputs[0].shape
  L = cfg.chunk
  rows = lambda x: pl.BlockSpec((None, L, None, x.shape[-1]), lambda n, b, h: (b, n, h, 0))
  state = lambda x: pl.BlockSpec((None, None, None) + x.shape[-2:], lambda n, b, h: (b, h, n, 0, 0))
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg),
      grid=(T // L, B, H),
      in_specs=[rows(x) for x in row_inputs] + [state(x) for x in state_inputs],
      out_specs=[rows(o) for o in out_shape],
      out_shape=out_shape,
      compiler_params=cfg.params(cfg.warps_chunk),
      interpret=cfg.interpret,
      name=name,
  )(*row_inputs, *state_inputs)


# ----------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _wkv(cfg, r, w, k, v, a, b, s0, starts):
  return _wkv_fwd(cfg, r, w, k, v, a, b, s0, starts)[0]


def _wkv_fwd(cfg, r, w, k, v, a, b, s0, starts):
  # Only the state kernels take the flags: a chunk that starts a document reads s0 as its stored
  # start state, and its predecessor's stored end-state gradient is 0.
  rows_f32 = lambda x, width=None: jax.ShapeDtypeStruct(x.shape[:3] + (width or x.shape[3],), f32)
  wy, uv, p, t = _chunk_call(_prep_fwd_kernel, 'wkv7_prep_fwd', cfg, (w, k, a, b, v), (),
                             (rows_f32(k), rows_f32(v), rows_f32(k), rows_f32(k, cfg.chunk)))
  h, sT = state_call(_state_fwd_kernel, 'wkv7_state_fwd', cfg, (w, k, b, wy), (v, uv), s0, starts)
  y_shape = jax.ShapeDtypeStruct(v.shape, jnp.result_type(r, k, v))
  y, = _chunk_call(_out_kernel, 'wkv7_out', cfg, (r, w, k, b, v, wy, uv), (h,), (y_shape,))
  return (y, sT), (r, w, k, v, a, b, wy, uv, p, t, h, starts)


def _wkv_bwd(cfg, residuals, cotangents):
  r, w, k, v, a, b, wy, uv, p, t, h, starts = residuals
  dy, dsT = cotangents
  q, = _chunk_call(_prep_bwd_kernel, 'wkv7_prep_bwd', cfg, (r, w, b, dy, t), (),
                   (jax.ShapeDtypeStruct(v.shape, f32),))
  dh, ds0 = state_call(_state_bwd_kernel, 'wkv7_state_bwd', cfg, (r, w, a, p), (dy, q), dsT, starts)
  like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  grads = _chunk_call(_grads_kernel, 'wkv7_grads', cfg, (r, w, k, a, b, v, dy, wy, uv, p, q), (h, dh),
                      tuple(like(x) for x in (r, w, k, v, a, b)))
  return (*grads, ds0, None)


_wkv.defvjp(_wkv_fwd, _wkv_bwd)


def default_config(B, H):
  # The state kernels are sequential over T: with few sequences * heads, V is
  # split finer so that there are enough programs to fill the GPU.
  return Config(block_v=16 if B * H < 128 else 64)


@functools.partial(jax.jit, static_argnames=('interpret', 'config'))
def wkv7_pallas(r_BxTxHxK, w_BxTxHxK, k_BxTxHxK, v_BxTxHxV, a_BxTxHxK, b_BxTxHxK, s0_BxHxVxK, doc_starts_BxM=None,
                *, interpret=None, config=None):
  """WKV-7 with Pallas kernels. Returns (y [B,T,H,V], final state [B,H,V,K] fp32).

  doc_starts_BxM: packed rows, see wkv7.wkv7; None: one sequence a row.

  r, k, v, a, b may be bf16 or fp32, w (the log decay, >= MIN_LOG_DECAY) fp32;
  gradients come back in the inputs' dtypes. y is bf16 when r, k and v all
  are, else fp32; the carried state and accumulations are fp32. `interpret`
  defaults to True on CPU. `config` overrides the tiling (its `exact` and
  `interpret` fields are set here).
  """
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  B, T, H, K = r_BxTxHxK.shape
  inputs = (r_BxTxHxK, w_BxTxHxK, k_BxTxHxK, v_BxTxHxV, a_BxTxHxK, b_BxTxHxK)
  exact = all(x.dtype == f32 for x in (r_BxTxHxK, k_BxTxHxK, v_BxTxHxV, a_BxTxHxK, b_BxTxHxK))
  cfg = dataclasses.replace(config or default_config(B, H), exact=exact, interpret=interpret)
  pad = -T % (cfg.chunk * cfg.state_steps)
  if pad:  # padded steps are exact no-ops: r = k = v = a = b = 0 and decay 1 (w = 0)
    inputs = tuple(jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in inputs)
  T_padded = inputs[0].shape[1]
  starts = None if doc_starts_BxM is None else chunk_starts(doc_starts_BxM, cfg.chunk, T_padded // cfg.chunk)
  y, sT = _wkv(cfg, *inputs, s0_BxHxVxK.astype(f32), starts)
  return (y[:, :T] if pad else y), sT
