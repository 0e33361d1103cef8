"""`llada-train`: train (or resume) a model from a config file, then print samples once it has finished.

  llada-train --config=configs/demo.py --workdir=/tmp/llada_demo [--config.train.num_steps=200]

Several hosts (a TPU slice, GPU nodes) run this same command on every host: `--distributed=yes` on TPU
VMs and under SLURM (JAX finds the coordinator itself), or `--coordinator_address`, `--num_processes`
and `--process_id` elsewhere. `--dry_run` / `--print_shardings` inspect a config without training.
"""

import time

from absl import app, flags
from ml_collections import config_flags

from llada_jax import config as config_lib
from llada_jax import plan, train
from llada_jax.cli import common, parsing

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (e.g. configs/demo.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
_STOP_AT = flags.DEFINE_integer(
    "stop_at_step", None, "End this run after this step, with a checkpoint (the schedule still follows "
    "train.num_steps; rerunning the command resumes). For time-limited allocations.", lower_bound=1)
_PRINT_SHARDINGS = flags.DEFINE_bool(
    "print_shardings", False, "Print the sharding and per-device bytes of every parameter and optimizer "
    "leaf, then exit without training.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Compile the train step for abstract inputs (nothing allocated, nothing run) and "
    "report parameter, optimizer and activation bytes per device, then exit.")
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", None, "With --dry_run/--print_shardings: plan for this many devices by faking them "
    "on the CPU (e.g. 64 for a v5p-128 slice), instead of the devices this machine has.", lower_bound=1)


@common.user_errors("llada-train")
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  inspect_only = _DRY_RUN.value or _PRINT_SHARDINGS.value
  if _NUM_DEVICES.value and not inspect_only:
    raise app.UsageError("--num_devices fakes devices for planning; use it with --dry_run or --print_shardings")
  if _NUM_DEVICES.value:
    common.fake_cpu_devices(_NUM_DEVICES.value)
  else:
    common.maybe_initialize_distributed()
  if not inspect_only and not _WORKDIR.value:
    raise app.UsageError("--workdir is required to train")
  config = config_lib.from_config_dict(_CONFIG.value)
  if inspect_only:
    s = train.setup(config_lib.stand_in_tokens(config))  # no tokenizer here: token pieces get stand-in ids
    if _PRINT_SHARDINGS.value:
      print(plan.shardings_table(s))
    if _DRY_RUN.value:
      print(plan.dry_run(s).table())
    return 0
  summary = train.train_and_evaluate(config, _WORKDIR.value, stop_at=_STOP_AT.value)
  t_samples = time.time()
  if summary["finished"]:  # a stopped or preempted run shows its samples when a later one finishes it
    train.print_samples(config, summary)
  m = summary["metrics"]
  wall = summary["wall_time_s"] + time.time() - t_samples
  print(f"done: step {summary['step']}{' (preempted)' if summary['preempted'] else ''}, "
        f"loss {m.get('loss', float('nan')):.4f}, wall time {wall:.0f}s")
  return 0


def run():
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=parsing.flags_parser("llada-train"))


if __name__ == "__main__":
  run()
