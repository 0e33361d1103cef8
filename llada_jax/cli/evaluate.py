"""`llada-eval`: run lm-evaluation-harness tasks on a trained model (`pip install llada_jax[eval]`).

  llada-eval --workdir=/tmp/llada_demo --tasks=my_mc --include_path=tasks/ --output=results.json
  llada-eval --workdir=... --tasks=hellaswag,arc_easy --limit=100 --mc_num=32

`--include_path` is a folder of lm-eval task YAMLs; their data may be local files (`dataset_path: json`
with `dataset_kwargs: {data_files: ...}`), so nothing is downloaded. Built-in tasks fetch their data
from the Hugging Face Hub on first use: run them where the network is, or with the datasets cache
already filled. This command itself never downloads.

Generation tasks sample with the options every inference command shares (`--gen_length`, `--steps`,
`--block_length`, `--remasking`, `--threshold`, `--kv_cache`, ...; `llada_jax.sampling_options`): an
unset `--gen_length` is each task's `max_gen_toks`, unset steps and block_length are gen_length.
"""

import json
import os

from absl import app, flags

from llada_jax.cli import common, parsing, sampling_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (checkpoints/, tokenizer.model).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_TASKS = flags.DEFINE_list("tasks", [], "lm-eval task, group or tag names (globs allowed), comma-separated.")
_INCLUDE = flags.DEFINE_string("include_path", None, "Folder of your own lm-eval task YAMLs.")
_LIMIT = flags.DEFINE_float("limit", None, "Documents per task (< 1: that fraction of them); for quick checks.")
_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (default: the task's).", lower_bound=0)
_OUTPUT = flags.DEFINE_string("output", None, "Write lm-eval's results (metrics, configs) here as JSON.")
_CHAT = flags.DEFINE_bool("apply_chat_template", False, "Render prompts with the chat template (SFT models).")
_MC = flags.DEFINE_integer("mc_num", 128, "Monte Carlo samples per likelihood (diffusion models).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Monte Carlo samples per forward pass (divides --mc_num).")
_ESTIMATOR = flags.DEFINE_enum("estimator", "l", ["l", "t"], "Likelihood estimator: l-based or t-based.")
_GREEDY = flags.DEFINE_bool("check_greedy", False, "Compute is_greedy (LAMBADA-style acc): one decode each.")
_GEN_BATCH = flags.DEFINE_integer("gen_batch_size", 8, "Prompts sampled together.", lower_bound=1)
_SAMPLING = sampling_flags.define()  # --gen_length, --steps, ...: the same in every inference command


def task_manager(names: list[str], include_path: str | None):
  """An lm-eval TaskManager that knows every name, and the names with globs expanded.

  Indexing lm-eval's built-in tasks takes seconds, so when every name is a task of `include_path` only
  that folder is indexed. An unknown name is a ValueError naming it."""
  from lm_eval.tasks import TaskManager

  if include_path is not None and not os.path.isdir(include_path):
    raise FileNotFoundError(f"--include_path {include_path} is not a folder")
  if include_path is not None:
    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(n in local.all_subtasks for n in names):
      return local, list(names)
  tm = TaskManager(include_path=include_path)
  expanded = []
  for name in names:
    found = [name] if os.path.isfile(name) else tm.match_tasks([name])
    if not found:
      where = (f"nor a task under --include_path={include_path}" if include_path
               else "(for your own task files pass --include_path=DIR)")
      raise ValueError(f"unknown task '{name}': not one of lm-eval's tasks, groups or tags {where}")
    expanded += [f for f in found if f not in expanded]
  return tm, expanded


def table(results: dict) -> str:
  """One line per task and metric: value and standard error."""
  lines = []
  for task, metrics in results.get("results", {}).items():
    for key, value in metrics.items():
      if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
        continue  # metrics are 'name,filter'; skip alias, sample counts and the errors shown beside
      metric, _, filt = key.partition(",")
      stderr = metrics.get(f"{metric}_stderr,{filt}")
      err = f" +- {stderr:.4f}" if isinstance(stderr, (int, float)) else ""
      lines.append(f"{task:<24} {metric:<16} {value:.4f}{err}")
  return "\n".join(lines)


@common.user_errors("llada-eval")
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _TASKS.value:
    raise ValueError("give --tasks=NAME[,NAME...]")
  try:
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    from llada_jax import harness
  except ImportError as e:
    raise ValueError(f"llada-eval needs lm-evaluation-harness ({e}): pip install 'llada_jax[eval]'") from e

  tm, names = task_manager(_TASKS.value, _INCLUDE.value)
  lm = harness.LladaLM(_WORKDIR.value, step=_STEP.value, mc_num=_MC.value, batch_size=_BATCH.value,
                       estimator=_ESTIMATOR.value, check_greedy=_GREEDY.value, gen_batch_size=_GEN_BATCH.value,
                       **sampling_flags.values(_SAMPLING))  # unset lengths: the harness derives them per task
  try:
    results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=_FEWSHOT.value, limit=_LIMIT.value,
                                      task_manager=tm, log_samples=False, apply_chat_template=_CHAT.value,
                                      fewshot_as_multiturn=_CHAT.value)
  except ConnectionError as e:  # a built-in task's data is neither cached nor reachable
    raise ValueError(f"{e} (built-in tasks download their data on first use: run where the Hugging Face "
                     f"Hub is reachable once, or use local task files with --include_path)") from e
  print(table(results))
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w", encoding="utf-8") as f:
      json.dump({k: v for k, v in results.items() if k != "samples"}, f, indent=2,
                default=handle_non_serializable)
  return 0


def run():
  flags.mark_flag_as_required("workdir")
  app.run(main, flags_parser=parsing.flags_parser("llada-eval"))


if __name__ == "__main__":
  run()
