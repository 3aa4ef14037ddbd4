"""Nothing a user already has is lost: a rerun, a second run at once, a failed write, a broken file
or a meaningless flag each end in one `error:` line, with the files already there intact."""
import contextlib
import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import train_state
from convert.__main__ import main as convert_main
from rwkv_jax import checkpoint, cli, evaluate, generate, run_dir, state_io, synthetic, train
from rwkv_jax.errors import UserError
from tests.conftest import assert_one_line_error

# Three epochs of three steps; the shared run stops after step 4, inside epoch 1.
FLAGS = ['--ctx_len', 16, '--epoch_steps', 3, '--epoch_count', 3, '--warmup_steps', 0, '--random_seed', 1]
STOPPED_AT = 4


def command(main, capsys, *args) -> tuple[int, str, str]:
  """Runs a command line in this process: (exit status, stdout, stderr)."""
  try:
    cli.run(main, [str(a) for a in args])
    status = 0
  except SystemExit as e:
    status = e.code
  out = capsys.readouterr()
  return status, out.out, out.err


def snapshot(folder) -> dict[str, str]:
  """Every file under `folder` (the lock file aside: each run writes its PID there) -> its sha256."""
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file() and p.name != run_dir.LOCK_FILE}


def temporary_files(folder) -> list:
  return [p for p in folder.rglob('*') if '.tmp' in p.name or 'orbax-checkpoint-tmp' in p.name]


@contextlib.contextmanager
def file_size_limit(max_bytes: int):
  """A real failed write without root or a small disk: past RLIMIT_FSIZE a write fails with EFBIG
  (SIGXFSZ, which would kill the process instead, is ignored meanwhile)."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  """A tiny random model and a learnable dataset, shared by the module's runs."""
  folder = tmp_path_factory.mktemp('inputs')
  model = folder / 'model.pth'
  checkpoint.write_pth(model, synthetic.random_checkpoint(synthetic.TINY, seed=np.random.SeedSequence().entropy))
  rng = np.random.default_rng()
  data = folder / 'train.jsonl'
  data.write_text(''.join(json.dumps({'text': f'User: what is {a} plus {b}?\n\nAssistant: {a + b}.'}) + '\n'
                          for a, b in rng.integers(0, 50, (40, 2))))
  return ['--ckpt', model, '--data', data]


@pytest.fixture(scope='module')
def stopped_run(inputs, tmp_path_factory):
  """A run stopped by --max_steps inside epoch 1: rwkv-0.pth, checkpoint/ at step 4, the logs."""
  proj = tmp_path_factory.mktemp('stopped') / 'run'
  cli.run(train_state.main, [str(a) for a in [*inputs, *FLAGS, '--max_steps', STOPPED_AT, '--proj_dir', proj]])
  return proj


@pytest.fixture
def run_copy(stopped_run, tmp_path):
  proj = tmp_path / 'run'
  shutil.copytree(stopped_run, proj)
  return proj


# ---------------------------------------------------------------------------------------------
# A run owns its --proj_dir


def test_a_new_run_refuses_a_folder_that_holds_another_run(inputs, run_copy, capsys):
  before = snapshot(run_copy)
  status, _, err = command(train_state.main, capsys, *inputs, *FLAGS, '--proj_dir', run_copy)
  assert_one_line_error(status, err, f'{run_copy} holds another run', 'rwkv-0.pth', 'checkpoint/', '--resume',
                        '--overwrite')
  status, _, err = command(train_state.main, capsys, *inputs, *FLAGS, '--proj_dir', run_copy, '--resume',
                           '--overwrite')
  assert_one_line_error(status, err, 'give one of them')
  assert snapshot(run_copy) == before


def test_overwrite_moves_the_previous_run_aside_whole(inputs, run_copy, capsys):
  before = snapshot(run_copy)
  status, out, err = command(train_state.main, capsys, *inputs, '--ctx_len', 16, '--epoch_steps', 1,
                             '--epoch_count', 1, '--proj_dir', run_copy, '--overwrite')
  assert status == 0, err
  [previous] = run_copy.glob('previous-run-*')
  assert f'moved into {previous}' in out
  assert snapshot(previous) == before  # the old run, byte for byte: --resume can continue it there
  assert json.loads((previous / 'checkpoint' / 'meta.json').read_text())['step'] == STOPPED_AT
  assert sorted(p.name for p in run_copy.glob('rwkv-*.pth')) == ['rwkv-0.pth']
  assert len((run_copy / 'loss_data.jsonl').read_text().splitlines()) == 1
  assert f'state in {run_copy / "rwkv-0.pth"}' in out
  assert json.loads((run_copy / 'checkpoint' / 'meta.json').read_text())['total_steps'] == 1


HOLD_THE_LOCK = '''
import sys
from rwkv_jax import run_dir
with run_dir.claim(sys.argv[1], resume=False, overwrite=False):
  print('held', flush=True)
  sys.stdin.read()
'''


def test_a_second_run_into_a_held_folder_refuses_naming_the_first(inputs, tmp_path, capsys):
  proj = tmp_path / 'busy'
  holder = subprocess.Popen([sys.executable, '-c', HOLD_THE_LOCK, str(proj)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == 'held\n'
    status, _, err = command(train_state.main, capsys, *inputs, *FLAGS, '--proj_dir', proj)
    assert_one_line_error(status, err, f'another run (PID {holder.pid}) is writing to {proj}')
  finally:
    holder.kill()  # SIGKILL: the kernel drops the lock with the process
    holder.wait()
  with run_dir.claim(proj, resume=False, overwrite=False):  # no stale lock is left behind
    pass


def test_temporary_names_are_the_process_own_and_dead_ones_are_cleared(tmp_path):
  assert run_dir.temp_path(tmp_path / 'rwkv-0.pth').name == f'rwkv-0.pth.{os.getpid()}.tmp'
  dead = tmp_path / 'rwkv-0.pth.4194305.tmp'  # above Linux's largest PID: no such process
  live = run_dir.temp_path(tmp_path / 'checkpoint')
  dead.write_bytes(b'half a file')
  live.mkdir()
  with run_dir.claim(tmp_path, resume=False, overwrite=False):
    assert not dead.exists() and live.exists()


def test_only_a_run_that_learned_something_holds_its_folder(tmp_path):
  """A run that failed before its first step leaves a train_log.txt header and an empty step log:
  the next run may take the folder without --overwrite."""
  (tmp_path / 'train_log.txt').write_text('NEW RUN\n')
  (tmp_path / run_dir.STEP_LOG).write_text('')
  assert run_dir.previous_outputs(tmp_path) == []
  (tmp_path / run_dir.STEP_LOG).write_text('{"step": 1, "loss": 9.5}\n')
  assert {p.name for p in run_dir.previous_outputs(tmp_path)} == {'train_log.txt', run_dir.STEP_LOG}


# ---------------------------------------------------------------------------------------------
# Failed writes


WRITERS = {
    'runner state': lambda path, state: state_io.write_state(path, state),
    'ai00 state': lambda path, state: state_io.write_ai00_state(path, state),
    'model': lambda path, state: checkpoint.write_pth(path, {'emb.weight': np.tile(state.reshape(-1), 2)}),
}


@pytest.mark.parametrize('writer', WRITERS)
def test_a_write_past_the_file_size_limit_leaves_the_old_file(tmp_path, writer):
  path = tmp_path / 'out' / 'file'
  old_state = np.random.default_rng().normal(size=synthetic.TINY.state_shape).astype(np.float32)
  WRITERS[writer](path, old_state)
  before = path.read_bytes()
  with file_size_limit(4096), pytest.raises(UserError) as error:
    WRITERS[writer](path, old_state + 1)
  assert str(error.value) == f'cannot write {path}: file too large; the files already there are unchanged'
  assert path.read_bytes() == before
  assert temporary_files(tmp_path) == []


@pytest.mark.parametrize('code, cause', [(errno.ENOSPC, 'no space left on the device'),
                                         (errno.EROFS, 'the file system is read-only'),
                                         (errno.EACCES, 'permission denied')])
def test_a_full_disk_or_read_only_folder_is_named_in_one_line(tmp_path, monkeypatch, code, cause):
  """Root ignores permissions and a full disk needs a mount: the OS's answer is given by patching."""
  path = tmp_path / 'rwkv-0.pth'
  state_io.write_state(path, np.zeros(synthetic.TINY.state_shape, np.float32))
  before = path.read_bytes()

  def refuse(*args):
    raise OSError(code, os.strerror(code))

  monkeypatch.setattr(os, 'replace', refuse)
  with pytest.raises(UserError) as error:
    state_io.write_state(path, np.ones(synthetic.TINY.state_shape, np.float32))
  assert str(error.value) == f'cannot write {path}: {cause}; the files already there are unchanged'
  assert path.read_bytes() == before and temporary_files(tmp_path) == []


def test_a_proj_dir_that_is_a_file_or_read_only_is_refused(inputs, tmp_path, capsys, monkeypatch):
  not_a_folder = tmp_path / 'out'
  not_a_folder.write_text('a file')
  status, _, err = command(train_state.main, capsys, *inputs, *FLAGS, '--proj_dir', not_a_folder)
  assert_one_line_error(status, err, f'--proj_dir {not_a_folder} is a file, not a folder')

  def read_only(path, *args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

  monkeypatch.setattr(run_dir, 'open', read_only, raising=False)  # the lock file is the run's first write
  status, _, err = command(train_state.main, capsys, *inputs, *FLAGS, '--proj_dir', tmp_path / 'ro')
  lock = tmp_path / 'ro' / run_dir.LOCK_FILE
  assert_one_line_error(status, err, f'cannot write {lock}: the file system is read-only')


def test_a_failed_checkpoint_write_mid_run_keeps_the_previous_checkpoint(inputs, run_copy, capsys):
  """At 48 KB a state file (34 KB) is written, the checkpoint's orbax data file (180 KB) is not."""
  before = snapshot(run_copy / 'checkpoint')
  with file_size_limit(48 << 10):
    status, _, err = command(train_state.main, capsys, *inputs, *FLAGS, '--proj_dir', run_copy, '--resume')
  assert_one_line_error(status, err, f'cannot write {run_copy / "checkpoint"}: file too large')
  assert snapshot(run_copy / 'checkpoint') == before
  assert temporary_files(run_copy) == []


# ---------------------------------------------------------------------------------------------
# Broken files


def test_empty_truncated_and_damaged_files_are_refused_in_one_line(write_checkpoint, inputs, tmp_path, capsys):
  model = write_checkpoint()
  empty = tmp_path / 'empty.pth'
  empty.write_bytes(b'')
  truncated = tmp_path / 'truncated.pth'
  truncated.write_bytes(model.read_bytes()[:model.stat().st_size // 2])
  ai00 = tmp_path / 'cut.state'
  state_io.write_ai00_state(ai00, np.zeros(synthetic.TINY.state_shape, np.float32))
  ai00.write_bytes(ai00.read_bytes()[:-100])
  trainer_dir = tmp_path / 'checkpoint'
  trainer_dir.mkdir()
  (trainer_dir / state_io.TRAIN_STATE_FILE).write_bytes(b'\x93NUMPY\x01\x00')
  cases = [(empty, 'is empty (0 bytes)'), (truncated, 'is not a readable PyTorch checkpoint (truncated or damaged)'),
           (ai00, 'is truncated or damaged'), (trainer_dir, 'is truncated or damaged')]
  for path, message in cases:
    status, _, err = command(convert_main, capsys, 'inspect', path)
    assert_one_line_error(status, err, str(path), message)
  status, _, err = command(train_state.main, capsys, *FLAGS, '--ckpt', empty, '--data', inputs[3],
                           '--proj_dir', tmp_path / 'o')
  assert_one_line_error(status, err, f'{empty} is empty (0 bytes)')


@pytest.mark.parametrize('damage', ['meta.json cut short', 'orbax tree missing'])
def test_a_damaged_checkpoint_on_resume_names_the_last_state(inputs, run_copy, capsys, damage):
  meta = run_copy / 'checkpoint' / 'meta.json'
  if damage == 'meta.json cut short':
    meta.write_bytes(meta.read_bytes()[:40])
  else:
    shutil.rmtree(run_copy / 'checkpoint' / train_state.TRAIN_TREE_DIR)
  status, _, err = command(train_state.main, capsys, *inputs, *FLAGS, '--proj_dir', run_copy, '--resume')
  assert_one_line_error(status, err, f'{run_copy / "checkpoint"} is damaged',
                        f'last state is {run_copy / "rwkv-0.pth"}', '--epoch_begin 1')


# ---------------------------------------------------------------------------------------------
# Flags


TRAIN_FLAG_CASES = [
    (['--lr_init', -1], '--lr_init -1.0: must be a positive number'),
    (['--lr_init', 'nan'], '--lr_init nan: must be a positive number'),
    (['--epoch_steps', -2], '--epoch_steps -2: must be at least 1'),
    (['--max_steps', -1], '--max_steps -1: must be at least 1'),
    (['--warmup_steps', -1], '--warmup_steps -1: must be at least 0'),
    (['--epoch_begin', -3], '--epoch_begin -3: must be at least 0'),
    (['--beta2', 1], '--beta2 1.0: must be at least 0 and below 1'),
    (['--adam_eps', 0], '--adam_eps 0.0: must be a positive number'),
    (['--random_seed', -2], '--random_seed -2: must be at least -1'),
    (['--epoch_steps', 1, '--accumulate_grad_batches', 2], 'less than one optimizer step'),
    (['--epoch_step', 3], 'unrecognized arguments: --epoch_step 3'),
    (['--demo', '--ctx_len', 0], '--ctx_len 0: must be at least 1'),  # the flag given with --demo is kept
]


def test_meaningless_flags_are_refused_before_anything_is_read(tmp_path, capsys):
  """The model and data named do not exist: the flag is refused before they are looked for."""
  proj = tmp_path / 'never_made'
  for extra, message in TRAIN_FLAG_CASES:
    if '--demo' in extra:
      status, _, err = command(train_state.main, capsys, *extra, '--proj_dir', tmp_path / 'demo')
    else:
      status, _, err = command(train_state.main, capsys, '--ckpt', tmp_path / 'missing.pth', '--data',
                               tmp_path / 'missing.jsonl', *extra, '--proj_dir', proj)
    assert_one_line_error(status, err, message)
  assert not proj.exists()
  assert not list((tmp_path / 'demo').glob('rwkv-*.pth'))
  held_out = ['--ckpt', 'm.pth', '--data', 'd.jsonl']
  other_commands = [
      (evaluate.main, [*held_out, '--batch_size', 0], '--batch_size 0: must be at least 1'),
      (evaluate.main, [*held_out, '--max_batches', 0], '--max_batches 0: must be at least 1'),
      (evaluate.main, [*held_out, '--batch', 4], 'unrecognized arguments: --batch'),
      (generate.main, ['--ckpt', 'm.pth', '--prompt', 'hi', '--seed', -1], '--seed -1: must be 0 or more'),
      (generate.main, ['--ckpt', 'm.pth', '--prompt', 'hi', '--top_p', 0], '--top_p 0.0: must be above 0'),
      (convert_main, ['export-state', 's.pth', '--out', 'o.pth', '--form', 'ai00'], 'unrecognized arguments: --form'),
  ]
  for main, args, message in other_commands:
    status, _, err = command(main, capsys, *args)
    assert_one_line_error(status, err, message)


def test_demo_keeps_the_flags_given_with_it_and_refuses_its_own_inputs(tmp_path, capsys):
  proj = tmp_path / 'demo'
  argv = ['--demo', '--epoch_count', '1', '--proj_dir', str(proj)]
  args = train_state.build_parser().parse_args(argv)
  train_state.prepare_demo(args, argv)
  assert args.epoch_count == 1 and args.ctx_len == train_state.DEMO['ctx_len']
  assert checkpoint.read_pth(args.ckpt)['emb.weight'].shape == (synthetic.TINY.vocab_size, synthetic.TINY.n_embd)
  status, _, err = command(train_state.main, capsys, '--demo', '--ckpt', args.ckpt, '--proj_dir', proj)
  assert_one_line_error(status, err, '--demo brings its own model and data')


# ---------------------------------------------------------------------------------------------
# Logs, modes, pipes


class InterruptOnce:
  """A step's loss whose first read is a Ctrl-C, as when it lands while the host waits for it."""

  def __init__(self, loss):
    self.loss, self.interrupted = loss, False

  def __float__(self):
    if not self.interrupted:
      self.interrupted = True
      raise KeyboardInterrupt
    return float(self.loss)


def interrupting_train_step(step_number: int):
  """train.make_train_step for a run resumed at STOPPED_AT whose first read of optimizer step
  `step_number`'s loss is a Ctrl-C."""
  make_train_step = train.make_train_step

  def make(*args, **kwargs):
    step_fn, calls = make_train_step(*args, **kwargs), []

    def step(*step_args):
      state, loss = step_fn(*step_args)
      calls.append(1)
      return state, InterruptOnce(loss) if STOPPED_AT + len(calls) == step_number else loss
    return step
  return make


def test_an_interrupted_step_is_logged_and_epoch_means_cover_every_session(inputs, run_copy, capsys, monkeypatch):
  """Resumed at step 4: steps 5 and 6 end epoch 1 (its mean must include step 4, logged before the
  stop); a Ctrl-C while reading step 7's loss, with step 8 already dispatched, logs both."""
  monkeypatch.setattr(train, 'make_train_step', interrupting_train_step(7))
  status, out, err = command(train_state.main, capsys, *inputs, *FLAGS, '--proj_dir', run_copy, '--resume')
  assert status == 130, err
  assert 'compiling the training step...' in out and 'interrupted at step 8' in out
  logged = [json.loads(line) for line in (run_copy / 'loss_data.jsonl').read_text().splitlines()]
  assert [line['step'] for line in logged] == list(range(1, 9))
  assert json.loads((run_copy / 'checkpoint' / 'meta.json').read_text())['step'] == 8
  epoch_1 = [line for line in (run_copy / 'train_log.txt').read_text().splitlines() if line.startswith('1 ')]
  expected = np.mean([line['loss'] for line in logged if 4 <= line['step'] <= 6])
  assert len(epoch_1) == 1 and abs(float(epoch_1[0].split()[1]) - expected) < 1e-6, (epoch_1, expected)


def test_a_ctrl_c_after_an_epochs_last_step_still_writes_that_epochs_files(inputs, run_copy, capsys, monkeypatch):
  """Resumed at step 4, a Ctrl-C while reading step 6's loss (the last step of epoch 1, when no
  step is queued behind it): epoch 1's rwkv-1.pth and log line are written before the exit, and
  the resumed run goes on with epoch 2 and writes epoch 1's line only once."""
  with monkeypatch.context() as patch:
    patch.setattr(train, 'make_train_step', interrupting_train_step(6))
    status, out, err = command(train_state.main, capsys, *inputs, *FLAGS, '--proj_dir', run_copy, '--resume')
  assert status == 130 and 'interrupted at step 6' in out, err
  assert (run_copy / 'rwkv-1.pth').exists()
  assert json.loads((run_copy / 'checkpoint' / 'meta.json').read_text())['step'] == 6
  status, out, err = command(train_state.main, capsys, *inputs, *FLAGS, '--proj_dir', run_copy, '--resume')
  assert status == 0, err
  assert [p.name for p in train_state.saved_states(run_copy)] == ['rwkv-0.pth', 'rwkv-1.pth', 'rwkv-2.pth']
  epochs = [line.split()[0] for line in (run_copy / 'train_log.txt').read_text().splitlines() if line[0].isdigit()]
  assert epochs == ['0', '1', '2'], epochs


@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o077, 0o600)])
def test_files_are_written_with_the_mode_the_umask_gives(tmp_path, umask, mode):
  state = np.zeros(synthetic.TINY.state_shape, np.float32)
  old_umask = os.umask(umask)
  try:
    state_io.write_state(tmp_path / 'rwkv-0.pth', state)
    state_io.write_ai00_state(tmp_path / 'rwkv-0.state', state)
  finally:
    os.umask(old_umask)
  for name in ('rwkv-0.pth', 'rwkv-0.state'):
    assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_a_closed_pipe_ends_a_command_quietly(tmp_path):
  """`python -m convert inspect FILE | head -0`: the reader is gone before the first line."""
  path = tmp_path / 'rwkv-0.pth'
  state_io.write_state(path, np.zeros(synthetic.TINY.state_shape, np.float32))
  inspect = subprocess.Popen([sys.executable, '-m', 'convert', 'inspect', str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  inspect.stdout.close()
  err = inspect.stderr.read()
  assert inspect.wait() == 141 and err == '', err
