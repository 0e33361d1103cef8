"""One run per workdir: WORKDIR/lock.json names the run that holds it.

Two `llada-train` processes on one workdir would both train, and each would delete the other's
checkpoints (Orbax's garbage collection of old steps). So a run takes the workdir before it writes
anything there and gives it back when it ends, on an error too. A second run is refused with one line
naming the holder (host, pid, start time). A lock whose holder is gone — the same host, and no process
with that pid any more (or a newer process that reuses the pid) — was left by a run that could not
release it (SIGKILL, power loss) and is taken over with a warning. A lock held on another host cannot be
checked from here: the refusal says to delete the file once that run is known to be gone.

Local workdirs: the file is created with O_CREAT | O_EXCL (one creator wins), and reading, taking over
and releasing run under a short flock on the workdir folder itself, so two runs that find the same
stale lock cannot both take it. gs:// workdirs: the object is created with the precondition
`if_generation_match=0` (Cloud Storage creates it only if absent), and a stale one is deleted only at
the generation that was judged stale (google-cloud-storage, which gcsfs brings, imported only there).

Several processes (a TPU slice): process 0 takes the lock and tells the others whether it could, so a
refused run stops on every host at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import uuid
from typing import Any, Iterator

import jax

from llada_jax import files, hosts

LOCK_FILE = "lock.json"
_TRIES = 5  # create attempts (each after removing a stale lock) before giving up

try:
  import fcntl
except ImportError:  # not POSIX: O_EXCL alone still admits one creator
  fcntl = None


class WorkdirInUse(OSError):
  """Another run holds the workdir (its host, pid and start time are in the message)."""


def _process_start(pid: int) -> tuple[str, int] | None:
  """(state, start time in clock ticks since boot) of a process, from /proc; None where unknown."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
      text = f.read()
  except OSError:
    return None
  fields = text[text.rfind(")") + 2:].split()  # the command name (field 2) may hold spaces
  try:
    return fields[0], int(fields[19])
  except (IndexError, ValueError):
    return None


def _alive(pid: int, pid_start: int | None) -> bool:
  """Whether `pid` on this host is still the process that wrote the lock."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's process: it exists
  stat = _process_start(pid)
  if stat is None:
    return True
  state, started = stat
  if state in ("Z", "X"):
    return False  # killed, not yet reaped by its parent
  return pid_start is None or started == pid_start  # a different start: the pid was reused


def _describe(holder: dict[str, Any]) -> str:
  started = holder.get("started")
  when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)) if isinstance(started, (int, float)) else "?"
  return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {when}"


def _parse(data: bytes) -> dict[str, Any] | None:
  try:
    holder = json.loads(data)
  except ValueError:
    return None
  return holder if isinstance(holder, dict) else None


class WorkdirLock:
  """`acquire()` takes WORKDIR/lock.json for this run or raises WorkdirInUse; `release()` gives it back
  (only if it is still this run's). Only process 0 touches the file."""

  def __init__(self, workdir: str, *, log=lambda line: print(line, file=sys.stderr, flush=True)):
    self.path = files.path(workdir, LOCK_FILE)
    self._log = log
    self._held = False
    self._generation: int | None = None  # gs://: the generation of the object this run created
    pid = os.getpid()
    stat = _process_start(pid)
    self.record = {"host": socket.gethostname(), "pid": pid, "started": round(time.time(), 3),
                   "pid_start": stat[1] if stat else None, "token": uuid.uuid4().hex}

  def acquire(self) -> None:
    error = None
    if jax.process_index() == 0:
      try:
        self._take()
      except Exception as e:  # noqa: BLE001  (handed to the other processes first)
        error = e
    taken = hosts.process_0_says("workdir lock taken", error is None)  # every process asks, always
    if error is not None:
      raise error
    if not taken:
      raise WorkdirInUse(f"process 0 could not take the workdir lock {self.path} (see its error)")

  def release(self) -> None:
    if not self._held:
      return
    self._held = False
    if files.is_remote(self.path):
      self._release_gcs()
    else:
      with _guard(self.path.parent):
        holder = _parse(self._read_local() or b"")
        if holder is not None and holder.get("token") == self.record["token"]:
          os.unlink(self.path)

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  # -- the decision, shared by both stores --------------------------------------------------------

  def _check_stale(self, holder: dict[str, Any] | None) -> None:
    """Returns if `holder` (None: an unreadable lock file) may be taken over, warning; else raises."""
    if holder is None:
      self._log(f"warning: taking over the unreadable workdir lock {self.path} (a run that died while "
                "writing it)")
      return
    where = f"workdir {self.path.parent} is in use by another run ({_describe(holder)}; lock file {self.path})"
    if holder.get("host") != self.record["host"]:
      raise WorkdirInUse(f"{where}: wait for it to end or use another --workdir; if that run is gone, delete "
                         f"{self.path}")
    pid = holder.get("pid")
    if isinstance(pid, int) and _alive(pid, holder.get("pid_start")):
      raise WorkdirInUse(f"{where}: wait for it to end, stop it, or use another --workdir")
    self._log(f"warning: taking over the workdir lock {self.path} left by a run that is no longer running "
              f"({_describe(holder)})")

  def _take(self) -> None:
    data = json.dumps(self.record).encode()
    if files.is_remote(self.path):
      self._take_gcs(data)
    else:
      self._take_local(data)
    self._held = True

  # -- a local (or mounted) folder ----------------------------------------------------------------

  def _read_local(self) -> bytes | None:
    try:
      with open(self.path, "rb") as f:
        return f.read()
    except FileNotFoundError:
      return None

  def _take_local(self, data: bytes) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with _guard(self.path.parent):
      for _ in range(_TRIES):
        try:
          fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
          found = self._read_local()
          if found is not None:
            self._check_stale(_parse(found))
            os.unlink(self.path)
          continue
        with os.fdopen(fd, "wb") as f:
          f.write(data)
          f.flush()
          os.fsync(f.fileno())
        return
    raise WorkdirInUse(f"workdir {self.path.parent}: could not take its lock {self.path} (other runs keep "
                       "replacing it); use another --workdir")

  # -- a bucket -----------------------------------------------------------------------------------

  def _blob_name(self) -> tuple[Any, str]:
    path = os.fspath(self.path)
    if not path.startswith("gs://"):
      raise ValueError(f"a workdir lock needs a local folder or gs://; got {path}")
    from google.cloud import storage  # lazily: only gs:// workdirs need it (gcsfs brings it)
    bucket, _, name = path[len("gs://"):].partition("/")
    return storage.Client().bucket(bucket), name

  def _take_gcs(self, data: bytes) -> None:
    from google.api_core import exceptions
    bucket, name = self._blob_name()
    for _ in range(_TRIES):
      blob = bucket.blob(name)
      try:
        blob.upload_from_string(data, content_type="application/json", if_generation_match=0)
        self._generation = blob.generation
        return
      except exceptions.PreconditionFailed:  # it exists
        pass
      found = bucket.get_blob(name)
      if found is None:
        continue  # released meanwhile
      try:
        holder = _parse(found.download_as_bytes(if_generation_match=found.generation))
      except (exceptions.PreconditionFailed, exceptions.NotFound):
        continue  # replaced or released meanwhile: look again
      if holder is not None and holder.get("token") == self.record["token"]:
        self._generation = found.generation  # our own upload, retried after its reply was lost
        return
      self._check_stale(holder)
      try:
        found.delete(if_generation_match=found.generation)  # only the lock judged stale
      except (exceptions.PreconditionFailed, exceptions.NotFound):
        pass  # another run took it over first: the next create fails and reads that run's lock
    raise WorkdirInUse(f"workdir {self.path.parent}: could not take its lock {self.path} (other runs keep "
                       "replacing it); use another --workdir")

  def _release_gcs(self) -> None:
    if self._generation is None:
      return  # (the upload reported none) left in place: stale once this process is gone
    from google.api_core import exceptions
    bucket, name = self._blob_name()
    try:
      bucket.blob(name).delete(if_generation_match=self._generation)  # never another run's object
    except (exceptions.PreconditionFailed, exceptions.NotFound):
      pass  # no longer this run's object


@contextlib.contextmanager
def _guard(folder) -> Iterator[None]:
  """An exclusive flock on `folder` for the few milliseconds of a lock-file update (the kernel drops it
  if the process dies, so it can never be left behind)."""
  fd = os.open(os.fspath(folder), os.O_RDONLY)
  try:
    if fcntl is not None:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX)
      except OSError:
        pass  # a filesystem without flock: O_EXCL still admits one creator
    yield
  finally:
    os.close(fd)  # closing drops the flock


def read_lock(workdir: str) -> dict[str, Any] | None:
  """The holder record of WORKDIR/lock.json (host, pid, started, ...), or None when the workdir is free."""
  path = files.path(workdir, LOCK_FILE)
  if not path.exists():
    return None
  return _parse(path.read_bytes())
