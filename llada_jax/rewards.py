"""Verifiable rewards for RL (diffu-GRPO): pluggable functions that score decoded completions.

A reward function is `fn(prompt, completion, example) -> float`: `prompt` is the user's question (the last
user message of the record), `completion` the decoded text the policy wrote, `example` the whole prompt
record (llada_jax.data.tasks.to_prompt_record): its `answer` and any other field of the user's JSONL line,
e.g. `numbers` and `target` for countdown. Functions are named in `grpo.rewards`, either by a registered
name (`register`, `names`) or by an import spec 'package.module:function'; `resolve` turns the names into
functions and `score` runs them over a batch, one column per function (the loop sums the columns).

The built-ins read the answer from `<answer>...</answer>` tags, as d1 does (its prompts ask for them):
  correct         1.0 if the tagged answer equals example["answer"] (case, spaces and a final '.' ignored)
  format          0.25 for exactly one well-formed, non-empty tagged answer that ends the completion
  gsm8k           2.0 if the tagged answer's number equals the reference number (d1's correctness reward)
  integer_answer  0.5 if the tagged answer is a bare integer (d1's int_reward_func)
  countdown       1.0 for an arithmetic expression over exactly the given numbers that hits the target,
                  0.1 for a tagged answer that does not, 0.0 without one (d1's countdown reward)

Worked example: completion "2 plus 3 is 5. <answer>5</answer>" for {"answer": "5"} scores correct 1.0,
format 0.25, gsm8k 2.0, integer_answer 0.5; "<answer>6</answer> done" scores 0.0, 0.0 (text after the
answer), 0.0, 0.5. `score(resolve(["correct", "format"]), prompts, completions, examples)` gives the
float32 matrix [[1.0, 0.25], [0.0, 0.0]] for these two.

A function that raises, or returns anything but a finite real number (bool counts as 0 / 1), stops the
run with one `RewardError` line naming the function, the completion's row and its prompt: a reward bug
must not silently train the policy on zeros.
"""

from __future__ import annotations

import ast
import fractions
import importlib
import math
import numbers
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from llada_jax import errors
from llada_jax.data.tokenizer import ANSWER_CLOSE, ANSWER_OPEN

RewardFn = Callable[[str, str, Mapping[str, Any]], float]

_REGISTRY: dict[str, RewardFn] = {}
_FIELD = "grpo.rewards"  # the config field that names reward functions, for error messages
_EXCERPT = 60            # characters of a prompt shown in an error


class RewardError(errors.RewardFailed):
  """A reward function failed or returned a value that is not a finite real number (one-line message;
  `llada-train` prints it as its error line)."""


# ---------------------------------------------------------------------------------------------------------
# The registry


def register(name: str, fn: RewardFn | None = None):
  """Registers `fn` under `name` and returns it; without `fn`, a decorator that does so.

  Example: @register("short") def short(prompt, completion, example): return float(len(completion) < 50).
  A name is registered once (a second registration raises ValueError) and holds no ':' (that marks an
  import spec in `grpo.rewards`).
  """
  if not isinstance(name, str) or not name or ":" in name:
    raise ValueError(f"a reward name must be a non-empty string without ':'; got {name!r}")

  def add(f: RewardFn) -> RewardFn:
    if not callable(f):
      raise ValueError(f"reward {name!r}: expected a function (prompt, completion, example) -> float; got "
                       f"{type(f).__name__}")
    if name in _REGISTRY:
      raise ValueError(f"reward function {name!r} is registered twice")
    _REGISTRY[name] = f
    return f

  return add if fn is None else add(fn)


def names() -> tuple[str, ...]:
  """The registered reward names, in registration order (the built-ins first)."""
  return tuple(_REGISTRY)


def _import(spec: str) -> RewardFn:
  """The function an import spec 'package.module:function' names ('function' may be a dotted path)."""
  module_name, _, attr = spec.partition(":")
  hint = f"registered reward functions: {names()}"
  if not module_name or not attr:
    raise ValueError(f"config field '{_FIELD}' entry {spec!r} is not an import spec 'package.module:function'; "
                     f"{hint}")
  try:
    obj: Any = importlib.import_module(module_name)
  except Exception as e:  # a missing module, or one whose own imports fail: the same config error
    raise ValueError(f"config field '{_FIELD}' entry {spec!r}: cannot import module {module_name!r} "
                     f"({type(e).__name__}: {_one_line(str(e))}); {hint}") from e
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise ValueError(f"config field '{_FIELD}' entry {spec!r}: module {module_name!r} has no {attr!r}; {hint}")
    obj = getattr(obj, part)
  if not callable(obj):
    raise ValueError(f"config field '{_FIELD}' entry {spec!r} is a {type(obj).__name__}, not a function "
                     "(prompt, completion, example) -> float")
  return obj


def resolve(reward_names: Sequence[str]) -> list[tuple[str, RewardFn]]:
  """(name, function) for every entry of `grpo.rewards`: a registered name or 'package.module:function'.

  Example: resolve(["correct", "my_pkg.rewards:length"]) -> [("correct", <correct>),
  ("my_pkg.rewards:length", <length>)]. An unknown name, a failed import, a repeated entry or no entry at
  all raises ValueError naming the config field, the entry and the registered names.
  """
  if isinstance(reward_names, str):  # one name, not a sequence of characters
    reward_names = [reward_names]
  if not reward_names:
    raise ValueError(f"config field '{_FIELD}' must name at least one reward function; registered: {names()}")
  out: list[tuple[str, RewardFn]] = []
  for entry in reward_names:
    if not isinstance(entry, str) or not entry:
      raise ValueError(f"config field '{_FIELD}' entries must be non-empty strings; got {entry!r}")
    if any(entry == n for n, _ in out):
      # The sum of the columns is the reward: a repeat would silently double one function's weight.
      raise ValueError(f"config field '{_FIELD}' names {entry!r} twice")
    if entry in _REGISTRY:
      out.append((entry, _REGISTRY[entry]))
    elif ":" in entry:
      out.append((entry, _import(entry)))
    else:
      raise ValueError(f"config field '{_FIELD}' has an unknown reward function {entry!r}; registered: "
                       f"{names()}, or give an import spec 'package.module:function'")
  return out


# ---------------------------------------------------------------------------------------------------------
# Scoring


def _one_line(text: str, limit: int | None = None) -> str:
  """`text` on one line (line breaks written as \\n), cut to `limit` characters with '...'."""
  text = "\\n".join(text.splitlines())  # every kind of line break, "\r\n" and "\u2028" included
  return text if limit is None or len(text) <= limit else text[:limit] + "..."


def _excerpt(prompt: Any) -> str:
  """The start of a prompt, quoted on one line: 'what is 2 plus 3?\\nshow your work...'."""
  text = str(prompt)
  return repr(text[:_EXCERPT] + ("..." if len(text) > _EXCERPT else ""))


def _checked(value: Any) -> tuple[float | None, str]:
  """(value as a float, "") for a finite real number, else (None, what was returned)."""
  # bool is a number to Python (True == 1): a predicate reward `return answer == ref` is natural.
  if isinstance(value, (numbers.Real, np.bool_)) or (isinstance(value, np.ndarray) and value.ndim == 0
                                                     and value.dtype.kind in "biuf"):
    v = float(value)
    return (v, "") if math.isfinite(v) else (None, f"returned {v}")
  what = "None" if value is None else f"{type(value).__name__} {_one_line(repr(value), 40)}"
  return None, f"returned {what} (a reward must be a real number)"


def score(fns: Sequence[tuple[str, RewardFn]], prompts: Sequence[str], completions: Sequence[str],
          examples: Sequence[Mapping[str, Any]]) -> np.ndarray:
  """float32 [N, F]: row i is completion i, column j is function j of `fns` (as `resolve` gives them).

  Example: score(resolve(["correct", "format"]), ["what is 2 plus 3?"] * 2,
  ["<answer>5</answer>", "5"], [{"answer": "5"}] * 2) -> [[1.0, 0.25], [0.0, 0.0]]. Raises RewardError
  (one line: the function, the row, the prompt) when a function raises or returns a non-finite value or
  something that is not a number.
  """
  n = len(completions)
  if len(prompts) != n or len(examples) != n:
    raise ValueError(f"score() needs one prompt and one example per completion; got {len(prompts)} prompts, "
                     f"{n} completions, {len(examples)} examples")
  out = np.zeros((n, len(fns)), np.float32)
  for j, (name, fn) in enumerate(fns):
    for i in range(n):
      where = lambda: f"on completion {i} (prompt {_excerpt(prompts[i])})"
      try:
        value = fn(prompts[i], completions[i], examples[i])
      except Exception as e:
        raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {_one_line(str(e), 200)} "
                          f"{where()}") from e
      v, problem = _checked(value)
      if v is None:
        raise RewardError(f"reward function {name!r} {problem} {where()}")
      out[i, j] = v
  return out


# ---------------------------------------------------------------------------------------------------------
# Built-in rewards

# The built-ins that read the answer from the tags: a run that uses one needs a tokenizer that can write them.
TAGGED = ("correct", "format", "gsm8k", "integer_answer", "countdown")

# The content of one tagged answer; it never holds another opening tag, so in "<answer>a <answer>b</answer>"
# the answer is "b" (the model restarted its answer).
_ANSWER = re.compile(f"{re.escape(ANSWER_OPEN)}((?:(?!{re.escape(ANSWER_OPEN)}).)*?){re.escape(ANSWER_CLOSE)}",
                     re.DOTALL)


def extract_answer(text: str) -> str | None:
  """The stripped content of the last `<answer>...</answer>` in `text`, or None if there is none.

  Example: "<answer>4</answer> no, <answer> 5 </answer>" -> "5"; "<answer>5" -> None.
  """
  found = _ANSWER.findall(text)
  return found[-1].strip() if found else None


def _normalise(value: Any) -> str:
  """Lowercase, single spaces, no final '.': "  The Capital.\\n" -> "the capital"."""
  text = " ".join(str(value).split()).lower()
  return text[:-1].rstrip() if text.endswith(".") else text


@register("correct")
def correct(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
  """1.0 if the tagged answer equals example["answer"] after `_normalise` (both sides), else 0.0."""
  del prompt
  answer = extract_answer(completion)
  return float(answer is not None and _normalise(answer) == _normalise(example["answer"]))


@register("format")
def format_reward(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
  """0.25 if the completion holds exactly one `<answer>` and one `</answer>`, in that order, with
  non-blank content between them and only whitespace after; else 0.0. Text before the answer (the
  reasoning) is free. Example: "x is 3. <answer>3</answer>\\n" -> 0.25; "<answer>3</answer>." -> 0.0."""
  del prompt, example
  if completion.count(ANSWER_OPEN) != 1 or completion.count(ANSWER_CLOSE) != 1:
    return 0.0
  start = completion.index(ANSWER_OPEN) + len(ANSWER_OPEN)
  end = completion.find(ANSWER_CLOSE, start)
  ok = end >= 0 and completion[start:end].strip() and not completion[end + len(ANSWER_CLOSE):].strip()
  return 0.25 if ok else 0.0


# A number as people write them: "-1,234.5", "$18", "72."; the characters around it are cleaned by _number.
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _number(text: str) -> float | None:
  """The number `text` is ("1,234" -> 1234.0, "$18" -> 18.0, "72.0" / "72." -> 72.0, "-3" -> -3.0), else
  the last number in it ("x = 5 + 3 = 8" -> 8.0), else None."""
  s = text.strip().rstrip(".").strip()
  whole = re.fullmatch(r"([+-]?)\s*\$?\s*(\d[\d,]*(?:\.\d*)?|\.\d+)", s)
  if whole:
    return float(whole[1] + whole[2].replace(",", "").rstrip("."))
  found = _NUMBER.findall(s)
  return float(found[-1].replace("$", "").replace(",", "")) if found else None


def _reference_number(answer: Any) -> float:
  """The reference of a GSM8K-style example: a number, "1,234", "$18", or a solution ending "#### 72"."""
  if isinstance(answer, numbers.Real) and not isinstance(answer, bool):
    return float(answer)
  text = str(answer)
  if "####" in text:
    text = text.rsplit("####", 1)[1]
  value = _number(text)
  if value is None:
    raise ValueError(f"example answer {_one_line(text, 40)!r} holds no number")
  return value


@register("gsm8k")
def gsm8k(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
  """2.0 if the tagged answer's number equals the reference number (|diff| < 1e-6), else 0.0.

  Only the tag is read (no fallback to the completion's last number, as in d1). Example: "<answer>$1,234
  </answer>" against "... #### 1234" -> 2.0. A reference that holds no number raises (a data error).
  """
  del prompt
  reference = _reference_number(example["answer"])
  answer = extract_answer(completion)
  value = None if answer is None else _number(answer)
  return 2.0 if value is not None and abs(value - reference) < 1e-6 else 0.0


@register("integer_answer")
def integer_answer(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
  """0.5 if the tagged answer is digits only ("72"; not "-3", "7.5" or "72 apples"), else 0.0."""
  del prompt, example
  answer = extract_answer(completion)
  return 0.5 if answer is not None and re.fullmatch(r"[0-9]+", answer) else 0.0


_EXPRESSION = re.compile(r"[0-9+\-*/() \t]+")
_MAX_EXPRESSION = 400  # characters: bounds the parse and the tree walk (six numbers need far fewer)
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}


def _evaluate(node: ast.AST, used: list[int]) -> fractions.Fraction:
  """The exact value of an expression tree of ints, + - * / and unary minus; its numbers go to `used`.

  Anything else (names, calls, powers, floats) raises ValueError: the completion is never executed.
  """
  if isinstance(node, ast.Expression):
    return _evaluate(node.body, used)
  if isinstance(node, ast.Constant) and type(node.value) is int:
    used.append(node.value)
    return fractions.Fraction(node.value)
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
    return -_evaluate(node.operand, used)
  if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
    return _OPS[type(node.op)](_evaluate(node.left, used), _evaluate(node.right, used))
  raise ValueError(f"not allowed in a countdown expression: {type(node).__name__}")


@register("countdown")
def countdown(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
  """1.0 if the tagged answer is an expression that uses exactly example["numbers"] (each once, any order)
  and evaluates to example["target"] (|diff| < 1e-5); 0.1 for any other tagged answer (invalid, other
  numbers, a division by zero, a miss); 0.0 without one.

  Example: numbers [3, 5, 2], target 16 -> "<answer>(3 + 5) * 2</answer>" 1.0, "<answer>3 * 5 + 2</answer>"
  0.1 (17), "<answer>8 * 2</answer>" 0.1 (other numbers).
  """
  del prompt
  answer = extract_answer(completion)
  if answer is None:
    return 0.0
  target = float(example["target"])
  wanted = sorted(int(n) for n in example["numbers"])
  if len(answer) > _MAX_EXPRESSION or not _EXPRESSION.fullmatch(answer):
    return 0.1
  used: list[int] = []
  try:
    value = _evaluate(ast.parse(answer.strip(), mode="eval"), used)
  except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
    return 0.1
  # Exact arithmetic: a product too large for a float must not raise OverflowError.
  hit = abs(value - fractions.Fraction(target)) < fractions.Fraction(1, 100000)
  return 1.0 if sorted(used) == wanted and hit else 0.1
