"""LoRA adapters (REFERENCE §11): a frozen base model plus a trained low-rank update of some projections.

For a projection with kernel W (input axes `in`, output axes `out`, as the model stores it):

  y = x W + scale * (dropout(x) A) B,    A [in..., r],  B [r, out...],  scale = alpha / r  (rsLoRA: / sqrt(r))

A starts uniform in +-1/sqrt(fan_in) (PEFT's Kaiming-uniform with a = sqrt(5)) and B at zero, so a fresh
adapter leaves the base model's outputs exactly as they were. Worked example: d_model 4, rank 2, alpha 4
on q_proj [4, heads 2, head_dim 2]: A is [4, 2], B is [2, 2, 2], scale 2; merging adds 2 * A @ B (a
[4, 2, 2] update) to the kernel and gives the same outputs as the unmerged sum, up to rounding.

Adapters are a pure dict beside the model's parameters, with the model's stacked-layer layout:
`{"blocks": {target: {"lora_a": [layers, in..., r], "lora_b": [layers, r, out...]}}}`. Their logical axes
are the adapted kernel's (so they shard like it) with the rank axis replicated. With
`lora.trainable_tokens` (ids t_1..t_n) the tree also holds `{"tokens": {"embedding": [n, D],
"lm_head": [D, n]}}`: rows that replace embedding[t_i] and columns that replace lm_head[:, t_i] (PEFT's
trainable tokens), seeded from the base (`seed_tokens`) so step 0 is still the base model. The model
reads the tree through `Adapters` (llada_jax.model); `merge` folds it into the weights for serving and
export.
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
  token_ids: tuple[int, ...] = ()  # the rows of tree["tokens"] (lora.token_ids)

  @classmethod
  def of(cls, tree: Any, lora: LoraConfig, rng: jax.Array | None = None) -> "Adapters":
    """The adapters `tree` of config `lora`; `rng` turns dropout on (training)."""
    return cls(tree, lora.scale, lora.dropout, rng, lora.token_ids)


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


def token_shapes(m: ModelConfig, lora: LoraConfig) -> dict[str, tuple[int, ...]]:
  """Shapes of the trainable token rows (an empty dict without `lora.trainable_tokens`); a model with tied
  embeddings has embedding rows only (its head reads them)."""
  n = len(lora.token_ids)
  if not n:
    return {}
  return {"embedding": (n, m.d_model)} if m.tie_embeddings else {"embedding": (n, m.d_model), "lm_head": (m.d_model, n)}


def logical_axes(m: ModelConfig, lora: LoraConfig) -> dict:
  """Logical axis names of the adapters (the same tree): the adapted kernel's, rank replicated; token rows
  shard their model axis like the embedding and head, the few tokens replicated."""
  out = {}
  for target in lora.targets:
    axes, n_in = KERNEL_AXES[target]
    out[target] = {"lora_a": ("layers", *axes[:n_in], None), "lora_b": ("layers", None, *axes[n_in:])}
  tree = {"blocks": out}
  if lora.token_ids:
    axes = {"embedding": (None, "embed"), "lm_head": ("embed", None)}
    tree["tokens"] = {k: axes[k] for k in token_shapes(m, lora)}
  return tree


def init(m: ModelConfig, lora: LoraConfig, rng: jax.Array) -> dict:
  """Fresh adapters: A uniform in +-1/sqrt(fan_in), B zero (jit with out_shardings to place them). Token
  rows start at zero here: `seed_tokens` copies the base's in before the first step."""
  dtype = jnp.dtype(m.param_dtype)
  out = {}
  for i, (target, s) in enumerate(shapes(m, lora).items()):
    fan_in = math.prod(s["lora_a"][1:-1])
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(jax.random.fold_in(rng, i), s["lora_a"], jnp.float32, -bound, bound)
    out[target] = {"lora_a": a.astype(dtype), "lora_b": jnp.zeros(s["lora_b"], dtype)}
  tree = {"blocks": out}
  if lora.token_ids:
    tree["tokens"] = {k: jnp.zeros(s, dtype) for k, s in token_shapes(m, lora).items()}
  return tree


def seed_tokens(adapters: dict, base: dict, lora: LoraConfig) -> dict:
  """`adapters` with the trainable token rows set to the base model's (a fresh run's step 0)."""
  if not lora.token_ids:
    return adapters
  ids = jnp.asarray(lora.token_ids, jnp.int32)
  rows = adapters["tokens"]
  seeded = {"embedding": base["embedding"][ids].astype(rows["embedding"].dtype)}
  if "lm_head" in rows:
    seeded["lm_head"] = base["lm_head"][:, ids].astype(rows["lm_head"].dtype)
  return {**adapters, "tokens": seeded}


def with_tokens(embedding_VD: jax.Array, head_DV: jax.Array | None, adapters: Adapters | None
                ) -> tuple[jax.Array, jax.Array]:
  """The embedding and output head with the adapters' token rows (if any) in place of the base's; a None
  head (tied embeddings) is the resulting embedding transposed. Each forward writes a copy of both
  (sharded like them; 1 GiB each at the released 8B in bfloat16), which keeps the head a plain matrix for
  the chunked loss and the samplers; merging (`merge`) removes it."""
  if adapters is not None and adapters.token_ids:
    ids, rows = jnp.asarray(adapters.token_ids, jnp.int32), adapters.tree["tokens"]
    embedding_VD = embedding_VD.at[ids].set(rows["embedding"].astype(embedding_VD.dtype))
    if head_DV is not None:
      head_DV = head_DV.at[:, ids].set(rows["lm_head"].astype(head_DV.dtype))
  return embedding_VD, (embedding_VD.T if head_DV is None else head_DV)


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
  float32 and stored in W's dtype, and the trainable token rows in place (for sampling speed and
  `llada-export --merge`)."""
  blocks = dict(params["blocks"])
  for target in adapters["blocks"]:
    w = blocks[target]
    blocks[target] = (w.astype(jnp.float32) + lora.scale * layer_delta(adapters["blocks"], target)).astype(w.dtype)
  embedding, head = with_tokens(params["embedding"], params.get("lm_head"), Adapters.of(adapters, lora))
  merged = {**params, "blocks": blocks, "embedding": embedding}
  if "lm_head" in params:  # tied embeddings have no head of their own
    merged["lm_head"] = head
  return merged
