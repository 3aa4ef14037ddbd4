"""rwkv-jax: state tuning of RWKV language models in JAX."""
from rwkv_jax.api import cast, load, load_state
from rwkv_jax.config import RWKVConfig
from rwkv_jax.errors import UserError
from rwkv_jax.models import RWKV, State, WKVState

__all__ = ['RWKV', 'RWKVConfig', 'State', 'UserError', 'WKVState', 'cast', 'load', 'load_state']
