"""RWKV-PEFT's newest command lines run unchanged: its state-tuning scripts (E2 `--train_type state`,
E3 `--peft state`), its SFT data path (`--data_type sft`, loss on the answers only), W&B logging
(`--wandb`, offline), and one-line refusals for what this tool does not do."""
import json
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import train_state
from rwkv_jax import checkpoint, cli, data, peft_flags, sft, tokenizer
from tests.conftest import assert_one_line_error

WORDS = ('red', 'blue', 'seven', 'river', 'stone', 'cloud', 'music', 'bread', 'winter', 'lamp')


def run_train(*args, env=None):
  return subprocess.run([sys.executable, 'train_state.py', *map(str, args)], capture_output=True, text=True,
                        env={**os.environ, **(env or {})})


def offline_env(tmp_path):
  """Keeps W&B and Hugging Face files under tmp_path, and both off the network."""
  return {'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true', 'WANDB_CONFIG_DIR': str(tmp_path / 'wandb_config'),
          'WANDB_CACHE_DIR': str(tmp_path / 'wandb_cache'), 'WANDB_DATA_DIR': str(tmp_path / 'wandb_data'),
          'HF_HOME': str(tmp_path / 'hf'), 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}


def random_pairs(n):
  """n (query, response) pairs of random words: fresh every run."""
  rng = np.random.default_rng()
  phrase = lambda: ' '.join(rng.choice(WORDS, rng.integers(1, 6)))
  return [(f'what comes after {phrase()}?', phrase()) for _ in range(n)]


def write_jsonl(path, pairs):
  path.write_text(''.join(json.dumps({'query': q, 'response': r}) + '\n' for q, r in pairs))
  return path


def write_parquet_folder(folder, pairs):
  folder.mkdir()
  pd.DataFrame({'query': [q for q, _ in pairs], 'response': [r for _, r in pairs]}).to_parquet(folder / 'train.parquet')
  return folder


@pytest.fixture
def binidx_data(tmp_path):
  """RWKV-PEFT's data format for its scripts: an int32 binidx of chat documents."""
  docs = [tokenizer.encode(f'User: {q}\n\nAssistant: {r}') + [tokenizer.END_OF_DOC] for q, r in random_pairs(32)]
  prefix = tmp_path / 'demo_text_document'
  data.write_binidx(str(prefix), [np.array(d) for d in docs], np.int32)
  return prefix


# ---------------------------------------------------------------------------------------------
# The scripts' command lines, with paths, sizes and version swapped for a tiny x060 model


def e2_script(model, data_file, proj):  # scripts/demo-state-tuning.sh of mid-2025
  return ['--load_model', model, '--proj_dir', proj, '--data_file', data_file, '--vocab_size', 65536,
          '--n_layer', 2, '--n_embd', 128, '--data_type', 'binidx', '--dataload', 'pad', '--loss_mask', 'pad',
          '--ctx_len', 32, '--micro_bsz', 2, '--epoch_steps', 4, '--epoch_count', 1, '--epoch_begin', 0,
          '--epoch_save', 1, '--lr_init', 1, '--lr_final', 1e-2, '--warmup_steps', 0, '--beta1', 0.9,
          '--beta2', 0.99, '--adam_eps', 1e-8, '--accelerator', 'gpu', '--devices', 1, '--precision', 'bf16',
          '--strategy', 'deepspeed_stage_1', '--grad_cp', 1, '--my_testing', 'x060', '--train_type', 'state',
          '--op', 'fla']


def e3_script(model, data_file, proj):  # scripts/state tuning.sh of 2026
  return ['--load_model', model, '--proj_dir', proj, '--data_file', data_file, '--vocab_size', 65536,
          '--data_type', 'binidx', '--n_layer', 2, '--n_embd', 128, '--ctx_len', 32, '--micro_bsz', 2,
          '--epoch_steps', 4, '--epoch_count', 1, '--epoch_save', 1, '--lr_init', 1e-5, '--lr_final', 1e-5,
          '--accelerator', 'gpu', '--precision', 'bf16', '--devices', 1, '--strategy', 'deepspeed_stage_1',
          '--grad_cp', 1, '--my_testing', 'x060', '--peft', 'state', '--op', 'fla']


@pytest.mark.parametrize('script', [e2_script, e3_script], ids=['mid-2025', '2026'])
def test_state_tuning_scripts_run_unchanged(write_checkpoint, binidx_data, tmp_path, script):
  """RWKV-PEFT's state-tuning scripts of both generations (the 2024 one: tests/test_train.py)."""
  result = run_train(*script(write_checkpoint(), binidx_data, tmp_path / 'out'))
  assert result.returncode == 0, result.stderr
  assert 'note: --accelerator --strategy --op do nothing here' in result.stdout, result.stdout
  state = torch.load(tmp_path / 'out' / 'rwkv-0.pth', weights_only=True)
  assert list(state) == ['blocks.0.att.time_state', 'blocks.1.att.time_state']
  assert len((tmp_path / 'out' / 'loss_data.jsonl').read_text().splitlines()) == 4


def test_mid_2025_script_keeps_rwkv_peft_meaning(write_checkpoint, binidx_data, tmp_path, capsys):
  """E2's flags arrive with RWKV-PEFT's meaning (--loss_mask pad, --warmup_steps 0 ...)."""
  model = write_checkpoint()
  args = train_state.build_parser().parse_args([str(a) for a in e2_script(model, binidx_data, tmp_path / 'out')])
  train_state.check_args(args, checkpoint.load_model(str(model)).cfg)
  assert (args.ckpt, args.data, args.data_type) == (str(model), str(binidx_data), 'binidx')
  assert (args.train_type, args.loss_mask, args.warmup_steps, args.lr_init, args.precision) == ('state', 'pad', 0, 1.0,
                                                                                                 'bf16')


def test_every_flag_of_rwkv_peft_is_known():
  """The 81 flags of RWKV-PEFT's newest train.py, each in exactly one kind."""
  newest = ('load_model wandb proj_dir random_seed data_file data_type vocab_size ctx_len epoch_steps epoch_count '
            'epoch_begin epoch_save micro_bsz n_layer n_embd dim_att dim_ffn pre_ffn head_qk tiny_att_dim '
            'tiny_att_layer lr_init lr_final warmup_steps beta1 beta2 adam_eps grad_cp dropout weight_decay '
            'weight_decay_final my_pile_version my_pile_stage my_pile_shift my_pile_edecay layerwise_lr ds_bucket_mb '
            'my_sample_len my_ffn_shift my_att_shift head_size_a head_size_divisor my_pos_emb load_partial '
            'magic_prime my_qa_mask my_random_steps my_testing my_exit my_exit_tokens peft train_parts lora_config '
            'peft_config pissa_config miss_config merge quant dataload chunk_ctx fla train_type loss_mask mask_id '
            'data_shuffle optimizer avg_loss sft_field sft_split op fused_kernel lr_schedule accelerator strategy '
            'devices num_nodes precision accumulate_grad_batches num_workers persistent_workers '
            'prefetch_factor').split()
  assert len(newest) == len(set(newest)) == 81
  kinds = [set(peft_flags.OWN), {m.name for m in peft_flags.MAPPED} | {'sft_field'}, set(peft_flags.IGNORED)]
  for flag in newest:
    assert sum(flag in kind for kind in kinds) == 1, flag
  parser = train_state.build_parser()
  dests = {action.dest for action in parser._actions} | {'load_model', 'data_file'}  # --ckpt/--data aliases
  assert set(newest) <= dests, set(newest) - dests


# ---------------------------------------------------------------------------------------------
# --data_type sft


def kept_target_text(batch_targets):
  """The text of each row's targets that take a loss."""
  return [tokenizer.decode([int(t) for t in row if t != data.IGNORE_INDEX]) for row in batch_targets]


def test_sft_jsonl_and_parquet_give_the_same_documents_with_loss_on_answers_only(tmp_path):
  pairs = random_pairs(12)
  from_jsonl = sft.build(str(write_jsonl(tmp_path / 'qa.jsonl', pairs)), 'train', ['query', 'response'])
  from_parquet = sft.build(str(write_parquet_folder(tmp_path / 'qa', pairs)), 'train', ['query', 'response'])
  a, b = data.load_data(from_jsonl, 'binidx'), data.load_data(from_parquet, 'binidx')
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  assert a.num_docs == len(pairs)
  for (q, r), start, length in zip(pairs, a.doc_starts, a.doc_lens):
    doc = [int(t) for t in a.tokens[start:start + length]]
    assert tokenizer.decode(doc) == f'User: {q}\n\nAssistant: {r}' and doc[-1] == tokenizer.END_OF_DOC
  # What the trainer samples: a target is kept exactly where it is a token of the answer, the
  # final END_OF_DOC included.
  sampler = data.Sampler(a, ctx_len=64, batch_size=4, dataload='pad', epoch_steps=3, shuffle=False)
  for step in range(3):
    _, targets_BxT = sampler.batch(0, step)
    assert kept_target_text(targets_BxT) == [f' {r}' for _, r in pairs[step * 4:(step + 1) * 4]]
    assert all(row[row != data.IGNORE_INDEX][-1] == tokenizer.END_OF_DOC for row in targets_BxT)


def test_sft_alpaca_template_takes_the_loss_on_the_responses_only(tmp_path):
  pairs = random_pairs(6)
  prefix = sft.build(str(write_jsonl(tmp_path / 'qa.jsonl', pairs)), 'train', ['query', 'response'], 'alpaca')
  tokens = data.load_data(prefix, 'binidx')
  for (q, _), doc_start in zip(pairs, tokens.doc_starts):
    prompt = tokenizer.decode([int(t) for t in tokens.tokens[doc_start:doc_start + 80]])
    assert prompt.startswith('Below is an instruction') and f'### Instruction:\n{q}\n\n### Response:' in prompt
  sampler = data.Sampler(tokens, ctx_len=96, batch_size=3, dataload='pad', epoch_steps=2, shuffle=False)
  for step in range(2):
    _, targets_BxT = sampler.batch(0, step)
    assert kept_target_text(targets_BxT) == [f'{r}\n\x17' for _, r in pairs[step * 3:(step + 1) * 3]]


def test_sft_cache_is_rebuilt_when_the_data_or_columns_change(tmp_path):
  path = write_jsonl(tmp_path / 'qa.jsonl', random_pairs(3))
  prefix = sft.build(str(path), 'train', ['query', 'response'])
  built = os.stat(prefix + '.bin').st_mtime_ns
  assert sft.build(str(path), 'train', ['query', 'response']) == prefix
  assert os.stat(prefix + '.bin').st_mtime_ns == built  # fresh: not tokenized again
  sft.build(str(path), 'train', ['response', 'query'])
  swapped = data.load_data(prefix, 'binidx')
  first = tokenizer.decode([int(t) for t in swapped.tokens[:swapped.doc_lens[0]]])
  assert first.startswith(f'User: {json.loads(path.read_text().splitlines()[0])["response"]}\n')


def test_sft_script_trains_on_answers_and_logs_to_wandb_offline(write_checkpoint, tmp_path):
  """scripts/run_sft.sh's data and logging flags (its adapter swapped for --peft state) on a parquet
  folder; the offline W&B run holds every step, the epoch, the arguments and the state."""
  folder = write_parquet_folder(tmp_path / 'sft_data', random_pairs(16))
  held_out = tmp_path / 'held_out.jsonl'
  held_out.write_text(''.join(json.dumps({'text': f'User: {q}\n\nAssistant: {r}'}) + '\n' for q, r in random_pairs(4)))
  result = run_train(
      '--load_model', write_checkpoint(), '--proj_dir', tmp_path / 'out', '--data_file', folder,
      '--vocab_size', 65536, '--n_layer', 2, '--n_embd', 128, '--ctx_len', 32, '--micro_bsz', 2,
      '--epoch_steps', 6, '--epoch_count', 1, '--epoch_begin', 0, '--epoch_save', 1, '--lr_init', 1,
      '--lr_final', 1e-2, '--warmup_steps', 0, '--beta1', 0.9, '--beta2', 0.99, '--adam_eps', 1e-8,
      '--accelerator', 'gpu', '--devices', 1, '--precision', 'bf16', '--strategy', 'deepspeed_stage_1',
      '--grad_cp', 1, '--my_testing', 'x060', '--peft', 'state', '--data_type', 'sft',
      '--sft_field', 'query', 'response', '--sft_split', 'train', '--wandb', 'DiSHA',
      '--eval_data', held_out, '--eval_batches', 1, env=offline_env(tmp_path))
  assert result.returncode == 0, result.stderr
  assert (tmp_path / 'sft_data.sft.bin').exists() and (tmp_path / 'out' / 'rwkv-0.pth').exists()
  records = wandb_records(tmp_path / 'out')
  history = [r for kind, r in records if kind == 'history']
  steps = [h for h in history if 'loss' in h]
  assert [h['_step'] for h in steps] == list(range(1, 7))
  assert all(np.isfinite(h['loss']) and h['lr'] > 0 and h['tokens_per_s'] > 0 for h in steps)
  logged = [json.loads(l) for l in (tmp_path / 'out' / 'loss_data.jsonl').read_text().splitlines()]
  np.testing.assert_allclose([h['loss'] for h in steps], [l['loss'] for l in logged], rtol=1e-6)
  epoch = [h for h in history if 'epoch_loss' in h]
  assert len(epoch) == 1 and epoch[0]['epoch_loss'] == pytest.approx(np.mean([l['loss'] for l in logged]), rel=1e-6)
  epoch_line = (tmp_path / 'out' / 'train_log.txt').read_text().splitlines()[-1]
  assert epoch[0]['eval_loss'] == pytest.approx(float(epoch_line.split('eval_loss ')[1]), abs=1e-6)
  config = next(r for kind, r in records if kind == 'config')
  assert config['sft_field'] == ['query', 'response'] and config['ctx_len'] == 32
  artifact = next(r for kind, r in records if kind == 'artifact')
  assert artifact['type'] == 'model' and artifact['files'] == ['rwkv-0.pth']


def wandb_records(proj: pathlib.Path):
  """(kind, contents) of the records of the offline run under proj/wandb: history rows as dicts,
  the run's config as a dict, artifacts as {type, files}.

  The .wandb file is a LevelDB log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of
  chunks, each a 7-byte header (crc32, length, type: 1 whole record, 2 first, 3 middle, 4 last
  chunk) and its bytes; the records are protobufs of wandb's own schema.
  """
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  (path,) = proj.glob('wandb/offline-run-*/run-*.wandb')
  raw, block = path.read_bytes(), 32768
  assert raw[:4] == b':W&B'
  position, pending, records = 7, b'', []
  while position + 7 <= len(raw):
    if block - position % block < 7:  # a block's tail too short for a header is padding
      position += block - position % block
      continue
    _, length, chunk_type = struct.unpack('<IHB', raw[position:position + 7])
    pending += raw[position + 7:position + 7 + length]
    position += 7 + length
    if chunk_type in (1, 4):
      record = wandb_internal_pb2.Record.FromString(pending)
      pending = b''
      kind = record.WhichOneof('record_type')
      if kind == 'history':
        records.append((kind, {i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in record.history.item}))
      elif kind == 'run':  # its config holds the arguments
        records.append(('config', {i.key: json.loads(i.value_json) for i in record.run.config.update}))
      elif kind == 'artifact':
        records.append((kind, {'type': record.artifact.type,
                               'files': [c.path for c in record.artifact.manifest.contents]}))
  return records


# ---------------------------------------------------------------------------------------------
# Refusals


def test_what_this_tool_does_not_do_is_refused_in_one_line(write_checkpoint, tmp_path, capsys, monkeypatch):
  model = write_checkpoint()
  pairs = write_jsonl(tmp_path / 'qa.jsonl', random_pairs(4))
  for name, value in offline_env(tmp_path).items():
    monkeypatch.setenv(name, value)
  base = ['--load_model', model, '--data_file', pairs, '--ctx_len', 16, '--proj_dir', tmp_path / 'o']
  sft_args = [*base, '--data_type', 'sft']
  cases = [
      (['--peft', 'lora'], '--peft lora: rwkv-jax tunes states only'),
      (['--peft', 'pissa'], 'use --peft state'),
      (['--train_type', 'infctx'], '--train_type infctx'),
      (['--train_type', 'none'], 'use --train_type state (or --peft state)'),
      (['--my_testing', 'x080'], 'unknown RWKV version'),
      (['--my_testing', 'x052'], 'does not match the checkpoint, an RWKV-6 (x060)'),
      (['--weight_decay', 0.1], 'no weight decay'),
      (['--optimizer', 'muon'], 'with Adam'),
      (['--dim_att', 256], '--dim_att 256 does not match the checkpoint (128)'),
  ]
  for extra, message in cases:
    with pytest.raises(SystemExit) as exit_info:
      cli.run(train_state.main, [str(a) for a in base + extra])
    assert_one_line_error(exit_info.value.code, capsys.readouterr().err, message)
  sft_cases = [
      (['--sft_field', 'query'], '--sft_field takes two column names'),
      (['--sft_field', 'query', 'answer'], 'has no column "answer" (columns: query, response)'),
      (['--sft_field', 'query', 'response', '--sft_split', 'test'], 'has no split "test" (it has: train)'),
  ]
  broken = tmp_path / 'broken.jsonl'
  broken.write_text(pairs.read_text() + '{"query": "no closing brace"\n')
  sft_cases.append((['--data_file', broken, '--sft_field', 'query', 'response'], 'the datasets library cannot read it'))
  for extra, message in sft_cases:
    with pytest.raises(SystemExit) as exit_info:
      cli.run(train_state.main, [str(a) for a in sft_args + extra])
    assert_one_line_error(exit_info.value.code, capsys.readouterr().err, message)
  monkeypatch.setitem(sys.modules, 'wandb', None)  # as if not installed: importing it raises ImportError
  with pytest.raises(SystemExit) as exit_info:
    cli.run(train_state.main, [str(a) for a in base + ['--wandb', 'project']])
  assert_one_line_error(exit_info.value.code, capsys.readouterr().err, 'pip install "rwkv-jax[wandb]"')
