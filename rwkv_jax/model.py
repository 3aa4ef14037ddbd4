"""RWKV-6 (x060) forward pass over token sequences, as pure functions of a param pytree.

Precision: weights stay in the dtype they were loaded in; matrix products run in
that dtype with fp32 accumulation and return that dtype, as the official bf16
model's do (so their backward products stay in bf16 too, with no fp32 copy of a
weight). Activations between the products are held in that dtype too, as the
official bf16 model holds them (each norm and each residual sum is formed in
fp32 and rounded once); the decays and the WKV state are fp32, and the WKV
output comes in the activations' dtype, as the official CUDA kernel writes it
(its group norm is formed in fp32).

Layers run as a Python loop over `params['blocks']`, a list of per-layer dicts,
each block its own remat (grad_cp) unit. A `lax.scan` over weights stacked on a
layer axis would compile in time flat in depth, but XLA copies each layer's
slice of every weight out of the stack before its matrix products. Unrolled,
the products read the weights in place: on an H100 the 1.6B step went from
54.0 to 49.0 ms and the 7B peak from 16.49 to 16.28 GB (bench/results/
profile_step_*, train_step_*), for a compile of 30-40 s instead of 12 s.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import wkv6
from rwkv_jax import quant
from rwkv_jax.config import RWKVConfig

LN_EPS = 1e-5
GN_EPS = 64e-5  # GroupNorm eps of x060: 1e-5 * head_size_divisor**2.


class State(NamedTuple):
  """The recurrent state of every layer.

  wkv:       [L, B, H, V, K] fp32, value-major like every `.pth` state file.
  att_shift: [L, B, C] the previous token's LN1 output (time-mix token shift).
  ffn_shift: [L, B, C] the previous token's LN2 output (channel-mix token shift).
  Without the B axis ([L, H, V, K] / [L, C]) one state is shared by every
  sequence of the batch: the form state tuning trains.
  """
  wkv: jax.Array
  att_shift: jax.Array
  ffn_shift: jax.Array


def zero_state(cfg: RWKVConfig, batch_size: int | None = None) -> State:
  batch = () if batch_size is None else (batch_size,)
  L, H, V, K = cfg.state_shape
  return State(
      wkv=jnp.zeros((L, *batch, H, V, K), jnp.float32),
      att_shift=jnp.zeros((L, *batch, cfg.n_embd), jnp.float32),
      ffn_shift=jnp.zeros((L, *batch, cfg.n_embd), jnp.float32))


def layer_norm(x, p, eps=LN_EPS):
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p['weight'].astype(jnp.float32) + p['bias'].astype(jnp.float32)


def linear(x, w_OxI):
  """x @ W.T in the weight's dtype, accumulated in fp32 (torch's [out, in] layout).

  The result is in the weight's dtype: with an fp32 result the backward product
  would take an fp32 cotangent and run in fp32 on an fp32 copy of W.

  W may be a quantized weight (rwkv_jax.quant), used under remat so that a
  backward pass redoes the work rather than keep every layer's expanded copy
  alive (what plain autodiff would save without grad_cp). NF4 is expanded to its
  original dtype; int8 takes its row scale out of the product instead.
  """
  def matmul(x, w_OxI):
    if isinstance(w_OxI, quant.Int8Weight):  # the row scale factors out of the product
      dtype = w_OxI.dtype
      return jnp.einsum('...i,oi->...o', x.astype(dtype), w_OxI.values.astype(dtype)) * w_OxI.scale.astype(dtype)
    w_OxI = quant.dense(w_OxI)
    return jnp.einsum('...i,oi->...o', x.astype(w_OxI.dtype), w_OxI)
  return jax.checkpoint(matmul)(x, w_OxI) if quant.is_quantized(w_OxI) else matmul(x, w_OxI)


def dot(x, w_IxO):
  """x @ W for the small LoRA-style matrices, which the checkpoint stores as [in, out]."""
  return jnp.einsum('...i,io->...o', x.astype(w_IxO.dtype), w_IxO, preferred_element_type=jnp.float32)


def f32(x):
  return x.astype(jnp.float32)


def token_shift(x_BxTxC, last_BxC):
  """The previous token's value at every position; `last` stands before the first token.

  A select over a padded copy rather than a concatenate along T: XLA's GPU
  backend emits that concatenate as a kernel of its own at ~0.8 TB/s, where
  this form fuses into its consumers (1.6B 512x8 step on an H200: 105.2 ->
  102.0 ms, bench/results/step_variants_session9_*).
  """
  first_1xTx1 = jax.lax.broadcasted_iota(jnp.int32, (1, x_BxTxC.shape[1], 1), 1) == 0
  previous_BxTxC = jnp.pad(x_BxTxC[:, :-1], ((0, 0), (1, 0), (0, 0)))
  return jnp.where(first_1xTx1, last_BxC[:, None].astype(x_BxTxC.dtype), previous_BxTxC)


def time_mix(p, x_BxTxC, shift_BxC, wkv_state, cfg: RWKVConfig, implementation):
  B, T, C = x_BxTxC.shape
  H, N = cfg.n_head, cfg.head_size
  act = lambda a: a.astype(x_BxTxC.dtype)
  xx = token_shift(x_BxTxC, shift_BxC) - x_BxTxC
  xxx = x_BxTxC + xx * act(p['time_maa_x'])
  m_BxTx5xD = jnp.tanh(dot(xxx, p['time_maa_w1'])).reshape(B, T, 5, -1)
  m_5xBxTxC = jnp.einsum('btfd,fdc->fbtc', m_BxTx5xD.astype(p['time_maa_w2'].dtype), p['time_maa_w2'])
  xw, xk, xv, xr, xg = (x_BxTxC + xx * act(act(p[f'time_maa_{c}']) + m_5xBxTxC[i]) for i, c in enumerate('wkvrg'))

  # r, k, v enter the WKV kernel in the activations' dtype (bf16 halves its memory traffic);
  # the decay and the state stay fp32.
  heads = lambda y: act(y).reshape(B, T, H, N)
  r = heads(linear(xr, p['receptance']['weight']))
  k = heads(linear(xk, p['key']['weight']))
  v = heads(linear(xv, p['value']['weight']))
  g = jax.nn.silu(act(linear(xg, p['gate']['weight'])))
  w = (f32(p['time_decay']) + dot(jnp.tanh(dot(xw, p['time_decay_w1'])), p['time_decay_w2'])).reshape(B, T, H, N)
  y_BxTxHxN, wkv_state = wkv6(r, k, v, w, f32(p['time_faaaa']), wkv_state, implementation=implementation)

  y_BxTxHxN = f32(y_BxTxHxN)
  mean = y_BxTxHxN.mean(-1, keepdims=True)
  var = jnp.square(y_BxTxHxN - mean).mean(-1, keepdims=True)
  y = ((y_BxTxHxN - mean) * jax.lax.rsqrt(var + GN_EPS)).reshape(B, T, C)
  y = y * f32(p['ln_x']['weight']) + f32(p['ln_x']['bias'])
  return linear(y * g, p['output']['weight']), f32(x_BxTxC[:, -1]), wkv_state


def channel_mix(p, x_BxTxC, shift_BxC):
  act = lambda a: a.astype(x_BxTxC.dtype)
  xx = token_shift(x_BxTxC, shift_BxC) - x_BxTxC
  xk = x_BxTxC + xx * act(p['time_maa_k'])
  xr = x_BxTxC + xx * act(p['time_maa_r'])
  k = jnp.square(jax.nn.relu(act(linear(xk, p['key']['weight']))))
  r = jax.nn.sigmoid(act(linear(xr, p['receptance']['weight'])))
  return r * act(linear(k, p['value']['weight'])), f32(x_BxTxC[:, -1])


def block(x_BxTxC, layer, cfg: RWKVConfig, implementation):
  p, wkv_state, att_shift, ffn_shift = layer
  B, dtype = x_BxTxC.shape[0], x_BxTxC.dtype
  att_out, att_shift, wkv_state = time_mix(
      p['att'], layer_norm(x_BxTxC, p['ln1']).astype(dtype), jnp.broadcast_to(att_shift, (B, cfg.n_embd)),
      wkv_state, cfg, implementation)
  x_BxTxC = (f32(x_BxTxC) + f32(att_out)).astype(dtype)
  ffn_out, ffn_shift = channel_mix(p['ffn'], layer_norm(x_BxTxC, p['ln2']).astype(dtype),
                                   jnp.broadcast_to(ffn_shift, (B, cfg.n_embd)))
  return (f32(x_BxTxC) + f32(ffn_out)).astype(dtype), (wkv_state, att_shift, ffn_shift)


def is_embedded(inputs) -> bool:
  """Whether model inputs are embedding rows (quant.take_rows of the embedding) rather than token ids."""
  return quant.is_quantized(inputs) or jnp.issubdtype(inputs.dtype, jnp.floating)


def hidden_states(params, cfg: RWKVConfig, inputs_BxT, state: State, *, implementation=None, remat=False):
  """Embedding -> all blocks -> ln_out. Returns (x [B, T, C] fp32, final State with a batch axis).

  inputs_BxT: token ids, or their embedding rows [B, T, C] (quant.take_rows of
  the embedding; the trainer gathers them on the host and keeps the table off
  the GPU, so `params` may then lack `emb`).

  Between blocks the residual stream is held in the weights' dtype, as the
  official bf16 model holds it; each sum is formed in fp32 and rounded once.
  With remat, that is also what every layer keeps for the backward pass.
  """
  blocks = params['blocks']
  dtype = blocks[0]['att']['receptance']['weight'].dtype
  rows_BxTxC = inputs_BxT if is_embedded(inputs_BxT) else quant.take_rows(params['emb']['weight'], inputs_BxT)
  x_BxTxC = layer_norm(quant.dense(rows_BxTxC), params['ln0']).astype(dtype)
  body = functools.partial(block, cfg=cfg, implementation=implementation)
  if remat:
    body = jax.checkpoint(body)
  new_state = []
  for p, *layer_state in zip(blocks, *state, strict=True):
    x_BxTxC, layer_state = body(x_BxTxC, (p, *layer_state))
    new_state.append(layer_state)
  return layer_norm(x_BxTxC, params['ln_out']), State(*(jnp.stack(s) for s in zip(*new_state)))


def forward(params, cfg: RWKVConfig, tokens_BxT, state: State, *, implementation=None, remat=False):
  """Logits [B, T, V] fp32 for every position, and the state after the last token."""
  x_BxTxC, state = hidden_states(params, cfg, tokens_BxT, state, implementation=implementation, remat=remat)
  return f32(linear(x_BxTxC, params['head']['weight'])), state
