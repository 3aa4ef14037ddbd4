"""`--data_type sft`: question/answer pairs from a local Hugging Face dataset, one document each.

RWKV-PEFT reads supervised fine-tuning data this way: `--data_file` is a dataset the `datasets`
library loads (a folder, or one .json/.jsonl/.parquet/.csv file), `--sft_split` picks the split
and `--sft_field QUERY RESPONSE` names the two columns. Each row becomes one document

  chat    "User: {query}\\n\\nAssistant:" + " {response}"      (this project's chat format, default)
  alpaca  the Alpaca instruction prompt + "{response}\\n\\x17"  (what RWKV-PEFT's sft loader builds)

followed by END_OF_DOC, and only the response (its END_OF_DOC included) takes a loss. The prompt
and the response are encoded separately, as a model sees them when it answers a prompt, so the
token where the response starts is exact.

`build(...)` tokenizes the split once into a binidx pair next to the data, `<data_file>.sft.bin/.idx`
(the same documents-and-tokens structure data.load_data gives a jsonl), plus
`<data_file>.sft.answers.npy`: per document, the offset of its first response token, which
data.read_binidx loads as TokenData.answer_starts and the Sampler masks the loss by. A stamp
(`.sft.json`, written last) names the source files, split, columns and template the cache was
built from; anything else rebuilds it.
"""

import os
import pathlib

import numpy as np
import tqdm

from rwkv_jax import data, run_dir, tokenizer
from rwkv_jax.errors import UserError

TEMPLATES = ('chat', 'alpaca')
_BUILDERS = {'.json': 'json', '.jsonl': 'json', '.parquet': 'parquet', '.csv': 'csv'}
_BATCH_ROWS = 1000  # rows tokenized at a time: bounds memory whatever the dataset's size
# The Stanford Alpaca prompt (no input field), which RWKV-PEFT's sft loader wraps every query in.
_ALPACA_PROMPT = ('Below is an instruction that describes a task. Write a response that appropriately '
                  'completes the request.\n\n### Instruction:\n{query}\n\n### Response:')
_ALPACA_END = '\n\x17'  # after each response: a newline, then the ASCII "end of transmission block"


def cache_prefix(path: str) -> str:
  """Where the tokens of `path` (a file, or a folder: the cache sits beside it, not inside) go."""
  return str(pathlib.Path(path)) + '.sft'


def build(path: str, split: str, fields, template: str = 'chat') -> str:
  """Tokenizes the dataset at `path` unless its cache is fresh; returns the cache's binidx prefix."""
  if not os.path.exists(path):
    raise UserError(f'--data_file {path} not found; --data_type sft reads a local dataset folder or a '
                    f'{"/".join(_BUILDERS)} file')
  if not fields or len(fields) != 2:
    raise UserError(f'--sft_field takes two column names, QUERY RESPONSE (got {len(fields or [])})')
  if template not in TEMPLATES:
    raise UserError(f'--sft_template {template} is not known; use one of {", ".join(TEMPLATES)}')
  prefix = cache_prefix(path)
  stamp = {'sources': _source_files(path), 'split': split, 'fields': list(fields), 'template': template,
           'tokenizer': 'rwkv_vocab_v20230424'}
  outputs = (prefix + '.bin', prefix + '.idx', prefix + data.ANSWERS_SUFFIX)
  data.build_cache(path, prefix, stamp, outputs,
                   lambda: _write_cache(_load_split(path, split, fields), prefix, fields, template))
  return prefix


def _source_files(path: str) -> list:
  """[relative name, size, mtime_ns] of every file the dataset is read from."""
  root = pathlib.Path(path)
  files = sorted(p for p in root.rglob('*') if p.is_file()) if root.is_dir() else [root]
  return [[str(p.relative_to(root)) if root.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns]
          for p in files]


def _load_split(path: str, split: str, fields):
  """The split as a `datasets.Dataset`, after checking it has both columns."""
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError('--data_type sft needs the datasets package: pip install "rwkv-jax[sft]"') from None
  datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors come back as one UserError line
  datasets.disable_progress_bars()  # the tokenizing bar below is the one that counts
  if os.path.isdir(path):
    source = dict(path=path)
  elif pathlib.Path(path).suffix in _BUILDERS:
    source = dict(path=_BUILDERS[pathlib.Path(path).suffix], data_files=path)
  else:
    raise UserError(f'--data_file {path}: --data_type sft reads a dataset folder or a '
                    f'{"/".join(_BUILDERS)} file')
  try:
    dataset = datasets.load_dataset(**source, split=split)
  except ValueError as e:
    if 'split' not in str(e).lower():
      raise
    splits = ', '.join(datasets.load_dataset(**source).keys())
    raise UserError(f'{path} has no split "{split}" (it has: {splits}); pass --sft_split NAME') from None
  except datasets.exceptions.DatasetsError as e:  # a file its format's reader fails on
    cause = e.__cause__ or e
    raise UserError(f'{path}: the datasets library cannot read it ({type(cause).__name__}: '
                    f'{str(cause).strip().splitlines()[0]})') from None
  missing = [f for f in fields if f not in dataset.column_names]
  if missing:
    raise UserError(f'{path} ({split}) has no column "{missing[0]}" (columns: {", ".join(dataset.column_names)}); '
                    'name the query and response columns with --sft_field QUERY RESPONSE')
  if len(dataset) == 0:
    raise UserError(f'{path} ({split}) has no rows')
  return dataset


def _write_cache(dataset, prefix: str, fields, template: str) -> None:
  starts = []
  data.write_binidx(prefix, _documents(dataset, fields, template, starts), np.uint16)
  tmp = run_dir.temp_path(prefix + data.ANSWERS_SUFFIX)
  with open(tmp, 'wb') as f:  # a file object: np.save would append .npy to a name
    np.save(f, np.array(starts, np.int64))
  os.replace(tmp, prefix + data.ANSWERS_SUFFIX)


def _documents(dataset, fields, template: str, answer_starts: list):
  """Each row's tokens (prompt, response, END_OF_DOC), appending its response's offset to
  `answer_starts`; a batch of rows is encoded at a time."""
  query, response = fields
  with tqdm.tqdm(total=len(dataset), unit='row', desc='tokenizing', disable=None, leave=False) as bar:
    for rows in dataset.iter(batch_size=_BATCH_ROWS):
      prompts, answers = zip(*(_document(q, r, template) for q, r in zip(rows[query], rows[response])))
      for prompt_ids, answer_ids in zip(tokenizer.encode_batch(list(prompts)), tokenizer.encode_batch(list(answers))):
        answer_starts.append(len(prompt_ids))
        yield np.array(prompt_ids + answer_ids + [tokenizer.END_OF_DOC], np.uint16)
      bar.update(len(prompts))


def _document(query, response, template: str) -> tuple[str, str]:
  """(prompt, response) text of one row; a missing value is empty, a number its decimal form."""
  query, response = ('' if v is None else str(v) for v in (query, response))
  if template == 'alpaca':
    return _ALPACA_PROMPT.format(query=query), response + _ALPACA_END
  return f'User: {query}\n\nAssistant:', f' {response}'
