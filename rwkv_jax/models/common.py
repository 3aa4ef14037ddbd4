"""What every RWKV generation shares: norms, products, token shift, the block, the state types.

Precision: weights stay in the dtype they were loaded in; matrix products run in
that dtype with fp32 accumulation and return that dtype, as the official bf16
model's do (so their backward products stay in bf16 too, with no fp32 copy of a
weight). Activations between the products are held in that dtype too (each norm
and each residual sum is formed in fp32 and rounded once); the decays and the
WKV state are fp32.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.common import doc_first_tokens
from rwkv_jax import quant

LN_EPS = 1e-5
GN_EPS = 64e-5  # GroupNorm eps of x052/x060/x070: 1e-5 * head_size_divisor**2 (divisor 8).

# Under remat (grad_cp) a block keeps its input and these activations, tagged with
# jax.ad_checkpoint.checkpoint_name where a generation forms them, and recomputes the rest: each
# spares the backward pass a large piece of recomputation for B*T*C values (x060's WKV output:
# the WKV forward kernel; its channel mix's value product: the block's largest matrix product).
REMAT_POLICY = jax.checkpoint_policies.save_only_these_names('wkv_out', 'ffn_value')


class WKVState(nnx.Variable):
  """A layer's trainable initial WKV state [H, V, K] fp32 (value-major, as every `.pth` state file).

  State tuning trains exactly the Variables of this type: the train step splits the
  model by it. Its path in the model, `blocks.{i}.att.time_state`, is the key it has in a
  state file and in a merged checkpoint.
  """


class State(NamedTuple):
  """The recurrent state of every layer, as a forward pass carries it.

  wkv:       [L, B, H, V, K] fp32, value-major like every `.pth` state file.
  att_shift: [L, B, C] the previous token's LN1 output (time-mix token shift).
  ffn_shift: [L, B, C] the previous token's LN2 output (channel-mix token shift).
  """
  wkv: jax.Array
  att_shift: jax.Array
  ffn_shift: jax.Array


def initial_state(wkv_LxHxVxK, n_embd: int, batch_size: int | None = None) -> State:
  """A State that starts from these WKV states with zero token shifts, as Runner and Ai00 mount a
  state file. batch_size None: no batch axis, one state shared by every sequence of a batch."""
  L = wkv_LxHxVxK.shape[0]
  batch = () if batch_size is None else (batch_size,)
  wkv = jnp.asarray(wkv_LxHxVxK, jnp.float32)
  if batch_size is not None:
    wkv = jnp.broadcast_to(wkv[:, None], (L, batch_size, *wkv.shape[1:]))
  zeros = jnp.zeros((L, *batch, n_embd), jnp.float32)
  return State(wkv=wkv, att_shift=zeros, ffn_shift=zeros)


def f32(x):
  return x.astype(jnp.float32)


def value(variable):
  """A Variable's value: an array, or a quantized weight (rwkv_jax.quant) for the big matrices."""
  return variable.get_value()


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, in fp32 (returns fp32)."""

  def __init__(self, p):
    self.weight, self.bias = nnx.Param(p['weight']), nnx.Param(p['bias'])

  def __call__(self, x, eps=LN_EPS):
    x = f32(x)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * f32(self.weight[...]) + f32(self.bias[...])


def group_norm(y_BxTxHxN, norm: LayerNorm):
  """Per-head normalisation of the WKV output (GroupNorm with H groups, eps GN_EPS), fp32 [B, T, C]."""
  B, T, H, N = y_BxTxHxN.shape
  y = f32(y_BxTxHxN)
  mean = y.mean(-1, keepdims=True)
  var = jnp.square(y - mean).mean(-1, keepdims=True)
  y = ((y - mean) * jax.lax.rsqrt(var + GN_EPS)).reshape(B, T, H * N)
  return y * f32(norm.weight[...]) + f32(norm.bias[...])


class Linear(nnx.Module):
  """A bias-free projection stored as the checkpoint stores it, [out, in] (possibly quantized)."""

  def __init__(self, weight_OxI):
    self.weight = nnx.Param(weight_OxI)

  def __call__(self, x):
    return linear(x, value(self.weight))


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
  """x @ W for the small LoRA-style matrices, which the checkpoint stores as [in, out]; fp32 result."""
  w_IxO = value(w_IxO) if isinstance(w_IxO, nnx.Variable) else w_IxO
  return jnp.einsum('...i,io->...o', x.astype(w_IxO.dtype), w_IxO, preferred_element_type=jnp.float32)


def token_shift(x_BxTxC, last_BxC, doc_starts_BxM=None):
  """The previous token's value at every position; `last` stands before the first token.

  doc_starts_BxM: packed rows (see pallas_kernels.wkv6): a document's first token sees zeros, as
  the first token of a row of its own does, not the end of the document before it.

  A select over a padded copy rather than a concatenate along T: XLA's GPU
  backend emits that concatenate as a kernel of its own, where this form fuses
  into its consumers.
  """
  T = x_BxTxC.shape[1]
  first_1xTx1 = jax.lax.broadcasted_iota(jnp.int32, (1, T, 1), 1) == 0
  previous_BxTxC = jnp.pad(x_BxTxC[:, :-1], ((0, 0), (1, 0), (0, 0)))
  if doc_starts_BxM is not None:
    previous_BxTxC = jnp.where(doc_first_tokens(doc_starts_BxM, T)[..., None], 0, previous_BxTxC)
  return jnp.where(first_1xTx1, last_BxC[:, None].astype(x_BxTxC.dtype), previous_BxTxC)


def residual(x_BxTxC, delta_BxTxC):
  """x + delta formed in fp32 and rounded once to the stream's dtype, as the official bf16 model does."""
  return (f32(x_BxTxC) + f32(delta_BxTxC)).astype(x_BxTxC.dtype)


class Block(nnx.Module):
  """ln1 -> time mix -> residual -> ln2 -> channel mix -> residual: every generation's layer, built by
  its `block` function from its own TimeMix and ChannelMix."""

  def __init__(self, p: dict, att: nnx.Module, ffn: nnx.Module):
    self.ln1, self.ln2 = LayerNorm(p['ln1']), LayerNorm(p['ln2'])
    self.att, self.ffn = att, ffn

  def __call__(self, x_BxTxC, layer_state, carry, implementation, doc_starts_BxM=None):
    """layer_state: (wkv [B, H, V, K] or shared [H, V, K], att shift [B, C], ffn shift [B, C]).
    carry: what a layer hands the next one within a pass (x070: layer 0's v; nothing in x052/x060).
    doc_starts_BxM: packed rows (see RWKV.hidden_states); None: one sequence a row."""
    wkv_state, att_shift, ffn_shift = layer_state
    dtype = x_BxTxC.dtype
    att_out, att_shift, wkv_state, carry = self.att(self.ln1(x_BxTxC).astype(dtype), att_shift, wkv_state, carry,
                                                    implementation, doc_starts_BxM)
    x_BxTxC = residual(x_BxTxC, att_out)
    ffn_out, ffn_shift = self.ffn(self.ln2(x_BxTxC).astype(dtype), ffn_shift, doc_starts_BxM)
    return residual(x_BxTxC, ffn_out), (wkv_state, att_shift, ffn_shift), carry
