"""Soak: train while being killed, restart each time, and check that nothing but bounded work was lost.

  python benchmarks/soak.py --seconds=300 --seed=0 --kill_fraction=0.7 [--workdir=/tmp/soak]

First an uninterrupted reference run of the config (configs/tiny.py, log_every=1 so every step writes a
metrics row, a small checkpoint_every) trains to the end in WORKDIR/reference; it also warms the JAX
compilation cache that every later process shares and measures the startup times the early kills aim
at. Then the same `llada-train` command trains in WORKDIR/run while this driver, at random moments drawn
from --seed, sends SIGKILL (a --kill_fraction of the time) or SIGTERM and restarts the same command,
for --seconds; after that the run is left to finish. The moments are of three kinds:

  startup   a random time before the first step (in a fresh workdir: before the tokenizer exists;
            the soak's first process is always killed there)
  training  after a random number of steps of this process
  mid_save  the moment the process records `saving` for its k-th checkpoint (or up to 0.1 s later):
            the async checkpoint write is cut short

What a process did is read from the run's own records, never from its printed lines: WORKDIR/run/
events.jsonl (llada_jax/events.py: started, resumed N, saving N, saved N, preempted N, done N; each line
carries the pid) and the rows metrics.jsonl gains while it runs (one per step). Which steps are complete
on disk comes from the checkpoints folder (a step is the folder `checkpoints/N` once Orbax has
finished it).

Each interruption is checked: the restart resumes from the newest complete checkpoint; the newest step
the killed process recorded as `saved` is complete on disk; after a SIGTERM during training the process
saved the step it had reached, recorded `preempted` there, exited 0 and lost nothing (before the loop
starts a SIGTERM still ends the process with -15; nothing is lost either); after a SIGKILL at most
train.checkpoint_every steps were lost, plus, when the kill cut an async save of step S short, the
steps run since S (the in-flight save is lost, never an earlier one: up to 2 * checkpoint_every - 1 in
all, since the next save waits for the previous one). A restart after a SIGKILL takes over the workdir
lock the killed process left. At the end the final train states of both runs are restored with Orbax
and compared leaf by leaf, bit for bit, and every metrics.jsonl row the interrupted run wrote (re-run
steps included) is compared with the reference's. Exit status 1 if any check fails.

The driver runs no JAX computation until the comparison; tests import `soak`, `run_to_end` and
`compare_runs` from here (tests/faults/test_kill.py); benchmarks/soak.py is the command line.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import llada_jax
import llada_jax.configs
from llada_jax import checkpoint as ckpt_lib, events as events_lib, workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(llada_jax.__file__)))
TINY = os.path.join(os.path.dirname(os.path.abspath(llada_jax.configs.__file__)), "tiny.py")
TOKENIZER = "tokenizer.model"
METRICS = "metrics.jsonl"
COMPARED_METRICS = ("loss", "masked_accuracy", "grad_norm", "learning_rate")
MODES = ("startup", "training", "mid_save")


def config_args(num_steps: int = 1000, checkpoint_every: int = 10, config: str = TINY,
                extra: Sequence[str] = ()) -> list[str]:
  """The soak's llada-train flags: every step logged, no samples at the end."""
  return [f"--config={config}", f"--config.train.num_steps={num_steps}",
          f"--config.train.checkpoint_every={checkpoint_every}", "--config.train.log_every=1",
          "--config.train.num_samples=0", *extra]


def train_command(workdir: str, args: Sequence[str]) -> list[str]:
  return [sys.executable, "-m", "llada_jax.cli.train", f"--workdir={workdir}", *args]


def subprocess_env(compile_cache: str | None, platform: str = "cpu") -> dict[str, str]:
  """One device per process (no inherited XLA_FLAGS such as the tests' 8 fake devices); a shared
  persistent compilation cache makes a restart cost seconds instead of a recompile."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = platform
  env["PYTHONUNBUFFERED"] = "1"
  if compile_cache:
    env["JAX_COMPILATION_CACHE_DIR"] = compile_cache
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return env


def complete_steps(workdir: str) -> list[int]:
  """The checkpoint steps complete on disk: `checkpoints/N` folders (Orbax writes elsewhere and renames
  a step to N when it is finished)."""
  try:
    return sorted(int(e.name) for e in os.scandir(os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR))
                  if e.name.isdigit())
  except FileNotFoundError:
    return []


class _Tail:
  """The complete JSON lines a file gains after `offset` (a line still being written waits)."""

  def __init__(self, path: str):
    self.path = path
    try:
      self._offset = os.path.getsize(path)
    except FileNotFoundError:
      self._offset = 0
    self._partial = b""

  def new_rows(self) -> list[dict]:
    try:
      with open(self.path, "rb") as f:
        f.seek(self._offset)
        data = f.read()
    except FileNotFoundError:
      return []
    self._offset += len(data)
    *lines, self._partial = (self._partial + data).split(b"\n")
    rows = []
    for line in lines:
      try:
        row = json.loads(line)
      except ValueError:
        continue  # torn by an earlier kill
      if isinstance(row, dict):
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------
# One training process.


class Attempt:
  """One llada-train process. Its output goes to a log file (and a short tail for error messages); what
  it did is read, as it happens, from the events it records and the metrics rows it writes."""

  def __init__(self, index: int, workdir: str, args: Sequence[str], env: dict[str, str], log_path: str):
    self.index, self.workdir = index, workdir
    self._log = open(log_path, "w", encoding="utf-8")
    self._cond = threading.Condition()
    self._events = _Tail(os.path.join(workdir, events_lib.EVENTS_FILE))
    self._metrics = _Tail(os.path.join(workdir, METRICS))
    self.events: list[dict] = []            # this process's events.jsonl lines
    self.steps_logged = 0                   # metrics rows of training steps this process wrote
    self.last_step: int | None = None       # the step of the last of them
    self.total_steps: int | None = None     # train.num_steps (its `started` event)
    self.resumed: int | None = None         # `resumed` N
    self.stop_saved: int | None = None      # `preempted` N: saved step N after a SIGTERM
    self.done_step: int | None = None       # `done` N
    self.finished = False                   # `done` at train.num_steps
    self.saving: list[int] = []             # `saving` N, in order
    self.saved: list[int] = []              # `saved` N, in order
    self.first_step_s: float | None = None  # seconds from launch to the first metrics row
    self.tokenizer_s: float | None = None   # run_to_end: seconds until the workdir's tokenizer appeared
    self.tail: collections.deque[str] = collections.deque(maxlen=30)
    self._eof = False
    self.t0 = time.monotonic()
    self.proc = subprocess.Popen(train_command(workdir, args), env=env, cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
    self._stop_watching = threading.Event()
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._watcher = threading.Thread(target=self._watch, daemon=True)
    self._reader.start()
    self._watcher.start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      self._log.write(line)
      with self._cond:
        self.tail.append(line.rstrip())
    self.proc.wait()
    self.poll()  # what the process recorded just before it exited
    with self._cond:
      self._eof = True
      self._cond.notify_all()

  def _watch(self) -> None:
    while not self._stop_watching.wait(0.001):
      self.poll()

  def poll(self) -> None:
    """Reads the rows the process's files gained since the last poll."""
    with self._cond:
      changed = False
      for row in self._metrics.new_rows():
        if "loss" in row:  # a training step (validation rows hold eval_* only)
          changed = True
          self.steps_logged += 1
          self.last_step = int(row["step"])
          if self.first_step_s is None:
            self.first_step_s = time.monotonic() - self.t0
      for e in self._events.new_rows():
        if e.get("pid") != self.proc.pid:
          continue
        changed = True
        self.events.append(e)
        kind, step = e["event"], e.get("step")
        if kind == "started":
          self.total_steps = e.get("num_steps")
        elif kind == "resumed":
          self.resumed = step
        elif kind == "saving":
          self.saving.append(step)
        elif kind == "saved":
          self.saved.append(step)
        elif kind == "preempted":
          self.stop_saved = step
        elif kind == "done":
          self.done_step, self.finished = step, bool(e.get("finished"))
      if changed:
        self._cond.notify_all()

  @property
  def start_step(self) -> int | None:
    """The step this process started from: its `resumed` event, else 0 once it has trained (None:
    unknown)."""
    if self.resumed is not None:
      return self.resumed
    return 0 if self.steps_logged or self.done_step is not None else None

  @property
  def elapsed(self) -> float:
    return time.monotonic() - self.t0

  def alive(self) -> bool:
    return self.proc.poll() is None

  def wait_for(self, predicate: Callable[["Attempt"], bool], deadline: float) -> bool:
    """Waits until `predicate(self)`, the process's end, or the deadline; returns predicate."""
    with self._cond:
      while not predicate(self) and not self._eof and time.monotonic() < deadline:
        self._cond.wait(min(0.05, max(deadline - time.monotonic(), 0.001)))
      return predicate(self)

  def signal(self, sig: int) -> None:
    """SIGKILL takes the whole process group (the machine is gone); SIGTERM goes to the trainer only,
    as a scheduler's preemption notice does."""
    if self.proc.poll() is not None:
      return
    if sig == signal.SIGKILL:
      os.killpg(self.proc.pid, signal.SIGKILL)
    else:
      self.proc.send_signal(sig)

  def finish(self, timeout: float) -> int | None:
    """Waits for the process to exit; returns its exit status, or None if it is still running."""
    try:
      rc = self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      return None
    self._close()
    return rc

  def kill_now(self) -> None:
    if self.proc.poll() is None:
      os.killpg(self.proc.pid, signal.SIGKILL)
      self.proc.wait()
    self._close()

  def _close(self) -> None:
    self._reader.join(timeout=30)
    self._stop_watching.set()
    self._watcher.join(timeout=30)
    if not self._log.closed:
      self._log.close()


def run_to_end(workdir: str, args: Sequence[str], env: dict[str, str], log_path: str,
               timeout: float = 1800) -> Attempt:
  """One uninterrupted run (the reference, or the last leg of a soak); raises if it fails. Records when
  the tokenizer appeared (`tokenizer_s`) for the early kills to aim at."""
  a = Attempt(0, workdir, args, env, log_path)
  deadline = time.monotonic() + timeout
  while a.alive() and time.monotonic() < deadline:
    if a.tokenizer_s is None and os.path.exists(os.path.join(workdir, TOKENIZER)):
      a.tokenizer_s = a.elapsed
    time.sleep(0.02)
  rc = a.finish(timeout=max(deadline - time.monotonic(), 1))
  if rc is None:
    a.kill_now()
    raise RuntimeError(f"run in {workdir} did not finish in {timeout:.0f}s; see {log_path}")
  if rc != 0 or not a.finished:
    raise RuntimeError(f"run in {workdir} failed (exit {rc}); last output:\n" + "\n".join(a.tail))
  return a


# ---------------------------------------------------------------------------------------------------
# Interruptions and their checks.


@dataclasses.dataclass(frozen=True)
class Kill:
  """One planned interruption: `mode` in MODES; `arg` is the delay in seconds (startup), the number of
  this process's steps (training) or which of its saves to cut (mid_save); None draws it at random."""
  mode: str
  signal: str = "SIGKILL"
  arg: float | None = None


@dataclasses.dataclass
class Interruption:
  attempt: int
  signal: str                       # SIGKILL | SIGTERM
  mode: str                         # the planned moment (MODES)
  phase: str                        # what the process was doing when the signal was sent
  at_s: float                       # seconds after the process started
  step_at_signal: int | None        # last step the process had logged when the signal was sent
  start_step: int | None            # step the process had started from (None: killed before it knew)
  reached: int                      # last step it reached (metrics row or checkpoint, whichever later)
  exit_code: int
  newest_complete: int | None       # newest finished checkpoint on disk after it died
  in_flight_save: int | None        # step of a save this process had started and not finished
  stop_saved: int | None            # SIGTERM: the step its `preempted` event says it saved
  resumed: int | None = None        # the step the next process resumed from
  newest_saved_event: int | None = None  # the newest step this process recorded as `saved`
  lock_left: bool = False           # WORKDIR/lock.json was still there after the process ended
  pid: int | None = None            # the process's pid (its lines in events.jsonl carry it)
  problems: list[str] = dataclasses.field(default_factory=list)

  @property
  def lost(self) -> int | None:
    return None if self.resumed is None else self.reached - self.resumed

  def bound(self, checkpoint_every: int) -> int:
    """Steps this interruption may lose: none after a SIGTERM; after a SIGKILL one checkpoint interval,
    plus the steps run since an async save that the kill cut short (that save is lost, not an older one)."""
    if self.signal == "SIGTERM":
      return 0
    extra = self.reached - self.in_flight_save if self.in_flight_save is not None else 0
    return checkpoint_every + max(extra, 0)


def check_interruption(i: Interruption, checkpoint_every: int) -> list[str]:
  """What went wrong with one interruption (empty: nothing)."""
  problems = []
  if i.newest_saved_event is not None and i.newest_saved_event > (i.newest_complete or 0):
    problems.append(f"attempt {i.attempt}: events.jsonl says step {i.newest_saved_event} was saved, but the "
                    f"newest complete checkpoint is {i.newest_complete}")
  if i.resumed is None:
    return problems + [f"attempt {i.attempt}: no later process resumed the run"]
  expected = i.newest_complete if i.newest_complete is not None else 0
  if i.resumed != expected:
    problems.append(f"attempt {i.attempt}: the restart resumed from step {i.resumed}, not from the newest "
                    f"complete checkpoint ({expected})")
  if i.lost < 0:
    problems.append(f"attempt {i.attempt}: resumed from step {i.resumed}, beyond the step reached ({i.reached})")
  elif i.lost > i.bound(checkpoint_every):
    problems.append(f"attempt {i.attempt}: {i.signal} lost {i.lost} steps (bound {i.bound(checkpoint_every)})")
  if i.signal == "SIGTERM" and i.phase in ("training", "saving"):
    # The handler was installed (the process had trained): it must save at the next step and exit 0.
    if i.exit_code != 0 or i.stop_saved is None:
      problems.append(f"attempt {i.attempt}: SIGTERM while training ended with exit {i.exit_code} and "
                      f"{'no' if i.stop_saved is None else 'a'} preempted event")
    elif i.stop_saved != i.reached:
      problems.append(f"attempt {i.attempt}: SIGTERM: the preempted event says step {i.stop_saved}, but it "
                      f"reached step {i.reached}")
  if i.exit_code == 0 and i.lock_left:
    problems.append(f"attempt {i.attempt}: exited 0 but left its workdir lock behind")
  if i.signal == "SIGKILL" and i.exit_code != -signal.SIGKILL:
    problems.append(f"attempt {i.attempt}: SIGKILL but exit status {i.exit_code}")
  return problems


# ---------------------------------------------------------------------------------------------------
# Comparing the end results.


def restore_state(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """The train state of a checkpoint (default: the newest) as {leaf path: numpy array}, read with Orbax
  directly (no model code, no devices): the same bytes whatever mesh wrote them."""
  import logging

  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  folder = os.path.join(os.path.abspath(workdir), "checkpoints")
  steps = sorted(int(n) for n in os.listdir(folder) if n.isdigit())
  step = steps[-1] if step is None else step
  path = os.path.join(folder, str(step), "state")
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # "Metadata file does not exist" for a bare item
  try:  # (the caller's logging is left as it was: tests read warnings in the same process)
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = checkpointer.restore(path, restore_args=restore_args)
    checkpointer.close()
  finally:
    absl_logger.setLevel(level)
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  return step, {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def _same_bits(a, b) -> bool:
  import numpy as np
  return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
      np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def _metrics_rows(workdir: str) -> tuple[dict[int, list[dict]], int]:
  rows: dict[int, list[dict]] = collections.defaultdict(list)
  bad = 0
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        bad += 1
        continue
      rows[int(row["step"])].append(row)
  return rows, bad


@dataclasses.dataclass
class Comparison:
  step: int
  reference_step: int
  params_equal: bool
  state_equal: bool
  leaves: int
  differing: list[str]
  metric_rows: int              # metrics.jsonl rows of the interrupted run compared with the reference
  metric_mismatches: list[str]
  bad_metric_lines: int         # lines of metrics.jsonl that are not JSON (a torn write)

  @property
  def metrics_equal(self) -> bool:
    return not self.metric_mismatches and not self.bad_metric_lines


def compare_runs(workdir: str, reference: str) -> Comparison:
  """Final train state (bit for bit, per leaf) and per-step metrics of `workdir` against `reference`."""
  step, state = restore_state(workdir)
  ref_step, ref_state = restore_state(reference)
  differing = sorted(k for k in set(state) | set(ref_state)
                     if k not in state or k not in ref_state or not _same_bits(state[k], ref_state[k]))
  params = [k for k in ref_state if k.startswith("['params']") or k.startswith(".params")]
  rows, bad = _metrics_rows(workdir)
  ref_rows, ref_bad = _metrics_rows(reference)
  mismatches, compared = [], 0
  for s, group in sorted(rows.items()):
    ref = ref_rows.get(s)
    if not ref:
      mismatches.append(f"step {s}: not in the reference's metrics")
      continue
    for row in group:
      compared += 1
      for name in COMPARED_METRICS:
        if name in row and name in ref[0] and not (row[name] == ref[0][name] or
                                                   (math.isnan(row[name]) and math.isnan(ref[0][name]))):
          mismatches.append(f"step {s}: {name} {row[name]!r} != reference {ref[0][name]!r}")
  return Comparison(step, ref_step, params_equal=bool(params) and not any(k in differing for k in params),
                    state_equal=not differing and step == ref_step, leaves=len(ref_state), differing=differing,
                    metric_rows=compared, metric_mismatches=mismatches, bad_metric_lines=bad + ref_bad)


# ---------------------------------------------------------------------------------------------------
# The soak.


@dataclasses.dataclass
class Report:
  workdir: str
  checkpoint_every: int
  num_steps: int
  interruptions: list[Interruption]
  finished: bool
  comparison: Comparison | None
  problems: list[str]
  wall_s: float
  attempts: int

  @property
  def ok(self) -> bool:
    return (self.finished and not self.problems and self.comparison is not None and
            self.comparison.params_equal and self.comparison.state_equal and self.comparison.metrics_equal)

  def survived(self) -> dict[str, int]:
    counts = collections.Counter(i.signal for i in self.interruptions if i.resumed is not None)
    return {"SIGKILL": counts["SIGKILL"], "SIGTERM": counts["SIGTERM"]}

  @property
  def total_lost(self) -> int:
    return sum(i.lost or 0 for i in self.interruptions)

  def table(self) -> str:
    c = self.checkpoint_every
    head = ["#", "signal", "moment", "at s", "signal at step", "reached step", "in-flight save",
            "resumed from", "steps lost", "bound", "exit", "ok"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("-" * (len(h) + 2) for h in head) + "|"]
    for n, i in enumerate(self.interruptions, 1):
      cells = [n, i.signal, i.phase, f"{i.at_s:.1f}", "-" if i.step_at_signal is None else i.step_at_signal,
               i.reached,
               "-" if i.in_flight_save is None else i.in_flight_save,
               "-" if i.resumed is None else i.resumed, "-" if i.lost is None else i.lost, i.bound(c),
               i.exit_code, "yes" if not i.problems else "NO"]
      lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    s = self.survived()
    phases = collections.Counter(i.phase for i in self.interruptions)
    lost = collections.defaultdict(list)
    for i in self.interruptions:
      if i.lost is not None:
        lost[i.signal].append(i.lost)
    lines += [
        "",
        f"restarts survived: {sum(s.values())} of {len(self.interruptions)} (SIGKILL {s['SIGKILL']}, "
        f"SIGTERM {s['SIGTERM']}); moments: " + ", ".join(f"{k} {v}" for k, v in sorted(phases.items())),
        f"async saves cut short (recorded saving, never saved): "
        f"{sum(i.in_flight_save is not None for i in self.interruptions)}",
        f"steps lost: total {self.total_lost}; max " +
        ", ".join(f"{k} {max(v)}" for k, v in sorted(lost.items())) +
        f" (checkpoint_every {c}, num_steps {self.num_steps})",
    ]
    if self.comparison:
      cmp = self.comparison
      lines += [
          f"final step {cmp.step} (reference {cmp.reference_step}); final params equal: {cmp.params_equal}; "
          f"full train state equal: {cmp.state_equal} ({cmp.leaves} leaves"
          + (f", differing: {', '.join(cmp.differing[:5])}" if cmp.differing else "") + ")",
          f"metrics.jsonl rows equal to the reference's: {cmp.metrics_equal} ({cmp.metric_rows} rows, re-run "
          f"steps included; {len(cmp.metric_mismatches)} mismatches, {cmp.bad_metric_lines} unreadable lines)",
      ]
    else:
      lines.append("final params equal: n/a (the run did not finish)")
    lines.append(f"processes started: {self.attempts}; soak wall time {self.wall_s:.0f}s")
    for p in self.problems:
      lines.append(f"PROBLEM: {p}")
    lines.append(f"result: {'PASS' if self.ok else 'FAIL'}")
    return "\n".join(lines)


def _read_train_config(workdir: str) -> dict:
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    return json.load(f)["train"]


def soak(workdir: str, args: Sequence[str], *, seconds: float = 300, seed: int = 0,
         kill_fraction: float = 0.7, weights: dict[str, float] | None = None,
         plan: Sequence[Kill] | None = None, reference: str | None = None,
         compile_cache: str | None = "", platform: str = "cpu", term_timeout: float = 120,
         attempt_timeout: float = 900, max_crashes: int = 3,
         on_interrupt: Callable[[Interruption, str], None] | None = None,
         log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> Report:
  """Kills and restarts `llada-train --workdir=WORKDIR/run ARGS` (see the module docstring); returns the
  report. `plan` replaces the random moments by a fixed list of kills (one per process; --seconds is then
  ignored). `reference`: an existing finished reference workdir (else one is trained in
  WORKDIR/reference). `compile_cache`: "" for WORKDIR/jax_cache, None for none. `on_interrupt(i, run)`
  is called after each interruption, before the restart."""
  t_begin = time.monotonic()
  os.makedirs(workdir, exist_ok=True)
  run_dir, logs = os.path.join(workdir, "run"), os.path.join(workdir, "logs")
  os.makedirs(logs, exist_ok=True)
  if compile_cache == "":
    compile_cache = os.path.join(workdir, "jax_cache")
  env = subprocess_env(compile_cache, platform)
  rng = random.Random(seed)
  weights = weights or {"startup": 0.15, "training": 0.5, "mid_save": 0.35}

  tokenizer_s, first_step_s = 1.5, 3.0  # guesses until a process shows the real ones
  if reference is None:
    reference = os.path.join(workdir, "reference")
    log(f"[soak] reference run in {reference}")
    ref = run_to_end(reference, args, env, os.path.join(logs, "reference.log"), timeout=attempt_timeout)
    tokenizer_s = ref.tokenizer_s or tokenizer_s
    log(f"[soak] reference: {ref.done_step} steps in {ref.elapsed:.0f}s (tokenizer after "
        f"{tokenizer_s:.1f}s, first step after {ref.first_step_s:.1f}s)")

  plan = list(plan) if plan is not None else None
  deadline = time.monotonic() + (math.inf if plan is not None else seconds)
  interruptions: list[Interruption] = []
  problems: list[str] = []
  pending: list[Interruption] = []   # interruptions waiting for a process that knows its start step
  finished, crashes, index = False, 0, 0
  attempt = None
  try:
    while True:
      index += 1
      fresh = not os.path.exists(os.path.join(run_dir, TOKENIZER))
      attempt = Attempt(index, run_dir, args, env, os.path.join(logs, f"attempt_{index:03d}.log"))
      kill = None
      if plan is not None:
        kill = plan.pop(0) if plan else None
      elif time.monotonic() < deadline:
        mode = rng.choices(list(weights), weights=list(weights.values()))[0]
        if index == 1 and fresh:
          mode = "startup"  # every soak kills one process while it trains the workdir's tokenizer
        kill = Kill(mode, "SIGKILL" if rng.random() < kill_fraction else "SIGTERM")
      sent = None
      if kill is not None:
        sent = _interrupt(attempt, kill, rng, run_dir, deadline, fresh=fresh, tokenizer_s=tokenizer_s,
                          first_step_s=first_step_s, checkpoint_every_hint=_checkpoint_every_hint(args))
      timeout = term_timeout if sent and sent[0] == "SIGTERM" else attempt_timeout
      rc = attempt.finish(timeout)
      if rc is None:
        problems.append(f"attempt {index}: still running {timeout:.0f}s after "
                        f"{sent[0] if sent else 'its start'}; killed")
        attempt.kill_now()
        rc = attempt.proc.returncode
      if attempt.first_step_s is not None and attempt.resumed is not None:
        first_step_s = 0.5 * first_step_s + 0.5 * attempt.first_step_s
      # The start step of this process settles every earlier interruption still waiting for one.
      if attempt.start_step is not None:
        for p in pending:
          p.resumed = attempt.start_step
        pending = []
      if attempt.finished and (rc == 0 or sent):
        finished = True
        log(f"[soak] attempt {index}: finished at step {attempt.done_step}")
        break
      done = complete_steps(run_dir)
      newest = done[-1] if done else None
      start = attempt.start_step
      reached = max([attempt.last_step or 0, start or 0] + ([newest] if done else []))
      # A save it recorded as started that neither completed nor was followed by a newer complete step.
      in_flight = [s for s in attempt.saving if s not in attempt.saved and s > (newest or 0)]
      if sent is None:
        crashes += 1
        problems.append(f"attempt {index}: exited with {rc} without being signalled; last output:\n  " +
                        "\n  ".join(list(attempt.tail)[-8:]))
        if crashes >= max_crashes:
          log(f"[soak] {crashes} crashes in a row: giving up")
          break
        continue
      else:
        crashes = 0
        sig, mode, phase, at_s, at_step = sent
        i = Interruption(index, sig, mode, phase, at_s, at_step, start, reached, rc, newest,
                         max(in_flight) if in_flight else None, attempt.stop_saved,
                         newest_saved_event=max(attempt.saved) if attempt.saved else None,
                         lock_left=os.path.exists(os.path.join(run_dir, workdir_lock.LOCK_FILE)),
                         pid=attempt.proc.pid)
        interruptions.append(i)
        pending.append(i)
        log(f"[soak] attempt {index}: {sig} at {at_s:.1f}s ({phase}), step {reached}, exit {rc}, newest "
            f"checkpoint {i.newest_complete}, in-flight save {i.in_flight_save}")
      if on_interrupt is not None:
        on_interrupt(i, run_dir)
  except BaseException:
    if attempt is not None:
      attempt.kill_now()
    raise

  train_cfg = _read_train_config(run_dir) if os.path.exists(os.path.join(run_dir, "config.json")) else {}
  c = int(train_cfg.get("checkpoint_every", _checkpoint_every_hint(args) or 0))
  for i in interruptions:
    i.problems = check_interruption(i, c)
    problems.extend(i.problems)
  if plan:
    problems.append(f"the run finished before {len(plan)} planned kills")
  comparison = compare_runs(run_dir, reference) if finished else None
  if not finished:
    problems.append("the interrupted run did not finish")
  return Report(workdir, c, int(train_cfg.get("num_steps", 0)), interruptions, finished, comparison, problems,
                time.monotonic() - t_begin, index)


def _checkpoint_every_hint(args: Sequence[str]) -> int | None:
  for a in args:
    if a.startswith("--config.train.checkpoint_every="):
      return int(a.split("=", 1)[1])
  return None


def _interrupt(a: Attempt, kill: Kill, rng: random.Random, run_dir: str, deadline: float, *, fresh: bool,
               tokenizer_s: float, first_step_s: float,
               checkpoint_every_hint: int | None) -> tuple[str, str, str, float, int | None] | None:
  """Waits for the moment `kill` names, sends its signal; returns (signal, mode, phase, seconds, last
  logged step) or None if the process ended first (or the soak's time ran out)."""
  c = checkpoint_every_hint or 10
  sig = getattr(signal, kill.signal)
  if kill.mode == "startup":
    # A fresh workdir: before the tokenizer exists; a resumed one: before the first step.
    horizon = tokenizer_s if fresh else first_step_s
    delay = kill.arg if kill.arg is not None else rng.uniform(0.1, 0.9) * horizon
    a.wait_for(lambda _: False, min(a.t0 + delay, deadline))
  elif kill.mode == "training":
    steps = int(kill.arg) if kill.arg is not None else rng.randint(1, 4 * c)
    a.wait_for(lambda x: x.steps_logged >= steps, deadline)
    time.sleep(rng.uniform(0, 0.03))  # anywhere inside the next step
  elif kill.mode == "mid_save":
    nth = int(kill.arg) if kill.arg is not None else rng.choice([1, 1, 2, 3])
    if not a.wait_for(lambda x: len(x.saving) >= nth, deadline):
      return None
    target = a.saving[nth - 1]
    if kill.arg is None and rng.random() < 0.5:
      time.sleep(rng.uniform(0, 0.1))  # later inside the write
  else:
    raise ValueError(f"kill mode must be one of {MODES}; got {kill.mode!r}")
  if not a.alive() or time.monotonic() >= deadline:
    return None
  with a._cond:
    logged, at_step = a.steps_logged, a.last_step
  if not logged:
    phase = "startup, no tokenizer yet" if not os.path.exists(os.path.join(run_dir, TOKENIZER)) else "startup"
  elif kill.mode == "mid_save" and target not in a.saved and target not in complete_steps(run_dir):
    phase = "saving"  # the write is still in progress
  else:
    phase = "training"
  at = a.elapsed
  a.signal(sig)
  return kill.signal, kill.mode, phase, at, at_step


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seconds", type=float, default=300, help="how long to keep killing (then the run "
                      "is left to finish)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments and signals")
  parser.add_argument("--kill_fraction", type=float, default=0.7, help="share of SIGKILLs (the rest SIGTERM)")
  parser.add_argument("--workdir", default=None, help="where the runs, logs and compilation cache go "
                      "(default: a new folder under /tmp); must not hold an earlier soak")
  parser.add_argument("--config", default=TINY)
  parser.add_argument("--num_steps", type=int, default=1000)
  parser.add_argument("--checkpoint_every", type=int, default=10)
  parser.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                      help="more config overrides, e.g. --override=train.max_to_keep=2 (repeatable)")
  parser.add_argument("--weights", default="startup=0.15,training=0.5,mid_save=0.35",
                      help="how often each kind of moment is drawn")
  parser.add_argument("--reference", default=None, help="a finished reference workdir of the same command")
  parser.add_argument("--no_compile_cache", action="store_true", help="every process compiles from scratch")
  flags = parser.parse_args(argv)
  workdir = flags.workdir or tempfile.mkdtemp(prefix="llada_soak_")
  if os.path.exists(os.path.join(workdir, "run")):
    parser.error(f"{workdir} already holds a soak run; pick a new --workdir")
  weights = {k: float(v) for k, v in (kv.split("=") for kv in flags.weights.split(","))}
  if set(weights) - set(MODES):
    parser.error(f"--weights names must be among {MODES}")
  args = config_args(flags.num_steps, flags.checkpoint_every, flags.config,
                     [f"--config.{o}" for o in flags.override])
  print(f"soak: {' '.join(train_command(os.path.join(workdir, 'run'), args))}", flush=True)
  print(f"seconds={flags.seconds:g} seed={flags.seed} kill_fraction={flags.kill_fraction:g} "
        f"weights={flags.weights} workdir={workdir}", flush=True)
  report = soak(workdir, args, seconds=flags.seconds, seed=flags.seed, kill_fraction=flags.kill_fraction,
                weights=weights, reference=flags.reference,
                compile_cache=None if flags.no_compile_cache else "")
  print(report.table(), flush=True)
  return 0 if report.ok else 1


if __name__ == "__main__":
  sys.exit(main())
