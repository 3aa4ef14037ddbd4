"""Memory per device of the compiled train step: weights replicated vs split (--shard_weights),
over 1, 2 and 4 devices, from XLA's memory analysis of the step (nothing is run or allocated).

  python bench/shard_memory.py [--models 7B 14B] [--devices 1 2 4] [--ctx_len 1024] [--micro_bsz 1]
                               [--quant none] [--out DIR ...]

Runs anywhere: without enough devices it asks XLA for that many CPU devices
(--xla_force_host_platform_device_count), so the numbers are XLA:CPU's buffer assignment, which
follows the GPU's for the arguments (the weights) and approximates it for the temporaries. Per
device: arguments (weights, state, batch), temporaries (activations, gathered layers), their sum.
Writes shard_memory_<platform>_<date>.json and .md into every --out directory.
"""
import argparse
import os
import pathlib
import sys

MAX_DEVICES = 4
if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):  # before jax is imported
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={MAX_DEVICES}').strip()

import jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
from flax import nnx  # pylint: disable=g-import-not-at-top

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import report  # pylint: disable=g-import-not-at-top
from rwkv_jax import checkpoint, distributed, quant, train  # pylint: disable=g-import-not-at-top
from rwkv_jax.config import RWKVConfig  # pylint: disable=g-import-not-at-top
from rwkv_jax.models import RWKV  # pylint: disable=g-import-not-at-top
from train_step import MODELS  # pylint: disable=g-import-not-at-top

SHAPES = {**MODELS,
          # RWKV-6 World 14B's shape: over a 24 GB card in bf16 (the 13B case).
          '14B': RWKVConfig(version='6', n_layer=61, n_embd=4096, head_size=64, vocab_size=65536, dim_ffn=14336,
                            lora=(('mix', 64), ('decay', 128)))}


def abstract_model(cfg: RWKVConfig, quant_mode: str):
  """(graphdef, states, weights) as shapes: bf16, quantized as the trainer would, no embedding."""
  def build():
    model = RWKV(cfg, checkpoint.abstract_params(cfg, dtype=jnp.bfloat16))
    quant.quantize_model(model, quant_mode)
    model.emb = None  # kept on the host by the trainer (train.host_embedding)
    return train.split(model)
  return nnx.eval_shape(build) if quant_mode == 'none' else jax.eval_shape(build)


def memory(cfg: RWKVConfig, n_devices: int, shard: bool, ctx_len: int, micro_bsz: int, quant_mode: str) -> dict:
  """The compiled step's memory analysis, per device, in GB."""
  graphdef, states, weights = abstract_model(cfg, quant_mode)
  mesh = distributed.make_mesh(n_devices)
  shardings = distributed.weight_shardings(weights, mesh, shard)
  with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  weights = jax.tree.map(with_sharding, weights, shardings)
  opt = train.optimizer(train.schedule('cos', 1.0, 0.01, 10, 100))
  replicated = distributed.NamedSharding(mesh, distributed.PartitionSpec())
  state = jax.tree.map(lambda x: with_sharding(x, replicated), jax.eval_shape(lambda s: train.init_train_state(s, opt),
                                                                                  states))
  by_batch = distributed.NamedSharding(mesh, distributed.PartitionSpec(None, distributed.DATA))
  batch_shape = (1, micro_bsz * n_devices, ctx_len)
  rows = jax.ShapeDtypeStruct((*batch_shape, cfg.n_embd), jnp.bfloat16, sharding=by_batch)
  targets = jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=by_batch)
  step = train.make_train_step(graphdef, opt, gather=distributed.Gather(mesh) if shard else None)
  analysis = step.lower(state, weights, rows, targets).compile().memory_analysis()
  gb = lambda n: n / 1e9
  return {'arguments_gb': gb(analysis.argument_size_in_bytes), 'temp_gb': gb(analysis.temp_size_in_bytes),
          'total_gb': gb(analysis.argument_size_in_bytes + analysis.temp_size_in_bytes)}


def markdown(record: dict) -> str:
  lines = [f'# Train step memory per device, replicated vs --shard_weights ({record["platform"]}, {record["date"]})',
           '', f'XLA memory analysis of the compiled step; ctx {record["ctx_len"]} x {record["micro_bsz"]} per device, '
           f'bf16, quant {record["quant"]}, grad_cp 1, embedding on the host.'
           + (' XLA:CPU computes bf16 products in fp32, so its temporaries are not a GPU\'s; its arguments '
              'are exact.' if record['platform'] == 'cpu' else ''), '',
           '| model | devices | weights | arguments GB | temporaries GB | total GB |', '|---|---|---|---|---|---|']
  for row in record['results']:
    lines.append(f'| {row["model"]} | {row["devices"]} | {"split" if row["shard"] else "replicated"} '
                 f'| {row["arguments_gb"]:.2f} | {row["temp_gb"]:.2f} | {row["total_gb"]:.2f} |')
  return '\n'.join(lines) + '\n'


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--models', nargs='+', default=['7B', '14B'], choices=sorted(SHAPES))
  p.add_argument('--devices', nargs='+', type=int, default=[1, 2, 4])
  p.add_argument('--ctx_len', type=int, default=1024)
  p.add_argument('--micro_bsz', type=int, default=1)
  p.add_argument('--quant', choices=('none', 'int8', 'nf4'), default='none')
  p.add_argument('--out', nargs='+', default=[str(ROOT / 'bench' / 'results')])
  args = p.parse_args()
  if max(args.devices) > jax.device_count():
    p.error(f'--devices {max(args.devices)}: only {jax.device_count()} {jax.default_backend()} devices '
            '(JAX_PLATFORMS=cpu gives 4 CPU devices)')
  platform = jax.devices()[0].platform
  record = {'platform': platform, 'date': report.today(), 'versions': report.versions(), 'ctx_len': args.ctx_len,
            'micro_bsz': args.micro_bsz, 'quant': args.quant, 'results': []}
  for model in args.models:
    for n_devices in args.devices:
      for shard in (False, True):
        row = {'model': model, 'devices': n_devices, 'shard': shard,
               **memory(SHAPES[model], n_devices, shard, args.ctx_len, args.micro_bsz, args.quant)}
        print(row, flush=True)
        record['results'].append(row)
        # Written after every row: a 61-layer step takes minutes to compile on a CPU.
        report.write(args.out, report.stem('shard_memory', platform, record['date']), record, markdown(record))
  print(markdown(record))


if __name__ == '__main__':
  main()
