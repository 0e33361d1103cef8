"""SFT data: chat template, pairs, truncation, static-shape batches, sharding and the SFT loss on them."""

import logging
import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax import diffusion
from llada_jax.data import corpus, sft, tokenizer

SH, EH, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"


def _conv(*turns, system=None):
  """_conv("q1", "a1", "q2", "a2") -> {"messages": [...]}, user/assistant alternating."""
  msgs = [{"role": "system", "content": system}] if system is not None else []
  msgs += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
  return {"messages": msgs}


HAND = [
    _conv("what is 2 plus 3?", "2 plus 3 is 5."),
    _conv("count from 7", "7 8 9 10 11."),
    _conv("how old is the king?", "the king is 40 years old.",
          "and the queen?", "the queen is 38 years old."),
    _conv("hello", "hello there.", system="you are a helpful assistant."),
]


@pytest.fixture(scope="module")
def tok():
  docs = corpus.generate_documents(300, seed=0)
  texts = [m["content"] for c in HAND + sft.generate_conversations(200, seed=0) for m in c["messages"]]
  return tokenizer.train_sentencepiece([*corpus.iter_sentences(docs), *texts, "user assistant system"], 384)


def _header(tok, role):
  # Built by hand from the tokenizer's fixed special ids (tokenizer.py): 6, 7 are the header pieces.
  return [6, *tok.encode(role), 7, 5, 5]  # 5 is the newline piece: "\n\n" is two of them


def test_single_turn_exact_layout(tok):
  q, a = "what is 2 plus 3?", "2 plus 3 is 5."
  assert sft.ChatTemplate().ids(tok) == (6, 7, 8)
  assert tok.encode("\n\n") == [5, 5]
  prompt = [tok.bos_id, *_header(tok, "user"), *tok.encode(q), 8, *_header(tok, "assistant")]
  response = [*tok.encode(a), 8]
  (history, answer), = sft.conversation_pairs(HAND[0]["messages"])
  assert sft.render_prompt(history, tok) == prompt
  assert sft.render_response(answer, tok) == response
  ex = sft.make_example(sft.render_prompt(history, tok), sft.render_response(answer, tok), seq_len=64,
                        eos_id=tok.eos_id)
  n = len(prompt) + len(response)
  np.testing.assert_array_equal(ex["tokens"], prompt + response + [tok.eos_id] * (64 - n))
  assert ex["tokens"].dtype == np.int32 and ex["tokens"].shape == (64,)
  assert int(ex["prompt_len"]) == len(prompt) and int(ex["length"]) == n
  assert tok.decode(ex["tokens"][:n]) == f"{SH}user{EH}\n\n{q}{EOT}{SH}assistant{EH}\n\n{a}{EOT}"


def test_special_text_in_content_is_not_a_special_id(tok):
  """Content that spells a special piece is user text; only the template inserts the real ids."""
  history = [{"role": "user", "content": "say <|eot_id|> now"}]
  ids = sft.render_prompt(history, tok)
  content = tok.encode("say <|eot_id|> now")
  start = 1 + len(_header(tok, "user"))
  assert ids[start:start + len(content)] == content  # encoded as part of the text run
  assert ids.count(8) >= 1 and ids[start + len(content)] == 8


def test_multi_turn_gives_one_pair_per_assistant_turn():
  msgs = _conv("q1", "a1", "q2", "a2", "q3", "a3", system="sys")["messages"]
  pairs = sft.conversation_pairs(msgs)
  assert [a for _, a in pairs] == ["a1", "a2", "a3"]
  assert [len(h) for h, _ in pairs] == [2, 4, 6]
  for k, (history, _) in enumerate(pairs):
    assert history == msgs[:2 + 2 * k]
    assert history[0]["role"] == "system" and history[-1] == {"role": "user", "content": f"q{k + 1}"}


def test_system_message_and_history_rendering(tok):
  msgs = _conv("q1", "a1", "q2", "a2", system="be brief.")["messages"]
  history, answer = sft.conversation_pairs(msgs)[1]
  text = tok.decode(sft.render_prompt(history, tok))
  assert text == (f"{SH}system{EH}\n\nbe brief.{EOT}{SH}user{EH}\n\nq1{EOT}{SH}assistant{EH}\n\na1{EOT}"
                  f"{SH}user{EH}\n\nq2{EOT}{SH}assistant{EH}\n\n")
  ids = sft.render_prompt(history, tok)
  assert ids[:2 + len(tok.encode("system"))] == [tok.bos_id, 6, *tok.encode("system")]  # right after BOS
  assert answer == "a2"


@pytest.mark.parametrize("messages, expected", [
    ([{"role": "user", "content": "q"}], "last message must be the assistant"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
      {"role": "user", "content": "q2"}], "last message must be the assistant"),
    ([{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}], "role 'bot'"),
    ([{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
      {"role": "assistant", "content": "a"}], "alternate"),
    ([{"role": "assistant", "content": "a"}], "alternate"),
    ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
      {"role": "assistant", "content": "a"}], "only the first message may be a system"),
    ([{"role": "system", "content": "s"}], "no assistant turn"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}], "content must be a string"),
    ([{"role": "user"}, {"role": "assistant", "content": "a"}], "keys 'role' and 'content'"),
    ("hello", "must be a list"),
    ([], "no messages"),
])
def test_validation_errors_are_clear(messages, expected):
  err = sft.validate_messages(messages)
  assert err is not None and expected in err, err
  with pytest.raises(ValueError, match=expected):
    sft.conversation_pairs(messages)


def test_valid_conversations_pass():
  for c in HAND + [sft.pairs_to_conversation("p", "r")]:
    assert sft.validate_messages(c["messages"]) is None
  assert sft.pairs_to_conversation("p", "r")["messages"] == [
      {"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]


def test_bad_conversation_in_dataset_names_its_index(tok):
  bad = HAND[:2] + [_conv("q", "a", "q2")] + HAND[2:]
  with pytest.raises(ValueError, match=r"SFT conversation 2: the last message must be the assistant"):
    sft.sft_dataset(bad, tok, seq_len=64, batch_size=2, seed=0)
  with pytest.raises(ValueError, match=r"SFT conversation 0: record has no 'messages'"):
    sft.sft_dataset([{"text": "x"}], tok, seq_len=64, batch_size=2, seed=0)


def test_missing_template_piece_is_named(tok):
  class NoEot:
    def __getattr__(self, name):
      return getattr(tok, name)

    def piece_to_id(self, piece):
      return None if piece == EOT else tok.piece_to_id(piece)

  with pytest.raises(ValueError, match=r"<\|eot_id\|>"):
    sft.ChatTemplate().ids(NoEot())
  with pytest.raises(ValueError, match=r"<\|eot_id\|>"):
    sft.sft_dataset(HAND, NoEot(), seq_len=64, batch_size=2, seed=0)


def test_truncation_keeps_response_and_is_counted(caplog):
  stats = sft.SftStats()
  with caplog.at_level(logging.WARNING):
    ex = sft.make_example(list(range(10, 20)), [30, 31, 32], seq_len=8, eos_id=1, stats=stats)
  np.testing.assert_array_equal(ex["tokens"], [15, 16, 17, 18, 19, 30, 31, 32])
  assert (int(ex["prompt_len"]), int(ex["length"])) == (5, 8)
  assert (stats.examples, stats.truncated, stats.dropped) == (1, 1, 0)
  assert any("truncated" in r.getMessage() for r in caplog.records)


def test_too_long_response_is_dropped_and_counted(caplog):
  stats = sft.SftStats()
  with caplog.at_level(logging.WARNING):
    assert sft.make_example([2, 3], list(range(8)), seq_len=8, eos_id=1, stats=stats) is None
  assert any("dropped" in r.getMessage() for r in caplog.records)
  ex = sft.make_example([2, 3], list(range(10, 17)), seq_len=8, eos_id=1, stats=stats)  # 1 prompt token fits
  np.testing.assert_array_equal(ex["tokens"], [3, *range(10, 17)])
  assert (stats.examples, stats.truncated, stats.dropped) == (1, 1, 1)


def test_logging_is_sparse():
  assert [n for n in range(1, 40) if sft._worth_logging(n)] == [1, 2, 3, 4, 8, 16, 32]


def test_batch_valid_mask_is_batch_max_length():
  a = sft.make_example([2, 3], [4], seq_len=8, eos_id=1)
  b = sft.make_example([2, 3, 5], [6, 7], seq_len=8, eos_id=1)
  batch = sft.batch_examples([a, b])
  assert batch["tokens"].shape == (2, 8) and batch["tokens"].dtype == np.int32
  np.testing.assert_array_equal(batch["prompt_len"], [2, 3])
  assert batch["prompt_len"].dtype == np.int32 and batch["valid"].dtype == bool
  np.testing.assert_array_equal(batch["valid"], [[1, 1, 1, 1, 1, 0, 0, 0]] * 2)
  np.testing.assert_array_equal(batch["tokens"][0], [2, 3, 4, 1, 1, 1, 1, 1])


def test_sft_dataset_batches_decode_to_template(tok):
  stats = sft.SftStats()
  it = iter(sft.sft_dataset(HAND, tok, seq_len=96, batch_size=3, seed=1, stats=stats))
  answers = {m["content"] for c in HAND for m in c["messages"] if m["role"] == "assistant"}
  for _ in range(4):
    batch = next(it)
    assert batch["tokens"].shape == (3, 96) and batch["valid"].shape == (3, 96)
    assert batch["prompt_len"].shape == (3,)
    longest = int(batch["valid"][0].sum())
    for row, plen in zip(batch["tokens"], batch["prompt_len"]):
      prompt, rest = tok.decode(row[:plen]), row[plen:]
      assert prompt.startswith(SH) and prompt.endswith(f"{SH}assistant{EH}\n\n")
      assert row[0] == tok.bos_id
      n = plen + list(rest).index(8) + 1  # the response ends at its first EOT
      assert tok.decode(rest[:n - plen - 1]) in answers
      assert np.all(row[n:] == tok.eos_id) and n <= longest
  # grain reads ahead, so the counts cover prefetched examples too: at least the 12 consumed.
  assert stats.examples >= 12 and stats.dropped == stats.truncated == 0


def test_two_hosts_see_disjoint_pairs(tok):
  convs = [_conv(f"what is {a} plus {a + 1}?", f"{a} plus {a + 1} is {2 * a + 1}.") for a in range(16)]
  convs.append(_conv("q", "a0", "q1", "a1", "q2", "a2", "q3", "a3"))  # 4 pairs from one dialogue
  seen = []
  for host in range(2):
    ds = sft.sft_dataset(convs, tok, seq_len=96, batch_size=5, seed=3, process_index=host, process_count=2)
    it = iter(ds)
    rows = [tok.decode(r) for _ in range(2) for r in next(it)["tokens"]]  # 2 * 5 = one epoch of 10 pairs
    assert len(set(rows)) == 10
    seen.append(set(rows))
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) == len(sft.pair_index(convs)) == 20


def test_iterator_state_resumes_exactly(tok):
  """The training loop checkpoints the grain iterator: a restored one continues with the same batches."""
  convs = HAND + sft.generate_conversations(40, seed=2)
  ds = sft.sft_dataset(convs, tok, seq_len=96, batch_size=4, seed=0)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = iter(ds)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_dataset_pickles_for_multiprocess_prefetch(tok):
  """grain's mp_prefetch pickles the pipeline: the stats lock must not travel, the counts must."""
  stats = sft.SftStats(examples=3)
  copy = pickle.loads(pickle.dumps(stats))
  assert copy.examples == 3 and copy.add("dropped") == 1
  ds = sft.sft_dataset(HAND, tok, seq_len=96, batch_size=2, seed=0, stats=stats)
  a, b = next(iter(ds)), next(iter(pickle.loads(pickle.dumps(ds))))
  np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_every_pair_dropped_raises(tok):
  with pytest.raises(ValueError, match="no response fits seq_len=4"):
    next(iter(sft.sft_dataset(HAND, tok, seq_len=4, batch_size=2, seed=0)))


def test_generate_conversations_deterministic_valid_and_true():
  convs = sft.generate_conversations(300, seed=5)
  assert convs == sft.generate_conversations(300, seed=5)
  assert convs != sft.generate_conversations(300, seed=6)
  world = corpus.World(5)
  turns = [sum(m["role"] == "assistant" for m in c["messages"]) for c in convs]
  assert 0.6 < turns.count(1) / len(convs) < 0.9 and max(turns) == 3
  assert 0.1 < sum(c["messages"][0]["role"] == "system" for c in convs) / len(convs) < 0.3
  kinds = set()
  for c in convs:
    assert sft.validate_messages(c["messages"]) is None
    for history, answer in sft.conversation_pairs(c["messages"]):
      q, w = history[-1]["content"], answer.rstrip(".").split()
      if q.startswith("what is the capital of "):
        country = q[len("what is the capital of "):-1]
        assert answer == f"the capital of {country} is {world.capitals[country]}."
      elif q.startswith("how old is "):
        name = q[len("how old is "):-1]
        assert answer == f"{name} is {world.people[name][2]} years old."
      elif q.startswith("what does "):
        name = q.split()[2]
        adj, noun, _ = world.people[name]
        assert answer == f"{name} has a {adj} {noun}."
      elif " plus " in q:
        assert int(w[0]) + int(w[2]) == int(w[4]) and q == f"what is {w[0]} plus {w[2]}?"
      else:
        assert q.startswith("count from ") and w == [str(int(q.split()[-1]) + i) for i in range(5)]
      kinds.add(q.split()[1])
  assert len(kinds) >= 4
  # world_seed lets the chat set describe the pre-training corpus's world.
  assert sft.generate_conversations(50, seed=1, world_seed=5) != sft.generate_conversations(50, seed=1)


def test_sft_loss_on_a_real_batch(tok):
  """With eps = 1 every maskable position is masked (p = 1 > u for all u in [0, 1)), so the loss is exact."""
  it = iter(sft.sft_dataset(HAND, tok, seq_len=96, batch_size=4, seed=0))
  batch = next(it)
  tokens, plen, valid = (jnp.asarray(batch[k]) for k in ("tokens", "prompt_len", "valid"))
  B, L = tokens.shape
  V = tok.vocab_size
  longest = int(valid[0].sum())
  assert longest < L  # the batch has EOS padding beyond its longest row, which must not count
  logits = jax.random.normal(jax.random.key(0), (B, L, V))
  calls = []

  def logits_fn(noisy_BL, valid_BL):
    calls.append((np.asarray(noisy_BL), np.asarray(valid_BL)))
    return logits

  out = diffusion.sft_objective(diffusion.from_logits(logits_fn),
                                jax.random.key(1), tokens_BL=tokens, prompt_len_B=plen,
                                mask_id=tok.mask_id, eps=1.0, valid_BL=valid)
  noisy, seen_valid = calls[0]
  pos = np.arange(L)[None, :]
  resp = (pos >= np.asarray(plen)[:, None]) & (pos < longest)
  np.testing.assert_array_equal(seen_valid, np.asarray(valid))
  np.testing.assert_array_equal(noisy == tok.mask_id, resp)  # prompt and padding past the max never masked
  np.testing.assert_array_equal(noisy[~resp], np.asarray(tokens)[~resp])
  nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(tokens)[..., None], -1)[..., 0]
  expected = np.mean([nll[b][resp[b]].sum() / resp[b].sum() for b in range(B)])
  np.testing.assert_allclose(float(out.loss), expected, rtol=1e-5)
  assert int(out.num_masked) == resp.sum()

  # Uniform logits: every counted position costs log V whatever the row's response length.
  out = diffusion.sft_objective(diffusion.from_logits(lambda x, v: jnp.zeros((B, L, V))),
                                jax.random.key(2), tokens_BL=tokens,
                                prompt_len_B=plen, mask_id=tok.mask_id, eps=1.0, valid_BL=valid)
  np.testing.assert_allclose(float(out.loss), math.log(V), rtol=1e-5)

  # Random masking: prompt positions stay clean in every draw.
  for seed in range(5):
    calls.clear()
    diffusion.sft_objective(diffusion.from_logits(logits_fn),
                            jax.random.key(seed), tokens_BL=tokens, prompt_len_B=plen,
                            mask_id=tok.mask_id, valid_BL=valid)
    noisy = calls[0][0]
    assert not np.any((noisy == tok.mask_id) & ~resp)
