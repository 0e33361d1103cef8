"""Training survives being killed: real `llada-train` processes (one CPU device each) are sent SIGKILL
at seeded random moments (startup before the tokenizer exists, mid-training, while Orbax is writing an
async checkpoint) or SIGTERM, and restarted with the same command; the run must lose at most the bounded
steps each time and end bit-identical to an uninterrupted run, and its events.jsonl must tell that story.
Driven by llada_jax.testing.soak (benchmarks/soak.py is its command line)."""

import collections
import json
import os
import shutil
import signal

import numpy as np
import pytest

from llada_jax import events, workdir_lock
from llada_jax.data import corpus, pipeline, tokenizer
from llada_jax.testing import soak

NUM_STEPS, EVERY = 40, 5
ARGS = soak.config_args(NUM_STEPS, EVERY)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run of ARGS, shared by the tests; it also fills the compilation cache that every
  later process reads (a restart then costs seconds, not a recompile)."""
  root = tmp_path_factory.mktemp("kill")
  cache = str(root / "jax_cache")
  soak.run_to_end(str(root / "reference"), ARGS, soak.subprocess_env(cache), str(root / "reference.log"))
  return str(root / "reference"), cache


def test_sigkill_at_random_moments_then_restart_ends_identical(reference, tmp_path):
  """SIGKILL before the tokenizer exists, as the first async save of a process starts, after a random
  number of steps, and at a random later point of a save; restarted each time."""
  plan = [soak.Kill("startup"), soak.Kill("mid_save", arg=1), soak.Kill("training"), soak.Kill("mid_save")]
  ref, cache = reference
  report = soak.soak(str(tmp_path), ARGS, seed=3, plan=plan, reference=ref, compile_cache=cache)
  print(report.table())
  assert report.ok, report.table()
  kills = report.interruptions
  assert [i.signal for i in kills] == ["SIGKILL"] * 4 and all(i.exit_code == -signal.SIGKILL for i in kills)
  assert kills[0].phase.startswith("startup") and kills[0].step_at_signal is None  # before the first step
  # The kill as the save was recorded as started cut that write short: the restart goes back to the
  # checkpoint before it.
  assert kills[1].phase == "saving" and kills[1].in_flight_save is not None
  assert kills[1].resumed == kills[1].in_flight_save - EVERY
  for i in kills:
    assert i.resumed == (i.newest_complete or 0)  # the newest complete checkpoint, never an older one
    assert 0 <= i.lost <= i.bound(EVERY)
    if i.in_flight_save is None:
      assert i.lost <= EVERY
  assert sum(i.lost for i in kills) == report.total_lost > 0  # work was lost and redone, and still ...
  c = report.comparison
  assert c.step == c.reference_step == NUM_STEPS
  assert c.params_equal and c.state_equal and c.differing == []  # ... the end is bit-identical,
  assert c.metrics_equal and c.metric_rows > NUM_STEPS  # every re-run step reproduced its loss
  _check_events_after_kills(tmp_path, report)


def _runs(workdir):
  """events.jsonl as {pid: that process's events in order}, in the order the processes wrote."""
  runs = collections.OrderedDict()
  for e in events.read_events(str(workdir)):
    runs.setdefault(e["pid"], []).append(e)
  return runs


def _check_events_after_kills(tmp_path, report):
  """Each process recorded `started` first; a killed one ends without a closing event; every restart
  recorded `resumed` at the newest complete step, never behind a step recorded as `saved`; the last
  process saved what it started saving and ended with `done` at the final step. The lock a killed
  process left was taken over by its restart, and the finished run gave the workdir back."""
  run_dir = tmp_path / "run"
  runs = _runs(run_dir)
  kills = report.interruptions
  killed = [runs[i.pid] for i in kills if i.pid in runs]
  assert len(killed) >= len(kills) - 1  # the start-up kill may land before the run took the workdir
  final = list(runs.values())[-1]
  for run in list(runs.values()):
    assert run[0]["event"] == "started" and run[0]["num_steps"] == NUM_STEPS, run
    assert all(e["host"] == run[0]["host"] for e in run)
  for run in killed:
    assert not {"done", "preempted", "halted", "failed"} & {e["event"] for e in run}, run
  saved_before = 0
  for i in kills:
    run = runs.get(i.pid, [])
    resumed = [e["step"] for e in run if e["event"] == "resumed"]
    if i.start_step:
      assert resumed == [i.start_step]
    assert resumed[0] >= saved_before if resumed else saved_before == 0
    saved = [e["step"] for e in run if e["event"] == "saved"]
    saving = [e["step"] for e in run if e["event"] == "saving"]
    assert saved == saving[:len(saved)] and len(saving) - len(saved) <= 1  # at most the last one cut short
    assert i.newest_saved_event == (max(saved) if saved else None)
    saved_before = max([saved_before] + saved)
    assert i.resumed >= saved_before  # the restart found every step recorded as saved
  kinds = [e["event"] for e in final]
  assert [e["step"] for e in final if e["event"] == "resumed"] == ([kills[-1].resumed] if kills[-1].resumed else [])
  assert [e["step"] for e in final if e["event"] == "saving"] == [e["step"] for e in final if e["event"] == "saved"]
  assert kinds[-1] == "done" and final[-1]["step"] == NUM_STEPS and final[-1]["finished"]
  # Training processes held the workdir when killed; each restart took the lock over, naming the pid.
  for i in kills[1:]:
    assert i.lock_left
    restart_log = (tmp_path / "logs" / f"attempt_{i.attempt + 1:03d}.log").read_text()
    assert "warning: taking over the workdir lock" in restart_log and f"pid {i.pid}," in restart_log
  assert not (run_dir / workdir_lock.LOCK_FILE).exists()


def test_sigterm_saves_the_next_step_exits_0_and_the_restart_resumes_there(reference, tmp_path):
  """SIGTERM after 6 steps of a run that checkpoints every 20: the process saves the step it is at (not
  the next regular checkpoint), exits 0 with the stop message, and the restart continues from exactly
  there to the uninterrupted run's bits (the reference checkpoints every 5; the cadence changes no math)."""
  args = soak.config_args(NUM_STEPS, 20)
  stopped = tmp_path / "stopped"
  keep = lambda i, run: shutil.copytree(run, stopped)  # the workdir as the stopped process left it
  ref, cache = reference
  report = soak.soak(str(tmp_path / "soak"), args, seed=5, plan=[soak.Kill("training", "SIGTERM", arg=6)],
                     reference=ref, compile_cache=cache, on_interrupt=keep)
  print(report.table())
  assert report.ok, report.table()
  [i] = report.interruptions
  assert i.phase == "training" and i.exit_code == 0
  # The events of the stopped process and of its restart, in full; the stop left no lock behind.
  first, second = list(_runs(tmp_path / "soak" / "run").values())
  assert [(e["event"], e["step"]) for e in first] == [
      ("started", None), ("saving", i.stop_saved), ("saved", i.stop_saved), ("preempted", i.stop_saved)]
  assert [(e["event"], e["step"]) for e in second] == [
      ("started", None), ("resumed", i.stop_saved), ("saving", 20), ("saved", 20), ("saving", NUM_STEPS),
      ("saved", NUM_STEPS), ("done", NUM_STEPS)]
  assert not i.lock_left and not (stopped / workdir_lock.LOCK_FILE).exists()
  log = (tmp_path / "soak" / "logs" / "attempt_001.log").read_text()
  assert f"stop requested (SIGTERM): saved step {i.stop_saved}; rerun the same command to resume" in log
  # Saved at a step boundary after the signal and before step 20, ran nothing after it, left no
  # half-written checkpoint; the restart continued from exactly there.
  assert 6 <= i.step_at_signal < i.stop_saved < 20 and i.stop_saved == i.reached
  assert sorted(os.listdir(stopped / "checkpoints")) == [str(i.stop_saved)]
  restart_log = (tmp_path / "soak" / "logs" / "attempt_002.log").read_text()
  assert f"resumed from step {i.stop_saved} in " in restart_log
  assert i.resumed == i.stop_saved and i.lost == 0
  assert report.comparison.params_equal and report.comparison.state_equal and report.comparison.metrics_equal

  # The check can tell a wrong resume: the same stopped workdir continued on another data order ends
  # at the same step with different parameters and losses.
  soak.run_to_end(str(stopped), args + ["--config.data.shuffle_seed=1"], soak.subprocess_env(cache),
                  str(tmp_path / "wrong.log"))
  wrong = soak.compare_runs(str(stopped), ref)
  assert wrong.step == NUM_STEPS and not wrong.params_equal and not wrong.metrics_equal


def _interruption(**kw):
  base = dict(attempt=1, signal="SIGKILL", mode="training", phase="training", at_s=1.0, step_at_signal=16,
              start_step=0, reached=17, exit_code=-9, newest_complete=15, in_flight_save=None, stop_saved=None,
              resumed=15)
  return soak.Interruption(**{**base, **kw})


def test_interruption_checks_flag_lost_work():
  """The bounds the soak enforces fail on the outcomes a broken resume would produce."""
  assert soak.check_interruption(_interruption(), EVERY) == []
  # Resumed from an older checkpoint than the newest complete one: 7 steps lost, and not the newest.
  problems = soak.check_interruption(_interruption(resumed=10), EVERY)
  assert len(problems) == 2 and "newest complete" in problems[0] and "lost 7 steps (bound 5)" in problems[1]
  # The same 7 steps are within bounds when the kill cut the async save of step 15 short.
  assert soak.check_interruption(_interruption(resumed=10, newest_complete=10, in_flight_save=15), EVERY) == []
  # SIGTERM while training: must save the step reached, exit 0 and lose nothing.
  term = dict(signal="SIGTERM", exit_code=0, stop_saved=17, newest_complete=17, resumed=17)
  assert soak.check_interruption(_interruption(**term), EVERY) == []
  problems = " ".join(soak.check_interruption(
      _interruption(**{**term, "stop_saved": 15, "newest_complete": 15, "resumed": 15}), EVERY))
  assert "lost 2 steps (bound 0)" in problems and "preempted event says step 15" in problems
  assert "exit -15" in " ".join(soak.check_interruption(_interruption(**{**term, "exit_code": -15}), EVERY))
  assert "no later process" in " ".join(soak.check_interruption(_interruption(resumed=None), EVERY))
  # `saved` must mean complete on disk; and a process that exited 0 gave its workdir back.
  assert "events.jsonl says step 20 was saved, but the newest complete checkpoint is 15" in " ".join(
      soak.check_interruption(_interruption(newest_saved_event=20), EVERY))
  assert "left its workdir lock" in " ".join(soak.check_interruption(_interruption(**{**term, "lock_left": True}), EVERY))


def test_packed_data_resumes_exactly_from_a_json_saved_state():
  """The iterator state goes through JSON in a checkpoint (grain's Orbax handler). Restored into a fresh
  iterator, every saved position must continue with the very batches the uninterrupted stream gave.
  grain's concat-then-split packing marks "no partial document" with the tuple (-1, -1), which JSON
  turns into a list it took for a partial document: one resume in ~25 (step 491 of the soak) went on
  with other data and ended with other parameters."""
  docs = corpus.generate_documents(200, 0)
  tok = tokenizer.train_sentencepiece(corpus.iter_sentences(docs), 256)
  make = lambda: iter(pipeline.packed_dataset(docs, tok.encode, eos_id=tok.eos_id, seq_len=32, batch_size=8,
                                              seed=0))
  it, states, batches = make(), [], []
  for _ in range(200):
    states.append(json.dumps(it.get_state()))
    batches.append(next(it)["tokens"])
  no_partial = [s for s in states if '"remainder_slices": {"tokens": [-1, -1]}' in s]
  assert len(no_partial) >= 3  # the case that broke is among the positions checked (0 and 2 more)
  for pos in sorted({states.index(s) for s in no_partial} | set(range(1, 198, 20))):
    resumed, state = make(), states[pos]
    resumed.set_state(json.loads(state))
    resumed.start_prefetch()  # as grain's checkpoint handler does after set_state
    for k in range(2):
      np.testing.assert_array_equal(next(resumed)["tokens"], batches[pos + k], err_msg=f"resumed at {pos}")
