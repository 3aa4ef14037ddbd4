"""Exported states load the way RWKV Runner, Ai00 and the `rwkv` package load them.

Runner and the package are emulated exactly: Runner mounts a `.pth` state as the package's state
list [zeros(C), time_state[i].transpose(1, 2).float(), zeros(C)] per layer, and the package
starts a merged v6 model from its time_state. Ai00 (Rust/WebGPU) cannot run here, so its file is
checked against the layout web-rwkv reads: float16 [H, K, V].
"""
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch

import rwkv_jax
from convert.__main__ import main as convert_main
from rwkv_jax import checkpoint, cli, state_io, synthetic
from rwkv_jax.config import RWKVConfig
from tests.conftest import assert_one_line_error, rwkv_package_model

TOLERANCE = 2e-4  # of the largest logit, fp32 model
CFG = synthetic.TINY
KEY = state_io.STATE_KEY


def random_state(cfg=CFG, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).normal(0.0, 0.5, cfg.state_shape).astype(np.float32)


def relative_error(ours, reference) -> float:
  ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """A tiny fp32 model, a trained-looking state (bf16, as RWKV-PEFT writes it) and its exports."""
  root = tmp_path_factory.mktemp('interop')
  paths = {name: root / name for name in ('model.pth', 'rwkv-0.pth', 'runner.pth', 'ai00.state',
                                          'fp32.pth', 'merged.pth')}
  checkpoint.write_pth(paths['model.pth'], synthetic.random_checkpoint(CFG, seed=1))
  state_io.write_state(paths['rwkv-0.pth'], random_state())
  for fmt, out in (('runner', 'runner.pth'), ('ai00', 'ai00.state'), ('pth-fp32', 'fp32.pth')):
    convert_main(['export-state', str(paths['rwkv-0.pth']), '--format', fmt, '--out', str(paths[out]),
                  '--ckpt', str(paths['model.pth'])])
  convert_main(['merge', '--ckpt', str(paths['model.pth']), '--state', str(paths['rwkv-0.pth']),
                '--out', str(paths['merged.pth'])])
  return paths


@pytest.fixture(scope='module')
def tokens():
  return np.random.default_rng(7).integers(1, CFG.vocab_size, 23).tolist()


def runner_state_list(path, transpose=True):
  """The package state list Runner builds from a state .pth (x_prev entries zero)."""
  time_state = torch.load(path, map_location='cpu', weights_only=True)
  assert len(time_state) == CFG.n_layer
  state = []
  for i in range(CFG.n_layer):
    kv = time_state[KEY.format(i)]
    kv = kv.transpose(1, 2) if transpose else kv
    state += [torch.zeros(CFG.n_embd), kv.float().contiguous(), torch.zeros(CFG.n_embd)]
  return state


def test_runner_mounted_state_gives_our_logits(files, tokens):
  reference = rwkv_package_model(files['model.pth'])
  ours = rwkv_jax.load(files['model.pth'])
  ref_logits, _ = reference.forward(tokens, runner_state_list(files['runner.pth']), full_output=True)
  logits, _ = ours.forward(tokens, rwkv_jax.load_state(files['runner.pth'], ours))
  assert relative_error(logits, ref_logits.numpy()) < TOLERANCE
  # Mounted untransposed, or ignored, the state would give clearly different logits.
  wrong_logits, _ = reference.forward(tokens, runner_state_list(files['runner.pth'], transpose=False),
                                      full_output=True)
  assert relative_error(logits, wrong_logits.numpy()) > 100 * TOLERANCE
  zero_logits, _ = ours.forward(tokens)
  assert relative_error(zero_logits, ref_logits.numpy()) > 100 * TOLERANCE


def test_merged_model_starts_from_the_state_in_the_package_and_here(files, tokens):
  merged = torch.load(files['merged.pth'], weights_only=True)
  base = torch.load(files['model.pth'], weights_only=True)
  assert set(merged) - set(base) == {KEY.format(i) for i in range(CFG.n_layer)}
  assert merged[KEY.format(0)].dtype == torch.float32  # the model's dtype
  ours = rwkv_jax.load(files['model.pth'])
  logits, _ = ours.forward(tokens, rwkv_jax.load_state(files['rwkv-0.pth'], ours))
  ref_logits, _ = rwkv_package_model(files['merged.pth']).forward(tokens, None, full_output=True)
  assert relative_error(logits, ref_logits.numpy()) < TOLERANCE
  merged_logits, _ = rwkv_jax.load(files['merged.pth']).forward(tokens)
  assert relative_error(merged_logits, logits) < 1e-6


def test_ai00_file_is_float16_key_major(files):
  expected = state_io.read_state(files['rwkv-0.pth'])
  tensors = safetensors.numpy.load_file(files['ai00.state'])
  assert sorted(tensors) == sorted(KEY.format(i) for i in range(CFG.n_layer))
  for i in range(CFG.n_layer):
    tensor = tensors[KEY.format(i)]
    assert tensor.dtype == np.float16 and tensor.shape == (CFG.n_head, CFG.head_size, CFG.head_size)
    np.testing.assert_array_equal(tensor, expected[i].transpose(0, 2, 1).astype(np.float16))
  with safetensors.safe_open(files['ai00.state'], 'np') as f:
    assert f.metadata() == {'format': 'pt'}


def test_round_trips_are_exact_up_to_dtype(files, tmp_path):
  """runner -> ai00 -> pth-fp32 -> runner: each step equals the previous values cast to its dtype."""
  start = state_io.read_state(files['runner.pth'])
  np.testing.assert_array_equal(start, state_io.read_state(files['rwkv-0.pth']))
  chain = [('ai00', 'a.state', np.float16), ('pth-fp32', 'b.pth', np.float32),
           ('runner', 'c.pth', ml_dtypes.bfloat16)]
  source, values = files['runner.pth'], start
  for fmt, name, dtype in chain:
    convert_main(['export-state', str(source), '--format', fmt, '--out', str(tmp_path / name)])
    source, values = tmp_path / name, values.astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(state_io.read_state(source), values)
  np.testing.assert_allclose(values, start, rtol=2**-8, atol=1e-7)  # bf16 -> fp16 -> bf16 kept them
  stored = torch.load(tmp_path / 'b.pth', weights_only=True)
  assert stored[KEY.format(0)].dtype == torch.float32


def run_cli_subprocesses(*argvs):
  """Runs `python -m convert ...` command lines concurrently, each in a fresh interpreter."""
  processes = [subprocess.Popen([sys.executable, '-m', 'convert', *map(str, argv)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for argv in argvs]
  return [(p.wait(), p.stdout.read(), p.stderr.read()) for p in processes]


def run_cli_here(argv, capsys):
  """The CLI's own entry point in this process (what `python -m convert` runs), for speed."""
  with pytest.raises(SystemExit) as exit_info:
    cli.run(convert_main, list(map(str, argv)))
  captured = capsys.readouterr()
  return exit_info.value.code, captured.out, captured.err


@pytest.fixture
def bad_states(tmp_path):
  """State files Runner or the model would refuse, by what is wrong with them."""
  paths = {name: tmp_path / f'{name}.pth' for name in ('three_layers', 'extra_key', 'narrow', 'other')}
  state_io.write_state(paths['three_layers'], random_state(RWKVConfig(**{**vars(CFG), 'n_layer': 3})))
  extra = {**state_io.state_tensors(random_state()), 'blocks.0.att.time_maa_x': np.zeros(CFG.n_embd)}
  checkpoint.write_pth(paths['extra_key'], extra)
  state_io.write_state(paths['narrow'], np.zeros((CFG.n_layer, CFG.n_head, 32, 32)))  # H*N = 64, not 128
  state_io.write_state(paths['other'], random_state(RWKVConfig(**{**vars(CFG), 'n_embd': 256})))
  return paths


def test_refusals_from_a_fresh_interpreter(files, bad_states, tmp_path):
  out = tmp_path / 'out.pth'
  export_result, merge_result = run_cli_subprocesses(
      ['export-state', bad_states['three_layers'], '--out', out, '--ckpt', files['model.pth']],
      ['merge', '--ckpt', files['model.pth'], '--state', files['rwkv-0.pth'], '--out', files['model.pth']])
  assert_one_line_error(export_result[0], export_result[2], 'three_layers.pth', '3 layers', '2 layers')
  assert_one_line_error(merge_result[0], merge_result[2], 'also an input')
  assert not out.exists()


def test_every_refusal_is_one_line(files, bad_states, tmp_path, capsys):
  model, state, out = files['model.pth'], files['rwkv-0.pth'], tmp_path / 'out.pth'
  cases = [
      (['export-state', bad_states['extra_key'], '--out', out], ('extra_key.pth', 'nothing else')),
      (['export-state', bad_states['narrow'], '--out', out, '--ckpt', model],
       ('narrow.pth', 'width 64', 'width 128')),
      (['merge', '--ckpt', model, '--state', bad_states['other'], '--out', out],
       ('other.pth', 'width 256', 'width 128', 'another base model')),
      (['export-state', state, '--out', state], ('also an input',)),
      (['merge', '--ckpt', files['merged.pth'], '--state', state, '--out', out],
       ('already carries a merged state', '--replace_state')),
      (['inspect', bad_states['other'], '--ckpt', model], ('other.pth', 'another base model')),
      (['export-state', tmp_path / 'missing.pth', '--out', out], ('missing.pth', 'no such file')),
  ]
  for argv, fragments in cases:
    returncode, _, stderr = run_cli_here(argv, capsys)
    assert_one_line_error(returncode, stderr, *fragments)
  assert not out.exists()


def norms(state_LxHxVxK):
  return ' '.join(f'{n:.4g}' for n in np.sqrt(np.square(state_LxHxVxK.astype(np.float64)).sum(axis=(1, 2, 3))))


def test_inspect_tells_what_a_file_is(files, capsys):
  convert_main(['inspect', str(files['ai00.state']), '--ckpt', str(files['model.pth'])])
  text = capsys.readouterr().out
  assert '[H, K, V]' in text and 'Ai00' in text
  for fact in ('layers       2', 'heads        2 x head size 64', 'dtype        float16',
               'fits models  n_layer 2 x n_embd 128', f'layer norms  {norms(state_io.read_state(files["ai00.state"]))}',
               'fits ' + str(files['model.pth']) + ': yes'):
    assert fact in text, text

  convert_main(['inspect', str(files['merged.pth'])])
  text = capsys.readouterr().out
  n_params = sum(v.size for k, v in synthetic.random_checkpoint(CFG).items())
  for fact in ('RWKV-6 model', 'layers       2', 'width        128', 'heads        2 x head size 64',
               'vocab        65536', 'ffn          448', 'lora dims    mix 32, decay 64', 'dtype        float32',
               f'parameters   {n_params:,}', 'merged state yes',
               f'state norms  {norms(state_io.read_state(files["rwkv-0.pth"]))}'):
    assert fact in text, text

  convert_main(['inspect', str(files['model.pth'])])
  assert 'merged state no' in capsys.readouterr().out
