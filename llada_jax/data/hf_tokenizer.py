"""The released LLaDA tokenizer: a Hugging Face `tokenizer.json` (byte-level BPE) behind `Tokenizer`.

Special pieces come from the files, never from constants: BOS/EOS/pad from `special_tokens_map.json`
or `tokenizer_config.json` (the release's `<|startoftext|>` / `<|endoftext|>` when neither names
one), pad = EOS when unnamed, and the mask `tokenizer_config["mask_token"]` or `<|mdm_mask|>`.
Needs the `tokenizers` package (`pip install 'llada_jax[hf]'`), imported only when one is loaded.

Example: tok = HFTokenizer.load("LLaDA-8B-Instruct/"); tok.mask_id -> 126336; tok.eos_id -> 126081.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping, Sequence

from llada_jax import files

TOKENIZER_JSON, CONFIG_JSON = "tokenizer.json", "tokenizer_config.json"
SPECIAL_MAP_JSON = "special_tokens_map.json"
_DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "mask_token": "<|mdm_mask|>"}


def _tokenizers() -> Any:
  try:
    import tokenizers
  except ImportError as e:
    raise ImportError("a Hugging Face tokenizer.json needs the `tokenizers` package: "
                      "pip install 'llada_jax[hf]'") from e
  return tokenizers


class HFTokenizer:
  """A `tokenizers.Tokenizer` plus the special ids the rest of the package needs.

  `encode` never yields a special id from raw text: user text spelling `<|eot_id|>` stays text, so only
  the chat template (sft.py) inserts control tokens. (Non-special added tokens, ordinary words added to
  the vocabulary, still match, as in Hugging Face.) Example: tok.encode("hi <|eot_id|>") holds no
  tok.piece_to_id("<|eot_id|>").
  """

  def __init__(self, texts: Mapping[str, str], where: str = "", json_name: str = TOKENIZER_JSON):
    """`texts`: file name -> contents of tokenizer.json and, optionally, the two config files;
    `where` (their folder) and `json_name` (what tokenizer.json is called there) only make error
    messages name whole paths."""
    self._texts, self._where, self._json_name = dict(texts), where, json_name
    if TOKENIZER_JSON not in texts:
      raise ValueError(f"no {TOKENIZER_JSON} given (files: {sorted(texts)})")
    tokenizers = _tokenizers()
    try:
      self._tok = tokenizers.Tokenizer.from_str(texts[TOKENIZER_JSON])
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
      raise ValueError(f"{self._name(TOKENIZER_JSON)} is not a usable Hugging Face tokenizer ({e}); expected a "
                       "tokenizer.json as the Hugging Face tokenizers library saves it") from e
    self._tok.encode_special_tokens = True  # see the class docstring; not serialised, hence __setstate__
    self._tok_special = None
    configs = {name: self._json(name) for name in (SPECIAL_MAP_JSON, CONFIG_JSON) if name in texts}
    self.bos_id = self._special("bos_token", configs)
    self.eos_id = self._special("eos_token", configs)
    pad = self._special("pad_token", configs)
    self.pad_id = self.eos_id if pad is None else pad
    self.mask_id = self._special("mask_token", configs)
    # Ids may skip numbers (added tokens placed high): the range of valid ids is what callers need.
    self._vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

  def _name(self, file: str) -> str:
    file = self._json_name if file == TOKENIZER_JSON else file
    return f"{self._where.rstrip('/')}/{file}" if self._where else file

  def _json(self, file: str) -> dict:
    try:
      data = json.loads(self._texts[file])
    except json.JSONDecodeError as e:
      raise ValueError(f"{self._name(file)} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
      raise ValueError(f"{self._name(file)} must hold a JSON object, got {type(data).__name__}")
    return data

  def _special(self, key: str, configs: Mapping[str, dict]) -> int | None:
    """Id of the piece `key` names; special_tokens_map.json wins over tokenizer_config.json, as in HF."""
    piece, source = _DEFAULTS.get(key), f"the default {key}"
    for file in (SPECIAL_MAP_JSON, CONFIG_JSON):
      value = configs.get(file, {}).get(key)
      value = value.get("content") if isinstance(value, dict) else value  # "x" or {"content": "x", ...}
      if value is not None:
        if not isinstance(value, str) or not value:
          raise ValueError(f"{self._name(file)}: {key} must be a token string, got {value!r}")
        piece, source = value, f"{key} of {self._name(file)}"
        break
    if piece is None:
      return None
    i = self._tok.token_to_id(piece)
    if i is None:
      raise ValueError(f"{source} is {piece!r}, which the vocabulary of {self._name(TOKENIZER_JSON)} lacks")
    return i

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  def encode(self, text: str, *, special: bool = False) -> list[int]:
    if special:
      if self._tok_special is None:  # a second instance that matches special pieces in text
        self._tok_special = _tokenizers().Tokenizer.from_str(self._texts[TOKENIZER_JSON])
      return self._tok_special.encode(text, add_special_tokens=False).ids
    return self._tok.encode(text, add_special_tokens=False).ids

  def fingerprint(self) -> str:
    digest = hashlib.sha256()
    for name in sorted(self._texts):
      digest.update(name.encode() + b"\0" + self._texts[name].encode() + b"\0")
    return digest.hexdigest()[:16]

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
    return self._tok.decode(ids, skip_special_tokens=False)

  def piece_to_id(self, piece: str) -> int | None:
    return self._tok.token_to_id(piece)

  def save_dir(self, folder: str | os.PathLike) -> None:
    """Writes tokenizer.json and the config files it was loaded with into `folder` (local or gs://)."""
    # tokenizer.json last: a folder that holds it (what `tokenizer.find` looks for) holds the rest too.
    for name in sorted(self._texts, key=lambda n: n == TOKENIZER_JSON):
      files.write_atomic(files.path(folder, name), self._texts[name])

  # grain pickles the pipeline for worker processes; `encode_special_tokens` would not survive a pickle.
  def __getstate__(self) -> dict:
    return {"texts": self._texts, "where": self._where, "json_name": self._json_name}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["texts"], state["where"], state.get("json_name", TOKENIZER_JSON))

  @classmethod
  def load(cls, path: str | os.PathLike) -> "HFTokenizer":
    """From a folder holding tokenizer.json, or the tokenizer.json itself; sibling
    tokenizer_config.json and special_tokens_map.json are read when present."""
    path = files.path(path)
    file = path / TOKENIZER_JSON if path.is_dir() else path
    if not file.exists():
      raise FileNotFoundError(f"Hugging Face tokenizer file not found: {file}")
    texts = {TOKENIZER_JSON: file.read_text()}
    for name in (CONFIG_JSON, SPECIAL_MAP_JSON):
      if (file.parent / name).exists():
        texts[name] = (file.parent / name).read_text()
    return cls(texts, os.fspath(file.parent), file.name)
