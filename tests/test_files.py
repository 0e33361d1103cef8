"""Workdir files locally and in a bucket: an in-memory filesystem stands in for gs:// (no network)."""

import json

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from llada_jax import files, metrics
from llada_jax.data import corpus, tokenizer


class _FakeGCS(MemoryFileSystem):
  protocol = ("gs", "gcs")
  root_marker = ""
  store: dict = {}
  pseudo_dirs = [""]


@pytest.fixture
def fake_gcs():
  _FakeGCS.store = {}
  _FakeGCS.pseudo_dirs = [""]
  for name in ("gs", "gcs"):  # etils asks fsspec for 'gcs'; users write gs://
    fsspec.register_implementation(name, _FakeGCS, clobber=True)
  yield _FakeGCS
  _FakeGCS.store = {}


def test_write_atomic_replaces_a_local_file_whole(tmp_path):
  target = files.path(tmp_path / "run", "config.json")
  files.write_atomic(target, "old")
  files.write_atomic(target, "new")
  assert target.read_text() == "new"
  assert sorted(p.name for p in target.parent.iterdir()) == ["config.json"]  # no temporary left


def test_local_paths_are_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(files.path("run", "checkpoints")) == str(tmp_path / "run" / "checkpoints")
  assert str(files.path("gs://b/run", "checkpoints")) == "gs://b/run/checkpoints"


def test_tokenizer_is_trained_once_and_reused_from_a_bucket_workdir(fake_gcs):
  docs = corpus.generate_documents(40, 0)
  tok = tokenizer.load_or_train("gs://bucket/run", lambda: corpus.iter_sentences(docs), 256)
  assert files.path("gs://bucket/run", tokenizer.TOKENIZER_FILE).exists()

  def must_not_train():
    raise AssertionError("the saved tokenizer should have been reused")

  again = tokenizer.load_or_train("gs://bucket/run", must_not_train, 256)
  assert again.model_proto == tok.model_proto


def test_metrics_jsonl_in_a_bucket_is_rewritten_whole_and_survives_a_resume(fake_gcs, monkeypatch):
  import tensorboardX  # event files to gs:// need google-cloud-storage: stubbed here

  scalars = []

  class _Writer:
    def __init__(self, logdir):
      assert logdir == "gs://bucket/run/tensorboard"

    def add_scalar(self, name, value, step):
      scalars.append((name, value, step))

    def close(self):
      pass

  monkeypatch.setattr(tensorboardX, "SummaryWriter", _Writer)
  w = metrics.MetricsWriter("gs://bucket/run", enabled=True)
  w.write(1, {"loss": 2.0})
  w.write(2, {"loss": 1.5})
  w.close()
  resumed = metrics.MetricsWriter("gs://bucket/run", enabled=True)
  resumed.write(3, {"loss": 1.0})
  rows = [json.loads(l) for l in files.path("gs://bucket/run", "metrics.jsonl").read_text().splitlines()]
  assert rows == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}]
  assert ("loss", 1.0, 3) in scalars
