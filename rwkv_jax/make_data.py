"""Turn a jsonl file into a repeated, shuffled uint16 binidx dataset for `--dataload pad`.

  python -m rwkv_jax.make_data novel.jsonl 10 512    # -> novel.bin, novel.idx

The pad sampler draws epoch_steps x micro_bsz distinct documents per epoch, so a small jsonl has
to be repeated: the non-empty lines are written N times, each copy in its own shuffled order
(seeded by --seed, so the output is reproducible), each document followed by END_OF_DOC (0).
The output format is the one RWKV-LM's make_data.py writes, so RWKV-PEFT reads it too.

The jsonl is tokenized once, the way training reads it (streamed, on every core, cached as
novel.jsonl.tokens.bin/.idx); the copies are then gathered from that cache in their shuffled
order a few million tokens at a time, so memory stays small whatever N and the file size.
"""

import argparse

import numpy as np

from rwkv_jax import cli, data
from rwkv_jax.errors import UserError

_GATHER_TOKENS = 1 << 22  # tokens gathered from the cache and written at a time


def make_data(jsonl_path: str, copies: int, seed: int = 0) -> tuple[str, int, int]:
  """Writes the binidx pair next to `jsonl_path`; returns (prefix, token count, document count)."""
  if copies < 1:
    raise UserError(f'the repeat count must be at least 1, got {copies}')
  source = data.load_data(jsonl_path, 'jsonl')
  prefix = jsonl_path[:-len('.jsonl')] if jsonl_path.endswith('.jsonl') else jsonl_path
  rng = np.random.default_rng(seed)
  docs_per_write = max(1, _GATHER_TOKENS * source.num_docs // source.num_tokens)
  with data.BinidxWriter(prefix, np.uint16) as writer:
    for _ in range(copies):
      order = rng.permutation(source.num_docs)
      for first in range(0, len(order), docs_per_write):
        docs = order[first:first + docs_per_write]
        writer.append(_gather(source, docs), source.doc_lens[docs])
  return prefix, writer.num_tokens, writer.num_docs


def _gather(source: data.TokenData, docs: np.ndarray) -> np.ndarray:
  """The tokens of documents `docs`, back to back in that order."""
  lens, starts = source.doc_lens[docs], source.doc_starts[docs]
  ends_in_output = np.cumsum(lens)
  # Output position p of a document copies source position start + (p - its output start).
  offsets = np.repeat(starts - (ends_in_output - lens), lens)
  return np.asarray(source.tokens[offsets + np.arange(ends_in_output[-1])])


def main(argv=None) -> None:
  parser = cli.ArgumentParser(prog='python -m rwkv_jax.make_data', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('jsonl', help='input, one {"text": ...} object per line')
  parser.add_argument('copies', type=int, help='how many shuffled copies of the data to write')
  parser.add_argument('ctx_len', type=int, help='training context length (for the suggestion)')
  parser.add_argument('--seed', type=int, default=0, help='shuffle seed')
  args = parser.parse_args(argv)
  prefix, num_tokens, num_docs = make_data(args.jsonl, args.copies, args.seed)
  micro_bsz = min(8, num_docs)
  print(f'wrote {prefix}.bin and {prefix}.idx: {num_tokens} tokens, {num_docs} documents')
  print(f'pad sampling needs epoch_steps x micro_bsz <= {num_docs} documents, e.g.\n'
        f'  python train_state.py --ckpt MODEL.pth --data {prefix} --ctx_len {args.ctx_len} '
        f'--micro_bsz {micro_bsz} --epoch_steps {num_docs // micro_bsz}')


if __name__ == '__main__':
  cli.run(main)
