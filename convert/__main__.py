"""python -m convert COMMAND ...

  to-flax MODEL.pth OUT_DIR    the model as an orbax checkpoint + config.json
  to-pth  MODEL_DIR OUT.pth    back to an official .pth, bit-exact
"""
import argparse
import pathlib

from rwkv_jax import checkpoint, cli
from rwkv_jax.errors import UserError


def to_flax(args):
  tensors = checkpoint.read_pth(args.model)
  cfg = checkpoint.check_shapes(tensors, args.model)
  checkpoint.save_flax(args.out_dir, checkpoint.params_from_tensors(tensors, cfg), cfg)
  print(f'{cfg.describe()} -> {args.out_dir}')


def to_pth(args):
  if pathlib.Path(args.out).exists() and pathlib.Path(args.out).samefile(args.model_dir):
    raise UserError(f'{args.out} is the input; choose another output path')
  params, cfg = checkpoint.load_flax(args.model_dir)
  checkpoint.write_pth(args.out, checkpoint.tensors_from_params(params, cfg))
  print(f'{cfg.describe()} -> {args.out}')


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m convert', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)
  p = commands.add_parser('to-flax', help='official .pth -> orbax directory')
  p.add_argument('model', help='an RWKV-6 .pth checkpoint')
  p.add_argument('out_dir', help='directory to write (params/ and config.json)')
  p.set_defaults(run=to_flax)
  p = commands.add_parser('to-pth', help='orbax directory -> official .pth')
  p.add_argument('model_dir', help='a directory written by to-flax')
  p.add_argument('out', help='the .pth file to write')
  p.set_defaults(run=to_pth)
  return parser


def main(argv):
  args = build_parser().parse_args(argv)
  args.run(args)


if __name__ == '__main__':
  cli.run(main)
