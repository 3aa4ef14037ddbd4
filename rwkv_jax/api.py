"""The small public API: load a model, cast it, load a state file."""
import jax
import numpy as np
from flax import nnx

from rwkv_jax import checkpoint, quant, state_io
from rwkv_jax.models import RWKV, State
from rwkv_jax.models.common import initial_state


def load(path, dtype=None, implementation: str | None = None) -> RWKV:
  """A `.pth` checkpoint or a directory written by `python -m convert to-flax` -> the NNX model.

  dtype: cast the floating-point weights (e.g. jnp.float32); None keeps the file's.
  implementation: the WKV kernel (see pallas_kernels); None picks the platform's fastest.
  """
  model = checkpoint.load_model(path, implementation)
  return model if dtype is None else cast(model, dtype)


def cast(model: RWKV, dtype) -> RWKV:
  """Casts the weights (nnx.Param) to `dtype` in place; the WKV states stay fp32. Returns the model."""
  weights = nnx.state(model, nnx.Param)
  cast_array = lambda w: w if quant.is_quantized(w) else np.asarray(w).astype(dtype)
  nnx.update(model, jax.tree.map(cast_array, weights, is_leaf=quant.is_quantized))
  return model


def load_state(path, model: RWKV) -> State:
  """A state file as RWKV-PEFT writes it -> a batch-1 State (token shifts zero, as Runner does)."""
  return initial_state(state_io.read_state(path, model.cfg), model.cfg.n_embd, batch_size=1)
