"""The simple reverse process used for end-of-training samples."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import tiny_config
from llada_jax import model, sampling


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


def test_kv_cache_with_one_step_per_block_equals_no_cache():
  """With one step per block every step is a block-start refresh (a full pass): exact."""
  graphdef, params = _peaked_model()
  tokens, valid = sampling.left_pad([[10, 11, 12], [13, 14]], pad_id=0)
  outs = {c: sampling.generate(graphdef, params, tokens, valid, mask_id=4, gen_length=16, steps=4,
                               block_length=4, kv_cache=c) for c in ("none", "prefix", "dual")}
  for c in ("prefix", "dual"):
    np.testing.assert_array_equal(outs[c].tokens_BL, outs["none"].tokens_BL)
    np.testing.assert_array_equal(outs[c].commit_step_BL, outs["none"].commit_step_BL)


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
