"""A tiny Hugging Face tokenizer laid out like the released LLaDA one (no downloads), for tests.

Example: ids = write_hf_tokenizer(tmp_path); ids["<|mdm_mask|>"] -> 156; tmp_path holds tokenizer.json
and tokenizer_config.json (bos/eos/pad pieces, add_bos_token false, the released chat template).
"""

import json
import os
import random
import string

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
