"""RWKV-6 WKV recurrence: one entry point, several implementations.

Per head, with the state S in value-major layout [V, K] (the layout of every
`.pth` state file), decay d_t = exp(-exp(w_t)) and bonus u:

  y_t[i] = sum_j r_t[j] * (S[i, j] + u[j] * k_t[j] * v_t[i])
  S[i, j] <- S[i, j] * d_t[j] + k_t[j] * v_t[i]

`w` is the raw "log-log" decay the model computes (time_decay + LoRA); every
implementation works from it so that the gradient returned is d/dw_raw.
"""
import jax
import jax.numpy as jnp


def wkv6_reference(r_BxTxHxK, k_BxTxHxK, v_BxTxHxV, w_BxTxHxK, u_HxK, s0_BxHxVxK):
  """Ground truth: a `lax.scan` over time in the dtype of the inputs (fp32 or fp64)."""
  dtype = s0_BxHxVxK.dtype
  r, k, v, w = (jnp.moveaxis(x.astype(dtype), 1, 0) for x in (r_BxTxHxK, k_BxTxHxK, v_BxTxHxV, w_BxTxHxK))
  u_HxK = u_HxK.astype(dtype)
  decay_TxBxHxK = jnp.exp(-jnp.exp(w))

  def step(s_BxHxVxK, inputs):
    r_t, k_t, v_t, d_t = inputs
    kv_BxHxVxK = v_t[..., :, None] * k_t[..., None, :]
    y_BxHxV = jnp.einsum('bhvk,bhk->bhv', s_BxHxVxK + u_HxK[:, None, :] * kv_BxHxVxK, r_t)
    return s_BxHxVxK * d_t[..., None, :] + kv_BxHxVxK, y_BxHxV

  sT, y_TxBxHxV = jax.lax.scan(step, s0_BxHxVxK, (r, k, v, decay_TxBxHxK))
  return jnp.moveaxis(y_TxBxHxV, 0, 1), sT


IMPLEMENTATIONS = ('scan',)


def wkv6(r_BxTxHxK, k_BxTxHxK, v_BxTxHxV, w_BxTxHxK, u_HxK, s0, *, implementation=None):
  """WKV-6 over a sequence. Returns (y [B,T,H,V] fp32, final state [B,H,V,K] fp32).

  s0 is one state per sequence [B,H,V,K] or one shared state [H,V,K] (state
  tuning); a shared state is broadcast here, outside any custom VJP, so its
  gradient is the sum over the batch.
  """
  implementation = implementation or 'scan'
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'unknown WKV implementation {implementation!r}; choose one of {IMPLEMENTATIONS}')
  B = r_BxTxHxK.shape[0]
  s0_BxHxVxK = jnp.broadcast_to(s0, (B,) + s0.shape[-3:]).astype(jnp.float32)
  f32 = lambda x: x.astype(jnp.float32)
  return wkv6_reference(f32(r_BxTxHxK), f32(k_BxTxHxK), f32(v_BxTxHxV), f32(w_BxTxHxK), f32(u_HxK), s0_BxHxVxK)
