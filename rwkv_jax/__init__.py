"""rwkv-jax: state tuning of RWKV language models in JAX."""
from rwkv_jax.api import Model, load, load_state
from rwkv_jax.config import RWKVConfig
from rwkv_jax.errors import UserError
from rwkv_jax.model import State

__all__ = ['Model', 'RWKVConfig', 'State', 'UserError', 'load', 'load_state']
