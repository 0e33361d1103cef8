"""The documentation agrees with the code: the config reference is current, every `llada-*` command in
the docs names a real console script and real flags, and the 8B fine-tuning notebook runs (and skips
cleanly) on a machine without the weights."""

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

import flag_probe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "BUILD.md", "docs/*.md", "launch/README.md", "notebooks/README.md")
_COMMAND = re.compile(r"llada-[a-z][a-z-]*")
_MENTION = re.compile(r"(?<![\w`/=.:'\"-])llada-[a-z]")
_SHELL_OPERATORS = set("();<>|&")


def _env() -> dict:
  """A child environment on the CPU without the tests' 8 fake devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
  env.pop("XLA_FLAGS", None)
  return env


def test_ci_runs_the_readme_test_command():
  """`.ci/run` runs the README's test command verbatim (its first code block's second line)."""
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    block = f.read().split("```")[1]
  command = [line for line in block.splitlines() if "pytest" in line]
  with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
    ci = [line.strip() for line in f if not line.lstrip().startswith("#")]
  assert len(command) == 1 and command[0].strip() in ci, (command, ci)


def test_config_reference_is_current():
  proc = subprocess.run([sys.executable, os.path.join(REPO, "docs", "make_config_reference.py"), "--check"],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------------------
# Commands in the docs


def console_scripts() -> dict[str, str]:
  """{'llada-train': 'llada_jax.cli.train', ...} from setup.py's entry points."""
  text = open(os.path.join(REPO, "setup.py"), encoding="utf-8").read()
  return dict(re.findall(r'"(llada-[a-z-]+)\s*=\s*([\w.]+):\w+"', text))




@pytest.fixture(scope="module")
def cli_flags() -> dict[str, dict[str, str]]:
  """{console script: {flag name: 'bool' | 'value' | 'config'}} as each CLI defines them."""
  scripts = console_scripts()
  by_module = flag_probe.defined_flags(sorted(set(scripts.values())))
  return {script: {name: flag["kind"] for name, flag in by_module[module].items()} for script, module in scripts.items()}


def config_fields() -> set[str]:
  sys.path.insert(0, REPO)
  try:
    from configs import default  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(REPO)
  c = default.base()
  return {f"{section}.{name}" for section in c for name in c[section]}


def doc_files() -> list[str]:
  out = []
  for pattern in DOCS:
    out += sorted(glob.glob(os.path.join(REPO, pattern)))
  return out


def fenced_lines(path: str) -> list[tuple[int, str]]:
  """(first line number, logical line) of every fenced code block line, `\\` continuations joined."""
  out, inside, pending, start = [], False, "", 0
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      line = line.rstrip("\n")
      if line.strip().startswith("```"):
        inside = not inside
        pending = ""
        continue
      if not inside:
        continue
      if not pending:
        start = number
      if line.rstrip().endswith("\\"):
        pending += line.rstrip()[:-1] + " "
        continue
      out.append((start, pending + line))
      pending = ""
  return out


def commands(line: str) -> list[list[str]]:
  """The `llada-*` commands of a shell line, each as [script, arg, ...], up to the next shell operator
  (`&&`, `|`, `;`, `>`, ...). Quoted words that hold a command themselves (`ssh host 'llada-train ...'`)
  are searched too."""
  lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  lexer.commenters = "#"
  words = list(lexer)
  out, current = [], None
  for word in words:
    if word and set(word) <= _SHELL_OPERATORS:
      current = None
    elif _COMMAND.fullmatch(word):
      current = [word]
      out.append(current)
    elif current is not None:
      current.append(word)
    if " " in word and _MENTION.search(word):
      out += commands(word)
  return out


def bad_flags(command: list[str], scripts: dict, flags: dict, fields: set[str]) -> list[str]:
  script, args = command[0], command[1:]
  if script not in scripts:
    return [f"{script} is not a console script of setup.py ({', '.join(sorted(scripts))})"]
  known = flags[script]
  bad = []
  for arg in args:
    if not arg.startswith("--") or arg == "--":
      continue
    name = arg[2:].split("=", 1)[0]
    if name.startswith("config.") and known.get("config") == "config":
      if name[len("config."):] not in fields:
        bad.append(f"--{name}: no config field '{name[len('config.'):]}'")
    elif name not in known and not (name.startswith("no") and known.get(name[2:]) == "bool"):
      bad.append(f"--{name}: {script} defines no such flag")
  return bad


def test_doc_commands_use_real_scripts_and_flags(cli_flags):
  scripts, fields = console_scripts(), config_fields()
  problems, checked = [], 0
  for path in doc_files():
    rel = os.path.relpath(path, REPO)
    for number, line in fenced_lines(path):
      if not _MENTION.search(line):
        continue
      try:
        found = commands(line)
      except ValueError as e:  # unbalanced quotes
        problems.append(f"{rel}:{number}: cannot parse {line.strip()!r}: {e}")
        continue
      for command in found:
        checked += 1
        problems += [f"{rel}:{number}: {shlex.join(command)[:160]}\n    {bad}"
                     for bad in bad_flags(command, scripts, cli_flags, fields)]
  assert checked > 20, f"found only {checked} llada-* commands in {DOCS}"
  assert not problems, "commands in the docs that the CLIs reject:\n" + "\n".join(problems)


def test_command_parsing():
  line = ("TPU_NAME=llada-1b srun llada-train --config=configs/x.py --no_dry_run && llada-chat --workdir=/w "
          "# --not_a_flag\n")
  assert commands(line) == [["llada-train", "--config=configs/x.py", "--no_dry_run"],
                            ["llada-chat", "--workdir=/w"]]
  assert commands("ssh -n h 'cd r && nohup llada-train --config=c --workdir=w > log 2>&1 &'") == [
      ["llada-train", "--config=c", "--workdir=w"]]
  assert commands('llada-train --config.data.paths="(\'a/*.txt\',)" | tee x') == [
      ["llada-train", "--config.data.paths=('a/*.txt',)"]]
  flags = {"llada-train": {"config": "config", "dry_run": "bool", "workdir": "value"}}
  scripts = {"llada-train": "llada_jax.cli.train"}
  check = lambda *args: bad_flags(["llada-train", *args], scripts, flags, {"train.num_steps"})
  assert not check("--config=c", "--nodry_run", "--workdir", "w", "--config.train.num_steps=3")
  assert len(check("--config.train.num_step=3", "--noworkdir", "--dryrun")) == 3
  assert bad_flags(["llada-nope"], scripts, flags, set())


# ---------------------------------------------------------------------------------------------------------
# The 8B fine-tuning notebook, without the weights


def test_finetune_notebook_skips_cleanly_without_weights(tmp_path):
  import nbclient  # pylint: disable=g-import-not-at-top  (in the [test] extra: never skipped)
  import nbformat  # pylint: disable=g-import-not-at-top
  path = os.path.join(REPO, "notebooks", "finetune_llada_8b.ipynb")
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:  # stored without outputs, as the repo keeps notebooks
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, cell.source[:80]
  empty = tmp_path / "no_weights"
  empty.mkdir()
  client = nbclient.NotebookClient(nb, timeout=60, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute(env={**_env(), "LLADA_8B_DIR": str(empty)})  # a cell error raises CellExecutionError
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.get("output_type") == "stream")
  assert "LLaDA-8B weights not found" in text and "huggingface-cli download GSAI-ML/LLaDA-8B-Instruct" in text
  assert str(empty) in text
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
  assert not errors
