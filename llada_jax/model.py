"""The LLaDA Transformer (REFERENCE §1) in Flax NNX.

A pre-norm "llama" Transformer with *bidirectional* attention (a key-padding mask only), RMSNorm and RoPE
in float32, SwiGLU, no biases, an untied output head and optional grouped-query attention. No timestep
input: the model sees the partially masked sequence and predicts every original token. `causal=True`
turns the same network into the autoregressive baseline. The family's options (REFERENCE §12-13): tied
input/output embeddings (iLLaDA), QK-norm, partial RoPE, and a routed mixture-of-experts feed-forward
(LLaDA-MoE; llada_jax.moe) whose router statistics leave the model as a returned value (`return_aux`).
With `block_size` > 0 attention is block-causal (block diffusion, REFERENCE §14; `attention.block_table`):
a plain call sees its own block and the earlier ones, and a training call takes x_t ++ x_0 (`noised_half`).

Layers are stored stacked on a leading 'layers' axis (one parameter layout for both execution modes);
`scan_layers` chooses `lax.scan` over that axis (fast compiles, remat per layer) or an unrolled loop.
Hot paths use the model functionally: `nnx.split` once, then `apply(graphdef, params, ...)`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from llada_jax import attention, diffusion, lora as lora_lib, moe as moe_lib, sharding
from llada_jax.config import ModelConfig

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep the attention output (a flash kernel's is the costly one to recompute), recompute the matmuls.
    "attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
    "qkv_attn_out": jax.checkpoint_policies.save_only_these_names("query", "key", "value", "attn_out"),
}


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """`x * rsqrt(mean(x^2) + eps) * weight`, computed in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * weight.astype(jnp.float32)).astype(x.dtype)


def rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float, rotary_dim: int | None = None) -> jax.Array:
  """Half-rotation (GPT-NeoX) RoPE in float32: x*cos + rotate_half(x)*sin, rotate_half = [-x2, x1].

  `rotary_dim` (default: all of head_dim): only the first rotary_dim dims rotate, with frequencies of a
  rotary_dim-wide head; the rest pass through (partial RoPE, HF's partial_rotary_factor)."""
  head_dim = x_BTNH.shape[-1]
  r = head_dim if rotary_dim is None else rotary_dim
  inv_freq = theta ** (-jnp.arange(0, r, 2, dtype=jnp.float32) / r)
  angles_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  angles_BTR = jnp.concatenate([angles_BTF, angles_BTF], axis=-1)[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  x_rot, x_pass = x[..., :r], x[..., r:]
  x1, x2 = jnp.split(x_rot, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = x_rot * jnp.cos(angles_BTR) + rotated * jnp.sin(angles_BTR)
  return (out if r == head_dim else jnp.concatenate([out, x_pass], axis=-1)).astype(x_BTNH.dtype)


def _normal(rngs: nnx.Rngs, cfg: ModelConfig, shape: tuple[int, ...]) -> jax.Array:
  return cfg.init_std * jax.random.normal(rngs.params(), shape, jnp.dtype(cfg.param_dtype))


class Block(nnx.Module):
  """One pre-norm block: attention then the feed-forward (a SwiGLU, or a routed mixture of SwiGLU experts
  with an optional shared one), each with a residual connection."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, n, k, h, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    ones = lambda size=d: jnp.ones((size,), jnp.dtype(cfg.param_dtype))
    self.attn_norm = sharding.param(ones(), ("norm",))
    self.q_proj = sharding.param(_normal(rngs, cfg, (d, n, h)), ("embed", "heads", "kv"))
    self.k_proj = sharding.param(_normal(rngs, cfg, (d, k, h)), ("embed", "heads", "kv"))
    self.v_proj = sharding.param(_normal(rngs, cfg, (d, k, h)), ("embed", "heads", "kv"))
    if cfg.qk_norm:
      self.q_norm = sharding.param(ones(h), ("norm",))
      self.k_norm = sharding.param(ones(h), ("norm",))
    self.attn_out = sharding.param(_normal(rngs, cfg, (n, h, d)), ("heads", "kv", "embed"))
    self.ff_norm = sharding.param(ones(), ("norm",))
    if cfg.moe:
      e = cfg.num_experts
      self.router = sharding.param(_normal(rngs, cfg, (d, e)), ("embed", None))
      if cfg.router_bias:  # chooses experts, never weighs them: no gradient reaches it
        self.router_bias = sharding.param(jnp.zeros((e,), jnp.dtype(cfg.param_dtype)), (None,))
      self.ff_gate = sharding.param(_normal(rngs, cfg, (e, d, f)), ("expert", "embed", "mlp"))
      self.ff_up = sharding.param(_normal(rngs, cfg, (e, d, f)), ("expert", "embed", "mlp"))
      self.ff_down = sharding.param(_normal(rngs, cfg, (e, f, d)), ("expert", "mlp", "embed"))
      if cfg.shared_expert_dim:
        s = cfg.shared_expert_dim
        self.shared_gate = sharding.param(_normal(rngs, cfg, (d, s)), ("embed", "mlp"))
        self.shared_up = sharding.param(_normal(rngs, cfg, (d, s)), ("embed", "mlp"))
        self.shared_down = sharding.param(_normal(rngs, cfg, (s, d)), ("mlp", "embed"))
    else:
      self.ff_gate = sharding.param(_normal(rngs, cfg, (d, f)), ("embed", "mlp"))
      self.ff_up = sharding.param(_normal(rngs, cfg, (d, f)), ("embed", "mlp"))
      self.ff_down = sharding.param(_normal(rngs, cfg, (f, d)), ("mlp", "embed"))
    self.cfg = cfg

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, valid_BS: jax.Array | None,
               kv: tuple[jax.Array, jax.Array] | None = None, kv_offset: jax.Array | int = 0, *,
               impl: str = "xla", right_padded: bool = False, adapters: lora_lib.Adapters | None = None,
               blocks: attention.Blocks | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array], dict | None]:
    """Returns the block output, this call's (RoPE'd) keys and values, and (MoE) its router statistics
    (llada_jax.moe.router_stats; None for a dense block).

    With `kv` (keys/values of a full length-S sequence from an earlier pass), the T queries at
    `kv_offset` attend over that sequence with their own fresh keys/values written in at `kv_offset`:
    the approximate KV cache of Fast-dLLM (positions outside the slice keep stale entries).
    `adapters` (this layer's slice of the tree) adds LoRA updates to the projections they name.
    `blocks`: the block-causal structure of the call (attention.Blocks).
    """
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    w = lambda p: p[...].astype(dt)
    targets = adapters.tree if adapters is not None else {}

    def adapt(name: str, x: jax.Array, y: jax.Array) -> jax.Array:
      """y (x's projection by the frozen kernel) plus the adapter's update, where `name` has one."""
      if name not in targets:
        return y
      rng = None if adapters.rng is None else jax.random.fold_in(adapters.rng, lora_lib.TARGET_INDEX[name])
      u = lora_lib.delta(x, targets[name], name, scale=adapters.scale, dropout=adapters.dropout, rng=rng)
      extra = y.shape[-1] - u.shape[-1]  # gate/up run zero-padded to mlp_pad_to; their update is not
      return y + (jnp.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, extra)]) if extra else u)

    y_BTD = rms_norm(x_BTD, self.attn_norm[...], cfg.norm_eps)
    q_BTNH = adapt("q_proj", y_BTD, jnp.einsum("btd,dnh->btnh", y_BTD, w(self.q_proj)))
    k_BTKH = adapt("k_proj", y_BTD, jnp.einsum("btd,dkh->btkh", y_BTD, w(self.k_proj)))
    if cfg.qk_norm:
      q_BTNH = rms_norm(q_BTNH, self.q_norm[...], cfg.norm_eps)
      k_BTKH = rms_norm(k_BTKH, self.k_norm[...], cfg.norm_eps)
    q_BTNH = rope(q_BTNH, positions_BT, cfg.rope_theta, cfg.rotary_dim)
    k_BTKH = rope(k_BTKH, positions_BT, cfg.rope_theta, cfg.rotary_dim)
    v_BTKH = adapt("v_proj", y_BTD, jnp.einsum("btd,dkh->btkh", y_BTD, w(self.v_proj)))
    q_BTNH = checkpoint_name(sharding.constrain(q_BTNH, ("batch", "length", "heads", "kv")), "query")
    k_BTKH, v_BTKH = checkpoint_name(k_BTKH, "key"), checkpoint_name(v_BTKH, "value")
    keys, values = k_BTKH, v_BTKH
    if kv is not None:
      start = (0, kv_offset, 0, 0)
      keys = jax.lax.dynamic_update_slice(kv[0], k_BTKH.astype(kv[0].dtype), start)
      values = jax.lax.dynamic_update_slice(kv[1], v_BTKH.astype(kv[1].dtype), start)
    # GQA, 1/sqrt(head_dim) and a float32 softmax on every backend; `impl` is already resolved.
    o_BTNH = attention.attend(q_BTNH, keys, values, valid_BS=valid_BS, causal=cfg.causal and kv is None,
                              impl=impl, right_padded=right_padded, blocks=blocks)
    o_BTNH = checkpoint_name(o_BTNH, "attn_out")
    x_BTD = x_BTD + adapt("attn_out", o_BTNH, jnp.einsum("btnh,nhd->btd", o_BTNH, w(self.attn_out)))
    x_BTD = sharding.constrain(x_BTD, ("batch", "length", "embed"))

    y_BTD = rms_norm(x_BTD, self.ff_norm[...], cfg.norm_eps)
    if cfg.moe:
      valid_BT = valid_BS if kv is None else None  # statistics over the queries' real tokens
      ff_BTD, stats = self._experts(y_BTD, valid_BT)
      x_BTD = x_BTD + ff_BTD
      return sharding.constrain(x_BTD, ("batch", "length", "embed")), (k_BTKH, v_BTKH), stats
    gate_DF, up_DF, down_FD = w(self.ff_gate), w(self.ff_up), w(self.ff_down)
    pad = -cfg.mlp_dim % cfg.mlp_pad_to if cfg.mlp_pad_to else 0
    if pad:
      # Zero columns of gate/up give silu(0) * 0 = 0 in the extra hidden units, and zero rows of down
      # drop them: the same function, with GEMM widths the GPU's tiles divide (gradients flow back
      # through the pads' slices to the real parameters).
      gate_DF, up_DF = (jnp.pad(p, ((0, 0), (0, pad))) for p in (gate_DF, up_DF))
      down_FD = jnp.pad(down_FD, ((0, pad), (0, 0)))
    gate_BTF = adapt("ff_gate", y_BTD, jnp.einsum("btd,df->btf", y_BTD, gate_DF))
    up_BTF = adapt("ff_up", y_BTD, jnp.einsum("btd,df->btf", y_BTD, up_DF))
    h_BTF = sharding.constrain(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "length", "mlp"))
    x_BTD = x_BTD + adapt("ff_down", h_BTF[..., :cfg.mlp_dim], jnp.einsum("btf,fd->btd", h_BTF, down_FD))
    return sharding.constrain(x_BTD, ("batch", "length", "embed")), (k_BTKH, v_BTKH), None

  def _experts(self, y_BTD: jax.Array, valid_BT: jax.Array | None) -> tuple[jax.Array, dict]:
    """The routed feed-forward (llada_jax.moe) of normed inputs, plus the shared expert if there is one."""
    cfg, dt = self.cfg, y_BTD.dtype
    B, T, D = y_BTD.shape
    # Tokens stay split like the batch around the dispatch (the flattened [B*T] axis keeps the batch split).
    y_ND = sharding.constrain(y_BTD.reshape(B * T, D), ("batch", "embed"))
    logits_NE = sharding.constrain(
        jnp.einsum("nd,de->ne", y_ND.astype(jnp.float32), self.router[...].astype(jnp.float32)), ("batch", None))
    bias = (self.router_bias[...],) if cfg.router_bias else ()

    def local(y_nD, logits_nE, gate_EDF, up_EDF, down_EFD, *bias_E, split_axis):
      # Each device routes and sorts its own tokens (capacity counts them): under automatic partitioning
      # top-k and the sort would run on the gathered global batch. With the experts split over a mesh axis
      # the tokens travel to their experts (all-to-all); otherwise the layer's experts come whole.
      routing = moe_lib.route(logits_nE, k=cfg.experts_per_token, score=cfg.router_score, renorm=cfg.router_renorm,
                              scaling=cfg.routed_scaling, bias_E=bias_E[0] if bias_E else None)
      cap = moe_lib.capacity(y_nD.shape[0], k=cfg.experts_per_token, num_experts=cfg.num_experts,
                             factor=cfg.capacity_factor)
      if split_axis is None:
        out_nD, kept_nK = moe_lib.dispatch(y_nD, routing, gate_EDF, up_EDF, down_EFD, capacity=cap)
      else:
        out_nD, kept_nK = moe_lib.dispatch_split(y_nD, routing, gate_EDF, up_EDF, down_EFD, axis=split_axis,
                                                 capacity=cap)
      return out_nD, kept_nK, routing

    experts = tuple(p[...].astype(dt) for p in (self.ff_gate, self.ff_up, self.ff_down))
    out_ND, kept_NK, routing = sharding.map_batch_shards(local, (y_ND, logits_NE), bias, split=experts)
    out_BTD = sharding.constrain(out_ND, ("batch", "embed")).reshape(B, T, D)
    if cfg.shared_expert_dim:
      w = lambda p: p[...].astype(dt)
      h_BTS = jax.nn.silu(jnp.einsum("btd,ds->bts", y_BTD, w(self.shared_gate))) * jnp.einsum(
          "btd,ds->bts", y_BTD, w(self.shared_up))
      out_BTD = out_BTD + jnp.einsum("bts,sd->btd", h_BTS, w(self.shared_down))
    valid_N = None if valid_BT is None else valid_BT.reshape(B * T)
    return out_BTD, moe_lib.router_stats(routing, kept_NK, valid_N)


class Transformer(nnx.Module):
  """tokens [B, T] (+ optional key-padding mask [B, T]) -> logits [B, T, V] in float32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedding = sharding.param(_normal(rngs, cfg, (cfg.vocab_size, cfg.d_model)), ("vocab", "embed"))

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(r: nnx.Rngs) -> Block:
      return Block(cfg, rngs=r)

    self.blocks = make_blocks(rngs)
    self.final_norm = sharding.param(jnp.ones((cfg.d_model,), jnp.dtype(cfg.param_dtype)), ("norm",))
    if not cfg.tie_embeddings:  # tied: the head is embedding.T, one parameter trained by both uses
      self.lm_head = sharding.param(_normal(rngs, cfg, (cfg.d_model, cfg.vocab_size)), ("embed", "vocab"))

  def __call__(self, tokens_BT: jax.Array, valid_BT: jax.Array | None = None, *,
               cache: tuple[jax.Array, jax.Array] | None = None, offset: jax.Array | int = 0,
               return_cache: bool = False, right_padded: bool = False, return_hidden: bool = False,
               return_aux: bool = False, adapters: lora_lib.Adapters | None = None, noised_half: bool = False,
               segment_BT: jax.Array | None = None, block_size: int | None = None):
    """`valid_BT` (bool) marks real tokens; padding positions are never attended to.

    Positions are absolute 0..T-1, as in the reference (left padding is not subtracted).
    Sampling with a KV cache: `return_cache=True` also returns every layer's keys and values,
    ([layers, B, T, K, H], [layers, B, T, K, H]); passing them back as `cache` runs only the tokens
    `tokens_BT` at positions `offset...` against that cache, with `valid_BT` covering the cached length.
    `right_padded=True` promises every row of `valid_BT` is True on a prefix (training batches), which
    lets `attention_impl='cudnn'` pass padding as key lengths; samplers left-pad and leave it False.
    `return_hidden=True` returns (final normed hidden states [B, T, D], output head [D, V]) instead of
    logits (with `return_cache`, in the logits' place), for a loss that applies the head in chunks
    (`diffusion.chunked_scores`) or a sampler that needs a few positions' logits (`head_logits`).
    `adapters` (llada_jax.lora) adds LoRA updates to the projections it holds (layer l's dropout key is
    fold_in(adapters.rng, l)) and puts its trainable token rows in the embedding and output head.
    `return_aux=True` appends the router statistics (llada_jax.moe.router_stats averaged over layers; None
    for a dense model) to whatever else is returned: `(out, aux)` or `(out, cache, aux)`.
    Block models (`block_size`, default `cfg.block_size`; a block-size schedule passes its current one):
    `noised_half=True` reads tokens_BT as x_t ++ x_0, two halves at the same positions offset..offset+T/2
    (block-diffusion training); `segment_BT` holds document ids (packed data: no attention across
    documents). A cached call's queries see the cache block-causally by absolute position.
    """
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    B, T = tokens_BT.shape
    if cache is not None and cfg.causal:
      raise ValueError("the KV-cache path is for the bidirectional model (model.causal=False)")
    block_size = cfg.block_size if block_size is None else block_size
    if noised_half or segment_BT is not None:
      if not block_size:
        raise ValueError("noised_half / segment_BT are for block models (model.block_size > 0)")
      if cache is not None or (noised_half and T % 2):
        raise ValueError(f"noised_half / segment_BT need no cache (and x_t ++ x_0 an even length); got length {T}")
    head = None if cfg.tie_embeddings else self.lm_head[...]
    embedding_VD, head_DV = lora_lib.with_tokens(self.embedding[...], head, adapters)
    x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0).astype(dt)
    x_BTD = sharding.constrain(x_BTD, ("batch", "length", "embed"))
    # Positions are numpy (compile-time constants) at a Python offset: a block table can then be static.
    xp = np if isinstance(offset, int) else jnp
    pos_T = offset + xp.arange(T // 2 if noised_half else T, dtype=np.int32)
    pos_T = xp.concatenate([pos_T, pos_T]) if noised_half else pos_T
    positions_BT = jnp.broadcast_to(jnp.asarray(pos_T), (B, T))
    valid_BS = None if valid_BT is None else valid_BT.astype(bool)
    impl = attention.resolve(cfg.attention_impl, dtype=dt, head_dim=cfg.head_dim, blocks=bool(block_size))
    blocks = None
    if block_size:
      noised_T = np.arange(T) < T // 2 if noised_half else None
      k_pos = pos_T if cache is None else np.arange(cache[0].shape[2], dtype=np.int32)
      blocks = attention.Blocks(block_size, pos_T, k_pos, noised_T, noised_T if cache is None else None,
                                segment_BT, segment_BT)

    block_def, block_state = nnx.split(self.blocks)

    adapter_tree = None if adapters is None else adapters.tree["blocks"]

    def layer(x, xs):
      layer_state, kv, layer_adapters, index = xs
      block = nnx.merge(block_def, layer_state)
      here = None
      if adapters is not None:
        rng = None if adapters.rng is None else jax.random.fold_in(adapters.rng, index)
        here = adapters._replace(tree=layer_adapters, rng=rng)
      x, fresh_kv, stats = block(x, positions_BT, valid_BS, kv, offset, impl=impl, right_padded=right_padded,
                                 adapters=here, blocks=blocks)
      return x, (fresh_kv if return_cache else None, stats if return_aux else None)

    if cfg.remat_policy != "none":
      layer = jax.checkpoint(layer, policy=_REMAT[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    per_layer = (block_state, cache, adapter_tree, jnp.arange(cfg.num_layers, dtype=jnp.int32))
    if cfg.scan_layers:
      x_BTD, (kv_out, stats) = jax.lax.scan(layer, x_BTD, per_layer)
    else:
      outs = []
      for i in range(cfg.num_layers):
        x_BTD, ys_i = layer(x_BTD, jax.tree.map(lambda a, i=i: a[i], per_layer))
        outs.append(ys_i)
      kv_out, stats = jax.tree.map(lambda *a: jnp.stack(a), *outs) if return_cache or return_aux else (None, None)

    x_BTD = rms_norm(x_BTD, self.final_norm[...], cfg.norm_eps)
    out = (x_BTD, head_DV) if return_hidden else head_logits(x_BTD, head_DV)
    result = (out, kv_out) if return_cache else (out,)
    if return_aux:
      result += (None if stats is None else jax.tree.map(lambda a: a.mean(axis=0), stats),)
    return result if len(result) > 1 else result[0]


def head_logits(x_BTD: jax.Array, head_DV: jax.Array) -> jax.Array:
  """The output head: final normed hidden states -> float32 logits [B, T, V] (the matmul in x's dtype).

  The model's own last step; a sampler that needs logits at a few positions only applies it to those
  rows of `return_hidden=True`'s states.
  """
  logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, head_DV.astype(x_BTD.dtype))
  return sharding.constrain(logits_BTV.astype(jnp.float32), ("batch", "length", "vocab"))


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """Graph definition and abstract (ShapeDtypeStruct) state, without allocating any parameter."""
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return nnx.split(model)


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
  """Fresh parameters as a pure nested dict (jit this with out_shardings to place them sharded)."""
  return nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(params=rng)), nnx.Param))


def apply(graphdef: nnx.GraphDef, params: Any, tokens_BT: jax.Array,
          valid_BT: jax.Array | None = None, *, right_padded: bool = False, **options: Any) -> Any:
  """Functional forward pass over a pure-dict parameter tree (see `Transformer.__call__` for `options`:
  the KV cache, `return_hidden`, LoRA `adapters`)."""
  return nnx.merge(graphdef, params)(tokens_BT, valid_BT, right_padded=right_padded, **options)


def count_params(params: Any) -> int:
  """Number of parameters in a (concrete or abstract) parameter tree."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def score_fn(cfg: ModelConfig, graphdef: nnx.GraphDef, params: Any, adapters: lora_lib.Adapters | None = None, *,
             right_padded: bool = True) -> diffusion.ScoreFn:
  """The model as a `diffusion.ScoreFn` (per-token CE). `right_padded` promises every row's valid tokens
  are a prefix (training batches: packing, SFT pads and the random-length crop all keep it so), which
  lets cuDNN attention take key lengths; left-padded rows (rollouts) pass False. The output head runs in
  chunks of `cfg.loss_chunk_size` positions when > 0; `adapters`: LoRA updates over `params` (the base).
  A mixture-of-experts model's scores carry its router statistics (`TokenScores.aux`). Keyword options
  (block models: `noised_half`, `segment_BT`, `block_size`) go to the model call."""
  chunk = cfg.loss_chunk_size
  call = functools.partial(apply, graphdef, params, right_padded=right_padded, adapters=adapters)
  if not chunk and not cfg.moe:
    return diffusion.from_logits(call)

  def scores(tokens_BL, valid_BL, targets_BL, **options):
    if not chunk:
      logits_BLV, aux = call(tokens_BL, valid_BL, return_aux=True, **options)
      return diffusion.from_logits(lambda *_: logits_BLV)(tokens_BL, valid_BL, targets_BL)._replace(aux=aux)
    (x_BLD, head_DV), aux = call(tokens_BL, valid_BL, return_hidden=True, return_aux=True, **options)
    return diffusion.chunked_scores(x_BLD, head_DV, targets_BL, chunk_size=chunk)._replace(aux=aux)

  return scores
