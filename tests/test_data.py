"""Built-in corpus, tokenizer and packing pipeline."""

import math

import numpy as np
import pytest

from llada_jax.data import corpus, pipeline, tokenizer


@pytest.fixture(scope="module")
def docs_and_tok():
  docs = corpus.generate_documents(500, seed=3)
  return docs, tokenizer.train_sentencepiece(corpus.iter_sentences(docs), 256)


def test_corpus_is_deterministic_and_varied():
  a, b = corpus.generate_documents(200, seed=1), corpus.generate_documents(200, seed=1)
  assert a == b
  assert a != corpus.generate_documents(200, seed=2)
  assert len(set(a)) > 190
  text = " ".join(a)
  for marker in ("the capital of", " plus ", "count:", "reverse:", ",\n"):
    assert marker in text


def test_corpus_facts_are_consistent():
  """The same country always has the same capital, so the facts are learnable."""
  seen = {}
  for doc in corpus.generate_documents(2000, seed=0):
    for sentence in doc.split(". "):
      if sentence.startswith("the capital of"):
        words = sentence.rstrip(".").split()
        assert seen.setdefault(words[3], words[5]) == words[5]
  assert len(seen) > 10


def test_arithmetic_is_correct():
  for doc in corpus.generate_documents(300, seed=0):
    for s in doc.split(". "):
      w = s.rstrip(".").split()
      if len(w) == 5 and w[1] in ("plus", "minus") and w[3] == "is":
        a, b, c = int(w[0]), int(w[2]), int(w[4])
        assert c == (a + b if w[1] == "plus" else a - b)


def test_tokenizer_special_ids_and_round_trip(docs_and_tok, tmp_path):
  docs, tok = docs_and_tok
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.mask_id) == (0, 1, 2, 4)
  for doc in docs[:50]:
    ids = tok.encode(doc)
    assert tok.decode(ids) == doc  # identity normalisation keeps newlines and spacing
    assert tok.mask_id not in ids and tok.eos_id not in ids
  path = str(tmp_path / "tok.model")
  tok.save(path)
  assert tokenizer.SentencePieceTokenizer.load(path).encode(docs[0]) == tok.encode(docs[0])


def test_bad_tokenizer_file_names_the_file(tmp_path):
  bad = tmp_path / "tokenizer.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match=str(bad)):
    tokenizer.SentencePieceTokenizer.load(str(bad))
  with pytest.raises(FileNotFoundError, match="missing.model"):
    tokenizer.SentencePieceTokenizer.load(str(tmp_path / "missing.model"))


def test_tokenizer_training_reraises_the_data_error_not_sentencepieces():
  def sentences():  # e.g. a source whose file went bad after it was indexed
    yield from ["the quiet cat"] * 50
    raise ValueError("a.txt:51: not valid UTF-8")
  with pytest.raises(ValueError, match=r"^a\.txt:51: not valid UTF-8$"):
    tokenizer.train_sentencepiece(sentences(), 64)


def test_packing_concatenates_documents_with_eos(docs_and_tok):
  docs, tok = docs_and_tok
  ds = pipeline.packed_dataset(docs, tok.encode, eos_id=tok.eos_id, seq_len=16, batch_size=4, seed=0)
  batches = [b["tokens"] for _, b in zip(range(30), iter(ds))]
  assert all(b.shape == (4, 16) and b.dtype == np.int32 for b in batches)
  stream = np.concatenate([b.reshape(-1) for b in batches])
  # Every document of the shuffled stream appears whole and EOS-terminated, in order.
  pieces = np.split(stream, np.flatnonzero(stream == tok.eos_id) + 1)[:-1]
  texts = {tok.decode(p[:-1]) for p in pieces}
  assert texts <= set(docs) and len(texts) > 5


def _stream(ds, num_batches):
  return np.concatenate([b["tokens"].reshape(-1) for _, b in zip(range(num_batches), iter(ds))])


def test_packing_preserves_every_token_in_order(docs_and_tok):
  """The packed stream is exactly the shuffled documents' ids, each followed by EOS, back to back."""
  import grain
  docs, tok = docs_and_tok
  ds = pipeline.packed_dataset(docs, tok.encode, eos_id=tok.eos_id, seq_len=16, batch_size=4, seed=3)
  stream = _stream(ds, 20)
  order = grain.MapDataset.source(docs).shuffle(seed=3)
  expected = []
  for i in range(len(docs)):
    expected += tok.encode(order[i]) + [tok.eos_id]
    if len(expected) >= len(stream):
      break
  np.testing.assert_array_equal(stream, expected[: len(stream)])


def test_two_hosts_see_disjoint_halves_covering_the_epoch(docs_and_tok):
  docs, tok = docs_and_tok
  docs = sorted(set(docs))[:40]
  seen = []
  for index in range(2):
    ds = pipeline.packed_dataset(docs, tok.encode, eos_id=tok.eos_id, seq_len=16, batch_size=2, seed=0,
                                 process_index=index, process_count=2)
    pieces = np.split(_stream(ds, 60), np.flatnonzero(_stream(ds, 60) == tok.eos_id) + 1)
    seen.append({tok.decode(p[:-1]) for p in pieces[:20]})  # this host's first epoch: 20 documents
  assert seen[0].isdisjoint(seen[1])
  assert seen[0] | seen[1] == set(docs)


def test_tokenizer_without_mask_piece_is_refused(tmp_path):
  import io
  import sentencepiece as spm
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus.generate_documents(200)), model_writer=buf,
                                 vocab_size=100, minloglevel=2)
  path = tmp_path / "nomask.model"
  path.write_bytes(buf.getvalue())
  with pytest.raises(ValueError, match="nomask.model.*mask"):
    tokenizer.SentencePieceTokenizer.load(str(path))


def test_iterator_state_resumes_exactly(docs_and_tok):
  docs, tok = docs_and_tok
  ds = pipeline.packed_dataset(docs, tok.encode, eos_id=tok.eos_id, seq_len=16, batch_size=2, seed=5)
  it = iter(ds)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it)["tokens"] for _ in range(5)]
  it2 = iter(ds)
  it2.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(it2)["tokens"], e)


def test_host_sharding_splits_documents(docs_and_tok):
  docs, tok = docs_and_tok
  firsts = []
  for index in range(2):
    ds = pipeline.packed_dataset(docs, tok.encode, eos_id=tok.eos_id, seq_len=16, batch_size=2, seed=0,
                                 process_index=index, process_count=2)
    firsts.append(next(iter(ds))["tokens"])
  assert not np.array_equal(firsts[0], firsts[1])
  with pytest.raises(ValueError, match="train.batch_size"):
    pipeline.host_batch_size(6, process_count=4)
  assert pipeline.host_batch_size(8, process_count=4) == 2


def test_unigram_entropy_matches_definition():
  docs = ["a b", "a"]
  encode = lambda d: [{"a": 5, "b": 6}[w] for w in d.split()]
  # tokens: 5, 6, EOS, 5, EOS -> p = (2/5, 1/5, 2/5)
  expected = -(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2))
  assert corpus.unigram_entropy(docs, encode, eos_id=1) == pytest.approx(expected)
