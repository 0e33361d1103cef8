"""What every llada_jax command shares: `--verbose`, quiet logs, and one-line errors for user mistakes."""

import functools
import sys

from absl import flags, logging

VERBOSE = flags.DEFINE_bool("verbose", False, "Show full tracebacks and INFO logs.")


def user_errors(prog: str):
  """Wraps an absl `main`: a ValueError / FileNotFoundError (bad config, flag, file) becomes one line on
  stderr and exit code 1; `--verbose` shows the traceback instead. Orbax's per-save INFO logs are muted."""
  def wrap(main):
    @functools.wraps(main)
    def inner(argv):
      if not VERBOSE.value:
        logging.set_verbosity(logging.WARNING)
      try:
        return main(argv)
      except (ValueError, FileNotFoundError) as e:
        if VERBOSE.value:
          raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return inner
  return wrap
