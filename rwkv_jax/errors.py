"""The one exception type users see: a problem with their input, told in one line."""


class UserError(Exception):
  """Bad input (file, flag, data). The CLI prints `error: <message>` and exits 2, no traceback."""
