"""Hugging Face checkpoints of the LLaDA family (REFERENCE §1, §12, §13), in and out, offline.

  model = hf.load("/models/LLaDA-8B-Instruct")                # sharded, ready to sample (a notebook)
  hf.import_checkpoint("/models/LLaDA-8B-Instruct", "/ckpt/llada8b")   # what `llada-convert` runs
  hf.export_checkpoint("/ckpt/my_run", "/models/my_llada")             # what `llada-export` runs

Two layouts (llada_jax.hf_layouts), chosen by config.json's keys on import and by the model on export:
the dense one of LLaDA and iLLaDA (`modeling_llada.py`; tied embeddings allowed) and LLaDA-MoE's
(`modeling_lladamoe.py`). A HF directory holds `config.json`, one or many `*.safetensors` files (with or
without `model.safetensors.index.json`) and the tokenizer files. Only safetensors are read: a pickle
checkpoint (`*.bin`) is refused, since unpickling can run code. Every tensor's name and shape is checked
against the config from the file headers before any weight is read. Import streams one HF tensor at a
time into the target sharding (a stacked leaf is filled slice by slice on the devices: per layer, or per
layer and expert), so host memory holds one tensor beyond what the devices hold. PyTorch `[out, in]`
matrices become our `[in, ...]` kernels by a transpose and a reshape; both directions are exact, so
import -> export is bit-exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax import checkpoint as ckpt_lib, files, hf_layouts, model as model_lib, serving, sharding
from llada_jax.config import MeshConfig, ModelConfig
from llada_jax.data import tokenizer as tokenizer_lib

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
HF_CONFIG_COPY = "hf_config.json"  # the imported config.json, kept in the workdir for a faithful export
DTYPES = ("keep", "float32", "bfloat16", "float16")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# The layouts (config.json keys, tensor names and shapes) live in llada_jax.hf_layouts; llada_jax.peft
# names its LoRA modules from the dense block's table.
BLOCK = hf_layouts.BLOCK
Tensor = hf_layouts.Tensor
layout = hf_layouts.layout
model_config_from_hf = hf_layouts.model_config_from_hf
hf_config_from_model = hf_layouts.hf_config_from_model


def _leaf(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


# ---------------------------------------------------------------------------------------------------------
# Reading a HF directory


def safetensors_module():
  try:
    import safetensors  # pylint: disable=g-import-not-at-top
    import safetensors.numpy  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ImportError("reading or writing Hugging Face checkpoints needs safetensors: "
                      "pip install 'llada_jax[hf]'") from e
  return safetensors


class HFDirectory:
  """A validated view of a HF checkpoint directory: config, and where each tensor lives (headers only)."""

  def __init__(self, path: str | os.PathLike):
    self.path = files.path(path)
    if not self.path.is_dir():
      raise FileNotFoundError(f"Hugging Face checkpoint directory not found: {self.path} (a local folder with "
                              "config.json, *.safetensors and the tokenizer files; nothing is downloaded)")
    config_path = self.path / CONFIG_FILE
    if not config_path.exists():
      raise FileNotFoundError(f"{config_path} not found: a Hugging Face checkpoint needs its config.json")
    try:
      self.config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    self.tensors = self._scan()  # name -> (file, shape, dtype)

  def _weight_files(self) -> list[str]:
    names = sorted(p.name for p in self.path.iterdir())
    st = [n for n in names if n.endswith(".safetensors")]
    pickles = [n for n in names if n.endswith(_PICKLE_SUFFIXES)]
    index = self.path / INDEX_FILE
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is not a safetensors index (JSON with a 'weight_map'): {e}") from e
      listed = sorted(set(weight_map.values()))
      missing = [n for n in listed if n not in names]
      if missing:
        raise FileNotFoundError(f"{index} names weight files that are not in {self.path}: {missing}")
      return listed
    if st:
      return st
    if pickles:
      raise ValueError(
          f"{self.path} holds PyTorch pickle weights ({', '.join(pickles[:3])}) and no *.safetensors; "
          "llada_jax never unpickles (loading a pickle can run arbitrary code). Convert them once, in an "
          "environment you trust: transformers' model.save_pretrained(dir, safe_serialization=True), or "
          "safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors', "
          "metadata={'format': 'pt'}).")
    raise FileNotFoundError(f"no *.safetensors weight files in {self.path}: a Hugging Face checkpoint folder "
                            "holds config.json, model*.safetensors and the tokenizer files")

  def _scan(self) -> dict[str, tuple[str, tuple[int, ...], str]]:
    safetensors = safetensors_module()
    out: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for name in self._weight_files():
      path = os.fspath(self.path / name)
      try:
        with safetensors.safe_open(path, framework="numpy") as f:
          for key in f.keys():
            if key in out:
              raise ValueError(f"tensor '{key}' appears in both {out[key][0]} and {name}")
            piece = f.get_slice(key)
            out[key] = (name, tuple(piece.get_shape()), piece.get_dtype())
      except (OSError, safetensors.SafetensorError) as e:  # a truncated or corrupt file
        raise ValueError(f"{path} is not a readable safetensors file ({e}): it is truncated or corrupt; "
                         "copy or download it again") from e
    return out

  def check(self, m: ModelConfig) -> list[Tensor]:
    """The layout of `m`, after checking every tensor's presence and shape against the files."""
    expected = layout(m)
    names = {t.name for t in expected}
    missing = [t.name for t in expected if t.name not in self.tensors]
    if missing:
      raise ValueError(f"{self.path} lacks {len(missing)} tensor(s) the config needs, e.g. "
                       f"{', '.join(missing[:3])}: a weight file is incomplete, or config.json is another "
                       "model's")
    extra = sorted(set(self.tensors) - names)
    if extra:
      raise ValueError(f"{self.path} holds tensor(s) the LLaDA layout does not have, e.g. "
                       f"{', '.join(extra[:3])}: a different architecture?")
    for t in expected:
      file, shape, _ = self.tensors[t.name]
      if shape != t.shape:
        raise ValueError(f"tensor '{t.name}' in {file} has shape {list(shape)}; config.json implies "
                         f"{list(t.shape)}: the weights and config.json are not of the same model")
    return expected

  def dtype(self) -> str:
    """The single floating dtype of the weights, as a config name ('bfloat16', ...)."""
    kinds = {dt for _, _, dt in self.tensors.values()}
    names = {"BF16": "bfloat16", "F32": "float32", "F16": "float16"}
    if len(kinds) != 1 or next(iter(kinds)) not in names:
      raise ValueError(f"the weights in {self.path} mix or use unsupported dtypes {sorted(kinds)}; pass an "
                       f"explicit dtype (one of {DTYPES[1:]}) to cast them")
    return names[next(iter(kinds))]

  def read(self, name: str) -> np.ndarray:
    """One tensor, opening its file afresh so mapped pages of earlier tensors are released."""
    with safetensors_module().safe_open(os.fspath(self.path / self.tensors[name][0]), framework="numpy") as f:
      return f.get_tensor(name)


# ---------------------------------------------------------------------------------------------------------
# Import


def _write_slice(stack: jax.Array, piece: jax.Array, index: tuple[jax.Array, ...]) -> jax.Array:
  """`stack` with `piece` written at `index` (its leading axes: a layer, or a layer and an expert)."""
  start = tuple(index) + (0,) * piece.ndim
  return jax.lax.dynamic_update_slice(stack, piece.reshape((1,) * len(index) + piece.shape), start)


def _place(hf_dir: HFDirectory, tensors: list[Tensor], abstract: Any, shardings: Any,
           dtype: np.dtype) -> dict:
  """Reads each HF tensor once, converts it and writes it into its sharded leaf on the devices: a whole
  leaf at once, a stacked one slice by slice (one layer, or one layer's expert) into zeros already there."""
  params = jax.tree.map(lambda _: None, abstract)
  by_leaf: dict[tuple[str, ...], list[Tensor]] = {}
  for t in tensors:
    by_leaf.setdefault(t.leaf, []).append(t)
  for path, group in by_leaf.items():
    target, where = _leaf(abstract, path), _leaf(shardings, path)
    depth = len(group[0].index)
    if not depth:
      w = group[0].to_ours(hf_dir.read(group[0].name), target.shape).astype(dtype, copy=False)
      value = jax.device_put(w, where)
    else:
      piece_sharding = where
      for _ in range(depth):
        piece_sharding = sharding.without_leading_axis(piece_sharding)
      value = jax.jit(lambda s=target.shape: jnp.zeros(s, dtype), out_shardings=where)()
      put = jax.jit(_write_slice, out_shardings=where, donate_argnums=0)
      for t in group:
        w = t.to_ours(hf_dir.read(t.name), target.shape[depth:]).astype(dtype, copy=False)
        value = put(value, jax.device_put(w, piece_sharding), t.index)
    parent = _leaf(params, path[:-1])
    parent[path[-1]] = value
  return params


def _check_tokenizer(tok: Any, hf_cfg: dict, model_cfg: ModelConfig, where: str) -> int:
  """The mask id, after checking that config.json and the tokenizer agree on the special ids."""
  mask = hf_cfg.get("mask_token_id", tok.mask_id)
  for key, ours in (("mask_token_id", tok.mask_id), ("eos_token_id", tok.eos_id)):
    if hf_cfg.get(key) is not None and hf_cfg[key] != ours:
      raise ValueError(f"{where}: config.json has {key}={hf_cfg[key]} but the tokenizer's id is {ours}")
  if tok.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"{where}: the tokenizer has {tok.vocab_size} tokens, more than the "
                     f"{model_cfg.vocab_size} embedding rows of config.json")
  return int(mask)


def load(hf_dir: str | os.PathLike, *, mesh: MeshConfig = MeshConfig(), dtype: str = "keep",
         compute_dtype: str = "bfloat16", instruct: bool | None = None) -> serving.LoadedModel:
  """A HF LLaDA or LLaDA-MoE directory as a sharded `serving.LoadedModel` (sample, chat, score: see serving).

  `dtype` is the parameter dtype ('keep': as stored); `instruct` (default: 'instruct' in the folder's
  name) marks a chat model (`model.chat`), whose prompts get the chat template.
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}")
  d = HFDirectory(hf_dir)
  where = os.fspath(d.path / CONFIG_FILE)
  model_cfg = model_config_from_hf(d.config, param_dtype="float32", dtype=compute_dtype, where=where)
  tensors = d.check(model_cfg)  # names and shapes, before any weight is read
  model_cfg = dataclasses.replace(model_cfg, param_dtype=d.dtype() if dtype == "keep" else dtype)
  tok = tokenizer_lib.load(d.path)
  mask_id = _check_tokenizer(tok, d.config, model_cfg, os.fspath(d.path))
  if instruct is None:
    instruct = "instruct" in d.path.name.lower()
  model_cfg = dataclasses.replace(model_cfg, chat=bool(instruct))
  graphdef, abstract_state = model_lib.abstract_model(model_cfg)
  shardings = sharding.tree_shardings(sharding.param_logical_axes(abstract_state), mesh,
                                      sharding.make_mesh(mesh))
  params = _place(d, tensors, nnx.to_pure_dict(abstract_state), shardings, jnp.dtype(model_cfg.param_dtype))
  return serving.LoadedModel(model_cfg, graphdef, params, tok, mask_id, model_cfg.chat, 0)


def inference_config(model: serving.LoadedModel, mesh: MeshConfig = MeshConfig()) -> dict[str, Any]:
  """The config a converted workdir's checkpoint stores: what inference and `train.init_from` read
  (the model with its chat flag, the mask id, the mesh it was placed on), and no training settings."""
  return {"model": dataclasses.asdict(model.model_config), "diffusion": {"mask_token_id": model.mask_id},
          "mesh": dataclasses.asdict(mesh)}


def import_checkpoint(hf_dir: str | os.PathLike, workdir: str | os.PathLike,
                      **options: Any) -> serving.LoadedModel:
  """Writes `load(hf_dir, **options)` as a llada_jax workdir: an Orbax step 0 holding the parameters and
  `inference_config`, the tokenizer files and the original config.json (for export). `llada-sample`,
  `llada-chat`, `llada-eval` and fine-tuning (`train.init_from`) read it like a training workdir.
  Returns the loaded model."""
  target = files.path(workdir, ckpt_lib.CHECKPOINT_DIR)
  if target.exists() and any(target.iterdir()):
    raise FileExistsError(f"{target} already holds checkpoints; convert into a new --out")
  loaded = load(hf_dir, **options)  # every check passes before anything is written
  saved_config = inference_config(loaded, options.get("mesh", MeshConfig()))
  loaded.tokenizer.save_dir(files.path(workdir))
  files.write_atomic(files.path(workdir, "config.json"), json.dumps(saved_config, indent=2, sort_keys=True))
  files.write_atomic(files.path(workdir, HF_CONFIG_COPY), (files.path(hf_dir) / CONFIG_FILE).read_text())
  # The checkpoint last: its (atomic) step marks a complete workdir. The parameters may already fill
  # host memory (a CPU host), so they are copied out for saving 1 GB at a time.
  ckpt = ckpt_lib.Checkpointer(os.fspath(workdir), async_save=False, save_host_gb=1)
  ckpt.save(0, {"params": loaded.params}, data_iterator=None, config=saved_config, force=True)
  ckpt.wait()
  ckpt.close()
  return loaded


# ---------------------------------------------------------------------------------------------------------
# Export


# One slice of a stacked leaf (traced indices: one compile per leaf shape, not per layer and expert).
_take = jax.jit(lambda stack, index: stack[index])


def _shards(tensors: list[Tensor], itemsize: int, max_bytes: int) -> list[list[Tensor]]:
  """Tensors grouped, in order, into files of at most `max_bytes` (a bigger tensor gets its own)."""
  groups: list[list[Tensor]] = [[]]
  size = 0
  for t in tensors:
    nbytes = int(np.prod(t.shape)) * itemsize
    if groups[-1] and size + nbytes > max_bytes:
      groups.append([])
      size = 0
    groups[-1].append(t)
    size += nbytes
  return groups


def export_checkpoint(workdir: str | os.PathLike, out_dir: str | os.PathLike, *, step: int | None = None,
                      dtype: str = "keep", max_shard_bytes: int = 2 * 2**30, merge: bool = False) -> list[str]:
  """Writes a llada_jax checkpoint in the HF layout (safetensors + config.json + tokenizer files).

  Returns the weight files written. Host memory holds the restored parameters plus one file's tensors
  (`max_shard_bytes`), so smaller files mean a lower peak. A model trained here then loads in PyTorch with the released
  `modeling_llada.py` / `configuration_llada.py` (a mixture of experts: `modeling_lladamoe.py` /
  `configuration_lladamoe.py`) placed beside the files (`trust_remote_code=True`). A model neither layout
  expresses (e.g. a sigmoid router) is refused before anything is written.
  A LoRA run's workdir needs `merge=True`: its base model with the adapters merged in (llada_jax.peft
  writes the adapters alone).
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}")
  out = files.path(out_dir)
  if out.exists() and any(out.iterdir()):
    raise FileExistsError(f"{out} is not empty; export into a new directory")
  ckpt = ckpt_lib.Checkpointer(os.fspath(workdir), read_only=True)
  try:
    latest = ckpt.latest_step() if step is None else step
    saved = ckpt.restore_config(latest) if latest in ckpt.all_steps() else {}
  finally:
    ckpt.close()
  rank = saved.get("lora", {}).get("rank", 0)
  if rank and not merge:
    raise ValueError(f"{workdir} holds LoRA adapters (rank {rank}) over {saved.get('train', {}).get('init_from')}: "
                     "pass --merge to export that base with the adapters merged in, or --adapter for PEFT "
                     "adapter files")
  if merge and not rank:
    raise ValueError(f"--merge: {workdir} holds no LoRA adapters (its lora.rank is 0); export it without --merge")
  model = serving.load(os.fspath(workdir), step)
  m = model.model_config
  if m.causal:
    raise ValueError("the HF LLaDA layout is for the bidirectional model; this workdir is causal (AR)")
  np_dtype = np.dtype(jnp.dtype(m.param_dtype if dtype == "keep" else dtype))
  imported = files.path(workdir, HF_CONFIG_COPY)
  base = json.loads(imported.read_text()) if imported.exists() else None
  tok = model.tokenizer
  # First, as it refuses a model the layout cannot express: nothing is written then.
  hf_cfg = hf_config_from_model(m, mask_id=model.mask_id, eos_id=tok.eos_id, pad_id=tok.pad_id, base=base)
  hf_cfg["torch_dtype"] = str(np_dtype) if np_dtype != np.float32 else "float32"
  tensors = layout(m)
  groups = _shards(tensors, np_dtype.itemsize, max_shard_bytes)
  names = (["model.safetensors"] if len(groups) == 1 else
           [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
  out.mkdir(parents=True, exist_ok=True)
  save_file = safetensors_module().numpy.save_file
  for name, group in zip(names, groups):
    arrays = {}
    for t in group:
      leaf = _leaf(model.params, t.leaf)
      value = np.asarray(jax.device_get(_take(leaf, t.index) if t.index else leaf))
      arrays[t.name] = t.to_hf(value.astype(np_dtype))
    # PyTorch loaders require the "format" tag.
    files.write_atomic_with(out / name, lambda local: save_file(arrays, local, metadata={"format": "pt"}))
  if len(groups) > 1:
    weight_map = {t.name: n for n, g in zip(names, groups) for t in g}
    total = sum(int(np.prod(t.shape)) * np_dtype.itemsize for t in tensors)
    files.write_atomic(out / INDEX_FILE, json.dumps({"metadata": {"total_size": total},
                                                     "weight_map": weight_map}, indent=2))
  files.write_atomic(out / CONFIG_FILE, json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
  tok.save_dir(out)
  return names
