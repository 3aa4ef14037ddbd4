"""`--wandb PROJECT`: the run's log on Weights & Biases, beside train_log.txt and loss_data.jsonl.

Logged: the arguments (as the run's config), every optimizer step (loss, lr, tokens/s), every
epoch's mean loss and held-out loss, and, when the run ends, its newest state file rwkv-N.pth as a
`model` artifact. The run's files go under proj_dir/wandb; with WANDB_MODE=offline nothing leaves
the machine until `wandb sync`. `wandb` is an optional extra (pip install "rwkv-jax[wandb]").
Only process 0 logs, the one that writes the run's files.
"""

import pathlib

import jax

from rwkv_jax.errors import UserError


def require() -> None:
  """Refuses --wandb in one line, before any work, when the package is missing."""
  try:
    import wandb  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise UserError('--wandb needs the wandb package: pip install "rwkv-jax[wandb]" (or leave --wandb out)') from None


class Logger:
  """Sends the run's numbers to W&B; every method does nothing when --wandb is not given."""

  def __init__(self, args, proj: pathlib.Path):
    self.run = None
    if args.wandb and jax.process_index() == 0:
      import wandb  # pylint: disable=g-import-not-at-top
      self.run = wandb.init(project=args.wandb, name=proj.resolve().name, dir=proj, config=vars(args))

  def log_step(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
    if self.run is not None:
      self.run.log({'loss': loss, 'lr': lr, 'tokens_per_s': tokens_per_s}, step=step)

  def log_epoch(self, step: int, epoch: int, mean_loss: float, eval_loss: float | None) -> None:
    """Epoch `epoch`'s numbers, at `step`, the optimizer step that ended it."""
    if self.run is not None:
      held_out = {} if eval_loss is None else {'eval_loss': eval_loss}
      self.run.log({'epoch': epoch, 'epoch_loss': mean_loss, **held_out}, step=step)

  def finish(self, states: list[pathlib.Path]) -> None:
    """Uploads the newest of the run's state files `states` (by epoch; none if no epoch ended)
    and closes the W&B run."""
    if self.run is None:
      return
    import wandb  # pylint: disable=g-import-not-at-top
    if states:
      artifact = wandb.Artifact('rwkv-state', type='model', metadata={'file': states[-1].name})
      artifact.add_file(str(states[-1]))
      self.run.log_artifact(artifact)
    self.run.finish()
    self.run = None
