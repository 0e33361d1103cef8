"""The absl flags of the sampling options, made from their one declaration (`llada_jax.sampling_options`).

`llada-sample`, `llada-chat` and `llada-eval` each call `define()` at import, so the three take the same
`--gen_length`, `--steps`, ... with the same defaults and help; `values(holders)` reads them back as the
keyword dict that `sampling_options.resolve` (and the harness) take.
"""

from __future__ import annotations

from typing import Any

from absl import flags

from llada_jax import sampling_options


def define(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, flags.FlagHolder]:
  """Defines `--NAME` for every option; returns {name: holder}."""
  holders = {}
  for o in sampling_options.OPTIONS:
    if o.choices:
      holder = flags.DEFINE_enum(o.name, o.default, list(o.choices), o.help, flag_values=flag_values)
    else:
      define_one = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
                    str: flags.DEFINE_string}[o.type]
      holder = define_one(o.name, o.default, o.help, flag_values=flag_values)
    holders[o.name] = holder
  return holders


def values(holders: dict[str, flags.FlagHolder]) -> dict[str, Any]:
  """{name: parsed value} of the flags `define` made (unset lengths stay None: `resolve` derives them)."""
  return {name: holder.value for name, holder in holders.items()}
