"""The RWKV language model as a Flax NNX module, for every generation.

embedding -> ln0 -> blocks -> ln_out -> head. The blocks are the generation's
(rwkv_jax.models.v6, ...), chosen in one place (`generation`) from the
config's version, which is read from the checkpoint's keys.

Layers are a Python loop over per-layer modules, each block one remat (grad_cp)
unit that keeps what common.REMAT_POLICY names: a `lax.scan` over weights stacked
on a layer axis would compile in time flat in depth, but XLA copies each layer's
slice of every weight out of the stack before its matrix products; unrolled, the
products read the weights in place (docs/performance.md has the measurements).

Variables: the weights are `nnx.Param` (frozen in state tuning); each block's
initial WKV state is a `WKVState` (what state tuning trains), zeros or a merged
checkpoint's `time_state`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax import quant
from rwkv_jax.config import RWKVConfig
from rwkv_jax.models import common, v5, v6, v7
from rwkv_jax.models.common import LayerNorm, Linear, State, WKVState, f32

GENERATIONS = {'5': v5, '6': v6, '7': v7}


def generation(version: str):
  """The module (rwkv_jax.models.v6, ...) that defines the layers of this RWKV version."""
  return GENERATIONS[version]


class Embedding(nnx.Module):

  def __init__(self, weight_VxC):
    self.weight = nnx.Param(weight_VxC)


class RWKV(nnx.Module):
  """An RWKV model. `model(tokens, state)` is the traceable forward pass; `model.forward`
  the convenient one (lists, unbatched [T] inputs, jitted)."""

  def __init__(self, cfg: RWKVConfig, params: dict, implementation: str | None = None):
    """params: the checkpoint's tree (rwkv_jax.checkpoint.params_from_tensors): `emb`, `ln0`,
    `blocks` (a list of per-layer dicts), `ln_out`, `head`; a merged checkpoint's blocks carry
    `att.time_state`. implementation: the WKV kernel (pallas_kernels; None: the platform's default)."""
    gen = generation(cfg.version)
    self.cfg = cfg
    self.implementation = implementation
    self.merged_state = 'time_state' in params['blocks'][0]['att']
    self.emb = Embedding(params['emb']['weight']) if 'emb' in params else None
    self.ln0 = LayerNorm(params['ln0'])
    self.blocks = nnx.List([gen.block(cfg, p, i) for i, p in enumerate(params['blocks'])])
    self.ln_out = LayerNorm(params['ln_out'])
    self.head = Linear(params['head']['weight'])

  @property
  def dtype(self):
    """The compute dtype: the weights' (as loaded, or as cast by `cast`)."""
    return common.value(self.blocks[0].att.receptance.weight).dtype

  def initial_wkv(self) -> jax.Array:
    """[L, H, V, K] fp32: every layer's own initial WKV state (zeros, merged, or tuned)."""
    return jnp.stack([b.att.time_state[...] for b in self.blocks])

  def init_state(self, batch_size: int = 1) -> State:
    """The model's own initial state for `batch_size` sequences: its WKV states, zero token shifts."""
    return common.initial_state(self.initial_wkv(), self.cfg.n_embd, batch_size)

  def hidden_states(self, inputs_BxT, state: State | None = None, remat: bool = False, doc_starts_BxM=None,
                    run_block=None):
    """Embedding -> all blocks -> ln_out. Returns (x [B, T, C] fp32, final State with a batch axis).

    inputs_BxT: token ids, or their embedding rows [B, T, C] (quant.take_rows of the
    embedding: the trainer gathers them on the host and keeps the table off the GPU, so the
    model may then have no `emb`). state: None starts every sequence from the model's own
    WKV states (what state tuning differentiates) with zero token shifts. run_block: None, or
    fn(apply, states, weights, x, layer_state, carry) that runs each block in its own way
    (distributed.Gather.run_block: weights split over the devices, gathered just in time).

    doc_starts_BxM: packed rows (`--dataload pack`), [B, ceil(T / DOC_ALIGN)] bool, True where a
    document begins at token m * DOC_ALIGN (pallas_kernels.common.DOC_ALIGN): every document starts
    as the row does, from the initial WKV states with zero token shifts, and sees nothing of the
    document before it. None: one sequence a row.

    Between blocks the residual stream is held in the weights' dtype, as the official bf16
    model holds it; each sum is formed in fp32 and rounded once. With remat, that is also what
    every layer keeps for the backward pass.
    """
    rows_BxTxC = inputs_BxT if is_embedded(inputs_BxT) else quant.take_rows(common.value(self.emb.weight), inputs_BxT)
    x_BxTxC = self.ln0(quant.dense(rows_BxTxC)).astype(self.dtype)
    B, C = x_BxTxC.shape[0], self.cfg.n_embd
    carry, new_state = None, []
    for i, block in enumerate(self.blocks):
      if state is None:
        layer_state = (block.att.time_state[...], jnp.zeros((B, C), jnp.float32), jnp.zeros((B, C), jnp.float32))
      else:  # a state without a batch axis ([L, H, V, K], [L, C]) is shared by every sequence
        layer_state = (state.wkv[i], *(jnp.broadcast_to(s[i], (B, C)) for s in state[1:]))
      x_BxTxC, layer_state, carry = _run_block(block, x_BxTxC, layer_state, carry, self.implementation, remat,
                                               doc_starts_BxM, run_block)
      new_state.append(layer_state)
    return self.ln_out(x_BxTxC), State(*(jnp.stack(s) for s in zip(*new_state)))

  def __call__(self, inputs_BxT, state: State | None = None, remat: bool = False):
    """Logits [B, T, V] fp32 for every position, and the state after the last token."""
    x_BxTxC, state = self.hidden_states(inputs_BxT, state, remat)
    return f32(self.head(x_BxTxC)), state

  def forward(self, tokens, state: State | None = None):
    """tokens [T] or [B, T] (list or array) -> (logits [T, V] or [B, T, V], state), jitted.

    Pass the returned state back in to continue the sequences (RNN mode, one token or many
    a call). A batch-1 state (e.g. from rwkv_jax.load_state) starts every sequence.
    """
    tokens = jnp.asarray(np.asarray(tokens, np.int32))
    unbatched = tokens.ndim == 1
    tokens_BxT = tokens[None] if unbatched else tokens
    B = tokens_BxT.shape[0]
    if state is None:
      state = self.init_state(B)
    elif state.wkv.shape[1] != B:
      state = jax.tree.map(lambda s: jnp.broadcast_to(s, (s.shape[0], B, *s.shape[2:])), state)
    graphdef, weights = nnx.split(self)
    logits, state = _jit_call(graphdef, weights, tokens_BxT, state)
    return (logits[0] if unbatched else logits), state


def _run_block(block, x_BxTxC, layer_state, carry, implementation, remat, doc_starts_BxM, run_block):
  """One block; under remat (grad_cp) the backward pass recomputes its activations but those
  common.REMAT_POLICY keeps. The block's WKV states are split from its weights: `run_block` (see
  hidden_states) gathers only the weights."""
  if not remat and run_block is None:
    return block(x_BxTxC, layer_state, carry, implementation, doc_starts_BxM)
  graphdef, states, weights = nnx.split(block, WKVState, ...)

  def apply(states, weights, x_BxTxC, layer_state, carry, doc_starts_BxM):
    return nnx.merge(graphdef, states, weights)(x_BxTxC, layer_state, carry, implementation, doc_starts_BxM)

  if run_block is not None:
    return run_block(apply, states, weights, x_BxTxC, layer_state, carry, doc_starts_BxM)
  remat_apply = jax.checkpoint(apply, policy=common.REMAT_POLICY)
  return remat_apply(states, weights, x_BxTxC, layer_state, carry, doc_starts_BxM)


@functools.partial(jax.jit, static_argnums=0)
def _jit_call(graphdef, weights, tokens_BxT, state):
  return nnx.merge(graphdef, weights)(tokens_BxT, state)


def is_embedded(inputs) -> bool:
  """Whether model inputs are embedding rows (quant.take_rows of the embedding) rather than token ids."""
  return quant.is_quantized(inputs) or jnp.issubdtype(inputs.dtype, jnp.floating)
