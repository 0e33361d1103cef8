"""On-policy RL with verifiable rewards: the diffu-GRPO driver (d1; REFERENCE §10) of the train loop.

The loop (train.py) calls `driver(state, host_batch)` once per step; for `diffusion.objective='grpo'` the
host batch holds prompts (llada_jax.data.tasks: G copies of each, left-padded to `train.seq_len -
grpo.gen_length`, and each row's record as JSON) and one step is:

  1. rollouts    the jitted reverse process samples one completion per row from the current policy
                 (LoRA: base + adapters merged inside the program), sharded over the batch like training;
  2. scoring     a second jitted program draws each inner iteration's one-pass mask and computes the old
                 policy's and the reference's per-token log-probabilities under it (llada_jax.grpo);
  3. rewards     meanwhile, on the host: each row's completion is decoded and scored by the reward
                 functions (llada_jax.rewards), summed; group advantages follow;
  4. update      the jitted train step runs `grpo.inner_iterations` optimizer updates on the batch.

Only the completions (to the host) and the advantages (back) cross between host and device; the device
runs step 2 while the host runs step 3. Keys: the rollouts and the masks come from `fold_in(key, step)`,
so a resumed run draws exactly what an uninterrupted one would. The reference (`TrainState.frozen`) is
replaced by the policy every `grpo.ref_sync_every` steps, at the start of the step.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax import grpo as grpo_lib, lora as lora_lib, model as model_lib, rewards as rewards_lib
from llada_jax import sampling, serving, sharding
from llada_jax.data import tasks, tokenizer as tokenizer_lib

_ROLLOUT_STREAM, _MASK_STREAM = 0x6E0, 0x6E1  # fold_in constants: rollouts and masks apart from the update's keys
_UPDATE_FIELDS = ("tokens", "valid", "completion_mask", "masked", "old_logp", "ref_logp")  # made on device


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in the order its host batch gave them."""
  if jax.process_count() == 1:
    return np.asarray(x)
  shards: dict[int, Any] = {}
  for shard in x.addressable_shards:
    shards.setdefault(shard.index[0].start or 0, shard.data)  # replicas of a row block count once
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


class GrpoDriver:
  """The loop's step for `grpo` (see the module docstring): `driver(state, host_prompts) -> (state,
  metrics)`, and `validate(state, eval_batches)`: greedy completions of held-out prompts, their mean
  rewards (`eval_reward`, `eval_reward/NAME`; with the built-in task's `correct`, the accuracy)."""

  def __init__(self, s: Any, data: Any):
    c, g = s.config, s.config.grpo
    self.s, self.config = s, c
    self.tok = data.tokenizer
    self.reward_fns = rewards_lib.resolve(g.rewards)
    self.stop_ids = tuple(sorted(tokenizer_lib.stop_ids(self.tok)))
    eot_id = self.tok.piece_to_id(tokenizer_lib.EOT)
    C, mu, mask_id = g.gen_length, g.inner_iterations, c.diffusion.mask_token_id
    lora, graphdef, mesh = c.lora, s.graphdef, s.mesh
    self.rows = {n: sharding.batch_sharding(c.mesh, mesh, n) for n in (1, 2)}
    repl, sh = sharding.replicated(mesh), s.state_shardings

    def rollout(params, base, prompt_BW, valid_BW, rng, *, cfg):
      weights = lora_lib.merge(base, params, lora) if lora.enabled else params
      return sampling.reverse_process(graphdef, weights, prompt_BW, valid_BW, rng, cfg=cfg, mask_id=mask_id,
                                      eos_id=self.tok.eos_id, eot_id=eot_id).tokens_BL

    def score_fn(weights, base):
      # `weights`: the parameters, or under LoRA the adapters over `base`. Left-padded rows: no cuDNN key
      # lengths; no adapter dropout when scoring.
      if lora.enabled:
        return model_lib.score_fn(c.model, graphdef, base, lora_lib.Adapters.of(weights, lora), right_padded=False)
      return model_lib.score_fn(c.model, graphdef, weights, right_padded=False)

    def prepare(params, frozen, base, tokens_BL, prompt_valid_BW, rng):
      B = tokens_BL.shape[0]
      valid_BL = jnp.concatenate([prompt_valid_BW.astype(bool), jnp.ones((B, C), bool)], axis=1)
      keys = jax.random.split(rng, mu)
      masked_IBL = jax.vmap(lambda k: grpo_lib.one_pass_mask(k, valid_BL=valid_BL, num_completion=C,
                                                             p_mask_prompt=g.p_mask_prompt))(keys)
      logps = lambda fn, m_BL: grpo_lib.token_logps(fn, tokens_BL=tokens_BL, valid_BL=valid_BL, masked_BL=m_BL,
                                                    mask_id=mask_id, num_completion=C)[0]
      policy = score_fn(params, base)
      old_IBC = jax.lax.map(functools.partial(logps, policy), masked_IBL)
      if g.beta:
        reference = score_fn(frozen, base)
        ref_IBC = jax.lax.map(functools.partial(logps, reference), masked_IBL)
      else:  # no KL term: no reference pass (the 'kl' metric then measures the drift from the rollout policy)
        ref_IBC = old_IBC
      inner_first = lambda x: jnp.moveaxis(x, 0, 1)
      return {"tokens": tokens_BL, "valid": valid_BL,
              "completion_mask": grpo_lib.completion_mask(tokens_BL[:, -C:], stop_ids=self.stop_ids),
              "masked": inner_first(masked_IBL), "old_logp": inner_first(old_IBC), "ref_logp": inner_first(ref_IBC)}

    def reward_metrics(rewards_BF, completion_mask_BC):
      total_PG = rewards_BF.sum(axis=1).reshape(-1, g.num_generations)
      std_P = total_PG.std(axis=1, ddof=1)
      out = {"reward": total_PG.mean(), "reward_std": std_P.mean(),
             "zero_std_groups": (std_P < 1e-6).mean(dtype=jnp.float32),
             "completion_length": completion_mask_BC.sum(axis=1).mean(dtype=jnp.float32)}
      out.update({f"reward/{name}": rewards_BF[:, i].mean() for i, (name, _) in enumerate(self.reward_fns)})
      return out

    state_in = (sh.params, sh.base, self.rows[2], self.rows[2], repl)
    with sharding.use_rules(c.mesh, mesh):
      self._rollout = jax.jit(functools.partial(rollout, cfg=sampling.SamplingConfig(**g.sampling())),
                              in_shardings=state_in, out_shardings=self.rows[2])
      self._greedy = jax.jit(functools.partial(rollout, cfg=sampling.SamplingConfig(**g.sampling(temperature=0.0))),
                             in_shardings=state_in, out_shardings=self.rows[2])
      self._prepare = jax.jit(prepare, in_shardings=(sh.params, sh.frozen, sh.base, self.rows[2], self.rows[2], repl),
                              out_shardings={k: s.batch_shardings[k] for k in _UPDATE_FIELDS})
      self._reward_metrics = jax.jit(reward_metrics, in_shardings=(self.rows[2], self.rows[2]), out_shardings=repl)

  def _global(self, x: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(self.rows[x.ndim], x)

  def _rewards(self, tokens: jax.Array, examples: np.ndarray) -> np.ndarray:
    """[local rows, functions]: each local row's completion decoded and scored (blocks until `tokens` exist)."""
    completions = local_rows(tokens)[:, -self.config.grpo.gen_length:]
    records = [json.loads(str(e)) for e in examples]
    texts = [sampling_text(self.tok, row, self.stop_ids) for row in completions]
    return rewards_lib.score(self.reward_fns, [tasks.question_of(r) for r in records], texts, records)

  def __call__(self, state: Any, host_batch: dict[str, np.ndarray]) -> tuple[Any, dict[str, Any]]:
    c, g, s = self.config, self.config.grpo, self.s
    step = int(state.step)
    if g.ref_sync_every and step and step % g.ref_sync_every == 0:
      state = s.with_reference(state)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
    with sharding.use_rules(c.mesh, s.mesh):
      t0 = time.perf_counter()
      prompt, valid = self._global(host_batch["prompt"]), self._global(host_batch["prompt_valid"])
      tokens = self._rollout(state.params, state.base, prompt, valid, jax.random.fold_in(key, _ROLLOUT_STREAM))
      # queued behind the rollouts: runs on the device while the host computes the rewards
      batch = self._prepare(state.params, state.frozen, state.base, tokens, valid,
                            jax.random.fold_in(key, _MASK_STREAM))
      jax.block_until_ready(tokens)
      t1 = time.perf_counter()
      rewards_BF = self._rewards(tokens, host_batch["example"])
      advantages_B = np.asarray(grpo_lib.group_advantages(jnp.asarray(rewards_BF.sum(axis=1)),
                                                          group_size=g.num_generations, scale=g.scale_rewards))
      t2 = time.perf_counter()
      batch["advantages"] = self._global(advantages_B.astype(np.float32))
      jax.block_until_ready(batch)
      t3 = time.perf_counter()
      state, metrics = s.step(state, batch)
      jax.block_until_ready(state.params)  # the next rollouts need these anyway; timed for the split
      t4 = time.perf_counter()
      metrics.update(self._reward_metrics(self._global(rewards_BF), batch["completion_mask"]))
    B, L = c.train.batch_size, c.train.seq_len
    metrics.update({"time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/logp_wait_s": t3 - t2,
                    "time/update_s": t4 - t3, "rollout_tokens_per_s": B * g.gen_length / max(t1 - t0, 1e-9),
                    "update_tokens_per_s": g.inner_iterations * B * L / max(t4 - t3, 1e-9)})
    return state, metrics

  def validate(self, state: Any, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Mean rewards of greedy completions of the held-out prompt batches (the reverse process of the
    rollouts at temperature 0): `eval_reward` (their sum) and `eval_reward/NAME` per function."""
    c, s = self.config, self.s
    rows = []
    with sharding.use_rules(c.mesh, s.mesh):
      for b in batches:
        tokens = self._greedy(state.params, state.base, self._global(b["prompt"]), self._global(b["prompt_valid"]),
                              jax.random.key(c.train.seed + 1))
        rows.append(self._rewards(tokens, b["example"]))
    local = np.concatenate(rows)
    per_fn = local.mean(axis=0) if jax.process_count() == 1 else _global_mean(local)
    out = {f"eval_reward/{name}": float(v) for (name, _), v in zip(self.reward_fns, per_fn)}
    out["eval_reward"] = float(sum(per_fn))
    return out


def _global_mean(local_NF: np.ndarray) -> np.ndarray:
  """Per-column means over every process's rows (equal row counts per process)."""
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(local_NF)).reshape(-1, local_NF.shape[-1]).mean(axis=0)


def sampling_text(tok: Any, ids: np.ndarray, stop_ids: tuple[int, ...]) -> str:
  """The text of a generated row up to its first stop id (what a reward function reads)."""
  return serving.decode_generated(tok, sampling.strip_at_stop(ids, set(stop_ids)))
