"""Two processes on 127.0.0.1 (CPU, gloo collectives, 4 fake devices each) train, checkpoint and resume
through `llada-train`, and their losses equal a single process with 8 devices fed the same global
batches."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import command_env, tiny_config
from llada_jax import objectives, train

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
OVERRIDES = {"train.num_steps": 6, "train.log_every": 1, "train.checkpoint_every": 100,
             "train.num_samples": 2, "optim.warmup_steps": 2}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_two_processes(workdir, *extra, overrides=OVERRIDES):
  port = _free_port()
  env = command_env(devices=4)
  flags = [f"--config.{k}={v}" for k, v in overrides.items()]
  return [subprocess.Popen(
      [sys.executable, "-u", "-m", "llada_jax.cli.train", f"--config={CONFIGS}/tiny.py",
       f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}", *flags, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=env) for i in range(2)]


def _finish(procs, timeout=420):
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, err[-4000:]
    outs.append(out)
  return outs


def test_preempted_two_process_run_resumes_and_matches_one_process(tmp_path, devices):
  """A preemption notice reaches one host only; JAX's preemption service (Orbax's sync point) makes
  both hosts save the same step and exit cleanly, instead of one leaving the other in a collective.
  Rerun, the two processes resume there and finish, and their losses equal one process with 8 devices
  fed the same global batches. (The tiny schedule is constant after warm-up: `train.num_steps` only
  says where each run ends.)"""
  workdir = tmp_path / "two_hosts"
  procs = _start_two_processes(workdir, overrides={**OVERRIDES, "train.num_steps": 5000,
                                                   "train.checkpoint_every": 1000})
  for line in procs[0].stdout:  # wait until training runs
    if line.startswith("step 3/"):
      break
  procs[1].send_signal(signal.SIGTERM)
  first = _finish(procs, timeout=300)
  saved = int(re.search(r"done: step (\d+) \(preempted\)", first[0]).group(1))
  assert re.search(rf"done: step {saved} \(preempted\)", first[1])
  assert 3 <= saved < 1000
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(saved)]
  # grain saved one iterator state per host inside the step
  data_states = set(os.listdir(workdir / "checkpoints" / str(saved) / "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= data_states

  end = saved + 2
  second = _finish(_start_two_processes(workdir, overrides={**OVERRIDES, "train.num_steps": end}))
  assert f"resumed from step {saved}" in second[0]
  assert "sample: " in second[0] and "sample: " not in second[1]  # process 0 prints, the others don't
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, end + 1))  # written once (by process 0), not twice

  # One process, 8 devices, the same global batches: host 0's rows, then host 1's.
  cfg = tiny_config(**{**OVERRIDES, "train.num_steps": end})
  hosts = [objectives.training_data(cfg, str(workdir), process_index=i, process_count=2).iterator
           for i in range(2)]
  batches = iter(lambda: {"tokens": np.concatenate([next(h)["tokens"] for h in hosts])}, None)
  s = train.setup(cfg)
  _, hist = train.run_steps(s, s.init(train.root_key(cfg)), batches, end)
  np.testing.assert_allclose([r["loss"] for r in rows], [h["loss"] for h in hist], rtol=2e-5)


@pytest.mark.parametrize("flags, message", [
    (["--coordinator_address=127.0.0.1:1"], "missing: --num_processes, --process_id"),
    (["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"],
     "--process_id=2 must be in [0, --num_processes=2)"),
    (["--distributed=no", "--num_processes=2"], "--distributed=no contradicts --num_processes"),
])
def test_inconsistent_multihost_flags_fail_in_one_line(tmp_path, flags, message):
  proc = subprocess.run([sys.executable, "-m", "llada_jax.cli.train", f"--config={CONFIGS}/tiny.py",
                         f"--workdir={tmp_path}", *flags], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  [line] = proc.stderr.strip().splitlines()
  assert line.startswith("llada-train: error: ") and line.endswith(message)
