"""Command-line parsing errors in one line, like `common.user_errors` does for errors raised in `main`.

absl reports a bad flag (unknown, missing, a value it cannot parse) before `main` runs, as
"FATAL Flags parsing error: ..." plus a second line of advice. `flags_parser(prog)` is an
`app.run(main, flags_parser=...)` parser that prints `PROG: error: MESSAGE` instead, on one line, and
exits with status 1; with `--verbose` on the command line the traceback shows.

  $ llada-sample --prompt=hi
  llada-sample: error: flag --workdir is required (see llada-sample --helpfull)
"""

from __future__ import annotations

import re
import sys
from typing import Callable

from absl import flags

# absl's text for a flag marked required (flags.mark_flag_as_required) that was not given.
_REQUIRED = re.compile(r"flag --([\w.]+)=None: Flag --\1 must have a value other than None\.")


def _config_arg(argv: list[str], error: BaseException) -> str | None:
  """The --config... argument an error of ml_collections' config flag comes from: the override that
  names a missing field (`--config.model.d_modle=64`), else the config file (`--config=FILE`)."""
  if isinstance(error, (AttributeError, KeyError)):
    missing = re.match(r"[^'\\]+", str(error).lstrip("'\"\\"))
    for arg in argv[1:]:
      name = arg.split("=", 1)[0]
      if missing and name.startswith("--config.") and missing.group(0) in name.split(".")[1:]:
        return arg
  return next((a for a in argv[1:] if a.startswith("--config=")), None)


def one_line(error: BaseException, argv: list[str] = ()) -> str:
  """The message of a flag-parsing error as one line: a required flag's absl text is reworded, a
  multi-line message keeps its first and last lines (e.g. a config file's error under its traceback),
  and an error raised by a config file or override (not an absl flags.Error) is prefixed with the
  argument it comes from."""
  text = str(error).strip()
  required = _REQUIRED.search(text)
  if required:
    return f"flag --{required.group(1)} is required"
  if isinstance(error, (AttributeError, KeyError)):  # ml_collections: repr of "'name'\nDid you mean ..."
    text = text.strip("'\"").replace("\\n", "\n").replace("\\'", "'")
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if len(lines) > 1:
    text = f"{lines[0]}{' ' if lines[0].endswith(':') else '; '}{lines[-1]}"
  if not isinstance(error, flags.Error):
    arg = _config_arg(list(argv), error)
    if isinstance(error, (AttributeError, KeyError)) and arg and not arg.startswith("--config="):
      text = f"flag {arg}: no such config field {text}"
    else:
      text = f"{arg + ': ' if arg else ''}{type(error).__name__}: {text}"
  return text


def _verbose(argv: list[str]) -> bool:
  return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in argv[1:])


def flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
  """absl's flag parsing for `app.run(main, flags_parser=flags_parser(prog))`, with errors in one line."""
  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except Exception as e:  # flags.Error, or what a flag's own parser raised
      if _verbose(argv):
        raise
      print(f"{prog}: error: {one_line(e, argv)} (see {prog} --helpfull)", file=sys.stderr)
      sys.exit(1)
  return parse
