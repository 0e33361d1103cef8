"""diffu-GRPO: the pure pieces against hand-computed values, the step (inner iterations, old log-probs,
sharding), the driver (rollouts, rewards, a reward that can be learned), resume, and failing rewards."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import config as config_lib, diffusion, errors, grpo, objectives, rewards, sharding, train
from llada_jax.configs import default

# ---------------------------------------------------------------------------------------------------------
# Pure functions


def test_group_advantages_hand_values():
  r = jnp.asarray([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
  np.testing.assert_allclose(grpo.group_advantages(r, group_size=3), [2 / 3, -1 / 3, -1 / 3, 0, 0, 0], atol=1e-6)
  # scaled by the group's (unbiased) std + 1e-4: group 1 std = sqrt(1/3); group 2 std 0 -> stays 0
  std = math.sqrt(1 / 3)
  np.testing.assert_allclose(grpo.group_advantages(r, group_size=3, scale=True),
                             [(2 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4), 0, 0, 0],
                             rtol=1e-5)
  # groups are consecutive rows: the same rewards in pairs give other advantages
  np.testing.assert_allclose(grpo.group_advantages(r, group_size=2), [0.5, -0.5, -0.5, 0.5, 0, 0], atol=1e-6)


def test_completion_mask_keeps_up_to_the_first_stop():
  c = jnp.asarray([[5, 1, 1, 1], [5, 6, 7, 8], [8, 5, 1, 5], [1, 5, 5, 5]])
  np.testing.assert_array_equal(grpo.completion_mask(c, stop_ids=(1, 8)),
                                [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0]])


def test_one_pass_mask_masks_every_completion_position_and_prompt_tokens_at_rate_p():
  B, L, C, p = 512, 24, 6, 0.15
  valid = np.ones((B, L), bool)
  valid[:, :5] = False  # left padding
  m = np.asarray(grpo.one_pass_mask(jax.random.key(0), valid_BL=jnp.asarray(valid), num_completion=C,
                                    p_mask_prompt=p))
  assert m[:, L - C:].all()
  assert not m[:, :5].any()  # padding is never masked
  rate = m[:, 5:L - C].mean()
  n = B * (L - C - 5)
  assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n), rate
  assert not np.asarray(grpo.one_pass_mask(jax.random.key(0), valid_BL=jnp.asarray(valid), num_completion=C,
                                           p_mask_prompt=0.0))[:, :L - C].any()
  other = np.asarray(grpo.one_pass_mask(jax.random.key(1), valid_BL=jnp.asarray(valid), num_completion=C,
                                        p_mask_prompt=p))
  assert (other != m).any()  # another key, another prompt mask


def test_k3_kl_hand_values_and_zero_for_identical_models():
  np.testing.assert_allclose(grpo.k3_kl(logp=jnp.float32(-1.0), ref_logp=jnp.float32(-2.0)), math.exp(-1), rtol=1e-6)
  np.testing.assert_allclose(grpo.k3_kl(logp=jnp.float32(-2.0), ref_logp=jnp.float32(-1.0)), math.e - 2, rtol=1e-6)
  x = jax.random.normal(jax.random.key(0), (4, 7)) - 3.0
  assert float(jnp.abs(grpo.k3_kl(logp=x, ref_logp=x)).max()) == 0.0


def test_grpo_loss_clips_the_ratio_by_hand():
  # one row, three tokens (the third is past the stop: not counted); eps 0.2, beta 0.5
  logp = jnp.log(jnp.asarray([[1.5, 0.5, 9.0]])) + jnp.log(0.1)
  old = jnp.full((1, 3), jnp.log(0.1))
  ref = jnp.full((1, 3), jnp.log(0.1))
  mask = jnp.asarray([[True, True, False]])
  for adv, expected_terms, held in ((1.0, [-1.2, -0.5], [1, 0]), (-1.0, [1.5, 0.8], [0, 1])):
    out = grpo.grpo_loss(logp_BC=logp, old_logp_BC=old, ref_logp_BC=ref, advantages_B=jnp.asarray([adv]),
                         mask_BC=mask, clip_eps=0.2, beta=0.5)
    # ratios 1.5 and 0.5; k3 with ref - logp = -log(ratio): 1/r + log(r) - 1
    kl = [1 / 1.5 + math.log(1.5) - 1, 1 / 0.5 + math.log(0.5) - 1]
    np.testing.assert_allclose(out.loss, np.mean(np.asarray(expected_terms) + 0.5 * np.asarray(kl)), rtol=1e-5)
    np.testing.assert_allclose(out.kl, np.mean(kl), rtol=1e-5)
    np.testing.assert_allclose(out.clip_fraction, np.mean(held), rtol=1e-6)
    np.testing.assert_allclose(out.ratio, 1.0, rtol=1e-5)
  # the gradient through a held (clipped) token is zero; through an unclipped one it is -A * ratio / n
  grad = jax.grad(lambda lp: grpo.grpo_loss(logp_BC=lp, old_logp_BC=old, ref_logp_BC=old,
                                            advantages_B=jnp.asarray([1.0]), mask_BC=mask, clip_eps=0.2,
                                            beta=0.0).loss)(logp)
  np.testing.assert_allclose(grad, [[0.0, -0.5 * 0.5, 0.0]], atol=1e-6)


def test_grpo_objective_reads_completion_positions_only():
  """token_logps scores one pass over the masked rows; a fake score_fn shows which inputs it saw."""
  seen = {}

  def score_fn(inputs, valid, targets):
    seen["inputs"] = inputs
    nll = jnp.arange(inputs.size, dtype=jnp.float32).reshape(inputs.shape) / 100
    return diffusion.TokenScores(nll, inputs == targets)

  tokens = jnp.asarray([[0, 7, 8, 9, 5, 6]])
  masked = jnp.asarray([[False, True, False, False, True, True]])
  logp, _ = grpo.token_logps(score_fn, tokens_BL=tokens, valid_BL=jnp.ones((1, 6), bool), masked_BL=masked,
                             mask_id=4, num_completion=2)
  np.testing.assert_array_equal(seen["inputs"], [[0, 4, 8, 9, 4, 4]])
  np.testing.assert_allclose(logp, [[-0.04, -0.05]])


# ---------------------------------------------------------------------------------------------------------
# The step, the driver and the loop on the tiny model


def grpo_config(**overrides) -> config_lib.Config:
  """The tiny preset as a GRPO run on the built-in task: 2 prompts x G 4 per step, 8 generated tokens."""
  c = default.get_config("tiny")
  c.train.update(batch_size=8, seq_len=64, num_steps=4, log_every=1, checkpoint_every=2, num_samples=0,
                 eval_batches=1)
  c.grpo.update(num_generations=4, inner_iterations=2, gen_length=8, steps=8, block_length=8, temperature=1.0,
                ref_sync_every=0, rewards=("digits",))
  c = default.grpo(c)
  c.optim.update(peak_lr=3e-3, grad_clip_norm=1.0)
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return config_lib.from_config_dict(c)


@rewards.register("digits")
def digit_share(prompt, completion, example):
  """A reward a random model can learn quickly: the share of the completion's characters that are digits."""
  del prompt, example
  return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)


def _synthetic_batch(config: config_lib.Config, seed: int = 0) -> dict[str, np.ndarray]:
  """A scored-rollout batch with made-up old / reference log-probabilities (constants to the update)."""
  g, t = config.grpo, config.train
  rng = np.random.default_rng(seed)
  B, L, C, mu = t.batch_size, t.seq_len, g.gen_length, g.inner_iterations
  valid = np.ones((B, L), bool)
  valid[:, :L - C - 10] = False
  masked = np.zeros((B, mu, L), bool)
  masked[:, :, L - C:] = True
  masked[:, :, L - C - 10:L - C] = rng.random((B, mu, 10)) < 0.3
  return {"tokens": rng.integers(5, 200, (B, L)).astype(np.int32), "valid": valid,
          "completion_mask": np.arange(C)[None, :] < rng.integers(1, C + 1, (B, 1)),
          "advantages": rng.normal(size=B).astype(np.float32), "masked": masked,
          "old_logp": (-rng.random((B, mu, C)) * 6).astype(np.float32),
          "ref_logp": (-rng.random((B, mu, C)) * 6).astype(np.float32)}


def test_sharded_update_equals_single_device(devices):
  config = grpo_config()
  batch = _synthetic_batch(config)
  out = []
  for mesh in (jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=devices[:1],
                             axis_types=(jax.sharding.AxisType.Auto,) * 3), None):
    s = train.setup(config, mesh)
    state = s.init(train.root_key(config))
    with sharding.use_rules(config.mesh, s.mesh):
      state, m = s.step(state, train.global_batch(s, batch))
    out.append((jax.device_get(state.params), jax.device_get(m), s.mesh.size))
  (p1, m1, n1), (p8, m8, n8) = out
  assert (n1, n8) == (1, 8)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), p1, p8)
  for k in ("loss", "kl", "clip_fraction", "grad_norm"):
    np.testing.assert_allclose(m1[k], m8[k], rtol=1e-4, atol=1e-6)
  assert float(m1["clip_fraction"]) > 0  # made-up old log-probs: some ratios leave [1 - eps, 1 + eps]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A GRPO setup on the tiny model, its data, a fresh initial state (a function: the step donates its
  input) and the held-out batches. Learning rate 1e-2: with it the greedy held-out reward of
  test_a_tiny_run_learns_a_trivial_reward went 0 -> 1.0 within 8 steps for each of train.seed 0-5 (at
  3e-3 for 3 of 5), so that test does not hang on one random stream."""
  config = grpo_config(**{"optim.peak_lr": 1e-2})
  workdir = str(tmp_path_factory.mktemp("grpo_driver"))
  data = objectives.training_data(config, workdir)
  s = train.setup(config)
  return config, s, data, lambda: s.init(train.root_key(config)), objectives.eval_batches(config, data.tokenizer)


def test_driver_rollouts_are_scored_and_old_logps_stay_fixed_across_inner_iterations(run):
  config, s, data, fresh, _ = run
  state = fresh()
  driver = train.driver(s, data)
  host = next(data.iterator)
  g, t = config.grpo, config.train
  W = t.seq_len - g.gen_length
  with sharding.use_rules(config.mesh, s.mesh):
    key = jax.random.key(3)
    tokens = driver._rollout(state.params, state.base, driver._global(host["prompt"]),
                             driver._global(host["prompt_valid"]), key)
    batch = jax.device_get(driver._prepare(state.params, state.frozen, state.base, tokens,
                                           driver._global(host["prompt_valid"]), key))
  tokens = np.asarray(tokens)
  np.testing.assert_array_equal(tokens[:, :W], host["prompt"])  # the prompt is kept, completions generated
  assert (tokens[:, W:] != config.diffusion.mask_token_id).all()
  # every completion position masked in every inner iteration; prompt masks differ between iterations
  assert batch["masked"][:, :, W:].all()
  assert not batch["masked"][:, :, :W][~np.repeat(host["prompt_valid"][:, None], g.inner_iterations, 1)].any()
  assert (batch["masked"][:, 0, :W] != batch["masked"][:, 1, :W]).any()
  # the reference is the starting policy: its log-probs equal the old policy's exactly
  np.testing.assert_array_equal(batch["old_logp"], batch["ref_logp"])
  assert (batch["old_logp"] < 0).all()
  # the step: update 1 starts at the old policy (ratio 1), update 2 reads the same old log-probs after one
  # optimizer update, so its ratio moves; recomputing them per update would keep the ratio at 1
  full = {**batch, "advantages": np.linspace(-1, 1, t.batch_size, dtype=np.float32)}
  assert g.inner_iterations == 2
  for mu, moved in ((1, False), (2, True)):
    c = dataclasses.replace(config, grpo=dataclasses.replace(config.grpo, inner_iterations=mu))
    sm = s if mu == 2 else train.setup(c)  # the fixture's setup is the mu = 2 one: no second compile
    b = {k: (v[:, :mu] if objectives.of(c).batch[k].inner else v) for k, v in full.items()}
    with sharding.use_rules(c.mesh, sm.mesh):
      _, m = sm.step(sm.init(train.root_key(c)), train.global_batch(sm, b))
    assert (abs(float(m["ratio"]) - 1.0) > 1e-4) == moved, (mu, float(m["ratio"]))
    assert float(m["kl"]) >= 0


def test_a_tiny_run_learns_a_trivial_reward(run):
  config, s, data, fresh, eval_batches = run
  state = fresh()
  driver = train.driver(s, data)
  before = driver.validate(state, eval_batches)
  history = []
  for _ in range(8):
    state, m = driver(state, next(data.iterator))
    history.append(jax.device_get(m))
  after = driver.validate(state, eval_batches)
  rewards_seen = [float(m["reward"]) for m in history]
  assert after["eval_reward"] > before["eval_reward"] + 0.2, (before, after, rewards_seen)
  assert np.mean(rewards_seen[-3:]) > np.mean(rewards_seen[:3]), rewards_seen
  for k in ("reward/digits", "reward_std", "completion_length", "kl", "clip_fraction", "rollout_tokens_per_s",
            "update_tokens_per_s", "time/rollout_s", "time/update_s"):
    assert np.isfinite(float(history[-1][k])), k
  assert 1 <= float(history[-1]["completion_length"]) <= config.grpo.gen_length


def test_resume_is_bit_identical(tmp_path):
  config = grpo_config(**{"grpo.ref_sync_every": 2})
  whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
  first = train.train_and_evaluate(config, str(tmp_path / "split"), stop_at=2)
  assert first["step"] == 2 and not first["finished"]
  second = train.train_and_evaluate(config, str(tmp_path / "split"))
  assert second["finished"]
  for a, b in ((whole["state"].params, second["state"].params), (whole["state"].frozen, second["state"].frozen),
               (whole["state"].opt_state, second["state"].opt_state)):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
  # the reference was synced at step 2: it is the policy of step 2, not the start
  assert any((np.asarray(x) != np.asarray(y)).any()
             for x, y in zip(jax.tree.leaves(first["state"].frozen), jax.tree.leaves(second["state"].frozen)))


@rewards.register("raises_on_long")
def _raises(prompt, completion, example):
  raise ZeroDivisionError("the test's reward divides by zero")


@rewards.register("nan_reward")
def _nan(prompt, completion, example):
  return float("nan")


@pytest.mark.parametrize("name, what", [("raises_on_long", "ZeroDivisionError"), ("nan_reward", "nan")])
def test_a_failing_reward_stops_the_step_naming_it(run, name, what):
  config, s, data, fresh, _ = run
  state = fresh()
  c = dataclasses.replace(config, grpo=dataclasses.replace(config.grpo, rewards=("digits", name)))
  driver = train.driver(dataclasses.replace(s, config=c), data)
  with pytest.raises(errors.RewardFailed) as e:
    driver(state, next(data.iterator))
  message = str(e.value)
  assert "\n" not in message and f"'{name}'" in message and what in message, message


@pytest.mark.parametrize("overrides, field", [
    ({"grpo.num_generations": 1}, "grpo.num_generations"),
    ({"grpo.clip_eps": 0.0}, "grpo.clip_eps"),
    ({"grpo.p_mask_prompt": 1.5}, "grpo.p_mask_prompt"),
    ({"grpo.rewards": ()}, "grpo.rewards"),
    ({"grpo.kv_cache": "paged"}, "grpo.kv_cache"),
    ({"grpo.block_length": 3}, "grpo.block_length"),
    ({"train.batch_size": 6}, "train.batch_size"),
    ({"train.seq_len": 8}, "train.seq_len"),
    ({"optim.warmup_steps": 9}, "optim.warmup_steps"),
])
def test_bad_grpo_config_names_the_field(overrides, field):
  with pytest.raises(ValueError, match=f"config field '{field}'"):
    grpo_config(**overrides)
  # warmup counts optimizer updates: 4 steps x 2 inner iterations leave room for 8
  assert grpo_config(**{"optim.warmup_steps": 8}).optim.warmup_steps == 8


def test_lora_grpo_keeps_the_base_and_a_frozen_copy_of_the_starting_adapters(tmp_path, pretrained_workdir):
  """Under LoRA the rollouts sample the merged policy, the reference is the base with the adapters as they
  started (identical to the base: B = 0), and only the adapters train."""
  config = grpo_config(**{"lora.rank": 4, "train.init_from": pretrained_workdir, "train.num_steps": 2,
                          "train.checkpoint_every": 2, "grpo.rewards": ("digits", "format")})
  out = train.train_and_evaluate(config, str(tmp_path / "lora_grpo"))
  state, s = out["state"], out["setup"]
  assert out["finished"] and set(state.params) == {"blocks"}
  start = s.init(train.root_key(config)).params  # the adapters a fresh run starts from
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state.frozen, start)
  assert any((np.asarray(a) != np.asarray(b)).any()
             for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(start)))
  base, _ = train.load_base(config, s)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state.base, base)
  # the reference scores exactly as the base does: old (start) == reference log-probs for a fresh state
  data = objectives.training_data(config, str(tmp_path / "lora_grpo"))
  driver = train.driver(s, data)
  fresh = s.with_reference(s.attach_base(s.init(train.root_key(config)), base, fresh=True))
  host = next(data.iterator)
  with sharding.use_rules(config.mesh, s.mesh):
    key = jax.random.key(0)
    valid = driver._global(host["prompt_valid"])
    tokens = driver._rollout(fresh.params, fresh.base, driver._global(host["prompt"]), valid, key)
    batch = jax.device_get(driver._prepare(fresh.params, fresh.frozen, fresh.base, tokens, valid, key))
  np.testing.assert_array_equal(batch["old_logp"], batch["ref_logp"])
