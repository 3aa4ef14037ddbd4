"""Training data: load token files and cut them into batches the way RWKV-PEFT does.

Loading (`load_data(path, data_type=None, vocab_size=65536) -> TokenData`):
  binidx  Megatron MMIDIDX `.idx` + `.bin` (uint16 from make_data, int32 from json2binidx),
          memmapped. `path` is the prefix, with or without `.bin`/`.idx`. Each item is a document.
  jsonl   one {"text": ...} object per line, World-tokenized with END_OF_DOC (0) after each
          document, cached as `<file>.tokens.bin/.idx` (+ `.tokens.json` naming the source it was
          built from); rebuilt when the jsonl's size or modification time changes.
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
  get   windows of ctx_len+1 tokens at random token offsets, no masking.
  loss_mask='qa' additionally masks every target outside the assistant's answers: from the end
  of each "Assistant:" token sequence up to the next "User:" (a sample with no "Assistant:" keeps
  all its targets). 'none' and 'pad' add nothing: pad masking is part of the pad/only modes.

`write_binidx(prefix, documents, dtype)` writes a binidx pair (atomically, via temp names).
"""

import dataclasses
import json
import os
import pathlib
import struct

import numpy as np

from rwkv_jax import tokenizer
from rwkv_jax.errors import UserError

IGNORE_INDEX = -100  # target value that takes no loss

_MAGIC = b'MMIDIDX\x00\x00'
_HEADER = struct.Struct('<9sQBQQ')  # magic, version, dtype code, item count, doc_idx count
_DTYPE_BY_CODE = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_CODE_BY_DTYPE = {np.dtype(dtype): code for code, dtype in _DTYPE_BY_CODE.items()}
_CACHE_SUFFIX = '.tokens'
_MAX_CHECK_CHUNK = 1 << 24  # tokens per chunk when scanning a memmap for out-of-vocab ids
DATA_TYPES = ('binidx', 'jsonl', 'utf-8')
DATALOADS = ('pad', 'only', 'get')
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

  @property
  def num_tokens(self) -> int:
    return len(self.tokens)

  @property
  def num_docs(self) -> int:
    return len(self.doc_starts)


# ---------------------------------------------------------------------------------------------
# binidx


def write_binidx(prefix: str, documents, dtype=np.uint16) -> None:
  """Writes `documents` (an iterable of 1-D int arrays) as `prefix.bin` / `prefix.idx`."""
  dtype = np.dtype(dtype)
  if dtype not in _CODE_BY_DTYPE:
    raise ValueError(f'binidx cannot store {dtype}')
  limits = np.iinfo(dtype)
  bin_path, idx_path = f'{prefix}.bin', f'{prefix}.idx'
  sizes = []
  with open(bin_path + '.tmp', 'wb') as bin_file:
    for doc in documents:
      doc = np.asarray(doc)
      if doc.size and (doc.min() < limits.min or doc.max() > limits.max):
        raise ValueError(f'token ids {doc.min()}..{doc.max()} do not fit {dtype}')
      bin_file.write(doc.astype(dtype).tobytes())
      sizes.append(doc.size)
  sizes = np.asarray(sizes, np.int32)
  pointers = (np.cumsum(sizes, dtype=np.int64) - sizes) * dtype.itemsize
  doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)  # every item is a whole document
  with open(idx_path + '.tmp', 'wb') as idx_file:
    idx_file.write(_HEADER.pack(_MAGIC, 1, _CODE_BY_DTYPE[dtype], len(sizes), len(doc_idx)))
    idx_file.write(sizes.tobytes())
    idx_file.write(pointers.tobytes())
    idx_file.write(doc_idx.tobytes())
  os.replace(bin_path + '.tmp', bin_path)
  os.replace(idx_path + '.tmp', idx_path)


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
  if len(header) < _HEADER.size or header[:len(_MAGIC)] != _MAGIC:
    raise UserError(f'{idx_path} is not a binidx index (expected the magic bytes MMIDIDX); '
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
  return TokenData(tokens, pointers // dtype.itemsize, sizes, bin_path)


# ---------------------------------------------------------------------------------------------
# jsonl and text, tokenized once and cached as binidx


def read_jsonl_texts(path: str) -> list[str]:
  """The "text" of each non-empty line of a jsonl file; a bad line is a UserError naming it."""
  if not os.path.isfile(path):
    raise UserError(f'{path} not found; pass the path of a jsonl file')
  texts = []
  with open(path, 'rb') as jsonl_file:
    for line_number, raw_line in enumerate(jsonl_file, 1):
      try:
        line = raw_line.decode('utf-8')
      except UnicodeDecodeError as e:
        raise UserError(f'{path}:{line_number}: not valid UTF-8 ({e.reason}); '
                        'save the file as UTF-8') from None
      if line.strip():
        texts.append(_parse_jsonl_line(line, path, line_number))
  return texts


def _parse_jsonl_line(line: str, path: str, line_number: int) -> str:
  expected = 'expected one JSON object per line like {"text": "User: ...\\n\\nAssistant: ..."}'
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise UserError(f'{path}:{line_number}: not valid JSON ({e.msg} at column {e.colno}); '
                    f'{expected}') from None
  if not isinstance(record, dict) or not isinstance(record.get('text'), str):
    raise UserError(f'{path}:{line_number}: no string field "text"; {expected}')
  try:
    record['text'].encode('utf-8')
  except UnicodeEncodeError:
    raise UserError(f'{path}:{line_number}: "text" holds an unpaired surrogate escape (\\ud8xx); '
                    'fix or drop that line') from None
  return record['text']


def _tokenize_jsonl(path: str) -> list[np.ndarray]:
  texts = read_jsonl_texts(path)
  if not texts:
    raise UserError(f'{path} has no non-empty lines; add {{"text": ...}} lines')
  return [np.array(ids + [tokenizer.END_OF_DOC], np.uint16)
          for ids in tokenizer.encode_batch(texts)]


def _tokenize_text(path: str) -> list[np.ndarray]:
  raw = pathlib.Path(path).read_bytes()
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise UserError(f'{path}: not valid UTF-8 at byte {e.start} ({e.reason}); save it as UTF-8, '
                    'or pass --data_type binidx/jsonl if it is one') from None
  if not text:
    raise UserError(f'{path} is empty')
  return [np.array(tokenizer.encode(text), np.uint16)]


def _load_cached(path: str, tokenize) -> TokenData:
  """Tokenizes `path` into a binidx cache next to it unless the cache matches the file already."""
  prefix = path + _CACHE_SUFFIX
  stat = os.stat(path)
  stamp = {'source_size': stat.st_size, 'source_mtime_ns': stat.st_mtime_ns,
           'tokenizer': 'rwkv_vocab_v20230424'}
  stamp_path = prefix + '.json'
  try:
    is_fresh = json.loads(pathlib.Path(stamp_path).read_text()) == stamp
  except (OSError, ValueError):
    is_fresh = False
  if not (is_fresh and os.path.isfile(prefix + '.bin') and os.path.isfile(prefix + '.idx')):
    try:
      write_binidx(prefix, tokenize(path), np.uint16)
      # The stamp goes last, so a build cut short is never mistaken for a finished one.
      pathlib.Path(stamp_path + '.tmp').write_text(json.dumps(stamp))
      os.replace(stamp_path + '.tmp', stamp_path)
    except OSError as e:
      raise UserError(f'cannot write the token cache {prefix}.bin next to {path} ({e.strerror}); '
                      'copy the data to a writable folder') from None
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
  elif data_type == 'jsonl':
    data = _load_cached(path, _tokenize_jsonl)
  else:
    data = _load_cached(path, _tokenize_text)
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
    self._check_enough_data()
    self._qa_markers = ((np.array(tokenizer.encode('Assistant:')),
                         np.array(tokenizer.encode('User:'))) if loss_mask == 'qa' else None)
    self._order_cache = (None, None)

  @property
  def docs_per_epoch(self) -> int:
    return self.epoch_steps * self.batch_size

  def _check_enough_data(self) -> None:
    if self.dataload == 'get':
      if self.data.num_tokens < self.ctx_len + 1:
        raise UserError(f'{self.data.source} has {self.data.num_tokens} tokens, fewer than '
                        f'--ctx_len + 1 = {self.ctx_len + 1}; add data or lower --ctx_len')
    elif self.data.num_docs < self.docs_per_epoch:
      raise UserError(
          f'{self.data.source} has {self.data.num_docs} documents but --dataload '
          f'{self.dataload} needs epoch_steps x batch size = {self.epoch_steps} x '
          f'{self.batch_size} = {self.docs_per_epoch}; repeat the data (`python -m '
          'rwkv_jax.make_data data.jsonl N CTX_LEN`, N copies) or lower --epoch_steps/--micro_bsz')

  def batch(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs_BxT, targets_BxT) int32 for `step` (0 .. epoch_steps-1) of `epoch`."""
    if self.dataload == 'get':
      rng = np.random.default_rng([self.seed, epoch, step])
      starts_B = rng.integers(0, self.data.num_tokens - self.ctx_len, size=self.batch_size)
      doc_lens_B = np.full(self.batch_size, self.ctx_len + 1)  # nothing past a "document" end
    else:
      if not 0 <= step < self.epoch_steps:
        raise ValueError(f'step {step} is outside 0..{self.epoch_steps - 1}')
      docs_B = self._epoch_order(epoch)[step * self.batch_size:(step + 1) * self.batch_size]
      starts_B, doc_lens_B = self.data.doc_starts[docs_B], self.data.doc_lens[docs_B]
    window_BxT1 = self._read_windows(starts_B)
    inputs_BxT, targets_BxT = window_BxT1[:, :-1].copy(), window_BxT1[:, 1:].copy()
    # A target at position t is token t+1 of the window: it belongs to the document while
    # t + 1 < doc_len, which keeps the document's final END_OF_DOC as the last target.
    positions_T = np.arange(self.ctx_len)
    past_doc_BxT = positions_T[None, :] + 1 >= np.minimum(doc_lens_B, self.ctx_len + 1)[:, None]
    targets_BxT[past_doc_BxT] = IGNORE_INDEX
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
        order = np.random.default_rng([self.seed, epoch]).permutation(self.docs_per_epoch)
      else:
        order = np.arange(self.docs_per_epoch)
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
