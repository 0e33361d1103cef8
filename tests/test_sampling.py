"""The simple reverse process (end-of-training samples) and the one classifier-free guidance helper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from llada_jax import diffusion, model, sampling


def test_transfer_schedule_matches_reference_rule():
  np.testing.assert_array_equal(sampling.transfer_schedule(10, 4), [3, 3, 2, 2])
  np.testing.assert_array_equal(sampling.transfer_schedule(8, 8), np.ones(8))
  assert sampling.transfer_schedule(37, 5).sum() == 37


def test_left_pad():
  tokens, valid = sampling.left_pad([[5, 6, 7], [8]], pad_id=0)
  np.testing.assert_array_equal(tokens, [[5, 6, 7], [0, 0, 8]])
  np.testing.assert_array_equal(valid, [[True, True, True], [False, False, True]])


def test_generate_fills_every_mask_and_keeps_the_prompt():
  cfg = tiny_config().model
  graphdef, _ = model.abstract_model(cfg)
  params = model.init_params(cfg, jax.random.key(0))
  tokens, valid = sampling.left_pad([[10, 11, 12], [13]], pad_id=0)
  mask_id = 4
  for steps, block in ((8, 8), (4, 4), (8, 2)):
    out = np.asarray(sampling.generate(graphdef, params, jnp.asarray(tokens), jnp.asarray(valid),
                                       gen_length=8, steps=steps, block_length=block, mask_id=mask_id).tokens_BL)
    assert out.shape == (2, 11)
    np.testing.assert_array_equal(out[:, :3], tokens)
    assert not (out[:, 3:] == mask_id).any()


def _reference_generate(graphdef, params, tokens, valid, gen_length, steps, block_length, mask_id):
  """REFERENCE §4 written as a plain Python loop over blocks and steps (temperature 0)."""
  x = np.concatenate([tokens, np.full((tokens.shape[0], gen_length), mask_id)], axis=1)
  v = np.concatenate([valid, np.ones((tokens.shape[0], gen_length), bool)], axis=1)
  P = tokens.shape[1]
  num_blocks = gen_length // block_length
  for b in range(num_blocks):
    lo, hi = P + b * block_length, P + (b + 1) * block_length
    n = block_length
    per_step = [n // (steps // num_blocks) + (i < n % (steps // num_blocks)) for i in range(steps // num_blocks)]
    for k in per_step:
      logits = np.asarray(model.apply(graphdef, params, jnp.asarray(x), jnp.asarray(v)), np.float64)
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      x0 = logits.argmax(-1)
      for row in range(x.shape[0]):
        conf = {i: probs[row, i, x0[row, i]] for i in range(lo, hi) if x[row, i] == mask_id}
        for i in sorted(conf, key=lambda i: -conf[i])[:k]:
          x[row, i] = x0[row, i]
  return x


def test_generate_matches_a_plain_python_reverse_process():
  cfg = tiny_config().model
  graphdef, _ = model.abstract_model(cfg)
  params = model.init_params(cfg, jax.random.key(1))
  tokens, valid = sampling.left_pad([[10, 11, 12], [13, 14]], pad_id=0)
  got = np.asarray(sampling.generate(graphdef, params, jnp.asarray(tokens), jnp.asarray(valid),
                                     gen_length=8, steps=4, block_length=4, mask_id=4).tokens_BL)
  want = _reference_generate(graphdef, params, tokens, valid, 8, 4, 4, 4)
  np.testing.assert_array_equal(got, want)


def test_strip_at_stop():
  assert sampling.strip_at_stop([5, 6, 1, 7, 1], {1}) == [5, 6]
  assert sampling.strip_at_stop([5, 8, 6, 1], {1, 8}) == [5]
  assert sampling.strip_at_stop([5, 6], {1}) == [5, 6]


def _peaked_model():
  cfg = tiny_config().model
  graphdef, _ = model.abstract_model(cfg)
  params = model.init_params(cfg, jax.random.key(3))
  params["lm_head"] = params["lm_head"] * 20.0  # confident predictions, so orderings are meaningful
  return graphdef, params


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_kv_cache_with_one_step_per_block_equals_no_cache(cfg_scale):
  """With one step per block every step is a block-start refresh (a full pass): exact, with
  classifier-free guidance too (the refresh pass hides the prompt in the unconditional half)."""
  graphdef, params = _peaked_model()
  tokens, valid = sampling.left_pad([[10, 11, 12], [13, 14]], pad_id=0)
  outs = {c: sampling.generate(graphdef, params, tokens, valid, mask_id=4, gen_length=16, steps=4,
                               block_length=4, kv_cache=c, cfg_scale=cfg_scale) for c in ("none", "prefix", "dual")}
  for c in ("prefix", "dual"):
    np.testing.assert_array_equal(outs[c].tokens_BL, outs["none"].tokens_BL)
    np.testing.assert_array_equal(outs[c].commit_step_BL, outs["none"].commit_step_BL)
  if cfg_scale:  # guidance changes this output, so the equality above is not the unguided one twice
    plain = sampling.generate(graphdef, params, tokens, valid, mask_id=4, gen_length=16, steps=4, block_length=4)
    assert not np.array_equal(plain.tokens_BL, outs["none"].tokens_BL)


def test_kv_cache_fills_every_position_once_and_composes():
  graphdef, params = _peaked_model()
  tokens, valid = sampling.left_pad([[10, 11, 12], [13]], pad_id=0)
  for cache in ("prefix", "dual"):
    for extra in ({}, {"threshold": 0.9, "cfg_scale": 1.0, "early_exit": True, "eos_id": 7}):
      out = sampling.generate(graphdef, params, tokens, valid, mask_id=4, gen_length=16, steps=8,
                              block_length=4, kv_cache=cache, **extra)
      gen = np.asarray(out.tokens_BL)[:, 3:]
      steps = np.asarray(out.commit_step_BL)[:, 3:]
      assert not (gen == 4).any(), (cache, extra)
      assert (steps >= 0).all() and (np.asarray(out.commit_step_BL)[:, :3] == -1).all()
      if not extra:  # fixed schedule: 2 steps per block of 4 -> exactly 2 tokens per step
        for row in steps:
          np.testing.assert_array_equal(np.bincount(row, minlength=8), np.full(8, 2))


# --- Classifier-free guidance: one helper for the sampler and the likelihood code -----------------------


def test_guidance_helpers_closed_form():
  cond = jnp.asarray([[[2.0, -1.0]]], jnp.bfloat16)
  uncond = jnp.asarray([[[1.0, 1.0]]], jnp.bfloat16)
  got = diffusion.guided_logits(cond, uncond, scale=1.0)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, [[[3.0, -3.0]]])  # uncond + 2 * (cond - uncond)
  np.testing.assert_array_equal(diffusion.guided_logits(cond, uncond, scale=0.0), [[[2.0, -1.0]]])
  tokens = jnp.asarray([[7, 8, 4, 9], [5, 6, 4, 4]], jnp.int32)
  prompt = jnp.asarray([[True, True, False, False], [True, False, False, False]])
  uncond_tokens = diffusion.unconditional_tokens(tokens, prompt_BL=prompt, mask_id=4)
  np.testing.assert_array_equal(uncond_tokens, [[4, 4, 4, 9], [4, 6, 4, 4]])
  assert uncond_tokens.dtype == tokens.dtype


def _bag_logits(tokens_BL, valid_BL, V=8):
  """A hand-made model: every position's logits are a fixed map of the bag of valid tokens."""
  bag_BV = jnp.sum(jax.nn.one_hot(tokens_BL, V) * valid_BL[..., None], axis=1)
  W_VV = jnp.sin(jnp.arange(V * V, dtype=jnp.float32).reshape(V, V))
  return jnp.broadcast_to((bag_BV @ W_VV)[:, None, :], (*tokens_BL.shape, V))


def test_conditional_elbo_with_guidance_is_exact_for_one_token():
  """A one-token response is always the one masked token (weight 1): the l-estimate is exactly
  log softmax(uncond + (scale + 1)(cond - uncond))[r], uncond having the prompt masked."""
  mask, scale = 7, 1.5
  tokens = jnp.asarray([[1, 2, 3, 5], [2, 2, 6, 0]], jnp.int32)  # row 1: prompt 2 2, response 6, padding
  valid = jnp.asarray([[True] * 4, [True, True, True, False]])
  prompt_len = jnp.asarray([3, 2])
  got = diffusion.conditional_elbo(_bag_logits, jax.random.split(jax.random.key(0), 2), tokens_BL=tokens,
                                   prompt_len_B=prompt_len, valid_BL=valid, mask_id=mask, num_samples=2,
                                   cfg_scale=scale)
  for b, (r_pos, prompt_n) in enumerate([(3, 3), (2, 2)]):
    x = np.asarray(tokens[b:b + 1]).copy()
    x[0, r_pos] = mask
    u = x.copy()
    u[0, :prompt_n] = mask
    cond = np.asarray(_bag_logits(jnp.asarray(x), valid[b:b + 1]), np.float64)[0, r_pos]
    uncond = np.asarray(_bag_logits(jnp.asarray(u), valid[b:b + 1]), np.float64)[0, r_pos]
    guided = uncond + (scale + 1) * (cond - uncond)
    want = guided[int(tokens[b, r_pos])] - np.log(np.exp(guided).sum())
    np.testing.assert_allclose(got[b], want, rtol=1e-5)
  plain = diffusion.conditional_elbo(_bag_logits, jax.random.split(jax.random.key(0), 2), tokens_BL=tokens,
                                     prompt_len_B=prompt_len, valid_BL=valid, mask_id=mask, num_samples=2)
  assert not np.allclose(got, plain), "guidance should change these estimates"


def test_sampler_and_elbo_guide_through_the_one_helper(monkeypatch):
  scales = []
  real = diffusion.guided_logits

  def spy(cond, uncond, *, scale):
    scales.append(scale)
    return real(cond, uncond, scale=scale)

  monkeypatch.setattr(diffusion, "guided_logits", spy)
  diffusion.conditional_elbo(_bag_logits, jax.random.split(jax.random.key(0), 1),
                             tokens_BL=jnp.asarray([[1, 2, 3]]), prompt_len_B=jnp.asarray([1]),
                             valid_BL=jnp.ones((1, 3), bool), mask_id=7, num_samples=1, cfg_scale=0.5)
  assert scales == [0.5]
  cfg = tiny_config().model
  graphdef, _ = model.abstract_model(cfg)
  params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
  tokens, valid = sampling.left_pad([[10, 11]], pad_id=0)
  opts = sampling.SamplingConfig(gen_length=4, steps=2, block_length=4, cfg_scale=2.0)
  # A fresh trace (not the jit cache) of the sampler's program, so the spy sees every guided call.
  jax.make_jaxpr(lambda p, t, v: sampling._generate.__wrapped__(graphdef, p, t, v, jax.random.key(0), cfg=opts,
                                                                mask_id=4, eos_id=1, eot_id=None))(
      params, jnp.asarray(tokens), jnp.asarray(valid))
  assert scales[1:] == [2.0]  # one model call per step, traced once inside the while_loop


# --- The step's arithmetic: exact stand-ins for argmax / argsort, logits only where a step decides -----


def test_argmax_is_jnp_argmax_exactly():
  # CPU's two-pass argmax: first maximum, vocabularies below, at and between chunks, the maximum in the
  # padded last chunk; input with a NaN (or both infinities) goes to jnp.argmax, which the result equals.
  rng = np.random.default_rng(0)
  C = sampling._ARGMAX_CHUNK
  for V in (1, 7, 2 * C, 2 * C + 1, 4 * C, 5 * C - 3, 9 * C + 17):
    finite = rng.choice(np.asarray([0.0, 1.0, 2.5, -np.inf], np.float32), size=(5, V), p=[.4, .3, .2, .1])
    finite[0] = -np.inf                  # all -inf: index 0
    finite[1] = 2.5                      # all tied: index 0
    finite[2, -1] = 9.0                  # maximum in the last (padded) chunk
    finite[3, V // 2:] = 2.5             # ties across chunks
    plus_inf = np.where(finite == -np.inf, np.inf, finite)  # +inf ties, no -inf
    with_nan = finite.copy()
    with_nan[3, -1] = with_nan[4, V // 3] = np.nan
    for x in (finite, plus_inf, with_nan):
      if x is not with_nan:
        assert not np.isnan(x.sum()), "this case must take the chunked path"
      for dtype in (np.float32, jnp.bfloat16):
        got = sampling._argmax(jnp.asarray(x.astype(dtype)))
        np.testing.assert_array_equal(got, jnp.argmax(jnp.asarray(x.astype(dtype)), axis=-1),
                                      err_msg=f"V={V} {dtype}")
  assert sampling._argmax(jnp.zeros((2, 3, 5 * C))).shape == (2, 3)


@pytest.mark.parametrize("W", [1, 2, 33, sampling._PAIRWISE_RANKS + 5])  # the last: the sorting branch
def test_ranks_are_the_double_stable_argsort(W):
  rng = np.random.default_rng(W)
  conf = rng.choice(np.asarray([0.1, 0.5, -np.inf, np.inf, np.nan, -1e30], np.float32), size=(4, W))
  conf = np.where(rng.random((4, W)) < 0.4, rng.random((4, W)).astype(np.float32), conf)
  want = jnp.argsort(jnp.argsort(-jnp.asarray(conf), axis=-1, stable=True), axis=-1, stable=True)
  np.testing.assert_array_equal(sampling._ranks(jnp.asarray(conf)), want)
  np.testing.assert_array_equal(np.sort(np.asarray(sampling._ranks(jnp.asarray(conf))), -1),
                                np.broadcast_to(np.arange(W), (4, W)))  # a permutation per row


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_window_logits_at_positions_are_the_models_logits(cfg_scale):
  # The sampler applies the head only to gathered rows of the hidden states: each must equal the model's
  # (guided) logits at that position, and the cache of a hidden-state call is the logits call's cache.
  graphdef, params = _peaked_model()
  tokens, valid = sampling.left_pad([[10, 11, 12, 13], [20, 21]], pad_id=0)
  x = jnp.concatenate([jnp.asarray(tokens), jnp.full((2, 8), 4, jnp.int32)], axis=1)
  valid = jnp.concatenate([jnp.asarray(valid), jnp.ones((2, 8), bool)], axis=1)
  logits_of = sampling._model_logits(graphdef, params, valid, P=4, cfg_scale=cfg_scale, mask_id=4)
  lazy, cache = logits_of(x, return_cache=True)
  full, want_cache = model.apply(graphdef, params, x, valid, return_cache=True)
  if cfg_scale:
    uncond, _ = model.apply(graphdef, params, x.at[:, :4].set(4), valid, return_cache=True)
    full = diffusion.guided_logits(full, uncond, scale=cfg_scale)
    want_cache = jax.tree.map(lambda c: c[:, :2], want_cache)  # the conditional half
    cache = jax.tree.map(lambda c: c[:, :2], cache)
  np.testing.assert_array_equal(lazy.at(), full)
  idx = jnp.asarray([[4, 5, 6], [9, 10, 11]])
  np.testing.assert_array_equal(lazy.at(idx), jnp.take_along_axis(full, idx[..., None], axis=1))
  np.testing.assert_array_equal(lazy.window(4, 8).at(), full[:, 4:])
  jax.tree.map(np.testing.assert_array_equal, cache, want_cache)
