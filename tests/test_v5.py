"""RWKV-5 (x052): rwkv-jax computes what the official `rwkv` package (its v5.2 path) computes, on random
checkpoints.

The package's v5 model needs no switch at import (x070's needs RWKV_V7_ON), so it runs in this process,
in pure PyTorch fp32 (tests/conftest.py). Its v5 state is key-major [H, K, V]: it starts from a merged
`time_state` transposed, and Runner mounts a state file the same way.
"""
import copy
import json
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

import rwkv_jax
import train_state
from convert.__main__ import main as convert_main
from rwkv_jax import checkpoint, cli, state_io, synthetic, train
from rwkv_jax.config import RWKVConfig, detect_version
from rwkv_jax.errors import UserError
from rwkv_jax.models import generation
from tests.conftest import LOGIT_TOLERANCE, assert_logits_close, assert_one_line_error, rwkv_package_model


def x052(n_layer, n_embd, vocab_size, dim_ffn):
  return RWKVConfig(version='5', n_layer=n_layer, n_embd=n_embd, head_size=64, vocab_size=vocab_size,
                    dim_ffn=dim_ffn, lora=())


# dim_ffn as RWKV-LM sizes x052: int(3.5 C) // 32 * 32.
CONFIGS = {
    'L2_H2_world_vocab': x052(2, 128, 65536, 448),
    'L3_H3_pile_vocab': x052(3, 192, 50277, 672),
}


def assert_state_matters(ours, reference):
  """Logits from another state differ from the reference by far more than the tolerance, so that a
  comparison would not pass with the state ignored."""
  reference = np.asarray(reference)
  assert np.abs(np.asarray(ours) - reference).max() > 100 * LOGIT_TOLERANCE * np.abs(reference).max()


def mounted_package_state(state_path, n_layer, n_embd):
  """A state file as Runner mounts it on the package's v5/v6 model: per layer [x_att, S, x_ffn] with
  the file's [H, V, K] transposed to the package's [H, K, V] and zero token shifts."""
  tensors = torch.load(state_path, map_location='cpu', weights_only=True)
  zeros = lambda: torch.zeros(n_embd, dtype=torch.float32)
  return [part for i in range(n_layer)
          for part in (zeros(), tensors[f'blocks.{i}.att.time_state'].transpose(1, 2).float(), zeros())]


def write_x052(path, cfg, rng, with_time_state=False):
  checkpoint.write_pth(path, synthetic.random_checkpoint(cfg, seed=rng, with_time_state=with_time_state))
  return path


@pytest.mark.parametrize('name', CONFIGS)
def test_logits_continuation_and_mounted_state_match_the_rwkv_package(tmp_path, name):
  cfg = CONFIGS[name]
  rng = np.random.default_rng()
  path = write_x052(tmp_path / 'model.pth', cfg, rng)
  reference, ours = rwkv_package_model(path), rwkv_jax.load(path)
  assert reference.version == 5.2 and ours.cfg == cfg
  first, second, third = (rng.integers(0, cfg.vocab_size, 29).tolist() for _ in range(3))

  ref_logits, ref_state = reference.forward(first, None, full_output=True)
  logits, state = ours.forward(first)
  assert_logits_close(logits, ref_logits.numpy())
  package_part = lambda j: np.stack([ref_state[3 * i + j].numpy() for i in range(cfg.n_layer)])
  np.testing.assert_allclose(jnp.swapaxes(state.wkv[:, 0], -1, -2), package_part(1), rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(state.att_shift[:, 0], package_part(0), rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(state.ffn_shift[:, 0], package_part(2), rtol=1e-3, atol=1e-4)

  ref_logits, ref_state = reference.forward(second, copy.deepcopy(ref_state), full_output=True)
  logits, state = ours.forward(second, state)
  assert_logits_close(logits, ref_logits.numpy())
  # One token: the package's per-token path (att_one_v5_1), the one generation steps through.
  ref_logits, _ = reference.forward(third[:1], ref_state)
  logits, _ = ours.forward(third[:1], state)
  assert_logits_close(logits[0], ref_logits.numpy())

  state_path = tmp_path / 'state.pth'  # as RWKV-PEFT writes a state: [H, V, K] bf16
  state_io.write_state(state_path, rng.normal(0.0, 0.5, cfg.state_shape))
  ref_logits, _ = reference.forward(third, mounted_package_state(state_path, cfg.n_layer, cfg.n_embd),
                                    full_output=True)
  logits, _ = ours.forward(third, rwkv_jax.load_state(state_path, ours))
  assert_logits_close(logits, ref_logits.numpy())
  assert_state_matters(ours.forward(third)[0], ref_logits.numpy())


def test_merged_time_state_starts_both_models(tmp_path):
  cfg = CONFIGS['L2_H2_world_vocab']
  rng = np.random.default_rng()
  path = write_x052(tmp_path / 'merged.pth', cfg, rng, with_time_state=True)
  reference, ours = rwkv_package_model(path), rwkv_jax.load(path)
  tokens = rng.integers(0, cfg.vocab_size, 29).tolist()
  ref_logits, _ = reference.forward(tokens, None, full_output=True)
  logits, _ = ours.forward(tokens)
  assert_logits_close(logits, ref_logits.numpy())
  zero_state = rwkv_jax.State(*(jnp.zeros_like(s) for s in ours.init_state()))
  assert_state_matters(ours.forward(tokens, zero_state)[0], ref_logits.numpy())


@pytest.mark.parametrize('name', CONFIGS)
def test_config_is_read_from_key_names_and_tensor_shapes(name):
  cfg = CONFIGS[name]
  tensors = synthetic.random_checkpoint(cfg)
  shapes = {k: v.shape for k, v in tensors.items()}
  assert detect_version(shapes) == '5'
  assert RWKVConfig.from_shapes(shapes) == cfg
  assert checkpoint.check_shapes(tensors, 'model.pth') == cfg
  assert generation(cfg.version).NAME == 'x052'  # the name RWKV-PEFT's --my_testing gives it


def older_rwkv5_shapes(variant):
  """The keys of an RWKV-5.0 / 5.1 checkpoint (RWKV-LM's x050 / x051): one decay and one bonus
  (`time_first`) per head; 5.0 has no gate."""
  cfg = CONFIGS['L2_H2_world_vocab']
  shapes = checkpoint.expected_shapes(cfg)
  for i in range(cfg.n_layer):
    shapes[f'blocks.{i}.att.time_decay'] = (cfg.n_head,)
    shapes[f'blocks.{i}.att.time_first'] = shapes.pop(f'blocks.{i}.att.time_faaaa')[:1]
    if variant == 'x050':
      del shapes[f'blocks.{i}.att.gate.weight'], shapes[f'blocks.{i}.att.time_mix_g']
  return shapes


@pytest.mark.parametrize('variant', ['x050', 'x051'])
def test_rwkv5_before_x052_is_refused_in_one_line(variant):
  shapes = older_rwkv5_shapes(variant)
  assert detect_version(shapes) == '5'
  with pytest.raises(UserError) as error:
    RWKVConfig.from_shapes(shapes)
  message = str(error.value)
  assert variant in message and 'x052' in message and '\n' not in message


def test_checkpoint_round_trip_is_bit_exact():
  cfg = CONFIGS['L3_H3_pile_vocab']
  tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in synthetic.random_checkpoint(cfg).items()}
  back = checkpoint.tensors_from_params(checkpoint.params_from_tensors(tensors, cfg), cfg)
  assert list(back) == list(tensors)
  for key in tensors:
    np.testing.assert_array_equal(back[key], tensors[key], err_msg=key)


def test_state_gradient_is_the_derivative_of_the_loss(tmp_path):
  """What state tuning differentiates: the loss with respect to every layer's initial state, through
  remat and the WKV-6 kernel with x052's static decay broadcast over time."""
  cfg = CONFIGS['L2_H2_world_vocab']
  rng = np.random.default_rng()
  graphdef, states, weights = train.split(rwkv_jax.load(write_x052(tmp_path / 'model.pth', cfg, rng)))
  states = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape), jnp.float32), states)
  tokens = rng.integers(0, cfg.vocab_size, (2, 21))

  # Weights and tokens are arguments, not constants of the traced function: XLA would spend seconds
  # folding what depends on constants alone (the targets' one-hot over the vocabulary) at compile time.
  def loss(states, weights, tokens):
    logits, _ = nnx.merge(graphdef, states, weights)(tokens[:, :-1], remat=True)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1).mean()

  grads = jax.jit(jax.grad(loss))(states, weights, tokens)
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))  # every layer's state matters
  norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
  # Along the gradient's own direction the directional derivative is |grad|. A central difference in
  # fp32 met it within 1e-3 over several draws (5e-5 to 9e-4: the loss's rounding over 2 eps, and
  # eps**2 terms); 1e-2 leaves room for those and still catches a gradient that is wrong in any part.
  eps = 1e-2
  step = lambda sign: jax.tree.map(lambda s, g: s + sign * eps * g / norm, states, grads)
  loss = jax.jit(loss)
  finite_difference = (loss(step(1), weights, tokens) - loss(step(-1), weights, tokens)) / (2 * eps)
  np.testing.assert_allclose(finite_difference, norm, rtol=1e-2)


def wkv5_through_pallas_matches_the_scan(tmp_path):
  """The x052 model's logits and state gradients with the Pallas WKV-6 kernels (x052's static decay
  broadcast over time) against the fp32 scan reference, decays drawn over RWKV-6's range and past it
  at both ends (time_decay in [-8, 3]: per-step decay factors from ~1 down to e^-20)."""
  cfg = CONFIGS['L2_H2_world_vocab']
  rng = np.random.default_rng()
  tensors = synthetic.random_checkpoint(cfg, seed=rng)
  for i in range(cfg.n_layer):
    decay = tensors[f'blocks.{i}.att.time_decay']
    tensors[f'blocks.{i}.att.time_decay'] = rng.uniform(-8, 3, decay.shape).astype(decay.dtype)
  checkpoint.write_pth(tmp_path / 'model.pth', tensors)
  tokens = rng.integers(0, cfg.vocab_size, (2, 42))  # T = 41 is no multiple of any chunk

  def logits_and_grads(implementation):
    model = rwkv_jax.load(tmp_path / 'model.pth', dtype=jnp.float32, implementation=implementation)
    graphdef, states, weights = train.split(model)
    states = jax.tree.map(lambda s: jnp.asarray(np.random.default_rng(1).normal(0, 0.5, s.shape), jnp.float32),
                          states)

    def loss(states, weights, tokens):
      logits, _ = nnx.merge(graphdef, states, weights)(tokens[:, :-1])
      return -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1).mean(), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(states, weights, tokens)
    return logits, grads

  logits, grads = logits_and_grads('pallas')
  expected_logits, expected_grads = logits_and_grads('scan')
  assert_logits_close(logits, expected_logits)
  # The kernels' fp32 bound (tests/test_wkv6.py TOL), on each layer's state gradient.
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    error = np.sqrt(np.mean(np.square(got - want)) / np.mean(np.square(want)))
    assert error <= 1e-4, f'state gradient relative RMS error {error:.1e}'


def test_wkv5_through_the_pallas_kernels_in_interpret_mode_matches_the_scan(tmp_path):
  wkv5_through_pallas_matches_the_scan(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU')
def test_wkv5_through_the_compiled_pallas_kernels_matches_the_scan(tmp_path):
  # The model's own fp32 products run as on the CPU: XLA's GPU default rounds their inputs to TF32,
  # which turns the kernels' ~1e-6 differences into whole TF32 steps (3e-4 of the largest logit on
  # an H100). The kernels set their dot precisions themselves and are unaffected.
  with jax.default_matmul_precision('highest'):
    wkv5_through_pallas_matches_the_scan(tmp_path)


def test_the_trainer_tunes_an_x052_state_that_the_rwkv_package_mounts(tmp_path, capsys):
  cfg = CONFIGS['L2_H2_world_vocab']
  rng = np.random.default_rng()
  model_path = write_x052(tmp_path / 'tiny_x052.pth', cfg, rng)
  data_path = tmp_path / 'train.jsonl'  # learnable: every document follows one template
  data_path.write_text(''.join(json.dumps({'text': f'User: what is {a} plus {b}?\n\nAssistant: {a + b}.'}) + '\n'
                               for a, b in rng.integers(0, 50, (64, 2))))
  base = ['--ckpt', str(model_path), '--data', str(data_path), '--ctx_len', '32', '--micro_bsz', '2',
          '--epoch_steps', '12', '--epoch_count', '1', '--proj_dir', str(tmp_path / 'out')]
  with pytest.raises(SystemExit) as exit_info:
    cli.run(train_state.main, [*base, '--my_testing', 'x060'])
  assert_one_line_error(exit_info.value.code, capsys.readouterr().err, 'x060', 'x052')

  train_state.main([*base, '--my_testing', 'x052'])
  losses = [json.loads(line)['loss'] for line in (tmp_path / 'out' / 'loss_data.jsonl').read_text().splitlines()]
  assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
  # From ~ln(65536) = 11.1 the template takes the loss down ~2 nats in 12 steps (11.6 -> 9.3 seen);
  # batch-to-batch noise is ~0.3.
  assert np.mean(losses[-3:]) < losses[0] - 1.0, losses

  state_path, ai00_path = tmp_path / 'out' / 'rwkv-0.pth', tmp_path / 'rwkv-0.state'
  convert_main(['export-state', str(state_path), '--format', 'ai00', '--ckpt', str(model_path), '--out',
                str(ai00_path)])
  convert_main(['inspect', str(state_path), '--ckpt', str(model_path)])
  assert f'fits {model_path}: yes (RWKV-5 ' in capsys.readouterr().out

  tokens = rng.integers(0, cfg.vocab_size, 23).tolist()
  reference = rwkv_package_model(model_path).forward(
      tokens, mounted_package_state(state_path, cfg.n_layer, cfg.n_embd), full_output=True)[0].numpy()
  ours = rwkv_jax.load(model_path)
  for path in (state_path, ai00_path):
    assert_logits_close(ours.forward(tokens, rwkv_jax.load_state(path, ours))[0], reference)
  assert_state_matters(ours.forward(tokens)[0], reference)
