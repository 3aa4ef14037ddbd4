"""Model configuration, read from a checkpoint's key names and shapes, never typed by hand."""
import dataclasses
import re

from rwkv_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class RWKVConfig:
  """Dimensions of an RWKV-6 (x060) model.

  dim_mix_lora / dim_decay_lora are the inner sizes of `time_maa_w1/w2` and
  `time_decay_w1/w2` (32/64 for most sizes, 64/128 for the 7B/14B files).
  """
  n_layer: int
  n_embd: int
  head_size: int
  vocab_size: int
  dim_ffn: int
  dim_mix_lora: int
  dim_decay_lora: int
  version: str = '6'

  @property
  def n_head(self) -> int:
    return self.n_embd // self.head_size

  @property
  def state_shape(self) -> tuple[int, int, int, int]:
    """Shape of all layers' WKV states, [L, H, V, K]."""
    return (self.n_layer, self.n_head, self.head_size, self.head_size)

  def describe(self) -> str:
    return (f'RWKV-{self.version} L{self.n_layer} C{self.n_embd} H{self.n_head}x{self.head_size} '
            f'vocab {self.vocab_size} ffn {self.dim_ffn} lora {self.dim_mix_lora}/{self.dim_decay_lora}')

  @classmethod
  def from_shapes(cls, shapes: dict[str, tuple[int, ...]], source: str = 'checkpoint') -> 'RWKVConfig':
    """Infers the config from `{key: shape}`; refuses anything that is not an RWKV-6 checkpoint."""
    if 'emb.weight' not in shapes or not any(k.startswith('blocks.') for k in shapes):
      raise UserError(f'{source} is not an RWKV checkpoint (no emb.weight / blocks.* keys; found {len(shapes)} keys)')
    version = detect_version(shapes)
    if version != '6':
      raise UserError(f'{source} is an RWKV-{version} checkpoint; only RWKV-6 (x060) is supported so far')
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r'blocks\.(\d+)\.', k))}
    n_layer = max(layers) + 1
    if layers != set(range(n_layer)):
      raise UserError(f'{source} is missing blocks {sorted(set(range(n_layer)) - layers)}: is the file truncated?')
    vocab_size, n_embd = shapes['emb.weight']
    n_head, head_size = shapes['blocks.0.att.time_faaaa']
    return cls(
        n_layer=n_layer, n_embd=n_embd, head_size=head_size, vocab_size=vocab_size,
        dim_ffn=shapes['blocks.0.ffn.key.weight'][0],
        dim_mix_lora=shapes['blocks.0.att.time_maa_w1'][1] // 5,
        dim_decay_lora=shapes['blocks.0.att.time_decay_w1'][1])


def detect_version(shapes) -> str:
  """The version the key names say, as the rwkv package and web-rwkv tell them apart."""
  if any(k.endswith('att.r_k') for k in shapes):
    return '7'
  if any('att.time_maa' in k for k in shapes):
    return '6'
  if any(k.endswith('att.ln_x.weight') for k in shapes):
    return '5'
  return '4'
