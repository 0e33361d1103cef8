"""LoRA adapters (REFERENCE §11): a frozen base model plus a trained low-rank update of some projections.

For a projection with kernel W (input axes `in`, output axes `out`, as the model stores it):

  y = x W + scale * (dropout(x) A) B,    A [in..., r],  B [r, out...],  scale = alpha / r  (rsLoRA: / sqrt(r))

A starts uniform in +-1/sqrt(fan_in) (PEFT's Kaiming-uniform with a = sqrt(5)) and B at zero, so a fresh
adapter leaves the base model's outputs exactly as they were. Worked example: d_model 4, rank 2, alpha 4
on q_proj [4, heads 2, head_dim 2]: A is [4, 2], B is [2, 2, 2], scale 2; merging adds 2 * A @ B (a
[4, 2, 2] update) to the kernel and gives the same outputs as the unmerged sum, up to rounding.

Adapters are a pure dict beside the model's parameters, with the model's stacked-layer layout:
`{"blocks": {target: {"lora_a": [layers, in..., r], "lora_b": [layers, r, out...]}}}`. Their logical axes
are the adapted kernel's (so they shard like it) with the rank axis replicated. The model reads them
through `Adapters` (llada_jax.model); `merge` folds them into the kernels for serving and export.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from llada_jax.config import LORA_TARGETS, LoraConfig, ModelConfig

TARGET_INDEX = {name: i for i, name in enumerate(LORA_TARGETS)}  # folds a layer's dropout key per target

# Each target's kernel: its logical axes and how many of them (leading) are inputs.
KERNEL_AXES = {
    "q_proj": (("embed", "heads", "kv"), 1), "k_proj": (("embed", "heads", "kv"), 1),
    "v_proj": (("embed", "heads", "kv"), 1), "attn_out": (("heads", "kv", "embed"), 2),
    "ff_gate": (("embed", "mlp"), 1), "ff_up": (("embed", "mlp"), 1), "ff_down": (("mlp", "embed"), 1),
}


class Adapters(NamedTuple):
  """What a forward pass needs to apply adapters: the arrays, the scale, and (training only) the dropout
  rate with a key (None: no dropout)."""

  tree: Any
  scale: float
  dropout: float = 0.0
  rng: jax.Array | None = None


def kernel_shape(m: ModelConfig, target: str) -> tuple[int, ...]:
  """One layer's kernel shape of `target` (llada_jax.model.Block)."""
  d, n, k, h, f = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim
  return {"q_proj": (d, n, h), "k_proj": (d, k, h), "v_proj": (d, k, h), "attn_out": (n, h, d),
          "ff_gate": (d, f), "ff_up": (d, f), "ff_down": (f, d)}[target]


def shapes(m: ModelConfig, lora: LoraConfig) -> dict[str, dict[str, tuple[int, ...]]]:
  """{target: {'lora_a': shape, 'lora_b': shape}} of the stacked adapters."""
  out = {}
  for target in lora.targets:
    shape, n_in = kernel_shape(m, target), KERNEL_AXES[target][1]
    out[target] = {"lora_a": (m.num_layers, *shape[:n_in], lora.rank),
                   "lora_b": (m.num_layers, lora.rank, *shape[n_in:])}
  return out


def logical_axes(m: ModelConfig, lora: LoraConfig) -> dict:
  """Logical axis names of the adapters (the same tree): the adapted kernel's, rank replicated."""
  out = {}
  for target in lora.targets:
    axes, n_in = KERNEL_AXES[target]
    out[target] = {"lora_a": ("layers", *axes[:n_in], None), "lora_b": ("layers", None, *axes[n_in:])}
  return {"blocks": out}


def init(m: ModelConfig, lora: LoraConfig, rng: jax.Array) -> dict:
  """Fresh adapters: A uniform in +-1/sqrt(fan_in), B zero (jit with out_shardings to place them)."""
  dtype = jnp.dtype(m.param_dtype)
  out = {}
  for i, (target, s) in enumerate(shapes(m, lora).items()):
    fan_in = math.prod(s["lora_a"][1:-1])
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(jax.random.fold_in(rng, i), s["lora_a"], jnp.float32, -bound, bound)
    out[target] = {"lora_a": a.astype(dtype), "lora_b": jnp.zeros(s["lora_b"], dtype)}
  return {"blocks": out}


def abstract(m: ModelConfig, lora: LoraConfig) -> dict:
  """ShapeDtypeStructs of the adapters."""
  return jax.eval_shape(lambda: init(m, lora, jax.random.key(0)))


def delta(x: jax.Array, adapter: dict, target: str, *, scale: float, dropout: float = 0.0,
          rng: jax.Array | None = None) -> jax.Array:
  """scale * (dropout(x) A) B for one layer's adapter, in x's dtype; x ends with the kernel's input axes."""
  a, b = adapter["lora_a"].astype(x.dtype), adapter["lora_b"].astype(x.dtype)
  n_in = KERNEL_AXES[target][1]
  if dropout and rng is not None:
    keep = jax.random.bernoulli(rng, 1.0 - dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
  xa = jnp.tensordot(x, a, axes=n_in)
  return scale * jnp.tensordot(xa, b, axes=1)


def layer_delta(layer_tree: dict, target: str) -> jax.Array:
  """A @ B of one target across all stacked layers: [layers, kernel shape...] in float32."""
  a, b = (layer_tree[target][k].astype(jnp.float32) for k in ("lora_a", "lora_b"))
  return jax.vmap(lambda a_, b_: jnp.tensordot(a_, b_, axes=1))(a, b)


def merge(params: dict, adapters: dict, lora: LoraConfig) -> dict:
  """The base parameters with every adapter folded into its kernel: W + scale * A @ B, summed in
  float32 and stored in W's dtype (for sampling speed and `llada-export --merge`)."""
  blocks = dict(params["blocks"])
  for target in adapters["blocks"]:
    w = blocks[target]
    blocks[target] = (w.astype(jnp.float32) + lora.scale * layer_delta(adapters["blocks"], target)).astype(w.dtype)
  return {**params, "blocks": blocks}
