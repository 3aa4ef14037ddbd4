"""RWKV-6 WKV in chunked form with plain XLA ops (CPU, and GPUs without Pallas).

The sequence is cut into chunks of `chunk` steps. Inside a chunk everything is
parallel; only the state crosses chunks, through a `lax.scan` whose body is
elementwise. All decay arithmetic is in log space (g = -exp(w) <= 0) on
chunk-local cumulative sums gi (inclusive) and ge (exclusive), and every
exponent that is evaluated is <= 0, so nothing overflows however strong the
decay:

  state:  S_end = S_start * exp(G) + v^T (k * exp(G - gi))        G = gi[last]
  output: o_t   = (r_t * exp(ge_t)) S_start^T + sum_{s<t} A[t,s] v_s + bonus
  A[t,s] = sum_j r_tj k_sj exp(ge_tj - gi_sj)

A is built from sub-chunks of `sub` rows: for query sub-chunk i the pair
exp(ge_t - gi_s) with s in an earlier sub-chunk is split at the reference point
gn = gi[i*sub - 1] into exp(ge_t - gn) * exp(gn - gi_s), both <= 1, which makes
it a matrix product; within the diagonal sub-chunk the pairwise exponentials are
formed directly. Padding steps (k = v = r = 0, g = 0, i.e. decay 1) leave the
state untouched, so any T works. Masked exponents are -inf, never a large
positive number hidden by a select.

The backward pass is written out (a custom VJP, faster than autodiff on CPU,
and keeping only the inputs and the chunk start states for it, not the
[C, C, K] pairwise blocks): a reverse elementwise scan gives each chunk's
end-state gradient dS, the per-chunk gradients follow from the same
factorisation, and the log-decay gradient from
dg_m = sum_{t>m} r_t dr_t - sum_{t>=m} k_t dk_t + colsum(S_end dS) within the
chunk (bonus-free dr, dk).
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import chunk_starts, from_chunks, to_chunks

f32 = jnp.float32
# HIGHEST: GPUs would run fp32 dots in TF32, too coarse for the decay gradient.
_ein = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST, preferred_element_type=f32)


def _decays(g, sub):
  """Cumulative log decays and the sub-chunk factorisation, all exponents <= 0."""
  L = g.shape[3]
  n_sub = L // sub
  gi = jnp.cumsum(g, axis=3)
  ge = gi - g
  G = gi[..., -1:, :]
  split = lambda x: x.reshape(x.shape[:3] + (n_sub, sub, x.shape[-1]))  # [B,H,N,I,C,D]
  # Reference point of query sub-chunk i: gi at the row before it (unused for i = 0).
  gn = jnp.concatenate([jnp.zeros_like(gi[..., :1, :]), gi[..., sub - 1:L - 1:sub, :]], axis=3)[..., None, :]
  earlier_IxLx1 = (jnp.arange(L)[None, :] < (jnp.arange(n_sub) * sub)[:, None])[..., None]
  q_scale = jnp.exp(split(ge) - gn)                                            # [B,H,N,I,C,K]
  k_scale = jnp.exp(jnp.where(earlier_IxLx1, gn - gi[..., None, :, :], -jnp.inf))  # [B,H,N,I,L,K]
  causal_CxCx1 = (jnp.arange(sub)[:, None] > jnp.arange(sub)[None, :])[..., None]
  pair = jnp.exp(jnp.where(causal_CxCx1, split(ge)[..., :, None, :] - split(gi)[..., None, :, :], -jnp.inf))
  return gi, ge, G, split, q_scale, k_scale, pair


def _forward(r, k, v, g, u, s0, starts_NxB, sub):
  """Chunk layout [B,H,N,L,D] in, (o, final state, chunk start states) out. starts_NxB: None, or
  where a chunk starts a document (its start state is then s0)."""
  gi, ge, G, split, q_scale, k_scale, pair = _decays(g, sub)
  dS_BxHxNxVxK = _ein('bhnlv,bhnlk->bhnvk', v, k * jnp.exp(G - gi))

  def step(S, inputs):
    dS, decay, start_B = inputs
    if start_B is not None:
      S = jnp.where(start_B[:, None, None, None], s0, S)
    return S * decay + dS, S

  xs = (jnp.moveaxis(dS_BxHxNxVxK, 2, 0), jnp.moveaxis(jnp.exp(G), 2, 0), starts_NxB)
  sT, S_start = jax.lax.scan(step, s0, xs)
  S_start = jnp.moveaxis(S_start, 0, 2)
  o = _ein('bhnlk,bhnvk->bhnlv', r * jnp.exp(ge), S_start)
  a_off = _ein('bhnick,bhnisk->bhnics', split(r) * q_scale, k[..., None, :, :] * k_scale)
  o += _ein('bhnics,bhnsv->bhnicv', a_off, v).reshape(o.shape)
  a_diag = jnp.sum(split(r)[..., :, None, :] * split(k)[..., None, :, :] * pair, axis=-1)
  o += _ein('bhnits,bhnisv->bhnitv', a_diag, split(v)).reshape(o.shape)
  o += jnp.sum(r * u[:, None, None, :] * k, axis=-1, keepdims=True) * v
  return o, sT, S_start


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _wkv(r, k, v, g, u, s0, starts_NxB, sub):
  return _forward(r, k, v, g, u, s0, starts_NxB, sub)[:2]


def _wkv_fwd(r, k, v, g, u, s0, starts_NxB, sub):
  o, sT, S_start = _forward(r, k, v, g, u, s0, starts_NxB, sub)
  return (o, sT), (r, k, v, g, u, S_start, starts_NxB)


def _wkv_bwd(sub, residuals, cotangents):
  r, k, v, g, u, S_start, starts_NxB = residuals
  do, dsT = cotangents
  gi, ge, G, split, q_scale, k_scale, pair = _decays(g, sub)
  n_sub = q_scale.shape[3]

  # Gradient of each chunk's end state, by a reverse elementwise scan.
  inc = _ein('bhnlv,bhnlk->bhnvk', do, r * jnp.exp(ge))

  # A chunk that starts a document hands its start-state gradient to s0, not to the chunk before.
  def step(carry, inputs):
    dS, ds0_docs = carry
    inc_n, decay, start_B = inputs
    dS_start = dS * decay + inc_n
    if start_B is not None:
      start_Bx1x1x1 = start_B[:, None, None, None]
      ds0_docs = ds0_docs + jnp.where(start_Bx1x1x1, dS_start, 0.0)
      dS_start = jnp.where(start_Bx1x1x1, 0.0, dS_start)
    return (dS_start, ds0_docs), dS

  xs = (jnp.moveaxis(inc, 2, 0), jnp.moveaxis(jnp.exp(G), 2, 0), starts_NxB)
  ds0_docs = None if starts_NxB is None else jnp.zeros_like(dsT)
  (ds0, ds0_docs), dS_end = jax.lax.scan(step, (dsT, ds0_docs), xs, reverse=True)
  if ds0_docs is not None:
    ds0 = ds0 + ds0_docs
  dS_end = jnp.moveaxis(dS_end, 0, 2)
  kd = k * jnp.exp(G - gi)
  S_end = S_start * jnp.exp(G) + _ein('bhnlv,bhnlk->bhnvk', v, kd)
  dG = jnp.sum(S_end * dS_end, axis=3)[..., None, :]  # [B,H,N,1,K]

  # Start and end states.
  dr = jnp.exp(ge) * _ein('bhnlv,bhnvk->bhnlk', do, S_start)
  dk = jnp.exp(G - gi) * _ein('bhnlv,bhnvk->bhnlk', v, dS_end)
  dv = _ein('bhnlk,bhnvk->bhnlv', kd, dS_end)
  # Earlier sub-chunks, through the reference points.
  unsplit = lambda x: x.reshape(x.shape[:3] + (n_sub * x.shape[4], x.shape[5]))
  q = split(r) * q_scale
  kmat = k[..., None, :, :] * k_scale
  do_s = split(do)
  dA_off = _ein('bhnicv,bhnsv->bhnics', do_s, v)
  dr += unsplit(q_scale * _ein('bhnics,bhnisk->bhnick', dA_off, kmat))
  dk += jnp.sum(k_scale * _ein('bhnics,bhnick->bhnisk', dA_off, q), axis=3)
  dv += _ein('bhnics,bhnicv->bhnsv', _ein('bhnick,bhnisk->bhnics', q, kmat), do_s)
  # Diagonal sub-chunks.
  r_s, k_s, v_s = split(r), split(k), split(v)
  dA_diag = _ein('bhnitv,bhnisv->bhnits', do_s, v_s)[..., None] * pair
  dr += unsplit(jnp.sum(dA_diag * k_s[..., None, :, :], axis=-2))
  dk += unsplit(jnp.sum(dA_diag * r_s[..., :, None, :], axis=-3))
  a_diag = jnp.sum(r_s[..., :, None, :] * k_s[..., None, :, :] * pair, axis=-1)
  dv += unsplit(_ein('bhnits,bhnitv->bhnisv', a_diag, do_s))

  # Log decays: reverse cumsum within the chunk, the r part exclusive.
  dge = r * dr
  x = dge - k * dk
  dg = jnp.flip(jnp.cumsum(jnp.flip(x, axis=3), axis=3), axis=3) - dge + dG

  # Bonus.
  do_v = jnp.sum(do * v, axis=-1, keepdims=True)
  bonus = jnp.sum(r * u[:, None, None, :] * k, axis=-1, keepdims=True)
  dr += do_v * u[:, None, None, :] * k
  dk += do_v * u[:, None, None, :] * r
  dv += bonus * do
  du = jnp.sum(do_v * r * k, axis=(0, 2, 3))
  return dr, dk, dv, dg, du, ds0, None


_wkv.defvjp(_wkv_fwd, _wkv_bwd)


@functools.partial(jax.jit, static_argnames=('chunk', 'sub'))
def wkv6_chunked(r_BxTxHxK, k_BxTxHxK, v_BxTxHxV, w_BxTxHxK, u_HxK, s0_BxHxVxK, doc_starts_BxM=None, *, chunk=32,
                 sub=8):
  """Chunked WKV-6. Returns (y [B,T,H,V] fp32, final state [B,H,V,K] fp32).

  doc_starts_BxM: packed rows, see wkv6.wkv6; None: one sequence a row."""
  assert chunk % sub == 0, (chunk, sub)
  T = r_BxTxHxK.shape[1]
  pad = ((0, 0), (0, -T % chunk), (0, 0), (0, 0))
  g = -jnp.exp(w_BxTxHxK.astype(f32))
  r, k, v, g = (to_chunks(jnp.pad(x.astype(f32), pad), chunk) for x in (r_BxTxHxK, k_BxTxHxK, v_BxTxHxV, g))
  starts_NxB = None if doc_starts_BxM is None else chunk_starts(doc_starts_BxM, chunk, r.shape[2]).T == 1
  o, sT = _wkv(r, k, v, g, u_HxK.astype(f32), s0_BxHxVxK.astype(f32), starts_NxB, sub)
  return from_chunks(o)[:, :T], sT
