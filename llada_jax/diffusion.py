"""Masking and losses of masked diffusion (REFERENCE §2-3), the autoregressive baseline, the likelihood
estimators (§5) and preference optimisation on them (DPO / VRPO, §9).

Pure functions of arrays: no Flax, no model. A loss takes logits (or per-token `TokenScores`); an
objective takes a `score_fn(inputs_BL, valid_BL, targets_BL) -> TokenScores`, built from a model's
`logits_fn` by `from_logits`, or from its final hidden states and output head by `chunked_scores`, which
never materialises the [B, L, V] float32 logits (a 126k vocabulary makes them the largest activation).
So everything here can be checked with hand-made numbers. Every loss returns a `LossOutput`; every loss
is in nats and computed in float32.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]


class TokenScores(NamedTuple):
  nll_BL: jax.Array           # float32 -log p(target) at every position
  correct_BL: jax.Array       # bool: the argmax prediction is the target
  # A mixture-of-experts model's router statistics for this call (llada_jax.moe.router_stats): the losses
  # here ignore them; the objective records add the router losses (llada_jax.objectives.compute_loss).
  aux: dict | None = None


# (inputs_BL, valid_BL, targets_BL, **model options) -> TokenScores; the options (a block model's
# `noised_half`, `segment_BT`, `block_size`) pass through to the model call.
ScoreFn = Callable[..., TokenScores]


class NoisyBatch(NamedTuple):
  noisy_tokens_BL: jax.Array  # tokens with the masked positions replaced by the mask id
  is_masked_BL: jax.Array     # bool: which positions the forward process masked
  p_mask_B: jax.Array         # float32: the masking probability p of each sequence


class LossOutput(NamedTuple):
  loss: jax.Array             # scalar the optimizer minimises
  num_masked: jax.Array       # positions the loss looked at (masked, or next-token targets)
  num_correct: jax.Array      # of those, how many the argmax prediction got right
  metrics: dict | None = None  # further scalar metrics of the objective (name -> float32), batch means

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


def _token_nll(logits_BLV: jax.Array, tokens_BL: jax.Array) -> TokenScores:
  """Per-position cross-entropy -log p(token) in float32, and whether the argmax is right."""
  logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  nll_BL = -jnp.take_along_axis(logp_BLV, tokens_BL[..., None], axis=-1)[..., 0]
  return TokenScores(nll_BL, jnp.argmax(logits_BLV, axis=-1) == tokens_BL)


def from_logits(logits_fn: LogitsFn) -> ScoreFn:
  """The `ScoreFn` of a model that returns full logits (model options pass through to `logits_fn`)."""
  return lambda inputs_BL, valid_BL, targets_BL, **options: _token_nll(logits_fn(inputs_BL, valid_BL, **options),
                                                                       targets_BL)


def chunked_scores(x_BLD: jax.Array, head_DV: jax.Array, targets_BL: jax.Array, *,
                   chunk_size: int) -> TokenScores:
  """Output head + cross-entropy, `chunk_size` positions at a time.

  `x_BLD` are the final (normed) hidden states and `head_DV` the output projection; logits of a chunk are
  `x @ head` in x's dtype, then float32, exactly as the model's own head computes them. Each chunk is
  rematerialised in the backward pass, so at most a [B, chunk_size, V] float32 block of logits is alive,
  instead of [B, L, V] (B=8, L=4096, V=126464: 16.6 GB). L need not divide: the tail chunk is padded.
  Example: L = 5, chunk_size = 2 -> three chunks of 2 (the last one half padding); scores of the
  padding are dropped, and the result equals `_token_nll(x @ head, targets)`.
  """
  B, L, D = x_BLD.shape
  n = -(-L // chunk_size)
  pad = n * chunk_size - L
  x_BLD = jnp.pad(x_BLD, ((0, 0), (0, pad), (0, 0)))
  targets_BL = jnp.pad(targets_BL, ((0, 0), (0, pad)))
  x_NBCD = x_BLD.reshape(B, n, chunk_size, D).swapaxes(0, 1)
  t_NBC = targets_BL.reshape(B, n, chunk_size).swapaxes(0, 1)

  @jax.checkpoint  # keep only the chunk's inputs for the backward pass, not its logits
  def one_chunk(x_BCD, t_BC):
    logits_BCV = jnp.einsum("bcd,dv->bcv", x_BCD, head_DV.astype(x_BCD.dtype)).astype(jnp.float32)
    return _token_nll(logits_BCV, t_BC)

  nll_NBC, correct_NBC = jax.lax.map(lambda a: one_chunk(*a), (x_NBCD, t_NBC))[:2]
  unchunk = lambda a: a.swapaxes(0, 1).reshape(B, n * chunk_size)[:, :L]
  return TokenScores(unchunk(nll_NBC), unchunk(correct_NBC))


def pretrain_loss(*, logits_BLV: jax.Array | None = None, tokens_BL: jax.Array, is_masked_BL: jax.Array,
                  p_mask_B: jax.Array, valid_BL: jax.Array | None = None,
                  scores: TokenScores | None = None) -> LossOutput:
  """Pre-training bound: sum over masked positions of CE / p, divided by the number of valid positions.

  The paper's Eq. 3, -E_t[(1/t) sum_i 1[x_t^i = M] log p(x_0^i | x_t)] / L, estimated per batch and
  divided by *all* (valid) positions B*L, not by the number masked. A random-length crop (valid_BL)
  divides by B * cropped length, as the release does.

  Example: B = 1, L = 2, p = 0.5, only position 0 masked with CE 0.7: loss = (0.7 / 0.5) / 2 = 0.7.
  `scores` (per-token CE already computed, e.g. by `chunked_scores`) replaces `logits_BLV`.
  """
  valid_BL = jnp.ones(tokens_BL.shape, bool) if valid_BL is None else valid_BL.astype(bool)
  nll_BL, correct_BL = (scores if scores is not None else _token_nll(logits_BLV, tokens_BL))[:2]
  counted_BL = is_masked_BL & valid_BL
  weighted = jnp.where(counted_BL, nll_BL / p_mask_B[:, None], 0.0)
  loss = weighted.sum() / jnp.maximum(valid_BL.sum(), 1)
  return LossOutput(loss, counted_BL.sum(), (correct_BL & counted_BL).sum())


def response_mask(*, prompt_len_B: jax.Array, length: int) -> jax.Array:
  """bool [B, L]: True at response positions (index >= the row's prompt length)."""
  return jnp.arange(length)[None, :] >= prompt_len_B[:, None]


def sft_loss(*, logits_BLV: jax.Array | None = None, tokens_BL: jax.Array, is_masked_BL: jax.Array,
             p_mask_B: jax.Array, prompt_len_B: jax.Array, valid_BL: jax.Array | None = None,
             scores: TokenScores | None = None) -> LossOutput:
  """SFT bound (paper Eq. 5): per row, sum of masked CE / p over the response, divided by the row's
  response length (EOS padding included: it is part of the response), then averaged over rows.

  Prompt positions never count, even if `is_masked_BL` says otherwise. Example: B = 1, L = 4, prompt
  length 2, p = 0.5, positions 2 and 3 masked with CE 0.2 and 0.4: loss = (0.2 + 0.4) / 0.5 / 2 = 0.6.
  """
  B, L = tokens_BL.shape
  resp_BL = response_mask(prompt_len_B=prompt_len_B, length=L)
  if valid_BL is not None:
    resp_BL &= valid_BL.astype(bool)
  nll_BL, correct_BL = (scores if scores is not None else _token_nll(logits_BLV, tokens_BL))[:2]
  counted_BL = is_masked_BL & resp_BL
  per_row_B = jnp.where(counted_BL, nll_BL / p_mask_B[:, None], 0.0).sum(axis=1)
  loss = (per_row_B / jnp.maximum(resp_BL.sum(axis=1), 1)).sum() / B
  return LossOutput(loss, counted_BL.sum(), (correct_BL & counted_BL).sum())


def next_token_loss(*, logits_BLV: jax.Array | None = None, tokens_BL: jax.Array,
                    valid_BL: jax.Array | None = None, scores: TokenScores | None = None) -> LossOutput:
  """Autoregressive baseline: mean over valid targets of -log p(x_{i+1} | x_{<=i}).

  Position i's logits predict token i+1; the last position predicts nothing. Example: tokens [[a, b, c]]
  gives two targets (b from position 0, c from position 1); with CEs 0.3 and 0.5 the loss is 0.4.
  `scores` are per position against the *next* token (the last position's is ignored).
  """
  if scores is not None:
    nll_BL, correct_BL = scores.nll_BL[:, :-1], scores.correct_BL[:, :-1]
  else:
    nll_BL, correct_BL = _token_nll(logits_BLV[:, :-1], tokens_BL[:, 1:])[:2]
  targets_BL = jnp.ones(nll_BL.shape, bool) if valid_BL is None else valid_BL[:, 1:].astype(bool)
  n = targets_BL.sum()
  loss = jnp.where(targets_BL, nll_BL, 0.0).sum() / jnp.maximum(n, 1)
  return LossOutput(loss, n, (correct_BL & targets_BL).sum())


def pretrain_objective(score_fn: ScoreFn, rng: jax.Array, *, tokens_BL: jax.Array, mask_id: int,
                       eps: float = 1e-3, random_length_prob: float = 0.01,
                       valid_BL: jax.Array | None = None) -> LossOutput:
  """Random-length crop, forward process, model, `pretrain_loss`: one Monte Carlo draw of the bound."""
  rng_crop, rng_mask = jax.random.split(rng)
  valid_BL = jnp.ones(tokens_BL.shape, bool) if valid_BL is None else valid_BL.astype(bool)
  valid_BL = random_length_crop(rng_crop, valid_BL=valid_BL, prob=random_length_prob)
  noisy = forward_process(rng_mask, tokens_BL=tokens_BL, mask_id=mask_id, eps=eps, maskable_BL=valid_BL)
  scores = score_fn(noisy.noisy_tokens_BL, valid_BL, tokens_BL)
  return pretrain_loss(scores=scores, tokens_BL=tokens_BL, is_masked_BL=noisy.is_masked_BL,
                       p_mask_B=noisy.p_mask_B, valid_BL=valid_BL)


def sft_objective(score_fn: ScoreFn, rng: jax.Array, *, tokens_BL: jax.Array, prompt_len_B: jax.Array,
                  mask_id: int, eps: float = 1e-3, valid_BL: jax.Array | None = None) -> LossOutput:
  """Forward process on the response only (the prompt is restored), model, `sft_loss`."""
  L = tokens_BL.shape[1]
  valid_BL = jnp.ones(tokens_BL.shape, bool) if valid_BL is None else valid_BL.astype(bool)
  maskable_BL = response_mask(prompt_len_B=prompt_len_B, length=L) & valid_BL
  noisy = forward_process(rng, tokens_BL=tokens_BL, mask_id=mask_id, eps=eps, maskable_BL=maskable_BL)
  scores = score_fn(noisy.noisy_tokens_BL, valid_BL, tokens_BL)
  return sft_loss(scores=scores, tokens_BL=tokens_BL, is_masked_BL=noisy.is_masked_BL,
                  p_mask_B=noisy.p_mask_B, prompt_len_B=prompt_len_B, valid_BL=valid_BL)


def ar_objective(score_fn: ScoreFn, *, tokens_BL: jax.Array,
                 valid_BL: jax.Array | None = None) -> LossOutput:
  """Clean tokens through a causal model, `next_token_loss` (position i scored against token i + 1)."""
  valid_BL = jnp.ones(tokens_BL.shape, bool) if valid_BL is None else valid_BL.astype(bool)
  next_BL = jnp.concatenate([tokens_BL[:, 1:], tokens_BL[:, :1]], axis=1)  # the last column is ignored
  return next_token_loss(scores=score_fn(tokens_BL, valid_BL, next_BL), tokens_BL=tokens_BL,
                         valid_BL=valid_BL)


# --- Classifier-free guidance (REFERENCE §4 step 3, §5) ------------------------------------------------


def unconditional_tokens(tokens_BL: jax.Array, *, prompt_BL: jax.Array, mask_id: int) -> jax.Array:
  """The unconditional input of classifier-free guidance: every prompt position set to the mask id.

  `prompt_BL` (bool, broadcastable to tokens_BL) marks what the guidance conditions on. Example:
  tokens [[7, 8, M, 9]] with prompt [[T, T, F, F]] -> [[M, M, M, 9]].
  """
  return jnp.where(prompt_BL, jnp.asarray(mask_id, tokens_BL.dtype), tokens_BL)


def guided_logits(cond_BLV: jax.Array, uncond_BLV: jax.Array, *, scale: float | jax.Array) -> jax.Array:
  """Classifier-free guidance in float32: `uncond + (scale + 1) * (cond - uncond)`, as the release does.

  `scale` 0 is the conditional logits (up to rounding; callers skip guidance then), larger pushes away
  from the unconditional prediction.
  The sampler and `conditional_elbo` both run `[cond; uncond]` as one doubled batch (the uncond half
  from `unconditional_tokens`) and combine the halves here. Example: cond 2, uncond 1, scale 1 -> 3.
  """
  cond, uncond = cond_BLV.astype(jnp.float32), uncond_BLV.astype(jnp.float32)
  return uncond + (scale + 1.0) * (cond - uncond)


# --- Likelihood estimators (REFERENCE §5) --------------------------------------------------------------


def stratified_mask_counts(rng: jax.Array, *, length_B: jax.Array, num_samples: int) -> jax.Array:
  """int32 [B, S]: how many response tokens each of S samples masks, stratified over 1..L per row.

  The release's scheme: draw k ~ U{1..L}, take round(linspace(k, k + (S-1) L / S, S)) and wrap into
  1..L, so a mini-batch spreads its mask counts evenly over the range instead of clumping.
  Example: L = 4, S = 4, k = 3 gives 3, 4, 5, 6 -> 3, 4, 1, 2 (every count once).
  """
  length_B = length_B.astype(jnp.int32)
  k_B = jax.random.randint(rng, length_B.shape, 1, length_B + 1)
  steps_S = jnp.arange(num_samples, dtype=jnp.float32) / num_samples
  raw_BS = jnp.round(k_B[:, None] + steps_S[None, :] * length_B[:, None]).astype(jnp.int32)
  return (raw_BS - 1) % jnp.maximum(length_B[:, None], 1) + 1


def mask_exactly(rng: jax.Array, *, maskable_BL: jax.Array, count_B: jax.Array) -> jax.Array:
  """bool [B, L]: exactly count_B[b] of row b's maskable positions, chosen uniformly without replacement.

  Random scores, maskable positions ranked; the lowest `count` ranks are masked. Example: maskable
  [[F, T, T, T]] with count 2 masks two of the last three positions, each pair equally likely.
  """
  return _mask_lowest(jax.random.uniform(rng, maskable_BL.shape), maskable_BL.astype(bool), count_B)


def _mask_lowest(draws_BL: jax.Array, maskable_BL: jax.Array, count_B: jax.Array) -> jax.Array:
  rank_BL = jnp.argsort(jnp.argsort(jnp.where(maskable_BL, draws_BL, jnp.inf), axis=1), axis=1)
  return maskable_BL & (rank_BL < count_B[:, None])


def token_logprob(logits_BLV: jax.Array, tokens_BL: jax.Array) -> jax.Array:
  """float32 [B, L]: log p(tokens_BL[b, i]) under the logits at the same position."""
  return -_token_nll(logits_BLV, tokens_BL)[0]


def conditional_elbo(logits_fn: LogitsFn, rng_B: jax.Array, *, tokens_BL: jax.Array, prompt_len_B: jax.Array,
                     valid_BL: jax.Array, mask_id: int, num_samples: int, estimator: str = "l",
                     eps: float = 1e-3, cfg_scale: float = 0.0, noised_half: bool = False) -> jax.Array:
  """float32 [B]: a Monte Carlo lower bound on log p(response | prompt), averaged over S samples per row.

  Row b holds prompt (positions < prompt_len_B[b]) + response (the remaining valid positions, length L).
  estimator='l' (REFERENCE §5): l from `stratified_mask_counts`, exactly l response tokens masked,
    estimate (L / l) * sum_masked log p(r_i | prompt, unmasked response);
  estimator='t' (§2's bound): t ~ U(0, 1), p = (1 - eps) t + eps, each response token masked with
    probability p, estimate sum_masked log p(r_i | ...) / p.
  Both are unbiased for the same ELBO; 'l' has far lower variance. The prompt is never masked. With
  cfg_scale > 0 the logits are `guided_logits` (uncond + (scale + 1)(cond - uncond), uncond having the
  prompt masked by `unconditional_tokens`).
  For a one-token response, 'l' always masks that token with weight 1: the estimate is exact.
  `noised_half`: a block-diffusion model (REFERENCE §14), which predicts a token from its noised block and
  the clean blocks before it: `logits_fn(x_t ++ x_0, valid ++ valid, noised_half=True)`, the x_t half read.
  Both estimators stay unbiased for that block-wise ELBO: for any masked set M of the L response tokens,
  'l' draws M with probability 1 / (L C(L, |M|)) and weighs it L / |M|, 't' gives it
  integral t^|M| (1 - t)^(L - |M|) / t dt; both are (|M| - 1)! (L - |M|)! / L!, whatever the model conditions on.
  `rng_B` holds one key per row, so a row's estimate does not depend on which rows share its batch.
  """
  B, L = tokens_BL.shape
  S = num_samples
  valid_BL = valid_BL.astype(bool)
  resp_BL = response_mask(prompt_len_B=prompt_len_B, length=L) & valid_BL
  length_B = resp_BL.sum(axis=1)
  rep = lambda x: jnp.repeat(x, S, axis=0)
  tokens_NL, resp_NL, valid_NL = rep(tokens_BL), rep(resp_BL), rep(valid_BL)
  keys_B2 = jax.vmap(jax.random.split)(rng_B)
  # per row: S draws of (count or t) from the row's first key, S mask patterns from its second
  draws_BSL = jax.vmap(lambda k: jax.random.uniform(k, (S, L)))(keys_B2[:, 1]).reshape(B * S, L)
  if estimator == "l":
    count_N = jax.vmap(lambda k, n: stratified_mask_counts(k, length_B=n[None], num_samples=S)[0])(
        keys_B2[:, 0], length_B).reshape(-1)
    masked_NL = _mask_lowest(draws_BSL, resp_NL, count_N)  # `mask_exactly` with the row's own draws
    weight_N = rep(length_B).astype(jnp.float32) / count_N.astype(jnp.float32)
  elif estimator == "t":
    t_N = jax.vmap(lambda k: jax.random.uniform(k, (S,), jnp.float32))(keys_B2[:, 0]).reshape(-1)
    p_N = (1.0 - eps) * t_N + eps
    masked_NL = resp_NL & (draws_BSL < p_N[:, None])
    weight_N = 1.0 / p_N
  else:
    raise ValueError(f"estimator must be 'l' or 't'; got {estimator!r}")
  noisy_NL = jnp.where(masked_NL, jnp.asarray(mask_id, tokens_NL.dtype), tokens_NL)
  if noised_half:
    if cfg_scale > 0:
      raise ValueError("classifier-free guidance is not implemented for block-diffusion likelihoods")
    logits_NLV = logits_fn(jnp.concatenate([noisy_NL, tokens_NL], axis=1), jnp.concatenate([valid_NL, valid_NL],
                           axis=1), noised_half=True)[:, :L]
  elif cfg_scale > 0:
    uncond_NL = unconditional_tokens(noisy_NL, prompt_BL=valid_NL & ~resp_NL, mask_id=mask_id)
    both = logits_fn(jnp.concatenate([noisy_NL, uncond_NL]), jnp.concatenate([valid_NL, valid_NL]))
    logits_NLV = guided_logits(both[: B * S], both[B * S:], scale=cfg_scale)
  else:
    logits_NLV = logits_fn(noisy_NL, valid_NL)
  logp_NL = token_logprob(logits_NLV, tokens_NL)
  est_N = weight_N * jnp.where(masked_NL, logp_NL, 0.0).sum(axis=1)
  return est_N.reshape(B, S).mean(axis=1)


def causal_loglik(*, logits_BLV: jax.Array, tokens_BL: jax.Array, target_BL: jax.Array) -> jax.Array:
  """float32 [B]: exact sum of log p(x_i | x_<i) over positions i where target_BL is True (i >= 1),
  from a causal model's logits (position i - 1 predicts token i)."""
  logp_BL = token_logprob(logits_BLV[:, :-1], tokens_BL[:, 1:])
  return jnp.where(target_BL[:, 1:].astype(bool), logp_BL, 0.0).sum(axis=1)


# --- Preference optimisation: DPO on (ELBO) log-likelihoods (REFERENCE §9) ----------------------------


class ElboDraws(NamedTuple):
  """S = n_time x n_mask Monte Carlo samples of an ELBO per row: which tokens each masks, and its weight."""

  masked_BSL: jax.Array       # bool: sample s of row b masks these (response) positions
  weight_BS: jax.Array        # float32: 1/p (t-based) or L/l (l-based)


def elbo_draws(rng: jax.Array, *, response_BL: jax.Array, n_time: int, n_mask: int, estimator: str = "t",
               eps: float = 1e-3) -> ElboDraws:
  """The timesteps and masks of `n_time * n_mask` ELBO samples per row, sample s using timestep s // n_mask.

  estimator='t' (REFERENCE §2, §9): t ~ U(0, 1) per timestep, p = (1 - eps) t + eps, each response token
    masked with probability p by each of the timestep's n_mask masks; weight 1/p.
  estimator='l' (§5): n_time mask counts l stratified over 1..L (`stratified_mask_counts`), each mask
    hides exactly l of the L response tokens; weight L/l.
  Only `response_BL` positions are ever masked (the prompt never is). VRPO's optimal allocation is
  n_mask = 1: n distinct timesteps, one mask each. Example: n_time = 2, n_mask = 2 gives four samples,
  the first two at one t (two different masks), the last two at another.
  """
  B, L = response_BL.shape
  S = n_time * n_mask
  response_BL = response_BL.astype(bool)
  rng_t, rng_m = jax.random.split(rng)
  draws_BSL = jax.random.uniform(rng_m, (B, S, L))
  per_sample = lambda x_BT: jnp.repeat(x_BT, n_mask, axis=1)
  if estimator == "t":
    p_BS = per_sample((1.0 - eps) * jax.random.uniform(rng_t, (B, n_time), jnp.float32) + eps)
    masked_BSL = response_BL[:, None, :] & (draws_BSL < p_BS[..., None])
    return ElboDraws(masked_BSL, 1.0 / p_BS)
  if estimator == "l":
    length_B = response_BL.sum(axis=1)
    count_BS = per_sample(stratified_mask_counts(rng_t, length_B=length_B, num_samples=n_time))
    masked_NL = _mask_lowest(draws_BSL.reshape(B * S, L), jnp.repeat(response_BL, S, axis=0), count_BS.reshape(-1))
    weight_BS = length_B[:, None].astype(jnp.float32) / count_BS.astype(jnp.float32)
    return ElboDraws(masked_NL.reshape(B, S, L), weight_BS)
  raise ValueError(f"estimator must be 't' or 'l'; got {estimator!r}")


def masked_elbo(score_fn: ScoreFn, draws: ElboDraws, *, tokens_BL: jax.Array, valid_BL: jax.Array,
                mask_id: int) -> tuple[jax.Array, TokenScores]:
  """float32 [B]: the ELBO estimate (1/S) sum_s w_s * sum_{i masked by s} log p(x_i | x_s), a SUM over
  tokens (REFERENCE §9), from one `score_fn` call over all B * S noisy rows; also the scores [B*S, L].

  Example: one sample masking two tokens with log-probs -0.2 and -0.4 at p = 0.5: (-0.6) / 0.5 = -1.2.
  """
  B, S, L = draws.masked_BSL.shape
  rep = lambda x: jnp.repeat(x, S, axis=0)
  masked_NL = draws.masked_BSL.reshape(B * S, L)
  tokens_NL = rep(tokens_BL)
  noisy_NL = jnp.where(masked_NL, jnp.asarray(mask_id, tokens_NL.dtype), tokens_NL)
  scores = score_fn(noisy_NL, rep(valid_BL.astype(bool)), tokens_NL)
  logp_BS = jnp.where(masked_NL, -scores.nll_BL, 0.0).sum(axis=1).reshape(B, S)
  return (draws.weight_BS * logp_BS).mean(axis=1), scores


class DpoOutput(NamedTuple):
  loss: jax.Array             # scalar: mean over pairs of -log sigmoid(margin)
  margin_B: jax.Array         # beta * [(pol_w - ref_w) - (pol_l - ref_l)]: the (estimated) preference score
  reward_chosen_B: jax.Array  # beta * (pol_w - ref_w): the implicit reward of the chosen response
  reward_rejected_B: jax.Array


def dpo_loss(*, policy_chosen_B: jax.Array, policy_rejected_B: jax.Array, reference_chosen_B: jax.Array,
             reference_rejected_B: jax.Array, beta: float) -> DpoOutput:
  """DPO (Rafailov et al., 2023) on log-likelihoods, or on ELBO estimates of them (LLaDA 1.5's VRPO):
  L = -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]), mean over pairs.

  Example: policy - reference = +1 on the chosen and -1 on the rejected response, beta = 0.5: margin
  0.5 * (1 - (-1)) = 1, loss -log sigmoid(1) = 0.3133, rewards +0.5 and -0.5.
  """
  reward_w = beta * (policy_chosen_B - reference_chosen_B)
  reward_l = beta * (policy_rejected_B - reference_rejected_B)
  margin_B = reward_w - reward_l
  return DpoOutput(-jax.nn.log_sigmoid(margin_B).mean(), margin_B, reward_w, reward_l)


def preference_metrics(out: DpoOutput) -> dict[str, jax.Array]:
  """Batch means: the reward margin, the preference accuracy (share of pairs with margin > 0) and the
  chosen / rejected implicit rewards."""
  return {"reward_margin": out.margin_B.mean(), "preference_accuracy": (out.margin_B > 0).mean(dtype=jnp.float32),
          "reward_chosen": out.reward_chosen_B.mean(), "reward_rejected": out.reward_rejected_B.mean()}


def _both(chosen_BL: jax.Array, rejected_BL: jax.Array, *rows: jax.Array) -> tuple[jax.Array, ...]:
  """[chosen; rejected] as one 2B-row batch, with the per-row arrays `rows` repeated for both halves."""
  return (jnp.concatenate([chosen_BL, rejected_BL]),) + tuple(jnp.concatenate([r, r]) for r in rows)


def vrpo_dpo(score_fn: ScoreFn, reference_fn: ScoreFn, rng: jax.Array, *, chosen_BL: jax.Array,
             rejected_BL: jax.Array, prompt_len_B: jax.Array, valid_BL: jax.Array, mask_id: int, beta: float,
             n_time: int, n_mask: int = 1, antithetic: bool = True, estimator: str = "t",
             eps: float = 1e-3) -> tuple[DpoOutput, ElboDraws, TokenScores]:
  """VRPO (LLaDA 1.5): `dpo_loss` on ELBO estimates of the policy (`score_fn`) and the frozen reference,
  per pair; also the policy's draws and token scores.

  Each of the 2B responses (rows [prompt, response, EOS...], both responses of a pair EOS-padded to the
  batch's common length by `valid_BL`) gets S = n_time * n_mask samples (`elbo_draws`). With
  `antithetic` the reference scores the very noisy inputs the policy scores, so the two estimates' noise
  cancels in their difference (for identical models the margin is exactly 0); without, it draws its own.
  Naive DPO-on-ELBO is n_time = n_mask = 1, antithetic=False. The reference is never differentiated.
  """
  B, L = chosen_BL.shape
  tokens_NL, prompt_N, valid_NL = _both(chosen_BL, rejected_BL, prompt_len_B, valid_BL.astype(bool))
  response_NL = response_mask(prompt_len_B=prompt_N, length=L) & valid_NL
  rng_policy, rng_reference = jax.random.split(rng)
  draw = lambda key: elbo_draws(key, response_BL=response_NL, n_time=n_time, n_mask=n_mask, estimator=estimator,
                                eps=eps)
  draws = draw(rng_policy)
  elbo = lambda fn, d: masked_elbo(fn, d, tokens_BL=tokens_NL, valid_BL=valid_NL, mask_id=mask_id)
  policy_N, scores = elbo(score_fn, draws)
  reference_N, _ = elbo(reference_fn, draws if antithetic else draw(rng_reference))
  reference_N = jax.lax.stop_gradient(reference_N)
  out = dpo_loss(policy_chosen_B=policy_N[:B], policy_rejected_B=policy_N[B:], reference_chosen_B=reference_N[:B],
                 reference_rejected_B=reference_N[B:], beta=beta)
  return out, draws, scores


def vrpo_objective(score_fn: ScoreFn, reference_fn: ScoreFn, rng: jax.Array, **kwargs) -> LossOutput:
  """`vrpo_dpo` (same arguments) as a training loss: the mean DPO loss; num_masked / num_correct count
  the policy's masked tokens; `metrics` are `preference_metrics`."""
  out, draws, scores = vrpo_dpo(score_fn, reference_fn, rng, **kwargs)
  counted_NL = draws.masked_BSL.reshape(-1, draws.masked_BSL.shape[-1])
  return LossOutput(out.loss, counted_NL.sum(), (scores.correct_BL & counted_NL).sum(), preference_metrics(out))


def exact_dpo_objective(score_fn: ScoreFn, reference_fn: ScoreFn, *, chosen_BL: jax.Array, rejected_BL: jax.Array,
                        prompt_len_B: jax.Array, valid_BL: jax.Array, beta: float) -> LossOutput:
  """Exact DPO for the causal baseline: `dpo_loss` on log p(response | prompt) summed over next-token
  predictions (`score_fn` of a causal model, position i scored against token i + 1), of the policy and
  the frozen reference. num_masked / num_correct count the policy's response targets."""
  B, L = chosen_BL.shape
  tokens_NL, prompt_N, valid_NL = _both(chosen_BL, rejected_BL, prompt_len_B, valid_BL.astype(bool))
  next_NL = jnp.concatenate([tokens_NL[:, 1:], tokens_NL[:, :1]], axis=1)
  # position i predicts token i + 1: a response target when i + 1 is a valid response position
  target_NL = jnp.concatenate([(response_mask(prompt_len_B=prompt_N, length=L) & valid_NL)[:, 1:],
                               jnp.zeros((2 * B, 1), bool)], axis=1)
  loglik = lambda scores: jnp.where(target_NL, -scores.nll_BL, 0.0).sum(axis=1)
  scores = score_fn(tokens_NL, valid_NL, next_NL)
  policy_N = loglik(scores)
  reference_N = jax.lax.stop_gradient(loglik(reference_fn(tokens_NL, valid_NL, next_NL)))
  out = dpo_loss(policy_chosen_B=policy_N[:B], policy_rejected_B=policy_N[B:], reference_chosen_B=reference_N[:B],
                 reference_rejected_B=reference_N[B:], beta=beta)
  return LossOutput(out.loss, target_NL.sum(), (scores.correct_BL & target_NL).sum(), preference_metrics(out))
