"""The console scripts as a user runs them: `llada-train`, and the sampling options that `llada-sample`,
`llada-chat` and `llada-eval` share (one declaration, `llada_jax.sampling_options`)."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import flag_probe

from llada_jax import sampling, sampling_options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def _llada_train(*args):
  exe = shutil.which("llada-train")
  cmd = [exe] if exe else [sys.executable, "-m", "llada_jax.cli.train"]
  return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=600)


def test_train_cli_trains_and_samples(tmp_path):
  r = _llada_train(f"--config={TINY}", f"--workdir={tmp_path}", "--config.train.num_steps=3",
                   "--config.optim.warmup_steps=1")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "unigram entropy" in r.stdout and "sample: " in r.stdout and "done: step 3" in r.stdout
  assert (tmp_path / "checkpoints" / "3").is_dir() and (tmp_path / "tokenizer.model").exists()


@pytest.mark.parametrize("flag,field", [
    ("--config.model.num_heads=3", "model.num_heads"),
    ("--config.optim.peak_lr=-0.1", "optim.peak_lr"),
    ("--config.diffusion.mask_token_id=9999", "diffusion.mask_token_id"),
])
def test_train_cli_rejects_bad_values_in_one_line(tmp_path, flag, field):
  r = _llada_train(f"--config={TINY}", f"--workdir={tmp_path}", flag)
  assert r.returncode == 1
  assert field in r.stderr and "Traceback" not in r.stderr
  assert not (tmp_path / "checkpoints").exists()  # nothing was started


# ---------------------------------------------------------------------------------------------------------
# The sampling options: one declaration, the same flags in every inference command

INFERENCE_COMMANDS = {"llada-sample": "llada_jax.cli.sample", "llada-chat": "llada_jax.cli.chat",
                      "llada-eval": "llada_jax.cli.evaluate"}

_ABSL_TYPE = {int: "int", float: "float", bool: "bool", str: "string"}


@pytest.fixture(scope="module")
def command_flags():
  by_module = flag_probe.defined_flags(INFERENCE_COMMANDS.values())
  return {command: {name: {k: v for k, v in flag.items() if k != "kind"} for name, flag in by_module[module].items()}
          for command, module in INFERENCE_COMMANDS.items()}


def _expected(option: sampling_options.Option) -> dict:
  shown = f"<{'|'.join(option.choices)}>: {option.help}" if option.choices else option.help  # absl's prefix
  return {"type": ("string enum" if option.choices else _ABSL_TYPE[option.type]), "default": option.default,
          "help": shown, "choices": list(option.choices) or None}


@pytest.mark.parametrize("command", sorted(INFERENCE_COMMANDS))
def test_inference_commands_take_every_sampling_option_as_declared(command_flags, command):
  defined = command_flags[command]
  missing = [name for name in sampling_options.NAMES if name not in defined]
  assert not missing, f"{command} lacks the sampling flags {missing}"
  for option in sampling_options.OPTIONS:
    assert defined[option.name] == _expected(option), f"{command} --{option.name} differs from its declaration"


def test_inference_commands_agree_on_the_sampling_options(command_flags):
  views = {command: {name: flags[name] for name in sampling_options.NAMES}
           for command, flags in command_flags.items()}
  first = views["llada-sample"]
  assert all(view == first for view in views.values())


def test_declaration_covers_the_sampler():
  """Every reverse-process option of `SamplingConfig` (and the seed) is declared, with its type, and
  each default the declaration gives a number is the one the sampler checks against."""
  fields = {f.name: f for f in dataclasses.fields(sampling.SamplingConfig)}
  assert set(sampling_options.NAMES) == set(fields) | {"seed"}
  for option in sampling_options.OPTIONS:
    if option.name in fields and option.default is not None:  # None: unset lengths, or threshold off
      assert option.default == fields[option.name].default, option.name
  assert sampling_options.BY_NAME["remasking"].choices == tuple(sampling.REMASKING)
  assert sampling_options.BY_NAME["kv_cache"].choices == tuple(sampling.KV_CACHES)


def test_resolve_derives_the_unset_lengths():
  base = sampling_options.resolve({})
  assert (base["gen_length"], base["steps"], base["block_length"]) == (sampling_options.DEFAULT_GEN_LENGTH,) * 3
  assert base == {**sampling_options.defaults(), "gen_length": 64, "steps": 64, "block_length": 64}
  sampling.SamplingConfig(**{k: v for k, v in base.items() if k != "seed"}).validate(1, 4096)
  assert sampling_options.resolve({"gen_length": 32})["steps"] == 32  # one token per step, one block
  assert sampling_options.resolve({"gen_length": 32, "block_length": 8})["block_length"] == 8
  # A caller's budget (an lm-eval task's max_gen_toks): the gen_length when unset, in whole blocks.
  got = sampling_options.resolve({"block_length": 4}, budget=6)
  assert (got["gen_length"], got["steps"], got["block_length"]) == (8, 8, 4)
  assert sampling_options.resolve({"gen_length": 16}, budget=6)["gen_length"] == 16
  # Without a budget a length that is not whole blocks is left for SamplingConfig.validate to name.
  assert sampling_options.resolve({"gen_length": 10, "block_length": 4})["gen_length"] == 10


def test_parse_types_and_rejects_values_naming_the_option():
  # lm-eval hands --model_args over as typed values, or as text it could not type.
  got = sampling_options.parse({"gen_length": "8", "steps": 8.0, "threshold": "0.9", "early_exit": "true"})
  assert (got["gen_length"], got["steps"], got["threshold"], got["early_exit"]) == (8, 8, 0.9, True)
  assert got["kv_cache"] == "none" and got["seed"] == 0  # the rest at their defaults
  for bad, named in [({"gen_length": 2.5}, "'gen_length' must be an integer or None; got 2.5"),
                     ({"early_exit": 1}, "'early_exit' must be true or false"),
                     ({"kv_cache": "full"}, "'kv_cache' must be one of ('none', 'prefix', 'dual')"),
                     ({"temperature": "hot"}, "'temperature' must be a number"),
                     ({"seed": None}, "'seed' must be an integer; got None")]:
    with pytest.raises(ValueError, match=re.escape(named)):
      sampling_options.parse(bad)
  with pytest.raises(ValueError, match=r"unknown option 'gen_lenght' \(did you mean 'gen_length'\?\)"):
    sampling_options.parse({"gen_lenght": 8})


def test_readme_lists_the_sampling_options():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  assert sampling_options.markdown_table() in readme, (
      "README.md's table of sampling options is stale: paste sampling_options.markdown_table() there")
