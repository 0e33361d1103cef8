"""How much each of VRPO's variance controls steadies the preference score and the loss gradient (REFERENCE §9).

  python benchmarks/vrpo_variance.py --policy=/tmp/llada_demo_vrpo --reference=/tmp/llada_demo_sft

A policy (a VRPO run's workdir) and its reference (the SFT run it started from) score `--pairs` held-out
built-in preference pairs. For each setting the DPO-on-ELBO loss is evaluated under `--seeds` seeds; the
table gives, across seeds: the std of each pair's preference score (the bracket of the DPO loss,
(B_pol(y_w) - B_ref(y_w)) - (B_pol(y_l) - B_ref(y_l)), averaged over pairs), the std of the loss, the
relative std of the gradient's norm, and the mean cosine between the gradients of two seeds (1: every
seed's gradient points the same way; near 0: the direction is noise). Settings at the same budget n = `--budget`
samples per ELBO, except the naive one:
  naive                 n = 1, policy and reference draw independently
  budget                n time x mask = 1 x n (one timestep, n masks), independent
  budget + allocation   n x 1 (n timesteps, one mask each), independent
  VRPO                  n x 1, policy and reference share timesteps and masks (antithetic)
The paper's claim, in shape: each control lowers the variance, antithetic sharing most of all.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from llada_jax import diffusion, model as model_lib, serving
from llada_jax.data import preference

_POLICY = flags.DEFINE_string("policy", "/tmp/llada_demo_vrpo", "Workdir of the policy (a VRPO run).")
_REFERENCE = flags.DEFINE_string("reference", "/tmp/llada_demo_sft", "Workdir of the reference (its SFT start).")
_PAIRS = flags.DEFINE_integer("pairs", 16, "Held-out preference pairs (one batch).")
_SEEDS = flags.DEFINE_integer("seeds", 32, "Repetitions per setting (the stds are across these).")
_BUDGET = flags.DEFINE_integer("budget", 8, "Monte Carlo samples per ELBO (VRPO's n).")
_SEQ = flags.DEFINE_integer("seq_len", 64, "Row length of the pairs.")
_ESTIMATOR = flags.DEFINE_enum("estimator", "t", ["t", "l"], "ELBO estimator.")
_BETA = flags.DEFINE_float("beta", 0.1, "DPO beta.")


def _batch(tok, pairs: int, seq_len: int) -> dict:
  records = preference.generate_preferences(4 * pairs, 1, world_seed=0, split="heldout")
  ds = preference.preference_dataset(records, tok, seq_len=seq_len, batch_size=pairs, seed=0)
  return {k: jnp.asarray(v) for k, v in next(iter(ds)).items()}


def main(argv):
  del argv
  policy, reference = serving.load(_POLICY.value), serving.load(_REFERENCE.value)
  graphdef, mask_id = policy.graphdef, policy.mask_id
  batch = _batch(policy.tokenizer, _PAIRS.value, _SEQ.value)
  score = lambda params: diffusion.from_logits(
      lambda t, v: model_lib.apply(graphdef, params, t, v, right_padded=True))

  def loss_and_score(params, rng, n_time, n_mask, antithetic):
    out, _, _ = diffusion.vrpo_dpo(
        score(params), score(reference.params), rng, chosen_BL=batch["chosen"], rejected_BL=batch["rejected"],
        prompt_len_B=batch["prompt_len"], valid_BL=batch["valid"], mask_id=mask_id, beta=_BETA.value,
        n_time=n_time, n_mask=n_mask, antithetic=antithetic, estimator=_ESTIMATOR.value)
    return out.loss, out.margin_B / _BETA.value  # the bracket of each pair

  grad_fn = jax.jit(jax.value_and_grad(loss_and_score, has_aux=True), static_argnums=(2, 3, 4))
  flat = lambda g: np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(g)])

  t0 = time.time()
  n = _BUDGET.value
  settings = [("naive", 1, 1, False), ("budget", 1, n, False), ("budget + allocation", n, 1, False),
              ("VRPO (+ antithetic)", n, 1, True)]
  print(f"policy {_POLICY.value} vs reference {_REFERENCE.value}; {_PAIRS.value} held-out pairs, "
        f"{_SEEDS.value} seeds, estimator {_ESTIMATOR.value}, beta {_BETA.value}")
  print(f"| setting | n_time x n_mask | antithetic | std of score | std of loss | std of grad norm / mean "
        f"| cos(grad, grad) across seeds |")
  print("|---|---|---|---|---|---|---|")
  for name, n_time, n_mask, anti in settings:
    scores, losses, norms, units = [], [], [], []
    for seed in range(_SEEDS.value):
      rng = jax.random.key(seed)
      (loss, score_B), g = grad_fn(policy.params, rng, n_time, n_mask, anti)
      g = flat(g)
      scores.append(np.asarray(score_B))
      losses.append(float(loss))
      norms.append(np.linalg.norm(g))
      units.append(g / np.linalg.norm(g))
    score_std = float(np.std(np.stack(scores), axis=0).mean())
    unit = np.stack(units)
    gram = unit @ unit.T
    pairwise = float((gram.sum() - np.trace(gram)) / (len(unit) * (len(unit) - 1)))
    print(f"| {name} | {n_time} x {n_mask} | {'yes' if anti else 'no'} | {score_std:.3f} | {np.std(losses):.4f} | "
          f"{np.std(norms) / np.mean(norms):.3f} | {pairwise:.3f} |", flush=True)
  print(f"wall {time.time() - t0:.0f}s")


if __name__ == "__main__":
  app.run(main)
