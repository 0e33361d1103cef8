"""LoRA adapters as PEFT files, both ways (REFERENCE §11): what `llada-export --adapter` writes and
`llada-convert --adapter` reads.

A PEFT LoRA folder holds `adapter_model.safetensors` (metadata format "pt") with, per layer i and
adapted module, `base_model.model.model.transformer.blocks.{i}.{module}.lora_A.weight` [r, in] and
`...lora_B.weight` [out, r], under the released LLaDA module names (q_proj, k_proj, v_proj, attn_out,
ff_proj = our ff_gate, up_proj = ff_up, ff_out = ff_down), and `adapter_config.json` (peft_type LORA, r,
lora_alpha, target_modules, ...). Our adapters keep the model's kernel layout, A [in..., r] and
B [r, out...]: a PEFT matrix is ours flattened and transposed, so the round trip is exact.

Trainable token rows (lora.trainable_tokens) are PEFT's `trainable_token_indices` on both the input
embedding and the untied output head, `{"wte": ids, "ff_out": ids}`, stored as
`base_model.model.model.transformer.{wte,ff_out}.token_adapter.trainable_tokens_delta` [n, d_model]: the
rows themselves (PEFT writes them over the base's rows; "delta" is only its name).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from llada_jax import checkpoint as ckpt_lib, files, hf, lora as lora_lib, serving, sharding
from llada_jax.config import LORA_TARGETS, LoraConfig, MeshConfig, ModelConfig, saved_model_config
from llada_jax.config import section_from_dict
from llada_jax.data import tokenizer as tokenizer_lib

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model.model.transformer.blocks."
HF_MODULE = {ours: theirs for ours, theirs, _ in hf.BLOCK if ours in LORA_TARGETS}
OURS = {theirs: ours for ours, theirs in HF_MODULE.items()}
TOKEN_MODULE = {"embedding": "wte", "lm_head": "ff_out"}  # our token-row leaf -> the released module
TOKEN_TENSOR = {ours: f"base_model.model.model.transformer.{theirs}.token_adapter.trainable_tokens_delta"
                for ours, theirs in TOKEN_MODULE.items()}


def tensor_names(m: ModelConfig, lora: LoraConfig) -> dict[str, tuple[int, ...]]:
  """Every PEFT tensor of adapters `lora` on a model `m`: name -> [r, in] or [out, r] shape."""
  out = {}
  for i in range(m.num_layers):
    for target, s in lora_lib.shapes(m, lora).items():  # A [layers, in..., r], B [layers, r, out...]
      fan_in, fan_out = int(np.prod(s["lora_a"][1:-1])), int(np.prod(s["lora_b"][2:]))
      stem = f"{PREFIX}{i}.{HF_MODULE[target]}"
      out[f"{stem}.lora_A.weight"] = (lora.rank, fan_in)
      out[f"{stem}.lora_B.weight"] = (fan_out, lora.rank)
  for leaf in lora_lib.token_shapes(m, lora):
    out[TOKEN_TENSOR[leaf]] = (len(lora.token_ids), m.d_model)
  return out


def to_peft(adapters: Any, m: ModelConfig, lora: LoraConfig) -> dict[str, np.ndarray]:
  """Our (host) adapters -> PEFT tensors by name."""
  out = {}
  for target in lora.targets:
    a, b = (np.asarray(jax.device_get(adapters["blocks"][target][k])) for k in ("lora_a", "lora_b"))
    for i in range(m.num_layers):
      stem = f"{PREFIX}{i}.{HF_MODULE[target]}"
      out[f"{stem}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, lora.rank).T)
      out[f"{stem}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(lora.rank, -1).T)
  if lora.token_ids:
    rows = jax.device_get(adapters["tokens"])
    out[TOKEN_TENSOR["embedding"]] = np.ascontiguousarray(rows["embedding"])
    if "lm_head" in rows:  # tied embeddings: the head reads the embedding rows
      out[TOKEN_TENSOR["lm_head"]] = np.ascontiguousarray(np.asarray(rows["lm_head"]).T)  # ff_out rows [n, D]
  return out


def from_peft(tensors: dict[str, np.ndarray], m: ModelConfig, lora: LoraConfig) -> dict:
  """PEFT tensors by name -> our adapters (numpy), every layer stacked."""
  shapes = lora_lib.shapes(m, lora)
  out = {}
  for target in lora.targets:
    stem = lambda i: f"{PREFIX}{i}.{HF_MODULE[target]}"
    a = [tensors[f"{stem(i)}.lora_A.weight"].T.reshape(shapes[target]["lora_a"][1:]) for i in range(m.num_layers)]
    b = [tensors[f"{stem(i)}.lora_B.weight"].T.reshape(shapes[target]["lora_b"][1:]) for i in range(m.num_layers)]
    out[target] = {"lora_a": np.stack(a), "lora_b": np.stack(b)}
  tree = {"blocks": out}
  if lora.token_ids:
    tree["tokens"] = {"embedding": tensors[TOKEN_TENSOR["embedding"]]}
    if not m.tie_embeddings:
      tree["tokens"]["lm_head"] = tensors[TOKEN_TENSOR["lm_head"]].T
  return tree


def adapter_config(lora: LoraConfig, base_model: str) -> dict[str, Any]:
  """PEFT's adapter_config.json for `lora`."""
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
          "lora_dropout": lora.dropout, "target_modules": [HF_MODULE[t] for t in lora.targets], "bias": "none",
          "fan_in_fan_out": False, "use_rslora": lora.rslora, "use_dora": False, "modules_to_save": None,
          "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
          "inference_mode": True, "base_model_name_or_path": base_model, "revision": None,
          "trainable_token_indices": ({m: list(lora.token_ids) for m in TOKEN_MODULE.values()}
                                      if lora.token_ids else None)}


def lora_config_from_peft(cfg: dict[str, Any], where: str) -> LoraConfig:
  """Our LoraConfig from adapter_config.json; settings our adapters cannot express are refused by name."""
  def need(key):
    if key not in cfg:
      raise ValueError(f"{where} lacks the key '{key}'")
    return cfg[key]

  if need("peft_type") != "LORA":
    raise ValueError(f"{where}: peft_type {cfg['peft_type']!r} is not supported (only 'LORA')")
  unsupported = {"bias": "none", "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None,
                 "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
  for key, plain in unsupported.items():
    if cfg.get(key, plain) not in (plain, None, [], {}):
      raise ValueError(f"{where}: {key}={cfg[key]!r} is not supported by llada_jax's LoRA (needs {plain!r})")
  modules = need("target_modules")
  if modules == "all-linear":
    modules = list(HF_MODULE.values())
  if isinstance(modules, str) or not all(m in OURS for m in modules):
    raise ValueError(f"{where}: target_modules={modules!r} must list LLaDA module names from "
                     f"{sorted(OURS)} (or be 'all-linear')")
  targets = tuple(t for t in LORA_TARGETS if HF_MODULE[t] in modules)  # our order
  indices = cfg.get("trainable_token_indices") or {}
  token_modules = sorted(TOKEN_MODULE.values())
  if (not isinstance(indices, dict) or (indices and sorted(indices) != token_modules)
      or len({tuple(v) for v in indices.values()}) > 1):
    raise ValueError(f"{where}: trainable_token_indices={indices!r} is not supported: llada_jax trains a token's "
                     f"embedding row and output-head row together, so it needs the same ids for both "
                     f"{token_modules}, as {{'wte': ids, 'ff_out': ids}}")
  try:
    return LoraConfig(rank=need("r"), alpha=float(need("lora_alpha")), dropout=float(cfg.get("lora_dropout", 0.0)),
                      targets=targets, rslora=bool(cfg.get("use_rslora", False)),
                      trainable_tokens=tuple(indices.get("wte", ())))
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e


def _lora_step(workdir: str, step: int | None) -> tuple[ckpt_lib.Checkpointer, int, dict[str, Any]]:
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  step = ckpt.latest_step() if step is None else step
  if step is None or step not in ckpt.all_steps():
    ckpt.close()
    raise FileNotFoundError(f"no checkpoint {'' if step is None else f'step {step} '}in {ckpt.directory}")
  return ckpt, step, ckpt.restore_config(step)


def export_adapter(workdir: str, out_dir: str, *, step: int | None = None, dtype: str = "keep") -> list[str]:
  """Writes a LoRA workdir's adapters as a PEFT folder (adapter_model.safetensors, adapter_config.json);
  returns the file names. `dtype` casts the tensors ('keep': the adapters' own)."""
  if dtype not in hf.DTYPES:
    raise ValueError(f"dtype must be one of {hf.DTYPES}; got {dtype!r}")
  out = files.path(out_dir)
  if out.exists() and any(out.iterdir()):
    raise FileExistsError(f"{out} is not empty; export into a new directory")
  ckpt, step, saved = _lora_step(workdir, step)
  try:
    lora = section_from_dict("lora", saved.get("lora", {}))
    if not lora.enabled:
      raise ValueError(f"--adapter: {workdir} holds no LoRA adapters (its lora.rank is 0); export its weights "
                       "without --adapter")
    model_cfg = saved_model_config(saved)
    if model_cfg.moe:
      raise ValueError(f"--adapter: {workdir} adapts a mixture-of-experts model; PEFT adapter files are written "
                       "for the dense LLaDA layout only. Export the merged model instead (--merge)")
    mesh_cfg, mesh = sharding.make_mesh_or_fallback(section_from_dict("mesh", saved.get("mesh", {})))
    adapters = serving.restore_adapters(ckpt, step, model_cfg, lora, mesh_cfg, mesh)
    record = ckpt.base_record(step) or {}
  finally:
    ckpt.close()
  tensors = to_peft(adapters, model_cfg, lora)
  if dtype != "keep":
    tensors = {k: v.astype(jax.numpy.dtype(dtype)) for k, v in tensors.items()}
  base = saved.get("train", {}).get("init_from") or record.get("path", "")
  hf_config = files.path(base, hf.HF_CONFIG_COPY) if base else None
  if hf_config is not None and hf_config.exists():  # a converted base: name what it was converted from
    base = json.loads(hf_config.read_text()).get("_name_or_path") or base
  out.mkdir(parents=True, exist_ok=True)
  save_file = hf.safetensors_module().numpy.save_file
  files.write_atomic_with(out / ADAPTER_FILE, lambda local: save_file(tensors, local, metadata={"format": "pt"}))
  files.write_atomic(out / CONFIG_FILE, json.dumps(adapter_config(lora, base), indent=2, sort_keys=True) + "\n")
  return [ADAPTER_FILE, CONFIG_FILE]


def import_adapter(adapter_dir: str, base_workdir: str, out_workdir: str,
                   mesh: MeshConfig = MeshConfig(), chat: bool | None = None) -> tuple[LoraConfig, dict[str, Any]]:
  """Writes a PEFT LoRA folder as a llada_jax LoRA workdir over `base_workdir` (a training or converted
  workdir of the model the adapter was made for): an Orbax step 0 holding the adapters, the base's
  record (path, step, fingerprint), a config with the `lora` section and `train.init_from` = the base,
  and the base's tokenizer. `llada-sample` / `llada-chat` / `llada-export --merge` then read it. `chat`
  marks the adapted model a chat model (prompts get the template: an SFT adapter over a base model);
  None keeps the base's flag.
  Every tensor's name and shape is checked before anything is written. Returns (lora, base record)."""
  folder = files.path(adapter_dir)
  config_path, weights_path = folder / CONFIG_FILE, folder / ADAPTER_FILE
  for path in (config_path, weights_path):
    if not path.exists():
      raise FileNotFoundError(f"PEFT adapter folder {folder} lacks {path.name} (it needs {CONFIG_FILE} and "
                              f"{ADAPTER_FILE}; a .bin adapter must be re-saved with safe_serialization=True)")
  try:
    peft_cfg = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path} is not valid JSON: {e}") from e
  lora = lora_config_from_peft(peft_cfg, os.fspath(config_path))
  target = files.path(out_workdir, ckpt_lib.CHECKPOINT_DIR)
  if target.exists() and any(target.iterdir()):
    raise FileExistsError(f"{target} already holds checkpoints; convert into a new --out")
  base_ckpt, base_step, base_saved = _lora_step(base_workdir, None)
  try:
    base_fingerprint = base_ckpt.fingerprint(base_step)
  finally:
    base_ckpt.close()
  model_cfg = saved_model_config(base_saved)
  if chat is not None:
    model_cfg = dataclasses.replace(model_cfg, chat=chat)
  beyond = [i for i in lora.token_ids if i >= model_cfg.vocab_size]
  if beyond:
    raise ValueError(f"{config_path}: trainable_token_indices holds id {beyond[0]}, beyond the vocabulary of "
                     f"{model_cfg.vocab_size} of the base model in {base_workdir}")
  expected = tensor_names(model_cfg, lora)
  with hf.safetensors_module().safe_open(os.fspath(weights_path), framework="numpy") as f:
    found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    missing = sorted(set(expected) - set(found))
    if missing:
      raise ValueError(f"{weights_path} lacks tensor '{missing[0]}' ({len(missing)} missing) that r={lora.rank} on "
                       f"{list(lora.targets)} over the {model_cfg.num_layers}-layer base in {base_workdir} needs")
    extra = sorted(set(found) - set(expected))
    if extra:
      raise ValueError(f"{weights_path} has tensor '{extra[0]}' ({len(extra)} unexpected) that adapter_config.json "
                       f"and the base model in {base_workdir} do not account for")
    for name, shape in expected.items():
      if found[name] != shape:
        raise ValueError(f"tensor '{name}' in {weights_path} has shape {list(found[name])}; the base model in "
                         f"{base_workdir} with r={lora.rank} implies {list(shape)}")
    adapters = from_peft({name: f.get_tensor(name) for name in expected}, model_cfg, lora)
  adapters = jax.tree.map(lambda x: x.astype(np.dtype(jax.numpy.dtype(model_cfg.param_dtype))), adapters)
  base_dir = os.fspath(files.path(base_workdir))
  record = {"path": base_dir, "step": base_step, "fingerprint": base_fingerprint}
  saved = {"model": dataclasses.asdict(model_cfg),
           "diffusion": {"mask_token_id": base_saved["diffusion"]["mask_token_id"]},
           "mesh": base_saved.get("mesh") or dataclasses.asdict(mesh), "lora": dataclasses.asdict(lora),
           "train": {"init_from": base_dir}}
  tokenizer_lib.load(base_workdir).save_dir(files.path(out_workdir))
  files.write_atomic(files.path(out_workdir, "config.json"), json.dumps(saved, indent=2, sort_keys=True))
  ckpt = ckpt_lib.Checkpointer(os.fspath(out_workdir), async_save=False)
  ckpt.save(0, {"params": adapters}, data_iterator=None, config=saved, force=True, base=record)
  ckpt.wait()
  ckpt.close()
  return lora, record

