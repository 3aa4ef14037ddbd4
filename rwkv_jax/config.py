"""Model configuration, read from a checkpoint's key names and shapes, never typed by hand."""
import dataclasses
import re

from rwkv_jax.errors import UserError

SUPPORTED = ('5', '6', '7')  # RWKV versions with a module in rwkv_jax/models


@dataclasses.dataclass(frozen=True)
class RWKVConfig:
  """Version and dimensions of an RWKV model, for every generation.

  lora: the inner widths of the generation's LoRA-style matrices as (name, width)
  pairs, in its order (x060: mix, decay — 32/64 for most sizes, 64/128 for 7B/14B).
  A tuple, not a dict, so that the config stays hashable (it is a static jit argument).
  """
  version: str
  n_layer: int
  n_embd: int
  head_size: int
  vocab_size: int
  dim_ffn: int
  lora: tuple[tuple[str, int], ...]

  def __post_init__(self):
    object.__setattr__(self, 'lora', tuple(tuple(pair) for pair in self.lora))  # JSON gives lists

  @property
  def n_head(self) -> int:
    return self.n_embd // self.head_size

  def lora_dim(self, name: str) -> int:
    return dict(self.lora)[name]

  @property
  def state_shape(self) -> tuple[int, int, int, int]:
    """Shape of all layers' WKV states, [L, H, V, K]."""
    return (self.n_layer, self.n_head, self.head_size, self.head_size)

  def describe(self) -> str:
    loras = f' lora {"/".join(str(d) for _, d in self.lora)}' if self.lora else ''
    return (f'RWKV-{self.version} L{self.n_layer} C{self.n_embd} H{self.n_head}x{self.head_size} '
            f'vocab {self.vocab_size} ffn {self.dim_ffn}{loras}')

  @classmethod
  def from_shapes(cls, shapes: dict[str, tuple[int, ...]], source: str = 'checkpoint') -> 'RWKVConfig':
    """Infers the config from `{key: shape}`; refuses what no module in rwkv_jax/models runs."""
    from rwkv_jax.models import generation  # pylint: disable=g-import-not-at-top
    if 'emb.weight' not in shapes or not any(k.startswith('blocks.') for k in shapes):
      raise UserError(f'{source} is not an RWKV checkpoint (no emb.weight / blocks.* keys; found {len(shapes)} keys)')
    version = detect_version(shapes)
    if version not in SUPPORTED:
      names = ', '.join(f'RWKV-{v} ({generation(v).NAME})' for v in SUPPORTED)
      raise UserError(f'{source} is an RWKV-{version} checkpoint; supported: {names}')
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r'blocks\.(\d+)\.', k))}
    n_layer = max(layers) + 1
    if layers != set(range(n_layer)):
      raise UserError(f'{source} is missing blocks {sorted(set(range(n_layer)) - layers)}: is the file truncated?')
    vocab_size, n_embd = shapes['emb.weight']
    try:
      dims = generation(version).dims_from_shapes(shapes)
    except KeyError as e:
      raise UserError(f'{source} lacks {e.args[0]}, a key every RWKV-{version} checkpoint has; is the file truncated?')
    except UserError as e:  # a generation's own refusal (e.g. an RWKV-7 variant): name the file
      raise UserError(f'{source}: {e}') from None
    return cls(version=version, n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, **dims)


def detect_version(shapes) -> str:
  """The version the key names say, as the rwkv package and web-rwkv tell them apart."""
  if any(k.endswith('att.r_k') for k in shapes):
    return '7'
  if any('att.time_maa' in k for k in shapes):
    return '6'
  if any(k.endswith('att.ln_x.weight') for k in shapes):
    return '5'
  return '4'
