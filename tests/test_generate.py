"""`sampling.generate` against a plain NumPy version of the official sampler (REFERENCE §4, §8).

`_reference_generate` below is written from the description, not from the implementation: one row at a
time, a Python loop over blocks and steps, float64 softmax/confidences, and the real model called only for
logits. The tiny random model gets a scaled-up output head and blocks, so that its predictions depend on
context and are peaked enough for confidences (and thresholds) to matter.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from llada_jax import model, sampling

MASK = 4
HEAD_SCALE = 80.0   # multiplies lm_head: peaked (but not saturated) predictions
BLOCK_SCALE = 5.0   # multiplies every block matrix: predictions that depend on the context
SEED = 3            # a model whose margin / entropy orders differ from the low-confidence order


# --------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------

class Tiny:
  """One graphdef/params pair shared by the whole module, plus a jitted forward for the reference."""

  def __init__(self, seed=SEED):
    cfg = tiny_config().model
    self.vocab = cfg.vocab_size
    self.graphdef, _ = model.abstract_model(cfg)
    params = model.init_params(cfg, jax.random.key(seed))
    # A trained model never predicts the mask token; this random one would, so its logit is pinned to 0.
    params["lm_head"] = (params["lm_head"] * HEAD_SCALE).at[:, MASK].set(0.0)
    for name in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_gate", "ff_up", "ff_down"):
      params["blocks"][name] = params["blocks"][name] * BLOCK_SCALE
    self.params = params
    self._apply = jax.jit(model.apply, static_argnums=0)

  def logits(self, x, valid):
    """The model's logits for token ids x [B, L] with validity [B, L], as a NumPy array."""
    return np.asarray(self._apply(self.graphdef, self.params, jnp.asarray(x, jnp.int32), jnp.asarray(valid)))

  def generate(self, tokens, valid, **kw):
    kw.setdefault("mask_id", MASK)
    out = sampling.generate(self.graphdef, self.params, jnp.asarray(tokens), jnp.asarray(valid), **kw)
    return tuple(np.asarray(a) for a in out)


@pytest.fixture(scope="module")
def tiny():
  return Tiny()


def _prompts(*rows):
  tokens, valid = sampling.left_pad([list(r) for r in rows], pad_id=0)
  return tokens.astype(np.int32), valid


ONE = ([10, 11, 12, 13, 14],)
TWO = ([10, 11, 12, 13, 14], [20, 21, 22, 23, 24])
PADDED = ([10, 11, 12, 13, 14, 15], [30, 31], [40, 41, 42, 43])


# --------------------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------------------

def _softmax64(logits):
  logits = np.asarray(logits, np.float64)
  with np.errstate(invalid="ignore"):
    z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _reference_generate(tiny, prompt_BP, valid_BP, *, mask_id=MASK, eos_id=1, eot_id=None, gen_length,
                        steps, block_length, cfg_scale=0.0, remasking="low_confidence", threshold=None,
                        suppress_eos_logit=False, suppress_eos_confidence=False, early_exit=False):
  """Temperature-0 official sampler (+ Fast-dLLM threshold and early exit), one row at a time.

  Returns (tokens [B, L], commit_step [B, L] (-1 for the prompt), steps [B]).
  """
  B, P = prompt_BP.shape
  L = P + gen_length
  num_blocks = gen_length // block_length
  steps_per_block = steps // num_blocks
  tokens = np.zeros((B, L), np.int64)
  commit = np.full((B, L), -1, np.int64)
  steps_B = np.zeros(B, np.int64)

  for r in range(B):
    x = np.concatenate([prompt_BP[r], np.full(gen_length, mask_id)]).astype(np.int64)
    valid = np.concatenate([valid_BP[r], np.ones(gen_length, bool)])

    def logits_of(x):
      cond = tiny.logits(x[None], valid[None])[0].astype(np.float64)
      if cfg_scale > 0:
        uncond_x = x.copy()
        uncond_x[:P] = mask_id  # every prompt position, padding included
        uncond = tiny.logits(uncond_x[None], valid[None])[0].astype(np.float64)
        return uncond + (cfg_scale + 1) * (cond - uncond)
      return cond

    step, stopped = 0, False
    for b in range(num_blocks):
      if stopped:
        break
      lo, hi = P + b * block_length, P + (b + 1) * block_length
      n = int(np.sum(x[lo:hi] == mask_id))
      schedule = [n // steps_per_block + (s < n % steps_per_block) for s in range(steps_per_block)]
      assert sum(schedule) == n
      s = 0
      while True:
        if threshold is None:
          if s == steps_per_block:
            break
          k = schedule[s]
        elif not np.any(x[lo:hi] == mask_id):
          break
        s += 1

        logits = logits_of(x)
        if suppress_eos_logit:
          logits[:, eos_id] = -np.inf
        x0 = logits.argmax(-1)
        probs = _softmax64(logits)
        p0 = probs[np.arange(L), x0]
        if remasking == "low_confidence":
          conf = p0.copy()
        elif remasking == "margin":
          top = np.sort(probs, axis=-1)
          conf = top[:, -1] - top[:, -2]
        elif remasking == "entropy":
          with np.errstate(divide="ignore", invalid="ignore"):
            conf = np.nansum(probs * np.log(probs), axis=-1)  # 0 log 0 = 0
        else:
          raise NotImplementedError(remasking)
        if suppress_eos_confidence:
          stop = x0 == eos_id
          if eot_id is not None:
            stop |= x0 == eot_id
          conf[stop] = -np.inf

        candidates = [j for j in range(lo, hi) if x[j] == mask_id]
        order = sorted(candidates, key=lambda j: (-conf[j], j))  # most confident first, ties: lowest index
        if threshold is None:
          chosen = order[:k]
        else:
          chosen = sorted({order[0]} | {j for j in candidates if p0[j] >= threshold})
        for j in chosen:
          assert x[j] == mask_id  # a committed token never changes
          assert x0[j] != mask_id, "degenerate test model: it predicts the mask token"
          x[j] = x0[j]
          commit[r, j] = step
        step += 1

        if early_exit:
          gen = x[P:]
          eos_at = np.flatnonzero(gen == eos_id)
          masked_at = np.flatnonzero(gen == mask_id)
          first_eos = eos_at[0] if len(eos_at) else gen_length
          first_mask = masked_at[0] if len(masked_at) else gen_length
          if first_eos < first_mask:
            commit[r, P + masked_at] = step - 1
            gen[masked_at] = eos_id
            stopped = True
            break
    tokens[r], steps_B[r] = x, step
  return tokens, commit, steps_B


def _assert_matches_reference(tiny, prompt, valid, **kw):
  got_tokens, got_commit, got_steps = tiny.generate(prompt, valid, **kw)
  kw.pop("mask_id", None)
  want_tokens, want_commit, want_steps = _reference_generate(tiny, prompt, valid, **kw)
  np.testing.assert_array_equal(got_tokens, want_tokens, err_msg=f"tokens differ for {kw}")
  np.testing.assert_array_equal(got_commit, want_commit, err_msg=f"commit steps differ for {kw}")
  np.testing.assert_array_equal(got_steps, want_steps, err_msg=f"steps differ for {kw}")
  return got_tokens, got_commit, got_steps


def _first_pass_argmax(tiny, prompt, valid, gen_length):
  """Tokens the model predicts at the masked positions before anything is committed, most common first."""
  x = np.concatenate([prompt, np.full((prompt.shape[0], gen_length), MASK)], axis=1)
  v = np.concatenate([valid, np.ones((prompt.shape[0], gen_length), bool)], axis=1)
  logits = tiny.logits(x, v)[:, prompt.shape[1]:]
  ids, counts = np.unique(logits.argmax(-1), return_counts=True)
  return [int(i) for i in ids[np.argsort(-counts, kind="stable")]]


# --------------------------------------------------------------------------------------------------------
# Equality with the reference
# --------------------------------------------------------------------------------------------------------
# Tests share a few (prompt shape, options) pairs where they can: each distinct pair compiles once.

DIFFUSION = dict(gen_length=12, steps=6, block_length=12)   # on TWO
SEMI_AR = dict(gen_length=8, steps=8, block_length=4)       # on PADDED


def test_pure_diffusion_matches_reference(tiny):
  prompt, valid = _prompts(*TWO)
  _assert_matches_reference(tiny, prompt, valid, **DIFFUSION)


def test_semi_autoregressive_blocks_match_reference(tiny):
  prompt, valid = _prompts(*TWO)
  _assert_matches_reference(tiny, prompt, valid, gen_length=12, steps=6, block_length=4)
  # steps_per_block that does not divide the block: uneven transfer schedule [2, 2, 1, 1] per block
  _assert_matches_reference(tiny, prompt, valid, gen_length=12, steps=8, block_length=6)


def test_left_padded_batch_matches_reference_and_rows_are_independent(tiny):
  prompt, valid = _prompts(*PADDED)
  tokens, commit, steps = _assert_matches_reference(tiny, prompt, valid, **SEMI_AR)
  np.testing.assert_array_equal(tokens[:, :prompt.shape[1]], prompt)
  # A row's output does not depend on the rows batched with it (same padded width).
  alone, _, _ = tiny.generate(prompt[1:2], valid[1:2], **SEMI_AR)
  np.testing.assert_array_equal(alone[0], tokens[1])


def test_cfg_matches_reference(tiny):
  prompt, valid = _prompts(*PADDED)
  tokens, _, _ = _assert_matches_reference(tiny, prompt, valid, cfg_scale=1.5, **SEMI_AR)
  plain, _, _ = tiny.generate(prompt, valid, **SEMI_AR)
  assert not np.array_equal(tokens, plain), "cfg_scale=1.5 should change this output"


@pytest.mark.parametrize("remasking", ["margin", "entropy"])  # low_confidence: every other test
def test_remasking_rules_match_reference(tiny, remasking):
  prompt, valid = _prompts(*TWO)
  _, commit, _ = _assert_matches_reference(tiny, prompt, valid, remasking=remasking, **DIFFUSION)
  _, plain_commit, _ = tiny.generate(prompt, valid, **DIFFUSION)
  assert not np.array_equal(commit, plain_commit), f"{remasking} should change the commit order here"


def test_suppress_eos_logit_matches_reference(tiny):
  prompt, valid = _prompts(*TWO)
  eos = _first_pass_argmax(tiny, prompt, valid, DIFFUSION["gen_length"])[0]
  tokens, _, _ = _assert_matches_reference(tiny, prompt, valid, eos_id=eos, suppress_eos_logit=True,
                                           **DIFFUSION)
  assert not (tokens[:, prompt.shape[1]:] == eos).any()
  plain, _, _ = tiny.generate(prompt, valid, **DIFFUSION)
  assert (plain[:, prompt.shape[1]:] == eos).any(), "EOS should be predicted without suppression"


def test_suppress_eos_confidence_matches_reference(tiny):
  prompt, valid = _prompts(*TWO)
  common = _first_pass_argmax(tiny, prompt, valid, DIFFUSION["gen_length"])
  _, plain_commit, _ = tiny.generate(prompt, valid, **DIFFUSION)
  for eos, eot in ((common[0], None), (3, common[0])):  # as EOS, then as EOT
    _, commit, _ = _assert_matches_reference(tiny, prompt, valid, eos_id=eos, eot_id=eot,
                                             suppress_eos_confidence=True, **DIFFUSION)
    assert not np.array_equal(commit, plain_commit), f"suppress_eos_confidence changed nothing ({eos}, {eot})"


def test_suppress_eos_confidence_when_every_candidate_is_suppressed(tiny):
  """All candidates predict EOS/EOT: the step still commits its quota, lowest index first."""
  prompt, valid = _prompts(*TWO)
  P = prompt.shape[1]
  common = _first_pass_argmax(tiny, prompt, valid, DIFFUSION["gen_length"])
  assert len(common) <= 2, common  # this tiny model predicts at most two tokens at the masked positions
  eos, eot = common[0], (common[-1] if len(common) == 2 else 3)
  for extra, first_k in ((DIFFUSION, 2), (dict(DIFFUSION, steps=12, threshold=1.0), 1)):
    tokens, commit, _ = _assert_matches_reference(tiny, prompt, valid, eos_id=eos, eot_id=eot,
                                                  suppress_eos_confidence=True, **extra)
    assert not (tokens == MASK).any()
    # At step 0 every confidence is -inf, so the leftmost positions go first.
    for row in commit[:, P:]:
      np.testing.assert_array_equal(np.flatnonzero(row == 0), np.arange(first_k))


@pytest.mark.parametrize("tau,remasking", [(0.9, "low_confidence"), (0.6, "margin")])
def test_threshold_decoding_matches_reference(tiny, tau, remasking):
  prompt, valid = _prompts(*PADDED)
  kw = dict(gen_length=12, steps=12, block_length=6, threshold=tau, remasking=remasking)
  tokens, commit, steps = _assert_matches_reference(tiny, prompt, valid, **kw)
  assert not (tokens == MASK).any()
  assert (steps < 12).any(), f"threshold {tau} never committed two tokens in one step"
  assert (steps > 2).any(), f"threshold {tau} committed every block in a single step"


@pytest.mark.parametrize("tau", [1.0, 0.9999])
def test_threshold_one_commits_one_token_per_step(tiny, tau):
  prompt, valid = _prompts(*PADDED)
  G = SEMI_AR["gen_length"]
  tokens, commit, steps = _assert_matches_reference(tiny, prompt, valid, threshold=tau, **SEMI_AR)
  np.testing.assert_array_equal(steps, np.full(len(steps), G))
  for row in commit[:, prompt.shape[1]:]:
    np.testing.assert_array_equal(np.sort(row), np.arange(G))


def test_early_exit_matches_reference(tiny):
  prompt, valid = _prompts(*TWO)
  P = prompt.shape[1]
  kw = dict(gen_length=12, steps=12, block_length=4)
  eos = _first_pass_argmax(tiny, prompt, valid, 12)[0]
  tokens, commit, steps = _assert_matches_reference(tiny, prompt, valid, eos_id=eos, early_exit=True, **kw)
  assert (steps < 12).any(), "early exit did not trigger"
  for r in np.flatnonzero(steps < 12):
    gen = tokens[r, P:]
    assert (gen[int(np.argmax(gen == eos)):] == eos).all()
    assert commit[r, P:].max() == steps[r] - 1
  # Without early exit every row takes every step.
  _, _, full_steps = tiny.generate(prompt, valid, **kw)
  np.testing.assert_array_equal(full_steps, 12)
  # Pure diffusion: an EOS committed while earlier positions are still masked must not stop the row.
  _, commit, steps = _assert_matches_reference(tiny, prompt, valid, eos_id=eos, early_exit=True, **DIFFUSION)
  tokens, plain_commit, _ = tiny.generate(prompt, valid, **DIFFUSION)
  eos_steps = [plain_commit[r, P:][tokens[r, P:] == eos] for r in range(len(tokens))]
  assert any(len(e) and e.min() < steps[r] - 1 for r, e in enumerate(eos_steps)), "case not covered"


def test_early_exit_with_threshold_matches_reference(tiny):
  prompt, valid = _prompts(*PADDED)
  eos = _first_pass_argmax(tiny, prompt, valid, 12)[0]
  _assert_matches_reference(tiny, prompt, valid, gen_length=12, steps=12, block_length=4, eos_id=eos,
                            early_exit=True, threshold=0.9)


# --------------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,steps", [(8, 8), (10, 4), (37, 5), (12, 7), (1, 1), (64, 64)])
def test_transfer_schedule_sums_to_masked_count(n, steps):
  sched = sampling.transfer_schedule(n, steps)
  assert len(sched) == steps and sched.sum() == n
  assert sched.max() - sched.min() <= 1 and (np.diff(sched) <= 0).all()


@pytest.mark.parametrize("G,steps,block", [(8, 8, 4), (12, 8, 6), (12, 6, 12)])
def test_every_position_committed_once_on_schedule(tiny, G, steps, block):
  """Committed tokens never change: every generated position is committed exactly once, on schedule."""
  prompt, valid = _prompts(*PADDED)
  P = prompt.shape[1]
  tokens, commit, steps_B = tiny.generate(prompt, valid, gen_length=G, steps=steps, block_length=block)
  assert (commit[:, :P] == -1).all()
  gen_commit = commit[:, P:]
  assert ((gen_commit >= 0) & (gen_commit < steps)).all()
  assert not (tokens == MASK).any()
  np.testing.assert_array_equal(steps_B, steps)
  num_blocks = G // block
  spb = steps // num_blocks
  for row in gen_commit:
    for b in range(num_blocks):
      # Block b is decoded in steps [b * spb, (b + 1) * spb), with the official per-step counts.
      block_steps = row[b * block:(b + 1) * block]
      assert ((block_steps >= b * spb) & (block_steps < (b + 1) * spb)).all()
      counts = np.bincount(block_steps - b * spb, minlength=spb)
      np.testing.assert_array_equal(counts, sampling.transfer_schedule(block, spb))


KV_OFF = {"kv_cache": "none"} if "kv_cache" in {f.name for f in dataclasses.fields(sampling.SamplingConfig)} else {}


def test_fast_dllm_options_off_equal_the_default_call(tiny):
  prompt, valid = _prompts(*PADDED)
  default = tiny.generate(prompt, valid, **SEMI_AR)
  explicit = tiny.generate(prompt, valid, threshold=None, suppress_eos_logit=False,
                           suppress_eos_confidence=False, early_exit=False, cfg_scale=0.0, temperature=0.0,
                           remasking="low_confidence", **KV_OFF, **SEMI_AR)
  via_config = tiny.generate(prompt, valid, config=sampling.SamplingConfig(**SEMI_AR))
  for a, b, c in zip(default, explicit, via_config):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
  # Early exit / EOS-logit suppression with an EOS that is never predicted change nothing either.
  never = [t for t in range(5, tiny.vocab) if not (default[0] == t).any()][0]
  for opt in ("early_exit", "suppress_eos_logit"):
    other = tiny.generate(prompt, valid, eos_id=never, **{opt: True}, **SEMI_AR)
    for a, b in zip(default, other):
      np.testing.assert_array_equal(a, b, err_msg=opt)


def test_temperature_is_reproducible_per_key_and_differs_across_keys(tiny):
  prompt, valid = _prompts(*TWO)
  kw = dict(DIFFUSION, temperature=1.0)
  a = tiny.generate(prompt, valid, rng=jax.random.key(1), **kw)
  b = tiny.generate(prompt, valid, rng=jax.random.key(1), **kw)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not (a[0] == MASK).any()
  others = [tiny.generate(prompt, valid, rng=jax.random.key(k), **kw)[0] for k in (2, 3)]
  assert any(not np.array_equal(a[0], o) for o in others)
  greedy = tiny.generate(prompt, valid, **DIFFUSION)[0]
  assert any(not np.array_equal(greedy, o) for o in [a[0]] + others)


def test_a_row_samples_the_same_alone_in_any_batch_and_padded_wider(tiny):
  """Row r draws from its own key (fold_in(rng, r), or rng[r]) and its offset from its first real token:
  what a server needs to batch requests of different lengths and seeds (llada_jax.server)."""
  prompt, valid = _prompts(*PADDED)
  kw = dict(SEMI_AR, temperature=1.0, remasking="random")
  batch = tiny.generate(prompt, valid, rng=jax.random.key(5), **kw)
  P = prompt.shape[1]
  # Row 1 alone at its own width 2 (4 pads fewer), row 2 alone padded to P + 3 (5 pads more): each shape
  # compiles its own program, so two cover both directions.
  for r, (tokens, ok) in ((1, _prompts(PADDED[1])), (2, sampling.left_pad([PADDED[2]], 0, width=P + 3))):
    key = jax.random.fold_in(jax.random.key(5), r)[None]  # one key per row (a single key would be folded)
    out = tiny.generate(tokens.astype(np.int32), ok, rng=key, **kw)
    np.testing.assert_array_equal(out[0][0, tokens.shape[1]:], batch[0][r, P:])
    np.testing.assert_array_equal(out[1][0, tokens.shape[1]:], batch[1][r, P:])
  # One key per row, in another order: the rows follow their keys.
  keys = jnp.stack([jax.random.fold_in(jax.random.key(5), r) for r in (2, 0, 1)])
  turned = tiny.generate(prompt[[2, 0, 1]], valid[[2, 0, 1]], rng=keys, **kw)
  np.testing.assert_array_equal(turned[0], batch[0][[2, 0, 1]])


def test_observe_sees_every_step_in_order(tiny):
  prompt, valid = _prompts(*TWO)
  seen = []
  observe = lambda step, x: seen.append((int(step), np.asarray(x).copy()))
  tokens, commit, _ = tiny.generate(prompt, valid, observe=observe, **SEMI_AR)
  jax.effects_barrier()
  assert [s for s, _ in seen] == list(range(SEMI_AR["steps"]))
  np.testing.assert_array_equal(seen[-1][1], tokens)
  for step, x in seen:  # after step s, exactly the positions committed at steps <= s are filled
    np.testing.assert_array_equal(x != MASK, (commit <= step) | (commit == -1))


def test_random_remasking_fills_every_mask(tiny):
  prompt, valid = _prompts(*PADDED)
  tokens, commit, steps = tiny.generate(prompt, valid, remasking="random", rng=jax.random.key(3), **SEMI_AR)
  P = prompt.shape[1]
  assert not (tokens == MASK).any()
  np.testing.assert_array_equal(tokens[:, :P], prompt)
  np.testing.assert_array_equal(steps, SEMI_AR["steps"])
  for row in commit[:, P:]:
    np.testing.assert_array_equal(np.sort(row), np.arange(SEMI_AR["steps"]))
  # The order is random: another key commits in another order.
  _, commit2, _ = tiny.generate(prompt, valid, remasking="random", rng=jax.random.key(4), **SEMI_AR)
  assert not np.array_equal(commit, commit2)


# --------------------------------------------------------------------------------------------------------
# Validation: ValueError naming the option, before anything is compiled
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,prompts,name", [
    (dict(gen_length=12, block_length=5, steps=4), ONE, "block_length"),
    (dict(gen_length=12, block_length=4, steps=4), ONE, "steps"),        # 3 blocks
    (dict(gen_length=8, block_length=8, steps=9), ONE, "steps"),
    (dict(gen_length=8, block_length=8, steps=8, max_seq_len=12), ONE, "gen_length"),  # 5 + 8 > 12
    (dict(gen_length=8, block_length=8, steps=8), ([5, 6], []), "prompt"),
    (dict(gen_length=8, block_length=8, steps=8, remasking="lowest_confidence"), ONE, "remasking"),
    (dict(gen_length=8, block_length=8, steps=8, threshold=0.0), ONE, "threshold"),
    (dict(gen_length=8, block_length=8, steps=8, threshold=1.5), ONE, "threshold"),
])
def test_bad_input_raises_before_compilation(tiny, monkeypatch, kw, prompts, name):
  def must_not_run(*args, **kwargs):
    raise AssertionError("compiled/ran despite invalid input")
  monkeypatch.setattr(sampling, "_generate", must_not_run)
  tokens, valid = _prompts(*prompts)
  with pytest.raises(ValueError, match=name):
    tiny.generate(tokens, valid, **kw)


def test_max_seq_len_counts_the_longest_prompt_of_a_padded_batch(tiny, monkeypatch):
  """The model sees the padded width P + gen_length, so that is what must fit in max_seq_len."""
  monkeypatch.setattr(sampling, "_generate", lambda *a, **k: pytest.fail("ran despite L > max_seq_len"))
  tokens, valid = _prompts([10, 11, 12, 13, 14], [30, 31])  # widths 5 and 2; 5 + 8 > 12
  with pytest.raises(ValueError, match="gen_length"):
    tiny.generate(tokens, valid, gen_length=8, steps=8, block_length=8, max_seq_len=12)


def test_zero_width_prompt_raises(tiny, monkeypatch):
  monkeypatch.setattr(sampling, "_generate", lambda *a, **k: pytest.fail("ran"))
  with pytest.raises(ValueError, match="prompt"):
    tiny.generate(np.zeros((1, 0), np.int32), np.zeros((1, 0), bool), gen_length=8, steps=8, block_length=8)


def test_max_seq_len_exactly_reached_is_fine(tiny):
  prompt, valid = _prompts(*TWO)
  tokens, _, _ = tiny.generate(prompt, valid, max_seq_len=5 + DIFFUSION["gen_length"], **DIFFUSION)
  assert tokens.shape == (2, 5 + DIFFUSION["gen_length"])
