"""Block diffusion (BD3LM / LLaDA2.0; REFERENCE §14): the four-part attention table against a hand-written
one, the attention backends against a float64 NumPy softmax, the objective's noise and losses against
hand computations, the block-causality of a tiny model, `generate_blocks` against a plain NumPy sampler
that recomputes the whole prefix at every step (no cache), token editing, a sharded run, the config
checks and the block-wise ELBO against its exact value by enumeration.

Cost: one tiny model (NumPy parameters, no init compile) shared by the module, a few jitted forwards
whose shapes are reused, and one `generate_blocks` program per sampling setting (five in all).
"""

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import attention, block_diffusion, diffusion, errors, model, objectives, sampling, sharding
from llada_jax import config as config_lib
from llada_jax.configs import default

MASK = 3   # the mask id of every test here; random tokens are drawn from [MASK + 1, V)
BS = 4     # the tiny model's block size
CFG = config_lib.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                             max_seq_len=64, block_size=BS, dtype="float32", init_std=0.5)
V = CFG.vocab_size


# --------------------------------------------------------------------------------------------------------
# 1. The table: who sees whom
# --------------------------------------------------------------------------------------------------------

# L = 6 tokens, block size 2 (blocks {0,1} {2,3} {4,5}), x_t ++ x_0: rows are queries, columns keys, the
# first six of each the noised half (positions 0..5), the last six the clean half (positions 0..5 again).
#               x_t keys         x_0 keys
HAND_TABLE = [
    [1, 1, 0, 0, 0, 0,   0, 0, 0, 0, 0, 0],  # x_t pos 0 (block 0): its own noised block, no clean block before
    [1, 1, 0, 0, 0, 0,   0, 0, 0, 0, 0, 0],  # x_t pos 1
    [0, 0, 1, 1, 0, 0,   1, 1, 0, 0, 0, 0],  # x_t pos 2 (block 1): noised block 1, clean block 0
    [0, 0, 1, 1, 0, 0,   1, 1, 0, 0, 0, 0],  # x_t pos 3
    [0, 0, 0, 0, 1, 1,   1, 1, 1, 1, 0, 0],  # x_t pos 4 (block 2): noised block 2, clean blocks 0-1
    [0, 0, 0, 0, 1, 1,   1, 1, 1, 1, 0, 0],  # x_t pos 5
    [0, 0, 0, 0, 0, 0,   1, 1, 0, 0, 0, 0],  # x_0 pos 0 (block 0): clean blocks <= 0, never a noised key
    [0, 0, 0, 0, 0, 0,   1, 1, 0, 0, 0, 0],  # x_0 pos 1
    [0, 0, 0, 0, 0, 0,   1, 1, 1, 1, 0, 0],  # x_0 pos 2 (block 1): clean blocks <= 1
    [0, 0, 0, 0, 0, 0,   1, 1, 1, 1, 0, 0],  # x_0 pos 3
    [0, 0, 0, 0, 0, 0,   1, 1, 1, 1, 1, 1],  # x_0 pos 4 (block 2): every clean block
    [0, 0, 0, 0, 0, 0,   1, 1, 1, 1, 1, 1],  # x_0 pos 5
]
POS12 = np.array([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5], np.int32)
NOISED12 = np.array([True] * 6 + [False] * 6)


def test_block_table_of_x_t_and_x_0_equals_the_hand_table():
  want = np.array(HAND_TABLE, bool)
  got = attention.block_table(POS12, POS12, NOISED12, NOISED12, size=2)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(attention.Blocks(2, POS12, POS12, NOISED12, NOISED12).table(), want)

  # Traced (jnp): the positions as arguments, and a schedule's size (StagedSize) whose index points at 2.
  @jax.jit
  def traced(pos, noised, index):
    staged = attention.Blocks(attention.StagedSize((1, 2), index), pos, pos, noised, noised)
    return attention.block_table(pos, pos, noised, noised, size=2, xp=jnp), staged.table(jnp)

  for got in traced(POS12, NOISED12, jnp.int32(1)):
    np.testing.assert_array_equal(np.asarray(got), want)


def test_block_table_without_halves_is_block_causal():
  pos = np.arange(6)
  want = np.array([
      [1, 1, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0],
      [1, 1, 1, 1, 0, 0],
      [1, 1, 1, 1, 0, 0],
      [1, 1, 1, 1, 1, 1],
      [1, 1, 1, 1, 1, 1],
  ], bool)
  np.testing.assert_array_equal(attention.block_table(pos, pos, size=2), want)
  # Blocks of 3 over 7 positions (a ragged last block).
  want3 = np.array([
      [1, 1, 1, 0, 0, 0, 0],
      [1, 1, 1, 0, 0, 0, 0],
      [1, 1, 1, 0, 0, 0, 0],
      [1, 1, 1, 1, 1, 1, 0],
      [1, 1, 1, 1, 1, 1, 0],
      [1, 1, 1, 1, 1, 1, 0],
      [1, 1, 1, 1, 1, 1, 1],
  ], bool)
  np.testing.assert_array_equal(attention.block_table(np.arange(7), np.arange(7), size=3), want3)
  # A cached decode step: queries 4, 5 (block 2) over a cache of 8 keys see keys 0..5, not the next block.
  np.testing.assert_array_equal(attention.block_table(np.array([4, 5]), np.arange(8), size=2),
                                np.array([[1, 1, 1, 1, 1, 1, 0, 0]] * 2, bool))


# --------------------------------------------------------------------------------------------------------
# 2. Attention with blocks: xla against float64 NumPy, splash (Pallas interpret mode) against xla
# --------------------------------------------------------------------------------------------------------

AB, AN, AK, AH = 2, 4, 2, 8  # batch, query heads, kv heads (GQA: two query heads per kv head), head dim
# Row 0: two documents (positions 0-3, then 4-5); row 1: one document, its last position padding.
DOCS6 = np.array([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]], np.int32)
VALID6 = np.array([[True] * 6, [True] * 5 + [False]])
DOCS12, VALID12 = np.concatenate([DOCS6, DOCS6], 1), np.concatenate([VALID6, VALID6], 1)


def _np_attention(q, k, v, mask_BTS):
  """softmax(q k^T / sqrt(H) + mask) v in float64, query head n reading kv head n // (N / K)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  N, K, H = q.shape[2], k.shape[2], q.shape[3]
  k, v = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(H)
  s = np.where(mask_BTS[:, None], s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", w, v)


def _block_attention(impl):
  blocks = lambda docs: attention.Blocks(2, POS12, POS12, NOISED12, NOISED12, docs, docs)
  return jax.jit(lambda q, k, v, valid, docs: attention.attend(q, k, v, valid_BS=valid, causal=False, impl=impl,
                                                               blocks=blocks(docs)))


@pytest.fixture(scope="module")
def block_attention_xla():
  rng = np.random.default_rng(0)
  q = rng.standard_normal((AB, 12, AN, AH)).astype(np.float32)
  k, v = (rng.standard_normal((AB, 12, AK, AH)).astype(np.float32) for _ in range(2))
  out = np.asarray(_block_attention("xla")(q, k, v, VALID12, DOCS12))
  return (q, k, v), out


def test_xla_block_attention_equals_a_float64_reference(block_attention_xla):
  (q, k, v), out = block_attention_xla
  table = np.array(HAND_TABLE, bool)
  mask = table[None] & (DOCS12[:, :, None] == DOCS12[:, None, :]) & VALID12[:, None, :]
  ref = _np_attention(q, k, v, mask)
  rows = VALID12  # padded queries' outputs are meaningless
  np.testing.assert_allclose(out[rows], ref[rows], atol=1e-5, rtol=1e-5)
  # The documents and the padding matter: without them (the table alone) the outputs differ.
  plain = _np_attention(q, k, v, np.broadcast_to(table, (AB, 12, 12)))
  assert np.abs(plain[rows] - ref[rows]).max() > 1e-2


def test_splash_block_attention_equals_xla(block_attention_xla):
  (q, k, v), out_xla = block_attention_xla
  out = np.asarray(_block_attention("splash")(q, k, v, VALID12, DOCS12))  # T = S = 12: padded to 128 inside
  assert np.isfinite(out).all()
  rows = VALID12
  np.testing.assert_allclose(out[rows], out_xla[rows], atol=2e-5, rtol=2e-5)


def test_cudnn_is_refused_for_block_models_and_auto_picks_xla():
  with pytest.raises(ValueError, match=r"model\.attention_impl"):
    attention.resolve("cudnn", dtype="bfloat16", head_dim=64, backend="gpu", blocks=True)
  assert attention.resolve("auto", dtype="bfloat16", head_dim=64, backend="gpu", blocks=True) == "xla"
  assert attention.resolve("auto", dtype="bfloat16", head_dim=64, backend="gpu") == "cudnn"  # blocks decide
  # A block model's config refuses it; a call that asks for blocks (block_size=) of a cuDNN model is refused
  # while tracing, before any cuDNN call (this is a CPU).
  with pytest.raises(ValueError, match=r"config field 'model\.attention_impl'"):
    dataclasses.replace(CFG, attention_impl="cudnn", dtype="bfloat16")
  cfg = dataclasses.replace(CFG, block_size=0, attention_impl="cudnn", dtype="bfloat16")
  graphdef, abstract = model.abstract_model(cfg)
  with pytest.raises(ValueError, match=r"model\.attention_impl='cudnn' cannot express block-causal"):
    jax.eval_shape(lambda p: model.apply(graphdef, p, jnp.zeros((1, 8), jnp.int32), block_size=BS), abstract)


# --------------------------------------------------------------------------------------------------------
# 3-4. The forward process and the losses, with hand-made scores
# --------------------------------------------------------------------------------------------------------


def _tokens(rng, shape):
  return rng.integers(MASK + 1, V, size=shape).astype(np.int32)


def _other(token):
  """A token other than `token` (and than the mask)."""
  return MASK + 1 if token != MASK + 1 else MASK + 2


_OPTIONS = {}  # the model options the objective passed to its score_fn (recorded while tracing)


@functools.partial(jax.jit, static_argnames=("weighting", "t_min", "t_max"))
def _objective(nll, key, tokens, valid=None, prompt_len=None, *, weighting="inverse_t", t_min=0.0, t_max=1.0):
  """`block_diffusion_objective` with a hand-made score_fn that returns the fixed table `nll` [B, 2L]
  whatever its inputs; also what that score_fn was called with (inputs, valid, targets)."""
  seen = []

  def score_fn(inputs, valid_in, targets, **options):
    seen.append((inputs, valid_in, targets))
    _OPTIONS.update(options)
    return diffusion.TokenScores(nll, jnp.zeros(nll.shape, bool))

  out = block_diffusion.block_diffusion_objective(score_fn, key, tokens_BL=tokens, mask_id=MASK, block_size=BS,
                                                  valid_BL=valid, prompt_len_B=prompt_len, weighting=weighting,
                                                  t_min=t_min, t_max=t_max)
  return out, seen[0]


_noise = jax.jit(block_diffusion.block_noise, static_argnames=("mask_id", "eps", "t_min", "t_max", "complementary"))

OBJ_B, OBJ_L = 2, 8  # one shape for the objective tests (one compile per weighting / SFT)


def _keys_masking_some(tokens, maskable):
  """Keys (in a fixed order) whose draw masks at least one and leaves at least one maskable position of every
  row, so an example has both kinds of position."""
  for i in range(1000):
    key = jax.random.key(i)
    masked = np.asarray(_noise(key, tokens_BL=tokens, maskable_BL=maskable, mask_id=MASK).masked_BL)
    if (masked.sum(1) > 0).all() and ((maskable & ~masked).sum(1) > 0).all():
      yield key


def test_loss_reads_only_the_x_t_half():
  rng = np.random.default_rng(1)
  tokens = _tokens(rng, (OBJ_B, OBJ_L))
  nll = rng.uniform(0.5, 3.0, (OBJ_B, 2 * OBJ_L)).astype(np.float32)
  key = next(_keys_masking_some(tokens, np.ones((OBJ_B, OBJ_L), bool)))
  loss = lambda table: float(_objective(table, key, tokens)[0].loss)
  out, (inputs, valid, targets) = _objective(nll, key, tokens)
  base = float(out.loss)
  inputs, valid, targets = np.asarray(inputs), np.asarray(valid), np.asarray(targets)
  L = OBJ_L
  # The model got x_t ++ x_0 with targets the clean tokens twice, as a noised-half call.
  assert inputs.shape == (OBJ_B, 2 * L) and _OPTIONS["noised_half"] is True and _OPTIONS["block_size"] == BS
  np.testing.assert_array_equal(inputs[:, L:], tokens)
  np.testing.assert_array_equal(targets, np.concatenate([tokens, tokens], 1))
  assert valid.all()
  masked = inputs[:, :L] == MASK
  np.testing.assert_array_equal(inputs[:, :L][~masked], tokens[~masked])
  assert masked.any() and (~masked).any()
  # Any change to the x_0 half's scores leaves the loss as it was.
  changed = nll.copy()
  changed[:, L:] = rng.uniform(10.0, 20.0, (OBJ_B, L))
  assert loss(changed) == base
  # A masked x_t position's score counts, an unmasked one's does not.
  b, i = np.argwhere(masked)[0]
  bumped = nll.copy()
  bumped[b, i] += 1.0
  assert loss(bumped) > base + 1e-3
  b, i = np.argwhere(~masked)[0]
  bumped = nll.copy()
  bumped[b, i] += 1.0
  assert loss(bumped) == base


def test_inverse_t_and_mean_weightings_by_hand():
  """Pre-training: the masks and p come back from `block_noise` with the objective's own key; 'inverse_t' is
  sum(masked nll / p) over the batch / (B * L), 'mean' the plain mean of the masked nll."""
  rng = np.random.default_rng(2)
  tokens = _tokens(rng, (OBJ_B, OBJ_L))
  nll = rng.uniform(0.5, 3.0, (OBJ_B, 2 * OBJ_L)).astype(np.float32)
  key = next(_keys_masking_some(tokens, np.ones((OBJ_B, OBJ_L), bool)))
  noise = _noise(key, tokens_BL=tokens, maskable_BL=np.ones((OBJ_B, OBJ_L), bool), mask_id=MASK)
  masked, p = np.asarray(noise.masked_BL), np.asarray(noise.p_mask_B, np.float64)
  out, (inputs, _, _) = _objective(nll, key, tokens)
  np.testing.assert_array_equal(np.asarray(inputs)[:, :OBJ_L] == MASK, masked)
  want = sum(nll[b, i] / p[b] for b in range(OBJ_B) for i in range(OBJ_L) if masked[b, i]) / (OBJ_B * OBJ_L)
  np.testing.assert_allclose(float(out.loss), want, rtol=1e-6)
  assert int(out.num_masked) == masked.sum()
  out, _ = _objective(nll, key, tokens, weighting="mean")  # dFactory's SFT: no 1/p
  np.testing.assert_allclose(float(out.loss), np.mean(nll[:, :OBJ_L][masked]), rtol=1e-6)


def test_sft_keeps_the_prompt_clean_and_rounds_rows_to_whole_blocks():
  """Row 0: prompt 3, 5 valid tokens -> rounded up to 8 (blocks of 4): a 5-position response; row 1: prompt 2,
  all 8 valid. 'inverse_t' is per row sum(masked nll / p) / response length, averaged over the rows."""
  L = OBJ_L
  rng = np.random.default_rng(3)
  tokens = _tokens(rng, (OBJ_B, L))
  valid = np.arange(L)[None] < np.array([[5], [8]])
  prompt_len = np.array([3, 2], np.int32)
  rounded = np.ones((OBJ_B, L), bool)  # row 0: 5 valid tokens round up to 8, the whole row
  response = np.arange(L)[None] >= prompt_len[:, None]
  nll = rng.uniform(0.5, 3.0, (OBJ_B, 2 * L)).astype(np.float32)
  key = next(_keys_masking_some(tokens, response))
  out, (inputs, valid_in, _) = _objective(nll, key, tokens, valid, prompt_len)
  np.testing.assert_array_equal(np.asarray(valid_in), np.concatenate([rounded, rounded], 1))
  masked = np.asarray(inputs)[:, :L] == MASK
  assert not (masked & ~response).any() and masked.any()
  noise = _noise(key, tokens_BL=tokens, maskable_BL=response, mask_id=MASK)
  np.testing.assert_array_equal(np.asarray(noise.masked_BL), masked)
  p = np.asarray(noise.p_mask_B, np.float64)
  per_row = [np.sum(nll[b, :L][masked[b]]) / p[b] / response[b].sum() for b in range(OBJ_B)]
  np.testing.assert_allclose(float(out.loss), np.mean(per_row), rtol=1e-6)


def test_complementary_masks_cover_each_maskable_token_once():
  B, L, eps = 3, 16, 1e-3
  rng = np.random.default_rng(4)
  tokens = _tokens(rng, (B, L))
  maskable = rng.random((B, L)) < 0.7
  pair = _noise(jax.random.key(5), tokens_BL=tokens, maskable_BL=maskable, mask_id=MASK, eps=eps, complementary=True)
  masked, p2 = np.asarray(pair.masked_BL), np.asarray(pair.p_mask_B)
  assert masked.shape == (2 * B, L) and p2.shape == (2 * B,)
  first, p = masked[:B], p2[:B]
  assert first.any() and (maskable & ~first).any()
  np.testing.assert_array_equal(np.asarray(pair.rows), [0, 1, 2, 0, 1, 2])
  np.testing.assert_array_equal(np.asarray(pair.tokens_BL), np.concatenate([tokens, tokens]))
  assert not (first & ~maskable).any()
  np.testing.assert_array_equal(masked[B:], maskable & ~first)
  np.testing.assert_allclose(p2[B:], np.maximum(1.0 - p, eps), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(pair.noisy_BL), np.where(masked, MASK, np.concatenate([tokens, tokens])))
  # Each maskable token is masked in exactly one row of its pair; the others in none.
  np.testing.assert_array_equal(masked[:B].astype(int) + masked[B:], maskable.astype(int))


def test_clipped_band_keeps_every_p_inside_it():
  B, L, eps = 512, 64, 1e-3
  noise = _noise(jax.random.key(9), tokens_BL=np.full((B, L), MASK + 1, np.int32), maskable_BL=np.ones((B, L), bool),
                 mask_id=MASK, eps=eps, t_min=0.3, t_max=0.8)
  p, masked = np.asarray(noise.p_mask_B), np.asarray(noise.masked_BL)
  assert p.min() >= 0.3 and p.max() <= 0.8 + eps
  assert p.min() < 0.32 and p.max() > 0.78  # the whole band is used, not one end of it
  # Each row masks at its rate (binomial, 5 standard deviations over the 512 rows).
  assert np.all(np.abs(masked.mean(1) - p) <= 5 * np.sqrt(p * (1 - p) / L) + 1 / L)


def test_round_to_blocks():
  valid = np.zeros((4, 10), bool)
  for row, n in enumerate((5, 8, 0, 10)):
    valid[row, :n] = True
  got, staged = jax.jit(lambda v, index: (block_diffusion.round_to_blocks(v, 4), block_diffusion.round_to_blocks(
      v[:1], attention.StagedSize((2, 4), index))))(valid, jnp.int32(0))
  want = np.zeros((4, 10), bool)
  want[0, :8] = True   # 5 -> 8
  want[1, :8] = True   # 8 stays
  want[3, :] = True    # 10 -> 12, cut at the row's 10
  np.testing.assert_array_equal(np.asarray(got), want)
  # A schedule's size: StagedSize((2, 4), 0) is 2, so 5 -> 6.
  np.testing.assert_array_equal(np.asarray(staged), [[True] * 6 + [False] * 4])


def test_block_size_at_follows_the_schedule():
  c = default.block(default.get_config("tiny"), block_size=8)
  c.block.schedule = ((2, 3), (4, 5))
  c.train.num_steps = 20
  cfg = config_lib.from_config_dict(c)
  sizes = {s: int(block_diffusion.size_value(objectives.block_size_at(cfg, jnp.int32(s)))) for s in (0, 2, 3, 4, 5, 9)}
  assert sizes == {0: 2, 2: 2, 3: 4, 4: 4, 5: 8, 9: 8}
  assert objectives.block_size_at(cfg, None) == 8  # validation: the model's own


# --------------------------------------------------------------------------------------------------------
# The tiny block model shared below
# --------------------------------------------------------------------------------------------------------

MASK_HEAD_SCALE = 4.0


class BlockModel:
  """CFG's graphdef with random NumPy parameters (std 0.5, so predictions depend on the context and are
  peaked: top probabilities spread over ~0.2-0.8) and the jitted forwards the tests reuse. The output
  head's mask column is scaled up, so the mask token is often the most likely prediction: a sampler must
  then pass over it for x0, while its probability still counts in p0."""

  def __init__(self, seed=0):
    self.graphdef, self.abstract = model.abstract_model(CFG)
    rng = np.random.default_rng(seed)
    fill = lambda path, x: (np.ones(x.shape) if "norm" in jax.tree_util.keystr(path)
                            else CFG.init_std * rng.standard_normal(x.shape)).astype(np.float32)
    self.params = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(self.abstract))
    self.params["lm_head"][:, MASK] *= MASK_HEAD_SCALE
    gd = self.graphdef
    self._plain = jax.jit(lambda p, x, v: model.apply(gd, p, x, v))
    self._noised = jax.jit(lambda p, x, v, seg: model.apply(gd, p, x, v, noised_half=True, segment_BT=seg))

  def plain(self, x, valid=None):
    """Logits [B, T, V] of a plain (block-causal) call."""
    valid = np.ones(np.shape(x), bool) if valid is None else valid
    return np.asarray(self._plain(self.params, jnp.asarray(x, jnp.int32), jnp.asarray(valid)))

  def noised(self, x, valid=None, segments=None):
    """Logits [B, 2L, V] of x_t ++ x_0 (a noised-half call); segments: document ids [B, 2L]."""
    valid = np.ones(np.shape(x), bool) if valid is None else valid
    segments = np.zeros(np.shape(x), np.int32) if segments is None else segments
    return np.asarray(self._noised(self.params, jnp.asarray(x, jnp.int32), jnp.asarray(valid),
                                   jnp.asarray(segments, jnp.int32)))


@pytest.fixture(scope="module")
def bm():
  return BlockModel()


ML = 16  # the length of the causality tests: blocks 0..3


def _changed(a, b, tol=1e-4):
  """Per position: do the logits differ (max over the vocabulary)?"""
  return np.abs(a - b).max(-1) > tol


# --------------------------------------------------------------------------------------------------------
# 5. Block-causality of the model
# --------------------------------------------------------------------------------------------------------


def test_plain_call_is_block_causal(bm):
  rng = np.random.default_rng(5)
  x = _tokens(rng, (ML,))
  y = x.copy()
  y[9] = _other(x[9])  # block 2
  logits = bm.plain(np.stack([x, y]))
  np.testing.assert_array_equal(logits[0, :8], logits[1, :8])  # blocks 0-1: bit for bit
  assert _changed(logits[0, 8:], logits[1, 8:]).all()          # block 2 (bidirectional inside) and block 3


def test_noised_half_call_reads_clean_earlier_blocks_and_its_own_noised_block(bm):
  rng = np.random.default_rng(6)
  x0 = _tokens(rng, (ML,))
  xt = np.where(rng.random(ML) < 0.5, MASK, x0)
  base = np.concatenate([xt, x0])
  clean_changed = base.copy()
  clean_changed[ML + 5] = _other(x0[5])  # x_0 block 1
  noised_changed = base.copy()
  noised_changed[5] = MASK if xt[5] != MASK else x0[5]  # x_t block 1
  logits = bm.noised(np.stack([base, clean_changed, noised_changed]))
  # A clean token of block 1: the x_t half of blocks 0-1 never sees it, blocks 2 and 3 do.
  np.testing.assert_array_equal(logits[0, :8], logits[1, :8])
  assert _changed(logits[0, 8:ML], logits[1, 8:ML]).all()
  # ... and in the x_0 half, block 0 does not, blocks 1-3 do.
  np.testing.assert_array_equal(logits[0, ML:ML + 4], logits[1, ML:ML + 4])
  assert _changed(logits[0, ML + 4:], logits[1, ML + 4:]).all()
  # A noised token of block 1 changes x_t block 1 (positions 4-7) and nothing else.
  outside = np.ones(2 * ML, bool)
  outside[4:8] = False
  np.testing.assert_array_equal(logits[0, outside], logits[2, outside])
  assert _changed(logits[0, 4:8], logits[2, 4:8]).all()


def test_documents_do_not_see_each_other(bm):
  rng = np.random.default_rng(7)
  x0 = _tokens(rng, (ML,))
  xt = np.where(rng.random(ML) < 0.5, MASK, x0)
  base = np.concatenate([xt, x0])
  docs = np.concatenate([[0] * 6 + [1] * 10] * 2)  # a boundary inside block 1
  changed = base.copy()
  changed[[2, ML + 2]] = _other(x0[2])  # document 0, both halves
  rows = np.stack([base, changed, base])
  logits = bm.noised(rows, segments=np.stack([docs, docs, np.zeros_like(docs)]))
  doc1 = docs == 1
  np.testing.assert_array_equal(logits[0, doc1], logits[1, doc1])
  assert _changed(logits[0, ML:ML + 6], logits[1, ML:ML + 6]).all()  # document 0's clean half sees it
  # The documents do something: one document gives document 1's positions other logits.
  assert _changed(logits[0, doc1], logits[2, doc1]).all()


# --------------------------------------------------------------------------------------------------------
# 6-8. generate_blocks: against a NumPy sampler without cache, token editing, a sharded run
# --------------------------------------------------------------------------------------------------------

PROMPTS = ([10, 11, 12, 13, 14], [20, 21, 22])  # left-padded to P = 5: the first window is block 1
GEN = 6                                           # gen_length: 5 + 6 = 11 positions come back
CANVAS = 12                                       # what is decoded: whole blocks, ceil(11 / 4) * 4


def _softmax64(logits):
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _reference_blocks(bm, tokens, valid, *, gen_length, steps, threshold):
  """LLaDA2.0's block sampler from its description, without any cache: for each block from the one that
  holds the prompt's end, at most `steps` steps while it holds a mask; each step runs the model on the
  whole prefix up to the block's end, predicts x0 = argmax (never the mask id) with p0 its softmax
  probability, and per row unmasks every masked position with p0 > threshold if there are at least k of
  them, else the k most confident (ties to the lower position); k = min(schedule[step], #masked). Returns
  (tokens, commit steps, steps per row, how often each rule fired and a commit passed over the mask)."""
  B, P = tokens.shape
  L = -(-(P + gen_length) // BS) * BS
  x = np.concatenate([tokens, np.full((B, L - P), MASK)], 1)
  v = np.concatenate([valid, np.ones((B, L - P), bool)], 1)
  commit = np.full((B, L), -1)
  steps_B = np.zeros(B, int)
  schedule = sampling.transfer_schedule(BS, steps)
  fired = {"threshold": 0, "top_k": 0, "mask_on_top": 0}
  step_index = 0
  for lo in range(P // BS * BS, L, BS):
    hi = lo + BS
    for step in range(steps):
      if not (x[:, lo:hi] == MASK).any():
        break
      # The prefix x[:, :hi], run at width ML (a shape compiled above) with everything after it padding.
      wide = lambda a, fill: np.concatenate([a, np.full((B, ML - L), fill, a.dtype)], 1)
      logits = bm.plain(wide(x, MASK), wide(v & (np.arange(L) < hi), False))[:, lo:hi]
      choice = logits.astype(np.float64)
      choice[..., MASK] = -np.inf
      x0 = choice.argmax(-1)
      mask_on_top = logits.argmax(-1) == MASK
      p0 = np.take_along_axis(_softmax64(logits), x0[..., None], -1)[..., 0]
      for r in range(B):
        steps_B[r] += (x[r] == MASK).any()
        masked = np.flatnonzero(x[r, lo:hi] == MASK)
        k = min(schedule[step], len(masked))
        sure = [i for i in masked if threshold is not None and p0[r, i] > threshold]
        if threshold is not None and len(sure) >= k:
          chosen = sure
          fired["threshold"] += len(sure) > k
        else:
          chosen = sorted(masked, key=lambda i: (-p0[r, i], i))[:k]
          fired["top_k"] += 1
        for i in chosen:
          x[r, lo + i] = x0[r, i]
          commit[r, lo + i] = step_index
          fired["mask_on_top"] += mask_on_top[r, i]
      step_index += 1
  end = P + gen_length
  return x[:, :end], commit[:, :end], steps_B, fired


class Recorder:
  """An `observe` function: (step, x) of every step, on the host."""

  def __init__(self):
    self.seen = []

  def __call__(self, step, x):
    self.seen.append((int(step), np.asarray(x).copy()))

  def take(self):
    jax.effects_barrier()
    seen, self.seen = self.seen, []
    return seen


RECORDER = Recorder()  # one function object: it is part of each program's cache key
SETTINGS = [(None, 4), (None, 3), (0.4, 3)]  # (threshold, steps per block); 3 steps: schedule [2, 1, 1]
_RUNS = {}


def _run_blocks(bm, threshold, steps):
  """generate_blocks on PROMPTS (single device), once per setting; (tokens, commit, steps_B, observed)."""
  if (threshold, steps) not in _RUNS:
    tokens, valid = sampling.left_pad(PROMPTS, pad_id=0)
    out = sampling.generate_blocks(bm.graphdef, bm.params, tokens, valid, block_size=BS, mask_id=MASK,
                                   gen_length=GEN, steps=steps, block_length=BS, threshold=threshold,
                                   observe=RECORDER)
    _RUNS[threshold, steps] = tuple(np.asarray(a) for a in out) + (RECORDER.take(),)
  return _RUNS[threshold, steps]


_REFERENCES = {}


def _reference_run(bm, threshold, steps):
  """`_reference_blocks` on PROMPTS, once per setting."""
  if (threshold, steps) not in _REFERENCES:
    tokens, valid = sampling.left_pad(PROMPTS, pad_id=0)
    _REFERENCES[threshold, steps] = _reference_blocks(bm, tokens, valid, gen_length=GEN, steps=steps,
                                                      threshold=threshold)
  return _REFERENCES[threshold, steps]


@pytest.mark.parametrize("threshold, steps", SETTINGS)
def test_generate_blocks_equals_recomputing_the_prefix_at_every_step(bm, threshold, steps):
  tokens, valid = sampling.left_pad(PROMPTS, pad_id=0)
  got, commit, steps_B, _ = _run_blocks(bm, threshold, steps)
  want, want_commit, want_steps, fired = _reference_run(bm, threshold, steps)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(commit, want_commit)
  np.testing.assert_array_equal(steps_B, want_steps)
  P = tokens.shape[1]
  assert not (got == MASK).any()
  assert len(np.unique(got[:, P:])) > 3 and not np.array_equal(got[0, P:], got[1, P:])  # not trivially constant
  if threshold is not None:  # both of the step's rules were used
    assert fired["threshold"] > 0 and fired["top_k"] > 0, fired


def test_settings_give_different_samples(bm):
  """The settings above are not three runs of one computation: the step counts and the threshold change
  what is committed when, so the comparisons above test the schedule and the threshold rule. And the
  mask-exclusion detail is exercised: somewhere a committed position had the mask as the model's top choice."""
  runs = [_run_blocks(bm, t, s) for t, s in SETTINGS]
  assert not np.array_equal(runs[0][1], runs[1][1]) and not np.array_equal(runs[1][1], runs[2][1])
  assert len({tokens.tobytes() for tokens, *_ in runs}) > 1  # and the model is sharp enough for it to matter
  assert sum(_reference_run(bm, t, s)[3]["mask_on_top"] for t, s in SETTINGS) > 0


def test_without_editing_no_filled_token_is_ever_rewritten(bm):
  tokens, _ = sampling.left_pad(PROMPTS, pad_id=0)
  P = tokens.shape[1]
  for threshold, steps in SETTINGS:
    final, _, _, seen = _run_blocks(bm, threshold, steps)
    assert [s for s, _ in seen] == list(range(len(seen)))
    prev = np.concatenate([tokens, np.full((2, CANVAS - P), MASK)], 1)
    for _, x in seen:
      filled = prev != MASK
      np.testing.assert_array_equal(x[filled], prev[filled])
      prev = x
    np.testing.assert_array_equal(prev[:, :final.shape[1]], final)


# The editing run: 4 steps per block with a low threshold (so a block can fill early), re-write a filled token
# whose prediction differs with p0 > 0.4, at most 2 steps on a full block. With this model (asserted below)
# block 1 fills in 2 steps, re-writes in both steps after and ends on the cap, 2 steps before its budget
# (4 + 2); block 2 fills in one step that re-writes nothing and ends there.
EDIT = dict(steps=4, threshold=0.2, tau_edit=0.4, max_post_steps=2)


@pytest.fixture(scope="module")
def editing_run(bm):
  tokens, valid = sampling.left_pad(PROMPTS, pad_id=0)
  out = sampling.generate_blocks(bm.graphdef, bm.params, tokens, valid, block_size=BS, mask_id=MASK,
                                 gen_length=GEN, block_length=BS, observe=RECORDER, **EDIT)
  return tokens, tuple(np.asarray(a) for a in out), RECORDER.take()


def _replay_editing(tokens, seen, *, post_steps):
  """Replays observed steps against the documented control of token editing and asserts it step by step:
  the current block is stepped while it holds a mask (each such step commits at least one), then again only
  while the previous step re-wrote a filled token, at most `post_steps` steps starting with it full; then
  the next block. Every change of a step (commits and re-writes) lies in the current block, never in the
  prompt. Returns (final canvas, step of each position's last change, re-writes, per block: how it ended,
  after how many steps, how many of them started with it full)."""
  B, P = tokens.shape
  L = CANVAS
  x = np.concatenate([tokens, np.full((B, L - P), MASK)], 1)
  assert [s for s, _ in seen] == list(range(len(seen)))
  cur, post, used, rewrites, ended = P // BS * BS, 0, 0, 0, []
  last_change = np.full((B, L), -1)
  for step, nxt in seen:
    assert cur < L, "a step after the last block was done"
    changed = nxt != x
    last_change[changed] = step
    where = np.argwhere(changed)[:, 1]
    assert (where >= max(cur, P)).all() and (where < cur + BS).all(), (step, cur, where)
    rewrote = changed & (x != MASK)
    rewrites += rewrote.sum()
    if (x[:, cur:cur + BS] == MASK).any():
      assert (changed & (x == MASK)).any(), f"step {step} on block {cur // BS} unmasked nothing"
    else:
      post += 1  # this step started with the block full
    used += 1
    x = nxt
    if (x[:, cur:cur + BS] == MASK).any() or (rewrote.any() and post < post_steps):
      continue  # the block stays current
    ended.append(("cap" if rewrote.any() else "no edit", used, post))
    cur, post, used = cur + BS, 0, 0
  assert cur == L, "stopped before the last block was done"
  return x, last_change, rewrites, ended


def test_token_editing_rewrites_only_the_current_block_and_stops_as_documented(editing_run):
  tokens, (final, commit, _), seen = editing_run
  P = tokens.shape[1]
  x, last_change, rewrites, ended = _replay_editing(tokens, seen, post_steps=EDIT["max_post_steps"])
  np.testing.assert_array_equal(x[:, :P + GEN], final)
  np.testing.assert_array_equal(final[:, :P], tokens)
  assert not (final == MASK).any()
  # A position's commit step is the step of its last change (re-writes included).
  np.testing.assert_array_equal(commit, last_change[:, :P + GEN])
  # The run exercises what it checks: re-writes, and both ways a block ends while the other would not have
  # ended it: the cap before the block's step budget (steps + max_post_steps) ran out, and a step without
  # re-writes before the cap.
  assert rewrites > 0
  assert any(why == "cap" and n < EDIT["steps"] + EDIT["max_post_steps"] for why, n, _ in ended), ended
  assert any(why == "no edit" and post < EDIT["max_post_steps"] for why, _, post in ended), ended


def test_sharded_generate_blocks_equals_the_single_device_run(bm, devices):
  """8 rows (the two prompts, four times) on the 8-device mesh: one row per 'fsdp' device, the parameters
  sharded over them along 'embed'. Each row equals its single-device result."""
  threshold, steps = SETTINGS[2]
  want = _run_blocks(bm, threshold, steps)
  mesh_cfg = config_lib.MeshConfig(rule_set="fsdp", fsdp=8)
  mesh = sharding.make_mesh(mesh_cfg, devices)
  params = jax.device_put(bm.params, sharding.tree_shardings(sharding.param_logical_axes(bm.abstract), mesh_cfg,
                                                             mesh))
  assert not params["lm_head"].sharding.is_fully_replicated
  tokens, valid = sampling.left_pad(PROMPTS, pad_id=0)
  rows = sharding.batch_sharding(mesh_cfg, mesh)
  tokens8, valid8 = (jax.device_put(np.tile(a, (4, 1)), rows) for a in (tokens, valid))
  with sharding.use_rules(mesh_cfg, mesh):
    out = sampling.generate_blocks(bm.graphdef, params, tokens8, valid8, block_size=BS, mask_id=MASK,
                                   gen_length=GEN, steps=steps, block_length=BS, threshold=threshold)
  for got, ref in zip(out, want[:3]):
    np.testing.assert_array_equal(np.asarray(got), np.tile(ref, (4, 1)) if ref.ndim == 2 else np.tile(ref, 4))


# --------------------------------------------------------------------------------------------------------
# 9. Bad block settings: one line naming the field
# --------------------------------------------------------------------------------------------------------

def _block_config(block_size, **changes):
  c = default.block(default.get_config("tiny"), block_size=block_size)
  for key, value in changes.items():
    section, field = key.split(".")
    c[section][field] = value
  return config_lib.from_config_dict(c)


@pytest.mark.parametrize("block_size, changes, field", [
    (5, {}, "model.block_size"),                               # does not divide train.seq_len=32
    (128, {"model.max_seq_len": 64}, "model.block_size"),      # more than model.max_seq_len
    (8, {"block.schedule": ((4, 10), (2, 5))}, "block.schedule"),  # until_step not increasing
    (8, {"block.schedule": ((3, 10),)}, "block.schedule"),     # a stage's size does not divide seq_len
    (0, {}, "model.block_size"),                               # a block objective on a bidirectional model
    (8, {"diffusion.objective": "pretrain"}, "model.block_size"),  # a block model on a non-block objective
    (8, {"model.attention_impl": "cudnn"}, "model.attention_impl"),  # cuDNN cannot express the block mask
])
def test_bad_block_config_names_the_field_in_one_line(block_size, changes, field):
  with pytest.raises(ValueError) as e:
    _block_config(block_size, **changes)
  message = str(e.value)
  assert field in message and "\n" not in message, message


def test_good_block_config_builds():
  cfg = _block_config(8, **{"block.schedule": ((2, 10),)})
  assert cfg.model.block_size == 8 and cfg.diffusion.objective == "block_diffusion"


@pytest.mark.parametrize("options, field", [
    (dict(block_length=8), "block_length"),
    (dict(steps=5), "steps"),
    (dict(gen_length=60), "gen_length"),  # canvas ceil((5 + 60) / 4) * 4 = 68 > max_seq_len 64
    (dict(cfg_scale=1.0), "cfg_scale"),
    (dict(kv_cache="prefix"), "kv_cache"),
    (dict(tau_edit=0.0), "tau_edit"),
])
def test_bad_sampling_options_name_the_option_before_compiling(bm, monkeypatch, options, field):
  monkeypatch.setattr(sampling, "_generate_blocks", lambda *a, **k: pytest.fail("compiled despite a bad option"))
  tokens, valid = sampling.left_pad(PROMPTS, pad_id=0)
  kw = dict(gen_length=GEN, steps=BS, block_length=BS) | options
  with pytest.raises(errors.OptionError) as e:
    sampling.generate_blocks(bm.graphdef, bm.params, tokens, valid, block_size=BS, mask_id=MASK,
                             max_seq_len=CFG.max_seq_len, **kw)
  assert e.value.option == field and field in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------------
# 10. The block-wise ELBO
# --------------------------------------------------------------------------------------------------------

EL, EP = 16, 10            # sequence length, prompt length: a 6-token response over blocks 2 and 3
ER, ES = 16, 96            # rows (one key each) x samples per row; ES is a multiple of the response length


@pytest.fixture(scope="module")
def elbo_fn(bm):
  gd = bm.graphdef
  logits_fn = lambda x, v, **options: model.apply(gd, bm.params, x, v, **options)

  @jax.jit
  def both(keys, tokens, prompt_len):
    run = lambda est: diffusion.conditional_elbo(
        logits_fn, keys, tokens_BL=tokens, prompt_len_B=prompt_len, valid_BL=jnp.ones(tokens.shape, bool),
        mask_id=MASK, num_samples=ES, estimator=est, noised_half=True)
    return run("l"), run("t")

  return lambda keys, tokens, prompt_len: tuple(np.asarray(a, np.float64) for a in both(
      keys, jnp.asarray(tokens, jnp.int32), jnp.asarray(prompt_len, jnp.int32)))


def _exact_block_elbo(logits_of, x, prompt_len):
  """sum over nonempty masked sets M of the response: (|M|-1)! (n-|M|)! / n! * sum_{i in M} log p(x_i | M),
  the x_t half masked at M. `logits_of(rows [R, L]) -> logits [R, L, V]` for the rows' noisy inputs."""
  L = len(x)
  resp = list(range(prompt_len, L))
  n = len(resp)
  sets = [m for r in range(1, n + 1) for m in itertools.combinations(resp, r)]
  noisy = np.stack([np.where(np.isin(np.arange(L), m), MASK, x) for m in sets])
  logp = np.log(_softmax64(logits_of(noisy)))
  total = 0.0
  for row, m in enumerate(sets):
    c = math.factorial(len(m) - 1) * math.factorial(n - len(m)) / math.factorial(n)
    total += c * sum(logp[row, i, x[i]] for i in m)
  return total


def _in_batches(fn, rows, size):
  """fn over `size` rows at a time (a batch the forward already compiled for), the last batch padded."""
  n = len(rows)
  rows = np.concatenate([rows, np.repeat(rows[:1], -n % size, 0)])
  return np.concatenate([fn(rows[i:i + size]) for i in range(0, len(rows), size)])[:n]


def test_block_elbo_estimators_agree_with_the_exact_value(bm, elbo_fn):
  x = _tokens(np.random.default_rng(8), (EL,))
  keys = jax.random.split(jax.random.key(12), ER)
  est_l, est_t = elbo_fn(keys, np.tile(x, (ER, 1)), np.full(ER, EP))
  block_wise = lambda noisy: bm.noised(np.concatenate([noisy, np.tile(x, (len(noisy), 1))], 1))[:, :EL]
  exact = _exact_block_elbo(lambda rows: _in_batches(block_wise, rows, 3), x, EP)
  se = lambda e: e.std(ddof=1) / np.sqrt(len(e))
  assert abs(est_l.mean() - exact) < 5 * se(est_l) + 1e-3, (est_l.mean(), exact, se(est_l))
  assert abs(est_t.mean() - exact) < 5 * se(est_t) + 1e-3, (est_t.mean(), exact, se(est_t))
  assert abs(est_l.mean() - est_t.mean()) < 5 * np.hypot(se(est_l), se(est_t)) + 1e-3
  # The bound is the block-wise one: the ELBO of the noisy sequence through a plain call (later blocks
  # seeing the masks of earlier ones) is another number, which the 'l' comparison above rejects.
  plain = _exact_block_elbo(lambda rows: _in_batches(bm.plain, rows, 2), x, EP)
  assert abs(est_l.mean() - plain) > 5 * se(est_l) + 1e-3, (plain, exact, se(est_l))  # by about twice as much


def test_one_token_block_elbo_is_the_exact_log_prob(bm, elbo_fn):
  rng = np.random.default_rng(9)
  x = _tokens(rng, (ER, EL))
  keys = jax.random.split(jax.random.key(13), ER)
  est_l, _ = elbo_fn(keys, x, np.full(ER, EL - 1))
  noisy = x.copy()
  noisy[:, -1] = MASK
  logits = _in_batches(bm.noised, np.concatenate([noisy, x], 1), 3)[:, EL - 1]
  want = np.log(_softmax64(logits))[np.arange(ER), x[:, -1]]
  np.testing.assert_allclose(est_l, want, rtol=1e-5, atol=1e-5)
