"""RWKV-5 (x052, "Eagle"; the `rwkv` package's v5.2): its checkpoint keys, its layers, its synthetic weights.

Per layer, time mix: token-shift mixes written x * mix + x_prev * (1 - mix) (the
other way round from x060/x070), r k v g from the mixed inputs, a static decay
exp(-exp(time_decay)) per head and channel, the bonus u = time_faaaa, the WKV
recurrence from the layer's state, GroupNorm per head, times silu(g), output.
Channel mix: sigmoid(receptance) * value(relu(key)^2) on the same kind of mixes.

The recurrence is WKV-6's with a decay that does not depend on the token, so it
runs on the WKV-6 kernels with time_decay broadcast over batch and time.

The package's GroupNorm has eps 64e-5 and no scaling of its input; RWKV-LM's
trainer divides the input by head_size_divisor 8 and uses eps 1e-5, which is the
same function (group_norm here is the package's form).
"""
import re

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import wkv6
from rwkv_jax.errors import UserError
from rwkv_jax.models.common import Block, LayerNorm, Linear, WKVState, f32, group_norm, token_shift

NAME = 'x052'
LORAS = ()  # x052 has no LoRA-style matrices: RWKVConfig.lora is empty
# Keys stored as [1, 1, C] in the file and as [C] in the model (time_decay and time_faaaa are [H, N]).
SQUEEZED = re.compile(r'time_mix_[kvrg]$')
# The projections rwkv_jax.quant quantizes, as RWKV-PEFT does in x060: (group, name) in every block.
QUANTIZED = (('att', 'receptance'), ('att', 'key'), ('att', 'value'), ('att', 'gate'), ('att', 'output'),
             ('ffn', 'key'), ('ffn', 'receptance'), ('ffn', 'value'))


def dims_from_shapes(shapes) -> dict:
  """RWKVConfig fields that this generation reads from the key shapes; refuses RWKV-5.0 and 5.1, which
  the `rwkv` package tells from 5.2 as done here: 5.0 has no gate, 5.1 one decay per head."""
  supported = f'only RWKV-5.2 ({NAME}) models are supported among RWKV-5'
  if 'blocks.0.att.gate.weight' not in shapes:
    raise UserError(f'an RWKV-5.0 (x050) checkpoint (no att.gate): {supported}')
  decay_shape = shapes['blocks.0.att.time_decay']
  if len(decay_shape) != 2 or decay_shape[1] == 1:
    raise UserError(f'an RWKV-5.1 (x051) checkpoint (att.time_decay {list(decay_shape)}, one decay per head): '
                    f'{supported}')
  return dict(head_size=decay_shape[1], dim_ffn=shapes['blocks.0.ffn.key.weight'][0], lora=())


def block_shapes(cfg, layer: int) -> dict[str, tuple[int, ...]]:
  """Every key of block `layer` (without the `blocks.{i}.` prefix) with its shape in the file."""
  del layer  # every x052 block has the same keys
  C, F, H, N = cfg.n_embd, cfg.dim_ffn, cfg.n_head, cfg.head_size
  shapes = {'ln1.weight': (C,), 'ln1.bias': (C,), 'ln2.weight': (C,), 'ln2.bias': (C,)}
  shapes.update({f'att.time_mix_{c}': (1, 1, C) for c in 'kvrg'})
  shapes.update({'att.time_decay': (H, N), 'att.time_faaaa': (H, N)})
  shapes.update({f'att.{m}.weight': (C, C) for m in ('receptance', 'key', 'value', 'gate', 'output')})
  shapes.update({
      'att.ln_x.weight': (C,), 'att.ln_x.bias': (C,),
      'ffn.time_mix_k': (1, 1, C), 'ffn.time_mix_r': (1, 1, C),
      'ffn.key.weight': (F, C), 'ffn.receptance.weight': (C, C), 'ffn.value.weight': (C, F)})
  return shapes


def optional_block_shapes(cfg, layer: int) -> dict[str, tuple[int, ...]]:
  """Keys a file may carry that the model does not use: none for x052."""
  del cfg, layer
  return {}


def random_tensor(leaf: str, shape, rng, init_decays: bool = False):
  """A random value for key `leaf` (without `blocks.{i}.`) that looks like a trained model's: mixes in
  [0, 1]; time_decay over [-6, 1], decays exp(-exp(time_decay)) from 0.9975 (weak) to 0.066 (strong);
  time_faaaa in [-1, 1]. init_decays: time_decay over [-6, -1], the span RWKV-LM starts x052 in.
  None for keys it has no rule for."""
  if 'time_mix_' in leaf:
    return rng.uniform(0.0, 1.0, shape)
  if leaf == 'att.time_decay':
    return rng.uniform(-6.0, -1.0 if init_decays else 1.0, shape)
  if leaf == 'att.time_faaaa':
    return rng.uniform(-1.0, 1.0, shape)
  return None


def mix(x_BxTxC, previous_BxTxC, mix_C):
  """x052's token shift: x * mix + x_prev * (1 - mix), in the activations' dtype."""
  mix_C = mix_C.astype(x_BxTxC.dtype)
  return x_BxTxC * mix_C + previous_BxTxC * (1 - mix_C)


class TimeMix(nnx.Module):

  def __init__(self, cfg, p: dict):
    self.cfg = cfg
    for name in ('time_decay', 'time_faaaa', *(f'time_mix_{c}' for c in 'kvrg')):
      setattr(self, name, nnx.Param(p[name]))
    for name in ('receptance', 'key', 'value', 'gate', 'output'):
      setattr(self, name, Linear(p[name]['weight']))
    self.ln_x = LayerNorm(p['ln_x'])
    self.time_state = WKVState(f32(jnp.asarray(p['time_state'])) if 'time_state' in p else
                               jnp.zeros((cfg.n_head, cfg.head_size, cfg.head_size), jnp.float32))

  def __call__(self, x_BxTxC, shift_BxC, wkv_state, carry, implementation, doc_starts_BxM=None):
    """Returns (output [B, T, C], new shift, new WKV state, carry: nothing to hand on in x052)."""
    B, T, C = x_BxTxC.shape
    H, N = self.cfg.n_head, self.cfg.head_size
    act = lambda a: a.astype(x_BxTxC.dtype)
    previous_BxTxC = token_shift(x_BxTxC, shift_BxC, doc_starts_BxM)
    xk, xv, xr, xg = (mix(x_BxTxC, previous_BxTxC, getattr(self, f'time_mix_{c}')[...]) for c in 'kvrg')

    # r, k, v enter the WKV kernel in the activations' dtype (bf16 halves its memory traffic);
    # the decay and the state stay fp32.
    heads = lambda y: act(y).reshape(B, T, H, N)
    r, k, v = heads(self.receptance(xr)), heads(self.key(xk)), heads(self.value(xv))
    g = jax.nn.silu(act(self.gate(xg)))
    w_BxTxHxN = jnp.broadcast_to(f32(self.time_decay[...]), (B, T, H, N))
    y_BxTxHxN, wkv_state = wkv6(r, k, v, w_BxTxHxN, f32(self.time_faaaa[...]), wkv_state,
                                doc_starts=doc_starts_BxM, implementation=implementation)
    return self.output(group_norm(y_BxTxHxN, self.ln_x) * g), f32(x_BxTxC[:, -1]), wkv_state, carry


class ChannelMix(nnx.Module):

  def __init__(self, p: dict):
    self.time_mix_k, self.time_mix_r = nnx.Param(p['time_mix_k']), nnx.Param(p['time_mix_r'])
    self.key, self.receptance, self.value = (Linear(p[m]['weight']) for m in ('key', 'receptance', 'value'))

  def __call__(self, x_BxTxC, shift_BxC, doc_starts_BxM=None):
    act = lambda a: a.astype(x_BxTxC.dtype)
    previous_BxTxC = token_shift(x_BxTxC, shift_BxC, doc_starts_BxM)
    xk = mix(x_BxTxC, previous_BxTxC, self.time_mix_k[...])
    xr = mix(x_BxTxC, previous_BxTxC, self.time_mix_r[...])
    k = jnp.square(jax.nn.relu(act(self.key(xk))))
    r = jax.nn.sigmoid(act(self.receptance(xr)))
    return r * act(self.value(k)), f32(x_BxTxC[:, -1])


def block(cfg, p: dict, layer: int) -> Block:
  del layer  # every x052 block is built alike
  return Block(p, TimeMix(cfg, p['att']), ChannelMix(p['ffn']))
