"""How many Monte Carlo samples a log-likelihood estimate needs: l-based vs t-based (REFERENCE §5).

  python benchmarks/likelihood_variance.py                          # trains a tiny model first (~1 min)
  python benchmarks/likelihood_variance.py --workdir=/tmp/llada_demo  # a model you trained

For held-out (prompt, response) pairs from the built-in corpus, each estimator is run with `mc_num`
samples (drawn 16 at a time, as the release does) under `--seeds` different seeds; the standard
deviation across seeds, averaged over pairs, is the estimate's noise at that sample count. The paper
reports the l-based estimator stable at ~128 samples where the t-based one needs over 1000.
"""

import json
import os
import tempfile
import time

import numpy as np
from absl import app, flags

from llada_jax import evaluate, files, serving, train
from llada_jax.configs import default
from llada_jax.config import from_config_dict
from llada_jax.data import corpus

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run; default: train the tiny preset first.")
_STEPS = flags.DEFINE_integer("train_steps", 300, "Steps for the tiny model trained without --workdir.")
_PAIRS = flags.DEFINE_integer("pairs", 8, "Held-out (prompt, response) pairs.")
_SEEDS = flags.DEFINE_integer("seeds", 16, "Repetitions per sample count (the std is across these).")
_SAMPLES = flags.DEFINE_list("samples", ["16", "64", "256", "1024"], "mc_num values (multiples of 16).")
_RESPONSE = flags.DEFINE_integer("response_tokens", 16, "Response length in tokens.")


def _tiny_run() -> str:
  workdir = os.path.join(tempfile.mkdtemp(prefix="llada_lv_"), "tiny")
  c = default.get_config("tiny")
  c.train.update(num_steps=_STEPS.value, num_samples=0, log_every=100, checkpoint_every=_STEPS.value)
  c.optim.update(warmup_steps=20)
  cfg = from_config_dict(c)
  t0 = time.time()
  summary = train.train_and_evaluate(cfg, workdir)
  print(f"trained tiny model: {_STEPS.value} steps, loss {summary['metrics']['loss']:.3f}, "
        f"{time.time() - t0:.0f}s")
  return workdir


def _pairs(tok, seed: int, n: int, response_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
  """Held-out text (another sample seed, same world) cut into prompt + `response_tokens` tokens."""
  prompts, responses = [], []
  ids = []
  for doc in corpus.generate_documents(4000, seed + 1, world_seed=seed):
    ids += tok.encode(doc) + [tok.eos_id]
  stride = 24 + response_tokens
  for i in range(n):
    chunk = ids[i * stride:(i + 1) * stride]
    prompts.append(chunk[:24])
    responses.append(chunk[24:])
  return prompts, responses


def main(argv):
  del argv
  workdir = _WORKDIR.value or _tiny_run()
  loaded = serving.load(workdir)
  scorer = evaluate.Scorer.from_loaded(loaded)
  # Held-out text of the world the run trained on: its training config (config.json) names the corpus seed.
  run_config = json.loads(files.path(workdir, "config.json").read_text())
  prompts, responses = _pairs(loaded.tokenizer, run_config["data"]["corpus_seed"], _PAIRS.value,
                              _RESPONSE.value)
  counts = [int(s) for s in _SAMPLES.value]
  print(f"model: {workdir} (step {loaded.step}); {_PAIRS.value} pairs, prompt 24 + response "
        f"{_RESPONSE.value} tokens; std over {_SEEDS.value} seeds, mean over pairs (nats)")
  print(f"{'mc_num':>7} {'std l-based':>12} {'std t-based':>12} {'ratio t/l':>10} "
        f"{'mean l':>9} {'mean t':>9} {'seconds':>8}")
  for n in counts:
    row = {}
    t0 = time.time()
    for est in ("l", "t"):
      runs = np.stack([scorer.loglikelihood(prompts, responses, evaluate.LikelihoodConfig(
          mc_num=n, batch_size=16, estimator=est, seed=s, max_rows=256)) for s in range(_SEEDS.value)])
      row[est] = (runs.std(axis=0, ddof=1).mean(), runs.mean())
    print(f"{n:>7} {row['l'][0]:>12.3f} {row['t'][0]:>12.3f} {row['t'][0] / row['l'][0]:>10.1f} "
          f"{row['l'][1]:>9.2f} {row['t'][1]:>9.2f} {time.time() - t0:>8.1f}")


if __name__ == "__main__":
  app.run(main)
