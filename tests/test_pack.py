"""Packed documents (`--dataload pack`): several documents in one row, each as if alone in a row.

Kernels: the per-chunk "start from s0" flags of every WKV implementation against the fp64
recurrences of test_wkv6/test_wkv7 run on each document separately (forward, final state and every
gradient, ds0 summed over the documents), on fresh random inputs. Models: the loss and the
initial-state gradient of a packed batch equal those of the same documents padded one a row, for
every generation. Trainer: `train_state.py --dataload pack` end to end. CPU runs the Pallas kernels
in interpret mode; `pytest -m gpu` runs the same checks compiled on a GPU.
"""
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train_state
from pallas_kernels.common import DOC_ALIGN
from pallas_kernels.wkv6 import wkv6
from pallas_kernels.wkv7 import wkv7
from rwkv_jax import data, quant, train
from rwkv_jax.config import RWKVConfig
from tests import test_wkv6, test_wkv7
from tests.conftest import random_model

on_gpu = pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU')


def random_doc_starts(rng, B, T):
  """[B, ceil(T / DOC_ALIGN)] bool: a document at block 0 of every row, and at about half the others."""
  starts = rng.random((B, -(-T // DOC_ALIGN))) < 0.5
  starts[:, 0] = True
  return starts


def per_document(reference_fp64, inputs, s0_BxHxVxK, dy, dsT, starts_BxM, n_grads):
  """The fp64 recurrence run on every document of every row alone, from the row's s0: y and the
  input gradients put back in place, the final state and its cotangent the last document's, and
  d s0 summed over the documents. `inputs` are the [B, T, ...] arrays ahead of the state."""
  B, T = dy.shape[:2]
  y = np.zeros(dy.shape)
  grads = [np.zeros(x.shape) for x in inputs[:n_grads]]
  shared = list(inputs[n_grads:])  # u (WKV-6): not per token, its gradient summed
  shared_grads = [np.zeros(x.shape) for x in shared]
  sT, ds0 = np.zeros(dsT.shape), np.zeros(s0_BxHxVxK.shape)
  for b in range(B):
    bounds = [m * DOC_ALIGN for m in np.flatnonzero(starts_BxM[b])] + [T]
    for first, end in zip(bounds[:-1], bounds[1:]):
      last = end == T
      piece = lambda x: x[b:b + 1, first:end]
      y_doc, s_doc, doc_grads = reference_fp64(*(piece(x) for x in inputs[:n_grads]), *shared,
                                               s0_BxHxVxK[b:b + 1], piece(dy),
                                               dsT[b:b + 1] if last else np.zeros_like(dsT[b:b + 1]))
      y[b, first:end] = y_doc[0]
      for g, doc_g in zip(grads, doc_grads[:n_grads]):
        g[b, first:end] = doc_g[0]
      for g, doc_g in zip(shared_grads, doc_grads[n_grads:-1]):
        g += doc_g
      ds0[b] += doc_grads[-1][0]
      if last:
        sT[b] = s_doc[0]
  return y, sT, grads, shared_grads, ds0


def forward_backward(fn, args, cotangents):
  """(y, final state, every input's gradient) of fn(*args), as one program."""
  def run(*args):
    outputs, vjp = jax.vjp(fn, *args)
    return (*outputs, *vjp(cotangents))

  return jax.jit(run)(*args)


def check_wkv6(implementation, dtype='float32', B=2, T=100, H=2, K=16):
  seed, (r, k, v, w, u, s0), (dy, dsT), _ = test_wkv6.random_case(B, T, H, K, dtype, shared_s0=True)
  starts = random_doc_starts(np.random.default_rng(seed), B, T)
  s0_B = np.broadcast_to(s0, (B, H, K, K))
  y, sT, (dr, dk, dv, dw), (du,), ds0 = per_document(test_wkv6.reference_fp64, (r, k, v, w, u), s0_B, dy, dsT,
                                                     starts, n_grads=4)
  expected = (y, sT, dr, dk, dv, dw, du, ds0.sum(0))
  args = [jnp.asarray(x, dtype) for x in (r, k, v)] + [jnp.asarray(x) for x in (w, u, s0)]
  fn = functools.partial(wkv6, doc_starts=jnp.asarray(starts), implementation=implementation)
  outs = forward_backward(fn, args, (jnp.asarray(dy, dtype), jnp.asarray(dsT)))
  test_wkv6.assert_close(seed, dtype, outs, expected, f'{implementation} packed {starts.sum()} documents')


def check_wkv7(implementation, dtype='float32', B=2, T=100, H=2, K=16):
  seed, (r, w, k, v, a, b, s0), (dy, dsT), _ = test_wkv7.random_case(B, T, H, K, dtype, shared_s0=True)
  starts = random_doc_starts(np.random.default_rng(seed), B, T)
  s0_B = np.broadcast_to(s0, (B, H, K, K))
  y, sT, grads, _, ds0 = per_document(test_wkv7.reference_fp64, (r, w, k, v, a, b), s0_B, dy, dsT, starts,
                                      n_grads=6)
  expected = (y, sT, *grads, ds0.sum(0))
  dtypes = (dtype, 'float32', dtype, dtype, dtype, dtype, 'float32')  # w and s0 are fp32
  args = [jnp.asarray(x, d) for x, d in zip((r, w, k, v, a, b, s0), dtypes)]
  fn = functools.partial(wkv7, doc_starts=jnp.asarray(starts), implementation=implementation)
  outs = forward_backward(fn, args, (jnp.asarray(dy, dtype), jnp.asarray(dsT)))
  errors = {name: test_wkv7._rel_rms(o, ref) for name, o, ref in zip(test_wkv7.NAMES, outs, expected)}
  print(f'seed={seed} {dtype} {implementation} packed {starts.sum()} documents: '
        + ' '.join(f'{n}={e:.1e}' for n, e in errors.items()))
  bad = {n: e for n, e in errors.items() if not e <= test_wkv7.TOL[dtype]}
  assert not bad, f'relative error above {test_wkv7.TOL[dtype]}: {bad} (seed {seed})'


# ----------------------------------------------------------------------------- kernels, CPU


@pytest.mark.parametrize('implementation', ['scan', 'xla_chunked', 'pallas'])
def test_wkv6_flags_start_each_document_from_s0(implementation):
  check_wkv6(implementation)


@pytest.mark.parametrize('implementation', ['scan', 'xla_chunked', 'pallas'])
def test_wkv7_flags_start_each_document_from_s0(implementation):
  check_wkv7(implementation)


# ----------------------------------------------------------------------------- kernels, GPU


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('implementation', ['xla_chunked', 'pallas'])
def test_gpu_wkv6_flags(implementation, dtype):
  check_wkv6(implementation, dtype, B=3, T=300, H=4, K=64)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('implementation', ['xla_chunked', 'pallas'])
def test_gpu_wkv7_flags(implementation, dtype):
  check_wkv7(implementation, dtype, B=3, T=300, H=4, K=64)


# ----------------------------------------------------------------------------- data


def random_token_data(rng, doc_lens, vocab_size, with_answers=False):
  """Random documents of these lengths (answers, if asked for, starting at random offsets)."""
  doc_lens = np.asarray(doc_lens, np.int64)
  tokens = rng.integers(1, vocab_size, int(doc_lens.sum())).astype(np.int32)
  starts = np.cumsum(doc_lens) - doc_lens
  answers = rng.integers(0, doc_lens) if with_answers else None
  return data.TokenData(tokens, starts, doc_lens, 'random', answers)


def whole_epoch(token_data, ctx_len, dataload):
  """Every sample of the data in one batch of epoch 0, in data order: (inputs, targets, doc_starts)."""
  samples = data.samples_per_pass(token_data, dataload, ctx_len)
  sampler = data.Sampler(token_data, ctx_len, samples, dataload, epoch_steps=1, shuffle=False)
  return (*sampler.batch(0, 0), sampler.doc_starts(0, 0)), sampler


def test_packed_rows_hold_each_document_as_pad_gives_it():
  """Every document with a target is in one packed row once, at its flagged aligned offset, with
  the inputs and targets (answer masks included) of its own pad row; nothing else takes a loss."""
  rng = np.random.default_rng()
  ctx_len = int(rng.integers(40, 200))  # often not a multiple of DOC_ALIGN
  token_data = random_token_data(rng, rng.integers(1, 2 * ctx_len, 300), 1000, with_answers=True)
  (pad_in, pad_tgt, no_flags), pad = whole_epoch(token_data, ctx_len, 'pad')
  (pack_in, pack_tgt, starts), pack = whole_epoch(token_data, ctx_len, 'pack')
  assert no_flags is None and starts.shape == (len(pack_in), -(-ctx_len // DOC_ALIGN))
  spans = np.minimum(token_data.doc_lens - 1, ctx_len)
  covered = np.zeros(pack_in.shape, bool)
  placed = []
  for row in range(len(pack_in)):
    docs, offsets, _ = pack._packing.placements(np.array([row]))
    np.testing.assert_array_equal(np.flatnonzero(starts[row]) * DOC_ALIGN, offsets)
    for doc, offset in zip(docs, offsets):
      span = spans[doc]
      assert offset + span <= ctx_len and not covered[row, offset:offset + span].any()
      covered[row, offset:offset + span] = True
      np.testing.assert_array_equal(pack_in[row, offset:offset + span], pad_in[doc, :span])
      np.testing.assert_array_equal(pack_tgt[row, offset:offset + span], pad_tgt[doc, :span])
    placed += docs.tolist()
  assert sorted(placed) == np.flatnonzero(spans).tolist()
  assert np.all(pack_tgt[~covered] == data.IGNORE_INDEX) and np.all(pack_in[~covered] == 0)
  assert pack.doc_tokens(0, 0) == pad.doc_tokens(0, 0) == covered.sum()


def test_best_fit_puts_a_document_in_the_fullest_row_with_room():
  # ctx 128 = 4 blocks of 32. Spans (length - 1): 70 takes 3 blocks of row 0, 40 two of a new row 1;
  # 20 fits both, and goes to row 0 (fuller) at 96; 100 needs a new row; 1 token: no target, left out;
  # 30 fits row 1 at 64; 200 is cut to a whole row.
  packing = data.pack_documents(np.array([71, 41, 21, 101, 1, 31, 201]), 128, align=32)
  rows = [packing.placements(np.array([r]))[:2] for r in range(packing.num_rows)]
  assert [(d.tolist(), o.tolist()) for d, o in rows] == [([0, 2], [0, 96]), ([1, 5], [0, 64]), ([3], [0]),
                                                          ([6], [0])]


def test_pack_epochs_take_every_row_once_and_refuse_too_few_rows():
  rng = np.random.default_rng()
  token_data = random_token_data(rng, rng.integers(1, 100, 120), 1000)
  rows = data.samples_per_pass(token_data, 'pack', 64)
  sampler = data.Sampler(token_data, 64, 4, 'pack', epoch_steps=rows // 4, seed=3)
  docs = np.concatenate([sampler._placements(1, step)[0] for step in range(rows // 4)])
  assert len(docs) == len(set(docs.tolist()))
  assert sampler.doc_tokens(1, 0) == int(np.minimum(token_data.doc_lens[sampler._placements(1, 0)[0]] - 1, 64).sum())
  with pytest.raises(data.UserError, match='pack into'):
    data.Sampler(token_data, 64, 4, 'pack', epoch_steps=rows // 4 + 1)


# ----------------------------------------------------------------------------- models


# One head, small widths; RWKV-7 with two layers, so that its value residual is in.
MODELS = {
    '5': RWKVConfig(version='5', n_layer=1, n_embd=64, head_size=64, vocab_size=256, dim_ffn=64, lora=()),
    '6': RWKVConfig(version='6', n_layer=1, n_embd=64, head_size=64, vocab_size=256, dim_ffn=64,
                    lora=(('mix', 8), ('decay', 8))),
    '7': RWKVConfig(version='7', n_layer=2, n_embd=64, head_size=64, vocab_size=256, dim_ffn=64,
                    lora=(('w', 8), ('a', 8), ('v', 8), ('g', 8))),
}
# Packed and padded, the same documents' loss and initial-state gradient are the same sums of the
# same terms, formed in another order (other chunks, other rows): fp32 rounding, the bound.
EXACT = 1e-5


def loss_and_state_grad(model, inputs_BxT, targets_BxT, doc_starts_BxM):
  """Mean cross-entropy over the unmasked targets and its gradient with respect to every layer's
  initial state [L, H, V, K]. (Not L2Wrap, which RWKV-PEFT applies at every position of a row,
  padding included, so that its gradient depends on the padding by design.) The embedding rows
  are gathered on the host, as the trainer does."""
  rows_BxTxC = quant.take_rows(train.host_embedding(model), inputs_BxT)
  graphdef, states, weights = train.split(model)

  def loss(states):
    model = nnx.merge(graphdef, states, weights)
    x_BxTxC, _ = model.hidden_states(rows_BxTxC, doc_starts_BxM=doc_starts_BxM)
    ce_sum, count, _ = train.cross_entropy(model.head.weight.get_value(), x_BxTxC, jnp.asarray(targets_BxT))
    return ce_sum / count

  value, grads = jax.jit(jax.value_and_grad(loss))(states)
  return float(value), train.wkv_array(grads)


def check_packed_equals_padded(version, implementation):
  rng = np.random.default_rng()
  cfg = MODELS[version]
  model = random_model(cfg, seed=int(rng.integers(1 << 31)), implementation=implementation)
  for block in model.blocks:  # a tuned state, not zeros: every document must start from it
    block.att.time_state.set_value(jnp.asarray(rng.normal(0, 0.5, block.att.time_state.shape), jnp.float32))
  ctx_len = 80  # two and a half alignment blocks
  # Documents of 1 to 50 tokens, two of them short enough (targets within one alignment block) that
  # some row must hold two documents (drawn from 1 to 50 alone, none did in 1.6% of the draws), and
  # one longer than a row (cut as pad cuts it).
  lengths = [*rng.integers(1, 50, 3), *rng.integers(2, DOC_ALIGN + 2, 2), 100]
  token_data = random_token_data(rng, rng.permutation(lengths), cfg.vocab_size)
  (pad_in, pad_tgt, _), _ = whole_epoch(token_data, ctx_len, 'pad')
  (pack_in, pack_tgt, starts), _ = whole_epoch(token_data, ctx_len, 'pack')
  assert starts.sum() > len(starts)  # some row holds several documents
  pad_loss, pad_grad = loss_and_state_grad(nnx.clone(model), pad_in, pad_tgt, None)
  pack_loss, pack_grad = loss_and_state_grad(model, pack_in, pack_tgt, jnp.asarray(starts))
  grad_error = np.linalg.norm(pack_grad - pad_grad) / np.linalg.norm(pad_grad)
  print(f'RWKV-{version} {implementation}: {len(pad_in)} padded rows, {len(pack_in)} packed; loss {pad_loss:.6f} '
        f'error {abs(pack_loss - pad_loss) / pad_loss:.1e}, state gradient error {grad_error:.1e}')
  assert abs(pack_loss - pad_loss) <= EXACT * pad_loss and grad_error <= EXACT


@pytest.mark.parametrize('version', ['5', '6', '7'])
def test_packed_batch_equals_padded_batch(version):
  check_packed_equals_padded(version, 'pallas')


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize('version', ['5', '6', '7'])
def test_gpu_packed_batch_equals_padded_batch(version):
  with jax.default_matmul_precision('highest'):  # the model's fp32 products as IEEE fp32, not TF32
    check_packed_equals_padded(version, 'pallas')


# ----------------------------------------------------------------------------- trainer


def test_train_state_packs_documents_end_to_end(write_checkpoint, tmp_path):
  """An epoch of --dataload pack takes every document once in fewer steps than pad, and the logs
  carry the tokens of real documents a second."""
  ctx_len, micro_bsz, cfg = 64, 4, MODELS['6']
  rng = np.random.default_rng()
  prefix = str(tmp_path / 'docs')
  data.write_binidx(prefix, [rng.integers(1, cfg.vocab_size, n) for n in rng.integers(2, 60, 64)])
  train_state.main([str(a) for a in ('--ckpt', write_checkpoint(cfg), '--data', prefix, '--ctx_len', ctx_len,
                                      '--micro_bsz', micro_bsz, '--epoch_count', 1, '--dataload', 'pack',
                                      '--proj_dir', tmp_path / 'out')])
  tokens = data.load_data(prefix)
  rows = data.samples_per_pass(tokens, 'pack', ctx_len)
  steps = [json.loads(line) for line in (tmp_path / 'out' / 'loss_data.jsonl').read_text().splitlines()]
  assert len(steps) == rows // micro_bsz < tokens.num_docs // micro_bsz
  assert all(math.isfinite(s['loss']) and 0 < s['doc_tokens_per_s'] < s['tokens_per_s'] for s in steps)
  epoch_line = (tmp_path / 'out' / 'train_log.txt').read_text().splitlines()[-1]
  assert float(epoch_line.split('doc_tokens_per_s ')[1].split()[0]) > 0
  assert (tmp_path / 'out' / 'rwkv-0.pth').exists()
