"""Infilling (`sampling.infill`) and the reversal experiment (`llada_jax.reversal`, `llada-reversal`)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cli_forks
from conftest import tiny_config
from llada_jax import model, reversal, sampling

MASK = 4


# --- sampling.infill ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
  """A random bidirectional `tiny` model with peaked, context-dependent predictions (as test_generate)."""
  cfg = tiny_config().model
  graphdef, _ = model.abstract_model(cfg)
  params = model.init_params(cfg, jax.random.key(3))
  params["lm_head"] = (params["lm_head"] * 80.0).at[:, MASK].set(0.0)
  for name in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_gate", "ff_up", "ff_down"):
    params["blocks"][name] = params["blocks"][name] * 5.0
  return graphdef, params


def _infill(tiny, tokens, valid=None, **kw):
  tokens = np.asarray(tokens, np.int32)
  valid = np.ones(tokens.shape, bool) if valid is None else valid
  out = sampling.infill(*tiny, jnp.asarray(tokens), jnp.asarray(valid), mask_id=MASK, **kw)
  return tuple(np.asarray(a) for a in out)


ROW = [1, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 1]  # EOS, ten tokens, EOS


def test_no_holes_is_returned_unchanged(tiny):
  tokens, commit, steps = _infill(tiny, [ROW], steps=4)
  np.testing.assert_array_equal(tokens, [ROW])
  assert (commit == -1).all() and steps.tolist() == [0]


def test_holes_before_known_text_are_filled_one_per_step(tiny):
  x = np.array([ROW, ROW])
  x[0, 1:5] = MASK   # a prefix: the reversal shape
  x[1, 3:9:2] = MASK  # scattered
  tokens, commit, steps = _infill(tiny, x, steps=4)
  holes = x == MASK
  assert not (tokens == MASK).any()
  np.testing.assert_array_equal(tokens[~holes], x[~holes])  # known tokens never change
  assert (commit[~holes] == -1).all()
  # steps == holes (4): one commit per step; 3 holes in 4 steps: one per step, then the row is done.
  np.testing.assert_array_equal(np.sort(commit[0][holes[0]]), np.arange(4))
  np.testing.assert_array_equal(np.sort(commit[1][holes[1]]), np.arange(3))
  assert steps.tolist() == [4, 3]
  # Two steps: each row follows transfer_schedule(its own hole count, 2).
  _, commit2, steps2 = _infill(tiny, x, steps=2)
  assert np.bincount(commit2[0][holes[0]]).tolist() == sampling.transfer_schedule(4, 2).tolist()
  assert np.bincount(commit2[1][holes[1]]).tolist() == sampling.transfer_schedule(3, 2).tolist()


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_suffix_holes_equal_generate_with_one_block(tiny, temperature):
  """Same model calls, schedule, tie-breaking and per-step keys: token for token the same."""
  prompt, valid = sampling.left_pad([[10, 11, 12, 13, 14], [30, 31]], pad_id=0)
  G, S = 8, 4
  rng = jax.random.key(7)
  want = sampling.generate(*tiny, jnp.asarray(prompt), jnp.asarray(valid), mask_id=MASK, gen_length=G,
                           steps=S, block_length=G, temperature=temperature, rng=rng)
  x = np.concatenate([prompt, np.full((2, G), MASK, np.int32)], axis=1)
  v = np.concatenate([valid, np.ones((2, G), bool)], axis=1)
  got = _infill(tiny, x, v, steps=S, temperature=temperature, rng=rng)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, np.asarray(w))


def test_padding_holding_the_mask_id_is_no_hole(tiny):
  x = np.array([[MASK, MASK, 1, 20, MASK, 22, 1]])
  valid = np.array([[False, False, True, True, True, True, True]])
  tokens, commit, steps = _infill(tiny, x, valid, steps=1)
  np.testing.assert_array_equal(tokens[0, :2], [MASK, MASK])
  assert tokens[0, 4] != MASK and commit[0].tolist() == [-1, -1, -1, -1, 0, -1, -1] and steps[0] == 1


@pytest.mark.parametrize("kw,name", [(dict(steps=0), "steps"), (dict(steps=2, remasking="best"), "remasking"),
                                     (dict(steps=2, temperature=-1.0), "temperature")])
def test_infill_bad_options(tiny, kw, name):
  with pytest.raises(ValueError, match=name):
    _infill(tiny, [ROW], **kw)


# --- Couplets, pairs files, scores ------------------------------------------------------------------------


def test_couplets_are_deterministic_unique_and_k_words():
  a = reversal.make_couplets(300, 3, seed=5)
  assert a == reversal.make_couplets(300, 3, seed=5) and a != reversal.make_couplets(300, 3, seed=6)
  lines = [line for pair in a for line in pair]
  assert len(set(lines)) == 600
  assert all(len(line.split()) == 3 and set(line.split()) <= set(reversal.WORDS) for line in lines)
  with pytest.raises(ValueError, match="words_per_line"):
    reversal.make_couplets(10000, 1, seed=0)


def test_load_pairs_and_its_errors(tmp_path):
  good = tmp_path / "good.json"
  good.write_text(json.dumps([{"first": "a  b", "second": "c d"}]))
  assert reversal.load_pairs(str(good)) == [("a b", "c d")]
  for name, content, match in (("empty.json", "[]", "non-empty"),
                               ("missing.json", json.dumps([{"first": "a"}]), "entry 0 .*'second'"),
                               ("broken.json", "{", "not JSON")):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match):
      reversal.load_pairs(str(tmp_path / name))
  with pytest.raises(FileNotFoundError):
    reversal.load_pairs(str(tmp_path / "absent.json"))


def test_score_exact_is_the_first_line_and_substring_whole_words():
  got = reversal.score(["red sun\nmore", "the red sun sets", "red sunny"], ["red sun"] * 3)
  assert got == {"exact": pytest.approx(100 / 3), "substring": pytest.approx(200 / 3)}


# --- The experiment, end to end on a tiny budget -----------------------------------------------------------


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  out = tmp_path_factory.mktemp("reversal")
  s = reversal.Settings(num_couplets=20, words_per_line=3, preset="tiny", train_steps=30)
  return out, reversal.run(str(out), s)


def test_experiment_end_to_end(experiment):
  out, result = experiment
  models = result["models"]
  assert set(models) == {"diffusion", "autoregressive"}
  assert models["diffusion"]["kind"] == "diffusion" and models["autoregressive"]["kind"] == "autoregressive"
  numbers = [models[m][d][k] for m in models for d in ("forward", "reversal") for k in ("exact", "substring")]
  assert len(numbers) == 8 and all(0 <= x <= 100 for x in numbers)
  assert "reversal_prompt_only" in models["diffusion"]
  assert "reversal_prompt_only" not in models["autoregressive"]
  saved = json.loads((out / "reversal.json").read_text())
  assert saved["models"]["diffusion"]["forward"] == models["diffusion"]["forward"]
  assert "rev substr" in saved["table"] and saved["num_pairs"] == 20


def _cli(*args):
  return cli_forks.shared().run("llada_jax.cli.reversal", args)


def test_cli_evaluates_given_workdirs_on_a_pairs_file(experiment, tmp_path):
  out, _ = experiment
  pairs = tmp_path / "pairs.json"
  pairs.write_text(json.dumps([{"first": "red sun", "second": "blue moon"},
                               {"first": "green tree", "second": "cold sea"}]))
  r = _cli(f"--workdir={out / 'diffusion'},{out / 'autoregressive'}", f"--pairs={pairs}",
           f"--output_dir={tmp_path / 'eval'}")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "autoregressive" in r.stdout and "reversal by infilling" in r.stdout
  assert json.loads((tmp_path / "eval" / "reversal.json").read_text())["num_pairs"] == 2


def test_cli_bad_inputs_are_one_line_errors(tmp_path):
  empty = tmp_path / "empty.json"
  empty.write_text("[]")
  r = _cli(f"--pairs={empty}", f"--output_dir={tmp_path}")
  assert r.returncode == 1 and "non-empty" in r.stderr and "Traceback" not in r.stderr
  with pytest.raises(FileNotFoundError, match="tokenizer"):
    reversal.run(str(tmp_path), reversal.Settings(num_couplets=2), workdirs=[str(tmp_path)])
