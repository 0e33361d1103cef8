"""Run control: everything a training run does besides stepping the model.

`RunControl` wraps the loop of `train.train_and_evaluate`. On entry it listens for SIGTERM, takes the
workdir (workdir_lock: one run at a time) and records `started` (events.py: WORKDIR/events.jsonl). During
the run it says when to stop — the end step (`train.num_steps`, or `--stop_at_step` for a time-limited
allocation) or a preemption notice at the next step boundary — and records which checkpoints are being
written and which are complete. On exit, an error included, it lets a checkpoint being written finish
(unless writing is what failed), records how the run ended, gives the workdir back and restores the
SIGTERM handler. `NonfiniteWatch` halts a run whose steps keep coming out NaN/Inf.
"""

from __future__ import annotations

import signal
import sys

import jax

from llada_jax import checkpoint as ckpt_lib, errors, events as events_lib, workdir_lock


def end_step(num_steps: int, stop_at: int | None) -> int:
  """The last step this run trains: `num_steps`, or `stop_at` when that comes first. The schedule
  still follows `num_steps`, so a later run resumes exactly where this one stopped."""
  return num_steps if stop_at is None else min(stop_at, num_steps)


class PreemptionNotice:
  """Whether the job has been asked to stop (TPU maintenance events and preemptions send SIGTERM).

  One process: a SIGTERM handler sets a flag that the loop reads after each step. Several processes:
  JAX's preemption service (started by `jax.distributed.initialize`) catches SIGTERM on any host and
  agrees on one step at which *every* host sees True (Orbax's sync point), so all hosts save the same
  step and none is left waiting in a collective; a per-host Python handler could not promise that.
  """

  def __init__(self):
    self.ckpt: ckpt_lib.Checkpointer | None = None  # set once the run has one (multi-host sync point)
    self._signalled = False
    self._previous = None

  def __enter__(self) -> "PreemptionNotice":
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._signalled = True

  def __call__(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self.ckpt.reached_preemption(step)
    return self._signalled

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class NonfiniteWatch:
  """Counts steps with a non-finite loss or gradients and halts after `max_nonfinite_streak` in a row.

  Each step's flag is read one step late (after the next step is dispatched), so watching never stalls
  the device; a halt comes at most one step after the streak's last step, and saves wait for the flag of
  the step they save. With `skip_nonfinite` the bad steps changed nothing, so every save is good; without
  it the parameters are NaN from the first bad step on and are never saved again.
  """

  def __init__(self, cfg, ckpt: ckpt_lib.Checkpointer):
    self._cfg, self._ckpt = cfg, ckpt
    self._pending: tuple[int, jax.Array] | None = None
    self.streak, self.total, self._poisoned = 0, 0, False

  def add(self, step: int, flag: jax.Array) -> None:
    self._check()
    self._pending = (step, flag)

  def state_is_good(self, step: int) -> bool:
    self._check()  # the flag of `step` itself
    if self._poisoned and jax.process_index() == 0:
      print(f"warning: not saving step {step}: the parameters are non-finite (train.skip_nonfinite=False)",
            file=sys.stderr, flush=True)
    return not self._poisoned

  def _check(self) -> None:
    if self._pending is None:
      return
    step, flag = self._pending
    self._pending = None
    if not bool(jax.device_get(flag)):
      self.streak = 0
      return
    self.streak += 1
    self.total += 1
    self._poisoned |= not self._cfg.skip_nonfinite
    if self.streak >= self._cfg.max_nonfinite_streak:
      self._ckpt.wait()
      last = self._ckpt.latest_step()
      where = (f"step {last} in {self._ckpt.directory}" if last is not None else "none (no step was saved)")
      raise errors.RunHalted(
          f"halted at step {step}: {self.streak} steps in a row had a non-finite loss or gradients "
          f"(train.max_nonfinite_streak={self._cfg.max_nonfinite_streak}; {self.total} in this run). The last "
          f"good checkpoint is {where}; lower optim.peak_lr or look for bad data near this step, "
          "then rerun to resume from it")


def finish_writing(ckpt: ckpt_lib.Checkpointer) -> None:
  """Waits for a checkpoint being written; its failure is only a warning here (the run is already
  ending with another error)."""
  try:
    ckpt.wait()
  except errors.RunHalted as e:
    print(f"warning: {e}", file=sys.stderr, flush=True)


class RunControl:
  """The run's hold on its workdir, its events, its stop conditions and its orderly exit (module doc).

    with RunControl(workdir, config.train, stop_at=stop_at) as control:
      ...; control.attach(ckpt); control.begin(start, resumed=...)
      for step in range(start, control.end):
        ...; control.step_done(done); stop = control.stop_requested(done)
        ...; ckpt.save(...); control.saving(done)
      ckpt.wait(); control.finish(preempted)
  """

  def __init__(self, workdir: str, train_cfg, *, stop_at: int | None = None):
    self.end = end_step(train_cfg.num_steps, stop_at)
    self._num_steps, self._stop_at = train_cfg.num_steps, stop_at
    self.events = events_lib.EventLog(workdir)
    self._lock = workdir_lock.WorkdirLock(workdir)
    self._preemption = PreemptionNotice()
    self._ckpt: ckpt_lib.Checkpointer | None = None
    self.step: int | None = None  # the last step trained, for the record of how the run ended
    self._ended = False

  def __enter__(self) -> "RunControl":
    # The handler goes in first: a SIGTERM during start-up (lock, data, tokenizer, compile, restore) is
    # honoured at the first step like any other instead of killing the process mid-way.
    self._preemption.__enter__()
    try:
      self._lock.acquire()  # before anything is written to the workdir
    except BaseException:
      self._preemption.__exit__()
      raise
    self.events.write("started", None, num_steps=self._num_steps, stop_at=self._stop_at)
    return self

  def attach(self, ckpt: ckpt_lib.Checkpointer) -> None:
    """The run's checkpointer: its saves are recorded, and on several hosts it is the preemption sync
    point."""
    self._ckpt = self._preemption.ckpt = ckpt

  def begin(self, step: int, *, resumed: bool) -> None:
    """Training starts at `step`: restored from that checkpoint (`resumed`), or a fresh state."""
    self.step = step
    if resumed:
      self.events.write("resumed", step)

  def stop_requested(self, step: int) -> bool:
    """After `step`: has a SIGTERM (on any host) asked the run to save and stop?"""
    return self._preemption(step)

  def step_done(self, step: int) -> None:
    """Called after each step is dispatched: records saves that have completed since (never blocks)."""
    self.step = step
    self._record_saves()

  def saving(self, step: int) -> None:
    """A save of `step` has started (an async one is still being written)."""
    self._record_saves()  # the previous save, which this one waited for
    self.events.write("saving", step)

  def finish(self, preempted: bool) -> None:
    """The loop ended normally and its last save is complete: records it and how the run ended."""
    self._record_saves()
    step = self.step
    if preempted:
      self.events.write("preempted", step)
    else:
      self.events.write("done", step, finished=step == self._num_steps)
    self._ended = True

  def _record_saves(self) -> None:
    if self._ckpt is not None:
      for step in self._ckpt.committed():
        self.events.write("saved", step)

  def __exit__(self, exc_type, exc, tb) -> None:
    try:
      if isinstance(exc, (Exception, KeyboardInterrupt)):
        # An error mid-run (bad data, Ctrl-C, a halt) still lets a checkpoint being written complete,
        # unless writing is what failed.
        if self._ckpt is not None and not isinstance(exc, errors.RunHalted):
          finish_writing(self._ckpt)
        try:
          self._record_saves()
        except errors.RunHalted:
          pass  # the write that failed is in the error being raised (or was just warned about)
      if exc is not None and not self._ended:
        kind = "halted" if isinstance(exc, errors.RunHalted) else "failed"
        try:
          self.events.write(kind, self.step, error=_one_line(exc))
        except OSError:
          pass  # (a full disk, say) the error being raised is the one to report
    finally:
      self._lock.release()
      self._preemption.__exit__()


def _one_line(e: BaseException) -> str:
  text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
  return f"{type(e).__name__}: {text}"[:1000]

