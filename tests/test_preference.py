"""Preference optimisation (REFERENCE §9): the DPO loss, the ELBO draws and estimates, VRPO's antithetic
sharing, exact DPO for the causal baseline, and the `vrpo` objective trained through train.setup
(reference frozen, sharded == single device, stop/resume, a tiny run that raises the held-out margin)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import command_env, tiny_config
from llada_jax import checkpoint as ckpt_lib, config as config_lib, diffusion, objectives, plan, sharding, train
from llada_jax.configs import default

M = 3  # mask id of the hand-made examples


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def test_dpo_loss_hand_computed():
  out = diffusion.dpo_loss(policy_chosen_B=jnp.array([-3.0, -5.0]), policy_rejected_B=jnp.array([-6.0, -4.0]),
                           reference_chosen_B=jnp.array([-4.0, -5.0]), reference_rejected_B=jnp.array([-5.0, -6.0]),
                           beta=0.5)
  # pair 0: chosen +1, rejected -1 -> margin 0.5 * 2 = 1; pair 1: chosen 0, rejected +2 -> margin -1
  np.testing.assert_allclose(out.reward_chosen_B, [0.5, 0.0])
  np.testing.assert_allclose(out.reward_rejected_B, [-0.5, 1.0])
  np.testing.assert_allclose(out.margin_B, [1.0, -1.0])
  want = (-math.log(_sigmoid(1.0)) - math.log(_sigmoid(-1.0))) / 2
  np.testing.assert_allclose(out.loss, want, rtol=1e-6)
  m = diffusion.preference_metrics(out)
  np.testing.assert_allclose([m["reward_margin"], m["preference_accuracy"], m["reward_chosen"],
                              m["reward_rejected"]], [0.0, 0.5, 0.25, 0.25], atol=1e-7)


def _table_score_fn(logp_V):
  """A model whose log-probability of a target depends only on the target id (and not on the input)."""
  def score_fn(inputs_BL, valid_BL, targets_BL):
    del inputs_BL, valid_BL
    nll = -jnp.asarray(logp_V, jnp.float32)[targets_BL]
    return diffusion.TokenScores(nll, jnp.zeros(targets_BL.shape, bool))
  return score_fn


def test_masked_elbo_is_the_weighted_sum_over_masked_tokens():
  tokens = jnp.array([[7, 8, 5, 6]])
  masked = jnp.array([[[False, False, True, True], [False, False, False, True]]])  # S = 2
  draws = diffusion.ElboDraws(masked, jnp.array([[2.0, 4.0]]))  # p = 0.5 and 0.25
  logp = np.zeros(10, np.float32)
  logp[5], logp[6] = -0.2, -0.4
  elbo, _ = diffusion.masked_elbo(_table_score_fn(logp), draws, tokens_BL=tokens, valid_BL=jnp.ones((1, 4), bool),
                                  mask_id=M)
  np.testing.assert_allclose(elbo, [((-0.6) * 2.0 + (-0.4) * 4.0) / 2], rtol=1e-6)


def test_masked_elbo_feeds_the_noisy_rows():
  seen = []

  def score_fn(inputs_BL, valid_BL, targets_BL):
    seen.append(inputs_BL)
    return diffusion.TokenScores(jnp.zeros(targets_BL.shape), jnp.zeros(targets_BL.shape, bool))

  masked = jnp.array([[[False, True, False], [True, False, True]]])
  diffusion.masked_elbo(score_fn, diffusion.ElboDraws(masked, jnp.ones((1, 2))), tokens_BL=jnp.array([[7, 8, 9]]),
                        valid_BL=jnp.ones((1, 3), bool), mask_id=M)
  np.testing.assert_array_equal(seen[0], [[7, M, 9], [M, 8, M]])


@pytest.mark.parametrize("estimator", ["t", "l"])
def test_elbo_draws_mask_only_the_response_and_follow_the_allocation(estimator):
  response = jnp.broadcast_to(jnp.arange(40) >= 8, (64, 40))  # 32 response positions after an 8-token prompt
  d = diffusion.elbo_draws(jax.random.key(0), response_BL=response, n_time=3, n_mask=2, estimator=estimator)
  assert d.masked_BSL.shape == (64, 6, 40) and d.weight_BS.shape == (64, 6)
  assert not d.masked_BSL[:, :, :8].any()
  w = np.asarray(d.weight_BS)
  np.testing.assert_array_equal(w[:, 0::2], w[:, 1::2])  # the two masks of a timestep share its weight
  assert (w[:, 0] != w[:, 2]).any()  # different timesteps
  masked = np.asarray(d.masked_BSL)
  assert (masked[:, 0] != masked[:, 1]).any()  # ... but not its mask
  count = masked.sum(axis=2)
  if estimator == "l":
    np.testing.assert_allclose(w, 32.0 / count)  # exactly l tokens masked, weight L / l
  else:
    assert w.min() >= 1.0 and w.max() <= 1000.0  # 1/p with p in [eps, 1]
    # each token is masked with probability p = 1/weight: the counts follow 32 p on average
    np.testing.assert_allclose(count.mean(), (32.0 / w).mean(), rtol=0.05)


@pytest.mark.parametrize("estimator", ["t", "l"])
def test_elbo_estimators_are_unbiased_for_a_position_independent_model(estimator):
  # log p(token) fixed per id, whatever the input: the ELBO's expectation is the sum over the response
  logp = -np.arange(1, 11, dtype=np.float32) / 10
  tokens = jnp.array([[1, 2, 5, 6, 7, 9]])
  response = jnp.array([[False, False, True, True, True, True]])
  d = diffusion.elbo_draws(jax.random.key(1), response_BL=jnp.repeat(response, 4000, 0), n_time=4, n_mask=1,
                           estimator=estimator)
  elbo, _ = diffusion.masked_elbo(_table_score_fn(logp), d, tokens_BL=jnp.repeat(tokens, 4000, 0),
                                  valid_BL=jnp.ones((4000, 6), bool), mask_id=M)
  exact = logp[[5, 6, 7, 9]].sum()
  np.testing.assert_allclose(float(elbo.mean()), exact, rtol=0.03)


def _pairs(B=4, L=12, seed=0):
  rng = np.random.default_rng(seed)
  chosen = rng.integers(5, 60, (B, L)).astype(np.int32)
  rejected = chosen.copy()
  rejected[:, 5:] = rng.integers(5, 60, (B, L - 5))
  return dict(chosen_BL=jnp.asarray(chosen), rejected_BL=jnp.asarray(rejected),
              prompt_len_B=jnp.array([4, 5, 3, 5][:B], jnp.int32),
              valid_BL=jnp.broadcast_to(jnp.arange(L) < L - 1, (B, L)))


def _logits_score_fn(seed):
  w = jax.random.normal(jax.random.key(seed), (64, 64))
  # a context-dependent model: logits of a position depend on its own and its neighbour's input
  return diffusion.from_logits(lambda x, valid: (w[x] + jnp.roll(w[x], 1, axis=1)) * valid[..., None])


@pytest.mark.parametrize("estimator", ["t", "l"])
def test_antithetic_sharing_cancels_the_noise_of_identical_models(estimator):
  """With the policy as its own reference, shared timesteps and masks give a margin of exactly 0; drawn
  independently, the two estimates differ."""
  fn = _logits_score_fn(0)
  kw = dict(**_pairs(), mask_id=M, beta=1.0, n_time=2, n_mask=1, estimator=estimator)
  run = jax.jit(lambda rng, antithetic: diffusion.vrpo_objective(fn, fn, rng, antithetic=antithetic, **kw),
                static_argnums=1)
  shared, independent = run(jax.random.key(3), True), run(jax.random.key(3), False)
  assert float(shared.metrics["reward_margin"]) == 0.0
  assert float(shared.metrics["reward_chosen"]) == 0.0 and float(shared.metrics["reward_rejected"]) == 0.0
  np.testing.assert_allclose(shared.loss, math.log(2.0), rtol=1e-6)  # -log sigmoid(0)
  assert abs(float(independent.metrics["reward_chosen"])) > 1e-3


def test_vrpo_objective_is_dpo_on_the_masked_elbos():
  """The objective's loss and metrics equal `dpo_loss` of `masked_elbo` estimates computed by hand from the
  same draws (the first key half for the policy; with sharing the reference reuses them)."""
  pol, ref = _logits_score_fn(0), _logits_score_fn(1)
  p = _pairs()
  rng = jax.random.key(5)
  out = diffusion.vrpo_objective(pol, ref, rng, mask_id=M, beta=0.3, n_time=2, n_mask=2, estimator="t", **p)
  B, L = p["chosen_BL"].shape
  tokens = jnp.concatenate([p["chosen_BL"], p["rejected_BL"]])
  valid = jnp.concatenate([p["valid_BL"]] * 2)
  resp = diffusion.response_mask(prompt_len_B=jnp.concatenate([p["prompt_len_B"]] * 2), length=L) & valid
  draws = diffusion.elbo_draws(jax.random.split(rng)[0], response_BL=resp, n_time=2, n_mask=2, estimator="t")
  e = lambda fn: diffusion.masked_elbo(fn, draws, tokens_BL=tokens, valid_BL=valid, mask_id=M)[0]
  want = diffusion.dpo_loss(policy_chosen_B=e(pol)[:B], policy_rejected_B=e(pol)[B:], reference_chosen_B=e(ref)[:B],
                            reference_rejected_B=e(ref)[B:], beta=0.3)
  np.testing.assert_allclose(out.loss, want.loss, rtol=1e-5)
  np.testing.assert_allclose(out.metrics["reward_margin"], want.margin_B.mean(), rtol=1e-5, atol=1e-6)
  assert int(out.num_masked) == int(draws.masked_BSL.sum()) > 0


def test_vrpo_gradient_flows_to_the_policy_only():
  w = jax.random.normal(jax.random.key(0), (64, 64))
  p = _pairs()

  def loss(w_pol, w_ref):
    fn = lambda w_: diffusion.from_logits(lambda x, valid: w_[x])
    return diffusion.vrpo_objective(fn(w_pol), fn(w_ref), jax.random.key(1), mask_id=M, beta=1.0, n_time=2,
                                    **p).loss

  g_pol, g_ref = jax.grad(loss, argnums=(0, 1))(w, w + 0.1)
  assert float(jnp.abs(g_pol).sum()) > 0 and float(jnp.abs(g_ref).sum()) == 0.0


def test_exact_dpo_uses_the_causal_log_likelihood_of_the_responses():
  p = _pairs()
  w_pol, w_ref = (jax.random.normal(jax.random.key(i), (64, 64)) for i in (0, 1))
  logits = lambda w: (lambda x, valid: w[x])
  out = diffusion.exact_dpo_objective(diffusion.from_logits(logits(w_pol)), diffusion.from_logits(logits(w_ref)),
                                      beta=0.2, **p)
  B, L = p["chosen_BL"].shape

  def loglik(w, tokens):
    target = diffusion.response_mask(prompt_len_B=p["prompt_len_B"], length=L) & p["valid_BL"]
    return diffusion.causal_loglik(logits_BLV=w[tokens], tokens_BL=tokens, target_BL=target)

  want = diffusion.dpo_loss(policy_chosen_B=loglik(w_pol, p["chosen_BL"]), policy_rejected_B=loglik(w_pol, p["rejected_BL"]),
                            reference_chosen_B=loglik(w_ref, p["chosen_BL"]),
                            reference_rejected_B=loglik(w_ref, p["rejected_BL"]), beta=0.2)
  np.testing.assert_allclose(out.loss, want.loss, rtol=1e-5)
  np.testing.assert_allclose(out.metrics["reward_chosen"], want.reward_chosen_B.mean(), rtol=1e-5, atol=1e-6)
  # response targets: positions prompt_len - 1 .. L - 3 (the last valid position is L - 2)
  assert int(out.num_masked) == 2 * sum(L - 1 - int(n) for n in p["prompt_len_B"])


@pytest.mark.parametrize("field, value, message", [
    ("preference.beta", 0.0, r"preference.beta' must be a number in \(0.0, 1000.0\]"),
    ("preference.budget", 0, r"preference.budget' must be an integer in \[1, 1024\]"),
    ("preference.n_mask", 3, r"preference.n_mask' must be a divisor of preference.budget=8"),
    ("preference.estimator", "x", r"preference.estimator' must be one of \('t', 'l'\)"),
    ("preference.antithetic", 1, r"preference.antithetic' must be True or False"),
])
def test_bad_preference_config_names_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    config_lib.section_from_dict("preference", {field.split(".")[1]: value})


# --- the vrpo objective through train.setup and the loop -----------------------------------------------


def _vrpo_config(init_from: str = "", **overrides):
  c = default.get_config("tiny")
  c.train.update(seq_len=48, num_steps=8, num_samples=0, eval_every=8, eval_batches=2, log_every=4,
                 checkpoint_every=4)
  c.data.update(num_documents=200)
  c.optim.update(peak_lr=3e-3)
  c.preference.update(budget=2)
  c = default.preference(c, init_from=init_from)
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return config_lib.from_config_dict(c)


def _pair_batches(cfg, n, seed=0):
  rng = np.random.default_rng(seed)
  B, L = cfg.train.batch_size, cfg.train.seq_len
  for _ in range(n):
    chosen = rng.integers(5, 200, (B, L)).astype(np.int32)
    rejected = chosen.copy()
    rejected[:, L // 2:] = rng.integers(5, 200, (B, L - L // 2))
    yield {"chosen": chosen, "rejected": rejected, "prompt_len": rng.integers(4, L // 2, B).astype(np.int32),
           "valid": np.broadcast_to(np.arange(L) < L - 3, (B, L)).copy()}


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_vrpo_sharded_step_equals_single_device_step_and_the_reference_stays(devices):
  runs = {}
  for name, devs in (("one", devices[:1]), ("eight", devices)):
    cfg = _vrpo_config(**({"mesh.data": 2, "mesh.fsdp": -1} if name == "eight" else {}))
    s = train.setup(cfg, sharding.make_mesh(cfg.mesh, devs))
    state = s.init(train.root_key(cfg))
    start = _leaves(state.frozen)
    if name == "eight":  # the reference is sharded exactly like the parameters
      for p, f in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.frozen)):
        assert p.sharding == f.sharding
    state, hist = train.run_steps(s, state, _pair_batches(cfg, 3), 3)
    for a, b in zip(start, _leaves(state.frozen)):
      np.testing.assert_array_equal(a, b)  # never updated, bit for bit
    runs[name] = (state, hist)
  (s1, h1), (s8, h8) = runs["one"], runs["eight"]
  np.testing.assert_allclose(h1[0]["loss"], math.log(2.0), rtol=1e-6)  # policy == reference at step 0
  for key in ("loss", "reward_margin", "preference_accuracy", "reward_chosen"):
    np.testing.assert_allclose([h[key] for h in h1], [h[key] for h in h8], rtol=1e-4, atol=1e-6)
  assert h1[-1]["loss"] != h1[0]["loss"]
  for a, b in zip(_leaves(s1.params), _leaves(s8.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_vrpo_run_raises_the_held_out_margin_and_resumes_bit_identically(tmp_path, sft_workdir, devices):
  """From the SFT fixture: 8 VRPO steps on the built-in preferences move the held-out (unseen entities)
  reward margin above 0 and the preference accuracy above one half; a run stopped at step 4 and resumed
  ends with bit-identical parameters and reference; the reference is the init_from model's parameters."""
  cfg = _vrpo_config(sft_workdir)
  full = train.train_and_evaluate(cfg, str(tmp_path / "full"))
  part = train.train_and_evaluate(cfg, str(tmp_path / "resumed"), stop_at=4)
  assert part["step"] == 4 and not part["finished"]
  resumed = train.train_and_evaluate(cfg, str(tmp_path / "resumed"))
  assert resumed["finished"]
  for a, b in zip(_leaves(full["state"]), _leaves(resumed["state"])):
    np.testing.assert_array_equal(a, b)
  source = ckpt_lib.Checkpointer(sft_workdir, read_only=True)
  sft_params = source.restore_params(source.latest_step(), full["setup"].abstract_state.params)
  source.close()
  for a, b in zip(_leaves(sft_params), _leaves(full["state"].frozen)):
    np.testing.assert_array_equal(a, b)
  s, state = full["setup"], full["state"]
  batches = objectives.eval_batches(cfg, full["tokenizer"])
  before = train.validate(s, state.frozen, batches, reference=state.frozen)
  after = train.validate(s, state.params, batches, reference=state.frozen)
  assert before["eval_reward_margin"] == 0.0 and before["eval_preference_accuracy"] == 0.0
  assert after["eval_reward_margin"] > 0.05 and after["eval_preference_accuracy"] > 0.5, after
  assert after["eval_loss"] < before["eval_loss"]
  with pytest.raises(ValueError, match="needs its reference parameters"):
    train.validate(s, state.params, batches)


def test_dry_run_counts_the_reference_model(devices):
  cfg = _vrpo_config()
  report = plan.dry_run(train.setup(cfg))
  assert report.reference_per_device == report.params_per_device > 0
  assert "reference model (frozen)" in report.table()
  assert "reference (frozen):" in plan.shardings_table(train.setup(cfg))


def test_preference_report_ranks_by_likelihood_and_checks_greedy_answers(sft_workdir):
  from llada_jax import evaluate, serving
  from llada_jax.data import preference

  loaded = serving.load(sft_workdir)
  records = preference.generate_preferences(6, 1, world_seed=0, split="heldout")
  likelihood = evaluate.LikelihoodConfig(mc_num=4, batch_size=4, seed=0)
  report = evaluate.preference_report(loaded, records, likelihood=likelihood, gen_length=8, steps=8)
  swapped = [dict(r, chosen=r["rejected"], rejected=r["chosen"]) for r in records]
  flipped = evaluate.preference_report(loaded, swapped, likelihood=likelihood, generate=False)
  assert report.num_pairs == 6 and sum(k["pairs"] for k in report.by_kind.values()) == 6
  # a (prompt, response) scores the same wherever it stands (its masks follow from the pair and the seed):
  # swapping chosen and rejected negates every gap
  np.testing.assert_allclose(flipped.mean_loglik_gap, -report.mean_loglik_gap, rtol=1e-9)
  assert report.likelihood_accuracy + flipped.likelihood_accuracy == pytest.approx(1.0)
  assert report.mean_loglik_gap != 0.0
  assert 0.0 <= report.greedy_share <= 1.0 and flipped.greedy_share is None


def test_ar_dpo_trains_the_causal_baseline_against_its_reference(devices):
  cfg = _vrpo_config(**{"diffusion.objective": "ar_dpo", "model.causal": True})
  s = train.setup(cfg)
  state = s.init(train.root_key(cfg))
  start = _leaves(state.frozen)
  state, hist = train.run_steps(s, state, _pair_batches(cfg, 4), 4)
  np.testing.assert_allclose(hist[0]["loss"], math.log(2.0), rtol=1e-6)  # exact log-likelihoods: no noise
  assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["reward_margin"] > 0
  for a, b in zip(start, _leaves(state.frozen)):
    np.testing.assert_array_equal(a, b)


def _benchmark(script, *args):
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = command_env()
  r = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=repo, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return [[c.strip() for c in l.strip("|").split("|")] for l in r.stdout.splitlines() if l.startswith("| ")]


def test_variance_benchmark_with_the_policy_as_its_own_reference(sft_workdir):
  """benchmarks/vrpo_variance.py end to end; with identical policy and reference, antithetic sharing makes
  every preference score exactly 0 (std 0), while independent draws scatter it."""
  rows = _benchmark("vrpo_variance.py", f"--policy={sft_workdir}", f"--reference={sft_workdir}", "--pairs=2",
                    "--seeds=3", "--budget=2")
  table = {r[0]: r for r in rows[1:]}
  assert list(table) == ["naive", "budget", "budget + allocation", "VRPO (+ antithetic)"]
  assert float(table["VRPO (+ antithetic)"][3]) == 0.0 and float(table["VRPO (+ antithetic)"][4]) == 0.0
  assert float(table["naive"][3]) > 0.0


def test_demo_benchmark_reports_both_models(sft_workdir):
  rows = _benchmark("vrpo_demo.py", f"--before={sft_workdir}", f"--after={sft_workdir}", "--pairs=4",
                    "--mc_num=16", "--gen_length=4")
  before = [r[1:] for r in rows[1:] if r[0] == "before (SFT)"]
  after = [r[1:] for r in rows[1:] if r[0] == "after (VRPO)"]
  assert before and before == after  # one model twice: the same masks and greedy answers, the same numbers
  assert [r[0] for r in before][0] == "all" and sum(int(r[1]) for r in before[1:]) == 4


@pytest.mark.parametrize("name, arg", [("vrpo_demo", None), ("vrpo_jsonl", "demo"), ("vrpo_jsonl", "llada_8b"),
                                       ("vrpo_llada_8b", None)])
def test_vrpo_config_files_validate(name, arg):
  import importlib
  module = importlib.import_module(f"llada_jax.configs.{name}")
  cfg = config_lib.from_config_dict(module.get_config(arg) if arg else module.get_config())
  assert cfg.diffusion.objective == "vrpo" and not cfg.model.causal and cfg.model.chat
  assert cfg.optim.weight_decay == 0.0 and cfg.optim.warmup_steps == max(1, cfg.train.num_steps // 10)
  assert cfg.preference.antithetic and cfg.preference.n_mask == 1
  if name == "vrpo_demo":
    assert cfg.train.init_from == "/tmp/llada_demo_sft" and cfg.data.source == "procedural"
  else:
    assert cfg.data.source == "jsonl" and cfg.data.sft_format == "pairs"
  if name == "vrpo_llada_8b":
    assert cfg.preference.budget == 8 and cfg.preference.beta == 0.1 and cfg.diffusion.mask_token_id == 126336
    assert (cfg.train.batch_size // cfg.train.grad_accum_steps) % 8 == 0  # one pair per device on 8 GPUs
