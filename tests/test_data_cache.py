"""Tests for building the token cache of a jsonl or text file: streamed in blocks, on several
processes, identical to encoding the whole file at once, never trusted when cut short."""

import json
import os
import pathlib
import random
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest

from rwkv_jax import data
from rwkv_jax import make_data
from rwkv_jax import tokenizer
from rwkv_jax.errors import UserError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_ALPHABET = list('abcxyz ABC,.!?\n\t\r你好世界的一éßЖ')
_ALPHABET += ['😀', '🚀', '\n\n', '    ', 'User: ', 'Assistant:']


def _random_text(rng: random.Random, max_pieces: int) -> str:
  return ''.join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, max_pieces)))


def _chat_jsonl(path: pathlib.Path, num_lines: int, seed: int) -> list[str]:
  """Writes a jsonl of random texts with some blank lines; returns the texts of the data lines."""
  rng, texts, lines = random.Random(seed), [], []
  for _ in range(num_lines):
    if rng.random() < 0.1:
      lines.append(rng.choice(['', '  ', '\t']))
    else:
      texts.append(_random_text(rng, 40))
      lines.append(json.dumps({'text': texts[-1]}, ensure_ascii=rng.random() < 0.5))
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return texts


def _expected_binidx_bytes(docs: list[list[int]]) -> tuple[bytes, bytes]:
  """The .bin and .idx bytes of uint16 documents in the MMIDIDX layout, written out by hand."""
  sizes = np.array([len(doc) for doc in docs], '<i4')
  pointers = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype('<i8') * 2
  idx = struct.pack('<9sQBQQ', b'MMIDIDX\x00\x00', 1, 8, len(docs), len(docs) + 1)
  idx += sizes.tobytes() + pointers.tobytes() + np.arange(len(docs) + 1, dtype='<i8').tobytes()
  return np.array(sum(docs, []), '<u2').tobytes(), idx


BLOCK_BYTES = 200  # so that a small file is cut into many blocks


@pytest.fixture
def small_blocks(monkeypatch):
  monkeypatch.setattr(data, '_BLOCK_BYTES', BLOCK_BYTES)


@pytest.mark.parametrize('workers', [1, 2])
def test_jsonl_cache_is_the_whole_file_encoded(tmp_path, small_blocks, workers):
  jsonl = tmp_path / 'chat.jsonl'
  texts = _chat_jsonl(jsonl, 300, seed=random.randrange(10**6))
  assert len(list(data._jsonl_blocks(str(jsonl), data._BLOCK_BYTES))) > 20
  data._build_cache(str(jsonl), str(tmp_path / 'cache'), 'jsonl', workers, BLOCK_BYTES)
  # Encoding every text on its own, each followed by END_OF_DOC, as the cache always has.
  expected_bin, expected_idx = _expected_binidx_bytes([tokenizer.encode(t) + [0] for t in texts])
  assert (tmp_path / 'cache.bin').read_bytes() == expected_bin
  assert (tmp_path / 'cache.idx').read_bytes() == expected_idx
  assert sorted(os.listdir(tmp_path)) == ['cache.bin', 'cache.idx', 'chat.jsonl']


def test_text_blocks_join_up_to_the_whole_encoding(tmp_path, small_blocks):
  rng = random.Random()
  pieces = [_random_text(rng, 30) for _ in range(120)]
  pieces.insert(60, ' ' * 700)  # a run with nowhere to cut for longer than a block
  text = ''.join(pieces)
  text_path = tmp_path / 'novel.txt'
  text_path.write_text(text, encoding='utf-8', newline='')
  blocks = [block for block, _, _ in data._text_blocks(str(text_path), data._BLOCK_BYTES)]
  assert len(blocks) > 10 and b''.join(blocks) == text.encode('utf-8')
  assert max(map(len, blocks)) >= 700  # the run was not cut (a block may be exactly the run)
  data._build_cache(str(text_path), str(tmp_path / 'cache'), 'utf-8', 1, BLOCK_BYTES)
  loaded = data.read_binidx(str(tmp_path / 'cache'))
  np.testing.assert_array_equal(loaded.tokens, tokenizer.encode(text))
  np.testing.assert_array_equal(loaded.doc_lens, [loaded.num_tokens])


def test_unjoined_byte_pairs_are_token_boundaries():
  joined = tokenizer.joined_byte_pairs()
  assert joined[ord('\n'), ord('\n')] and not joined[ord('\n'), ord('x')]
  rng = random.Random()
  for _ in range(200):
    raw = _random_text(rng, 60).encode('utf-8')
    for cut in range(1, len(raw)):
      if not joined[raw[cut - 1], raw[cut]] and raw[cut] & 0xC0 != 0x80:
        left, right = raw[:cut].decode('utf-8'), raw[cut:].decode('utf-8')
        assert tokenizer.encode(left) + tokenizer.encode(right) == tokenizer.encode(left + right)


@pytest.mark.parametrize('workers', [1, 2])
def test_first_bad_line_is_named_in_any_block(tmp_path, small_blocks, workers):
  jsonl = tmp_path / 'bad.jsonl'
  lines = [json.dumps({'text': f'line {i}'}) for i in range(200)]
  lines[137] = '{"text": "unterminated}'
  lines[180] = '{"txt": "typo"}'  # a later block's error must not win
  jsonl.write_text('\n'.join(lines) + '\n')
  with pytest.raises(UserError, match=r'bad\.jsonl:138: not valid JSON'):
    data._build_cache(str(jsonl), str(tmp_path / 'cache'), 'jsonl', workers, BLOCK_BYTES)
  lines[137] = '{"text": "ok"}'
  jsonl.write_bytes('\n'.join(lines).encode().replace(b'line 99', b'line \xff9'))
  with pytest.raises(UserError, match=r'bad\.jsonl:100: not valid UTF-8'):
    data.load_data(str(jsonl))
  assert sorted(os.listdir(tmp_path)) == ['bad.jsonl']  # nothing a later run could trust


def test_interrupted_build_leaves_nothing(tmp_path, small_blocks, monkeypatch):
  jsonl = tmp_path / 'chat.jsonl'
  _chat_jsonl(jsonl, 100, seed=1)
  data.load_data(str(jsonl))
  cached = sorted(os.listdir(tmp_path))
  texts = _chat_jsonl(jsonl, 100, seed=2)
  in_order = data._in_order

  def interrupted_after_three_blocks(tokenize, blocks, workers):
    results = in_order(tokenize, blocks, 1)
    yield from (next(results) for _ in range(3))
    raise KeyboardInterrupt

  monkeypatch.setattr(data, '_in_order', interrupted_after_three_blocks)
  with pytest.raises(KeyboardInterrupt):
    data.load_data(str(jsonl))
  leftover = sorted(os.listdir(tmp_path))
  assert 'chat.jsonl.tokens.json' not in leftover and not any('.tmp' in f for f in leftover)
  assert set(leftover) <= set(cached)
  monkeypatch.setattr(data, '_in_order', in_order)
  np.testing.assert_array_equal(data.load_data(str(jsonl)).doc_lens,
                                [len(tokenizer.encode(text)) + 1 for text in texts])


_BUILD_UNTIL_KILLED = '''
import sys, time
from rwkv_jax import data
in_order = data._in_order
def hang_after_first_block(tokenize, blocks, workers):
  yield next(in_order(tokenize, blocks, 1))
  print('building', flush=True)
  time.sleep(600)
data._in_order = hang_after_first_block
data._BLOCK_BYTES = 200
data.load_data(sys.argv[1])
'''


def test_killed_build_is_not_trusted(tmp_path):
  jsonl = tmp_path / 'chat.jsonl'
  _chat_jsonl(jsonl, 100, seed=3)
  data.load_data(str(jsonl))  # a finished cache of the first version
  texts = _chat_jsonl(jsonl, 100, seed=4)
  build = subprocess.Popen([sys.executable, '-c', _BUILD_UNTIL_KILLED, str(jsonl)], cwd=REPO_ROOT,
                           stdout=subprocess.PIPE, text=True)
  assert build.stdout.readline() == 'building\n'
  assert (tmp_path / f'chat.jsonl.tokens.bin.{build.pid}.tmp').exists()  # killed mid-write (run_dir.temp_path)
  build.send_signal(signal.SIGKILL)
  build.wait()
  np.testing.assert_array_equal(data.load_data(str(jsonl)).doc_lens,
                                [len(tokenizer.encode(text)) + 1 for text in texts])


def test_failed_write_leaves_no_pair(tmp_path):
  docs = [np.array([1, 2, 0]), np.array([3, 70000, 0])]
  with pytest.raises(ValueError, match='do not fit uint16'):
    data.write_binidx(str(tmp_path / 'out'), docs, np.uint16)
  assert os.listdir(tmp_path) == []


def test_make_data_gathers_shuffled_copies(tmp_path, monkeypatch):
  monkeypatch.setattr(make_data, '_GATHER_TOKENS', 50)  # several writes a copy
  jsonl = tmp_path / 'novel.jsonl'
  texts = _chat_jsonl(jsonl, 60, seed=random.randrange(10**6))
  prefix, num_tokens, num_docs = make_data.make_data(str(jsonl), 3, seed=5)
  loaded = data.load_data(prefix)
  expected = sorted(tuple(tokenizer.encode(text) + [0]) for text in texts)
  docs = [tuple(loaded.tokens[start:start + length])
          for start, length in zip(loaded.doc_starts, loaded.doc_lens)]
  assert (num_docs, num_tokens) == (3 * len(texts), loaded.num_tokens)
  copies = [docs[i * len(texts):(i + 1) * len(texts)] for i in range(3)]
  for copy in copies:
    assert sorted(copy) == expected
  assert copies[0] != copies[1]  # each copy in its own order
  first_output = pathlib.Path(prefix + '.bin').read_bytes()
  make_data.make_data(str(jsonl), 3, seed=5)
  assert pathlib.Path(prefix + '.bin').read_bytes() == first_output
  make_data.make_data(str(jsonl), 3, seed=6)
  assert pathlib.Path(prefix + '.bin').read_bytes() != first_output
