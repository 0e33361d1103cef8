"""The reverse process: start from a fully masked answer and unmask it over `steps` steps.

This is the core of the official `generate` (REFERENCE §4) for temperature 0 with low-confidence
remasking and semi-autoregressive blocks: each step predicts every masked position, then commits the
`k` most confident predictions of the current block, where `k` follows the official per-block transfer
schedule. The whole loop is one `lax.fori_loop` inside one jitted program.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax import model as model_lib


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


@functools.partial(jax.jit, static_argnames=("graphdef", "gen_length", "steps", "block_length", "mask_id"))
def generate(graphdef: nnx.GraphDef, params: Any, prompt_BP: jax.Array, prompt_valid_BP: jax.Array, *,
             gen_length: int, steps: int, block_length: int, mask_id: int) -> jax.Array:
  """Greedy low-confidence-remasking generation; returns [B, P + gen_length] tokens."""
  if gen_length % block_length or steps % (gen_length // block_length):
    raise ValueError("gen_length must be a multiple of block_length, and steps a multiple of "
                     f"gen_length // block_length; got {gen_length=}, {block_length=}, {steps=}")
  B, P = prompt_BP.shape
  steps_per_block = steps // (gen_length // block_length)
  x_BL = jnp.concatenate([prompt_BP, jnp.full((B, gen_length), mask_id, prompt_BP.dtype)], axis=1)
  valid_BL = jnp.concatenate([prompt_valid_BP.astype(bool), jnp.ones((B, gen_length), bool)], axis=1)
  schedule = jnp.asarray(transfer_schedule(block_length, steps_per_block))
  positions_L = jnp.arange(P + gen_length)

  def step(i, x_BL):
    block = i // steps_per_block
    k = schedule[i % steps_per_block]
    logits_BLV = model_lib.apply(graphdef, params, x_BL, valid_BL)
    probs_BLV = jax.nn.softmax(logits_BLV, axis=-1)
    x0_BL = jnp.argmax(logits_BLV, axis=-1).astype(x_BL.dtype)
    conf_BL = jnp.take_along_axis(probs_BLV, x0_BL[..., None], axis=-1)[..., 0]
    in_block_L = positions_L < P + (block + 1) * block_length
    candidate_BL = (x_BL == mask_id) & in_block_L[None, :]
    conf_BL = jnp.where(candidate_BL, conf_BL, -jnp.inf)
    rank_BL = jnp.argsort(jnp.argsort(-conf_BL, axis=-1), axis=-1)  # 0 = most confident
    commit_BL = candidate_BL & (rank_BL < k)
    return jnp.where(commit_BL, x0_BL, x_BL)

  return jax.lax.fori_loop(0, steps, step, x_BL)


def strip_at_stop(ids: Sequence[int], stop_ids: set[int]) -> list[int]:
  """The ids before the first stop id (EOS, or end-of-turn for chat models)."""
  ids = [int(i) for i in ids]
  return ids[: next((k for k, i in enumerate(ids) if i in stop_ids), len(ids))]
