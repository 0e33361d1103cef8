"""Likelihood estimates of a trained model, batched and jitted (REFERENCE §5).

`Scorer` answers the questions benchmark harnesses ask: log p(response | prompt) for many pairs of
different lengths (multiple choice picks the largest), and a bound on log p(text) for perplexity. For
the diffusion model these are Monte Carlo lower bounds (`diffusion.conditional_elbo`: the l-based
estimator by default, the t-based one on request; a block-diffusion model's block-wise bound); for the
causal baseline they are exact.

Pairs are right-padded into a few length buckets (so a long tail of lengths compiles a handful of
programs, not one per length) and grouped so one forward pass holds at most `max_rows` sequences.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax import diffusion, model as model_lib

ESTIMATORS = ("l", "t")


@dataclasses.dataclass(frozen=True)
class LikelihoodConfig:
  """How a diffusion model's log-likelihood is estimated (REFERENCE §5; the release's defaults).

  mc_num samples per pair, drawn `batch_size` at a time (mask counts stratified within each batch);
  estimator 'l' (exactly l of L response tokens masked) or 't' (each masked with probability t);
  cfg_scale > 0 applies classifier-free guidance; seed fixes the masks so scores are repeatable.
  """

  mc_num: int = 128
  batch_size: int = 16
  estimator: str = "l"
  cfg_scale: float = 0.0
  eps: float = 1e-3
  seed: int = 0
  max_rows: int = 64  # sequences per forward pass (pairs per pass = max_rows // batch_size, at least 1)

  def __post_init__(self):
    for name in ("mc_num", "batch_size", "max_rows"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"likelihood option '{name}' must be an integer >= 1; got {v!r}")
    if self.mc_num % self.batch_size:
      raise ValueError(f"likelihood option 'mc_num'={self.mc_num} must be a multiple of "
                       f"'batch_size'={self.batch_size} (samples are drawn batch_size at a time)")
    if self.estimator not in ESTIMATORS:
      raise ValueError(f"likelihood option 'estimator' must be one of {ESTIMATORS}; got {self.estimator!r}")
    if not self.cfg_scale >= 0:
      raise ValueError(f"likelihood option 'cfg_scale' must be >= 0; got {self.cfg_scale!r}")


def _pair_hash(prompt: Sequence[int], response: Sequence[int]) -> int:
  data = np.asarray(list(prompt) + [-1] + list(response), np.int64).tobytes()
  return zlib.crc32(data) & 0x7FFFFFFF


def _bucket(n: int, max_len: int) -> int:
  """Sequence length for a pair of total length n: the next power of two >= 32, capped at max_len."""
  return min(max(32, 1 << (n - 1).bit_length()), max_len)


class Scorer:
  """Log-likelihoods from one model: `graphdef` + `params` (e.g. a `serving.LoadedModel`'s)."""

  def __init__(self, graphdef: nnx.GraphDef, params: Any, *, mask_id: int, max_seq_len: int,
               causal: bool = False, pad_id: int = 0, blocks: bool = False):
    self.graphdef, self.params = graphdef, params
    self.mask_id, self.max_seq_len, self.causal, self.pad_id = mask_id, max_seq_len, causal, pad_id
    self.blocks = blocks  # a block-diffusion model: its block-wise ELBO (x_t ++ x_0)

  @classmethod
  def from_loaded(cls, loaded) -> "Scorer":
    """From `serving.load(workdir)`."""
    m = loaded.model_config
    return cls(loaded.graphdef, loaded.params, mask_id=loaded.mask_id,
               max_seq_len=m.max_seq_len, causal=m.causal, pad_id=loaded.tokenizer.eos_id, blocks=m.block_size > 0)

  def _logits(self, params, tokens_BL, valid_BL, **options):
    return model_lib.apply(self.graphdef, params, tokens_BL, valid_BL, **options)

  @functools.partial(jax.jit, static_argnums=(0,), static_argnames=("num_samples", "estimator", "eps",
                                                                    "cfg_scale"))
  def _elbo(self, params, rng, tokens_BL, prompt_len_B, valid_BL, *, num_samples, estimator, eps, cfg_scale):
    return diffusion.conditional_elbo(
        functools.partial(self._logits, params), rng, tokens_BL=tokens_BL, prompt_len_B=prompt_len_B,
        valid_BL=valid_BL, mask_id=self.mask_id, num_samples=num_samples, estimator=estimator, eps=eps,
        cfg_scale=cfg_scale, noised_half=self.blocks)

  @functools.partial(jax.jit, static_argnums=(0,))
  def _exact(self, params, tokens_BL, prompt_len_B, valid_BL):
    target_BL = diffusion.response_mask(prompt_len_B=prompt_len_B, length=tokens_BL.shape[1]) & valid_BL
    logits = self._logits(params, tokens_BL, valid_BL)
    return diffusion.causal_loglik(logits_BLV=logits, tokens_BL=tokens_BL, target_BL=target_BL)

  def __hash__(self):  # jit's static `self`: one compiled program per scorer and shape
    return id(self)

  def __eq__(self, other):
    return self is other

  def loglikelihood(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                    config: LikelihoodConfig | None = None) -> np.ndarray:
    """float64 [N]: log p(responses[i] | prompts[i]) in nats (a lower bound for the diffusion model).

    Token-id lists in, one number per pair out. The causal model needs a non-empty prompt (its first
    token is never predicted): start prompts with BOS/EOS if there is nothing else.
    """
    config = config or LikelihoodConfig()
    if len(prompts) != len(responses):
      raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    for i, (p, r) in enumerate(zip(prompts, responses)):
      if not len(r):
        raise ValueError(f"pair {i}: the response is empty (nothing to score)")
      if len(p) + len(r) > self.max_seq_len:
        raise ValueError(f"pair {i}: prompt + response is {len(p) + len(r)} tokens, more than the model's "
                         f"max_seq_len={self.max_seq_len}")
      if self.causal and not len(p):
        raise ValueError(f"pair {i}: the causal model needs a non-empty prompt (e.g. [BOS])")
    out = np.zeros(len(prompts), np.float64)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    per_pass = config.max_rows if self.causal else max(1, config.max_rows // config.batch_size)
    i = 0
    while i < len(order):
      T = _bucket(len(prompts[order[i]]) + len(responses[order[i]]), self.max_seq_len)
      group = []
      while i < len(order) and len(group) < per_pass and len(prompts[order[i]]) + len(responses[order[i]]) <= T:
        group.append(order[i])
        i += 1
      out[group] = self._score_group([prompts[j] for j in group], [responses[j] for j in group], T, config)
    return out

  def _score_group(self, prompts, responses, T: int, config: LikelihoodConfig) -> np.ndarray:
    n = len(prompts)
    rows = 1 << (n - 1).bit_length()  # pad the group to a power of two: few distinct compiled shapes
    prompts = list(prompts) + [prompts[0]] * (rows - n)
    responses = list(responses) + [responses[0]] * (rows - n)
    tokens = np.full((rows, T), self.pad_id, np.int32)
    valid = np.zeros((rows, T), bool)
    prompt_len = np.zeros((rows,), np.int32)
    for row, (p, r) in enumerate(zip(prompts, responses)):
      seq = list(p) + list(r)
      tokens[row, : len(seq)] = seq
      valid[row, : len(seq)] = True
      prompt_len[row] = len(p)
    if self.causal:
      return np.asarray(self._exact(self.params, tokens, prompt_len, valid), np.float64)[:n]
    # One key per pair, from the seed and the pair's own tokens: a pair scores the same alone, in any
    # batch, and under any --limit.
    root = jax.random.key(config.seed)
    keys = jnp.stack([jax.random.fold_in(root, _pair_hash(p, r)) for p, r in zip(prompts, responses)])
    total = np.zeros((rows,), np.float64)
    chunks = config.mc_num // config.batch_size
    for c in range(chunks):
      chunk_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, c)
      est = self._elbo(self.params, chunk_keys, tokens, prompt_len, valid,
                       num_samples=config.batch_size, estimator=config.estimator, eps=config.eps,
                       cfg_scale=float(config.cfg_scale))
      total += np.asarray(est, np.float64)
    return total[:n] / chunks

  def rolling_loglikelihood(self, texts: Sequence[Sequence[int]], config: LikelihoodConfig | None = None,
                            *, bos_id: int | None = None) -> np.ndarray:
    """float64 [N]: log p(text) in nats (a bound for the diffusion model), over windows of at most
    `max_seq_len` tokens scored one after another, each conditioned on nothing before it.

    The diffusion model scores each window unconditionally (empty prompt); the causal model conditions
    every window on `bos_id` (its first token has no left context otherwise)."""
    if self.causal and bos_id is None:
      raise ValueError("the causal model's rolling log-likelihood needs bos_id (a token to start from)")
    prompts, responses, owner = [], [], []
    lead = [] if not self.causal else [bos_id]
    width = self.max_seq_len - len(lead)
    for i, t in enumerate(texts):
      if not len(t):
        raise ValueError(f"text {i} is empty (nothing to score)")
      for start in range(0, len(t), width):
        prompts.append(lead)
        responses.append(list(t[start:start + width]))
        owner.append(i)
    scores = self.loglikelihood(prompts, responses, config)
    out = np.zeros(len(texts), np.float64)
    np.add.at(out, owner, scores)
    return out


@dataclasses.dataclass(frozen=True)
class PreferenceReport:
  """How a model ranks and answers held-out preference pairs (`preference_report`)."""

  num_pairs: int
  likelihood_accuracy: float     # share of pairs whose chosen response has the higher likelihood estimate
  mean_loglik_gap: float         # mean of log p(chosen) - log p(rejected), nats (estimates, same masks/seed)
  greedy_share: float | None     # share of greedy answers that `prefers` the chosen fact/format (or None)
  by_kind: dict[str, dict[str, float]]  # the same numbers per record kind ('fact', 'format', ...)


def preference_report(loaded, records: Sequence[dict], *, likelihood: LikelihoodConfig | None = None,
                      generate: bool = True, gen_length: int = 16, steps: int = 16,
                      batch_size: int = 16) -> PreferenceReport:
  """Scores messages-format preference records ({"messages", "chosen", "rejected"}, e.g. the held-out
  built-in ones of `data.preference.generate_preferences(split='heldout')`) with a loaded model.

  Likelihood: log p(response | chat-templated prompt) of both responses by `Scorer.loglikelihood` (a
  diffusion model's ELBO estimate with `likelihood`'s fixed estimator, samples and seed; a causal
  model's exact log-likelihood); a pair counts as ranked right when the chosen response scores higher.
  Generation (`generate`, records with a `kind` only): the greedy answer (temperature 0, low-confidence
  remasking, one block of `gen_length` in `steps`) checked by `data.preference.prefers`.
  """
  from llada_jax.data import preference as preference_lib, sft  # data imports stay out of scoring

  tok = loaded.tokenizer
  pairs = [preference_lib.to_pair(r) for r in records]
  prompts = [sft.render_prompt(history, tok) for history, _, _ in pairs]
  scorer = Scorer.from_loaded(loaded)
  ll = {side: scorer.loglikelihood(prompts, [sft.render_response(p[i], tok) for p in pairs], likelihood)
        for side, i in (("chosen", 1), ("rejected", 2))}
  gap = ll["chosen"] - ll["rejected"]
  kinds = [r.get("kind", "all") for r in records]
  greedy = None
  if generate and all("kind" in r for r in records):
    answers = []
    for i in range(0, len(records), batch_size):
      done = loaded.complete([], prompt_ids=prompts[i:i + batch_size], gen_length=gen_length, steps=steps,
                             block_length=gen_length, temperature=0.0)
      answers += [c.text for c in done]
    greedy = np.asarray([preference_lib.prefers(r, a) for r, a in zip(records, answers)], np.float64)

  def summary(rows: np.ndarray) -> dict[str, float]:
    out = {"pairs": int(rows.sum()), "likelihood_accuracy": float((gap[rows] > 0).mean()),
           "mean_loglik_gap": float(gap[rows].mean())}
    if greedy is not None:
      out["greedy_share"] = float(greedy[rows].mean())
    return out

  by_kind = {k: summary(np.asarray([x == k for x in kinds])) for k in sorted(set(kinds))}
  return PreferenceReport(len(records), float((gap > 0).mean()), float(gap.mean()),
                          None if greedy is None else float(greedy.mean()), by_kind)
