"""Turn a jsonl file into a repeated, shuffled uint16 binidx dataset for `--dataload pad`.

  python -m rwkv_jax.make_data novel.jsonl 10 512    # -> novel.bin, novel.idx

The pad sampler draws epoch_steps x micro_bsz distinct documents per epoch, so a small jsonl has
to be repeated: the non-empty lines are written N times, each copy in its own shuffled order
(seeded by --seed, so the output is reproducible), each document followed by END_OF_DOC (0).
The output format is the one RWKV-LM's make_data.py writes, so RWKV-PEFT reads it too.
"""

import argparse
import random
import sys

import numpy as np

from rwkv_jax import data
from rwkv_jax import tokenizer
from rwkv_jax.errors import UserError


def make_data(jsonl_path: str, copies: int, seed: int = 0) -> tuple[str, int, int]:
  """Writes the binidx pair next to `jsonl_path`; returns (prefix, token count, document count)."""
  if copies < 1:
    raise UserError(f'the repeat count must be at least 1, got {copies}')
  texts = data.read_jsonl_texts(jsonl_path)
  if not texts:
    raise UserError(f'{jsonl_path} has no non-empty lines; add {{"text": ...}} lines')
  docs = [np.array(ids + [tokenizer.END_OF_DOC], np.uint16)
          for ids in tokenizer.encode_batch(texts)]
  rng = random.Random(seed)
  order = []
  for _ in range(copies):
    copy_order = list(range(len(docs)))
    rng.shuffle(copy_order)
    order += copy_order
  prefix = jsonl_path[:-len('.jsonl')] if jsonl_path.endswith('.jsonl') else jsonl_path
  data.write_binidx(prefix, (docs[i] for i in order), np.uint16)
  written = data.read_binidx(prefix)
  return prefix, written.num_tokens, written.num_docs


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m rwkv_jax.make_data', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('jsonl', help='input, one {"text": ...} object per line')
  parser.add_argument('copies', type=int, help='how many shuffled copies of the data to write')
  parser.add_argument('ctx_len', type=int, help='training context length (for the suggestion)')
  parser.add_argument('--seed', type=int, default=0, help='shuffle seed')
  args = parser.parse_args(argv)
  try:
    prefix, num_tokens, num_docs = make_data(args.jsonl, args.copies, args.seed)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  micro_bsz = min(8, num_docs)
  print(f'wrote {prefix}.bin and {prefix}.idx: {num_tokens} tokens, {num_docs} documents')
  print(f'pad sampling needs epoch_steps x micro_bsz <= {num_docs} documents, e.g.\n'
        f'  python train_state.py --ckpt MODEL.pth --data {prefix} --ctx_len {args.ctx_len} '
        f'--micro_bsz {micro_bsz} --epoch_steps {num_docs // micro_bsz}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
