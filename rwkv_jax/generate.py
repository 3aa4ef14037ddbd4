"""Text generation with an RWKV model and an optional tuned state, in RNN mode.

  python -m rwkv_jax.generate --ckpt MODEL.pth [--state STATE] --prompt "User: hi\\n\\nAssistant:"
      [--max_tokens 200 --temperature 1.0 --top_p 0.85 --top_k 0 --repetition_penalty 0.4 --seed 0]
  python -m rwkv_jax.generate --ckpt MODEL.pth --state rwkv-9.pth --chat < questions.txt

STATE is anything `python -m convert export-state` reads (rwkv-N.pth, an Ai00 .state, a trainer
checkpoint directory). Without --state a merged model starts from its own state. A literal
"\\n" in --prompt is a newline, so the chat format can be typed on a shell line.

The prompt goes through the model in a few calls whose lengths are powers of two, so that any
prompt length reuses at most ~log2(T) compiled shapes; every generated token is then one call of
a single jitted one-token step that carries the state.

Sampling, in this order: repetition penalty on the logits, then temperature, top-k, top-p.
Temperature 0 or top_k 1 is greedy. The repetition penalty is presence + frequency style: a token
the reply has used n times loses R * (1 + n) from its logit, where n decays by PENALTY_DECAY per
generated token so that a word used long ago is forgiven; the prompt is not penalised.

--chat reads one user message per stdin line until EOF and answers each in the
`User: ...\\n\\nAssistant: ...\\n\\n` format of RWKV World models; a reply ends at a blank line
("\\n\\n") or at the end-of-document token 0. --prompt, if given, is fed first (e.g. a system text).
"""
import argparse
import codecs
import dataclasses
import functools
import math
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax import api, cli, tokenizer
from rwkv_jax.errors import UserError
from rwkv_jax.models import RWKV, State
from rwkv_jax.models.common import f32

PENALTY_DECAY = 0.996
MAX_PROMPT_CHUNK = 1024
CHAT_STOP = b'\n\n'


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 1.0
  top_p: float = 0.85
  top_k: int = 0  # 0: no top-k cut
  repetition_penalty: float = 0.0  # 0: off
  seed: int | None = None  # None: fresh randomness each run

  @property
  def greedy(self) -> bool:
    return self.temperature == 0 or self.top_k == 1


@functools.partial(jax.jit, static_argnums=0)
def _advance(graphdef, weights, tokens_1xT, state: State):
  """Feeds tokens; returns the logits after the last one [V] fp32 and the new state."""
  model = nnx.merge(graphdef, weights)
  x_1xTxC, state = model.hidden_states(tokens_1xT, state)
  return f32(model.head(x_1xTxC[0, -1])), state


def power_of_two_chunks(n: int) -> list[int]:
  """Lengths that add up to n: MAX_PROMPT_CHUNKs, then the binary digits of the rest."""
  chunks = [MAX_PROMPT_CHUNK] * (n // MAX_PROMPT_CHUNK)
  rest = n % MAX_PROMPT_CHUNK
  return chunks + [1 << b for b in reversed(range(rest.bit_length())) if rest >> b & 1]


def feed(model_: RWKV, tokens, state: State) -> tuple[np.ndarray, State]:
  """Runs `tokens` (at least one) through the model from `state`: (last logits [V], state)."""
  return _feed(nnx.split(model_), tokens, state)


def _feed(split, tokens, state: State) -> tuple[np.ndarray, State]:
  """feed with the model already split into (graphdef, weights): splitting walks every
  Variable, too slow to do for each generated token."""
  tokens = np.asarray(tokens, np.int32)
  if tokens.size == 0:
    raise UserError('the prompt is empty; give at least one token of text')
  start, logits_V = 0, None
  for length in power_of_two_chunks(tokens.size):
    logits_V, state = _advance(*split, jnp.asarray(tokens[None, start:start + length]), state)
    start += length
  return np.asarray(logits_V, np.float32), state


def sample(logits_V: np.ndarray, sampling: Sampling, rng: np.random.Generator,
           penalty_V: np.ndarray | None = None) -> int:
  """One token id from the logits after the repetition penalty, temperature, top-k and top-p."""
  logits_V = np.asarray(logits_V, np.float64)
  if penalty_V is not None:
    logits_V = logits_V - penalty_V
  if sampling.greedy:
    return int(np.argmax(logits_V))
  logits_V = logits_V / sampling.temperature
  order = np.argsort(-logits_V)
  if sampling.top_k > 0:
    order = order[:sampling.top_k]
  probs = np.exp(logits_V[order] - logits_V[order[0]])
  probs /= probs.sum()
  # Keep the most likely tokens until their mass reaches top_p (at least one).
  keep = min(int(np.searchsorted(np.cumsum(probs), sampling.top_p)) + 1, len(order))
  probs = probs[:keep] / probs[:keep].sum()
  return int(order[rng.choice(keep, p=probs)])


def generate(model_: RWKV, prompt_tokens, state: State | None = None,
             sampling: Sampling = Sampling(), max_tokens: int = 200,
             on_token: Callable[[int], None] | None = None, stop: bytes | None = None,
             rng: np.random.Generator | None = None) -> tuple[list[int], State]:
  """Continues `prompt_tokens` from `state` (None: the model's own initial state).

  Stops after max_tokens, at token 0 (END_OF_DOC, not returned) or once the reply's bytes
  contain `stop` (returned with it). Returns the new token ids and the state after all of them,
  ready to continue the conversation. `on_token(id)` is called as each token is chosen.
  """
  state = model_.init_state(1) if state is None else state
  rng = np.random.default_rng(sampling.seed) if rng is None else rng
  split = nnx.split(model_)
  logits_V, state = _feed(split, prompt_tokens, state)
  counts_V = np.zeros(model_.cfg.vocab_size, np.float64)
  tokens = []
  for _ in range(max_tokens):
    penalty_V = sampling.repetition_penalty * (counts_V > 0) * (1 + counts_V) if sampling.repetition_penalty else None
    token = sample(logits_V, sampling, rng, penalty_V)
    if token == tokenizer.END_OF_DOC:
      break
    tokens.append(token)
    if on_token is not None:
      on_token(token)
    counts_V *= PENALTY_DECAY
    counts_V[token] += 1
    logits_V, state = _feed(split, [token], state)
    if stop is not None and stop in tokenizer.decode_bytes(tokens[-len(stop):]):  # >= 1 byte a token
      break
  return tokens, state


class TextStream:
  """Prints tokens as they come; a UTF-8 character split over two tokens prints once whole."""

  def __init__(self, out=None):
    self._out = out or sys.stdout
    self._decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')

  def __call__(self, token: int) -> None:
    self._out.write(self._decoder.decode(tokenizer.decode_bytes([token])))
    self._out.flush()

  def close(self) -> None:
    self._out.write(self._decoder.decode(b'', final=True))
    self._out.flush()


def chat_turn(user_text: str) -> str:
  # A blank line inside a message would read as the end of the turn.
  message = '\n'.join(line for line in user_text.strip().splitlines() if line.strip())
  return f'User: {message}\n\nAssistant:'


def terminal_lines():
  """User messages typed at a terminal, each after a `User: ` prompt, until EOF (Ctrl-D)."""
  while True:
    try:
      yield input('User: ')
    except EOFError:
      return


def chat(model_: RWKV, state: State, sampling: Sampling, max_tokens: int, preamble: str | None,
         lines, out=None, echo: bool = True) -> None:
  """The turn-taking loop: each line of `lines` is a user message, answered on `out`.

  echo: also write each `User: ...` turn to `out` (off when a person typed it at a terminal).
  """
  out = out or sys.stdout
  rng = np.random.default_rng(sampling.seed)
  pending = preamble or ''  # text fed together with the next user turn
  for line in lines:
    if not line.strip():
      continue
    turn = pending + chat_turn(line)
    out.write(f'User: {line.strip()}\n\nAssistant:' if echo else 'Assistant:')
    stream = TextStream(out)
    reply, state = generate(model_, tokenizer.encode(turn), state, sampling, max_tokens, stream, CHAT_STOP, rng)
    stream.close()
    text = tokenizer.decode_bytes(reply)
    # A reply cut short (max_tokens, token 0) gets the blank line the format needs before "User:".
    pending = '' if text.endswith(CHAT_STOP) else '\n\n'
    if pending:
      out.write(pending)
  out.flush()


def build_parser() -> argparse.ArgumentParser:
  parser = cli.ArgumentParser(prog='python -m rwkv_jax.generate', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--ckpt', '--load_model', required=True, help='model: a .pth or to-flax directory')
  parser.add_argument('--state', help='a tuned state (rwkv-N.pth, .state, trainer checkpoint dir)')
  parser.add_argument('--prompt', help='the text to continue (with --chat: fed before the first turn)')
  parser.add_argument('--chat', action='store_true', help='answer stdin lines as User/Assistant turns')
  parser.add_argument('--max_tokens', type=int, default=200)
  parser.add_argument('--temperature', type=float, default=Sampling.temperature)
  parser.add_argument('--top_p', type=float, default=Sampling.top_p)
  parser.add_argument('--top_k', type=int, default=Sampling.top_k)
  parser.add_argument('--repetition_penalty', type=float, default=Sampling.repetition_penalty)
  parser.add_argument('--seed', type=int, default=None)
  return parser


def check_sampling(args) -> None:
  cli.check_flag(args, 'max_tokens', lambda value: value >= 1, 'must be at least 1')
  cli.check_flag(args, 'temperature', lambda value: 0 <= value < math.inf, 'must be 0 (greedy) or a positive number')
  cli.check_flag(args, 'top_p', lambda value: 0 < value <= 1, 'must be above 0 and at most 1')
  cli.check_flag(args, 'top_k', lambda value: value >= 0, 'must be 0 (no cut) or more')
  cli.check_flag(args, 'repetition_penalty', lambda value: 0 <= value < math.inf,
                 'must be 0 (off) or a positive number')
  cli.check_flag(args, 'seed', lambda value: value >= 0, 'must be 0 or more')
  if not args.chat and not args.prompt:
    raise UserError('--prompt is required (or use --chat to read messages from stdin)')


def main(argv):
  args = build_parser().parse_args(argv)
  check_sampling(args)
  model_ = api.load(args.ckpt)
  if model_.cfg.vocab_size != tokenizer.MODEL_VOCAB_SIZE:
    raise UserError(f'{args.ckpt} has a {model_.cfg.vocab_size}-token vocabulary; generate speaks the '
                    f'World tokenizer ({tokenizer.MODEL_VOCAB_SIZE}), so use a World model')
  state = api.load_state(args.state, model_) if args.state else model_.init_state(1)
  sampling = Sampling(args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.seed)
  prompt = (args.prompt or '').replace('\\n', '\n')  # a shell passes "\n" as two characters
  if args.chat:
    if sys.stdin.isatty():
      chat(model_, state, sampling, args.max_tokens, prompt, terminal_lines(), echo=False)
    else:
      chat(model_, state, sampling, args.max_tokens, prompt, sys.stdin)
    return
  sys.stdout.write(prompt)
  stream = TextStream()
  generate(model_, tokenizer.encode(prompt), state, sampling, args.max_tokens, stream)
  stream.close()
  sys.stdout.write('\n')


if __name__ == '__main__':
  cli.run(main)
