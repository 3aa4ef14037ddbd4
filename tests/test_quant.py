"""int8 / NF4 weights: dequantization error, logits of a quantized model, state tuning on one.

  python -m pytest tests/test_quant.py -q
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from rwkv_jax import quant, synthetic, train
from rwkv_jax.models import generation
from tests.conftest import random_model

# TINY with a small vocabulary: a 65536-row embedding and head would only slow
# these tests down.
CFG = dataclasses.replace(synthetic.TINY, vocab_size=1024)
# Logits may move by at most this many times the weights' relative RMS error.
# Errors of the 16 quantized projections (8 a layer, 2 layers) are independent, so
# they add in quadrature: sqrt(16) = 4 times the error of one matrix if each
# layer passes perturbations on with unit gain. Measured on seeds 0-2, vocab
# 65536 and 1024, 2 x 32-64 tokens: logits move 2.4-2.9x the weight error (int8
# 0.0065 -> 0.017-0.019, nf4 0.092 -> 0.22-0.25). The int8 embedding reaches
# every position through the residual stream and alone moves logits as much as
# all 16 projections (seeds 0-1: 0.018-0.021, at most 4x too); independent of
# them, it adds in quadrature: 4 * sqrt(2). The int8 head adds ~1x int8's error
# (0.007), which the quadrature sum barely notices. Measured with all of them:
# int8 3.9-4.2x.
LOGIT_ERROR_PER_WEIGHT_ERROR = 4.0 * np.sqrt(2)


def bf16_model(seed):
  return random_model(CFG, seed, ml_dtypes.bfloat16)


def weight_matrix(rng, shape):
  """bf16 weights with rows of very different scales, an all-zero row and an outlier."""
  w = rng.standard_normal(shape) * np.exp(rng.uniform(-4, 1, shape[:-1] + (1,)))
  w[..., 0, :] = 0.0
  w[..., 1, 3] = 50.0
  return w.astype(ml_dtypes.bfloat16)


def relative_rms(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2))


def test_int8_error_is_at_most_half_a_step():
  w = weight_matrix(np.random.default_rng(0), (3, 40, 100))
  q = quant.quantize(w, 'int8')
  assert q.values.dtype == jnp.int8 and q.values.shape == (3, 40, 100) and q.scale.shape == (3, 40)
  w32 = w.astype(np.float32)
  error = np.abs(np.asarray(quant.dense(q, jnp.float32)) - w32)
  scale = np.abs(w32).max(-1, keepdims=True) / 127
  assert np.all(error <= scale / 2 * (1 + 1e-5))
  assert np.all(error[:, 0] == 0)
  assert quant.dense(q).dtype == jnp.bfloat16


@pytest.mark.parametrize('n_in', [128, 100])  # 100: a partial last block
def test_nf4_error_is_at_most_half_the_gap_between_levels(n_in):
  w = weight_matrix(np.random.default_rng(1), (2, 24, n_in))
  q = quant.quantize(w, 'nf4')
  blocks = -(-n_in // quant.BLOCK)
  assert q.packed.dtype == jnp.uint8 and q.packed.shape == (2, 24, blocks * 32) and q.shape == w.shape
  w32 = w.astype(np.float32)
  padded = np.pad(w32, ((0, 0), (0, 0), (0, blocks * quant.BLOCK - n_in)))
  absmax = np.abs(padded.reshape(2, 24, blocks, quant.BLOCK)).max(-1)
  absmax = np.repeat(absmax, quant.BLOCK, axis=-1)[..., :n_in]
  x = w32 / np.where(absmax > 0, absmax, 1)
  upper = np.clip(np.searchsorted(quant.NF4_LEVELS, x), 1, 15)  # x lies in [levels[upper-1], levels[upper]]
  half_gap = (quant.NF4_LEVELS[upper] - quant.NF4_LEVELS[upper - 1]) / 2
  error = np.abs(np.asarray(quant.dense(q, jnp.float32)) - w32)
  # The block scale is stored in bf16: relative rounding error at most 2^-8 of the absmax,
  # times |level| <= 1, on top of the distance to the nearest level.
  assert q.scale.dtype == jnp.bfloat16
  assert np.all(error <= (half_gap + 2.0**-8) * absmax * (1 + 1e-5) + 1e-30)
  assert np.all(error[:, 0] == 0)


@pytest.mark.parametrize('mode', quant.MODES)
def test_quantized_model_logits_stay_close(mode):
  tokens_BxT = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 32))
  for seed in (0, 1):
    model = bf16_model(seed)
    reference = model.forward(tokens_BxT)[0]
    weight = np.asarray(model.blocks[1].ffn.key.weight.get_value())
    quant.quantize_model(model, mode)
    weight_error = relative_rms(quant.dense(model.blocks[1].ffn.key.weight.get_value(), jnp.float32),
                                weight.astype(np.float32))
    assert weight_error < {'int8': 0.01, 'nf4': 0.12}[mode]
    assert relative_rms(model.forward(tokens_BxT)[0], reference) < LOGIT_ERROR_PER_WEIGHT_ERROR * weight_error


def test_quantize_model_touches_only_the_matrices():
  model = bf16_model(0)
  emb = np.asarray(model.emb.weight.get_value()).copy()
  quant.quantize_model(model, 'nf4')
  weights = nnx.state(model, nnx.Param)
  quantized = {path for path, leaf in jax.tree_util.tree_leaves_with_path(weights, is_leaf=quant.is_quantized)
               if quant.is_quantized(leaf)}
  assert len(quantized) == len(generation(CFG.version).QUANTIZED) * CFG.n_layer + 2
  assert all(isinstance(b.ffn.key.weight.get_value(), quant.NF4Weight) for b in model.blocks)
  assert isinstance(model.emb.weight.get_value(), quant.Int8Weight)
  assert isinstance(model.head.weight.get_value(), quant.Int8Weight)
  assert not quant.is_quantized(model.blocks[0].att.time_maa_w1.get_value())
  ids = np.array([[3, 0, 1023]])
  rows = np.asarray(quant.dense(quant.take_rows(model.emb.weight.get_value(), ids)), np.float32)
  assert rows.shape == (1, 3, CFG.n_embd)
  assert relative_rms(rows, emb[ids].astype(np.float32)) < 0.01


def test_quantize_works_a_block_of_rows_at_a_time(monkeypatch):
  w = weight_matrix(np.random.default_rng(2), (2, 40, 128))
  for mode in quant.MODES:
    whole = quant.dense(quant.quantize(w, mode), jnp.float32)
    monkeypatch.setattr(quant, 'ROWS', 16)  # 40 rows: blocks of 16, 16 and 8
    blocked = quant.dense(quant.quantize(w, mode), jnp.float32)
    monkeypatch.undo()
    np.testing.assert_array_equal(blocked, whole)


def test_state_tuning_a_quantized_model_lowers_the_loss():
  graphdef, states, weights = train.split(quant.quantize_model(bf16_model(0), 'nf4'))
  opt = train.optimizer(train.schedule('cos', 1.0, 0.01, 10, 100))
  train_state = train.init_train_state(states, opt)
  step = train.make_train_step(graphdef, opt, remat=False)
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (1, 1, 33))
  inputs, targets = tokens[..., :-1], tokens[..., 1:]
  losses = []
  for _ in range(20):
    train_state, loss = step(train_state, weights, inputs, targets)
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.7 * losses[0], losses
