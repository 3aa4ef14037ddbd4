"""Pieces every chunked WKV Pallas kernel needs, whatever the RWKV generation.

A chunked WKV kernel (wkv6_pallas.py; the next generations beside it) splits T
into chunks of `chunk` rows: a sequential state pass carries the state [V, K]
across chunk boundaries and stores it at each one, and parallel programs do the
work inside each chunk with 2-D dots. This module holds what that needs beyond
one recurrence's algebra: the static configuration base, the dot precisions
(bf16 splits for bf16 tensor cores, IEEE fp32 for fp32 inputs), the 0/1 tiles
that turn sums and masks into Triton-friendly tile ops, the chunk loop of the
state pass and its pallas_call wrapper.

Kernels run through Pallas' Triton lowering: tiles are 2-D, a tile has no row
indexing, and cumulative sums are dots with a 0/1 matrix.
"""
import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

f32 = jnp.float32

# Packed rows (several documents in one row, each started from the initial state) place every
# document at a multiple of DOC_ALIGN tokens: a multiple of every implementation's chunk (WKV-6
# 32 rows, WKV-7 16), so that a document starts only at a chunk boundary and the kernels need
# nothing but a per-chunk flag "start this chunk from s0". The data packer reads it from here.
DOC_ALIGN = 32


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static configuration of a chunked WKV kernel (hashable: a custom_vjp nondiff argument).

  Generations extend it with the fields of their own in-chunk forms.
  """
  chunk: int = 32           # rows of a parallel program and of a state step (Triton dots need >= 16)
  block_v: int = 32         # V-tile of the sequential state kernels (more tiles, more programs)
  state_steps: int = 2      # chunks per loop iteration of the state kernels (T is padded to a multiple)
  exact: bool = True        # fp32 inputs: IEEE fp32 dots (set from the input dtypes)
  dots: str = 'bf16x3'      # dots for bf16 inputs: 'bf16x3', 'tf32x3', 'tf32' or 'ieee' (see dot)
  interpret: bool = False   # Pallas interpret mode, for CPUs (set from the backend)
  warps_state: int = 4      # the sequential state kernels
  warps_chunk: int = 4      # the parallel chunk kernels
  stages: int = 2

  def params(self, warps):
    """Triton compiler parameters of a kernel run with `warps` warps."""
    return pltriton.CompilerParams(num_warps=warps, num_stages=self.stages)


def split_bf16(x, parts):
  """x as up to `parts` bf16 parts whose sum holds 8 * parts significant bits; bf16 is exact as one."""
  if x.dtype == jnp.bfloat16:
    return (x,)
  split = []
  for _ in range(parts - 1):
    split.append(x.astype(jnp.bfloat16))
    x = x - split[-1].astype(f32)
  return (*split, x.astype(jnp.bfloat16))


def dot(a, b, mode, trans_a=False, trans_b=False):
  """a @ b (a^T, b^T with trans_a, trans_b) in fp32 by a mode of KernelConfig.dots (see dot_mode), or bf16x6.

  bf16x3 and bf16x6 get near-fp32 accuracy from bf16 tensor cores: Triton's
  IEEE fp32 dots use no tensor cores, and TF32 alone is too coarse.
  """
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  if mode in ('bf16x3', 'bf16x6'):
    # Split into bf16 parts, keeping the products of significance above the
    # parts' precision: bf16x3 is (a_hi + a_lo)(b_hi + b_lo) less a_lo * b_lo,
    # ~2^-16 relative error from bf16 MMAs; bf16x6 splits in three, ~2^-24.
    # A bf16 operand (raw r, k, v, a stored state) is one part, which halves the products.
    n = 2 if mode == 'bf16x3' else 3
    parts = [(x, y) for i, x in enumerate(split_bf16(a, n)) for j, y in enumerate(split_bf16(b, n)) if i + j < n]
    return sum(lax.dot_general(x, y, dims, preferred_element_type=f32) for x, y in parts)
  precision = {'ieee': lax.Precision.HIGHEST, 'tf32': lax.Precision.DEFAULT,
               'tf32x3': lax.DotAlgorithmPreset.TF32_TF32_F32_X3}[mode]
  return lax.dot_general(a.astype(f32), b.astype(f32), dims, precision=precision, preferred_element_type=f32)


def dot_mode(cfg):
  """The mode of `dot` a kernel with configuration cfg uses.

  fp32 inputs get IEEE fp32 dots. CPUs (interpret mode) have no TF32 and run
  those modes as IEEE; bf16x3 runs as written. (Plain TF32 is too coarse for a
  log-decay gradient, a difference of accumulated products; it is there to compare.)
  """
  if cfg.exact or (cfg.interpret and cfg.dots != 'bf16x3'):
    return 'ieee'
  return cfg.dots


def masked_exp(mask, x):
  """exp(x) where mask, else 0: x is masked to -inf before exp (not selected after) so no lane holds inf."""
  return jnp.exp(jnp.where(mask, x, -jnp.inf))


def tri(L, keep):
  """An [L, L] 0/1 matrix, 1 where keep(row, col); bf16, in which it is exact."""
  rows = lax.broadcasted_iota(jnp.int32, (L, L), 0)
  return keep(rows, lax.broadcasted_iota(jnp.int32, (L, L), 1)).astype(jnp.bfloat16)


def sum_rows(x_LxK, keep, mode):
  """Row t of the result sums the rows s of x with keep(t, s): a dot with a 0/1
  matrix, a cumulative sum when keep is s <= t (s >= t: reverse). For bf16
  inputs as bf16x6, as exact as fp32 (the 0/1 matrix is one bf16 part, so
  three MMAs), faster than Triton's scan and than an IEEE fp32 dot (which
  Triton runs without tensor cores); fp32 inputs take the IEEE dot."""
  return dot(tri(x_LxK.shape[0], keep), x_LxK, 'ieee' if mode == 'ieee' else 'bf16x6')


def strictly_lower(a_LxL):
  """a with its diagonal and upper triangle zeroed: the causal mask of an in-chunk term."""
  rows = lax.broadcasted_iota(jnp.int32, a_LxL.shape, 0)
  return jnp.where(rows > lax.broadcasted_iota(jnp.int32, a_LxL.shape, 1), a_LxL, 0.0)


def row(x_LxK, i):
  """Row i of a tile as [1, K]: a masked sum, since a Triton tile has no row indexing."""
  rows = lax.broadcasted_iota(jnp.int32, x_LxK.shape, 0)
  return jnp.sum(jnp.where(rows == i, x_LxK, 0.0), axis=0, keepdims=True)


def check_doc_starts(doc_starts_BxM, B, T):
  """Refuses document-start flags of another shape than [B, ceil(T / DOC_ALIGN)]."""
  expected = (B, -(-T // DOC_ALIGN))
  if tuple(doc_starts_BxM.shape) != expected:
    raise ValueError(f'doc_starts is {tuple(doc_starts_BxM.shape)}; {B} rows of {T} tokens need {expected}, '
                     f'a flag every DOC_ALIGN = {DOC_ALIGN} tokens')


def entry(r_BxTxHxK, s0, doc_starts_BxM, implementation):
  """What wkv6 and wkv7 check and prepare before dispatching: (implementation, s0 [B, H, V, K] fp32).

  implementation None picks the platform's; a shared state [H, V, K] is broadcast over the batch
  here, outside any custom VJP, so its gradient is the sum over the batch."""
  B, T = r_BxTxHxK.shape[:2]
  implementation = implementation or default_implementation(T)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'unknown WKV implementation {implementation!r}; choose one of {IMPLEMENTATIONS}')
  if doc_starts_BxM is not None:
    check_doc_starts(doc_starts_BxM, B, T)
  return implementation, jnp.broadcast_to(s0, (B,) + s0.shape[-3:]).astype(f32)


def chunk_starts(doc_starts_BxM, chunk, n_chunks):
  """[B, n_chunks] int32, 1 where chunk n (rows n*chunk ..) begins a document, from the
  per-DOC_ALIGN-block flags doc_starts_BxM (see doc_first_tokens); chunks past the flags are 0."""
  if DOC_ALIGN % chunk:
    raise ValueError(f'packed documents need a chunk that divides DOC_ALIGN {DOC_ALIGN}, not {chunk}')
  B, M = doc_starts_BxM.shape
  per_block = DOC_ALIGN // chunk
  starts_BxMxP = jnp.zeros((B, M, per_block), jnp.int32).at[:, :, 0].set(doc_starts_BxM.astype(jnp.int32))
  starts_BxN = starts_BxMxP.reshape(B, M * per_block)
  return jnp.pad(starts_BxN, ((0, 0), (0, max(n_chunks - M * per_block, 0))))[:, :n_chunks]


def doc_first_tokens(doc_starts_BxM, T):
  """[B, T] bool, True at the first token of every document of a packed row.

  doc_starts_BxM, M = ceil(T / DOC_ALIGN): True where a document begins at token m * DOC_ALIGN;
  what stands before it in the row is another document, which it must not see.
  """
  check_doc_starts(doc_starts_BxM, doc_starts_BxM.shape[0], T)
  aligned_T = jnp.arange(T) % DOC_ALIGN == 0
  return jnp.repeat(doc_starts_BxM.astype(bool), DOC_ALIGN, axis=1)[:, :T] & aligned_T


def over_chunks(cfg, n_chunks, step, carry):
  """step(n, carry) for n = 0 .. n_chunks-1, cfg.state_steps chunks a loop iteration: a
  chunk's loads and dot do not depend on the carried state, so unrolled they overlap the
  previous chunk's update instead of waiting for the loop's next turn."""
  def body(i, carry):
    for j in range(cfg.state_steps):
      carry = step(i * cfg.state_steps + j, carry)
    return carry

  return lax.fori_loop(0, n_chunks // cfg.state_steps, body, carry)


def forward_pass(cfg, n_chunks, step, s0_ref, starts_ref):
  """The forward state pass: s <- step(n, s) from s0, chunk by chunk, the last s returned; a
  chunk that starts a document (starts_ref[n] == 1, packed rows) starts from s0 instead."""
  if starts_ref is None:
    return over_chunks(cfg, n_chunks, step, s0_ref[...])

  def restarting_step(n, s_VxK):
    return step(n, jnp.where(starts_ref[n] == 1, s0_ref[...], s_VxK))

  return over_chunks(cfg, n_chunks, restarting_step, s0_ref[...])


def backward_pass(cfg, n_chunks, step, dsT, starts_ref):
  """The backward state pass, chunks in reverse: ds <- step(n, ds), from a chunk's end-state
  gradient to its start state's, starting from the last state's gradient dsT; returns d s0.
  Where chunk n starts a document (starts_ref[n] == 1) the gradient at its start is s0's (summed
  over the documents), and the previous chunk's end state, which that document never sees, gets 0."""
  reverse = lambda i: n_chunks - 1 - i
  if starts_ref is None:
    return over_chunks(cfg, n_chunks, lambda i, ds: step(reverse(i), ds), dsT)

  def restarting_step(i, carry):
    ds_VxK, ds0_VxK = carry
    ds_VxK = step(reverse(i), ds_VxK)
    start = starts_ref[reverse(i)] == 1
    return jnp.where(start, 0.0, ds_VxK), ds0_VxK + jnp.where(start, ds_VxK, 0.0)

  ds_VxK, ds0_VxK = over_chunks(cfg, n_chunks, restarting_step, (dsT, jnp.zeros_like(dsT)))
  return ds_VxK + ds0_VxK


def state_call(kernel, name, cfg, full_inputs, vtile_inputs, s_in, starts=None):
  """A sequential state kernel: grid B x H x V-tiles over [B, T, H, K] inputs read whole and
  [B, T, H, V] inputs tiled along V with the state's rows, and a start state [B, H, V, K]; the
  rows of a state evolve apart, so V-tiles are independent programs.
  kernel(*full_refs, *vtile_refs, s_ref, states_ref, last_ref, cfg=, n_chunks=, starts_ref=)
  stores the state at each chunk boundary; starts_ref holds the row's chunk_starts (packed
  rows), None without `starts`. Returns (those states [B, H, n_chunks, V, K], bf16 unless
  cfg.exact, the last state, fp32)."""
  B, T, H, K = full_inputs[0].shape
  V = vtile_inputs[0].shape[-1]
  bv = min(cfg.block_v, V)
  n_chunks = T // cfg.chunk
  full = pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h, 0))
  vtile = pl.BlockSpec((None, T, None, bv), lambda b, h, j: (b, 0, h, j))
  state = pl.BlockSpec((None, None, bv, K), lambda b, h, j: (b, h, j, 0))
  states = pl.BlockSpec((None, None, n_chunks, bv, K), lambda b, h, j: (b, h, 0, j, 0))
  in_specs = [full] * len(full_inputs) + [vtile] * len(vtile_inputs) + [state]
  inputs = (*full_inputs, *vtile_inputs, s_in)
  n_in = len(inputs)

  def body(*refs):
    if starts is None:
      return kernel(*refs, cfg=cfg, n_chunks=n_chunks, starts_ref=None)
    return kernel(*refs[:n_in], *refs[n_in + 1:], cfg=cfg, n_chunks=n_chunks, starts_ref=refs[n_in])

  if starts is not None:  # the flags follow the inputs; a row's flags are one block
    in_specs.append(pl.BlockSpec((None, n_chunks), lambda b, h, j: (b, 0)))
    inputs += (starts,)
  return pl.pallas_call(
      body,
      grid=(B, H, V // bv),
      in_specs=in_specs,
      out_specs=[states, state],
      out_shape=[jax.ShapeDtypeStruct((B, H, n_chunks, V, K), f32 if cfg.exact else jnp.bfloat16),
                 jax.ShapeDtypeStruct((B, H, V, K), f32)],
      compiler_params=cfg.params(cfg.warps_state),
      interpret=cfg.interpret,
      name=name,
  )(*inputs)


def to_chunks(x_BxTxHxD, chunk):
  """[B, T, H, D] -> [B, H, T // chunk, chunk, D]: the layout the xla_chunked forms compute in."""
  B, T, H, D = x_BxTxHxD.shape
  return x_BxTxHxD.reshape(B, T // chunk, chunk, H, D).transpose(0, 3, 1, 2, 4)


def from_chunks(x_BxHxNxLxD):
  """The inverse of to_chunks."""
  B, H, N, L, D = x_BxHxNxLxD.shape
  return x_BxHxNxLxD.transpose(0, 2, 3, 1, 4).reshape(B, N * L, H, D)


IMPLEMENTATIONS = ('scan', 'xla_chunked', 'pallas')  # what every WKV entry point offers


def default_implementation(T: int = 1) -> str:
  """The implementation a WKV entry point runs when none is asked for.

  One token is one step of the recurrence: the scan, since the chunked forms would only pad it.
  Longer sequences: the Pallas kernels on GPUs, which beat xla_chunked several times over at
  every measured shape (bench/wkv6.py, bench/wkv7.py; the numbers are in docs/performance.md),
  xla_chunked elsewhere.
  """
  if T == 1:
    return 'scan'
  return 'pallas' if jax.default_backend() == 'gpu' else 'xla_chunked'
