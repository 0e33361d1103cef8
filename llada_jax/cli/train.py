"""`llada-train`: train (or resume) a model from a config file, then print samples.

  llada-train --config=configs/demo.py --workdir=/tmp/llada_demo [--config.train.num_steps=200]
"""

from absl import app, flags
from ml_collections import config_flags

from llada_jax import config as config_lib
from llada_jax import train
from llada_jax.cli import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (e.g. configs/demo.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
flags.mark_flags_as_required(["config", "workdir"])


@common.user_errors("llada-train")
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  summary = train.train_and_evaluate(config_lib.from_config_dict(_CONFIG.value), _WORKDIR.value)
  m = summary["metrics"]
  print(f"done: step {summary['step']}, loss {m.get('loss', float('nan')):.4f}, "
        f"wall time {summary['wall_time_s']:.0f}s")
  return 0


def run():
  app.run(main)


if __name__ == "__main__":
  run()
