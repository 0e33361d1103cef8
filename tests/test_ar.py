"""The autoregressive baseline: `causal_sampling.generate_causal` against a plain growing-prefix loop, and
serving a trained causal workdir (`configs/ar_tiny.py`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from llada_jax import causal_sampling, model, sampling, serving, train

MASK = 4
HEAD_SCALE = 80.0   # peaked predictions: a float rounding difference cannot flip a greedy choice
BLOCK_SCALE = 5.0   # predictions that depend on the context
GEN = 10
WIDTH = 24  # reference forward width: longest prompt + GEN fits


class CausalTiny:
  """A random causal `tiny` model whose mask-token logit is pushed up: a sampler that forgets to ban the
  mask token would emit it."""

  def __init__(self, seed=1):
    cfg = tiny_config(**{"model.causal": True, "diffusion.objective": "ar"}).model
    self.graphdef, _ = model.abstract_model(cfg)
    params = model.init_params(cfg, jax.random.key(seed))
    params["lm_head"] = params["lm_head"] * HEAD_SCALE
    params["lm_head"] = params["lm_head"].at[:, MASK].set(jnp.abs(params["lm_head"]).max(axis=1) * 2)
    for name in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_gate", "ff_up", "ff_down"):
      params["blocks"][name] = params["blocks"][name] * BLOCK_SCALE
    self.params = params
    self._apply = jax.jit(model.apply, static_argnums=0)

  def reference(self, prompt, gen_length, eos_id=1):
    """Greedy decoding written plainly: the model on the growing prefix, argmax of its last position's
    logits with the mask token excluded, stop after EOS. The prefix starts at position 0 (no left
    padding) and is right-padded to a fixed width with `valid` False (one compiled shape; what follows
    the prefix is masked out of attention, whatever the causal mask does)."""
    x = list(prompt)
    for _ in range(gen_length):
      tokens = np.zeros((1, WIDTH), np.int32)
      tokens[0, :len(x)] = x
      valid = np.arange(WIDTH)[None] < len(x)
      logits = np.array(self._apply(self.graphdef, self.params, jnp.asarray(tokens), jnp.asarray(valid))[0])
      logits = logits[len(x) - 1]
      logits[MASK] = -np.inf
      x.append(int(logits.argmax()))
      if x[-1] == eos_id:
        break
    return x[len(prompt):]

  def generate(self, prompts, **kw):
    tokens, valid = sampling.left_pad(prompts, pad_id=0)
    kw = {"eos_id": 1, "mask_id": MASK, "gen_length": GEN, **kw}
    out = causal_sampling.generate_causal(self.graphdef, self.params, jnp.asarray(tokens), jnp.asarray(valid),
                                          **kw)
    return tokens.shape[1], tuple(np.asarray(a) for a in out)


@pytest.fixture(scope="module")
def tiny():
  return CausalTiny()


PROMPTS = ([10, 11, 12, 13, 14, 15], [30, 31], [40, 41, 42, 43])


def test_greedy_equals_growing_prefix_reference_and_padding_changes_nothing(tiny):
  P, (tokens, commit, steps) = tiny.generate(list(PROMPTS), eos_id=2)  # id 2: never predicted here
  np.testing.assert_array_equal(tokens[:, :P], sampling.left_pad(PROMPTS, 0)[0])
  for row, prompt in enumerate(PROMPTS):
    want = tiny.reference(prompt, GEN, eos_id=2)
    assert len(want) == GEN
    np.testing.assert_array_equal(tokens[row, P:], want, err_msg=f"row {row}, {P - len(prompt)} pads")
  assert not (tokens[:, P:] == MASK).any()
  np.testing.assert_array_equal(steps, [GEN] * 3)
  np.testing.assert_array_equal(commit[:, :P], -1)
  np.testing.assert_array_equal(commit[:, P:], np.tile(np.arange(GEN), (3, 1)))
  # The same continuation unpadded, alone.
  _, (alone, _, _) = tiny.generate([PROMPTS[1]], eos_id=2)
  np.testing.assert_array_equal(alone[0, len(PROMPTS[1]):], tokens[1, P:])


def test_eos_stops_a_row_and_pads_it_while_others_go_on(tiny):
  P, (free, _, _) = tiny.generate(list(PROMPTS), eos_id=2)
  row0 = free[0, P:]
  k = next(i for i in range(1, GEN) if row0[i] not in row0[:i])  # a token first produced at index k
  eos = int(row0[k])
  P, (tokens, _, steps) = tiny.generate(list(PROMPTS), eos_id=eos)
  np.testing.assert_array_equal(tokens[0, P:P + k + 1], row0[:k + 1])
  np.testing.assert_array_equal(tokens[0, P + k:], eos)  # EOS kept, then EOS padding
  assert steps[0] == k + 1
  for row in (1, 2):  # rows that stop elsewhere (or not) follow their own reference
    want = tiny.reference(PROMPTS[row], GEN, eos_id=eos)
    assert steps[row] == len(want)
    np.testing.assert_array_equal(tokens[row, P:P + len(want)], want)
  # Suppressing the EOS logit: no row stops, EOS never appears.
  _, (never, _, steps) = tiny.generate(list(PROMPTS), eos_id=eos, suppress_eos_logit=True)
  assert not (never[:, P:] == eos).any() and (steps == GEN).all()


def test_eot_also_stops(tiny):
  P, (free, _, _) = tiny.generate([PROMPTS[0]], eos_id=2)
  eot = int(free[0, P])
  _, (tokens, _, steps) = tiny.generate([PROMPTS[0]], eos_id=2, eot_id=eot)
  assert steps[0] == 1 and (tokens[0, P + 1:] == 2).all()


def test_temperature_samples_reproducibly_and_never_the_mask(tiny):
  runs = [tiny.generate(list(PROMPTS), eos_id=2, temperature=2.0, rng=jax.random.key(s))[1][0]
          for s in (0, 0, 1)]
  np.testing.assert_array_equal(runs[0], runs[1])
  assert not np.array_equal(runs[0], runs[2])
  assert not any((r == MASK).any() for r in runs)


@pytest.mark.parametrize("kw,name", [
    (dict(gen_length=0), "gen_length"),
    (dict(temperature=-1.0), "temperature"),
    (dict(max_seq_len=12), "gen_length"),
])
def test_bad_options_raise_naming_the_option(tiny, kw, name):
  with pytest.raises(ValueError, match=name):
    tiny.generate([PROMPTS[0]], **kw)


def test_empty_prompt_raises(tiny):
  with pytest.raises(ValueError, match="prompt"):
    causal_sampling.generate_causal(tiny.graphdef, tiny.params, np.zeros((1, 3), np.int32),
                                    np.zeros((1, 3), bool), gen_length=4, eos_id=1)


def test_trained_causal_workdir_serves_left_to_right(tmp_path):
  from llada_jax import config as config_lib
  from llada_jax.configs import ar_tiny
  c = ar_tiny.get_config()
  c.train.update(num_steps=3, num_samples=0)
  c.optim.warmup_steps = 1
  cfg = config_lib.from_config_dict(c)
  train.train_and_evaluate(cfg, str(tmp_path))
  m = serving.load(str(tmp_path))
  assert m.is_causal and not m.chat
  # steps / block_length only schedule the reverse process: ignored here, so one call serves both kinds.
  out = m.complete(["the capital of", "12 plus"], gen_length=6, steps=64, block_length=64)
  assert len(out) == 2 and all(isinstance(r.text, str) and len(r.raw_ids) == 6 for r in out)
  assert all(1 <= r.steps <= 6 and r.commit_step == list(range(6)) for r in out)
  assert all(m.tokenizer.mask_id not in r.raw_ids for r in out)
  # End-of-training samples (train.sample_completions passes the reverse-process steps) work for it too.
  tok = m.tokenizer
  samples = train.sample_completions(cfg, train.setup(cfg), m.params, tok, [("a", [tok.eos_id] + tok.encode("a"))])
  assert len(samples) == 1 and samples[0][0] == "a"
  with pytest.raises(ValueError, match="remasking"):
    m.complete(["x"], gen_length=4, remasking="random")
  with pytest.raises(ValueError, match="kv_cache"):
    m.complete(["x"], gen_length=4, kv_cache="dual")
