"""grain pipelines: documents -> token ids + EOS -> packed fixed-length sequences -> host-local batches.

Pre-training: documents (text, or already tokenized ids) are tokenized, EOS-terminated, concatenated and
cut into `seq_len` chunks (packing, as in the paper); the 1% random-length crop happens later, in the
loss module. SFT: conversations become (history -> answer) pairs rendered with the chat template
(llada_jax.data.sft). Preference optimisation: (prompt, chosen, rejected) records become two rows over
one shared prompt (llada_jax.data.preference). RL (diffu-GRPO): prompts with checkable answers become
left-padded prompt rows, each repeated for its group of rollouts (llada_jax.data.tasks). Each host reads
its own shard (`jax.process_index()` of `jax.process_count()`) and yields `batch_size // process_count`
rows, so the global batch is the per-host batch times the number of hosts. The iterator is a grain
`DatasetIterator`: its state is saved in the same checkpoint step as the model, so a resumed run sees
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from typing import Any, Callable, Iterator, Sequence

import grain
import jax
from absl import flags, logging
import numpy as np

from llada_jax import files, hosts, rewards
from llada_jax.config import Config, DataConfig
from llada_jax.data import corpus, preference, sft, sources, tasks, tokenizer as tokenizer_lib


def host_batch_size(global_batch: int, process_count: int | None = None) -> int:
  n = jax.process_count() if process_count is None else process_count
  if global_batch % n:
    raise ValueError(f"config field 'train.batch_size'={global_batch} must be a multiple of the "
                     f"number of hosts ({n})")
  return global_batch // n


def _to_ids(doc: Any, encode: Callable[[str], list[int]], eos_id: int) -> dict[str, np.ndarray]:
  ids = encode(doc) if isinstance(doc, str) else [int(i) for i in np.asarray(doc).reshape(-1)]
  return {"tokens": np.asarray(ids + [eos_id], np.int32)}


def _only_tokens(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"tokens": example["tokens"]}


def document_ids(tokens: np.ndarray, eos_id: int) -> np.ndarray:
  """int32, tokens' shape: the index of the packed document each token belongs to within its row, a
  document ending at (and including) its EOS. Example: [a, b, EOS, c, EOS, d] -> [0, 0, 0, 1, 1, 2]."""
  eos = (tokens == eos_id).astype(np.int32)
  return (np.cumsum(eos, axis=-1) - eos).astype(np.int32)


def _with_segments(example: dict[str, np.ndarray], eos_id: int) -> dict[str, np.ndarray]:
  return {"tokens": example["tokens"], "segments": document_ids(example["tokens"], eos_id)}


def packed_dataset(documents: Sequence[Any], encode, *, eos_id: int, seq_len: int, batch_size: int,
                   seed: int, process_index: int = 0, process_count: int = 1,
                   segments: bool = False) -> grain.IterDataset:
  """An endless, seeded, host-sharded dataset of {'tokens': int32 [batch_size, seq_len]} batches.

  `documents` is any random-access sequence of str (tokenized with `encode`) or int arrays (used as
  they are); each document ends with `eos_id`. `segments`: batches also hold 'segments', each token's
  document within its row (`document_ids`), for attention that stays inside a document.
  """
  ds = grain.MapDataset.source(documents)[process_index::process_count]
  ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.map(functools.partial(_to_ids, encode=encode, eos_id=eos_id))
  ds = grain.experimental.ConcatThenSplitIterDataset(ds.to_iter_dataset(), length_struct={"tokens": seq_len})
  rows = functools.partial(_with_segments, eos_id=eos_id) if segments else _only_tokens
  return _JsonRestorable(ds).map(rows).batch(batch_size, drop_remainder=True)


class _JsonRestorable(grain.IterDataset):
  """grain's concat-then-split packing, restorable from its state after a JSON round trip.

  Its state marks "no partial document held back" with the slice tuple (-1, -1). Checkpoints store
  iterator states as JSON (grain's Orbax handler), which gives back the list [-1, -1], and that iterator
  takes any value other than the tuple for a partial document: a run resumed from such a step read one
  document too many and went on with other batches than an uninterrupted run (1 step in ~25 of the tiny
  config; found by benchmarks/soak.py). `set_state` turns the slices back into tuples.
  """

  def __init__(self, parent: grain.IterDataset):
    super().__init__(parent)

  def __iter__(self) -> grain.DatasetIterator:
    return _JsonRestorableIterator(self._parent.__iter__())


class _JsonRestorableIterator(grain.DatasetIterator):

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    slices = state.get("remainder_slices")
    if isinstance(slices, dict):
      state = {**state, "remainder_slices": {k: tuple(v) for k, v in slices.items()}}
    self._parent.set_state(state)


def _pair_record(record: dict, prompt_field: str, response_field: str) -> dict:
  return sft.pairs_to_conversation(record[prompt_field], record[response_field])


def _validate_pair(record: dict, prompt_field: str, response_field: str) -> str | None:
  for f in (prompt_field, response_field):
    if not isinstance(record.get(f), str):
      return f"field '{f}' is missing or not a string"
  return None


def _validate_conversation(record: dict) -> str | None:
  if "messages" not in record:
    return "no 'messages' field"
  return sft.validate_messages(record["messages"])


_BUILT_IN = ("procedural", "task")  # sources whose tokenizer also learns the corpus's sentences


def sft_conversations(cfg: DataConfig) -> Sequence[dict]:
  """Random-access {'messages': [...]} conversations for SFT, from JSONL or a built-in set: the chat set
  ('procedural') or the solutions of the RL task ('task', llada_jax.data.tasks)."""
  if cfg.source == "procedural":
    return sft.generate_conversations(cfg.num_documents, cfg.corpus_seed)
  if cfg.source == "task":
    return tasks.task_conversations(cfg.num_documents, cfg.corpus_seed, world_seed=cfg.corpus_seed, split="train")
  if cfg.source != "jsonl":
    raise ValueError(f"config field 'data.source'='{cfg.source}' is not an SFT source; use 'jsonl', "
                     "'procedural' or 'task' with diffusion.objective='sft'")
  if cfg.sft_format == "messages":
    return sources.JsonlRecords(cfg.paths, on_error=cfg.on_bad_record, validate=_validate_conversation)
  fields = dict(prompt_field=cfg.prompt_field, response_field=cfg.response_field)
  records = sources.JsonlRecords(cfg.paths, on_error=cfg.on_bad_record,
                                 validate=functools.partial(_validate_pair, **fields))
  return sources.Mapped(records, functools.partial(_pair_record, **fields))


def _conversation_texts(conversations: Sequence[dict], limit: int) -> Iterator[str]:
  for i in range(min(len(conversations), limit)):
    for message in conversations[i]["messages"]:
      yield message["content"]


@dataclasses.dataclass
class TrainingData:
  tokenizer: Any
  iterator: grain.DatasetIterator
  description: str                 # one line for the log
  unigram_entropy: float | None    # nats/token of the built-in corpus (the loss to beat), else None
  sample_prompts: list[tuple[str, list[int]]]  # (shown text, token ids) to complete after training


def _doc_prompts(documents: Sequence[Any], tok, n: int, num_tokens: int = 8) -> list[tuple[str, list[int]]]:
  """The first tokens of the first `n` documents, each after an EOS (where documents start in packing)."""
  out = []
  for i in range(min(n, len(documents))):
    doc = documents[i]
    ids = (tok.encode(doc) if isinstance(doc, str) else [int(x) for x in doc])[:num_tokens]
    out.append((tok.decode(ids), [tok.eos_id] + ids))
  return out


def _maybe_prefetch(ds: grain.IterDataset, workers: int) -> grain.IterDataset:
  if not workers:
    return ds
  # grain's worker processes read absl flags; a notebook or test never parsed any.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


def _inherited_tokenizer(init_from: str) -> str:
  """The tokenizer of the run being fine-tuned: ids must keep their meaning across pre-training and SFT."""
  folder = files.path(init_from)
  if not folder.exists():
    raise FileNotFoundError(f"config field 'train.init_from'={init_from!r} does not exist: give the --workdir of "
                            "a pre-training run (or of llada-convert)")
  for candidate in (folder, folder.parent) if folder.name == "checkpoints" else (folder,):
    path = tokenizer_lib.find(candidate)
    if path is not None:
      return os.fspath(path)
  raise FileNotFoundError(f"config field 'train.init_from'={init_from!r} holds no {tokenizer_lib.TOKENIZER_FILE} "
                          f"or {tokenizer_lib.HF_TOKENIZER_FILE}; set data.tokenizer_path to the tokenizer the "
                          "pre-trained model used")


def _shared_tokenizer(make: Callable[[], Any]) -> Any:
  """`make()` on process 0 first (it trains and saves the workdir's tokenizer), then on the others,
  which find the saved file: every host tokenizes with the same pieces. The workdir must be shared
  (e.g. a gs:// bucket) on multi-host runs."""
  if jax.process_count() == 1:
    return make()
  tok = make() if jax.process_index() == 0 else None
  hosts.barrier("workdir tokenizer written")
  return tok if tok is not None else make()


def _host(config: Config, process_index: int | None, process_count: int | None) -> tuple[int, int, int]:
  """(this host's index, host count, rows of each global batch this host yields)."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  return pi, pc, host_batch_size(config.train.batch_size, pc)


def _tokenizer_source(config: Config) -> str:
  d, t = config.data, config.train
  return d.tokenizer_path or (_inherited_tokenizer(t.init_from) if t.init_from else "")


# Data builders of the objectives (llada_jax.objectives names one pair per objective). Each training
# builder returns the tokenizer (kept in the workdir) and this host's training iterator; its
# `process_index`/`process_count` (default: this process's) name another host's share, e.g. to rebuild
# a multi-host run's global batches. Each eval builder returns the held-out split as
# `train.eval_batches` host-local batches, fixed for the whole run so every validation sees the same
# data: built-in data holds out fresh documents (or chats) about the same world (another sample seed);
# files come from `data.eval_paths`, TFDS from `data.tfds_eval_split`.


def sft_training_data(config: Config, workdir: str, *, process_index: int | None = None,
                      process_count: int | None = None) -> TrainingData:
  """SFT: conversations (history -> answer pairs) in the chat template; fields tokens, prompt_len, valid."""
  d, t = config.data, config.train
  pi, pc, batch = _host(config, process_index, process_count)
  conversations = sft_conversations(d)
  docs = corpus.generate_documents(d.num_documents, d.corpus_seed) if d.source in _BUILT_IN else []
  sentences = lambda: itertools.chain(corpus.iter_sentences(docs),
                                      _conversation_texts(conversations, d.tokenizer_train_docs))
  tok = _shared_tokenizer(lambda: tokenizer_lib.load_or_train(
      workdir, sentences, d.tokenizer_vocab_size, d.tokenizer_model_type, _tokenizer_source(config)))
  ds = sft.sft_dataset(conversations, tok, seq_len=t.seq_len, batch_size=batch, seed=d.shuffle_seed,
                       process_index=pi, process_count=pc)
  prompts = []
  for i in range(min(t.num_samples, len(conversations))):
    history, _ = sft.conversation_pairs(conversations[i]["messages"])[0]
    prompts.append((history[-1]["content"], sft.render_prompt(history, tok)))
  return TrainingData(tok, iter(_maybe_prefetch(ds, d.mp_prefetch_workers)),
                      f"SFT data: {len(conversations)} conversations ({d.source})", None, prompts)


def sft_eval_batches(config: Config, tok, *, process_index: int | None = None,
                     process_count: int | None = None) -> list[dict[str, np.ndarray]]:
  d, t = config.data, config.train
  pi, pc, batch = _host(config, process_index, process_count)
  if d.source == "procedural":
    conversations = sft.generate_conversations(_num_held_out(d), d.corpus_seed + 1, world_seed=d.corpus_seed)
  elif d.source == "task":
    conversations = tasks.task_conversations(_num_held_out(d), d.corpus_seed + 1, world_seed=d.corpus_seed,
                                             split="heldout")
  else:
    conversations = sft_conversations(dataclasses.replace(d, paths=d.eval_paths))
  ds = sft.sft_dataset(conversations, tok, seq_len=t.seq_len, batch_size=batch, seed=0,
                       process_index=pi, process_count=pc)
  return _first_batches(ds, t.eval_batches)


def _preference_fields(cfg: DataConfig) -> dict[str, str]:
  return dict(fmt=cfg.sft_format, prompt_field=cfg.prompt_field, chosen_field=cfg.chosen_field,
              rejected_field=cfg.rejected_field)


def preference_records(cfg: DataConfig) -> Sequence[dict]:
  """Random-access preference records {'messages': history, 'chosen', 'rejected'}, from JSONL or the
  built-in set (llada_jax.data.preference); JSONL pairs or custom field names are mapped on access."""
  if cfg.source == "procedural":
    return preference.generate_preferences(cfg.num_documents, cfg.corpus_seed, split="train")
  if cfg.source != "jsonl":
    raise ValueError(f"config field 'data.source'='{cfg.source}' is not a preference source; use 'jsonl' or "
                     "'procedural' with diffusion.objective='vrpo' or 'ar_dpo'")
  fields = _preference_fields(cfg)
  records = sources.JsonlRecords(cfg.paths, on_error=cfg.on_bad_record,
                                 validate=functools.partial(preference.validate_record, **fields))
  return sources.Mapped(records, functools.partial(preference.to_messages_record, **fields))


def _preference_texts(records: Sequence[dict], limit: int) -> Iterator[str]:
  for i in range(min(len(records), limit)):
    r = records[i]
    yield from (m["content"] for m in r["messages"])
    yield r["chosen"]
    yield r["rejected"]


def preference_training_data(config: Config, workdir: str, *, process_index: int | None = None,
                             process_count: int | None = None) -> TrainingData:
  """Preference optimisation (vrpo, ar_dpo): (prompt, chosen, rejected) in the chat template; fields
  chosen, rejected, prompt_len, valid (llada_jax.data.preference.batch_pairs)."""
  d, t = config.data, config.train
  pi, pc, batch = _host(config, process_index, process_count)
  records = preference_records(d)
  docs = corpus.generate_documents(d.num_documents, d.corpus_seed) if d.source == "procedural" else []
  sentences = lambda: itertools.chain(corpus.iter_sentences(docs),
                                      _preference_texts(records, d.tokenizer_train_docs))
  tok = _shared_tokenizer(lambda: tokenizer_lib.load_or_train(
      workdir, sentences, d.tokenizer_vocab_size, d.tokenizer_model_type, _tokenizer_source(config)))
  ds = preference.preference_dataset(records, tok, seq_len=t.seq_len, batch_size=batch, seed=d.shuffle_seed,
                                     process_index=pi, process_count=pc)
  prompts = []
  for i in range(min(t.num_samples, len(records))):
    history, _, _ = preference.to_pair(records[i])
    prompts.append((history[-1]["content"], sft.render_prompt(history, tok)))
  return TrainingData(tok, iter(_maybe_prefetch(ds, d.mp_prefetch_workers)),
                      f"preference data: {len(records)} pairs ({d.source})", None, prompts)


def preference_eval_batches(config: Config, tok, *, process_index: int | None = None,
                            process_count: int | None = None) -> list[dict[str, np.ndarray]]:
  """Held-out pairs: built-in ones ask only about held-out entities (preference.split_entities)."""
  d, t = config.data, config.train
  pi, pc, batch = _host(config, process_index, process_count)
  if d.source == "procedural":
    records = preference.generate_preferences(_num_held_out(d), d.corpus_seed + 1, world_seed=d.corpus_seed,
                                              split="heldout")
  else:
    records = preference_records(dataclasses.replace(d, paths=d.eval_paths))
  ds = preference.preference_dataset(records, tok, seq_len=t.seq_len, batch_size=batch, seed=0,
                                     process_index=pi, process_count=pc)
  return _first_batches(ds, t.eval_batches)


def packed_training_data(config: Config, workdir: str, *, segments: bool = False, process_index: int | None = None,
                         process_count: int | None = None) -> TrainingData:
  """Pre-training (and the causal baseline): documents packed into `seq_len` rows; field tokens."""
  d, t = config.data, config.train
  _check_pretraining_source(d)
  pi, pc, batch = _host(config, process_index, process_count)
  tok_source = _tokenizer_source(config)
  entropy = None
  if d.source == "procedural":
    documents: Sequence[Any] = corpus.generate_documents(d.num_documents, d.corpus_seed)
    sentences = lambda: corpus.iter_sentences(documents)
  else:
    if d.source == "array_record" and not tok_source:
      raise ValueError("config field 'data.tokenizer_path' must name the tokenizer (a sentencepiece .model, or "
                       "a Hugging Face tokenizer.json or its folder) that produced the ids in the ArrayRecord "
                       "files of data.source='array_record'")
    documents = sources.make_source(d)
    sentences = lambda: sources.sample_texts(documents, d.tokenizer_train_docs, d.shuffle_seed)
  tok = _shared_tokenizer(lambda: tokenizer_lib.load_or_train(
      workdir, sentences, d.tokenizer_vocab_size, d.tokenizer_model_type, tok_source))
  if d.source == "procedural":
    prompts = [(p, [tok.eos_id] + tok.encode(p)) for p in corpus.sample_prompts()[: t.num_samples]]
    if pi == 0:
      entropy = corpus.unigram_entropy(documents, tok.encode, tok.eos_id)
  else:
    prompts = _doc_prompts(documents, tok, t.num_samples)
  ds = packed_dataset(documents, tok.encode, eos_id=tok.eos_id, seq_len=t.seq_len, batch_size=batch,
                      seed=d.shuffle_seed, process_index=pi, process_count=pc, segments=segments)
  return TrainingData(tok, iter(_maybe_prefetch(ds, d.mp_prefetch_workers)),
                      f"pre-training data: {len(documents)} documents ({d.source})", entropy, prompts)


def packed_eval_batches(config: Config, tok, *, segments: bool = False, process_index: int | None = None,
                        process_count: int | None = None) -> list[dict[str, np.ndarray]]:
  d, t = config.data, config.train
  _check_pretraining_source(d)
  pi, pc, batch = _host(config, process_index, process_count)
  if d.source == "procedural":
    documents: Sequence[Any] = corpus.generate_documents(_num_held_out(d), d.corpus_seed + 1,
                                                         world_seed=d.corpus_seed)
  elif d.source == "tfds":
    documents = sources.make_source(dataclasses.replace(d, tfds_split=d.tfds_eval_split))
  else:
    documents = sources.make_source(dataclasses.replace(d, paths=d.eval_paths))
  ds = packed_dataset(documents, tok.encode, eos_id=tok.eos_id, seq_len=t.seq_len, batch_size=batch,
                      seed=0, process_index=pi, process_count=pc, segments=segments)
  return _first_batches(ds, t.eval_batches)


def _check_pretraining_source(d: DataConfig) -> None:
  if d.source == "task":
    raise ValueError("config field 'data.source'='task' is the built-in RL task (prompts with checkable answers, "
                     "for diffusion.objective='grpo' or 'sft'), not a pre-training corpus; pre-train on "
                     "'procedural' (the same world) or files")


def _rl_width(config: Config) -> int:
  """Prompt positions of a rollout row: the row is the prompt, then grpo.gen_length generated tokens
  (Config checks that train.seq_len leaves some)."""
  return config.train.seq_len - config.grpo.gen_length


def _prompt_texts(records: Sequence[dict], limit: int) -> Iterator[str]:
  for i in range(min(len(records), limit)):
    r = records[i]
    yield from (m["content"] for m in r["messages"])
    for field in ("answer", "solution"):
      if isinstance(r.get(field), (str, int, float)):
        yield str(r[field])


def _check_answer_tags(tok, config: Config) -> None:
  """Refuses a tokenizer that cannot write `<answer>42</answer>` when the task or a built-in reward needs
  it: a sentencepiece model trained without the tag pieces turns '<' and '>' into unknown pieces, and
  no completion could ever earn those rewards. Custom rewards may not read tags: a warning then."""
  text = f"{tasks.ANSWER_OPEN}42{tasks.ANSWER_CLOSE}"
  back = tok.decode(tok.encode(text))
  if back == text:
    return
  why = (f"the tokenizer cannot write the answer tags: {text!r} decodes back as {back!r} (a sentencepiece "
         "tokenizer trained before the tags became pieces; pre-train with a new one, or give "
         "data.tokenizer_path a tokenizer that spells them)")
  tagged = sorted(set(config.grpo.rewards) & set(rewards.TAGGED))
  if config.data.source == "task" or tagged:
    needs = ("data.source='task' asks for them" if config.data.source == "task" else
             f"grpo.rewards {tagged} read them")
    raise ValueError(f"{why}; {needs}")
  logging.warning("%s; only a reward that does not read the tags can score completions", why)


def rl_training_data(config: Config, workdir: str, *, process_index: int | None = None,
                     process_count: int | None = None) -> TrainingData:
  """diffu-GRPO (grpo): prompts with checkable answers, left-padded to train.seq_len - grpo.gen_length
  and repeated for their groups of grpo.num_generations rollouts; fields prompt, prompt_valid, example
  (llada_jax.data.tasks.prompt_dataset). The rollouts themselves are made by the training loop."""
  d, t, g = config.data, config.train, config.grpo
  pi, pc, batch = _host(config, process_index, process_count)
  records = tasks.prompt_records(d, split="train")
  docs = corpus.generate_documents(d.num_documents, d.corpus_seed) if d.source == "task" else []
  sentences = lambda: itertools.chain(corpus.iter_sentences(docs), _prompt_texts(records, d.tokenizer_train_docs))
  tok = _shared_tokenizer(lambda: tokenizer_lib.load_or_train(
      workdir, sentences, d.tokenizer_vocab_size, d.tokenizer_model_type, _tokenizer_source(config)))
  _check_answer_tags(tok, config)
  ds = tasks.prompt_dataset(records, tok, width=_rl_width(config), batch_size=batch, group_size=g.num_generations,
                            seed=d.shuffle_seed, process_index=pi, process_count=pc)
  prompts = [(tasks.question_of(records[i]), sft.render_prompt(records[i]["messages"], tok))
             for i in range(min(t.num_samples, len(records)))]
  return TrainingData(tok, iter(_maybe_prefetch(ds, d.mp_prefetch_workers)),
                      f"RL prompts: {len(records)} problems ({d.source})", None, prompts)


def rl_eval_batches(config: Config, tok, *, process_index: int | None = None,
                    process_count: int | None = None) -> list[dict[str, np.ndarray]]:
  """Held-out prompts, one row each (no groups), in order, each once: the task's held-out questions
  (llada_jax.data.tasks.split_of) or data.eval_paths; `train.eval_batches` batches, fewer if the split runs
  out. On several hosts every host takes as many batches as the smallest host share fills, so that all
  of them validate the same number of batches."""
  d, t = config.data, config.train
  pi, pc, batch = _host(config, process_index, process_count)
  width = _rl_width(config)
  records = tasks.prompt_records(d, split="heldout")
  ds = tasks.prompt_dataset(records, tok, width=width, batch_size=batch, group_size=1, seed=0,
                            shuffle=False, repeat=False, process_index=pi, process_count=pc)
  want = t.eval_batches if pc == 1 else min(t.eval_batches, len(records) // pc // batch)
  out = list(itertools.islice(iter(ds), want))
  if not out:
    raise ValueError(f"too few held-out RL prompts: {len(records)} held-out prompts ({d.source}), shared by {pc} "
                     f"host(s), fill no batch of {batch} rows (train.batch_size per host) that fit width "
                     f"{width}; add held-out prompts or set train.eval_every=0")
  if pc > 1 and len(out) < want:  # another host would validate more batches than this one
    raise ValueError(f"host {pi} of {pc} fills {len(out)} held-out RL batches, fewer than the {want} every host "
                     f"takes: its share has prompts longer than width {width} (train.seq_len - grpo.gen_length)")
  return out


def _num_held_out(d: DataConfig) -> int:
  return max(200, d.num_documents // 10)


def _first_batches(ds: grain.IterDataset, n: int) -> list[dict[str, np.ndarray]]:
  it = iter(ds)
  return [next(it) for _ in range(n)]
