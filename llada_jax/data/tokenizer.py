"""Tokenizers behind one small interface (`Tokenizer`): sentencepiece models, or Hugging Face files.

Two kinds, told apart by file name (`find`, `load`): a sentencepiece `tokenizer.model` (what this
package trains) or a Hugging Face `tokenizer.json` with its config files (the released LLaDA tokenizer,
`hf_tokenizer.py`, whose special ids are read from the files). A run keeps its tokenizer in the workdir
(`save_dir`), whichever kind, so checkpoints stay self-contained.

A sentencepiece tokenizer trained by this package fixes its special ids: pad 0, EOS 1, BOS 2, unk 3,
mask `<|mask|>` 4 (the `diffusion.mask_token_id` default), a newline piece 5 (couplets keep their line
break), then the chat-template pieces `<|start_header_id|>` 6, `<|end_header_id|>` 7, `<|eot_id|>` 8, then
the answer tags of the RL tasks `<answer>` 9 and `</answer>` 10. The tags are pieces because the corpus
never holds '<', which without byte fallback would encode as the unknown piece (decoded " ⁇ "): a policy
could not write the answer its rewards read (llada_jax.rewards).
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Iterable, Protocol, Sequence

import sentencepiece as spm
from etils import epath

from llada_jax import files

MASK_PIECE = "<|mask|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
PAD_ID, EOS_ID, BOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 4
TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(Protocol):
  """What the rest of the package needs from a tokenizer."""

  pad_id: int
  eos_id: int
  bos_id: int
  mask_id: int

  @property
  def vocab_size(self) -> int: ...

  def encode(self, text: str, *, special: bool = False) -> list[int]:
    """Ids of `text`. `special=True` lets the text spell special pieces (a chat template rendered as
    text, as lm-eval hands it over); by default they stay text where the kind allows it."""

  def fingerprint(self) -> str:
    """A short hash of the tokenizer's files: equal fingerprints, equal ids."""

  def decode(self, ids: Sequence[int]) -> str: ...

  def piece_to_id(self, piece: str) -> int | None:
    """Id of a special piece (e.g. a chat header), or None if the vocabulary lacks it."""

  def save_dir(self, folder: str | os.PathLike) -> None:
    """Writes the tokenizer's file(s) into `folder`, where `load(folder)` finds them."""


class SentencePieceTokenizer:
  """A sentencepiece model plus the special ids the rest of the package needs."""

  def __init__(self, model_proto: bytes):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.model_proto = model_proto
    self.pad_id = self._sp.pad_id()
    self.eos_id = self._sp.eos_id()
    self.bos_id = self._sp.bos_id()
    self.mask_id = self._sp.piece_to_id(MASK_PIECE)
    if self.mask_id == self._sp.unk_id():
      raise ValueError(f"tokenizer has no mask piece {MASK_PIECE!r}; train one with llada-tokenizer train, "
                       "which adds the pieces llada_jax needs")

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str, *, special: bool = False) -> list[int]:
    del special  # sentencepiece always matches its user-defined pieces (mask, chat headers) in text
    return self._sp.encode(text)

  def fingerprint(self) -> str:
    return hashlib.sha256(self.model_proto).hexdigest()[:16]

  def piece_to_id(self, piece: str) -> int | None:
    i = self._sp.piece_to_id(piece)
    return None if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i) else i

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
    return self._sp.decode(ids)

  def save(self, path: str | os.PathLike) -> None:
    files.write_atomic(files.path(path), self.model_proto)  # never half a tokenizer behind

  def save_dir(self, folder: str | os.PathLike) -> None:
    self.save(files.path(folder, TOKENIZER_FILE))

  @classmethod
  def load(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
    path = files.path(path)
    if not path.exists():
      raise FileNotFoundError(f"tokenizer file not found: {path} (give a sentencepiece .model, a Hugging Face "
                              "tokenizer.json, or a folder holding one)")
    data = path.read_bytes()
    try:
      return cls(data)
    except RuntimeError as e:  # sentencepiece's parse failure: its text names only its own source line
      raise ValueError(f"tokenizer file {path} is not a sentencepiece model (it does not parse); expected a "
                       ".model file written by llada-tokenizer train") from e
    except ValueError as e:
      raise ValueError(f"tokenizer file {path} is not a usable sentencepiece model: {e}") from e


def find(folder: str | os.PathLike) -> epath.Path | None:
  """The tokenizer file in `folder` (tokenizer.json, else tokenizer.model), or None.

  tokenizer.json wins: a Hugging Face folder may also carry its slow tokenizer's tokenizer.model, and
  the fast one is what Hugging Face itself loads. Example: find(workdir) -> workdir/tokenizer.model.
  """
  folder = files.path(folder)
  for name in (HF_TOKENIZER_FILE, TOKENIZER_FILE):
    if (folder / name).exists():
      return folder / name
  return None


def load(path: str | os.PathLike) -> Tokenizer:
  """A tokenizer from a folder (whichever file `find` sees), a `*.json` (Hugging Face) or a
  sentencepiece model file. Example: load("run/") -> SentencePieceTokenizer; load("LLaDA-8B/") ->
  HFTokenizer."""
  path = files.path(path)
  if path.is_dir():
    found = find(path)
    if found is None:
      raise FileNotFoundError(f"no tokenizer in {path}: expected {TOKENIZER_FILE} (sentencepiece) or "
                              f"{HF_TOKENIZER_FILE} (Hugging Face)")
    path = found
  if path.name.endswith(".json"):
    from llada_jax.data import hf_tokenizer  # its `tokenizers` import is optional: only when needed
    return hf_tokenizer.HFTokenizer.load(path)
  return SentencePieceTokenizer.load(path)


def stop_ids(tok: Tokenizer) -> set[int]:
  """Ids that end a generated answer: EOS, and end-of-turn when the vocabulary has it."""
  eot = tok.piece_to_id(EOT)
  return {tok.eos_id} | ({eot} if eot is not None else set())


def train_sentencepiece(sentences: Iterable[str], vocab_size: int, model_type: str = "bpe",
                        extra_pieces: Sequence[str] = ()) -> SentencePieceTokenizer:
  """Trains a sentencepiece model (BPE or unigram) in memory: no files, no network.

  Special pieces come first (see the module docstring); `extra_pieces` are added after them.
  """
  buf = io.BytesIO()
  sentences = _Recorded(sentences)
  try:
    _train(sentences, buf, vocab_size, model_type, extra_pieces)
  except RuntimeError:
    # sentencepiece turns an error raised by the iterator into "RuntimeError: INTERNAL" with a stack
    # in its text; the iterator's own error (e.g. "path:line: ...") is the one to show.
    if sentences.error is not None:
      raise sentences.error from None
    raise
  tok = SentencePieceTokenizer(buf.getvalue())
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.mask_id) == (PAD_ID, EOS_ID, BOS_ID, MASK_ID)
  return tok


class _Recorded:
  """An iterator that keeps the exception its source raised, so it survives the trip through C++."""

  def __init__(self, items: Iterable[str]):
    self._it = iter(items)
    self.error: BaseException | None = None

  def __iter__(self) -> "_Recorded":
    return self

  def __next__(self) -> str:
    try:
      return next(self._it)
    except StopIteration:
      raise
    except Exception as e:
      self.error = e
      raise


def _train(sentences: Iterable[str], buf: io.BytesIO, vocab_size: int, model_type: str,
           extra_pieces: Sequence[str]) -> None:
  # New pieces go last: the ids of the earlier ones are fixed (see the module docstring). An extra piece
  # that is already one of them (e.g. "<answer>" from an older command line) is not defined twice.
  fixed = [MASK_PIECE, "\n", START_HEADER, END_HEADER, EOT, ANSWER_OPEN, ANSWER_CLOSE]
  extra = list(dict.fromkeys(p for p in extra_pieces if p not in fixed))
  spm.SentencePieceTrainer.train(
      sentence_iterator=sentences, model_writer=buf, vocab_size=vocab_size, model_type=model_type,
      pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID, user_defined_symbols=fixed + extra,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=False, character_coverage=1.0, split_digits=True, byte_fallback=False,
      hard_vocab_limit=False, num_threads=1, minloglevel=2)


def load_or_train(workdir: str, sentences_fn, vocab_size: int, model_type: str = "bpe",
                  source_path: str = "") -> Tokenizer:
  """The run's tokenizer, kept in the workdir (`tokenizer.model` or `tokenizer.json` + configs) so
  checkpoints are self-contained.

  On resume the workdir's copy is reused. Otherwise `source_path` (a .model file, a tokenizer.json, or
  a folder holding either) is loaded, or a new sentencepiece model is trained on `sentences_fn()`;
  either way it is saved into the workdir.
  """
  found = find(workdir)
  if found is not None:
    return load(found)
  tok = load(source_path) if source_path else train_sentencepiece(sentences_fn(), vocab_size, model_type)
  tok.save_dir(workdir)
  return tok
