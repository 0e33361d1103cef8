"""The Transformer (llada_jax.model): numerics of its parts against float64 NumPy, attention masking,
execution modes (scan / unrolled / remat / bf16), parameter layout and the paper's parameter counts."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from llada_jax import config as config_lib
from llada_jax import model, sharding
from llada_jax.configs import default

SEQ = 8  # sequence length of the model tests: tiny, but long enough to have "earlier" and "later"


@functools.lru_cache(maxsize=None)
def _forward(cfg: config_lib.ModelConfig):
  """Jitted `apply` for one (hashable, frozen) model config."""
  graphdef = model.abstract_model(cfg)[0]
  return jax.jit(lambda params, tokens, valid=None: model.apply(graphdef, params, tokens, valid))


@functools.lru_cache(maxsize=None)
def _params(cfg: config_lib.ModelConfig, seed: int = 0):
  return model.init_params(cfg, jax.random.key(seed))


def _tiny(**changes) -> config_lib.ModelConfig:
  return dataclasses.replace(tiny_config().model, **changes)


def _tokens(cfg, seed=1, batch=2, length=SEQ):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, cfg.vocab_size, jnp.int32)


def _change(tokens, pos, vocab):
  """A copy of `tokens` whose column `pos` holds a different token in every row."""
  return tokens.at[:, pos].set((tokens[:, pos] + 1 + vocab // 2) % vocab)


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --- RMSNorm and RoPE against float64 NumPy ----------------------------------------------------------

_rms_norm = jax.jit(model.rms_norm, static_argnums=2)
_rope = jax.jit(model.rope, static_argnums=2)


def _np_rms_norm(x, w, eps):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(w, np.float64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_matches_float64_numpy(dtype):
  """rms_norm == x * rsqrt(mean(x^2) + eps) * weight, returned in x's dtype (eps inside the sqrt)."""
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.random.normal(k1, (3, 5, 64), jnp.float32) * 3.0
  x = x.at[1].multiply(1e-3)  # mean(x^2) ~ 1e-5: here eps visibly matters
  x = x.astype(dtype)
  w = 1.0 + 0.5 * jax.random.normal(k2, (64,), jnp.float32)
  eps = 1e-5
  y = _rms_norm(x, w, eps)
  assert y.dtype == dtype and y.shape == x.shape
  want = _np_rms_norm(x.astype(jnp.float32), w, eps)  # x's exact values, in float64
  rtol = 1e-5 if dtype == jnp.float32 else 2.0 ** -7  # bf16: one rounding of the output
  np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=rtol, atol=1e-6)
  # Without eps, row 1 would be normalised to rms 1; with it, its rms is sqrt(ms / (ms + eps)) < 1.
  assert np.sqrt(np.mean(np.asarray(y[1], np.float64) ** 2)) < 0.9 * np.sqrt(np.mean(want[0] ** 2))


def _np_rope(x, positions, theta):
  """GPT-NeoX RoPE in float64: x*cos + rotate_half(x)*sin, rotate_half = [-x2, x1]."""
  x = np.asarray(x, np.float64)
  D = x.shape[-1]
  inv_freq = theta ** (-np.arange(0, D, 2, dtype=np.float64) / D)
  ang = np.asarray(positions, np.float64)[..., None] * inv_freq          # [B, T, D/2]
  ang = np.concatenate([ang, ang], axis=-1)[:, :, None, :]              # [B, T, 1, D]
  x1, x2 = x[..., : D // 2], x[..., D // 2:]
  rot = np.concatenate([-x2, x1], axis=-1)
  return x * np.cos(ang) + rot * np.sin(ang)


@pytest.mark.parametrize("theta", [500000.0, 10000.0])
def test_rope_matches_float64_numpy(theta):
  """rope follows the half-rotation layout and inv_freq = theta^(-2i/D) of the reference."""
  k1, k2 = jax.random.split(jax.random.key(1))
  x = jax.random.normal(k1, (2, 16, 3, 32), jnp.float32)
  positions = jax.random.randint(k2, (2, 16), 0, 1024, jnp.int32)
  y = _rope(x, positions, theta)
  assert y.dtype == jnp.float32 and y.shape == x.shape
  np.testing.assert_allclose(np.asarray(y, np.float64), _np_rope(x, positions, theta), atol=1e-3, rtol=1e-4)
  # The same with the model's absolute positions 0..T-1 (small angles: much tighter).
  arange = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
  np.testing.assert_allclose(np.asarray(_rope(x, arange, theta), np.float64),
                             _np_rope(x, arange, theta), atol=2e-5, rtol=1e-5)


def test_rope_is_a_rotation_and_identity_at_position_zero():
  """Norms of (position, head) vectors are preserved; position 0 leaves x unchanged; dtype kept."""
  x = jax.random.normal(jax.random.key(2), (2, 12, 4, 16), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32) * 37, (2, 12))
  y = _rope(x, positions, 500000.0)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=-1), np.linalg.norm(np.asarray(x), axis=-1),
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(y[:, 0]), np.asarray(x[:, 0]), rtol=0, atol=0)
  assert _max_diff(y[:, 1:], x[:, 1:]) > 1e-2  # other positions really are rotated
  assert _rope(x.astype(jnp.bfloat16), positions, 500000.0).dtype == jnp.bfloat16


def test_rope_scores_depend_only_on_relative_position():
  """<rope(q, m), rope(k, n)> is a function of m - n: shifting both positions keeps the score."""
  kq, kk = jax.random.split(jax.random.key(3))
  q = jax.random.normal(kq, (1, 1, 1, 32), jnp.float32)
  k = jax.random.normal(kk, (1, 1, 1, 32), jnp.float32)
  score = lambda m, n: float(jnp.sum(_rope(q, jnp.array([[m]]), 10000.0) *
                                     _rope(k, jnp.array([[n]]), 10000.0)))
  assert score(5, 2) == pytest.approx(score(105, 102), abs=1e-4)
  assert score(5, 2) == pytest.approx(score(3, 0), abs=1e-4)
  assert abs(score(5, 2) - score(2, 5)) > 1e-3  # but the sign of the offset matters


# --- Attention masking -----------------------------------------------------------------------------------


def test_attention_is_bidirectional():
  """LLaDA's mask predictor: a later token influences the logits at every earlier position."""
  cfg = _tiny()
  f, params = _forward(cfg), _params(cfg)
  tokens = _tokens(cfg)
  base, changed = f(params, tokens), f(params, _change(tokens, SEQ - 1, cfg.vocab_size))
  assert base.shape == (2, SEQ, cfg.vocab_size) and base.dtype == jnp.float32
  for pos in range(SEQ - 1):
    assert _max_diff(base[:, pos], changed[:, pos]) > 1e-4, pos


def test_model_uses_positions():
  """Bidirectional attention alone is permutation-equivariant; with RoPE, permuting the tokens does not
  simply permute the logits (the model knows where each token is)."""
  cfg = _tiny()
  f, params = _forward(cfg), _params(cfg)
  # Sharper attention than at init (q, k x10), so that where a token sits matters visibly.
  blocks = dict(params["blocks"], q_proj=params["blocks"]["q_proj"] * 10, k_proj=params["blocks"]["k_proj"] * 10)
  params = dict(params, blocks=blocks)
  tokens = _tokens(cfg)
  perm = jnp.array([3, 0, 7, 1, 6, 2, 5, 4])
  logits = f(params, tokens)
  assert _max_diff(f(params, tokens[:, perm]), logits[:, perm]) > 0.1 * float(jnp.std(logits))


def test_causal_baseline_ignores_later_tokens():
  """causal=True: changing token j leaves positions < j exactly unchanged and changes positions >= j."""
  cfg = _tiny(causal=True)
  f, params = _forward(cfg), _params(cfg)
  tokens = _tokens(cfg)
  base = f(params, tokens)
  j = SEQ // 2
  changed = f(params, _change(tokens, j, cfg.vocab_size))
  np.testing.assert_allclose(np.asarray(changed[:, :j]), np.asarray(base[:, :j]), rtol=0, atol=1e-6)
  for pos in range(j, SEQ):
    assert _max_diff(base[:, pos], changed[:, pos]) > 1e-4, pos


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask_hides_invalid_positions(causal):
  """Tokens at positions with valid=False never influence the logits of valid positions."""
  cfg = _tiny(causal=causal)
  f, params = _forward(cfg), _params(cfg)
  tokens = _tokens(cfg)
  k = 3
  valid = jnp.broadcast_to(jnp.arange(SEQ) < SEQ - k, (2, SEQ))
  other = tokens
  for pos in range(SEQ - k, SEQ):
    other = _change(other, pos, cfg.vocab_size)
  base, changed = f(params, tokens, valid), f(params, other, valid)
  np.testing.assert_allclose(np.asarray(changed[:, :SEQ - k]), np.asarray(base[:, :SEQ - k]), rtol=0, atol=1e-6)
  if not causal:  # without the mask the same change is visible at the valid positions
    assert _max_diff(f(params, tokens)[:, :SEQ - k], f(params, other)[:, :SEQ - k]) > 1e-4
  # valid=None means "everything valid".
  np.testing.assert_allclose(np.asarray(f(params, tokens, jnp.ones((2, SEQ), bool))),
                             np.asarray(f(params, tokens)), rtol=0, atol=1e-6)


def test_key_padding_mask_is_per_row():
  """Each row has its own mask: row 0 padded at the end, row 1 fully valid."""
  cfg = _tiny()
  f, params = _forward(cfg), _params(cfg)
  tokens = _tokens(cfg)
  valid = jnp.array([[True] * (SEQ - 2) + [False] * 2, [True] * SEQ])
  base = f(params, tokens, valid)
  changed = f(params, _change(tokens, SEQ - 1, cfg.vocab_size), valid)
  np.testing.assert_allclose(np.asarray(changed[0, :SEQ - 2]), np.asarray(base[0, :SEQ - 2]), atol=1e-6)
  assert _max_diff(changed[1, 0], base[1, 0]) > 1e-4


# --- Execution modes -----------------------------------------------------------------------------------


def test_scan_and_unrolled_layers_agree():
  """scan_layers=True and False run the same stacked parameters to the same logits."""
  cfg = _tiny()
  params, tokens = _params(cfg), _tokens(cfg)
  valid = jnp.array([[True] * (SEQ - 1) + [False], [True] * SEQ])
  scanned = _forward(dataclasses.replace(cfg, scan_layers=True))(params, tokens, valid)
  unrolled = _forward(dataclasses.replace(cfg, scan_layers=False))(params, tokens, valid)
  np.testing.assert_allclose(np.asarray(scanned), np.asarray(unrolled), rtol=1e-5, atol=1e-6)


def test_layers_are_applied_in_order_with_their_own_weights():
  """Swapping the two stacked layers changes the output (each layer uses its slice, in order)."""
  cfg = _tiny()
  params, tokens = _params(cfg), _tokens(cfg)
  swapped = dict(params, blocks=jax.tree.map(lambda a: a[::-1], params["blocks"]))
  for scan in (True, False):
    f = _forward(dataclasses.replace(cfg, scan_layers=scan))
    assert _max_diff(f(params, tokens), f(swapped, tokens)) > 1e-4


@functools.lru_cache(maxsize=None)
def _loss_and_grad(cfg):
  """Jitted (loss, logits), d loss / d params of a cross-entropy on the input tokens."""
  graphdef = model.abstract_model(cfg)[0]

  def loss(params, tokens):
    logits = model.apply(graphdef, params, tokens)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]
    return jnp.mean(nll), logits

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.mark.parametrize("policy,scan", [("full", True), ("dots", True), ("full", False),
                                         ("dots_no_batch", True), ("attn_out", True), ("qkv_attn_out", False)])
def test_remat_policies_do_not_change_values_or_gradients(policy, scan):
  """Rematerialisation only trades memory for compute: same logits, loss and gradients as 'none'.

  The reference is always the scanned, non-remat model (scan and unrolled agree, tested above), which
  saves one slow gradient compile for the unrolled case.
  """
  params, tokens = _params(_tiny()), _tokens(_tiny())
  (ref_loss, ref_logits), ref_grad = _loss_and_grad(_tiny(scan_layers=True, remat_policy="none"))(
      params, tokens)
  (loss, logits), grad = _loss_and_grad(_tiny(scan_layers=scan, remat_policy=policy))(params, tokens)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  assert jax.tree.structure(grad) == jax.tree.structure(ref_grad)
  for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6 * float(jnp.abs(r).max()))
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grad))  # every parameter gets a gradient


def test_bfloat16_compute_close_to_float32():
  """dtype='bfloat16' (params still float32) gives float32 logits within bf16 rounding of the f32 ones."""
  cfg = _tiny(dtype="float32")
  params, tokens = _params(cfg), _tokens(cfg)
  ref = np.asarray(_forward(cfg)(params, tokens), np.float64)
  out = _forward(dataclasses.replace(cfg, dtype="bfloat16"))(params, tokens)
  assert out.dtype == jnp.float32
  out = np.asarray(out, np.float64)
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.03
  assert np.max(np.abs(out - ref)) < 0.05 * np.max(np.abs(ref))
  assert not np.array_equal(out, ref)  # the dtype field really switched the compute dtype


# --- Parameters: layout, counts, axis names ------------------------------------------------------------


def _paths(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _abstract_params(variant):
  cfg = config_lib.from_config_dict(default.get_config(variant)).model
  _, state = model.abstract_model(cfg)
  return cfg, state


@pytest.mark.parametrize("variant,total,non_embedding", [("llada_1b", 1.49e9, 0.97e9),
                                                         ("llada_8b", 8.02e9, 6.98e9)])
def test_paper_parameter_counts(variant, total, non_embedding):
  """The llada_1b / llada_8b presets have the paper's (Table 5) total and non-embedding sizes."""
  cfg, state = _abstract_params(variant)
  n = model.count_params(state)
  assert n == pytest.approx(total, rel=5e-3)
  assert n - 2 * cfg.vocab_size * cfg.d_model == pytest.approx(non_embedding, rel=5e-3)
  # Cross-check with an independent formula of the architecture (GQA projections, SwiGLU, 2 norms/layer).
  d, h = cfg.d_model, cfg.head_dim
  per_layer = (d * cfg.num_heads * h * 2 + d * cfg.num_kv_heads * h * 2 + 3 * d * cfg.mlp_dim + 2 * d)
  assert n == 2 * cfg.vocab_size * d + cfg.num_layers * per_layer + d


@pytest.mark.parametrize("variant", ["tiny", "llada_8b"])
def test_no_biases_untied_head_and_logical_axes(variant):
  """No bias anywhere (1-D params are norm weights only), separate embedding and lm_head, and every
  parameter carries one logical axis name per dimension ('layers' first on stacked block params)."""
  cfg, state = _abstract_params(variant)
  shapes = _paths(nnx.to_pure_dict(state))
  assert shapes, "no parameters found"
  for name, leaf in shapes.items():
    assert "bias" not in name.lower(), name
    per_layer_ndim = len(leaf.shape) - (1 if name.startswith("blocks/") else 0)
    if per_layer_ndim == 1:
      assert "norm" in name, f"{name} is a vector but not a norm weight (a bias?)"
  assert shapes["embedding"].shape == (cfg.vocab_size, cfg.d_model)
  assert shapes["lm_head"].shape == (cfg.d_model, cfg.vocab_size)
  assert shapes["blocks/q_proj"].shape == (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.head_dim)

  axes_tree = sharding.param_logical_axes(state)
  axes = {}
  for path, names in jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=lambda x: isinstance(x, tuple))[0]:
    axes["/".join(str(getattr(k, "key", k)) for k in path)] = names
  assert set(axes) == set(shapes)
  for name, names in axes.items():
    assert isinstance(names, tuple) and len(names) == len(shapes[name].shape), (name, names)
    assert all(isinstance(a, str) for a in names), (name, names)
    assert (names[0] == "layers") == name.startswith("blocks/"), (name, names)
    assert names.count("layers") == (1 if name.startswith("blocks/") else 0), (name, names)


def test_embedding_and_lm_head_are_untied_arrays():
  """init_params draws the output head independently of the embedding (no weight tying)."""
  cfg = _tiny()
  params = _params(cfg)
  emb, head = np.asarray(params["embedding"]), np.asarray(params["lm_head"])
  assert emb.shape == head.T.shape
  assert not np.allclose(emb, head.T)
  assert abs(np.corrcoef(emb.ravel(), head.T.ravel())[0, 1]) < 0.1
  # The head really is used for the output: zeroing it zeroes the logits, while the embedding is intact.
  zero_head = dict(params, lm_head=jnp.zeros_like(params["lm_head"]))
  assert float(jnp.abs(_forward(cfg)(zero_head, _tokens(cfg))).max()) == 0.0


# --- Grouped-query attention ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_grouped_query_attention(num_kv_heads):
  """num_kv_heads < num_heads runs, k/v projections have num_kv_heads heads, and it equals full
  multi-head attention whose k/v weights repeat each kv head for its group of query heads."""
  cfg = _tiny(num_heads=4, num_kv_heads=num_kv_heads)
  shapes = nnx.to_pure_dict(model.abstract_model(cfg)[1])["blocks"]
  for name in ("k_proj", "v_proj"):
    assert shapes[name].shape == (cfg.num_layers, cfg.d_model, num_kv_heads, cfg.head_dim)
  assert shapes["q_proj"].shape == (cfg.num_layers, cfg.d_model, 4, cfg.head_dim)
  # Parameters of this shape: the tiny model's (kv heads 2), keeping the first num_kv_heads kv heads.
  base = _params(_tiny())
  blocks = dict(base["blocks"])
  for name in ("k_proj", "v_proj"):
    blocks[name] = blocks[name][:, :, :num_kv_heads]
  params, tokens = dict(base, blocks=blocks), _tokens(cfg)
  out = _forward(cfg)(params, tokens)
  assert out.shape == (2, SEQ, cfg.vocab_size) and bool(jnp.all(jnp.isfinite(out)))

  group = 4 // num_kv_heads
  mha_blocks = dict(blocks)
  for name in ("k_proj", "v_proj"):
    mha_blocks[name] = jnp.repeat(blocks[name], group, axis=2)  # query head n uses kv head n // group
  mha_out = _forward(_tiny(num_heads=4, num_kv_heads=4))(dict(params, blocks=mha_blocks), tokens)
  np.testing.assert_allclose(np.asarray(out), np.asarray(mha_out), rtol=1e-5, atol=1e-6)
