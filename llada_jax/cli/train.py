"""`llada-train`: train (or resume) a model from a config file, then print samples.

  llada-train --config=configs/demo.py --workdir=/tmp/llada_demo [--config.train.num_steps=200]
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from llada_jax import config as config_lib
from llada_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (e.g. configs/demo.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show full tracebacks for configuration errors.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _VERBOSE.value:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
  try:
    config = config_lib.from_config_dict(_CONFIG.value)
    summary = train.train_and_evaluate(config, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    if _VERBOSE.value:
      raise
    print(f"llada-train: error: {e}", file=sys.stderr)
    return 1
  m = summary["metrics"]
  print(f"done: step {summary['step']}, loss {m.get('loss', float('nan')):.4f}, "
        f"wall time {summary['wall_time_s']:.0f}s")
  return 0


def run():
  app.run(main)


if __name__ == "__main__":
  run()
