"""Masked diffusion (llada_jax.diffusion): the forward process, the random-length crop and every loss,
checked against statistics and against cross-entropies computed by hand in float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import diffusion

MASK = 4


def _np_ce(logits, tokens):
  """-log softmax(logits)[token] in float64, per position."""
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  return logz - np.take_along_axis(logits, np.asarray(tokens)[..., None], -1)[..., 0]


def _fixed_tokens(B, L, vocab=1000):
  """Tokens in [MASK + 1, vocab): never equal to the mask id, so masked positions are recognisable."""
  return (jnp.arange(B * L, dtype=jnp.int32).reshape(B, L) * 7919) % (vocab - MASK - 1) + MASK + 1


OB, OL, OV, DRAWS = 4, 32, 64, 2048  # one shape (SFT and pre-training) for every objective test: one compile
OTOKENS = _fixed_tokens(OB, OL, vocab=OV)


# --- Forward process -----------------------------------------------------------------------------------


@jax.jit
def _noise(rng, tokens, eps, maskable=None):
  return diffusion.forward_process(rng, tokens_BL=tokens, mask_id=MASK, eps=eps, maskable_BL=maskable)


@pytest.mark.parametrize("eps", [1e-3, 0.5])
def test_forward_process_masks_each_row_at_its_rate(eps):
  """Per row, the fraction masked matches p_mask (binomial, 5 std); p = (1-eps) t + eps with t ~ U(0,1);
  masked positions hold the mask id and the others keep their token."""
  B, L = 256, 4096
  tokens = _fixed_tokens(B, L)
  noisy, masked, p = (np.asarray(a) for a in _noise(jax.random.key(0), tokens, eps))
  assert noisy.shape == (B, L) and masked.dtype == bool and p.shape == (B,) and p.dtype == np.float32
  assert np.all(p >= eps - 1e-7) and np.all(p <= 1.0)
  rate = masked.mean(axis=1)
  std = np.sqrt(p * (1 - p) / L)
  assert np.all(np.abs(rate - p) <= 5 * std + 1.0 / L), np.max(np.abs(rate - p) / (std + 1e-9))
  np.testing.assert_array_equal(noisy[masked], MASK)
  np.testing.assert_array_equal(noisy[~masked], np.asarray(tokens)[~masked])
  # t ~ U(0, 1): p is uniform on [eps, 1] (mean and spread over the 256 rows).
  assert np.mean(p) == pytest.approx((1 + eps) / 2, abs=5 * (1 - eps) / np.sqrt(12 * B))
  assert np.min(p) < eps + 0.05 * (1 - eps) and np.max(p) > 1 - 0.05 * (1 - eps)
  # Rows really differ: p is drawn per sequence, not once per batch.
  assert np.std(p) > 0.2 * (1 - eps)


def test_forward_process_depends_on_the_key():
  """Different keys give different masks; the same key gives the same mask."""
  tokens = _fixed_tokens(4, 64)
  a = _noise(jax.random.key(1), tokens, 1e-3)
  b = _noise(jax.random.key(2), tokens, 1e-3)
  c = _noise(jax.random.key(1), tokens, 1e-3)
  assert not np.array_equal(np.asarray(a.is_masked_BL), np.asarray(b.is_masked_BL))
  np.testing.assert_array_equal(np.asarray(a.noisy_tokens_BL), np.asarray(c.noisy_tokens_BL))


def test_forward_process_respects_maskable():
  """maskable_BL=False positions are never masked; maskable ones are masked at the row's rate."""
  B, L = 64, 4096
  tokens = _fixed_tokens(B, L)
  maskable = jax.random.bernoulli(jax.random.key(5), 0.5, (B, L))
  noisy, masked, p = (np.asarray(a) for a in _noise(jax.random.key(6), tokens, 1e-3, maskable))
  maskable = np.asarray(maskable)
  assert not masked[~maskable].any()
  np.testing.assert_array_equal(noisy[~maskable], np.asarray(tokens)[~maskable])
  np.testing.assert_array_equal(noisy[masked], MASK)
  n = maskable.sum(1)
  rate = (masked & maskable).sum(1) / n
  assert np.all(np.abs(rate - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1.0 / n)


def test_forward_process_eps_one_masks_everything():
  """eps = 1 gives p = 1: every (maskable) token is masked."""
  tokens = _fixed_tokens(3, 16)
  out = _noise(jax.random.key(0), tokens, 1.0)
  np.testing.assert_allclose(np.asarray(out.p_mask_B), 1.0)
  assert bool(jnp.all(out.is_masked_BL)) and bool(jnp.all(out.noisy_tokens_BL == MASK))


# --- SFT: the prompt is never masked -------------------------------------------------------------------


def test_response_mask():
  """True exactly at positions >= the row's prompt length."""
  got = diffusion.response_mask(prompt_len_B=jnp.array([0, 2, 5]), length=5)
  want = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(np.asarray(got), want)


@jax.jit
def _sft_draws(keys, prompt_len, eps):
  """sft_objective over many keys with uniform logits; also returns what the model was shown."""

  def one(key):
    shown = []

    def logits_fn(noisy, valid):
      shown.append((noisy, valid))
      return jnp.zeros(noisy.shape + (OV,), jnp.float32)

    out = diffusion.sft_objective(diffusion.from_logits(logits_fn),
                                  key, tokens_BL=OTOKENS, prompt_len_B=prompt_len, mask_id=MASK,
                                  eps=eps)
    return out, shown[0]

  return jax.vmap(one)(keys)


SFT_PROMPT_LEN = jnp.array([1, 5, 8, OL - 1])


def test_sft_objective_never_masks_the_prompt():
  """The model sees the clean prompt on every draw; response positions do get masked (and only by M)."""
  _, (noisy, valid) = _sft_draws(jax.random.split(jax.random.key(0), 64), SFT_PROMPT_LEN, 1e-3)
  noisy, valid = np.asarray(noisy), np.asarray(valid)
  assert valid.all()
  prompt = ~np.asarray(diffusion.response_mask(prompt_len_B=SFT_PROMPT_LEN, length=OL))
  tok = np.broadcast_to(np.asarray(OTOKENS), noisy.shape)
  prompt = np.broadcast_to(prompt, noisy.shape)
  np.testing.assert_array_equal(noisy[prompt], tok[prompt])
  changed = noisy != tok
  np.testing.assert_array_equal(noisy[changed], MASK)
  assert changed[~prompt].mean() > 0.25  # the response is noised (on average at rate ~0.5)
  # The same through forward_process with the response as maskable, at p = 1.
  out = _noise(jax.random.key(0), OTOKENS, 1.0, ~prompt[0])
  np.testing.assert_array_equal(np.asarray(out.is_masked_BL), ~prompt[0])


def test_sft_objective_with_uniform_logits_and_p_one():
  """eps = 1 masks the whole response; uniform logits give CE = log V everywhere, so the loss
  (per row: sum CE / p / response length, averaged over rows) is exactly log V."""
  out, _ = _sft_draws(jax.random.split(jax.random.key(1), 64), SFT_PROMPT_LEN, 1.0)
  np.testing.assert_allclose(np.asarray(out.loss), np.log(OV), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(out.num_masked), int(np.sum(OL - np.asarray(SFT_PROMPT_LEN))))


# --- Losses against hand-computed values ---------------------------------------------------------------

# Two rows, three positions, vocabulary of four: written out by hand.
LOGITS = np.array([
    [[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 3.0, -0.5], [-2.0, 1.0, 1.0, 0.3]],
    [[0.0, 0.0, 0.0, 5.0], [1.5, -0.5, 0.25, 0.75], [0.3, 0.3, 2.2, -1.1]],
], np.float32)
TOKENS = np.array([[0, 1, 3], [3, 2, 2]], np.int32)
# argmax of LOGITS: [[0, 2, 1 (tie 1/2 -> first)], [3, 0, 2]] -> correct: [[T, F, F], [T, F, T]]


def test_pretrain_loss_hand_computed():
  """sum over masked positions of CE / p, divided by B * L (not by the number masked)."""
  ce = _np_ce(LOGITS, TOKENS)
  masked = np.array([[True, True, False], [False, True, True]])
  p = np.array([0.5, 0.25], np.float32)
  want = (ce[0, 0] / 0.5 + ce[0, 1] / 0.5 + ce[1, 1] / 0.25 + ce[1, 2] / 0.25) / 6
  out = diffusion.pretrain_loss(logits_BLV=jnp.asarray(LOGITS), tokens_BL=jnp.asarray(TOKENS),
                                is_masked_BL=jnp.asarray(masked), p_mask_B=jnp.asarray(p))
  assert out.loss.dtype == jnp.float32
  assert float(out.loss) == pytest.approx(want, rel=1e-5)
  assert int(out.num_masked) == 4
  assert int(out.num_correct) == 2  # (0,0) and (1,2)
  assert float(out.accuracy) == pytest.approx(0.5)


def test_pretrain_loss_with_cropped_validity():
  """With valid_BL, masked-but-invalid positions are ignored and the denominator is the valid count."""
  ce = _np_ce(LOGITS, TOKENS)
  masked = np.array([[True, True, True], [True, False, True]])
  valid = np.array([[True, True, False], [True, True, False]])  # a crop to length 2
  p = np.array([0.8, 0.1], np.float32)
  want = (ce[0, 0] / 0.8 + ce[0, 1] / 0.8 + ce[1, 0] / 0.1) / 4
  out = diffusion.pretrain_loss(logits_BLV=jnp.asarray(LOGITS), tokens_BL=jnp.asarray(TOKENS),
                                is_masked_BL=jnp.asarray(masked), p_mask_B=jnp.asarray(p),
                                valid_BL=jnp.asarray(valid))
  assert float(out.loss) == pytest.approx(want, rel=1e-5)
  assert int(out.num_masked) == 3
  assert int(out.num_correct) == 2  # (0,0) and (1,0); (1,2) is correct but cropped away


def test_sft_loss_hand_computed():
  """Per row: masked response CE / p summed, divided by that row's response length; then / B.
  A masked prompt position is ignored."""
  L = 4
  logits = np.concatenate([LOGITS, LOGITS[:, :1] * -1.0], axis=1)  # [2, 4, 4]
  tokens = np.array([[0, 1, 3, 2], [3, 2, 2, 0]], np.int32)
  ce = _np_ce(logits, tokens)
  prompt_len = np.array([1, 2])
  masked = np.array([[True, True, False, True],     # position 0 is prompt: must be ignored
                     [False, True, True, True]])    # position 1 is prompt: must be ignored
  p = np.array([0.5, 0.2], np.float32)
  row0 = (ce[0, 1] + ce[0, 3]) / 0.5 / (L - 1)
  row1 = (ce[1, 2] + ce[1, 3]) / 0.2 / (L - 2)
  want = (row0 + row1) / 2
  out = diffusion.sft_loss(logits_BLV=jnp.asarray(logits), tokens_BL=jnp.asarray(tokens),
                           is_masked_BL=jnp.asarray(masked), p_mask_B=jnp.asarray(p),
                           prompt_len_B=jnp.asarray(prompt_len))
  assert float(out.loss) == pytest.approx(want, rel=1e-5)
  assert int(out.num_masked) == 4
  correct = np.argmax(logits, -1) == tokens
  counted = masked & (np.arange(L)[None] >= prompt_len[:, None])
  assert int(out.num_correct) == int((correct & counted).sum())


def test_sft_loss_with_validity():
  """valid_BL=False positions leave both the numerator and the response length."""
  L = 3
  ce = _np_ce(LOGITS, TOKENS)
  masked = np.ones((2, L), bool)
  prompt_len = np.array([1, 0])
  valid = np.array([[True, True, True], [True, True, False]])
  p = np.array([1.0, 0.5], np.float32)
  want = ((ce[0, 1] + ce[0, 2]) / 1.0 / 2 + (ce[1, 0] + ce[1, 1]) / 0.5 / 2) / 2
  out = diffusion.sft_loss(logits_BLV=jnp.asarray(LOGITS), tokens_BL=jnp.asarray(TOKENS),
                           is_masked_BL=jnp.asarray(masked), p_mask_B=jnp.asarray(p),
                           prompt_len_B=jnp.asarray(prompt_len), valid_BL=jnp.asarray(valid))
  assert float(out.loss) == pytest.approx(want, rel=1e-5)
  assert int(out.num_masked) == 4


def test_next_token_loss_hand_computed():
  """Logits at position i score token i+1; the loss is the mean over (valid) targets."""
  ce = _np_ce(LOGITS[:, :-1], TOKENS[:, 1:])  # [2, 2]
  out = diffusion.next_token_loss(logits_BLV=jnp.asarray(LOGITS), tokens_BL=jnp.asarray(TOKENS))
  assert float(out.loss) == pytest.approx(ce.mean(), rel=1e-5)
  assert int(out.num_masked) == 4
  want_correct = int((np.argmax(LOGITS[:, :-1], -1) == TOKENS[:, 1:]).sum())
  assert int(out.num_correct) == want_correct
  # With the last position of row 1 invalid, the target TOKENS[1, 2] drops out.
  valid = np.array([[True, True, True], [True, True, False]])
  out = diffusion.next_token_loss(logits_BLV=jnp.asarray(LOGITS), tokens_BL=jnp.asarray(TOKENS),
                                  valid_BL=jnp.asarray(valid))
  assert float(out.loss) == pytest.approx((ce[0, 0] + ce[0, 1] + ce[1, 0]) / 3, rel=1e-5)
  assert int(out.num_masked) == 3


def test_ar_objective_feeds_clean_tokens():
  """The autoregressive objective runs the model on the clean sequence and scores next tokens."""
  seen = []

  def logits_fn(tokens, valid):
    seen.append(np.asarray(tokens))
    return jnp.asarray(LOGITS)

  out = diffusion.ar_objective(diffusion.from_logits(logits_fn), tokens_BL=jnp.asarray(TOKENS))
  np.testing.assert_array_equal(seen[0], TOKENS)
  assert float(out.loss) == pytest.approx(_np_ce(LOGITS[:, :-1], TOKENS[:, 1:]).mean(), rel=1e-5)


# --- Random-length crop --------------------------------------------------------------------------------


CB, CL, CROPS = 3, 8, 2048  # one shape for every crop test: one compile


@jax.jit
def _crops(seed, valid, prob):
  keys = jax.random.split(jax.random.key(seed), CROPS)
  return jax.vmap(lambda k: diffusion.random_length_crop(k, valid_BL=valid, prob=prob))(keys)


def test_random_length_crop_prob_zero_is_identity():
  """prob = 0 returns the validity mask unchanged, whatever the key."""
  valid = jax.random.bernoulli(jax.random.key(0), 0.7, (CB, CL))
  out = np.asarray(_crops(1, valid, 0.0))
  assert out.dtype == bool
  np.testing.assert_array_equal(out, np.broadcast_to(np.asarray(valid), out.shape))


def test_random_length_crop_prob_one_gives_prefixes():
  """prob = 1: every draw is the same prefix [0, n) for all rows, n ~ U{1..L}, covering the range."""
  out = np.asarray(_crops(2, jnp.ones((CB, CL), bool), 1.0))
  lengths = out.sum(-1)  # [keys, B]
  assert np.all(lengths == lengths[:, :1])  # one length for the whole batch
  n = lengths[:, 0]
  np.testing.assert_array_equal(out, np.broadcast_to(np.arange(CL) < n[:, None, None], out.shape))  # prefixes
  assert n.min() >= 1 and n.max() <= CL
  counts = np.bincount(n, minlength=CL + 1)
  assert counts[0] == 0
  expected = CROPS / CL
  assert np.all(np.abs(counts[1:] - expected) < 5 * np.sqrt(expected)), counts  # all of 1..L, evenly
  # Cropping an already padded mask: the result is the AND of both.
  valid = jnp.array([[True] * 5 + [False] * 3] * CB)
  out = np.asarray(_crops(3, valid, 1.0))
  assert not out[..., 5:].any()
  kept = out.sum(-1)  # min(n, 5) for a crop to n
  assert kept.min() == 1 and kept.max() == 5
  assert (kept == 5).mean() == pytest.approx(4 / CL, abs=5 * np.sqrt(0.5 * 0.5 / CROPS))  # n in {5..8}


def test_random_length_crop_rate():
  """With 0 < prob < 1 the crop happens in about a prob fraction of draws (a crop to L changes nothing)."""
  prob = 0.3
  out = np.asarray(_crops(4, jnp.ones((CB, CL), bool), prob))
  changed = (~out).any(axis=(1, 2)).mean()
  want = prob * (1 - 1 / CL)
  assert abs(changed - want) < 5 * np.sqrt(want * (1 - want) / CROPS)


# --- The pre-training objective end to end -------------------------------------------------------------

@jax.jit
def _pretrain_draws(keys, scale, eps, prob):
  """pretrain_objective over many keys with logits = scale * one_hot(true token): scale 0 is the
  uniform predictor, a large scale the perfect one. Also returns what the model was shown."""

  def one(key):
    shown = []

    def logits_fn(noisy, valid):
      shown.append((noisy, valid))
      return scale * jax.nn.one_hot(OTOKENS, OV, dtype=jnp.float32)

    out = diffusion.pretrain_objective(diffusion.from_logits(logits_fn),
                                       key, tokens_BL=OTOKENS, mask_id=MASK, eps=eps,
                                       random_length_prob=prob)
    return out, shown[0]

  return jax.vmap(one)(keys)


def _keys(seed):
  return jax.random.split(jax.random.key(seed), DRAWS)


def test_pretrain_objective_perfect_predictor():
  """A model putting a huge logit on the true token has ~0 loss and accuracy 1, on what it was shown."""
  out, (noisy, valid) = _pretrain_draws(_keys(0), 30.0, 1e-3, 0.0)
  assert np.asarray(valid).all()
  np.testing.assert_array_equal(np.asarray(out.num_masked), (np.asarray(noisy) == MASK).sum(axis=(1, 2)))
  assert int(out.num_masked.sum()) > 0
  assert float(out.loss.max()) < 1e-9 * OL
  np.testing.assert_array_equal(np.asarray(out.num_correct), np.asarray(out.num_masked))


def test_pretrain_objective_uniform_predictor_p_one():
  """eps = 1 (p = 1): everything valid is masked and uniform logits give loss exactly log V, also
  after a random-length crop (the denominator is the cropped length)."""
  out, (noisy, valid) = _pretrain_draws(_keys(1), 0.0, 1.0, 0.0)
  np.testing.assert_allclose(np.asarray(out.loss), np.log(OV), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(out.num_masked), OB * OL)
  assert (np.asarray(noisy) == MASK).all()

  out, (noisy, valid) = _pretrain_draws(_keys(2), 0.0, 1.0, 1.0)
  n = np.asarray(valid)[:, 0].sum(-1)  # crop length of each draw
  np.testing.assert_array_equal(np.asarray(out.num_masked), OB * n)
  np.testing.assert_array_equal(np.asarray(noisy) == MASK, np.asarray(valid))  # masked = the crop
  np.testing.assert_allclose(np.asarray(out.loss), np.log(OV), rtol=1e-5)
  assert len(set(n.tolist())) > OL // 2


def test_pretrain_objective_is_unbiased_for_uniform_logits():
  """E[sum_masked CE / p] / L = CE: with uniform logits (CE = log V) the loss averages to log V over
  many draws of t and of the masks, although single draws scatter widely (the 1/p weighting)."""
  eps = 1e-3
  out, _ = _pretrain_draws(_keys(7), 0.0, eps, 0.0)
  losses = np.asarray(out.loss, np.float64)
  # Variance of one row's num_masked / (p L) is E[(1 - p) / p] / L ~ (ln(1/eps) - 1) / L.
  std = np.sqrt((np.log(1 / eps) - 1) / OL / (OB * DRAWS))
  assert np.mean(losses) == pytest.approx(np.log(OV), abs=5 * std * np.log(OV))
  assert np.std(losses) > 0.05 * np.log(OV)  # single draws are noisy: this is not a plain mean CE
