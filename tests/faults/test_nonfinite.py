"""NaN/Inf in the loss or gradients: the step is skipped (parameters and optimizer state unchanged),
counted, and a streak of `train.max_nonfinite_streak` halts the run naming the last good checkpoint."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from llada_jax import checkpoint as ckpt_lib, errors, events, train, workdir_lock

BASE = {"train.num_steps": 8, "train.checkpoint_every": 2, "train.num_samples": 0, "train.log_every": 1,
        "optim.warmup_steps": 1}


def _poison_steps(monkeypatch, steps):
  """Makes the loss (and so every gradient) NaN at the given 1-based steps of the loop: the host marks
  that step's batch with a negative token, the patched loss turns a marked batch into NaN."""
  real_loss, real_batch, calls = train._loss, train.global_batch, []

  def loss(config, graphdef, params, batch, rng, *rest, **options):
    value, out = real_loss(config, graphdef, params, batch, rng, *rest, **options)
    return value * jnp.where(jnp.any(batch["tokens"] < 0), jnp.nan, 1.0), out

  def global_batch(s, host_batch):
    calls.append(1)
    if len(calls) in steps:
      host_batch = dict(host_batch, tokens=np.where(np.arange(host_batch["tokens"].shape[1]) == 0, -1,
                                                    host_batch["tokens"]).astype(np.int32))
    return real_batch(s, host_batch)

  monkeypatch.setattr(train, "_loss", loss)
  monkeypatch.setattr(train, "global_batch", global_batch)


def _metrics(workdir):
  return {r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


def test_a_nonfinite_step_changes_nothing_but_the_step_counter(monkeypatch):
  cfg = tiny_config(**BASE)
  _poison_steps(monkeypatch, {2})
  s = train.setup(cfg)
  state = s.init(train.root_key(cfg))
  rng = np.random.default_rng(0)
  batch = lambda: {"tokens": rng.integers(5, 200, (8, 32)).astype(np.int32)}
  state, m1 = s.step(state, train.global_batch(s, batch()))
  before = jax.device_get(state)
  state, m2 = s.step(state, train.global_batch(s, batch()))  # poisoned
  after = jax.device_get(state)
  assert float(m1["nonfinite"]) == 0 and float(m2["nonfinite"]) == 1 and np.isnan(float(m2["loss"]))
  assert int(after.step) == int(before.step) + 1
  for a, b in zip(jax.tree.leaves((after.params, after.opt_state)), jax.tree.leaves((before.params, before.opt_state))):
    np.testing.assert_array_equal(a, b)  # Adam's moments and count too
  state, m3 = s.step(state, train.global_batch(s, batch()))
  assert float(m3["nonfinite"]) == 0 and np.isfinite(float(m3["loss"]))
  assert not np.array_equal(jax.device_get(state.params["embedding"]), after.params["embedding"])


def test_without_skipping_the_parameters_are_poisoned_and_never_saved(monkeypatch, tmp_path, capsys):
  _poison_steps(monkeypatch, {3, 4, 5})
  with pytest.raises(errors.RunHalted, match="3 steps in a row"):
    train.train_and_evaluate(tiny_config(**BASE, **{"train.skip_nonfinite": False,
                                                     "train.max_nonfinite_streak": 3}), str(tmp_path))
  assert "not saving step 4" in capsys.readouterr().err
  assert ckpt_lib.Checkpointer(str(tmp_path), read_only=True).all_steps() == [2]


def test_isolated_nonfinite_steps_are_skipped_and_counted(monkeypatch, tmp_path):
  _poison_steps(monkeypatch, {3, 6, 7})
  out = train.train_and_evaluate(tiny_config(**BASE, **{"train.max_nonfinite_streak": 3}), str(tmp_path))
  assert out["step"] == 8
  m = _metrics(tmp_path)
  assert [s for s in range(1, 9) if m[s]["nonfinite"] == 1] == [3, 6, 7]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(out["state"].params)))
  assert ckpt_lib.Checkpointer(str(tmp_path), read_only=True).latest_step() == 8


def test_a_streak_halts_and_names_the_last_good_checkpoint(monkeypatch, tmp_path):
  _poison_steps(monkeypatch, {5, 6, 7})
  cfg = tiny_config(**BASE, **{"train.max_nonfinite_streak": 3})
  with pytest.raises(errors.RunHalted) as e:
    train.train_and_evaluate(cfg, str(tmp_path))
  msg = str(e.value)
  assert msg.startswith("halted at step 7: 3 steps in a row had a non-finite loss or gradients")
  assert "train.max_nonfinite_streak=3" in msg and f"step 6 in {tmp_path}/checkpoints" in msg
  # events.jsonl: the run halted one step after the streak's last step (flags are read one step late),
  # after steps 2, 4 and 6 were complete; the workdir is free again.
  recorded = events.read_events(str(tmp_path))
  assert [(r["event"], r["step"]) for r in recorded if r["event"] in ("saved", "halted")] == [
      ("saved", 2), ("saved", 4), ("saved", 6), ("halted", 8)]
  assert recorded[-1]["error"] == f"RunHalted: {msg}"
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
  # Step 6 was saved mid-streak, but skipped steps left its parameters those of step 4: still good.
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), read_only=True)
  step, state = ckpt.restore_latest_good(train.setup(cfg).abstract_state)
  four = ckpt.restore(4, train.setup(cfg).abstract_state)
  assert step == 6
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(four.params)):
    np.testing.assert_array_equal(a, b)
