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
import dataclasses
import datetime
import json
import math
import os
import pathlib
import shutil
import sys
import time

import jax
import ml_dtypes
import numpy as np
import optax
from flax import nnx

from pallas_kernels import IMPLEMENTATIONS
from rwkv_jax import api, checkpoint, cli, data, evaluate, quant, state_io, synthetic, train
from rwkv_jax.config import RWKVConfig
from rwkv_jax.errors import UserError
from rwkv_jax.models import generation

IGNORED_FLAGS = ('strategy', 'accelerator', 'pre_ffn', 'head_qk', 'fla', 'op')
CHECKPOINT_DIR = 'checkpoint'
TRAIN_TREE_DIR = 'tree'  # the orbax tree of the whole TrainState, inside checkpoint/
DEMO = dict(ctx_len=64, micro_bsz=4, epoch_steps=20, epoch_count=4, warmup_steps=10, lr_init=1.0, lr_final=0.01)
DTYPES = {'bf16': ml_dtypes.bfloat16, 'fp16': np.float16, 'fp32': np.float32, 'tf32': np.float32}


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add = p.add_argument
  add('--ckpt', '--load_model', dest='ckpt', help='base model: an RWKV .pth or a `convert to-flax` directory')
  add('--data', '--data_file', dest='data', help='training data: a .jsonl, a binidx prefix, or a UTF-8 text file')
  add('--data_type', choices=data.DATA_TYPES, help='binidx | jsonl | utf-8 (default: from the path)')
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
  add('--grad_cp', type=int, choices=(0, 1), default=1, help='1: recompute each layer in the backward pass')
  add('--dataload', choices=data.DATALOADS, default='pad', help='pad: one document per sample; get: random windows')
  add('--loss_mask', choices=data.LOSS_MASKS, default='none', help='qa: loss only on the assistant answers')
  add('--accumulate_grad_batches', type=int, default=1, help='micro-steps per optimizer step')
  add('--random_seed', type=int, default=-1, help='seed for sampling (-1: pick one and record it)')
  add('--data_shuffle', type=int, choices=(0, 1), default=1, help='shuffle documents every epoch')
  add('--devices', type=int, default=1, help='GPUs to spread the batch over (data parallel)')
  add('--quant', choices=('none', 'int8', 'nf4'), default='none',
      help='quantize the frozen projection matrices (the embedding and head go int8 either way)')
  add('--train_type', default='state', help='only "state": this tool tunes states')
  add('--my_testing', help='model version as RWKV-PEFT names it (x060, x070); checked against the checkpoint')
  add('--vocab_size', type=int, help='checked against the checkpoint')
  add('--n_layer', type=int, help='checked against the checkpoint')
  add('--n_embd', type=int, help='checked against the checkpoint')
  add('--head_size_a', type=int, help='checked against the checkpoint')
  add('--eval_data', help='held-out data: its loss is measured and logged after every epoch')
  add('--eval_batches', type=int, default=20, help='batches of --eval_data to evaluate (default 20)')
  add('--implementation', choices=IMPLEMENTATIONS, help='WKV kernel (default: the fastest for this platform)')
  add('--resume', action='store_true', help='continue the run saved in proj_dir/checkpoint')
  add('--max_steps', type=int, help='stop (resumably) after this many optimizer steps in this session')
  for flag in IGNORED_FLAGS:
    add(f'--{flag}', nargs='?', const='1', help=argparse.SUPPRESS)
  return p


def check_args(args, cfg: RWKVConfig) -> None:
  """Everything that can be wrong with the command line, refused before any work."""
  ignored = [f'--{f}' for f in IGNORED_FLAGS if getattr(args, f) is not None]
  if ignored:
    print(f'note: {" ".join(ignored)} do nothing here (XLA compiles for the device; the WKV kernel is built in)')
  if args.train_type != 'state':
    raise UserError(f'--train_type {args.train_type}: rwkv-jax tunes states only; use --train_type state')
  if args.my_testing and f'x0{cfg.version}' not in args.my_testing:
    raise UserError(f'--my_testing {args.my_testing} does not match the checkpoint, an '
                    f'{generation(cfg.version).NAME} model')
  for flag, value in (('vocab_size', cfg.vocab_size), ('n_layer', cfg.n_layer), ('n_embd', cfg.n_embd),
                      ('head_size_a', cfg.head_size)):
    given = getattr(args, flag)
    if given is not None and given != value:
      raise UserError(f'--{flag} {given} does not match the checkpoint ({value}); the flag can be left out')
  if args.devices > jax.device_count():
    raise UserError(f'--devices {args.devices}, but only {jax.device_count()} {jax.default_backend()} device(s) found')
  for flag in ('ctx_len', 'micro_bsz', 'epoch_count', 'epoch_save', 'accumulate_grad_batches', 'devices'):
    if getattr(args, flag) < 1:
      raise UserError(f'--{flag} must be at least 1')


def prepare_demo(args) -> None:
  """A tiny RWKV-6 in the official layout (fixed seed, so every run is the same) and the bundled data."""
  proj = pathlib.Path(args.proj_dir)
  proj.mkdir(parents=True, exist_ok=True)
  model_path = proj / 'demo-model.pth'
  if not model_path.exists():
    checkpoint.write_pth(model_path, synthetic.random_checkpoint(synthetic.TINY, seed=0))
  data_path = proj / 'demo.jsonl'
  shutil.copyfile(pathlib.Path(data.__file__).parent / 'demo_data' / 'demo.jsonl', data_path)
  args.ckpt, args.data = str(model_path), str(data_path)
  for key, value in DEMO.items():
    setattr(args, key, value)


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
  weights: nnx.State  # on the devices, replicated
  embedding: object  # numpy, in host memory
  tokens: data.TokenData
  lr: object  # step -> learning rate
  opt: optax.GradientTransformation
  steps_per_epoch: int  # optimizer steps, as RWKV-PEFT counts them
  global_bsz: int
  mesh: jax.sharding.Mesh

  @property
  def total_steps(self) -> int:
    return self.steps_per_epoch * self.args.epoch_count

  def sharding(self, *spec) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))

  def lr_at(self, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based), --epoch_begin's offset included."""
    return float(self.lr(step + self.args.epoch_begin * self.steps_per_epoch))


def prepare(args) -> Run:
  model = checkpoint.load_model(args.ckpt, args.implementation)
  check_args(args, model.cfg)
  proj = pathlib.Path(args.proj_dir)
  proj.mkdir(parents=True, exist_ok=True)
  tokens = data.load_data(args.data, args.data_type, model.cfg.vocab_size)

  if args.precision == 'fp32':
    jax.config.update('jax_default_matmul_precision', 'highest')
  api.cast(model, DTYPES[args.precision])
  quant.quantize_model(model, args.quant)
  embedding = train.host_embedding(model)  # each batch's rows are gathered on the host
  graphdef, states, weights = train.split(model)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:args.devices]), ('data',))

  epoch_steps = args.epoch_steps or max(tokens.num_docs // (args.micro_bsz * args.devices), 1)
  steps_per_epoch = max(epoch_steps // (args.devices * args.accumulate_grad_batches), 1)
  lr = train.schedule(args.lr_schedule, args.lr_init, args.lr_final, args.warmup_steps,
                      steps_per_epoch * args.epoch_count)
  run = Run(args=args, proj=proj, cfg=model.cfg, graphdef=graphdef, states=states, weights=weights,
            embedding=embedding, tokens=tokens, lr=lr, opt=train.optimizer(lr, args.beta1, args.beta2, args.adam_eps),
            steps_per_epoch=steps_per_epoch, global_bsz=args.micro_bsz * args.devices * args.accumulate_grad_batches,
            mesh=mesh)
  run.weights = jax.device_put(weights, run.sharding())
  return run


# ---------------------------------------------------------------------------------------------
# start: a fresh or a resumed train state


def start(run: Run) -> tuple[train.TrainState, int, int]:
  """(train state on the devices, first optimizer step, sampling seed)."""
  args = run.args
  train_state = train.init_train_state(run.states, run.opt)  # continues a merged state, as RWKV-PEFT does
  start_step = 0
  seed = args.random_seed if args.random_seed >= 0 else int(np.random.SeedSequence().entropy % 2**31)
  if args.resume:
    train_state, meta = load_train_checkpoint(run.proj, train_state)
    start_step, seed = int(meta['step']), int(meta['seed'])
    if meta['total_steps'] != run.total_steps:
      raise UserError(f'--resume: the saved run has {meta["total_steps"]} steps in all, these flags give '
                      f'{run.total_steps}; resume with the same --epoch_steps/--epoch_count/--micro_bsz')
  return jax.device_put(train_state, run.sharding()), start_step, seed


def save_train_checkpoint(run: Run, train_state, step: int, seed: int) -> None:
  """Writes checkpoint/ so that a kill at any moment leaves a complete one (new or previous)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  proj = run.proj
  final, tmp, old = proj / CHECKPOINT_DIR, proj / f'{CHECKPOINT_DIR}.tmp', proj / f'{CHECKPOINT_DIR}.old'
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp.absolute() / TRAIN_TREE_DIR, train_state)
  np.save(tmp / state_io.TRAIN_STATE_FILE, train.wkv_array(train_state.states))  # for export tools
  meta = {'step': step, 'seed': seed, 'total_steps': run.total_steps, 'args': vars(run.args)}
  (tmp / 'meta.json').write_text(json.dumps(meta, indent=2))
  if final.exists():
    shutil.rmtree(old, ignore_errors=True)
    final.rename(old)
  tmp.rename(final)
  shutil.rmtree(old, ignore_errors=True)


def load_train_checkpoint(proj: pathlib.Path, train_state):
  """Restores onto one device whatever device layout the run was saved from."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = next((d for d in (proj / CHECKPOINT_DIR, proj / f'{CHECKPOINT_DIR}.old') if d.is_dir()), None)
  if directory is None:
    raise UserError(f'--resume: no {CHECKPOINT_DIR}/ in {proj}; start without --resume')
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), train_state)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(directory.absolute() / TRAIN_TREE_DIR, abstract)
  return restored, json.loads((directory / 'meta.json').read_text())


# ---------------------------------------------------------------------------------------------
# run_epochs: the loop, and what it logs


class Progress:
  """The per-step log (loss_data.jsonl), the losses so far, and the progress bar of an epoch."""

  def __init__(self, run: Run, start_step: int):
    self.run = run
    path = run.proj / 'loss_data.jsonl'
    # A run killed after its last checkpoint logged steps that the resumed run will take again.
    kept = path.read_text().splitlines()[:start_step] if start_step and path.exists() else []
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(''.join(line + '\n' for line in kept))
    os.replace(tmp, path)
    self.losses = [json.loads(line)['loss'] for line in kept]
    self.file = open(path, 'a')
    self.epoch_losses, self.bar, self.epoch, self.t_last = [], None, 0, time.perf_counter()

  def start_epoch(self, epoch: int, done_in_epoch: int):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    self.epoch, self.epoch_losses, self.t_last = epoch, [], time.perf_counter()
    self.bar = tqdm(total=self.run.steps_per_epoch, initial=done_in_epoch,
                    desc=f'epoch {self.run.args.epoch_begin + epoch}', dynamic_ncols=True)

  def record(self, done: int, loss: float) -> None:
    """Logs optimizer step `done` (1-based) once its loss has been read from the device."""
    run = self.run
    now = time.perf_counter()
    step_time, self.t_last = now - self.t_last, now
    kt_s = run.global_bsz * run.args.ctx_len / step_time / 1000
    rate = run.lr_at(done - 1)
    self.epoch_losses.append(loss)
    self.losses.append(loss)
    self.file.write(json.dumps({'step': done, 'epoch': run.args.epoch_begin + self.epoch, 'loss': loss, 'lr': rate,
                                'tokens_per_s': kt_s * 1000, 'kt_s': kt_s}) + '\n')
    self.file.flush()
    self.bar.set_postfix_str(f'loss {loss:.4f} lr {rate:.4g} {kt_s:.2f} Kt/s', refresh=False)
    self.bar.update()

  def end_epoch(self):
    self.bar.close()

  def close(self):
    if self.bar is not None:
      self.bar.close()
    self.file.close()


def make_batches(run: Run, seed: int):
  """batch(epoch, step): the embedding rows and targets of an optimizer step, on the devices."""
  args = run.args
  sampler = data.Sampler(run.tokens, args.ctx_len, run.global_bsz, args.dataload, epoch_steps=run.steps_per_epoch,
                         seed=seed, shuffle=bool(args.data_shuffle), loss_mask=args.loss_mask)
  shape = (args.accumulate_grad_batches, args.micro_bsz * args.devices, args.ctx_len)

  def batch(epoch: int, step: int):
    inputs, targets = sampler.batch(epoch, step % run.steps_per_epoch)
    rows = quant.take_rows(run.embedding, inputs.reshape(shape))
    return jax.device_put((rows, targets.reshape(shape)), run.sharding(None, 'data'))

  return batch


def make_eval(run: Run):
  """eval_loss(train_state): the held-out loss of --eval_data from the current states, or None."""
  args = run.args
  if not args.eval_data:
    return None
  eval_data = data.load_data(args.eval_data, None, run.cfg.vocab_size)
  sampler = evaluate.eval_sampler(eval_data, args.ctx_len, args.micro_bsz * args.devices, args.dataload,
                                  args.eval_batches, args.loss_mask)

  def eval_loss(train_state) -> float:
    model = nnx.merge(run.graphdef, train_state.states, run.weights)
    batches = ((quant.take_rows(run.embedding, x), y) for x, y in evaluate.eval_batches(sampler))
    return evaluate.mean_loss(model, batches)[0]

  return eval_loss


def stop_on_nan(run: Run, train_state, step: int, seed: int, done: int, loss: float):
  """A non-finite loss: keep the last good state (a step with a non-finite loss leaves the train
  state unchanged, so the one held is good) and stop with one line."""
  state_io.write_state(run.proj / 'rwkv-last-good.pth', train.wkv_array(train_state.states))
  save_train_checkpoint(run, train_state, step, seed)
  raise UserError(f'loss became {loss} at step {done}; the last good state is in '
                  f'{run.proj / "rwkv-last-good.pth"}. Lower --lr_init or check the data')


def run_epochs(run: Run, train_state, start_step: int, seed: int, progress: Progress):
  """Trains from optimizer step `start_step` to the end or --max_steps. Returns (train_state, step)."""
  args = run.args
  step_fn = train.make_train_step(run.graphdef, run.opt, remat=bool(args.grad_cp))
  batch, eval_loss = make_batches(run, seed), make_eval(run)
  step, stop_at = start_step, start_step + (args.max_steps or run.total_steps)
  in_flight = collections.deque()  # (step number, its loss on the device) of dispatched steps not yet logged

  def log_in_flight(keep: int):
    while len(in_flight) > keep:
      done, loss = in_flight.popleft()
      loss = float(loss)
      if not math.isfinite(loss):
        stop_on_nan(run, train_state, step, seed, done, loss)
      progress.record(done, loss)

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
        train_state, loss = step_fn(train_state, run.weights, *inputs)
        step += 1
        inputs = batch(epoch, step) if step < last else None
        in_flight.append((step, loss))
        log_in_flight(keep=1)
      log_in_flight(keep=0)
      progress.end_epoch()
      if step >= stop_at and step < (epoch + 1) * run.steps_per_epoch:
        break
      end_epoch(run, epoch, step, train_state, seed, progress, eval_loss)
  except KeyboardInterrupt:
    log_in_flight(keep=0)
    save_train_checkpoint(run, train_state, step, seed)
    print(f'\ninterrupted at step {step}: continue with the same command and --resume')
    sys.exit(130)
  return train_state, step


def end_epoch(run: Run, epoch: int, step: int, train_state, seed: int, progress: Progress, eval_loss) -> None:
  """The epoch's line in train_log.txt, its rwkv-{epoch}.pth (every --epoch_save), checkpoint/."""
  args = run.args
  mean = float(np.mean(progress.epoch_losses)) if progress.epoch_losses else float('nan')
  line = (f'{args.epoch_begin + epoch} {mean:.6f} {math.exp(min(mean, 700)):.4f} {run.lr_at(max(step - 1, 0)):.8f} '
          f'{datetime.datetime.now()} {epoch}')
  if eval_loss is not None:
    held_out = eval_loss(train_state)
    line += f' eval_loss {held_out:.6f}'
    print(f'epoch {args.epoch_begin + epoch}: train loss {mean:.4f}, held-out loss {held_out:.4f} '
          f'(perplexity {math.exp(min(held_out, 700)):.2f})')
  with open(run.proj / 'train_log.txt', 'a') as log:
    log.write(line + '\n')
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
  fig.savefig(proj / 'loss.png.tmp', format='png', dpi=120)
  plt.close(fig)
  os.replace(proj / 'loss.png.tmp', proj / 'loss.png')


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
  final = sorted(run.proj.glob('rwkv-[0-9]*.pth'), key=lambda p: int(p.stem.split('-')[1]))
  if step >= run.total_steps and final:
    print_next_steps(run.args, losses, final[-1], run.steps_per_epoch)


def main(argv):
  args = build_parser().parse_args(argv)
  if args.demo:
    prepare_demo(args)
  if not args.ckpt or not args.data:
    raise UserError('give --ckpt MODEL.pth and --data DATA (or --load_model / --data_file), or try --demo')
  run = prepare(args)
  train_state, start_step, seed = start(run)
  print(f'{run.cfg.describe()} | {run.tokens.num_tokens:,} tokens in {run.tokens.num_docs:,} documents | '
        f'{run.total_steps} steps of {run.global_bsz} x {args.ctx_len} tokens | seed {seed}')
  with open(run.proj / 'train_log.txt', 'a') as log:
    log.write(f'NEW RUN {datetime.datetime.now():%Y-%m-%d-%H-%M-%S}{" (resumed)" if args.resume else ""}\n'
              f'{vars(args)}\n')
  progress = Progress(run, start_step)
  try:
    train_state, step = run_epochs(run, train_state, start_step, seed, progress)
  finally:
    progress.close()
  finish(run, train_state, step, seed, progress.losses)


if __name__ == '__main__':
  cli.run(main)
