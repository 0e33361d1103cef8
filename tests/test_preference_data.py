"""Preference data: records and their checks, shared-prompt rows, batches, the procedural set, builders."""

import json
import logging
import pickle
import re

import numpy as np
import pytest

from llada_jax import config as config_lib
from llada_jax.data import corpus, pipeline, preference, sft, tokenizer

SH, EH, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
EOT_ID = 8  # fixed special id of tokenizers trained by train_sentencepiece (tokenizer.py)

HAND = [
    {"messages": [{"role": "system", "content": "be brief."}, {"role": "user", "content": "how old is the king?"}],
     "chosen": "the king is 40 years old.", "rejected": "i do not know, maybe the king is very old."},
    {"messages": [{"role": "user", "content": "what is 2 plus 3?"}], "chosen": {"role": "assistant", "content": "5."},
     "rejected": "2 plus 3 is 6."},
    {"messages": [{"role": "user", "content": "count from 7"}, {"role": "assistant", "content": "7 8 9 10 11."},
                  {"role": "user", "content": "and from 3?"}], "chosen": "3 4 5 6 7.", "rejected": "3 5 7 9 11."},
]

_QUESTION = re.compile(r"^(?:what is the capital of (\w+)\?|how old is (\w+)\?|what does (\w+) have\?)"
                       r"( answer in (?:one|two) words?\.)?$")


@pytest.fixture(scope="module")
def tok():
  docs = corpus.generate_documents(300, seed=0)
  recs = HAND + preference.generate_preferences(300, seed=0)
  texts = [t for r in recs for t in preference.to_pair(r)[1:] + tuple(m["content"] for m in r["messages"])]
  return tokenizer.train_sentencepiece([*corpus.iter_sentences(docs), *texts, "user assistant system"], 384)


def _entity(question: str) -> tuple[str, str]:
  """("country" | "person", name) asked about by a generated question."""
  m = _QUESTION.match(question)
  assert m is not None, question
  return ("country", m[1]) if m[1] else ("person", m[2] or m[3])


# ---------------------------------------------------------------------------------------------------------
# Rows and batches


def test_rows_share_the_prompt_then_response_eot_then_eos(tok):
  history, chosen, rejected = preference.to_pair(HAND[0])
  assert history == HAND[0]["messages"] and chosen == HAND[0]["chosen"]
  prompt = sft.render_prompt(history, tok)
  assert tok.decode(prompt) == f"{SH}system{EH}\n\nbe brief.{EOT}{SH}user{EH}\n\nhow old is the king?{EOT}" \
                               f"{SH}assistant{EH}\n\n"
  c, r = tok.encode(chosen), tok.encode(rejected)
  assert len(r) > len(c)
  ex = preference.make_pair_example(prompt, sft.render_response(chosen, tok), sft.render_response(rejected, tok),
                                    seq_len=96, eos_id=tok.eos_id)
  n_c, n_r = len(prompt) + len(c) + 1, len(prompt) + len(r) + 1
  np.testing.assert_array_equal(ex["chosen"], prompt + c + [EOT_ID] + [tok.eos_id] * (96 - n_c))
  np.testing.assert_array_equal(ex["rejected"], prompt + r + [EOT_ID] + [tok.eos_id] * (96 - n_r))
  assert ex["chosen"].dtype == ex["rejected"].dtype == np.int32 and ex["chosen"].shape == (96,)
  assert int(ex["prompt_len"]) == len(prompt) and int(ex["length"]) == n_r  # the longer response sets it
  # A response given as an assistant message renders as its content.
  _, chosen, _ = preference.to_pair(HAND[1])
  assert chosen == "5."


def test_pairs_format_and_custom_fields():
  record = {"q": "hi", "good": {"role": "assistant", "content": " hello. "}, "bad": "go away."}
  fields = dict(fmt="pairs", prompt_field="q", chosen_field="good", rejected_field="bad")
  assert preference.validate_record(record, **fields) is None
  assert preference.to_messages_record(record, **fields) == {
      "messages": [{"role": "user", "content": "hi"}], "chosen": " hello. ", "rejected": "go away."}
  # The default field names do not exist in this record.
  assert "no field 'chosen'" in preference.validate_record(record, fmt="pairs", prompt_field="q")


def test_truncation_from_the_left_and_drop_are_counted(caplog):
  stats = sft.SftStats()
  with caplog.at_level(logging.WARNING):
    ex = preference.make_pair_example(list(range(10, 20)), [30, 31], [40, 41, 42], seq_len=8, eos_id=1,
                                      stats=stats)
  np.testing.assert_array_equal(ex["chosen"], [15, 16, 17, 18, 19, 30, 31, 1])
  np.testing.assert_array_equal(ex["rejected"], [15, 16, 17, 18, 19, 40, 41, 42])
  assert (int(ex["prompt_len"]), int(ex["length"])) == (5, 8)
  assert (stats.examples, stats.truncated, stats.dropped) == (1, 1, 0)
  assert any("truncated" in r.getMessage() for r in caplog.records)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    # The chosen response alone would fit; the rejected one leaves no room for a prompt token.
    assert preference.make_pair_example([2, 3], [4, 5], list(range(8)), seq_len=8, eos_id=1, stats=stats) is None
  assert any("dropped" in r.getMessage() for r in caplog.records)
  ex = preference.make_pair_example([2, 3], list(range(10, 17)), [4], seq_len=8, eos_id=1, stats=stats)
  np.testing.assert_array_equal(ex["chosen"], [3, *range(10, 17)])
  np.testing.assert_array_equal(ex["rejected"], [3, 4, 1, 1, 1, 1, 1, 1])
  assert (stats.examples, stats.truncated, stats.dropped) == (2, 2, 1)


def test_batch_valid_is_the_common_length():
  a = preference.make_pair_example([2, 3], [4], [5, 6], seq_len=8, eos_id=1)     # length 4
  b = preference.make_pair_example([2, 3, 7], [8, 9], [6], seq_len=8, eos_id=1)  # length 5
  batch = preference.batch_pairs([a, b])
  assert set(batch) == {"chosen", "rejected", "prompt_len", "valid"}
  assert batch["chosen"].shape == batch["rejected"].shape == batch["valid"].shape == (2, 8)
  assert batch["chosen"].dtype == batch["rejected"].dtype == batch["prompt_len"].dtype == np.int32
  assert batch["valid"].dtype == bool
  np.testing.assert_array_equal(batch["valid"], [[1, 1, 1, 1, 1, 0, 0, 0]] * 2)
  np.testing.assert_array_equal(batch["prompt_len"], [2, 3])
  np.testing.assert_array_equal(batch["chosen"][0], [2, 3, 4, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(batch["rejected"][1], [2, 3, 7, 6, 1, 1, 1, 1])


# ---------------------------------------------------------------------------------------------------------
# Bad records


_GOOD_PAIR = {"prompt": "q", "chosen": "yes.", "rejected": "no."}
_GOOD_CHAT = {"messages": [{"role": "user", "content": "q"}], "chosen": "yes.", "rejected": "no."}


@pytest.mark.parametrize("fmt, line, expected", [
    ("pairs", json.dumps({"prompt": "q", "rejected": "no."}), "no field 'chosen'"),
    ("pairs", json.dumps({"prompt": 3, "chosen": "a", "rejected": "b"}), "field 'prompt' is missing or not a string"),
    ("messages", json.dumps({**_GOOD_CHAT, "rejected": "  \n "}), "field 'rejected' is an empty response"),
    ("messages", json.dumps({**_GOOD_CHAT, "chosen": "same.", "rejected": " same.\n"}), "same response"),
    ("pairs", '{"prompt": "q", "chosen": ', "not valid JSON"),
    ("messages", json.dumps({**_GOOD_CHAT, "messages": [{"role": "user", "content": "q"},
                                                        {"role": "assistant", "content": "a"}]}),
     "must end with the user's turn"),
    ("messages", json.dumps({**_GOOD_CHAT, "messages": [{"role": "user", "content": "q"},
                                                        {"role": "user", "content": "q"}]}), "alternate"),
    ("messages", json.dumps({**_GOOD_CHAT, "chosen": 5}), "field 'chosen' must be a string"),
])
def test_bad_jsonl_line_is_one_line_naming_file_and_line(tmp_path, fmt, line, expected):
  good = json.dumps(_GOOD_PAIR if fmt == "pairs" else _GOOD_CHAT)
  path = tmp_path / "prefs.jsonl"
  path.write_text(f"{good}\n\n{line}\n{good}\n")  # the blank line 2 still counts as a line
  cfg = config_lib.DataConfig(source="jsonl", paths=(str(path),), sft_format=fmt)
  with pytest.raises(ValueError) as e:
    pipeline.preference_records(cfg)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(f"{path}:3: ") and expected in msg, msg
  # With 'skip' the bad line is left out and the good ones remain, in the canonical layout.
  records = pipeline.preference_records(config_lib.DataConfig(source="jsonl", paths=(str(path),), sft_format=fmt,
                                                              on_bad_record="skip"))
  assert len(records) == 2
  assert records[1] == {"messages": [{"role": "user", "content": "q"}], "chosen": "yes.", "rejected": "no."}


@pytest.mark.parametrize("messages, expected", [
    ([], "empty"),
    ([{"role": "system", "content": "s"}], "no user turn"),
    ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}], "only the first message may be"),
    ([{"role": "bot", "content": "q"}], "role 'bot'"),
    ("q", "must be a list"),
])
def test_bad_histories_are_explained(messages, expected):
  err = preference.validate_record({**_GOOD_CHAT, "messages": messages})
  assert err is not None and expected in err and "\n" not in err, err
  with pytest.raises(ValueError, match=re.escape(expected)):
    preference.to_pair({**_GOOD_CHAT, "messages": messages})


def test_non_preference_source_is_refused():
  with pytest.raises(ValueError, match=r"data\.source.*'text'.*'jsonl' or 'procedural'"):
    pipeline.preference_records(config_lib.DataConfig(source="text", paths=("x.txt",)))


def test_bad_record_in_dataset_names_its_index(tok):
  bad = HAND[:2] + [{**HAND[0], "rejected": HAND[0]["chosen"]}]
  with pytest.raises(ValueError, match=r"preference record 2: .*same response"):
    preference.preference_dataset(bad, tok, seq_len=64, batch_size=2, seed=0)


# ---------------------------------------------------------------------------------------------------------
# The procedural set


def test_generate_preferences_deterministic_valid_and_true():
  recs = preference.generate_preferences(400, seed=3)
  assert recs == preference.generate_preferences(400, seed=3)
  assert recs != preference.generate_preferences(400, seed=4)
  assert preference.generate_preferences(50, seed=1, world_seed=3) != preference.generate_preferences(50, seed=1)
  world = corpus.World(3)
  kinds = [r["kind"] for r in recs]
  assert 0.4 < kinds.count("fact") / len(recs) < 0.6 and set(kinds) == {"fact", "format"}
  questions = set()
  for r in recs:
    assert preference.validate_record(r) is None
    assert r["chosen"].strip() != r["rejected"].strip()
    (q,) = [m["content"] for m in r["messages"]]
    m = _QUESTION.match(q)
    assert m is not None, q
    if m[1]:
      truth, value = f"the capital of {m[1]} is {world.capitals[m[1]]}.", world.capitals[m[1]]
    else:
      adj, noun, age = world.people[m[2] or m[3]]
      truth, value = ((f"{m[2]} is {age} years old.", str(age)) if m[2] else
                      (f"{m[3]} has a {adj} {noun}.", f"{adj} {noun}"))
    if r["kind"] == "fact":
      assert m[4] is None and r["chosen"] == truth and r["target"] == value
      wrong = preference._rejected_value(r)  # the same sentence with another value in the value's place
      assert wrong != value and r["rejected"] == truth.replace(value, wrong)
      if m[1]:
        assert wrong in world.capitals.values()
      elif m[2]:
        assert 3 <= int(wrong) <= 90
      else:
        assert wrong.split()[0] in corpus._ADJS and wrong.split()[1] in corpus._NOUNS
    else:
      assert m[4] == (" answer in two words." if m[3] else " answer in one word.")
      assert r["chosen"] == r["target"] == value + "." and r["rejected"] == truth
    questions.add(q.split()[1])
  assert questions == {"is", "old", "does"}  # capital, age and has questions all occur


def test_heldout_entities_are_disjoint_from_train():
  world = corpus.World(0)
  held_countries, held_people = preference.split_entities(world)
  assert len(held_countries) == len(world.capitals) // 5 and len(held_people) == len(world.people) // 5
  entities = {}
  for split, seed in (("train", 0), ("heldout", 1)):
    recs = preference.generate_preferences(600, seed, world_seed=0, split=split)
    entities[split] = {_entity(r["messages"][-1]["content"]) for r in recs}
  held = {("country", c) for c in held_countries} | {("person", p) for p in held_people}
  assert entities["heldout"] == held  # 600 records reach every held-out entity
  assert not entities["train"] & held and len(entities["train"]) > 50
  # Wrong capitals come from the same split: no held-out capital is named in a training pair.
  # (A name the world also gives a train capital or a person may appear, as that entity.)
  held_capitals = ({world.capitals[c] for c in held_countries} - set(world.people)
                   - {world.capitals[c] for c in world.capitals if c not in held_countries})
  train_text = " ".join(r["chosen"] + " " + r["rejected"] for r in
                        preference.generate_preferences(600, 0, world_seed=0, split="train"))
  assert held_capitals and not any(re.search(rf"\b{c}\b", train_text) for c in held_capitals)


def test_prefers_chosen_over_rejected_on_every_record():
  for split in preference.SPLITS:
    for r in preference.generate_preferences(500, seed=7, world_seed=0, split=split):
      assert preference.prefers(r, r["chosen"]), r
      assert not preference.prefers(r, r["rejected"]), r
      assert preference.prefers(r, "  " + r["chosen"].upper() + "\n")  # case and whitespace do not matter


def test_prefers_on_hand_written_answers():
  fact = {"messages": [{"role": "user", "content": "how old is Kalo?"}], "chosen": "Kalo is 42 years old.",
          "rejected": "Kalo is 17 years old.", "kind": "fact", "target": "42"}
  assert preference.prefers(fact, "42")
  assert preference.prefers(fact, "he is 42.")
  assert not preference.prefers(fact, "Kalo is 142 years old.")  # whole words only
  assert not preference.prefers(fact, "42, or maybe 17")  # states the wrong value too
  fmt = {**fact, "kind": "format", "chosen": "42.", "rejected": "Kalo is 42 years old.", "target": "42."}
  assert preference.prefers(fmt, " 42.") and not preference.prefers(fmt, "42. Kalo is 42.")
  assert preference.prefers(fmt, "17.") and preference.prefers(fmt, "17")  # the form, whatever the value
  assert not preference.prefers(fmt, "") and not preference.prefers(fmt, ".")
  two = {**fmt, "chosen": "red cat.", "target": "red cat."}
  assert preference.prefers(two, "old dog.") and not preference.prefers(two, "dog.")
  with pytest.raises(ValueError, match="kind"):
    preference.prefers(HAND[0], "x")


# ---------------------------------------------------------------------------------------------------------
# Datasets and builders


def _first(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_dataset_fields_layout_and_determinism(tok):
  recs = HAND + preference.generate_preferences(40, seed=2)
  stats = sft.SftStats()
  batches = _first(preference.preference_dataset(recs, tok, seq_len=96, batch_size=4, seed=1, stats=stats), 3)
  responses = {preference.to_pair(r)[k].strip() for r in recs for k in (1, 2)}
  for batch in batches:
    assert set(batch) == {"chosen", "rejected", "prompt_len", "valid"}
    assert batch["chosen"].shape == batch["rejected"].shape == batch["valid"].shape == (4, 96)
    assert batch["prompt_len"].shape == (4,) and batch["prompt_len"].dtype == np.int32
    assert batch["chosen"].dtype == batch["rejected"].dtype == np.int32 and batch["valid"].dtype == bool
    longest = int(batch["valid"][0].sum())
    for c, r, plen in zip(batch["chosen"], batch["rejected"], batch["prompt_len"]):
      np.testing.assert_array_equal(c[:plen], r[:plen])
      assert c[0] == tok.bos_id and tok.decode(c[:plen]).endswith(f"{SH}assistant{EH}\n\n")
      ends = []
      for row in (c, r):
        end = plen + list(row[plen:]).index(EOT_ID)
        assert tok.decode(row[plen:end]) in responses
        assert np.all(row[end + 1:] == tok.eos_id)
        ends.append(end + 1)
      assert not np.array_equal(c, r) and max(ends) <= longest
  assert stats.examples >= 12 and stats.dropped == stats.truncated == 0
  again = _first(preference.preference_dataset(recs, tok, seq_len=96, batch_size=4, seed=1), 3)
  other = _first(preference.preference_dataset(recs, tok, seq_len=96, batch_size=4, seed=2), 3)
  for a, b in zip(batches, again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert any(not np.array_equal(a["chosen"], b["chosen"]) for a, b in zip(batches, other))


def test_dataset_shards_pickles_and_guards_against_all_dropped(tok):
  recs = preference.generate_preferences(12, seed=5)
  seen = []
  for host in range(2):
    ds = preference.preference_dataset(recs, tok, seq_len=64, batch_size=3, seed=0, process_index=host,
                                       process_count=2)
    rows = {tok.decode(c) for b in _first(ds, 2) for c in b["chosen"]}  # 2 * 3 = one epoch of 6 pairs
    assert len(rows) == 6
    seen.append(rows)
  assert not seen[0] & seen[1]
  ds = preference.preference_dataset(recs, tok, seq_len=64, batch_size=3, seed=0)
  a, b = next(iter(ds)), next(iter(pickle.loads(pickle.dumps(ds))))
  np.testing.assert_array_equal(a["rejected"], b["rejected"])
  with pytest.raises(ValueError, match="no response fits seq_len=4"):
    next(iter(preference.preference_dataset(recs, tok, seq_len=4, batch_size=2, seed=0)))
  with pytest.raises(ValueError, match="too few for host"):
    preference.preference_dataset(recs[:1], tok, seq_len=64, batch_size=1, seed=0, process_index=1,
                                  process_count=2)


def _config(tmp_path, tok, **data):
  tok_path = tmp_path / "tok.model"
  tok.save(tok_path)
  # The builders read only the data and train sections: the objective is left at its default.
  return config_lib.from_config_dict({
      "data": {"tokenizer_path": str(tok_path), "tokenizer_vocab_size": 384, "num_documents": 60, **data},
      "train": {"batch_size": 4, "seq_len": 64, "num_samples": 2, "eval_batches": 2}})


def test_procedural_builders(tmp_path, tok):
  cfg = _config(tmp_path, tok)
  data = pipeline.preference_training_data(cfg, str(tmp_path / "work"), process_index=0, process_count=1)
  assert data.description == "preference data: 60 pairs (procedural)"
  assert data.tokenizer.fingerprint() == tok.fingerprint()
  batch = next(data.iterator)
  assert batch["chosen"].shape == (4, 64) and set(batch) == {"chosen", "rejected", "prompt_len", "valid"}
  recs = preference.generate_preferences(60, 0, split="train")
  assert [text for text, _ in data.sample_prompts] == [r["messages"][0]["content"] for r in recs[:2]]
  assert data.sample_prompts[0][1] == sft.render_prompt(recs[0]["messages"], tok)
  held_countries, held_people = preference.split_entities(corpus.World(0))
  held = {("country", c) for c in held_countries} | {("person", p) for p in held_people}
  evals = pipeline.preference_eval_batches(cfg, tok, process_index=0, process_count=1)
  assert len(evals) == 2
  for b in evals:
    for row, plen in zip(b["chosen"], b["prompt_len"]):
      question = tok.decode(row[:plen]).split(f"{SH}user{EH}\n\n")[1].split(EOT)[0]
      assert _entity(question) in held  # validation asks only about held-out entities


def test_jsonl_builders_read_pairs_with_custom_fields(tmp_path, tok):
  def write(name, n, word):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"q": f"{word} {i}?", "good": f"yes {i}.", "bad": f"no {i}."}) + "\n"
                            for i in range(n)))
    return str(path)

  cfg = _config(tmp_path, tok, source="jsonl", paths=(write("train.jsonl", 8, "train"),),
                eval_paths=(write("eval.jsonl", 8, "eval"),), sft_format="pairs", prompt_field="q",
                chosen_field="good", rejected_field="bad")
  data = pipeline.preference_training_data(cfg, str(tmp_path / "work"), process_index=0, process_count=1)
  assert data.description == "preference data: 8 pairs (jsonl)"
  assert [text for text, _ in data.sample_prompts] == ["train 0?", "train 1?"]
  batch = next(data.iterator)
  for b, prefix in ((batch, "train"), *((e, "eval") for e in pipeline.preference_eval_batches(cfg, tok))):
    for c, r, plen in zip(b["chosen"], b["rejected"], b["prompt_len"]):
      i = tok.decode(c[:plen]).split(f"{prefix} ")[1].split("?")[0]
      assert tok.decode(c[plen:]).startswith(f"yes {i}.{EOT}")
      assert tok.decode(r[plen:]).startswith(f"no {i}.{EOT}")
