"""Random RWKV checkpoints in the official key layout, for tests, the demo and benchmarks.

No model can be downloaded here, so everything is checked on these. Values are
drawn to look like a trained model's: norms near 1, weights scaled by
1/sqrt(fan_in); each generation draws its own mixes, decays and LoRAs
(rwkv_jax.models.v6.random_tensor, ...).
"""
import numpy as np

from rwkv_jax.checkpoint import expected_shapes
from rwkv_jax.config import RWKVConfig

# A model small enough for CPU tests and the demo, with the World vocabulary.
TINY = RWKVConfig(version='6', n_layer=2, n_embd=128, head_size=64, vocab_size=65536, dim_ffn=448,
                  lora=(('mix', 32), ('decay', 64)))


def random_tensor(cfg: RWKVConfig, name: str, shape, rng, init_decays: bool = False) -> np.ndarray:
  """One tensor of checkpoint key `name`. rng: numpy's Generator, or anything with its `normal`
  and `uniform` (bench/train_step.py draws on the GPU). init_decays: see the generation's rules."""
  from rwkv_jax.models import generation  # pylint: disable=g-import-not-at-top
  normal = lambda scale: rng.normal(0.0, scale, shape)
  leaf = name.split('.', 2)[-1] if name.startswith('blocks.') else name
  own = generation(cfg.version).random_tensor(leaf, shape, rng, init_decays)
  if own is not None:
    return own
  if leaf.endswith(('ln0.weight', 'ln1.weight', 'ln2.weight', 'ln_x.weight', 'ln_out.weight')):
    return 1.0 + normal(0.1)
  if leaf.endswith('.bias'):
    return normal(0.1)
  if leaf == 'att.time_state':
    return normal(0.5)
  if leaf == 'emb.weight':
    return normal(1.0)
  return normal(1.0 / np.sqrt(shape[-1]))  # [out, in] linear weights


def random_checkpoint(cfg: RWKVConfig = TINY, seed: int = 0, dtype=np.float32,
                      with_time_state: bool = False) -> dict[str, np.ndarray]:
  """`{key: array}` exactly as an official `.pth` of cfg's version holds it."""
  rng = np.random.default_rng(seed)
  return {name: np.asarray(random_tensor(cfg, name, shape, rng)).astype(np.float32).astype(dtype)
          for name, shape in expected_shapes(cfg, with_time_state).items()}
