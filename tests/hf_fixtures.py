"""A tiny Hugging Face tokenizer and checkpoint laid out like the released LLaDA ones (no downloads), for
tests.

Example: ids = write_hf_tokenizer(tmp_path); ids["<|mdm_mask|>"] -> 156; tmp_path holds tokenizer.json
and tokenizer_config.json (bos/eos/pad pieces, add_bos_token false, the released chat template).
write_hf_dir(tmp_path) adds config.json and random weights in *.safetensors: a whole HF directory.
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


def write_hf_tokenizer(folder: str | os.PathLike, *, vocab_size: int = 160) -> dict[str, int]:
  """Trains a byte-level BPE into `folder` (tokenizer.json + tokenizer_config.json); {piece: id} of the
  reserved and special pieces. The whole vocabulary, added pieces included, has <= `vocab_size` ids."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

  added = RESERVED + SPECIALS
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(_sentences(), trainers.BpeTrainer(vocab_size=vocab_size - len(added),
                                                            show_progress=False))
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
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return ids


# The `tiny` preset's shape (configs/default.py), so configs/sft_tiny.py can fine-tune the import.
D, HEADS, KV, LAYERS, FFN, VOCAB = 32, 4, 2, 2, 64, 256


def _hf_config(mask_id: int, eos_id: int) -> dict:
  return {"architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu",
          "block_type": "llama", "layer_norm_type": "rms", "weight_tying": False, "include_bias": False,
          "include_qkv_bias": False, "alibi": False, "rope": True, "d_model": D, "n_heads": HEADS,
          "n_kv_heads": KV, "n_layers": LAYERS, "mlp_hidden_size": FFN, "vocab_size": VOCAB,
          "embedding_size": VOCAB, "max_sequence_length": 4096, "rope_theta": 500000.0,
          "rms_norm_eps": 1e-5, "mask_token_id": mask_id, "eos_token_id": eos_id, "pad_token_id": eos_id,
          "transformers_version": "4.46.3", "precision": "amp_bf16"}


def _hf_weights(seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights under the released names, PyTorch [out, in] layout; norms away from 1."""
  rng = np.random.default_rng(seed)
  h = D // HEADS
  mat = lambda *s: (0.3 * rng.standard_normal(s)).astype(np.float32)
  norm = lambda: (1 + 0.2 * rng.standard_normal(D)).astype(np.float32)
  w = {"model.transformer.wte.weight": mat(VOCAB, D)}
  for i in range(LAYERS):
    p = f"model.transformer.blocks.{i}."
    w.update({p + "attn_norm.weight": norm(), p + "q_proj.weight": mat(HEADS * h, D),
              p + "k_proj.weight": mat(KV * h, D), p + "v_proj.weight": mat(KV * h, D),
              p + "attn_out.weight": mat(D, HEADS * h), p + "ff_norm.weight": norm(),
              p + "ff_proj.weight": mat(FFN, D), p + "up_proj.weight": mat(FFN, D),
              p + "ff_out.weight": mat(D, FFN)})
  w["model.transformer.ln_f.weight"] = norm()
  w["model.transformer.ff_out.weight"] = mat(VOCAB, D)
  return w


def write_hf_dir(folder, *, dtype=np.float32, num_files: int = 1, name_index: bool = True, seed: int = 0):
  """A complete LLaDA-layout directory; returns (weights as written, config, tokenizer ids)."""
  from safetensors import numpy as st_numpy
  from llada_jax import hf
  os.makedirs(folder, exist_ok=True)
  ids = write_hf_tokenizer(folder)
  config = _hf_config(ids["<|mdm_mask|>"], ids["<|endoftext|>"])
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  weights = {k: v.astype(dtype) for k, v in _hf_weights(seed).items()}
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
