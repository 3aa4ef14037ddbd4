"""Official RWKV `.pth` files <-> the param tree <-> the NNX model (and its orbax directory form).

The pytree follows the checkpoint's names: `emb`, `ln0`, `blocks` (a list of
per-layer dicts), `ln_out`, `head`. `[1, 1, C]` vectors are
squeezed to `[C]` and restored on the way back, so a round trip is bit-exact.
"""
import dataclasses
import json
import os
import pathlib
import pickle
import re
import zipfile

import jax
import ml_dtypes
import numpy as np

from rwkv_jax import run_dir
from rwkv_jax.config import RWKVConfig
from rwkv_jax.errors import UserError

CONFIG_FILE = 'config.json'
PARAMS_DIR = 'params'
FLAX_FORMAT = 'rwkv-jax-nnx'


def expected_shapes(cfg: RWKVConfig, with_time_state: bool = False) -> dict[str, tuple[int, ...]]:
  """Every key of an official checkpoint of this version with its shape, in the order the trainers
  write them (keys a file may add unused, e.g. x070 block 0's v0/v1/v2, are not listed)."""
  from rwkv_jax.models import generation  # pylint: disable=g-import-not-at-top
  gen = generation(cfg.version)
  C, V = cfg.n_embd, cfg.vocab_size
  shapes = {'emb.weight': (V, C), 'blocks.0.ln0.weight': (C,), 'blocks.0.ln0.bias': (C,)}
  for i in range(cfg.n_layer):
    block = gen.block_shapes(cfg, i)
    if with_time_state:
      block['att.time_state'] = (cfg.n_head, cfg.head_size, cfg.head_size)
    shapes.update({f'blocks.{i}.{k}': s for k, s in block.items()})
  shapes.update({'ln_out.weight': (C,), 'ln_out.bias': (C,), 'head.weight': (V, C)})
  return shapes


def optional_shapes(cfg: RWKVConfig) -> dict[str, tuple[int, ...]]:
  """Keys a file of this version may carry that the model does not use."""
  from rwkv_jax.models import generation  # pylint: disable=g-import-not-at-top
  gen = generation(cfg.version)
  return {f'blocks.{i}.{k}': s for i in range(cfg.n_layer) for k, s in gen.optional_block_shapes(cfg, i).items()}


def _to_numpy(tensor) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  tensor = tensor.detach().cpu().contiguous()
  if tensor.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits.
    return tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def _to_torch(array: np.ndarray):
  import torch  # pylint: disable=g-import-not-at-top
  array = np.ascontiguousarray(array)
  if array.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
  return torch.from_numpy(array)


def read_pth(path) -> dict[str, np.ndarray]:
  """Loads a flat `{name: tensor}` .pth safely (weights_only: no code is unpickled)."""
  import torch  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f'{path}: no such file')
  if path.stat().st_size == 0:
    raise UserError(f'{path} is empty (0 bytes): an interrupted download or copy? fetch or write it again')
  damaged = f'{path} is not a readable PyTorch checkpoint (truncated or damaged); download or write it again'
  try:
    mmap = zipfile.is_zipfile(path)  # mmap needs the zip format; old pickles load without it.
    obj = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
  except pickle.UnpicklingError as e:
    if 'Unsupported global' in str(e):
      raise UserError(f'{path} holds Python code or objects, not just tensors; refusing to unpickle it') from e
    raise UserError(damaged) from e
  except PermissionError:
    raise  # the CLI names the path and the reason
  except Exception as e:  # On garbage torch raises RuntimeError, EOFError, OSError, IndexError... alike.
    raise UserError(damaged) from e
  if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
    raise UserError(f'{path} is not a flat {{name: tensor}} checkpoint')
  return {k: _to_numpy(v) for k, v in obj.items()}


def write_pth(path, tensors: dict[str, np.ndarray]) -> None:
  """torch.save under a temporary name, then rename: a kill never leaves half a file, a failed
  write ends in one line and leaves what was there.

  torch.save is given a Python file so that a failed write keeps its OSError (torch's own
  message for it is "unexpected pos"): run_dir finds it in the exception's chain.
  """
  import torch  # pylint: disable=g-import-not-at-top
  with run_dir.replacing(path) as tmp:
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, 'wb') as f:
      torch.save({k: _to_torch(v) for k, v in tensors.items()}, f)


def check_shapes(tensors: dict[str, np.ndarray], source: str) -> RWKVConfig:
  """Infers the config and checks every key and shape against it."""
  cfg = RWKVConfig.from_shapes({k: tuple(v.shape) for k, v in tensors.items()}, source)
  has_state = any(k.endswith('.att.time_state') for k in tensors)
  expected = {**expected_shapes(cfg, with_time_state=has_state), **optional_shapes(cfg)}
  name = f'RWKV-{cfg.version}'
  missing = [k for k in expected_shapes(cfg, with_time_state=has_state) if k not in tensors]
  if missing:
    raise UserError(f'{source} lacks {len(missing)} {name} keys (first: {missing[0]}); is the file truncated?')
  unknown = [k for k in tensors if k not in expected]
  if unknown:
    raise UserError(f'{source} has keys an {name} model does not (first: {unknown[0]})')
  for k, shape in expected.items():
    if k in tensors and tuple(tensors[k].shape) != shape:
      raise UserError(f'{source}: {k} has shape {tuple(tensors[k].shape)}, expected {shape} for {cfg.describe()}')
  return cfg


def _set(tree: dict, dotted: str, value) -> None:
  *parents, leaf = dotted.split('.')
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      flat.update(_flatten(v, f'{prefix}{k}.'))
    else:
      flat[f'{prefix}{k}'] = v
  return flat


def _tree_path(key: str) -> tuple[str, int | None]:
  """'blocks.3.att.key.weight' -> ('att.key.weight', 3); block 0's ln0 and globals have no layer."""
  if m := re.match(r'blocks\.(\d+)\.(.*)$', key):
    layer, name = int(m.group(1)), m.group(2)
    return (name, None) if name.startswith('ln0.') else (name, layer)
  return key, None


def build_params(cfg: RWKVConfig, leaf_fn, with_time_state: bool = False) -> dict:
  """The param tree with `leaf_fn(checkpoint key, shape in the tree)` at every leaf.

  Globals sit at the top (`emb`, `ln0`, `ln_out`, `head`); `blocks` is a list of
  per-layer dicts, so that every layer's matrices are arrays of their own that
  the model's products read in place. [1, 1, C] vectors become [C].
  """
  from rwkv_jax.models import generation  # pylint: disable=g-import-not-at-top
  squeezed = generation(cfg.version).SQUEEZED
  params = {'blocks': [{} for _ in range(cfg.n_layer)]}
  for key, shape in expected_shapes(cfg, with_time_state).items():
    path, layer = _tree_path(key)
    shape = (shape[-1],) if squeezed.search(key) else shape
    _set(params if layer is None else params['blocks'][layer], path, leaf_fn(key, shape))
  return params


def params_from_tensors(tensors: dict[str, np.ndarray], cfg: RWKVConfig) -> dict:
  """Flat checkpoint dict (checked by check_shapes) -> the param tree of build_params."""
  return build_params(cfg, lambda key, shape: tensors[key].reshape(shape),
                      with_time_state='blocks.0.att.time_state' in tensors)


def tensors_from_params(params: dict, cfg: RWKVConfig) -> dict[str, np.ndarray]:
  """The inverse of `params_from_tensors`, keys in the official order."""
  flat = _flatten({k: v for k, v in params.items() if k != 'blocks'})
  layers = [_flatten(block) for block in params['blocks']]
  tensors = {}
  for key, shape in expected_shapes(cfg, with_time_state='att.time_state' in layers[0]).items():
    path, layer = _tree_path(key)
    tensors[key] = np.asarray(flat[path] if layer is None else layers[layer][path]).reshape(shape)
  return tensors


def model_params(model) -> dict:
  """An RWKV model's weights as the param tree of build_params (numpy), with `att.time_state`
  in the weights' dtype if the model was built from a merged checkpoint."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from rwkv_jax.models import WKVState  # pylint: disable=g-import-not-at-top
  tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if model.merged_state:
    states = nnx.to_pure_dict(nnx.state(model, WKVState))
    for i, block in states['blocks'].items():
      tree['blocks'][i]['att']['time_state'] = np.asarray(block['att']['time_state']).astype(model.dtype)
  tree['blocks'] = [tree['blocks'][i] for i in range(len(tree['blocks']))]
  return jax.tree.map(np.asarray, tree)


def save_flax(directory, model) -> None:
  """Writes the model's NNX state (`params/`, orbax) and `config.json` into `directory`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / PARAMS_DIR, nnx.to_pure_dict(nnx.state(model)), force=True)
  tmp = directory / (CONFIG_FILE + '.tmp')
  config = {'format': FLAX_FORMAT, 'merged_state': model.merged_state, 'config': dataclasses.asdict(model.cfg)}
  tmp.write_text(json.dumps(config, indent=2))
  os.replace(tmp, directory / CONFIG_FILE)


def load_flax(directory, implementation=None):
  """A directory written by save_flax -> the RWKV model: orbax restores the saved state as it was
  written (dtypes included), it replaces the abstract model's, then nnx.merge."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from rwkv_jax.models import RWKV  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory).absolute()
  config_path = directory / CONFIG_FILE
  if not config_path.is_file() or not (directory / PARAMS_DIR).is_dir():
    raise UserError(f'{directory} is not a converted model directory (expected {CONFIG_FILE} and {PARAMS_DIR}/); '
                    'make one with `python -m convert to-flax MODEL.pth DIR`')
  fields = json.loads(config_path.read_text())
  if fields.get('format') != FLAX_FORMAT:
    raise UserError(f'{directory} was converted by an older rwkv-jax; convert the .pth again with '
                    '`python -m convert to-flax MODEL.pth DIR`')
  cfg = RWKVConfig(**fields['config'])
  abstract = nnx.eval_shape(lambda p: RWKV(cfg, p, implementation), abstract_params(cfg, fields['merged_state']))
  graphdef, state = nnx.split(abstract)
  try:
    with run_dir.orbax_errors_unlogged(), ocp.StandardCheckpointer() as checkpointer:
      nnx.replace_by_pure_dict(state, checkpointer.restore(directory / PARAMS_DIR))  # the saved dtypes
  except Exception as e:  # orbax and tensorstore raise many types for a damaged or partial directory
    raise UserError(f'{directory / PARAMS_DIR} is damaged or incomplete ({type(e).__name__}); convert the .pth '
                    'again with `python -m convert to-flax MODEL.pth DIR`') from e
  return nnx.merge(graphdef, state)


def abstract_params(cfg: RWKVConfig, with_time_state: bool = False, dtype=np.float32) -> dict:
  """The param tree as `jax.ShapeDtypeStruct`s: for building a model without a file."""
  return build_params(cfg, lambda key, shape: jax.ShapeDtypeStruct(shape, dtype), with_time_state)


def load_model(path, implementation=None):
  """A `.pth` file or a converted directory -> the RWKV model (weights in the file's dtype)."""
  from rwkv_jax.models import RWKV  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if path.is_dir():
    return load_flax(path, implementation)
  tensors = read_pth(path)
  cfg = check_shapes(tensors, str(path))
  return RWKV(cfg, params_from_tensors(tensors, cfg), implementation)
