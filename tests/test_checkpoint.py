"""Checkpoints: restore onto another mesh shape, keep-every-N, clear errors, and SIGTERM mid-training."""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import command_env, tiny_config
from llada_jax import checkpoint as ckpt_lib, sharding, train

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_restore_onto_a_different_mesh_shape(tmp_path, devices):
  """Saved on 8 devices as data=8 x fsdp=1, restored as data=2 x fsdp=4: identical values, new layout."""
  saved_cfg = tiny_config(**{"mesh.data": 8, "mesh.fsdp": 1})
  s8 = train.setup(saved_cfg)
  state = s8.init(train.root_key(saved_cfg))
  tokens = np.random.default_rng(0).integers(5, 200, (8, saved_cfg.train.seq_len), np.int32)
  with sharding.use_rules(saved_cfg.mesh, s8.mesh):
    state, _ = s8.step(state, train.global_batch(s8, {"tokens": tokens}))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, state, data_iterator=None, config=saved_cfg.to_dict())
  ckpt.close()

  new_cfg = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 4})
  s24 = train.setup(new_cfg)
  restored = ckpt_lib.Checkpointer(str(tmp_path), read_only=True).restore(1, s24.abstract_state)
  assert dict(restored.params["embedding"].sharding.mesh.shape) == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
  assert restored.params["embedding"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert state.params["embedding"].sharding.is_fully_replicated  # fsdp=1 held whole copies
  for a, b in zip(_leaves(state), _leaves(restored)):
    np.testing.assert_array_equal(a, b)
  # and training goes on from there
  with sharding.use_rules(new_cfg.mesh, s24.mesh):
    nxt, m = s24.step(restored, train.global_batch(s24, {"tokens": tokens}))
  assert int(nxt.step) == 2 and np.isfinite(float(m["loss"]))


def test_keep_every_survives_max_to_keep(tmp_path, devices):
  cfg = tiny_config()
  state = train.setup(cfg).init(train.root_key(cfg))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2, keep_every=4, async_save=False)
  for step in range(1, 11):
    ckpt.save(step, state, data_iterator=None, config=cfg.to_dict())
  ckpt.wait()
  assert ckpt.all_steps() == [4, 8, 9, 10]
  ckpt.close()


def test_missing_step_and_mismatched_shapes_fail_clearly(tmp_path, devices):
  cfg = tiny_config()
  s = train.setup(cfg)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(3, s.init(train.root_key(cfg)), data_iterator=None, config=cfg.to_dict())
  with pytest.raises(FileNotFoundError, match=r"no checkpoint step 7 in .*checkpoints \(available: \[3\]\)"):
    ckpt.restore(7, s.abstract_state)
  wider = train.setup(tiny_config(**{"model.mlp_dim": 96}))
  with pytest.raises(ValueError, match=r"checkpoint step 3 in .*checkpoints could not be restored"):
    ckpt.restore(3, wider.abstract_state)
  with pytest.raises(FileNotFoundError, match="no checkpoints found at"):
    ckpt_lib.Checkpointer(str(tmp_path / "nowhere"), read_only=True)


def _wait_for_line(proc, prefix: str, timeout: float = 300) -> list[str]:
  lines, deadline = [], time.time() + timeout
  while time.time() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    lines.append(line)
    if line.startswith(prefix):
      return lines
  proc.kill()
  raise AssertionError("the run never printed %r:\n%s" % (prefix, "".join(lines)))


def test_sigterm_during_startup_saves_the_first_step_and_the_run_resumes(tmp_path):
  """A SIGTERM that arrives while the run is still starting (data and tokenizer ready, nothing compiled
  yet) is honoured like one mid-run (tests/faults/test_kill.py): the first step runs, is saved, and the
  process exits 0; the same command then resumes from that step. (Before, start-up died with -15.)"""
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-u", "-m", "llada_jax.cli.train", f"--config={CONFIGS}/tiny.py",
         f"--workdir={workdir}", "--config.train.num_steps=5000", "--config.train.log_every=1",
         "--config.train.checkpoint_every=1000", "--config.train.num_samples=0"]
  env = command_env(devices=2)
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  lines = _wait_for_line(proc, "pre-training data:")
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  out = "".join(lines) + out
  assert proc.returncode == 0, err[-3000:]
  saved = int(re.search(r"stop requested \(SIGTERM\): saved step (\d+)", out).group(1))
  assert saved == 1 and "step 2/" not in out
  assert re.search(rf"done: step {saved} \(preempted\)", out)
  ckpt = ckpt_lib.Checkpointer(str(workdir), read_only=True)
  assert ckpt.all_steps() == [saved]
  assert ckpt.restore_config(saved)["train"]["num_steps"] == 5000

  resumed = subprocess.run(cmd + [f"--stop_at_step={saved + 2}"], capture_output=True, text=True, env=env,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from step {saved}" in resumed.stdout
  assert f"done: step {saved + 2}," in resumed.stdout


def test_a_state_saved_before_the_frozen_field_still_restores(tmp_path, devices):
  """Steps written by a TrainState of four fields (before `frozen`, the preference objectives' reference)
  restore into today's TrainState: a state whose `frozen` is None stores exactly those four fields."""
  import flax.struct

  @flax.struct.dataclass
  class FourFieldState:  # TrainState as it was
    step: jax.Array
    params: dict
    opt_state: tuple
    rng: jax.Array

  cfg = tiny_config()
  s = train.setup(cfg)
  state = s.init(train.root_key(cfg))
  assert state.frozen is None
  old = FourFieldState(state.step, state.params, state.opt_state, state.rng)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, old, data_iterator=None, config=cfg.to_dict())
  ckpt.save(2, state, data_iterator=None, config=cfg.to_dict())
  ckpt.close()
  assert sorted(os.listdir(tmp_path / "checkpoints" / "1" / "state")) == sorted(
      os.listdir(tmp_path / "checkpoints" / "2" / "state"))
  for step in (1, 2):
    restored = ckpt_lib.Checkpointer(str(tmp_path), read_only=True).restore(step, s.abstract_state)
    assert isinstance(restored, train.TrainState) and restored.frozen is None
    for a, b in zip(_leaves(state), _leaves(restored)):
      np.testing.assert_array_equal(a, b)
