"""Runs llada_jax commands (`python -m llada_jax.cli.X ARGS`) in children forked from a Python that has
already imported jax, flax, orbax, grain and the library, so that a command costs its own work, not the
~4 s of imports every fresh interpreter pays (the bad-input catalogue runs ~90 commands).

A child is the command as a user runs it, minus the interpreter start: it gets the arguments in
`sys.argv`, runs the module as `__main__` (`runpy`, as `python -m` does), writes to its own stdout and
stderr files, reads its stdin from a file (or /dev/null), and exits through the interpreter's usual path (an uncaught exception
prints its traceback and gives status 1; atexit handlers run). JAX's backends are never started in the
parent, so every child starts its own. Only the CLI modules are imported in the child: they define
absl flags at import, which one process may do once.

Used as a client: `Forks(n, env=..., cwd=...)` starts n servers (`shared()`: one per test process);
`.run(module, args, timeout, stdin)` returns a subprocess.CompletedProcess. Run as a script, this file is one server: one JSON request per stdin line,
answered with the child's pid, then its exit status.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import select
import signal
import subprocess
import sys
import tempfile


def _serve() -> None:
  # The library's heavy imports, once, in the parent (not the CLI modules: their flags are per process).
  import llada_jax.cli.common  # noqa: F401
  from llada_jax import evaluate, harness, hf, peft, reversal, serving, train  # noqa: F401
  while line := sys.stdin.readline():
    request = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      _child(request)  # never returns: the command exits the child
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


def _child(request: dict) -> None:
  import runpy
  os.dup2(os.open(request.get("stdin") or os.devnull, os.O_RDONLY), 0)
  sys.stdin = open(0, encoding="utf-8", closefd=False)
  for fd, name in ((1, "stdout"), (2, "stderr")):
    os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
  sys.argv = [request["module"], *request["args"]]
  sys.path[0] = os.getcwd()  # as `python -m` has it (the server's own was tests/)
  runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
  sys.exit(0)


class _Server:
  def __init__(self, env: dict, cwd: str):
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=env, cwd=cwd)

  def _answer(self, timeout: float | None) -> dict:
    ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
    if not ready:
      raise TimeoutError
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the fork server exited with status {self.proc.wait()}")
    return json.loads(line)

  def run(self, module: str, args: list[str], timeout: float, stdin: str | None) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as tmp:
      out, err, inp = (os.path.join(tmp, name) for name in ("stdout", "stderr", "stdin"))
      if stdin is not None:
        with open(inp, "w", encoding="utf-8") as f:
          f.write(stdin)
      request = {"module": module, "args": args, "stdout": out, "stderr": err,
                 "stdin": inp if stdin is not None else None}
      self.proc.stdin.write(json.dumps(request) + "\n")
      self.proc.stdin.flush()
      pid = self._answer(None)["pid"]
      try:
        status = self._answer(timeout)["returncode"]
      except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        self._answer(None)
        raise subprocess.TimeoutExpired([module, *args], timeout) from None
      with open(out, encoding="utf-8") as f, open(err, encoding="utf-8") as g:
        return subprocess.CompletedProcess([module, *args], status, f.read(), g.read())

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


class Forks:
  """`n` fork servers; `run` takes a free one (safe to call from n threads at once)."""

  def __init__(self, n: int, *, env: dict, cwd: str):
    self._all = [_Server(env, cwd) for _ in range(n)]
    self._free: queue.Queue[_Server] = queue.Queue()
    for server in self._all:
      self._free.put(server)

  def run(self, module: str, args: list[str], timeout: float = 600,
          stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -m module *args` (stdin: the text it reads) -> CompletedProcess (text stdout, stderr)."""
    server = self._free.get()
    try:
      return server.run(module, [str(a) for a in args], timeout, stdin)
    finally:
      self._free.put(server)

  def close(self) -> None:
    for server in self._all:
      server.close()

  def __enter__(self) -> "Forks":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


_shared: Forks | None = None


def shared() -> Forks:
  """One server for this test process, started on first use with its environment and working directory
  (for CLI tests that would start `sys.executable -m ...` with the inherited ones)."""
  global _shared
  if _shared is None:
    _shared = Forks(1, env=dict(os.environ), cwd=os.getcwd())
    atexit.register(_shared.close)
  return _shared


if __name__ == "__main__":
  _serve()
