"""State tuning of an RWKV-6 model: train each layer's initial WKV state, nothing else.

  python train_state.py --ckpt MODEL.pth --data DATA.jsonl --proj_dir out
  python train_state.py --demo                      # tiny random model + bundled data, ~1 min on CPU

RWKV-PEFT's flag names work too (--load_model, --data_file, --ctx_len, --micro_bsz,
--lr_init ...), so a demo-state-tuning.sh command line runs unchanged. Dimensions come
from the checkpoint. Outputs in --proj_dir: rwkv-{epoch}.pth (the state, as Runner mounts
it), train_log.txt, loss_data.jsonl, loss.png, and checkpoint/ for --resume.
"""
import argparse
import collections
import datetime
import json
import math
import os
import pathlib
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import IMPLEMENTATIONS
from rwkv_jax import api, checkpoint, cli, data, evaluate, quant, state_io, synthetic, train
from rwkv_jax.errors import UserError

IGNORED_FLAGS = ('strategy', 'accelerator', 'pre_ffn', 'head_qk', 'fla', 'op')
CHECKPOINT_DIR = 'checkpoint'
DEMO = dict(ctx_len=64, micro_bsz=4, epoch_steps=20, epoch_count=4, warmup_steps=10, lr_init=1.0, lr_final=0.01)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add = p.add_argument
  add('--ckpt', '--load_model', dest='ckpt', help='base model: an RWKV-6 .pth or a `convert to-flax` directory')
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
  add('--precision', choices=('bf16', 'fp16', 'fp32', 'tf32'), default='bf16', help='compute dtype of the weights')
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
  add('--my_testing', help='model version as RWKV-PEFT names it (x060); checked against the checkpoint')
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


def check_args(args, cfg) -> None:
  """Everything that can be wrong with the command line, refused before any work."""
  ignored = [f'--{f}' for f in IGNORED_FLAGS if getattr(args, f) is not None]
  if ignored:
    print(f'note: {" ".join(ignored)} do nothing here (XLA compiles for the device; the WKV kernel is built in)')
  if args.train_type != 'state':
    raise UserError(f'--train_type {args.train_type}: rwkv-jax tunes states only; use --train_type state')
  if args.my_testing and f'x0{cfg.version}' not in args.my_testing:
    raise UserError(f'--my_testing {args.my_testing} does not match the checkpoint, an x0{cfg.version}0 model')
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


def cast_params(params, precision: str):
  dtype = {'bf16': jnp.bfloat16, 'fp16': jnp.float16, 'fp32': jnp.float32, 'tf32': jnp.float32}[precision]
  return jax.tree.map(lambda p: np.asarray(p).astype(dtype), params)


TRAIN_TREE_DIR = 'tree'  # the orbax tree of the whole TrainState, inside checkpoint/


def save_train_checkpoint(proj: pathlib.Path, train_state, meta: dict) -> None:
  """Writes checkpoint/ so that a kill at any moment leaves a complete one (new or previous)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  final, tmp, old = proj / CHECKPOINT_DIR, proj / f'{CHECKPOINT_DIR}.tmp', proj / f'{CHECKPOINT_DIR}.old'
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp.absolute() / TRAIN_TREE_DIR, train_state)
  np.save(tmp / state_io.TRAIN_STATE_FILE, np.asarray(train_state.init_state.wkv))  # for export tools
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


def open_step_log(path: pathlib.Path, start_step: int):
  """(losses of steps 1..start_step, the log open for appending), dropping steps past the checkpoint.

  A run killed after its last checkpoint logged steps that the resumed run will take again.
  """
  kept = path.read_text().splitlines()[:start_step] if start_step and path.exists() else []
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(''.join(line + '\n' for line in kept))
  os.replace(tmp, path)
  return [json.loads(line)['loss'] for line in kept], open(path, 'a')


def print_next_steps(args, losses, state_path: pathlib.Path, steps_per_epoch: int) -> None:
  print(f'\ndone: loss {losses[0]:.3f} -> {np.mean(losses[-max(steps_per_epoch // 2, 1):]):.3f}; '
        f'state in {state_path}, curve in {state_path.parent / "loss.png"}\n'
        f'next:\n'
        f'  try it:        python -m rwkv_jax.generate --ckpt {args.ckpt} --state {state_path} '
        f'--prompt "User: hi\\n\\nAssistant:" --temperature 0\n'
        f'  RWKV Runner:   copy {state_path.name} into state-models/ and pick it under Configs\n'
        f'  Ai00:          python -m convert export-state {state_path} --format ai00 --ckpt {args.ckpt} '
        f'--out {state_path.stem}.state\n'
        f'  a real model:  python train_state.py --ckpt RWKV-x060-World-1B6.pth --data your.jsonl')


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


def main(argv):
  args = build_parser().parse_args(argv)
  if args.demo:
    prepare_demo(args)
  if not args.ckpt or not args.data:
    raise UserError('give --ckpt MODEL.pth and --data DATA (or --load_model / --data_file), or try --demo')
  params, cfg = checkpoint.load_params(args.ckpt)
  check_args(args, cfg)
  proj = pathlib.Path(args.proj_dir)
  proj.mkdir(parents=True, exist_ok=True)

  tokens = data.load_data(args.data, args.data_type, cfg.vocab_size)
  devices, accumulate = args.devices, args.accumulate_grad_batches
  global_bsz = args.micro_bsz * devices * accumulate
  epoch_steps = args.epoch_steps or max(tokens.num_docs // (args.micro_bsz * devices), 1)
  steps_per_epoch = max(epoch_steps // (devices * accumulate), 1)  # optimizer steps, as RWKV-PEFT counts them

  params, merged_state = checkpoint.split_time_state(params)  # continue from a merged state, as RWKV-PEFT does
  if args.precision == 'fp32':
    jax.config.update('jax_default_matmul_precision', 'highest')
  params = cast_params(params, args.precision)
  if args.quant != 'none':
    params = quant.quantize_params(params, args.quant)
  params, embedding = train.host_embedding(params)  # each batch's rows are gathered on the host
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'data'))
  params = jax.device_put(params, replicated)

  total_steps = steps_per_epoch * args.epoch_count
  lr = train.schedule(args.lr_schedule, args.lr_init, args.lr_final, args.warmup_steps, total_steps)
  opt = train.optimizer(lr, args.beta1, args.beta2, args.adam_eps)
  train_state = train.init_train_state(cfg, opt, merged_state)
  start_step = 0
  seed = args.random_seed if args.random_seed >= 0 else int(np.random.SeedSequence().entropy % 2**31)
  if args.resume:
    train_state, meta = load_train_checkpoint(proj, train_state)
    start_step, seed = int(meta['step']), int(meta['seed'])
    if meta['total_steps'] != total_steps:
      raise UserError(f'--resume: the saved run has {meta["total_steps"]} steps in all, these flags give '
                      f'{total_steps}; resume with the same --epoch_steps/--epoch_count/--micro_bsz')
  sampler = data.Sampler(tokens, args.ctx_len, global_bsz, args.dataload, epoch_steps=steps_per_epoch, seed=seed,
                         shuffle=bool(args.data_shuffle), loss_mask=args.loss_mask)
  train_state = jax.device_put(train_state, replicated)
  if args.eval_data:
    eval_sampler = evaluate.eval_sampler(data.load_data(args.eval_data, None, cfg.vocab_size), args.ctx_len,
                                         args.micro_bsz * devices, args.dataload, args.eval_batches, args.loss_mask)
    eval_model = api.Model(params, cfg, args.implementation)

  def eval_loss(state):
    batches = ((quant.take_rows(embedding, x), y) for x, y in evaluate.eval_batches(eval_sampler))
    return evaluate.mean_loss(eval_model, batches, state.init_state.wkv)[0]

  step_fn = train.make_train_step(cfg, opt, args.implementation, remat=bool(args.grad_cp))

  print(f'{cfg.describe()} | {tokens.num_tokens:,} tokens in {tokens.num_docs:,} documents | '
        f'{total_steps} steps of {global_bsz} x {args.ctx_len} tokens | seed {seed}')
  with open(proj / 'train_log.txt', 'a') as log:
    log.write(f'NEW RUN {datetime.datetime.now():%Y-%m-%d-%H-%M-%S}{" (resumed)" if args.resume else ""}\n'
              f'{vars(args)}\n')
  losses, step_log = open_step_log(proj / 'loss_data.jsonl', start_step)

  def batch(epoch, step):
    """The embedding rows and targets of a step, on the devices."""
    inputs, targets = sampler.batch(epoch, step % steps_per_epoch)
    shape = (accumulate, args.micro_bsz * devices, args.ctx_len)
    return jax.device_put((quant.take_rows(embedding, inputs.reshape(shape)), targets.reshape(shape)), batch_sharding)

  def save_state(name, state):
    state_io.write_state(proj / name, np.asarray(state.init_state.wkv))

  def meta(step):
    return {'step': step, 'seed': seed, 'total_steps': total_steps, 'args': vars(args)}

  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  step, stop_at = start_step, start_step + (args.max_steps or total_steps)

  def record(done, loss):
    """Logs step `done` (1-based) once its loss is read from the device."""
    nonlocal t_last
    loss = float(loss)
    if not math.isfinite(loss):
      # A step with a non-finite loss leaves the state unchanged, so the state now held is good.
      save_state('rwkv-last-good.pth', train_state)
      save_train_checkpoint(proj, train_state, meta(step))
      raise UserError(f'loss became {loss} at step {done}; the last good state is in '
                      f'{proj / "rwkv-last-good.pth"}. Lower --lr_init or check the data')
    now = time.perf_counter()
    step_time, t_last = now - t_last, now
    kt_s = global_bsz * args.ctx_len / step_time / 1000
    rate = float(lr(done - 1 + args.epoch_begin * steps_per_epoch))
    epoch_losses.append(loss)
    losses.append(loss)
    step_log.write(json.dumps({'step': done, 'epoch': args.epoch_begin + epoch, 'loss': loss, 'lr': rate,
                               'tokens_per_s': kt_s * 1000, 'kt_s': kt_s}) + '\n')
    step_log.flush()
    bar.set_postfix_str(f'loss {loss:.4f} lr {rate:.4g} {kt_s:.2f} Kt/s', refresh=False)
    bar.update()

  in_flight = collections.deque()  # (step number, its loss on the device) of dispatched steps not yet logged
  try:
    for epoch in range(start_step // steps_per_epoch, args.epoch_count):
      with tqdm(total=steps_per_epoch, initial=step % steps_per_epoch, desc=f'epoch {args.epoch_begin + epoch}',
                dynamic_ncols=True) as bar:
        epoch_losses, t_last = [], time.perf_counter()
        last = min((epoch + 1) * steps_per_epoch, stop_at)

        # One step stays queued on the device: while it runs, the host gathers and sends the next
        # batch, dispatches the next step and reads the previous step's loss, so the device never
        # waits for the host (the 1.6B 1024x1 step: 41.5 -> 34.3 ms on an H200).
        inputs = batch(epoch, step) if step < last else None
        while step < last:
          train_state, loss = step_fn(train_state, params, *inputs)
          step += 1
          inputs = batch(epoch, step) if step < last else None
          in_flight.append((step, loss))
          if len(in_flight) > 1:
            record(*in_flight.popleft())
        while in_flight:
          record(*in_flight.popleft())
      if step >= stop_at and step < (epoch + 1) * steps_per_epoch:
        break
      mean = float(np.mean(epoch_losses)) if epoch_losses else float('nan')
      rate = float(lr(max(step - 1, 0) + args.epoch_begin * steps_per_epoch))
      line = (f'{args.epoch_begin + epoch} {mean:.6f} {math.exp(min(mean, 700)):.4f} {rate:.8f} '
              f'{datetime.datetime.now()} {epoch}')
      if args.eval_data:
        held_out = eval_loss(train_state)
        line += f' eval_loss {held_out:.6f}'
        print(f'epoch {args.epoch_begin + epoch}: train loss {mean:.4f}, held-out loss {held_out:.4f} '
              f'(perplexity {math.exp(min(held_out, 700)):.2f})')
      with open(proj / 'train_log.txt', 'a') as log:
        log.write(line + '\n')
      if epoch % args.epoch_save == 0 or epoch == args.epoch_count - 1:
        save_state(f'rwkv-{args.epoch_begin + epoch}.pth', train_state)
      save_train_checkpoint(proj, train_state, meta(step))
  except KeyboardInterrupt:
    while in_flight:
      record(*in_flight.popleft())
    save_train_checkpoint(proj, train_state, meta(step))
    print(f'\ninterrupted at step {step}: continue with the same command and --resume')
    sys.exit(130)
  finally:
    step_log.close()

  if step < total_steps:
    save_train_checkpoint(proj, train_state, meta(step))
    print(f'stopped after step {step} of {total_steps} (--max_steps): continue with --resume')
  if losses:
    plot_loss(proj, losses)
  final = sorted(proj.glob('rwkv-[0-9]*.pth'), key=lambda p: int(p.stem.split('-')[1]))
  if step >= total_steps and final:
    print_next_steps(args, losses, final[-1], steps_per_epoch)


if __name__ == '__main__':
  cli.run(main)
