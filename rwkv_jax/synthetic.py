"""Random RWKV-6 checkpoints in the official key layout, for tests, the demo and benchmarks.

No model can be downloaded here, so everything is checked on these. Values are
drawn to look like a trained model's: norms near 1, mixes in [0, 1], time_decay
spread over [-6, 1], weights scaled by 1/sqrt(fan_in).
"""
import numpy as np

from rwkv_jax.checkpoint import expected_shapes
from rwkv_jax.config import RWKVConfig

# A model small enough for CPU tests and the demo, with the World vocabulary.
TINY = RWKVConfig(n_layer=2, n_embd=128, head_size=64, vocab_size=65536, dim_ffn=448,
                  dim_mix_lora=32, dim_decay_lora=64)


def random_tensor(name: str, shape, rng: np.random.Generator, init_decays: bool = False) -> np.ndarray:
  """One tensor. init_decays: time_decay over [-6, -1] and the decay LoRA's output near zero, as
  RWKV-6 initialises them, instead of the default spread (steeper: w up to ~4)."""
  normal = lambda scale: rng.normal(0.0, scale, shape)
  leaf = name.split('.', 2)[-1] if name.startswith('blocks.') else name
  if init_decays and leaf in ('att.time_decay', 'att.time_decay_w2'):
    return rng.uniform(-6.0, -1.0, shape) if leaf == 'att.time_decay' else rng.uniform(-0.01, 0.01, shape)
  if leaf.endswith(('ln0.weight', 'ln1.weight', 'ln2.weight', 'ln_x.weight', 'ln_out.weight')):
    return 1.0 + normal(0.1)
  if leaf.endswith('.bias'):
    return normal(0.1)
  if leaf.endswith(('time_maa_w1', 'time_maa_w2', 'time_decay_w1', 'time_decay_w2')):
    return normal(1.0 / np.sqrt(shape[-2]))
  if 'time_maa_' in leaf:
    return rng.uniform(0.0, 1.0, shape)
  if leaf == 'att.time_decay':
    return rng.uniform(-6.0, 1.0, shape)
  if leaf == 'att.time_faaaa':
    return rng.uniform(-1.0, 1.0, shape)
  if leaf == 'att.time_state':
    return normal(0.5)
  if leaf == 'emb.weight':
    return normal(1.0)
  return normal(1.0 / np.sqrt(shape[-1]))  # [out, in] linear weights


def random_checkpoint(cfg: RWKVConfig = TINY, seed: int = 0, dtype=np.float32,
                      with_time_state: bool = False) -> dict[str, np.ndarray]:
  """`{key: array}` exactly as an official x060 `.pth` holds it."""
  rng = np.random.default_rng(seed)
  return {name: random_tensor(name, shape, rng).astype(np.float32).astype(dtype)
          for name, shape in expected_shapes(cfg, with_time_state).items()}
