"""Hugging Face interop: tiny synthetic LLaDA, iLLaDA-like (tied) and LLaDA-MoE directories in the released
layouts (REFERENCE §1, §12, §13), written here with safetensors/numpy, imported, run against NumPy forwards
of the released architectures, exported, and broken on purpose."""

import importlib.util
import json
import os
import re

import ml_dtypes
import numpy as np
import pytest
from safetensors import numpy as st_numpy
from safetensors import safe_open

import cli_forks
from hf_fixtures import D, HEADS, LAYERS, VOCAB, edit_json, write_hf_dir, write_moe_dir
from llada_jax import evaluate, harness, hf, model as model_lib, serving
from llada_jax.data import sft
from llada_jax.config import MeshConfig, ModelConfig, architecture_fields, from_config_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_logits(w: dict[str, np.ndarray], cfg: dict, tokens_BT: np.ndarray,
                     valid_BT: np.ndarray) -> np.ndarray:
  """The released architecture (REFERENCE §1) in float64 NumPy, on the HF tensors as stored."""
  w = {k: v.astype(np.float64) for k, v in w.items()}
  d, n, k, eps = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"], cfg["rms_norm_eps"]
  h, (B, T) = d // n, tokens_BT.shape
  rms = lambda x, g: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g
  inv_freq = cfg["rope_theta"] ** (-np.arange(0, h, 2) / h)
  angles = np.arange(T)[:, None] * inv_freq[None, :]
  cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))

  def rope(x_BTNH):
    rotated = np.concatenate([-x_BTNH[..., h // 2:], x_BTNH[..., :h // 2]], -1)
    return x_BTNH * cos[None, :, None] + rotated * sin[None, :, None]

  x = w["model.transformer.wte.weight"][tokens_BT]
  for i in range(cfg["n_layers"]):
    p = lambda name: w[f"model.transformer.blocks.{i}.{name}.weight"]
    y = rms(x, p("attn_norm"))
    q = rope((y @ p("q_proj").T).reshape(B, T, n, h))
    keys = np.repeat(rope((y @ p("k_proj").T).reshape(B, T, k, h)), n // k, axis=2)  # repeat_interleave
    values = np.repeat((y @ p("v_proj").T).reshape(B, T, k, h), n // k, axis=2)
    scores = np.einsum("bqnh,bsnh->bnqs", q, keys) / np.sqrt(h)
    scores = np.where(valid_BT[:, None, None, :], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + np.einsum("bnqs,bsnh->bqnh", probs, values).reshape(B, T, n * h) @ p("attn_out").T
    y = rms(x, p("ff_norm"))
    gate = y @ p("ff_proj").T
    x = x + ((gate / (1 + np.exp(-gate))) * (y @ p("up_proj").T)) @ p("ff_out").T
  head = w["model.transformer.wte.weight" if cfg["weight_tying"] else "model.transformer.ff_out.weight"]
  return rms(x, w["model.transformer.ln_f.weight"]) @ head.T


def moe_reference_logits(w: dict[str, np.ndarray], cfg: dict, tokens_BT: np.ndarray) -> tuple[np.ndarray, float]:
  """The released modeling_lladamoe.py in float64 NumPy, on the HF tensors as stored: (logits, the smallest
  gap between a token's k-th and (k+1)-th router probability, so a test can see no top-k choice is a tie).

  Per layer: RMSNorm, q/k/v projections, RMSNorm of q and k over head_dim, RoPE on the first
  partial_rotary_factor * head_dim dims (rotate_half within them), full bidirectional attention (the
  released code ignores any mask) with GQA, o_proj, residual; RMSNorm, softmax router, top-k, weights as
  they are (not renormalised), SwiGLU experts plus the shared expert, residual. Final norm, lm_head.
  """
  w = {k: v.astype(np.float64) for k, v in w.items()}
  d, n, kv, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
  h, (B, T), top = d // n, tokens_BT.shape, cfg["num_experts_per_tok"]
  r = int(h * cfg["partial_rotary_factor"])
  rms = lambda x, g: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g
  silu = lambda x: x / (1 + np.exp(-x))
  inv_freq = cfg["rope_theta"] ** (-np.arange(0, r, 2) / r)
  angles = np.arange(T)[:, None] * inv_freq[None, :]
  cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))

  def rope(x_BTNH):
    x_rot, x_pass = x_BTNH[..., :r], x_BTNH[..., r:]
    rotated = np.concatenate([-x_rot[..., r // 2:], x_rot[..., :r // 2]], -1)
    return np.concatenate([x_rot * cos[None, :, None] + rotated * sin[None, :, None], x_pass], -1)

  def swiglu(y, stem):
    return (silu(y @ w[f"{stem}.gate_proj.weight"].T) * (y @ w[f"{stem}.up_proj.weight"].T)) @ w[
        f"{stem}.down_proj.weight"].T

  x, gap = w["model.embed_tokens.weight"][tokens_BT], np.inf
  for i in range(cfg["num_hidden_layers"]):
    p = lambda name: w[f"model.layers.{i}.{name}.weight"]
    y = rms(x, p("input_layernorm"))
    q = (y @ p("self_attn.q_proj").T).reshape(B, T, n, h)
    keys = (y @ p("self_attn.k_proj").T).reshape(B, T, kv, h)
    if cfg["qk_layernorm"]:
      q, keys = rms(q, p("self_attn.q_norm")), rms(keys, p("self_attn.k_norm"))
    q, keys = rope(q), np.repeat(rope(keys), n // kv, axis=2)
    values = np.repeat((y @ p("self_attn.v_proj").T).reshape(B, T, kv, h), n // kv, axis=2)
    scores = np.einsum("bqnh,bsnh->bnqs", q, keys) / np.sqrt(h)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + np.einsum("bnqs,bsnh->bqnh", probs, values).reshape(B, T, n * h) @ p("self_attn.o_proj").T
    y = rms(x, p("post_attention_layernorm"))
    logits = y @ p("mlp.gate").T
    router = np.exp(logits - logits.max(-1, keepdims=True))
    router /= router.sum(-1, keepdims=True)
    ranked = np.sort(router, -1)[..., ::-1]
    gap = min(gap, float((ranked[..., top - 1] - ranked[..., top]).min()))
    chosen = router >= ranked[..., top - 1:top]  # the top-k experts of each token
    weight_BTE = np.where(chosen, router, 0.0)
    ff = sum(weight_BTE[..., j:j + 1] * swiglu(y, f"model.layers.{i}.mlp.experts.{j}")
             for j in range(cfg["num_experts"]))
    x = x + ff + swiglu(y, f"model.layers.{i}.shared_expert")
  return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T, gap


def read_folder(folder) -> dict[str, np.ndarray]:
  """Every tensor of every safetensors file in `folder`, after checking their metadata is PyTorch's."""
  out = {}
  for name in sorted(os.listdir(folder)):
    if name.endswith(".safetensors"):
      with safe_open(os.path.join(folder, name), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        out.update({key: f.get_tensor(key) for key in f.keys()})
  return out


def assert_same_tensors(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
  assert sorted(got) == sorted(expected)
  for name, value in expected.items():
    assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
    assert got[name].tobytes() == value.tobytes(), name


# ---------------------------------------------------------------------------------------------------------
# Numerics and placement


def test_forward_on_imported_weights_matches_float64_reference(tmp_path, devices):
  weights, config, _ = write_hf_dir(tmp_path / "hf", num_files=3)
  model = hf.load(tmp_path / "hf", dtype="float32", compute_dtype="float32")
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, VOCAB, size=(2, 12))
  valid = np.ones((2, 12), bool)
  valid[1, 9:] = False  # key padding on the second row
  ours = np.asarray(model_lib.apply(model.graphdef, model.params, tokens, valid))
  ref = reference_logits(weights, config, tokens, valid)
  np.testing.assert_allclose(ours[0], ref[0], rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(ours[1, :9], ref[1, :9], rtol=2e-4, atol=2e-4)
  assert np.abs(ref).max() > 1.0  # the comparison is not between two near-zero tensors


def test_import_is_sharded_over_the_mesh_and_in_our_layout(tmp_path, devices):
  weights, _, _ = write_hf_dir(tmp_path / "hf", dtype=ml_dtypes.bfloat16)
  model = hf.load(tmp_path / "hf", mesh=MeshConfig(data=2, fsdp=4))
  q = model.params["blocks"]["q_proj"]
  assert q.dtype == np.dtype("bfloat16") and model.model_config.param_dtype == "bfloat16"
  assert q.sharding.spec[1] == "fsdp" and len(q.sharding.device_set) == 8
  assert q.addressable_shards[0].data.shape == (LAYERS, D // 4, HEADS, D // HEADS)  # d_model split 4 ways
  h = D // HEADS
  for i in range(LAYERS):
    expect = weights[f"model.transformer.blocks.{i}.q_proj.weight"].T.reshape(D, HEADS, h)
    np.testing.assert_array_equal(np.asarray(q[i]), expect)
    expect = weights[f"model.transformer.blocks.{i}.attn_out.weight"].T.reshape(HEADS, h, D)
    np.testing.assert_array_equal(np.asarray(model.params["blocks"]["attn_out"][i]), expect)
  np.testing.assert_array_equal(np.asarray(model.params["lm_head"]),
                                weights["model.transformer.ff_out.weight"].T)
  cast = hf.load(tmp_path / "hf", dtype="float32")
  assert cast.params["embedding"].dtype == np.float32
  np.testing.assert_array_equal(np.asarray(cast.params["embedding"]),
                                weights["model.transformer.wte.weight"].astype(np.float32))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_import_then_export_is_bit_exact(tmp_path, dtype, devices):
  weights, config, _ = write_hf_dir(tmp_path / "hf", dtype=dtype, num_files=2)
  hf.import_checkpoint(tmp_path / "hf", tmp_path / "work")
  names = hf.export_checkpoint(tmp_path / "work", tmp_path / "out", max_shard_bytes=40_000)
  assert len(names) > 1 and (tmp_path / "out" / hf.INDEX_FILE).exists()
  index = json.loads((tmp_path / "out" / hf.INDEX_FILE).read_text())["weight_map"]
  assert set(index) == set(weights)
  for name, expected in weights.items():
    with safe_open(str(tmp_path / "out" / index[name]), framework="numpy") as f:
      got = f.get_tensor(name)
      assert f.metadata() == {"format": "pt"}
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert got.tobytes() == expected.tobytes(), name
  exported = json.loads((tmp_path / "out" / "config.json").read_text())
  assert {k: exported[k] for k in config} == config  # every key of the original survives, unchanged
  assert hf.HFDirectory(tmp_path / "out").check(hf.model_config_from_hf(exported, param_dtype="float32"))
  assert (tmp_path / "out" / "tokenizer.json").exists()


def test_tied_gqa_checkpoint_converts_from_its_config_and_exports_bit_exact(tmp_path, devices):
  """iLLaDA-like (REFERENCE §12): weight_tying, 1 KV head of 4, mask id 5, vocabulary, theta, eps and
  context from config.json; the head is the embedding, and no ff_out tensor exists either way."""
  weights, config, ids = write_hf_dir(tmp_path / "hf", tied=True)
  assert "model.transformer.ff_out.weight" not in weights and ids["<|mask|>"] == 5
  model = hf.import_checkpoint(tmp_path / "hf", tmp_path / "work", compute_dtype="float32")
  m = model.model_config
  assert m.tie_embeddings and "lm_head" not in model.params
  assert (m.num_heads, m.num_kv_heads, m.vocab_size, m.mlp_dim, m.max_seq_len, m.rope_theta, m.norm_eps) == (
      HEADS, 1, 192, 48, 8192, 10000.0, 1e-6)
  assert model.mask_id == 5 and model.tokenizer.mask_id == 5 and model.tokenizer.eos_id == ids["<|endoftext|>"]
  assert json.loads((tmp_path / "work" / "config.json").read_text())["diffusion"]["mask_token_id"] == 5
  tokens = np.random.default_rng(1).integers(0, 192, size=(2, 12))
  valid = np.ones((2, 12), bool)
  ours = np.asarray(model_lib.apply(model.graphdef, model.params, tokens, valid))
  np.testing.assert_allclose(ours, reference_logits(weights, config, tokens, valid), rtol=2e-4, atol=2e-4)

  hf.export_checkpoint(tmp_path / "work", tmp_path / "out")
  assert_same_tensors(read_folder(tmp_path / "out"), weights)
  exported = json.loads((tmp_path / "out" / "config.json").read_text())
  assert {k: exported[k] for k in config} == config and exported["weight_tying"] is True


def test_moe_checkpoint_matches_the_released_forward_and_exports_bit_exact(tmp_path, devices):
  """LLaDA-MoE's layout (REFERENCE §13): every per-expert tensor lands in its [layer, expert] slice, also
  with the experts split over a mesh axis; the logits are those of a NumPy modeling_lladamoe.py; export
  writes the same tensors (per expert again) and a config.json that keeps every imported key."""
  weights, config, ids = write_moe_dir(tmp_path / "hf", num_files=2)
  mesh = MeshConfig(fsdp=4, expert=2, rule_set="fsdp_ep")
  model = hf.import_checkpoint(tmp_path / "hf", tmp_path / "work", mesh=mesh, compute_dtype="float32")
  m = model.model_config
  assert (m.num_experts, m.experts_per_token, m.mlp_dim, m.shared_expert_dim, m.qk_norm, m.rope_fraction) == (
      4, 2, 16, 24, True, 0.5)
  assert (m.router_score, m.router_renorm, m.router_bias, m.routed_scaling) == ("softmax", False, False, 1.0)
  assert (m.num_kv_heads, m.vocab_size, m.norm_eps, m.rope_theta, m.max_seq_len, m.tie_embeddings) == (
      2, 176, 1e-6, 50000.0, 8192, False)
  assert model.mask_id == ids["<|mdm_mask|>"] and m.param_dtype == "float32"
  down = model.params["blocks"]["ff_down"]
  assert down.sharding.spec[1] == "expert" and down.addressable_shards[0].data.shape == (LAYERS, 2, 16, D // 4)
  np.testing.assert_array_equal(np.asarray(down[1, 3]), weights["model.layers.1.mlp.experts.3.down_proj.weight"].T)
  router = model.params["blocks"]["router"]
  np.testing.assert_array_equal(np.asarray(router[0]), weights["model.layers.0.mlp.gate.weight"].T)

  tokens = np.random.default_rng(1).integers(0, 176, size=(2, 12))
  ours = np.asarray(model_lib.apply(model.graphdef, model.params, tokens))  # no padding: the release has no mask
  ref, gap = moe_reference_logits(weights, config, tokens)
  assert gap > 1e-4  # no token's top-2 is a near-tie that float32 could choose differently
  np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-4)
  assert np.abs(ref).max() > 1.0

  names = hf.export_checkpoint(tmp_path / "work", tmp_path / "out", max_shard_bytes=20_000)
  assert len(names) > 1
  assert_same_tensors(read_folder(tmp_path / "out"), weights)
  exported = json.loads((tmp_path / "out" / "config.json").read_text())
  assert {k: exported[k] for k in config} == config  # every key of the original survives, unchanged
  assert hf.HFDirectory(tmp_path / "out").check(hf.model_config_from_hf(exported, param_dtype="float32"))


def test_fresh_moe_export_config_reads_back_as_the_same_model():
  """A model trained here (no imported config.json) gets a config.json modeling_lladamoe.py reads: every
  layer MoE as a per-layer list, the softmax router spelt out; reading it back gives the same model."""
  m = ModelConfig(vocab_size=64, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=16, num_experts=4,
                  experts_per_token=2, qk_norm=True, rope_fraction=0.5, tie_embeddings=True, param_dtype="float32")
  cfg = hf.hf_config_from_model(m, mask_id=5, eos_id=1, pad_id=1)
  assert cfg["architectures"] == ["LLaDAMoEModelLM"] and cfg["moe_layer_freq"] == [1, 1, 1]
  assert cfg["shared_expert_intermediate_size"] is None and cfg["moe_router_score_function"] == "softmax"
  assert not cfg["moe_router_enable_expert_bias"] and cfg["mask_token_id"] == 5
  assert hf.model_config_from_hf(json.loads(json.dumps(cfg)), param_dtype="float32") == m
  assert not any(t.name.startswith("lm_head") for t in hf.layout(m))


@pytest.mark.parametrize("changes,message", [
    ({"qk_norm": True}, "model.qk_norm=True: the LLaDA (modeling_llada.py) layout cannot express it"),
    ({"rope_fraction": 0.5}, "model.rope_fraction=0.5"),
    ({"num_experts": 4, "router_score": "sigmoid"}, "model.router_score='sigmoid': the LLaDA-MoE"),
    ({"num_experts": 4, "router_renorm": True}, "model.router_renorm=True"),
    ({"num_experts": 4, "router_bias": True}, "model.router_bias=True"),
    ({"num_experts": 4, "routed_scaling": 2.5}, "model.routed_scaling=2.5"),
])
def test_export_refuses_a_model_its_layout_cannot_express(changes, message):
  m = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, mlp_dim=16, **changes)
  with pytest.raises(ValueError, match=re.escape(message)):
    hf.hf_config_from_model(m, mask_id=5, eos_id=1, pad_id=1)


# ---------------------------------------------------------------------------------------------------------
# The converted workdir in the rest of the package


def _cli(module, *args):
  return cli_forks.shared().run(f"llada_jax.cli.{module}", args)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf_cli")
  # bf16 as released: fine-tuning below restores it into float32 parameters
  weights, config, ids = write_hf_dir(root / "LLaDA-tiny-Instruct", num_files=2, dtype=ml_dtypes.bfloat16)
  r = _cli("convert", f"--hf_dir={root / 'LLaDA-tiny-Instruct'}", f"--out={root / 'work'}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "instruct (chat template)" in r.stdout
  return root, config, ids


def test_converted_workdir_serves_scores_and_exports(converted):
  root, config, ids = converted
  model = serving.load(str(root / "work"))
  assert model.chat and model.mask_id == ids["<|mdm_mask|>"]
  assert model.tokenizer.eos_id == ids["<|endoftext|>"]
  # The flag is stored: the checkpoint's config holds it, and no training settings were invented.
  saved = json.loads((root / "work" / "config.json").read_text())
  assert saved["model"]["chat"] is True and set(saved) == {"model", "diffusion", "mesh"}
  out = model.complete(["hello there"], gen_length=8, steps=8, block_length=8)[0]
  assert len(out.raw_ids) == 8 and ids["<|mdm_mask|>"] not in out.raw_ids
  scorer = evaluate.Scorer.from_loaded(model)
  tok = model.tokenizer
  lp = scorer.loglikelihood([[tok.bos_id] + tok.encode("the cat")], [tok.encode(" sat")],
                            evaluate.LikelihoodConfig(mc_num=4, batch_size=4))
  assert np.isfinite(lp[0]) and lp[0] < 0
  lm = harness.LladaLM(model=model)  # lm-eval hands chat-templated contexts back as text
  history = [{"role": "user", "content": " hi there\n"}, {"role": "assistant", "content": "ok"},
             {"role": "user", "content": "and now?"}]
  text = lm.apply_chat_template(history)
  assert lm._encode(text) == sft.render_prompt(history, tok)[1:]  # pylint: disable=protected-access
  assert lm._start(text) == [tok.bos_id]  # pylint: disable=protected-access
  r = _cli("sample", f"--workdir={root / 'work'}", "--prompt=hello", "--gen_length=8", "--steps=8",
           "--block_length=8")
  assert r.returncode == 0 and "hello" in r.stdout, r.stderr[-3000:]
  r = _cli("export", f"--workdir={root / 'work'}", f"--out={root / 'exported'}", "--dtype=bfloat16")
  assert r.returncode == 0, r.stderr[-3000:]
  with safe_open(str(root / "exported" / "model.safetensors"), framework="numpy") as f:
    assert f.get_tensor("model.transformer.ln_f.weight").dtype == np.dtype("bfloat16")
  r = _cli("export", f"--workdir={root / 'work'}", f"--out={root / 'exported'}")
  assert r.returncode == 1 and "not empty" in r.stderr  # never writes over an earlier export


def test_sft_fine_tunes_from_the_converted_workdir(converted, tmp_path):
  root, _, ids = converted
  r = _cli("train", f"--config={os.path.join(REPO, 'configs', 'sft_tiny.py')}", f"--workdir={tmp_path}",
           f"--config.train.init_from={root / 'work'}", f"--config.diffusion.mask_token_id={ids['<|mdm_mask|>']}",
           "--config.train.num_steps=2", "--config.optim.warmup_steps=1", "--config.optim.decay_steps=1",
           "--config.train.num_samples=0")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "initialised parameters from step 0" in r.stdout
  assert (tmp_path / "tokenizer.json").exists()  # the released tokenizer travels with the fine-tune


# ---------------------------------------------------------------------------------------------------------
# Malformed directories: a clear message, and no weight read before the checks pass


@pytest.fixture
def no_reads(monkeypatch):
  def fail(self, name):
    raise AssertionError(f"read {name} before the directory was validated")
  monkeypatch.setattr(hf.HFDirectory, "read", fail)


def _edit_config(folder, **changes):
  edit_json(os.path.join(folder, "config.json"), **changes)


def _rewrite(folder, change):
  path = os.path.join(folder, "model.safetensors")
  tensors = st_numpy.load_file(path)
  change(tensors)
  st_numpy.save_file(tensors, path)


@pytest.mark.parametrize("breakage,message", [
    (lambda d: _rewrite(d, lambda t: t.pop("model.transformer.blocks.1.up_proj.weight")),
     "model.transformer.blocks.1.up_proj.weight"),
    (lambda d: _rewrite(d, lambda t: t.update({"model.transformer.blocks.0.k_proj.weight":
                                                 np.zeros((D, D), np.float32)})),
     "'model.transformer.blocks.0.k_proj.weight' in model.safetensors has shape [32, 32]"),
    (lambda d: _rewrite(d, lambda t: t.update({"model.transformer.blocks.0.attn.bias": np.zeros(3)})),
     "model.transformer.blocks.0.attn.bias"),
    (lambda d: _edit_config(d, mlp_hidden_size=None), "lacks the key 'mlp_hidden_size'"),
    (lambda d: _edit_config(d, block_type=None), "lacks the key 'block_type'"),
    (lambda d: _edit_config(d, block_type="sequential"), "'block_type'='sequential' is not supported"),
    (lambda d: _edit_config(d, weight_tying=True),  # tied: the untied head's tensor is one too many
     "holds tensor(s) the LLaDA layout does not have, e.g. model.transformer.ff_out.weight"),
    (lambda d: _edit_config(d, weight_tying="yes"), "'weight_tying'='yes' must be true or false"),
    (lambda d: _edit_config(d, mask_token_id=3), "mask_token_id=3 but the tokenizer's id"),
    (lambda d: open(os.path.join(d, "model.safetensors"), "r+b").truncate(100),
     "not a readable safetensors file"),
])
def test_malformed_directory_names_the_problem(tmp_path, breakage, message, no_reads):
  write_hf_dir(tmp_path)
  breakage(str(tmp_path))
  with pytest.raises(ValueError) as e:
    hf.load(tmp_path)
  assert message in str(e.value)


@pytest.mark.parametrize("breakage,message", [
    (lambda d: _edit_config(d, moe_router_enable_expert_bias=True),
     "'moe_router_enable_expert_bias'=True is not supported (the released modeling_lladamoe.py adds the expert "
     "bias to the routing weights"),
    (lambda d: _edit_config(d, moe_layer_freq=[0, 1]), "'moe_layer_freq'=[0, 1] makes layer(s) [0] dense"),
    (lambda d: _edit_config(d, moe_router_score_function="sigmoid"),
     "'moe_router_score_function'='sigmoid' is not supported"),
    (lambda d: _edit_config(d, routed_scaling_factor=2.5), "'routed_scaling_factor'=2.5 is not supported"),
    (lambda d: _edit_config(d, attention_bias=True), "'attention_bias'=True is not supported"),
    (lambda d: _edit_config(d, clip_qkv=8.0), "'clip_qkv'=8.0 is not supported"),
    (lambda d: _edit_config(d, rope_scaling={"type": "linear", "factor": 2.0}), "'rope_scaling'="),
    (lambda d: _edit_config(d, hidden_act="gelu"), "'hidden_act'='gelu' is not supported"),
    (lambda d: _edit_config(d, partial_rotary_factor=0.3), "'partial_rotary_factor'=0.3 rotates 2.4"),
    (lambda d: _edit_config(d, qk_layernorm=None), "lacks the key 'qk_layernorm'"),
    (lambda d: _edit_config(d, num_experts=None), "lacks the key 'num_experts'"),
    (lambda d: _rewrite(d, lambda t: t.update({"model.layers.0.mlp.experts.1.down_proj.weight":
                                                 np.zeros((16, D), np.float32)})),
     "'model.layers.0.mlp.experts.1.down_proj.weight' in model.safetensors has shape [16, 32]; config.json implies "
     "[32, 16]"),
    (lambda d: _rewrite(d, lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.weight")),
     "model.layers.1.mlp.experts.2.up_proj.weight"),
    (lambda d: _rewrite(d, lambda t: t.update({"model.layers.0.mlp.expert_bias": np.zeros(4, np.float32)})),
     "model.layers.0.mlp.expert_bias"),
])
def test_malformed_moe_directory_names_the_problem_in_one_line(tmp_path, breakage, message, no_reads):
  write_moe_dir(tmp_path)
  breakage(str(tmp_path))
  with pytest.raises(ValueError) as e:
    hf.load(tmp_path)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_pickle_checkpoint_is_refused_with_how_to_convert(tmp_path, no_reads):
  write_hf_dir(tmp_path)
  os.remove(tmp_path / "model.safetensors")
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
  with pytest.raises(ValueError) as e:
    hf.load(tmp_path)
  assert "pytorch_model.bin" in str(e.value) and "save_pretrained" in str(e.value)
  assert "safetensors" in str(e.value)


def test_missing_files_are_named(tmp_path, no_reads):
  write_hf_dir(tmp_path, num_files=2)
  os.remove(tmp_path / "model-00002-of-00002.safetensors")
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
    hf.load(tmp_path)
  os.remove(tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load(tmp_path)


def test_convert_cli_reports_errors_in_one_line(tmp_path):
  write_hf_dir(tmp_path / "hf")
  _edit_config(tmp_path / "hf", n_layers=3)
  r = _cli("convert", f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'work'}")
  assert r.returncode == 1 and "Traceback" not in r.stderr
  assert "model.transformer.blocks.2." in r.stderr  # the config asks for a layer the files lack
  assert not (tmp_path / "work").exists()  # nothing written before the checks


def test_instruct_flag_overrides_the_folder_name(tmp_path, devices):
  write_hf_dir(tmp_path / "LLaDA-tiny-Instruct")
  hf.import_checkpoint(tmp_path / "LLaDA-tiny-Instruct", tmp_path / "work", instruct=False)
  model = serving.load(str(tmp_path / "work"))
  assert not model.chat and model.encode_prompt("hi")[0] == model.tokenizer.eos_id  # a base model's document


def test_import_refuses_to_overwrite_a_workdir(tmp_path):
  write_hf_dir(tmp_path / "hf")
  hf.import_checkpoint(tmp_path / "hf", tmp_path / "work")
  with pytest.raises(FileExistsError, match="already holds checkpoints"):
    hf.import_checkpoint(tmp_path / "hf", tmp_path / "work")


def _preset(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return from_config_dict(module.get_config())


def test_released_8b_config_matches_the_sft_preset():
  """config.json of LLaDA-8B (REFERENCE §1) -> 8.02B parameters, and the same model as
  configs/sft_llada_8b.py, so fine-tuning from a conversion passes the init_from checks."""
  released = {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
              "weight_tying": False, "include_bias": False, "d_model": 4096, "n_heads": 32, "n_kv_heads": 32,
              "n_layers": 32, "mlp_hidden_size": 12288, "vocab_size": 126464, "embedding_size": 126464,
              "max_sequence_length": 4096, "rope_theta": 500000.0, "rms_norm_eps": 1e-05,
              "mask_token_id": 126336, "eos_token_id": 126081, "pad_token_id": 126081}
  imported = hf.model_config_from_hf(released, param_dtype="bfloat16")
  _, abstract = model_lib.abstract_model(imported)
  assert round(model_lib.count_params(abstract) / 1e9, 2) == 8.02
  assert len(hf.layout(imported)) == 3 + 32 * 9
  preset = _preset("sft_llada_8b")
  for field in architecture_fields():
    assert getattr(imported, field) == getattr(preset.model, field), field
  assert preset.diffusion.mask_token_id == released["mask_token_id"]


@pytest.mark.parametrize("preset,released,tensors", [
    # iLLaDA-8B's model card (REFERENCE §12); its config.json spells them in the LLaDA keys.
    ("illada_8b", {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
                   "weight_tying": True, "include_bias": False, "d_model": 4096, "n_heads": 32, "n_kv_heads": 8,
                   "n_layers": 32, "mlp_hidden_size": 14336, "vocab_size": 155136, "embedding_size": 155136,
                   "max_sequence_length": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-05}, 2 + 32 * 9),
    # LLaDA-MoE-7B-A1B (REFERENCE §13) in modeling_lladamoe.py's keys.
    ("llada_moe_7b_a1b", {"vocab_size": 157184, "hidden_size": 2048, "expert_intermediate_size": 1024,
                          "shared_expert_intermediate_size": None, "num_hidden_layers": 16,
                          "num_attention_heads": 16, "num_key_value_heads": 16, "rms_norm_eps": 1e-05,
                          "rope_theta": 50000.0, "max_position_embeddings": 8192, "partial_rotary_factor": 1.0,
                          "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
                          "qk_layernorm": True, "moe_layer_freq": [1] * 16, "moe_router_score_function": "softmax",
                          "tie_word_embeddings": False}, 3 + 16 * (9 + 64 * 3)),
])
def test_released_family_configs_match_their_presets(preset, released, tensors):
  """The family's config.json (as REFERENCE gives it) -> the same architecture as the preset that trains or
  fine-tunes it, so a conversion passes the init_from checks; the layout has every tensor once."""
  imported = hf.model_config_from_hf(released, param_dtype="bfloat16")
  model = _preset(preset).model
  for field in architecture_fields():
    assert getattr(imported, field) == getattr(model, field), field
  assert len({t.name for t in hf.layout(imported)}) == len(hf.layout(imported)) == tensors
