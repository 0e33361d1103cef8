"""The train step, sharding, the loop (checkpoint, resume, metrics) and config validation."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from llada_jax import config as config_lib, events, optim, sharding, train
from llada_jax.configs import default
from llada_jax.data import corpus, pipeline, tokenizer


def _batches(cfg, shuffle_seed=0):
  """A host-local batch stream from the built-in corpus (same tokenizer for every shuffle seed)."""
  docs = corpus.generate_documents(300, 0)
  tok = tokenizer.train_sentencepiece(corpus.iter_sentences(docs), cfg.data.tokenizer_vocab_size)
  return iter(pipeline.packed_dataset(docs, tok.encode, eos_id=tok.eos_id, seq_len=cfg.train.seq_len,
                                      batch_size=cfg.train.batch_size, seed=shuffle_seed))


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.fixture(scope="module")
def single_device_run(devices):
  """Three steps of the tiny model on one device: the reference every sharded layout must reproduce."""
  cfg = tiny_config()
  s = train.setup(cfg, sharding.make_mesh(cfg.mesh, devices[:1]))
  state, hist = train.run_steps(s, s.init(train.root_key(cfg)), _batches(cfg), 3)
  return state, [h["loss"] for h in hist]


@pytest.mark.parametrize("rule_set, mesh_shape, sharded_leaf", [
    ("dp", {"mesh.data": 8, "mesh.fsdp": 1}, None),
    ("fsdp", {"mesh.data": 2, "mesh.fsdp": -1}, ("embedding", 1, "fsdp")),
    ("fsdp_tp", {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}, ("lm_head", 1, "tensor")),
])
def test_sharded_step_equals_single_device_step(devices, single_device_run, rule_set, mesh_shape,
                                                sharded_leaf):
  """Three steps on the 8-device mesh under each rule set give the single-device losses and params."""
  cfg = tiny_config(**{"mesh.rule_set": rule_set, **mesh_shape})
  s = train.setup(cfg, sharding.make_mesh(cfg.mesh, devices))
  state8, hist = train.run_steps(s, s.init(train.root_key(cfg)), _batches(cfg), 3)
  state1, loss1 = single_device_run
  if rule_set == "dp":  # nothing split: every device holds every parameter
    assert all(l.sharding.is_fully_replicated for l in jax.tree.leaves(state8.params))
  else:
    leaf = state8.params[sharded_leaf[0]]
    assert leaf.sharding.spec[sharded_leaf[1]] == sharded_leaf[2]
    assert not leaf.sharding.is_fully_replicated
  np.testing.assert_allclose(loss1, [h["loss"] for h in hist], rtol=1e-5)
  for a, b in zip(_leaves(state1.params), _leaves(state8.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_sft_step_runs_sharded(devices):
  """An SFT batch (tokens [B, L] + prompt lengths [B]) trains on the 8-device mesh; a batch without
  prompt lengths is refused with a message naming the missing field."""
  cfg = tiny_config(**{"diffusion.objective": "sft"})
  s = train.setup(cfg)
  tokens = next(_batches(cfg))["tokens"]
  prompt_len = np.full((cfg.train.batch_size,), 10, np.int32)
  valid = np.ones(tokens.shape, bool)
  with sharding.use_rules(cfg.mesh, s.mesh):
    state = s.init(train.root_key(cfg))
    batch = {"tokens": tokens, "prompt_len": prompt_len, "valid": valid}
    _, m = s.step(state, train.global_batch(s, batch))
  assert np.isfinite(float(m["loss"]))
  with pytest.raises(ValueError, match="prompt_len"):
    train.global_batch(s, {"tokens": tokens})


def test_tiny_run_loss_decreases(devices):
  """The diffusion bound on a fixed batch, averaged over fixed masks, falls by training."""
  cfg = tiny_config(**{"train.num_steps": 100, "optim.peak_lr": 1e-2})
  s = train.setup(cfg, sharding.make_mesh(cfg.mesh, devices[:1]))
  held_out = {"tokens": next(_batches(cfg, shuffle_seed=1))["tokens"]}

  @jax.jit
  def eval_loss(params):
    keys = jax.random.split(jax.random.key(123), 16)
    return jax.vmap(lambda k: train._loss(cfg, s.graphdef, params, held_out, k)[0])(keys).mean()

  state = s.init(train.root_key(cfg))
  before = float(eval_loss(jax.device_get(state.params)))
  state, hist = train.run_steps(s, state, _batches(cfg), 100)
  after = float(eval_loss(jax.device_get(state.params)))
  assert after < 0.85 * before, (before, after)
  assert all(np.isfinite(h["loss"]) and 0.0 <= h["masked_accuracy"] <= 1.0 for h in hist)


def test_grad_accumulation_matches_full_batch(devices):
  """With the (deterministic) next-token loss, 2 micro-batches give the full-batch update."""
  overrides = {"diffusion.objective": "ar", "model.causal": True, "train.num_steps": 2,
               "optim.warmup_steps": 1}
  states = []
  for accum in (1, 2):
    cfg = tiny_config(**overrides, **{"train.grad_accum_steps": accum})
    s = train.setup(cfg, sharding.make_mesh(cfg.mesh, devices[:1]))
    state, hist = train.run_steps(s, s.init(train.root_key(cfg)), _batches(cfg), 2)
    states.append((state, hist))
  (a, ha), (b, hb) = states
  np.testing.assert_allclose([h["loss"] for h in ha], [h["loss"] for h in hb], rtol=1e-5)
  for x, y in zip(_leaves(a.params), _leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_stopped_and_resumed_run_matches_uninterrupted(tmp_path, devices):
  """A run preempted at step 6 and resumed reaches bit-identical parameters at step 12."""
  cfg = tiny_config(**{"train.num_steps": 12, "train.checkpoint_every": 3, "train.num_samples": 0})
  full = train.train_and_evaluate(cfg, str(tmp_path / "full"))
  part = train.train_and_evaluate(cfg, str(tmp_path / "resumed"), stop_at=6)
  assert part["step"] == 6 and not part["finished"] and not part["preempted"]
  tok_file = tmp_path / "resumed" / tokenizer.TOKENIZER_FILE
  tok_bytes = tok_file.read_bytes()
  resumed = train.train_and_evaluate(cfg, str(tmp_path / "resumed"))
  assert resumed["step"] == 12 and resumed["finished"]
  ends = [(e["step"], e["finished"]) for e in events.read_events(str(tmp_path / "resumed")) if e["event"] == "done"]
  assert ends == [(6, False), (12, True)]  # stop_at ended the first run early, the second finished
  assert tok_file.read_bytes() == tok_bytes  # the tokenizer is reused, not retrained
  for a, b in zip(_leaves(full["state"]), _leaves(resumed["state"])):
    np.testing.assert_array_equal(a, b)
  rows = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [5, 10, 12]
  assert {"loss", "masked_accuracy", "grad_norm", "learning_rate", "tokens_per_s"} <= set(rows[0])
  assert os.listdir(tmp_path / "full" / "tensorboard")
  saved = config_lib.from_json((tmp_path / "full" / "config.json").read_text())
  assert saved == cfg


def test_resume_with_multiprocess_prefetch_matches_uninterrupted(tmp_path, devices):
  """grain worker processes (mp_prefetch) keep the pipeline checkpointable: preempt and resume."""
  cfg = tiny_config(**{"train.num_steps": 6, "train.checkpoint_every": 3, "train.num_samples": 0,
                       "data.mp_prefetch_workers": 2, "optim.warmup_steps": 1})
  full = train.train_and_evaluate(cfg, str(tmp_path / "full"))
  train.train_and_evaluate(cfg, str(tmp_path / "resumed"), stop_at=3)
  resumed = train.train_and_evaluate(cfg, str(tmp_path / "resumed"))
  for a, b in zip(_leaves(full["state"]), _leaves(resumed["state"])):
    np.testing.assert_array_equal(a, b)


def test_demo_run_prints_samples(tmp_path, devices, capsys):
  """The loop returns what the samples need; `print_samples`, which llada-train calls once a run has
  finished, completes and prints them (the library loop prints none itself)."""
  cfg = tiny_config(**{"train.num_steps": 4, "optim.warmup_steps": 1})
  out = train.train_and_evaluate(cfg, str(tmp_path))
  assert out["finished"] and len(out["sample_prompts"]) == cfg.train.num_samples
  assert "sample: " not in capsys.readouterr().out
  samples = train.print_samples(cfg, out)
  assert len(samples) == cfg.train.num_samples
  assert "sample: " in capsys.readouterr().out


def test_wsd_schedule_phases():
  cfg = config_lib.OptimConfig(peak_lr=1.0, warmup_steps=10, stage2_steps=10, stage2_lr_ratio=0.25,
                               decay_steps=10, final_lr_ratio=0.1)
  sched = optim.wsd_schedule(cfg, num_steps=50)
  lr = lambda step: float(sched(step))
  assert lr(0) == 0.0 and lr(5) == pytest.approx(0.5)
  assert lr(10) == lr(29) == 1.0                    # stable: steps 10..29
  assert lr(30) == lr(39) == pytest.approx(0.25)   # stage 2
  assert lr(45) == pytest.approx(0.25 + 0.5 * (0.1 - 0.25))
  assert lr(50) == pytest.approx(0.1)


def test_weight_decay_skips_norms_and_embeddings():
  params = {"embedding": 0, "final_norm": 0, "lm_head": 0, "blocks": {"attn_norm": 0, "q_proj": 0}}
  mask = optim.decay_mask(params, ("norm", "embedding"))
  assert mask == {"embedding": False, "final_norm": False, "lm_head": True,
                  "blocks": {"attn_norm": False, "q_proj": True}}
  assert all(jax.tree.leaves(optim.decay_mask(params, ())))


@pytest.mark.parametrize("field,value", [
    ("optim.peak_lr", -1e-3),
    ("model.num_heads", 3),            # does not divide d_model=32
    ("model.num_kv_heads", 3),         # does not divide num_heads=4
    ("diffusion.mask_token_id", 256),  # vocab_size is 256
    ("diffusion.objective", "bert"),
    ("train.batch_size", 0),
    ("train.grad_accum_steps", 3),     # does not divide batch_size=8
    ("model.remat_policy", "sometimes"),
    ("mesh.fsdp", 0),
])
def test_bad_config_values_name_the_field(field, value):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    tiny_config(**{field: value})


def test_config_file_defaults_match_dataclass_defaults():
  """configs/default.py documents every field; its values are the dataclasses' defaults."""
  assert config_lib.from_config_dict(default.base()) == config_lib.Config()
  base = default.base().to_dict()
  for section, value in vars(config_lib.Config()).items():
    assert set(base[section]) == set(vars(value)), section  # every field is in the file


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(os.path.dirname(__file__), "..", "configs"))
                                         if f.endswith(".py") and f != "__init__.py"))
def test_every_config_file_builds_a_valid_config(name):
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "..", "configs", name)
  spec = importlib.util.spec_from_file_location(name[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = config_lib.from_config_dict(module.get_config())
  if name.startswith("sft_"):
    assert cfg.diffusion.objective == "sft" and cfg.optim.decay_steps == cfg.train.num_steps // 10


def test_unknown_config_field_is_rejected():
  c = default.get_config("tiny").to_dict()
  c["train"]["num_step"] = 3
  with pytest.raises(ValueError, match="train.num_step"):
    config_lib.from_config_dict(c)


def test_mesh_shape_must_match_device_count(devices):
  cfg = tiny_config(**{"mesh.data": 3, "mesh.fsdp": 1})
  with pytest.raises(ValueError, match="mesh"):
    sharding.make_mesh(cfg.mesh)
  with pytest.raises(ValueError, match="train.batch_size"):
    train.setup(tiny_config(**{"train.batch_size": 4, "mesh.fsdp": -1}))  # 4 rows over 8 devices
