"""Official RWKV `.pth` files <-> the Flax param pytree (and its orbax directory form).

The pytree follows the checkpoint's names: `emb`, `ln0`, `blocks` (a list of
per-layer dicts), `ln_out`, `head`. `[1, 1, C]` vectors are
squeezed to `[C]` and restored on the way back, so a round trip is bit-exact.
"""
import json
import os
import pathlib
import pickle
import re
import zipfile

import ml_dtypes
import numpy as np

from rwkv_jax.config import RWKVConfig
from rwkv_jax.errors import UserError

# Keys stored as [1, 1, C] in the file and as [C] in the pytree.
_SQUEEZED = re.compile(r'(time_maa_[a-z]|time_decay)$')
CONFIG_FILE = 'config.json'
PARAMS_DIR = 'params'


def _expected_block_shapes(cfg: RWKVConfig) -> dict[str, tuple[int, ...]]:
  C, F, H, N = cfg.n_embd, cfg.dim_ffn, cfg.n_head, cfg.head_size
  D, Dd = cfg.dim_mix_lora, cfg.dim_decay_lora
  shapes = {'ln1.weight': (C,), 'ln1.bias': (C,), 'ln2.weight': (C,), 'ln2.bias': (C,)}
  shapes.update({f'att.time_maa_{c}': (1, 1, C) for c in 'xwkvrg'})
  shapes.update({
      'att.time_maa_w1': (C, 5 * D), 'att.time_maa_w2': (5, D, C),
      'att.time_decay': (1, 1, C), 'att.time_decay_w1': (C, Dd), 'att.time_decay_w2': (Dd, C),
      'att.time_faaaa': (H, N)})
  shapes.update({f'att.{m}.weight': (C, C) for m in ('receptance', 'key', 'value', 'gate', 'output')})
  shapes.update({
      'att.ln_x.weight': (C,), 'att.ln_x.bias': (C,),
      'ffn.time_maa_k': (1, 1, C), 'ffn.time_maa_r': (1, 1, C),
      'ffn.key.weight': (F, C), 'ffn.receptance.weight': (C, C), 'ffn.value.weight': (C, F)})
  return shapes


def expected_shapes(cfg: RWKVConfig, with_time_state: bool = False) -> dict[str, tuple[int, ...]]:
  """Every key of an official x060 file with its shape, in the order the trainers write them."""
  C, V = cfg.n_embd, cfg.vocab_size
  shapes = {'emb.weight': (V, C), 'blocks.0.ln0.weight': (C,), 'blocks.0.ln0.bias': (C,)}
  block = _expected_block_shapes(cfg)
  if with_time_state:
    block['att.time_state'] = (cfg.n_head, cfg.head_size, cfg.head_size)
  for i in range(cfg.n_layer):
    shapes.update({f'blocks.{i}.{k}': s for k, s in block.items()})
  shapes.update({'ln_out.weight': (C,), 'ln_out.bias': (C,), 'head.weight': (V, C)})
  return shapes


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
  try:
    mmap = zipfile.is_zipfile(path)  # mmap needs the zip format; old pickles load without it.
    obj = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
  except pickle.UnpicklingError as e:
    if 'Unsupported global' in str(e):
      raise UserError(f'{path} holds Python code or objects, not just tensors; refusing to unpickle it') from e
    raise UserError(f'{path} is not a readable PyTorch checkpoint (truncated or another format)') from e
  except Exception as e:  # On garbage torch raises RuntimeError, EOFError, IndexError... alike.
    raise UserError(f'{path} is not a readable PyTorch checkpoint (truncated or another format): '
                    f'{str(e).splitlines()[0][:160]}') from e
  if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
    raise UserError(f'{path} is not a flat {{name: tensor}} checkpoint')
  return {k: _to_numpy(v) for k, v in obj.items()}


def write_pth(path, tensors: dict[str, np.ndarray]) -> None:
  """torch.save to a temporary name, then rename: a kill never leaves half a file."""
  import torch  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  torch.save({k: _to_torch(v) for k, v in tensors.items()}, tmp)
  os.replace(tmp, path)


def check_shapes(tensors: dict[str, np.ndarray], source: str) -> RWKVConfig:
  """Infers the config and checks every key and shape against it."""
  cfg = RWKVConfig.from_shapes({k: tuple(v.shape) for k, v in tensors.items()}, source)
  has_state = any(k.endswith('.att.time_state') for k in tensors)
  expected = expected_shapes(cfg, with_time_state=has_state)
  missing = [k for k in expected if k not in tensors]
  if missing:
    raise UserError(f'{source} lacks {len(missing)} RWKV-6 keys (first: {missing[0]}); is the file truncated?')
  unknown = [k for k in tensors if k not in expected]
  if unknown:
    raise UserError(f'{source} has keys an RWKV-6 x060 model does not (first: {unknown[0]})')
  for k, shape in expected.items():
    if tuple(tensors[k].shape) != shape:
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
  """The param pytree with `leaf_fn(checkpoint key, shape in the tree)` at every leaf.

  Globals sit at the top (`emb`, `ln0`, `ln_out`, `head`); `blocks` is a list of
  per-layer dicts, so that every layer's matrices are arrays of their own that
  the model's products read in place. [1, 1, C] vectors become [C].
  """
  params = {'blocks': [{} for _ in range(cfg.n_layer)]}
  for key, shape in expected_shapes(cfg, with_time_state).items():
    path, layer = _tree_path(key)
    shape = (shape[-1],) if _SQUEEZED.search(key) else shape
    _set(params if layer is None else params['blocks'][layer], path, leaf_fn(key, shape))
  return params


def params_from_tensors(tensors: dict[str, np.ndarray], cfg: RWKVConfig) -> dict:
  """Flat checkpoint dict (checked by check_shapes) -> the param pytree of build_params."""
  return build_params(cfg, lambda key, shape: tensors[key].reshape(shape),
                      with_time_state='blocks.0.att.time_state' in tensors)


def abstract_params(cfg: RWKVConfig, dtype) -> dict:
  """The param pytree as `jax.ShapeDtypeStruct`s: for compiling or initializing without a file."""
  import jax  # pylint: disable=g-import-not-at-top
  return build_params(cfg, lambda key, shape: jax.ShapeDtypeStruct(shape, dtype))


def tensors_from_params(params: dict, cfg: RWKVConfig) -> dict[str, np.ndarray]:
  """The inverse of `params_from_tensors`, keys in the official order."""
  flat = _flatten({k: v for k, v in params.items() if k != 'blocks'})
  layers = [_flatten(block) for block in params['blocks']]
  tensors = {}
  for key, shape in expected_shapes(cfg, with_time_state='att.time_state' in layers[0]).items():
    path, layer = _tree_path(key)
    tensors[key] = np.asarray(flat[path] if layer is None else layers[layer][path]).reshape(shape)
  return tensors


def split_time_state(params: dict) -> tuple[dict, np.ndarray | None]:
  """(params without `att.time_state`, the [L, H, V, K] states a merged checkpoint carries, or None)."""
  if 'time_state' not in params['blocks'][0]['att']:
    return params, None
  blocks = [{**b, 'att': {k: v for k, v in b['att'].items() if k != 'time_state'}} for b in params['blocks']]
  return {**params, 'blocks': blocks}, np.stack([np.asarray(b['att']['time_state']) for b in params['blocks']])


def save_flax(directory, params: dict, cfg: RWKVConfig) -> None:
  """Writes `params/` (orbax) and `config.json` into `directory`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / PARAMS_DIR, params, force=True)
  tmp = directory / (CONFIG_FILE + '.tmp')
  tmp.write_text(json.dumps({'format': 'rwkv-jax', **vars(cfg)}, indent=2))
  os.replace(tmp, directory / CONFIG_FILE)


def load_flax(directory) -> tuple[dict, RWKVConfig]:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory).absolute()
  config_path = directory / CONFIG_FILE
  if not config_path.is_file() or not (directory / PARAMS_DIR).is_dir():
    raise UserError(f'{directory} is not a converted model directory (expected {CONFIG_FILE} and {PARAMS_DIR}/); '
                    'make one with `python -m convert to-flax MODEL.pth DIR`')
  fields = json.loads(config_path.read_text())
  fields.pop('format', None)
  cfg = RWKVConfig(**fields)
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(directory / PARAMS_DIR)
  return params, cfg


def load_params(path) -> tuple[dict, RWKVConfig]:
  """A `.pth` file or a converted directory -> (numpy/jax param pytree, config)."""
  path = pathlib.Path(path)
  if path.is_dir():
    return load_flax(path)
  tensors = read_pth(path)
  cfg = check_shapes(tensors, str(path))
  return params_from_tensors(tensors, cfg), cfg
