"""`llada-tokenizer`: train on the user's files, inspect, and fail clearly."""

import cli_forks
from llada_jax.data import corpus, tokenizer


def _run(*args):
  return cli_forks.shared().run("llada_jax.cli.tokenizer", args, timeout=300)


def test_train_encode_decode_round_trip(tmp_path):
  (tmp_path / "a.txt").write_text("\n".join(d.replace("\n", " ") for d in corpus.generate_documents(300)))
  model = tmp_path / "tok.model"
  r = _run("train", f"--input={tmp_path}/*.txt", "--vocab_size=300", "--model_type=unigram",
           f"--output={model}", "--extra_pieces=<|tool|>")
  assert r.returncode == 0, r.stderr[-2000:]
  tok = tokenizer.SentencePieceTokenizer.load(str(model))
  assert tok.mask_id == tokenizer.MASK_ID and tok.piece_to_id("<|tool|>") is not None
  enc = _run("encode", f"--tokenizer={model}", "--text=the quiet cat")
  assert enc.returncode == 0
  ids = [int(i) for i in enc.stdout.strip().split(",")]
  assert ids == tok.encode("the quiet cat")
  dec = _run("decode", f"--tokenizer={model}", "--ids=" + ",".join(map(str, ids)))
  assert dec.stdout.strip() == "the quiet cat"


def test_errors_are_one_line(tmp_path):
  for args, needle in ((("train", f"--input={tmp_path}/none*.txt", f"--output={tmp_path}/t.model"), "none*.txt"),
                       (("encode", f"--tokenizer={tmp_path}/missing.model", "--text=x"), "missing.model"),
                       (("train", f"--input={tmp_path}/x.txt"), "--output")):
    r = _run(*args)
    assert r.returncode == 1 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
