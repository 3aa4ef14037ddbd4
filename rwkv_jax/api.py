"""The small public API: load a model, run it, load a state file."""
import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax import checkpoint, model, state_io
from rwkv_jax.config import RWKVConfig
from rwkv_jax.model import State

_forward = jax.jit(model.forward, static_argnames=('cfg', 'implementation', 'remat'))


class Model:
  """An RWKV-6 model on the default device.

  `model.forward(tokens, state)` takes tokens `[T]` or `[B, T]` (list or array)
  and returns (logits `[T, V]` / `[B, T, V]`, state); pass the state back in to
  continue the sequence (RNN mode, one token or many per call).
  """

  def __init__(self, params: dict, cfg: RWKVConfig, implementation: str | None = None):
    # A merged (state-tuned) checkpoint carries its state; like the rwkv package, start from it.
    params, self.default_wkv = checkpoint.split_time_state(params)
    self.params = jax.tree.map(jnp.asarray, params)
    self.cfg = cfg
    self.implementation = implementation

  def init_state(self, batch_size: int = 1) -> State:
    state = model.zero_state(self.cfg, batch_size)
    if self.default_wkv is not None:
      state = state._replace(wkv=jnp.broadcast_to(self.default_wkv.astype(jnp.float32)[:, None], state.wkv.shape))
    return state

  def forward(self, tokens, state: State | None = None):
    tokens = jnp.asarray(np.asarray(tokens, np.int32))
    unbatched = tokens.ndim == 1
    tokens_BxT = tokens[None] if unbatched else tokens
    B = tokens_BxT.shape[0]
    if state is None:
      state = self.init_state(B)
    elif state.wkv.shape[1] != B:  # A batch-1 state (e.g. from load_state) starts every sequence.
      state = jax.tree.map(lambda s: jnp.broadcast_to(s, (s.shape[0], B, *s.shape[2:])), state)
    logits, state = _forward(self.params, self.cfg, tokens_BxT, state, implementation=self.implementation)
    return (logits[0] if unbatched else logits), state


def load(path, dtype=None, implementation: str | None = None) -> Model:
  """A `.pth` checkpoint or a directory written by `python -m convert to-flax`.

  dtype: cast the floating-point weights (e.g. jnp.float32); None keeps the file's.
  """
  params, cfg = checkpoint.load_params(path)
  if dtype is not None:
    params = jax.tree.map(lambda p: np.asarray(p).astype(dtype), params)
  return Model(params, cfg, implementation)


def load_state(path, model_: Model) -> State:
  """A state file as RWKV-PEFT writes it -> a batch-1 State (token shifts zero, as Runner does)."""
  wkv_LxHxVxK = state_io.read_state(path, model_.cfg)
  state = model.zero_state(model_.cfg, 1)
  return state._replace(wkv=jnp.asarray(wkv_LxHxVxK)[:, None])
