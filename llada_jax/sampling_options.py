"""The sampling options of every inference entry point, declared once.

`llada-sample`, `llada-chat`, `llada-eval` and lm-eval's adapter (`harness.LladaLM`) take the same
options with the same defaults: the reverse-process options (the fields of `sampling.SamplingConfig`)
and the seed. Each is declared here once, as an `Option` (type, default, allowed values, help):
`cli/sampling_flags.py` defines every command's absl flags from these records, `parse` checks keyword
arguments against them (the harness's, which lm-eval may hand over typed from `--model_args` text), and
`resolve` turns them into the keyword dict that `serving.LoadedModel.complete` and `serving.ChatSession`
take. A new option is one more record here (and its field in `SamplingConfig`).

Three options default to "unset" (None), and one rule, in `resolve`, derives them:
- gen_length: the caller's token budget where it has one (an lm-eval task's `max_gen_toks`; the
  harness falls back to lm-eval's 256 when the task names none), else DEFAULT_GEN_LENGTH (64);
- steps: gen_length (one token per step);
- block_length: gen_length (pure diffusion).
A block-diffusion model (`model.block_size` > 0, sampled by `sampling.generate_blocks`) decodes its own
blocks: block_length and steps (per block) default to its block size, and gen_length is not rounded
(the canvas is); `tau_edit` / `max_post_steps` (LLaDA2.1 token editing) apply to it alone.
Every other default leaves the released reverse process as it is (greedy, low-confidence remasking, no
guidance, no threshold, no KV cache, EOS untouched), so a command run without options writes exactly
the official `generate`'s output. Chat models often read better with semi-autoregressive blocks and
EOS committed last (`block_length=32`, `suppress_eos_confidence=True`): pass those; no command changes
the defaults for itself.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping, Sequence

from llada_jax import errors, sampling

DEFAULT_GEN_LENGTH = 64  # tokens generated when gen_length is unset and the caller has no budget


@dataclasses.dataclass(frozen=True)
class Option:
  """One sampling option: the flag `--NAME` of every inference command and a keyword of the harness."""

  name: str
  type: type                      # int | float | bool | str
  default: Any
  help: str
  choices: tuple[str, ...] = ()   # the allowed values of a str option
  optional: bool = False          # None is a value: unset (derived by `resolve`) or off


OPTIONS: tuple[Option, ...] = (
    Option("gen_length", int, None, "Tokens generated after the prompt (default: an lm-eval task's "
           f"max_gen_toks under llada-eval, else {DEFAULT_GEN_LENGTH}).", optional=True),
    Option("steps", int, None, "Reverse-process steps (default: gen_length, one token per step).", optional=True),
    Option("block_length", int, None, "Semi-autoregressive block length, a divisor of gen_length (default: "
           "gen_length, pure diffusion).", optional=True),
    Option("temperature", float, 0.0, "Sampling temperature (0: greedy); an lm-eval task's own temperature "
           "or do_sample=false takes precedence."),
    Option("cfg_scale", float, 0.0, "Classifier-free guidance scale (0: off); llada-eval applies it to "
           "likelihoods too."),
    Option("remasking", str, "low_confidence", "Which masked positions a step commits first.",
           choices=tuple(sampling.REMASKING)),
    Option("threshold", float, None, "Fast-dLLM: commit every masked token with confidence >= this, in "
           "(0, 1], at least one per step (default: off).", optional=True),
    Option("suppress_eos_logit", bool, False, "Never predict EOS (the release's logits_eos_inf)."),
    Option("suppress_eos_confidence", bool, False, "Commit EOS / end-of-turn predictions last (the "
           "release's confidence_eos_eot_inf)."),
    Option("early_exit", bool, False, "Stop a row once its remaining masked positions can only be EOS."),
    Option("kv_cache", str, "none", "Fast-dLLM block-wise approximate KV cache, refreshed at each block.",
           choices=tuple(sampling.KV_CACHES)),
    Option("tau_edit", float, None, "Block-diffusion models (LLaDA2.1 token editing): also re-write a filled "
           "token of the current block whose prediction differs with probability > this, in (0, 1] (default: "
           "off).", optional=True),
    Option("max_post_steps", int, 16, "Block-diffusion models with tau_edit: steps a full block keeps "
           "running while edits still fire."),
    Option("seed", int, 0, "Random seed (temperature, random remasking; llada-eval: the Monte Carlo "
           "masks too)."),
)
BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def defaults() -> dict[str, Any]:
  """{name: default} of every option."""
  return {o.name: o.default for o in OPTIONS}


def _what(option: Option) -> str:
  kind = (f"one of {option.choices}" if option.choices else
          {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[option.type])
  return kind + (" or None" if option.optional else "")


def _coerce(option: Option, value: Any) -> Any:
  """`value` as the option's type; a ValueError naming the option when it is not one."""
  if value is None and option.optional:
    return None
  out, t = None, option.type
  if t is bool:
    if isinstance(value, bool):
      out = value
    elif isinstance(value, str) and value.lower() in ("true", "false"):
      out = value.lower() == "true"
  elif t in (int, float) and not isinstance(value, bool):
    try:
      number = t(value)
    except (TypeError, ValueError):
      number = None
    if number is not None and (t is float or isinstance(value, str) or number == value):
      out = number  # 2.5 is no integer, "2" is (lm-eval hands over text it could not type)
  elif t is str and isinstance(value, str) and (not option.choices or value in option.choices):
    out = value
  if out is None:
    raise errors.OptionError(option.name,
                             f"sampling option '{option.name}' must be {_what(option)}; got {value!r}")
  return out


def parse(options: Mapping[str, Any], *, where: str = "sampling options",
          others: Sequence[str] = ()) -> dict[str, Any]:
  """Every option: the given ones checked and typed, the rest at their defaults.

  An unknown name is a ValueError naming it, the closest known name and what is accepted; `others`
  are the caller's own keywords (shown in that message, e.g. the harness's likelihood options)."""
  unknown = [name for name in options if name not in BY_NAME]
  if unknown:
    name = unknown[0]
    close = difflib.get_close_matches(name, list(NAMES) + list(others), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    rest = f"; {where} also takes {', '.join(others)}" if others else ""
    raise errors.OptionError(name, f"{where}: unknown option '{name}'{hint}; the sampling options are "
                             f"{', '.join(NAMES)}{rest}")
  return {o.name: _coerce(o, options[o.name]) if o.name in options else o.default for o in OPTIONS}


def resolve(options: Mapping[str, Any], *, budget: int | None = None, block_size: int = 0) -> dict[str, Any]:
  """The keyword dict of `serving.LoadedModel.complete` / `serving.ChatSession` (seed included), with
  the unset lengths derived (module docstring).

  `budget` is a caller's token budget (lm-eval's `max_gen_toks`): an unset gen_length becomes it, and
  gen_length is then rounded up to whole blocks, since such a caller cuts each answer at its budget.
  Without one, gen_length must be a multiple of block_length (`SamplingConfig.validate` says so).

  `block_size` > 0 (a block-diffusion model's `model.block_size`): unset block_length and steps become the
  block size (steps per block), and gen_length stays as it is (`sampling.generate_blocks` rounds the canvas).

  Example: resolve({}) -> gen_length = steps = block_length = 64; resolve({"block_length": 4},
  budget=6) -> gen_length = steps = 8, block_length = 4; resolve({}, block_size=32) -> gen_length = 64,
  steps = block_length = 32.
  """
  out = parse(options)
  unset = lambda name, derived: derived if out[name] is None else out[name]  # 0 is a value (refused later)
  gen_length = unset("gen_length", budget or DEFAULT_GEN_LENGTH)
  if block_size:
    out.update(gen_length=gen_length, block_length=unset("block_length", block_size),
               steps=unset("steps", block_size))
    return out
  block_length = unset("block_length", gen_length)
  if budget is not None and block_length > 0:
    gen_length = -(-gen_length // block_length) * block_length
  out.update(gen_length=gen_length, block_length=block_length, steps=unset("steps", gen_length))
  return out


def markdown_table() -> str:
  """The options as a Markdown table (README's "Sampling and chat" holds it; tests keep it current)."""
  rows = ["| Flag | Default | Meaning |", "|---|---|---|"]
  for o in OPTIONS:
    default = "unset" if o.default is None else f"`{o.default}`"
    meaning = o.help + (f" One of: {', '.join(f'`{c}`' for c in o.choices)}." if o.choices else "")
    rows.append(f"| `--{o.name}` | {default} | {meaning} |")
  return "\n".join(rows)
