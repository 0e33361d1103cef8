"""Block diffusion against pure diffusion on the demo task: quality and decode speed side by side
(REFERENCE §14; configs/sft_task_demo.py vs configs/block_sft_task_demo.py, both from the demo checkpoint).

  python benchmarks/block_diffusion.py --pure=/tmp/llada_demo_task --block=/tmp/llada_demo_block

Quality, per workdir: the validation bound its training logged last (`eval_ppl_bound`: exp of the held-out
loss; an upper bound on the perplexity of the answers under each model's own bound), and greedy accuracy on
`--problems` held-out problems of the built-in task (`data.tasks`, questions no training problem asks),
scored by the task's rewards (`correct`, and `format`: one well-formed answer tag). Each model answers in
`--answer_length` tokens with its own sampler: the pure model one block, one token per step (as
benchmarks/grpo_demo.py); the block model `sampling.generate_blocks`, one token per step and with
LLaDA2.0's threshold (`--threshold`).

Speed: ms per generated token at `--gen_length` (256) after a held-out question, batch `--batch_size`,
median of `--repeats` timed runs after one compiling run: the pure model as the release samples it
(steps = gen_length, semi-autoregressive blocks of 32) and with Fast-dLLM (threshold 0.9 + dual cache),
the block model one token per step and with the threshold (its cache is exact, always on). Twice: every
one of the gen_length positions decoded, and stopping a row at EOS (`early_exit`: the rest is filled
with EOS), with the steps each setting took.
"""

import json
import os
import statistics
import time

import jax
import numpy as np
from absl import app, flags, logging

from llada_jax import rewards, sampling_options, serving
from llada_jax.data import tasks

_PURE = flags.DEFINE_string("pure", "/tmp/llada_demo_task", "Workdir of the pure-diffusion SFT.")
_BLOCK = flags.DEFINE_string("block", "/tmp/llada_demo_block", "Workdir of the block-diffusion SFT.")
_PROBLEMS = flags.DEFINE_integer("problems", 300, "Held-out problems for accuracy.")
_ANSWER = flags.DEFINE_integer("answer_length", 24, "Tokens of a greedy answer.")
_THRESHOLD = flags.DEFINE_float("threshold", 0.95, "The block sampler's confidence threshold (LLaDA2.0: 0.95).")
_GEN = flags.DEFINE_integer("gen_length", 256, "Generated tokens for the speed rows.")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Rows per generate call for the speed rows.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per speed row (after one compiling run).")
_CHUNK = flags.DEFINE_integer("chunk", 50, "Problems per generate call for accuracy.")
_SEED = flags.DEFINE_integer("corpus_seed", 0, "data.corpus_seed of the runs (the world the facts come from).")


def last_bound(workdir: str) -> tuple[int, float]:
  """(step, eval_ppl_bound) of the last validation a run logged."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8")]
  last = [r for r in rows if "eval_ppl_bound" in r][-1]
  return last["step"], last["eval_ppl_bound"]


def accuracy(model: serving.LoadedModel, problems: list[dict], options: dict) -> tuple[float, float, float]:
  """(correct, format, seconds) of `model`'s greedy answers to `problems` with sampler `options`."""
  fns = rewards.resolve(["correct", "format"])
  scores, t0 = [], time.perf_counter()
  for i in range(0, len(problems), _CHUNK.value):
    records = [tasks.to_prompt_record(p, prompt_field="prompt", answer_field="answer")
               for p in problems[i:i + _CHUNK.value]]
    questions = [tasks.question_of(r) for r in records]
    done = model.complete(questions, **options)
    scores.append(rewards.score(fns, questions, [c.text for c in done], records))
  table = np.concatenate(scores)
  return float((table[:, 0] > 0).mean()), float((table[:, 1] > 0).mean()), time.perf_counter() - t0


def speed(model: serving.LoadedModel, prompt: list[int], options: dict) -> tuple[float, float]:
  """(ms per generated token, mean steps per row) of `options` at gen_length, median of the timed runs."""
  prompts = [prompt] * _BATCH.value
  run = lambda: jax.block_until_ready(model.generate_ids(prompts, **options))
  run()  # compile
  times, steps = [], []
  for _ in range(_REPEATS.value):
    t0 = time.perf_counter()
    out = run()
    times.append(time.perf_counter() - t0)
    steps.append(float(np.mean(np.asarray(out.steps_B))))
  return statistics.median(times) / (_BATCH.value * _GEN.value) * 1e3, statistics.median(steps)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  problems = tasks.generate_problems(_PROBLEMS.value, _SEED.value + 1, world_seed=_SEED.value, split="heldout")
  pure, block = serving.load(_PURE.value), serving.load(_BLOCK.value)
  n, g, bs = _ANSWER.value, _GEN.value, block.block_size
  if not bs or pure.block_size:
    raise app.UsageError(f"--block must be a block-diffusion workdir and --pure a pure one; got block sizes "
                         f"{block.block_size} and {pure.block_size}")
  print(f"device {jax.devices()[0].device_kind}; block size {bs}; {len(problems)} held-out problems, answers of "
        f"{n} tokens; speed at gen_length {g}, batch {_BATCH.value}")
  rows = [
      ("pure", pure, "release, 1 token/step", dict(gen_length=n, steps=n, block_length=n),
       dict(gen_length=g, steps=g, block_length=32, early_exit=True)),
      ("pure", pure, "Fast-dLLM: threshold 0.9, dual cache", dict(gen_length=n, steps=n, block_length=n,
                                                                   threshold=0.9),
       dict(gen_length=g, steps=g, block_length=32, threshold=0.9, kv_cache="dual", early_exit=True)),
      ("block", block, "exact cache, 1 token/step", dict(gen_length=n), dict(gen_length=g, early_exit=True)),
      ("block", block, f"exact cache, threshold {_THRESHOLD.value}", dict(gen_length=n, threshold=_THRESHOLD.value),
       dict(gen_length=g, threshold=_THRESHOLD.value, early_exit=True)),
  ]
  question = tasks.question_of(tasks.to_prompt_record(problems[0], prompt_field="prompt", answer_field="answer"))
  print(f"| model | eval bound (step) | sampler | accuracy | format | ms/token @ gen {g} (steps) | "
        "same, stopping at EOS (steps) |")
  print("|---|---|---|---|---|---|---|")
  for name, model, label, acc_options, speed_options in rows:
    step, bound = last_bound(_PURE.value if name == "pure" else _BLOCK.value)
    correct, fmt, _ = accuracy(model, problems, sampling_options.resolve(acc_options, block_size=model.block_size))
    prompt = model.encode_prompt(question)
    full = speed(model, prompt, sampling_options.resolve({**speed_options, "early_exit": False},
                                                         block_size=model.block_size))
    stop = speed(model, prompt, sampling_options.resolve(speed_options, block_size=model.block_size))
    print(f"| {name} | {bound:.3f} ({step}) | {label} | {correct:.3f} | {fmt:.3f} | {full[0]:.3f} ({full[1]:.0f}) | "
          f"{stop[0]:.3f} ({stop[1]:.0f}) |", flush=True)


if __name__ == "__main__":
  app.run(main)
