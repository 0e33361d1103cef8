"""Likelihood estimators (REFERENCE §5): stratified counts, exact masking, unbiasedness against a
hand-built model with known probabilities, exactness for one-token answers, the causal baseline."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from llada_jax import diffusion, evaluate, model as model_lib
from llada_jax.configs import default  # noqa: F401  (conftest's presets)

MASK = 7
V = 8


def test_stratified_counts_cover_one_to_L():
  L = np.array([7, 5, 1, 12])
  counts = np.asarray(diffusion.stratified_mask_counts(jax.random.key(0), length_B=jnp.asarray(L),
                                                       num_samples=7))
  assert counts.shape == (4, 7)
  assert sorted(counts[0]) == list(range(1, 8))        # S == L: every count exactly once
  assert np.all((counts >= 1) & (counts <= L[:, None]))
  assert np.all(counts[2] == 1)
  # S < L: evenly spread, all distinct (spacing L/S = 12/7 > 1)
  assert len(set(counts[3])) == 7
  many = np.asarray(diffusion.stratified_mask_counts(jax.random.key(1), length_B=jnp.full((2000,), 5),
                                                     num_samples=1))
  assert set(np.unique(many)) == {1, 2, 3, 4, 5}        # k ~ U{1..L}
  np.testing.assert_allclose(np.bincount(many[:, 0], minlength=6)[1:] / 2000, 0.2, atol=0.04)


def test_mask_exactly_masks_count_positions_of_the_maskable_region_uniformly():
  maskable = jnp.asarray(np.tile([False, False, True, True, True, True], (4000, 1)))
  count = jnp.full((4000,), 2)
  m = np.asarray(diffusion.mask_exactly(jax.random.key(0), maskable_BL=maskable, count_B=count))
  assert np.all(m.sum(1) == 2) and not m[:, :2].any()
  freq = m[:, 2:].mean(0)
  np.testing.assert_allclose(freq, 0.5, atol=0.04)      # each of 4 positions masked w.p. 2/4


def _hand_model(a, c):
  """A 'model' whose log-probability of the true token at position i depends on how many positions of
  the row are masked (m): logit a_i - c*m for the true token, 0 for the other V-1 ids."""
  def logits_fn(noisy_BL, valid_BL):
    del valid_BL
    m_B = (noisy_BL == MASK).sum(1)
    true_BLV = jax.nn.one_hot(jnp.arange(noisy_BL.shape[1]) % MASK, V)  # row tokens: i % 7, never MASK
    bump_BL = jnp.asarray(a)[None, :] - c * m_B[:, None]
    return true_BLV[None] * bump_BL[..., None]
  return logits_fn


def _logp(a, c, m):
  """log p(true token at i | m masked) of `_hand_model`, NumPy."""
  x = np.asarray(a) - c * m
  return x - np.logaddexp(x, np.log(V - 1))


@pytest.mark.parametrize("estimator", ["l", "t"])
def test_estimators_are_unbiased_for_the_exact_elbo(estimator):
  """Mean over many samples matches the closed-form ELBO of the hand-built model within 4 standard
  errors. l-ELBO = (1/L) sum_l sum_i logp_i(l); the t-based bound (with the eps floor) is integrated
  numerically over p ~ U(eps, 1)."""
  P, L = 2, 6
  a = np.linspace(-1.0, 2.0, P + L)
  c, eps = 0.3, 0.05
  tokens = (jnp.arange(P + L) % MASK)[None]
  prompt_len = jnp.asarray([P])
  valid = jnp.ones((1, P + L), bool)
  resp = slice(P, P + L)
  if estimator == "l":
    exact = np.mean([_logp(a, c, l)[resp].sum() for l in range(1, L + 1)])
  else:
    ps = np.linspace(eps, 1.0, 20001)
    def integrand(p):
      m = np.arange(0, L + 1)
      binom = np.array([math.comb(L, k) for k in m]) * p ** m * (1 - p) ** (L - m)
      return (binom * (m / L) * np.array([_logp(a, c, k)[resp].sum() for k in m])).sum() / p
    exact = np.trapezoid([integrand(p) for p in ps], ps) / (1 - eps)
  fn = jax.jit(lambda k: diffusion.conditional_elbo(
      _hand_model(a, c), k[None], tokens_BL=tokens, prompt_len_B=prompt_len, valid_BL=valid, mask_id=MASK,
      num_samples=1, estimator=estimator, eps=eps))
  draws = np.asarray(jax.vmap(fn)(jax.random.split(jax.random.key(0), 20000)))[:, 0]
  se = draws.std() / np.sqrt(len(draws))
  assert abs(draws.mean() - exact) < 4 * se, (draws.mean(), exact, se)
  assert draws.std() > 0


def test_l_estimator_has_lower_variance_than_t():
  a, c = np.linspace(-1.0, 2.0, 10), 0.3
  kw = dict(tokens_BL=(jnp.arange(10) % MASK)[None], prompt_len_B=jnp.asarray([2]),
            valid_BL=jnp.ones((1, 10), bool), mask_id=MASK, num_samples=1)
  keys = jax.random.split(jax.random.key(3), 4000)
  sd = {e: float(np.std(jax.vmap(lambda k: diffusion.conditional_elbo(_hand_model(a, c), k[None], estimator=e,
                                                                      **kw))(keys)))
        for e in ("l", "t")}
  assert sd["l"] < sd["t"] / 2, sd


@pytest.fixture(scope="module")
def tiny_model():
  cfg = tiny_config()
  params = model_lib.init_params(cfg.model, jax.random.key(0))
  graphdef, _ = model_lib.abstract_model(cfg.model)
  return cfg, graphdef, params


def test_one_token_answers_are_exact_and_batching_does_not_change_them(tiny_model):
  cfg, graphdef, params = tiny_model
  scorer = evaluate.Scorer(graphdef, params, mask_id=cfg.diffusion.mask_token_id,
                           max_seq_len=cfg.model.max_seq_len)
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(10, 200, n)) for n in (3, 9, 17, 40)]
  answers = [[int(x)] for x in rng.integers(10, 200, 4)]
  one = evaluate.LikelihoodConfig(mc_num=1, batch_size=1)
  together = scorer.loglikelihood(prompts, answers, one)
  apply = jax.jit(lambda t: model_lib.apply(graphdef, params, t, jnp.ones(t.shape, bool)))
  for p, r, got in zip(prompts, answers, together):
    logits = apply(jnp.asarray([p + [cfg.diffusion.mask_token_id]]))
    exact = float(jax.nn.log_softmax(logits[0, -1].astype(jnp.float32))[r[0]])
    assert got == pytest.approx(exact, abs=1e-5)
    assert scorer.loglikelihood([p], [r], one)[0] == pytest.approx(got, abs=1e-5)
  # more samples of an exact quantity change nothing; a pair's random masks are its own, so a longer
  # response scores the same alone and beside others
  longer = [[int(x) for x in rng.integers(10, 200, 5)] for _ in prompts]
  cfg8 = evaluate.LikelihoodConfig(mc_num=8, batch_size=4)
  np.testing.assert_allclose(scorer.loglikelihood(prompts[:1], longer[:1], cfg8),
                             scorer.loglikelihood(prompts, longer, cfg8)[:1], atol=1e-5)
  np.testing.assert_allclose(scorer.loglikelihood(prompts, answers, evaluate.LikelihoodConfig(
      mc_num=8, batch_size=4)), together, atol=1e-5)


def test_causal_loglik_is_the_sum_of_next_token_logprobs(tiny_model):
  cfg = tiny_config(**{"model.causal": True, "diffusion.objective": "ar"})
  params = model_lib.init_params(cfg.model, jax.random.key(1))
  graphdef, _ = model_lib.abstract_model(cfg.model)
  scorer = evaluate.Scorer(graphdef, params, mask_id=4, max_seq_len=cfg.model.max_seq_len, causal=True)
  prompts, responses = [[2, 11, 12], [2, 30]], [[13, 14, 15], [31, 32, 33, 34, 35]]
  got = scorer.loglikelihood(prompts, responses)
  apply = jax.jit(lambda t: model_lib.apply(graphdef, params, t, jnp.ones(t.shape, bool)))
  for p, r, g in zip(prompts, responses, got):
    logp = jax.nn.log_softmax(apply(jnp.asarray([p + r]))[0].astype(jnp.float32))
    want = sum(float(logp[len(p) + j - 1, t]) for j, t in enumerate(r))
    assert g == pytest.approx(want, abs=1e-4)
  text = list(range(20, 60))
  whole = scorer.rolling_loglikelihood([text], bos_id=2)[0]
  assert whole == pytest.approx(scorer.loglikelihood([[2]], [text])[0], abs=1e-4)


def test_bad_likelihood_requests_fail_clearly(tiny_model):
  cfg, graphdef, params = tiny_model
  scorer = evaluate.Scorer(graphdef, params, mask_id=4, max_seq_len=64)
  with pytest.raises(ValueError, match="pair 1: the response is empty"):
    scorer.loglikelihood([[5], [6]], [[7], []])
  with pytest.raises(ValueError, match="max_seq_len=64"):
    scorer.loglikelihood([[5] * 60], [[7] * 10])
  with pytest.raises(ValueError, match="'mc_num'=10 must be a multiple of 'batch_size'=4"):
    evaluate.LikelihoodConfig(mc_num=10, batch_size=4)
  with pytest.raises(ValueError, match="estimator"):
    evaluate.LikelihoodConfig(estimator="x")


def test_validation_during_training_is_logged_and_repeatable(tmp_path, devices):
  """eval_every=5: held-out loss (fixed masks) at steps 5 and 10 in metrics.jsonl; validating the same
  parameters twice gives the same numbers; the held-out documents are not the training documents."""
  import json
  from llada_jax import train
  from llada_jax import objectives
  from llada_jax.data import corpus
  cfg = tiny_config(**{"train.num_steps": 10, "train.eval_every": 5, "train.eval_batches": 2,
                       "train.num_samples": 0, "optim.warmup_steps": 2})
  out = train.train_and_evaluate(cfg, str(tmp_path))
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in evals] == [5, 10]
  assert all(r["eval_ppl_bound"] == pytest.approx(np.exp(r["eval_loss"]), rel=1e-5) for r in evals)
  s = train.setup(cfg)
  tok = objectives.training_data(cfg, str(tmp_path)).tokenizer
  batches = objectives.eval_batches(cfg, tok)
  first = train.validate(s, out["state"].params, batches)
  assert first == train.validate(s, out["state"].params, batches)
  assert first["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)
  train_docs = set(corpus.generate_documents(cfg.data.num_documents, cfg.data.corpus_seed))
  held_out = corpus.generate_documents(200, cfg.data.corpus_seed + 1, world_seed=cfg.data.corpus_seed)
  assert len(set(held_out) - train_docs) > 100


def test_validation_needs_held_out_files_for_file_sources():
  with pytest.raises(ValueError, match=r"data\.eval_paths"):
    tiny_config(**{"data.source": "text", "data.paths": ("a.txt",), "train.eval_every": 10})
  with pytest.raises(ValueError, match=r"data\.tfds_eval_split"):
    tiny_config(**{"data.source": "tfds", "data.tfds_name": "x", "train.eval_every": 10})
