"""Tests for the World tokenizer, binidx/jsonl/text loading, the samplers and make_data."""

import json
import os
import pathlib
import random
import struct
import subprocess
import sys

import numpy as np
import pytest

from rwkv_jax import data
from rwkv_jax import tokenizer
from rwkv_jax.errors import UserError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
IGNORE = data.IGNORE_INDEX


def _docs(lengths, first_id=1):
  """Documents whose tokens are consecutive ids and which end in END_OF_DOC, like real data."""
  docs, next_id = [], first_id
  for length in lengths:
    docs.append(np.concatenate([np.arange(next_id, next_id + length - 1), [0]]))
    next_id += length - 1
  return docs


def _binidx(tmp_path, docs, dtype=np.uint16, name='data'):
  prefix = str(tmp_path / name)
  data.write_binidx(prefix, docs, dtype)
  return prefix


def _write_jsonl(path, texts):
  path.write_text(''.join(json.dumps({'text': text}) + '\n' for text in texts), encoding='utf-8')


# ---------------------------------------------------------------------------------------------
# Tokenizer


@pytest.fixture(scope='module')
def trie_tokenizer():
  rwkv_tokenizer = pytest.importorskip('rwkv.rwkv_tokenizer')
  vocab = pathlib.Path(rwkv_tokenizer.__file__).with_name('rwkv_vocab_v20230424.txt')
  return rwkv_tokenizer.TRIE_TOKENIZER(str(vocab))


def test_tokenizer_known_examples():
  assert tokenizer.encode('\n\n') == [261]
  assert tokenizer.encode('Hello world') == [33155, 40213]
  assert tokenizer.encode('User: hi\n\nAssistant:') == [24281, 59, 4571, 261, 5585, 41693, 59]


def test_tokenizer_matches_rwkv_pip_package(trie_tokenizer):
  rng = random.Random(0)
  alphabet = list('abcxyz ABC,.!?\n\t你好世界的一éßЖ') + ['😀', '🚀']
  texts = ['', 'The quick brown fox.', '中文和English混合 😀!', 'def f(x):\n    return x\n']
  texts += [''.join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(50)]
  for text in texts:
    ids = tokenizer.encode(text)
    assert ids == trie_tokenizer.encode(text), text
    assert tokenizer.decode(ids) == text
  assert tokenizer.encode_batch(texts) == [trie_tokenizer.encode(text) for text in texts]
  ids = [rng.randint(1, 65529) for _ in range(2000)]
  assert tokenizer.decode_bytes(ids) == trie_tokenizer.decodeBytes(ids)


def test_decode_never_raises():
  partial_char = tokenizer.encode('😀')[:1]
  assert tokenizer.decode([33155] + partial_char) == 'Hello\ufffd'
  assert tokenizer.decode([0, 33155, 0]) == 'Hello'  # END_OF_DOC is not text
  assert tokenizer.decode([65535, 65530, -1, 10**6]) == ''


# ---------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize('dtype, code', [(np.uint16, 8), (np.int32, 4)])
def test_binidx_round_trip(tmp_path, dtype, code):
  docs = _docs([5, 1, 9, 3])
  prefix = _binidx(tmp_path, docs, dtype)
  header = pathlib.Path(prefix + '.idx').read_bytes()[:34]
  assert struct.unpack('<9sQBQQ', header) == (b'MMIDIDX\x00\x00', 1, code, 4, 5)
  for path in (prefix, prefix + '.bin', prefix + '.idx'):
    loaded = data.load_data(path)
    assert loaded.tokens.dtype == dtype
    np.testing.assert_array_equal(loaded.tokens, np.concatenate(docs))
    np.testing.assert_array_equal(loaded.doc_lens, [5, 1, 9, 3])
    np.testing.assert_array_equal(loaded.doc_starts, [0, 5, 6, 15])


def test_jsonl_tokenized_and_cached(tmp_path):
  jsonl = tmp_path / 'chat.jsonl'
  texts = ['User: hi\n\nAssistant: hello', '你好 😀']
  lines = [json.dumps({'text': texts[0]}), '', '  ', json.dumps({'text': texts[1]})]
  jsonl.write_text('\n'.join(lines) + '\n')  # blank lines are skipped
  loaded = data.load_data(str(jsonl))
  expected = [tokenizer.encode(text) + [0] for text in texts]
  np.testing.assert_array_equal(loaded.tokens, sum(expected, []))
  np.testing.assert_array_equal(loaded.doc_lens, [len(ids) for ids in expected])
  assert loaded.source == str(jsonl)
  cache_bin = pathlib.Path(str(jsonl) + '.tokens.bin')
  built_at = cache_bin.stat().st_mtime_ns
  os.utime(cache_bin, ns=(built_at - 10**9, built_at - 10**9))  # mark the file so a rebuild shows
  data.load_data(str(jsonl))
  assert cache_bin.stat().st_mtime_ns == built_at - 10**9  # reused

  _write_jsonl(jsonl, texts + ['third'])  # size changes
  assert data.load_data(str(jsonl)).num_docs == 3
  _write_jsonl(jsonl, texts + ['fifth'])  # same size, newer file
  stat = jsonl.stat()
  os.utime(jsonl, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  np.testing.assert_array_equal(data.load_data(str(jsonl)).tokens[-2:],
                                tokenizer.encode('fifth')[-1:] + [0])


def test_text_file_is_one_document(tmp_path):
  text_path = tmp_path / 'novel.txt'
  text = 'Once upon a time.\n\n从前有座山。' * 20
  text_path.write_text(text, encoding='utf-8')
  loaded = data.load_data(str(text_path))
  np.testing.assert_array_equal(loaded.tokens, tokenizer.encode(text))
  assert loaded.num_docs == 1


def test_demo_data_loads(tmp_path):
  demo_jsonl = tmp_path / 'demo.jsonl'  # a copy, so the token cache stays out of the package
  demo_jsonl.write_bytes((REPO_ROOT / 'rwkv_jax/demo_data/demo.jsonl').read_bytes())
  demo = data.load_data(str(demo_jsonl))
  assert demo.num_docs >= 300


# ---------------------------------------------------------------------------------------------
# Sampling


def test_pad_reads_from_document_start_and_masks_past_its_end(tmp_path):
  lengths = [3, 12, 5, 1, 7]
  loaded = data.load_data(_binidx(tmp_path, _docs(lengths)))
  flat = np.asarray(loaded.tokens)
  ctx_len = 8
  sampler = data.Sampler(loaded, ctx_len, batch_size=5, epoch_steps=1, shuffle=False)
  inputs, targets = sampler.batch(0, 0)
  assert inputs.dtype == targets.dtype == np.int32 and inputs.shape == (5, ctx_len)
  for doc, length in enumerate(lengths):
    window = np.take(flat, loaded.doc_starts[doc] + np.arange(ctx_len + 1), mode='wrap')
    np.testing.assert_array_equal(inputs[doc], window[:-1])  # runs into the next documents
    kept = min(length, ctx_len + 1) - 1
    np.testing.assert_array_equal(targets[doc, :kept], window[1:kept + 1])
    assert np.all(targets[doc, kept:] == IGNORE)
    if 1 < length <= ctx_len + 1:
      assert targets[doc, kept - 1] == 0  # the end of the document is learned
  assert np.all(targets[3] == IGNORE)  # a document of only END_OF_DOC has nothing to predict


def test_pad_shuffles_per_epoch_deterministically(tmp_path):
  loaded = data.load_data(_binidx(tmp_path, _docs([4] * 30)))
  make = lambda seed: data.Sampler(loaded, 3, batch_size=4, epoch_steps=6, seed=seed)
  first_docs = lambda sampler, epoch: np.concatenate(
      [sampler.batch(epoch, step)[0][:, 0] for step in range(6)])
  epoch0 = first_docs(make(0), 0)
  # Each epoch is a permutation of the first epoch_steps*batch documents (24 of the 30).
  np.testing.assert_array_equal(np.sort(epoch0), loaded.tokens[loaded.doc_starts[:24]])
  np.testing.assert_array_equal(first_docs(make(0), 0), epoch0)
  np.testing.assert_array_equal(make(0).batch(0, 3)[1], make(0).batch(0, 3)[1])
  assert not np.array_equal(first_docs(make(0), 1), epoch0)
  assert not np.array_equal(first_docs(make(1), 0), epoch0)


def test_only_pads_inputs_with_end_of_doc(tmp_path):
  loaded = data.load_data(_binidx(tmp_path, _docs([4, 20])))
  inputs, targets = data.Sampler(loaded, 6, 2, dataload='only', epoch_steps=1,
                                 shuffle=False).batch(0, 0)
  np.testing.assert_array_equal(inputs[0], [1, 2, 3, 0, 0, 0])
  np.testing.assert_array_equal(targets[0], [2, 3, 0, IGNORE, IGNORE, IGNORE])
  np.testing.assert_array_equal(inputs[1], np.arange(4, 10))
  np.testing.assert_array_equal(targets[1], np.arange(5, 11))


def test_get_takes_unmasked_windows(tmp_path):
  loaded = data.load_data(_binidx(tmp_path, _docs([50, 30]), np.int32))
  sampler = data.Sampler(loaded, 16, 8, dataload='get', seed=3)
  inputs, targets = sampler.batch(2, 5)
  assert np.all(targets != IGNORE)
  all_windows = np.lib.stride_tricks.sliding_window_view(np.asarray(loaded.tokens), 17)
  for row_inputs, row_targets in zip(inputs, targets):
    np.testing.assert_array_equal(row_inputs[1:], row_targets[:-1])
    window = np.append(row_inputs, row_targets[-1])
    assert np.any(np.all(all_windows == window, axis=1))  # a contiguous slice of the data
  again = data.Sampler(loaded, 16, 8, dataload='get', seed=3).batch(2, 5)
  np.testing.assert_array_equal(again[0], inputs)
  assert not np.array_equal(sampler.batch(2, 6)[0], inputs)


def test_qa_mask_keeps_only_answers(tmp_path):
  chat = tokenizer.encode('User: hi\n\nAssistant: yes\n\nUser: q\n\nAssistant: no')
  plain = tokenizer.encode('just some text without any turns')
  loaded = data.load_data(_binidx(tmp_path, [chat + [0], plain + [0]]))
  ctx_len = len(chat) + 4
  _, targets = data.Sampler(loaded, ctx_len, 2, epoch_steps=1, shuffle=False,
                            loss_mask='qa').batch(0, 0)
  window = chat + [0]
  kept_text = tokenizer.decode([window[j + 1] for j in np.flatnonzero(targets[0] != IGNORE)])
  assert kept_text == ' yes\n\n no'
  np.testing.assert_array_equal(targets[1, :len(plain)], plain[1:] + [0])  # no turns: all kept


# ---------------------------------------------------------------------------------------------
# Bad input


def _raises(match):
  return pytest.raises(UserError, match=match)


def test_missing_files(tmp_path):
  with _raises('not found'):
    data.load_data(str(tmp_path / 'nothing'))
  with _raises('not found'):
    data.load_data(str(tmp_path / 'nothing.jsonl'))
  prefix = _binidx(tmp_path, _docs([3]))
  os.remove(prefix + '.idx')
  with _raises(r'data\.idx not found'):
    data.load_data(prefix)


def test_corrupt_binidx(tmp_path):
  prefix = _binidx(tmp_path, _docs([30, 40]))
  bin_path, idx_path = pathlib.Path(prefix + '.bin'), pathlib.Path(prefix + '.idx')
  bin_path.write_bytes(bin_path.read_bytes()[:-10])
  with _raises(r'data\.bin is truncated'):
    data.load_data(prefix)
  idx_bytes = idx_path.read_bytes()
  idx_path.write_bytes(idx_bytes[:40])
  with _raises(r'data\.idx is truncated'):
    data.load_data(prefix)
  idx_path.write_bytes(b'PK' + idx_bytes[2:])
  with _raises('not a binidx index'):
    data.load_data(prefix)


def test_malformed_jsonl_names_the_line(tmp_path):
  jsonl = tmp_path / 'bad.jsonl'
  jsonl.write_text('{"text": "ok"}\n\n{"text": "unterminated}\n')
  with _raises(r'bad\.jsonl:3: not valid JSON') as error:
    data.load_data(str(jsonl))
  assert '\n' not in str(error.value)
  jsonl.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
  with _raises(r'bad\.jsonl:2: no string field "text"'):
    data.load_data(str(jsonl))


def test_token_id_outside_vocab(tmp_path):
  prefix = _binidx(tmp_path, [np.array([5, 70000, 0])], np.int32)
  with _raises('token id 70000 at token 1 is outside the model vocabulary 0..65535'):
    data.load_data(prefix)
  with _raises('token id 4000 at token 3'):
    data.load_data(_binidx(tmp_path, [np.array([1, 2, 3, 4000])], name='small'), vocab_size=1000)


def test_too_little_data(tmp_path):
  loaded = data.load_data(_binidx(tmp_path, _docs([5] * 10)))
  with _raises(r'has 10 documents but .* needs .* = 12; repeat the data'):
    data.Sampler(loaded, 8, batch_size=4, epoch_steps=3)
  with _raises('fewer than --ctx_len'):
    data.Sampler(loaded, 50, batch_size=4, dataload='get')
  with _raises('--dataload fetch is not supported'):
    data.Sampler(loaded, 8, batch_size=1, dataload='fetch')


# ---------------------------------------------------------------------------------------------
# make_data


def _make_data(*args):
  return subprocess.run([sys.executable, '-m', 'rwkv_jax.make_data', *map(str, args)],
                        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)


def test_make_data_round_trip(tmp_path):
  texts = ['User: a\n\nAssistant: b', 'second line', '第三 😀']
  jsonl = tmp_path / 'novel.jsonl'
  jsonl.write_text('\n'.join(json.dumps({'text': text}) for text in texts) + '\n\n')
  result = _make_data(jsonl, 4, 512)
  assert result.returncode == 0, result.stderr
  assert '12 documents' in result.stdout and '--ctx_len 512' in result.stdout
  loaded = data.load_data(str(tmp_path / 'novel'))
  assert loaded.tokens.dtype == np.uint16
  docs = [tuple(loaded.tokens[start:start + length])
          for start, length in zip(loaded.doc_starts, loaded.doc_lens)]
  expected = [tuple(tokenizer.encode(text) + [0]) for text in texts]
  for copy in range(4):  # each copy holds every line once, in its own order
    assert sorted(docs[copy * 3:copy * 3 + 3]) == sorted(expected)
  assert f'{loaded.num_tokens} tokens' in result.stdout


def test_make_data_bad_input_is_one_line(tmp_path):
  jsonl = tmp_path / 'bad.jsonl'
  jsonl.write_text('{"text": "ok"}\nnot json\n')
  result = _make_data(jsonl, 2, 512)
  assert result.returncode == 2
  assert result.stderr.startswith('error: ') and 'bad.jsonl:2:' in result.stderr
  assert result.stderr.count('\n') == 1 and 'Traceback' not in result.stderr
