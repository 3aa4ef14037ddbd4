"""RWKV-PEFT's command line here: what each flag of its train.py means to this trainer.

RWKV-PEFT (Joluck/RWKV-PEFT, train.py of January 2026) defines 81 flags; older generations of its
scripts use a subset of the same names. Every one is known here, as one of:

  OWN       train_state.py defines it with RWKV-PEFT's meaning (--load_model, --ctx_len, --lr_init,
            --train_type, --my_testing, --accumulate_grad_batches ...)
  MAPPED    added here, each with its meaning in this trainer: --peft state is --train_type state,
            --wandb logs to W&B, --sft_field/--sft_split read SFT data (and this project's own
            --sft_template picks the document format), --num_nodes counts the hosts of a cluster
            (with this trainer's --coordinator and --node_rank), and the rest accept the one value
            this trainer works with (--weight_decay 0, --optimizer none ...)
  IGNORED   it steers PyTorch, DeepSpeed, Lightning or RWKV-PEFT's CUDA kernels (XLA compiles for the
            device here and the WKV kernel is built in), or configures weight adapters and
            pretraining, which state tuning never uses: accepted, and named in one note

`add_to(parser)` adds MAPPED and IGNORED to train_state's parser; `apply(args, cfg)` maps them onto
the trainer's own flags, prints the note, and refuses in one line what this tool does not do.
"""

import argparse
import dataclasses
from typing import Any, Callable

from rwkv_jax import sft, wandb_log
from rwkv_jax.config import SUPPORTED
from rwkv_jax.errors import UserError
from rwkv_jax.models import generation

OWN = ('load_model', 'proj_dir', 'random_seed', 'data_file', 'data_type', 'vocab_size', 'ctx_len', 'epoch_steps',
       'epoch_count', 'epoch_begin', 'epoch_save', 'micro_bsz', 'n_layer', 'n_embd', 'head_size_a', 'lr_init',
       'lr_final', 'warmup_steps', 'beta1', 'beta2', 'adam_eps', 'grad_cp', 'quant', 'dataload', 'train_type',
       'loss_mask', 'data_shuffle', 'lr_schedule', 'devices', 'precision', 'accumulate_grad_batches',
       'my_testing')

IGNORED = (
    # PyTorch, DeepSpeed, Lightning and the CUDA/Triton kernels
    'accelerator', 'strategy', 'op', 'fla', 'fused_kernel', 'ds_bucket_mb', 'num_workers', 'persistent_workers',
    'prefetch_factor', 'avg_loss',
    # parsed but unused by RWKV-PEFT's RWKV-5/6/7 models, or used only by pretraining
    'pre_ffn', 'head_qk', 'tiny_att_dim', 'tiny_att_layer', 'dropout', 'my_pos_emb', 'my_pile_version',
    'my_pile_stage', 'my_pile_shift', 'my_pile_edecay', 'my_sample_len', 'my_ffn_shift', 'my_att_shift',
    'load_partial', 'magic_prime', 'my_qa_mask', 'my_random_steps', 'my_exit', 'my_exit_tokens', 'layerwise_lr',
    # weight adapters (LoRA, PiSSA, MiSS), infctx chunks and the `se` loss mask
    'train_parts', 'lora_config', 'peft_config', 'pissa_config', 'miss_config', 'merge', 'chunk_ctx', 'mask_id')


@dataclasses.dataclass(frozen=True)
class Mapped:
  """A flag added here: `ok(value)` says whether this trainer does what it asks; if not, `refusal`
  (formatted with the value) says what it does instead."""
  name: str
  type: type
  default: Any
  help: str
  ok: Callable[[Any], bool] = lambda value: True
  refusal: str = ''


MAPPED = (
    Mapped('peft', str, 'none', '"state" (the same as --train_type state); weight adapters are refused',
           lambda v: v in ('none', 'state'),
           '--peft {}: rwkv-jax tunes states only, not LoRA/PiSSA/DiSHA/MiSS adapters; use --peft state'),
    Mapped('wandb', str, '', 'W&B project to log the run to (needs the wandb extra; WANDB_MODE=offline works)'),
    Mapped('sft_split', str, 'train', 'split of the --data_type sft dataset'),
    Mapped('sft_template', str, 'chat', 'sft documents: "chat" (User:/Assistant:) or "alpaca" (RWKV-PEFT\'s)',
           lambda v: v in sft.TEMPLATES, '--sft_template {}: use chat or alpaca'),
    Mapped('num_nodes', int, 1, 'hosts, one process each, joined through --coordinator/--node_rank; the global '
           'batch is --micro_bsz x --devices x --num_nodes'),
    Mapped('weight_decay', float, 0.0, 'must be 0: states train with Adam, no weight decay',
           lambda v: v == 0, '--weight_decay {}: rwkv-jax trains the states with Adam and no weight decay '
           '(it would pull them toward the untuned zero state); leave --weight_decay 0'),
    Mapped('weight_decay_final', float, -1.0, 'must stay <= 0 (no weight decay)',
           lambda v: v <= 0, '--weight_decay_final {}: rwkv-jax trains the states without weight decay; '
           'leave the flag out'),
    Mapped('optimizer', str, 'none', 'only "none": the states train with Adam (--beta1/--beta2/--adam_eps)',
           lambda v: v in ('none', 'adam'), '--optimizer {}: rwkv-jax trains the states with Adam '
           '(--beta1, --beta2, --adam_eps); leave --optimizer out'),
    Mapped('head_size_divisor', int, 8, 'only 8, the GroupNorm eps of every released RWKV-5/6/7',
           lambda v: v == 8, '--head_size_divisor {}: rwkv-jax uses the GroupNorm eps of the released '
           'models (divisor 8); leave the flag out'),
    Mapped('dim_att', int, 0, 'checked against the checkpoint (0: from the checkpoint)'),
    Mapped('dim_ffn', int, 0, 'checked against the checkpoint (0: from the checkpoint)'),
)

KNOWN_VERSIONS = {generation(v).NAME: v for v in SUPPORTED}  # RWKV-PEFT's --my_testing -> RWKV generation


def add_to(parser: argparse.ArgumentParser) -> None:
  """Adds every RWKV-PEFT flag that train_state's parser does not define itself."""
  for flag in MAPPED:
    parser.add_argument(f'--{flag.name}', type=flag.type, default=flag.default, help=flag.help)
  parser.add_argument('--sft_field', nargs='+', metavar='COLUMN',
                      help='--data_type sft: the QUERY and RESPONSE columns')
  for name in IGNORED:  # any value, or none for RWKV-PEFT's store_true flags
    parser.add_argument(f'--{name}', nargs='*', help=argparse.SUPPRESS)


def apply(args, cfg) -> None:
  """Maps RWKV-PEFT's flags onto this trainer's (`cfg` is the checkpoint's RWKVConfig), notes the
  ignored ones, and refuses in one line those asking for what this tool does not do."""
  ignored = [f'--{name}' for name in IGNORED if getattr(args, name) is not None]
  if ignored:
    print(f'note: {" ".join(ignored)} do nothing here (they steer PyTorch/DeepSpeed/Lightning, RWKV-PEFT\'s '
          'kernels, adapters or pretraining; XLA compiles for the device and the WKV kernel is built in)')
  for flag in MAPPED:
    if not flag.ok(getattr(args, flag.name)):
      raise UserError(flag.refusal.format(getattr(args, flag.name)))
  _check_train_type(args)
  _check_version(args.my_testing, cfg)
  for flag, value in (('dim_att', cfg.n_head * cfg.head_size), ('dim_ffn', cfg.dim_ffn)):
    if getattr(args, flag) not in (0, value):
      raise UserError(f'--{flag} {getattr(args, flag)} does not match the checkpoint ({value}); '
                      'the flag can be left out')
  if args.wandb:
    wandb_log.require()
  if args.data_type == 'sft':
    _use_sft_cache(args)


def _check_train_type(args) -> None:
  """--train_type state, or RWKV-PEFT's newer spelling --peft state (with --train_type none)."""
  if args.train_type == 'state' or (args.peft == 'state' and args.train_type == 'none'):
    return
  if args.train_type == 'infctx':
    raise UserError('--train_type infctx: rwkv-jax tunes states only, on windows of --ctx_len tokens (no '
                    'chunked backprop through longer samples); use --train_type state')
  raise UserError(f'--train_type {args.train_type}: rwkv-jax tunes states only; use --train_type state '
                  '(or --peft state)')


def _check_version(my_testing, cfg) -> None:
  if not my_testing:
    return
  known = [code for code in KNOWN_VERSIONS if code in my_testing]
  if not known:
    raise UserError(f'--my_testing {my_testing}: unknown RWKV version; rwkv-jax trains RWKV-5/6/7 (x052, x060, '
                    'x070) and reads the version from the checkpoint, so the flag can be left out')
  if KNOWN_VERSIONS[known[0]] != cfg.version:
    code = next(c for c, version in KNOWN_VERSIONS.items() if version == cfg.version)
    raise UserError(f'--my_testing {my_testing} does not match the checkpoint, an RWKV-{cfg.version} ({code}) '
                    'model; the flag can be left out')


def _use_sft_cache(args) -> None:
  """--data_type sft: the dataset is tokenized into a binidx cache that the trainer reads like any
  binidx; the answer offsets beside it keep the loss on the responses."""
  args.data = sft.build(args.data, args.sft_split, args.sft_field, args.sft_template)
  args.data_type = 'binidx'
