"""What flags each CLI module defines, read from the modules themselves (tests of docs and options).

`defined_flags(modules)` imports each module in its own forked child of one process that has loaded the
heavy shared modules once (seconds, where a `--helpfull` per CLI takes ~4 s each): every CLI gets its own
absl FLAGS, since they define some of the same names (e.g. --workdir). Each flag is described as
{kind: 'bool' | 'value' | 'config', type, default, help, choices}.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = r"""
import importlib, json, os, sys
from absl import app, flags
import llada_jax, llada_jax.cli.common, llada_jax.hf, llada_jax.plan, llada_jax.reversal, llada_jax.serving
app.define_help_flags()
out = {}
for module in sys.argv[1:]:
  read, write = os.pipe()
  pid = os.fork()
  if pid == 0:
    os.close(read)
    try:
      importlib.import_module(module)
      seen = {name: {"kind": ("config" if type(f).__name__ == "_ConfigFlag" else "bool" if f.boolean else "value"),
                     "type": f.flag_type(), "default": f.default, "help": f.help,
                     "choices": getattr(f.parser, "enum_values", None)} for name, f in flags.FLAGS._flags().items()}
    except BaseException as e:  # reported, not raised: the parent must hear back
      seen = {"__error__": repr(e)}
    with os.fdopen(write, "w") as f:
      json.dump(seen, f, default=repr)
    os._exit(0)
  os.close(write)
  with os.fdopen(read) as f:
    out[module] = json.load(f)
  os.waitpid(pid, 0)
print(json.dumps(out))
"""


def defined_flags(modules) -> dict[str, dict[str, dict]]:
  """{module: {flag name: description}} for each CLI module (one failed import fails the caller)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
  env.pop("XLA_FLAGS", None)  # no need for the tests' 8 fake devices
  proc = subprocess.run([sys.executable, "-c", _PROBE, *modules], capture_output=True, text=True, timeout=300,
                        env=env, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  by_module = json.loads(proc.stdout.strip().splitlines()[-1])
  for module, seen in by_module.items():
    assert "__error__" not in seen, f"importing {module}: {seen['__error__']}"
  return by_module
