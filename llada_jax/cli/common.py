"""What every llada_jax command shares: `--verbose`, quiet logs, and one-line errors for user mistakes."""

import functools
import os
import sys

import jax
from absl import app, flags, logging

from llada_jax import errors, hosts

VERBOSE = flags.DEFINE_bool("verbose", False, "Show full tracebacks and INFO logs.")
DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "yes", "no"],
    "Multi-process run (one process per host): 'yes' calls jax.distributed.initialize(), which finds "
    "the coordinator by itself on Cloud TPU VMs and under SLURM/Open MPI; 'auto' does so when "
    "--coordinator_address is given or a multi-process launcher's environment is detected.")
COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                  "host:port of process 0, for multi-process runs outside TPU VMs/SLURM.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) in the run.",
                                     lower_bound=1)
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).",
                                  lower_bound=0)

# Environment variables a multi-process launcher sets, with the process count they hold.
_LAUNCHER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _launched_as_many() -> bool:
  if any(int(os.environ.get(v, "1") or 1) > 1 for v in _LAUNCHER_ENV):
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")  # Cloud TPU VM pod slice


def maybe_initialize_distributed() -> None:
  """Starts JAX's multi-host runtime when this is one process of several (see --distributed).

  Must run before anything asks JAX for devices. Every process then runs the same program; each sees
  all devices of the slice in `jax.devices()` and feeds its own share of each batch.
  """
  explicit = {"coordinator_address": COORDINATOR.value, "num_processes": NUM_PROCESSES.value,
              "process_id": PROCESS_ID.value}
  given = {k: v for k, v in explicit.items() if v is not None}
  mode = DISTRIBUTED.value
  if mode == "no":
    if given:
      raise ValueError(f"--distributed=no contradicts --{'/--'.join(given)}")
    return
  if mode == "auto" and not given and not _launched_as_many():
    return
  if given and len(given) != 3:
    missing = sorted(set(explicit) - set(given))
    raise ValueError(f"a multi-process run with --coordinator_address needs --num_processes and "
                     f"--process_id too; missing: --{', --'.join(missing)}")
  if given and not 0 <= given["process_id"] < given["num_processes"]:
    raise ValueError(f"--process_id={given['process_id']} must be in [0, --num_processes="
                     f"{given['num_processes']})")
  jax.distributed.initialize(**given)  # CPU processes (tests, laptops) talk over gloo, JAX's default
  hosts.use_for_checkpoints()


def fake_cpu_devices(n: int) -> None:
  """Plans for `n` devices on a machine without them: JAX on the CPU with `n` host devices."""
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", n)


def _drop_traceback(record) -> bool:
  record.exc_info, record.exc_text, record.stack_info = None, None, None
  return True


def _one_line_hook(prog: str):
  seen = set()

  def hook(exc_type, exc, tb):
    del tb
    line = f"{prog}: background error: {exc_type.__name__}: {exc}"
    if line not in seen:
      seen.add(line)
      print(line, file=sys.stderr, flush=True)

  return hook


def user_errors(prog: str):
  """Wraps an absl `main`: a ValueError / OSError (bad config, file, path), a usage error, the
  ImportError of a missing optional extra, an errors.RunHalted (a failed checkpoint write, a
  non-finite streak) or an errors.RewardFailed (an RL reward function failed) becomes one line on stderr and exit code 1; `--verbose`
  shows the traceback instead. Orbax's per-save INFO logs are muted, and library log records keep
  their one-line message but drop their tracebacks (a failed background write logs one) unless
  `--verbose`."""
  def wrap(main):
    @functools.wraps(main)
    def inner(argv):
      if not VERBOSE.value:
        logging.set_verbosity(logging.WARNING)
        logging.get_absl_handler().addFilter(_drop_traceback)
        sys.excepthook = _one_line_hook(prog)  # errors that native callbacks print (e.g. a dying writer)
        sys.unraisablehook = lambda u: sys.excepthook(u.exc_type, u.exc_value, u.exc_traceback)
      try:
        return main(argv)
      except (ValueError, OSError, ImportError, app.UsageError, errors.RunHalted, errors.RewardFailed) as e:
        if VERBOSE.value:
          raise
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # one line
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        # Exit now: an orderly shutdown would let Orbax/tensorstore threads print their own errors after
        # this line. Nothing is left half-written: the train loop finishes an in-flight save before
        # its error gets here, and failed writes never replace a complete step.
        sys.stdout.flush()
        os._exit(1)
    return inner
  return wrap
