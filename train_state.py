"""State tuning of an RWKV model: train each layer's initial WKV state, nothing else.

  python train_state.py --ckpt MODEL.pth --data DATA.jsonl --proj_dir out
  python train_state.py --demo                      # tiny random model + bundled data, ~1 min on CPU

RWKV-PEFT's flag names work too (--load_model, --data_file, --ctx_len, --micro_bsz,
--lr_init ...), so a demo-state-tuning.sh command line runs unchanged. The version and
every dimension come from the checkpoint. Outputs in --proj_dir: rwkv-{epoch}.pth (the
state, as Runner mounts it), train_log.txt, loss_data.jsonl, loss.png, and checkpoint/
for --resume.

main() is four steps: `prepare` (model, data, devices, schedule), `start` (a fresh or a
resumed train state), `run_epochs` (the loop), `finish` (plot and next steps). What they
share is a `Run`; what the loop logs goes through `Progress`.
"""
import argparse
import collections
import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import pathlib
import shutil
import sys
import time
import typing

import jax
import ml_dtypes
import numpy as np
import optax
from flax import nnx

from pallas_kernels import IMPLEMENTATIONS
from rwkv_jax import (api, checkpoint, cli, data, distributed, evaluate, peft_flags, quant, run_dir, state_io,
                      synthetic, train, wandb_log)
from rwkv_jax.config import RWKVConfig
from rwkv_jax.errors import UserError

CHECKPOINT_DIR = 'checkpoint'
TRAIN_TREE_DIR = 'tree'  # the orbax tree of the whole TrainState, inside checkpoint/
DEMO = dict(ctx_len=64, micro_bsz=4, epoch_steps=20, epoch_count=4, warmup_steps=10, lr_init=1.0, lr_final=0.01)
DTYPES = {'bf16': ml_dtypes.bfloat16, 'fp16': np.float16, 'fp32': np.float32, 'tf32': np.float32}


def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add = p.add_argument
  add('--ckpt', '--load_model', dest='ckpt', help='base model: an RWKV .pth or a `convert to-flax` directory')
  add('--data', '--data_file', dest='data', help='training data: a .jsonl, a binidx prefix, or a UTF-8 text file')
  add('--data_type', choices=(*data.DATA_TYPES, 'sft'), help='binidx | jsonl | utf-8 | sft (default: from the path)')
  add('--proj_dir', default='out', help='where states, logs and the resume checkpoint go (default: out)')
  add('--demo', action='store_true', help='train on a tiny random model and the bundled dataset')
  add('--ctx_len', type=int, default=512, help='tokens per sample (default 512: short contexts tune states best)')
  add('--micro_bsz', type=int, default=1, help='samples per device per micro-step')
  add('--epoch_steps', type=int, help='micro-steps per epoch (default: one pass over the documents)')
  add('--epoch_count', type=int, default=10, help='epochs; also the lr schedule horizon')
  add('--epoch_begin', type=int, default=0, help='first epoch number (offsets file names and the lr schedule)')
  add('--epoch_save', type=int, default=1, help='write rwkv-{epoch}.pth every N epochs (and after the last)')
  add('--lr_init', type=float, default=1.0, help='peak learning rate (states want a very high one)')
  add('--lr_final', type=float, default=0.01, help='learning rate at the end of the schedule')
  add('--warmup_steps', type=int, default=10, help='linear warmup steps')
  add('--lr_schedule', choices=('cos', 'exp', 'wsd'), default='cos', help='decay after warmup')
  add('--beta1', type=float, default=0.9, help='Adam beta1')
  add('--beta2', type=float, default=0.99, help='Adam beta2')
  add('--adam_eps', type=float, default=1e-8, help='Adam epsilon')
  add('--precision', choices=tuple(DTYPES), default='bf16', help='compute dtype of the weights')
  add('--grad_cp', type=int, choices=(0, 1), default=1, help='1: recompute most of each layer in the backward pass')
  add('--dataload', choices=data.DATALOADS, default='pad',
      help='pad: one document per sample; pack: documents back to back, each from the tuned state; get: random windows')
  add('--loss_mask', choices=data.LOSS_MASKS, default='none', help='qa: loss only on the assistant answers')
  add('--accumulate_grad_batches', type=int, default=1, help='micro-steps per optimizer step')
  add('--random_seed', type=int, default=-1, help='seed for sampling (-1: pick one and record it)')
  add('--data_shuffle', type=int, choices=(0, 1), default=1, help='shuffle documents every epoch')
  add('--devices', type=int, default=1, help='GPUs of each host to spread the batch over (data parallel)')
  add('--coordinator', help='--num_nodes > 1: HOST:PORT of the --node_rank 0 host (default: MASTER_ADDR:MASTER_PORT)')
  add('--node_rank', type=int, help='--num_nodes > 1: this host\'s rank, 0 .. num_nodes-1 (default: NODE_RANK)')
  add('--shard_weights', action='store_true',
      help='split the frozen weights over all the devices, each layer gathered when it runs (models over one card)')
  add('--quant', choices=('none', 'int8', 'nf4'), default='none',
      help='quantize the frozen projection matrices (the embedding and head go int8 either way)')
  add('--train_type', default='state', help='only "state": this tool tunes states')
  add('--my_testing', help='model version as RWKV-PEFT names it (x052, x060, x070); checked against the checkpoint')
  add('--vocab_size', type=int, help='checked against the checkpoint')
  add('--n_layer', type=int, help='checked against the checkpoint')
  add('--n_embd', type=int, help='checked against the checkpoint')
  add('--head_size_a', type=int, help='checked against the checkpoint')
  add('--eval_data', help='held-out data: its loss is measured and logged after every epoch')
  add('--eval_batches', type=int, default=20, help='batches of --eval_data to evaluate (default 20)')
  add('--implementation', choices=IMPLEMENTATIONS, help='WKV kernel (default: the fastest for this platform)')
  add('--resume', action='store_true', help='continue the run saved in proj_dir/checkpoint')
  add('--overwrite', action='store_true',
      help='start over in a proj_dir that holds another run (its files move into proj_dir/previous-run-<time>/)')
  add('--max_steps', type=int, help='stop (resumably) after this many optimizer steps in this session')
  peft_flags.add_to(p)  # the rest of RWKV-PEFT's flags
  return p


def check_args(args, cfg: RWKVConfig) -> None:
  """What the command line must agree with the checkpoint on (check_flags has checked the numbers)."""
  peft_flags.apply(args, cfg)  # RWKV-PEFT's flags: mapped, noted as ignored, or refused
  for flag, value in (('vocab_size', cfg.vocab_size), ('n_layer', cfg.n_layer), ('n_embd', cfg.n_embd),
                      ('head_size_a', cfg.head_size)):
    given = getattr(args, flag)
    if given is not None and given != value:
      raise UserError(f'--{flag} {given} does not match the checkpoint ({value}); the flag can be left out')


def check_flags(args) -> None:
  """Every number on the command line inside the range where it means something, refused before
  any file is read or written (a flag left out is None and passes)."""
  at_least = lambda low: (lambda value: value >= low, f'must be at least {low}')
  positive = (lambda value: 0 < value < math.inf, 'must be a positive number')
  for flag in ('ctx_len', 'micro_bsz', 'epoch_steps', 'epoch_count', 'epoch_save', 'accumulate_grad_batches',
               'devices', 'num_nodes', 'max_steps', 'eval_batches', 'vocab_size', 'n_layer', 'n_embd', 'head_size_a'):
    cli.check_flag(args, flag, *at_least(1))
  for flag in ('epoch_begin', 'warmup_steps', 'node_rank'):
    cli.check_flag(args, flag, *at_least(0))
  cli.check_flag(args, 'random_seed', *at_least(-1))  # -1: pick one
  for flag in ('lr_init', 'adam_eps'):
    cli.check_flag(args, flag, *positive)
  cli.check_flag(args, 'lr_final', lambda value: 0 <= value < math.inf, 'must be 0 or a positive number')
  for flag in ('beta1', 'beta2'):
    cli.check_flag(args, flag, lambda value: 0 <= value < 1, 'must be at least 0 and below 1')
  micro_steps = args.devices * args.num_nodes * args.accumulate_grad_batches
  if args.epoch_steps is not None and args.epoch_steps < micro_steps:
    raise UserError(f'--epoch_steps {args.epoch_steps} is less than one optimizer step (--devices x --num_nodes x '
                    f'--accumulate_grad_batches = {micro_steps} micro-steps)')


def join_cluster(args) -> None:
  """Joins the other hosts of a --num_nodes run (before JAX touches a device), then checks
  --devices against this host's devices."""
  coordinator, args.node_rank = distributed.cluster_flags(args.num_nodes, args.coordinator, args.node_rank)
  distributed.join(args.num_nodes, coordinator, args.node_rank)
  if args.devices > jax.local_device_count():
    raise UserError(f'--devices {args.devices}, but only {jax.local_device_count()} {jax.default_backend()} '
                    'device(s) found')


def prepare_demo(args, argv) -> None:
  """A tiny RWKV-6 in the official layout (fixed seed, so every run is the same) and the bundled
  data. DEMO's settings replace the defaults, not the flags given with --demo."""
  if args.ckpt or args.data:
    raise UserError('--demo brings its own model and data; leave out --ckpt/--data (or --demo)')
  if args.num_nodes != 1:
    raise UserError('--demo runs on one host; leave out --num_nodes')
  given = build_parser().parse_args(argv, argparse.Namespace(**DEMO))  # argparse keeps what a namespace holds
  for key in DEMO:
    setattr(args, key, getattr(given, key))
  proj = run_dir.make_dir(args.proj_dir)
  model_path, data_path = proj / 'demo-model.pth', proj / 'demo.jsonl'
  if not model_path.exists():
    checkpoint.write_pth(model_path, synthetic.random_checkpoint(synthetic.TINY, seed=0))
  with run_dir.replacing(data_path) as tmp:
    shutil.copyfile(pathlib.Path(data.__file__).parent / 'demo_data' / 'demo.jsonl', tmp)
  args.ckpt, args.data = str(model_path), str(data_path)


# ---------------------------------------------------------------------------------------------
# prepare: everything a run needs, built once


@dataclasses.dataclass
class Run:
  """What the steps of a training run share (built by `prepare`, read-only afterwards)."""
  args: argparse.Namespace
  proj: pathlib.Path
  cfg: RWKVConfig
  graphdef: nnx.GraphDef  # the model without its embedding (see train.host_embedding)
  states: nnx.State  # the WKV states the model starts from (zeros, or a merged checkpoint's)
  weights: nnx.State  # on the devices: replicated, or split over them (--shard_weights)
  embedding: object  # numpy, in host memory
  tokens: data.TokenData
  lr: object  # step -> learning rate
  opt: optax.GradientTransformation
  steps_per_epoch: int  # optimizer steps, as RWKV-PEFT counts them
  global_bsz: int
  mesh: jax.sharding.Mesh  # every host's --devices, along one axis

  @property
  def total_steps(self) -> int:
    return self.steps_per_epoch * self.args.epoch_count

  def sharding(self, *spec) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))

  def lr_at(self, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based), --epoch_begin's offset included."""
    return float(self.lr(step + self.args.epoch_begin * self.steps_per_epoch))


def prepare(args) -> Run:
  if jax.default_backend() == 'cpu' and os.path.exists('/proc/driver/nvidia/version') and not os.environ.get('JAX_PLATFORMS'):
    print('note: this machine has an NVIDIA GPU but JAX sees none; pip install "rwkv-jax[cuda13]" (or [cuda12])')
  model = checkpoint.load_model(args.ckpt, args.implementation)
  check_args(args, model.cfg)
  proj = pathlib.Path(args.proj_dir)
  tokens = data.load_data(args.data, args.data_type, model.cfg.vocab_size)

  if args.precision == 'fp32':
    jax.config.update('jax_default_matmul_precision', 'highest')
  api.cast(model, DTYPES[args.precision])
  quant.quantize_model(model, args.quant)
  embedding = train.host_embedding(model)  # each batch's rows are gathered on the host
  graphdef, states, weights = train.split(model)
  mesh = distributed.make_mesh(args.devices)

  # RWKV-PEFT's count: --epoch_steps samples of --micro_bsz, shared by every device of the cluster;
  # a sample is a document (pad), or a row of packed documents (pack).
  samples = data.samples_per_pass(tokens, args.dataload, args.ctx_len)
  epoch_steps = args.epoch_steps or max(samples // args.micro_bsz, 1)
  steps_per_epoch = max(epoch_steps // (mesh.size * args.accumulate_grad_batches), 1)
  lr = train.schedule(args.lr_schedule, args.lr_init, args.lr_final, args.warmup_steps,
                      steps_per_epoch * args.epoch_count)
  run = Run(args=args, proj=proj, cfg=model.cfg, graphdef=graphdef, states=states, weights=weights,
            embedding=embedding, tokens=tokens, lr=lr, opt=train.optimizer(lr, args.beta1, args.beta2, args.adam_eps),
            steps_per_epoch=steps_per_epoch, global_bsz=args.micro_bsz * mesh.size * args.accumulate_grad_batches,
            mesh=mesh)
  run.weights = jax.device_put(weights, distributed.weight_shardings(weights, mesh, args.shard_weights))
  return run


# ---------------------------------------------------------------------------------------------
# start: a fresh or a resumed train state


def start(run: Run) -> tuple[train.TrainState, int, int]:
  """(train state on the devices, first optimizer step, sampling seed): process 0's, which reads
  the run's files, on every host."""
  fresh = train.init_train_state(run.states, run.opt)  # continues a merged state, as RWKV-PEFT does

  def fresh_or_resumed():
    args = run.args
    seed = args.random_seed if args.random_seed >= 0 else int(np.random.SeedSequence().entropy % 2**31)
    if not args.resume:
      return fresh, 0, seed
    train_state, meta = load_train_checkpoint(run.proj, fresh)
    if meta['total_steps'] != run.total_steps:
      raise UserError(f'--resume: the saved run has {meta["total_steps"]} steps in all, these flags give '
                      f'{run.total_steps}; resume with the same --epoch_steps/--epoch_count/--micro_bsz/--devices/'
                      '--num_nodes')
    return train_state, int(meta['step']), int(meta['seed'])

  train_state, start_step, seed = distributed.from_main(fresh_or_resumed, like=(fresh, 0, 0))
  return jax.device_put(train_state, run.sharding()), int(start_step), int(seed)


def save_train_checkpoint(run: Run, train_state, step: int, seed: int) -> None:
  """Writes checkpoint/ so that a kill at any moment leaves a complete one (new or previous), and a
  failed write (a full disk) leaves the previous one and no temporary folder."""
  state_npy = io.BytesIO()  # for export tools; written by Python, so that a failed write keeps its errno
  np.save(state_npy, train.wkv_array(train_state.states))
  meta = {'step': step, 'seed': seed, 'total_steps': run.total_steps, 'args': vars(run.args)}
  train_state = jax.tree.map(np.asarray, train_state)  # replicated: this host's copy
  with run_dir.replacing(run.proj / CHECKPOINT_DIR) as tmp, run_dir.orbax_errors_unlogged():
    tmp.mkdir()
    with checkpointer() as saver:
      saver.save(tmp.absolute() / TRAIN_TREE_DIR, train_state)
    (tmp / state_io.TRAIN_STATE_FILE).write_bytes(state_npy.getvalue())
    (tmp / 'meta.json').write_text(json.dumps(meta, indent=2))


def checkpointer():
  """orbax's checkpointer for this process alone: process 0 reads and writes the run's files,
  and the other hosts need not share its file system."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
  return ocp.StandardCheckpointer(multiprocessing_options=alone)


def saved_states(proj: pathlib.Path) -> list[pathlib.Path]:
  """The run's rwkv-{epoch}.pth files, by epoch."""
  return sorted(proj.glob('rwkv-[0-9]*.pth'), key=lambda p: int(p.stem.split('-')[1]))


def load_train_checkpoint(proj: pathlib.Path, train_state):
  """Restores onto one device whatever device layout the run was saved from. A checkpoint that
  cannot be read ends in one line naming the run's last rwkv-N.pth, the state it can go on from."""
  final = proj / CHECKPOINT_DIR
  directory = next((d for d in (final, run_dir.previous_version(final)) if d.is_dir()), None)
  if directory is None:
    raise UserError(f'--resume: no {CHECKPOINT_DIR}/ in {proj}; start without --resume')
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), train_state)
  try:
    meta = json.loads((directory / 'meta.json').read_text())
    if not all(isinstance(meta.get(key), int) for key in ('step', 'seed', 'total_steps')):
      raise ValueError('meta.json lacks the step, the seed or the total steps')
    with run_dir.orbax_errors_unlogged(), checkpointer() as reader:
      restored = reader.restore(directory.absolute() / TRAIN_TREE_DIR, abstract)
  except Exception as e:  # JSON, orbax and tensorstore errors alike: the files are damaged or missing
    states = saved_states(proj)
    if not states:
      raise UserError(f'--resume: {directory} is damaged and the run saved no rwkv-N.pth yet; start over with '
                      '--overwrite') from e
    epoch = int(states[-1].stem.split('-')[1])
    raise UserError(f'--resume: {directory} is damaged; the run\'s last state is {states[-1]}: merge it into the '
                    f'model (python -m convert merge --ckpt MODEL.pth --state {states[-1]} --out merged.pth) and '
                    f'train from merged.pth with --epoch_begin {epoch + 1} in a new --proj_dir') from e
  return restored, meta


# ---------------------------------------------------------------------------------------------
# run_epochs: the loop, and what it logs


class Progress:
  """The per-step log (loss_data.jsonl), the losses so far, and the progress bar of an epoch."""

  def __init__(self, run: Run, start_step: int):
    self.run = run
    self.path = run.proj / run_dir.STEP_LOG
    self.writes = distributed.is_main()  # the other hosts keep the losses, and write and show nothing
    # A run killed after its last checkpoint logged steps that the resumed run will take again.
    kept = [line for line in self.read_log() if line['step'] <= start_step] if start_step and self.writes else []
    if self.writes:
      with run_dir.replacing(self.path) as tmp:
        tmp.write_text(''.join(json.dumps(line) + '\n' for line in kept))
    self.loss_at = {line['step']: line['loss'] for line in kept}  # optimizer step (1-based) -> loss
    self.file = open(self.path if self.writes else os.devnull, 'a', encoding='utf-8')
    self.wandb = wandb_log.Logger(run.args, run.proj)  # does nothing without --wandb
    self.bar, self.epoch, self.t_last = None, 0, time.perf_counter()
    self.epoch_timings = []  # (step time, document tokens) of this session's steps of the epoch

  def read_log(self) -> list[dict]:
    """The steps logged so far; a line a kill cut short is left out."""
    if not self.path.exists():
      return []
    lines = []
    for text in self.path.read_text(encoding='utf-8').splitlines():
      try:
        lines.append(json.loads(text))
      except json.JSONDecodeError:
        continue
    return [line for line in lines if isinstance(line, dict) and {'step', 'loss'} <= set(line)]

  @property
  def losses(self) -> list[float]:
    return [self.loss_at[step] for step in sorted(self.loss_at)]

  def epoch_mean(self, epoch: int) -> float:
    """The mean loss of epoch `epoch` (0-based), over every session that trained part of it."""
    first, last = epoch * self.run.steps_per_epoch + 1, (epoch + 1) * self.run.steps_per_epoch
    losses = [loss for step, loss in self.loss_at.items() if first <= step <= last]
    return float(np.mean(losses)) if losses else float('nan')

  def start_epoch(self, epoch: int, done_in_epoch: int):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    self.epoch, self.t_last = epoch, time.perf_counter()
    self.epoch_timings = []
    self.bar = tqdm(total=self.run.steps_per_epoch, initial=done_in_epoch,
                    desc=f'epoch {self.run.args.epoch_begin + epoch}', dynamic_ncols=True, disable=not self.writes)

  def record(self, done: int, loss: float, doc_tokens: int) -> None:
    """Logs optimizer step `done` (1-based) once its loss has been read from the device; a step
    logged already (a Ctrl-C between logging it and taking it off the queue) is not logged twice.
    doc_tokens: the step's tokens of real documents (data.Sampler.doc_tokens), not padding."""
    if done in self.loss_at:
      return
    run = self.run
    now = time.perf_counter()
    step_time, self.t_last = now - self.t_last, now
    self.epoch_timings.append((step_time, doc_tokens))
    kt_s = run.global_bsz * run.args.ctx_len / step_time / 1000
    rate = run.lr_at(done - 1)
    self.loss_at[done] = loss
    try:
      self.file.write(json.dumps({'step': done, 'epoch': run.args.epoch_begin + self.epoch, 'loss': loss, 'lr': rate,
                                  'tokens_per_s': kt_s * 1000, 'kt_s': kt_s, 'step_s': step_time,
                                  'doc_tokens_per_s': doc_tokens / step_time}) + '\n')
      self.file.flush()
    except OSError as e:
      raise run_dir.write_error(self.path, e, unchanged=False) from e
    self.wandb.log_step(done, loss, rate, kt_s * 1000)
    self.bar.set_postfix_str(f'loss {loss:.4f} lr {rate:.4g} {kt_s:.2f} Kt/s', refresh=False)
    self.bar.update()

  def epoch_speed(self) -> str:
    """The epoch's mean step time and tokens of real documents a second (this session's steps),
    as train_log.txt has them."""
    if not self.epoch_timings:
      return ''
    seconds, doc_tokens = np.sum(self.epoch_timings, axis=0)
    return f' step_s {seconds / len(self.epoch_timings):.4f} doc_tokens_per_s {doc_tokens / seconds:.1f}'

  def end_epoch(self):
    self.bar.close()

  def close(self):
    if self.bar is not None:
      self.bar.close()
    self.wandb.finish(saved_states(self.run.proj))
    self.file.close()


class Batch(typing.NamedTuple):
  """What an optimizer step takes, and its tokens of real documents (data.Sampler.doc_tokens)."""
  arrays: tuple  # step_fn's arguments after the weights, on the devices: rows, targets (, doc_starts)
  doc_tokens: int


def make_batches(run: Run, seed: int):
  """batch(epoch, step): the Batch of an optimizer step. Every host samples the same global batch
  and gathers the rows of its own share."""
  args = run.args
  sampler = data.Sampler(run.tokens, args.ctx_len, run.global_bsz, args.dataload, epoch_steps=run.steps_per_epoch,
                         seed=seed, shuffle=bool(args.data_shuffle), loss_mask=args.loss_mask)
  shape = (args.accumulate_grad_batches, run.global_bsz // args.accumulate_grad_batches, args.ctx_len)

  def batch(epoch: int, step: int):
    step %= run.steps_per_epoch
    inputs, targets = sampler.batch(epoch, step)
    arrays = (quant.take_rows(run.embedding, distributed.process_rows(inputs.reshape(shape))),
              distributed.process_rows(targets.reshape(shape)))
    doc_starts = sampler.doc_starts(epoch, step)
    if doc_starts is not None:
      arrays += (distributed.process_rows(doc_starts.reshape(shape[:2] + doc_starts.shape[1:])),)
    return Batch(distributed.global_batch(arrays, run.mesh), sampler.doc_tokens(epoch, step))

  return batch


def make_eval(run: Run):
  """eval_loss(train_state): the held-out loss of --eval_data from the current states, or None."""
  args = run.args
  if not args.eval_data:
    return None
  eval_data = data.load_data(args.eval_data, None, run.cfg.vocab_size)
  # Packed or padded, a document's loss is the same (tests/test_pack.py): pack's eval is pad's.
  dataload = 'pad' if args.dataload == 'pack' else args.dataload
  sampler = evaluate.eval_sampler(eval_data, args.ctx_len, args.micro_bsz * args.devices, dataload,
                                  args.eval_batches, args.loss_mask)

  def eval_loss(train_state) -> float:
    model = nnx.merge(run.graphdef, train_state.states, run.weights)
    batches = ((quant.take_rows(run.embedding, x), y) for x, y in evaluate.eval_batches(sampler))
    return evaluate.mean_loss(model, batches)[0]

  return eval_loss


def stop_on_nan(run: Run, train_state, step: int, seed: int, done: int, loss: float):
  """A non-finite loss: keep the last good state (a step with a non-finite loss leaves the train
  state unchanged, so the one held is good) and stop with one line."""
  if distributed.is_main():
    state_io.write_state(run.proj / 'rwkv-last-good.pth', train.wkv_array(train_state.states))
    save_train_checkpoint(run, train_state, step, seed)
  raise UserError(f'loss became {loss} at step {done}; the last good state is in '
                  f'{run.proj / "rwkv-last-good.pth"}. Lower --lr_init or check the data')


def run_epochs(run: Run, train_state, start_step: int, seed: int, progress: Progress):
  """Trains from optimizer step `start_step` to the end or --max_steps. Returns (train_state, step)."""
  args = run.args
  gather = distributed.Gather(run.mesh) if args.shard_weights else None
  step_fn = train.make_train_step(run.graphdef, run.opt, remat=bool(args.grad_cp), gather=gather)
  batch, eval_loss = make_batches(run, seed), make_eval(run)
  step, stop_at = start_step, start_step + (args.max_steps or run.total_steps)
  # (step number, its loss on the device, its document tokens) of dispatched steps not yet logged
  in_flight = collections.deque()
  epoch, ended = start_step // run.steps_per_epoch, None  # ended: the last epoch whose end_epoch is written

  def log_in_flight(keep: int):
    while len(in_flight) > keep:
      # A Ctrl-C lands most often in float(), waiting for the device: the step stays queued until
      # it is logged, so that the handler below logs it.
      done, loss, doc_tokens = in_flight[0]
      loss = float(loss)
      if not math.isfinite(loss):
        stop_on_nan(run, train_state, step, seed, done, loss)
      progress.record(done, loss, doc_tokens)
      in_flight.popleft()

  try:
    for epoch in range(start_step // run.steps_per_epoch, args.epoch_count):
      progress.start_epoch(epoch, step % run.steps_per_epoch)
      last = min((epoch + 1) * run.steps_per_epoch, stop_at)
      # One step stays queued on the device: while it runs, the host gathers and sends the next
      # batch, dispatches the next step and reads the previous step's loss, so the device never
      # waits for the host.
      inputs = batch(epoch, step) if step < last else None
      if step == start_step and step < last:
        print('compiling the training step...', flush=True)
      while step < last:
        train_state, loss = step_fn(train_state, run.weights, *inputs.arrays)
        step += 1
        in_flight.append((step, loss, inputs.doc_tokens))
        inputs = batch(epoch, step) if step < last else None
        log_in_flight(keep=1)
      log_in_flight(keep=0)
      progress.end_epoch()
      if step >= stop_at and step < (epoch + 1) * run.steps_per_epoch:
        break
      with run_dir.deferred_interrupt():
        end_epoch(run, epoch, step, train_state, seed, progress, eval_loss)
        ended = epoch
  except KeyboardInterrupt:
    log_in_flight(keep=0)
    if step == (epoch + 1) * run.steps_per_epoch and ended != epoch:
      # The epoch's last step ran, its files were not written yet: a checkpoint alone would resume
      # in the next epoch, and this one's rwkv-N.pth and log line would never be written.
      with run_dir.deferred_interrupt():
        end_epoch(run, epoch, step, train_state, seed, progress, eval_loss)
    elif distributed.is_main():
      save_train_checkpoint(run, train_state, step, seed)
    print(f'\ninterrupted at step {step}: continue with the same command and --resume')
    sys.exit(130)
  return train_state, step


def end_epoch(run: Run, epoch: int, step: int, train_state, seed: int, progress: Progress, eval_loss) -> None:
  """The epoch's line in train_log.txt, its rwkv-{epoch}.pth (every --epoch_save), checkpoint/ (process 0;
  every process takes part in the held-out loss)."""
  args = run.args
  mean = progress.epoch_mean(epoch)  # over every session of the epoch, resumed or not
  line = (f'{args.epoch_begin + epoch} {mean:.6f} {math.exp(min(mean, 700)):.4f} {run.lr_at(max(step - 1, 0)):.8f} '
          f'{datetime.datetime.now()} {epoch}{progress.epoch_speed()}')
  if eval_loss is not None:
    held_out = eval_loss(train_state)
    line += f' eval_loss {held_out:.6f}'
    print(f'epoch {args.epoch_begin + epoch}: train loss {mean:.4f}, held-out loss {held_out:.4f} '
          f'(perplexity {math.exp(min(held_out, 700)):.2f})')
  if not distributed.is_main():
    return
  run_dir.append_text(run.proj / 'train_log.txt', line + '\n')
  progress.wandb.log_epoch(step, args.epoch_begin + epoch, mean, held_out if eval_loss is not None else None)
  if epoch % args.epoch_save == 0 or epoch == args.epoch_count - 1:
    state_io.write_state(run.proj / f'rwkv-{args.epoch_begin + epoch}.pth', train.wkv_array(train_state.states))
  save_train_checkpoint(run, train_state, step, seed)


# ---------------------------------------------------------------------------------------------
# finish


def plot_loss(proj: pathlib.Path, losses: list[float]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(np.arange(1, len(losses) + 1), losses, lw=1)
  ax.set(xlabel='optimizer step', ylabel='loss', title='state tuning')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  with run_dir.replacing(proj / 'loss.png') as tmp:
    fig.savefig(tmp, format='png', dpi=120)
  plt.close(fig)


def print_next_steps(args, losses, state_path: pathlib.Path, steps_per_epoch: int) -> None:
  print(f'\ndone: loss {losses[0]:.3f} -> {np.mean(losses[-max(steps_per_epoch // 2, 1):]):.3f}; '
        f'state in {state_path}, curve in {state_path.parent / "loss.png"}\n'
        f'next:\n'
        f'  try it:        python -m rwkv_jax.generate --ckpt {args.ckpt} --state {state_path} '
        f'--prompt "User: hi\\n\\nAssistant:" --temperature 0\n'
        f'  RWKV Runner:   copy {state_path.name} into state-models/ and pick it under Configs\n'
        f'  Ai00:          python -m convert export-state {state_path} --format ai00 --ckpt {args.ckpt} '
        f'--out {state_path.stem}.state\n'
        f'  a real model:  python train_state.py --ckpt RWKV-x070-World-1.5B.pth --data your.jsonl')


def finish(run: Run, train_state, step: int, seed: int, losses: list[float]) -> None:
  if step < run.total_steps:
    save_train_checkpoint(run, train_state, step, seed)
    print(f'stopped after step {step} of {run.total_steps} (--max_steps): continue with --resume')
  if losses:
    plot_loss(run.proj, losses)
  final = saved_states(run.proj)
  if step >= run.total_steps and final:
    print_next_steps(run.args, losses, final[-1], run.steps_per_epoch)


def main(argv):
  args = build_parser().parse_args(argv)
  if args.demo:
    prepare_demo(args, argv)
  if not args.ckpt or not args.data:
    raise UserError('give --ckpt MODEL.pth and --data DATA (or --load_model / --data_file), or try --demo')
  check_flags(args)
  join_cluster(args)
  if not distributed.is_main():  # process 0 speaks for the run; the others print only their errors
    sys.stdout = open(os.devnull, 'w', encoding='utf-8')  # pylint: disable=consider-using-with
  # The run owns --proj_dir; on process 0's host, the one that writes it.
  claim = (run_dir.claim(args.proj_dir, resume=args.resume, overwrite=args.overwrite) if distributed.is_main()
           else contextlib.nullcontext())
  with claim:
    run = prepare(args)
    train_state, start_step, seed = start(run)
    print(f'{run.cfg.describe()} | {run.tokens.num_tokens:,} tokens in {run.tokens.num_docs:,} documents | '
          f'{run.total_steps} steps of {run.global_bsz} x {args.ctx_len} tokens | seed {seed}'
          + (f' | {run.mesh.size} devices on {args.num_nodes} hosts' if args.num_nodes > 1 else ''))
    if distributed.is_main():
      run_dir.append_text(run.proj / 'train_log.txt',
                          f'NEW RUN {datetime.datetime.now():%Y-%m-%d-%H-%M-%S}{" (resumed)" if args.resume else ""}\n'
                          f'{vars(args)}\n')
    progress = Progress(run, start_step)
    try:
      train_state, step = run_epochs(run, train_state, start_step, seed, progress)
    finally:
      progress.close()
    if distributed.is_main():
      finish(run, train_state, step, seed, progress.losses)


if __name__ == '__main__':
  cli.run(main)
