"""Performance switches change speed and memory, never the numbers: chunked output head + loss, the
zero-padded SwiGLU width, bfloat16 Adam moments (named remat policies: tests/test_model.py; attention backends: tests/test_attention.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from llada_jax import diffusion, model as model_lib, train


def test_chunked_scores_equal_full_logits_with_gradients():
  rng = np.random.default_rng(0)
  B, L, D, V = 2, 11, 8, 37  # L not a multiple of the chunk: the tail is padded
  x = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  head = jnp.asarray(rng.standard_normal((D, V)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (B, L)))
  weights = jnp.asarray(rng.random((B, L)), jnp.float32)
  full = diffusion.from_logits(lambda t, v: jnp.einsum("bld,dv->blv", x, head))(None, None, targets)
  for chunk in (1, 4, 11, 16):
    got = diffusion.chunked_scores(x, head, targets, chunk_size=chunk)
    np.testing.assert_allclose(got.nll_BL, full.nll_BL, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got.correct_BL, full.correct_BL)

  def loss(x, head, chunk):
    if chunk:
      return (diffusion.chunked_scores(x, head, targets, chunk_size=chunk).nll_BL * weights).sum()
    return (diffusion._token_nll(jnp.einsum("bld,dv->blv", x, head), targets).nll_BL * weights).sum()

  ref = jax.grad(loss, argnums=(0, 1))(x, head, 0)
  for a, b in zip(jax.grad(loss, argnums=(0, 1))(x, head, 4), ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _grads(cfg, objective_batch):
  graphdef, _ = model_lib.abstract_model(cfg.model)
  params = model_lib.init_params(cfg.model, jax.random.key(0))
  fn = jax.jit(jax.value_and_grad(lambda p: train._loss(cfg, graphdef, p, objective_batch, jax.random.key(3))[0]))
  return fn(params)


def _batch(cfg):
  rng = np.random.default_rng(1)
  B, L = cfg.train.batch_size, cfg.train.seq_len
  tokens = rng.integers(5, cfg.model.vocab_size, (B, L)).astype(np.int32)
  valid = np.ones((B, L), bool)
  valid[0, L - 7:] = False  # a right-padded row
  return {"tokens": tokens, "prompt_len": np.full((B,), 5, np.int32), "valid": valid}


@pytest.mark.parametrize("objective", ["pretrain", "sft", "ar"])
def test_chunked_loss_equals_plain_loss_and_gradients(objective):
  over = {"diffusion.objective": objective, "model.causal": objective == "ar",
          "diffusion.random_length_prob": 0.0}
  plain = tiny_config(**over)
  chunked = tiny_config(**over, **{"model.loss_chunk_size": 12})  # seq_len 32: 3 chunks, one padded
  batch = _batch(plain)
  (l0, g0), (l1, g1) = _grads(plain, batch), _grads(chunked, batch)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_padded_mlp_width_gives_the_same_loss_and_gradients():
  over = {"model.mlp_dim": 100, "diffusion.random_length_prob": 0.0}  # 100 -> 128: 28 zero units
  plain, padded = tiny_config(**over), tiny_config(**over, **{"model.mlp_pad_to": 128})
  batch = _batch(plain)
  (l0, g0), (l1, g1) = _grads(plain, batch), _grads(padded, batch)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  assert g1["blocks"]["ff_down"].shape == g0["blocks"]["ff_down"].shape == (2, 100, 32)  # params unchanged
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  # The pad must really be there: the compiled step multiplies [.., 128]-wide hidden activations.
  graphdef, _ = model_lib.abstract_model(padded.model)
  params = model_lib.init_params(padded.model, jax.random.key(0))
  hlo = jax.jit(lambda p: train._loss(padded, graphdef, p, batch, jax.random.key(3))[0]).lower(params).as_text()
  assert "stablehlo.pad" in hlo and "x128xf32>" in hlo


def test_chunked_loss_never_holds_the_full_logits():
  """XLA's own buffer plan: with a vocabulary large next to the model, chunking cuts the step's
  temporaries by about the [B, L, V] float32 logits (and their gradient)."""
  base = {"model.vocab_size": 8192, "train.seq_len": 128, "train.batch_size": 4,
          "data.tokenizer_vocab_size": 256, "diffusion.random_length_prob": 0.0}
  temp = {}
  for chunk in (0, 16):
    cfg = tiny_config(**base, **{"model.loss_chunk_size": chunk})
    graphdef, abstract = model_lib.abstract_model(cfg.model)
    params = nnx.to_pure_dict(abstract)  # ShapeDtypeStructs: compiled, never run
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _batch(cfg).items()}
    grad = jax.jit(jax.grad(lambda p, b: train._loss(cfg, graphdef, p, b, jax.random.key(0))[0]))
    temp[chunk] = grad.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
  logits_bytes = 4 * 128 * 8192 * 4
  assert temp[0] - temp[16] > logits_bytes, temp


def test_bf16_first_moment(devices):
  cfg = tiny_config(**{"optim.mu_dtype": "bfloat16"})
  s = train.setup(cfg, train.sharding.make_mesh(cfg.mesh, devices[:1]))
  state = s.init(train.root_key(cfg))
  dtypes = {str(getattr(x, "dtype", None)) for x in jax.tree.leaves(state.opt_state)}
  assert "bfloat16" in dtypes  # mu
  assert "float32" in dtypes   # nu keeps the parameter dtype
  with pytest.raises(ValueError, match="optim.mu_dtype"):
    tiny_config(**{"optim.mu_dtype": "int8"})
  with pytest.raises(ValueError, match="model.loss_chunk_size"):
    tiny_config(**{"model.loss_chunk_size": -1})
