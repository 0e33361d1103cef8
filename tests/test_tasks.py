"""RL prompt data: the built-in verifiable task, prompt records from JSONL, rollout-prompt batches, the RL
builders, SFT and pre-training on data.source='task', and the answer-tag pieces of the tokenizer."""

import collections
import json
import logging
import pickle
import re

import numpy as np
import pytest

from llada_jax import config as config_lib, rewards
from llada_jax.configs import default
from llada_jax.data import corpus, pipeline, sft, tasks, tokenizer

SH, EH, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"

_ARITHMETIC = re.compile(r"^what is (\d+) (plus|minus) (\d+)\?$")
_COUNTING = re.compile(r"^how many times does (\w+) appear in: ([\w ]+)\?$")
_FACT = re.compile(r"^(?:what is the capital of (\w+)\?|how old is (\w+)\?|what does (\w+) have\?)$")

HAND = [
    {"prompt": "what is 2 plus 3?", "answer": 5, "id": 1},
    {"messages": [{"role": "system", "content": "be brief."}, {"role": "user", "content": "use 3 5 2 to make 16"}],
     "answer": "(3 + 5) * 2", "numbers": [3, 5, 2], "target": 16},
]


@pytest.fixture(scope="module")
def tok():
  docs = corpus.generate_documents(300, seed=0)
  texts = [t for p in tasks.generate_problems(300, seed=0) for t in (p["prompt"], p["solution"])]
  return tokenizer.train_sentencepiece([*corpus.iter_sentences(docs), *texts, "user assistant system", "be brief.",
                                        "use 3 5 2 to make 16"], 384)


def _question(prompt: str) -> str:
  assert prompt.endswith(tasks.INSTRUCTION), prompt
  return prompt[:-len(tasks.INSTRUCTION)]


def _truth(question: str, world: corpus.World) -> tuple[str, str]:
  """(kind, answer) recomputed from the question text and the world."""
  if m := _ARITHMETIC.match(question):
    a, b = int(m[1]), int(m[3])
    assert m[2] == "plus" or a >= b, question
    return "arithmetic", str(a + b if m[2] == "plus" else a - b)
  if m := _COUNTING.match(question):
    words = m[2].split()
    assert 3 <= len(words) <= 6 and set(words) <= set(corpus._NOUNS), question
    return "counting", str(words.count(m[1]))
  m = _FACT.match(question)
  assert m is not None, question
  if m[1]:
    return "fact", world.capitals[m[1]]
  adj, noun, age = world.people[m[2] or m[3]]
  return "fact", str(age) if m[2] else f"{adj} {noun}"


# ---------------------------------------------------------------------------------------------------------
# The built-in task


def test_problems_are_deterministic_right_and_solved_by_their_solutions():
  problems = tasks.generate_problems(3000, seed=3, world_seed=0)
  assert problems == tasks.generate_problems(3000, seed=3, world_seed=0)
  assert problems != tasks.generate_problems(3000, seed=4, world_seed=0)
  world = corpus.World(0)
  kinds = collections.Counter()
  counts = set()
  for p in problems:
    assert set(p) == {"prompt", "answer", "solution", "kind"}
    kind, answer = _truth(_question(p["prompt"]), world)
    assert (p["kind"], p["answer"]) == (kind, answer), p
    assert p["solution"].endswith(f". <answer>{answer}</answer>")
    record = tasks.to_prompt_record(p)
    assert rewards.correct(tasks.question_of(record), p["solution"], record) == 1.0
    assert rewards.format_reward(tasks.question_of(record), p["solution"], record) == 0.25
    kinds[kind] += 1
    if kind == "counting":
      counts.add(answer)
  assert set(kinds) == set(tasks.KINDS) and all(800 < n < 1200 for n in kinds.values()), kinds
  assert counts == {"0", "1", "2", "3", "4"}
  # Capital, age and belongings questions all occur; the facts are the pre-training world's.
  facts = {_question(p["prompt"]).split()[1] for p in problems if p["kind"] == "fact"}
  assert facts == {"is", "old", "does"}
  assert "the capital of" in " ".join(corpus.generate_documents(50, seed=0))


def test_train_and_heldout_questions_are_disjoint():
  questions = {}
  for split, seed in (("train", 0), ("heldout", 1)):
    problems = tasks.generate_problems(3000, seed, world_seed=0, split=split)
    questions[split] = {_question(p["prompt"]) for p in problems}
    assert {p["kind"] for p in problems} == set(tasks.KINDS)
    assert all(tasks.split_of(q) == split for q in questions[split])
  assert not questions["train"] & questions["heldout"]
  assert len(questions["heldout"]) > 1000
  # About a fifth of all questions is held out.
  space = [f"what is {a} plus {b}?" for a in range(100) for b in range(100)]
  assert 0.17 < sum(tasks.split_of(q) == "heldout" for q in space) / len(space) < 0.23
  with pytest.raises(ValueError, match="split must be one of"):
    tasks.generate_problems(3, split="test")


def test_task_conversations_are_sft_pairs():
  convs = tasks.task_conversations(20, seed=2, world_seed=0, split="heldout")
  problems = tasks.generate_problems(20, seed=2, world_seed=0, split="heldout")
  for c, p in zip(convs, problems):
    assert sft.validate_messages(c["messages"]) is None
    assert c["messages"] == [{"role": "user", "content": p["prompt"]},
                             {"role": "assistant", "content": p["solution"]}]


# ---------------------------------------------------------------------------------------------------------
# Prompt records


def _write(tmp_path, name, records):
  path = tmp_path / name
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return str(path)


def test_jsonl_records_normalise_keeping_every_field(tmp_path):
  cfg = config_lib.DataConfig(source="jsonl", paths=(_write(tmp_path, "p.jsonl", HAND),))
  records = tasks.prompt_records(cfg)
  assert len(records) == 2
  assert records[0] == {"messages": [{"role": "user", "content": "what is 2 plus 3?"}], "answer": 5,
                        "prompt": "what is 2 plus 3?", "id": 1}
  assert records[1] == {**HAND[1], "answer": "(3 + 5) * 2"}
  assert [tasks.question_of(r) for r in records] == ["what is 2 plus 3?", "use 3 5 2 to make 16"]
  # A custom prompt field; any JSON value but null is an answer.
  q = {"q": "how many?", "answer": [1, 2]}
  cfg = config_lib.DataConfig(source="jsonl", paths=(_write(tmp_path, "q.jsonl", [q]),), prompt_field="q")
  assert tasks.prompt_records(cfg)[0] == {"messages": [{"role": "user", "content": "how many?"}], **q}
  assert pickle.loads(pickle.dumps(tasks.prompt_records(cfg)))[0]["answer"] == [1, 2]


@pytest.mark.parametrize("line, expected", [
    ({"prompt": "q"}, "no field 'answer'"),
    ({"prompt": "q", "answer": None}, "field 'answer' is null"),
    ({"prompt": "  ", "answer": 1}, "field 'prompt' (data.prompt_field) is an empty prompt"),
    ({"prompt": 3, "answer": 1}, "must be a string, got int"),
    ({"question": "q", "answer": 1}, "no 'messages' field and no field 'prompt'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answer": 1},
     "must end with the user's turn, got an 'assistant' message last (the completion is what the policy"),
    ({"messages": [], "answer": 1}, "'messages' is empty"),
    ('{"prompt": "q", "answer": ', "not valid JSON"),
])
def test_bad_jsonl_record_names_file_and_line_or_is_skipped(tmp_path, line, expected):
  path = _write(tmp_path, "bad.jsonl", [HAND[0], "", line, HAND[1]])  # the blank line 2 counts as a line
  with pytest.raises(ValueError) as e:
    tasks.prompt_records(config_lib.DataConfig(source="jsonl", paths=(path,)))
  msg = str(e.value)
  assert msg.startswith(f"{path}:3: ") and expected in msg and "\n" not in msg, msg
  records = tasks.prompt_records(config_lib.DataConfig(source="jsonl", paths=(path,), on_bad_record="skip"))
  assert len(records) == 2 and records[1]["target"] == 16


def test_prompt_records_sources():
  cfg = config_lib.DataConfig(source="task", num_documents=30, corpus_seed=2)
  train, held = tasks.prompt_records(cfg), tasks.prompt_records(cfg, split="heldout")
  assert train[0] == tasks.to_prompt_record(tasks.generate_problems(30, 2, world_seed=2)[0])
  assert held[0] == tasks.to_prompt_record(tasks.generate_problems(30, 3, world_seed=2, split="heldout")[0])
  with pytest.raises(ValueError, match=r"'data\.source'='procedural' .*\('task', 'jsonl'\).*'grpo'"):
    tasks.prompt_records(config_lib.DataConfig(source="procedural"))
  with pytest.raises(ValueError, match=r"data\.eval_paths"):
    tasks.prompt_records(config_lib.DataConfig(source="jsonl", paths=("x.jsonl",)), split="heldout")


# ---------------------------------------------------------------------------------------------------------
# Rollout-prompt batches


def _records(n, seed=0):
  return [tasks.to_prompt_record(p) for p in tasks.generate_problems(n, seed)]


def _first(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_batches_hold_left_padded_groups_with_their_records(tok):
  records = _records(40) + [tasks.to_prompt_record(r) for r in HAND]
  stats = sft.SftStats()
  ds = tasks.prompt_dataset(records, tok, width=80, batch_size=6, group_size=3, seed=1, stats=stats)
  batches = _first(ds, 4)
  seen = set()
  for batch in batches:
    assert set(batch) == {"prompt", "prompt_valid", "example"}
    assert batch["prompt"].shape == batch["prompt_valid"].shape == (6, 80) and batch["example"].shape == (6,)
    assert batch["prompt"].dtype == np.int32 and batch["prompt_valid"].dtype == bool
    assert batch["example"].dtype.kind == "U"
    for row in range(6):
      group = row - row % 3
      for k in batch:  # G consecutive identical rows
        np.testing.assert_array_equal(batch[k][row], batch[k][group])
      ids, valid = batch["prompt"][row], batch["prompt_valid"][row]
      n = int(valid.sum())
      assert valid[80 - n:].all() and not valid[:80 - n].any()   # left padding
      assert (ids[:80 - n] == tok.pad_id).all() and ids[80 - n] == tok.bos_id
      record = json.loads(batch["example"][row])
      assert list(ids[80 - n:]) == sft.render_prompt(record["messages"], tok)
      assert tok.decode(ids[80 - n:]).endswith(f"{SH}assistant{EH}\n\n")
      assert record in records
      seen.add(batch["example"][row])
  assert len(seen) == 8 and stats.dropped == 0 and stats.examples >= 8


def test_batch_size_must_hold_whole_groups(tok):
  with pytest.raises(ValueError, match=r"'train\.batch_size'.*5 rows.*'grpo\.num_generations'=2"):
    tasks.prompt_dataset(_records(4), tok, width=80, batch_size=5, group_size=2, seed=0)


def test_too_long_prompts_are_dropped_and_counted(tok, caplog):
  records = _records(30)
  lengths = [len(sft.render_prompt(r["messages"], tok)) for r in records]
  width = sorted(lengths)[len(lengths) // 2]  # about half fit
  stats = sft.SftStats()
  with caplog.at_level(logging.WARNING):
    batches = _first(tasks.prompt_dataset(records, tok, width=width, batch_size=4, group_size=2, seed=0,
                                          stats=stats), 10)
  assert all(b["prompt_valid"].sum(axis=1).max() <= width for b in batches)
  assert stats.dropped > 0 and any("dropped a prompt of" in r.getMessage() and f"width={width}" in r.getMessage()
                                   for r in caplog.records)
  with pytest.raises(ValueError, match=rf"no prompt fits width W = train\.seq_len - grpo\.gen_length = "
                                       rf"{min(lengths) - 1}"):
    next(iter(tasks.prompt_dataset(records, tok, width=min(lengths) - 1, batch_size=2, group_size=1, seed=0)))


def test_iterator_state_resumes_exactly(tok):
  ds = tasks.prompt_dataset(_records(10), tok, width=80, batch_size=4, group_size=2, seed=3)
  it = iter(ds)
  for _ in range(7):  # past the first epoch: the order is reshuffled and still restored
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # checkpoints store states as JSON
  expected = [next(it) for _ in range(5)]
  it2 = iter(ds)
  it2.set_state(state)
  for e in expected:
    got = next(it2)
    for k in e:
      np.testing.assert_array_equal(got[k], e[k])


def test_one_pass_in_order_and_host_shards(tok):
  records = _records(11)
  ds = tasks.prompt_dataset(records, tok, width=80, batch_size=3, group_size=1, seed=0, shuffle=False,
                            repeat=False)
  batches = list(ds)
  assert len(batches) == 3  # 11 prompts: 3 full batches, the incomplete last one left out
  assert [json.loads(e) for b in batches for e in b["example"]] == records[:9]
  shards = []
  for host in range(2):
    ds = tasks.prompt_dataset(records, tok, width=80, batch_size=2, group_size=1, seed=0, shuffle=False,
                              repeat=False, process_index=host, process_count=2)
    shards.append([json.loads(e) for b in ds for e in b["example"]])
  assert shards[0] == records[0::2] and shards[1] == records[1:9:2]  # 6 and 5 prompts: 3 and 2 batches
  with pytest.raises(ValueError, match="too few for host"):
    tasks.prompt_dataset(records[:1], tok, width=80, batch_size=1, group_size=1, seed=0, process_index=1,
                         process_count=2)


# ---------------------------------------------------------------------------------------------------------
# Builders


def _config(tmp_path, tok, *, objective="grpo", **overrides):
  """The tiny preset as an RL run on the built-in task, with dotted overrides."""
  tok_path = tmp_path / "tok.model"
  tok.save(tok_path)
  c = default.get_config("tiny")
  c.diffusion.objective = objective
  c.model.vocab_size = 384
  c.data.update(source="task", tokenizer_path=str(tok_path), tokenizer_vocab_size=384, num_documents=60)
  c.train.update(batch_size=4, seq_len=128, num_samples=2, eval_batches=2)
  c.grpo.update(num_generations=2, gen_length=32, steps=8, block_length=32)
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return config_lib.from_config_dict(c)


def test_rl_builders_on_the_task(tmp_path, tok):
  cfg = _config(tmp_path, tok)
  data = pipeline.rl_training_data(cfg, str(tmp_path / "work"), process_index=0, process_count=1)
  assert data.description == "RL prompts: 60 problems (task)" and data.unigram_entropy is None
  assert data.tokenizer.fingerprint() == tok.fingerprint()
  records = tasks.prompt_records(cfg.data)
  assert data.sample_prompts == [(r["prompt"], sft.render_prompt(r["messages"], tok)) for r in records[:2]]
  batch = next(data.iterator)
  assert batch["prompt"].shape == (4, 96)  # width = seq_len 128 - gen_length 32
  np.testing.assert_array_equal(batch["prompt"][0], batch["prompt"][1])
  assert not np.array_equal(batch["prompt"][1], batch["prompt"][2])
  evals = pipeline.rl_eval_batches(cfg, tok, process_index=0, process_count=1)
  assert len(evals) == 2
  questions = [_question(tasks.question_of(json.loads(e))) for b in evals for e in b["example"]]
  assert len(questions) == 8 and all(tasks.split_of(q) == "heldout" for q in questions)
  held = tasks.prompt_records(cfg.data, split="heldout")
  assert [json.loads(e) for b in evals for e in b["example"]] == list(held[:8])  # in order, one row each
  # Two hosts: disjoint shares, the same number of batches each.
  shares = [pipeline.rl_eval_batches(cfg, tok, process_index=i, process_count=2) for i in range(2)]
  assert [len(s) for s in shares] == [2, 2] and shares[0][0]["prompt"].shape == (2, 96)
  rows = [{e for b in s for e in b["example"]} for s in shares]
  assert not rows[0] & rows[1]


def test_rl_builders_on_jsonl(tmp_path, tok):
  train = [{"prompt": f"what is {i} plus 1?", "answer": i + 1} for i in range(6)]
  held = [{"messages": [{"role": "user", "content": f"what is 9 plus {i}?"}], "answer": str(9 + i)}
          for i in range(3)]
  cfg = _config(tmp_path, tok, **{"data.source": "jsonl", "data.paths": (_write(tmp_path, "t.jsonl", train),),
                                  "data.eval_paths": (_write(tmp_path, "e.jsonl", held),),
                                  "grpo.rewards": ("gsm8k",), "train.batch_size": 2})
  data = pipeline.rl_training_data(cfg, str(tmp_path / "work"), process_index=0, process_count=1)
  assert data.description == "RL prompts: 6 problems (jsonl)"
  assert [text for text, _ in data.sample_prompts] == ["what is 0 plus 1?", "what is 1 plus 1?"]
  record = json.loads(next(data.iterator)["example"][0])
  assert record["answer"] == int(re.search(r"\d+", record["prompt"])[0]) + 1
  # 3 held-out prompts fill one batch of 2 rows: fewer batches than train.eval_batches=2.
  (batch,) = pipeline.rl_eval_batches(cfg, tok, process_index=0, process_count=1)
  assert [json.loads(e) for e in batch["example"]] == held[:2] and batch["prompt"].shape == (2, 96)


def test_rl_eval_needs_a_full_batch_of_heldout_prompts(tmp_path, tok):
  held = [{"prompt": "what is 9 plus 9?", "answer": 18}]
  cfg = _config(tmp_path, tok, **{"data.source": "jsonl", "data.paths": (_write(tmp_path, "t.jsonl", held * 4),),
                                  "data.eval_paths": (_write(tmp_path, "e.jsonl", held),)})
  with pytest.raises(ValueError, match=r"too few held-out RL prompts: 1 held-out prompts .*batch of 4 rows"):
    pipeline.rl_eval_batches(cfg, tok, process_index=0, process_count=1)


def test_tokenizer_without_answer_tags_is_refused(tmp_path, tok):
  class NoTags:
    """The module's tokenizer, but '<' decodes as sentencepiece's unknown piece does."""

    def __init__(self, inner):
      self._inner = inner

    def __getattr__(self, name):
      return getattr(self._inner, name)

    def decode(self, ids):
      return self._inner.decode(ids).replace("<", " \u2047 ")

  cfg = _config(tmp_path, tok)
  with pytest.raises(ValueError, match=r"cannot write the answer tags.*data\.source='task' asks for them"):
    pipeline._check_answer_tags(NoTags(tok), cfg)
  cfg = _config(tmp_path, tok, **{"data.source": "jsonl", "data.paths": ("x.jsonl",), "grpo.rewards": ("format",)})
  with pytest.raises(ValueError, match=r"grpo\.rewards \['format'\] read them"):
    pipeline._check_answer_tags(NoTags(tok), cfg)
  cfg = _config(tmp_path, tok, **{"data.source": "jsonl", "data.paths": ("x.jsonl",),
                                  "grpo.rewards": (f"{__name__}:_question",)})
  pipeline._check_answer_tags(NoTags(tok), cfg)  # a custom reward may not read tags: only a warning
  pipeline._check_answer_tags(tok, cfg)


def test_sft_reads_the_task_and_pretraining_refuses_it(tmp_path, tok):
  cfg = _config(tmp_path, tok, objective="sft")
  convs = pipeline.sft_conversations(cfg.data)
  assert convs == tasks.task_conversations(60, 0, world_seed=0)
  data = pipeline.sft_training_data(cfg, str(tmp_path / "work"), process_index=0, process_count=1)
  assert data.description == "SFT data: 60 conversations (task)"
  assert next(data.iterator)["tokens"].shape == (4, 128)
  for b in pipeline.sft_eval_batches(cfg, tok, process_index=0, process_count=1):
    for row, plen in zip(b["tokens"], b["prompt_len"]):
      question = tok.decode(row[:plen]).split(f"{SH}user{EH}\n\n")[1].split(EOT)[0]
      assert tasks.split_of(_question(question)) == "heldout"
  cfg = _config(tmp_path, tok, objective="pretrain")
  for build in (lambda: pipeline.packed_training_data(cfg, str(tmp_path / "pre")),
                lambda: pipeline.packed_eval_batches(cfg, tok)):
    with pytest.raises(ValueError, match=r"'data\.source'='task' .*not a pre-training corpus"):
      build()


# ---------------------------------------------------------------------------------------------------------
# The tokenizer's answer tags


def test_answer_tags_are_single_pieces_after_the_fixed_ones(tok):
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.mask_id) == (0, 1, 2, 4)
  assert [tok.piece_to_id(p) for p in ("\n", SH, EH, EOT, "<answer>", "</answer>")] == [5, 6, 7, 8, 9, 10]
  text = "<answer>42</answer>"
  ids = tok.encode(text)
  assert ids[0] == 9 and ids[-1] == 10 and tok.decode(ids) == text
  solution = "the capital of Kaloia is Tenra. <answer>Tenra</answer>"
  assert tok.decode(tok.encode(solution)) == solution
