"""What every command-line entry point shares: user errors end in one line, not a traceback."""
import sys

from rwkv_jax.errors import UserError


def run(main, argv=None) -> None:
  """Calls `main(argv)`; a UserError prints `error: ...` and exits 2 (`--debug` shows the traceback)."""
  argv = sys.argv[1:] if argv is None else argv
  debug = '--debug' in argv
  try:
    main([a for a in argv if a != '--debug'])
  except UserError as e:
    if debug:
      raise
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    sys.exit(130)
