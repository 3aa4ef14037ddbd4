"""Times versions of pallas_kernels/wkv6_pallas.py against each other in one process, on one GPU.

How kernel changes are judged: each version is a copy of the file (e.g. `git
show REV:pallas_kernels/wkv6_pallas.py > /tmp/old.py`), all timed fwd+bwd with
y on bench/wkv6.py's inputs, in interleaved rounds so that the card's drift hits
them alike, with fla once per shape; then each one's worst error against the
fp32 scan and its GPU kernel time per kernel at the first shape. Every copy
imports pallas_kernels.common from the working tree: to compare a change there,
copy a version's common.py too and point its import at the copy.

  python bench/wkv6_compare.py NAME=PATH [NAME=PATH ...] [--shapes B,T,H,K ...] [--rounds 2]
                               [--reps 20] [--no-fla] [--no-profile]

e.g. `python bench/wkv6_compare.py base=/tmp/old.py new=pallas_kernels/wkv6_pallas.py`.
"""
import argparse
import importlib.util
import pathlib
import sys
import tempfile

import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import profile_step  # pylint: disable=g-import-not-at-top
import wkv6 as wkv6_bench  # pylint: disable=g-import-not-at-top


def load_version(name, path):
  """wkv6_pallas as written in `path`, as an op of bench/wkv6.py's arguments (s0 shared over the batch)."""
  spec = importlib.util.spec_from_file_location(f'wkv6_pallas_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return lambda r, k, v, w, u, s0: module.wkv6_pallas(r, k, v, w, u, jnp.broadcast_to(s0, (r.shape[0],) + s0.shape))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('versions', nargs='+', metavar='NAME=PATH')
  parser.add_argument('--shapes', nargs='+', default=[','.join(map(str, s)) for s in wkv6_bench.SHAPES])
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--reps', type=int, default=20)
  parser.add_argument('--no-fla', action='store_true')
  parser.add_argument('--no-profile', action='store_true')
  args = parser.parse_args()
  if not all('=' in v for v in args.versions):
    parser.error('each version is NAME=PATH')
  versions = [(name, load_version(name, path)) for name, path in (v.split('=', 1) for v in args.versions)]
  shapes = [tuple(int(x) for x in s.split(',')) for s in args.shapes]

  for shape in shapes:
    if not args.no_fla:
      fwd, fwd_bwd = wkv6_bench.bench_fla(shape)
      print(f'fla {shape}: fwd {fwd:.3f} fwd+bwd {fwd_bwd:.3f} ms', flush=True)
    for round_ in range(args.rounds):
      for name, op in versions:
        fwd, fwd_bwd = wkv6_bench.bench_jax('pallas', shape, args.reps, op=op)
        print(f'{shape} round {round_} {name}: fwd {fwd:.3f} fwd+bwd {fwd_bwd:.3f} ms', flush=True)
  for name, op in versions:
    error, output = wkv6_bench.worst_error(op)
    print(f'{name}: worst error {error:.1e} ({output})', flush=True)
  if not args.no_profile:
    inputs = wkv6_bench.make_inputs(*shapes[0])
    for name, op in versions:
      _, fwd_bwd = wkv6_bench.jax_fns(op)
      rows, total = profile_step.profile(fwd_bwd, inputs, 5, tempfile.mkdtemp())
      print(f'{name} kernels, fwd+bwd {shapes[0]}: {total:.3f} ms: '
            + ', '.join(f'{kernel} {ms:.3f}' for kernel, ms, _ in rows[:8]), flush=True)


if __name__ == '__main__':
  main()
