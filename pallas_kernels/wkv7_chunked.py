"""RWKV-7 WKV in chunked form with plain XLA ops (CPU, and GPUs without Pallas).

The sequence is cut into chunks of `chunk` steps; inside a chunk everything is
parallel and only the state crosses chunks, through a `lax.scan` whose body is
three small matrix products. Per head and chunk, with S0 the chunk's start
state [V, K], rows t, s the chunk's steps, gi (inclusive) and ge (exclusive)
the chunk-local cumulative log decays and G = gi[last]:

  u_t = S_{t-1} a_t (the value the low-rank term writes; rows of U [L, V])
  U   = A_ab U + A_ak V + (a * exp(ge)) S0^T
  y   = (r * exp(gi)) S0^T + A_rk V + A_rb U
  S_L = S0 diag(exp(G)) + V^T (k * exp(G - gi)) + U^T (b * exp(G - gi))

with A_xy[t, s] = sum_j x_tj y_sj exp(q_tj - gi_sj), q = ge for the strictly
causal A_ab, A_ak (s < t) and q = gi for A_rk, A_rb (s <= t). U solves the
unit lower-triangular system (I - A_ab) U = A_ak V + (a * exp(ge)) S0^T: with
T = (I - A_ab)^-1 formed for every chunk in parallel, U = W S0^T + U_V where
W = T (a * exp(ge)) and U_V = T A_ak V, so the scan over chunks needs only W
[L, K] and U_V [L, V].

The A matrices are built from sub-chunks (see _Matrices) with every exponent
<= 0 (masked entries are -inf, never a large positive number hidden by a
select), so any w <= 0 is exact however steep; padding steps (r = k = v = a =
b = 0, w = 0) leave the state untouched, so any T works. Gradients are JAX's
autodiff of this form (the triangular inverse's VJP written out); the scan
keeps only each chunk's start state.
"""
import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.common import chunk_starts, from_chunks, to_chunks

f32 = jnp.float32
# HIGHEST: GPUs would run fp32 dots in TF32, too coarse for the decay gradient.
_ein = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST, preferred_element_type=f32)


class _Matrices:
  """Builds a chunk's in-chunk matrices A_xy[t, s] = sum_j x_tj y_sj exp(q_tj - gi_sj), s < t
  (strict) or s <= t, from sub-chunks of `sub` rows with every exponent <= 0: for query
  sub-chunk i and keys in earlier ones, exp(q_t - gi_s) = exp(q_t - gn) exp(gn - gi_s) split at
  gn = gi[i * sub - 1], both factors <= 1, which makes it a matrix product; within sub-chunk i
  the pairwise exponentials are formed directly, [sub, sub, K] blocks."""

  def __init__(self, gi, sub):
    L = gi.shape[3]
    self.gi, self.sub, self.n_sub = gi, sub, L // sub
    # Reference point of query sub-chunk i: gi at the row before it (unused for i = 0).
    self.gn = jnp.concatenate([jnp.zeros_like(gi[..., :1, :]), gi[..., sub - 1:L - 1:sub, :]], axis=3)[..., None, :]
    earlier_IxLx1 = (jnp.arange(L)[None, :] < (jnp.arange(self.n_sub) * sub)[:, None])[..., None]
    self.k_scale = jnp.exp(jnp.where(earlier_IxLx1, self.gn - gi[..., None, :, :], -jnp.inf))  # [B,H,N,I,L,K]

  def split(self, x):
    return x.reshape(x.shape[:3] + (self.n_sub, self.sub, x.shape[-1]))  # [B,H,N,I,C,D]

  def __call__(self, x, q, y, strict):
    split, sub, n_sub = self.split, self.sub, self.n_sub
    off = _ein('bhnick,bhnisk->bhnics', split(x) * jnp.exp(split(q) - self.gn), y[..., None, :, :] * self.k_scale)
    t, s = jnp.arange(sub)[:, None], jnp.arange(sub)[None, :]
    causal_CxCx1 = ((s < t) if strict else (s <= t))[..., None]
    pair = jnp.exp(jnp.where(causal_CxCx1, split(q)[..., :, None, :] - split(self.gi)[..., None, :, :], -jnp.inf))
    diag = _ein('bhnitk,bhnisk,bhnitsk->bhnits', split(x), split(y), pair)  # [B,H,N,I,C,C]
    on_diagonal_Ix1xIx1 = jnp.eye(n_sub, dtype=f32)[:, None, :, None]
    a = off + (diag[..., :, :, None, :] * on_diagonal_Ix1xIx1).reshape(off.shape)
    return a.reshape(a.shape[:3] + (n_sub * sub, n_sub * sub))


@jax.custom_vjp
def _unit_lower_inverse(n_LxL):
  """(I - N)^-1 for strictly lower N [..., L, L]: N is nilpotent, so the inverse is the sum of its
  first L powers, (I + N)(I + N^2)(I + N^4)... exactly, in ceil(log2 L) rounds of products. Not
  LAPACK's triangular solve: jaxlib's CPU solve, batched like this, has deadlocked a training step.
  Its VJP is written out, dN = T^T dT T^T, rather than differentiated through the products."""
  eye = jnp.eye(n_LxL.shape[-1], dtype=f32)
  t_LxL, power_LxL = eye + n_LxL, n_LxL
  for _ in range(math.ceil(math.log2(n_LxL.shape[-1])) - 1):
    power_LxL = _ein('...ts,...su->...tu', power_LxL, power_LxL)
    t_LxL = t_LxL + _ein('...ts,...su->...tu', t_LxL, power_LxL)
  return t_LxL


def _unit_lower_inverse_fwd(n_LxL):
  t = _unit_lower_inverse(n_LxL)
  return t, t


def _unit_lower_inverse_bwd(t, dt):
  return (jnp.tril(_ein('...st,...su,...vu->...tv', t, dt, t), -1),)


_unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


def _wkv(r, w, k, v, a, b, s0, starts_NxB, sub):
  """Chunk layout [B,H,N,L,D] in, (y [B,H,N,L,V], final state) out. starts_NxB: None, or where a
  chunk starts a document (its start state is then s0; autodiff sums s0's gradient over them)."""
  gi = jnp.cumsum(w, axis=3)
  ge = gi - w
  G = gi[..., -1:, :]
  matrix = _Matrices(gi, sub)
  a_ab, a_ak = matrix(a, ge, b, strict=True), matrix(a, ge, k, strict=True)
  a_rk, a_rb = matrix(r, gi, k, strict=False), matrix(r, gi, b, strict=False)
  t = _unit_lower_inverse(a_ab)
  w_LxK = _ein('bhnts,bhnsk->bhntk', t, a * jnp.exp(ge))
  u_v = _ein('bhnts,bhnsv->bhntv', t, _ein('bhnts,bhnsv->bhntv', a_ak, v))
  kd, bd = k * jnp.exp(G - gi), b * jnp.exp(G - gi)

  def step(S_VxK, inputs):
    w_n, u_v_n, v_n, kd_n, bd_n, decay_n, start_B = inputs
    if start_B is not None:
      S_VxK = jnp.where(start_B[:, None, None, None], s0, S_VxK)
    u_n = _ein('bhtk,bhvk->bhtv', w_n, S_VxK) + u_v_n
    S_end = S_VxK * decay_n + _ein('bhtv,bhtk->bhvk', v_n, kd_n) + _ein('bhtv,bhtk->bhvk', u_n, bd_n)
    return S_end, (S_VxK, u_n)

  over_chunks = lambda x: jnp.moveaxis(x, 2, 0)
  xs = (*map(over_chunks, (w_LxK, u_v, v, kd, bd, jnp.exp(G))), starts_NxB)
  sT, (S_start, U) = jax.lax.scan(step, s0, xs)
  S_start, U = jnp.moveaxis(S_start, 0, 2), jnp.moveaxis(U, 0, 2)
  y = (_ein('bhntk,bhnvk->bhntv', r * jnp.exp(gi), S_start) + _ein('bhnts,bhnsv->bhntv', a_rk, v)
       + _ein('bhnts,bhnsv->bhntv', a_rb, U))
  return y, sT


@functools.partial(jax.jit, static_argnames=('chunk', 'sub'))
def wkv7_chunked(r_BxTxHxK, w_BxTxHxK, k_BxTxHxK, v_BxTxHxV, a_BxTxHxK, b_BxTxHxK, s0_BxHxVxK, doc_starts_BxM=None,
                 *, chunk=16, sub=4):
  """Chunked WKV-7. Returns (y [B,T,H,V] fp32, final state [B,H,V,K] fp32).

  doc_starts_BxM: packed rows, see wkv7.wkv7; None: one sequence a row."""
  assert chunk % sub == 0, (chunk, sub)
  T = r_BxTxHxK.shape[1]
  pad = ((0, 0), (0, -T % chunk), (0, 0), (0, 0))
  inputs = (r_BxTxHxK, w_BxTxHxK, k_BxTxHxK, v_BxTxHxV, a_BxTxHxK, b_BxTxHxK)
  r, w, k, v, a, b = (to_chunks(jnp.pad(x.astype(f32), pad), chunk) for x in inputs)
  starts_NxB = None if doc_starts_BxM is None else chunk_starts(doc_starts_BxM, chunk, r.shape[2]).T == 1
  y, sT = _wkv(r, w, k, v, a, b, s0_BxHxVxK.astype(f32), starts_NxB, sub)
  return from_chunks(y)[:, :T], sT
