"""Training data: load token files and cut them into batches the way RWKV-PEFT does.

Loading (`load_data(path, data_type=None, vocab_size=65536) -> TokenData`):
  binidx  Megatron MMIDIDX `.idx` + `.bin` (uint16 from make_data, int32 from json2binidx),
          memmapped. `path` is the prefix, with or without `.bin`/`.idx`. Each item is a document.
  jsonl   one {"text": ...} object per line, World-tokenized with END_OF_DOC (0) after each
          document, cached as `<file>.tokens.bin/.idx` (+ `.tokens.json` naming the source it was
          built from, written last); rebuilt when the jsonl's size or modification time changes.
          The cache is built streaming, a MB of the file at a time on every core, so memory does
          not grow with the file; a malformed line stops it with its line number.
  utf-8   a plain text file, tokenized as one document (for `get` sampling); cached likewise.
  When `data_type` is None it is guessed: a `.bin`/`.idx` path or an existing binidx prefix ->
  binidx, `*.jsonl` -> jsonl, anything else -> utf-8. Token ids >= vocab_size are rejected at load.

Sampling (`Sampler(data, ctx_len, batch_size, ...)`, then `.batch(epoch, step)` ->
(inputs_BxT, targets_BxT), int32, targets -100 where no loss is taken). A batch depends only on
(seed, epoch, step), so a resumed run sees the batches it would have seen.
  pad   sample b of step s is document perm[s*B + b], perm a per-epoch permutation (identity when
        shuffle is off) of the first epoch_steps*B documents. ctx_len+1 tokens are read from that
        document's start, running on into the following documents (and round to the start of the
        data); targets past the document's end are masked, its final token 0 is still a target.
  only  the same documents, but inputs past the document's end are 0 instead of the next document.
  pack  several documents a row (see pack_documents), each exactly as `pad` would give it (inputs,
        targets and masks), at a multiple of DOC_ALIGN tokens; `doc_starts(epoch, step)` flags where
        each begins, so that the model starts it from the initial state (RWKV.hidden_states). The
        rows are packed once, in data order; an epoch is a per-epoch permutation of the first
        epoch_steps*B rows, so each epoch still takes every document (of those rows) once.
  get   windows of ctx_len+1 tokens at random token offsets, no masking.
  loss_mask='qa' additionally masks every target outside the assistant's answers: from the end
  of each "Assistant:" token sequence up to the next "User:" (a sample with no "Assistant:" keeps
  all its targets). 'none' and 'pad' add nothing: pad masking is part of the pad/only modes.

`write_binidx(prefix, documents, dtype)` writes a binidx pair (atomically, via temp names);
`BinidxWriter` does the same for documents appended a block at a time.
"""

import array
import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import pathlib
import signal
import struct

import numpy as np
import tqdm

from pallas_kernels.common import DOC_ALIGN
from rwkv_jax import run_dir, tokenizer
from rwkv_jax.errors import UserError

IGNORE_INDEX = -100  # target value that takes no loss

_MAGIC = b'MMIDIDX\x00\x00'
_HEADER = struct.Struct('<9sQBQQ')  # magic, version, dtype code, item count, doc_idx count
_DTYPE_BY_CODE = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_CODE_BY_DTYPE = {np.dtype(dtype): code for code, dtype in _DTYPE_BY_CODE.items()}
_CACHE_SUFFIX = '.tokens'
ANSWERS_SUFFIX = '.answers.npy'  # beside a binidx: where each document's answer starts
_MAX_CHECK_CHUNK = 1 << 24  # tokens per chunk when scanning a memmap for out-of-vocab ids
DATA_TYPES = ('binidx', 'jsonl', 'utf-8')
DATALOADS = ('pad', 'only', 'get', 'pack')
LOSS_MASKS = ('none', 'pad', 'qa')


@dataclasses.dataclass(frozen=True)
class TokenData:
  """A flat token stream cut into documents.

  Attributes:
    tokens: 1-D integer array (often a read-only memmap) of every token, documents back to back.
    doc_starts: int64 offset of each document in `tokens`.
    doc_lens: int64 token count of each document.
    source: the file the tokens came from, for messages.
  """
  tokens: np.ndarray
  doc_starts: np.ndarray
  doc_lens: np.ndarray
  source: str
  # Per document, the offset of its first token that takes a loss (an SFT example's answer; the
  # `.answers.npy` beside a binidx, see sft.py); None: every token of a document does.
  answer_starts: np.ndarray | None = None

  @property
  def num_tokens(self) -> int:
    return len(self.tokens)

  @property
  def num_docs(self) -> int:
    return len(self.doc_starts)


# ---------------------------------------------------------------------------------------------
# binidx


class BinidxWriter:
  """Streams documents into `prefix.bin` / `prefix.idx`, holding only the index (12 B a document).

    with BinidxWriter(prefix, np.uint16) as writer:
      writer.append(tokens, doc_lens)  # tokens, and the lengths of the documents they end

  A document may span several appends (a long text is appended block by block, its length
  given with the last one); when the `with` block ends, every token must belong to a document.
  Both files are written under temporary names and renamed into place only when the `with` block
  completes; an exception (Ctrl-C included) removes them, so a half-written pair never appears.
  """

  def __init__(self, prefix: str, dtype=np.uint16):
    self.dtype = np.dtype(dtype)
    if self.dtype not in _CODE_BY_DTYPE:
      raise ValueError(f'binidx cannot store {self.dtype}')
    self.bin_path, self.idx_path = f'{prefix}.bin', f'{prefix}.idx'
    self.num_tokens = 0
    self._doc_tokens = 0  # tokens of the documents whose length is known
    self._doc_lens = array.array('q')
    self._bin_file = None

  @property
  def num_docs(self) -> int:
    return len(self._doc_lens)

  def __enter__(self) -> 'BinidxWriter':
    self._bin_file = open(str(run_dir.temp_path(self.bin_path)), 'wb')
    return self

  def append(self, tokens: np.ndarray, doc_lens) -> None:
    tokens, doc_lens = np.asarray(tokens), np.asarray(doc_lens, np.int64)
    if self._doc_tokens + doc_lens.sum() > self.num_tokens + tokens.size:
      raise ValueError(f'documents of {doc_lens.sum()} tokens end in an append of {tokens.size} '
                       f'(after {self.num_tokens - self._doc_tokens} tokens of an open document)')
    limits = np.iinfo(self.dtype)
    if tokens.size and (tokens.min() < limits.min or tokens.max() > limits.max):
      raise ValueError(f'token ids {tokens.min()}..{tokens.max()} do not fit {self.dtype}')
    if doc_lens.size and doc_lens.max() > np.iinfo(np.int32).max:
      raise UserError(f'a document of {doc_lens.max()} tokens is longer than binidx can index '
                      f'({np.iinfo(np.int32).max}); split it')
    self._bin_file.write(tokens.astype(self.dtype, copy=False).tobytes())
    self._doc_lens.frombytes(doc_lens.tobytes())
    self.num_tokens += tokens.size
    self._doc_tokens += int(doc_lens.sum())

  def __exit__(self, exc_type, exc, traceback) -> None:
    self._bin_file.close()
    try:
      if exc_type is not None:
        return
      if self._doc_tokens != self.num_tokens:
        raise ValueError(f'the last {self.num_tokens - self._doc_tokens} tokens are in no document')
      self._write_index()
      os.replace(str(run_dir.temp_path(self.bin_path)), self.bin_path)
      os.replace(str(run_dir.temp_path(self.idx_path)), self.idx_path)
    finally:
      self._remove_temp_files()  # none are left after the renames

  def _remove_temp_files(self) -> None:
    for path in (str(run_dir.temp_path(self.bin_path)), str(run_dir.temp_path(self.idx_path))):
      pathlib.Path(path).unlink(missing_ok=True)

  def _write_index(self) -> None:
    sizes = np.frombuffer(self._doc_lens, np.int64).astype(np.int32)
    pointers = (np.cumsum(sizes, dtype=np.int64) - sizes) * self.dtype.itemsize
    doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)  # every item is a whole document
    with open(str(run_dir.temp_path(self.idx_path)), 'wb') as idx_file:
      idx_file.write(_HEADER.pack(_MAGIC, 1, _CODE_BY_DTYPE[self.dtype], len(sizes), len(doc_idx)))
      idx_file.write(sizes.tobytes())
      idx_file.write(pointers.tobytes())
      idx_file.write(doc_idx.tobytes())


def write_binidx(prefix: str, documents, dtype=np.uint16) -> None:
  """Writes `documents` (an iterable of 1-D int arrays) as `prefix.bin` / `prefix.idx`."""
  with BinidxWriter(prefix, dtype) as writer:
    for doc in documents:
      doc = np.asarray(doc)
      writer.append(doc, [doc.size])


def read_binidx(prefix: str) -> TokenData:
  """Memmaps `prefix.bin` with the document table from `prefix.idx`, checking both fit."""
  bin_path, idx_path = f'{prefix}.bin', f'{prefix}.idx'
  for path in (idx_path, bin_path):
    if not os.path.isfile(path):
      raise UserError(f'{path} not found: a binidx dataset needs both {bin_path} and {idx_path} '
                      '(make one with `python -m rwkv_jax.make_data data.jsonl N CTX_LEN`)')
  idx_size = os.path.getsize(idx_path)
  rebuild = 'rebuild it with `python -m rwkv_jax.make_data`'
  with open(idx_path, 'rb') as idx_file:
    header = idx_file.read(_HEADER.size)
  if header[:len(_MAGIC)] != _MAGIC[:len(header)]:
    raise UserError(f'{idx_path} is not a binidx index (expected the magic bytes MMIDIDX); '
                    f'{rebuild}')
  if len(header) < _HEADER.size:
    raise UserError(f'{idx_path} is truncated ({idx_size} bytes, less than the {_HEADER.size}-byte header); '
                    f'{rebuild}')
  _, version, code, num_items, _ = _HEADER.unpack(header)
  if version != 1 or code not in _DTYPE_BY_CODE:
    raise UserError(f'{idx_path}: unsupported binidx version {version} / dtype code {code} '
                    f'(expected version 1 and an integer dtype); {rebuild}')
  dtype = np.dtype(_DTYPE_BY_CODE[code])
  if num_items == 0:
    raise UserError(f'{idx_path} lists no documents; {rebuild} from non-empty data')
  if idx_size < _HEADER.size + num_items * 12:
    raise UserError(f'{idx_path} is truncated ({idx_size} bytes for {num_items} documents); '
                    f'{rebuild}')
  sizes = np.fromfile(idx_path, np.int32, num_items, offset=_HEADER.size).astype(np.int64)
  pointers = np.fromfile(idx_path, np.int64, num_items, offset=_HEADER.size + num_items * 4)
  bin_size = os.path.getsize(bin_path)
  ends = pointers + sizes * dtype.itemsize
  if sizes.min() < 0 or pointers.min() < 0 or np.any(pointers % dtype.itemsize) or (
      ends.max() > bin_size):
    raise UserError(f'{bin_path} is truncated or does not match {idx_path} ({bin_size} bytes, '
                    f'the index needs {ends.max()}); {rebuild}')
  if bin_size < dtype.itemsize:
    raise UserError(f'{bin_path} holds no tokens; {rebuild} from non-empty data')
  tokens = np.memmap(bin_path, dtype, mode='r', shape=(bin_size // dtype.itemsize,))
  answers_path = prefix + ANSWERS_SUFFIX
  answer_starts = np.load(answers_path) if os.path.isfile(answers_path) else None
  return TokenData(tokens, pointers // dtype.itemsize, sizes, bin_path, answer_starts)


# ---------------------------------------------------------------------------------------------
# jsonl and text, tokenized once and cached as binidx
#
# The source is read in blocks of about _BLOCK_BYTES (a jsonl block ends at a line end, a text
# block where no token can span, see tokenizer.joined_byte_pairs), the blocks are tokenized on
# every core, and their tokens are appended to the cache in file order. Memory depends on the
# block size and the number of cores, not on the size of the file (the longest line aside).

_BLOCK_BYTES = 1 << 20
_PARALLEL_MIN_BYTES = 64 << 20  # smaller files are encoded faster than workers start (~3 s)
_TEXT_SPLIT_WINDOW = 1 << 16  # bytes at the end of a text block searched for a place to cut
_EXPECTED_JSONL = 'expected one JSON object per line like {"text": "User: ...\\n\\nAssistant: ..."}'


def _jsonl_blocks(path: str, block_bytes: int):
  """(block, number of its first line, path): whole lines of the file, about block_bytes each."""
  line_number, carry = 1, b''
  with open(path, 'rb') as source:
    while chunk := source.read(block_bytes):
      buffer = carry + chunk
      cut = buffer.rfind(b'\n') + 1
      if cut == 0:  # one line longer than a block: keep reading until it ends
        carry = buffer
        continue
      yield buffer[:cut], line_number, path
      line_number += buffer.count(b'\n', 0, cut)
      carry = buffer[cut:]
  if carry:
    yield carry, line_number, path


def _text_blocks(path: str, block_bytes: int):
  """(block, its byte offset, path): pieces of the file whose encodings join up to the whole's."""
  offset, carry = 0, b''
  with open(path, 'rb') as source:
    while chunk := source.read(block_bytes):
      buffer = carry + chunk
      cut = _text_cut(buffer)
      if cut is None:  # nowhere to cut near the end: keep reading
        carry = buffer
        continue
      yield buffer[:cut], offset, path
      offset += cut
      carry = buffer[cut:]
  if carry:
    yield carry, offset, path


def _text_cut(buffer: bytes) -> int | None:
  """The last position near the end of `buffer` between two characters that no token joins."""
  tail = np.frombuffer(buffer, np.uint8)[-_TEXT_SPLIT_WINDOW:]
  starts_char = (tail[1:] & 0xC0) != 0x80  # not a UTF-8 continuation byte
  cuts = np.flatnonzero(~tokenizer.joined_byte_pairs()[tail[:-1], tail[1:]] & starts_char)
  return len(buffer) - len(tail) + int(cuts[-1]) + 1 if cuts.size else None


def _tokenize_jsonl_block(block: bytes, first_line: int, path: str):
  """(tokens, doc_lens, block size): each non-empty line's "text", encoded, then END_OF_DOC."""
  try:
    lines = block.decode('utf-8').split('\n')
  except UnicodeDecodeError as e:
    line_number = first_line + block.count(b'\n', 0, e.start)
    raise UserError(f'{path}:{line_number}: not valid UTF-8 ({e.reason}); '
                    'save the file as UTF-8') from None
  texts = [_parse_jsonl_line(line, path, first_line + i) for i, line in enumerate(lines)
           if line.strip()]
  ids = tokenizer.encode_batch(texts)
  for doc_ids in ids:
    doc_ids.append(tokenizer.END_OF_DOC)
  doc_lens = np.fromiter(map(len, ids), np.int64, len(ids))
  tokens = np.fromiter(itertools.chain.from_iterable(ids), np.uint16, int(doc_lens.sum()))
  return tokens, doc_lens, len(block)


def _parse_jsonl_line(line: str, path: str, line_number: int) -> str:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise UserError(f'{path}:{line_number}: not valid JSON ({e.msg} at column {e.colno}); '
                    f'{_EXPECTED_JSONL}') from None
  if not isinstance(record, dict) or not isinstance(record.get('text'), str):
    raise UserError(f'{path}:{line_number}: no string field "text"; {_EXPECTED_JSONL}')
  try:
    record['text'].encode('utf-8')
  except UnicodeEncodeError:
    raise UserError(f'{path}:{line_number}: "text" holds an unpaired surrogate escape (\\ud8xx); '
                    'fix or drop that line') from None
  return record['text']


def _tokenize_text_block(block: bytes, offset: int, path: str):
  """(tokens, no document ends, block size): the block encoded as part of one long document."""
  try:
    text = block.decode('utf-8')
  except UnicodeDecodeError as e:
    raise UserError(f'{path}: not valid UTF-8 at byte {offset + e.start} ({e.reason}); save it as '
                    'UTF-8, or pass --data_type binidx/jsonl if it is one') from None
  return np.array(tokenizer.encode(text), np.uint16), np.zeros(0, np.int64), len(block)


def _ignore_sigint() -> None:
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _in_order(tokenize, blocks, workers: int):
  """tokenize(*block) for each block, in order, at most 2 x workers blocks in flight.

  With workers > 1 the workers are forked from this process: see `_build_cache` for where.
  """
  if workers <= 1:
    yield from (tokenize(*block) for block in blocks)
    return
  tokenizer.preload()  # once here, shared by the forked workers
  with concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context('fork'),
                                              initializer=_ignore_sigint) as pool:
    pending = collections.deque()
    try:
      for block in blocks:
        pending.append(pool.submit(tokenize, *block))
        if len(pending) >= 2 * workers:
          yield pending.popleft().result()
      while pending:
        yield pending.popleft().result()
    finally:
      pool.shutdown(cancel_futures=True)


def _write_cache(path: str, prefix: str, data_type: str, workers: int, block_bytes: int) -> None:
  """Tokenizes `path` into the binidx pair `prefix`, streaming, on `workers` processes."""
  if data_type == 'jsonl':
    blocks, tokenize = _jsonl_blocks(path, block_bytes), _tokenize_jsonl_block
  else:
    blocks, tokenize = _text_blocks(path, block_bytes), _tokenize_text_block
  with (BinidxWriter(prefix, np.uint16) as writer,
        tqdm.tqdm(total=os.path.getsize(path), unit='B', unit_scale=True, disable=None,
                  desc=f'tokenizing {os.path.basename(path)}', leave=False) as progress,
        contextlib.closing(_in_order(tokenize, blocks, workers)) as results):
    for tokens, doc_lens, block_size in results:
      writer.append(tokens, doc_lens)
      progress.update(block_size)
      progress.set_postfix(docs=writer.num_docs, refresh=False)
    if data_type == 'jsonl' and writer.num_docs == 0:
      raise UserError(f'{path} has no non-empty lines; add {{"text": ...}} lines')
    if data_type == 'utf-8':
      if writer.num_tokens == 0:
        raise UserError(f'{path} is empty')
      writer.append(np.zeros(0, np.uint16), [writer.num_tokens])  # the whole text is one document


def _build_cache(path: str, prefix: str, data_type: str, workers: int | None = None,
                 block_bytes: int | None = None) -> None:
  """`_write_cache` on `workers` processes (default: one a core for a large file, else this one)
  in blocks of about `block_bytes` (default _BLOCK_BYTES).

  Workers run in a fresh process that loads the tokenizer (~230 MB of tables) and then forks them,
  so that they share its memory. That process is spawned, not forked from this one, which may be
  running JAX's threads (a fork would copy their locks, held, into a child with no threads).
  """
  if workers is None:
    big = os.path.getsize(path) >= _PARALLEL_MIN_BYTES
    workers = len(os.sched_getaffinity(0)) if big else 1
  block_bytes = block_bytes or _BLOCK_BYTES
  if workers <= 1:
    _write_cache(path, prefix, data_type, 1, block_bytes)
    return
  with concurrent.futures.ProcessPoolExecutor(1, multiprocessing.get_context('spawn')) as helper:
    try:
      helper.submit(_write_cache, path, prefix, data_type, workers, block_bytes).result()
    except concurrent.futures.process.BrokenProcessPool:
      raise UserError('a tokenizing process died: out of memory, or the script calling '
                      'load_data lacks the `if __name__ == "__main__":` guard that '
                      'multiprocessing needs') from None


def build_cache(source: str, prefix: str, stamp: dict, outputs, build) -> None:
  """Runs `build()` to write `outputs` (a cache of `source`) unless `prefix.json` holds `stamp` and
  every output exists. The stamp goes first and comes back last, so a build cut short is never
  trusted."""
  stamp_path = pathlib.Path(prefix + '.json')
  try:
    is_fresh = json.loads(stamp_path.read_text()) == stamp
  except (OSError, ValueError):
    is_fresh = False
  if is_fresh and all(os.path.isfile(p) for p in outputs):
    return
  try:
    stamp_path.unlink(missing_ok=True)
    build()
    run_dir.temp_path(stamp_path).write_text(json.dumps(stamp))
    os.replace(run_dir.temp_path(stamp_path), stamp_path)
  except OSError as e:
    raise UserError(f'cannot write the token cache {prefix}.bin next to {source} ({e.strerror}); '
                    'copy the data to a writable folder') from None


def _load_cached(path: str, data_type: str) -> TokenData:
  """Tokenizes `path` into a binidx cache next to it unless the cache matches the file already."""
  prefix = path + _CACHE_SUFFIX
  stat = os.stat(path)
  stamp = {'source_size': stat.st_size, 'source_mtime_ns': stat.st_mtime_ns,
           'tokenizer': 'rwkv_vocab_v20230424'}
  build_cache(path, prefix, stamp, (prefix + '.bin', prefix + '.idx'), lambda: _build_cache(path, prefix, data_type))
  return dataclasses.replace(read_binidx(prefix), source=path)


# ---------------------------------------------------------------------------------------------
# load_data


def _strip_binidx_ext(path: str) -> str:
  return path[:-4] if path.endswith(('.bin', '.idx')) else path


def guess_data_type(path: str) -> str:
  """binidx for a .bin/.idx path or an existing binidx prefix, jsonl for *.jsonl, else utf-8."""
  if path.endswith(('.bin', '.idx')) or (not os.path.isfile(path) and (
      os.path.isfile(path + '.idx') or os.path.isfile(path + '.bin'))):
    return 'binidx'
  return 'jsonl' if path.endswith('.jsonl') else 'utf-8'


def load_data(path: str, data_type: str | None = None,
              vocab_size: int = tokenizer.MODEL_VOCAB_SIZE) -> TokenData:
  """Loads a dataset (see the module docstring) and checks every id is below `vocab_size`."""
  data_type = data_type or guess_data_type(path)
  if data_type not in DATA_TYPES:
    raise UserError(f'--data_type {data_type} is not supported; use one of {", ".join(DATA_TYPES)}')
  if data_type == 'binidx':
    data = read_binidx(_strip_binidx_ext(path))
  elif not os.path.isfile(path):
    raise UserError(f'data file {path} not found; pass a .jsonl, a text file or a binidx prefix')
  else:
    data = _load_cached(path, data_type)
  _check_vocab(data, vocab_size)
  return data


def _check_vocab(data: TokenData, vocab_size: int) -> None:
  info = np.iinfo(data.tokens.dtype)
  if info.min >= 0 and info.max < vocab_size:
    return  # the dtype cannot hold a bad id
  for chunk_start in range(0, data.num_tokens, _MAX_CHECK_CHUNK):
    chunk = np.asarray(data.tokens[chunk_start:chunk_start + _MAX_CHECK_CHUNK])
    bad = (chunk < 0) | (chunk >= vocab_size)
    if bad.any():
      position = chunk_start + int(np.argmax(bad))
      raise UserError(f'{data.source}: token id {int(data.tokens[position])} at token {position} '
                      f'is outside the model vocabulary 0..{vocab_size - 1}; tokenize the data '
                      'with the World tokenizer (rwkv_vocab_v20230424) or use the matching model')


# ---------------------------------------------------------------------------------------------
# Packing


@dataclasses.dataclass(frozen=True)
class Packing:
  """Where each document goes in rows of ctx_len tokens: row r holds documents
  docs[row_splits[r]:row_splits[r + 1]], each beginning at its entry of `offsets`."""
  docs: np.ndarray
  offsets: np.ndarray
  row_splits: np.ndarray

  @property
  def num_rows(self) -> int:
    return len(self.row_splits) - 1

  def placements(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(documents, their offsets, the index in `rows` of the row each is in) of these rows."""
    firsts, ends = self.row_splits[rows], self.row_splits[rows + 1]
    row_index = np.repeat(np.arange(len(rows)), ends - firsts)
    at = np.concatenate([np.arange(f, e) for f, e in zip(firsts, ends)]) if len(rows) else np.zeros(0, np.int64)
    return self.docs[at], self.offsets[at], row_index


def doc_spans(doc_lens: np.ndarray, ctx_len: int) -> np.ndarray:
  """Positions a document takes in a row: one a target token (its tokens but the first), at most
  ctx_len, as `pad` reads it. The document's last token is only a target, never an input."""
  return np.clip(np.asarray(doc_lens, np.int64) - 1, 0, ctx_len)


def pack_documents(doc_lens: np.ndarray, ctx_len: int, align: int = DOC_ALIGN) -> Packing:
  """Places the documents, in order, in rows of ctx_len tokens, each at a multiple of `align`
  (the WKV kernels' document alignment) and within the row. Best fit: a document goes to the
  open row with the least room that holds it, else to a new row; a row is open while it has room
  left. Documents with no target (one token) are left out. O(documents) in Python, a few seconds
  a million (the open rows are kept by blocks used, their fill levels as the bits of an int).
  """
  spans = doc_spans(doc_lens, ctx_len)
  blocks_per_row = -(-ctx_len // align)
  open_rows = [collections.deque() for _ in range(blocks_per_row)]  # by blocks used, oldest first
  used_counts = 0  # bit u set: some open row has used u blocks
  row_of_doc, offset_of_doc = np.full(len(spans), -1, np.int64), np.zeros(len(spans), np.int64)
  num_rows = 0
  for doc, span in enumerate(spans.tolist()):
    if span == 0:
      continue
    fits = used_counts & ((2 << ((ctx_len - span) // align)) - 1)  # rows with room for `span`
    if fits:
      used = fits.bit_length() - 1  # the fullest of them
      row = open_rows[used].popleft()
      if not open_rows[used]:
        used_counts &= ~(1 << used)
    else:
      used, row, num_rows = 0, num_rows, num_rows + 1
    row_of_doc[doc], offset_of_doc[doc] = row, used * align
    used += -(-span // align)
    if used < blocks_per_row:
      open_rows[used].append(row)
      used_counts |= 1 << used
  placed = np.flatnonzero(row_of_doc >= 0)
  order = placed[np.argsort(row_of_doc[placed], kind='stable')]
  row_splits = np.searchsorted(row_of_doc[order], np.arange(num_rows + 1))
  return Packing(order, offset_of_doc[order], row_splits)


def samples_per_pass(data: TokenData, dataload: str, ctx_len: int) -> int:
  """The samples one pass over the data makes: its documents, or the rows they pack into."""
  return pack_documents(data.doc_lens, ctx_len).num_rows if dataload == 'pack' else data.num_docs


# ---------------------------------------------------------------------------------------------
# Sampling


class Sampler:
  """Deterministic batches from a TokenData (see the module docstring for the modes).

  `batch_size` is the global batch (micro_bsz x devices x accumulation steps); split it across
  devices and accumulation steps after `batch`.
  """

  def __init__(self, data: TokenData, ctx_len: int, batch_size: int, dataload: str = 'pad',
               epoch_steps: int = 1000, seed: int = 0, shuffle: bool = True,
               loss_mask: str = 'none'):
    if dataload not in DATALOADS:
      raise UserError(f'--dataload {dataload} is not supported; use one of {", ".join(DATALOADS)}')
    if loss_mask not in LOSS_MASKS:
      raise UserError(f'--loss_mask {loss_mask} is not supported; use one of '
                      f'{", ".join(LOSS_MASKS)}')
    if min(ctx_len, batch_size, epoch_steps) < 1:
      raise UserError(f'--ctx_len ({ctx_len}), the batch size ({batch_size}) and --epoch_steps '
                      f'({epoch_steps}) must all be at least 1')
    self.data, self.ctx_len, self.batch_size = data, ctx_len, batch_size
    self.dataload, self.epoch_steps, self.seed = dataload, epoch_steps, seed
    self.shuffle, self.loss_mask = shuffle, loss_mask
    self._packing = pack_documents(data.doc_lens, ctx_len) if dataload == 'pack' else None
    self._check_enough_data()
    self._qa_markers = ((np.array(tokenizer.encode('Assistant:')),
                         np.array(tokenizer.encode('User:'))) if loss_mask == 'qa' else None)
    self._order_cache = (None, None)

  @property
  def samples_per_epoch(self) -> int:
    """Documents an epoch takes, or with pack the rows."""
    return self.epoch_steps * self.batch_size

  def _check_enough_data(self) -> None:
    if self.dataload == 'get':
      if self.data.num_tokens < self.ctx_len + 1:
        raise UserError(f'{self.data.source} has {self.data.num_tokens} tokens, fewer than '
                        f'--ctx_len + 1 = {self.ctx_len + 1}; add data or lower --ctx_len')
    elif self.dataload == 'pack':
      if self._packing.num_rows < self.samples_per_epoch:
        raise UserError(
            f'{self.data.source} has {self.data.num_docs} documents, which pack into '
            f'{self._packing.num_rows} rows of --ctx_len {self.ctx_len}, but an epoch needs epoch_steps x batch '
            f'size = {self.epoch_steps} x {self.batch_size} = {self.samples_per_epoch} rows; repeat the data '
            '(`python -m rwkv_jax.make_data data.jsonl N CTX_LEN`, N copies) or lower --epoch_steps/--micro_bsz')
    elif self.data.num_docs < self.samples_per_epoch:
      raise UserError(
          f'{self.data.source} has {self.data.num_docs} documents but --dataload '
          f'{self.dataload} needs epoch_steps x batch size = {self.epoch_steps} x '
          f'{self.batch_size} = {self.samples_per_epoch}; repeat the data (`python -m '
          'rwkv_jax.make_data data.jsonl N CTX_LEN`, N copies) or lower --epoch_steps/--micro_bsz')

  def batch(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs_BxT, targets_BxT) int32 for `step` (0 .. epoch_steps-1) of `epoch`."""
    if self.dataload == 'get':
      rng = np.random.default_rng([self.seed, epoch, step])
      starts_B = rng.integers(0, self.data.num_tokens - self.ctx_len, size=self.batch_size)
      return self._rows(starts_B, np.full(self.batch_size, self.ctx_len + 1), None)  # nothing past a "document" end
    if self.dataload == 'pack':
      return self._packed_rows(*self._placements(epoch, step))
    docs_B = self._samples(epoch, step)
    return self._rows(self.data.doc_starts[docs_B], self.data.doc_lens[docs_B], docs_B)

  def doc_starts(self, epoch: int, step: int) -> np.ndarray | None:
    """With pack, [B, ceil(ctx_len / DOC_ALIGN)] bool: True where a document of the batch's rows
    begins at token m * DOC_ALIGN (see RWKV.hidden_states). None in the other modes: one
    document (or window) a row."""
    if self._packing is None:
      return None
    _, offsets_D, row_D = self._placements(epoch, step)
    starts_BxM = np.zeros((self.batch_size, -(-self.ctx_len // DOC_ALIGN)), bool)
    starts_BxM[row_D, offsets_D // DOC_ALIGN] = True
    return starts_BxM

  def doc_tokens(self, epoch: int, step: int) -> int:
    """The batch's positions that hold a document (doc_spans): its tokens less the padding."""
    if self.dataload == 'get':
      return self.batch_size * self.ctx_len
    docs = self._placements(epoch, step)[0] if self._packing else self._samples(epoch, step)
    return int(doc_spans(self.data.doc_lens[docs], self.ctx_len).sum())

  def _samples(self, epoch: int, step: int) -> np.ndarray:
    """The documents (with pack, the rows) of `step` of `epoch`."""
    if not 0 <= step < self.epoch_steps:
      raise ValueError(f'step {step} is outside 0..{self.epoch_steps - 1}')
    return self._epoch_order(epoch)[step * self.batch_size:(step + 1) * self.batch_size]

  def _placements(self, epoch: int, step: int):
    """(documents, offsets, row in the batch) of every document of a pack batch."""
    return self._packing.placements(self._samples(epoch, step))

  def _packed_rows(self, docs_D, offsets_D, row_D) -> tuple[np.ndarray, np.ndarray]:
    """Each document's `pad` row (inputs, targets, masks) cut to its span and placed at its offset;
    the positions between documents take input END_OF_DOC and no target."""
    doc_inputs_DxT, doc_targets_DxT = self._rows(self.data.doc_starts[docs_D], self.data.doc_lens[docs_D], docs_D)
    inputs_BxT = np.full((self.batch_size, self.ctx_len), tokenizer.END_OF_DOC, np.int32)
    targets_BxT = np.full((self.batch_size, self.ctx_len), IGNORE_INDEX, np.int32)
    spans_D = doc_spans(self.data.doc_lens[docs_D], self.ctx_len)
    for i, (row, offset, span) in enumerate(zip(row_D, offsets_D, spans_D)):
      inputs_BxT[row, offset:offset + span] = doc_inputs_DxT[i, :span]
      targets_BxT[row, offset:offset + span] = doc_targets_DxT[i, :span]
    return inputs_BxT, targets_BxT

  def _rows(self, starts_B, doc_lens_B, docs_B) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of the windows of ctx_len+1 tokens from starts_B, masked past each
    document's length (docs_B: which documents, for their answer starts; None for get)."""
    window_BxT1 = self._read_windows(starts_B)
    inputs_BxT, targets_BxT = window_BxT1[:, :-1].copy(), window_BxT1[:, 1:].copy()
    # A target at position t is token t+1 of the window: it belongs to the document while
    # t + 1 < doc_len, which keeps the document's final END_OF_DOC as the last target.
    positions_T = np.arange(self.ctx_len)
    past_doc_BxT = positions_T[None, :] + 1 >= np.minimum(doc_lens_B, self.ctx_len + 1)[:, None]
    targets_BxT[past_doc_BxT] = IGNORE_INDEX
    if self.data.answer_starts is not None and docs_B is not None:
      targets_BxT[positions_T[None, :] + 1 < self.data.answer_starts[docs_B][:, None]] = IGNORE_INDEX
    if self.dataload == 'only':
      inputs_BxT[positions_T[None, :] >= doc_lens_B[:, None]] = tokenizer.END_OF_DOC
    if self._qa_markers is not None:
      doc_window_lens_B = np.minimum(doc_lens_B, self.ctx_len + 1)
      targets_BxT[~self._answer_mask(window_BxT1, doc_window_lens_B)[:, 1:]] = IGNORE_INDEX
    return inputs_BxT, targets_BxT

  def _epoch_order(self, epoch: int) -> np.ndarray:
    cached_epoch, order = self._order_cache
    if cached_epoch != epoch:
      if self.shuffle:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.samples_per_epoch)
      else:
        order = np.arange(self.samples_per_epoch)
      self._order_cache = (epoch, order)
    return order

  def _read_windows(self, starts_B: np.ndarray) -> np.ndarray:
    """ctx_len+1 tokens from each start, continuing at the data's beginning after its end."""
    offsets_BxT1 = (starts_B[:, None] + np.arange(self.ctx_len + 1)[None, :]) % self.data.num_tokens
    return np.asarray(self.data.tokens[offsets_BxT1], np.int32)

  def _answer_mask(self, window_BxT1: np.ndarray, doc_window_lens_B: np.ndarray) -> np.ndarray:
    """True on tokens inside an assistant answer; all True for a document with no "Assistant:".

    Only each row's own document (its first doc_window_lens_B tokens) is searched, so that turns
    in the documents after it neither mask nor unmask anything.
    """
    assistant, user = self._qa_markers
    mask_BxT1 = np.ones(window_BxT1.shape, bool)
    for row, (window, doc_len) in enumerate(zip(window_BxT1, doc_window_lens_B)):
      tokens = window[:doc_len]
      answer_starts = _find(tokens, assistant) + len(assistant)
      if answer_starts.size == 0:
        continue
      # Mark answer starts +1 and "User:" starts -1, then carry the latest mark forward.
      marks = np.zeros(len(tokens), np.int8)
      marks[_find(tokens, user)] = -1
      marks[answer_starts[answer_starts < len(tokens)]] = 1
      latest = np.maximum.accumulate(np.where(marks != 0, np.arange(len(tokens)), 0))
      mask_BxT1[row, :doc_len] = marks[latest] == 1
    return mask_BxT1


def _find(tokens: np.ndarray, pattern: np.ndarray) -> np.ndarray:
  """Start positions of `pattern` in `tokens`."""
  if len(tokens) < len(pattern):
    return np.zeros(0, np.int64)
  windows = np.lib.stride_tricks.sliding_window_view(tokens, len(pattern))
  return np.flatnonzero(np.all(windows == pattern, axis=1))
