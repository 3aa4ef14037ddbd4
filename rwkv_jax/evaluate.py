"""Loss and perplexity on held-out data: the base model and each tuned state, side by side.

  python -m rwkv_jax.evaluate --ckpt MODEL.pth --data heldout.jsonl [--state rwkv-4.pth rwkv-9.pth]
      [--ctx_len 512 --batch_size 8 --max_batches N --dataload pad|get --loss_mask none|qa]

Every state runs on the same batches (no shuffling), as one initial state shared by the batch
with zero token shifts, the way Runner and Ai00 mount it. `pad` (the default) starts each sample
at a document's start, as chat data is used, and covers as many whole batches of documents as
there are (or --max_batches); `get` reads --max_batches windows at offsets fixed by the seed.

For the trainer: `mean_loss(model, batches, state_LxHxVxK)` over any iterable of
(inputs_BxT, targets_BxT) pairs, e.g. `eval_batches(sampler, n)`.
"""
import argparse
import functools
import math
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from rwkv_jax import api, cli, data, state_io, train
from rwkv_jax.models import RWKV, State, is_embedded
from rwkv_jax.models.common import initial_state

BASE_LABEL = '(model as loaded)'


@functools.partial(jax.jit, static_argnums=0)
def _loss_sum(graphdef, weights, inputs_BxT, targets_BxT, state: State):
  """(sum of next-token cross-entropy over targets that are not IGNORE_INDEX, their count)."""
  model = nnx.merge(graphdef, weights)
  x_BxTxC, _ = model.hidden_states(inputs_BxT, state)
  ce_sum, count, _ = train.cross_entropy(model.head.weight.get_value(), x_BxTxC, targets_BxT)
  return ce_sum, count


def mean_loss(model: RWKV, batches, state_LxHxVxK=None) -> tuple[float, int]:
  """Mean next-token loss (nats) over every unmasked target of `batches`, and how many there were.

  batches: (inputs_BxT, targets_BxT) pairs, targets IGNORE_INDEX where no loss is taken, inputs
  token ids or their embedding rows (RWKV.hidden_states).
  state_LxHxVxK: the initial WKV state shared by every sequence; None: the model's own
  (zeros, the state merged into it, or the states being trained).
  """
  wkv = model.initial_wkv() if state_LxHxVxK is None else jnp.asarray(state_LxHxVxK, jnp.float32)
  state = initial_state(wkv, model.cfg.n_embd)
  graphdef, weights = nnx.split(model)
  total, count = 0.0, 0
  for inputs_BxT, targets_BxT in batches:
    inputs_BxT = inputs_BxT if is_embedded(inputs_BxT) else jnp.asarray(inputs_BxT, jnp.int32)
    loss_sum, n = _loss_sum(graphdef, weights, inputs_BxT, jnp.asarray(targets_BxT, jnp.int32), state)
    total, count = total + float(loss_sum), count + int(n)
  return (total / count if count else float('nan')), count


def eval_sampler(token_data: data.TokenData, ctx_len: int, batch_size: int, dataload: str = 'pad',
                 max_batches: int | None = None, loss_mask: str = 'none') -> data.Sampler:
  """A deterministic Sampler over held-out data; its epoch_steps is the number of batches."""
  if dataload == 'get':
    steps = max_batches or max(1, token_data.num_tokens // (ctx_len * batch_size))
  else:
    batch_size = min(batch_size, token_data.num_docs)
    steps = token_data.num_docs // batch_size
    steps = min(steps, max_batches) if max_batches else steps
  return data.Sampler(token_data, ctx_len, batch_size, dataload, epoch_steps=steps, shuffle=False,
                      loss_mask=loss_mask)


def eval_batches(sampler: data.Sampler, max_batches: int | None = None):
  """Batches 0..n-1 of epoch 0: the same every time, so losses compare across calls."""
  steps = sampler.epoch_steps if max_batches is None else min(max_batches, sampler.epoch_steps)
  return (sampler.batch(0, step) for step in range(steps))


def build_parser() -> argparse.ArgumentParser:
  parser = cli.ArgumentParser(prog='python -m rwkv_jax.evaluate', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--ckpt', '--load_model', required=True, help='model: a .pth or to-flax directory')
  parser.add_argument('--data', '--data_file', required=True, help='held-out .jsonl, text or binidx prefix')
  parser.add_argument('--data_type', choices=data.DATA_TYPES, help='default: guessed from the name')
  parser.add_argument('--state', nargs='*', default=[], help='tuned states to compare with the model')
  parser.add_argument('--ctx_len', type=int, default=512)
  parser.add_argument('--batch_size', '--micro_bsz', type=int, default=8)
  parser.add_argument('--max_batches', type=int, default=None)
  parser.add_argument('--dataload', choices=('pad', 'get'), default='pad')
  parser.add_argument('--loss_mask', choices=('none', 'qa'), default='none')
  return parser


def check_flags(args) -> None:
  for flag in ('ctx_len', 'batch_size', 'max_batches'):
    cli.check_flag(args, flag, lambda value: value >= 1, 'must be at least 1')


def main(argv):
  args = build_parser().parse_args(argv)
  check_flags(args)
  model_ = api.load(args.ckpt)
  states = {path: state_io.read_state(path, model_.cfg) for path in args.state}  # refuse misfits first
  token_data = data.load_data(args.data, args.data_type, model_.cfg.vocab_size)
  sampler = eval_sampler(token_data, args.ctx_len, args.batch_size, args.dataload, args.max_batches,
                         args.loss_mask)
  print(f'{args.data}: {sampler.epoch_steps} batches x {sampler.batch_size} x {args.ctx_len} tokens '
        f'({args.dataload}); model {model_.cfg.describe()}')
  rows = [(BASE_LABEL, None)] + [(pathlib.Path(p).name, s) for p, s in states.items()]
  width = max(len(label) for label, _ in rows)
  print(f'{"state":<{width}}  {"loss":>8}  {"ppl":>10}  {"tokens":>9}')
  for label, state in rows:
    loss, count = mean_loss(model_, eval_batches(sampler), state)
    print(f'{label:<{width}}  {loss:8.4f}  {math.exp(min(loss, 700)):10.3f}  {count:9d}', flush=True)


if __name__ == '__main__':
  cli.run(main)
