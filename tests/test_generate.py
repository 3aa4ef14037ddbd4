"""Generation and evaluation: the RNN loop equals the whole-sequence model, the CLIs run end to end."""
import io
import json
import subprocess
import sys

import numpy as np
import pytest

import rwkv_jax
from rwkv_jax import checkpoint, cli, data, evaluate, generate, state_io, synthetic, tokenizer
from rwkv_jax.models.common import initial_state
from rwkv_jax.config import RWKVConfig
from tests.conftest import assert_one_line_error

CFG = synthetic.TINY


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('generate')
  paths = {'model': root / 'model.pth', 'state': root / 'rwkv-0.pth', 'other_state': root / 'other.pth',
           'data': root / 'heldout.jsonl'}
  checkpoint.write_pth(paths['model'], synthetic.random_checkpoint(CFG, seed=2))
  rng = np.random.default_rng(0)
  state_io.write_state(paths['state'], rng.normal(0.0, 0.5, CFG.state_shape))
  other = RWKVConfig(**{**vars(CFG), 'n_layer': 3})
  state_io.write_state(paths['other_state'], rng.normal(0.0, 0.5, other.state_shape))
  lines = [json.dumps({'text': f'User: What is {a} plus {b}?\n\nAssistant: {a + b}.'})
           for a, b in rng.integers(0, 50, (12, 2))]
  paths['data'].write_text('\n'.join(lines) + '\n')
  return paths


@pytest.fixture(scope='module')
def tiny_model(files):
  return rwkv_jax.load(files['model'])


@pytest.fixture(scope='module')
def tuned_state(files, tiny_model):
  return rwkv_jax.load_state(files['state'], tiny_model)


PROMPT = tokenizer.encode('User: hello\n\nAssistant:')


def test_greedy_is_the_argmax_of_the_model_continued_token_by_token(tiny_model, tuned_state):
  tokens, _ = generate.generate(tiny_model, PROMPT, tuned_state, generate.Sampling(temperature=0), 6)
  logits, state = tiny_model.forward(PROMPT, tuned_state)
  expected = []
  for _ in range(6):
    expected.append(int(np.argmax(logits[-1])))
    logits, state = tiny_model.forward([expected[-1]], state)
  assert tokens == expected
  top_k_1, _ = generate.generate(tiny_model, PROMPT, tuned_state, generate.Sampling(top_k=1, seed=5), 6)
  assert top_k_1 == expected


def test_sampling_is_deterministic_with_a_seed(tiny_model, tuned_state):
  sampling = generate.Sampling(temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=0.3, seed=11)
  first, _ = generate.generate(tiny_model, PROMPT, tuned_state, sampling, 8)
  second, _ = generate.generate(tiny_model, PROMPT, tuned_state, sampling, 8)
  assert first == second and len(first) == 8


def test_step_by_step_and_chunked_feeding_equal_the_whole_sequence(tiny_model, tuned_state):
  tokens = np.random.default_rng(3).integers(1, CFG.vocab_size, 13)
  whole_logits, whole_state = tiny_model.forward(tokens, tuned_state)
  chunked_logits, _ = generate.feed(tiny_model, tokens, tuned_state)  # 8 + 4 + 1
  state = tuned_state
  for token in tokens:
    step_logits, state = generate.feed(tiny_model, [token], state)
  scale = np.abs(np.asarray(whole_logits[-1])).max()
  assert np.abs(step_logits - whole_logits[-1]).max() < 2e-4 * scale
  assert np.abs(chunked_logits - whole_logits[-1]).max() < 2e-4 * scale
  # One token at a time runs the sequential recurrence, a whole sequence the chunked form: two fp32
  # summation orders, which differ by ~1e-6 of the state's largest entry (seen up to 1.7e-6).
  np.testing.assert_allclose(state.wkv, whole_state.wkv, rtol=0, atol=1e-5 * np.abs(whole_state.wkv).max())


def test_prompt_chunks_are_powers_of_two():
  assert generate.power_of_two_chunks(13) == [8, 4, 1]
  assert generate.power_of_two_chunks(2 * generate.MAX_PROMPT_CHUNK + 3) == [generate.MAX_PROMPT_CHUNK] * 2 + [2, 1]


def test_repetition_penalty_stops_repeats(tiny_model):
  sampling = generate.Sampling(temperature=0, repetition_penalty=1e6)
  tokens, _ = generate.generate(tiny_model, PROMPT, None, sampling, 12)
  assert len(set(tokens)) == len(tokens) == 12


def test_stream_prints_a_split_character_whole():
  byte_token = {tokenizer.decode_bytes([i]): i for i in range(1, 300)}
  out = io.StringIO()
  stream = generate.TextStream(out)
  printed = []
  for byte in '中'.encode():
    stream(byte_token[bytes([byte])])
    printed.append(out.getvalue())
  assert printed == ['', '', '中']


def log_softmax(logits):
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_mean_loss_is_the_cross_entropy_of_the_model(files, tiny_model):
  token_data = data.load_data(str(files['data']))
  sampler = evaluate.eval_sampler(token_data, ctx_len=24, batch_size=4, max_batches=2)
  wkv_LxHxVxK = state_io.read_state(files['state'], tiny_model.cfg)
  loss, count = evaluate.mean_loss(tiny_model, evaluate.eval_batches(sampler), wkv_LxHxVxK)

  total, expected_count = 0.0, 0
  for inputs_BxT, targets_BxT in evaluate.eval_batches(sampler):
    state = initial_state(wkv_LxHxVxK, tiny_model.cfg.n_embd, inputs_BxT.shape[0])
    logits_BxTxV, _ = tiny_model.forward(inputs_BxT, state)
    log_probs = log_softmax(np.asarray(logits_BxTxV, np.float64))
    valid = targets_BxT != data.IGNORE_INDEX
    total -= np.take_along_axis(log_probs, np.where(valid, targets_BxT, 0)[..., None], -1)[..., 0][valid].sum()
    expected_count += valid.sum()
  assert count == expected_count > 0
  np.testing.assert_allclose(loss, total / expected_count, rtol=1e-5)
  base_loss, _ = evaluate.mean_loss(tiny_model, evaluate.eval_batches(sampler))
  assert abs(base_loss - loss) > 1e-3  # the state is used


def run_module(module, *args, stdin=None):
  return subprocess.Popen([sys.executable, '-m', module, *map(str, args)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), stdin


def finish(process_and_stdin):
  process, stdin = process_and_stdin
  out, err = process.communicate(stdin)
  return process.returncode, out, err


def test_command_lines_end_to_end(files):
  """Fresh interpreters, run side by side to keep the test short."""
  launched = [
      run_module('rwkv_jax.generate', '--ckpt', files['model'], '--state', files['state'],
                 '--prompt', 'User: hi\\n\\nAssistant:', '--max_tokens', 5, '--seed', 1),
      run_module('rwkv_jax.generate', '--ckpt', files['model'], '--chat', '--max_tokens', 4,
                 '--temperature', 0, stdin='first question\nsecond question\n'),
      run_module('rwkv_jax.evaluate', '--ckpt', files['model'], '--data', files['data'], '--state',
                 files['state'], '--ctx_len', 16, '--batch_size', 4, '--max_batches', 1),
  ]
  (gen_rc, gen_out, gen_err), (chat_rc, chat_out, chat_err), (eval_rc, eval_out, eval_err) = map(finish, launched)
  assert gen_rc == 0, gen_err
  assert gen_out.startswith('User: hi\n\nAssistant:')
  assert chat_rc == 0, chat_err
  assert chat_out.startswith('User: first question\n\nAssistant:')
  assert '\nUser: second question\n\nAssistant:' in chat_out
  assert eval_rc == 0, eval_err
  assert evaluate.BASE_LABEL in eval_out and 'rwkv-0.pth' in eval_out and 'ppl' in eval_out


@pytest.mark.parametrize('module, argv, fragments', [
    (generate, ['--ckpt', 'missing.pth', '--prompt', 'hi'], ('missing.pth', 'no such file')),
    (generate, ['--ckpt', 'MODEL'], ('--prompt is required',)),
    (generate, ['--ckpt', 'MODEL', '--state', 'OTHER', '--prompt', 'hi'],
     ('other.pth', '3 layers', 'another base model')),
    (evaluate, ['--ckpt', 'MODEL', '--data', 'missing.jsonl'], ('missing.jsonl', 'not found')),
    (evaluate, ['--ckpt', 'MODEL', '--data', 'DATA', '--state', 'OTHER'], ('other.pth', 'another base model')),
])
def test_bad_input_is_one_line(files, capsys, module, argv, fragments):
  names = {'MODEL': files['model'], 'DATA': files['data'], 'OTHER': files['other_state']}
  with pytest.raises(SystemExit) as exit_info:
    cli.run(module.main, [str(names.get(a, a)) for a in argv])
  assert_one_line_error(exit_info.value.code, capsys.readouterr().err, *fragments)
