"""The reverse process: start from a fully masked answer and unmask it step by step (REFERENCE §4, §8).

`generate` follows the official LLaDA sampler: `gen_length` masked positions after the prompt, split
into `gen_length / block_length` semi-autoregressive blocks (one block = pure diffusion); each block gets
`steps / num_blocks` steps and commits, at step i, the official transfer count of its masked positions,
chosen by the remasking rule among the current block's masked positions. Options: temperature
(Gumbel-max), classifier-free guidance, EOS-logit and EOS/EOT-confidence suppression, Fast-dLLM's
confidence-threshold parallel decoding, Fast-dLLM's block-wise approximate KV cache (prefix or dual),
and early exit once a row's remaining positions can only be EOS. With every option at its default the
output is the official algorithm's.

`infill` runs the same reverse process over holes anywhere in a sequence (masks *before* known text:
the reversal experiment), and `generate_causal` samples the autoregressive baseline left to right.

The whole loop is one `lax.while_loop` in one jitted program, compiled once per (shapes, options).

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

from llada_jax import model as model_lib

REMASKING = ("low_confidence", "random", "margin", "entropy")
KV_CACHES = ("none", "prefix", "dual")
_SUPPRESSED = -1e30  # finite stand-in for a suppressed candidate's confidence


def _bad(name: str, allowed: str, value: Any) -> None:
  raise ValueError(f"sampling option '{name}' must be {allowed}; got {value!r}")


def _check_positive(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    _bad(name, "a positive integer", value)


def _check_fits(prompt_width: int, gen_length: int, max_seq_len: int) -> None:
  """The prompt (its padded width) and the generated positions must fit in the model's sequence."""
  if gen_length >= max_seq_len:
    _bad("gen_length", f"less than model.max_seq_len={max_seq_len} (the prompt needs room too)", gen_length)
  if prompt_width + gen_length > max_seq_len:
    lower = f", or lower gen_length to at most {max_seq_len - prompt_width}" if prompt_width < max_seq_len else ""
    raise ValueError(f"the prompt is {prompt_width} tokens long and gen_length={gen_length}: together more "
                     f"than model.max_seq_len={max_seq_len}; shorten the prompt to at most "
                     f"{max_seq_len - gen_length} tokens{lower}")


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
    if self.remasking not in REMASKING:
      bad("remasking", f"one of {REMASKING}", self.remasking)
    if not self.temperature >= 0:
      bad("temperature", ">= 0", self.temperature)
    if not self.cfg_scale >= 0:
      bad("cfg_scale", ">= 0", self.cfg_scale)
    if self.threshold is not None and not 0 < self.threshold <= 1:
      bad("threshold", "in (0, 1] (or None to disable)", self.threshold)
    if prompt_length < 1:
      bad("prompt", "at least one token long", prompt_length)
    width = prompt_length if padded_length is None else padded_length
    _check_fits(width, self.gen_length, max_seq_len)
    if self.kv_cache not in KV_CACHES:
      bad("kv_cache", f"one of {KV_CACHES}", self.kv_cache)


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


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to a common length; returns tokens [B, Lp] and validity [B, Lp]."""
  width = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  valid = np.zeros((len(prompts), width), bool)
  for i, p in enumerate(prompts):
    if len(p):
      tokens[i, width - len(p):] = p
      valid[i, width - len(p):] = True
  return tokens, valid


def _gumbel_argmax(logits_BLV: jax.Array, rng: jax.Array, temperature: float) -> jax.Array:
  if temperature == 0:
    return jnp.argmax(logits_BLV, axis=-1)
  if jax.config.jax_enable_x64:  # the release's float64 formula, exactly
    u = jax.random.uniform(rng, logits_BLV.shape, jnp.float64)
    return jnp.argmax(jnp.exp(logits_BLV.astype(jnp.float64)) / (-jnp.log(u)) ** temperature, axis=-1)
  u = jax.random.uniform(rng, logits_BLV.shape, jnp.float32, minval=jnp.finfo(jnp.float32).tiny)
  return jnp.argmax(logits_BLV - temperature * jnp.log(-jnp.log(u)), axis=-1)


def _confidence(probs_BLV: jax.Array, x0_BL: jax.Array, rule: str, rng: jax.Array) -> jax.Array:
  """Higher = commit sooner."""
  if rule == "random":
    return jax.random.uniform(rng, x0_BL.shape, jnp.float32)
  if rule == "margin":
    top2 = jax.lax.top_k(probs_BLV, 2)[0]
    return top2[..., 0] - top2[..., 1]
  if rule == "entropy":
    return jnp.sum(probs_BLV * jnp.log(jnp.maximum(probs_BLV, 1e-30)), axis=-1)  # = -entropy
  return jnp.take_along_axis(probs_BLV, x0_BL[..., None], axis=-1)[..., 0]


def _decide(cfg: SamplingConfig, logits_BWV, x_BW, pos_W, *, P: int, L: int, i, rng, mask_id: int,
            eos_id: int, eot_id: int | None, schedule, steps_per_block: int):
  """One step inside a window of positions: which masked positions to commit, and to what."""
  masked_BW = x_BW == mask_id
  rng_noise, rng_conf = jax.random.split(jax.random.fold_in(rng, i))
  if cfg.suppress_eos_logit:
    logits_BWV = logits_BWV.at[..., eos_id].set(-jnp.inf)
  # The mask token is never a prediction (a trained model does not produce it; committing it would
  # leave the position masked). Excluded from the argmax only, so confidences are the release's.
  x0_BW = _gumbel_argmax(logits_BWV.at[..., mask_id].set(-jnp.inf), rng_noise, cfg.temperature)
  x0_BW = x0_BW.astype(x_BW.dtype)
  probs_BWV = jax.nn.softmax(logits_BWV, axis=-1)
  conf_BW = _confidence(probs_BWV, x0_BW, cfg.remasking, rng_conf)
  if cfg.suppress_eos_confidence:
    stop_BW = x0_BW == eos_id
    if eot_id is not None:
      stop_BW |= x0_BW == eot_id
    conf_BW = jnp.where(stop_BW, -jnp.inf, conf_BW)
  # The current block of each row: the block of its first masked position.
  first_masked_B = jnp.min(jnp.where(masked_BW, pos_W, L), axis=1)
  block_end_B = P + ((first_masked_B - P) // cfg.block_length + 1) * cfg.block_length
  candidate_BW = masked_BW & (pos_W[None, :] < block_end_B[:, None])
  # Candidates whose confidence was suppressed (-inf) still rank above every non-candidate, so each
  # step commits its full quota and no mask survives the last step (they simply come last).
  conf_BW = jnp.where(candidate_BW, jnp.maximum(conf_BW, _SUPPRESSED), -jnp.inf)
  rank_BW = jnp.argsort(jnp.argsort(-conf_BW, axis=-1, stable=True), axis=-1, stable=True)
  if cfg.threshold is None:
    commit_BW = candidate_BW & (rank_BW < schedule[i % steps_per_block])
  else:
    p0_BW = jnp.take_along_axis(probs_BWV, x0_BW[..., None].astype(jnp.int32), axis=-1)[..., 0]
    commit_BW = candidate_BW & ((p0_BW >= cfg.threshold) | (rank_BW == 0))
  return commit_BW, x0_BW


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "mask_id", "eos_id", "eot_id"))
def _generate(graphdef, params, prompt_BP, prompt_valid_BP, rng, *, cfg: SamplingConfig, mask_id: int,
              eos_id: int, eot_id: int | None) -> GenerateOutput:
  B, P = prompt_BP.shape
  G, L = cfg.gen_length, prompt_BP.shape[1] + cfg.gen_length
  num_blocks = G // cfg.block_length
  steps_per_block = cfg.steps // num_blocks
  positions_L = jnp.arange(L)
  is_prompt_L = positions_L < P
  x_BL = jnp.concatenate([prompt_BP, jnp.full((B, G), mask_id, prompt_BP.dtype)], axis=1)
  valid_BL = jnp.concatenate([prompt_valid_BP.astype(bool), jnp.ones((B, G), bool)], axis=1)
  decide = functools.partial(_decide, cfg, P=P, L=L, rng=rng, mask_id=mask_id, eos_id=eos_id, eot_id=eot_id,
                             schedule=jnp.asarray(transfer_schedule(cfg.block_length, steps_per_block)),
                             steps_per_block=steps_per_block)
  guided = cfg.cfg_scale > 0
  valid_in = jnp.concatenate([valid_BL, valid_BL]) if guided else valid_BL

  def model_logits(x_BL, **cache_args):
    """Logits for x_BL (a window of the sequence when a cache is given), with CFG when asked."""
    if guided:
      uncond_BL = jnp.where(is_prompt_L[None, :], mask_id, x_BL) if not cache_args else x_BL
      out = model_lib.apply(graphdef, params, jnp.concatenate([x_BL, uncond_BL]), valid_in, **cache_args)
    else:
      out = model_lib.apply(graphdef, params, x_BL, valid_in, **cache_args)
    logits, cache = out if cache_args.get("return_cache") else (out, None)
    if guided:
      logits = logits[B:] + (cfg.cfg_scale + 1) * (logits[:B] - logits[B:])
    return logits, cache

  def active(x_BL):
    return jnp.any(x_BL == mask_id, axis=1)

  def apply_step(i, x_BL, commit_step_BL, steps_B, logits_BWV, start, width):
    """Commits one step's choices inside [start, start + width), then the early-exit fill."""
    x_BW = jax.lax.dynamic_slice_in_dim(x_BL, start, width, axis=1)
    pos_W = start + jnp.arange(width)
    commit_BW, x0_BW = decide(logits_BWV, x_BW, pos_W, i=i)
    row_active_B = active(x_BL)
    commit_BW &= row_active_B[:, None]
    x_BL = jax.lax.dynamic_update_slice_in_dim(x_BL, jnp.where(commit_BW, x0_BW, x_BW), start, axis=1)
    step_BW = jax.lax.dynamic_slice_in_dim(commit_step_BL, start, width, axis=1)
    commit_step_BL = jax.lax.dynamic_update_slice_in_dim(commit_step_BL, jnp.where(commit_BW, i, step_BW),
                                                         start, axis=1)
    if cfg.early_exit:
      # A row whose every remaining masked position lies after a committed EOS can only produce EOS.
      eos_pos_B = jnp.min(jnp.where((x_BL == eos_id) & ~is_prompt_L[None, :], positions_L, L), axis=1)
      still_BL = x_BL == mask_id
      first_still_B = jnp.min(jnp.where(still_BL, positions_L, L), axis=1)
      fill_BL = still_BL & (eos_pos_B < first_still_B)[:, None]
      x_BL = jnp.where(fill_BL, eos_id, x_BL)
      commit_step_BL = jnp.where(fill_BL, i, commit_step_BL)
    return i + 1, x_BL, commit_step_BL, steps_B + row_active_B.astype(jnp.int32)

  carry = (0, x_BL, jnp.full((B, L), -1, jnp.int32), jnp.zeros((B,), jnp.int32))
  if cfg.kv_cache == "none":
    max_steps = G if cfg.threshold is not None else cfg.steps

    def step(carry):
      return apply_step(*carry, model_logits(carry[1])[0], 0, L)

    carry = jax.lax.while_loop(lambda c: (c[0] < max_steps) & jnp.any(active(c[1])), step, carry)
  else:
    # Fast-dLLM block-wise approximate KV cache: a full pass at each block start refreshes every
    # layer's keys/values and decodes the block's first step; later steps recompute only a window
    # (prefix cache: the block and everything after it; dual cache: the block alone) against it.
    per_block = cfg.block_length if cfg.threshold is not None else steps_per_block
    for b in range(num_blocks):  # unrolled at trace time: each block's window has a static width
      start = P + b * cfg.block_length
      width = cfg.block_length if cfg.kv_cache == "dual" else L - start
      logits_BLV, cache = model_logits(carry[1], return_cache=True)
      block_first = carry[0]
      carry = apply_step(*carry, jax.lax.dynamic_slice_in_dim(logits_BLV, start, width, axis=1), start, width)

      def cached_step(carry, start=start, width=width, cache=cache):
        x_BW = jax.lax.dynamic_slice_in_dim(carry[1], start, width, axis=1)
        logits_BWV, _ = model_logits(x_BW, cache=cache, offset=start)
        return apply_step(*carry, logits_BWV, start, width)

      def block_open(c, start=start, block_first=block_first):
        block_masked = jax.lax.dynamic_slice_in_dim(c[1], start, cfg.block_length, axis=1) == mask_id
        return (c[0] - block_first < per_block) & jnp.any(block_masked & active(c[1])[:, None])

      carry = jax.lax.while_loop(block_open, cached_step, carry)
  _, x_BL, commit_step_BL, steps_B = carry
  return GenerateOutput(x_BL, commit_step_BL, steps_B)


def generate(graphdef: nnx.GraphDef, params: Any, prompt_BP: jax.Array, prompt_valid_BP: jax.Array, *,
             mask_id: int, eos_id: int = 1, eot_id: int | None = None, rng: jax.Array | None = None,
             config: SamplingConfig | None = None, max_seq_len: int | None = None,
             **options: Any) -> GenerateOutput:
  """Runs the reverse process for a left-padded batch of prompts.

  Options are a `SamplingConfig` or its fields as keywords, e.g.
  `generate(gd, params, tokens, valid, mask_id=4, gen_length=32, steps=32, block_length=8)`.
  Invalid options raise ValueError before compilation.
  """
  cfg = dataclasses.replace(config or SamplingConfig(), **options)
  prompt_length = int(np.asarray(prompt_valid_BP).sum(axis=1).min()) if prompt_BP.shape[1] else 0
  width = prompt_BP.shape[1]
  cfg.validate(prompt_length, max_seq_len if max_seq_len is not None else width + cfg.gen_length, width)
  rng = jax.random.key(0) if rng is None else rng
  return _generate(graphdef, params, jnp.asarray(prompt_BP), jnp.asarray(prompt_valid_BP), rng, cfg=cfg,
                   mask_id=mask_id, eos_id=eos_id, eot_id=eot_id)


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
  pos_L = jnp.arange(L)
  decide = functools.partial(_decide, cfg, P=0, L=L, rng=rng, mask_id=mask_id, eos_id=eos_id,
                             eot_id=eot_id, schedule=schedule_SB1, steps_per_block=cfg.steps)

  def step(carry):
    i, x_BL, commit_step_BL, steps_B = carry
    commit_BL, x0_BL = decide(model_lib.apply(graphdef, params, x_BL, valid_BL), x_BL, pos_L, i=i)
    active_B = jnp.any(x_BL == mask_id, axis=1)
    commit_BL &= active_B[:, None]
    return (i + 1, jnp.where(commit_BL, x0_BL, x_BL), jnp.where(commit_BL, i, commit_step_BL),
            steps_B + active_B.astype(jnp.int32))

  carry = (0, x_BL, jnp.full((B, L), -1, jnp.int32), jnp.zeros((B,), jnp.int32))
  carry = jax.lax.while_loop(lambda c: (c[0] < cfg.steps) & jnp.any(c[1] == mask_id), step, carry)
  _, x_BL, commit_step_BL, steps_B = carry
  return GenerateOutput(jnp.where(parked_BL, tokens_BL, x_BL), commit_step_BL, steps_B)


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


# --- The autoregressive baseline: left to right ---------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "gen_length", "temperature", "mask_id", "eos_id",
                                             "eot_id", "suppress_eos_logit"))
def _generate_causal(graphdef, params, prompt_BP, prompt_valid_BP, rng, *, gen_length: int,
                     temperature: float, mask_id: int | None, eos_id: int, eot_id: int | None,
                     suppress_eos_logit: bool) -> GenerateOutput:
  B, P = prompt_BP.shape
  L = P + gen_length
  # Positions not generated yet hold EOS; the causal mask hides them from every earlier position, so a
  # full forward pass per token (O(L^2) per sequence, no KV cache) gives exactly the prefix's logits.
  x_BL = jnp.concatenate([prompt_BP, jnp.full((B, gen_length), eos_id, prompt_BP.dtype)], axis=1)
  valid_BL = jnp.concatenate([prompt_valid_BP.astype(bool), jnp.ones((B, gen_length), bool)], axis=1)
  banned = ([mask_id] if mask_id is not None else []) + ([eos_id] if suppress_eos_logit else [])
  stop_ids = jnp.asarray([eos_id] + ([eot_id] if eot_id is not None else []), prompt_BP.dtype)

  def step(carry):
    i, x_BL, done_B, steps_B = carry
    logits_BLV = model_lib.apply(graphdef, params, x_BL, valid_BL)
    logits_BV = jax.lax.dynamic_index_in_dim(logits_BLV, P - 1 + i, axis=1, keepdims=False)
    if banned:
      logits_BV = logits_BV.at[:, jnp.asarray(banned)].set(-jnp.inf)
    next_B = _gumbel_argmax(logits_BV, jax.random.fold_in(rng, i), temperature).astype(x_BL.dtype)
    next_B = jnp.where(done_B, eos_id, next_B)  # a finished row keeps its static shape, padded with EOS
    x_BL = jax.lax.dynamic_update_index_in_dim(x_BL, next_B, P + i, axis=1)
    steps_B = steps_B + (~done_B).astype(jnp.int32)
    return i + 1, x_BL, done_B | jnp.isin(next_B, stop_ids), steps_B

  carry = (0, x_BL, jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32))
  _, x_BL, _, steps_B = jax.lax.while_loop(lambda c: (c[0] < gen_length) & ~jnp.all(c[2]), step, carry)
  pos_L = jnp.arange(L)
  commit_step_BL = jnp.broadcast_to(jnp.where(pos_L >= P, pos_L - P, -1), (B, L)).astype(jnp.int32)
  return GenerateOutput(x_BL, commit_step_BL, steps_B)


def generate_causal(graphdef: nnx.GraphDef, params: Any, prompt_BP: jax.Array, prompt_valid_BP: jax.Array, *,
                    gen_length: int, eos_id: int, temperature: float = 0.0, eot_id: int | None = None,
                    mask_id: int | None = None, suppress_eos_logit: bool = False,
                    rng: jax.Array | None = None, max_seq_len: int | None = None) -> GenerateOutput:
  """Samples a causal model (`model.causal=True`, the AR baseline) left to right, one token per step.

  Same inputs and output type as `generate`: left-padded prompts (positions are absolute, as there;
  RoPE is relative and padding is never attended to, so padding does not change a continuation),
  temperature 0 = greedy, > 0 = Gumbel-max sampling. The mask token is never emitted. A row stops at
  EOS (or `eot_id`), included, and is padded with EOS to `gen_length` while the others go on; with
  `suppress_eos_logit` no row stops. `commit_step_BL` is each generated token's index (-1 for the
  prompt), `steps_B` the tokens each row generated.
  """
  _check_positive("gen_length", gen_length)
  if not temperature >= 0:
    _bad("temperature", ">= 0", temperature)
  B, P = np.shape(prompt_BP)
  prompt_length = int(np.asarray(prompt_valid_BP).sum(axis=1).min()) if P else 0
  if prompt_length < 1:
    _bad("prompt", "at least one token long (the first token is predicted from the last prompt token)",
         prompt_length)
  if max_seq_len is not None:
    _check_fits(P, gen_length, max_seq_len)
  rng = jax.random.key(0) if rng is None else rng
  return _generate_causal(graphdef, params, jnp.asarray(prompt_BP), jnp.asarray(prompt_valid_BP), rng,
                          gen_length=gen_length, temperature=float(temperature), mask_id=mask_id,
                          eos_id=eos_id, eot_id=eot_id, suppress_eos_logit=suppress_eos_logit)
