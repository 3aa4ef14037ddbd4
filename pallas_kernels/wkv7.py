"""RWKV-7 WKV recurrence: one entry point, several implementations.

Per head, with the state S in value-major layout [V, K] (the layout of every
`.pth` state file) and the log decay w <= 0 (decay exp(w)):

  S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + v_t k_t^T
  y_t = S_t r_t                                  (read after the update)

RWKV-7 passes a = -kk, b = kk * iclr (kk the L2-normalised key, iclr in
(0, 1)) and w = -exp(-0.5) * sigmoid(.), so every step is a contraction; the
implementations hold for any w <= 0 within the range each one states.

Implementations (`implementation=`):
  'scan'         the fp32 `lax.scan` reference below; slow, for checking, and
                 the path for one token.
  'xla_chunked'  chunked form in plain XLA ops (wkv7_chunked.py); the default
                 off GPU. Any w <= 0.
  'pallas'       chunked Pallas GPU kernels with a custom VJP (wkv7_pallas.py);
                 the GPU default. Runs in interpret mode on CPU (tests only).
                 w >= -5 (see wkv7_pallas.MIN_LOG_DECAY).
"""
import jax
import jax.numpy as jnp

from pallas_kernels.common import doc_first_tokens, entry
from pallas_kernels.wkv7_chunked import wkv7_chunked
from pallas_kernels.wkv7_pallas import wkv7_pallas


def wkv7_reference(r_BxTxHxK, w_BxTxHxK, k_BxTxHxK, v_BxTxHxV, a_BxTxHxK, b_BxTxHxK, s0_BxHxVxK,
                   doc_starts_BxM=None):
  """Ground truth: a `lax.scan` over time in the dtype of the initial state (fp32 or fp64)."""
  dtype = s0_BxHxVxK.dtype
  inputs = (r_BxTxHxK, w_BxTxHxK, k_BxTxHxK, v_BxTxHxV, a_BxTxHxK, b_BxTxHxK)
  r, w, k, v, a, b = (jnp.moveaxis(x.astype(dtype), 1, 0) for x in inputs)
  first_TxB = None if doc_starts_BxM is None else doc_first_tokens(doc_starts_BxM, r_BxTxHxK.shape[1]).T
  # HIGHEST: GPUs would otherwise run these fp32 contractions in TF32.
  ein = lambda spec, x, y: jnp.einsum(spec, x, y, precision=jax.lax.Precision.HIGHEST)

  def step(s_BxHxVxK, inputs):
    r_t, w_t, k_t, v_t, a_t, b_t, first_B = inputs
    if first_B is not None:  # a document's first token reads the initial state
      s_BxHxVxK = jnp.where(first_B[:, None, None, None], s0_BxHxVxK, s_BxHxVxK)
    sa_BxHxV = ein('bhvk,bhk->bhv', s_BxHxVxK, a_t)
    s_BxHxVxK = (s_BxHxVxK * jnp.exp(w_t)[..., None, :] + sa_BxHxV[..., :, None] * b_t[..., None, :]
                 + v_t[..., :, None] * k_t[..., None, :])
    return s_BxHxVxK, ein('bhvk,bhk->bhv', s_BxHxVxK, r_t)

  sT, y_TxBxHxV = jax.lax.scan(step, s0_BxHxVxK, (r, w, k, v, a, b, first_TxB))
  return jnp.moveaxis(y_TxBxHxV, 0, 1), sT


def wkv7(r_BxTxHxK, w_BxTxHxK, k_BxTxHxK, v_BxTxHxV, a_BxTxHxK, b_BxTxHxK, s0, *, doc_starts=None,
         implementation=None):
  """WKV-7 over a sequence. Returns (y [B,T,H,V], final state [B,H,V,K] fp32).

  w is the log decay (<= 0), fp32. y is bf16 when r, k and v all are, else fp32.

  s0 is one state per sequence [B,H,V,K] or one shared state [H,V,K] (state
  tuning); a shared state is broadcast here, outside any custom VJP, so its
  gradient is the sum over the batch.

  doc_starts: packed rows, [B, ceil(T / DOC_ALIGN)] bool, True where a document
  begins at token m * DOC_ALIGN (common.DOC_ALIGN): its first token reads s0,
  not the state the row carries, so s0's gradient sums over every document.
  None: one sequence a row.
  """
  implementation, s0_BxHxVxK = entry(r_BxTxHxK, s0, doc_starts, implementation)
  inputs = (r_BxTxHxK, w_BxTxHxK, k_BxTxHxK, v_BxTxHxV, a_BxTxHxK, b_BxTxHxK)
  if implementation == 'pallas':
    return wkv7_pallas(*inputs, s0_BxHxVxK, doc_starts)
  if implementation == 'xla_chunked':
    y, sT = wkv7_chunked(*inputs, s0_BxHxVxK, doc_starts)
  else:
    y, sT = wkv7_reference(*(x.astype(jnp.float32) for x in inputs), s0_BxHxVxK, doc_starts)
  return y.astype(jnp.result_type(r_BxTxHxK, k_BxTxHxK, v_BxTxHxV)), sT
