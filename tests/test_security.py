"""Nothing in llada_jax loads pickles or hands strings to a shell (a static scan of the package source).

Checkpoints are Orbax/tensorstore arrays + JSON, tokenizers sentencepiece protobufs or tokenizer.json,
Hugging Face weights safetensors only; config files are Python by design (BUILD.md, Security)."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "llada_jax"
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib", "torch", "yaml",
                  "subprocess", "pty"}
UNSAFE_CALLS = {"eval", "exec", "system", "popen", "spawnl", "spawnlp", "spawnv", "spawnvp", "execv", "execvp",
                "execl", "execlp", "getoutput", "getstatusoutput", "Popen", "check_output", "check_call"}
# The one module that starts processes: the kill-and-restart soak runs `llada-train` (an argument list,
# never a shell; `shell=` and everything else stay forbidden there too).
STARTS_PROCESSES = {"llada_jax/testing/soak.py": ({"subprocess"}, {"Popen"})}


def _sources():
  files = sorted(PACKAGE.rglob("*.py"))
  assert len(files) > 30, files  # the scan must see the package
  return files


def _problems(source: str, name: str) -> list[str]:
  tree = ast.parse(source, filename=name)
  allowed_modules, allowed_calls = STARTS_PROCESSES.get(name, (set(), set()))
  unsafe_modules, unsafe_calls = UNSAFE_MODULES - allowed_modules, UNSAFE_CALLS - allowed_calls
  found = []
  for node in ast.walk(tree):
    where = f"{name}:{getattr(node, 'lineno', '?')}"
    if isinstance(node, ast.Import):
      found += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in unsafe_modules]
    elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in unsafe_modules:
      found.append(f"{where} imports from {node.module}")
    elif isinstance(node, ast.Call):
      name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
      if name in unsafe_calls:
        found.append(f"{where} calls {name}()")
      if name == "load" and isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") in ("np", "numpy"):
        safe = any(k.arg == "allow_pickle" and isinstance(k.value, ast.Constant) and k.value.value is False
                   for k in node.keywords)
        if not safe:
          found.append(f"{where} calls np.load without allow_pickle=False")
      if any(k.arg == "shell" for k in node.keywords):
        found.append(f"{where} passes shell=")
  return found


def test_the_package_never_unpickles_or_shells_out():
  problems = [p for f in _sources() for p in _problems(f.read_text(), str(f.relative_to(PACKAGE.parent)))]
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("snippet", ["import pickle\npickle.loads(b'')", "from yaml import load",
                                     "import numpy as np\nnp.load('x.npy')", "import os\nos.system('ls ' + p)",
                                     "subprocess.run(cmd, shell=True)", "eval(text)"])
def test_the_scan_catches_each_pattern(snippet):
  assert _problems(snippet, "probe.py"), snippet
