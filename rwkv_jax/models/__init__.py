"""The RWKV model in Flax NNX: one module file per generation (v6.py, ...), shared pieces in common.py."""
from rwkv_jax.models.common import State, WKVState
from rwkv_jax.models.rwkv import RWKV, generation, is_embedded

__all__ = ['RWKV', 'State', 'WKVState', 'generation', 'is_embedded']
