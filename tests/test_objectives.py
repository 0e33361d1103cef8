"""The objective registry: records, their batch layouts, config validation, and the seam a new objective uses."""

import dataclasses

import jax
import numpy as np
import pytest

from conftest import tiny_config
from llada_jax import config as config_lib, objectives, train
from llada_jax.configs import default


def _small(name: str, **overrides) -> config_lib.Config:
  c = default.get_config("tiny")
  if name == "sft":
    c = default.sft(c)
  elif name == "ar":
    c.model.causal, c.diffusion.objective = True, "ar"
  c.train.update(num_steps=2, num_samples=2, batch_size=8, seq_len=32)
  c.data.update(num_documents=200, tokenizer_train_docs=200)
  c.optim.update(warmup_steps=1, decay_steps=0)
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return config_lib.from_config_dict(c)


def test_registry_holds_the_objectives():
  assert objectives.names() == ("pretrain", "sft", "ar", "vrpo", "ar_dpo", "grpo", "block_diffusion", "block_sft")
  assert [objectives.get(n).causal for n in objectives.names()] == [False, False, True, False, True, False, False,
                                                                     False]
  assert [objectives.get(n).chat for n in objectives.names()] == [False, True, False, True, True, True, False, True]
  assert [objectives.get(n).reference for n in objectives.names()] == [False, False, False, True, True, True, False,
                                                                        False]
  assert [n for n in objectives.names() if objectives.get(n).blocks] == ["block_diffusion", "block_sft"]
  # only on-policy RL makes its own batches, several updates each, with a reference it can re-sync
  assert [n for n in objectives.names() if objectives.get(n).driver] == ["grpo"]
  assert [n for n in objectives.names() if objectives.get(n).reference_adapters] == ["grpo"]
  c = tiny_config(**{"diffusion.objective": "grpo", "train.seq_len": 300, "grpo.inner_iterations": 3,
                     "grpo.num_generations": 4})
  assert [objectives.get(n).inner_iterations(c) for n in objectives.names()] == [1, 1, 1, 1, 1, 3, 1, 1]
  shapes = {k: f.shape(c) for k, f in objectives.get("grpo").batch.items()}
  assert shapes["old_logp"] == (8, 3, 256) and shapes["masked"] == (8, 3, 300) and shapes["advantages"] == (8,)
  assert {k for k, f in objectives.get("grpo").batch.items() if f.inner} == {"masked", "old_logp", "ref_logp"}
  assert objectives.get("ar").eval_metric == "eval_ppl" and objectives.get("sft").eval_metric == "eval_ppl_bound"
  assert objectives.get("vrpo").eval_metric is None  # exp(a DPO loss) is no perplexity


def test_unknown_objective_is_refused_naming_the_field():
  with pytest.raises(ValueError, match=r"config field 'diffusion.objective' must be one of .*'sft'.*; got 'dpo'"):
    tiny_config(**{"diffusion.objective": "dpo"})
  with pytest.raises(ValueError, match="diffusion.objective"):
    objectives.get("dpo")


def test_causal_must_match_the_objective():
  with pytest.raises(ValueError, match=r"config field 'model.causal' must be True for diffusion.objective='ar'"):
    tiny_config(**{"diffusion.objective": "ar"})
  with pytest.raises(ValueError, match=r"'model.causal' must be False for diffusion.objective='sft'"):
    tiny_config(**{"diffusion.objective": "sft", "model.causal": True})


def test_chat_flag_resolves_from_the_objective_unless_set():
  assert tiny_config().model.chat is False
  assert tiny_config(**{"diffusion.objective": "sft"}).model.chat is True
  assert tiny_config(**{"diffusion.objective": "sft", "model.chat": False}).model.chat is False
  assert tiny_config(**{"model.chat": True}).model.chat is True
  with pytest.raises(ValueError, match="config field 'model.chat' must be True, False or None"):
    config_lib.ModelConfig(chat="yes")
  # The resolved flag is what a checkpoint stores; one saved before the flag existed gets its objective's.
  saved = tiny_config(**{"diffusion.objective": "sft"}).to_dict()
  assert saved["model"]["chat"] is True
  del saved["model"]["chat"]
  assert config_lib.saved_model_config(saved).chat is True
  saved["diffusion"]["objective"] = "pretrain"
  assert config_lib.saved_model_config(saved).chat is False


def test_field_metadata_splits_architecture_from_execution():
  arch, execution = config_lib.architecture_fields(), config_lib.execution_fields()
  assert {"attention_impl", "loss_chunk_size", "remat_policy", "scan_layers", "dtype"} <= set(execution)
  assert {"vocab_size", "d_model", "num_layers", "causal"} <= set(arch)
  assert not set(arch) & set(execution) and "chat" not in arch + execution
  # usage fields: what the parameters are for (chat template, block-causal decoding), free to change when fine-tuning
  fields = {f.name for f in dataclasses.fields(config_lib.ModelConfig)}
  assert set(arch) | set(execution) | {"chat", "block_size"} == fields


@pytest.mark.parametrize("name", ["pretrain", "sft", "ar"])
def test_batch_layout_matches_what_the_data_builder_yields(tmp_path, name):
  cfg = _small(name, **({"train.eval_every": 1, "train.eval_batches": 1}))
  record = objectives.of(cfg)
  data = objectives.training_data(cfg, str(tmp_path))
  held_out = objectives.eval_batches(cfg, data.tokenizer)
  for batch in [next(data.iterator), held_out[0]]:
    assert set(batch) == set(record.batch)
    for field, spec in record.batch.items():
      assert batch[field].ndim == spec.rank, field
      assert batch[field].dtype == np.dtype(spec.dtype), field
      assert batch[field].shape[0] == cfg.train.batch_size
    record.check_batch(batch)
  with pytest.raises(ValueError, match=f"a '{name}' batch needs fields"):
    record.check_batch({"tokens": batch["tokens"], "extra": batch["tokens"]})
  assert len(data.sample_prompts) == 2  # what the CLI completes after training


def test_a_new_objective_is_one_registry_entry(monkeypatch, devices):
  """The seam: an objective registered here (the pre-training loss of the policy minus that of its frozen
  reference, under the same masks) trains through train.setup with no other change; the reference starts
  as a copy of the initial parameters and stays as it was while the parameters move."""
  pretrain = objectives.get("pretrain")

  def loss(score_fn, batch, rng, *, config, reference, step):
    policy = pretrain.loss(score_fn, batch, rng, config=config, reference=None)
    frozen = pretrain.loss(reference, batch, rng, config=config, reference=None)
    return policy._replace(loss=policy.loss - frozen.loss, metrics={"reference_loss": frozen.loss})

  toy = dataclasses.replace(pretrain, name="toy", loss=loss, reference=True)
  monkeypatch.setitem(objectives._REGISTRY, "toy", toy)
  results = {}
  for name in ("pretrain", "toy"):
    cfg = tiny_config(**{"diffusion.objective": name, "train.batch_size": 8, "train.seq_len": 16})
    s = train.setup(cfg)
    assert s.objective is objectives.get(name)
    state = s.init(train.root_key(cfg))
    start = jax.device_get(state.frozen)
    tokens = np.random.default_rng(0).integers(5, 100, (8, 16)).astype(np.int32)
    state, history = train.run_steps(s, state, iter([{"tokens": tokens}] * 2), 2)
    results[name] = history[0]
    if name == "toy":
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), start)
      assert not np.array_equal(jax.device_get(state.params["embedding"]), start["embedding"])
    else:
      assert start is None and state.frozen is None
  # at step 0 the reference is the policy: the toy loss is 0 and its metric is the pre-training loss
  np.testing.assert_allclose(results["toy"]["loss"], 0.0, atol=1e-6)
  np.testing.assert_allclose(results["toy"]["reference_loss"], results["pretrain"]["loss"], rtol=1e-6)
