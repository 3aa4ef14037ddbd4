"""State files: exactly n_layer tensors `blocks.{i}.att.time_state` of shape [H, V, K].

This is what RWKV-PEFT writes and RWKV Runner mounts (value-major, usually bf16).
"""
import pathlib
import re

import ml_dtypes
import numpy as np

from rwkv_jax import checkpoint
from rwkv_jax.config import RWKVConfig
from rwkv_jax.errors import UserError

STATE_KEY = 'blocks.{}.att.time_state'


def state_from_tensors(tensors: dict[str, np.ndarray], source: str) -> np.ndarray:
  """`{blocks.i.att.time_state: [H, N, N]}` -> [L, H, V, K] fp32, checked the way Runner checks."""
  layers = sorted(int(m.group(1)) for k in tensors if (m := re.fullmatch(r'blocks\.(\d+)\.att\.time_state', k)))
  if not layers:
    raise UserError(f'{source} holds no blocks.*.att.time_state tensors: not a state file')
  if len(layers) != len(tensors) or layers != list(range(len(layers))):
    raise UserError(f'{source} must hold exactly blocks.0..{len(layers) - 1}.att.time_state and nothing else '
                    f'(found {len(tensors)} keys)')
  shapes = {tuple(tensors[STATE_KEY.format(i)].shape) for i in layers}
  if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[1] != next(iter(shapes))[2]:
    raise UserError(f'{source}: time_state tensors must all be [H, N, N]; found shapes {sorted(shapes)}')
  return np.stack([np.asarray(tensors[STATE_KEY.format(i)], np.float32) for i in layers])


def check_fits(state_LxHxVxK: np.ndarray, cfg: RWKVConfig, source: str) -> None:
  L, H, N, _ = state_LxHxVxK.shape
  if (L, H, N) != (cfg.n_layer, cfg.n_head, cfg.head_size):
    raise UserError(f'{source} is a state for {L} layers x {H} heads x {N} (width {H * N}); '
                    f'the model is {cfg.n_layer} layers x {cfg.n_head} heads x {cfg.head_size} '
                    f'(width {cfg.n_embd}): it was trained on another base model')


TRAIN_TREE_DIR = 'tree'  # Inside a trainer checkpoint directory: the orbax tree holding 'state'.


def read_train_checkpoint_state(directory) -> np.ndarray:
  """The trained state [L, H, V, K] from a trainer checkpoint directory (`proj_dir/checkpoint`)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  tree_dir = pathlib.Path(directory).absolute() / TRAIN_TREE_DIR
  if not tree_dir.is_dir():
    raise UserError(f'{directory} is neither a state .pth nor a trainer checkpoint directory (no {TRAIN_TREE_DIR}/)')
  with ocp.StandardCheckpointer() as checkpointer:
    return np.asarray(checkpointer.restore(tree_dir)['state'], np.float32)


def read_state(path, cfg: RWKVConfig | None = None) -> np.ndarray:
  """A Runner-style `.pth` state, or a trainer checkpoint directory -> [L, H, V, K] fp32.

  Refused in one line if it does not fit `cfg`.
  """
  if pathlib.Path(path).is_dir():
    state = read_train_checkpoint_state(path)
  else:
    state = state_from_tensors(checkpoint.read_pth(path), str(path))
  if cfg is not None:
    check_fits(state, cfg, str(path))
  return state


def state_tensors(state_LxHxVxK, dtype=ml_dtypes.bfloat16) -> dict[str, np.ndarray]:
  state = np.asarray(state_LxHxVxK, np.float32)
  return {STATE_KEY.format(i): state[i].astype(dtype) for i in range(state.shape[0])}


def write_state(path, state_LxHxVxK, dtype=ml_dtypes.bfloat16) -> None:
  """The Runner / RWKV-PEFT format: n_layer keys, [H, V, K], bf16 by default."""
  checkpoint.write_pth(path, state_tensors(state_LxHxVxK, dtype))
