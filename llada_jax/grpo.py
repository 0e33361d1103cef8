"""diffu-GRPO (d1; REFERENCE §10) as pure functions: group advantages, the one-pass log-probability
estimator, the clipped-ratio loss and the k3 KL.

Like llada_jax.diffusion, nothing here imports Flax or the model: the estimator takes a
`score_fn(inputs_BL, valid_BL, targets_BL) -> diffusion.TokenScores`, everything else takes arrays, so each
piece can be checked with hand-made numbers. Rows are rollouts `[left-padded prompt | C completion
tokens]`; the completion is the last C positions.

The estimator: a diffusion model has no exact log-likelihood, so d1 reads per-token log-probabilities off
ONE forward pass in which every completion position is masked and each (real) prompt token is masked
with probability `p_mask_prompt`; log pi(o_k) is the log-softmax at completion position k read at o_k.
The old policy, the reference and the current policy of one inner iteration see the same masked input,
so their ratios and KL compare like with like.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llada_jax import diffusion


def completion_mask(completion_BC: jax.Array, *, stop_ids: tuple[int, ...]) -> jax.Array:
  """bool [B, C]: the positions up to and including the first stop token (EOS / end of turn) of each
  completion; all of them when it never stops. The loss averages over these.

  Example: stop id 1, completion [[5, 1, 1, 1]] -> [[True, True, False, False]].
  """
  C = completion_BC.shape[1]
  stops_BC = jnp.isin(completion_BC, jnp.asarray(stop_ids, completion_BC.dtype))
  first_B = jnp.min(jnp.where(stops_BC, jnp.arange(C), C), axis=1)
  return jnp.arange(C)[None, :] <= first_B[:, None]


def group_advantages(rewards_B: jax.Array, *, group_size: int, scale: bool = False,
                     eps: float = 1e-4) -> jax.Array:
  """float32 [B]: each reward minus the mean of its group (G = `group_size` consecutive rows: one prompt's
  completions); with `scale`, divided by the group's standard deviation (+ eps), as in GRPO. d1 does not
  scale.

  Example: rewards [1, 0, 0, 1, 1, 1] with G = 3 -> group means 1/3 and 1 -> [2/3, -1/3, -1/3, 0, 0, 0].
  """
  r_PG = rewards_B.astype(jnp.float32).reshape(-1, group_size)
  a_PG = r_PG - r_PG.mean(axis=1, keepdims=True)
  if scale:
    a_PG = a_PG / (r_PG.std(axis=1, ddof=1, keepdims=True) + eps)
  return a_PG.reshape(-1)


def one_pass_mask(rng: jax.Array, *, valid_BL: jax.Array, num_completion: int, p_mask_prompt: float) -> jax.Array:
  """bool [B, L]: the estimator's masked positions: all of the last `num_completion` positions, and each
  valid position before them (the prompt; padding never) independently with probability `p_mask_prompt`.

  Example: L = 5, C = 2, p = 0 -> [[F, F, F, T, T]]; p = 1 -> every valid prompt token too.
  """
  B, L = valid_BL.shape
  is_completion_L = jnp.arange(L) >= L - num_completion
  draw_BL = jax.random.uniform(rng, (B, L)) < p_mask_prompt
  return is_completion_L[None, :] | (draw_BL & valid_BL.astype(bool))


def token_logps(score_fn: diffusion.ScoreFn, *, tokens_BL: jax.Array, valid_BL: jax.Array, masked_BL: jax.Array,
                mask_id: int, num_completion: int) -> tuple[jax.Array, diffusion.TokenScores]:
  """float32 [B, C]: log pi(o_k | masked input) at the completion positions, from one `score_fn` call over
  the rows with `masked_BL` positions replaced by the mask id (`one_pass_mask`); also the scores [B, L]."""
  noisy_BL = jnp.where(masked_BL, jnp.asarray(mask_id, tokens_BL.dtype), tokens_BL)
  scores = score_fn(noisy_BL, valid_BL.astype(bool), tokens_BL)
  return -scores.nll_BL[:, -num_completion:], scores


def k3_kl(*, logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """The k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0, exactly 0 when
  the two agree). Example: logp = -1, ref = -2 -> exp(-1) + 1 - 1 = 0.3679."""
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0


class GrpoOutput(NamedTuple):
  loss: jax.Array             # scalar: mean over the completion tokens (`mask_BC`) of the whole batch
  kl: jax.Array               # mean k3 KL to the reference over the same tokens
  clip_fraction: jax.Array    # share of those tokens whose ratio the clip holds (their gradient is cut)
  ratio: jax.Array            # mean probability ratio pi / pi_old over them


def grpo_loss(*, logp_BC: jax.Array, old_logp_BC: jax.Array, ref_logp_BC: jax.Array, advantages_B: jax.Array,
              mask_BC: jax.Array, clip_eps: float, beta: float) -> GrpoOutput:
  """GRPO's per-token loss, averaged over the completion tokens of the batch (d1's normalisation):

    ratio = exp(logp - logp_old)
    loss_k = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * KL_k     (KL_k: `k3_kl`)

  `old_logp_BC` and `ref_logp_BC` are constants (never differentiated). Example: logp = old = ref (first
  inner iteration, reference = policy) gives ratio 1, KL 0 and loss -mean(A) over the tokens; with
  A = +1, eps = 0.2 and ratio 1.5 the clipped term 1.2 wins and the token's gradient is zero.
  """
  mask_BC = mask_BC.astype(jnp.float32)
  n = jnp.maximum(mask_BC.sum(), 1.0)
  mean = lambda x_BC: (x_BC * mask_BC).sum() / n
  old_logp_BC, ref_logp_BC = jax.lax.stop_gradient(old_logp_BC), jax.lax.stop_gradient(ref_logp_BC)
  a_B1 = advantages_B.astype(jnp.float32)[:, None]
  ratio_BC = jnp.exp(logp_BC - old_logp_BC)
  unclipped_BC = ratio_BC * a_B1
  clipped_BC = jnp.clip(ratio_BC, 1.0 - clip_eps, 1.0 + clip_eps) * a_B1
  kl_BC = k3_kl(logp=logp_BC, ref_logp=ref_logp_BC)
  per_token_BC = -jnp.minimum(unclipped_BC, clipped_BC) + beta * kl_BC
  held_BC = clipped_BC < unclipped_BC  # min picks the clipped, constant term
  return GrpoOutput(mean(per_token_BC), mean(kl_BC), mean(held_BC.astype(jnp.float32)), mean(ratio_BC))


def grpo_objective(score_fn: diffusion.ScoreFn, *, tokens_BL: jax.Array, valid_BL: jax.Array, masked_BL: jax.Array,
                   completion_mask_BC: jax.Array, advantages_B: jax.Array, old_logp_BC: jax.Array,
                   ref_logp_BC: jax.Array, mask_id: int, clip_eps: float, beta: float) -> diffusion.LossOutput:
  """`grpo_loss` of the policy `score_fn` on one inner iteration's masked rollouts, as a training loss;
  num_masked / num_correct count the completion tokens the loss averages over (and how many the policy's
  argmax predicts); metrics: kl, clip_fraction, ratio."""
  C = completion_mask_BC.shape[1]
  logp_BC, scores = token_logps(score_fn, tokens_BL=tokens_BL, valid_BL=valid_BL, masked_BL=masked_BL,
                                mask_id=mask_id, num_completion=C)
  out = grpo_loss(logp_BC=logp_BC, old_logp_BC=old_logp_BC, ref_logp_BC=ref_logp_BC, advantages_B=advantages_B,
                  mask_BC=completion_mask_BC, clip_eps=clip_eps, beta=beta)
  counted_BC = completion_mask_BC.astype(bool)
  return diffusion.LossOutput(out.loss, counted_BC.sum(), (scores.correct_BL[:, -C:] & counted_BC).sum(),
                              {"kl": out.kl, "clip_fraction": out.clip_fraction, "ratio": out.ratio})
