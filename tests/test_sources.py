"""Document sources: text, JSONL, ArrayRecord, TFDS; errors, pickling, grain, dispatch."""

import json
import os
import pickle
import socket

import grain
import numpy as np
import pytest

from llada_jax.config import DataConfig
from llada_jax.data import sources


def _write(path, content: str | bytes) -> str:
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(content.encode("utf-8") if isinstance(content, str) else content)
  return path


def _docs(source) -> list:
  return [source[i] for i in range(len(source))]


# --- paths -----------------------------------------------------------------------------------------


def test_expand_paths_globs_sorted_deduplicated_in_pattern_order(tmp_path):
  for name in ("b.txt", "a.txt", "c.log"):
    _write(tmp_path / "d" / name, "x\n")
  z = _write(tmp_path / "z.txt", "x\n")
  got = sources.expand_paths([z, str(tmp_path / "d" / "*.txt"), str(tmp_path / "d" / "a.txt")])
  assert got == [z, str(tmp_path / "d" / "a.txt"), str(tmp_path / "d" / "b.txt")]


def test_glob_matching_nothing_names_the_pattern(tmp_path):
  _write(tmp_path / "a.txt", "x\n")
  pattern = str(tmp_path / "*.jsonl")
  with pytest.raises(FileNotFoundError, match=r"data\.paths") as e:
    sources.expand_paths([str(tmp_path / "a.txt"), pattern])
  assert pattern in str(e.value)
  with pytest.raises(FileNotFoundError, match="directory"):
    sources.TextSource([str(tmp_path)])
  with pytest.raises(ValueError, match=r"data\.paths"):
    sources.TextSource([])


# --- text ------------------------------------------------------------------------------------------


def test_text_by_line_over_several_files_and_a_glob(tmp_path):
  _write(tmp_path / "shards" / "0.txt", "alpha\n\nbeta gamma\r\n\n")
  _write(tmp_path / "shards" / "1.txt", "delta ü\nepsilon")  # no final newline
  _write(tmp_path / "shards" / "2.txt", "")
  _write(tmp_path / "extra.txt", "\ufeffzeta\n")  # a byte-order mark is not part of the text
  src = sources.TextSource([str(tmp_path / "shards" / "*.txt"), str(tmp_path / "extra.txt")])
  assert _docs(src) == ["alpha", "beta gamma", "delta ü", "epsilon", "zeta"]
  assert src[-1] == "zeta" and src[np.int64(1)] == "beta gamma"
  with pytest.raises(IndexError):
    src[5]


def test_text_by_file(tmp_path):
  a = _write(tmp_path / "a.txt", "line one\nline two\n")
  b = _write(tmp_path / "b.txt", "other\n")
  _write(tmp_path / "empty.txt", "")
  src = sources.TextSource([str(tmp_path / "*.txt")], unit="file")
  assert _docs(src) == ["line one\nline two\n", "other\n"]
  assert sources.TextSource([b, a], unit="file")[0] == "other\n"
  with pytest.raises(ValueError, match="data.text_unit"):
    sources.TextSource([a], unit="paragraph")


def test_line_index_matches_python_across_chunk_boundaries(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  alphabet = np.array(list("ab \n\r"))
  text = "".join(rng.choice(alphabet, size=5000, p=[0.3, 0.3, 0.1, 0.2, 0.1]))
  path = _write(tmp_path / "t.txt", text)
  # What the index promises: lines split on '\n', a '\r' right before a '\n' dropped, empty lines skipped.
  *lines, last = text.split("\n")
  expected = [line[:-1] if line.endswith("\r") else line for line in lines] + [last]
  expected = [line for line in expected if line]
  for chunk in (1, 7, 64, 1 << 20):  # tiny chunks put '\n' and '\r\n' on every boundary
    monkeypatch.setattr(sources, "_CHUNK", chunk)
    assert _docs(sources.TextSource([path])) == expected


def test_text_invalid_utf8_names_file_and_line(tmp_path):
  path = _write(tmp_path / "bad.txt", b"fine\nalso fine\nbroken \xff here\n")
  with pytest.raises(ValueError, match=rf"{path}:3: not valid UTF-8 .*data.on_bad_record='skip'"):
    sources.TextSource([path])  # found while indexing, before any document is read
  with pytest.raises(ValueError, match=rf"{path}:3: not valid UTF-8"):
    sources.TextSource([path], unit="file")
  # A file that goes bad after it was indexed still fails with its file and line when read.
  _write(path, b"fine\nalso fine\nbroken  X here\n")
  src = sources.TextSource([path])
  _write(path, b"fine\nalso fine\nbroken \xff here\n")
  assert src[0] == "fine"
  with pytest.raises(ValueError, match=rf"{path}:3: not valid UTF-8"):
    src[2]


@pytest.mark.parametrize("chunk", [1, 7, 1 << 22])
def test_text_skip_mode_drops_and_counts_invalid_utf8(tmp_path, monkeypatch, chunk, caplog):
  monkeypatch.setattr(sources, "_DECODE_WINDOW", chunk)  # windows cut multi-byte characters
  monkeypatch.setattr(sources, "_CHUNK", chunk)
  lines = [b"caf\xc3\xa9 ok", b"bad \xff", b"", b"\xe2\x82 cut short", b"\xf0\x9f\x98\x80 fine",
           b"\xc3", b"last \xc3\xa9\xed\xa0\x80"]  # \xed\xa0\x80: a surrogate, not UTF-8
  a = _write(tmp_path / "a.txt", b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\n")
  b = _write(tmp_path / "b.txt", b"one\ntwo \xfe")  # no final newline
  with caplog.at_level("WARNING"):
    src = sources.TextSource([a, b], on_error="skip")
  assert _docs(src) == ["café ok", "\U0001F600 fine", "one"]
  assert src.num_skipped == 5
  assert src.skipped_examples == [f"{a}:{n}" for n in (2, 4, 6, 7)] + [f"{b}:2"]
  assert "text: skipped 5 bad records (data.on_bad_record='skip')" in caplog.text
  files = sources.TextSource([a, b], unit="file", on_error="skip")
  assert len(files) == 0 and files.num_skipped == 2 and files.skipped_examples == [f"{a}:2", f"{b}:2"]
  good = sources.TextSource([_write(tmp_path / "c.txt", "ok\n")], on_error="skip")
  assert good.num_skipped == 0 and good.skipped_examples == []


def test_bad_record_policy_takes_error_or_skip_only(tmp_path):
  path = _write(tmp_path / "a.txt", "x\n")
  for make in (lambda p: sources.TextSource([path], on_error=p),
               lambda p: sources.JsonlSource([_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])], on_error=p)):
    with pytest.raises(ValueError, match=r"data\.on_bad_record.*\('error', 'skip'\); got 'raise'"):
      make("raise")
    assert len(make("error")) == len(make("skip")) == 1
  with pytest.raises(ValueError, match=r"data\.on_bad_record"):
    DataConfig(on_bad_record="raise")
  assert DataConfig().on_bad_record == "error"


# --- JSONL -----------------------------------------------------------------------------------------


def _jsonl(path, records) -> str:
  lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
  return _write(path, "\n".join(lines) + "\n")


def test_jsonl_reads_the_field(tmp_path):
  _jsonl(tmp_path / "a.jsonl", [{"text": "one", "id": 1}, "", {"text": "two ü"}])
  _jsonl(tmp_path / "b.jsonl", [{"text": "three", "meta": {"x": [1, 2]}}])
  src = sources.JsonlSource([str(tmp_path / "*.jsonl")], field="text")
  assert _docs(src) == ["one", "two ü", "three"]
  assert src.num_skipped == 0
  body = sources.JsonlSource([str(tmp_path / "b.jsonl")], field="meta", on_error="skip")
  assert len(body) == 0 and body.num_skipped == 1  # 'meta' is not a string


def test_jsonl_bad_line_errors_name_path_and_line(tmp_path):
  bad_json = _jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, "", "{not json"])
  with pytest.raises(ValueError, match=rf"{bad_json}:3: not valid JSON"):
    sources.JsonlSource([bad_json], field="text")
  missing = _jsonl(tmp_path / "b.jsonl", [{"text": "ok"}, {"body": "no text here"}])
  with pytest.raises(ValueError, match=rf"{missing}:2: no field 'text' \(data.text_field\)"):
    sources.JsonlSource([missing], field="text")
  not_str = _jsonl(tmp_path / "c.jsonl", [{"text": 7}])
  with pytest.raises(ValueError, match=rf"{not_str}:1: field 'text' .* must be a string, got int"):
    sources.JsonlSource([not_str], field="text")
  not_obj = _jsonl(tmp_path / "d.jsonl", ["[1, 2]"])
  with pytest.raises(ValueError, match=rf"{not_obj}:1: expected a JSON object"):
    sources.JsonlSource([not_obj], field="text")


def test_jsonl_skip_mode_counts(tmp_path):
  path = _jsonl(tmp_path / "a.jsonl", [{"text": "a"}, "{oops", {"text": 3}, "", {"x": "y"}, "[]",
                                       {"text": "b"}])
  src = sources.JsonlSource([path], field="text", on_error="skip")
  assert _docs(src) == ["a", "b"]
  assert src.num_skipped == 4
  assert src.skipped_examples == [f"{path}:{n}" for n in (2, 3, 5, 6)]


def test_jsonl_policy_covers_invalid_utf8_and_logs_the_count(tmp_path, caplog):
  path = _write(tmp_path / "a.jsonl", b'{"text": "a"}\n{"text": "bad \xff"}\n{"text": "b"}\n{oops\n')
  with pytest.raises(ValueError, match=rf"{path}:2: not valid UTF-8 .*data.on_bad_record='skip'"):
    sources.JsonlSource([path], on_error="error")
  with caplog.at_level("WARNING"):
    src = sources.JsonlSource([path], on_error="skip")
  assert _docs(src) == ["a", "b"] and src.skipped_examples == [f"{path}:2", f"{path}:4"]
  assert f"JSONL: skipped 2 bad records (data.on_bad_record='skip'), e.g. {path}:2, {path}:4" in caplog.text


def test_jsonl_records_with_a_validator(tmp_path):
  path = _jsonl(tmp_path / "chat.jsonl", [
      {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
      {"messages": []},
      {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}])
  validate = lambda r: None if r.get("messages") else "'messages' must be a non-empty list"
  with pytest.raises(ValueError, match=rf"{path}:2: 'messages' must be a non-empty list"):
    sources.JsonlRecords([path], validate=validate)
  records = sources.JsonlRecords([path], on_error="skip", validate=validate)
  assert len(records) == 2 and records.num_skipped == 1
  assert records[1]["messages"][1]["content"] == "4"
  again = pickle.loads(pickle.dumps(records))  # the (unpicklable) lambda is not kept
  assert again[0] == records[0]


# --- ArrayRecord -----------------------------------------------------------------------------------


def test_array_record_round_trip(tmp_path):
  seqs = [[1, 2, 3], [], [7], list(range(1000)), [2**31 - 1, -5]]
  assert sources.write_token_records(str(tmp_path / "a.arrayrecord"), seqs[:3]) == 3
  sources.write_token_records(str(tmp_path / "b.arrayrecord"), (np.asarray(s, np.int64) for s in seqs[3:]))
  src = sources.ArrayRecordTokenSource([str(tmp_path / "*.arrayrecord")])
  assert len(src) == 5
  for got, want in zip(_docs(src), seqs):
    assert got.dtype == np.int32 and got.tolist() == want
  with pytest.raises(ValueError, match="int32 range"):
    sources.write_token_records(str(tmp_path / "c.arrayrecord"), [[2**31]])


@pytest.mark.parametrize("content", [b"not an array record", os.urandom(100_000)])
def test_corrupt_array_record_names_the_file(tmp_path, content):
  good = str(tmp_path / "good.arrayrecord")
  sources.write_token_records(good, [[1, 2]])
  bad = _write(tmp_path / "bad.arrayrecord", content)
  with pytest.raises(ValueError, match=rf"{bad}: not a readable ArrayRecord file"):
    sources.ArrayRecordTokenSource([good, bad])


# --- TFDS ------------------------------------------------------------------------------------------

_TFDS_DOCS = [f"document {i} ü" for i in range(7)]


@pytest.fixture(scope="module")
def tfds_builder_cls():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (an install requirement)

  class LladaSourcesTinyText(tfds.core.GeneratorBasedBuilder):
    """Registered as 'llada_sources_tiny_text' by defining it (once per test session)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self,
                                   features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(_TFDS_DOCS), "test": self._generate_examples(["held out"])}

    def _generate_examples(self, docs):
      for i, doc in enumerate(docs):
        yield i, {"text": doc}

  return LladaSourcesTinyText


@pytest.fixture
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("a source tried to open a network connection")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)


def _prepare(builder_cls, data_dir) -> None:
  builder_cls(data_dir=str(data_dir), file_format="array_record").download_and_prepare(
      file_format="array_record")


def test_tfds_reads_a_prepared_dataset(tmp_path, tfds_builder_cls, no_network):
  _prepare(tfds_builder_cls, tmp_path)
  src = sources.TfdsTextSource("llada_sources_tiny_text", "train", str(tmp_path), "text")
  docs = _docs(src)
  assert all(isinstance(d, str) for d in docs)
  assert sorted(docs) == sorted(_TFDS_DOCS)
  assert _docs(pickle.loads(pickle.dumps(src))) == docs
  with pytest.raises(ValueError, match=r"no feature 'body' \(data.text_field\).*\['text'\]"):
    sources.TfdsTextSource("llada_sources_tiny_text", "train", str(tmp_path), "body")
  with pytest.raises(ValueError, match="data.tfds_split"):
    sources.TfdsTextSource("llada_sources_tiny_text", "validation", str(tmp_path), "text")


def test_tfds_unknown_name(tmp_path, no_network):
  with pytest.raises(ValueError, match=r"data\.tfds_name.*'no_such_dataset_xyz'"):
    sources.TfdsTextSource("no_such_dataset_xyz", "train", str(tmp_path), "text")


def test_tfds_unprepared_dataset_says_how_to_build_it(tmp_path, no_network):
  data_dir = tmp_path / "empty"
  with pytest.raises(ValueError, match="not prepared") as e:
    sources.TfdsTextSource("mnist", "train", str(data_dir), "text")
  msg = str(e.value)
  assert f"tfds build mnist --data_dir={data_dir} --file_format=array_record" in msg
  assert "never downloads" in msg
  assert not data_dir.exists() or not any(data_dir.rglob("*"))  # nothing fetched or written


def test_tfds_prepared_in_another_format(tmp_path, tfds_builder_cls, no_network):
  _prepare(tfds_builder_cls, tmp_path)
  info_path = tmp_path / "llada_sources_tiny_text" / "1.0.0" / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"  # as `tfds build` without --file_format would have left it
  info_path.write_text(json.dumps(info))
  with pytest.raises(ValueError, match="prepared in .* as tfrecord.*tfds build llada_sources_tiny_text"):
    sources.TfdsTextSource("llada_sources_tiny_text", "train", str(tmp_path), "text")


# --- pickling, grain, dispatch, sampling -----------------------------------------------------------


def test_sources_survive_pickling(tmp_path):
  text = _write(tmp_path / "a.txt", "one\ntwo\n")
  jsonl = _jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"text": "y"}])
  ar = str(tmp_path / "a.arrayrecord")
  sources.write_token_records(ar, [[1], [2, 3]])
  for src in (sources.TextSource([text]), sources.TextSource([text], unit="file"),
              sources.JsonlSource([jsonl]), sources.ArrayRecordTokenSource([ar])):
    before = [np.asarray(d).tolist() for d in _docs(src)]  # reading opens files: they must not be pickled
    again = pickle.loads(pickle.dumps(src))
    assert [np.asarray(d).tolist() for d in _docs(again)] == before


def test_grain_map_dataset_over_a_text_source(tmp_path):
  lines = [f"line {i}" for i in range(50)]
  path = _write(tmp_path / "a.txt", "\n".join(lines) + "\n")
  ds = grain.MapDataset.source(sources.TextSource([path])).shuffle(seed=3).map(str.upper)
  assert sorted(ds.to_iter_dataset()) == sorted(line.upper() for line in lines)


@pytest.fixture
def absl_flags_parsed():
  """grain's multiprocessing reads absl flags, which only `app.run` parses; pytest does not."""
  from absl import flags
  was_parsed = flags.FLAGS.is_parsed()
  if not was_parsed:
    flags.FLAGS.mark_as_parsed()
  yield
  if not was_parsed:
    flags.FLAGS.unparse_flags()


def test_grain_worker_processes_read_the_sources(tmp_path, absl_flags_parsed):
  lines = [f"line {i}" for i in range(100)]
  path = _write(tmp_path / "a.txt", "\n".join(lines) + "\n")
  ar = str(tmp_path / "a.arrayrecord")
  sources.write_token_records(ar, [[i] * (i % 5 + 1) for i in range(100)])
  for src, want in ((sources.TextSource([path]), [len(line) for line in lines]),
                    (sources.ArrayRecordTokenSource([ar]), [i % 5 + 1 for i in range(100)])):
    src[0]  # the parent now holds open files; the workers must open their own
    ds = grain.MapDataset.source(src).map(len).to_iter_dataset()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=1))
    assert sorted(ds) == sorted(want)


def test_make_source_dispatch(tmp_path, tfds_builder_cls):
  text = _write(tmp_path / "a.txt", "one\ntwo\n")
  jsonl = _jsonl(tmp_path / "a.jsonl", [{"body": "x"}, {"text": "y"}])
  ar = str(tmp_path / "a.arrayrecord")
  sources.write_token_records(ar, [[4, 5]])
  _prepare(tfds_builder_cls, tmp_path / "tfds")
  cases = [
      (DataConfig(source="text", paths=(text,)), sources.TextSource, 2),
      (DataConfig(source="text", paths=(text,), text_unit="file"), sources.TextSource, 1),
      (DataConfig(source="jsonl", paths=(jsonl,), text_field="body", on_bad_record="skip"),
       sources.JsonlSource, 1),
      (DataConfig(source="array_record", paths=(ar,)), sources.ArrayRecordTokenSource, 1),
      (DataConfig(source="tfds", tfds_name="llada_sources_tiny_text", tfds_data_dir=str(tmp_path / "tfds")),
       sources.TfdsTextSource, len(_TFDS_DOCS)),
  ]
  for cfg, cls, n in cases:
    src = sources.make_source(cfg)
    assert type(src) is cls and len(src) == n
  with pytest.raises(ValueError, match="procedural"):
    sources.make_source(DataConfig(source="procedural"))
  empty = _write(tmp_path / "empty.txt", "\n\n")
  with pytest.raises(ValueError, match="no documents"):
    sources.make_source(DataConfig(source="text", paths=(empty,)))


def test_sample_texts_is_seeded_without_replacement_and_text_only(tmp_path):
  path = _write(tmp_path / "a.txt", "".join(f"doc {i}\n" for i in range(100)))
  src = sources.TextSource([path])
  a = list(sources.sample_texts(src, 30, seed=1))
  assert len(a) == 30 == len(set(a))
  assert a == list(sources.sample_texts(src, 30, seed=1))
  assert a != list(sources.sample_texts(src, 30, seed=2))
  assert sorted(sources.sample_texts(src, 1000, seed=0)) == sorted(_docs(src))
  ar = str(tmp_path / "a.arrayrecord")
  sources.write_token_records(ar, [[1, 2]])
  assert list(sources.sample_texts(sources.ArrayRecordTokenSource([ar]), 5, seed=0)) == []
