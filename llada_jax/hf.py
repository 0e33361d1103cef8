"""The Hugging Face layout of the released LLaDA checkpoints (REFERENCE §1), in and out, offline.

  model = hf.load("/models/LLaDA-8B-Instruct")                # sharded, ready to sample (a notebook)
  hf.import_checkpoint("/models/LLaDA-8B-Instruct", "/ckpt/llada8b")   # what `llada-convert` runs
  hf.export_checkpoint("/ckpt/my_run", "/models/my_llada")             # what `llada-export` runs

A HF directory holds `config.json`, one or many `*.safetensors` files (with or without
`model.safetensors.index.json`) and the tokenizer files. Only safetensors are read: a pickle checkpoint
(`*.bin`) is refused, since unpickling can run code. Every tensor's name and shape is checked against
the config from the file headers before any weight is read. Import streams one HF tensor at a time
into the target sharding (a stacked layer leaf is filled layer by layer on the devices), so host memory
holds one tensor beyond what the devices hold. PyTorch `[out, in]` matrices become our `[in, ...]`
kernels by a transpose and a reshape; both directions are exact, so import -> export is bit-exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax import checkpoint as ckpt_lib, files, model as model_lib, serving, sharding
from llada_jax.config import MeshConfig, ModelConfig
from llada_jax.data import tokenizer as tokenizer_lib

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
HF_CONFIG_COPY = "hf_config.json"  # the imported config.json, kept in the workdir for a faithful export
DTYPES = ("keep", "float32", "bfloat16", "float16")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# config.json keys that change the architecture: (key, value this implementation computes, required?).
# Required keys are the ones REFERENCE §1 lists; optional ones are checked only when present.
_ARCHITECTURE = (("block_type", "llama", True), ("activation_type", "silu", True),
                 ("layer_norm_type", "rms", True), ("weight_tying", False, True),
                 ("include_bias", False, True), ("include_qkv_bias", False, False), ("alibi", False, False),
                 ("rope", True, False), ("attention_layer_norm", False, False),
                 ("input_emb_norm", False, False), ("scale_logits", False, False),
                 ("layer_norm_with_affine", True, False), ("bias_for_layer_norm", False, False),
                 ("multi_query_attention", None, False), ("block_group_size", 1, False))
_SHAPE_KEYS = ("d_model", "n_heads", "n_layers", "mlp_hidden_size", "vocab_size", "max_sequence_length",
               "rope_theta", "rms_norm_eps")


def _need(cfg: dict, key: str, where: str) -> Any:
  if cfg.get(key) is None:
    raise ValueError(f"{where} lacks the key '{key}' (needed to build the model)")
  return cfg[key]


def model_config_from_hf(cfg: dict[str, Any], *, param_dtype: str, dtype: str = "bfloat16",
                         where: str = CONFIG_FILE) -> ModelConfig:
  """Our ModelConfig for a LLaDA `config.json`; an architecture this model does not compute is refused."""
  for key, value, required in _ARCHITECTURE:
    if key not in cfg:
      if required:
        raise ValueError(f"{where} lacks the key '{key}' (LLaDA sets it to {value!r})")
    elif cfg[key] != value:
      raise ValueError(f"{where}: '{key}'={cfg[key]!r} is not supported; llada_jax implements {value!r}")
  d, n, layers, ffn, vocab, max_len, theta, eps = (_need(cfg, k, where) for k in _SHAPE_KEYS)
  return ModelConfig(vocab_size=cfg.get("embedding_size") or vocab, d_model=d, num_layers=layers,
                     num_heads=n, num_kv_heads=cfg.get("n_kv_heads") or n, mlp_dim=ffn, max_seq_len=max_len,
                     rope_theta=float(theta), norm_eps=float(eps), init_std=float(cfg.get("init_std", 0.02)),
                     dtype=dtype, param_dtype=param_dtype)


def hf_config_from_model(m: ModelConfig, *, mask_id: int, eos_id: int, pad_id: int,
                         base: dict[str, Any] | None = None) -> dict[str, Any]:
  """config.json for `m`: `base` (the imported file, so unknown keys survive) updated with our values."""
  out = dict(base or {
      "architectures": ["LLaDAModelLM"], "model_type": "llada",
      "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                   "AutoModel": "modeling_llada.LLaDAModelLM",
                   "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
      "alibi_bias_max": 8.0, "attention_dropout": 0.0, "embedding_dropout": 0.0, "residual_dropout": 0.0,
      "flash_attention": False, "init_device": "meta", "init_fn": "mitchell", "mlp_ratio": 4,
      "precision": "amp_bf16", "rope_full_precision": True, "use_cache": False,
  })
  out.update({key: value for key, value, _ in _ARCHITECTURE})
  out.update(d_model=m.d_model, n_heads=m.num_heads, n_kv_heads=m.num_kv_heads, n_layers=m.num_layers,
             mlp_hidden_size=m.mlp_dim, vocab_size=m.vocab_size, embedding_size=m.vocab_size,
             max_sequence_length=m.max_seq_len, rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps,
             init_std=m.init_std, mask_token_id=mask_id, eos_token_id=eos_id, pad_token_id=pad_id)
  return out


# ---------------------------------------------------------------------------------------------------------
# Parameter names and shapes


class Tensor(NamedTuple):
  """One HF tensor: its name and `[out, in]` shape, and the leaf (and layer) of ours it fills."""
  name: str
  shape: tuple[int, ...]
  leaf: tuple[str, ...]
  layer: int | None
  transpose: bool  # PyTorch Linear [out, in] -> our kernel [in, ...]; False for the embedding table

  def to_ours(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(w.T.reshape(shape) if self.transpose else w.reshape(shape))

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(self.shape[::-1]).T if self.transpose else x.reshape(self.shape))


BLOCK = (("attn_norm", "attn_norm", False), ("q_proj", "q_proj", True), ("k_proj", "k_proj", True),
          ("v_proj", "v_proj", True), ("attn_out", "attn_out", True), ("ff_norm", "ff_norm", False),
          ("ff_gate", "ff_proj", True), ("ff_up", "up_proj", True), ("ff_down", "ff_out", True))


def layout(m: ModelConfig) -> list[Tensor]:
  """Every HF tensor of a model with config `m`, in the released file's order."""
  d, n, k, h, f, v = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim, m.vocab_size
  hf_shapes = {"attn_norm": (d,), "q_proj": (n * h, d), "k_proj": (k * h, d), "v_proj": (k * h, d),
               "attn_out": (d, n * h), "ff_norm": (d,), "ff_proj": (f, d), "up_proj": (f, d), "ff_out": (d, f)}
  out = [Tensor("model.transformer.wte.weight", (v, d), ("embedding",), None, False)]
  for i in range(m.num_layers):
    for ours, theirs, transpose in BLOCK:
      out.append(Tensor(f"model.transformer.blocks.{i}.{theirs}.weight", hf_shapes[theirs],
                        ("blocks", ours), i, transpose))
  out.append(Tensor("model.transformer.ln_f.weight", (d,), ("final_norm",), None, False))
  out.append(Tensor("model.transformer.ff_out.weight", (v, d), ("lm_head",), None, True))
  return out


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


def _place(hf_dir: HFDirectory, tensors: list[Tensor], abstract: Any, shardings: Any,
           dtype: np.dtype) -> dict:
  """Reads each HF tensor once, converts it and writes it into its sharded leaf on the devices."""
  params = jax.tree.map(lambda _: None, abstract)
  by_leaf: dict[tuple[str, ...], list[Tensor]] = {}
  for t in tensors:
    by_leaf.setdefault(t.leaf, []).append(t)
  for path, group in by_leaf.items():
    target, where = _leaf(abstract, path), _leaf(shardings, path)
    if group[0].layer is None:
      w = group[0].to_ours(hf_dir.read(group[0].name), target.shape).astype(dtype, copy=False)
      value = jax.device_put(w, where)
    else:
      layer_sharding = sharding.without_leading_axis(where)
      value = jax.jit(lambda s=target.shape: jnp.zeros(s, dtype), out_shardings=where)()
      put = jax.jit(lambda stack, x, i: jax.lax.dynamic_update_index_in_dim(stack, x, i, 0),
                    out_shardings=where, donate_argnums=0)
      for t in group:
        w = t.to_ours(hf_dir.read(t.name), target.shape[1:]).astype(dtype, copy=False)
        value = put(value, jax.device_put(w, layer_sharding), t.layer)
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
  """A HF LLaDA directory as a sharded `serving.LoadedModel` (sample, chat, score: see serving).

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
  `modeling_llada.py` / `configuration_llada.py` placed beside the files (`trust_remote_code=True`).
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
      value = np.asarray(jax.device_get(leaf if t.layer is None else leaf[t.layer]))
      arrays[t.name] = t.to_hf(value.astype(np_dtype))
    # PyTorch loaders require the "format" tag.
    files.write_atomic_with(out / name, lambda local: save_file(arrays, local, metadata={"format": "pt"}))
  if len(groups) > 1:
    weight_map = {t.name: n for n, g in zip(names, groups) for t in g}
    total = sum(int(np.prod(t.shape)) * np_dtype.itemsize for t in tensors)
    files.write_atomic(out / INDEX_FILE, json.dumps({"metadata": {"total_size": total},
                                                     "weight_map": weight_map}, indent=2))
  imported = files.path(workdir, HF_CONFIG_COPY)
  base = json.loads(imported.read_text()) if imported.exists() else None
  tok = model.tokenizer
  hf_cfg = hf_config_from_model(m, mask_id=model.mask_id, eos_id=tok.eos_id,
                                pad_id=tok.pad_id, base=base)
  hf_cfg["torch_dtype"] = str(np_dtype) if np_dtype != np.float32 else "float32"
  files.write_atomic(out / CONFIG_FILE, json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
  tok.save_dir(out)
  return names
