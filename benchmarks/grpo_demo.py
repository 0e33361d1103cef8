"""Held-out accuracy of the built-in verifiable task before and after RL (or more SFT), and an RL run's
reward curve and time split (REFERENCE §10; configs/grpo_demo.py).

  python benchmarks/grpo_demo.py --workdirs=/tmp/llada_demo_task,/tmp/llada_demo_grpo,/tmp/llada_demo_task_more \\
      --curve=/tmp/llada_demo_grpo

For each workdir: greedy completions (the rollouts' reverse process at temperature 0: `--gen_length`
tokens, one per step, one block) of `--problems` held-out problems (`data.tasks.generate_problems(...,
split='heldout')`: questions no training problem asks), scored by the task's rewards: accuracy (`correct`)
and the share with one well-formed answer tag (`format`), overall and per kind. `--curve` prints the
logged mean reward, KL and completion length of an RL workdir's metrics.jsonl, and the mean split of a
step's time between rollouts, rewards and updates.
"""

import collections
import json
import os
import time

import numpy as np
from absl import app, flags, logging

from llada_jax import rewards, serving
from llada_jax.data import tasks

_WORKDIRS = flags.DEFINE_list("workdirs", ["/tmp/llada_demo_task", "/tmp/llada_demo_grpo"], "Workdirs to evaluate.")
_PROBLEMS = flags.DEFINE_integer("problems", 300, "Held-out problems.")
_GEN = flags.DEFINE_integer("gen_length", 24, "Tokens of a greedy answer (one block, one token per step).")
_BATCH = flags.DEFINE_integer("batch_size", 50, "Problems per generate call.")
_CURVE = flags.DEFINE_string("curve", "", "An RL workdir whose logged rewards and time split to print.")
_SEED = flags.DEFINE_integer("corpus_seed", 0, "data.corpus_seed of the runs (the world the facts come from).")


def accuracy(workdir: str, problems: list[dict]) -> dict[str, dict[str, float]]:
  """{kind or 'all': {'n', 'correct', 'format'}} of greedy completions of `problems` by `workdir`'s model."""
  model = serving.load(workdir)
  fns = rewards.resolve(["correct", "format"])
  scores, kinds = [], []
  for i in range(0, len(problems), _BATCH.value):
    chunk = problems[i:i + _BATCH.value]
    records = [tasks.to_prompt_record(p, prompt_field="prompt", answer_field="answer") for p in chunk]
    done = model.complete([tasks.question_of(r) for r in records], gen_length=_GEN.value, steps=_GEN.value,
                          block_length=_GEN.value)
    scores.append(rewards.score(fns, [tasks.question_of(r) for r in records], [c.text for c in done], records))
    kinds += [p["kind"] for p in chunk]
  table = np.concatenate(scores)
  out = {}
  for kind in ["all"] + sorted(set(kinds)):
    rows = table if kind == "all" else table[[k == kind for k in kinds]]
    out[kind] = {"n": len(rows), "correct": float((rows[:, 0] > 0).mean()), "format": float((rows[:, 1] > 0).mean())}
  return out


def curve(workdir: str) -> None:
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8")]
  train = [r for r in rows if "reward" in r]
  evals = [r for r in rows if "eval_reward" in r]
  print(f"\nreward curve of {workdir} (logged window means):")
  print("| step | reward | correct | format | KL | completion length | clip fraction |")
  print("|---|---|---|---|---|---|---|")
  for r in train:
    print(f"| {r['step']} | {r['reward']:.3f} | {r.get('reward/correct', float('nan')):.3f} | "
          f"{r.get('reward/format', float('nan')):.3f} | {r['kl']:.4f} | {r['completion_length']:.1f} | "
          f"{r['clip_fraction']:.3f} |")
  if evals:
    print("\nheld-out (greedy) during the run: " + ", ".join(
        f"step {r['step']}: {r.get('eval_reward/correct', float('nan')):.3f}" for r in evals))
  parts = collections.OrderedDict((k, np.mean([r[k] for r in train])) for k in
                                  ("time/rollout_s", "time/reward_s", "time/logp_wait_s", "time/update_s"))
  total = sum(parts.values())
  print("\nmean time per step: " + ", ".join(f"{k[5:-2]} {v:.2f}s ({v / total:.0%})" for k, v in parts.items())
        + f"; rollout {np.mean([r['rollout_tokens_per_s'] for r in train]):.0f} generated tokens/s, update "
        f"{np.mean([r['update_tokens_per_s'] for r in train]):.0f} tokens/s")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # no per-restore Orbax lines between the table's rows
  problems = tasks.generate_problems(_PROBLEMS.value, _SEED.value + 1, world_seed=_SEED.value, split="heldout")
  print(f"{len(problems)} held-out problems; greedy answers of {_GEN.value} tokens")
  print("| model | kind | problems | accuracy (correct) | answer tag well formed |")
  print("|---|---|---|---|---|")
  for workdir in _WORKDIRS.value:
    t0 = time.time()
    for kind, r in accuracy(workdir, problems).items():
      print(f"| {workdir} | {kind} | {r['n']} | {r['correct']:.3f} | {r['format']:.3f} |")
    print(f"({workdir}: {time.time() - t0:.0f}s)", flush=True)
  if _CURVE.value:
    curve(_CURVE.value)


if __name__ == "__main__":
  app.run(main)
