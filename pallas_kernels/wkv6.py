"""RWKV-6 WKV recurrence: one entry point, several implementations.

Per head, with the state S in value-major layout [V, K] (the layout of every
`.pth` state file), decay d_t = exp(-exp(w_t)) and bonus u:

  y_t[i] = sum_j r_t[j] * (S[i, j] + u[j] * k_t[j] * v_t[i])
  S[i, j] <- S[i, j] * d_t[j] + k_t[j] * v_t[i]

`w` is the raw "log-log" decay the model computes (time_decay + LoRA); every
implementation works from it so that the gradient returned is d/dw_raw.

Implementations (`implementation=`):
  'scan'         the fp32 `lax.scan` reference below; slow, for checking.
  'xla_chunked'  chunked form in plain XLA ops with a hand-written VJP
                 (wkv6_chunked.py). The default off GPU (CPU, TPU) and a
                 fallback on any GPU; several times faster than the scan for
                 forward+backward on CPU.
  'pallas'       chunked Pallas GPU kernels with a custom VJP (wkv6_pallas.py);
                 the GPU default. Runs in interpret mode on CPU (tests only).
"""
import jax
import jax.numpy as jnp

from pallas_kernels.common import doc_first_tokens, entry
from pallas_kernels.wkv6_chunked import wkv6_chunked
from pallas_kernels.wkv6_pallas import wkv6_pallas


def wkv6_reference(r_BxTxHxK, k_BxTxHxK, v_BxTxHxV, w_BxTxHxK, u_HxK, s0_BxHxVxK, doc_starts_BxM=None):
  """Ground truth: a `lax.scan` over time in the dtype of the inputs (fp32 or fp64)."""
  dtype = s0_BxHxVxK.dtype
  T = r_BxTxHxK.shape[1]
  r, k, v, w = (jnp.moveaxis(x.astype(dtype), 1, 0) for x in (r_BxTxHxK, k_BxTxHxK, v_BxTxHxV, w_BxTxHxK))
  u_HxK = u_HxK.astype(dtype)
  decay_TxBxHxK = jnp.exp(-jnp.exp(w))
  first_TxB = None if doc_starts_BxM is None else doc_first_tokens(doc_starts_BxM, T).T

  def step(s_BxHxVxK, inputs):
    r_t, k_t, v_t, d_t, first_B = inputs
    if first_B is not None:  # a document's first token reads the initial state
      s_BxHxVxK = jnp.where(first_B[:, None, None, None], s0_BxHxVxK, s_BxHxVxK)
    kv_BxHxVxK = v_t[..., :, None] * k_t[..., None, :]
    # HIGHEST: GPUs would otherwise run this fp32 contraction in TF32.
    y_BxHxV = jnp.einsum('bhvk,bhk->bhv', s_BxHxVxK + u_HxK[:, None, :] * kv_BxHxVxK, r_t,
                         precision=jax.lax.Precision.HIGHEST)
    return s_BxHxVxK * d_t[..., None, :] + kv_BxHxVxK, y_BxHxV

  sT, y_TxBxHxV = jax.lax.scan(step, s0_BxHxVxK, (r, k, v, decay_TxBxHxK, first_TxB))
  return jnp.moveaxis(y_TxBxHxV, 0, 1), sT


def wkv6(r_BxTxHxK, k_BxTxHxK, v_BxTxHxV, w_BxTxHxK, u_HxK, s0, *, doc_starts=None, implementation=None):
  """WKV-6 over a sequence. Returns (y [B,T,H,V], final state [B,H,V,K] fp32).

  y is bf16 when r, k and v all are, else fp32 (see wkv6_pallas).

  s0 is one state per sequence [B,H,V,K] or one shared state [H,V,K] (state
  tuning); a shared state is broadcast here, outside any custom VJP, so its
  gradient is the sum over the batch.

  doc_starts: packed rows, [B, ceil(T / DOC_ALIGN)] bool, True where a document
  begins at token m * DOC_ALIGN (common.DOC_ALIGN): its first token reads s0,
  not the state the row carries, so s0's gradient sums over every document.
  None: one sequence a row.
  """
  implementation, s0_BxHxVxK = entry(r_BxTxHxK, s0, doc_starts, implementation)
  if implementation == 'pallas':
    return wkv6_pallas(r_BxTxHxK, k_BxTxHxK, v_BxTxHxV, w_BxTxHxK, u_HxK, s0_BxHxVxK, doc_starts)
  if implementation == 'xla_chunked':
    y, sT = wkv6_chunked(r_BxTxHxK, k_BxTxHxK, v_BxTxHxV, w_BxTxHxK, u_HxK, s0_BxHxVxK, doc_starts)
  else:
    f32 = lambda x: x.astype(jnp.float32)
    y, sT = wkv6_reference(f32(r_BxTxHxK), f32(k_BxTxHxK), f32(v_BxTxHxV), f32(w_BxTxHxK), f32(u_HxK),
                           s0_BxHxVxK, doc_starts)
  return y.astype(jnp.result_type(r_BxTxHxK, k_BxTxHxK, v_BxTxHxV)), sT
