"""Prompts with checkable answers for RL (diffu-GRPO), and the built-in verifiable task.

RL needs prompts, not responses: the policy writes the completions and reward functions
(llada_jax.rewards) score them against the record's answer. A prompt record, normalised by
`to_prompt_record`, is
  {"messages": [optional system, user, assistant, ..., user], "answer": <any JSON value>, **other fields}
from a user's JSONL line holding either a `messages` history ending with the user's turn or a prompt string
(`data.prompt_field`), and an `answer`; every other field stays, for custom rewards (e.g. countdown's
`numbers` and `target`). `prompt_dataset` renders each history with the SFT chat template, LEFT-pads it to
`width = train.seq_len - grpo.gen_length` (so every completion starts at the same position) and repeats
it for its group of G rollouts:
  prompt        [PAD PAD <BOS> ... <|start_header_id|>assistant<|end_header_id|>\\n\\n]   x G rows
  prompt_valid  [F   F   T     ...                                             T    ]
  example       json.dumps(record): the batch carries what the rewards read, host-local

The built-in task (`generate_problems`, `data.source='task'`) asks about the pre-training world
(corpus.World) and asks for the answer in `<answer>` tags (single pieces of the tokenizer):
  arithmetic  "what is 23 plus 45? put the answer in <answer></answer>."  -> "68"
  counting    "how many times does cat appear in: cat dog cat fox? ..."   -> "2"
  fact        "what is the capital of Kaloia? ..." -> "Tenra"; "how old is Kalo? ..." -> "42";
              "what does Kalo have? ..." -> "red cat"
Each record has an SFT `solution` ("23 plus 45 is 68. <answer>68</answer>"), so a short SFT stage can
teach the format before RL (`task_conversations`). A fifth of the question space is held out, by a stable
hash of the question (`split_of`): split='heldout' only ever asks those questions, split='train' never.
"""

from __future__ import annotations

import json
import random
import zlib
from typing import Any, Sequence

import grain
import numpy as np
from absl import logging

from llada_jax.config import DataConfig
from llada_jax.data import corpus, preference, sft, sources
from llada_jax.data.sft import ChatTemplate, SftStats
from llada_jax.data.tokenizer import ANSWER_CLOSE, ANSWER_OPEN, Tokenizer

INSTRUCTION = f" put the answer in {ANSWER_OPEN}{ANSWER_CLOSE}."  # appended to every built-in question
SPLITS = ("train", "heldout")
KINDS = ("arithmetic", "counting", "fact")
HELDOUT_EVERY = 5  # one question in this many (by hash) is held out
PROMPT_SOURCES = ("task", "jsonl")  # the values of data.source for diffusion.objective='grpo'

# ---------------------------------------------------------------------------------------------------------
# The built-in task


def split_of(question: str) -> str:
  """'heldout' for about a fifth of all questions, else 'train': a fixed function of the text (crc32), the
  same in every process and Python version. Example: split_of("what is 2 plus 3?") -> "train"."""
  return "heldout" if zlib.crc32(question.encode("utf-8")) % HELDOUT_EVERY == 0 else "train"


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
  """(question, sentence, answer) as the corpus writes sums and differences (corpus._arithmetic)."""
  a, b = rng.randint(0, 99), rng.randint(0, 99)
  if rng.random() < 0.5:
    return f"what is {a} plus {b}?", f"{a} plus {b} is {a + b}.", str(a + b)
  a, b = max(a, b), min(a, b)  # no negative results: the corpus never writes one
  return f"what is {a} minus {b}?", f"{a} minus {b} is {a - b}.", str(a - b)


def _counting(rng: random.Random) -> tuple[str, str, str]:
  """How often a noun occurs in a list of 3-6 nouns (0 to 4 times)."""
  target = rng.choice(corpus._NOUNS)
  length = rng.randint(3, 6)
  count = rng.randint(0, min(4, length))
  at = set(rng.sample(range(length), count))
  others = [n for n in corpus._NOUNS if n != target]
  words = [target if i in at else rng.choice(others) for i in range(length)]
  return (f"how many times does {target} appear in: {' '.join(words)}?", f"the count of {target} is {count}.",
          str(count))


def _facts(world: corpus.World) -> list[tuple[str, str, str]]:
  """Every fact question about `world` (capitals, ages, belongings), phrased as the corpus states them."""
  out = [(f"what is the capital of {c}?", f"the capital of {c} is {world.capitals[c]}.", world.capitals[c])
         for c in sorted(world.capitals)]
  for name in sorted(world.people):
    adj, noun, age = world.people[name]
    out.append((f"how old is {name}?", f"{name} is {age} years old.", str(age)))
    out.append((f"what does {name} have?", f"{name} has a {adj} {noun}.", f"{adj} {noun}"))
  return out


def generate_problems(num: int, seed: int = 0, *, world_seed: int | None = None,
                      split: str = "train") -> list[dict]:
  """`num` problems of the built-in task, identical for identical arguments; kinds in about equal shares.

  `split` picks the questions (`split_of`); `world_seed` (default `seed`) picks the `corpus.World`: use the
  pre-training corpus seed so the facts agree. Example: {"prompt": "what is 23 plus 45? put the answer in
  <answer></answer>.", "answer": "68", "solution": "23 plus 45 is 68. <answer>68</answer>",
  "kind": "arithmetic"}. Questions repeat (the world has 120 fact questions).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
  facts = [f for f in _facts(corpus.World(seed if world_seed is None else world_seed)) if split_of(f[0]) == split]
  kinds = [k for k in KINDS if k != "fact" or facts]  # a world whose facts all fall in the other split
  rng = random.Random(seed * 1000003 + 41)  # a stream distinct from the corpus's and the chat sets'
  out = []
  for _ in range(num):
    kind = rng.choice(kinds)
    if kind == "fact":
      question, sentence, answer = rng.choice(facts)
    else:
      make = _arithmetic if kind == "arithmetic" else _counting
      while True:  # rejection: about 1.25 draws for train, 5 for heldout (the spaces are large)
        question, sentence, answer = make(rng)
        if split_of(question) == split:
          break
    out.append({"prompt": question + INSTRUCTION, "answer": answer,
                "solution": f"{sentence} {ANSWER_OPEN}{answer}{ANSWER_CLOSE}", "kind": kind})
  return out


def task_conversations(num: int, seed: int = 0, *, world_seed: int | None = None,
                       split: str = "train") -> list[dict]:
  """The problems of `generate_problems` as one-turn SFT conversations (prompt -> solution).

  Example: {"messages": [{"role": "user", "content": "what is 23 plus 45? put the answer in
  <answer></answer>."}, {"role": "assistant", "content": "23 plus 45 is 68. <answer>68</answer>"}]}.
  """
  return [sft.pairs_to_conversation(p["prompt"], p["solution"])
          for p in generate_problems(num, seed, world_seed=world_seed, split=split)]


# ---------------------------------------------------------------------------------------------------------
# Prompt records


_GENERATED = "the completion is what the policy generates"


def validate_prompt_record(record: Any, *, prompt_field: str = "prompt",
                           answer_field: str = "answer") -> str | None:
  """Why `record` is not a usable RL prompt (one line), or None if it is.

  A record needs a `messages` history ending with the user's turn (it wins when both are present) or a
  non-empty string `prompt_field`, and an `answer_field` that is present and not null (any other JSON
  value: the reward functions decide what it means). Example: validate_prompt_record({"prompt": "2+3?"})
  -> "no field 'answer' ...".
  """
  if not isinstance(record, dict):
    return f"a prompt record must be a dict, got {type(record).__name__}"
  if "messages" in record:
    err = preference.validate_history(record["messages"], answer=_GENERATED)
    if err is not None:
      return err
  elif prompt_field in record:
    value = record[prompt_field]
    if not isinstance(value, str):
      return f"field '{prompt_field}' (data.prompt_field) must be a string, got {type(value).__name__}"
    if not value.strip():
      return f"field '{prompt_field}' (data.prompt_field) is an empty prompt"
  else:
    return (f"no 'messages' field and no field '{prompt_field}' (data.prompt_field) to prompt with; the record "
            f"has {sorted(record)[:8]}")
  if answer_field not in record:
    return (f"no field '{answer_field}' (the reference answer the rewards check); the record has "
            f"{sorted(record)[:8]}")
  if record[answer_field] is None:
    return f"field '{answer_field}' is null (the rewards need a reference answer)"
  return None


def to_prompt_record(record: dict, *, prompt_field: str = "prompt", answer_field: str = "answer") -> dict:
  """`record` as {"messages": history, "answer": value, **every other field}; ValueError if it is not usable.

  Example: {"q": "2+3?", "answer": 5, "id": 7} with prompt_field="q" -> {"messages": [{"role": "user",
  "content": "2+3?"}], "answer": 5, "q": "2+3?", "id": 7}.
  """
  err = validate_prompt_record(record, prompt_field=prompt_field, answer_field=answer_field)
  if err is not None:
    raise ValueError(err)
  if "messages" in record:
    history = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
  else:
    history = [{"role": "user", "content": record[prompt_field]}]
  rest = {k: v for k, v in record.items() if k not in ("messages", "answer")}
  return {"messages": history, "answer": record[answer_field], **rest}


def question_of(record: dict) -> str:
  """The last user message of a prompt record: what reward functions get as `prompt`.

  Example: {"messages": [sys, {"role": "user", "content": "2+3?"}], ...} -> "2+3?".
  """
  for m in reversed(record["messages"]):
    if m["role"] == "user":
      return m["content"]
  raise ValueError("prompt record has no user message")


def prompt_records(cfg: DataConfig, *, split: str = "train") -> Sequence[dict]:
  """Random-access normalised prompt records: the built-in task (`data.source='task'`, held-out problems
  drawn with another seed) or JSONL (`data.paths`, or `data.eval_paths` for split='heldout'), validated
  up front by `data.on_bad_record` and normalised on access."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
  if cfg.source == "task":
    seed = cfg.corpus_seed + 1 if split == "heldout" else cfg.corpus_seed  # fresh draws, same world
    problems = generate_problems(cfg.num_documents, seed, world_seed=cfg.corpus_seed, split=split)
    return [to_prompt_record(p) for p in problems]
  if cfg.source != "jsonl":
    raise ValueError(f"config field 'data.source'='{cfg.source}' is not a source of RL prompts; use one of "
                     f"{PROMPT_SOURCES} with diffusion.objective='grpo'")
  paths = cfg.paths if split == "train" else cfg.eval_paths
  if not paths:
    raise ValueError("config field 'data.eval_paths' must name held-out prompt files (JSONL) for validation "
                     "with data.source='jsonl' (or set train.eval_every=0)")
  fields = dict(prompt_field=cfg.prompt_field, answer_field="answer")
  records = sources.JsonlRecords(paths, on_error=cfg.on_bad_record,
                                 validate=lambda r: validate_prompt_record(r, **fields))
  if len(records) == 0:  # an empty source would make the endless loop spin forever
    raise ValueError(f"data.{'paths' if split == 'train' else 'eval_paths'}={paths!r} holds no prompt records")
  return sources.Mapped(records, _Normaliser(**fields))


class _Normaliser:
  """`to_prompt_record` with fixed field names (a class, so grain can pickle it)."""

  def __init__(self, prompt_field: str, answer_field: str):
    self.prompt_field, self.answer_field = prompt_field, answer_field

  def __call__(self, record: dict) -> dict:
    return to_prompt_record(record, prompt_field=self.prompt_field, answer_field=self.answer_field)


# ---------------------------------------------------------------------------------------------------------
# Batches of rollout prompts


class _ToPrompt:
  """The dataset's map: record index -> the left-padded prompt row, or None if it is longer than `width`
  (a class, so it pickles)."""

  def __init__(self, records: Sequence[dict], tok: Tokenizer, template: ChatTemplate, width: int,
               stats: SftStats, epoch_size: int):
    self.records, self.tok, self.template, self.width = records, tok, template, width
    self.stats, self.epoch_size = stats, epoch_size
    self.too_long: set[int] = set()  # record indices: whether a prompt fits never changes

  def __call__(self, index: int) -> dict[str, Any] | None:
    record = self.records[index]
    ids = sft.render_prompt(record["messages"], self.tok, self.template)
    if len(ids) > self.width:
      self.too_long.add(int(index))
      n = self.stats.add("dropped")
      if sft._worth_logging(n):
        logging.warning("RL prompts: dropped a prompt of %d tokens, longer than width=%d (train.seq_len - "
                        "grpo.gen_length); %d dropped so far", len(ids), self.width, n)
      # Without this, a width too small for every prompt would make the filter spin forever.
      if len(self.too_long) >= self.epoch_size:
        raise ValueError(f"every RL prompt was dropped: no prompt fits width W = train.seq_len - "
                         f"grpo.gen_length = {self.width} tokens (raise train.seq_len or lower grpo.gen_length)")
      return None
    self.stats.add("examples")
    prompt = np.full((self.width,), self.tok.pad_id, np.int32)
    prompt[self.width - len(ids):] = ids
    valid = np.arange(self.width) >= self.width - len(ids)
    return {"prompt": prompt, "prompt_valid": valid, "example": json.dumps(record)}


def _is_prompt(ex: dict[str, Any] | None) -> bool:
  return ex is not None


class _GroupBatch:
  """grain `batch_fn`: stacks the prompts, then repeats every row `group_size` times in place."""

  def __init__(self, group_size: int):
    self.group_size = group_size

  def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    batch = {"prompt": np.stack([e["prompt"] for e in examples]).astype(np.int32),
             "prompt_valid": np.stack([e["prompt_valid"] for e in examples]).astype(bool),
             "example": np.asarray([e["example"] for e in examples], dtype=np.str_)}
    return {k: np.repeat(v, self.group_size, axis=0) for k, v in batch.items()}


def prompt_dataset(records: Sequence[dict], tok: Tokenizer, *, width: int, batch_size: int, group_size: int,
                   seed: int, process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                   repeat: bool = True, template: ChatTemplate = ChatTemplate(),
                   stats: SftStats | None = None) -> grain.IterDataset:
  """A seeded, host-sharded dataset of rollout-prompt batches of normalised records (`to_prompt_record`).

  Each batch holds `batch_size // group_size` prompts, each in `group_size` consecutive rows:
  {"prompt": int32 [batch_size, width] (left-padded with tok.pad_id), "prompt_valid": bool [batch_size,
  width], "example": str [batch_size] (json.dumps of the record)}. A prompt longer than `width` is dropped
  and counted in `stats`. Endless and reshuffled every epoch by default; with repeat=False, shuffle=False
  each kept prompt comes once, in order, and a last batch that would be incomplete is left out (shapes
  stay static). The iterator's state is checkpointable (get_state / set_state).
  Example: 2 records, group_size 3, batch_size 6 -> rows [p0, p0, p0, p1, p1, p1].
  """
  if group_size < 1 or batch_size < 1 or batch_size % group_size:
    raise ValueError(f"config field 'train.batch_size' (this host's {batch_size} rows) must be a multiple of "
                     f"'grpo.num_generations'={group_size}: a batch holds whole groups of one prompt's rollouts")
  if width < 1:
    raise ValueError(f"no room for a prompt: width W = train.seq_len - grpo.gen_length = {width}")
  template.ids(tok)  # a tokenizer without the chat pieces fails now, not inside a grain worker
  if len(records) and "messages" not in records[0]:
    raise ValueError("prompt_dataset needs normalised prompt records {'messages', 'answer', ...} "
                     "(llada_jax.data.tasks.to_prompt_record)")
  shard = list(range(len(records)))[process_index::process_count]
  if not shard:
    raise ValueError(f"RL prompt data has {len(records)} prompts: too few for host {process_index} of "
                     f"{process_count}")
  to_prompt = _ToPrompt(records, tok, template, width, stats if stats is not None else SftStats(), len(shard))
  ds = grain.MapDataset.source(shard)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat(None)
  ds = ds.map(to_prompt).to_iter_dataset().filter(_is_prompt)
  return ds.batch(batch_size // group_size, drop_remainder=True, batch_fn=_GroupBatch(group_size))
