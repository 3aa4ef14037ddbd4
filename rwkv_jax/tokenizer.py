"""The RWKV World tokenizer (rwkv_vocab_v20230424), used by every World/G-series model.

Encoding is greedy longest-byte-match; `pyrwkv-tokenizer` (Rust) does it about 16x faster than the
pure-Python trie in the `rwkv` pip package, with identical ids. Decoding is done here from the
vocab's byte table instead of by the Rust decoder, because that one panics (a BaseException) on
token sequences that are not valid UTF-8 and turns the end-of-document id 0 into "\\x00"; a model
in the middle of generating a multi-byte character produces exactly such sequences.

  ids = encode("User: hi\\n\\nAssistant:")  # [24281, 59, 4571, 261, 5585, 41693, 59]
  text = decode(ids)                        # never raises; invalid UTF-8 becomes U+FFFD

Id 0 (END_OF_DOC) ends a document and decodes to nothing; ids the vocab does not have
(65530..65535 of the model's 65536) also decode to nothing.
"""

import ast
import functools
import pathlib

import numpy as np
import pyrwkv_tokenizer

END_OF_DOC = 0
MODEL_VOCAB_SIZE = 65536  # the embedding/head size of World models; the vocab file uses 1..65529

_VOCAB_PATH = pathlib.Path(pyrwkv_tokenizer.__file__).parent / 'rwkv_vocab_v20230424.txt'


@functools.cache
def _rust_tokenizer() -> pyrwkv_tokenizer.WorldTokenizer:
  return pyrwkv_tokenizer.WorldTokenizer(str(_VOCAB_PATH))


@functools.cache
def _bytes_by_id() -> tuple[bytes, ...]:
  """Each id's bytes; b'' for ids the vocab file does not define (0 and the unused tail)."""
  table = [b''] * MODEL_VOCAB_SIZE
  for line in _VOCAB_PATH.read_text(encoding='utf-8').splitlines():
    # "<id> <python str or bytes literal> <byte length>"; the literal itself may contain spaces.
    token_id = int(line[:line.index(' ')])
    literal = ast.literal_eval(line[line.index(' ') + 1:line.rindex(' ')])
    table[token_id] = literal.encode('utf-8') if isinstance(literal, str) else literal
  return tuple(table)


@functools.cache
def joined_byte_pairs() -> np.ndarray:
  """bool[256, 256]: True where bytes (a, b) sit next to each other inside some vocab token.

  Encoding is greedy longest match, so no token can span a position whose two bytes are never
  joined: every encoding has a boundary there, and encoding the text on each side separately
  gives the same ids as encoding the whole. This is what lets a long text be encoded in blocks.
  """
  joined = np.zeros((256, 256), bool)
  for token in _bytes_by_id():
    joined[list(token[:-1]), list(token[1:])] = True
  return joined


def preload() -> None:
  """Builds the encoder's tables now (~230 MB), e.g. so that processes forked later share them."""
  _rust_tokenizer()
  joined_byte_pairs()


def encode(text: str) -> list[int]:
  """Token ids of `text` (no END_OF_DOC appended)."""
  return _rust_tokenizer().encode(text)


def encode_batch(texts: list[str]) -> list[list[int]]:
  """`encode` over many strings at once (parallel in Rust)."""
  return _rust_tokenizer().encode_batch(texts)


def decode_bytes(ids) -> bytes:
  """The raw bytes of `ids`; for streaming output, where a character may span two tokens."""
  table = _bytes_by_id()
  return b''.join(table[i] if 0 <= i < MODEL_VOCAB_SIZE else b'' for i in map(int, ids))


def decode(ids) -> str:
  """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD, the rest is kept."""
  return decode_bytes(ids).decode('utf-8', errors='replace')
