"""State files: exactly n_layer tensors `blocks.{i}.att.time_state` of shape [H, V, K].

This is what RWKV-PEFT writes and RWKV Runner mounts (value-major, usually bf16). Ai00 and
web-rwkv take the same keys as float16 safetensors with the last two axes transposed ([H, K, V]);
`read_state` tells the two apart by content (safetensors or a torch pickle), not by extension.
"""
import dataclasses
import pathlib
import re

import ml_dtypes
import numpy as np

from rwkv_jax import checkpoint, run_dir
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


TRAIN_STATE_FILE = 'state.npy'  # In a trainer checkpoint directory: the fp32 master state [L, H, V, K].


def read_train_checkpoint_state(directory) -> np.ndarray:
  """The trained state [L, H, V, K] from a trainer checkpoint directory (`proj_dir/checkpoint`).

  A plain .npy beside the orbax tree, so reading it needs no device layout (a run on several
  GPUs saves a sharded tree that a one-device process could not restore as it is).
  """
  path = pathlib.Path(directory) / TRAIN_STATE_FILE
  if not path.is_file():
    raise UserError(f'{directory} is neither a state .pth nor a trainer checkpoint directory (no {TRAIN_STATE_FILE})')
  damaged = f'{path} is truncated or damaged; use the last rwkv-N.pth of the run instead'
  try:
    state = np.load(path, allow_pickle=False)
  except (ValueError, EOFError) as e:  # what numpy raises for a cut or garbled .npy
    raise UserError(damaged) from e
  if state.ndim != 4 or state.dtype != np.float32:
    raise UserError(damaged)
  return state


def read_state(path, cfg: RWKVConfig | None = None) -> np.ndarray:
  """A Runner `.pth` state, an Ai00 safetensors state or a trainer checkpoint dir -> [L, H, V, K] fp32.

  Refused in one line if it does not fit `cfg`.
  """
  state = open_state(path).state_LxHxVxK
  if cfg is not None:
    check_fits(state, cfg, str(path))
  return state


def state_tensors(state_LxHxVxK, dtype=ml_dtypes.bfloat16) -> dict[str, np.ndarray]:
  state = np.asarray(state_LxHxVxK, np.float32)
  return {STATE_KEY.format(i): state[i].astype(dtype) for i in range(state.shape[0])}


def write_state(path, state_LxHxVxK, dtype=ml_dtypes.bfloat16) -> None:
  """The Runner / RWKV-PEFT format: n_layer keys, [H, V, K], bf16 by default."""
  checkpoint.write_pth(path, state_tensors(state_LxHxVxK, dtype))


# ---------------------------------------------------------------------------------------------
# Ai00 / web-rwkv: safetensors, float16, the last two axes transposed ([H, K, V]).

AI00_METADATA = {'format': 'pt'}  # what the official converter writes; web-rwkv ignores it
_SAFETENSORS_HEADER_MAX = 100 << 20  # a state header is tiny; a bigger length is not safetensors


def is_safetensors(path) -> bool:
  """True if `path` starts like a safetensors file (u64 header length, then a JSON object)."""
  with open(path, 'rb') as f:
    head = f.read(9)
  return (len(head) == 9 and 0 < int.from_bytes(head[:8], 'little') < _SAFETENSORS_HEADER_MAX
          and head[8:9] == b'{')


def ai00_tensors(state_LxHxVxK) -> dict[str, np.ndarray]:
  # Contiguous: safetensors 0.8's numpy save_file writes a transposed view's memory as it lies.
  state_LxHxKxV = np.ascontiguousarray(np.swapaxes(np.asarray(state_LxHxVxK, np.float32), -1, -2))
  return state_tensors(state_LxHxKxV, np.float16)


def write_ai00_state(path, state_LxHxVxK) -> None:
  """The `.state`/`.st` file Ai00 mounts: per layer float16 [H, K, V]; temp name, then rename.

  Serialized with safetensors' public `save` and written by Python, so that the file gets the
  mode every other file gets (0644 under the usual umask; safetensors' own writer makes 0600).
  The low-level serialize_file that the official convert_safetensors.py calls breaks with
  safetensors 0.8.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  contents = safetensors.numpy.save(ai00_tensors(state_LxHxVxK), metadata=AI00_METADATA)
  with run_dir.replacing(path) as tmp:
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(contents)


def read_safetensors(path) -> dict[str, np.ndarray]:
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  try:
    return safetensors.numpy.load_file(str(path))
  except PermissionError:
    raise  # the CLI names the path and the reason
  except Exception as e:  # SafetensorError, or a dtype numpy cannot hold
    raise UserError(f'{path} is truncated or damaged (not a complete safetensors file); export it again') from e


# ---------------------------------------------------------------------------------------------
# Any state file, with what it was stored as.

FORMAT_NOTES = {
    'runner': '.pth, [H, V, K] value-major (RWKV-PEFT / Runner / the rwkv package)',
    'ai00': 'safetensors, [H, K, V] key-major (Ai00 / web-rwkv)',
    'trainer': 'rwkv-jax trainer checkpoint, fp32 master copy, [L, H, V, K]',
}


@dataclasses.dataclass(frozen=True)
class StateFile:
  """A state as read from disk: the values in the canonical layout, and how they were stored."""
  state_LxHxVxK: np.ndarray  # fp32
  format: str  # a key of FORMAT_NOTES
  dtype: str  # as stored, e.g. 'bfloat16'


def open_state(path) -> StateFile:
  """A Runner `.pth`, an Ai00 safetensors file or a trainer checkpoint directory, unchecked."""
  path = pathlib.Path(path)
  if path.is_dir():
    return StateFile(read_train_checkpoint_state(path), 'trainer', 'float32')
  if not path.is_file():
    raise UserError(f'{path}: no such file or directory')
  if is_safetensors(path):
    tensors, layout = read_safetensors(path), 'ai00'
  else:
    tensors, layout = checkpoint.read_pth(path), 'runner'
  state = state_from_tensors(tensors, str(path))
  if layout == 'ai00':
    state = np.swapaxes(state, -1, -2)
  return StateFile(state, layout, str(next(iter(tensors.values())).dtype))
