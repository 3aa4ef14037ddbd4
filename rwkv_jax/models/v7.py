"""RWKV-7 (x070, "Goose"): its checkpoint keys, its layers, its synthetic weights.

Per layer, time mix: six token-shift mixes; r k v from the mixed inputs; a
data-dependent decay (the WKV kernel takes its log, -exp(-0.5) * sigmoid(w0 +
LoRA), so every decay lies in (exp(-exp(-0.5)), 1)); an in-context learning
rate a = sigmoid(a0 + LoRA); the removal key kk = k * k_k normalised per head;
from layer 1 on, v mixed with layer 0's v ("v_first", the `carry` a block hands
the next) through sigmoid(v0 + LoRA); the WKV-7 recurrence
S <- S diag(w) + (S (-kk)) (kk * a)^T + v k^T from the layer's state, y = S r;
GroupNorm per head, plus the bonus sum_head(r * k * r_k) * v; times the gate
sigmoid(xg g1) g2; output. Channel mix: value(relu(key(x mixed))^2).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.wkv7 import wkv7
from rwkv_jax.errors import UserError
from rwkv_jax.models.common import Block, LayerNorm, Linear, WKVState, dot, f32, group_norm, token_shift

NAME = 'x070'
# RWKVConfig.lora names: the decay (w1/w2), in-context rate (a1/a2), value-residual (v1/v2) and gate
# (g1/g2) LoRA widths. Released models do not follow one formula (C=2048: 96/96/64/256), so each is
# read from its tensor.
LORAS = ('w', 'a', 'v', 'g')
# Keys stored as [1, 1, C] in the file and as [C] in the model.
SQUEEZED = re.compile(r'\.(x_[rwkvag]|[wav]0|k_k|k_a)$')
# The projections RWKV-PEFT quantizes (and rwkv_jax.quant): (group, name) in every block.
QUANTIZED = (('att', 'receptance'), ('att', 'key'), ('att', 'value'), ('att', 'output'),
             ('ffn', 'key'), ('ffn', 'value'))
# exp(-0.5): the largest decay rate. The package writes it as 0.606531, RWKV-LM's kernels as 0.6065306597.
MAX_DECAY_RATE = float(np.exp(-0.5))
KK_EPS = 1e-12  # torch.nn.functional.normalize's default, which the package uses for kk
# RWKV-7 variants with layers of their own, told apart by their keys (rwkv7b has both).
VARIANTS = (('.qkv.', 'rwkv7b: DeepEmbed plus an attention with a KV cache, not a pure-state model'),
            ('.ffn.s_emb', 'rwkv7a: DeepEmbed, token-indexed tables in every channel mix'))


def dims_from_shapes(shapes) -> dict:
  """RWKVConfig fields that this generation reads from the key shapes; refuses the RWKV-7 variants."""
  for fragment, variant in VARIANTS:
    if any(fragment in key for key in shapes):
      raise UserError(f'this is an RWKV-7 variant ({variant}); only plain x070 models are supported')
  att = lambda name: shapes[f'blocks.0.att.{name}']
  return dict(head_size=att('r_k')[1], dim_ffn=shapes['blocks.0.ffn.key.weight'][0],
              lora=(('w', att('w1')[1]), ('a', att('a1')[1]), ('v', _value_lora_width(shapes)),
                    ('g', att('g1')[1])))


def _value_lora_width(shapes) -> int:
  """Block 1's v1 width: block 0 has no value residual, so files often lack its v1 (and a one-layer
  model has none at all, width 0, unless block 0 carries its unused one)."""
  for key in ('blocks.1.att.v1', 'blocks.0.att.v1'):
    if key in shapes:
      return shapes[key][1]
  return 0


def _value_residual_shapes(cfg) -> dict[str, tuple[int, ...]]:
  C, Dv = cfg.n_embd, cfg.lora_dim('v')
  return {'att.v0': (1, 1, C), 'att.v1': (C, Dv), 'att.v2': (Dv, C)}


def block_shapes(cfg, layer: int) -> dict[str, tuple[int, ...]]:
  """Every key of block `layer` (without the `blocks.{i}.` prefix) with its shape in the file,
  in RWKV-LM's order. Block 0 has no v0/v1/v2 (it makes v_first); its ln0 is a global."""
  C, F, H, N = cfg.n_embd, cfg.dim_ffn, cfg.n_head, cfg.head_size
  Dw, Da, Dg = cfg.lora_dim('w'), cfg.lora_dim('a'), cfg.lora_dim('g')
  shapes = {'ln1.weight': (C,), 'ln1.bias': (C,), 'ln2.weight': (C,), 'ln2.bias': (C,)}
  shapes.update({f'att.x_{c}': (1, 1, C) for c in 'rwkvag'})
  shapes.update({'att.w0': (1, 1, C), 'att.w1': (C, Dw), 'att.w2': (Dw, C),
                 'att.a0': (1, 1, C), 'att.a1': (C, Da), 'att.a2': (Da, C)})
  if layer > 0:
    shapes.update(_value_residual_shapes(cfg))
  shapes.update({'att.g1': (C, Dg), 'att.g2': (Dg, C), 'att.k_k': (1, 1, C), 'att.k_a': (1, 1, C),
                 'att.r_k': (H, N)})
  shapes.update({f'att.{m}.weight': (C, C) for m in ('receptance', 'key', 'value', 'output')})
  shapes.update({'att.ln_x.weight': (C,), 'att.ln_x.bias': (C,),
                 'ffn.x_k': (1, 1, C), 'ffn.key.weight': (F, C), 'ffn.value.weight': (C, F)})
  return shapes


def optional_block_shapes(cfg, layer: int) -> dict[str, tuple[int, ...]]:
  """Keys a file may carry that the model does not use: block 0's v0/v1/v2 (trainers keep them)."""
  return _value_residual_shapes(cfg) if layer == 0 else {}


def random_tensor(leaf: str, shape, rng, init_decays: bool = False):
  """A random value for key `leaf` (without `blocks.{i}.`) that looks like a trained model's: mixes
  in [0, 1]; w0 in [-6, 3], so that sigmoid(w0 + LoRA) and with it the decay spans its range (RWKV-LM
  starts w0 in [-6.5, -1.5], slow decays); a0, v0 around 0; k_k around 1 (RWKV-LM starts it at 0.85);
  k_a 1 +- 0.2; r_k small; LoRA matrices scaled by 1/sqrt(fan_in). init_decays: w0 as RWKV-LM starts
  it and the decay LoRA's output near zero. None for keys it has no rule for."""
  normal = lambda scale: rng.normal(0.0, scale, shape)
  leaf = leaf.removeprefix('att.')
  if init_decays and leaf in ('w0', 'w2'):
    return rng.uniform(-6.5, -1.5, shape) if leaf == 'w0' else rng.uniform(-0.01, 0.01, shape)
  if re.fullmatch(r'[wavg][12]', leaf):
    return normal(1.0 / np.sqrt(shape[-2]))
  if re.fullmatch(r'(ffn\.)?x_[rwkvag]', leaf):
    return rng.uniform(0.0, 1.0, shape)
  rules = {'w0': lambda: rng.uniform(-6.0, 3.0, shape), 'a0': lambda: normal(0.5), 'v0': lambda: normal(0.5),
           'k_k': lambda: rng.uniform(0.7, 1.3, shape), 'k_a': lambda: rng.uniform(0.8, 1.2, shape),
           'r_k': lambda: normal(0.1)}
  return rules[leaf]() if leaf in rules else None


class TimeMix(nnx.Module):

  def __init__(self, cfg, p: dict, layer: int):
    self.cfg = cfg
    self.value_residual = layer > 0  # layer 0 makes v_first; the others mix it in
    names = ['w0', 'w1', 'w2', 'a0', 'a1', 'a2', 'g1', 'g2', 'k_k', 'k_a', 'r_k', *(f'x_{c}' for c in 'rwkvag')]
    if self.value_residual:
      names += ['v0', 'v1', 'v2']
    for name in names:
      setattr(self, name, nnx.Param(p[name]))
    for name in ('receptance', 'key', 'value', 'output'):
      setattr(self, name, Linear(p[name]['weight']))
    self.ln_x = LayerNorm(p['ln_x'])
    self.time_state = WKVState(f32(jnp.asarray(p['time_state'])) if 'time_state' in p else
                               jnp.zeros((cfg.n_head, cfg.head_size, cfg.head_size), jnp.float32))

  def __call__(self, x_BxTxC, shift_BxC, wkv_state, v_first_BxTxC, implementation, doc_starts_BxM=None):
    """Returns (output [B, T, C], new shift, new WKV state, v_first: this layer's v in layer 0)."""
    B, T, C = x_BxTxC.shape
    H, N = self.cfg.n_head, self.cfg.head_size
    act = lambda a: a.astype(x_BxTxC.dtype)
    param = lambda name: getattr(self, name)[...]
    xx = token_shift(x_BxTxC, shift_BxC, doc_starts_BxM) - x_BxTxC
    xr, xw, xk, xv, xa, xg = (x_BxTxC + xx * act(param(f'x_{c}')) for c in 'rwkvag')

    r, k, v = act(self.receptance(xr)), act(self.key(xk)), act(self.value(xv))
    log_w = -MAX_DECAY_RATE * jax.nn.sigmoid(f32(param('w0')) + dot(jnp.tanh(dot(xw, self.w1)), self.w2))
    iclr = jax.nn.sigmoid(f32(param('a0')) + dot(dot(xa, self.a1), self.a2))
    g = act(dot(jax.nn.sigmoid(dot(xg, self.g1)), self.g2))

    heads = lambda y: y.reshape(B, T, H, N)
    kk = heads(f32(k) * f32(param('k_k')))
    kk = kk / jnp.maximum(jnp.linalg.norm(kk, axis=-1, keepdims=True), KK_EPS)
    k = act(f32(k) * (1.0 + (iclr - 1.0) * f32(param('k_a'))))
    if self.value_residual:
      mix = jax.nn.sigmoid(f32(param('v0')) + dot(dot(xv, self.v1), self.v2))
      v = act(f32(v) + (f32(v_first_BxTxC) - f32(v)) * mix)
    else:
      v_first_BxTxC = v

    # r, k, v, a, b enter the WKV kernel in the activations' dtype (bf16 halves its memory traffic);
    # the log decay and the state stay fp32.
    y_BxTxHxN, wkv_state = wkv7(heads(r), heads(log_w), heads(k), heads(v), act(-kk), act(kk * heads(iclr)),
                                wkv_state, doc_starts=doc_starts_BxM, implementation=implementation)
    bonus_BxTxHx1 = jnp.sum(f32(heads(r)) * f32(heads(k)) * f32(param('r_k')), axis=-1, keepdims=True)
    y = group_norm(y_BxTxHxN, self.ln_x) + (bonus_BxTxHx1 * f32(heads(v))).reshape(B, T, C)
    return self.output(y * g), f32(x_BxTxC[:, -1]), wkv_state, v_first_BxTxC


class ChannelMix(nnx.Module):

  def __init__(self, p: dict):
    self.x_k = nnx.Param(p['x_k'])
    self.key, self.value = Linear(p['key']['weight']), Linear(p['value']['weight'])

  def __call__(self, x_BxTxC, shift_BxC, doc_starts_BxM=None):
    act = lambda a: a.astype(x_BxTxC.dtype)
    xk = x_BxTxC + (token_shift(x_BxTxC, shift_BxC, doc_starts_BxM) - x_BxTxC) * act(self.x_k[...])
    k = jnp.square(jax.nn.relu(act(self.key(xk))))
    return act(self.value(k)), f32(x_BxTxC[:, -1])


def block(cfg, p: dict, layer: int) -> Block:
  return Block(p, TimeMix(cfg, p['att'], layer), ChannelMix(p['ffn']))
