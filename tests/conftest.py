"""Test set-up: 8 fake CPU devices and a per-run persistent compilation cache (both set before JAX
starts, in the environment, so CLI subprocesses and pytest-xdist workers inherit them), the order
files are handed to xdist workers in, and shared, session-scoped fixtures (trained tiny workdirs).

The README runs the suite as `pytest -n 2` with `--dist=loadfile` (pyproject.toml): a file's tests
stay on one worker, so module fixtures are built once.
"""

import os
import shutil
import tempfile

# 8 fake devices; and LLVM at -O0 for the CPU backend: the suite's programs are tiny, so compiling is most
# of its time and optimising them buys nothing (measured: a compile-bound pair of tests 116 s -> 68 s).
# The level changes how XLA:CPU emits code, not what a program computes.
FAST_COMPILE = "--xla_backend_optimization_level=0"  # also for commands that set their own XLA_FLAGS
_FLAGS = ("--xla_force_host_platform_device_count=8", FAST_COMPILE)
for _flag in _FLAGS:
  if _flag not in os.environ.get("XLA_FLAGS", "").split():  # an xdist worker inherits them already
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def command_env(devices: int = 1) -> dict[str, str]:
  """The environment for a command a test starts: this one's on the CPU, with `devices` host devices
  (one by default: the 8 fake ones would only slow its compiles) and the fast-compile flag."""
  flags = FAST_COMPILE if devices == 1 else f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}

# One compilation cache per test run, made by the first process (xdist's controller, or a plain
# pytest) and inherited by the workers and by every command a test starts: the many tiny runs and
# CLI processes compile the same programs. A hit cannot change a result: the key covers the program,
# the compile options, the XLA flags and the devices, and the entry is the executable that compile
# produced. Starting empty each run, nothing from an older checkout or JAX is ever read.
_CACHE_OWNER = "LLADA_TEST_COMPILATION_CACHE" not in os.environ
if _CACHE_OWNER:
  os.environ["LLADA_TEST_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="llada_jax_test_jax_cache_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["LLADA_TEST_COMPILATION_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import filelock  # noqa: E402  (the [test] extra brings it)
import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

from llada_jax import config as config_lib  # noqa: E402
from llada_jax.configs import default  # noqa: E402


def pytest_unconfigure(config):
  if _CACHE_OWNER and not hasattr(config, "workerinput"):
    shutil.rmtree(os.environ["LLADA_TEST_COMPILATION_CACHE"], ignore_errors=True)


# The slowest files first (seconds on the 2-core CI box), so that with --dist=loadfile neither worker
# is left with a long file at the end while the other idles. Only the order changes, never what runs;
# a file not listed goes after these, in the usual order.
SLOW_FILES = ("test_preference.py", "test_benchmarks.py", "test_train.py", "test_grpo.py", "test_lora.py", "test_sampling.py",
              "test_multihost.py", "test_server.py", "test_moe.py", "test_finetune.py", "test_harness.py", "test_reversal.py", "test_performance.py",
              "test_checkpoint.py", "test_generate.py", "test_kill.py", "test_notebooks.py", "test_hf.py",
              "test_evaluate.py", "test_model.py", "test_bad_inputs.py", "test_checkpoint_faults.py",
              "test_serving.py", "test_objectives.py", "test_nonfinite.py", "test_tokenizer_cli.py", "test_cli.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: keeps the rest in order


def tiny_config(**overrides) -> config_lib.Config:
  """The `tiny` preset with dotted overrides, e.g. tiny_config(**{"train.num_steps": 4})."""
  return preset_config("tiny", **overrides)


def preset_config(variant: str, **overrides) -> config_lib.Config:
  """A configs/default.py preset with dotted overrides, e.g. preset_config("moe_tiny", **{"mesh.expert": 2})."""
  c = default.get_config(variant)
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return config_lib.from_config_dict(c)


@pytest.fixture(scope="session")
def devices():
  assert len(jax.devices()) == 8, "tests expect 8 fake CPU devices (see conftest.py)"
  return jax.devices()


def _run_root(tmp_path_factory) -> str:
  """A folder of this test run that every xdist worker sees (the workers' temp folders' parent)."""
  base = tmp_path_factory.getbasetemp()
  return str(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)


def shared_workdir(tmp_path_factory, name: str, make) -> str:
  """`make(path)` once per test run, whichever worker asks first; the others wait for it and reuse it.

  Tests must treat the result as read-only (copy it to change it)."""
  root = os.path.join(_run_root(tmp_path_factory), "shared_workdirs")
  os.makedirs(root, exist_ok=True)
  path, done = os.path.join(root, name), os.path.join(root, f"{name}.done")
  with filelock.FileLock(os.path.join(root, f"{name}.lock")):
    if not os.path.exists(done):
      shutil.rmtree(path, ignore_errors=True)  # a half-made one from a failed attempt
      make(path)
      open(done, "w").close()
  return path


PRETRAINED_STEPS = 4


@pytest.fixture(scope="session")
def pretrained_workdir(tmp_path_factory) -> str:
  """A tiny pre-training run of PRETRAINED_STEPS steps (checkpoint at the end, tokenizer, no samples),
  shared by the tests that only read one (serving, the harness, fine-tuning)."""
  from llada_jax import train

  def make(path):
    train.train_and_evaluate(tiny_config(**{"train.num_steps": PRETRAINED_STEPS, "train.num_samples": 0,
                                            "optim.warmup_steps": 1}), path)
  return shared_workdir(tmp_path_factory, "pretrained", make)


@pytest.fixture(scope="session")
def sft_workdir(tmp_path_factory, pretrained_workdir) -> str:
  """2 SFT steps (seq_len 64) fine-tuned from `pretrained_workdir`: a chat model to serve."""
  from llada_jax import train

  def make(path):
    c = default.get_config("tiny")
    c.train.update(seq_len=64, num_steps=2, num_samples=0)
    train.train_and_evaluate(config_lib.from_config_dict(default.sft(c, init_from=pretrained_workdir)), path)
  return shared_workdir(tmp_path_factory, "sft", make)
