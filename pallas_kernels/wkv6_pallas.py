"""RWKV-6 WKV as chunked Pallas GPU kernels (Triton lowering), forward and backward.

Lowering: Pallas' Triton backend (see common.KernelConfig.params). It is deprecated
in JAX 0.11 but it is the Pallas GPU path that runs on Ampere and Ada (RTX
3090/4090, A100) as well as Hopper, where most state tuning happens; Mosaic GPU
is Hopper-and-newer. The chunk math below uses only 2-D dots, elementwise ops,
row/column reductions (cumulative sums are dots), so it can move to another lowering.
The kernels fit Ampere and Ada's limits (255 registers and an RTX 3090's 99 KB
of shared memory a program): `bench/wkv6.py --registers 80 86 89` shows what
triton builds for them, and tests/test_wkv6.py::test_gpu_ampere_ada_builds runs
those builds on the GPU at hand; no Ampere or Ada card has run them. On Hopper
too the chunk kernels' dots are mma.sync (wgmma needs 64-row tiles); only the
state update, where a program holds 64 V rows (block_v 64), is wgmma; a Mosaic
GPU variant for Hopper is not built. Timings against fla's chunk_rwkv6 and the
variants tried: docs/performance.md.

Algorithm (per head, state S value-major [V, K], log decay g = -exp(w) <= 0,
chunk-local cumulative sums gi (inclusive) and ge = gi - g (exclusive), G the
chunk total; every exponent evaluated is <= 0, see wkv6_chunked.py). Each
kernel reads the raw w and forms g, gi, ge and G for its chunk itself, the
sums as a dot (see sum_rows).

  state kernel  (grid B x H x V-tiles, sequential over chunks, state in
                 registers): stores each chunk's start state and the final one.
                 S <- S * exp(G) + v^T (k * exp(G - gi))
                 The state is carried and returned in fp32; the copies it
                 stores for the chunk kernels are bf16 when the inputs are
                 (fp32 when r, k and v all are), as fla stores them. Each copy
                 is rounded once and feeds one chunk's dots, never the
                 recurrence, so the rounding does not build up along T.
  output kernel (grid chunks x B x H, fully parallel, as two calls: the chunks
                 whose in-chunk term is one dot, then the rest; see
                 _chunk_calls, one_dot_chunks): one chunk of rows,
                 o = (r * exp(ge)) S^T + A v + (r . u . k) v, the causal
                 in-chunk A as a dot of factors split at the chunk's middle row
                 where its decay span allows (else per half), else as pairwise
                 exponentials a key row at a time (see DOT_SPAN), as [L, K]
                 tiles rather than an [L, L, K] block. o is bf16 if r, k, v are.
  backward      a reverse state kernel carries dS (its final value is d s0)
                 and stores each chunk's end-state gradient; then two parallel
                 chunk kernels: dv, the output kernel transposed,
                 dv = (k * exp(G - gi)) dS_end^T + A^T do + (r . u . k) do,
                 and dr, dk, dw with per-chunk sums of du, from the log-decay
                 gradient dg_m = sum_{t>m} r_t dr_t - sum_{t>=m} k_t dk_t + dG
                 (bonus-free dr, dk; dG = colsum(S_end * dS_end)), dw = dg * g.
                 dv is a kernel of its own because one kernel for all four
                 needs more than the 255 registers a thread has and spills.
  packed rows   (doc_starts) only the state kernels take the per-chunk
                 flags (common.forward_pass, backward_pass): a chunk that
                 starts a document starts from s0, and the reverse kernel
                 adds the gradient at its start to d s0 and hands the chunk
                 before it none; the chunk kernels then read s0 as that
                 chunk's start state and 0 as its predecessor's end gradient.

Only the padding of T to a whole number of state steps (k = v = r = 0, w =
-inf, i.e. decay 1), which chunks take one dot and the sum of du are plain
JAX. Dots run at HIGHEST (IEEE fp32) for fp32 inputs and as bf16x3 (see common.dot)
for bf16 inputs, the backward's in-chunk dr and dk and the cumulative sums as
bf16x6 (see STEEP, sum_rows).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import (KernelConfig, backward_pass, chunk_starts, dot, dot_mode, forward_pass,
                                   masked_exp, row, state_call, strictly_lower, sum_rows)

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config(KernelConfig):
  """WKV-6 kernel configuration: KernelConfig's tiling and dots, plus how the in-chunk term is formed.

  The defaults (with default_config's block_v) are the fastest that bench/wkv6.py --sweep
  found on Hopper within the error bounds of tests/test_wkv6.py.
  """
  diag: str = 'auto'        # the in-chunk term: 'auto' (one dot where the decay span allows, see DOT_SPAN) or 'rows'
  wide_programs: int = 2048  # fewest programs of the chunk kernels' second calls (see chunks_per_wide_program)


def _log_decays(w_ref, rows, mode):
  """(g, gi, ge, G) of `rows` of a raw-decay ref: g = -exp(w) and its chunk-local sums, fp32."""
  g = -jnp.exp(w_ref[rows, :].astype(f32))
  gi = sum_rows(g, lambda t, s: s <= t, mode)
  return g, gi, gi - g, row(gi, g.shape[0] - 1)


# The causal in-chunk term, A[t,s] = sum_j r_tj k_sj exp(ge_tj - gi_sj) for s < t.
# A is one dot split at the chunk's middle row `ref` (per channel),
# (r exp(ge - ref)) (k exp(ref - gi))^T, wherever both factors stay within
# exp(+-DOT_SPAN), far inside fp32: the middle halves the largest exponent the
# start row would give. Where the span is wider, two dots (see _halves) halve
# it again; past that (decay below exp(-60) within a quarter chunk: rare in
# trained models, common in the tests) one key row s is taken per step, so the
# pairwise exponentials live as an [L, K] tile at a time rather than an
# [L, L, K] block. Random (untrained) weights send a good share of chunks to
# the two dots and a few to the rows, so all three forms are needed.
DOT_SPAN = 60.0
# A step's log decay below -STEEP (w > 1.6) makes the backward's bf16x3 dots
# too coarse for the decay gradient (see _diagonal_dr_dk): past it dw's error
# with bf16x3 grows with the steepness, over tests/test_wkv6.py's bound for
# bf16 inputs from w ~ 2.
STEEP = 5.0


def _mid(gi, start, rows):
  """ge of the middle row of `rows` rows from `start` (= gi of the row before it)."""
  return row(gi, start + rows // 2 - 1)


def _halves(gi, ge, ref_LxK):
  """Exponents of the two-dot form: pairs within a half use that half's middle
  row (ref_LxK, per row), pairs across the halves the boundary, where both
  factors are <= 1. Returns (exp(ge - ref), exp(ref - gi)) for each kind and
  the [L, L] mask of within-half pairs; a dot's entries for the other kind of
  pair may overflow and are selected away."""
  L = gi.shape[0]
  edge = _mid(gi, 0, L)
  within = jnp.exp(ge - ref_LxK), jnp.exp(ref_LxK - gi)
  across = jnp.exp(jnp.minimum(ge - edge, 0.0)), jnp.exp(jnp.minimum(edge - gi, 0.0))
  top = lax.broadcasted_iota(jnp.int32, (L, L), 0) < L // 2
  left = lax.broadcasted_iota(jnp.int32, (L, L), 1) < L // 2
  return within, across, top == left


def _fits(gi, ge, ref):
  """Whether the in-chunk factors exp(ge - ref) and exp(ref - gi) stay within exp(DOT_SPAN)."""
  return jnp.maximum(jnp.max(ge - ref), jnp.max(ref - gi)) <= DOT_SPAN


def one_dot_chunks(cfg, w_BxTxHxK):
  """[B, H, n_chunks] int32, 1 where a chunk's in-chunk term is the one-dot form
  (see _by_span). ge falls from 0 at the first row to G, so _fits' bounds are
  -ref and ref - G with ref the middle row's ge: the sums of the chunk's two
  halves. Plain JAX, one pass over w (summed in another order than the
  kernels', well inside DOT_SPAN's margin to fp32's exp range)."""
  B, T, H, K = w_BxTxHxK.shape
  L = cfg.chunk
  halves = jnp.sum(-jnp.exp(w_BxTxHxK.astype(f32)).reshape(B, T // L, 2, L // 2, H, K), axis=3)
  fits = jnp.max(-halves, axis=(2, 4)) <= DOT_SPAN
  return (fits & (cfg.diag == 'auto')).astype(jnp.int32).transpose(0, 2, 1)


def _by_span(cfg, wide, gi, ge, by_dot, by_halves, by_rows, operand):
  """The in-chunk form: one dot where the chunk's exponents fit DOT_SPAN (the
  kernels' first call, wide=False); in the chunks where they do not (the second
  call, wide=True) two dots (by halves) if those fit, else rows."""
  L = gi.shape[0]
  if not wide:
    return by_dot(_mid(gi, 0, L), operand)
  if cfg.diag == 'rows':
    return by_rows(operand)
  top = lax.broadcasted_iota(jnp.int32, gi.shape, 0) < L // 2
  ref_LxK = jnp.where(top, _mid(gi, 0, L // 2), _mid(gi, L // 2, L // 2))
  return lax.cond(_fits(gi, ge, ref_LxK), functools.partial(by_halves, ref_LxK), by_rows, operand)


def _diagonal(cfg, wide, k_ref, x_ref, r, k, gi, ge, acc, *, transpose):
  """acc plus the causal in-chunk term: sum_{s<t} A[t,s] x_s (the output's,
  x = v), or transposed sum_{t>s} A[t,s] x_t (dv's, x = do)."""
  mode, x = dot_mode(cfg), x_ref[...]
  apply = lambda a, acc: acc + dot(strictly_lower(a), x, mode, trans_a=transpose)

  def by_dot(ref, acc):
    return apply(dot(r * jnp.exp(ge - ref), k * jnp.exp(ref - gi), mode, trans_b=True), acc)

  def by_halves(ref_LxK, acc):
    (qe_w, ke_w), (qe_a, ke_a), same = _halves(gi, ge, ref_LxK)
    within = dot(r * qe_w, k * ke_w, mode, trans_b=True)
    across = dot(r * qe_a, k * ke_a, mode, trans_b=True)
    return apply(jnp.where(same, within, across), acc)

  def by_rows(acc):
    row_LxK = lax.broadcasted_iota(jnp.int32, r.shape, 0)
    row_LxD = lax.broadcasted_iota(jnp.int32, x.shape, 0)

    def body(s, acc):
      e = masked_exp(row_LxK > s, ge - row(gi, s))
      a_col = jnp.sum(r * k_ref[pl.ds(s, 1), :].astype(f32) * e, axis=1, keepdims=True)
      if transpose:
        return acc + jnp.where(row_LxD == s, jnp.sum(a_col * x, axis=0, keepdims=True), 0.0)
      return acc + a_col * x_ref[pl.ds(s, 1), :].astype(f32)

    return lax.fori_loop(0, r.shape[0], body, acc)

  return _by_span(cfg, wide, gi, ge, by_dot, by_halves, by_rows, acc)


def _diagonal_dr_dk(cfg, wide, refs, r, k, gi, ge, do):
  """The in-chunk terms of (dr, dk)."""
  k_ref, v_ref = refs
  mode = dot_mode(cfg)

  # dr and dk feed the decay gradient sum_t (r dr - k dk), which under steep
  # decays (a step's log decay below -STEEP) cancels to a few hundredths of
  # its terms, so bf16x3's 2^-16 relative error would show in dw. There their
  # two dots split in three (bf16x6, 2^-24 relative); other chunks keep
  # bf16x3, which is faster. The two-dot form
  # (decays summing past DOT_SPAN within half a chunk) always splits in three.
  fine = 'bf16x6' if mode == 'bf16x3' else mode
  da = lambda: strictly_lower(dot(do, v_ref[...], mode, trans_b=True))

  def by_dot(ref, _, dr_dk_mode):
    qe, ke = jnp.exp(ge - ref), jnp.exp(ref - gi)
    q, kq, da_LxL = r * qe, k * ke, da()
    return qe * dot(da_LxL, kq, dr_dk_mode), ke * dot(da_LxL, q, dr_dk_mode, trans_a=True)

  def by_dot_fine_when_steep(ref, x):
    steep = jnp.max(ge - gi) > STEEP  # ge - gi = -g
    return lax.cond(steep, functools.partial(by_dot, ref, dr_dk_mode=fine),
                    functools.partial(by_dot, ref, dr_dk_mode=mode), x)

  def by_halves(ref_LxK, _):
    (qe_w, ke_w), (qe_a, ke_a), same = _halves(gi, ge, ref_LxK)
    da_LxL = da()
    da_w, da_a = jnp.where(same, da_LxL, 0.0), jnp.where(same, 0.0, da_LxL)
    dr = qe_w * dot(da_w, k * ke_w, fine) + qe_a * dot(da_a, k * ke_a, fine)
    dk = ke_w * dot(da_w, r * qe_w, fine, trans_a=True) + ke_a * dot(da_a, r * qe_a, fine, trans_a=True)
    return dr, dk

  def by_rows(grads):
    row_LxK = lax.broadcasted_iota(jnp.int32, r.shape, 0)

    def body(s, grads):
      dr, dk = grads
      at_s = pl.ds(s, 1)
      k_s = k_ref[at_s, :].astype(f32)
      e = masked_exp(row_LxK > s, ge - row(gi, s))
      dA_col = jnp.sum(do * v_ref[at_s, :].astype(f32), axis=1, keepdims=True)
      dr += dA_col * k_s * e
      dk += jnp.where(row_LxK == s, jnp.sum(dA_col * r * e, axis=0, keepdims=True), 0.0)
      return dr, dk

    return lax.fori_loop(0, r.shape[0], body, grads)

  zeros = (jnp.zeros(r.shape, f32), jnp.zeros(k.shape, f32))
  return _by_span(cfg, wide, gi, ge, by_dot_fine_when_steep, by_halves, by_rows, zeros)


# ----------------------------------------------------------------------------- forward


def _state_fwd_kernel(k_ref, w_ref, v_ref, s0_ref, h_ref, sT_ref, *, cfg, n_chunks, starts_ref):
  L, mode = cfg.chunk, dot_mode(cfg)

  def body(n, s_VxK):
    h_ref[n] = s_VxK.astype(h_ref.dtype)
    rows = pl.ds(pl.multiple_of(n * L, L), L)
    _, gi, _, G = _log_decays(w_ref, rows, mode)
    kd = k_ref[rows, :].astype(f32) * jnp.exp(G - gi)
    return s_VxK * jnp.exp(G) + dot(v_ref[rows, :], kd, mode, trans_a=True)

  sT_ref[...] = forward_pass(cfg, n_chunks, body, s0_ref, starts_ref)


def _out_fwd_kernel(r_ref, k_ref, w_ref, u_ref, v_ref, h_ref, o_ref, *, cfg, wide):
  r, k, mode = r_ref[...], k_ref[...], dot_mode(cfg)  # r, k raw for bf16x3
  _, gi, ge, _ = _log_decays(w_ref, slice(None), mode)
  o = jnp.sum(r * u_ref[...] * k, axis=1, keepdims=True) * v_ref[...]  # the current token's own term
  o = _diagonal(cfg, wide, k_ref, v_ref, r, k, gi, ge, o, transpose=False)
  o_ref[...] = (o + dot(r * jnp.exp(ge), h_ref[...], mode, trans_b=True)).astype(o_ref.dtype)


# ----------------------------------------------------------------------------- backward


def _state_bwd_kernel(r_ref, w_ref, do_ref, dsT_ref, dh_ref, ds0_ref, *, cfg, n_chunks, starts_ref):
  L, mode = cfg.chunk, dot_mode(cfg)

  def body(n, ds_VxK):
    dh_ref[n] = ds_VxK.astype(dh_ref.dtype)
    rows = pl.ds(pl.multiple_of(n * L, L), L)
    _, _, ge, G = _log_decays(w_ref, rows, mode)
    rq = r_ref[rows, :].astype(f32) * jnp.exp(ge)
    return ds_VxK * jnp.exp(G) + dot(do_ref[rows, :], rq, mode, trans_a=True)

  ds0_ref[...] = backward_pass(cfg, n_chunks, body, dsT_ref[...], starts_ref)


def _dv_bwd_kernel(r_ref, k_ref, w_ref, u_ref, do_ref, dh_ref, dv_ref, *, cfg, wide):
  """One chunk's dv: the output kernel transposed."""
  r, k, mode = r_ref[...], k_ref[...], dot_mode(cfg)
  _, gi, ge, G = _log_decays(w_ref, slice(None), mode)
  dv = jnp.sum(r * u_ref[...] * k, axis=1, keepdims=True) * do_ref[...]
  dv = _diagonal(cfg, wide, k_ref, do_ref, r, k, gi, ge, dv, transpose=True)
  dv += dot(k * jnp.exp(G - gi), dh_ref[...], mode, trans_b=True)  # through the chunk's end state
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dr_dk_dw_kernel(r_ref, k_ref, w_ref, u_ref, v_ref, do_ref, h_ref, dh_ref,
                     dr_ref, dk_ref, dw_ref, du_ref, *, cfg, wide):
  mode = dot_mode(cfg)
  r, k, v, do = r_ref[...], k_ref[...], v_ref[...], do_ref[...]  # raw for bf16x3
  g, gi, ge, G = _log_decays(w_ref, slice(None), mode)
  # In-chunk terms first, then each state term is added as its gradient is
  # stored (fewer live tiles). The current token's own (bonus) terms are added
  # last: the decay gradient below is formed from the bonus-free dr and dk.
  dr, dk = _diagonal_dr_dk(cfg, wide, (k_ref, v_ref), r, k, gi, ge, do)
  u = u_ref[...]
  do_v = jnp.sum(do.astype(f32) * v.astype(f32), axis=1, keepdims=True)
  dk_end = jnp.exp(G - gi) * dot(v, dh_ref[...], mode)  # through the chunk's end state
  dk = dk + dk_end
  dk_ref[...] = (dk + do_v * u * r).astype(dk_ref.dtype)
  dr = dr + jnp.exp(ge) * dot(do, h_ref[...], mode)
  dr_ref[...] = (dr + do_v * u * k).astype(dr_ref.dtype)
  du_ref[...] = jnp.sum(do_v * r * k, axis=0, keepdims=True)
  # Log-decay gradient: reverse cumsum of r*dr - k*dk (r part exclusive), plus
  # every row's share in the chunk's end state, d/dG = colsum(S_end * dS_end),
  # whose in-chunk part is sum_s k_s * dk_end_s; then through g = -exp(w).
  dge = r * dr
  reverse_cumsum = sum_rows(dge - k * dk, lambda t, s: s >= t, mode)
  dg = (reverse_cumsum - dge + jnp.sum(k * dk_end, axis=0, keepdims=True)
        + jnp.exp(G) * jnp.sum(h_ref[...].astype(f32) * dh_ref[...].astype(f32), axis=0, keepdims=True))
  dw_ref[...] = (dg * g).astype(dw_ref.dtype)


# ----------------------------------------------------------------------------- pallas_calls


class _ChunkOf:
  """Chunk j of a ref holding several along its first axis, indexed as a kernel
  indexes a one-chunk ref: the rows of a [rows, X] tile, or one of stacked
  states and partial sums (rows=None). Triton lowering takes one indexer a load."""

  def __init__(self, ref, j, rows):
    self.ref, self.j, self.rows, self.dtype = ref, j, rows, ref.dtype

  def _index(self, idx):
    idx = () if idx is Ellipsis else idx if isinstance(idx, tuple) else (idx,)
    if self.rows is None:
      return (self.j, *idx)
    first, *rest = idx or (slice(None),)
    if isinstance(first, slice):
      return (pl.ds(self.j * self.rows, self.rows), *rest)
    return (pl.ds(self.j * self.rows + first.start, first.size), *rest)

  def __getitem__(self, idx):
    return self.ref[self._index(idx)]

  def __setitem__(self, idx, value):
    self.ref[self._index(idx)] = value


def chunks_per_wide_program(cfg, n_chunks, B, H):
  """Chunks a program of a kernel's second call walks. It runs only the chunks
  whose in-chunk term is not one dot, often none, and a program that finds none
  still costs a flag load's latency, so one program walks several chunks: up to
  8, while there stay Config.wide_programs to spread the chunks it does run."""
  per = 1
  while per < 8 and n_chunks % (2 * per) == 0 and n_chunks * B * H // (2 * per) >= cfg.wide_programs:
    per *= 2
  return per


class _StoredWhere:
  """An output ref whose stores happen only where `take` (the kernels never read their outputs)."""

  def __init__(self, ref, take):
    self.ref, self.take, self.dtype = ref, take, ref.dtype

  def __setitem__(self, idx, value):
    pl.when(self.take)(lambda: self.ref.__setitem__(idx, value))


def _chunk_calls(kernel, name, cfg, one_dot, inputs, kinds, out_shape, out_kinds):
  """A parallel chunk kernel (grid chunks x B x H) as two calls writing the same
  outputs. The first stores the chunks whose in-chunk term is one dot (one_dot
  [B, H, n_chunks] is 1); it computes every chunk, so that its loads need not
  wait for the flag's. The second (`name`_wide) runs the rest, several chunks
  a program (see chunks_per_wide_program). Apart, the common one-dot code
  needs far fewer registers than code holding every form, so more programs
  share an SM. Inputs and outputs are of the kinds 'rows' (of a
  [B, T, H, X] array), 'u' ([H, 1, K]), 'state' ([B, H, n_chunks, V, K]) or
  'part' (a [B, n_chunks, H, K] partial sum)."""
  B, T, H, _ = inputs[0].shape
  L = cfg.chunk
  n_chunks = T // L
  per = chunks_per_wide_program(cfg, n_chunks, B, H)

  def spec(kind, shape, wide):
    stacked = per if wide else None  # the second call's refs hold `per` states or partial sums
    return {'rows': lambda: pl.BlockSpec((None, (per if wide else 1) * L, None, shape[-1]), lambda n, b, h: (b, n, h, 0)),
            'u': lambda: pl.BlockSpec((None, 1, shape[-1]), lambda n, b, h: (h, 0, 0)),
            'state': lambda: pl.BlockSpec((None, None, stacked) + shape[-2:], lambda n, b, h: (b, h, n, 0, 0)),
            'part': lambda: pl.BlockSpec((None, stacked, 1, shape[-1]), lambda n, b, h: (b, n, h, 0))}[kind]()

  def first(flag_ref, *refs):
    take = flag_ref[0] == 1
    kernel(*refs[:len(inputs)], *(_StoredWhere(r, take) for r in refs[len(inputs):]), cfg=cfg, wide=False)

  def second(flag_ref, *refs):
    ins, outs = refs[:len(inputs)], refs[len(inputs) + len(out_shape):]  # past the aliased outputs
    views = lambda refs, kinds, j: [r if k == 'u' else _ChunkOf(r, j, L if k == 'rows' else None)
                                    for r, k in zip(refs, kinds)]

    def chunk(j, carry):
      pl.when(flag_ref[j] == 0)(lambda: kernel(*views(ins, kinds, j), *views(outs, out_kinds, j), cfg=cfg, wide=True))
      return carry

    @pl.when(jnp.min(flag_ref[...]) == 0)
    def _():
      lax.fori_loop(0, per, chunk, 0)

  def call(wide, outputs):
    p = per if wide else 1
    return pl.pallas_call(
        second if wide else first,
        grid=(n_chunks // p, B, H),
        in_specs=[pl.BlockSpec((None, None, p), lambda n, b, h: (b, h, n))]
                 + [spec(k, x.shape, wide) for k, x in zip(kinds + out_kinds * wide, inputs + outputs)],
        out_specs=[spec(k, o.shape, wide) for k, o in zip(out_kinds, out_shape)],
        out_shape=out_shape,
        input_output_aliases={1 + len(inputs) + i: i for i in range(len(outputs))},
        compiler_params=cfg.params(cfg.warps_chunk),
        interpret=cfg.interpret,
        name=name + ('_wide' if wide else ''),
    )(one_dot, *inputs, *outputs)

  return call(True, tuple(call(False, ())))


def _out_or_dv(kernel, name, cfg, one_dot, r, k, w, u, x, states, out_dtype):
  """The output kernel (x = v, states = h) or dv's (x = do, states = dh): [B, T, H, V] in out_dtype."""
  return _chunk_calls(kernel, name, cfg, one_dot, (r, k, w, u, x, states), ('rows', 'rows', 'rows', 'u', 'rows', 'state'),
                      (jax.ShapeDtypeStruct(x.shape, out_dtype),), ('rows',))[0]


def _dr_dk_dw(cfg, one_dot, r, k, w, u, v, do, h, dh):
  """(dr, dk, dw) in the dtypes of (r, k, w), and du's partial sums [B, n_chunks, H, K]."""
  B, T, H, K = r.shape
  like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  return _chunk_calls(_dr_dk_dw_kernel, 'wkv6_dr_dk_dw', cfg, one_dot, (r, k, w, u, v, do, h, dh),
                      ('rows', 'rows', 'rows', 'u', 'rows', 'rows', 'state', 'state'),
                      (like(r), like(k), like(w), jax.ShapeDtypeStruct((B, T // cfg.chunk, H, K), f32)),
                      ('rows', 'rows', 'rows', 'part'))


# ----------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _wkv(cfg, r, k, v, w, u, s0, starts):
  return _wkv_fwd(cfg, r, k, v, w, u, s0, starts)[0]


def _wkv_fwd(cfg, r, k, v, w, u_Hx1xK, s0, starts):
  # The chunk kernels need no flags: a chunk that starts a document reads s0 as its stored start
  # state, and its predecessor's stored end-state gradient is 0.
  h, sT = state_call(_state_fwd_kernel, 'wkv6_state_fwd', cfg, (k, w), (v,), s0, starts)
  one_dot = one_dot_chunks(cfg, w)
  o = _out_or_dv(_out_fwd_kernel, 'wkv6_out_fwd', cfg, one_dot, r, k, w, u_Hx1xK, v, h, jnp.result_type(r, k, v))
  return (o, sT), (r, k, v, w, u_Hx1xK, h, one_dot, starts)


def _wkv_bwd(cfg, residuals, cotangents):
  r, k, v, w, u_Hx1xK, h, one_dot, starts = residuals
  do, dsT = cotangents
  dh, ds0 = state_call(_state_bwd_kernel, 'wkv6_state_bwd', cfg, (r, w), (do,), dsT, starts)
  dv = _out_or_dv(_dv_bwd_kernel, 'wkv6_dv', cfg, one_dot, r, k, w, u_Hx1xK, do, dh, v.dtype)
  dr, dk, dw, du_part = _dr_dk_dw(cfg, one_dot, r, k, w, u_Hx1xK, v, do, h, dh)
  return dr, dk, dv, dw, jnp.sum(du_part, axis=(0, 1))[:, None], ds0, None


_wkv.defvjp(_wkv_fwd, _wkv_bwd)


def default_config(B, H):
  # The state kernels are sequential over T: with few sequences * heads, V is
  # split finer so that there are enough programs to fill the GPU; with many,
  # one program per head forms each chunk's decays once rather than per V-tile.
  return Config(block_v=16 if B * H < 128 else 64)


@functools.partial(jax.jit, static_argnames=('interpret', 'config'))
def wkv6_pallas(r_BxTxHxK, k_BxTxHxK, v_BxTxHxV, w_BxTxHxK, u_HxK, s0_BxHxVxK, doc_starts_BxM=None, *,
                interpret=None, config=None):
  """WKV-6 with Pallas kernels. Returns (y [B,T,H,V], final state [B,H,V,K] fp32).

  doc_starts_BxM: packed rows, see wkv6.wkv6; None: one sequence a row.

  r, k, v, w may be bf16 or fp32 (their gradients come back in the same dtype);
  y is bf16 when r, k and v all are (as the official CUDA kernel writes it, and
  half the traffic of y and its cotangent), else fp32; decays, the carried
  state and accumulations are fp32 (the chunk kernels' copies of the state
  are bf16 for bf16 inputs; see the module docstring). `interpret` defaults
  to True on CPU. `config` overrides the tiling (its `exact` and `interpret`
  fields are set here).
  """
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  B, T, H, K = r_BxTxHxK.shape
  exact = all(x.dtype == f32 for x in (r_BxTxHxK, k_BxTxHxK, v_BxTxHxV))
  cfg = config or default_config(B, H)
  cfg = dataclasses.replace(cfg, exact=exact, interpret=interpret)
  r, k, v, w = r_BxTxHxK, k_BxTxHxK, v_BxTxHxV, w_BxTxHxK
  pad = -T % (cfg.chunk * cfg.state_steps)
  if pad:  # padded steps are exact no-ops: k = v = r = 0 and decay 1 (w = -inf)
    r, k, v, w = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)), constant_values=c)
                  for x, c in ((r, 0), (k, 0), (v, 0), (w, -jnp.inf)))
  starts = None if doc_starts_BxM is None else chunk_starts(doc_starts_BxM, cfg.chunk, r.shape[1] // cfg.chunk)
  o, sT = _wkv(cfg, r, k, v, w, u_HxK.astype(f32).reshape(H, 1, K), s0_BxHxVxK.astype(f32), starts)
  return (o[:, :T] if pad else o), sT
