"""Reward functions: the built-ins on hand-written completions, the registry, import specs and `score`."""

import math

import numpy as np
import pytest

from llada_jax import rewards


def _length_reward(prompt, completion, example):
  """A custom reward, named in tests by its import spec f"{__name__}:_length_reward"."""
  return float(len(completion))


def _tag(text: str) -> str:
  return f"<answer>{text}</answer>"


# ---------------------------------------------------------------------------------------------------------
# extract_answer and the built-ins


@pytest.mark.parametrize("text, expected", [
    ("so it is 5. <answer> 5 </answer>", "5"),
    ("<answer>4</answer> no wait <answer>5</answer>", "5"),     # the last one
    ("<answer>a <answer>b</answer>", "b"),                       # a restarted answer
    ("<answer>two\nlines</answer>", "two\nlines"),               # DOTALL
    ("<answer></answer>", ""),
    ("<answer>5", None),
    ("5</answer>", None),
    ("no tags at all", None),
])
def test_extract_answer(text, expected):
  assert rewards.extract_answer(text) == expected


def test_builtins_are_registered():
  assert {"correct", "format", "gsm8k", "integer_answer", "countdown"} <= set(rewards.names())
  assert set(rewards.TAGGED) <= set(rewards.names())


@pytest.mark.parametrize("completion, answer, expected", [
    ("the capital of Kaloia is Tenra. <answer>Tenra</answer>", "Tenra", 1.0),
    ("<answer>  tenra. </answer>", "Tenra", 1.0),          # case, spaces, a final '.'
    ("<answer>red   cat</answer>", "red cat", 1.0),        # runs of spaces
    ("<answer>68</answer>", 68, 1.0),                      # a number as the reference
    ("<answer>Tenra</answer>", "Kalo", 0.0),
    ("Tenra", "Tenra", 0.0),                               # no tag
    ("<answer>Kalo</answer> <answer>Tenra</answer>", "Tenra", 1.0),  # the last tag counts
])
def test_correct(completion, answer, expected):
  assert rewards.correct("q", completion, {"answer": answer}) == expected


@pytest.mark.parametrize("completion, expected", [
    ("x is 3. <answer>3</answer>", 0.25),
    ("<answer>3</answer>\n  ", 0.25),                   # whitespace after the answer is fine
    ("reasoning\nover lines <answer> a b </answer>", 0.25),
    ("<answer>3</answer>.", 0.0),                       # text after the answer
    ("<answer>3</answer> <answer>4</answer>", 0.0),     # two answers
    ("<answer>  </answer>", 0.0),                       # empty
    ("</answer>3<answer>", 0.0),                        # out of order
    ("<answer>3", 0.0),
    ("<answer>3<answer></answer>", 0.0),                # a stray opening tag
    ("3", 0.0),
])
def test_format(completion, expected):
  assert rewards.format_reward("q", completion, {"answer": "3"}) == expected


@pytest.mark.parametrize("completion, reference, expected", [
    (_tag("1234"), "she pays 1,000 + 234.\n#### 1,234", 2.0),
    (_tag("1,234"), 1234, 2.0),
    (_tag("$1,234.00"), "1234", 2.0),
    (_tag("72"), 72, 2.0),
    (_tag("72"), "72.0", 2.0),
    (_tag("72."), "$72", 2.0),
    (_tag("-3"), "#### -3", 2.0),
    (_tag("x = 70 + 2 = 72"), "72", 2.0),                # the last number of the answer
    (_tag("71"), "72", 0.0),
    (_tag("seventy-two"), "72", 0.0),
    ("the answer is 72", "72", 0.0),                      # no tag, no fallback
])
def test_gsm8k(completion, reference, expected):
  assert rewards.gsm8k("q", completion, {"answer": reference}) == expected


def test_gsm8k_reference_without_a_number_raises():
  with pytest.raises(ValueError, match="holds no number"):
    rewards.gsm8k("q", _tag("1"), {"answer": "#### none"})


@pytest.mark.parametrize("completion, expected", [
    (_tag("72"), 0.5), (_tag(" 7 "), 0.5), (_tag("-3"), 0.0), (_tag("7.5"), 0.0), (_tag("72 apples"), 0.0),
    ("72", 0.0),
])
def test_integer_answer(completion, expected):
  assert rewards.integer_answer("q", completion, {"answer": "72"}) == expected


COUNTDOWN = {"numbers": [3, 5, 2], "target": 16}


@pytest.mark.parametrize("completion, expected", [
    (_tag("(3 + 5) * 2"), 1.0),
    (_tag("2*(5+3)"), 1.0),                  # any order of the numbers
    (_tag("(5 - 3) * 8"), 0.1),              # a number that was not given
    (_tag("(3 + 5) * 2 * 2"), 0.1),          # a given number used twice
    (_tag("3 * 5 + 2"), 0.1),                # 17: misses the target
    (_tag("(3 + 5) * 2 / (5 - 5)"), 0.1),    # division by zero (and other numbers)
    (_tag("16 / (3 - 3)"), 0.1),
    (_tag("__import__('os')"), 0.1),         # not arithmetic: never evaluated
    (_tag("(3 + 5) ** 2"), 0.1),             # no powers
    (_tag("3.0 + 5 * 2.6"), 0.1),            # no floats
    (_tag("(3 + 5) * 2 ="), 0.1),            # not an expression
    (_tag("9" * 500), 0.1),                  # too long
    ("(3 + 5) * 2", 0.0),                    # no tag
])
def test_countdown(completion, expected):
  assert rewards.countdown("q", completion, COUNTDOWN) == expected


def test_countdown_division_and_unary_minus_are_exact():
  # 8 / (3 - 8 / 3) = 24 exactly, though not in floating point step by step.
  assert rewards.countdown("q", _tag("8 / (3 - 8 / 3)"), {"numbers": [8, 3, 8, 3], "target": 24}) == 1.0
  assert rewards.countdown("q", _tag("-3 + 5 * 2"), {"numbers": [2, 3, 5], "target": 7}) == 1.0
  big = "*".join(["999999999"] * 40)  # far past a float: exact arithmetic, a plain miss
  assert rewards.countdown("q", _tag(big), {"numbers": [999999999] * 40, "target": 1}) == 0.1


# ---------------------------------------------------------------------------------------------------------
# The registry and resolve


def test_resolve_registered_names_and_import_specs(tmp_path, monkeypatch):
  fns = rewards.resolve(["correct", f"{__name__}:_length_reward"])
  assert [n for n, _ in fns] == ["correct", f"{__name__}:_length_reward"]
  assert fns[0][1] is rewards.correct and fns[1][1] is _length_reward
  # A module of the user's, found on sys.path, with a dotted attribute path.
  (tmp_path / "my_reward_module.py").write_text(
      "class Rewards:\n  @staticmethod\n  def shout(prompt, completion, example):\n"
      "    return float(completion.isupper())\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  (name, fn), = rewards.resolve(["my_reward_module:Rewards.shout"])
  assert name == "my_reward_module:Rewards.shout" and fn("q", "HI", {}) == 1.0
  assert [n for n, _ in rewards.resolve("format")] == ["format"]  # one name, not its characters


@pytest.mark.parametrize("names, expected", [
    (["corect"], r"unknown reward function 'corect'; registered: \(.*'correct'"),
    ([], "at least one reward function"),
    (["no_such_module_xyz:fn"], r"'no_such_module_xyz:fn': cannot import module 'no_such_module_xyz' "
                                r"\(ModuleNotFoundError"),
    (["math:no_such_fn"], "module 'math' has no 'no_such_fn'"),
    (["math:pi"], "is a float, not a function"),
    ([":fn"], "not an import spec"),
    (["correct", "correct"], "names 'correct' twice"),
])
def test_resolve_errors_name_the_field(names, expected):
  with pytest.raises(ValueError, match=expected) as e:
    rewards.resolve(names)
  assert "'grpo.rewards'" in str(e.value) and "\n" not in str(e.value)


def test_register_as_decorator_and_twice():
  name = "test_rewards_shorter_than_5"

  @rewards.register(name)
  def short(prompt, completion, example):
    return float(len(completion) < 5)

  assert name in rewards.names() and rewards.resolve([name]) == [(name, short)]
  with pytest.raises(ValueError, match="registered twice"):
    rewards.register(name, short)
  with pytest.raises(ValueError, match="without ':'"):
    rewards.register("a:b", short)
  rewards._REGISTRY.pop(name)  # leave the registry as the other tests expect it


# ---------------------------------------------------------------------------------------------------------
# score


def test_score_is_rows_by_functions():
  fns = rewards.resolve(["correct", "format"])
  out = rewards.score(fns, ["what is 2 plus 3?"] * 3,
                      ["2 plus 3 is 5. <answer>5</answer>", "<answer>6</answer> done", "5"],
                      [{"answer": "5"}] * 3)
  assert out.dtype == np.float32 and out.shape == (3, 2)
  np.testing.assert_array_equal(out, [[1.0, 0.25], [0.0, 0.0], [0.0, 0.0]])
  # bool and numpy scalars are numbers; no completions gives an empty [0, F] matrix.
  out = rewards.score([("b", lambda p, c, e: c == "x"), ("n", lambda p, c, e: np.float64(0.5))], ["q"] * 2,
                      ["x", "y"], [{}] * 2)
  np.testing.assert_array_equal(out, [[1.0, 0.5], [0.0, 0.5]])
  assert rewards.score(fns, [], [], []).shape == (0, 2)
  with pytest.raises(ValueError, match="one prompt and one example per completion"):
    rewards.score(fns, ["q"], ["a", "b"], [{}, {}])


def _raises(prompt, completion, example):
  return 1 / (len(completion) - 1)  # ZeroDivisionError on a one-character completion


@pytest.mark.parametrize("fn, expected", [
    (_raises, "reward function 'bad' raised ZeroDivisionError: division by zero on completion 1 "),
    (lambda p, c, e: math.nan if c == "x" else 0.0, "reward function 'bad' returned nan on completion 1 "),
    (lambda p, c, e: math.inf if c == "x" else 0.0, "reward function 'bad' returned inf on completion 1 "),
    (lambda p, c, e: None if c == "x" else 0.0, "reward function 'bad' returned None (a reward must be a real "
                                                "number) on completion 1 "),
    (lambda p, c, e: "1" if c == "x" else 0.0, "reward function 'bad' returned str '1'"),
])
def test_score_failures_are_one_line_naming_the_function(fn, expected):
  prompts = ["fine", "what is 2 plus 3?\nshow your work " + "and more " * 20]
  with pytest.raises(rewards.RewardError) as e:
    rewards.score([("format", rewards.format_reward), ("bad", fn)], prompts, ["long enough", "x"], [{}, {}])
  msg = str(e.value)
  assert msg.startswith(expected) and "\n" not in msg, msg
  assert "(prompt 'what is 2 plus 3?\\nshow your work and more" in msg and msg.endswith("...')"), msg
  assert len(msg) < 250
  if fn is _raises:
    assert isinstance(e.value.__cause__, ZeroDivisionError)


def test_exception_message_with_line_breaks_stays_on_one_line():
  def fails(prompt, completion, example):
    raise KeyError("answer\nmissing")

  with pytest.raises(rewards.RewardError, match=r"raised KeyError: 'answer\\nmissing' on completion 0") as e:
    rewards.score([("k", fails)], ["q"], ["c"], [{}])
  assert "\n" not in str(e.value)
