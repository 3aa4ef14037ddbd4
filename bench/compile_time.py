"""Compile time against depth: the layers are a Python loop (see rwkv_jax/model.py), so it grows.

  python bench/compile_time.py [--width 2048] [--layers 4 32]

Compiles the forward pass and the full train step from abstract shapes (no weights are
materialized), so it runs anywhere, CPU included.
"""
import argparse
import time

import jax
import jax.numpy as jnp

from rwkv_jax import checkpoint, model, train
from rwkv_jax.config import RWKVConfig


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
    cfg = RWKVConfig(n_layer=n_layer, n_embd=C, head_size=64, vocab_size=65536, dim_ffn=int(C * 3.5) // 32 * 32,
                     dim_mix_lora=32, dim_decay_lora=64)
    params = checkpoint.abstract_params(cfg, jnp.bfloat16)
    tokens = jax.ShapeDtypeStruct((1, args.ctx_len), jnp.int32)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), model.zero_state(cfg, 1))
    fwd = compile_seconds(lambda p, t, s: model.forward(p, cfg, t, s), params, tokens, state)
    opt = train.optimizer(train.schedule('cos', 1.0, 0.01, 10, 100))
    train_state = jax.eval_shape(lambda: train.init_train_state(cfg, opt))
    batch = jax.ShapeDtypeStruct((1, 1, args.ctx_len), jnp.int32)
    step = train.make_train_step(cfg, opt)
    start = time.perf_counter()
    step.lower(train_state, params, batch, batch).compile()
    print(f'L{n_layer:>3}: forward {fwd:6.2f} s   train step {time.perf_counter() - start:6.2f} s')


if __name__ == '__main__':
  main()
