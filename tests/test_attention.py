"""Attention backends (llada_jax.attention): splash (Pallas interpret mode on CPU) against the XLA path
with GQA, key padding and causality; backend resolution and its errors; a tiny model on splash."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from llada_jax import attention, model, sharding
from llada_jax import config as config_lib

B, N, K, H = 3, 4, 2, 8  # GQA: two query heads per kv head


def _qkv(T, S, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)  # NumPy: eager jax.random would compile per shape
  return tuple(jnp.asarray(rng.standard_normal(shape), dtype)
               for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))


def _valid(S, padding):
  """Rows: 13 keys padded away, none padded, all padded (a row that must not produce NaNs)."""
  if padding == "none":
    return None
  lengths = np.array([S - 13, S, 0])[:, None]
  pos = np.arange(S)[None]
  return jnp.asarray(pos < lengths if padding == "right" else pos >= S - lengths)


def _attend(impl, causal, right_padded=False):
  return jax.jit(lambda q, k, v, valid: attention.attend(q, k, v, valid_BS=valid, causal=causal, impl=impl,
                                                         right_padded=right_padded))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_splash_matches_xla(causal, padding):
  T = 40  # not a multiple of splash's 128-wide blocks: attend pads and crops
  q, k, v = _qkv(T, T)
  valid = _valid(T, padding)
  out = np.asarray(_attend("splash", causal)(q, k, v, valid))
  ref = np.asarray(_attend("xla", causal)(q, k, v, valid))
  assert out.shape == (B, T, N, H) and np.isfinite(out).all()
  rows = np.ones((B, T), bool) if valid is None else np.asarray(valid)  # padded queries are ignored
  np.testing.assert_allclose(out[rows], ref[rows], atol=2e-5, rtol=2e-5)


def test_splash_matches_xla_for_a_query_block_over_a_longer_left_padded_cache():
  # The KV-cache shape of the samplers: a few queries attend over the whole (left-padded) sequence.
  q, k, v = _qkv(8, 40)
  valid = _valid(40, "left")
  out = np.asarray(_attend("splash", False)(q, k, v, valid))
  ref = np.asarray(_attend("xla", False)(q, k, v, valid))
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out[:2], ref[:2], atol=2e-5, rtol=2e-5)  # row 2 has no valid key


def test_splash_gradients_match_xla():
  q, k, v = _qkv(40, 40)
  valid = _valid(40, "right")
  w = np.random.default_rng(3).standard_normal((B, 40, N, H)) * np.asarray(valid)[:, :, None, None]

  def grads(impl):
    loss = lambda q, k, v: jnp.sum(w * attention.attend(q, k, v, valid_BS=valid, causal=True, impl=impl))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  for got, want in zip(grads("splash"), grads("xla")):
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_cudnn_without_right_padding_falls_back_to_xla(monkeypatch):
  # Routing only (CPU has no cuDNN): left padding cannot be expressed as key lengths.
  monkeypatch.setattr(attention, "_backend", lambda: "gpu")
  q, k, v = _qkv(16, 16, jnp.bfloat16)
  valid = _valid(16, "left")
  both = jax.jit(lambda *a: [attention.attend(*a, valid_BS=valid, causal=False, impl=impl)
                             for impl in ("cudnn", "xla")])
  out, ref = both(q, k, v)  # would fail to lower had it picked cuDNN
  np.testing.assert_array_equal(out, ref)


def test_cudnn_on_cpu_is_a_clear_error():
  q, k, v = _qkv(8, 8, jnp.bfloat16)
  with pytest.raises(ValueError, match=r"model\.attention_impl='cudnn' needs a GPU backend"):
    attention.attend(q, k, v, valid_BS=None, causal=False, impl="cudnn")
  cfg = _tiny(attention_impl="cudnn", dtype="bfloat16")
  graphdef, abstract_state = model.abstract_model(cfg)
  with pytest.raises(ValueError, match=r"model\.attention_impl='cudnn' needs a GPU"):
    jax.eval_shape(lambda p: model.apply(graphdef, p, np.zeros((1, 8), np.int32)), abstract_state)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="float32", head_dim=128), r"model\.dtype"),
    (dict(dtype="bfloat16", head_dim=512), "head_dim <= 256"),
    (dict(dtype="float16", head_dim=60), "multiple of 8"),
])
def test_cudnn_rejects_unsupported_dtype_and_head_dim(kwargs, match):
  with pytest.raises(ValueError, match=match):
    attention.resolve("cudnn", backend="gpu", **kwargs)


def test_resolve_auto():
  assert jax.default_backend() == "cpu"
  assert attention.resolve("auto", dtype=jnp.bfloat16, head_dim=128) == "xla"
  assert attention.resolve("auto", dtype="bfloat16", head_dim=128, backend="gpu") == "cudnn"
  assert attention.resolve("auto", dtype="float32", head_dim=128, backend="gpu") == "xla"
  assert attention.resolve("auto", dtype="bfloat16", head_dim=128, backend="tpu") == "splash"
  assert attention.resolve("auto", dtype="bfloat16", head_dim=64, backend="tpu") == "xla"
  assert attention.resolve("splash", dtype="float32", head_dim=8) == "splash"


def test_invalid_attention_impl_names_the_field():
  with pytest.raises(ValueError, match=r"model\.attention_impl"):
    tiny_config(**{"model.attention_impl": "flash"})
  with pytest.raises(ValueError, match=r"model\.attention_impl"):
    attention.resolve("flash", dtype="float32", head_dim=8)


# --- the tiny model on splash ------------------------------------------------------------------------

def _tiny(**changes) -> config_lib.ModelConfig:
  return dataclasses.replace(tiny_config().model, **changes)


def _random_params(abstract_state):
  """Random parameters in NumPy (model.init_params would cost seconds of compile per test)."""
  rng = np.random.default_rng(0)
  fill = lambda path, x: ((1.0 if "norm" in jax.tree_util.keystr(path) else 0.0)
                          + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(abstract_state))


def test_tiny_model_on_splash_matches_xla_with_gradients():
  # Bidirectional (the causal kernel is checked above); the empty row 2 must not poison anything.
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 256, (3, 16), dtype=np.int32)
  valid = np.arange(16)[None] < np.array([[11], [16], [0]])
  weights = (rng.standard_normal((3, 16, 256)) * valid[:, :, None]).astype(np.float32)
  params = _random_params(model.abstract_model(_tiny())[1])

  def run(impl):
    graphdef = model.abstract_model(_tiny(attention_impl=impl))[0]
    def logits_and_grads(p):  # grads of sum(weights * logits)
      logits, vjp = jax.vjp(lambda p: model.apply(graphdef, p, tokens, valid, right_padded=True), p)
      return logits, vjp(weights)[0]
    return jax.jit(logits_and_grads)(params)

  (logits, grads), (ref_logits, ref_grads) = run("splash"), run("xla")
  rows = valid
  np.testing.assert_allclose(np.asarray(logits)[rows], np.asarray(ref_logits)[rows], atol=1e-4, rtol=1e-4)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_splash_under_a_sharded_mesh_matches_xla(devices):
  # Batch over 4 'fsdp' devices, heads over 2 'tensor' devices: attend runs splash in a shard_map.
  mesh_cfg = config_lib.MeshConfig(rule_set="fsdp_tp", fsdp=4, tensor=2)
  mesh = sharding.make_mesh(mesh_cfg, devices)
  q, k, v = (jnp.asarray(np.concatenate([x, x[:1]])) for x in _qkv(24, 24))  # batch 4
  valid = jnp.asarray(np.concatenate([_valid(24, "left"), _valid(24, "left")[:1]]))
  with sharding.use_rules(mesh_cfg, mesh):
    out = np.asarray(_attend("splash", False)(q, k, v, valid))
  ref = np.asarray(_attend("xla", False)(q, k, v, valid))
  rows = np.asarray(valid)
  np.testing.assert_allclose(out[rows], ref[rows], atol=2e-5, rtol=2e-5)
