"""Damaged checkpoints and failing writes: detected, reported with their path, and the last good step
is what a run continues from (never a silent garbage restore, never a lost good step)."""

import errno
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import tiny_config
from llada_jax import checkpoint as ckpt_lib, errors, events, train, workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = {"train.num_steps": 4, "train.checkpoint_every": 2, "train.num_samples": 0, "train.log_every": 1,
         "optim.warmup_steps": 1}


def _events(workdir):
  return [(e["event"], e["step"]) for e in events.read_events(str(workdir))]


def _params_of(result):
  return jax.device_get(result["state"].params)


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted 4-step run with checkpoints at steps 2 and 4: its final parameters and a copy."""
  workdir = tmp_path_factory.mktemp("reference")
  result = train.train_and_evaluate(tiny_config(**STEPS), str(workdir))
  # What the run recorded (each save first started, then complete), and the workdir given back.
  assert _events(workdir) == [("started", None), ("saving", 2), ("saved", 2), ("saving", 4), ("saved", 4),
                              ("done", 4)]
  assert events.read_events(str(workdir))[-1]["finished"] is True
  assert not (workdir / workdir_lock.LOCK_FILE).exists()
  return _params_of(result), workdir


def _copy(reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference[1], workdir)
  return workdir


def _largest_file(folder):
  files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
  return max(files, key=os.path.getsize)


def _resume(workdir, capsys):
  """Reruns the same command in the damaged workdir; returns its result and what it printed."""
  result = train.train_and_evaluate(tiny_config(**STEPS), str(workdir))
  out = capsys.readouterr()
  return result, out.out + out.err


def _flip_a_bit_orbax_reads_back_silently(state_dir):
  """Flips one bit of the step's largest array file where Orbax/tensorstore reads it back without any
  error but with changed values. Not every byte qualifies: a file can hold bytes no array refers to any
  more (a flip there changes nothing), and a flip in a compressed frame's header fails decompression
  (an error Orbax reports by itself), so candidate positions are tried until one does."""
  data = _largest_file(state_dir)
  clean_bytes = open(data, "rb").read()
  clean = jax.device_get(ocp.StandardCheckpointer().restore(state_dir))
  for fraction in (0.5, 0.25, 0.4, 0.1, 0.6, 0.33, 0.15, 0.45, 0.05, 0.7):
    blob = bytearray(clean_bytes)
    blob[int(len(blob) * fraction)] ^= 0x01
    open(data, "wb").write(bytes(blob))
    try:
      damaged = jax.device_get(ocp.StandardCheckpointer().restore(state_dir))
    except Exception:  # noqa: BLE001  (tensorstore noticed by itself: not the case this test is about)
      continue
    if any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(damaged))):
      return
  raise AssertionError(f"no position in {data} gave a silently changed array")


def test_flipped_bytes_are_detected_and_the_previous_step_is_used(reference, tmp_path, capsys):
  workdir = _copy(reference, tmp_path)
  _flip_a_bit_orbax_reads_back_silently(workdir / "checkpoints" / "4" / "state")
  capsys.readouterr()

  ckpt = ckpt_lib.Checkpointer(str(workdir), read_only=True)
  abstract = train.setup(tiny_config(**STEPS)).abstract_state
  with pytest.raises(ckpt_lib.CorruptCheckpoint, match=r"checkpoint step 4 at .*checkpoints/4: array \['"):
    ckpt.restore(4, abstract)

  result, printed = _resume(workdir, capsys)
  assert "warning: checkpoint step 4" in printed and "does not match the checksum" in printed
  assert "resumed from step 2" in printed
  assert _events(workdir)[6:] == [("started", None), ("resumed", 2), ("saving", 4), ("saved", 4), ("done", 4)]
  moved = os.listdir(workdir / ckpt_lib.QUARANTINE_DIR)
  assert len(moved) == 1 and moved[0].startswith("4-")  # kept for inspection, out of the way
  assert result["step"] == 4
  _assert_same(_params_of(result), reference[0])  # steps 3-4 redone: the same as never damaged
  assert sorted(ckpt_lib.Checkpointer(str(workdir), read_only=True).all_steps()) == [2, 4]


@pytest.mark.parametrize("damage", ["array_file_removed", "metadata_removed", "config_garbled",
                                    "checksums_garbled", "array_file_truncated"])
def test_damaged_step_falls_back_to_the_previous_one(reference, tmp_path, capsys, damage):
  workdir = _copy(reference, tmp_path)
  capsys.readouterr()
  step_dir = workdir / "checkpoints" / "4"
  if damage == "array_file_removed":
    os.remove(_largest_file(step_dir / "state"))
  elif damage == "metadata_removed":
    os.remove(step_dir / "state" / "_METADATA")
  elif damage == "config_garbled":
    (step_dir / "config" / "metadata").write_text('{"model": {"vocab_size": 25')
  elif damage == "checksums_garbled":
    (step_dir / "integrity" / "metadata").write_text("not json")
  else:
    data = _largest_file(step_dir / "state")
    with open(data, "r+b") as f:
      f.truncate(os.path.getsize(data) // 3)
  result, printed = _resume(workdir, capsys)
  warning = next(l for l in printed.splitlines() if l.startswith("warning: "))
  assert "checkpoint step 4" in warning and str(step_dir) in warning, warning  # names the step's path
  assert "resumed from step 2" in printed
  _assert_same(_params_of(result), reference[0])


def test_every_step_corrupt_is_an_error_and_nothing_is_deleted(reference, tmp_path, capsys):
  workdir = _copy(reference, tmp_path)
  for step in ("2", "4"):
    (workdir / "checkpoints" / step / "config" / "metadata").write_text("{")
  with pytest.raises(ValueError, match=r"no usable checkpoint left in .*steps \[4, 2\] were corrupt"):
    train.train_and_evaluate(tiny_config(**STEPS), str(workdir))
  assert sorted(n.split("-")[0] for n in os.listdir(workdir / ckpt_lib.QUARANTINE_DIR)) == ["2", "4"]


def test_a_different_model_is_refused_not_treated_as_corrupt(reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  with pytest.raises(ValueError, match="model.num_layers"):
    train.train_and_evaluate(tiny_config(**STEPS, **{"model.num_layers": 3}), str(workdir))
  assert not (workdir / ckpt_lib.QUARANTINE_DIR).exists()
  # The error ended the run: recorded, and the workdir given back.
  last = events.read_events(str(workdir))[-1]
  assert last["event"] == "failed" and last["error"].startswith("ValueError: config field 'model.num_layers'")
  assert not (workdir / workdir_lock.LOCK_FILE).exists()
  assert sorted(ckpt_lib.Checkpointer(str(workdir), read_only=True).all_steps()) == [2, 4]


def test_checksums_change_with_any_bit_and_with_swapped_words():
  rng = np.random.default_rng(0)
  tree = {"w": rng.standard_normal((64, 8)).astype(np.float32), "b": rng.standard_normal(5).astype(jax.numpy.bfloat16)}
  base = ckpt_lib.checksums(tree)
  words = tree["w"].reshape(-1).view(np.uint32).astype(np.uint64)  # an independent NumPy reference
  weights = np.arange(words.size, dtype=np.uint64) * 2 + 1
  assert base["['w']"] == ["float32", int(words.sum() % 2**32), int((words * weights).sum() % 2**32)]
  for leaf, index, bit in (("w", 0, 0), ("w", 511, 31), ("w", 200, 7), ("b", 4, 15)):
    damaged = {k: v.copy() for k, v in tree.items()}
    words = damaged[leaf].reshape(-1).view(np.uint32 if leaf == "w" else np.uint16)
    words[index] ^= type(words[index])(1 << bit)
    changed = ckpt_lib.checksums(damaged)
    assert changed[f"['{leaf}']"][1] != base[f"['{leaf}']"][1], (leaf, index, bit)
  swapped = {k: v.copy() for k, v in tree.items()}
  swapped["w"][[0, 1]] = swapped["w"][[1, 0]]  # same multiset of words: only the weighted sum sees it
  assert ckpt_lib.checksums(swapped)["['w']"][2] != base["['w']"][2]


def test_a_failed_write_halts_naming_the_last_complete_step(tmp_path, monkeypatch, capsys):
  """A full disk, simulated where Orbax reports it: the second save's write fails with ENOSPC."""
  real_save, calls = ocp.CheckpointManager.save, []

  def failing_save(self, step, *args, **kwargs):
    calls.append(step)
    if len(calls) == 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
  with pytest.raises(errors.RunHalted, match=r"writing checkpoint step 4 in .*checkpoints failed \(OSError: "
                                             r"\[Errno 28\] No space left on device\); the last complete "
                                             r"checkpoint is step 2\. Free space"):
    train.train_and_evaluate(tiny_config(**STEPS), str(tmp_path))
  monkeypatch.undo()
  # A failed write halts the run: recorded (step 2 complete, 4 never), and the workdir given back.
  assert _events(tmp_path)[-3:] == [("saving", 2), ("saved", 2), ("halted", 4)]
  assert "writing checkpoint step 4" in events.read_events(str(tmp_path))[-1]["error"]
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), read_only=True)
  assert ckpt.all_steps() == [2]
  step, _ = ckpt.restore_latest_good(train.setup(tiny_config(**STEPS)).abstract_state)
  assert step == 2  # intact and verified


def _can_mount_tmpfs():
  probe = ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt && echo ok"]
  try:
    return subprocess.run(probe, capture_output=True, text=True, timeout=30).stdout.strip() == "ok"
  except (OSError, subprocess.TimeoutExpired):
    return False


def test_disk_full_on_a_real_small_filesystem(tmp_path):
  """A 1 MiB tmpfs as the checkpoints folder (user + mount namespace): the third save runs out of
  space. The command prints one line naming the step and the last complete one, exits 1, and that
  step is intact (verified by restoring it after copying it out of the namespace)."""
  if not _can_mount_tmpfs():
    pytest.skip("no unprivileged user+mount namespaces here (unshare -rm); the simulated test covers it")
  workdir, saved = tmp_path / "run", tmp_path / "saved"
  (workdir / "checkpoints").mkdir(parents=True)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
  cmd = (f"mount -t tmpfs -o size=1m tmpfs {workdir}/checkpoints && "
         f"{sys.executable} -m llada_jax.cli.train --config=configs/tiny.py --workdir={workdir} "
         "--config.train.num_steps=8 --config.train.checkpoint_every=2 --config.train.max_to_keep=10 "
         f"--config.train.num_samples=0; rc=$?; cp -r {workdir}/checkpoints {saved}; exit $rc")
  r = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=600)
  last = r.stderr.strip().splitlines()[-1]
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert last.startswith("llada-train: error: writing checkpoint step ") and "No space left on device" in last
  complete = int(last.split("the last complete checkpoint is step ")[1].split(".")[0])
  assert complete >= 2
  ckpt = ckpt_lib.Checkpointer(str(saved), read_only=True)
  assert max(ckpt.all_steps()) == complete
  config = tiny_config(**{"train.num_steps": 8, "train.checkpoint_every": 2, "train.max_to_keep": 10,
                          "optim.warmup_steps": 5})
  step, _ = ckpt.restore_latest_good(train.setup(config).abstract_state)
  assert step == complete


def test_a_state_that_does_not_fit_is_a_config_error_not_corruption(reference, tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(reference[1]), read_only=True)
  abstract = train.setup(tiny_config(**STEPS)).abstract_state
  embedding = abstract.params["embedding"]
  wider = jax.ShapeDtypeStruct((embedding.shape[0], embedding.shape[1] + 1), embedding.dtype,
                               sharding=embedding.sharding)
  for params, message in ((dict(abstract.params, extra=embedding), r"has no array \['params'\]\['extra'\]"),
                          (dict(abstract.params, embedding=wider), r"array \['params'\]\['embedding'\] has shape")):
    with pytest.raises(ValueError, match=message) as e:
      ckpt.restore(4, abstract.replace(params=params))
    assert not isinstance(e.value, ckpt_lib.CorruptCheckpoint)
