"""WORKDIR/events.jsonl: what each training run did, as data, for tools and tests to read.

One JSON object per line, appended by process 0 of each run. Every line holds

  {"event": NAME, "step": int or null, "time": unix seconds, "pid": int, "host": str, ...}

and the events are, in the order a run writes them:

  started    the run holds the workdir (step null); also "num_steps" (train.num_steps), "stop_at"
  resumed    the train state came from checkpoint step N
  saving     the checkpoint of step N is being written (asynchronously: training goes on meanwhile)
  saved      step N is complete on disk (Orbax finished it): a restart can resume from it
  preempted  a SIGTERM stopped the run; step N was saved first. Last line of the run.
  halted     errors.RunHalted stopped the run at step N (a failed write, a non-finite streak); "error"
  failed     another error (bad data, Ctrl-C) ended the run at step N; "error": "Type: first line"
  done       the loop reached its end step N, saved; "finished": whether N is train.num_steps (else
             --stop_at_step ended it)

A run ends with exactly one of preempted / halted / failed / done unless it was killed. `saved` comes
once the save is committed (polled after each step, and when the run ends), so the newest `saved` step
is always on disk; the converse can fail only briefly: a kill between the commit and its record leaves a
complete step without `saved`. Lines of several runs (restarts) follow one another; `pid` tells them
apart, and a line torn by a kill is skipped by `read_events`.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import jax

from llada_jax import files

EVENTS_FILE = "events.jsonl"
EVENTS = ("started", "resumed", "saving", "saved", "preempted", "halted", "failed", "done")


class EventLog:
  """Appends events to WORKDIR/events.jsonl (process 0 only). A local file gets each line appended and
  synced; a bucket object cannot be appended to, so a gs:// one is rewritten whole (a run writes a few
  lines per checkpoint)."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = files.path(workdir, EVENTS_FILE)
    self._host, self._pid = socket.gethostname(), os.getpid()

  def write(self, event: str, step: int | None = None, **fields: Any) -> None:
    if event not in EVENTS:
      raise ValueError(f"event must be one of {EVENTS}; got {event!r}")
    if not self.enabled:
      return
    record = {"event": event, "step": None if step is None else int(step), "time": round(time.time(), 3),
              "pid": self._pid, "host": self._host, **fields}
    line = json.dumps(record) + "\n"
    if files.is_remote(self.path):
      text = self.path.read_text() if self.path.exists() else ""
      files.write_atomic(self.path, (text if not text or text.endswith("\n") else text + "\n") + line)
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with open(self.path, "ab") as f:
      if f.tell() and not _ends_with_newline(self.path):
        line = "\n" + line  # a kill tore the previous run's last line: start a fresh one
      f.write(line.encode())
      f.flush()
      os.fsync(f.fileno())


def _ends_with_newline(path) -> bool:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def read_events(workdir: str) -> list[dict[str, Any]]:
  """Every event of WORKDIR/events.jsonl in order (all runs), skipping torn or foreign lines."""
  path = files.path(workdir, EVENTS_FILE)
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and "event" in record:
      out.append(record)
  return out
