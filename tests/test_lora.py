"""LoRA (REFERENCE §11): adapters start at the base model and merge exactly; a LoRA run trains only the
adapters (the base bit-identical), resumes exactly, shards like one device, refuses another base; LoRA
workdirs serve, export merged weights and PEFT files, and PEFT files import back bit for bit; VRPO's
reference under LoRA is the base itself."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import PRETRAINED_STEPS, tiny_config
from llada_jax import checkpoint as ckpt_lib, config as config_lib, hf, lora, model, peft, plan, serving
from llada_jax import sharding, train
from llada_jax.configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK = 4
LORA = {"lora.rank": RANK, "lora.alpha": 8.0, "train.num_steps": 6, "train.checkpoint_every": 3,
        "train.num_samples": 0, "train.log_every": 1, "optim.warmup_steps": 1}
TOKENS = {"lora.trainable_tokens": ("<|eot_id|>", 9)}  # a piece the run resolves (to 8) and an id
TOKEN_IDS = (8, 9)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _same(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def test_adapters_start_at_the_base_model_and_merge_into_the_same_function():
  m = config_lib.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=40,
                             mlp_pad_to=16, dtype="float32")
  cfg = config_lib.LoraConfig(rank=3, alpha=6.0, targets=config_lib.LORA_TARGETS, rslora=True,
                              trainable_tokens=(7, 2))
  assert cfg.scale == pytest.approx(6.0 / math.sqrt(3))
  graphdef, _ = model.abstract_model(m)
  params = model.init_params(m, jax.random.key(0))
  adapters = lora.init(m, cfg, jax.random.key(1))
  a = adapters["blocks"]["attn_out"]["lora_a"]
  assert a.shape == (2, 4, 8, 3) and float(jnp.abs(a).max()) <= 1 / math.sqrt(32)  # fan_in = heads x head_dim
  adapters = lora.seed_tokens(adapters, params, cfg)  # token rows start as the base's
  np.testing.assert_array_equal(adapters["tokens"]["embedding"][0], params["embedding"][7])
  np.testing.assert_array_equal(adapters["tokens"]["lm_head"][:, 1], params["lm_head"][:, 2])
  tokens = jax.random.randint(jax.random.key(2), (2, 9), 8, 64)  # neither token 2 nor 7 ...
  forward = jax.jit(lambda p, t, tree=None: model.apply(
      graphdef, p, t, adapters=None if tree is None else lora.Adapters.of(tree, cfg)))
  base = forward(params, tokens)
  np.testing.assert_array_equal(forward(params, tokens, adapters),
                                base)  # B = 0, token rows = the base's: exactly the base model
  trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), adapters)
  unmerged = forward(params, tokens, trained)
  merged = forward(lora.merge(params, trained, cfg), tokens)
  assert float(jnp.abs(unmerged - base).max()) > 0.05  # every target moved the output
  only_tokens = {**adapters, "tokens": trained["tokens"]}
  moved = np.abs(np.asarray(forward(params, tokens, only_tokens) - base))
  assert moved[..., [2, 7]].min() > 0 and np.delete(moved, [2, 7], axis=-1).max() == 0  # only their logits
  with_7 = tokens.at[:, 3].set(7)  # ... until one is read: token 7's new embedding row changes the rest too
  assert np.delete(np.abs(np.asarray(forward(params, with_7, only_tokens) - forward(params, with_7))), [2, 7],
                   axis=-1).max() > 1e-3
  np.testing.assert_allclose(merged, unmerged, atol=2e-5)
  np.testing.assert_allclose(forward(lora.merge(params, trained, cfg), with_7), forward(params, with_7, trained),
                             atol=2e-5)
  # Merging is W + scale * A @ B, layer by layer, for a kernel with two input axes too.
  w = params["blocks"]["attn_out"][1]
  want = w + cfg.scale * np.einsum("nhr,rd->nhd", trained["blocks"]["attn_out"]["lora_a"][1],
                                   trained["blocks"]["attn_out"]["lora_b"][1])
  np.testing.assert_allclose(lora.merge(params, trained, cfg)["blocks"]["attn_out"][1], want, rtol=1e-5, atol=1e-6)


def test_dropout_drops_adapter_inputs_only_while_training():
  x = jnp.ones((1, 2, 8))
  adapter = {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.ones((2, 3))}
  plain = lora.delta(x, adapter, "ff_up", scale=1.0)
  np.testing.assert_allclose(plain, 16.0)  # 8 ones through A then 2 through B
  key = jax.random.key(0)
  dropped = lora.delta(x, adapter, "ff_up", scale=1.0, dropout=0.5, rng=key)
  keep = jax.random.bernoulli(key, 0.5, x.shape)
  np.testing.assert_allclose(dropped, lora.delta(jnp.where(keep, 2.0, 0.0), adapter, "ff_up", scale=1.0))
  assert not np.allclose(dropped, plain)


@pytest.mark.parametrize("overrides, field", [
    ({"lora.rank": 4}, "'train.init_from'"),
    ({"lora.rank": 4, "train.init_from": "/x", "lora.targets": ("q_proj", "w_gate")}, "'lora.targets'"),
    ({"lora.dropout": 1.0}, "'lora.dropout'"),
    ({"lora.base_dtype": "int8"}, "'lora.base_dtype'"),
    ({"lora.trainable_tokens": (3,)}, "'lora.trainable_tokens' must be () unless lora.rank > 0"),
    ({"lora.rank": 4, "train.init_from": "/x", "lora.trainable_tokens": (3, 3)}, "'lora.trainable_tokens'"),
    ({"lora.rank": 4, "train.init_from": "/x", "lora.trainable_tokens": (-1,)}, "'lora.trainable_tokens'"),
])
def test_bad_lora_config_names_the_field(overrides, field):
  with pytest.raises(ValueError, match=re.escape(field)):
    tiny_config(**overrides)


def test_trainable_token_pieces_resolve_with_the_tokenizer():
  class Tok:
    vocab_size = 100
    piece_to_id = staticmethod({"<|eot_id|>": 8, "<|start_header_id|>": 6}.get)

  cfg = tiny_config(**{"lora.rank": 4, "train.init_from": "/x", "lora.trainable_tokens": ("<|eot_id|>", 3)})
  with pytest.raises(ValueError, match="resolve it"):
    cfg.lora.token_ids
  assert config_lib.resolve_tokens(cfg, Tok()).lora.token_ids == (8, 3)
  for tokens, why in ((("<|nope|>",), "'<|nope|>' is not one of its pieces"), ((100,), "100 is out of range"),
                      (("<|eot_id|>", 8), "two entries name the same id")):
    bad = tiny_config(**{"lora.rank": 4, "train.init_from": "/x", "lora.trainable_tokens": tokens})
    with pytest.raises(ValueError, match=re.escape(why)):
      config_lib.resolve_tokens(bad, Tok())
  ok = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
  assert peft.lora_config_from_peft({**ok, "trainable_token_indices": {"wte": [5, 1], "ff_out": [5, 1]}},
                                    "x").trainable_tokens == (5, 1)
  for indices in ([5, 1], {"wte": [5]}, {"wte": [5], "ff_out": [6]}):  # one side only: not expressible
    with pytest.raises(ValueError, match="same ids for both"):
      peft.lora_config_from_peft({**ok, "trainable_token_indices": indices}, "x")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pretrained_workdir):
  """LoRA pre-training over the shared tiny base: one run of 6 steps (checkpoints at 3 and 6), and a copy
of its workdir without step 6, resumed from step 3."""
  root = tmp_path_factory.mktemp("lora")
  cfg = tiny_config(**LORA, **TOKENS, **{"train.init_from": pretrained_workdir, "train.eval_every": 6})
  full = train.train_and_evaluate(cfg, str(root / "full"))
  shutil.copytree(root / "full", root / "resumed")
  shutil.rmtree(root / "resumed" / "checkpoints" / "6")
  resumed = train.train_and_evaluate(cfg, str(root / "resumed"))
  assert resumed["step"] == 6 and resumed["finished"]
  return cfg, full, resumed, root


def test_a_lora_run_trains_only_the_adapters_and_resumes_exactly(runs, pretrained_workdir):
  cfg, full, resumed, root = runs
  s, state = full["setup"], full["state"]
  source = ckpt_lib.Checkpointer(pretrained_workdir, read_only=True)
  base = source.restore_params(PRETRAINED_STEPS, s.abstract_state.base)
  _same(state.base, base)  # the base never moved, bit for bit
  assert set(state.params["blocks"]) == set(cfg.lora.targets) and state.frozen is None
  for target in cfg.lora.targets:  # B started at zero and trained
    assert float(jnp.abs(state.params["blocks"][target]["lora_b"]).max()) > 0
  assert s.config.lora.token_ids == TOKEN_IDS  # the piece resolved with the run's tokenizer, and saved so
  assert json.loads((root / "full" / "config.json").read_text())["lora"]["trainable_tokens"] == list(TOKEN_IDS)
  head = np.asarray(state.params["tokens"]["lm_head"]) - np.asarray(base["lm_head"])[:, list(TOKEN_IDS)]
  assert np.abs(head).min(axis=0).max() > 0  # the token rows started at the base's and trained
  _same((resumed["state"].params, resumed["state"].opt_state, resumed["state"].step),
        (state.params, state.opt_state, state.step))
  other = tiny_config(**LORA, **{"train.init_from": pretrained_workdir, "lora.trainable_tokens": (9,)})
  with pytest.raises(ValueError, match=re.escape("'lora.trainable_tokens'=(9,) differs from (8, 9)")):
    train.train_and_evaluate(other, str(root / "resumed"))  # other token rows than the checkpoint's: refused
  # A step holds the adapters and the base's record, never the base's arrays.
  ckpt = ckpt_lib.Checkpointer(str(root / "full"), read_only=True)
  record = json.loads((ckpt.directory / "6" / "integrity" / "metadata").read_text())
  names = list(record["shapes"])
  assert not any("['base']" in name or "['params']['embedding']" in name for name in names)
  assert any("['params']['tokens']['embedding']" in name for name in names), names  # only the token rows
  assert ckpt.base_record(6) == {"path": pretrained_workdir, "step": PRETRAINED_STEPS,
                                 "fingerprint": source.fingerprint(PRETRAINED_STEPS)}
  scores = [json.loads(line) for line in (root / "full" / "metrics.jsonl").read_text().splitlines()]
  assert any("eval_loss" in r for r in scores)  # validation ran on base + adapters


def test_lora_step_sharded_equals_one_device(devices, pretrained_workdir):
  runs_ = {}
  for name, devs in (("one", devices[:1]), ("eight", devices)):
    cfg = tiny_config(**LORA, **{"train.init_from": pretrained_workdir, "lora.targets": config_lib.LORA_TARGETS,
                                 "lora.dropout": 0.1, "train.grad_accum_steps": 1,
                                 "lora.trainable_tokens": TOKEN_IDS})
    s = train.setup(cfg, sharding.make_mesh(cfg.mesh, devs))
    state = s.attach_base(s.init(train.root_key(cfg)), s.init_base(jax.random.key(5)), fresh=True)
    if name == "eight":  # adapters shard like the kernels they adapt, the rank axis replicated
      q = state.params["blocks"]["q_proj"]
      assert q["lora_a"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
      assert state.base["blocks"]["q_proj"].sharding.spec[1] == "fsdp"
      np.testing.assert_array_equal(state.params["tokens"]["embedding"],  # token rows seeded from the base
                                    np.asarray(state.base["embedding"])[list(TOKEN_IDS)])
    rng = np.random.default_rng(0)
    batches = iter(lambda: {"tokens": rng.integers(5, 200, (8, 32)).astype(np.int32)}, None)
    runs_[name] = train.run_steps(s, state, batches, 2)
  (s1, h1), (s8, h8) = runs_["one"], runs_["eight"]
  np.testing.assert_allclose([h["loss"] for h in h1], [h["loss"] for h in h8], rtol=1e-5)
  assert h1[0]["loss"] != h1[1]["loss"]
  for a, b in zip(_leaves(s1.params), _leaves(s8.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  planned = config_lib.stand_in_tokens(tiny_config(**LORA, **TOKENS, **{"train.init_from": "/x",
                                                                        "lora.base_dtype": "bfloat16"}))
  assert planned.lora.token_ids == (0, 9)  # --dry_run has no tokenizer: a piece gets a free stand-in id
  report = plan.dry_run(train.setup(planned))
  full_ft = train.setup(tiny_config()).abstract_state  # full fine-tuning's bytes, from its placements
  full_params = sum(r.device_bytes for r in plan.leaf_placements(full_ft.params))
  full_opt = sum(r.device_bytes for r in plan.leaf_placements(full_ft.opt_state))
  assert report.base_per_device == full_params // 2  # the frozen base in bfloat16
  assert report.params_per_device < full_params // 3 and report.opt_per_device < full_opt // 3
  assert "base model (frozen)" in report.table()


def test_lora_workdir_serves_merged_exports_and_round_trips_through_peft(runs, pretrained_workdir, tmp_path):
  _, full, _, root = runs
  cfg = full["setup"].config  # as the run resolved it: trainable tokens as ids
  state, workdir = full["state"], str(root / "full")
  merged = jax.device_get(lora.merge(state.base, state.params, cfg.lora))
  loaded = serving.load(workdir)
  for a, b in zip(_leaves(loaded.params), _leaves(merged)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert loaded.complete(["the"], gen_length=4, steps=4, block_length=4)[0].raw_ids

  with pytest.raises(ValueError, match="pass --merge"):
    hf.export_checkpoint(workdir, tmp_path / "plain")
  with pytest.raises(ValueError, match="holds no LoRA adapters"):
    hf.export_checkpoint(pretrained_workdir, tmp_path / "plain", merge=True)
  hf.export_checkpoint(workdir, tmp_path / "merged", merge=True)
  from safetensors.numpy import load_file
  exported = load_file(tmp_path / "merged" / "model.safetensors")
  np.testing.assert_allclose(exported["model.transformer.blocks.1.q_proj.weight"],
                             np.asarray(merged["blocks"]["q_proj"][1]).reshape(32, -1).T, rtol=1e-6)

  # PEFT: names and shapes as PEFT lays them out for the released module names ([r, in], [out, r]).
  peft.export_adapter(workdir, tmp_path / "peft")
  tensors = load_file(tmp_path / "peft" / peft.ADAPTER_FILE)
  m = cfg.model
  hf_out = {"q_proj": m.num_heads * m.head_dim, "k_proj": m.num_kv_heads * m.head_dim,
            "v_proj": m.num_kv_heads * m.head_dim, "up_proj": m.mlp_dim}
  pattern = re.compile(r"base_model\.model\.model\.transformer\.blocks\.(\d+)\.(\w+)\.lora_([AB])\.weight")
  seen = set()
  for module in ("wte", "ff_out"):  # the trainable token rows: [n, d_model] under PEFT's trainable-tokens name
    name = f"base_model.model.model.transformer.{module}.token_adapter.trainable_tokens_delta"
    assert tensors.pop(name).shape == (len(TOKEN_IDS), m.d_model)
  for name, value in tensors.items():
    layer, module, part = pattern.fullmatch(name).groups()
    seen.add((int(layer), module, part))
    assert value.shape == ((RANK, m.d_model) if part == "A" else (hf_out[module], RANK)), name
  assert seen == {(i, mod, p) for i in range(m.num_layers) for mod in hf_out for p in "AB"}
  adapter_cfg = json.loads((tmp_path / "peft" / peft.CONFIG_FILE).read_text())
  assert adapter_cfg["peft_type"] == "LORA" and adapter_cfg["r"] == RANK and adapter_cfg["lora_alpha"] == 8.0
  assert adapter_cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "up_proj"]
  assert adapter_cfg["trainable_token_indices"] == {"wte": list(TOKEN_IDS), "ff_out": list(TOKEN_IDS)}
  from safetensors import safe_open
  with safe_open(tmp_path / "peft" / peft.ADAPTER_FILE, framework="numpy") as f:
    assert f.metadata() == {"format": "pt"}  # what PyTorch loaders require
  peft.import_adapter(str(tmp_path / "peft"), pretrained_workdir, str(tmp_path / "imported"), chat=True)
  imported = ckpt_lib.Checkpointer(str(tmp_path / "imported"), read_only=True)
  _same(imported.restore_params(0, jax.eval_shape(lambda: state.params)), state.params)  # bit-exact
  reloaded = serving.load(str(tmp_path / "imported"))
  _same(reloaded.params, loaded.params)
  assert reloaded.chat and not loaded.chat  # an SFT adapter over a base model can be marked a chat model


def test_a_different_base_is_refused_in_one_line(runs, pretrained_workdir, tmp_path):
  cfg, _, _, root = runs
  other = tmp_path / "other_base"
  shutil.copytree(pretrained_workdir, other)
  meta = other / "checkpoints" / str(PRETRAINED_STEPS) / "integrity" / "metadata"
  record = json.loads(meta.read_text())
  name = next(k for k in record["checksums"] if k.startswith("['params']"))
  record["checksums"][name][1] += 1  # another base model under the same step number
  meta.write_text(json.dumps(record))
  workdir = tmp_path / "run"
  shutil.copytree(root / "full", workdir)
  overrides = [f"--config.{k}={v}" for k, v in {**LORA, **TOKENS}.items()] + [
      f"--config.train.init_from={other}", "--config.train.num_steps=7"]
  proc = subprocess.run([sys.executable, "-m", "llada_jax.cli.train", f"--config={REPO}/configs/tiny.py",
                         f"--workdir={workdir}", *overrides], capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  lines = [line for line in proc.stderr.splitlines() if line.startswith("llada-train")]
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith("llada-train: error: config field 'train.init_from'") and "is not the base model" in lines[0]
  with open(workdir / "config.json") as f:  # the run never started: nothing changed in the workdir
    assert json.load(f)["train"]["num_steps"] == 6
  saved = json.loads((workdir / "config.json").read_text())
  saved["train"]["init_from"] = str(other)
  (workdir / "config.json").write_text(json.dumps(saved))
  ckpt_saved = workdir / "checkpoints" / "6" / "config" / "metadata"
  step_cfg = json.loads(ckpt_saved.read_text())
  step_cfg["train"]["init_from"] = str(other)
  ckpt_saved.write_text(json.dumps(step_cfg))
  with pytest.raises(ValueError, match="is not the base model the LoRA adapters were trained on"):
    serving.load(str(workdir))


def test_vrpo_under_lora_uses_the_base_as_its_reference(sft_workdir):
  c = default.get_config("tiny")
  c.train.update(seq_len=48, num_steps=3, num_samples=0)
  c.preference.update(budget=2)
  c = default.preference(c, init_from=sft_workdir)
  c.lora.update(rank=RANK, alpha=8.0)
  cfg = config_lib.from_config_dict(c)
  s = train.setup(cfg)
  assert s.abstract_state.frozen is None  # no second copy of the weights
  base, _ = train.load_base(cfg, s)
  start = jax.device_get(base)  # (the step donates the state, base included, and hands it back)
  state = s.attach_base(s.init(train.root_key(cfg)), base, fresh=True)
  rng = np.random.default_rng(0)
  B, L = cfg.train.batch_size, cfg.train.seq_len

  def pairs():
    chosen = rng.integers(5, 200, (B, L)).astype(np.int32)
    rejected = chosen.copy()
    rejected[:, L // 2:] = rng.integers(5, 200, (B, L - L // 2))
    return {"chosen": chosen, "rejected": rejected, "prompt_len": np.full(B, 8, np.int32),
            "valid": np.ones((B, L), bool)}

  state, hist = train.run_steps(s, state, iter(pairs, None), 3)
  np.testing.assert_allclose(hist[0]["loss"], math.log(2.0), rtol=1e-6)  # adapters off == on at step 0
  assert hist[-1]["reward_margin"] != 0.0
  _same(state.base, start)
