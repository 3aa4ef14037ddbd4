"""The trainer: the loss falls, only the state changes, the schedule follows its formulas,
a resumed run equals an uninterrupted one, and bad input ends in one clear line."""
import hashlib
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import train_state
from flax import nnx

from rwkv_jax import cli, data, quant, state_io, synthetic, train
from rwkv_jax.models import WKVState
from tests.conftest import assert_one_line_error, random_model

TRAIN = [sys.executable, 'train_state.py']


def run_train(*args):
  return subprocess.run([*TRAIN, *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def jsonl_data(tmp_path):
  """A learnable dataset: every document follows one template."""
  rng = np.random.default_rng(0)
  lines = [json.dumps({'text': f'User: what is {a} plus {b}?\n\nAssistant: {a} plus {b} is {a + b}.'})
           for a, b in rng.integers(0, 50, (64, 2))]
  path = tmp_path / 'train.jsonl'
  path.write_text('\n'.join(lines) + '\n')
  return path


def test_loss_falls_and_only_the_state_changes():
  cfg = synthetic.TINY
  model = random_model(cfg, seed=3)
  graphdef, states, weights = train.split(model)
  before = jax.tree.map(np.array, weights)
  # 60 steps at a high learning rate: over 12 random sequences the loss ends at 0.41-0.47x its
  # start (after only 25 steps of a schedule ending at step 40 it was 0.53-0.60x: flaky).
  opt = train.optimizer(train.schedule('cos', 1.0, 0.01, 5, 200))
  state = train.init_train_state(states, opt)
  step = train.make_train_step(graphdef, opt)
  sequence = np.random.default_rng().integers(0, cfg.vocab_size, 33)
  inputs = np.broadcast_to(sequence[:-1], (1, 2, 32)).astype(np.int32)
  targets = np.broadcast_to(sequence[1:], (1, 2, 32)).astype(np.int32)
  losses = []
  for _ in range(60):
    state, loss = step(state, weights, inputs, targets)
    losses.append(float(loss))
  assert losses[-1] < 0.6 * losses[0], losses
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, weights))
  assert np.abs(train.wkv_array(state.states)).max() > 0.1


def test_grad_cp_keeps_the_wkv_output_and_ffn_value_and_the_same_gradient(capsys):
  """grad_cp's remat keeps what models.common.REMAT_POLICY names (x060: each layer's WKV output and
  channel-mix value product) instead of recomputing them, and the state gradient is the one without remat."""
  cfg = synthetic.TINY
  graphdef, states, weights = train.split(random_model(cfg, seed=4))
  tokens = np.random.default_rng().integers(0, cfg.vocab_size, (2, 33)).astype(np.int32)
  loss = lambda states, remat: train.loss_fn(states, graphdef, weights, tokens[:, :-1], tokens[:, 1:], remat)
  jax.ad_checkpoint.print_saved_residuals(lambda s: loss(s, True), states)
  saved = capsys.readouterr().out
  assert saved.count('(TimeMix.__call__)') == saved.count('(ChannelMix.__call__)') == cfg.n_layer, saved
  with_remat, without = (jax.grad(loss)(states, remat) for remat in (True, False))
  # The same fp32 operations either way: bit-identical on the CPU in 4 of 4 draws. 1e-6 leaves room for
  # another fusion order, far below what a term lost or counted twice in the backward would change.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0), with_remat, without)


def test_the_optimizer_moves_only_wkv_states_whatever_it_is_given():
  """The partition is by Variable type: handed the whole model's state, Adam moves the WKV states
  and set_to_zero holds every weight."""
  model = random_model(seed=2)
  everything = nnx.state(model)
  opt = train.optimizer(train.schedule('cos', 1.0, 0.01, 0, 10))
  grads = jax.tree.map(jnp.ones_like, everything)
  updates, _ = opt.update(grads, opt.init(everything), everything)
  moved = nnx.to_pure_dict(nnx.state(model, WKVState))
  for path, update in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(updates)):
    trained = any(getattr(key, 'key', None) == 'time_state' for key in path)
    assert (np.abs(np.asarray(update)).max() > 0) == trained, path
  assert moved['blocks'][0]['att']['time_state'].shape == (2, 64, 64)


def test_gradient_accumulation_equals_the_mean_of_micro_batches():
  cfg = synthetic.TINY
  model = random_model(cfg, seed=4)
  for block in model.blocks:
    block.att.time_state.set_value(jnp.asarray(np.random.default_rng().normal(0, 0.3, block.att.time_state.shape),
                                               jnp.float32))
  graphdef, states, weights = train.split(model)
  tokens = np.random.default_rng().integers(0, cfg.vocab_size, (2, 1, 17)).astype(np.int32)
  grad = lambda i, t: train.wkv_array(jax.grad(train.loss_fn)(states, graphdef, weights, i, t))
  per_batch = [grad(tokens[a, :, :-1], tokens[a, :, 1:]) for a in range(2)]
  # Capture the accumulated gradient through an SGD step with lr 1 and no clipping.
  opt = train.optax.sgd(1.0)
  ts = train.TrainState(jnp.zeros((), jnp.int32), states, opt.init(states))
  before = train.wkv_array(states)  # the step donates (deletes) its input state
  new, _ = train.make_train_step(graphdef, opt)(ts, weights, tokens[:, :, :-1], tokens[:, :, 1:])
  np.testing.assert_allclose(before - train.wkv_array(new.states), (per_batch[0] + per_batch[1]) / 2,
                             rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('quant_mode', ['none', 'int8'])
def test_step_on_host_gathered_embedding_rows_equals_step_on_tokens(quant_mode):
  """The trainer keeps the embedding on the host and feeds the step its rows: same loss, same update."""
  cfg = synthetic.TINY
  tokens = np.random.default_rng().integers(0, cfg.vocab_size, (2, 2, 17)).astype(np.int32)
  opt = train.optimizer(train.schedule('cos', 1.0, 0.01, 5, 200))
  results = []
  for on_host in (False, True):
    model = quant.quantize_model(random_model(cfg, seed=5, dtype=ml_dtypes.bfloat16), quant_mode)
    inputs = tokens[..., :-1]
    if on_host:
      embedding = train.host_embedding(model)
      assert model.emb is None and all(isinstance(x, np.ndarray) for x in jax.tree.leaves(embedding))
      inputs = quant.take_rows(embedding, inputs)
    graphdef, states, weights = train.split(model)
    step = train.make_train_step(graphdef, opt)
    state, loss = step(train.init_train_state(states, opt), weights, inputs, tokens[..., 1:])
    results.append((float(loss), train.wkv_array(state.states)))
  assert results[0][0] == results[1][0]
  np.testing.assert_array_equal(results[0][1], results[1][1])


@pytest.mark.parametrize('kind', ['cos', 'exp', 'wsd'])
def test_schedule_follows_its_formula(kind):
  lr_init, lr_final, warmup, total = 1.0, 0.01, 10, 110
  lr = train.schedule(kind, lr_init, lr_final, warmup, total)
  for step in (0, 4, 9):
    assert math.isclose(float(lr(step)), lr_init * (step + 1) / warmup, rel_tol=1e-6)
  for step in (10, 35, 60, 109, 200):
    p = min((step - warmup) / (total - warmup), 1.0)
    expected = {
        'cos': lr_final + 0.5 * (lr_init - lr_final) * (1 + math.cos(math.pi * p)),
        'exp': lr_init * (lr_final / lr_init) ** p,
        'wsd': 0.5 * lr_init * (1 + math.cos(math.pi * p)),
    }[kind]
    assert math.isclose(float(lr(step)), expected, rel_tol=1e-5, abs_tol=1e-7), (step, float(lr(step)), expected)


def test_binidx_written_and_read_for_both_dtypes(tmp_path):
  for dtype in (np.uint16, np.int32):
    docs = [np.random.default_rng().integers(0, 65535, n).astype(dtype) for n in (5, 1, 300)]
    data.write_binidx(str(tmp_path / f'd_{np.dtype(dtype).name}'), docs, dtype)
    loaded = data.load_data(str(tmp_path / f'd_{np.dtype(dtype).name}'), 'binidx')
    assert loaded.tokens.dtype == dtype
    for doc, start, length in zip(docs, loaded.doc_starts, loaded.doc_lens):
      np.testing.assert_array_equal(loaded.tokens[start:start + length], doc)


def _sha(path):
  return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resumed_run_equals_uninterrupted_run(write_checkpoint, jsonl_data, tmp_path):
  model = write_checkpoint(seed=5)
  common = ['--ckpt', model, '--data', jsonl_data, '--ctx_len', 32, '--micro_bsz', 2, '--epoch_steps', 4,
            '--epoch_count', 2, '--random_seed', 7, '--accumulate_grad_batches', 2, '--precision', 'fp32']
  model_hash = _sha(model)
  whole = run_train(*common, '--proj_dir', tmp_path / 'whole', '--eval_data', jsonl_data)
  assert whole.returncode == 0, whole.stderr
  epoch_lines = (tmp_path / 'whole' / 'train_log.txt').read_text().splitlines()[-2:]
  held_out = [float(line.split('eval_loss ')[1]) for line in epoch_lines]
  assert all(math.isfinite(x) for x in held_out), epoch_lines
  first = run_train(*common, '--proj_dir', tmp_path / 'split', '--max_steps', 3)
  assert first.returncode == 0 and 'continue with --resume' in first.stdout, first.stderr
  second = run_train(*common, '--proj_dir', tmp_path / 'split', '--resume')
  assert second.returncode == 0, second.stderr

  for name in ('rwkv-0.pth', 'rwkv-1.pth'):
    a, b = (torch.load(tmp_path / run / name, weights_only=True) for run in ('whole', 'split'))
    assert list(a) == [f'blocks.{i}.att.time_state' for i in range(2)]
    assert all(t.dtype == torch.bfloat16 and t.shape == (2, 64, 64) for t in a.values())
    for key in a:
      assert torch.equal(a[key], b[key]), (name, key)
  steps = [json.loads(l) for l in (tmp_path / 'split' / 'loss_data.jsonl').read_text().splitlines()]
  assert [s['step'] for s in steps] == [1, 2, 3, 4]
  assert {'loss', 'lr', 'tokens_per_s'} <= set(steps[0])
  assert (tmp_path / 'whole' / 'loss.png').read_bytes()[:4] == b'\x89PNG'
  assert _sha(model) == model_hash  # the base model is never written


@pytest.mark.parametrize('quant', ['int8', 'nf4'])
def test_quantized_model_trains_end_to_end(write_checkpoint, jsonl_data, tmp_path, quant):
  model = write_checkpoint(seed=8, dtype=ml_dtypes.bfloat16)
  result = run_train('--ckpt', model, '--data', jsonl_data, '--ctx_len', 32, '--micro_bsz', 2, '--epoch_steps', 30,
                     '--epoch_count', 1, '--quant', quant, '--proj_dir', tmp_path / 'out')
  assert result.returncode == 0, result.stderr
  losses = [json.loads(l)['loss'] for l in (tmp_path / 'out' / 'loss_data.jsonl').read_text().splitlines()]
  assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
  # From ~ln(65536) = 11.1 the template data takes the loss down ~2 nats in 30 steps (means of the
  # first and last 5: int8 11.15 -> 9.04, nf4 11.03 -> 8.90); batch-to-batch noise is ~0.3.
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
  state = torch.load(tmp_path / 'out' / 'rwkv-0.pth', weights_only=True)
  assert list(state) == [f'blocks.{i}.att.time_state' for i in range(2)]


def test_rwkv_peft_command_line_runs_unchanged(write_checkpoint, jsonl_data, tmp_path):
  model = write_checkpoint()
  prefix = tmp_path / 'demo_text_document'
  tokens = data.load_data(str(jsonl_data), 'jsonl')
  docs = [tokens.tokens[s:s + n] for s, n in zip(tokens.doc_starts, tokens.doc_lens)]
  data.write_binidx(str(prefix), docs, np.int32)
  result = run_train(
      '--load_model', model, '--proj_dir', tmp_path / 'out', '--data_file', prefix, '--data_type', 'binidx',
      '--vocab_size', 65536, '--ctx_len', 32, '--epoch_steps', 8, '--epoch_count', 1, '--epoch_begin', 0,
      '--epoch_save', 1, '--micro_bsz', 2, '--n_layer', 2, '--n_embd', 128, '--pre_ffn', 0, '--head_qk', 0,
      '--lr_init', 1, '--lr_final', 1e-2, '--warmup_steps', 10, '--beta1', 0.9, '--beta2', 0.99, '--adam_eps', 1e-8,
      '--accelerator', 'gpu', '--devices', 1, '--precision', 'bf16', '--strategy', 'deepspeed_stage_1',
      '--grad_cp', 1, '--my_testing', 'x060', '--train_type', 'state', '--dataload', 'pad', '--fla')
  assert result.returncode == 0, result.stderr
  assert 'do nothing here' in result.stdout
  assert (tmp_path / 'out' / 'rwkv-0.pth').exists() and (tmp_path / 'out' / 'train_log.txt').exists()


def test_bad_input_ends_in_one_line(write_checkpoint, jsonl_data, tmp_path, capsys):
  model = write_checkpoint()
  base = ['--ckpt', model, '--data', jsonl_data, '--ctx_len', 16, '--proj_dir', tmp_path / 'o']
  cases = [
      (['--ckpt', tmp_path / 'nope.pth', '--data', jsonl_data], 'no such file'),
      (['--ckpt', model, '--data', tmp_path / 'nope.jsonl'], 'nope.jsonl'),
      ([*base, '--n_layer', 24], '--n_layer 24 does not match the checkpoint (2)'),
      ([*base, '--my_testing', 'x070'], 'x070'),
      ([*base, '--train_type', 'lora'], 'tunes states only'),
      ([*base, '--micro_bsz', 8, '--epoch_steps', 100], 'document'),
      ([*base, '--resume'], 'no checkpoint/'),
      ([*base, '--devices', 64], '--devices 64'),
  ]
  for args, message in cases:
    with pytest.raises(SystemExit) as exit_info:
      cli.run(train_state.main, [str(a) for a in args])
    assert_one_line_error(exit_info.value.code, capsys.readouterr().err, message)


def test_data_parallel_over_two_devices_equals_one_device(write_checkpoint, jsonl_data, tmp_path):
  """--devices 2 splits each global batch; the states match one device taking the whole batch."""
  model = write_checkpoint(seed=6)
  common = ['--ckpt', model, '--data', jsonl_data, '--ctx_len', 24, '--epoch_count', 1, '--random_seed', 3,
            '--precision', 'fp32']
  env = {**os.environ, 'XLA_FLAGS': os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2'}
  runs = {'two': ['--devices', 2, '--micro_bsz', 1, '--epoch_steps', 8],
          'one': ['--devices', 1, '--micro_bsz', 2, '--epoch_steps', 4]}
  for name, flags in runs.items():
    result = subprocess.run([*TRAIN, *map(str, common + flags), '--proj_dir', str(tmp_path / name)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
  two, one = (state_io.read_state(tmp_path / name / 'checkpoint') for name in runs)
  assert np.abs(one).max() > 0.1
  # The gradient is summed over the devices in another order: fp32 rounding. Adam divides each
  # entry's step by its own gradient scale, so an entry whose gradient is near zero can move by
  # rounding noise (one in 16384 moved 4e-4 of the largest entry): compare the relative RMS.
  rms = lambda x: np.sqrt(np.mean(np.square(x)))
  assert rms(two - one) / rms(one) < 1e-4, rms(two - one) / rms(one)


def test_nan_loss_stops_and_keeps_the_last_good_state(write_checkpoint, jsonl_data, tmp_path):
  # GroupNorm rescales each head's output, so a huge state alone does not break the loss; steps
  # near fp32's limit (3.4e38) do, as a diverging run would.
  result = run_train('--ckpt', write_checkpoint(), '--data', jsonl_data, '--ctx_len', 16, '--micro_bsz', 2,
                     '--lr_init', 3e38, '--warmup_steps', 0, '--proj_dir', tmp_path / 'o', '--epoch_count', 1,
                     '--epoch_steps', 6)
  assert_one_line_error(result.returncode, result.stderr, 'loss became')
  saved = torch.load(tmp_path / 'o' / 'rwkv-last-good.pth', weights_only=True)
  assert all(torch.isfinite(t.float()).all() for t in saved.values())
