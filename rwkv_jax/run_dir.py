"""A training run's hold on its --proj_dir, and writes that never leave half a file.

A run owns its folder for its whole life (`claim`): it holds an flock on `.lock` there, with its
PID inside for the refusal a second run prints; the kernel drops the lock when the process ends,
however it ends, so a crash leaves no stale lock. A new run (no --resume) refuses a folder that
holds what another run learned (a state, a checkpoint, logged steps) unless it is given
--overwrite, which moves those outputs into `previous-run-<time>/`, a folder --resume can continue.

Every file is written under a temporary name unique to the process (`replacing`) and renamed into
place: a kill leaves the previous file, and a failed write removes its temporary file and ends in
one line naming the path and the cause (`write_error`).
"""
import contextlib
import datetime
import errno
import fcntl
import logging
import os
import pathlib
import re
import shutil
import signal
import threading

from rwkv_jax.errors import UserError

LOCK_FILE = '.lock'
# What train_state.py writes in --proj_dir. A run that failed before its first step leaves only
# an empty step log and a train_log.txt header: nothing learned, so a new run may take the folder.
STATES = 'rwkv-*.pth'  # rwkv-{epoch}.pth and rwkv-last-good.pth
CHECKPOINTS = ('checkpoint', 'checkpoint.old')
STEP_LOG = 'loss_data.jsonl'
LOGS = ('train_log.txt', STEP_LOG, 'loss.png')
PREVIOUS_RUN = 'previous-run-{:%Y%m%d-%H%M%S}'

_TEMP_NAME = re.compile(r'.+\.(\d+)\.tmp')  # what temp_path makes: NAME.PID.tmp
_ORBAX_OS_ERROR = re.compile(r"os_error_code='?(\d+)")  # how tensorstore names the errno in its message
CAUSES = {
    errno.ENOSPC: 'no space left on the device',
    errno.EDQUOT: 'the disk quota is used up',
    errno.EROFS: 'the file system is read-only',
    errno.EACCES: 'permission denied',
    errno.EPERM: 'permission denied',
    errno.ENOTDIR: 'a folder on the way is a file',
    errno.EEXIST: 'a file of that name is in the way',
}


# ---------------------------------------------------------------------------------------------
# Writes


def temp_path(path) -> pathlib.Path:
  """The name `path` is written under before it is renamed: unique to this process, so two
  processes writing the same file never write into each other's temporary file."""
  path = pathlib.Path(path)
  return path.with_name(f'{path.name}.{os.getpid()}.tmp')


def previous_version(path) -> pathlib.Path:
  """Where `replacing` keeps a folder's previous version between its two renames: a reader that
  finds no `path` (a kill landed between them) takes this one."""
  path = pathlib.Path(path)
  return path.with_name(f'{path.name}.old')


def os_error_code(error: BaseException) -> int | None:
  """The errno behind a failed write, wherever the library put it: an OSError in the exception's
  chain (torch raises "unexpected pos" with the OSError of its file's write as the context), or
  `os_error_code='28'` in the message (orbax and tensorstore)."""
  while error is not None:
    if isinstance(error, OSError) and error.errno:
      return error.errno
    if match := _ORBAX_OS_ERROR.search(str(error)):
      return int(match.group(1))
    error = error.__cause__ or error.__context__
  return None


def cause(error: BaseException) -> str:
  """What went wrong, in a few words: the OS's reason if there is one, else the error's first line."""
  code = os_error_code(error)
  return CAUSES.get(code, os.strerror(code).lower()) if code else str(error).split('\n', 1)[0][:200]


def write_error(path, error: BaseException, unchanged: bool = True) -> UserError:
  """The one line for a write of `path` that failed with `error`."""
  kept = '; the files already there are unchanged' if unchanged else ''
  return UserError(f'cannot write {path}: {cause(error)}{kept}')


def _remove(path: pathlib.Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing(path):
  """Yields `temp_path(path)` for the block to write (a file, or a folder it creates); when the
  block succeeds the result takes `path`'s place. A folder replaces a folder in two renames, the
  old one kept at `previous_version(path)` in between.

  On any failure the temporary file or folder is removed; a failed write (any exception with an
  os_error_code) becomes the one line of `write_error`."""
  path = pathlib.Path(path)
  tmp = temp_path(path)
  try:
    yield tmp
    if tmp.is_dir() and path.is_dir():
      old = previous_version(path)
      _remove(old)
      path.rename(old)
      tmp.rename(path)
      _remove(old)
    else:
      os.replace(tmp, path)
  except BaseException as e:
    _remove(tmp)
    if isinstance(e, Exception) and os_error_code(e) is not None:
      raise write_error(path, e) from e
    raise


@contextlib.contextmanager
def orbax_errors_unlogged():
  """orbax logs a failed read or write, traceback and all, and then raises it; what the user is
  told is the raised error, in one line (--debug shows its traceback)."""
  absl = logging.getLogger('absl')
  level = absl.level
  absl.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    absl.setLevel(level)


def append_text(path, text: str) -> None:
  """Appends to a log; a failed write ends in one line (the lines already there stay)."""
  try:
    with open(path, 'a', encoding='utf-8') as log:
      log.write(text)
  except OSError as e:
    raise write_error(path, e, unchanged=False) from e


# ---------------------------------------------------------------------------------------------
# The run's folder


def make_dir(path) -> pathlib.Path:
  """--proj_dir, created if it is not there yet."""
  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    raise UserError(f'--proj_dir {path} is a file, not a folder; choose another --proj_dir')
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise write_error(path, e, unchanged=False) from e
  return path


@contextlib.contextmanager
def _lock(proj: pathlib.Path):
  """Holds proj/.lock (flock, released when the file closes or the process ends) with our PID in it."""
  path = proj / LOCK_FILE
  try:
    handle = open(path, 'a+', encoding='utf-8')
  except OSError as e:
    raise write_error(path, e, unchanged=False) from e
  with handle:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or 'unknown'
      raise UserError(f'another run (PID {holder}) is writing to {proj}; wait for it to finish, or choose '
                      'another --proj_dir') from None
    handle.truncate(0)
    handle.write(f'{os.getpid()}\n')
    handle.flush()
    yield


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  return True


def _remove_dead_temp_files(proj: pathlib.Path) -> None:
  """Temporary files of processes that were killed mid-write (a failed write removes its own)."""
  for path in proj.iterdir():
    match = _TEMP_NAME.fullmatch(path.name)
    if match and not _alive(int(match.group(1))):
      _remove(path)


def previous_outputs(proj: pathlib.Path) -> list[pathlib.Path]:
  """What another run left in `proj` that a new one would replace; [] if it learned nothing."""
  states = sorted(proj.glob(STATES))
  checkpoints = [proj / name for name in CHECKPOINTS if (proj / name).exists()]
  logs = [proj / name for name in LOGS if (proj / name).exists()]
  step_log = proj / STEP_LOG
  if states or checkpoints or (step_log.exists() and step_log.stat().st_size > 0):
    return [*states, *checkpoints, *logs]
  return []


def _move_aside(proj: pathlib.Path, outputs: list[pathlib.Path]) -> pathlib.Path:
  base = proj / PREVIOUS_RUN.format(datetime.datetime.now())
  folder, n = base, 1
  while folder.exists():  # a second --overwrite within the same second
    folder, n = base.with_name(f'{base.name}-{n}'), n + 1
  try:
    folder.mkdir()
    for path in outputs:
      path.rename(folder / path.name)
  except OSError as e:
    raise write_error(folder, e, unchanged=False) from e
  return folder


def _describe(outputs: list[pathlib.Path]) -> str:
  names = [p.name + ('/' if p.is_dir() else '') for p in outputs]
  return ', '.join(names[:4]) + (', ...' if len(names) > 4 else '')


@contextlib.contextmanager
def claim(proj_dir, resume: bool, overwrite: bool):
  """Holds `proj_dir` for a training run until the block ends; yields it as a Path.

  Refuses, in one line, a folder another live run holds, and (without --resume) one that holds
  another run's outputs unless `overwrite`, which moves them into previous-run-<time>/ first.
  """
  if resume and overwrite:
    raise UserError('--resume continues the run in --proj_dir and --overwrite starts a new one; give one of them')
  proj = make_dir(proj_dir)
  with _lock(proj):
    _remove_dead_temp_files(proj)
    outputs = [] if resume else previous_outputs(proj)
    if outputs and not overwrite:
      raise UserError(f'{proj} holds another run ({_describe(outputs)}); continue it with --resume, start over '
                      f'with --overwrite (its files move into {proj}/previous-run-<time>/), or choose another '
                      '--proj_dir')
    if outputs:
      print(f'--overwrite: the previous run\'s files moved into {_move_aside(proj, outputs)}/')
    yield proj


@contextlib.contextmanager
def deferred_interrupt():
  """A Ctrl-C inside the block is raised when the block ends, so that the files the block writes
  together (an epoch's log line, state and checkpoint) are all written or none. Off the main
  thread, where Python delivers no signals, the block runs as it is."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received = []
  previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
  if received:
    raise KeyboardInterrupt
