"""int8 and NF4 storage for the frozen matrix weights (`train_state.py --quant int8|nf4`).

State tuning never updates the big matrices, so they can be stored compressed and
expanded to the compute dtype one layer at a time inside the jitted step:

  int8: symmetric per-output-row absmax, w ~= values * scale[row], values in [-127, 127].
  nf4:  the 16 NormalFloat-4 levels (QLoRA), one absmax per block of 64 inputs,
        w ~= NF4[code] * scale[row, block], two codes per byte (even input in the low nibble).

The embedding and the head (a sixth of a 1.6B model) are stored int8 in both modes:
their error stays at int8's ~0.5% instead of NF4's ~9%. An int8 product keeps the
row scale out of the matrix, x @ (values * scale).T = (x @ values.T) * scale, so
no expanded copy of the weight is made; an embedding lookup expands only its rows.

A quantized weight is a small pytree (codes and scales) that passes through jit
and remat like any param. int8 row scales are fp32; NF4 block scales are bf16 (a few percent of the storage either way).

  quant.quantize_model(model, 'nf4')   # then train as usual
  w_OxI = quant.dense(model.blocks[0].att.key.weight.get_value())   # layer 0's [O, I] back
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

MODES = ('int8', 'nf4')
BLOCK = 64  # NF4 block length along the input dim.
# Quantiles of N(0, 1) scaled to [-1, 1] with an exact zero (Dettmers et al. 2023, QLoRA).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


@dataclasses.dataclass(frozen=True)
class Int8Weight:
  """values [..., O, I] int8, scale [..., O] fp32; dtype: what `dense` returns."""
  values: jax.Array
  scale: jax.Array
  dtype: np.dtype

  @property
  def shape(self):
    return self.values.shape


@dataclasses.dataclass(frozen=True)
class NF4Weight:
  """packed [..., O, nb * 32] uint8, scale [..., O, nb] bf16 (nb = ceil(I / 64)); I = n_in."""
  packed: jax.Array
  scale: jax.Array
  dtype: np.dtype
  n_in: int

  @property
  def shape(self):
    return (*self.packed.shape[:-1], self.n_in)


jax.tree_util.register_dataclass(Int8Weight, data_fields=['values', 'scale'], meta_fields=['dtype'])
jax.tree_util.register_dataclass(NF4Weight, data_fields=['packed', 'scale'], meta_fields=['dtype', 'n_in'])


def is_quantized(w) -> bool:
  return isinstance(w, (Int8Weight, NF4Weight))


def dense(w, dtype=None):
  """The weight as a plain array in `dtype` (default: the dtype it had before quantization)."""
  if isinstance(w, Int8Weight):
    w_OxI = w.values.astype(jnp.float32) * w.scale[..., None]
  elif isinstance(w, NF4Weight):
    w_OxI = _nf4_dequantize(w)
  else:
    return w if dtype is None else w.astype(dtype)
  return w_OxI.astype(w.dtype if dtype is None else dtype)


def take_rows(w, ids):
  """Rows `ids` of a [V, C] matrix (the embedding) in the form it is stored in (`dense` expands
  them). A weight held in host memory (numpy leaves) is gathered on the host."""
  take = np.take if isinstance(jax.tree.leaves(w)[0], np.ndarray) else jnp.take
  return jax.tree.map(lambda leaf: take(leaf, ids, axis=0), w)


def _nf4_dequantize(w: NF4Weight):
  codes = jnp.stack([w.packed & 0xF, w.packed >> 4], axis=-1)  # [..., O, nb*32, 2]: low nibble first
  *lead, nb = w.scale.shape
  levels = jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)].reshape(*lead, nb, BLOCK)
  return (levels * w.scale[..., None]).reshape(*lead, nb * BLOCK)[..., :w.n_in]


@jax.jit
def _int8_quantize(w_OxI):
  w_OxI = w_OxI.astype(jnp.float32)
  scale_O = jnp.max(jnp.abs(w_OxI), axis=-1) / 127.0
  safe_O = jnp.where(scale_O > 0, scale_O, 1.0)  # an all-zero row stays zero
  values = jnp.clip(jnp.round(w_OxI / safe_O[:, None]), -127, 127).astype(jnp.int8)
  return values, scale_O


@jax.jit
def _nf4_quantize(w_OxI):
  O, I = w_OxI.shape
  nb = -(-I // BLOCK)
  w_OxNxB = jnp.pad(w_OxI.astype(jnp.float32), ((0, 0), (0, nb * BLOCK - I))).reshape(O, nb, BLOCK)
  scale_OxN = jnp.max(jnp.abs(w_OxNxB), axis=-1)
  x = w_OxNxB / jnp.where(scale_OxN > 0, scale_OxN, 1.0)[..., None]
  # Nearest level = how many midpoints lie below x; an unrolled sum fuses into one
  # elementwise pass instead of a [..., 15] comparison tensor.
  codes = sum((x > float(m)).astype(jnp.uint8) for m in NF4_MIDPOINTS).reshape(O, nb * BLOCK // 2, 2)
  # bf16 block scales: 1/32 byte a weight instead of fp32's 1/16 (41 MB at 1.6B), for a 2^-8
  # relative error on the scale against NF4's ~9% on the weight.
  return codes[..., 0] | (codes[..., 1] << 4), scale_OxN.astype(jnp.bfloat16)


ROWS = 8192  # rows quantized at once: bounds the fp32 working copy (64 MB at 2048 inputs)


def quantize(w, mode: str):
  """[..., O, I] weight -> Int8Weight / NF4Weight, at most ROWS rows of one matrix at a time.

  Runs on JAX's default device (the GPU when there is one); it holds one block's
  fp32 copy at most, whatever the model size. Rows are quantized independently,
  so the blocks change nothing.
  """
  if mode not in MODES:
    raise ValueError(f'unknown quantization {mode!r}; choose one of {MODES}')
  dtype = np.dtype(w.dtype)
  *lead, O, I = w.shape
  fn = _int8_quantize if mode == 'int8' else _nf4_quantize
  parts = [fn(jnp.asarray(w[idx][row:row + ROWS]))
           for idx in np.ndindex(*lead) for row in range(0, O, ROWS)]
  data, scale = (jnp.concatenate([p[i] for p in parts]).reshape(*lead, O, *parts[0][i].shape[1:])
                 for i in (0, 1))
  return Int8Weight(data, scale, dtype) if mode == 'int8' else NF4Weight(data, scale, dtype, I)


def quantize_model(model, mode: str):
  """Quantizes the model's projection matrices (the generation's QUANTIZED, to `mode`) and its
  embedding and head (int8), in place; returns the model.

  Each matrix is replaced as soon as its quantized copy exists, so a 7B model never has both
  in memory. Norms, mixes, decays and the LoRA-style matrices stay as they are.
  """
  from rwkv_jax.models import generation  # pylint: disable=g-import-not-at-top
  if mode == 'none':
    return model
  for block in model.blocks:
    for group, name in generation(model.cfg.version).QUANTIZED:
      weight = getattr(getattr(block, group), name).weight
      weight.set_value(quantize(weight.get_value(), mode))
  for module in (model.emb, model.head):
    if module is not None:
      module.weight.set_value(quantize(module.weight.get_value(), 'int8'))
  return model
