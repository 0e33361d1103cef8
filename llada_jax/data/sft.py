"""SFT data: chat-template rendering, (prompt, response) pairs and static-shape grain batches (REFERENCE §3).

A conversation is a list of `{"role", "content"}` messages: an optional system message, then user and
assistant turns alternating, ending with the assistant. An n-turn dialogue gives n pairs; the prompt of
pair k is the whole history up to user turn k followed by the assistant header, the response is assistant
turn k plus `<|eot_id|>`. Rows are `[prompt, response, EOS...]` of fixed length `seq_len`; the EOS pads
belong to the response (the model learns to stop), but a batch only counts them up to its longest row, as
the reference's pad-to-batch-max does, while shapes stay `[B, seq_len]` so jit never recompiles.

Rendered layout, token for token the released LLaDA chat template (REFERENCE §3; its Jinja renders a
string that Hugging Face splits at special tokens, then encodes each text run on its own):
  <BOS>[<|start_header_id|>system<|end_header_id|>{\\n\\n + s.strip()}<|eot_id|>]
  <|start_header_id|>user<|end_header_id|>{\\n\\n + q.strip()}<|eot_id|>
  <|start_header_id|>assistant<|end_header_id|>{\\n\\n} | {a.strip()}<|eot_id|> <EOS> <EOS> ...
Each {...} is one `tok.encode` call ("|" is prompt_len): the header suffix and the content form one text
run, as in the release, where a BPE merge may join them. Special pieces are inserted as ids, never parsed
out of text, so content that spells `<|eot_id|>` stays text.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from typing import Any, NamedTuple, Sequence

import grain
import numpy as np
from absl import logging

from llada_jax.data import corpus
from llada_jax.data.tokenizer import END_HEADER, EOT, START_HEADER, Tokenizer

ROLES = ("user", "assistant", "system")
Message = dict[str, str]


class TemplateIds(NamedTuple):
  """Resolved ids of the template's special pieces."""
  start_header: int
  end_header: int
  eot: int


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """The chat template's special pieces (strings, resolved per tokenizer by `ids`).

  Example: `ChatTemplate().ids(tok)` -> TemplateIds(start_header=6, end_header=7, eot=8) for a
  tokenizer trained by `train_sentencepiece`.
  """

  start_header: str = START_HEADER
  end_header: str = END_HEADER
  eot: str = EOT
  header_suffix: str = "\n\n"

  def ids(self, tok: Tokenizer) -> TemplateIds:
    out = []
    for field in ("start_header", "end_header", "eot"):
      piece = getattr(self, field)
      i = tok.piece_to_id(piece)
      if i is None:
        # A tokenizer without the piece would silently spell it out as text: refuse instead.
        raise ValueError(f"tokenizer has no chat-template piece {piece!r} ({field}); use a tokenizer "
                         f"trained with it as a single special piece")
      out.append(int(i))
    return TemplateIds(*out)


# ---------------------------------------------------------------------------------------------------------
# Conversations


def validate_messages(messages: Any) -> str | None:
  """Why `messages` is not a trainable conversation, or None if it is.

  Example: validate_messages([{"role": "user", "content": "hi"}]) -> "the last message must be the
  assistant's ..."; with an assistant answer appended it returns None.
  """
  if not isinstance(messages, (list, tuple)):
    return f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
  if not messages:
    return "conversation has no messages"
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      return f"message {i} must be a dict with keys 'role' and 'content', got {m!r:.80}"
    if m["role"] not in ROLES:
      return f"message {i} has role {m['role']!r}; expected one of {', '.join(map(repr, ROLES))}"
    if not isinstance(m["content"], str):
      return f"message {i} content must be a string, got {type(m['content']).__name__}"
  start = 1 if messages[0]["role"] == "system" else 0
  for i in range(start, len(messages)):
    role = messages[i]["role"]
    if role == "system":
      return f"message {i} is a system message; only the first message may be a system message"
    want = "user" if (i - start) % 2 == 0 else "assistant"
    if role != want:
      return (f"message {i} has role {role!r} but {want!r} was expected: after the optional system "
              f"message, turns must alternate user, assistant, user, ...")
  if len(messages) == start:
    return "conversation has no assistant turn (only a system message)"
  if messages[-1]["role"] != "assistant":
    return (f"the last message must be the assistant's answer, got a {messages[-1]['role']!r} message "
            f"(a trailing prompt has no response to train on)")
  return None


def _check(messages: Any) -> None:
  err = validate_messages(messages)
  if err is not None:
    raise ValueError(err)


def conversation_pairs(messages: Sequence[Message]) -> list[tuple[list[Message], str]]:
  """(history up to and including user turn k, assistant answer k) for every assistant turn k.

  Example: [sys, u1, a1, u2, a2] -> [([sys, u1], a1.content), ([sys, u1, a1, u2], a2.content)].
  """
  _check(messages)
  return [(list(messages[:i]), m["content"]) for i, m in enumerate(messages) if m["role"] == "assistant"]


def pairs_to_conversation(prompt: str, response: str) -> dict[str, list[Message]]:
  """A prompt/response record (pair JSONL) as a one-turn conversation.

  Example: pairs_to_conversation("hi", "hello") -> {"messages": [{"role": "user", "content": "hi"},
  {"role": "assistant", "content": "hello"}]}.
  """
  return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def _messages_of(conversation: Any) -> Any:
  """A source item is {"messages": [...]} or the message list itself."""
  if isinstance(conversation, dict):
    if "messages" not in conversation:
      return f"record has no 'messages' field (keys: {sorted(conversation)[:8]})"
    return conversation["messages"]
  return conversation


# ---------------------------------------------------------------------------------------------------------
# Rendering


def render_prompt(history: Sequence[Message], tok: Tokenizer, template: ChatTemplate = ChatTemplate(),
                  *, answer_prefix: str = "") -> list[int]:
  """BOS, every turn of `history`, then the assistant header: the generation prompt. `answer_prefix`
  is the start of the answer, already written (lm-eval prefills answers that way).

  Example: [{"role": "user", "content": " hi\\n"}] -> [BOS, SH, *enc("user"), EH, *enc("\\n\\nhi"), EOT,
  SH, *enc("assistant"), EH, *enc("\\n\\n")].
  """
  t = template.ids(tok)
  ids = [tok.bos_id]
  for m in history:
    # The released template trims the content (Jinja `trim` = str.strip) and leaves it in one text run
    # with the header suffix.
    ids += [t.start_header, *tok.encode(m["role"]), t.end_header,
            *tok.encode(template.header_suffix + m["content"].strip()), t.eot]
  return ids + [t.start_header, *tok.encode("assistant"), t.end_header,
                *tok.encode(template.header_suffix + answer_prefix.lstrip())]


def render_response(answer: str, tok: Tokenizer, template: ChatTemplate = ChatTemplate()) -> list[int]:
  """The stripped answer's ids followed by `<|eot_id|>`. Example: " ok\\n" -> [*enc("ok"), EOT]."""
  return tok.encode(answer.strip()) + [template.ids(tok).eot]


# ---------------------------------------------------------------------------------------------------------
# Examples and batches


@dataclasses.dataclass
class SftStats:
  """Running counts of produced, left-truncated and dropped examples (updated in place, thread-safe).

  Example: s = SftStats(); make_example(p, r, seq_len=8, eos_id=1, stats=s); s.examples -> 1.
  Counts are per occurrence: a pair seen in two epochs counts twice.
  """

  examples: int = 0
  truncated: int = 0
  dropped: int = 0
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

  def add(self, field: str) -> int:
    with self._lock:
      n = getattr(self, field) + 1
      setattr(self, field, n)
      return n

  # grain pickles the pipeline for multiprocess prefetch: ship the counts, not the lock.
  def __getstate__(self) -> dict:
    return {k: v for k, v in self.__dict__.items() if k != "_lock"}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state, _lock=threading.Lock())


def _worth_logging(n: int) -> bool:
  # The first few, then every power of two: counts show up in the logs without flooding them.
  return n <= 3 or (n & (n - 1)) == 0


def make_example(prompt_ids: Sequence[int], response_ids: Sequence[int], *, seq_len: int, eos_id: int,
                 stats: SftStats | None = None) -> dict[str, np.ndarray] | None:
  """One fixed-length row `[prompt, response, EOS...]`, or None if the response cannot fit.

  Too long a pair loses prompt tokens from the left (the most recent context and the whole response are
  kept); a response that leaves no room for even one prompt token is dropped. Example: prompt [2, 9],
  response [5, 8], seq_len 6, eos 1 -> tokens [2, 9, 5, 8, 1, 1], prompt_len 2, length 4.
  """
  stats = stats if stats is not None else SftStats()
  n_resp = len(response_ids)
  if n_resp + 1 > seq_len:
    n = stats.add("dropped")
    if _worth_logging(n):
      logging.warning("SFT: dropped a pair whose response (%d tokens) does not fit seq_len=%d with at least "
                      "one prompt token; %d dropped so far", n_resp, seq_len, n)
    return None
  prompt = list(prompt_ids)
  if len(prompt) + n_resp > seq_len:
    keep = seq_len - n_resp
    n = stats.add("truncated")
    if _worth_logging(n):
      logging.warning("SFT: truncated a prompt from the left, %d -> %d tokens (response %d, seq_len %d); "
                      "%d truncated so far", len(prompt), keep, n_resp, seq_len, n)
    prompt = prompt[len(prompt) - keep:]
  stats.add("examples")
  length = len(prompt) + n_resp
  tokens = np.full((seq_len,), eos_id, np.int32)
  tokens[:len(prompt)] = prompt
  tokens[len(prompt):length] = response_ids
  return {"tokens": tokens, "prompt_len": np.int32(len(prompt)), "length": np.int32(length)}


def batch_examples(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """grain `batch_fn`: stacks rows and counts EOS padding only up to the batch's longest row.

  Example: two rows of seq_len 6 with lengths 3 and 4 -> valid [[T, T, T, T, F, F]] * 2, so the shorter
  row trains on one EOS pad and no row trains on the last two.
  """
  tokens = np.stack([e["tokens"] for e in examples]).astype(np.int32)
  longest = max(int(e["length"]) for e in examples)
  valid = np.broadcast_to(np.arange(tokens.shape[1]) < longest, tokens.shape).copy()
  return {"tokens": tokens, "prompt_len": np.asarray([e["prompt_len"] for e in examples], np.int32),
          "valid": valid}


# ---------------------------------------------------------------------------------------------------------
# Datasets


def pair_index(conversations_source: Sequence[Any]) -> list[tuple[int, int]]:
  """(conversation index, assistant turn k) for every pair; raises ValueError naming a bad conversation.

  Example: sources with 1 and 2 assistant turns -> [(0, 0), (1, 0), (1, 1)].
  """
  index = []
  for i in range(len(conversations_source)):
    messages = _messages_of(conversations_source[i])
    err = messages if isinstance(messages, str) else validate_messages(messages)
    if err is not None:
      raise ValueError(f"SFT conversation {i}: {err}")
    n = sum(m["role"] == "assistant" for m in messages)
    index.extend((i, k) for k in range(n))
  return index


class _ToExample:
  """The dataset's map: (conversation, turn k) -> `make_example` row or None (a class, so it pickles)."""

  def __init__(self, source: Sequence[Any], tok: Tokenizer, template: ChatTemplate, seq_len: int,
               stats: SftStats, epoch_size: int):
    self.source, self.tok, self.template, self.seq_len = source, tok, template, seq_len
    self.stats, self.epoch_size, self.consecutive_drops = stats, epoch_size, 0

  def __call__(self, item: tuple[int, int]) -> dict[str, np.ndarray] | None:
    conv, k = item
    history, answer = conversation_pairs(_messages_of(self.source[conv]))[k]
    ex = make_example(render_prompt(history, self.tok, self.template),
                      render_response(answer, self.tok, self.template),
                      seq_len=self.seq_len, eos_id=self.tok.eos_id, stats=self.stats)
    # Without this, a seq_len too short for every response would make the filter spin forever.
    self.consecutive_drops = self.consecutive_drops + 1 if ex is None else 0
    if self.consecutive_drops > self.epoch_size:
      raise ValueError(f"every SFT pair of a whole epoch was dropped: no response fits "
                       f"seq_len={self.seq_len}")
    return ex


def _is_example(ex: dict[str, np.ndarray] | None) -> bool:
  return ex is not None


def sft_dataset(conversations_source: Sequence[Any], tok: Tokenizer, *, seq_len: int, batch_size: int,
                seed: int, template: ChatTemplate = ChatTemplate(), process_index: int = 0,
                process_count: int = 1, stats: SftStats | None = None) -> grain.IterDataset:
  """An endless, seeded, host-sharded dataset of SFT batches (see `batch_examples`).

  Pairs are indexed eagerly (every conversation is validated up front) and tokenized lazily. Example:
  next(iter(sft_dataset(convs, tok, seq_len=64, batch_size=4, seed=0))) -> {"tokens": int32 [4, 64],
  "prompt_len": int32 [4], "valid": bool [4, 64]}.
  """
  template.ids(tok)  # a tokenizer without the chat pieces fails now, not inside a grain worker
  index = pair_index(conversations_source)
  shard = index[process_index::process_count]
  if not shard:
    raise ValueError(f"SFT data has {len(index)} pairs: too few for host {process_index} of {process_count}")
  to_example = _ToExample(conversations_source, tok, template, seq_len,
                          stats if stats is not None else SftStats(), len(shard))
  ds = grain.MapDataset.source(shard).shuffle(seed=seed).repeat(None).map(to_example)
  ds = ds.to_iter_dataset().filter(_is_example)
  return ds.batch(batch_size, drop_remainder=True, batch_fn=batch_examples)


# ---------------------------------------------------------------------------------------------------------
# The built-in procedural chat set

_SYSTEM_PROMPTS = ("you are a helpful assistant.", "answer in one short sentence.",
                   "you know the facts of this world.")


def _qa(rng: random.Random, world: corpus.World) -> tuple[str, str]:
  kind = rng.randrange(5)
  if kind == 0:
    c = rng.choice(sorted(world.capitals))
    return f"what is the capital of {c}?", f"the capital of {c} is {world.capitals[c]}."
  if kind in (1, 2):
    name = rng.choice(sorted(world.people))
    adj, noun, age = world.people[name]
    if kind == 1:
      return f"how old is {name}?", f"{name} is {age} years old."
    return f"what does {name} have?", f"{name} has a {adj} {noun}."
  if kind == 3:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"what is {a} plus {b}?", f"{a} plus {b} is {a + b}."
  start = rng.randint(0, 90)
  return f"count from {start}", " ".join(str(start + i) for i in range(5)) + "."


def generate_conversations(num: int, seed: int = 0, *, world_seed: int | None = None) -> list[dict]:
  """`num` chat conversations about the built-in corpus world, identical for identical arguments.

  Mostly single-turn, about a quarter 2-3 turns, about a fifth with a system message. `world_seed`
  (default `seed`) picks the `corpus.World`: use the pre-training corpus seed so the facts agree.
  Example: {"messages": [{"role": "user", "content": "how old is Kalo?"},
  {"role": "assistant", "content": "Kalo is 42 years old."}]}.
  """
  world = corpus.World(seed if world_seed is None else world_seed)
  rng = random.Random(seed * 1000003 + 17)  # a stream distinct from the corpus's random.Random(seed)
  out = []
  for _ in range(num):
    messages: list[Message] = []
    if rng.random() < 0.2:
      messages.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
    turns = 1 if rng.random() < 0.75 else rng.randint(2, 3)
    for _ in range(turns):
      q, a = _qa(rng, world)
      messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    out.append({"messages": messages})
  return out
