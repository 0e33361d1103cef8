"""Frozen, validated configuration.

Config files (`configs/*.py`) build an `ml_collections.ConfigDict`; `from_config_dict` turns it, once,
into the frozen dataclasses below. Every `__post_init__` rejects a bad value with a `ValueError` that
names the field (as `section.field`) and the allowed range, so a typo on a command line fails before any
device work starts.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

_DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "attn_out", "qkv_attn_out")
ATTENTION_IMPLS = ("xla", "cudnn", "splash", "auto")
SOURCES = ("procedural", "text", "jsonl", "array_record", "tfds", "task")
RULE_SETS = ("dp", "fsdp", "fsdp_tp", "fsdp_ep")  # tables: llada_jax.sharding.RULE_SETS
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv", "mlp", "vocab", "layers", "norm", "expert")
ROUTER_SCORES = ("softmax", "sigmoid")


def _fail(field: str, allowed: str, value: Any) -> None:
  raise ValueError(f"config field '{field}' must be {allowed}; got {value!r}")


def _check_int(section: str, name: str, value: Any, lo: int, hi: int | None = None) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
    rng = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    _fail(f"{section}.{name}", rng, value)


def _check_float(section: str, name: str, value: Any, lo: float, hi: float | None = None,
                 lo_open: bool = False) -> None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  ok = ok and (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
  if not ok:
    left = "(" if lo_open else "["
    right = f"{hi}]" if hi is not None else "inf)"
    _fail(f"{section}.{name}", f"a number in {left}{lo}, {right}", value)


def _check_choice(section: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    _fail(f"{section}.{name}", f"one of {choices}", value)


# Field metadata. `execution`: changes how a step runs, not what the parameters are, so a run may resume
# or fine-tune with another value (restores cast to the new param_dtype; init_std only shapes a fresh
# init). `usage`: how the trained parameters are meant to be used (e.g. chat), free to change when
# fine-tuning. Every other model field defines the parameters and must match a checkpoint's.
_EXECUTION = {"kind": "execution"}
_USAGE = {"kind": "usage"}


def _field(default: Any, kind: dict[str, str]) -> Any:
  return dataclasses.field(default=default, metadata=kind)


def architecture_fields(cls: type = None) -> tuple[str, ...]:
  """The fields of `cls` (default: ModelConfig) that define the parameters: neither execution nor usage."""
  return tuple(f.name for f in dataclasses.fields(cls or ModelConfig) if "kind" not in f.metadata)


def execution_fields(cls: type = None) -> tuple[str, ...]:
  """The fields of `cls` (default: ModelConfig) marked execution-only."""
  return tuple(f.name for f in dataclasses.fields(cls or ModelConfig) if f.metadata.get("kind") == "execution")


def _objectives():
  # The registry imports the data pipeline, which imports this module: looked up when validating.
  from llada_jax import objectives
  return objectives


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The Transformer (REFERENCE §1, §12-13). `head_dim` is derived: d_model // num_heads.

  `chat`: the parameters answer prompts in the chat template (serving, the harness and the converters read
  it from the checkpoint's config); None resolves to what the objective trains (True for `sft`).
  Family options: `tie_embeddings` (the output head is the embedding matrix transposed: no head parameter),
  `qk_norm` (RMSNorm over head_dim on queries and keys, per head, before RoPE), `rope_fraction` (RoPE on
  the first fraction of each head's dims, the rest passes through: HF's partial_rotary_factor).
  Mixture of experts (REFERENCE §13; llada_jax.moe), on when `num_experts` > 0: every layer's FFN is
  `num_experts` SwiGLU experts of width `mlp_dim`, `experts_per_token` chosen per token by a router scoring
  with `router_score` (softmax | sigmoid, float32), the chosen weights optionally renormalised
  (`router_renorm`) and multiplied by `routed_scaling`; `router_bias` adds a per-expert bias used to choose
  experts only, never in the weights; `shared_expert_dim` > 0 adds a dense SwiGLU every token goes through.
  Block diffusion (REFERENCE §14): `block_size` > 0 makes attention block-causal over blocks of that many
  tokens (a position sees its own block and every earlier one), which the block-diffusion objectives train
  and `sampling.generate_blocks` decodes with an exact KV cache; 0 is the bidirectional model. It shapes
  no parameter, so a pure-diffusion checkpoint continues as a block model (`train.init_from`).
  `capacity_factor` > 0 caps each expert at ceil(factor * tokens * k / E) assignments (the rest dropped,
  earliest tokens first kept); 0 is dropless. `moe_aux_loss_weight` / `moe_z_loss_weight` weight the
  load-balancing and router z-losses every objective adds while training.
  """

  vocab_size: int = 1024
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 4
  mlp_dim: int = 256
  max_seq_len: int = 4096
  rope_theta: float = 500000.0
  norm_eps: float = 1e-5
  init_std: float = _field(0.02, _EXECUTION)
  causal: bool = False
  tie_embeddings: bool = False
  qk_norm: bool = False
  rope_fraction: float = 1.0
  num_experts: int = 0
  experts_per_token: int = 2
  shared_expert_dim: int = 0
  router_score: str = "softmax"
  router_renorm: bool = False
  router_bias: bool = False
  routed_scaling: float = 1.0
  capacity_factor: float = _field(0.0, _EXECUTION)
  moe_aux_loss_weight: float = _field(0.01, _EXECUTION)
  moe_z_loss_weight: float = _field(0.001, _EXECUTION)
  block_size: int = _field(0, _USAGE)
  chat: bool | None = _field(None, _USAGE)
  scan_layers: bool = _field(True, _EXECUTION)
  remat_policy: str = _field("none", _EXECUTION)
  attention_impl: str = _field("xla", _EXECUTION)
  loss_chunk_size: int = _field(0, _EXECUTION)
  mlp_pad_to: int = _field(0, _EXECUTION)
  dtype: str = _field("bfloat16", _EXECUTION)
  param_dtype: str = _field("float32", _EXECUTION)

  def __post_init__(self):
    s = "model"
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim", "max_seq_len"):
      _check_int(s, name, getattr(self, name), 1)
    if self.d_model % self.num_heads:
      _fail(f"{s}.num_heads", f"a divisor of model.d_model={self.d_model}", self.num_heads)
    if self.num_heads % self.num_kv_heads:
      _fail(f"{s}.num_kv_heads", f"a divisor of model.num_heads={self.num_heads}", self.num_kv_heads)
    if self.head_dim % 2:
      _fail(f"{s}.num_heads", "such that head_dim = d_model // num_heads is even (RoPE rotates pairs)",
            self.num_heads)
    _check_float(s, "rope_theta", self.rope_theta, 1.0, lo_open=True)
    _check_float(s, "norm_eps", self.norm_eps, 0.0, 1.0, lo_open=True)
    _check_float(s, "init_std", self.init_std, 0.0, 1.0, lo_open=True)
    _check_choice(s, "remat_policy", self.remat_policy, REMAT_POLICIES)
    _check_choice(s, "attention_impl", self.attention_impl, ATTENTION_IMPLS)
    _check_int(s, "loss_chunk_size", self.loss_chunk_size, 0)
    _check_int(s, "mlp_pad_to", self.mlp_pad_to, 0)
    _check_choice(s, "dtype", self.dtype, _DTYPES)
    _check_choice(s, "param_dtype", self.param_dtype, _DTYPES)
    for name in ("causal", "scan_layers", "tie_embeddings", "qk_norm", "router_renorm", "router_bias"):
      if not isinstance(getattr(self, name), bool):
        _fail(f"{s}.{name}", "True or False", getattr(self, name))
    _check_float(s, "rope_fraction", self.rope_fraction, 0.0, 1.0, lo_open=True)
    if self.rotary_dim % 2 or self.rotary_dim < 2 or abs(self.rotary_dim - self.head_dim * self.rope_fraction) > 1e-6:
      _fail(f"{s}.rope_fraction", f"such that rope_fraction * head_dim ({self.head_dim}) is an even integer "
            "(RoPE rotates pairs)", self.rope_fraction)
    _check_int(s, "num_experts", self.num_experts, 0, 4096)
    _check_int(s, "shared_expert_dim", self.shared_expert_dim, 0)
    if self.num_experts:
      _check_int(s, "experts_per_token", self.experts_per_token, 1, self.num_experts)
    _check_choice(s, "router_score", self.router_score, ROUTER_SCORES)
    _check_float(s, "routed_scaling", self.routed_scaling, 0.0, 1000.0, lo_open=True)
    _check_float(s, "capacity_factor", self.capacity_factor, 0.0, 1000.0)
    _check_float(s, "moe_aux_loss_weight", self.moe_aux_loss_weight, 0.0, 1000.0)
    _check_float(s, "moe_z_loss_weight", self.moe_z_loss_weight, 0.0, 1000.0)
    _check_int(s, "block_size", self.block_size, 0, self.max_seq_len)
    if self.block_size and self.attention_impl == "cudnn":
      _fail(f"{s}.attention_impl", "'xla', 'splash' (TPU) or 'auto' for a block model (model.block_size > 0): jax's "
            "cuDNN attention takes only causal, padding and window masks, none of them block-causal",
            self.attention_impl)
    if self.block_size and self.causal:
      _fail(f"{s}.block_size", "0 for the causal baseline (model.causal=True): blocks are for diffusion models",
            self.block_size)
    if self.chat is not None and not isinstance(self.chat, bool):
      _fail(f"{s}.chat", "True, False or None (what the objective trains)", self.chat)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def rotary_dim(self) -> int:
    """Dims of each head that RoPE rotates (the first ones)."""
    return round(self.head_dim * self.rope_fraction)

  @property
  def moe(self) -> bool:
    return self.num_experts > 0


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """Forward process and objective (REFERENCE §2-3)."""

  objective: str = "pretrain"
  mask_token_id: int = 4
  noise_eps: float = 1e-3
  random_length_prob: float = 0.01

  def __post_init__(self):
    s = "diffusion"
    _check_choice(s, "objective", self.objective, _objectives().names())
    _check_int(s, "mask_token_id", self.mask_token_id, 0)
    _check_float(s, "noise_eps", self.noise_eps, 0.0, 1.0, lo_open=True)
    _check_float(s, "random_length_prob", self.random_length_prob, 0.0, 1.0)


BLOCK_WEIGHTINGS = ("inverse_t", "mean")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Block-diffusion training (`diffusion.objective` block_diffusion / block_sft; REFERENCE §14); the block
  size itself is `model.block_size`. Other objectives ignore this section.

  One t per sequence, t ~ U(`t_min`, `t_max`) (LLaDA2.0 SFT clips t to a band; dFactory ships [0.3, 0.8]),
  each maskable token masked with p = (1 - eps) t + eps. `weighting`: 'inverse_t' is the bound (masked CE
  / p, REFERENCE §14), 'mean' averages the CE over masked tokens (dFactory's SFT). `complementary`: every
  row also trains under the complement of its mask (p -> 1 - p), so each maskable token is predicted
  once per pair (twice the rows per step). `schedule`: ((size, until_step), ...) trains with block size
  `size` for steps below `until_step` (in order), then `model.block_size`: e.g. ((1, 1000), (4, 2000))
  with model.block_size=32 is LLaDA2.0's 1 -> 4 -> 32 warm-up. Validation always uses model.block_size.
  """

  t_min: float = 0.0
  t_max: float = 1.0
  weighting: str = "inverse_t"
  complementary: bool = False
  schedule: tuple = ()

  def __post_init__(self):
    s = "block"
    _check_float(s, "t_min", self.t_min, 0.0, 1.0)
    _check_float(s, "t_max", self.t_max, 0.0, 1.0)
    if self.t_max <= self.t_min:
      _fail(f"{s}.t_max", f"greater than block.t_min={self.t_min}", self.t_max)
    _check_choice(s, "weighting", self.weighting, BLOCK_WEIGHTINGS)
    if not isinstance(self.complementary, bool):
      _fail(f"{s}.complementary", "True or False", self.complementary)
    last = 0
    for stage in self.schedule:
      ok = isinstance(stage, tuple) and len(stage) == 2 and all(
          isinstance(v, int) and not isinstance(v, bool) for v in stage)
      if not ok or stage[0] < 1 or stage[1] <= last:
        _fail(f"{s}.schedule", "pairs (block_size >= 1, until_step) with until_step increasing from 1, e.g. "
              "((1, 1000), (4, 2000))", self.schedule)
      last = stage[1]

  def sizes(self, final: int) -> tuple[int, ...]:
    """Every block size a run trains with: the schedule's, then `final` (model.block_size)."""
    return tuple(size for size, _ in self.schedule) + (final,)


PREFERENCE_ESTIMATORS = ("t", "l")


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
  """Preference optimisation (`diffusion.objective` vrpo / ar_dpo; REFERENCE §9). Other objectives ignore it.

  The loss is DPO with each log-likelihood replaced by an ELBO estimate (vrpo) or the exact one (ar_dpo):
  -log sigmoid(beta * [(B_pol(y_w) - B_ref(y_w)) - (B_pol(y_l) - B_ref(y_l))]). VRPO's variance controls:
  `budget` n Monte Carlo samples per ELBO, allocated as (n / n_mask) timesteps x `n_mask` masks each
  (VRPO's optimal allocation is n_mask = 1), and `antithetic`: policy and reference estimate an ELBO from
  the same timesteps and masks. Naive DPO-on-ELBO is budget=1, antithetic=False.
  """

  beta: float = 0.1
  budget: int = 8
  n_mask: int = 1
  antithetic: bool = True
  estimator: str = "t"

  def __post_init__(self):
    s = "preference"
    _check_float(s, "beta", self.beta, 0.0, 1000.0, lo_open=True)
    _check_int(s, "budget", self.budget, 1, 1024)
    _check_int(s, "n_mask", self.n_mask, 1, 1024)
    if self.budget % self.n_mask:
      _fail(f"{s}.n_mask", f"a divisor of preference.budget={self.budget} (budget = timesteps x n_mask)",
            self.n_mask)
    if not isinstance(self.antithetic, bool):
      _fail(f"{s}.antithetic", "True or False", self.antithetic)
    _check_choice(s, "estimator", self.estimator, PREFERENCE_ESTIMATORS)

  @property
  def n_time(self) -> int:
    return self.budget // self.n_mask


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
  """RL with verifiable rewards: diffu-GRPO (d1; REFERENCE §10), `diffusion.objective='grpo'`. Others ignore it.

  One train step: `num_generations` (G) completions of each of `train.batch_size / G` prompts sampled from
  the current policy with the reverse process below; rewards = the sum of the `rewards` functions
  (llada_jax.rewards: registered names or 'package.module:function'); advantages A = r - mean of the
  prompt's group (/ its std with `scale_rewards`); then `inner_iterations` (mu) optimizer updates on those
  rollouts, each with its own one-pass mask (every completion position, prompt tokens with probability
  `p_mask_prompt`) shared by the old, reference and current log-probabilities, minimising the clipped
  ratio loss (`clip_eps`) plus `beta` times the k3 KL to the frozen reference. The reference is the
  starting model (under LoRA: the base with the adapters as they started), replaced by the policy every
  `ref_sync_every` steps (0: never). `optim.*_steps` count optimizer updates: train steps x mu.
  The rollouts' reverse process takes every option of `sampling.SamplingConfig` (held-out evaluation
  runs the same options greedily); a row is `train.seq_len` long: the left-padded prompt, then
  `gen_length` generated tokens. Defaults are d1's GSM8K run.
  """

  num_generations: int = 6
  inner_iterations: int = 12
  clip_eps: float = 0.5
  beta: float = 0.04
  p_mask_prompt: float = 0.15
  scale_rewards: bool = False
  ref_sync_every: int = 64
  rewards: tuple[str, ...] = ("correct", "format")
  gen_length: int = 256
  steps: int = 128
  block_length: int = 32
  temperature: float = 0.9
  cfg_scale: float = 0.0
  remasking: str = "low_confidence"
  threshold: float | None = None
  suppress_eos_logit: bool = False
  suppress_eos_confidence: bool = False
  early_exit: bool = False
  kv_cache: str = "none"

  def __post_init__(self):
    s = "grpo"
    _check_int(s, "num_generations", self.num_generations, 2, 4096)  # one completion has no group to compare
    _check_int(s, "inner_iterations", self.inner_iterations, 1, 1024)
    _check_float(s, "clip_eps", self.clip_eps, 0.0, 1.0, lo_open=True)
    _check_float(s, "beta", self.beta, 0.0, 1000.0)
    _check_float(s, "p_mask_prompt", self.p_mask_prompt, 0.0, 1.0)
    _check_int(s, "ref_sync_every", self.ref_sync_every, 0)
    for name in ("scale_rewards",):
      if not isinstance(getattr(self, name), bool):
        _fail(f"{s}.{name}", "True or False", getattr(self, name))
    if not isinstance(self.rewards, tuple) or not self.rewards or not all(isinstance(r, str) and r for r in self.rewards):
      _fail(f"{s}.rewards", "a non-empty tuple of reward names (llada_jax.rewards) or 'module:function' specs",
            self.rewards)
    from llada_jax import sampling  # the reverse process's own checks, under this section's field names
    try:
      sampling.SamplingConfig(**self.sampling()).validate(1, 1 << 30)
    except (TypeError, ValueError) as e:
      raise ValueError(str(e).replace("sampling option '", f"config field '{s}.")) from None

  def sampling(self, **overrides: Any) -> dict[str, Any]:
    """The rollouts' `sampling.SamplingConfig` fields (with `overrides`, e.g. temperature=0.0 for evaluation);
    the block-model fields (token editing) stay at their defaults: rollouts sample bidirectional models."""
    from llada_jax import sampling  # imported here: sampling imports the model, which imports this module
    return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(sampling.SamplingConfig)
               if hasattr(self, f.name)}, **overrides}


# The projections an adapter can wrap, by their parameter names in the model (llada_jax.model.Block).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_gate", "ff_up", "ff_down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA (REFERENCE §11): `rank` > 0 freezes the parameters of `train.init_from` (the base) and trains
  only low-rank adapters on the `targets` projections: y = x W + scale * dropout(x) A B, A [in, rank]
  random, B [rank, out] zero (step 0 is the base model), scale = alpha / rank (alpha / sqrt(rank) with
  `rslora`). The base weights are held in `base_dtype` ('' = model.param_dtype), the adapters and their
  optimizer state in model.param_dtype; checkpoints store the adapters and a fingerprint of the base.
  The default targets are the four of d1's GRPO runs that exist in LLaDA (q, k, v and the up projection).

  `trainable_tokens` (PEFT's `trainable_token_indices`) also trains the input-embedding row and output-head
  column of a few tokens, e.g. chat-template pieces the base never saw: token ids, or tokenizer pieces
  such as "<|eot_id|>" that a run resolves to ids with its tokenizer before it builds anything
  (`resolve_tokens`; the saved config holds the ids). Those rows start as the base's and replace them.
  """

  rank: int = 0
  alpha: float = 32.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "ff_up")
  rslora: bool = False
  base_dtype: str = ""
  trainable_tokens: tuple[int | str, ...] = ()

  def __post_init__(self):
    s = "lora"
    _check_int(s, "rank", self.rank, 0, 65536)
    _check_float(s, "alpha", self.alpha, 0.0, lo_open=True)
    _check_float(s, "dropout", self.dropout, 0.0, 0.99)
    if (not isinstance(self.targets, tuple) or not self.targets or len(set(self.targets)) != len(self.targets)
        or any(t not in LORA_TARGETS for t in self.targets)):
      _fail(f"{s}.targets", f"a non-empty tuple of distinct names from {LORA_TARGETS}", self.targets)
    if not isinstance(self.rslora, bool):
      _fail(f"{s}.rslora", "True or False", self.rslora)
    if self.base_dtype not in ("",) + _DTYPES:
      _fail(f"{s}.base_dtype", f"'' (model.param_dtype) or one of {_DTYPES}", self.base_dtype)
    tokens = self.trainable_tokens
    if (not isinstance(tokens, tuple) or len(set(tokens)) != len(tokens)
        or not all((isinstance(t, int) and not isinstance(t, bool) and t >= 0) or (isinstance(t, str) and t)
                   for t in tokens)):
      _fail(f"{s}.trainable_tokens", "a tuple of distinct token ids (>= 0) or tokenizer pieces", tokens)
    if tokens and not self.enabled:
      _fail(f"{s}.trainable_tokens", "() unless lora.rank > 0 (token rows train beside the adapters)", tokens)

  @property
  def token_ids(self) -> tuple[int, ...]:
    """`trainable_tokens` as ids; pieces must have been resolved (`resolve_tokens`) first."""
    pieces = [t for t in self.trainable_tokens if isinstance(t, str)]
    if pieces:
      raise ValueError(f"config field 'lora.trainable_tokens' still holds the piece {pieces[0]!r}: resolve it "
                       "with the run's tokenizer (llada_jax.config.resolve_tokens) or give token ids")
    return self.trainable_tokens

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank) if self.rank else 0.0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with a Warmup-Stable-Decay schedule (REFERENCE §6).

  Phases, in steps: linear warmup 0 -> peak_lr; hold peak_lr; `stage2_steps` at
  `peak_lr * stage2_lr_ratio`; linear decay over `decay_steps` to `peak_lr * final_lr_ratio`. The stable
  phase takes whatever `train.num_steps` leaves over.
  """

  peak_lr: float = 4e-4
  warmup_steps: int = 100
  stage2_steps: int = 0
  stage2_lr_ratio: float = 0.25
  decay_steps: int = 0
  final_lr_ratio: float = 0.025
  weight_decay: float = 0.1
  no_decay_patterns: tuple[str, ...] = ("norm", "embedding")
  b1: float = 0.9
  b2: float = 0.95
  adam_eps: float = 1e-8
  grad_clip_norm: float = 1.0
  mu_dtype: str = ""

  def __post_init__(self):
    s = "optim"
    _check_float(s, "peak_lr", self.peak_lr, 0.0, 1.0, lo_open=True)
    for name in ("warmup_steps", "stage2_steps", "decay_steps"):
      _check_int(s, name, getattr(self, name), 0)
    for name in ("stage2_lr_ratio", "final_lr_ratio"):
      _check_float(s, name, getattr(self, name), 0.0, 1.0)
    if self.mu_dtype not in ("",) + _DTYPES:
      _fail(f"{s}.mu_dtype", f"'' (the parameter dtype) or one of {_DTYPES}", self.mu_dtype)
    _check_float(s, "weight_decay", self.weight_decay, 0.0, 10.0)
    for name in ("b1", "b2"):
      _check_float(s, name, getattr(self, name), 0.0, 1.0)
    _check_float(s, "adam_eps", self.adam_eps, 0.0, 1.0, lo_open=True)
    _check_float(s, "grad_clip_norm", self.grad_clip_norm, 0.0)  # 0 disables clipping
    if not all(isinstance(p, str) for p in self.no_decay_patterns):
      _fail(f"{s}.no_decay_patterns", "a tuple of strings", self.no_decay_patterns)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where batches come from.

  Pre-training sources: `procedural` (the built-in corpus, llada_jax.data.corpus), `text` (files; one
  document per line or per file), `jsonl` (one JSON object per line, text in `text_field`),
  `array_record` (records of already tokenized int32 ids) and `tfds` (a prepared TFDS dataset read
  through `tfds.data_source` in array_record format). SFT (`diffusion.objective='sft'`) reads `jsonl`
  conversations or pairs (`sft_format`), or the built-in procedural chat set (`procedural`). Preference
  objectives (vrpo, ar_dpo) read `jsonl` records with `chosen_field`/`rejected_field` responses, as a
  prompt (`sft_format='pairs'`) or a `messages` history ending with the user's turn, or the built-in
  procedural preference set (`procedural`). RL (`diffusion.objective='grpo'`) reads prompts with checkable
  answers: `jsonl` records holding a `messages` history ending with the user's turn or a `prompt_field`
  string, and an `answer` for the rewards, or `task`, the built-in verifiable task about the corpus world
  (llada_jax.data.tasks), whose solutions SFT also reads (`source='task'`) to teach the answer format.
  """

  source: str = "procedural"
  paths: tuple[str, ...] = ()
  eval_paths: tuple[str, ...] = ()
  text_field: str = "text"
  text_unit: str = "line"
  tfds_name: str = ""
  tfds_split: str = "train"
  tfds_eval_split: str = ""
  tfds_data_dir: str = ""
  on_bad_record: str = "error"
  sft_format: str = "messages"
  prompt_field: str = "prompt"
  response_field: str = "response"
  chosen_field: str = "chosen"
  rejected_field: str = "rejected"
  num_documents: int = 20000
  corpus_seed: int = 0
  tokenizer_path: str = ""
  tokenizer_vocab_size: int = 1024
  tokenizer_model_type: str = "bpe"
  tokenizer_train_docs: int = 200000
  shuffle_seed: int = 0
  mp_prefetch_workers: int = 0

  def __post_init__(self):
    s = "data"
    _check_choice(s, "source", self.source, SOURCES)
    if self.source in ("text", "jsonl", "array_record") and not self.paths:
      _fail(f"{s}.paths", f"one or more file paths or globs for data.source='{self.source}'", self.paths)
    for name in ("paths", "eval_paths"):
      if not all(isinstance(p, str) and p for p in getattr(self, name)):
        _fail(f"{s}.{name}", "a tuple of non-empty path strings or globs", getattr(self, name))
    if self.source == "tfds" and not self.tfds_name:
      _fail(f"{s}.tfds_name", "a TFDS dataset name (e.g. 'lm1b') for data.source='tfds'", self.tfds_name)
    _check_choice(s, "text_unit", self.text_unit, ("line", "file"))
    _check_choice(s, "on_bad_record", self.on_bad_record, ("error", "skip"))
    _check_choice(s, "sft_format", self.sft_format, ("messages", "pairs"))
    _check_choice(s, "tokenizer_model_type", self.tokenizer_model_type, ("bpe", "unigram"))
    for name in ("text_field", "prompt_field", "response_field", "chosen_field", "rejected_field", "tfds_split"):
      if not isinstance(getattr(self, name), str) or not getattr(self, name):
        _fail(f"{s}.{name}", "a non-empty string", getattr(self, name))
    _check_int(s, "num_documents", self.num_documents, 1)
    _check_int(s, "corpus_seed", self.corpus_seed, 0)
    _check_int(s, "tokenizer_vocab_size", self.tokenizer_vocab_size, 64)
    _check_int(s, "tokenizer_train_docs", self.tokenizer_train_docs, 1)
    _check_int(s, "shuffle_seed", self.shuffle_seed, 0)
    _check_int(s, "mp_prefetch_workers", self.mp_prefetch_workers, 0, 256)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh ('data', 'fsdp', 'expert', 'tensor'); -1 means "all devices the other axes leave".

  `rule_set` names how logical axis names (on parameters and activations) map to mesh axes; the tables
  live in `llada_jax.sharding.RULE_SETS`:
    dp       batches split over data*fsdp, parameters replicated (small models)
    fsdp     batches over data*fsdp, parameters sharded over fsdp along 'embed' (the default)
    fsdp_tp  fsdp plus heads/mlp/vocab split over 'tensor' (Megatron-style tensor parallelism)
    fsdp_ep  fsdp plus expert parallelism: a mixture-of-experts model's experts split over 'expert', each
             token's assignments sent to their experts' devices by all-to-all; batches over data*fsdp*expert
  `rules` overrides single entries of the named set: pairs (logical_name, mesh axis | tuple | None).
  """

  data: int = 1
  fsdp: int = -1
  expert: int = 1
  tensor: int = 1
  rule_set: str = "fsdp"
  rules: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    sizes = {"data": self.data, "fsdp": self.fsdp, "expert": self.expert, "tensor": self.tensor}
    for name, v in sizes.items():
      if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
        _fail(f"mesh.{name}", "a positive integer or -1 (the rest of the devices)", v)
    if sum(v == -1 for v in sizes.values()) > 1:
      _fail("mesh", "a shape with at most one -1 among data/fsdp/expert/tensor", sizes)
    _check_choice("mesh", "rule_set", self.rule_set, RULE_SETS)
    if self.rule_set != "fsdp_tp" and self.tensor != 1 and not self.rules:
      _fail("mesh.tensor", f"1 with rule_set={self.rule_set!r} (only 'fsdp_tp' splits over 'tensor'; "
            "a larger tensor axis would idle)", self.tensor)
    if self.rule_set != "fsdp_ep" and self.expert != 1 and not self.rules:
      _fail("mesh.expert", f"1 with rule_set={self.rule_set!r} (only 'fsdp_ep' splits over 'expert'; "
            "a larger expert axis would idle)", self.expert)
    known = {"data", "fsdp", "expert", "tensor", None}
    for rule in self.rules:
      if not isinstance(rule, (tuple, list)) or len(rule) != 2 or rule[0] not in LOGICAL_AXES:
        _fail("mesh.rules", f"pairs (logical name from {LOGICAL_AXES}, mesh axis or tuple of mesh axes "
              "or None)", rule)
      targets = rule[1] if isinstance(rule[1], tuple) else (rule[1],)
      if any(t not in known for t in targets):
        _fail("mesh.rules", f"mesh axes from {sorted(k for k in known if k)} or None", rule)

  def axis_sizes(self, num_devices: int) -> tuple[int, int, int, int]:
    """Resolves -1 against `num_devices`; raises if the shape does not match the device count."""
    sizes = [self.data, self.fsdp, self.expert, self.tensor]
    fixed = 1
    for v in sizes:
      fixed *= v if v != -1 else 1
    if -1 in sizes:
      if num_devices % fixed:
        _fail("mesh", f"a shape whose fixed axes divide the {num_devices} devices",
              dict(data=self.data, fsdp=self.fsdp, expert=self.expert, tensor=self.tensor))
      sizes[sizes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
      _fail("mesh", f"a shape with data*fsdp*expert*tensor == {num_devices} (the device count)",
            dict(data=self.data, fsdp=self.fsdp, expert=self.expert, tensor=self.tensor))
    return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The loop: sizes, logging and checkpointing cadence."""

  seed: int = 0
  init_from: str = ""
  batch_size: int = 8
  seq_len: int = 128
  num_steps: int = 1000
  grad_accum_steps: int = 1
  log_every: int = 10
  checkpoint_every: int = 500
  max_to_keep: int = 3
  keep_every: int = 0
  async_checkpointing: bool = True
  num_samples: int = 4
  eval_every: int = 0
  eval_batches: int = 4
  sample_steps: int = 32
  sample_length: int = 32
  skip_nonfinite: bool = True
  max_nonfinite_streak: int = 10

  def __post_init__(self):
    s = "train"
    _check_int(s, "seed", self.seed, 0)
    if not isinstance(self.init_from, str):
      _fail(f"{s}.init_from", "a path (a workdir or its checkpoints/ folder) or ''", self.init_from)
    for name in ("batch_size", "seq_len", "num_steps", "grad_accum_steps", "log_every",
                 "checkpoint_every", "max_to_keep", "sample_steps", "sample_length", "max_nonfinite_streak"):
      _check_int(s, name, getattr(self, name), 1)
    _check_int(s, "num_samples", self.num_samples, 0)
    _check_int(s, "keep_every", self.keep_every, 0)
    _check_int(s, "eval_every", self.eval_every, 0)
    _check_int(s, "eval_batches", self.eval_batches, 1)
    if not isinstance(self.skip_nonfinite, bool):
      _fail(f"{s}.skip_nonfinite", "True or False", self.skip_nonfinite)
    if self.batch_size % self.grad_accum_steps:
      _fail(f"{s}.grad_accum_steps", f"a divisor of train.batch_size={self.batch_size}", self.grad_accum_steps)


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
  preference: PreferenceConfig = dataclasses.field(default_factory=PreferenceConfig)
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
  grpo: GrpoConfig = dataclasses.field(default_factory=GrpoConfig)
  block: BlockConfig = dataclasses.field(default_factory=BlockConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

  def __post_init__(self):
    m, t, o = self.model, self.train, self.optim
    if self.diffusion.mask_token_id >= m.vocab_size:
      _fail("diffusion.mask_token_id", f"an id inside the vocabulary, in [0, {m.vocab_size - 1}]",
            self.diffusion.mask_token_id)
    if t.seq_len > m.max_seq_len:
      _fail("train.seq_len", f"at most model.max_seq_len={m.max_seq_len}", t.seq_len)
    if self.data.tokenizer_vocab_size > m.vocab_size:
      _fail("data.tokenizer_vocab_size", f"at most model.vocab_size={m.vocab_size}",
            self.data.tokenizer_vocab_size)
    objective = _objectives().get(self.diffusion.objective)
    updates = t.num_steps * objective.inner_iterations(self)
    if o.warmup_steps + o.stage2_steps + o.decay_steps > updates:
      what = f"train.num_steps={t.num_steps}" + (f" x grpo.inner_iterations = {updates} optimizer updates"
                                                  if updates != t.num_steps else "")
      _fail("optim.warmup_steps", f"such that warmup+stage2+decay steps <= {what}",
            (o.warmup_steps, o.stage2_steps, o.decay_steps))
    if objective.name == "grpo":
      g = self.grpo
      if t.seq_len <= g.gen_length:
        _fail("train.seq_len", f"more than grpo.gen_length={g.gen_length} (a rollout row is the prompt, then "
              "gen_length generated tokens)", t.seq_len)
      if t.batch_size % g.num_generations:
        _fail("train.batch_size", f"a multiple of grpo.num_generations={g.num_generations} (rows are whole groups "
              "of completions of one prompt)", t.batch_size)
    if objective.causal != m.causal:
      _fail("model.causal", f"{objective.causal} for diffusion.objective={objective.name!r} (causal objectives: "
            f"{[n for n in _objectives().names() if _objectives().get(n).causal]})", m.causal)
    if objective.blocks != bool(m.block_size):
      blocky = [n for n in _objectives().names() if _objectives().get(n).blocks]
      _fail("model.block_size", f"{'> 0' if objective.blocks else '0'} for diffusion.objective={objective.name!r} "
            f"(block-causal models train with {blocky})", m.block_size)
    if objective.blocks:
      if t.seq_len % m.block_size:
        _fail("model.block_size", f"a divisor of train.seq_len={t.seq_len} (a training row is whole blocks)",
              m.block_size)
      if any(t.seq_len % size for size, _ in self.block.schedule):
        _fail("block.schedule", f"stages whose block sizes divide train.seq_len={t.seq_len} (a training row is "
              "whole blocks)", self.block.schedule)
    ffn_targets = [x for x in self.lora.targets if x.startswith("ff_")]
    if self.lora.enabled and m.moe and ffn_targets:
      _fail("lora.targets", f"attention projections only on a mixture-of-experts model (model.num_experts="
            f"{m.num_experts}; adapters on experts are not implemented), e.g. ('q_proj', 'k_proj', 'v_proj', "
            "'attn_out')", self.lora.targets)
    if self.lora.enabled and not t.init_from:
      _fail("train.init_from", "the workdir of the base model when lora.rank > 0 (LoRA adapts a trained "
            "model; its parameters stay frozen)", t.init_from)
    if m.chat is None:  # resolved once, so the checkpoint's config stores the flag
      object.__setattr__(self, "model", dataclasses.replace(m, chat=objective.chat))
    d = self.data
    if t.eval_every and d.source == "tfds" and not d.tfds_eval_split:
      _fail("data.tfds_eval_split", "a held-out TFDS split (e.g. 'validation') when train.eval_every > 0",
            d.tfds_eval_split)
    if t.eval_every and d.source in ("text", "jsonl", "array_record") and not d.eval_paths:
      _fail("data.eval_paths", "held-out files or globs when train.eval_every > 0 (or eval_every=0)",
            d.eval_paths)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_SECTION_TYPES = {
    "model": ModelConfig, "diffusion": DiffusionConfig, "preference": PreferenceConfig, "lora": LoraConfig,
    "grpo": GrpoConfig, "block": BlockConfig, "optim": OptimConfig,
    "data": DataConfig, "mesh": MeshConfig, "train": TrainConfig,
}


def resolve_tokens(config: Config, tok: Any) -> Config:
  """`config` with `lora.trainable_tokens` as ids: pieces looked up in the tokenizer `tok`, every id checked
  against the tokenizer and model.vocab_size. A piece the tokenizer lacks is an error naming it."""
  lora, vocab = config.lora, min(config.model.vocab_size, tok.vocab_size)
  ids = []
  for t in lora.trainable_tokens:
    i = tok.piece_to_id(t) if isinstance(t, str) else t
    if i is None or not 0 <= i < vocab:
      _fail("lora.trainable_tokens", f"token ids below {vocab} or pieces of the run's tokenizer "
            f"({t!r} {'is not one of its pieces' if i is None else 'is out of range'})", lora.trainable_tokens)
    ids.append(i)
  if len(set(ids)) != len(ids):
    _fail("lora.trainable_tokens", "distinct tokens (two entries name the same id)", lora.trainable_tokens)
  return dataclasses.replace(config, lora=dataclasses.replace(lora, trainable_tokens=tuple(ids)))


def stand_in_tokens(config: Config) -> Config:
  """`config` with any `lora.trainable_tokens` pieces replaced by stand-in ids, for plans and benchmarks
  without a tokenizer: shapes, memory and speed depend on how many tokens train, not on which."""
  tokens = config.lora.trainable_tokens
  if not any(isinstance(t, str) for t in tokens):
    return config
  free = iter(i for i in range(config.model.vocab_size) if i not in tokens)
  ids = tuple(next(free) if isinstance(t, str) else t for t in tokens)
  return dataclasses.replace(config, lora=dataclasses.replace(config.lora, trainable_tokens=ids))


def _freeze(value: Any) -> Any:
  """Lists from JSON / ConfigDict become tuples so the dataclasses stay hashable and frozen."""
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def from_config_dict(d: Mapping[str, Any]) -> Config:
  """Builds a validated `Config` from a (possibly nested ml_collections) mapping.

  Unknown sections or fields are errors, not silently ignored: they are usually typos.
  """
  if hasattr(d, "to_dict"):
    d = d.to_dict()
  if not isinstance(d, Mapping):
    raise ValueError(f"a config must be a ConfigDict (or dict) of sections {sorted(_SECTION_TYPES)}; got "
                     f"{type(d).__name__} (does get_config() in the config file return its ConfigDict?)")
  not_sections = sorted(name for name in _SECTION_TYPES if not isinstance(d.get(name, {}), Mapping))
  if not_sections:
    raise ValueError(f"config section '{not_sections[0]}' must be a ConfigDict (or dict) of fields; got "
                     f"{d[not_sections[0]]!r}")
  unknown = set(d) - set(_SECTION_TYPES)
  if unknown:
    raise ValueError(f"unknown config section(s) {sorted(unknown)}; known: {sorted(_SECTION_TYPES)}")
  return Config(**{name: section_from_dict(name, d.get(name, {})) for name in _SECTION_TYPES})


def section_from_dict(name: str, values: Mapping[str, Any]) -> Any:
  """One validated section (e.g. 'model' -> ModelConfig) from its fields; unknown fields are errors."""
  cls = _SECTION_TYPES[name]
  values = dict(values)
  names = {f.name for f in dataclasses.fields(cls)}
  bad = set(values) - names
  if bad:
    raise ValueError(f"unknown config field(s) {sorted(f'{name}.{b}' for b in bad)}; "
                     f"known fields of '{name}': {sorted(names)}")
  return cls(**{k: _freeze(v) for k, v in values.items()})


def saved_model_config(saved: Mapping[str, Any]) -> ModelConfig:
  """The `model` section of a checkpoint's saved config, `chat` resolved: written by training (any
  objective) and by llada-convert. Checkpoints saved before `model.chat` existed store None there, and
  get what their objective trains, as when they were written."""
  model = section_from_dict("model", saved.get("model", {}))
  if model.chat is None:
    objective = _objectives().get(saved.get("diffusion", {}).get("objective", DiffusionConfig.objective))
    model = dataclasses.replace(model, chat=objective.chat)
  return model


def from_json(text: str) -> Config:
  return from_config_dict(json.loads(text))
