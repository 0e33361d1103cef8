"""Block diffusion (BD3LM, LLaDA2.0; REFERENCE §14): the forward process and losses of its training.

A sequence of L tokens is cut into blocks of `block_size`: autoregressive over blocks, masked diffusion
inside each. One forward pass trains every block at once: the model reads x_t ++ x_0 (the noised sequence,
then the clean one, both at positions 0..L-1) under the four-part mask of `attention.block_table`, so the
x_t half of block b sees its own noised block and the clean blocks before it, exactly what sampling
conditions on. The losses read only the x_t half of the scores.

Pure functions of arrays, like llada_jax.diffusion (whose losses they reuse on the x_t half): a score
function `score_fn(inputs, valid, targets, noised_half=True, segment_BT=..., block_size=...)` stands in for
the model, so everything here can be checked with hand-made numbers. The block-wise likelihood bound is
`diffusion.conditional_elbo(..., noised_half=True)`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llada_jax import diffusion
from llada_jax.diffusion import LossOutput, ScoreFn, TokenScores

WEIGHTINGS = ("inverse_t", "mean")


class BlockNoise(NamedTuple):
  tokens_BL: jax.Array     # clean tokens (rows doubled with complementary masks)
  noisy_BL: jax.Array      # x_t: masked positions hold the mask id
  masked_BL: jax.Array     # bool: which positions are masked
  p_mask_B: jax.Array      # float32: each row's masking probability
  rows: jax.Array          # int32 [B']: the source row of each row (complementary masks double them)


def block_noise(rng: jax.Array, *, tokens_BL: jax.Array, maskable_BL: jax.Array, mask_id: int, eps: float = 1e-3,
                t_min: float = 0.0, t_max: float = 1.0, complementary: bool = False) -> BlockNoise:
  """One t per sequence, t ~ U(t_min, t_max), p = (1 - eps) t + eps, each maskable token masked w.p. p
  (the clipped band of LLaDA2.0's SFT when t_min > 0 or t_max < 1).

  `complementary`: the batch is doubled; row B + b masks exactly the maskable positions row b leaves
  clean, with probability 1 - p (floored at eps), so each maskable token is predicted once per pair.
  Example: maskable [T, T, T, F], row b masked [T, F, T, F] -> its complement [F, T, F, F].
  """
  rng_t, rng_m = jax.random.split(rng)
  B, L = tokens_BL.shape
  maskable_BL = maskable_BL.astype(bool)
  t_B = t_min + (t_max - t_min) * jax.random.uniform(rng_t, (B,), jnp.float32)
  p_B = (1.0 - eps) * t_B + eps
  masked_BL = (jax.random.uniform(rng_m, (B, L), jnp.float32) < p_B[:, None]) & maskable_BL
  rows = jnp.arange(B, dtype=jnp.int32)
  if complementary:
    tokens_BL = jnp.concatenate([tokens_BL, tokens_BL])
    masked_BL = jnp.concatenate([masked_BL, maskable_BL & ~masked_BL])
    p_B = jnp.concatenate([p_B, jnp.maximum(1.0 - p_B, eps)])
    rows = jnp.concatenate([rows, rows])
  noisy_BL = jnp.where(masked_BL, jnp.asarray(mask_id, tokens_BL.dtype), tokens_BL)
  return BlockNoise(tokens_BL, noisy_BL, masked_BL, p_B, rows)


def size_value(block_size) -> jax.Array | int:
  """The block size as a number: an int, or a schedule's `attention.StagedSize` (sizes[index])."""
  return block_size.value if hasattr(block_size, "sizes") else block_size


def round_to_blocks(valid_BL: jax.Array, block_size) -> jax.Array:
  """Each row's valid prefix rounded up to whole blocks (at most the row). Example: block size 4, valid
  [T, T, T, T, T, F, F, F, F, F] -> [T] * 8 + [F, F]."""
  n_B = valid_BL.astype(bool).sum(axis=1)
  size = size_value(block_size)
  return jnp.arange(valid_BL.shape[1])[None, :] < (-(-n_B // size) * size)[:, None]


def noised_half_scores(score_fn: ScoreFn, *, noisy_BL: jax.Array, tokens_BL: jax.Array, valid_BL: jax.Array,
                       block_size, segment_BL: jax.Array | None = None) -> TokenScores:
  """The model on x_t ++ x_0 (valid and document ids repeated for both halves), scored against the clean
  tokens; only the x_t half's scores come back ([B, L]). The x_0 half only conditions later blocks."""
  L = tokens_BL.shape[1]
  both = lambda a, b: None if a is None else jnp.concatenate([a, b], axis=1)
  scores = score_fn(both(noisy_BL, tokens_BL), both(valid_BL, valid_BL), both(tokens_BL, tokens_BL),
                    noised_half=True, segment_BT=both(segment_BL, segment_BL), block_size=block_size)
  return scores._replace(nll_BL=scores.nll_BL[:, :L], correct_BL=scores.correct_BL[:, :L])


def _mean_loss(scores: TokenScores, counted_BL: jax.Array) -> LossOutput:
  n = counted_BL.sum()
  loss = jnp.where(counted_BL, scores.nll_BL, 0.0).sum() / jnp.maximum(n, 1)
  return LossOutput(loss, n, (scores.correct_BL & counted_BL).sum())


def block_diffusion_objective(score_fn: ScoreFn, rng: jax.Array, *, tokens_BL: jax.Array, mask_id: int,
                              block_size, eps: float = 1e-3, t_min: float = 0.0, t_max: float = 1.0,
                              weighting: str = "inverse_t", complementary: bool = False,
                              valid_BL: jax.Array | None = None, prompt_len_B: jax.Array | None = None,
                              segment_BL: jax.Array | None = None) -> LossOutput:
  """One Monte Carlo draw of the block-diffusion bound (REFERENCE §14):
  -E_t[(1/t) sum_blocks sum_i 1[masked] log p(x0_i | x_t block, x_0 earlier blocks)].

  Pre-training (`prompt_len_B` None): every valid token is maskable and 'inverse_t' divides by the valid
  positions, as `diffusion.pretrain_loss`. SFT (`prompt_len_B`): the prompt stays clean, each row's valid
  prefix is rounded up to whole blocks (`round_to_blocks`: the EOS padding fills its last block, as
  LLaDA2.0's SFT does) and 'inverse_t' is `diffusion.sft_loss` (per row over its response, averaged over
  rows). 'mean' averages the CE over the masked tokens of the batch (dFactory's SFT; no 1/t).
  `segment_BL`: document ids of packed rows.
  `block_size`: an int, or a schedule's `attention.StagedSize`.

  Example (weighting 'inverse_t', one row of L = 2, block size 1, p = 0.5, only position 1 masked with
  CE 0.6 given the clean token 0): loss = (0.6 / 0.5) / 2 = 0.6.
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
  L = tokens_BL.shape[1]
  valid_BL = jnp.ones(tokens_BL.shape, bool) if valid_BL is None else valid_BL.astype(bool)
  maskable_BL = valid_BL
  if prompt_len_B is not None:
    valid_BL = maskable_BL = round_to_blocks(valid_BL, block_size)
    maskable_BL = maskable_BL & diffusion.response_mask(prompt_len_B=prompt_len_B, length=L)
  noise = block_noise(rng, tokens_BL=tokens_BL, maskable_BL=maskable_BL, mask_id=mask_id, eps=eps, t_min=t_min,
                      t_max=t_max, complementary=complementary)
  take = lambda a: None if a is None else a[noise.rows]
  valid_BL, segment_BL = take(valid_BL), take(segment_BL)
  scores = noised_half_scores(score_fn, noisy_BL=noise.noisy_BL, tokens_BL=noise.tokens_BL, valid_BL=valid_BL,
                              block_size=block_size, segment_BL=segment_BL)
  if weighting == "mean":
    return _mean_loss(scores, noise.masked_BL)
  common = dict(scores=scores, tokens_BL=noise.tokens_BL, is_masked_BL=noise.masked_BL, p_mask_B=noise.p_mask_B,
                valid_BL=valid_BL)
  if prompt_len_B is None:
    return diffusion.pretrain_loss(**common)
  return diffusion.sft_loss(prompt_len_B=take(prompt_len_B), **common)

