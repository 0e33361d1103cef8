"""Masking and losses of masked diffusion (REFERENCE §2-3) and the autoregressive baseline.

Pure functions of arrays: no Flax, no model. A loss takes logits (or an objective takes a
`logits_fn(tokens_BL, valid_BL) -> logits_BLV`), so everything here can be checked with hand-made numbers.
Every loss returns a `LossOutput`; every loss is in nats and computed in float32.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]


class NoisyBatch(NamedTuple):
  noisy_tokens_BL: jax.Array  # tokens with the masked positions replaced by the mask id
  is_masked_BL: jax.Array     # bool: which positions the forward process masked
  p_mask_B: jax.Array         # float32: the masking probability p of each sequence


class LossOutput(NamedTuple):
  loss: jax.Array             # scalar the optimizer minimises
  num_masked: jax.Array       # positions the loss looked at (masked, or next-token targets)
  num_correct: jax.Array      # of those, how many the argmax prediction got right

  @property
  def accuracy(self) -> jax.Array:
    return self.num_correct / jnp.maximum(self.num_masked, 1)


def forward_process(rng: jax.Array, *, tokens_BL: jax.Array, mask_id: int, eps: float = 1e-3,
                    maskable_BL: jax.Array | None = None) -> NoisyBatch:
  """Masks each token independently with probability p = (1 - eps) * t + eps, t ~ U(0, 1) per sequence.

  This is q(x_t | x_0) of the paper (Nie et al., 2025, Eq. 7 with the eps floor of the release).
  `maskable_BL` (bool) restricts masking, e.g. to the response in SFT or to unpadded positions.

  Example: with t = 0.5 and eps = 1e-3 every token is masked with p = 0.5005; for tokens [[7, 8, 9]] one
  draw might give noisy [[M, 8, M]], is_masked [[True, False, True]].
  """
  rng_t, rng_m = jax.random.split(rng)
  B, L = tokens_BL.shape
  t_B = jax.random.uniform(rng_t, (B,), jnp.float32)
  p_mask_B = (1.0 - eps) * t_B + eps
  is_masked_BL = jax.random.uniform(rng_m, (B, L), jnp.float32) < p_mask_B[:, None]
  if maskable_BL is not None:
    is_masked_BL &= maskable_BL.astype(bool)
  noisy_BL = jnp.where(is_masked_BL, jnp.asarray(mask_id, tokens_BL.dtype), tokens_BL)
  return NoisyBatch(noisy_BL, is_masked_BL, p_mask_B)


def random_length_crop(rng: jax.Array, *, valid_BL: jax.Array, prob: float) -> jax.Array:
  """With probability `prob` crops the whole batch to a length drawn from U{1..L} (REFERENCE §2).

  Shapes stay static under jit: the crop is returned as a new validity mask (key padding and loss
  weight), never as a shorter array. Example: L = 4, a draw of length 2 turns [[T, T, T, T]] into
  [[T, T, F, F]]; without a crop (probability 1 - prob) the mask comes back unchanged.
  """
  rng_do, rng_len = jax.random.split(rng)
  L = valid_BL.shape[1]
  length = jax.random.randint(rng_len, (), 1, L + 1)
  crop = jax.random.uniform(rng_do, ()) < prob
  keep_L = jnp.where(crop, jnp.arange(L) < length, True)
  return valid_BL.astype(bool) & keep_L[None, :]


def _token_nll(logits_BLV: jax.Array, tokens_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-position cross-entropy -log p(token) in float32, and whether the argmax is right."""
  logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  nll_BL = -jnp.take_along_axis(logp_BLV, tokens_BL[..., None], axis=-1)[..., 0]
  return nll_BL, jnp.argmax(logits_BLV, axis=-1) == tokens_BL


def pretrain_loss(*, logits_BLV: jax.Array, tokens_BL: jax.Array, is_masked_BL: jax.Array,
                  p_mask_B: jax.Array, valid_BL: jax.Array | None = None) -> LossOutput:
  """Pre-training bound: sum over masked positions of CE / p, divided by the number of valid positions.

  The paper's Eq. 3, -E_t[(1/t) sum_i 1[x_t^i = M] log p(x_0^i | x_t)] / L, estimated per batch and
  divided by *all* (valid) positions B*L, not by the number masked. A random-length crop (valid_BL)
  divides by B * cropped length, as the release does.

  Example: B = 1, L = 2, p = 0.5, only position 0 masked with CE 0.7: loss = (0.7 / 0.5) / 2 = 0.7.
  """
  valid_BL = jnp.ones(tokens_BL.shape, bool) if valid_BL is None else valid_BL.astype(bool)
  nll_BL, correct_BL = _token_nll(logits_BLV, tokens_BL)
  counted_BL = is_masked_BL & valid_BL
  weighted = jnp.where(counted_BL, nll_BL / p_mask_B[:, None], 0.0)
  loss = weighted.sum() / jnp.maximum(valid_BL.sum(), 1)
  return LossOutput(loss, counted_BL.sum(), (correct_BL & counted_BL).sum())


def response_mask(*, prompt_len_B: jax.Array, length: int) -> jax.Array:
  """bool [B, L]: True at response positions (index >= the row's prompt length)."""
  return jnp.arange(length)[None, :] >= prompt_len_B[:, None]


def sft_loss(*, logits_BLV: jax.Array, tokens_BL: jax.Array, is_masked_BL: jax.Array,
             p_mask_B: jax.Array, prompt_len_B: jax.Array, valid_BL: jax.Array | None = None) -> LossOutput:
  """SFT bound (paper Eq. 5): per row, sum of masked CE / p over the response, divided by the row's
  response length (EOS padding included: it is part of the response), then averaged over rows.

  Prompt positions never count, even if `is_masked_BL` says otherwise. Example: B = 1, L = 4, prompt
  length 2, p = 0.5, positions 2 and 3 masked with CE 0.2 and 0.4: loss = (0.2 + 0.4) / 0.5 / 2 = 0.6.
  """
  B, L = tokens_BL.shape
  resp_BL = response_mask(prompt_len_B=prompt_len_B, length=L)
  if valid_BL is not None:
    resp_BL &= valid_BL.astype(bool)
  nll_BL, correct_BL = _token_nll(logits_BLV, tokens_BL)
  counted_BL = is_masked_BL & resp_BL
  per_row_B = jnp.where(counted_BL, nll_BL / p_mask_B[:, None], 0.0).sum(axis=1)
  loss = (per_row_B / jnp.maximum(resp_BL.sum(axis=1), 1)).sum() / B
  return LossOutput(loss, counted_BL.sum(), (correct_BL & counted_BL).sum())


def next_token_loss(*, logits_BLV: jax.Array, tokens_BL: jax.Array,
                    valid_BL: jax.Array | None = None) -> LossOutput:
  """Autoregressive baseline: mean over valid targets of -log p(x_{i+1} | x_{<=i}).

  Position i's logits predict token i+1; the last position predicts nothing. Example: tokens [[a, b, c]]
  gives two targets (b from position 0, c from position 1); with CEs 0.3 and 0.5 the loss is 0.4.
  """
  nll_BL, correct_BL = _token_nll(logits_BLV[:, :-1], tokens_BL[:, 1:])
  targets_BL = jnp.ones(nll_BL.shape, bool) if valid_BL is None else valid_BL[:, 1:].astype(bool)
  n = targets_BL.sum()
  loss = jnp.where(targets_BL, nll_BL, 0.0).sum() / jnp.maximum(n, 1)
  return LossOutput(loss, n, (correct_BL & targets_BL).sum())


def pretrain_objective(logits_fn: LogitsFn, rng: jax.Array, *, tokens_BL: jax.Array, mask_id: int,
                       eps: float = 1e-3, random_length_prob: float = 0.01,
                       valid_BL: jax.Array | None = None) -> LossOutput:
  """Random-length crop, forward process, model, `pretrain_loss`: one Monte Carlo draw of the bound."""
  rng_crop, rng_mask = jax.random.split(rng)
  valid_BL = jnp.ones(tokens_BL.shape, bool) if valid_BL is None else valid_BL.astype(bool)
  valid_BL = random_length_crop(rng_crop, valid_BL=valid_BL, prob=random_length_prob)
  noisy = forward_process(rng_mask, tokens_BL=tokens_BL, mask_id=mask_id, eps=eps, maskable_BL=valid_BL)
  logits_BLV = logits_fn(noisy.noisy_tokens_BL, valid_BL)
  return pretrain_loss(logits_BLV=logits_BLV, tokens_BL=tokens_BL, is_masked_BL=noisy.is_masked_BL,
                       p_mask_B=noisy.p_mask_B, valid_BL=valid_BL)


def sft_objective(logits_fn: LogitsFn, rng: jax.Array, *, tokens_BL: jax.Array, prompt_len_B: jax.Array,
                  mask_id: int, eps: float = 1e-3, valid_BL: jax.Array | None = None) -> LossOutput:
  """Forward process on the response only (the prompt is restored), model, `sft_loss`."""
  L = tokens_BL.shape[1]
  valid_BL = jnp.ones(tokens_BL.shape, bool) if valid_BL is None else valid_BL.astype(bool)
  maskable_BL = response_mask(prompt_len_B=prompt_len_B, length=L) & valid_BL
  noisy = forward_process(rng, tokens_BL=tokens_BL, mask_id=mask_id, eps=eps, maskable_BL=maskable_BL)
  logits_BLV = logits_fn(noisy.noisy_tokens_BL, valid_BL)
  return sft_loss(logits_BLV=logits_BLV, tokens_BL=tokens_BL, is_masked_BL=noisy.is_masked_BL,
                  p_mask_B=noisy.p_mask_B, prompt_len_B=prompt_len_B, valid_BL=valid_BL)


def ar_objective(logits_fn: LogitsFn, *, tokens_BL: jax.Array,
                 valid_BL: jax.Array | None = None) -> LossOutput:
  """Clean tokens through a causal model, `next_token_loss`."""
  valid_BL = jnp.ones(tokens_BL.shape, bool) if valid_BL is None else valid_BL.astype(bool)
  return next_token_loss(logits_BLV=logits_fn(tokens_BL, valid_BL), tokens_BL=tokens_BL, valid_BL=valid_BL)
