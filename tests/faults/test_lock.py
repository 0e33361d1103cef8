"""One run per workdir (llada_jax/workdir_lock.py): a second run is refused in one line naming the
holder; a lock left by a dead process is taken over with a warning, by one run only. That the lock goes
when a run ends, after an error too, is checked on the runs of test_checkpoint_faults.py and
test_nonfinite.py; a restart after SIGKILL taking it over, in test_kill.py."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import tiny_config
from llada_jax import train, workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def _stale_record(**kw):
  return {"host": socket.gethostname(), "pid": _dead_pid(), "started": time.time() - 60, "pid_start": None,
          "token": "a run that was killed", **kw}


def test_a_second_run_is_refused_in_one_line_naming_the_holder(tmp_path):
  workdir = tmp_path / "run"
  with workdir_lock.WorkdirLock(str(workdir)):
    holder = workdir_lock.read_lock(str(workdir))
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
    expected = (f"workdir {workdir} is in use by another run (host {socket.gethostname()}, pid {os.getpid()}, "
                f"started {started}")
    # In this process: refused before anything is written to the workdir.
    with pytest.raises(workdir_lock.WorkdirInUse) as e:
      train.train_and_evaluate(tiny_config(), str(workdir))
    assert str(e.value).startswith(expected) and "use another --workdir" in str(e.value)
    assert os.listdir(workdir) == [workdir_lock.LOCK_FILE]
    # A real second `llada-train`: one line, exit 1, and the holder's lock is untouched.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "llada_jax.cli.train", f"--config={REPO}/configs/tiny.py",
                        f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert workdir_lock.read_lock(str(workdir)) == holder
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last == f"llada-train: error: {e.value}"
  assert os.listdir(workdir) == []  # released when the holder ended


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  lock = workdir / workdir_lock.LOCK_FILE
  stale = _stale_record()
  lock.write_text(json.dumps(stale))
  warnings = []
  with workdir_lock.WorkdirLock(str(workdir), log=warnings.append):
    assert workdir_lock.read_lock(str(workdir))["pid"] == os.getpid()
  [warning] = warnings
  assert warning.startswith(f"warning: taking over the workdir lock {lock} left by a run that is no longer "
                            f"running (host {socket.gethostname()}, pid {stale['pid']}, started ")
  assert not lock.exists()

  # A lock file torn by a kill while it was written: taken over too.
  lock.write_text('{"host": "')
  warnings.clear()
  with workdir_lock.WorkdirLock(str(workdir), log=warnings.append):
    pass
  assert len(warnings) == 1 and "unreadable" in warnings[0]

  # Another host's lock cannot be checked from here: refused, saying how to clear it, and left alone.
  lock.write_text(json.dumps(_stale_record(host="elsewhere")))
  with pytest.raises(workdir_lock.WorkdirInUse, match=rf"host elsewhere, pid \d+, started .*if that run is "
                                                      rf"gone, delete {lock}$"):
    workdir_lock.WorkdirLock(str(workdir)).acquire()
  assert workdir_lock.read_lock(str(workdir))["host"] == "elsewhere"


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process start times come from /proc")
def test_a_reused_pid_does_not_keep_a_stale_lock(tmp_path):
  """The pid of the lock is alive, but started at another time than the process that wrote the lock:
  the pid was reused (containers restart with small pids), so the lock is stale."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(_stale_record(pid=os.getpid(), pid_start=1)))
  warnings = []
  with workdir_lock.WorkdirLock(str(workdir), log=warnings.append):
    pass
  assert len(warnings) == 1 and f"pid {os.getpid()}," in warnings[0]


def test_only_one_of_many_runs_takes_over_a_stale_lock(tmp_path):
  """Eight contenders find the same stale lock at once: one takes it, the others are refused (naming
  the winner, alive in this very process)."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(_stale_record()))
  locks = [workdir_lock.WorkdirLock(str(workdir), log=lambda line: None) for _ in range(8)]
  start, outcomes = threading.Barrier(len(locks)), {}

  def contend(n):
    start.wait()
    try:
      locks[n].acquire()
      outcomes[n] = "took it"
    except workdir_lock.WorkdirInUse:
      outcomes[n] = "refused"

  threads = [threading.Thread(target=contend, args=(n,)) for n in range(len(locks))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  [winner] = [n for n, o in outcomes.items() if o == "took it"]
  assert list(outcomes.values()).count("refused") == 7
  assert workdir_lock.read_lock(str(workdir))["token"] == locks[winner].record["token"]
  for lock in locks:
    lock.release()  # only the winner's release removes the file
  assert not (workdir / workdir_lock.LOCK_FILE).exists()


class _FakeBucket:
  """Cloud Storage objects as {name: (generation, bytes)} with its generation preconditions, for the
  parts of google-cloud-storage the gs:// lock uses (the real service cannot be reached from CI)."""

  def __init__(self):
    self.objects, self.generations = {}, 0

  def _check(self, name, if_generation_match):
    current = self.objects.get(name)
    if if_generation_match is not None and (current[0] if current else 0) != if_generation_match:
      raise _FakeExceptions.PreconditionFailed(name)
    if current is None and if_generation_match != 0:
      raise _FakeExceptions.NotFound(name)
    return current

  def blob(self, name, generation=None):
    bucket = self

    class Blob:
      def __init__(self):
        self.name, self.generation = name, generation

      def upload_from_string(self, data, content_type=None, if_generation_match=None):
        if if_generation_match is not None:
          bucket._check(name, if_generation_match)
        bucket.generations += 1
        bucket.objects[name] = (bucket.generations, bytes(data))
        self.generation = bucket.generations

      def download_as_bytes(self, if_generation_match=None):
        return bucket._check(name, if_generation_match)[1]

      def delete(self, if_generation_match=None):
        bucket._check(name, if_generation_match)
        del bucket.objects[name]

    return Blob()

  def get_blob(self, name):
    return self.blob(name, self.objects[name][0]) if name in self.objects else None


class _FakeExceptions:
  class PreconditionFailed(Exception):
    pass

  class NotFound(Exception):
    pass


def test_the_gs_lock_protocol_against_a_fake_bucket(monkeypatch):
  """The gs:// branch (generation preconditions) with the same decisions as a local folder: take,
  refuse while held, give back only its own object, take over a dead holder's, refuse another host's."""
  import types
  bucket = _FakeBucket()
  storage = types.SimpleNamespace(Client=lambda: types.SimpleNamespace(bucket=lambda name: bucket))
  monkeypatch.setitem(sys.modules, "google.cloud", types.SimpleNamespace(storage=storage))
  monkeypatch.setitem(sys.modules, "google.cloud.storage", storage)
  monkeypatch.setitem(sys.modules, "google.api_core", types.SimpleNamespace(exceptions=_FakeExceptions))
  monkeypatch.setitem(sys.modules, "google.api_core.exceptions", _FakeExceptions)
  name = "runs/a/lock.json"
  held = lambda: json.loads(bucket.objects[name][1]) if name in bucket.objects else None

  first = workdir_lock.WorkdirLock("gs://bucket/runs/a")
  first.acquire()
  assert held()["token"] == first.record["token"]
  with pytest.raises(workdir_lock.WorkdirInUse, match=rf"host {socket.gethostname()}, pid {os.getpid()}, "):
    workdir_lock.WorkdirLock("gs://bucket/runs/a").acquire()
  first.release()
  assert held() is None

  bucket.blob(name).upload_from_string(json.dumps(_stale_record()).encode())  # a killed run's lock
  warnings = []
  second = workdir_lock.WorkdirLock("gs://bucket/runs/a", log=warnings.append)
  second.acquire()
  assert held()["token"] == second.record["token"] and len(warnings) == 1 and "no longer running" in warnings[0]
  bucket.objects[name] = (99, json.dumps(_stale_record(token="a later run")).encode())  # replaced meanwhile
  second.release()
  assert held()["token"] == "a later run"  # not this run's object any more: left alone

  bucket.objects[name] = (100, json.dumps(_stale_record(host="elsewhere")).encode())
  with pytest.raises(workdir_lock.WorkdirInUse, match=r"host elsewhere, .*if that run is gone, delete gs://"):
    workdir_lock.WorkdirLock("gs://bucket/runs/a").acquire()
