"""Preference data (DPO / VRPO): one prompt, a chosen and a rejected response, static-shape grain batches.

A record is one preference pair, in one of two formats (`data.sft_format`):
  pairs     {prompt_field: "q", chosen_field: "a+", rejected_field: "a-"}
  messages  {"messages": [optional system, user, assistant, ..., user], chosen_field: ..., rejected_field: ...}
where each response is a string or an {"role": "assistant", "content": str} message. The prompt is the
history (ending with the user's turn) rendered by the SFT chat template (llada_jax.data.sft); each
response is rendered as an SFT answer (stripped text + `<|eot_id|>`). Both rows of a pair share the
prompt ids, so the policy / reference log-ratios of the two responses differ only in the response:
  chosen    [<prompt ids> | <chosen ids> <|eot_id|>   <EOS> <EOS> ...]
  rejected  [<prompt ids> | <rejected ids> <|eot_id|> <EOS> ...]
"|" is `prompt_len`. As in SFT, EOS pads after a response belong to it (the model learns to stop) up to
the batch's longest response, `valid` marks that common length, and shapes stay `[B, seq_len]`.

The built-in procedural set (`generate_preferences`) asks about the facts of the corpus world
(corpus.World), so every preference can be checked (`prefers`):
  fact    "how old is Kalo?" -> chosen "Kalo is 42 years old.", rejected "Kalo is 17 years old." (a wrong
          value: another capital, another age, another adjective + noun)
  format  "how old is Kalo? answer in one word." -> chosen "42.", rejected "Kalo is 42 years old." (true,
          but ignores the instruction)
About a fifth of the world's countries and people are held out (`split_entities`): split='train' never
asks about them, split='heldout' asks only about them, so held-out pairs are unseen in training.
"""

from __future__ import annotations

import random
import re
from typing import Any, Sequence

import grain
import numpy as np
from absl import logging

from llada_jax.data import corpus, sft
from llada_jax.data.sft import ChatTemplate, Message, SftStats
from llada_jax.data.tokenizer import Tokenizer

FORMATS = ("messages", "pairs")  # the values of data.sft_format
_PLACEHOLDER: Message = {"role": "assistant", "content": "x"}  # stands in for the response when validating

# ---------------------------------------------------------------------------------------------------------
# Records


def _response_error(record: dict, field: str) -> str | None:
  if field not in record:
    return f"no field '{field}' (the record has {sorted(record)[:8]})"
  value = record[field]
  if isinstance(value, dict):
    if value.get("role") != "assistant" or not isinstance(value.get("content"), str):
      return (f"field '{field}' must be a string or an {{'role': 'assistant', 'content': str}} message, got "
              f"a dict with keys {sorted(value)[:8]}")
    value = value["content"]
  elif not isinstance(value, str):
    return (f"field '{field}' must be a string or an {{'role': 'assistant', 'content': str}} message, got "
            f"{type(value).__name__}")
  if not value.strip():
    return f"field '{field}' is an empty response"
  return None


def _response(value: str | Message) -> str:
  return value["content"] if isinstance(value, dict) else value


def validate_history(messages: Any, *,
                     answer: str = "the responses belong in the chosen and rejected fields") -> str | None:
  """Why `messages` is not a prompt history (ends with the user's turn), or None. `answer` says where the
  reply comes from instead, for the message about a history that ends with one.

  Example: validate_history([{"role": "user", "content": "hi"}]) -> None; with an assistant message
  appended -> "'messages' must end with the user's turn, got an 'assistant' message last (...)".
  """
  if not isinstance(messages, (list, tuple)):
    return f"'messages': {sft.validate_messages(messages)}"
  if not messages:
    return "'messages' is empty (the prompt needs at least the user's turn)"
  last = messages[-1]
  if isinstance(last, dict) and last.get("role") == "assistant":
    return f"'messages' must end with the user's turn, got an 'assistant' message last ({answer})"
  if isinstance(last, dict) and last.get("role") == "system" and len(messages) == 1:
    return "'messages' has no user turn (only a system message)"
  # A history plus one answer is exactly a trainable SFT conversation: reuse its checks.
  err = sft.validate_messages([*messages, _PLACEHOLDER])
  return None if err is None else f"'messages': {err}"


def validate_record(record: Any, *, fmt: str = "messages", prompt_field: str = "prompt",
                    chosen_field: str = "chosen", rejected_field: str = "rejected") -> str | None:
  """Why `record` is not a preference pair (one line), or None if it is.

  Example: validate_record({"prompt": "hi", "chosen": "hello.", "rejected": " hello. "}, fmt="pairs")
  -> "fields 'chosen' and 'rejected' hold the same response ...".
  """
  if fmt not in FORMATS:
    raise ValueError(f"config field 'data.sft_format' must be one of {FORMATS}; got {fmt!r}")
  if not isinstance(record, dict):
    return f"a preference record must be a dict, got {type(record).__name__}"
  if fmt == "pairs":
    if not isinstance(record.get(prompt_field), str):
      return f"field '{prompt_field}' is missing or not a string"
  elif "messages" not in record:
    return f"no 'messages' field (the record has {sorted(record)[:8]})"
  else:
    err = validate_history(record["messages"])
    if err is not None:
      return err
  for field in (chosen_field, rejected_field):
    err = _response_error(record, field)
    if err is not None:
      return err
  if _response(record[chosen_field]).strip() == _response(record[rejected_field]).strip():
    return (f"fields '{chosen_field}' and '{rejected_field}' hold the same response (a pair must differ to "
            f"express a preference)")
  return None


def to_pair(record: dict, *, fmt: str = "messages", prompt_field: str = "prompt", chosen_field: str = "chosen",
            rejected_field: str = "rejected") -> tuple[list[Message], str, str]:
  """(history ending with the user's turn, chosen text, rejected text); ValueError for a bad record.

  Example: to_pair({"prompt": "hi", "chosen": "hello.", "rejected": "go away."}, fmt="pairs")
  -> ([{"role": "user", "content": "hi"}], "hello.", "go away.").
  """
  err = validate_record(record, fmt=fmt, prompt_field=prompt_field, chosen_field=chosen_field,
                        rejected_field=rejected_field)
  if err is not None:
    raise ValueError(err)
  if fmt == "pairs":
    history = [{"role": "user", "content": record[prompt_field]}]
  else:
    history = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
  return history, _response(record[chosen_field]), _response(record[rejected_field])


def to_messages_record(record: dict, **fields: str) -> dict:
  """A record of either format as {"messages": history, "chosen": str, "rejected": str} (the default fields).

  Example: {"q": "hi", "good": "hello.", "bad": "no."} with fmt="pairs", prompt_field="q",
  chosen_field="good", rejected_field="bad" -> {"messages": [{"role": "user", "content": "hi"}],
  "chosen": "hello.", "rejected": "no."}.
  """
  history, chosen, rejected = to_pair(record, **fields)
  return {"messages": history, "chosen": chosen, "rejected": rejected}


# ---------------------------------------------------------------------------------------------------------
# Examples and batches


def make_pair_example(prompt_ids: Sequence[int], chosen_ids: Sequence[int], rejected_ids: Sequence[int], *,
                      seq_len: int, eos_id: int, stats: SftStats | None = None) -> dict[str, np.ndarray] | None:
  """Two fixed-length rows over one shared prompt, `[prompt, chosen, EOS...]` and `[prompt, rejected,
  EOS...]`, or None if the longer response cannot fit.

  As `sft.make_example`, but the budget is set by the longer response, so both rows keep the same
  (left-truncated) prompt. Example: prompt [2, 9], chosen [5], rejected [6, 7], seq_len 5, eos 1 ->
  chosen [2, 9, 5, 1, 1], rejected [2, 9, 6, 7, 1], prompt_len 2, length 4.
  """
  stats = stats if stats is not None else SftStats()
  n_resp = max(len(chosen_ids), len(rejected_ids))
  if n_resp + 1 > seq_len:
    n = stats.add("dropped")
    if sft._worth_logging(n):
      logging.warning("preference: dropped a pair whose longer response (%d tokens) does not fit seq_len=%d "
                      "with at least one prompt token; %d dropped so far", n_resp, seq_len, n)
    return None
  prompt = list(prompt_ids)
  if len(prompt) + n_resp > seq_len:
    keep = seq_len - n_resp
    n = stats.add("truncated")
    if sft._worth_logging(n):
      logging.warning("preference: truncated a prompt from the left, %d -> %d tokens (longer response %d, "
                      "seq_len %d); %d truncated so far", len(prompt), keep, n_resp, seq_len, n)
    prompt = prompt[len(prompt) - keep:]
  stats.add("examples")
  out = {}
  for name, response in (("chosen", chosen_ids), ("rejected", rejected_ids)):
    tokens = np.full((seq_len,), eos_id, np.int32)
    tokens[:len(prompt)] = prompt
    tokens[len(prompt):len(prompt) + len(response)] = response
    out[name] = tokens
  return {**out, "prompt_len": np.int32(len(prompt)), "length": np.int32(len(prompt) + n_resp)}


def batch_pairs(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """grain `batch_fn`: stacks both rows of each pair; `valid` ends at the batch's longest pair.

  Example: pairs of seq_len 6 with lengths 3 and 4 -> valid [[T, T, T, T, F, F]] * 2, shared by the
  chosen and the rejected rows (every response is EOS-padded to one common length).
  """
  chosen = np.stack([e["chosen"] for e in examples]).astype(np.int32)
  rejected = np.stack([e["rejected"] for e in examples]).astype(np.int32)
  longest = max(int(e["length"]) for e in examples)
  valid = np.broadcast_to(np.arange(chosen.shape[1]) < longest, chosen.shape).copy()
  return {"chosen": chosen, "rejected": rejected,
          "prompt_len": np.asarray([e["prompt_len"] for e in examples], np.int32), "valid": valid}


# ---------------------------------------------------------------------------------------------------------
# Datasets


class _ToPairExample:
  """The dataset's map: record index -> `make_pair_example` rows or None (a class, so it pickles)."""

  def __init__(self, source: Sequence[Any], tok: Tokenizer, template: ChatTemplate, seq_len: int,
               stats: SftStats, epoch_size: int, fields: dict[str, str]):
    self.source, self.tok, self.template, self.seq_len = source, tok, template, seq_len
    self.stats, self.epoch_size, self.fields, self.consecutive_drops = stats, epoch_size, fields, 0

  def __call__(self, index: int) -> dict[str, np.ndarray] | None:
    history, chosen, rejected = to_pair(self.source[index], **self.fields)
    ex = make_pair_example(sft.render_prompt(history, self.tok, self.template),
                           sft.render_response(chosen, self.tok, self.template),
                           sft.render_response(rejected, self.tok, self.template),
                           seq_len=self.seq_len, eos_id=self.tok.eos_id, stats=self.stats)
    # Without this, a seq_len too short for every pair would make the filter spin forever.
    self.consecutive_drops = self.consecutive_drops + 1 if ex is None else 0
    if self.consecutive_drops > self.epoch_size:
      raise ValueError(f"every preference pair of a whole epoch was dropped: no response fits "
                       f"seq_len={self.seq_len}")
    return ex


def _is_example(ex: dict[str, np.ndarray] | None) -> bool:
  return ex is not None


def preference_dataset(records_source: Sequence[Any], tok: Tokenizer, *, seq_len: int, batch_size: int,
                       seed: int, fmt: str = "messages", prompt_field: str = "prompt",
                       chosen_field: str = "chosen", rejected_field: str = "rejected",
                       template: ChatTemplate = ChatTemplate(), process_index: int = 0, process_count: int = 1,
                       stats: SftStats | None = None) -> grain.IterDataset:
  """An endless, seeded, host-sharded dataset of preference batches (see `batch_pairs`).

  Every record is validated up front (a bad one raises ValueError naming its index) and tokenized
  lazily. Example: next(iter(preference_dataset(records, tok, seq_len=64, batch_size=4, seed=0)))
  -> {"chosen": int32 [4, 64], "rejected": int32 [4, 64], "prompt_len": int32 [4], "valid": bool [4, 64]}.
  """
  template.ids(tok)  # a tokenizer without the chat pieces fails now, not inside a grain worker
  fields = dict(fmt=fmt, prompt_field=prompt_field, chosen_field=chosen_field, rejected_field=rejected_field)
  for i in range(len(records_source)):
    err = validate_record(records_source[i], **fields)
    if err is not None:
      raise ValueError(f"preference record {i}: {err}")
  shard = list(range(len(records_source)))[process_index::process_count]
  if not shard:
    raise ValueError(f"preference data has {len(records_source)} pairs: too few for host {process_index} "
                     f"of {process_count}")
  to_example = _ToPairExample(records_source, tok, template, seq_len,
                              stats if stats is not None else SftStats(), len(shard), fields)
  ds = grain.MapDataset.source(shard).shuffle(seed=seed).repeat(None).map(to_example)
  ds = ds.to_iter_dataset().filter(_is_example)
  return ds.batch(batch_size, drop_remainder=True, batch_fn=batch_pairs)


# ---------------------------------------------------------------------------------------------------------
# The built-in procedural preference set

SPLITS = ("train", "heldout")
KINDS = ("fact", "format")


def split_entities(world: corpus.World) -> tuple[set[str], set[str]]:
  """(held-out countries, held-out people): every 5th of each in sorted order, about 20%.

  Example: a world of 40 countries and 40 people -> 8 countries and 8 people held out.
  """
  return set(sorted(world.capitals)[::5]), set(sorted(world.people)[::5])


def _says(text: str, value: str) -> bool:
  """Whether `text` holds `value` as whole words, case-insensitively ("42" is not in "142")."""
  return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text, re.IGNORECASE) is not None


def _fact_pair(rng: random.Random, world: corpus.World, countries: list[str],
               people: list[str]) -> tuple[str, str, str, str, str]:
  """(question, true sentence, true value, wrong sentence, instruction suffix), phrased as sft._qa."""
  kind = rng.randrange(3)
  if kind == 0:
    c = rng.choice(countries)
    true = world.capitals[c]
    # Wrong capitals come from the same split, so a held-out capital never appears in training pairs.
    wrong = sorted({world.capitals[o] for o in countries} - {true}) or sorted(set(world.capitals.values()) - {true})
    pick = rng.choice(wrong)
    return (f"what is the capital of {c}?", f"the capital of {c} is {true}.", true,
            f"the capital of {c} is {pick}.", " answer in one word.")
  name = rng.choice(people)
  adj, noun, age = world.people[name]
  if kind == 1:
    pick = rng.choice([a for a in range(3, 91) if a != age])
    return (f"how old is {name}?", f"{name} is {age} years old.", str(age), f"{name} is {pick} years old.",
            " answer in one word.")
  while True:
    other = (rng.choice(corpus._ADJS), rng.choice(corpus._NOUNS))
    if other != (adj, noun):
      break
  return (f"what does {name} have?", f"{name} has a {adj} {noun}.", f"{adj} {noun}",
          f"{name} has a {other[0]} {other[1]}.", " answer in two words.")


def generate_preferences(num: int, seed: int = 0, *, world_seed: int | None = None,
                         split: str = "train") -> list[dict]:
  """`num` preference records about the corpus world, identical for identical arguments.

  About half each kind (see the module docstring); `split` picks the entities asked about (see
  `split_entities`); `world_seed` (default `seed`) picks the `corpus.World`: use the pre-training
  corpus seed so the facts agree. Example: {"messages": [{"role": "user", "content": "how old is
  Kalo?"}], "chosen": "Kalo is 42 years old.", "rejected": "Kalo is 17 years old.", "kind": "fact",
  "target": "42"}.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
  world = corpus.World(seed if world_seed is None else world_seed)
  held_countries, held_people = split_entities(world)
  held = split == "heldout"
  countries = [c for c in sorted(world.capitals) if (c in held_countries) == held]
  people = [p for p in sorted(world.people) if (p in held_people) == held]
  # A stream distinct from the corpus's random.Random(seed) and the SFT set's.
  rng = random.Random(seed * 1000003 + 29)
  out = []
  for _ in range(num):
    question, sentence, value, wrong, suffix = _fact_pair(rng, world, countries, people)
    if rng.random() < 0.5:
      record = {"messages": [{"role": "user", "content": question}], "chosen": sentence, "rejected": wrong,
                "kind": "fact", "target": value}
    else:
      record = {"messages": [{"role": "user", "content": question + suffix}], "chosen": value + ".",
                "rejected": sentence, "kind": "format", "target": value + "."}
    out.append(record)
  return out


def _rejected_value(record: dict) -> str:
  """The wrong value a fact record's rejected sentence states: the chosen sentence has the target there."""
  chosen, rejected, target = record["chosen"], record["rejected"], record["target"]
  i = chosen.rfind(target)
  head, tail = chosen[:i], chosen[i + len(target):]
  if i < 0 or not (rejected.startswith(head) and rejected.endswith(tail)):
    raise ValueError(f"not a fact record of generate_preferences: {record!r:.120}")
  return rejected[len(head):len(rejected) - len(tail)]


def prefers(record: dict, answer: str) -> bool:
  """Whether a generated `answer` is the preferred one, for a record of `generate_preferences`.

  fact: the answer states the true value (record["target"], as whole words, case-insensitive) and not
  the wrong value of the rejected response; so "Kalo is 42 years old." and "42" pass, "Kalo is 17 years
  old." and "42, or maybe 17" fail. format: the answer has the requested form, as many words as the
  chosen one ("42." one, "red cat." two; a final "." allowed), whatever the value: the preference these
  pairs teach is the form (both responses state the true value); the full sentence fails, and so does
  an empty answer. Whether the value is also right is what the fact pairs check.
  """
  if record.get("kind") == "format":
    words = lambda text: text.strip().rstrip(".").split()
    return bool(words(answer)) and len(words(answer)) == len(words(record["chosen"]))
  if record.get("kind") != "fact":
    raise ValueError(f"prefers() needs a record of generate_preferences (kind 'fact' or 'format'); got "
                     f"kind {record.get('kind')!r}")
  return _says(answer, record["target"]) and not _says(answer, _rejected_value(record))
