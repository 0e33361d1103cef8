"""A trained model ready to sample from: load it from a workdir, complete prompts, chat.

Used by `llada-sample`, `llada-chat` and notebooks:

  model = serving.load("/tmp/llada_demo")
  print(model.complete(["the capital of"], gen_length=32, steps=32, block_length=32)[0].text)
  chat = serving.ChatSession(model); chat.send("what is 3 plus 4?")

A causal workdir (the autoregressive baseline, `model.causal=True`) loads the same way; `complete`
then samples it left to right (`causal_sampling.generate_causal`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from llada_jax import causal_sampling, checkpoint as ckpt_lib, files, lora as lora_lib, model as model_lib
from llada_jax import sampling, sharding
from llada_jax.config import LoraConfig, MeshConfig, ModelConfig, saved_model_config, section_from_dict
from llada_jax.data import sft, tokenizer as tokenizer_lib


@dataclasses.dataclass
class Completion:
  prompt: str
  token_ids: list[int]       # generated ids, up to (not including) the first EOS / end-of-turn
  text: str
  steps: int                 # reverse-process steps this row took (causal models: tokens generated)
  commit_step: list[int]     # step at which each generated position was committed (for visualising)
  raw_ids: list[int]         # every generated position, EOS padding included


@dataclasses.dataclass
class LoadedModel:
  """What inference needs, and nothing of training: the model's config, its parameters (placed on this
  process's devices), the tokenizer, the mask id, whether it is a chat model (`model.chat` of the
  checkpoint's config, set by SFT and by llada-convert) and the checkpoint step it came from."""

  model_config: ModelConfig
  graphdef: nnx.GraphDef
  params: Any
  tokenizer: Any
  mask_id: int
  chat: bool
  step: int

  @classmethod
  def from_params(cls, model_config: ModelConfig, graphdef: nnx.GraphDef, params: Any, tokenizer: Any, *,
                  mask_id: int, step: int) -> "LoadedModel":
    """Parameters in memory (e.g. at the end of a training run); `model_config.chat` must be resolved
    (a `Config` resolves it)."""
    if model_config.chat is None:
      raise ValueError("model_config.chat is None: build it through config.Config, which resolves it")
    return cls(model_config, graphdef, params, tokenizer, mask_id, model_config.chat, step)

  def encode_prompt(self, text: str, chat: bool | None = None) -> list[int]:
    """Chat models get the chat template with a generation prompt; base models start a document."""
    tok = self.tokenizer
    if self.chat if chat is None else chat:
      return sft.render_prompt([{"role": "user", "content": text}], tok)
    return [tok.eos_id] + tok.encode(text)

  @property
  def is_causal(self) -> bool:
    return self.model_config.causal

  @property
  def block_size(self) -> int:
    """The block size of a block-diffusion model (sampled by `sampling.generate_blocks`); 0 otherwise."""
    return self.model_config.block_size

  def check_options(self, cfg: sampling.SamplingConfig, prompt_length: int, padded_length: int) -> None:
    """`cfg` checked for this model's sampler (errors.OptionError naming the option), before compiling."""
    L = self.model_config.max_seq_len
    if self.block_size:
      cfg.validate_blocks(self.block_size, prompt_length, L, padded_length)
    else:
      cfg.validate(prompt_length, L, padded_length)

  def generate_ids(self, prompts: Sequence[Sequence[int]], *, seed: int = 0, rng: jax.Array | None = None,
                   width: int | None = None, observe=None, **options: Any) -> sampling.GenerateOutput:
    """`sampling.generate` for a diffusion model, `sampling.generate_blocks` for a block-diffusion one
    (`block_size` > 0; block_length and steps default to its block size), `causal_sampling.generate_causal`
    for a causal one.

    Row r draws its random numbers from `fold_in(key(seed), r)` alone, or from `rng` (one key, or one
    per row: `sampling.row_keys`) when given. `width` left-pads the prompts wider than the longest (a
    server's bucket; a row's output does not depend on it beyond float rounding). `observe(step, x_BL)`
    is called on the host after every reverse-process step (diffusion models only).

    A causal model takes `gen_length`, `temperature` and `suppress_eos_logit`. It ignores `steps` and
    `block_length` (left to right is one token per step; ignoring them lets one call site, such as
    `llada-sample`, serve both kinds), and rejects every other reverse-process option set away from
    its default (e.g. `remasking='random'`), with a ValueError naming it.
    """
    tokens, valid = sampling.left_pad(prompts, self.tokenizer.pad_id, width)
    common = dict(eos_id=self.tokenizer.eos_id, eot_id=self.tokenizer.piece_to_id(tokenizer_lib.EOT),
                  rng=jax.random.key(seed) if rng is None else rng, max_seq_len=self.model_config.max_seq_len)
    if self.is_causal:
      if observe is not None:
        raise ValueError("observe: a causal model samples left to right, with no reverse process to observe")
      return causal_sampling.generate_causal(self.graphdef, self.params, tokens, valid,
                                             mask_id=self.mask_id,
                                             **_causal_options(options), **common)
    if self.block_size:  # the model's own blocks, steps per block, unless the caller says otherwise
      return sampling.generate_blocks(self.graphdef, self.params, tokens, valid, block_size=self.block_size,
                                      mask_id=self.mask_id, observe=observe, **options, **common)
    return sampling.generate(self.graphdef, self.params, tokens, valid,
                             mask_id=self.mask_id, observe=observe, **options, **common)

  def complete(self, prompts: Sequence[str], *, chat: bool | None = None, seed: int = 0,
               prompt_ids: Sequence[Sequence[int]] | None = None, **options: Any) -> list[Completion]:
    """Completes text prompts with `sampling.generate` options. With `prompt_ids` those ids are the
    prompts and `prompts` (if given) is only what each completion shows as its prompt."""
    tok = self.tokenizer
    ids = list(prompt_ids) if prompt_ids is not None else [self.encode_prompt(p, chat) for p in prompts]
    shown = list(prompts) if prompts else [tok.decode(p) for p in ids]
    out = jax.device_get(self.generate_ids(ids, seed=seed, **options))
    width = max(len(p) for p in ids)
    stops = tokenizer_lib.stop_ids(tok)
    results = []
    for row, text in enumerate(shown):
      raw = [int(i) for i in np.asarray(out.tokens_BL[row, width:])]
      kept = sampling.strip_at_stop(raw, stops)
      results.append(Completion(text, kept, decode_generated(tok, kept), int(out.steps_B[row]),
                                [int(s) for s in np.asarray(out.commit_step_BL[row, width:])], raw))
    return results


def decode_generated(tok: Any, ids: Sequence[int]) -> str:
  """Text of generated ids. An id past the tokenizer's vocabulary (a padding row of the embedding that
  no text maps to, e.g. ids 126349..126463 of the released 8B model, which a model can still pick) shows
  as U+FFFD instead of failing the whole decode."""
  out, run = [], []
  for i in ids:
    if 0 <= int(i) < tok.vocab_size:
      run.append(int(i))
      continue
    out.append(tok.decode(run) + "\ufffd")
    run = []
  return "".join(out) + tok.decode(run)


_CAUSAL_OPTIONS = ("gen_length", "temperature", "suppress_eos_logit")
_IGNORED_BY_CAUSAL = ("steps", "block_length")


def _causal_options(options: dict[str, Any]) -> dict[str, Any]:
  """The options a left-to-right sampler honours; a reverse-process-only option set away from its
  default is an error rather than silently dropped."""
  defaults = {f.name: f.default for f in dataclasses.fields(sampling.SamplingConfig)}
  for name, value in options.items():
    if name in defaults and name not in _CAUSAL_OPTIONS + _IGNORED_BY_CAUSAL and value != defaults[name]:
      raise ValueError(f"sampling option '{name}'={value!r} applies to the diffusion sampler only; this "
                       f"model is causal (model.causal=True) and samples left to right")
  kept = {k: v for k, v in options.items() if k not in defaults or k in _CAUSAL_OPTIONS}
  return {"gen_length": defaults["gen_length"], **kept}


def load(workdir: str, step: int | None = None) -> LoadedModel:
  """Parameters (no optimizer state), model config, mask id, chat flag and tokenizer of a workdir (a
  training run's or a conversion's). Only the `model`, `diffusion.mask_token_id` and `mesh` entries of
  the checkpoint's config are read.

  Layers are unrolled for sampling on accelerators (faster per step; the parameter layout is the same), and
  a mixture-of-experts model routes dropless (`model.capacity_factor` is a training setting).
  A LoRA run's workdir loads its base model (`train.init_from`, checked against the fingerprint its
  checkpoint records) with the adapters merged in.
  """
  if not files.is_remote(workdir) and not files.path(workdir).exists():
    raise FileNotFoundError(f"workdir {workdir} does not exist: give the --workdir of a training run "
                            "(llada-train) or of a conversion (llada-convert)")
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:  # closed on the error paths too
    if step is None:
      step = ckpt.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train first (llada-train --workdir=...)")
    elif step not in ckpt.all_steps():
      raise FileNotFoundError(f"no checkpoint step {step} in {ckpt.directory}; available steps: "
                              f"{sorted(ckpt.all_steps())} (leave out --step for the latest)")
    saved = ckpt.restore_config(step)
    # Inference is dropless: with a capacity factor a token's experts would depend on its batch companions.
    model_cfg = dataclasses.replace(saved_model_config(saved), scan_layers=jax.default_backend() == "cpu",
                                    capacity_factor=0.0)
    mask_id = section_from_dict("diffusion", saved.get("diffusion", {})).mask_token_id
    if not 0 <= mask_id < model_cfg.vocab_size:
      raise ValueError(f"the checkpoint config in {ckpt.directory} has diffusion.mask_token_id={mask_id}, outside "
                       f"its vocabulary of {model_cfg.vocab_size}")
    graphdef, abstract = model_lib.abstract_model(model_cfg)
    mesh_cfg = section_from_dict("mesh", saved.get("mesh", {}))
    mesh_cfg, mesh = sharding.make_mesh_or_fallback(mesh_cfg)
    shardings = sharding.tree_shardings(sharding.param_logical_axes(abstract), mesh_cfg, mesh)
    abstract_params = ckpt_lib.abstract_like(nnx.to_pure_dict(abstract), shardings)
    lora = section_from_dict("lora", saved.get("lora", {}))
    if lora.enabled:
      # Merged once: sampling then runs the plain model, as fast as the base.
      adapters = restore_adapters(ckpt, step, model_cfg, lora, mesh_cfg, mesh)
      base = restore_lora_base(ckpt, step, saved, abstract_params, lora)
      params = jax.jit(lambda b, a: lora_lib.merge(b, a, lora), out_shardings=shardings)(base, adapters)
    else:
      params = ckpt.restore_params(step, abstract_params)
  finally:
    ckpt.close()
  tokenizer = tokenizer_lib.load(workdir)  # whichever kind the run kept: tokenizer.model or tokenizer.json
  return LoadedModel(model_cfg, graphdef, params, tokenizer, mask_id, model_cfg.chat, step)


def restore_adapters(ckpt: ckpt_lib.Checkpointer, step: int, model_cfg: ModelConfig, lora: LoraConfig,
                     mesh_cfg: MeshConfig, mesh: jax.sharding.Mesh) -> Any:
  """The LoRA adapters a step of a LoRA run (or an imported PEFT adapter) holds, placed on `mesh`."""
  shardings = sharding.tree_shardings(lora_lib.logical_axes(model_cfg, lora), mesh_cfg, mesh)
  return ckpt.restore_params(step, ckpt_lib.abstract_like(lora_lib.abstract(model_cfg, lora), shardings))


def restore_lora_base(ckpt: ckpt_lib.Checkpointer, step: int, saved: dict[str, Any], abstract_params: Any,
                      lora: LoraConfig) -> Any:
  """The base model a LoRA step's adapters were trained on, in lora.base_dtype: the step its checkpoint
  records, read from the saved `train.init_from` (or the recorded path), refused if its fingerprint
  differs from the recorded one."""
  record = ckpt.base_record(step)
  if record is None:
    raise ValueError(f"checkpoint step {step} in {ckpt.directory} holds LoRA adapters but no record of their "
                     "base model")
  dtype = jax.numpy.dtype(lora.base_dtype) if lora.base_dtype else None
  if dtype is not None:
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding),
                                   abstract_params)
  path = saved.get("train", {}).get("init_from") or record["path"]
  base, _ = ckpt_lib.restore_base(path, abstract_params, expected=record,
                                  label=f"the base model of the LoRA checkpoint {ckpt.directory}")
  return base


class ChatSession:
  """Multi-turn chat: the history (previous answers, EOS removed) is fed back each turn."""

  def __init__(self, model: LoadedModel, system: str | None = None, **options: Any):
    self.model, self.options = model, options
    self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

  def send(self, text: str, **options: Any) -> Completion:
    self.messages.append({"role": "user", "content": text})
    ids = sft.render_prompt(self.messages, self.model.tokenizer)
    reply = self.model.complete([text], prompt_ids=[ids], **{**self.options, **options})[0]
    self.messages.append({"role": "assistant", "content": reply.text})
    return reply
