"""RWKV-7 (x070): rwkv-jax computes what the official `rwkv` package computes, on random checkpoints.

The package selects its x070 class with RWKV_V7_ON=1 at import, and the x060 tests import it
without, so it runs here in a subprocess: one run over every checkpoint, which saves its logits
and states as .npy files for the tests to compare against.
"""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import rwkv_jax
from rwkv_jax import checkpoint, cli, state_io, synthetic, train
from rwkv_jax.config import RWKVConfig
from rwkv_jax.errors import UserError
from rwkv_jax.models import generation
from tests.conftest import LOGIT_TOLERANCE, assert_logits_close, assert_one_line_error


def x070(n_layer, n_embd, vocab_size, dim_ffn, w, a, v, g):
  return RWKVConfig(version='7', n_layer=n_layer, n_embd=n_embd, head_size=64, vocab_size=vocab_size,
                    dim_ffn=dim_ffn, lora=(('w', w), ('a', a), ('v', v), ('g', g)))


# Unequal LoRA widths as released files have (C=2048: 96/96/64/256; 0.1B: 64/64/32/128); a 1-layer
# model has no value residual at all; dim_ffn is 4C in released models, not in the last one.
CONFIGS = {
    'L3_H2_world_vocab': x070(3, 128, 65536, 512, w=48, a=48, v=32, g=96),
    'L2_H4_0.1B_widths_block0_with_v': x070(2, 256, 4096, 1024, w=64, a=64, v=32, g=128),
    'L1_H3_pile_vocab': x070(1, 192, 50277, 704, w=32, a=64, v=0, g=64),
}
# Block 0 does not use v0/v1/v2; trainers save them, released files usually lack them.
WITH_BLOCK0_VALUE_LORA = {'L2_H4_0.1B_widths_block0_with_v'}

PACKAGE_RUN = r'''
import contextlib, io, json, os, sys
os.environ.update(RWKV_V7_ON='1', RWKV_JIT_ON='0', RWKV_CUDA_ON='0')  # x070, pure PyTorch
import numpy as np, torch
from rwkv.model import RWKV

def mounted(path, model):
  """RWKV Runner's load_rwkv_state for version >= 7: the file's [H, V, K] tensors as they are."""
  tensors = torch.load(path, map_location='cpu', weights_only=True)
  state = model.generate_zero_state()
  for i in range(model.n_layer):
    state[3 * i + 1] = tensors[f'blocks.{i}.att.time_state'].float()
  return state

for job in json.load(open(sys.argv[1])):
  out = job['out']
  with contextlib.redirect_stdout(io.StringIO()):  # it prints every tensor it loads
    model = RWKV(model=job['model'].removesuffix('.pth'), strategy='cpu fp32')  # it appends .pth
  logits, state = model.forward(job['first'], None, full_output=True)
  np.save(f'{out}/first.npy', logits.numpy())
  for j, name in enumerate(('att_shift', 'wkv', 'ffn_shift')):  # 3 entries per layer
    np.save(f'{out}/{name}.npy', np.stack([state[3 * i + j].numpy() for i in range(model.n_layer)]))
  np.save(f'{out}/second.npy', model.forward(job['second'], state, full_output=True)[0].numpy())
  np.save(f'{out}/mounted.npy', model.forward(job['third'], mounted(job['state'], model), full_output=True)[0].numpy())
'''


def x070_tensors(name, seed=None):
  """A random checkpoint of CONFIGS[name] in the official key layout."""
  cfg = CONFIGS[name]
  rng = np.random.default_rng(seed)
  tensors = synthetic.random_checkpoint(cfg, seed=rng)
  if name in WITH_BLOCK0_VALUE_LORA:
    for key, shape in generation('7').optional_block_shapes(cfg, 0).items():
      tensors[f'blocks.0.{key}'] = synthetic.random_tensor(cfg, f'blocks.0.{key}', shape, rng).astype(np.float32)
  return tensors


@pytest.fixture(scope='module')
def package_runs(tmp_path_factory):
  """Per config: the checkpoint, the token lists, a state file, and the package's outputs."""
  rng = np.random.default_rng()
  runs, jobs = {}, []
  for name, cfg in CONFIGS.items():
    directory = tmp_path_factory.mktemp(name)
    path = directory / 'model.pth'
    checkpoint.write_pth(path, x070_tensors(name, seed=rng))
    state_path = directory / 'state.pth'  # as RWKV-PEFT writes it: [H, V, K] bf16
    state_io.write_state(state_path, rng.normal(0.0, 0.5, cfg.state_shape))
    # One length (not a multiple of the WKV chunk) for every part: one compilation per model.
    tokens = {part: rng.integers(0, cfg.vocab_size, 29).tolist() for part in ('first', 'second', 'third')}
    runs[name] = dict(path=path, state=state_path, out=directory, **tokens)
    jobs.append(dict(model=str(path), state=str(state_path), out=str(directory), **tokens))
  run_package(jobs, tmp_path_factory.mktemp('jobs') / 'jobs.json')
  return runs


def run_package(jobs, job_file):
  """PACKAGE_RUN over `jobs` (model, state, token lists, out directory), in a fresh interpreter."""
  job_file.write_text(json.dumps(jobs))
  result = subprocess.run([sys.executable, '-c', PACKAGE_RUN, str(job_file)], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize('name', CONFIGS)
def test_logits_continuation_and_mounted_state_match_the_rwkv_package(package_runs, name):
  run = package_runs[name]
  reference = lambda part: np.load(run['out'] / f'{part}.npy')
  ours = rwkv_jax.load(run['path'])
  assert ours.cfg == CONFIGS[name]

  logits, state = ours.forward(run['first'])
  assert_logits_close(logits, reference('first'))
  # The package's v7 state is value-major [H, V, K] like ours: compared without a transpose.
  np.testing.assert_allclose(state.wkv[:, 0], reference('wkv'), rtol=1e-3, atol=1e-4)
  for part in ('att_shift', 'ffn_shift'):
    np.testing.assert_allclose(getattr(state, part)[:, 0], reference(part), rtol=1e-3, atol=1e-4)

  logits, _ = ours.forward(run['second'], state)
  assert_logits_close(logits, reference('second'))

  logits, _ = ours.forward(run['third'], rwkv_jax.load_state(run['state'], ours))
  assert_logits_close(logits, reference('mounted'))
  # The state must matter, or the mounted comparison would pass with it ignored.
  zero_state_logits, _ = ours.forward(run['third'])
  assert np.abs(np.asarray(zero_state_logits) - reference('mounted')).max() > 100 * LOGIT_TOLERANCE * np.abs(
      reference('mounted')).max()


@pytest.mark.parametrize('name', CONFIGS)
def test_config_is_read_from_key_names_and_tensor_shapes(name):
  cfg = CONFIGS[name]
  tensors = x070_tensors(name)
  assert RWKVConfig.from_shapes({k: v.shape for k, v in tensors.items()}) == cfg
  assert checkpoint.check_shapes(tensors, 'model.pth') == cfg


def test_my_testing_must_name_the_checkpoint_version(tmp_path, capsys):
  import train_state  # pylint: disable=g-import-not-at-top
  model_path, data_path = tmp_path / 'model.pth', tmp_path / 'train.jsonl'
  checkpoint.write_pth(model_path, x070_tensors('L1_H3_pile_vocab'))
  data_path.write_text(json.dumps({'text': 'User: hi\n\nAssistant: hello'}) + '\n')
  with pytest.raises(SystemExit) as exit_info:
    cli.run(train_state.main, ['--ckpt', str(model_path), '--data', str(data_path), '--my_testing', 'x060',
                               '--proj_dir', str(tmp_path / 'out')])
  assert_one_line_error(exit_info.value.code, capsys.readouterr().err, '--my_testing x060', 'x070')


def test_one_layer_model_with_block0_value_lora_reads_its_width():
  cfg = CONFIGS['L1_H3_pile_vocab']
  shapes = checkpoint.expected_shapes(cfg)
  shapes.update({'blocks.0.att.v0': (1, 1, cfg.n_embd), 'blocks.0.att.v1': (cfg.n_embd, 16),
                 'blocks.0.att.v2': (16, cfg.n_embd)})
  assert RWKVConfig.from_shapes(shapes).lora_dim('v') == 16


@pytest.mark.parametrize('keys, variant', [
    (('blocks.0.ffn.s_emb.weight', 'blocks.0.ffn.s_emb_x.weight', 'blocks.0.ffn.s1'), 'rwkv7a'),
    (('blocks.0.ffn.s_emb.weight', 'blocks.0.qkv.qq.weight', 'blocks.0.qkv.k1'), 'rwkv7b'),
], ids=['DeepEmbed', 'DeepEmbedAttention'])
def test_variants_that_are_not_plain_x070_are_refused_in_one_line(keys, variant):
  shapes = {**checkpoint.expected_shapes(CONFIGS['L3_H2_world_vocab']), **{k: (32, 32) for k in keys}}
  with pytest.raises(UserError) as error:
    RWKVConfig.from_shapes(shapes)
  assert variant in str(error.value) and '\n' not in str(error.value)


def test_checkpoint_round_trip_is_bit_exact():
  cfg = CONFIGS['L3_H2_world_vocab']
  tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in x070_tensors('L3_H2_world_vocab').items()}
  back = checkpoint.tensors_from_params(checkpoint.params_from_tensors(tensors, cfg), cfg)
  assert list(back) == list(tensors)
  for key in tensors:
    np.testing.assert_array_equal(back[key], tensors[key], err_msg=key)


def test_token_by_token_equals_whole_sequence(tmp_path):
  cfg = CONFIGS['L3_H2_world_vocab']
  checkpoint.write_pth(tmp_path / 'model.pth', x070_tensors('L3_H2_world_vocab'))
  ours = rwkv_jax.load(tmp_path / 'model.pth')
  tokens = np.random.default_rng().integers(0, cfg.vocab_size, (2, 12))
  whole, whole_state = ours.forward(tokens)
  state, steps = None, []
  for t in range(tokens.shape[1]):
    logits, state = ours.forward(tokens[:, t:t + 1], state)
    steps.append(logits[:, 0])
  assert_logits_close(np.stack(steps, axis=1), whole)
  # One token runs the sequential recurrence, a sequence the chunked form: two fp32 summation orders.
  np.testing.assert_allclose(state.wkv, whole_state.wkv, rtol=0, atol=1e-5 * np.abs(whole_state.wkv).max())


def test_state_gradient_is_the_derivative_of_the_loss(tmp_path):
  """What state tuning differentiates: the loss with respect to every layer's initial state, through
  remat, the v_first carry and the WKV kernel's initial-state path (autodiff of the chunked form
  on CPU, where a masked exp(-inf) can turn a gradient into NaN)."""
  name = 'L2_H4_0.1B_widths_block0_with_v'
  rng = np.random.default_rng()
  checkpoint.write_pth(tmp_path / 'model.pth', x070_tensors(name, seed=rng))
  graphdef, states, weights = train.split(rwkv_jax.load(tmp_path / 'model.pth'))
  states = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape), jnp.float32), states)
  tokens = rng.integers(0, CONFIGS[name].vocab_size, (2, 21))

  def loss(states):
    logits, _ = nnx.merge(graphdef, states, weights)(tokens[:, :-1], remat=True)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1).mean()

  grads = jax.jit(jax.grad(loss))(states)
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))  # every layer's state matters
  norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
  # Along the gradient's own direction the directional derivative is |grad|. A central difference
  # in fp32 met it within 5e-4 over several draws (the loss's rounding over 2 eps, and eps**2
  # terms); 1e-2 leaves room for those and still catches a gradient missing a layer's term or scaled.
  eps = 1e-2
  step = lambda sign: jax.tree.map(lambda s, g: s + sign * eps * g / norm, states, grads)
  loss = jax.jit(loss)
  finite_difference = (loss(step(1)) - loss(step(-1))) / (2 * eps)
  np.testing.assert_allclose(finite_difference, norm, rtol=1e-2)


def test_train_state_tunes_an_x070_model_and_the_package_mounts_the_state(tmp_path):
  name = 'L3_H2_world_vocab'  # the World tokenizer's ids need its vocabulary
  model_path, data_path, out = tmp_path / 'model.pth', tmp_path / 'train.jsonl', tmp_path / 'out'
  checkpoint.write_pth(model_path, x070_tensors(name))
  rng = np.random.default_rng()
  template = 'User: what is {0} plus {1}?\n\nAssistant: {0} plus {1} is {2}.'
  data_path.write_text(''.join(json.dumps({'text': template.format(a, b, a + b)}) + '\n'
                               for a, b in rng.integers(0, 50, (64, 2))))
  result = subprocess.run([sys.executable, 'train_state.py', '--ckpt', model_path, '--data', data_path,
                           '--proj_dir', out, '--my_testing', 'x070', '--ctx_len', '24', '--micro_bsz', '2',
                           '--epoch_steps', '20', '--epoch_count', '1', '--precision', 'fp32'],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  losses = [json.loads(line)['loss'] for line in (out / 'loss_data.jsonl').read_text().splitlines()]
  # The documents share one template: the last 5 steps' mean was 0.63-0.67x the first loss in 3 runs.
  assert len(losses) == 20 and np.mean(losses[-5:]) < 0.8 * losses[0], losses

  tokens = {part: rng.integers(0, CONFIGS[name].vocab_size, 29).tolist() for part in ('first', 'second', 'third')}
  run_package([dict(model=str(model_path), state=str(out / 'rwkv-0.pth'), out=str(tmp_path), **tokens)],
              tmp_path / 'job.json')
  ours = rwkv_jax.load(model_path)
  logits, _ = ours.forward(tokens['third'], rwkv_jax.load_state(out / 'rwkv-0.pth', ours))
  assert_logits_close(logits, np.load(tmp_path / 'mounted.npy'))
