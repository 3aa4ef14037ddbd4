"""RWKV-6 (x060, "Finch"): its checkpoint keys, its layers, its synthetic weights.

Per layer, time mix: a data-dependent token shift (five LoRA-style mixes),
r k v g from the mixed inputs, a data-dependent decay w = time_decay + LoRA
(the WKV kernel applies exp(-exp(w))), the bonus u = time_faaaa, the WKV-6
recurrence from the layer's state, GroupNorm per head, times silu(g), output.
Channel mix: sigmoid(receptance) * value(relu(key)^2) on token-shifted inputs.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels import wkv6
from rwkv_jax.models.common import Block, LayerNorm, Linear, WKVState, dot, f32, group_norm, token_shift

NAME = 'x060'
LORAS = ('mix', 'decay')  # RWKVConfig.lora names: time_maa_w1/w2 (five mixes share it) and time_decay_w1/w2
# Keys stored as [1, 1, C] in the file and as [C] in the model.
SQUEEZED = re.compile(r'(time_maa_[a-z]|time_decay)$')
# The projections RWKV-PEFT quantizes (and rwkv_jax.quant): (group, name) in every block.
QUANTIZED = (('att', 'receptance'), ('att', 'key'), ('att', 'value'), ('att', 'gate'), ('att', 'output'),
             ('ffn', 'key'), ('ffn', 'receptance'), ('ffn', 'value'))


def dims_from_shapes(shapes) -> dict:
  """RWKVConfig fields that this generation reads from the key shapes (block 0's)."""
  return dict(head_size=shapes['blocks.0.att.time_faaaa'][1], dim_ffn=shapes['blocks.0.ffn.key.weight'][0],
              lora=(('mix', shapes['blocks.0.att.time_maa_w1'][1] // 5),
                    ('decay', shapes['blocks.0.att.time_decay_w1'][1])))


def block_shapes(cfg, layer: int) -> dict[str, tuple[int, ...]]:
  """Every key of block `layer` (without the `blocks.{i}.` prefix) with its shape in the file."""
  del layer  # every x060 block has the same keys
  C, F, H, N = cfg.n_embd, cfg.dim_ffn, cfg.n_head, cfg.head_size
  D, Dd = cfg.lora_dim('mix'), cfg.lora_dim('decay')
  shapes = {'ln1.weight': (C,), 'ln1.bias': (C,), 'ln2.weight': (C,), 'ln2.bias': (C,)}
  shapes.update({f'att.time_maa_{c}': (1, 1, C) for c in 'xwkvrg'})
  shapes.update({
      'att.time_maa_w1': (C, 5 * D), 'att.time_maa_w2': (5, D, C),
      'att.time_decay': (1, 1, C), 'att.time_decay_w1': (C, Dd), 'att.time_decay_w2': (Dd, C),
      'att.time_faaaa': (H, N)})
  shapes.update({f'att.{m}.weight': (C, C) for m in ('receptance', 'key', 'value', 'gate', 'output')})
  shapes.update({
      'att.ln_x.weight': (C,), 'att.ln_x.bias': (C,),
      'ffn.time_maa_k': (1, 1, C), 'ffn.time_maa_r': (1, 1, C),
      'ffn.key.weight': (F, C), 'ffn.receptance.weight': (C, C), 'ffn.value.weight': (C, F)})
  return shapes


def optional_block_shapes(cfg, layer: int) -> dict[str, tuple[int, ...]]:
  """Keys a file may carry that the model does not use: none for x060."""
  del cfg, layer
  return {}


def random_tensor(leaf: str, shape, rng, init_decays: bool = False):
  """A random value for key `leaf` (without `blocks.{i}.`) that looks like a trained model's:
  norms near 1, mixes in [0, 1], time_decay over [-6, 1], weights scaled by 1/sqrt(fan_in).
  init_decays: time_decay over [-6, -1] and the decay LoRA's output near zero, as RWKV-6
  initialises them, instead of that steeper spread. None for keys it has no rule for."""
  normal = lambda scale: rng.normal(0.0, scale, shape)
  if init_decays and leaf in ('att.time_decay', 'att.time_decay_w2'):
    return rng.uniform(-6.0, -1.0, shape) if leaf == 'att.time_decay' else rng.uniform(-0.01, 0.01, shape)
  if leaf.endswith(('time_maa_w1', 'time_maa_w2', 'time_decay_w1', 'time_decay_w2')):
    return normal(1.0 / np.sqrt(shape[-2]))
  if 'time_maa_' in leaf:
    return rng.uniform(0.0, 1.0, shape)
  if leaf == 'att.time_decay':
    return rng.uniform(-6.0, 1.0, shape)
  if leaf == 'att.time_faaaa':
    return rng.uniform(-1.0, 1.0, shape)
  return None


class TimeMix(nnx.Module):

  def __init__(self, cfg, p: dict):
    self.cfg = cfg
    for name in ('time_maa_x', 'time_maa_w1', 'time_maa_w2', 'time_decay', 'time_decay_w1', 'time_decay_w2',
                 'time_faaaa', *(f'time_maa_{c}' for c in 'wkvrg')):
      setattr(self, name, nnx.Param(p[name]))
    for name in ('receptance', 'key', 'value', 'gate', 'output'):
      setattr(self, name, Linear(p[name]['weight']))
    self.ln_x = LayerNorm(p['ln_x'])
    self.time_state = WKVState(f32(jnp.asarray(p['time_state'])) if 'time_state' in p else
                               jnp.zeros((cfg.n_head, cfg.head_size, cfg.head_size), jnp.float32))

  def __call__(self, x_BxTxC, shift_BxC, wkv_state, carry, implementation, doc_starts_BxM=None):
    """Returns (output [B, T, C], new shift, new WKV state, carry: nothing to hand on in x060)."""
    B, T, C = x_BxTxC.shape
    H, N = self.cfg.n_head, self.cfg.head_size
    act = lambda a: a.astype(x_BxTxC.dtype)
    xx = token_shift(x_BxTxC, shift_BxC, doc_starts_BxM) - x_BxTxC
    xxx = x_BxTxC + xx * act(self.time_maa_x[...])
    m_BxTx5xD = jnp.tanh(dot(xxx, self.time_maa_w1)).reshape(B, T, 5, -1)
    w2 = self.time_maa_w2[...]
    m_5xBxTxC = jnp.einsum('btfd,fdc->fbtc', m_BxTx5xD.astype(w2.dtype), w2)
    xw, xk, xv, xr, xg = (x_BxTxC + xx * act(act(getattr(self, f'time_maa_{c}')[...]) + m_5xBxTxC[i])
                          for i, c in enumerate('wkvrg'))

    # r, k, v enter the WKV kernel in the activations' dtype (bf16 halves its memory traffic);
    # the decay and the state stay fp32.
    heads = lambda y: act(y).reshape(B, T, H, N)
    r, k, v = heads(self.receptance(xr)), heads(self.key(xk)), heads(self.value(xv))
    g = jax.nn.silu(act(self.gate(xg)))
    w = (f32(self.time_decay[...]) + dot(jnp.tanh(dot(xw, self.time_decay_w1)), self.time_decay_w2)).reshape(B, T, H, N)
    y_BxTxHxN, wkv_state = wkv6(r, k, v, w, f32(self.time_faaaa[...]), wkv_state, doc_starts=doc_starts_BxM,
                                implementation=implementation)
    y_BxTxHxN = checkpoint_name(y_BxTxHxN, 'wkv_out')  # kept under remat: common.REMAT_POLICY
    return self.output(group_norm(y_BxTxHxN, self.ln_x) * g), f32(x_BxTxC[:, -1]), wkv_state, carry


class ChannelMix(nnx.Module):

  def __init__(self, p: dict):
    self.time_maa_k, self.time_maa_r = nnx.Param(p['time_maa_k']), nnx.Param(p['time_maa_r'])
    self.key, self.receptance, self.value = (Linear(p[m]['weight']) for m in ('key', 'receptance', 'value'))

  def __call__(self, x_BxTxC, shift_BxC, doc_starts_BxM=None):
    act = lambda a: a.astype(x_BxTxC.dtype)
    xx = token_shift(x_BxTxC, shift_BxC, doc_starts_BxM) - x_BxTxC
    xk = x_BxTxC + xx * act(self.time_maa_k[...])
    xr = x_BxTxC + xx * act(self.time_maa_r[...])
    k = jnp.square(jax.nn.relu(act(self.key(xk))))
    r = jax.nn.sigmoid(act(self.receptance(xr)))
    return r * checkpoint_name(act(self.value(k)), 'ffn_value'), f32(x_BxTxC[:, -1])


def block(cfg, p: dict, layer: int) -> Block:
  del layer  # every x060 block is built alike
  return Block(p, TimeMix(cfg, p['att']), ChannelMix(p['ffn']))
