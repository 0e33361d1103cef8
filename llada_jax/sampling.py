"""The reverse process: start from masked positions and unmask them step by step (REFERENCE §4, §8).

`generate` follows the official LLaDA sampler: `gen_length` masked positions after the prompt, split
into `gen_length / block_length` semi-autoregressive blocks (one block = pure diffusion); each block gets
`steps / num_blocks` steps and commits, at step i, the official transfer count of its masked positions,
chosen by the remasking rule among the current block's masked positions. Options: temperature
(Gumbel-max), classifier-free guidance (`diffusion.guided_logits`, shared with the likelihood code),
EOS-logit and EOS/EOT-confidence suppression, Fast-dLLM's confidence-threshold parallel decoding,
Fast-dLLM's block-wise approximate KV cache (prefix or dual), and early exit once a row's remaining
positions can only be EOS. With every option at its default the output is the official algorithm's.

`infill` is the same reverse process over holes anywhere in a sequence (masks *before* known text: the
reversal experiment): `generate` with no prompt and a per-row transfer schedule. The autoregressive
baseline's left-to-right sampler lives in `causal_sampling`.

The decode core (the seam every sampler plugs into):
  * `DecodeState(step, x_BL, commit_step_BL, steps_B)` is all the loop carries;
  * `_commit` is THE commit step: `_decide` picks, inside a window of positions, which masked positions
    to commit and to what (remasking rule, transfer schedule or threshold, current block), then the
    early-exit fill;
  * `_decode` is THE loop: for each `Window` (static start/width, the span that keeps it open, a step
    budget, whether its first step refreshes a KV cache), `lax.while_loop` over one model call on the
    window and one `_commit`. A model call yields `WindowLogits` (final hidden states + output head):
    the head runs only at the positions `_decide` looks at (the current block of each row).
A sampler only chooses the initial sequence (where the masks are), the transfer schedule and its
windows: no cache = one window over the sequence; prefix/dual cache = one refreshed window per block;
threshold decoding changes only the step budget and `_decide`'s rule. A block-diffusion sampler adds
its windows (and the cache they read) here, not a loop of its own.

Each sampler is one jitted program (the loop, all windows unrolled at trace time), compiled once per
(shapes, options).

Temperature: the release computes `exp(logits) / (-log u)^T` in float64. With `jax_enable_x64` on
(CPU/GPU) we do the same; otherwise (and always on TPU, which has no float64) we take the argmax of the
mathematically identical `logits - T * log(-log u)` in float32, which cannot overflow.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax import diffusion, errors, model as model_lib

REMASKING = ("low_confidence", "random", "margin", "entropy")
KV_CACHES = ("none", "prefix", "dual")
_SUPPRESSED = -1e30  # finite stand-in for a suppressed candidate's confidence


def _bad(name: str, allowed: str, value: Any) -> None:
  raise errors.OptionError(name, f"sampling option '{name}' must be {allowed}; got {value!r}")


def _check_positive(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    _bad(name, "a positive integer", value)


def _check_probability(name: str, value: Any) -> None:
  if value is not None and not 0 < value <= 1:
    _bad(name, "in (0, 1] (or None to disable)", value)


def _check_fits(prompt_width: int, gen_length: int, max_seq_len: int) -> None:
  """The prompt (its padded width) and the generated positions must fit in the model's sequence."""
  if gen_length >= max_seq_len:
    _bad("gen_length", f"less than model.max_seq_len={max_seq_len} (the prompt needs room too)", gen_length)
  if prompt_width + gen_length > max_seq_len:
    lower = f", or lower gen_length to at most {max_seq_len - prompt_width}" if prompt_width < max_seq_len else ""
    raise errors.OptionError("prompt", f"the prompt is {prompt_width} tokens long and gen_length={gen_length}: "
                             f"together more than model.max_seq_len={max_seq_len}; shorten the prompt to at "
                             f"most {max_seq_len - gen_length} tokens{lower}")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Options of `generate`; hashable, so each distinct setting compiles once."""

  gen_length: int = 128           # tokens generated after the prompt
  steps: int = 128                # reverse-process steps (fixed-schedule mode)
  block_length: int = 128         # semi-autoregressive block; == gen_length is pure diffusion
  temperature: float = 0.0        # 0: greedy; > 0: Gumbel-max sampling
  cfg_scale: float = 0.0          # classifier-free guidance: uncond + (scale + 1) * (cond - uncond)
  remasking: str = "low_confidence"  # low_confidence | random | margin | entropy
  threshold: float | None = None  # Fast-dLLM: commit every masked token with p >= threshold (>= 1/step)
  suppress_eos_logit: bool = False       # never predict EOS (the release's logits_eos_inf)
  suppress_eos_confidence: bool = False  # EOS/EOT predictions are committed last (confidence_eos_eot_inf)
  early_exit: bool = False        # a row stops once its remaining masked positions can only be EOS
  kv_cache: str = "none"          # Fast-dLLM block-wise approximate KV cache: none | prefix | dual
  tau_edit: float | None = None   # block models (LLaDA2.1): re-write a filled token whose prediction differs
                                  # with probability > tau_edit (None: no editing)
  max_post_steps: int = 16        # block models, editing: steps after a block is full while edits still fire

  def validate(self, prompt_length: int, max_seq_len: int, padded_length: int | None = None) -> None:
    """Raises ValueError naming the option, before anything is compiled.

    `prompt_length` is the shortest prompt of the batch; `padded_length` (default: the same) the
    left-padded width, which is what occupies the sequence.
    """
    bad = _bad
    for name in ("gen_length", "steps", "block_length"):
      _check_positive(name, getattr(self, name))
    if self.gen_length % self.block_length:
      bad("block_length", f"a divisor of gen_length={self.gen_length}", self.block_length)
    num_blocks = self.gen_length // self.block_length
    if self.steps % num_blocks:
      bad("steps", f"a multiple of the number of blocks ({num_blocks} = gen_length / block_length)", self.steps)
    if self.steps > self.gen_length:
      bad("steps", f"at most gen_length={self.gen_length} (a step commits at least one token)", self.steps)
    self._check_rule()
    if not self.cfg_scale >= 0:
      bad("cfg_scale", ">= 0", self.cfg_scale)
    _check_probability("threshold", self.threshold)
    if prompt_length < 1:
      bad("prompt", "at least one token long", prompt_length)
    width = prompt_length if padded_length is None else padded_length
    _check_fits(width, self.gen_length, max_seq_len)
    if self.kv_cache not in KV_CACHES:
      bad("kv_cache", f"one of {KV_CACHES}", self.kv_cache)
    if self.tau_edit is not None:
      bad("tau_edit", "None for a bidirectional model (token editing is for block-diffusion models, "
          "model.block_size > 0)", self.tau_edit)

  def _check_rule(self) -> None:
    """The checks of the commit rule's options that both samplers share."""
    if self.remasking not in REMASKING:
      _bad("remasking", f"one of {REMASKING}", self.remasking)
    if not self.temperature >= 0:
      _bad("temperature", ">= 0", self.temperature)

  def validate_blocks(self, block_size: int, prompt_length: int, max_seq_len: int,
                      padded_length: int | None = None) -> None:
    """`validate` for a block-diffusion model's sampler (`generate_blocks`), whose blocks are the model's:
    `block_length` must be `block_size`, `steps` counts the steps of one block (at most its length), and
    the block-aligned canvas (prompt + gen_length, rounded up to whole blocks) must fit the model."""
    bad = _bad
    for name in ("gen_length", "steps", "block_length"):
      _check_positive(name, getattr(self, name))
    if not 1 <= block_size <= max_seq_len:
      bad("block_size", f"in [1, model.max_seq_len={max_seq_len}]", block_size)
    if self.block_length != block_size:
      bad("block_length", f"the model's block size ({block_size}, model.block_size): a block-diffusion model "
          "decodes the blocks it was trained on", self.block_length)
    if self.steps > block_size:
      bad("steps", f"at most the block size {block_size} (a block model's steps are per block; each commits "
          "at least one token)", self.steps)
    self._check_rule()
    if self.cfg_scale:
      bad("cfg_scale", "0 for a block-diffusion model (guidance is not implemented for its sampler)", self.cfg_scale)
    if self.kv_cache != "none":
      bad("kv_cache", "'none' for a block-diffusion model (its KV cache is exact and always on)", self.kv_cache)
    _check_probability("threshold", self.threshold)
    _check_probability("tau_edit", self.tau_edit)
    if isinstance(self.max_post_steps, bool) or not isinstance(self.max_post_steps, int) or self.max_post_steps < 0:
      bad("max_post_steps", "an integer >= 0", self.max_post_steps)
    if prompt_length < 1:
      bad("prompt", "at least one token long", prompt_length)
    width = prompt_length if padded_length is None else padded_length
    canvas = -(-(width + self.gen_length) // block_size) * block_size
    if canvas > max_seq_len:
      raise errors.OptionError("gen_length", f"the prompt ({width} tokens) and gen_length={self.gen_length}, "
                               f"rounded up to whole blocks of {block_size}, take {canvas} positions: more than "
                               f"model.max_seq_len={max_seq_len}; shorten the prompt or lower gen_length")


class GenerateOutput(NamedTuple):
  tokens_BL: jax.Array         # prompt (left-padded) followed by the generated positions
  commit_step_BL: jax.Array    # step at which each position was committed; -1 for prompt positions
  steps_B: jax.Array           # steps each row took (fewer than `steps` with early exit / threshold)


def transfer_schedule(num_masked: int, steps: int) -> np.ndarray:
  """Tokens to commit at each step: `num_masked // steps` each, the first `num_masked % steps` one more.

  Example: 10 masked positions over 4 steps -> [3, 3, 2, 2].
  """
  base, extra = divmod(num_masked, steps)
  return np.asarray([base + (i < extra) for i in range(steps)], np.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to a common length (`width`, default the longest); returns tokens [B, Lp] and
  validity [B, Lp]."""
  longest = max(len(p) for p in prompts)
  width = longest if width is None else width
  if width < longest:
    raise ValueError(f"left_pad: width {width} is shorter than the longest prompt ({longest} tokens)")
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  valid = np.zeros((len(prompts), width), bool)
  for i, p in enumerate(prompts):
    if len(p):
      tokens[i, width - len(p):] = p
      valid[i, width - len(p):] = True
  return tokens, valid


_ARGMAX_CHUNK = 256  # vocabulary entries per chunk of `_argmax`'s first pass


def _argmax(x: jax.Array) -> jax.Array:
  """`jnp.argmax(x, axis=-1)`, exactly (the first maximum; a NaN counts as the maximum).

  On CPU, over a vocabulary, in two passes: each chunk of `_ARGMAX_CHUNK` entries' maximum, then
  `jnp.argmax` inside the first chunk that holds the overall one. XLA's CPU backend runs a float
  max-reduction about 10x faster than its (index, value) argmax reduction (on [4, 32, 32768]: ~1 ms
  against ~10 ms). Its vectorised max is not NaN-safe (over several rows it was seen to return wrong
  maxima for chunks holding a NaN), so input whose sum is NaN (a NaN, or both infinities) takes
  `jnp.argmax` instead. Other backends use `jnp.argmax` as it is. The padding of a vocabulary that is no
  multiple of the chunk is -inf, after every real entry, so it never wins a tie.
  """
  V = x.shape[-1]
  if V <= 2 * _ARGMAX_CHUNK or jax.default_backend() != "cpu":
    return jnp.argmax(x, axis=-1)

  def chunked(x):
    n = -(-V // _ARGMAX_CHUNK)
    if n * _ARGMAX_CHUNK > V:
      x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n * _ARGMAX_CHUNK - V)], constant_values=-jnp.inf)
    chunks = x.reshape(x.shape[:-1] + (n, _ARGMAX_CHUNK))
    best_chunk = jnp.argmax(jnp.max(chunks, axis=-1), axis=-1)
    inside = jnp.take_along_axis(chunks, best_chunk[..., None, None], axis=-2)[..., 0, :]
    return best_chunk * _ARGMAX_CHUNK + jnp.argmax(inside, axis=-1)

  return jax.lax.cond(jnp.isnan(jnp.sum(x)), lambda x: jnp.argmax(x, axis=-1), chunked, x)


def _gumbel_argmax(logits_BLV: jax.Array, temperature: float, uniform) -> jax.Array:
  """Greedy (temperature 0) or Gumbel-max choice over the vocabulary. `uniform(dtype, minval)` draws
  the noise, one number per logit, in [minval, 1)."""
  if temperature == 0:
    return _argmax(logits_BLV)
  if jax.config.jax_enable_x64:  # the release's float64 formula, exactly
    u = uniform(jnp.float64, 0.0)
    return _argmax(jnp.exp(logits_BLV.astype(jnp.float64)) / (-jnp.log(u)) ** temperature)
  u = uniform(jnp.float32, jnp.finfo(jnp.float32).tiny)
  return _argmax(logits_BLV - temperature * jnp.log(-jnp.log(u)))


def row_keys(rng: jax.Array, batch: int) -> jax.Array:
  """The random keys of a batch's rows: `rng` itself when it already holds one key per row (shape
  [batch]), else `fold_in(rng, row)`. A row draws only from its own key, so it samples the same whatever
  it is batched with: row r of `generate(prompts, rng=key)` is what `keys[r] = fold_in(key, r)` gives."""
  if rng.shape == (batch,):
    return rng
  if rng.shape:
    raise ValueError(f"rng must be one key or one key per row ({batch}); got shape {rng.shape}")
  return jax.vmap(lambda r: jax.random.fold_in(rng, r))(jnp.arange(batch))


_PAIRWISE_RANKS = 1024  # up to this many positions a row, ranks by comparing every pair (else: sorting)


def _ranks(conf_BW: jax.Array) -> jax.Array:
  """Each position's place in its row ordered by descending confidence, ties by lower position, NaN
  last (0 = first): exactly the ranks of a double stable argsort of -conf. Up to `_PAIRWISE_RANKS`
  positions (a block, the usual case) they are counted instead: the positions ahead of each one,
  which is cheaper than two sorts."""
  W = conf_BW.shape[-1]
  if W > _PAIRWISE_RANKS:
    return jnp.argsort(jnp.argsort(-conf_BW, axis=-1, stable=True), axis=-1, stable=True)
  mine, other = conf_BW[..., :, None], conf_BW[..., None, :]
  nan_mine, nan_other = jnp.isnan(mine), jnp.isnan(other)
  left = jnp.arange(W)[None, :] < jnp.arange(W)[:, None]  # [mine, other]: other lies to mine's left
  tied = (other == mine) | (nan_other & nan_mine)
  ahead = (nan_mine & ~nan_other) | ((nan_mine == nan_other) & ((other > mine) | (tied & left)))
  return jnp.sum(ahead, axis=-1, dtype=jnp.int32)


def _confidence(probs_BLV: jax.Array, x0_BL: jax.Array, rule: str, uniform) -> jax.Array:
  """Higher = commit sooner. `uniform()` draws the random rule's numbers, one per position."""
  if rule == "random":
    return uniform()
  if rule == "margin":
    top2 = jax.lax.top_k(probs_BLV, 2)[0]
    return top2[..., 0] - top2[..., 1]
  if rule == "entropy":
    return jnp.sum(probs_BLV * jnp.log(jnp.maximum(probs_BLV, 1e-30)), axis=-1)  # = -entropy
  return jnp.take_along_axis(probs_BLV, x0_BL[..., None], axis=-1)[..., 0]


def _decide(cfg: SamplingConfig, logits: "WindowLogits", x_BW, pos_W, *, P: int, L: int, i, rng_B, origin_B,
            mask_id: int, eos_id: int, eot_id: int | None, schedule, steps_per_block: int):
  """One step inside a window of positions: which masked positions to commit, and to what.

  Only the current block of a row can commit, and it is the block of the row's first masked position:
  when the window is wider than a block, the output head and the decision (vocabulary argmax, softmax,
  confidences, ranks) run over that block's `block_length` positions of each row, gathered out of the
  window, instead of over every position of the window (a no-cache step sees the whole canvas, prompt
  included), and the choices are scattered back.
  """
  B, W = x_BW.shape
  K = cfg.block_length
  # The current block of each row: the block of its first masked position. Every candidate lies in
  # [block_end - K, block_end), so a K-wide slice of the window, clamped into it, holds them all.
  first_masked_B = jnp.min(jnp.where(x_BW == mask_id, pos_W, L), axis=1)
  block_end_B = P + ((first_masked_B - P) // K + 1) * K
  decide = functools.partial(_decide_positions, cfg, block_end_B=block_end_B, i=i, rng_B=rng_B, origin_B=origin_B,
                             mask_id=mask_id, eos_id=eos_id, eot_id=eot_id, quota=schedule[i % steps_per_block])
  if K >= W:
    return decide(logits.at(), x_BW, jnp.broadcast_to(pos_W, (B, W)))[:2]
  idx_BK = jnp.clip(block_end_B - K - pos_W[0], 0, W - K)[:, None] + jnp.arange(K)
  take = lambda a: jnp.take_along_axis(a, idx_BK.reshape(idx_BK.shape + (1,) * (a.ndim - 2)), axis=1)
  commit_BK, x0_BK, _ = decide(logits.at(idx_BK), take(x_BW), pos_W[idx_BK])
  rows_B1 = jnp.arange(B)[:, None]
  return jnp.zeros((B, W), bool).at[rows_B1, idx_BK].set(commit_BK), x_BW.at[rows_B1, idx_BK].set(x0_BK)


def _position_noise(rng_B, origin_B, pos_BW, shape: tuple[int, ...] = ()):
  """`uniform(dtype, minval)` -> [B, W, *shape] numbers for positions `pos_BW`, each position's from
  `fold_in(rng_B[b], pos - origin_B[b])`: its row's key and its offset from the row's first real token.
  So a number depends on the row's key, the step (already folded into it) and the position in the
  unpadded row only: not on the rows batched with it, the width the prompt is padded to, or the window a
  step computes (a no-cache step, a cached one, `infill` and a lone row draw the same)."""
  keys_BW = jax.vmap(lambda k, offsets: jax.vmap(lambda o: jax.random.fold_in(k, o))(offsets))(
      rng_B, pos_BW - origin_B[:, None])

  def uniform(dtype, minval=0.0):
    draw = lambda k: jax.random.uniform(k, shape, dtype, minval=minval)
    return jax.vmap(jax.vmap(draw))(keys_BW)

  return uniform


def _decide_positions(cfg: SamplingConfig, logits_BWV, x_BW, pos_BW, *, block_end_B, i, rng_B, origin_B,
                      mask_id: int, eos_id: int, eot_id: int | None, quota, floor=1, strict: bool = False):
  """`_decide` over given positions of each row (`pos_BW`), whose current block ends at `block_end_B`:
  (commit [B, W], prediction x0 [B, W], its probability p0 [B, W]).

  Without a threshold a step commits the `quota` most confident candidates; with one, every candidate
  whose p0 reaches it (`strict`: exceeds it), and at least the `floor` most confident (Fast-dLLM: 1; a
  block model: its step's quota, LLaDA2.0's top-k fallback). Row b's random numbers at step i come from
  `fold_in(rng_B[b], i)` (`_position_noise`)."""
  masked_BW = x_BW == mask_id
  keys_B2 = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, i)))(rng_B)
  vocab_V = jnp.arange(logits_BWV.shape[-1])  # `where` over it fuses; `.at[..., id].set` copies the logits
  if cfg.suppress_eos_logit:
    logits_BWV = jnp.where(vocab_V == eos_id, -jnp.inf, logits_BWV)
  # The mask token is never a prediction (a trained model does not produce it; committing it would
  # leave the position masked). Excluded from the argmax only, so confidences are the release's.
  x0_BW = _gumbel_argmax(jnp.where(vocab_V == mask_id, -jnp.inf, logits_BWV), cfg.temperature,
                         _position_noise(keys_B2[:, 0], origin_B, pos_BW, vocab_V.shape))
  x0_BW = x0_BW.astype(x_BW.dtype)
  probs_BWV = jax.nn.softmax(logits_BWV, axis=-1)
  conf_BW = _confidence(probs_BWV, x0_BW, cfg.remasking,
                        lambda: _position_noise(keys_B2[:, 1], origin_B, pos_BW)(jnp.float32))
  if cfg.suppress_eos_confidence:
    stop_BW = x0_BW == eos_id
    if eot_id is not None:
      stop_BW |= x0_BW == eot_id
    conf_BW = jnp.where(stop_BW, -jnp.inf, conf_BW)
  candidate_BW = masked_BW & (pos_BW < block_end_B[:, None])
  # Candidates whose confidence was suppressed (-inf) still rank above every non-candidate, so each
  # step commits its full quota and no mask survives the last step (they simply come last).
  conf_BW = jnp.where(candidate_BW, jnp.maximum(conf_BW, _SUPPRESSED), -jnp.inf)
  rank_BW = _ranks(conf_BW)
  p0_BW = jnp.take_along_axis(probs_BWV, x0_BW[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if cfg.threshold is None:
    commit_BW = candidate_BW & (rank_BW < quota)
  else:
    sure_BW = p0_BW > cfg.threshold if strict else p0_BW >= cfg.threshold
    commit_BW = candidate_BW & (sure_BW | (rank_BW < floor))
  return commit_BW, x0_BW, p0_BW


def _decide_block(cfg: SamplingConfig, logits: "WindowLogits", x_BW, pos_W, *, i, first, P: int, rng_B, origin_B,
                  mask_id: int, eos_id: int, eot_id: int | None, schedule):
  """One step of a block model inside its current block (the window): unmask every masked position with
  p0 > threshold, at least the step's quota by confidence (LLaDA2.0: `schedule[i - first]`, first = the
  block's first step), and with `tau_edit` (LLaDA2.1) also re-write every filled non-prompt position whose
  prediction differs from it with p0 > tau_edit."""
  B, W = x_BW.shape
  pos_BW = jnp.broadcast_to(pos_W, (B, W))
  quota = schedule[jnp.minimum(i - first, schedule.shape[0] - 1)]  # editing steps run past the schedule
  commit_BW, x0_BW, p0_BW = _decide_positions(
      cfg, logits.at(), x_BW, pos_BW, block_end_B=jnp.full((B,), pos_W[-1] + 1), i=i, rng_B=rng_B,
      origin_B=origin_B, mask_id=mask_id, eos_id=eos_id, eot_id=eot_id, quota=quota, floor=quota, strict=True)
  if cfg.tau_edit is not None:
    commit_BW |= (x_BW != mask_id) & (pos_BW >= P) & (x0_BW != x_BW) & (p0_BW > cfg.tau_edit)
  return commit_BW, x0_BW


# --- The decode core: one commit step, one loop --------------------------------------------------------


class DecodeState(NamedTuple):
  """What the decode loop carries from one step to the next."""

  step: Any                  # global step index: seeds the step's noise, recorded in commit_step_BL
  x_BL: jax.Array            # the sequence; mask_id where nothing is committed yet
  commit_step_BL: jax.Array  # step at which each position was (last) committed; -1 where it never was
  steps_B: jax.Array         # steps during which each row still held a mask (or edited)
  edits: Any = 0             # token editing: filled positions the last step re-wrote (all rows)
  post: Any = 0              # token editing: steps the current window has run with its span already full


class Window(NamedTuple):
  """One phase of decoding (static, so each window compiles to fixed shapes).

  Every step of the phase recomputes logits for positions [start, start + width) only, and commits
  among them. It lasts while some row still has a mask in [start, start + span), at most `max_steps`
  steps. With `refresh` its first step is a full pass that also returns every layer's keys/values, and
  the later steps read that KV cache instead of recomputing the rest of the sequence. An `exact` window
  (block diffusion) has no refresh: the cache of the completed blocks before it is exact, carried from
  window to window.
  """

  start: int
  width: int
  span: int
  max_steps: int
  refresh: bool = False
  exact: bool = False     # block model: read the exact cache of the blocks before `start` (nothing after the
                          # window); the first step also writes the previous block's keys/values into it
  post_steps: int = 0     # token editing: steps allowed once the span is full, while edits still fire


def _windows(cfg: SamplingConfig, *, P: int, L: int) -> tuple[Window, ...]:
  """`generate`'s phases. Without a cache: one window over the whole sequence (the current block is
  chosen inside the commit step). Fast-dLLM's block-wise approximate KV cache: one window per block,
  refreshed at the block's start; later steps recompute only the block and everything after it
  (prefix cache) or the block alone (dual cache)."""
  num_blocks = cfg.gen_length // cfg.block_length
  if cfg.kv_cache == "none":
    return (Window(0, L, L, cfg.gen_length if cfg.threshold is not None else cfg.steps),)
  per_block = cfg.block_length if cfg.threshold is not None else cfg.steps // num_blocks
  return tuple(Window(start, cfg.block_length if cfg.kv_cache == "dual" else L - start, cfg.block_length,
                      per_block, refresh=True)
               for start in range(P, L, cfg.block_length))


class WindowLogits(NamedTuple):
  """A model call's logits over a window, computed on demand: the final hidden states and the output
  head, so that a step applies the head (a [D, V] matmul per position, and [V] float32 logits each) only
  to the positions it decides over. With guidance, both halves of the doubled batch, combined by
  `diffusion.guided_logits`."""

  hidden_BWD: jax.Array  # [B, W, D], or [2B, W, D] with guidance: conditional rows, then unconditional
  head_DV: jax.Array
  cfg_scale: float

  def window(self, start: int, width: int) -> "WindowLogits":
    """The logits of positions [start, start + width) of this window."""
    return self._replace(hidden_BWD=jax.lax.dynamic_slice_in_dim(self.hidden_BWD, start, width, axis=1))

  def at(self, idx_BK: jax.Array | None = None) -> jax.Array:
    """Float32 logits [B, K, V] of window positions `idx_BK` of each row (default: all of them): the
    model's own head on those rows, so the same numbers as those rows of its full logits (bit for bit
    on CPU, tested; a GPU/TPU matmul over fewer rows may tile, and so round, differently)."""
    hidden = self.hidden_BWD
    if idx_BK is not None:
      halves = hidden.shape[0] // idx_BK.shape[0]
      hidden = jnp.take_along_axis(hidden, jnp.tile(idx_BK, (halves, 1))[..., None], axis=1)
    logits = model_lib.head_logits(hidden, self.head_DV)
    if self.cfg_scale > 0:
      B = logits.shape[0] // 2
      logits = diffusion.guided_logits(logits[:B], logits[B:], scale=self.cfg_scale)
    return logits


def _model_logits(graphdef, params, valid_BL, *, P: int, cfg_scale: float, mask_id: int):
  """The logits source of the decode loop: `logits_of(x_BW, start=, cache=, return_cache=)` ->
  (`WindowLogits` of the window, the new cache or None).

  Without `cache` it is a full pass (x_BW is the whole sequence); with one, only the window's tokens
  run at positions `start...` against it (`key_valid`: the validity of a cache shorter than the sequence).
  With classifier-free guidance the conditional and the unconditional rows
  (`diffusion.unconditional_tokens`) run as one doubled batch; a cache built under guidance holds both
  halves.
  """
  guided = cfg_scale > 0
  valid_in = jnp.concatenate([valid_BL, valid_BL]) if guided else valid_BL

  def logits_of(x_BW, *, start: int = 0, cache=None, return_cache: bool = False, key_valid=None):
    W = x_BW.shape[1]
    kwargs = {"cache": cache, "offset": start} if cache is not None else {}
    kwargs.update(return_cache=return_cache, return_hidden=True)
    if guided:
      # A refresh pass hides the prompt in the unconditional half, so that half of the cache holds the
      # prompt-less keys/values the later (cached) steps read; their windows never hold the prompt.
      uncond_BW = diffusion.unconditional_tokens(x_BW, prompt_BL=(start + jnp.arange(W) < P)[None, :],
                                                 mask_id=mask_id)
      x_BW = jnp.concatenate([x_BW, uncond_BW])
    # An exact (block) window reads a cache cut to the blocks it may see (never under guidance).
    out = model_lib.apply(graphdef, params, x_BW, valid_in if key_valid is None else key_valid, **kwargs)
    (hidden, head), new_cache = out if return_cache else (out, None)
    return WindowLogits(hidden, head, cfg_scale), new_cache

  return logits_of


def _commit(state: DecodeState, logits: WindowLogits, window: Window, *, decide, P: int, mask_id: int,
            eos_id: int, early_exit: bool) -> DecodeState:
  """THE commit step: one step's choices inside the window, then (optionally) the early-exit fill.

  Rows with no mask left commit nothing and stop counting steps.
  """
  i, x_BL, commit_step_BL, steps_B, _, post = state
  start, width = window.start, window.width
  L = x_BL.shape[1]
  x_BW = jax.lax.dynamic_slice_in_dim(x_BL, start, width, axis=1)
  commit_BW, x0_BW = decide(logits, x_BW, start + jnp.arange(width), i=i)
  row_active_B = jnp.any(x_BL == mask_id, axis=1)
  edit_BW = commit_BW & (x_BW != mask_id)  # token editing: re-writes of filled positions
  row_active_B |= jnp.any(edit_BW, axis=1)
  commit_BW &= row_active_B[:, None]
  span_full = ~jnp.any(jax.lax.dynamic_slice_in_dim(x_BL, start, window.span, axis=1) == mask_id)
  post = jnp.where(span_full, post + 1, 0)
  x_BL = jax.lax.dynamic_update_slice_in_dim(x_BL, jnp.where(commit_BW, x0_BW, x_BW), start, axis=1)
  step_BW = jax.lax.dynamic_slice_in_dim(commit_step_BL, start, width, axis=1)
  commit_step_BL = jax.lax.dynamic_update_slice_in_dim(commit_step_BL, jnp.where(commit_BW, i, step_BW),
                                                       start, axis=1)
  if early_exit:
    # A row whose every remaining masked position lies after a committed EOS can only produce EOS.
    positions_L = jnp.arange(L)
    eos_pos_B = jnp.min(jnp.where((x_BL == eos_id) & (positions_L >= P)[None, :], positions_L, L), axis=1)
    still_BL = x_BL == mask_id
    first_still_B = jnp.min(jnp.where(still_BL, positions_L, L), axis=1)
    fill_BL = still_BL & (eos_pos_B < first_still_B)[:, None]
    x_BL = jnp.where(fill_BL, eos_id, x_BL)
    commit_step_BL = jnp.where(fill_BL, i, commit_step_BL)
  return DecodeState(i + 1, x_BL, commit_step_BL, steps_B + row_active_B.astype(jnp.int32),
                     jnp.sum(edit_BW, dtype=jnp.int32), post)


def _decode(graphdef, params, x_BL, valid_BL, rng, *, cfg: SamplingConfig, P: int, schedule,
            windows: Sequence[Window], mask_id: int, eos_id: int, eot_id: int | None,
            observe=None) -> DecodeState:
  """THE decode loop, traced inside a sampler's jitted program: for each window, (a refresh step, then)
  `while` the window is open, one model call on the window and one `_commit`.

  `x_BL` holds mask_id wherever something is to be decoded; positions before `P` are the prompt (what
  guidance hides, where blocks start counting, never EOS for early exit). `schedule` gives each step's
  transfer count, [steps_per_block] or per row [steps_per_block, B, 1] (see `_decide`). `exact` windows
  (a block model) decode each block against the exact cache of the blocks before it (`_prefill`,
  `_exact_window`) with `_decide_block`, `schedule` being one block's. `rng`: one key,
  or one per row (`row_keys`). `observe(step, x_BL)`, if given, runs on the host after every step (a
  `jax.debug.callback`, in step order) with the step's index and the sequence it left: how a server
  streams the answer filling in.
  """
  B, L = x_BL.shape
  common = dict(P=P, rng_B=row_keys(rng, B), origin_B=jnp.argmax(valid_BL, axis=1),  # each row's first real token
                mask_id=mask_id, eos_id=eos_id, eot_id=eot_id, schedule=schedule)
  if any(w.exact for w in windows):  # a block model: windows are its blocks, steps per block
    decide, block_decide = None, functools.partial(_decide_block, cfg, **common)
  else:
    steps_per_block = cfg.steps // (cfg.gen_length // cfg.block_length)
    decide, block_decide = functools.partial(_decide, cfg, L=L, steps_per_block=steps_per_block, **common), None

  def commit(state, logits, window, decide=decide):
    state = _commit(state, logits, window, decide=decide, P=P, mask_id=mask_id, eos_id=eos_id,
                    early_exit=cfg.early_exit)
    if observe is not None:
      jax.debug.callback(observe, state.step - 1, state.x_BL, ordered=True)
    return state

  logits_of = _model_logits(graphdef, params, valid_BL, P=P, cfg_scale=cfg.cfg_scale, mask_id=mask_id)
  state = DecodeState(0, x_BL, jnp.full((B, L), -1, jnp.int32), jnp.zeros((B,), jnp.int32), jnp.int32(0),
                      jnp.int32(0))
  exact = _prefill(graphdef, params, x_BL, valid_BL, windows)
  for n, w in enumerate(windows):  # unrolled at trace time: each window has a static width
    first, cache = state.step, None
    state = state._replace(edits=jnp.int32(0), post=jnp.int32(0))
    if w.exact:
      state, exact = _exact_window(state, w, exact, logits_of, commit, valid_BL, mask_id=mask_id, pending=n > 0,
                                   decide=functools.partial(block_decide, first=first))
      continue
    if w.refresh:
      logits, cache = logits_of(state.x_BL, return_cache=True)
      state = commit(state, logits.window(w.start, w.width), w)

    def is_open(s, w=w, first=first):
      span_masked = jax.lax.dynamic_slice_in_dim(s.x_BL, w.start, w.span, axis=1) == mask_id
      return (s.step - first < w.max_steps) & jnp.any(span_masked)

    def step(s, w=w, cache=cache):
      x_BW = jax.lax.dynamic_slice_in_dim(s.x_BL, w.start, w.width, axis=1)
      return commit(s, logits_of(x_BW, start=w.start, cache=cache)[0], w)

    state = jax.lax.while_loop(is_open, step, state)
  return state


def _prefill(graphdef, params, x_BL, valid_BL, windows: Sequence[Window]):
  """A block model's exact KV cache, [layers, B, L, K, H] x 2, before its first window: the prompt's whole
  blocks (everything before the first window) in one block-causal pass, zeros after (never read before
  they are written). None unless the windows are exact."""
  if not windows or not windows[0].exact:
    return None
  start = windows[0].start
  B, L = x_BL.shape
  if start:
    out = model_lib.apply(graphdef, params, x_BL[:, :start], valid_BL[:, :start], return_cache=True,
                          return_hidden=True)
    return jax.tree.map(lambda c: jnp.pad(c, ((0, 0), (0, 0), (0, L - start), (0, 0), (0, 0))), out[1])
  shape = jax.eval_shape(lambda: model_lib.apply(graphdef, params, x_BL[:, :1], valid_BL[:, :1], return_cache=True,
                                                 return_hidden=True)[1])
  return jax.tree.map(lambda a: jnp.zeros(a.shape[:2] + (L,) + a.shape[3:], a.dtype), shape)


def _exact_window(state: DecodeState, w: Window, exact, logits_of, commit, valid_BL, *, mask_id: int,
                  pending: bool, decide):
  """One block of a block model: `while` it holds a mask (or, editing, its last step re-wrote something and
  fewer than `w.post_steps` steps ran on the full block), one model call of the block's tokens against the
  exact cache cut to the blocks before it, then one commit.

  `pending`: the previous block is final but not yet in the cache. Its keys/values then come with this
  block's first step: that call runs both blocks (the previous one sees only itself and the cache, by the
  block-causal mask, so its keys/values are exact) and its second half's logits make the step. A block with
  no mask (its row stopped at EOS, and so did every row) runs no call at all."""
  end = w.start + w.width
  key_valid = valid_BL[:, :end]
  block = lambda s: jax.lax.dynamic_slice_in_dim(s.x_BL, w.start, w.width, axis=1)
  first = state.step

  def cut(c):  # nothing after the block: it is never seen
    return jax.tree.map(lambda a: a[:, :, :end], c)

  if pending:
    lo = w.start - w.width

    def both_blocks(carry):
      s, cache = carry
      x_BW = jax.lax.dynamic_slice_in_dim(s.x_BL, lo, 2 * w.width, axis=1)
      logits, fresh = logits_of(x_BW, start=lo, cache=cut(cache), key_valid=key_valid, return_cache=True)
      cache = jax.tree.map(lambda c, f: jax.lax.dynamic_update_slice_in_dim(c, f[:, :, :w.width].astype(c.dtype),
                                                                            lo, axis=2), cache, fresh)
      return commit(s, logits.window(w.width, w.width), w, decide=decide), cache

    state, exact = jax.lax.cond(jnp.any(block(state) == mask_id), both_blocks, lambda carry: carry,
                                (state, exact))
  cache = cut(exact)

  def is_open(s):
    masked = jnp.any(block(s) == mask_id)
    editing = (s.edits > 0) & (s.post < w.post_steps)
    return (s.step - first < w.max_steps) & (masked | editing)

  def step(s):
    logits = logits_of(block(s), start=w.start, cache=cache, key_valid=key_valid)[0]
    return commit(s, logits, w, decide=decide)

  return jax.lax.while_loop(is_open, step, state), exact


# --- Samplers: what to decode, in which windows ---------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "mask_id", "eos_id", "eot_id", "observe"))
def _generate(graphdef, params, prompt_BP, prompt_valid_BP, rng, *, cfg: SamplingConfig, mask_id: int,
              eos_id: int, eot_id: int | None, observe=None) -> GenerateOutput:
  B, P = prompt_BP.shape
  G = cfg.gen_length
  x_BL = jnp.concatenate([prompt_BP, jnp.full((B, G), mask_id, prompt_BP.dtype)], axis=1)
  valid_BL = jnp.concatenate([prompt_valid_BP.astype(bool), jnp.ones((B, G), bool)], axis=1)
  steps_per_block = cfg.steps // (G // cfg.block_length)
  state = _decode(graphdef, params, x_BL, valid_BL, rng, cfg=cfg, P=P,
                  schedule=jnp.asarray(transfer_schedule(cfg.block_length, steps_per_block)),
                  windows=_windows(cfg, P=P, L=P + G), mask_id=mask_id, eos_id=eos_id, eot_id=eot_id,
                  observe=observe)
  return GenerateOutput(state.x_BL, state.commit_step_BL, state.steps_B)


def reverse_process(graphdef: nnx.GraphDef, params: Any, prompt_BP: jax.Array, prompt_valid_BP: jax.Array,
                    rng: jax.Array, *, cfg: SamplingConfig, mask_id: int, eos_id: int,
                    eot_id: int | None) -> GenerateOutput:
  """`generate` without its host-side checks, for callers that trace it into a jitted program of their own
  (the RL rollouts, llada_jax.rl): check `cfg` with `SamplingConfig.validate` beforehand."""
  return _generate(graphdef, params, prompt_BP, prompt_valid_BP, rng, cfg=cfg, mask_id=mask_id, eos_id=eos_id,
                   eot_id=eot_id)


def generate(graphdef: nnx.GraphDef, params: Any, prompt_BP: jax.Array, prompt_valid_BP: jax.Array, *,
             mask_id: int, eos_id: int = 1, eot_id: int | None = None, rng: jax.Array | None = None,
             config: SamplingConfig | None = None, max_seq_len: int | None = None, observe=None,
             **options: Any) -> GenerateOutput:
  """Runs the reverse process for a left-padded batch of prompts.

  Options are a `SamplingConfig` or its fields as keywords, e.g.
  `generate(gd, params, tokens, valid, mask_id=4, gen_length=32, steps=32, block_length=8)`.
  Invalid options raise ValueError before compilation. `rng`: one key (row r draws from
  `fold_in(rng, r)`) or one key per row (`row_keys`). `observe(step, x_BL)`: a host function called after
  every step (`_decode`); each distinct function compiles its own program.
  """
  cfg = dataclasses.replace(config or SamplingConfig(), **options)
  prompt_length = int(np.asarray(prompt_valid_BP).sum(axis=1).min()) if prompt_BP.shape[1] else 0
  width = prompt_BP.shape[1]
  cfg.validate(prompt_length, max_seq_len if max_seq_len is not None else width + cfg.gen_length, width)
  rng = jax.random.key(0) if rng is None else rng
  return _generate(graphdef, params, jnp.asarray(prompt_BP), jnp.asarray(prompt_valid_BP), rng, cfg=cfg,
                   mask_id=mask_id, eos_id=eos_id, eot_id=eot_id, observe=observe)


def _block_windows(cfg: SamplingConfig, *, P: int, L: int, block_size: int) -> tuple[Window, ...]:
  """A block model's phases: one exact window per block from the one holding the prompt's end (the
  prompt's whole blocks are prefilled), `steps` steps each, plus `max_post_steps` with token editing."""
  post = cfg.max_post_steps if cfg.tau_edit is not None else 0
  return tuple(Window(start, block_size, block_size, cfg.steps + post, exact=True, post_steps=post)
               for start in range(P // block_size * block_size, L, block_size))


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "block_size", "mask_id", "eos_id", "eot_id",
                                             "observe"))
def _generate_blocks(graphdef, params, prompt_BP, prompt_valid_BP, rng, *, cfg: SamplingConfig, block_size: int,
                     mask_id: int, eos_id: int, eot_id: int | None, observe=None) -> GenerateOutput:
  B, P = prompt_BP.shape
  L = -(-(P + cfg.gen_length) // block_size) * block_size  # the canvas: whole blocks from position 0
  x_BL = jnp.concatenate([prompt_BP, jnp.full((B, L - P), mask_id, prompt_BP.dtype)], axis=1)
  valid_BL = jnp.concatenate([prompt_valid_BP.astype(bool), jnp.ones((B, L - P), bool)], axis=1)
  state = _decode(graphdef, params, x_BL, valid_BL, rng, cfg=cfg, P=P,
                  schedule=jnp.asarray(transfer_schedule(block_size, cfg.steps)),
                  windows=_block_windows(cfg, P=P, L=L, block_size=block_size), mask_id=mask_id, eos_id=eos_id,
                  eot_id=eot_id, observe=observe)
  end = P + cfg.gen_length
  return GenerateOutput(state.x_BL[:, :end], state.commit_step_BL[:, :end], state.steps_B)


def generate_blocks(graphdef: nnx.GraphDef, params: Any, prompt_BP: jax.Array, prompt_valid_BP: jax.Array, *,
                    block_size: int, mask_id: int, eos_id: int = 1, eot_id: int | None = None,
                    rng: jax.Array | None = None, config: SamplingConfig | None = None,
                    max_seq_len: int | None = None, observe=None, **options: Any) -> GenerateOutput:
  """The sampler of a block-diffusion model (REFERENCE §14; `model.block_size` = `block_size`).

  The canvas is whole blocks from position 0: the left-padded prompt, then masks up to gen_length rounded
  up to a block. The prompt's whole blocks are prefilled into an exact KV cache in one pass; each later
  block is decoded against the cache of the completed blocks only (never the masks after it); a finished
  block's keys/values join the cache with the next block's first step, one call over both blocks
  (block-causal attention means later blocks never change them). Inside a block a step commits every
  masked position whose confidence exceeds `threshold`, or, when fewer
  qualify, the top-k by confidence with k from the even schedule `transfer_schedule(block_size, steps)`
  (`steps` per block; without a threshold: exactly that schedule). `early_exit` stops a row at EOS.
  `tau_edit` (LLaDA2.1 token editing) also re-writes filled non-prompt positions of the current block whose
  prediction differs with probability > tau_edit, and keeps stepping after the block is full until no edit
  fires (at most `max_post_steps`). One jitted program; options as in `generate` (`SamplingConfig` fields;
  `block_length` must equal `block_size`), checked by `SamplingConfig.validate_blocks`.
  """
  cfg = dataclasses.replace(config or SamplingConfig(block_length=block_size, steps=block_size), **options)
  prompt_length = int(np.asarray(prompt_valid_BP).sum(axis=1).min()) if prompt_BP.shape[1] else 0
  width = prompt_BP.shape[1]
  limit = max_seq_len if max_seq_len is not None else -(-(width + cfg.gen_length) // block_size) * block_size
  cfg.validate_blocks(block_size, prompt_length, limit, width)
  rng = jax.random.key(0) if rng is None else rng
  return _generate_blocks(graphdef, params, jnp.asarray(prompt_BP), jnp.asarray(prompt_valid_BP), rng, cfg=cfg,
                          block_size=block_size, mask_id=mask_id, eos_id=eos_id, eot_id=eot_id, observe=observe)


def strip_at_stop(ids: Sequence[int], stop_ids: set[int]) -> list[int]:
  """The ids before the first stop id (EOS, or end-of-turn for chat models)."""
  ids = [int(i) for i in ids]
  return ids[: next((k for k, i in enumerate(ids) if i in stop_ids), len(ids))]


# --- Infilling: the reverse process over holes anywhere -------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "mask_id", "eos_id", "eot_id"))
def _infill(graphdef, params, tokens_BL, valid_BL, rng, *, cfg: SamplingConfig, mask_id: int, eos_id: int,
            eot_id: int | None) -> GenerateOutput:
  B, L = tokens_BL.shape
  valid_BL = valid_BL.astype(bool)
  # Padding that happens to hold the mask id is no hole: park it on another id for the loop (padding is
  # never attended to, so no logit changes) and put it back at the end.
  parked_BL = ~valid_BL & (tokens_BL == mask_id)
  x_BL = jnp.where(parked_BL, jnp.asarray(0 if mask_id else 1, tokens_BL.dtype), tokens_BL)
  # Every row's holes form one block; its per-step transfer counts are `transfer_schedule(n_B, steps)`,
  # shaped [steps, B, 1] so `_decide` compares each row's ranks with its own count.
  n_B = jnp.sum(x_BL == mask_id, axis=1)
  step_S = jnp.arange(cfg.steps)[:, None, None]
  schedule_SB1 = n_B[None, :, None] // cfg.steps + (step_S < n_B[None, :, None] % cfg.steps)
  # `generate` without a prompt: one window over the whole sequence, `steps` steps at most.
  state = _decode(graphdef, params, x_BL, valid_BL, rng, cfg=cfg, P=0, schedule=schedule_SB1,
                  windows=(Window(0, L, L, cfg.steps),), mask_id=mask_id, eos_id=eos_id, eot_id=eot_id)
  return GenerateOutput(jnp.where(parked_BL, tokens_BL, state.x_BL), state.commit_step_BL, state.steps_B)


def infill(graphdef: nnx.GraphDef, params: Any, tokens_BL: jax.Array, valid_BL: jax.Array, *, mask_id: int,
           steps: int, temperature: float = 0.0, remasking: str = "low_confidence",
           rng: jax.Array | None = None, eos_id: int = 1, eot_id: int | None = None,
           suppress_eos_logit: bool = False, suppress_eos_confidence: bool = False) -> GenerateOutput:
  """Fills every valid position equal to `mask_id` (a hole) with the reverse process; nothing else changes.

  `generate` only appends masks after a prompt; holes may sit anywhere, e.g. before known text, which is
  what a bidirectional model can do and a left-to-right one cannot (the reversal curse). All holes of a
  row form one block: over `steps` steps, step i commits `transfer_schedule(num_holes, steps)[i]` holes,
  the most confident first (or as `remasking` says), never the mask token. With the holes exactly the
  suffix after a prompt this is `generate(..., block_length=gen_length)`, token for token. Rows with
  fewer holes than `steps` commit one per step and stop early (`steps_B`); `commit_step_BL` is -1 for
  every position that was not a hole.
  """
  _check_positive("steps", steps)
  if remasking not in REMASKING:
    _bad("remasking", f"one of {REMASKING}", remasking)
  if not temperature >= 0:
    _bad("temperature", ">= 0", temperature)
  if np.ndim(tokens_BL) != 2 or np.shape(valid_BL) != np.shape(tokens_BL):
    raise ValueError(f"infill needs tokens [B, L] and validity of the same shape; got "
                     f"{np.shape(tokens_BL)} and {np.shape(valid_BL)}")
  L = tokens_BL.shape[1]
  cfg = SamplingConfig(gen_length=L, steps=steps, block_length=L, temperature=temperature,
                       remasking=remasking, suppress_eos_logit=suppress_eos_logit,
                       suppress_eos_confidence=suppress_eos_confidence)
  rng = jax.random.key(0) if rng is None else rng
  return _infill(graphdef, params, jnp.asarray(tokens_BL), jnp.asarray(valid_BL), rng, cfg=cfg,
                 mask_id=mask_id, eos_id=eos_id, eot_id=eot_id)
