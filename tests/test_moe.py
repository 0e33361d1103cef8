"""Model families: mixture-of-experts routing and dispatch, QK-norm, partial RoPE, tied embeddings, presets,
and every objective / sampler / scorer on a MoE model."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import preset_config, tiny_config
from llada_jax import (config as config_lib, evaluate, lora as lora_lib, model as model_lib, moe, objectives, sampling,
                       sharding, train)
from llada_jax.configs import default


def _moe_config(**overrides) -> config_lib.Config:
  """The moe_tiny preset with dotted overrides."""
  return preset_config("moe_tiny", **overrides)


# --- routing against NumPy ---------------------------------------------------------------------------


def _np_route(logits, k, score, renorm, scaling, bias):
  logits = logits.astype(np.float64)
  if score == "softmax":
    e = np.exp(logits - logits.max(-1, keepdims=True))
    scores = e / e.sum(-1, keepdims=True)
  else:
    scores = 1 / (1 + np.exp(-logits))
  choose = scores + (0 if bias is None else bias)
  idx = np.argsort(-choose, axis=-1, kind="stable")[:, :k]
  w = np.take_along_axis(scores, idx, -1)
  if renorm:
    w = w / w.sum(-1, keepdims=True)
  return idx, w * scaling


@pytest.mark.parametrize("score, renorm, scaling, with_bias", [
    ("softmax", False, 1.0, False), ("softmax", True, 1.0, False), ("sigmoid", True, 2.5, True),
    ("sigmoid", False, 1.0, True)])
def test_route_matches_numpy(score, renorm, scaling, with_bias):
  """Top-k experts, their weights, renormalisation and scaling equal a float64 NumPy router; the bias
  changes which experts are chosen but never enters the weights."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(16, 6)).astype(np.float32)
  bias = rng.normal(scale=0.5, size=(6,)).astype(np.float32) if with_bias else None
  r = moe.route(jnp.asarray(logits), k=2, score=score, renorm=renorm, scaling=scaling,
                bias_E=None if bias is None else jnp.asarray(bias))
  idx, w = _np_route(logits, 2, score, renorm, scaling, bias)
  np.testing.assert_array_equal(np.asarray(r.expert_NK), idx)
  np.testing.assert_allclose(np.asarray(r.weight_NK), w, rtol=1e-5)
  if with_bias:  # the bias moved some choices, and a choice's weight is still its unbiased score
    plain, _ = _np_route(logits, 2, score, False, 1.0, None)
    assert (plain != idx).any()


def test_worked_example_of_the_docstring():
  """The module docstring's example: scores [0.1, 0.5, 0.3, 0.1] -> experts 1, 2 (0.5, 0.3); renormalised
  0.625, 0.375; a 0.3 bias on expert 3 picks 1, 3 with weights 0.5, 0.1."""
  logits = jnp.log(jnp.asarray([[0.1, 0.5, 0.3, 0.1]]))
  r = moe.route(logits, k=2)
  assert r.expert_NK.tolist() == [[1, 2]]
  np.testing.assert_allclose(r.weight_NK, [[0.5, 0.3]], rtol=1e-6)
  np.testing.assert_allclose(moe.route(logits, k=2, renorm=True).weight_NK, [[0.625, 0.375]], rtol=1e-6)
  biased = moe.route(logits, k=2, bias_E=jnp.asarray([0.0, 0.0, 0.0, 0.3]))
  assert biased.expert_NK.tolist() == [[1, 3]]
  np.testing.assert_allclose(biased.weight_NK, [[0.5, 0.1]], rtol=1e-6)


# --- grouped dispatch against a dense loop over experts ---------------------------------------------


def _dense_loop(x, routing, gate, up, down, kept=None):
  """sum over every expert e of (weight of e for the token, 0 if not chosen or dropped) * SwiGLU_e(x)."""
  E = gate.shape[0]
  w = routing.weight_NK if kept is None else jnp.where(kept, routing.weight_NK, 0.0)
  out = 0.0
  for e in range(E):
    w_N = jnp.sum(jnp.where(routing.expert_NK == e, w, 0.0), axis=-1)
    out = out + w_N[:, None] * ((jax.nn.silu(x @ gate[e]) * (x @ up[e])) @ down[e])
  return out


def _moe_inputs(N=24, D=8, F=12, E=4, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (N, D))
  gate, up = (0.3 * jax.random.normal(k, (E, D, F)) for k in ks[1:3])
  down = 0.3 * jax.random.normal(ks[3], (E, F, D))
  router = jax.random.normal(ks[4], (D, E))
  return x, router, gate, up, down


def test_grouped_dispatch_equals_a_dense_loop_values_and_gradients():
  """ragged_dot over expert-sorted tokens computes what a loop over every expert computes, and so do the
  gradients with respect to the tokens, every expert matrix and the router."""
  x, router, gate, up, down = _moe_inputs()

  def grouped(x, router, gate, up, down):
    r = moe.route(x @ router, k=2, renorm=True)
    return moe.dispatch(x, r, gate, up, down)[0]

  def dense(x, router, gate, up, down):
    return _dense_loop(x, moe.route(x @ router, k=2, renorm=True), gate, up, down)

  np.testing.assert_allclose(grouped(x, router, gate, up, down), dense(x, router, gate, up, down), rtol=1e-5,
                             atol=1e-6)
  probe = jax.random.normal(jax.random.key(9), x.shape)
  loss = lambda f: lambda *a: jnp.sum(f(*a) * probe)
  g1 = jax.jit(jax.grad(loss(grouped), argnums=(0, 1, 2, 3, 4)))(x, router, gate, up, down)
  g2 = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2, 3, 4)))(x, router, gate, up, down)
  for a, b in zip(g1, g2):
    assert float(jnp.abs(a).max()) > 0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cap", [None, 3])
def test_expert_parallel_dispatch_equals_the_local_one(devices, cap):
  """4 devices, each with 8 tokens and 2 of the 8 experts: routing every assignment to its expert's device
  and back by all-to-all gives each device's tokens what `dispatch` gives them with all experts at hand
  (values, which assignments a capacity keeps, and gradients)."""
  from jax.sharding import PartitionSpec as P
  mesh = jax.sharding.Mesh(np.asarray(devices[:4]), ("x",))
  x, router, gate, up, down = _moe_inputs(N=32, E=8)
  routing = lambda x_: moe.route(x_ @ router, k=2, renorm=True)

  def split(x_, gate_, up_, down_):
    y, kept = moe.dispatch_split(x_, routing(x_), gate_, up_, down_, axis="x", capacity=cap)
    return y, kept

  def local(x_, gate_, up_, down_):  # the reference: every device's tokens against all the experts
    return moe.dispatch(x_, routing(x_), gate_, up_, down_, capacity=cap)

  ep = jax.jit(jax.shard_map(split, mesh=mesh, in_specs=(P("x"), P("x"), P("x"), P("x")), out_specs=P("x")))
  ref = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("x"), P(), P(), P()), out_specs=P("x")))
  (y1, k1), (y2, k2) = ep(x, gate, up, down), ref(x, gate, up, down)
  np.testing.assert_array_equal(k1, k2)
  if cap is not None:
    assert not bool(k2.all()), "the capacity must drop something"
  np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-6)
  probe = jax.random.normal(jax.random.key(4), x.shape)
  grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)[0] * probe), argnums=(0, 1, 2, 3)))
  for a, b in zip(grad(ep)(x, gate, up, down), grad(ref)(x, gate, up, down)):
    assert float(jnp.abs(b).max()) > 0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_capacity_drops_exactly_the_assignments_over_the_cap():
  """With a capacity of C per expert, each expert keeps its first C assignments in token order and drops
  the rest (weight 0); a capacity no expert reaches drops nothing."""
  x, router, gate, up, down = _moe_inputs(N=32)
  r = moe.route(x @ router, k=2)
  cap = moe.capacity(32, k=2, num_experts=4, factor=0.5)
  assert cap == 8  # ceil(0.5 * 32 * 2 / 4)
  y, kept = moe.dispatch(x, r, gate, up, down, capacity=cap)
  experts = np.asarray(r.expert_NK)
  expected = np.zeros_like(experts, bool)
  seen = np.zeros(4, int)
  for n in range(32):
    for j in range(2):
      e = experts[n, j]
      expected[n, j] = seen[e] < cap
      seen[e] += 1
  assert (seen > cap).any(), "the example must overflow some expert"
  np.testing.assert_array_equal(np.asarray(kept), expected)
  np.testing.assert_allclose(y, _dense_loop(x, r, gate, up, down, jnp.asarray(expected)), rtol=1e-5, atol=1e-6)
  y_all, kept_all = moe.dispatch(x, r, gate, up, down, capacity=64)
  assert bool(kept_all.all())
  np.testing.assert_allclose(y_all, moe.dispatch(x, r, gate, up, down)[0], rtol=1e-6, atol=1e-6)


def test_aux_and_z_losses_against_hand_values():
  """Two tokens, two experts, k = 1. Logits [0, 0] and [ln 3, 0]: probabilities [1/2, 1/2] and [3/4, 1/4];
  both tokens pick expert 0 (the tie goes to the lower index), so f = [1, 0], P = [5/8, 3/8] and
  aux = 2 * (1 * 5/8) = 1.25; z = mean(lse^2) = ((ln 2)^2 + (ln 4)^2) / 2. Padding the second token
  out leaves f = [1, 0], P = [1/2, 1/2]: aux = 1.0, z = (ln 2)^2."""
  logits = jnp.asarray([[0.0, 0.0], [np.log(3.0), 0.0]])
  r = moe.route(logits, k=1)
  kept = jnp.ones((2, 1), bool)
  s = moe.router_stats(r, kept)
  np.testing.assert_allclose(s["aux"], 1.25, rtol=1e-6)
  np.testing.assert_allclose(s["z"], (np.log(2) ** 2 + np.log(4) ** 2) / 2, rtol=1e-6)
  np.testing.assert_allclose(s["load"], [1.0, 0.0])
  s = moe.router_stats(r, kept, valid_N=jnp.asarray([True, False]))
  np.testing.assert_allclose(s["aux"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(s["z"], np.log(2) ** 2, rtol=1e-6)
  loss, metrics = moe.router_losses(s, aux_weight=0.01, z_weight=0.001)
  np.testing.assert_allclose(loss, 0.01 * 1.0 + 0.001 * np.log(2) ** 2, rtol=1e-6)
  assert metrics["expert_load_max"] == 2.0 and set(metrics) >= {"expert_load/0", "expert_load/1"}


# --- attention options -------------------------------------------------------------------------------


def test_partial_rope_rotates_only_the_leading_dims():
  """rope(x, rotary_dim=r) rotates the first r dims exactly as a full RoPE of an r-wide head, and passes
  the rest through unchanged."""
  x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
  pos = jnp.arange(5)[None]
  out = model_lib.rope(x, pos, 10000.0, 4)
  np.testing.assert_allclose(out[..., :4], model_lib.rope(x[..., :4], pos, 10000.0), rtol=1e-6)
  np.testing.assert_array_equal(out[..., 4:], x[..., 4:])


def _tiny_params(cfg):
  graphdef, _ = model_lib.abstract_model(cfg)
  return graphdef, jax.jit(lambda key: model_lib.init_params(cfg, key))(jax.random.key(0))


def test_qk_norm_makes_logits_invariant_to_the_scale_of_queries_and_keys():
  """RMSNorm over head_dim on q and k (before RoPE): scaling the q and k projections by 7 changes nothing
  (up to the norm's epsilon, made negligible here), while without QK-norm it changes the logits."""
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 64)
  for qk_norm in (True, False):
    cfg = config_lib.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=32,
                                 qk_norm=qk_norm, norm_eps=1e-10, dtype="float32")
    graphdef, params = _tiny_params(cfg)
    scaled = jax.tree.map(lambda x: x, params)
    scaled["blocks"]["q_proj"] = params["blocks"]["q_proj"] * 7
    scaled["blocks"]["k_proj"] = params["blocks"]["k_proj"] * 7
    logits = jax.jit(lambda p: model_lib.apply(graphdef, p, tokens))
    diff = float(jnp.abs(logits(params) - logits(scaled)).max())
    assert (diff < 1e-4) == qk_norm, (qk_norm, diff)


def test_tied_embeddings_are_one_parameter_trained_by_both_uses():
  """No `lm_head` leaf; the logits are hidden @ embedding.T; the embedding's gradient is the sum of the
  lookup's and the head's (checked against an untied model holding two copies of the same matrix)."""
  kw = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=1, mlp_dim=32, dtype="float32")
  tied = config_lib.ModelConfig(tie_embeddings=True, **kw)
  untied = config_lib.ModelConfig(**kw)
  g_tied, p_tied = _tiny_params(tied)
  assert "lm_head" not in p_tied
  g_untied, _ = _tiny_params(untied)
  p_untied = {**p_tied, "lm_head": p_tied["embedding"].T}
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 64)
  loss = lambda g: lambda p: jnp.sum(jax.nn.log_softmax(model_lib.apply(g, p, tokens))[..., 3])
  np.testing.assert_allclose(jax.jit(loss(g_tied))(p_tied), jax.jit(loss(g_untied))(p_untied), rtol=1e-6)
  grad_tied = jax.jit(jax.grad(loss(g_tied)))(p_tied)["embedding"]
  grad_untied = jax.jit(jax.grad(loss(g_untied)))(p_untied)
  np.testing.assert_allclose(grad_tied, grad_untied["embedding"] + grad_untied["lm_head"].T, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(grad_untied["lm_head"]).max()) > 0 and float(jnp.abs(grad_untied["embedding"]).max()) > 0


def test_trainable_token_rows_of_a_tied_model_feed_both_uses():
  """LoRA's trainable token rows on tied embeddings: one set of rows (no head columns), seeded from the
  embedding; the head a forward reads is the patched embedding transposed, and merging patches the
  embedding only (no lm_head appears)."""
  m = config_lib.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=1, mlp_dim=32,
                             tie_embeddings=True, dtype="float32")
  lora = config_lib.LoraConfig(rank=2, trainable_tokens=(3, 7))
  assert set(lora_lib.token_shapes(m, lora)) == {"embedding"}
  _, params = _tiny_params(m)
  adapters = lora_lib.seed_tokens(lora_lib.init(m, lora, jax.random.key(0)), params, lora)
  np.testing.assert_array_equal(adapters["tokens"]["embedding"], params["embedding"][jnp.asarray([3, 7])])
  adapters["tokens"]["embedding"] = adapters["tokens"]["embedding"] + 1.0
  emb, head = lora_lib.with_tokens(params["embedding"], None, lora_lib.Adapters.of(adapters, lora))
  np.testing.assert_array_equal(head, emb.T)
  np.testing.assert_array_equal(emb[7], params["embedding"][7] + 1.0)
  merged = lora_lib.merge(params, adapters, lora)
  assert "lm_head" not in merged
  np.testing.assert_array_equal(merged["embedding"], emb)


# --- presets -----------------------------------------------------------------------------------------


def test_family_presets_have_the_published_parameter_counts():
  """eval_shape counts: iLLaDA-8B 7.62B (model card) within 0.5%; LLaDA-MoE-7B-A1B: the count its table
  implies (embedding + head 2 x 157184 x 2048, per layer attention 4 x 2048^2 + QK-norm + router 2048 x 64 +
  64 experts x 3 x 2048 x 1024 + norms), about 7.36B."""
  counts = {}
  for variant in ("illada_8b", "llada_moe_7b_a1b"):
    cfg = config_lib.from_config_dict(default.get_config(variant))
    counts[variant] = model_lib.count_params(model_lib.abstract_model(cfg.model)[1])
  assert abs(counts["illada_8b"] / 7.62e9 - 1) < 0.005
  d, L, E, f, V, h = 2048, 16, 64, 1024, 157184, 128
  per_layer = 4 * d * d + 2 * h + d * E + E * 3 * d * f + 2 * d
  assert counts["llada_moe_7b_a1b"] == 2 * V * d + d + L * per_layer


# --- every objective, the samplers and the scorer on a MoE model -------------------------------------


def _random_batch(cfg, objective_batch, seed=0):
  rng = np.random.default_rng(seed)
  L, V = cfg.train.seq_len, cfg.model.vocab_size
  out = {}
  for name, field in objective_batch.items():
    shape = field.shape(cfg)
    if field.dtype == "int32" and name == "prompt_len":
      out[name] = np.full(shape, L // 4, np.int32)
    elif field.dtype == "int32":
      out[name] = rng.integers(5, V, size=shape).astype(np.int32)
    else:
      out[name] = np.ones(shape, bool)
  return out


def test_moe_trains_a_reference_objective_with_router_losses():
  """A VRPO step on moe_tiny (policy and frozen reference both MoE): the metrics carry the unweighted aux/z
  losses and a per-expert load that sums to 1, and the router's parameters move. (Pre-training: the
  expert-parallel test; SFT: the LoRA test and the compute_loss test.)"""
  cfg = _moe_config(**{"diffusion.objective": "vrpo", "optim.warmup_steps": 0})
  s = train.setup(cfg)
  batch = _random_batch(cfg, s.objective.batch)
  state = s.init(train.root_key(cfg))
  if s.objective.reference:
    state = s.with_reference(state)
  router0 = np.asarray(state.params["blocks"]["router"])
  with sharding.use_rules(cfg.mesh, s.mesh):
    new, m = s.step(state, train.global_batch(s, batch))
  m = jax.device_get(m)
  loads = [v for k, v in m.items() if k.startswith("expert_load/")]
  assert len(loads) == cfg.model.num_experts
  np.testing.assert_allclose(sum(loads), 1.0, rtol=1e-5)
  assert m["moe_aux_loss"] > 0 and m["moe_z_loss"] > 0 and np.isfinite(m["loss"])
  assert np.abs(np.asarray(new.params["blocks"]["router"]) - router0).max() > 0


def test_router_losses_are_added_with_their_weights_and_only_while_training():
  """`objectives.compute_loss` adds aux_weight x aux + z_weight x z to the objective's loss when training and
  only reports them in validation; the router receives gradient from both terms."""
  cfg = _moe_config(**{"diffusion.objective": "sft", "model.moe_aux_loss_weight": 0.5, "model.moe_z_loss_weight": 0.25})
  graphdef, params = _tiny_params(cfg.model)
  objective = objectives.of(cfg)
  batch = {k: jnp.asarray(v) for k, v in _random_batch(cfg, objective.batch).items()}

  def loss(p, training):
    out = objectives.compute_loss(objective, model_lib.score_fn(cfg.model, graphdef, p), batch, jax.random.key(0),
                                  config=cfg, router_losses=training)
    return out.loss, out.metrics

  (with_router, m), grads = jax.jit(jax.value_and_grad(lambda p: loss(p, True), has_aux=True))(params)
  without, m_eval = jax.jit(lambda p: loss(p, False))(params)
  np.testing.assert_allclose(with_router - without, 0.5 * m["moe_aux_loss"] + 0.25 * m["moe_z_loss"], rtol=1e-5)
  np.testing.assert_allclose(m_eval["moe_aux_loss"], m["moe_aux_loss"], rtol=1e-6)
  assert float(jnp.abs(grads["blocks"]["router"]).max()) > 0


def test_expert_parallel_step_equals_the_single_device_step(devices):
  """Two steps of moe_tiny with the experts split over the mesh's 'expert' axis (fsdp_ep, fsdp 2 x expert 4)
  reproduce the single-device losses and parameters; the stacked expert leaves are split on 'expert'."""
  cfg = _moe_config()
  batches = [_random_batch(cfg, objectives.of(cfg).batch, seed=i) for i in range(2)]
  s1 = train.setup(cfg, sharding.make_mesh(cfg.mesh, devices[:1]))
  state1, hist1 = train.run_steps(s1, s1.init(train.root_key(cfg)), iter(batches), 2)
  ep = _moe_config(**{"mesh.rule_set": "fsdp_ep", "mesh.fsdp": 2, "mesh.expert": 4})
  s8 = train.setup(ep, sharding.make_mesh(ep.mesh, devices))
  state8, hist8 = train.run_steps(s8, s8.init(train.root_key(ep)), iter(batches), 2)
  gate = state8.params["blocks"]["ff_gate"]
  assert gate.sharding.spec[1] == "expert" and not gate.sharding.is_fully_replicated
  np.testing.assert_allclose([h["loss"] for h in hist1], [h["loss"] for h in hist8], rtol=1e-5)
  np.testing.assert_allclose(hist1[-1]["expert_load/0"], hist8[-1]["expert_load/0"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(state1.params)), jax.tree.leaves(jax.device_get(state8.params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_moe_lora_adapts_attention_and_refuses_expert_targets():
  """LoRA on a MoE base trains adapters on the attention projections (the base stays); adapters on the
  experts' projections are refused, naming lora.targets."""
  cfg = _moe_config(**{"lora.rank": 4, "lora.targets": ("q_proj", "v_proj", "attn_out"), "train.init_from": "/base",
                       "diffusion.objective": "sft", "optim.warmup_steps": 0})
  s = train.setup(cfg)
  base = s.init_base(jax.random.key(3))
  state = s.attach_base(s.init(train.root_key(cfg)), base, fresh=True)
  with sharding.use_rules(cfg.mesh, s.mesh):
    new, m = s.step(state, train.global_batch(s, _random_batch(cfg, s.objective.batch)))
  assert np.isfinite(float(m["loss"])) and "moe_aux_loss" in m
  assert float(jnp.abs(new.params["blocks"]["attn_out"]["lora_b"]).max()) > 0
  with pytest.raises(ValueError, match="lora.targets"):
    _moe_config(**{"lora.rank": 4, "lora.targets": ("q_proj", "ff_up"), "train.init_from": "/base"})


def test_moe_samples_with_caches_and_scores_likelihoods():
  """Greedy sampling of a MoE model: with one step per block every step refreshes the caches, so the dual and
  prefix caches equal no cache; a token's experts do not depend on its batch (dropless), so a row alone
  equals the same row in a batch; the likelihood scorer's ELBO is finite and below zero."""
  cfg = _moe_config().model
  graphdef, params = _tiny_params(cfg)
  prompt = jax.random.randint(jax.random.key(2), (2, 6), 5, cfg.vocab_size)
  valid = jnp.ones_like(prompt, bool)
  kw = dict(gen_length=8, steps=2, block_length=4)
  run = lambda p, v, **o: np.asarray(sampling.generate(graphdef, params, p, v, rng=jax.random.key(0), mask_id=4,
                                                       **{**kw, **o}).tokens_BL)
  plain = run(prompt, valid)
  np.testing.assert_array_equal(plain, run(prompt, valid, kv_cache="dual"))
  np.testing.assert_array_equal(plain[:1], run(prompt[:1], valid[:1]))
  np.testing.assert_array_equal(plain, run(prompt, valid, kv_cache="prefix"))
  assert (plain[:, 6:] != 4).all()  # every answer position was committed
  windowed = run(prompt, valid, kv_cache="dual", **{"steps": 8})  # 3 of 4 steps per block run on the cache
  assert (windowed[:, 6:] != 4).all() and (windowed[:, :6] == plain[:, :6]).all()
  scorer = evaluate.Scorer(graphdef, params, mask_id=4, max_seq_len=cfg.max_seq_len)
  ll = scorer.loglikelihood([[5, 6, 7]], [[8, 9]], evaluate.LikelihoodConfig(mc_num=4, batch_size=4))
  assert np.isfinite(ll).all() and (ll < 0).all()


def test_tiny_presets_build_and_bad_moe_values_name_the_field():
  """moe_tiny validates; a top-k above the expert count, an unknown score function or a RoPE fraction that
  leaves an odd number of rotated dims name their field."""
  assert _moe_config().model.moe
  assert not tiny_config().model.moe
  for field, value in (("experts_per_token", 9), ("router_score", "relu"), ("rope_fraction", 0.3),
                       ("capacity_factor", -1.0)):
    with pytest.raises(ValueError, match=f"model.{field}"):
      _moe_config(**{f"model.{field}": value})
  with pytest.raises(ValueError, match="mesh.expert"):
    _moe_config(**{"mesh.expert": 2})
