"""Before vs after VRPO on the held-out built-in preferences (REFERENCE §9; the README demo models).

  llada-train --config=configs/demo.py --workdir=/tmp/llada_demo
  llada-train --config=configs/sft_demo.py --workdir=/tmp/llada_demo_sft
  llada-train --config=configs/vrpo_demo.py --workdir=/tmp/llada_demo_vrpo
  python benchmarks/vrpo_demo.py --before=/tmp/llada_demo_sft --after=/tmp/llada_demo_vrpo

Held-out pairs ask about entities no training pair mentions (`data.preference.split_entities`). For
each model: the share of pairs whose chosen response has the higher likelihood bound (the l-based
estimator, `--mc_num` samples, a fixed seed: the same masks for both models), the mean log-likelihood
gap, and the share of greedy answers that state the true fact (fact pairs) or take the requested
form (format pairs: as many words as asked for, whatever the value); overall
and per kind.
"""

import time

from absl import app, flags

from llada_jax import evaluate, serving
from llada_jax.data import preference

_BEFORE = flags.DEFINE_string("before", "/tmp/llada_demo_sft", "Workdir of the model before VRPO.")
_AFTER = flags.DEFINE_string("after", "/tmp/llada_demo_vrpo", "Workdir of the model after VRPO.")
_PAIRS = flags.DEFINE_integer("pairs", 200, "Held-out pairs.")
_MC = flags.DEFINE_integer("mc_num", 64, "Monte Carlo samples per likelihood (l-based).")
_GEN = flags.DEFINE_integer("gen_length", 16, "Tokens of a greedy answer (one block, one token per step).")


def main(argv):
  del argv
  records = preference.generate_preferences(_PAIRS.value, 1, world_seed=0, split="heldout")
  likelihood = evaluate.LikelihoodConfig(mc_num=_MC.value, batch_size=16, estimator="l", seed=0)
  print(f"{len(records)} held-out pairs; likelihood: l-based, {_MC.value} samples; greedy answers of "
        f"{_GEN.value} tokens")
  print("| model | kind | pairs | likelihood accuracy | mean log p(chosen) - log p(rejected) | greedy answers preferred |")
  print("|---|---|---|---|---|---|")
  for name, workdir in (("before (SFT)", _BEFORE.value), ("after (VRPO)", _AFTER.value)):
    t0 = time.time()
    report = evaluate.preference_report(serving.load(workdir), records, likelihood=likelihood,
                                        gen_length=_GEN.value, steps=_GEN.value)
    rows = [("all", {"pairs": report.num_pairs, "likelihood_accuracy": report.likelihood_accuracy,
                     "mean_loglik_gap": report.mean_loglik_gap, "greedy_share": report.greedy_share})]
    for kind, r in sorted(report.by_kind.items()):
      rows.append((kind, r))
    for kind, r in rows:
      print(f"| {name} | {kind} | {r['pairs']} | {r['likelihood_accuracy']:.3f} | {r['mean_loglik_gap']:+.2f} | "
            f"{r['greedy_share']:.3f} |")
    print(f"({name}: {time.time() - t0:.0f}s, {workdir})", flush=True)


if __name__ == "__main__":
  app.run(main)
