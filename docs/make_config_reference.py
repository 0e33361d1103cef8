"""Writes docs/config.md, the config reference, from configs/default.py; `--check` verifies it.

  python docs/make_config_reference.py           # regenerate docs/config.md
  python docs/make_config_reference.py --check   # exit 1 if it is stale or a field lacks a comment

Every field of every section comes from `default.base()` (its default) and from the trailing `# comment`
on the line that sets it, continued by comment-only lines indented past the code (its meaning). The
sections' introductions are the docstrings of the dataclasses in llada_jax/config.py, which also define
the set of fields: one missing from `base()`, or set there without a comment, is an error. Presets are
diffed against `base()`; the config files under configs/ are listed with their docstrings. Nothing but
ml_collections is imported (both source files are loaded by path), so this runs in a second.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib.util
import inspect
import io
import pathlib
import sys
import tokenize
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_PY = ROOT / "configs" / "default.py"
CONFIG_PY = ROOT / "llada_jax" / "config.py"
OUTPUT = ROOT / "docs" / "config.md"
SECTIONS = ("model", "diffusion", "preference", "grpo", "block", "lora", "optim", "data", "mesh", "train")


def _load(path: pathlib.Path, name: str) -> Any:
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
  spec.loader.exec_module(module)
  return module


def field_comments(source: str) -> tuple[dict[str, str], list[str]]:
  """{'section.field': meaning} for every `alias.field = value  # meaning` in `base()`, in source order,
  and the 'section.field' names set there without a comment."""
  comments: dict[int, tuple[int, str]] = {}  # line -> (column, text) of its comment
  code_lines: set[int] = set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
    elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                          tokenize.ENDMARKER):
      code_lines.update(range(tok.start[0], tok.end[0] + 1))
  base = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "base")
  aliases: dict[str, str] = {}
  meanings: dict[str, str] = {}
  missing: list[str] = []
  for stmt in base.body:
    if not isinstance(stmt, ast.Assign):
      continue
    targets = stmt.targets
    if (len(targets) == 2 and isinstance(targets[0], ast.Attribute) and isinstance(targets[1], ast.Name)
        and targets[0].attr in SECTIONS):  # c.model = m = ml_collections.ConfigDict()
      aliases[targets[1].id] = targets[0].attr
      continue
    target = targets[0]
    if not (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
            and target.value.id in aliases):
      continue
    name = f"{aliases[target.value.id]}.{target.attr}"
    parts = [comments[i][1] for i in range(stmt.lineno, stmt.end_lineno + 1) if i in comments]
    line = stmt.end_lineno + 1
    while line in comments and line not in code_lines and comments[line][0] > stmt.col_offset:
      parts.append(comments[line][1])  # an indented continuation line
      line += 1
    meanings[name] = " ".join(parts)
    if not parts or not all(parts):
      missing.append(name)
  return meanings, missing


def _flatten(c: Any, order: list[str]) -> dict[str, Any]:
  """'section.field' -> value, fields in `order` first (source order), then any others."""
  flat = {f"{s}.{k}": v for s in SECTIONS for k, v in c[s].items()}
  return {**{k: flat[k] for k in order if k in flat}, **flat}


def _value(v: Any) -> str:
  text = f'"{v}"' if isinstance(v, str) else repr(v)
  return f"`{text}`".replace("|", "\\|")


def _cell(text: str) -> str:
  return text.replace("|", "\\|")


def _docstring_markdown(doc: str) -> list[str]:
  """A dataclass docstring as Markdown: indented runs (tables of names) become fenced blocks."""
  out, block = [], []
  for line in inspect.cleandoc(doc).splitlines() + [""]:
    if line.startswith(" "):
      block.append(line.strip())
      continue
    if block:
      out += ["```"] + block + ["```"]
      block = []
    out.append(line)
  while out and not out[-1]:
    out.pop()
  return out


def _variant_notes(source: str, variants: tuple[str, ...]) -> dict[str, str]:
  """The comment on each preset's `if variant == ...:` line of `get_config`."""
  notes = {}
  for line in source.splitlines():
    code, _, comment = line.partition("#")
    if "variant" in code and code.rstrip().endswith(":") and comment:
      for v in variants:
        if f'"{v}"' in code:
          notes[v] = comment.strip()
  return notes


def _config_files() -> list[tuple[str, str, str]]:
  """(file, `get_config` argument and default, first docstring paragraph) of every configs/*.py."""
  rows = []
  for path in sorted((ROOT / "configs").glob("*.py")):
    tree = ast.parse(path.read_text())
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_config"), None)
    if fn is None:
      continue
    args = fn.args.args
    arg = f"`:{args[0].arg.upper()}` (default `{ast.literal_eval(fn.args.defaults[0])}`)" if args else ""
    doc = " ".join((ast.get_docstring(tree) or "").split("\n\n")[0].split())
    rows.append((f"configs/{path.name}", arg, doc))
  return rows


def build() -> tuple[str, list[str]]:
  """The Markdown text, and the problems (fields without a comment, fields missing from base())."""
  default = _load(DEFAULT_PY, "_llada_configs_default")
  config = _load(CONFIG_PY, "_llada_config")
  source = DEFAULT_PY.read_text()
  meanings, uncommented = field_comments(source)
  base = _flatten(default.base(), list(meanings))
  problems = [f"{name}: set in configs/default.py base() without a trailing # comment" for name in uncommented]
  classes = config._SECTION_TYPES  # pylint: disable=protected-access
  if set(classes) != set(SECTIONS):
    problems.append(f"the sections of llada_jax/config.py {sorted(classes)} are not SECTIONS here {sorted(SECTIONS)}")
  declared = [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(classes[s])]
  problems += [f"{name}: a field of {classes[name.split('.')[0]].__name__} (llada_jax/config.py) that "
               "configs/default.py base() does not set (with a comment)" for name in declared if name not in base]
  problems += [f"{name}: set in configs/default.py base() but not a field of llada_jax/config.py"
               for name in base if name not in declared]

  out = [
      "# Config reference",
      "",
      "<!-- Generated by docs/make_config_reference.py from configs/default.py and llada_jax/config.py;",
      "     do not edit by hand. Regenerate: python docs/make_config_reference.py -->",
      "",
      "A run is configured by one `ml_collections.ConfigDict` with six sections, built by a file in",
      "`configs/` (`--config=configs/demo.py`, `--config=configs/default.py:tiny`) and overridden field by",
      "field on the command line (`--config.train.num_steps=200`). `llada_jax.config.from_config_dict`",
      "turns it once into frozen dataclasses; a bad value stops the run before any work, with one line",
      "naming the field and its allowed range. Below: every field with its default (`default.base()`) and",
      "meaning (its comment in `configs/default.py`), then the presets and the config files.",
      "",
      "Sections: " + ", ".join(f"[{s}](#{s})" for s in SECTIONS) + ", [presets](#presets), "
      "[config files](#config-files).",
  ]
  for section in SECTIONS:
    out += ["", f"## {section}", ""]
    out += _docstring_markdown(classes[section].__doc__ or "")
    out += ["", "| Field | Default | Meaning |", "|---|---|---|"]
    for name, value in base.items():
      if name.startswith(section + "."):
        out.append(f"| `{name}` | {_value(value)} | {_cell(meanings.get(name, ''))} |")

  variants = tuple(default.VARIANTS)
  presets = {v: _flatten(default.get_config(v), list(base)) for v in variants}
  changed = [name for name in base if any(presets[v][name] != base[name] for v in variants)]
  notes = _variant_notes(source, variants)
  out += ["", "## Presets", "",
          "`--config=configs/default.py:VARIANT`, or the one-line files `configs/VARIANT.py`:", ""]
  out += [f"- `{v}`: {notes.get(v, '')}" for v in variants]
  out += ["", "The fields each preset sets differently from `default.base()` (blank: the default):", "",
          "| Field | default | " + " | ".join(f"`{v}`" for v in variants) + " |",
          "|---|---|" + "---|" * len(variants)]
  for name in changed:
    cells = [_value(presets[v][name]) if presets[v][name] != base[name] else "" for v in variants]
    out.append(f"| `{name}` | {_value(base[name])} | " + " | ".join(cells) + " |")
  sft_doc = " ".join((inspect.getdoc(default.sft) or "").split())
  out += ["", f"`default.sft(config, init_from)`: {sft_doc}"]

  out += ["", "## Config files", "",
          "`--config=FILE` or `--config=FILE:ARG`; each builds on `configs/default.py`.", "",
          "| File | Argument | What it configures |", "|---|---|---|"]
  out += [f"| `{path}` | {arg} | {_cell(doc)} |" for path, arg, doc in _config_files()]
  return "\n".join(out) + "\n", problems


def _stale_field(current: str, wanted: str) -> str:
  """The first line that differs, named by its field when it is a table row."""
  for line in difflib.unified_diff(current.splitlines(), wanted.splitlines(), lineterm="", n=0):
    if line[:1] in "+-" and not line.startswith(("+++", "---")):
      cell = line[1:].split("|")
      if len(cell) > 2 and cell[1].strip().startswith("`"):
        return f"field {cell[1].strip()} (line: {line[1:].strip()[:100]})"
      return f"line: {line[1:].strip()[:100]!r}"
  return "the end of the file"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--check", action="store_true", help="verify docs/config.md instead of writing it")
  args = parser.parse_args(argv)
  text, problems = build()
  for problem in problems:
    print(f"config reference: {problem}", file=sys.stderr)
  if args.check:
    current = OUTPUT.read_text() if OUTPUT.exists() else ""
    if current != text:
      print(f"config reference: {OUTPUT.relative_to(ROOT)} is stale at {_stale_field(current, text)}; "
            "regenerate it with: python docs/make_config_reference.py", file=sys.stderr)
      return 1
    return 1 if problems else 0
  OUTPUT.write_text(text)
  print(f"wrote {OUTPUT.relative_to(ROOT)} ({len(text.encode())} bytes)")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
