"""Compile time against depth: the layers are a Python loop (see rwkv_jax/models/rwkv.py), so it grows.

  python bench/compile_time.py [--width 2048] [--layers 4 32]

Compiles the forward pass and the full train step from abstract shapes (no weights are
materialized), so it runs anywhere, CPU included.
"""
import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from rwkv_jax import checkpoint, train
from rwkv_jax.config import RWKVConfig
from rwkv_jax.models import RWKV


def compile_seconds(fn, *args) -> float:
  start = time.perf_counter()
  jax.jit(fn).lower(*args).compile()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--width', type=int, default=2048)
  parser.add_argument('--layers', type=int, nargs='+', default=[4, 32])
  parser.add_argument('--ctx_len', type=int, default=512)
  args = parser.parse_args()
  C = args.width
  print(f'backend {jax.default_backend()}, jax {jax.__version__}, width {C}, ctx {args.ctx_len}')
  # The first compile of a process also pays for XLA's own start-up: time that one twice, keep the second.
  for n_layer in [args.layers[0], *args.layers]:
    cfg = RWKVConfig(version='6', n_layer=n_layer, n_embd=C, head_size=64, vocab_size=65536,
                     dim_ffn=int(C * 3.5) // 32 * 32, lora=(('mix', 32), ('decay', 64)))
    model = nnx.eval_shape(lambda p: RWKV(cfg, p), checkpoint.abstract_params(cfg, dtype=jnp.bfloat16))
    graphdef, states, weights = train.split(model)
    tokens = jax.ShapeDtypeStruct((1, args.ctx_len), jnp.int32)
    fwd = compile_seconds(lambda s, w, t: nnx.merge(graphdef, s, w)(t), states, weights, tokens)
    opt = train.optimizer(train.schedule('cos', 1.0, 0.01, 10, 100))
    train_state = jax.eval_shape(lambda s: train.init_train_state(s, opt), states)
    batch = jax.ShapeDtypeStruct((1, 1, args.ctx_len), jnp.int32)
    step = train.make_train_step(graphdef, opt)
    start = time.perf_counter()
    step.lower(train_state, weights, batch, batch).compile()
    print(f'L{n_layer:>3}: forward {fwd:6.2f} s   train step {time.perf_counter() - start:6.2f} s')


if __name__ == '__main__':
  main()
