"""The autoregressive baseline's sampler: a causal model (`model.causal=True`) decoded left to right.

Kept apart from `sampling` (the reverse process of the diffusion model): one token per step at a moving
position is not a commit inside a window of masked positions, so it shares only the output type, the
option checks and the Gumbel-max draw with the diffusion samplers, never their decode loop.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax import model as model_lib
# Shared with the diffusion sampler, so both validate and draw (temperature) identically.
from llada_jax.sampling import (GenerateOutput, _bad, _check_fits, _check_positive, _gumbel_argmax,
                                row_keys)


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
  rng_B = row_keys(rng, B)

  def step(carry):
    i, x_BL, done_B, steps_B = carry
    logits_BLV = model_lib.apply(graphdef, params, x_BL, valid_BL)
    logits_BV = jax.lax.dynamic_index_in_dim(logits_BLV, P - 1 + i, axis=1, keepdims=False)
    if banned:
      logits_BV = logits_BV.at[:, jnp.asarray(banned)].set(-jnp.inf)
    keys_B = jax.vmap(lambda k: jax.random.fold_in(k, i))(rng_B)  # a row draws from its own key only
    uniform = lambda dtype, minval: jax.vmap(
        lambda k: jax.random.uniform(k, logits_BV.shape[1:], dtype, minval=minval))(keys_B)
    next_B = _gumbel_argmax(logits_BV, temperature, uniform)
    next_B = next_B.astype(x_BL.dtype)
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

  Same inputs and output type as `sampling.generate`: left-padded prompts (positions are absolute, as
  there; RoPE is relative and padding is never attended to, so padding does not change a continuation),
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
