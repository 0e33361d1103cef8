"""A tiny Hugging Face tokenizer and checkpoint laid out like the released LLaDA ones (no downloads), for
tests.

Example: ids = write_hf_tokenizer(tmp_path); ids["<|mdm_mask|>"] -> 156; tmp_path holds tokenizer.json
and tokenizer_config.json (bos/eos/pad pieces, add_bos_token false, the released chat template).
write_hf_dir(tmp_path) adds config.json and random weights in *.safetensors: a whole HF directory
(tied=True: an iLLaDA-like one, tied embeddings, 1 KV head, mask id 5); write_moe_dir(tmp_path) the same
in LLaDA-MoE's layout (modeling_lladamoe.py: 4 experts, top-2, QK-norm, a shared expert, partial RoPE).
"""

import json
import os
import random
import string

import numpy as np

# The released LLaDA-8B-Instruct chat template, verbatim (tokenizer_config.json's "chat_template").
RELEASED_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}")

# Reserved pieces first, so the real special ids are neither small nor the sentencepiece defaults.
RESERVED = ("<|reserved_token_0|>", "<|reserved_token_1|>")
SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>")

_WORDS = ("the cat dog king queen city river house old young quiet small red green has is was sees "
          "likes walks near over a an and to of in user assistant system hello what how count plus").split()


def _sentences(n: int = 400) -> list[str]:
  rng = random.Random(0)
  out = [string.printable]  # every printable ASCII character is in the alphabet: such text round-trips
  for _ in range(n):
    s = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9))) + rng.choice(".?!")
    # Paragraph breaks make "\n\n" a merged token, so text runs split differently tokenize differently.
    out.append(s + rng.choice(("", "\n", "\n\n", "\n\nthe")))
  return out


def write_hf_tokenizer(folder: str | os.PathLike, *, vocab_size: int = 160, leading: tuple[str, ...] = (),
                       mask_piece: str = "<|mdm_mask|>") -> dict[str, int]:
  """Trains a byte-level BPE into `folder` (tokenizer.json + tokenizer_config.json); {piece: id} of the
  reserved and special pieces. The whole vocabulary, added pieces included, has <= `vocab_size` ids.
  `leading`: special pieces given ids 0, 1, ... instead (an iLLaDA-like vocabulary, mask id 5), with
  `mask_piece` named as tokenizer_config.json's mask_token."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

  added = leading or RESERVED + SPECIALS
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size - (0 if leading else len(added)), show_progress=False,
                                special_tokens=list(leading))  # the trainer's special tokens come first
  tok.train_from_iterator(_sentences(), trainer)
  tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in added])
  ids = {p: tok.token_to_id(p) for p in added}
  if tok.get_vocab_size(with_added_tokens=True) > vocab_size:
    raise ValueError(f"vocab_size={vocab_size} is too small for the byte alphabet plus {len(added)} pieces")
  config = {
      "add_bos_token": False, "add_eos_token": False,
      "added_tokens_decoder": {str(i): {"content": p, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True} for p, i in ids.items()},
      "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
      "chat_template": RELEASED_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
      "tokenizer_class": "PreTrainedTokenizerFast",
  }
  if mask_piece != "<|mdm_mask|>":
    config["mask_token"] = mask_piece
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return ids


# The `tiny` preset's shape (configs/default.py), so configs/sft_tiny.py can fine-tune the import.
D, HEADS, KV, LAYERS, FFN, VOCAB = 32, 4, 2, 2, 64, 256
# iLLaDA-like (REFERENCE §12): tied embeddings, 1 KV head, its own vocabulary and constants, mask id 5.
ILLADA_PIECES = ("<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<|mask|>")
TIED = {"n_kv_heads": 1, "mlp_hidden_size": 48, "vocab_size": 192, "embedding_size": 192,
        "max_sequence_length": 8192, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "weight_tying": True}
MOE_VOCAB = 176


def _hf_config(mask_id: int, eos_id: int) -> dict:
  return {"architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu",
          "block_type": "llama", "layer_norm_type": "rms", "weight_tying": False, "include_bias": False,
          "include_qkv_bias": False, "alibi": False, "rope": True, "d_model": D, "n_heads": HEADS,
          "n_kv_heads": KV, "n_layers": LAYERS, "mlp_hidden_size": FFN, "vocab_size": VOCAB,
          "embedding_size": VOCAB, "max_sequence_length": 4096, "rope_theta": 500000.0,
          "rms_norm_eps": 1e-5, "mask_token_id": mask_id, "eos_token_id": eos_id, "pad_token_id": eos_id,
          "transformers_version": "4.46.3", "precision": "amp_bf16"}


def moe_config(mask_id: int, eos_id: int) -> dict:
  """A LLaDA-MoE config.json as the released one is written (HF/OLMoE-style keys), tiny: every layer MoE,
  expert width 16 (the dense/intermediate sizes are other numbers, unused), head_dim 8 with half rotated."""
  return {"architectures": ["LLaDAMoEModelLM"], "model_type": "llada",
          "auto_map": {"AutoConfig": "configuration_lladamoe.LLaDAConfig",
                       "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM"},
          "vocab_size": MOE_VOCAB, "hidden_size": D, "intermediate_size": 64, "dense_intermediate_size": 64,
          "expert_intermediate_size": 16, "shared_expert_intermediate_size": 24, "num_hidden_layers": LAYERS,
          "num_attention_heads": HEADS, "num_key_value_heads": KV, "rms_norm_eps": 1e-6, "rope_theta": 50000.0,
          "max_position_embeddings": 8192, "partial_rotary_factor": 0.5, "num_experts": 4,
          "num_experts_per_tok": 2, "norm_topk_prob": False, "qk_layernorm": True, "moe_layer_freq": [1] * LAYERS,
          "router_aux_loss_coef": 0.01, "moe_router_score_function": "softmax",
          "moe_router_enable_expert_bias": False, "routed_scaling_factor": 1.0, "tie_word_embeddings": False,
          "hidden_act": "silu", "attention_bias": False, "clip_qkv": None, "rope_scaling": None,
          "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": False, "mask_token_id": mask_id,
          "eos_token_id": eos_id, "pad_token_id": eos_id, "torch_dtype": "float32", "transformers_version": "4.46.3"}


def _draws(seed: int):
  """(matrix, norm) makers: random PyTorch-layout matrices, and norm weights away from 1."""
  rng = np.random.default_rng(seed)
  mat = lambda *s: (0.3 * rng.standard_normal(s)).astype(np.float32)
  norm = lambda size: (1 + 0.2 * rng.standard_normal(size)).astype(np.float32)
  return mat, norm


def _hf_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights under the released dense names for config.json `cfg`, PyTorch [out, in] layout."""
  mat, norm = _draws(seed)
  d, n, kv, f, v = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"], cfg["mlp_hidden_size"], cfg["embedding_size"]
  h = d // n
  w = {"model.transformer.wte.weight": mat(v, d)}
  for i in range(cfg["n_layers"]):
    p = f"model.transformer.blocks.{i}."
    w.update({p + "attn_norm.weight": norm(d), p + "q_proj.weight": mat(n * h, d),
              p + "k_proj.weight": mat(kv * h, d), p + "v_proj.weight": mat(kv * h, d),
              p + "attn_out.weight": mat(d, n * h), p + "ff_norm.weight": norm(d),
              p + "ff_proj.weight": mat(f, d), p + "up_proj.weight": mat(f, d),
              p + "ff_out.weight": mat(d, f)})
  w["model.transformer.ln_f.weight"] = norm(d)
  if not cfg["weight_tying"]:
    w["model.transformer.ff_out.weight"] = mat(v, d)
  return w


def _moe_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights under modeling_lladamoe.py's names for config.json `cfg`, PyTorch [out, in] layout."""
  mat, norm = _draws(seed)
  d, n, kv, v = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
  f, s, h = cfg["expert_intermediate_size"], cfg["shared_expert_intermediate_size"], d // n
  w = {"model.embed_tokens.weight": mat(v, d)}
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    w.update({p + "input_layernorm.weight": norm(d), p + "self_attn.q_proj.weight": mat(n * h, d),
              p + "self_attn.k_proj.weight": mat(kv * h, d), p + "self_attn.v_proj.weight": mat(kv * h, d),
              p + "self_attn.o_proj.weight": mat(d, n * h), p + "post_attention_layernorm.weight": norm(d),
              p + "mlp.gate.weight": mat(cfg["num_experts"], d)})
    if cfg["qk_layernorm"]:
      w.update({p + "self_attn.q_norm.weight": norm(h), p + "self_attn.k_norm.weight": norm(h)})
    for j in range(cfg["num_experts"]):
      w.update({f"{p}mlp.experts.{j}.gate_proj.weight": mat(f, d), f"{p}mlp.experts.{j}.up_proj.weight": mat(f, d),
                f"{p}mlp.experts.{j}.down_proj.weight": mat(d, f)})
    if s:
      w.update({p + "shared_expert.gate_proj.weight": mat(s, d), p + "shared_expert.up_proj.weight": mat(s, d),
                p + "shared_expert.down_proj.weight": mat(d, s)})
  w["model.norm.weight"] = norm(d)
  if not cfg["tie_word_embeddings"]:
    w["lm_head.weight"] = mat(v, d)
  return w


def _write(folder, weights: dict[str, np.ndarray], config: dict, num_files: int, name_index: bool) -> None:
  """config.json and the weights split in order over `num_files` safetensors files (+ their index)."""
  from safetensors import numpy as st_numpy
  from llada_jax import hf
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  names = list(weights)
  chunks = np.array_split(np.arange(len(names)), num_files)
  files = ([f"model-{i + 1:05d}-of-{num_files:05d}.safetensors" for i in range(num_files)]
           if num_files > 1 else ["model.safetensors"])
  weight_map = {}
  for file, chunk in zip(files, chunks):
    st_numpy.save_file({names[j]: weights[names[j]] for j in chunk}, os.path.join(folder, file),
                       metadata={"format": "pt"})
    weight_map.update({names[j]: file for j in chunk})
  if num_files > 1 and name_index:
    with open(os.path.join(folder, hf.INDEX_FILE), "w") as f:
      json.dump({"metadata": {}, "weight_map": weight_map}, f)


def write_hf_dir(folder, *, dtype=np.float32, num_files: int = 1, name_index: bool = True, seed: int = 0,
                 tied: bool = False):
  """A complete LLaDA-layout directory; returns (weights as written, config, tokenizer ids).
  `tied`: the iLLaDA-like variant (TIED's config values, ILLADA_PIECES' tokenizer, no ff_out tensor)."""
  os.makedirs(folder, exist_ok=True)
  if tied:
    ids = write_hf_tokenizer(folder, vocab_size=176, leading=ILLADA_PIECES, mask_piece="<|mask|>")
    config = {**_hf_config(ids["<|mask|>"], ids["<|endoftext|>"]), **TIED}
  else:
    ids = write_hf_tokenizer(folder)
    config = _hf_config(ids["<|mdm_mask|>"], ids["<|endoftext|>"])
  weights = {k: v.astype(dtype) for k, v in _hf_weights(config, seed).items()}
  _write(folder, weights, config, num_files, name_index)
  return weights, config, ids


def write_moe_dir(folder, *, dtype=np.float32, num_files: int = 1, seed: int = 0):
  """A complete LLaDA-MoE-layout directory (moe_config); returns (weights as written, config, tokenizer ids)."""
  os.makedirs(folder, exist_ok=True)
  ids = write_hf_tokenizer(folder)
  config = moe_config(ids["<|mdm_mask|>"], ids["<|endoftext|>"])
  weights = {k: v.astype(dtype) for k, v in _moe_weights(config, seed).items()}
  _write(folder, weights, config, num_files, name_index=True)
  return weights, config, ids


def edit_json(path: str | os.PathLike, **changes) -> None:
  """Sets (or, with None, removes) top-level keys of a JSON file: malformed-folder tests."""
  with open(path) as f:
    data = json.load(f)
  for key, value in changes.items():
    if value is None:
      data.pop(key)
    else:
      data[key] = value
  with open(path, "w") as f:
    json.dump(data, f)
