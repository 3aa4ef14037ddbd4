"""python -m convert COMMAND ...

  to-flax MODEL.pth OUT_DIR    the model as an orbax checkpoint + config.json
  to-pth  MODEL_DIR OUT.pth    back to an official .pth, bit-exact

  export-state STATE --out FILE [--format runner|ai00|pth-fp32] [--ckpt MODEL]
      a trained state (rwkv-N.pth, an Ai00 .state, or a trainer checkpoint directory) for
      runner:   RWKV Runner and the rwkv package: n_layer keys blocks.{i}.att.time_state,
                [H, V, K], bf16 .pth (the default)
      ai00:     Ai00 / web-rwkv: the same keys as float16 safetensors, [H, K, V]
      pth-fp32: like runner, in fp32
  merge --ckpt MODEL.pth --state STATE --out MERGED.pth [--replace_state]
      the base model with the state as its time_state keys; rwkv_jax.load (every version) and
      the rwkv package (v5/v6, not v7) start from it when no state is given
  inspect FILE [--ckpt MODEL]
      what a model or state file holds, and whether a state fits a model

Every command refuses, in one line, a state that Runner would refuse (not exactly n_layer
keys, H*N != n_embd) or that does not fit the given model.
"""
import argparse
import pathlib

import ml_dtypes
import numpy as np

from rwkv_jax import checkpoint, cli, run_dir, state_io
from rwkv_jax.config import RWKVConfig
from rwkv_jax.errors import UserError
from rwkv_jax.models import generation

EXPORT_FORMATS = ('runner', 'ai00', 'pth-fp32')
MERGED_STATE_USERS = {
    '5': 'starts from the merged state: rwkv_jax.load, the rwkv pip package, Runner (torch backends)',
    '6': 'starts from the merged state: rwkv_jax.load, the rwkv pip package, Runner (torch backends)',
    '7': ('starts from the merged state: rwkv_jax.load. The rwkv pip package (RWKV_V7_ON) ignores a merged '
          'x070 time_state: mount the state file there (Runner: Configs -> State-tuned Model)'),
}

# Official sizes (n_layer, n_embd), to name what a lone state file belongs to: RWKV-5/6 World
# and RWKV-7 World / G1 share their shapes.
KNOWN_SIZES = {(12, 768): '0.1B', (24, 1024): '0.4B', (24, 2048): 'RWKV-5/7 1.5B / RWKV-6 1.6B',
               (32, 2560): 'RWKV-5/6 3B / RWKV-7 2.9B', (32, 4096): '7B', (61, 4096): '14B / RWKV-7 13B'}


def to_flax(args):
  model = checkpoint.load_model(args.model)
  try:
    with run_dir.orbax_errors_unlogged():
      checkpoint.save_flax(args.out_dir, model)
  except Exception as e:  # orbax reports a failed write as a ValueError that names the errno
    if run_dir.os_error_code(e) is None:
      raise
    raise run_dir.write_error(args.out_dir, e, unchanged=False) from e
  print(f'{model.cfg.describe()} -> {args.out_dir}')


def to_pth(args):
  if pathlib.Path(args.out).exists() and pathlib.Path(args.out).samefile(args.model_dir):
    raise UserError(f'{args.out} is the input; choose another output path')
  model = checkpoint.load_flax(args.model_dir)
  checkpoint.write_pth(args.out, checkpoint.tensors_from_params(checkpoint.model_params(model), model.cfg))
  print(f'{model.cfg.describe()} -> {args.out}')


def refuse_overwriting_inputs(out, *inputs) -> None:
  out = pathlib.Path(out).resolve()
  for path in inputs:
    if path is not None and pathlib.Path(path).resolve() == out:
      raise UserError(f'--out {out} is also an input ({path}); choose another output path')


def read_model_tensors(path) -> tuple[dict[str, np.ndarray], RWKVConfig]:
  """A .pth model or a to-flax directory as official `{key: tensor}`, checked."""
  if pathlib.Path(path).is_dir():
    model = checkpoint.load_flax(path)
    return checkpoint.tensors_from_params(checkpoint.model_params(model), model.cfg), model.cfg
  tensors = checkpoint.read_pth(path)
  return tensors, checkpoint.check_shapes(tensors, str(path))


def model_config(path) -> RWKVConfig:
  return read_model_tensors(path)[1]


def read_checked_state(path, ckpt=None) -> state_io.StateFile:
  state_file = state_io.open_state(path)  # refuses what Runner refuses: extra keys, not [H, N, N]
  if ckpt is not None:
    state_io.check_fits(state_file.state_LxHxVxK, model_config(ckpt), str(path))
  return state_file


def export_state(args):
  refuse_overwriting_inputs(args.out, args.state, args.ckpt)
  state = read_checked_state(args.state, args.ckpt).state_LxHxVxK
  if args.format == 'ai00':
    state_io.write_ai00_state(args.out, state)
  else:
    dtype = np.float32 if args.format == 'pth-fp32' else ml_dtypes.bfloat16
    state_io.write_state(args.out, state, dtype)
  L, H, N, _ = state.shape
  print(f'{args.state} -> {args.out} ({args.format}: {L} layers x {H} heads x {N}, '
        f'{state_io.FORMAT_NOTES["ai00" if args.format == "ai00" else "runner"]})')


def merge(args):
  refuse_overwriting_inputs(args.out, args.ckpt, args.state)
  tensors, cfg = read_model_tensors(args.ckpt)
  state = state_io.read_state(args.state, cfg)
  if any(k.endswith('.att.time_state') for k in tensors) and not args.replace_state:
    raise UserError(f'{args.ckpt} already carries a merged state; pass --replace_state to replace it')
  # The state takes the model's dtype (bf16 for official files): a single-dtype file is what
  # web-rwkv's converter (bf16 only) accepts on the way to Ai00, and the rwkv package casts
  # time_state to fp32 when it loads it anyway, so nothing downstream gains from more bits.
  dtype = tensors['emb.weight'].dtype
  tensors.update(state_io.state_tensors(state, dtype))
  merged = {k: tensors[k] for k in checkpoint.expected_shapes(cfg, with_time_state=True)}
  checkpoint.write_pth(args.out, merged)
  print(f'{args.ckpt} + {args.state} -> {args.out} ({cfg.describe()}, time_state {np.dtype(dtype).name})')
  print(MERGED_STATE_USERS[cfg.version])


def inspect(args):
  path = pathlib.Path(args.file)
  if is_model(path):
    lines = describe_model(path)
  else:
    lines = describe_state(state_io.open_state(path), path)
  print('\n'.join(lines))
  if args.ckpt is not None:
    if is_model(path):
      raise UserError('inspect --ckpt compares a state with a model; FILE is a model')
    read_checked_state(path, args.ckpt)
    print(f'fits {args.ckpt}: yes ({model_config(args.ckpt).describe()})')


def is_model(path: pathlib.Path) -> bool:
  if path.is_dir():
    return (path / checkpoint.CONFIG_FILE).is_file()
  if not path.is_file():
    raise UserError(f'{path}: no such file or directory')
  if state_io.is_safetensors(path):
    return False
  return 'emb.weight' in checkpoint.read_pth(path)


def describe_model(path) -> list[str]:
  tensors, cfg = read_model_tensors(path)
  state_keys = [k for k in tensors if k.endswith('.att.time_state')]
  weights = [v for k, v in tensors.items() if k not in state_keys]
  dtypes = sorted({str(v.dtype) for v in weights})
  lines = [
      f'{path}: RWKV-{cfg.version} model ({generation(cfg.version).NAME})',
      f'  layers       {cfg.n_layer}',
      f'  width        {cfg.n_embd}',
      f'  heads        {cfg.n_head} x head size {cfg.head_size}',
      f'  vocab        {cfg.vocab_size}',
      f'  ffn          {cfg.dim_ffn}',
      f'  lora dims    {", ".join(f"{name} {width}" for name, width in cfg.lora) or "none"}',
      f'  dtype        {", ".join(dtypes)}',
      f'  parameters   {sum(v.size for v in weights):,}',
  ]
  if state_keys:
    state = state_io.state_from_tensors({k: tensors[k] for k in state_keys}, str(path))
    lines.append(f'  merged state yes ({tensors[state_keys[0]].dtype}; the rwkv package and rwkv_jax start from it)')
    lines.append(f'  state norms  {format_norms(state)}')
  else:
    lines.append('  merged state no')
  return lines


def describe_state(state_file: state_io.StateFile, path) -> list[str]:
  state = state_file.state_LxHxVxK
  L, H, N, _ = state.shape
  size = KNOWN_SIZES.get((L, H * N))
  fits = f'n_layer {L} x n_embd {H * N}' + (f' ({size})' if size else '')
  lines = [
      f'{path}: state ({state_io.FORMAT_NOTES[state_file.format]})',
      f'  layers       {L}',
      f'  heads        {H} x head size {N}',
      f'  dtype        {state_file.dtype}',
      f'  fits models  {fits}',
      f'  layer norms  {format_norms(state)}',
  ]
  if state_file.format == 'ai00' and state_file.dtype != 'float16':
    lines.append('  warning      Ai00 loads only float16 states; re-export with --format ai00')
  return lines


def format_norms(state_LxHxVxK) -> str:
  """The Frobenius norm of each layer's state: a zero or exploding layer shows at a glance."""
  norms = np.sqrt(np.square(state_LxHxVxK.astype(np.float64)).sum(axis=(1, 2, 3)))
  return ' '.join(f'{n:.4g}' for n in norms)


def build_parser() -> argparse.ArgumentParser:
  parser = cli.ArgumentParser(prog='python -m convert', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)
  p = commands.add_parser('to-flax', help='official .pth -> orbax directory')
  p.add_argument('model', help='an RWKV .pth checkpoint')
  p.add_argument('out_dir', help='directory to write (params/ and config.json)')
  p.set_defaults(run=to_flax)
  p = commands.add_parser('to-pth', help='orbax directory -> official .pth')
  p.add_argument('model_dir', help='a directory written by to-flax')
  p.add_argument('out', help='the .pth file to write')
  p.set_defaults(run=to_pth)
  p = commands.add_parser('export-state', help='a trained state -> a file Runner / Ai00 / rwkv mount')
  p.add_argument('state', help='rwkv-N.pth, an Ai00 .state, or a trainer checkpoint directory')
  p.add_argument('--format', choices=EXPORT_FORMATS, default='runner')
  p.add_argument('--out', required=True, help='the file to write (.pth, or .state for ai00)')
  p.add_argument('--ckpt', help='the base model: refuse the state unless it fits')
  p.set_defaults(run=export_state)
  p = commands.add_parser('merge', help='base model + state -> one .pth that starts from the state')
  p.add_argument('--ckpt', required=True, help='the base model (.pth or to-flax directory)')
  p.add_argument('--state', required=True, help='the trained state (any format export-state reads)')
  p.add_argument('--out', required=True, help='the merged .pth to write')
  p.add_argument('--replace_state', action='store_true', help='replace a state the model already carries')
  p.set_defaults(run=merge)
  p = commands.add_parser('inspect', help='what a model or state file is')
  p.add_argument('file', help='a model (.pth or to-flax directory) or a state (.pth, .state/.st, trainer dir)')
  p.add_argument('--ckpt', help='a model: say whether the state fits it')
  p.set_defaults(run=inspect)
  return parser


def main(argv):
  args = build_parser().parse_args(argv)
  args.run(args)


if __name__ == '__main__':
  cli.run(main)
