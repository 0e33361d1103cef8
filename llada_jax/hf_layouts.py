"""The Hugging Face layouts of the LLaDA family (REFERENCE §1, §12, §13): config.json <-> ModelConfig, and
the name, shape and place in our parameters of every HF tensor. llada_jax.hf reads and writes the files.

Two layouts, told apart by config.json's keys (`d_model` present: dense; `hidden_size` without it: MoE):
  dense  LLaDA-8B/1B and iLLaDA-8B, read by the released `modeling_llada.py`: OLMo-style keys (d_model,
         n_heads, n_kv_heads, ...) and `model.transformer.blocks.{i}.*` tensors. `weight_tying: true` (iLLaDA)
         means no `model.transformer.ff_out` tensor: the logits come from the embedding matrix.
  moe    LLaDA-MoE, read by the released `modeling_lladamoe.py` (model_type "llada" too): HF/OLMoE-style keys
         (hidden_size, num_experts, ...) and `model.layers.{i}.*` tensors, one per expert and projection,
         each filling the [layer, expert] slice of one of our stacked expert leaves.
Every size, id and constant comes from config.json; nothing of one released model is hard-coded. A key
whose value makes the released code compute something llada_jax does not is refused, by name, before any
weight is read; so is a model of ours that the target layout cannot express, before any file is written.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from llada_jax.config import ModelConfig

CONFIG_FILE = "config.json"


class Tensor(NamedTuple):
  """One HF tensor: its name and `[out, in]` shape, and the leaf of ours it fills: the whole leaf, or the
  slice at `layer` of a stacked layer leaf, or at [layer, expert] of a stacked expert leaf."""
  name: str
  shape: tuple[int, ...]
  leaf: tuple[str, ...]
  layer: int | None
  transpose: bool  # PyTorch Linear [out, in] -> our kernel [in, ...]; False for embeddings and norms
  expert: int | None = None

  @property
  def index(self) -> tuple[int, ...]:
    """Where in its leaf the tensor goes: () (all of it), (layer,) or (layer, expert)."""
    if self.layer is None:
      return ()
    return (self.layer,) if self.expert is None else (self.layer, self.expert)

  def to_ours(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(w.T.reshape(shape) if self.transpose else w.reshape(shape))

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(self.shape[::-1]).T if self.transpose else x.reshape(self.shape))


def _need(cfg: dict, key: str, where: str) -> Any:
  if cfg.get(key) is None:
    raise ValueError(f"{where} lacks the key '{key}' (needed to build the model)")
  return cfg[key]


def _flag(cfg: dict, key: str, where: str, default: bool | None = None) -> bool:
  """A true/false key; `default` None makes it required."""
  if cfg.get(key) is None:
    if default is None:
      raise ValueError(f"{where} lacks the key '{key}' (true or false; needed to build the model)")
    return default
  if not isinstance(cfg[key], bool):
    raise ValueError(f"{where}: '{key}'={cfg[key]!r} must be true or false")
  return cfg[key]


def is_moe_config(cfg: dict[str, Any]) -> bool:
  """True for a LLaDA-MoE config.json (HF-style `hidden_size`, no OLMo-style `d_model`)."""
  return "d_model" not in cfg and "hidden_size" in cfg


def _refuse_inexpressible(m: ModelConfig, layout_name: str, fixed: tuple[tuple[str, Any], ...]) -> None:
  for field, value in fixed:
    if getattr(m, field) != value:
      raise ValueError(f"model.{field}={getattr(m, field)!r}: the {layout_name} layout cannot express it (it computes "
                       f"{field}={value!r}), so this model cannot be exported to it")


# ---------------------------------------------------------------------------------------------------------
# Dense: modeling_llada.py

# config.json keys that change the architecture: (key, value this implementation computes, required?).
# Required keys are the ones REFERENCE §1 lists; optional ones are checked only when present.
DENSE_ARCHITECTURE = (("block_type", "llama", True), ("activation_type", "silu", True),
                      ("layer_norm_type", "rms", True), ("include_bias", False, True),
                      ("include_qkv_bias", False, False), ("alibi", False, False), ("rope", True, False),
                      ("attention_layer_norm", False, False), ("input_emb_norm", False, False),
                      ("scale_logits", False, False), ("layer_norm_with_affine", True, False),
                      ("bias_for_layer_norm", False, False), ("multi_query_attention", None, False),
                      ("block_group_size", 1, False))
_DENSE_SHAPE_KEYS = ("d_model", "n_heads", "n_layers", "mlp_hidden_size", "vocab_size", "max_sequence_length",
                     "rope_theta", "rms_norm_eps")
_DENSE_BASE = {  # a fresh export's config.json before our values: what the released files also carry
    "architectures": ["LLaDAModelLM"], "model_type": "llada",
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "alibi_bias_max": 8.0, "attention_dropout": 0.0, "embedding_dropout": 0.0, "residual_dropout": 0.0,
    "flash_attention": False, "init_device": "meta", "init_fn": "mitchell", "mlp_ratio": 4,
    "precision": "amp_bf16", "rope_full_precision": True, "use_cache": False,
}

# One block: (our leaf, the released module, transpose). llada_jax.peft names LoRA modules from it.
BLOCK = (("attn_norm", "attn_norm", False), ("q_proj", "q_proj", True), ("k_proj", "k_proj", True),
         ("v_proj", "v_proj", True), ("attn_out", "attn_out", True), ("ff_norm", "ff_norm", False),
         ("ff_gate", "ff_proj", True), ("ff_up", "up_proj", True), ("ff_down", "ff_out", True))


def _dense_model_config(cfg: dict[str, Any], where: str, **dtypes: str) -> ModelConfig:
  for key, value, required in DENSE_ARCHITECTURE:
    if key not in cfg:
      if required:
        raise ValueError(f"{where} lacks the key '{key}' (LLaDA sets it to {value!r})")
    elif cfg[key] != value:
      raise ValueError(f"{where}: '{key}'={cfg[key]!r} is not supported; llada_jax implements {value!r}")
  tied = _flag(cfg, "weight_tying", where)
  d, n, layers, ffn, vocab, max_len, theta, eps = (_need(cfg, k, where) for k in _DENSE_SHAPE_KEYS)
  return ModelConfig(vocab_size=cfg.get("embedding_size") or vocab, d_model=d, num_layers=layers, num_heads=n,
                     num_kv_heads=cfg.get("n_kv_heads") or n, mlp_dim=ffn, max_seq_len=max_len,
                     rope_theta=float(theta), norm_eps=float(eps), init_std=float(cfg.get("init_std", 0.02)),
                     tie_embeddings=tied, **dtypes)


def _dense_hf_config(m: ModelConfig, base: dict[str, Any] | None) -> dict[str, Any]:
  _refuse_inexpressible(m, "LLaDA (modeling_llada.py)", (("num_experts", 0), ("qk_norm", False),
                                                         ("rope_fraction", 1.0)))
  out = dict(base or _DENSE_BASE)
  out.update({key: value for key, value, _ in DENSE_ARCHITECTURE})
  out.update(d_model=m.d_model, n_heads=m.num_heads, n_kv_heads=m.num_kv_heads, n_layers=m.num_layers,
             mlp_hidden_size=m.mlp_dim, vocab_size=m.vocab_size, embedding_size=m.vocab_size,
             max_sequence_length=m.max_seq_len, rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps,
             init_std=m.init_std, weight_tying=m.tie_embeddings)
  return out


def _dense_layout(m: ModelConfig) -> list[Tensor]:
  d, n, k, h, f, v = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim, m.vocab_size
  hf_shapes = {"attn_norm": (d,), "q_proj": (n * h, d), "k_proj": (k * h, d), "v_proj": (k * h, d),
               "attn_out": (d, n * h), "ff_norm": (d,), "ff_proj": (f, d), "up_proj": (f, d), "ff_out": (d, f)}
  out = [Tensor("model.transformer.wte.weight", (v, d), ("embedding",), None, False)]
  for i in range(m.num_layers):
    for ours, theirs, transpose in BLOCK:
      out.append(Tensor(f"model.transformer.blocks.{i}.{theirs}.weight", hf_shapes[theirs],
                        ("blocks", ours), i, transpose))
  out.append(Tensor("model.transformer.ln_f.weight", (d,), ("final_norm",), None, False))
  if not m.tie_embeddings:  # tied: modeling_llada.py takes the logits from wte
    out.append(Tensor("model.transformer.ff_out.weight", (v, d), ("lm_head",), None, True))
  return out


# ---------------------------------------------------------------------------------------------------------
# Mixture of experts: modeling_lladamoe.py

# Keys whose other values make the released code compute what llada_jax does not: (key, the value llada_jax
# computes, why another is refused). Absent or null is the value computed. The router of the released
# code is a float32 softmax over every expert, then top-k, weights NOT renormalised (norm_topk_prob is
# hard-coded False, so that key is read and ignored, as there) and not scaled.
_MOE_FIXED = (
    ("hidden_act", "silu", "the experts are SwiGLU"),
    ("attention_bias", False, "llada_jax's projections have no biases"),
    ("clip_qkv", None, "llada_jax does not clamp queries, keys and values"),
    ("rope_scaling", None, "llada_jax's RoPE is unscaled"),
    ("moe_router_score_function", "softmax",
     "the released modeling_lladamoe.py routes by softmax whatever this key says, so such a config was not "
     "made for that code"),
    ("routed_scaling_factor", 1.0, "the released modeling_lladamoe.py never scales the routing weights"),
    ("moe_router_enable_expert_bias", False,
     "the released modeling_lladamoe.py adds the expert bias to the routing weights as well as to the choice; "
     "llada_jax's router_bias only chooses experts"),
)
_MOE_SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts",
                   "num_experts_per_tok", "max_position_embeddings", "rope_theta", "rms_norm_eps")
_MOE_BASE = {  # a fresh export's config.json before our values: what modeling_lladamoe.py reads
    "architectures": ["LLaDAMoEModelLM"], "model_type": "llada",
    "auto_map": {"AutoConfig": "configuration_lladamoe.LLaDAConfig",
                 "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
                 "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"},
    "attention_dropout": 0.0, "output_router_logits": False, "use_cache": False, "norm_topk_prob": False,
}
# Per layer: (our leaf, the released tensor under model.layers.{i}., transpose). Experts and the shared
# expert follow, see _moe_layout.
MOE_ATTENTION = (("attn_norm", "input_layernorm", False), ("q_proj", "self_attn.q_proj", True),
                 ("k_proj", "self_attn.k_proj", True), ("v_proj", "self_attn.v_proj", True),
                 ("attn_out", "self_attn.o_proj", True))
MOE_QK_NORM = (("q_norm", "self_attn.q_norm", False), ("k_norm", "self_attn.k_norm", False))
MOE_FFN = (("ff_norm", "post_attention_layernorm", False), ("router", "mlp.gate", True))
MOE_EXPERT = (("ff_gate", "gate_proj"), ("ff_up", "up_proj"), ("ff_down", "down_proj"))  # mlp.experts.{j}.*
MOE_SHARED = (("shared_gate", "gate_proj"), ("shared_up", "up_proj"), ("shared_down", "down_proj"))


def _moe_layer_freq(cfg: dict[str, Any], layers: int, where: str) -> None:
  """Refuses a dense layer: entry 0 of the per-layer list (an int 1 means every layer, as in Megatron)."""
  freq = cfg.get("moe_layer_freq", 1)
  per_layer = [1] * layers if freq == 1 else freq
  if not isinstance(per_layer, list) or len(per_layer) != layers:
    raise ValueError(f"{where}: 'moe_layer_freq'={freq!r} must be 1 or a list of {layers} per-layer entries")
  dense = [i for i, f in enumerate(per_layer) if f == 0]
  if dense:
    raise ValueError(f"{where}: 'moe_layer_freq'={freq!r} makes layer(s) {dense} dense (0); llada_jax's "
                     "mixture-of-experts model has experts in every layer")


def _moe_model_config(cfg: dict[str, Any], where: str, **dtypes: str) -> ModelConfig:
  for key, value, why in _MOE_FIXED:
    if cfg.get(key) is not None and cfg[key] != value:
      raise ValueError(f"{where}: '{key}'={cfg[key]!r} is not supported ({why}); llada_jax implements {value!r}")
  vocab, d, layers, n, experts, k, max_len, theta, eps = (_need(cfg, key, where) for key in _MOE_SHAPE_KEYS)
  _moe_layer_freq(cfg, layers, where)
  expert_dim = cfg.get("expert_intermediate_size") or _need(cfg, "intermediate_size", where)
  if cfg.get("head_dim") is not None and cfg["head_dim"] * n != d:
    raise ValueError(f"{where}: 'head_dim'={cfg['head_dim']} is not hidden_size / num_attention_heads = {d}/{n}, "
                     "which modeling_lladamoe.py's attention uses")
  fraction = cfg.get("partial_rotary_factor")
  fraction = 1.0 if fraction is None else fraction
  rotary = d // n * fraction
  if rotary != int(rotary) or int(rotary) % 2:
    raise ValueError(f"{where}: 'partial_rotary_factor'={fraction!r} rotates {rotary:g} of the {d // n} dims of "
                     "a head; llada_jax needs a whole, even number")
  return ModelConfig(vocab_size=vocab, d_model=d, num_layers=layers, num_heads=n,
                     num_kv_heads=cfg.get("num_key_value_heads") or n, mlp_dim=expert_dim, max_seq_len=max_len,
                     rope_theta=float(theta), norm_eps=float(eps),
                     init_std=float(cfg.get("initializer_range") or 0.02),
                     tie_embeddings=_flag(cfg, "tie_word_embeddings", where),
                     qk_norm=_flag(cfg, "qk_layernorm", where), rope_fraction=float(fraction),
                     num_experts=experts, experts_per_token=k,
                     shared_expert_dim=cfg.get("shared_expert_intermediate_size") or 0,
                     router_score="softmax", router_renorm=False, router_bias=False, routed_scaling=1.0,
                     moe_aux_loss_weight=float(cfg.get("router_aux_loss_coef", 0.01)), **dtypes)


def _moe_hf_config(m: ModelConfig, base: dict[str, Any] | None) -> dict[str, Any]:
  _refuse_inexpressible(m, "LLaDA-MoE (modeling_lladamoe.py)", (
      ("router_score", "softmax"), ("router_renorm", False), ("router_bias", False), ("routed_scaling", 1.0)))
  out = dict(base or _MOE_BASE)
  # What the imported file said of these was checked on import; a fresh file states what the code computes.
  for key, value, _ in _MOE_FIXED:
    out.setdefault(key, value)
  out.setdefault("moe_layer_freq", [1] * m.num_layers)  # modeling_lladamoe.py indexes it per layer
  out.setdefault("intermediate_size", m.mlp_dim)
  out.update(vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.num_layers,
             num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
             expert_intermediate_size=m.mlp_dim, shared_expert_intermediate_size=m.shared_expert_dim or None,
             num_experts=m.num_experts, num_experts_per_tok=m.experts_per_token,
             max_position_embeddings=m.max_seq_len, rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps,
             partial_rotary_factor=m.rope_fraction, qk_layernorm=m.qk_norm, tie_word_embeddings=m.tie_embeddings,
             initializer_range=m.init_std, router_aux_loss_coef=m.moe_aux_loss_weight)
  return out


def _moe_layout(m: ModelConfig) -> list[Tensor]:
  d, n, k, h, v = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.vocab_size
  f, s, e = m.mlp_dim, m.shared_expert_dim, m.num_experts
  hf_shapes = {"attn_norm": (d,), "q_proj": (n * h, d), "k_proj": (k * h, d), "v_proj": (k * h, d),
               "attn_out": (d, n * h), "q_norm": (h,), "k_norm": (h,), "ff_norm": (d,), "router": (e, d),
               "ff_gate": (f, d), "ff_up": (f, d), "ff_down": (d, f),
               "shared_gate": (s, d), "shared_up": (s, d), "shared_down": (d, s)}
  out = [Tensor("model.embed_tokens.weight", (v, d), ("embedding",), None, False)]
  for i in range(m.num_layers):
    p = f"model.layers.{i}."
    for ours, theirs, transpose in MOE_ATTENTION + (MOE_QK_NORM if m.qk_norm else ()) + MOE_FFN:
      out.append(Tensor(f"{p}{theirs}.weight", hf_shapes[ours], ("blocks", ours), i, transpose))
    for j in range(e):
      for ours, theirs in MOE_EXPERT:
        out.append(Tensor(f"{p}mlp.experts.{j}.{theirs}.weight", hf_shapes[ours], ("blocks", ours), i, True, j))
    for ours, theirs in MOE_SHARED if s else ():
      out.append(Tensor(f"{p}shared_expert.{theirs}.weight", hf_shapes[ours], ("blocks", ours), i, True))
  out.append(Tensor("model.norm.weight", (d,), ("final_norm",), None, False))
  if not m.tie_embeddings:
    out.append(Tensor("lm_head.weight", (v, d), ("lm_head",), None, True))
  return out


# ---------------------------------------------------------------------------------------------------------
# Either layout


def model_config_from_hf(cfg: dict[str, Any], *, param_dtype: str, dtype: str = "bfloat16",
                         where: str = CONFIG_FILE) -> ModelConfig:
  """Our ModelConfig for a LLaDA or LLaDA-MoE `config.json`; what this model does not compute is refused."""
  read = _moe_model_config if is_moe_config(cfg) else _dense_model_config
  return read(cfg, where, dtype=dtype, param_dtype=param_dtype)


def hf_config_from_model(m: ModelConfig, *, mask_id: int, eos_id: int, pad_id: int,
                         base: dict[str, Any] | None = None) -> dict[str, Any]:
  """config.json for `m` in its layout (MoE when m.num_experts > 0): `base` (the imported file, so unknown
  keys survive; ignored when of the other layout) updated with our values."""
  if base is not None and is_moe_config(base) != m.moe:
    base = None
  out = (_moe_hf_config if m.moe else _dense_hf_config)(m, base)
  out.update(mask_token_id=mask_id, eos_token_id=eos_id, pad_token_id=pad_id)
  return out


def layout(m: ModelConfig) -> list[Tensor]:
  """Every HF tensor of a model with config `m`, in the released file's order."""
  return _moe_layout(m) if m.moe else _dense_layout(m)
