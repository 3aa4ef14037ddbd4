"""Loading and converting checkpoints: round trips are exact, bad files get one clear line."""
import re
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

import rwkv_jax
from rwkv_jax import checkpoint, synthetic
from rwkv_jax.config import RWKVConfig
from rwkv_jax.errors import UserError
from tests.conftest import assert_one_line_error


def run_cli(*args, cwd=None):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize('dtype', [ml_dtypes.bfloat16, np.float16, np.float32], ids=['bf16', 'fp16', 'fp32'])
def test_config_is_read_from_shapes(write_checkpoint, dtype):
  cfg = RWKVConfig(version='6', n_layer=3, n_embd=192, head_size=64, vocab_size=1000, dim_ffn=672,
                   lora=(('mix', 64), ('decay', 128)))
  model = rwkv_jax.load(write_checkpoint(cfg, dtype=dtype))
  assert model.cfg == cfg
  assert len(model.blocks) == 3
  assert all(b.att.key.weight.shape == (192, 192) for b in model.blocks)
  assert model.blocks[2].att.key.weight.dtype == dtype


@pytest.mark.parametrize('with_time_state', [False, True])
def test_to_flax_and_back_is_bit_exact(write_checkpoint, tmp_path, with_time_state):
  original = write_checkpoint(dtype=ml_dtypes.bfloat16, with_time_state=with_time_state)
  result = run_cli('-m', 'convert', 'to-flax', str(original), str(tmp_path / 'flax'))
  assert result.returncode == 0, result.stderr
  result = run_cli('-m', 'convert', 'to-pth', str(tmp_path / 'flax'), str(tmp_path / 'back.pth'))
  assert result.returncode == 0, result.stderr
  before, after = torch.load(original, weights_only=True), torch.load(tmp_path / 'back.pth', weights_only=True)
  assert list(before) == list(after)
  for key in before:
    assert before[key].dtype == after[key].dtype and before[key].shape == after[key].shape, key
    assert torch.equal(before[key].view(torch.int16), after[key].view(torch.int16)), key


def test_converted_directory_loads_like_the_pth(write_checkpoint, tmp_path):
  path = write_checkpoint()
  assert run_cli('-m', 'convert', 'to-flax', str(path), str(tmp_path / 'flax')).returncode == 0
  tokens = np.random.default_rng().integers(0, 65536, 9)
  from_pth, _ = rwkv_jax.load(path).forward(tokens)
  from_dir, _ = rwkv_jax.load(tmp_path / 'flax').forward(tokens)
  np.testing.assert_array_equal(from_pth, from_dir)


def _v4_like(tensors):
  """No time_maa / ln_x / r_k keys: what the version detection calls RWKV-4, which no module runs."""
  return {k: v for k, v in tensors.items() if 'time_maa' not in k and 'ln_x' not in k}


BAD_FILES = {
    'missing': (None, 'no such file'),
    'random_bytes': (lambda p, t: p.write_bytes(np.random.bytes(4096)), 'not a readable PyTorch checkpoint'),
    'truncated': (lambda p, t: (checkpoint.write_pth(p, t), p.write_bytes(p.read_bytes()[:20000])),
                  'not a readable PyTorch checkpoint'),
    'code_in_pickle': (lambda p, t: torch.save({'emb.weight': torch.zeros(2), 'x': print}, p), 'refusing to unpickle'),
    'not_rwkv': (lambda p, t: torch.save({'fc.weight': torch.zeros(2, 2)}, p), 'not an RWKV checkpoint'),
    'rwkv4': (lambda p, t: checkpoint.write_pth(p, _v4_like(t)), 'RWKV-4'),
    'missing_key': (lambda p, t: checkpoint.write_pth(p, {k: v for k, v in t.items() if 'ln_x.bias' not in k}),
                    'lacks'),
    'wrong_shape': (lambda p, t: checkpoint.write_pth(p, {**t, 'ln_out.bias': np.zeros(5, np.float32)}),
                    'ln_out.bias has shape (5,)'),
}


@pytest.mark.parametrize('case', BAD_FILES)
def test_bad_model_files_are_refused_in_one_line(tmp_path, case):
  make, message = BAD_FILES[case]
  path = tmp_path / 'model.pth'
  if make is not None:
    make(path, synthetic.random_checkpoint(synthetic.TINY, seed=1))
  with pytest.raises(UserError, match=re.escape(message)):
    rwkv_jax.load(path)
  result = run_cli('-m', 'convert', 'to-flax', str(path), str(tmp_path / 'out'))
  assert_one_line_error(result.returncode, result.stderr, message)


def test_state_files_are_checked_against_the_model(write_checkpoint, tmp_path):
  model = rwkv_jax.load(write_checkpoint())
  good = {f'blocks.{i}.att.time_state': torch.randn(2, 64, 64, dtype=torch.bfloat16) for i in range(2)}
  torch.save(good, tmp_path / 'good.pth')
  state = rwkv_jax.load_state(tmp_path / 'good.pth', model)
  np.testing.assert_array_equal(state.wkv[1, 0], good['blocks.1.att.time_state'].float().numpy())

  cases = {
      'three_layers': ({**good, 'blocks.2.att.time_state': good['blocks.0.att.time_state']}, 'trained on another base'),
      'extra_key': ({**good, 'emb.weight': torch.zeros(3)}, 'exactly'),
      'other_width': ({k: torch.zeros(4, 64, 64) for k in good}, 'trained on another base'),
      'not_square': ({k: torch.zeros(2, 64, 32) for k in good}, '[H, N, N]'),
  }
  for name, (tensors, message) in cases.items():
    torch.save(tensors, tmp_path / f'{name}.pth')
    with pytest.raises(UserError, match=re.escape(message)):
      rwkv_jax.load_state(tmp_path / f'{name}.pth', model)


def test_refuses_a_model_directory_that_is_not_one(tmp_path):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(UserError, match='not a converted model directory'):
    rwkv_jax.load(tmp_path / 'empty')


def test_a_damaged_converted_directory_is_refused_in_one_line(write_checkpoint, tmp_path):
  assert run_cli('-m', 'convert', 'to-flax', str(write_checkpoint()), str(tmp_path / 'flax')).returncode == 0
  for path in (tmp_path / 'flax' / checkpoint.PARAMS_DIR).rglob('*'):
    if path.is_file() and path.stat().st_size > 1000:  # the arrays' data files, not the small metadata
      path.write_bytes(path.read_bytes()[:100])
  with pytest.raises(UserError, match='damaged or incomplete'):
    rwkv_jax.load(tmp_path / 'flax')
