"""The state-tuning step: loss, learning-rate schedules, optimizer, one jitted update.

State tuning is a filter on the model's Variables: the model is split by type
(`nnx.split(model, WKVState, ...)`) into its initial WKV states, which are
trained, and its weights, a plain argument that is never differentiated, so
weight gradients are never formed. The optimizer is an optax partition by the
same type: WKVState gets clip-at-global-norm 1.0 then Adam on the schedule,
anything else `set_to_zero` (so it also holds the weights still if given the
whole model's state). Token shifts start at zero, as RWKV-PEFT and every state
consumer have them.
"""
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rwkv_jax import quant
from rwkv_jax.data import IGNORE_INDEX as IGNORE
from rwkv_jax.models import RWKV, WKVState
from rwkv_jax.models.common import f32, linear

L2WRAP = 1e-4  # RWKV's L2Wrap factor: pushes the largest logit of every position towards 0.


class TrainState(NamedTuple):
  step: jax.Array
  states: nnx.State  # the model's WKVState Variables: the fp32 master copy of what is trained
  opt_state: optax.OptState


@functools.lru_cache(maxsize=None)
def schedule(kind: str, lr_init: float, lr_final: float, warmup_steps: int, total_steps: int):
  """lr(step): linear warmup, then lr_init -> lr_final over the rest of `total_steps`.

  cos: cosine; exp: geometric interpolation (RWKV-LM's); wsd: RWKV-PEFT's
  warmup-stable-decay, a cosine down to 0 that ignores lr_final.
  """
  if kind not in ('cos', 'exp', 'wsd'):
    raise ValueError(f'unknown lr schedule {kind!r}')
  if kind == 'wsd' and warmup_steps <= 0:
    warmup_steps = 100  # RWKV-PEFT's substitute when wsd is given no warmup.
  final = 0.0 if kind == 'wsd' else lr_final

  def lr(step):
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    if kind == 'exp' and lr_init > 0 and final > 0:
      decayed = lr_init * jnp.exp(math.log(final / lr_init) * progress)
    else:
      decayed = final + 0.5 * (lr_init - final) * (1.0 + jnp.cos(jnp.pi * progress))
    warm = lr_init * (step + 1) / max(warmup_steps, 1)
    return jnp.where(step < warmup_steps, warm, decayed)
  return lr


def optimizer(lr_schedule, beta1=0.9, beta2=0.99, adam_eps=1e-8) -> optax.GradientTransformation:
  trained = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr_schedule, beta1, beta2, adam_eps))
  return optax.multi_transform({'trained': trained, 'frozen': optax.set_to_zero()}, _labels)


def _labels(tree):
  """'trained' for WKVState Variables, 'frozen' for every other leaf."""
  is_variable = lambda x: isinstance(x, nnx.Variable)
  return jax.tree.map(lambda x: 'trained' if isinstance(x, WKVState) else 'frozen', tree, is_leaf=is_variable)


def split(model: RWKV):
  """(graphdef, the WKV states that are trained, the weights): the model by Variable type."""
  return nnx.split(model, WKVState, ...)


def init_train_state(states: nnx.State, opt: optax.GradientTransformation) -> TrainState:
  """Starts from the model's own WKV states: zeros, or a merged checkpoint's (continued, as RWKV-PEFT does)."""
  return TrainState(jnp.zeros((), jnp.int32), states, opt.init(states))


def wkv_array(states: nnx.State) -> np.ndarray:
  """The WKV states of `split` as one [L, H, V, K] fp32 array (what state files hold)."""
  blocks = nnx.to_pure_dict(states)['blocks']
  return np.stack([np.asarray(blocks[i]['att']['time_state'], np.float32) for i in range(len(blocks))])


def cross_entropy(head_VxC, x_BxTxC, targets_BxT, chunk=128):
  """(sum of CE over unmasked targets, count, L2Wrap term), never holding [B, T, V] in fp32.

  The head runs over `chunk` positions at a time, and under differentiation each
  chunk's gradient with respect to x is formed in the pass that forms its loss
  (_chunk_losses), so the logits are computed once, not again in the backward pass.
  """
  B, T, C = x_BxTxC.shape
  n = B * T
  pad = -n % chunk
  x_NxC = jnp.pad(x_BxTxC.reshape(n, C), ((0, pad), (0, 0)))
  targets_N = jnp.pad(targets_BxT.reshape(n), (0, pad), constant_values=IGNORE)
  sums = jax.lax.map(lambda xs: _chunk_losses(xs[0], head_VxC, xs[1]),
                     (x_NxC.reshape(-1, chunk, C), targets_N.reshape(-1, chunk)))
  ce_sum, count, l2_sum = (s.sum() for s in sums)
  return ce_sum, count, L2WRAP * l2_sum / n


def _logits(x_KxC, head):
  return f32(linear(x_KxC, head))


def _losses(logits_KxV, targets_K):
  """(CE sum over valid targets, their count, sum of 0.5 * max logit^2), and (valid, max logit)."""
  valid_K = targets_K != IGNORE
  target_logit_K = jnp.take_along_axis(logits_KxV, jnp.where(valid_K, targets_K, 0)[:, None], axis=-1)[:, 0]
  ce_K = jax.nn.logsumexp(logits_KxV, axis=-1) - target_logit_K
  max_logit_K = jnp.max(logits_KxV, axis=-1)
  sums = jnp.sum(jnp.where(valid_K, ce_K, 0.0)), jnp.sum(valid_K), jnp.sum(0.5 * jnp.square(max_logit_K))
  return sums, (valid_K, max_logit_K)


@jax.custom_vjp
def _chunk_losses(x_KxC, head, targets_K):
  return _losses(_logits(x_KxC, head), targets_K)[0]


def _chunk_losses_fwd(x_KxC, head, targets_K):
  logits_KxV, head_vjp = jax.vjp(lambda x: _logits(x, head), x_KxC)
  sums, (valid_K, max_logit_K) = _losses(logits_KxV, targets_K)
  onehot_KxV = targets_K[:, None] == jax.lax.broadcasted_iota(jnp.int32, logits_KxV.shape, 1)
  dce_KxV = jnp.where(valid_K[:, None], jax.nn.softmax(logits_KxV) - onehot_KxV, 0.0)
  # Both are products of head-dtype operands, exact in that dtype: stored so, they cost half.
  dx_ce_KxC = head_vjp(dce_KxV)[0].astype(head.dtype)
  # d(0.5 max^2)/dx is the max times the head's row of the position's largest logit.
  rows_KxC = quant.dense(quant.take_rows(head, jnp.argmax(logits_KxV, axis=-1)))
  return sums, (dx_ce_KxC, rows_KxC, max_logit_K)


def _chunk_losses_bwd(residuals, cotangents):
  dx_ce_KxC, rows_KxC, max_logit_K = residuals
  d_ce, _, d_l2 = cotangents
  dx_KxC = d_ce * f32(dx_ce_KxC) + d_l2 * max_logit_K[:, None] * f32(rows_KxC)
  return dx_KxC, None, None


_chunk_losses.defvjp(_chunk_losses_fwd, _chunk_losses_bwd)


def loss_fn(states: nnx.State, graphdef, weights: nnx.State, inputs_BxT, targets_BxT, remat=True,
            doc_starts_BxM=None, gather=None):
  """Mean CE over unmasked targets; its gradient also carries L2Wrap, its value does not.
  doc_starts_BxM: packed rows (data.Sampler.doc_starts), else None. gather: see make_train_step."""
  model = nnx.merge(graphdef, states, weights)
  x_BxTxC, _ = model.hidden_states(inputs_BxT, remat=remat, doc_starts_BxM=doc_starts_BxM,
                                   run_block=None if gather is None else gather.run_block)
  head = model.head.weight.get_value()
  head = head if gather is None else gather(head, x_BxTxC)
  ce_sum, count, l2wrap = cross_entropy(head, x_BxTxC, targets_BxT)
  ce = ce_sum / jnp.maximum(count, 1)
  return ce + l2wrap - jax.lax.stop_gradient(l2wrap)


def host_embedding(model: RWKV):
  """Takes the embedding out of the model and returns it as numpy, in host memory.

  A step uses only the embedding rows of its tokens, and state tuning never
  differentiates them, so the trainer gathers them on the host
  (`quant.take_rows(embedding, tokens)`) and the table never takes GPU memory:
  0.27 GB of a bf16 1.6B model, 0.54 GB of a 7B.
  """
  embedding = jax.tree.map(np.asarray, model.emb.weight.get_value())
  model.emb = None
  return embedding


def make_train_step(graphdef, opt: optax.GradientTransformation, remat=True, gather=None):
  """step(train_state, weights, inputs [A, B, T], targets [A, B, T], doc_starts [A, B, M] or
  None) -> (train_state, loss).

  graphdef, weights: from `split`. inputs: token ids, or their embedding rows (see
  host_embedding). doc_starts: packed rows (`--dataload pack`, see loss_fn). A > 1 accumulates
  gradients over A micro-batches (mean). A non-finite loss leaves the train state unchanged, so
  the caller still holds the last good one.
  gather: None, or a distributed.Gather for weights split over the devices: each block's are
  gathered just before it runs (and again for its backward, which recomputes the block), the
  head's before the loss.
  """
  grad_fn = jax.value_and_grad(loss_fn)

  def step(train_state: TrainState, weights, inputs_AxBxT, targets_AxBxT, doc_starts_AxBxM=None):
    def micro_batch(grads_sum, batch):
      inputs_BxT, targets_BxT, doc_starts_BxM = batch
      loss, grads = grad_fn(train_state.states, graphdef, weights, inputs_BxT, targets_BxT, remat, doc_starts_BxM,
                            gather)
      return jax.tree.map(jnp.add, grads_sum, grads), loss

    zeros = jax.tree.map(jnp.zeros_like, train_state.states)
    grads_sum, losses = jax.lax.scan(micro_batch, zeros, (inputs_AxBxT, targets_AxBxT, doc_starts_AxBxM))
    grads = jax.tree.map(lambda g: g / targets_AxBxT.shape[0], grads_sum)
    updates, opt_state = opt.update(grads, train_state.opt_state, train_state.states)
    updated = TrainState(train_state.step + 1, optax.apply_updates(train_state.states, updates), opt_state)
    loss = losses.mean()
    finite = jnp.isfinite(loss)
    return jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, train_state), loss

  return jax.jit(step, donate_argnums=0)
