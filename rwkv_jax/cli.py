"""What every command-line entry point shares: user errors end in one line, not a traceback."""
import argparse
import os
import sys

from rwkv_jax.errors import UserError
from rwkv_jax.run_dir import cause


class ArgumentParser(argparse.ArgumentParser):
  """argparse as every command here uses it: a flag is spelled out (`--epoch_step` is not taken
  for `--epoch_steps`), and a bad command line ends in the same one `error:` line as any other
  user error."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, allow_abbrev=False, **kwargs)

  def error(self, message):
    raise UserError(f'{message} (see {self.prog} --help)')


def check_flag(args, flag: str, ok, rule: str) -> None:
  """Refuses flag `--flag` in one line when it was given (not None) and `ok(value)` is false;
  a NaN fails every comparison, so `ok` written as comparisons refuses it too."""
  value = getattr(args, flag)
  if value is not None and not ok(value):
    raise UserError(f'--{flag} {value}: {rule}')


def _one_line(error: Exception) -> str:
  if isinstance(error, OSError):
    return f'{error.filename}: {cause(error)}' if error.filename else cause(error)
  return str(error)


def run(main, argv=None) -> None:
  """Calls `main(argv)`; a UserError prints `error: ...` and exits 2 (`--debug` shows the traceback).

  So does an OSError no caller turned into a UserError (a log line that found the disk full, a
  file that cannot be read). A closed stdout (`... | head`) ends the command quietly.
  """
  argv = sys.argv[1:] if argv is None else argv
  debug = '--debug' in argv
  try:
    main([a for a in argv if a != '--debug'])
  except BrokenPipeError:
    # Point stdout at /dev/null so that the interpreter's last flush does not fail again.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(141)  # 128 + SIGPIPE: what `cat` reports when its reader goes away
  except (UserError, OSError) as e:
    if debug:
      raise
    print(f'error: {_one_line(e)}', file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    sys.exit(130)
