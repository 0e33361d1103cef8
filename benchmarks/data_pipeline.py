"""Input-pipeline throughput: tokenization + packing + batching, in sequences/s.

  python benchmarks/data_pipeline.py [--seq_len=4096] [--batch_size=8] [--mb=100] [--workers=2]

Measures the built-in procedural corpus and a local text file of `--mb` megabytes that the script
writes (one document per line), each in the main process and with grain's `mp_prefetch`. Prints a table;
compare with the train step's sequences/s (tokens/s / seq_len) to see whether data keeps up.
"""

import os
import tempfile
import time

from absl import app, flags

from llada_jax.data import corpus, pipeline, sources, tokenizer

_SEQ = flags.DEFINE_integer("seq_len", 4096, "Packed sequence length.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per batch.")
_MB = flags.DEFINE_integer("mb", 100, "Size of the generated text file, in MB.")
_WORKERS = flags.DEFINE_integer("workers", 2, "mp_prefetch worker processes.")
_SECONDS = flags.DEFINE_float("seconds", 10.0, "Measuring time per row.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8000, "Tokenizer vocabulary.")


def _write_text(path: str, megabytes: int) -> int:
  written, seed = 0, 0
  with open(path, "w", encoding="utf-8") as f:
    while written < megabytes * 2**20:
      for doc in corpus.generate_documents(5000, seed):
        line = doc.replace("\n", " ") + "\n"
        f.write(line)
        written += len(line.encode())
      seed += 1
  return written


def _measure(ds, seconds: float) -> tuple[float, float]:
  it = iter(ds)
  next(it)  # start-up (index, workers) is not throughput
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    n += next(it)["tokens"].shape[0]
  dt = time.perf_counter() - t0
  return n / dt, n * _SEQ.value / dt


def main(argv):
  del argv
  tmp = tempfile.mkdtemp()
  text_path = os.path.join(tmp, "corpus.txt")
  t0 = time.perf_counter()
  size = _write_text(text_path, _MB.value)
  t1 = time.perf_counter()
  text = sources.TextSource([text_path], unit="line")
  t2 = time.perf_counter()
  builtin = corpus.generate_documents(20000, 0)
  tok = tokenizer.train_sentencepiece(sources.sample_texts(text, 20000, 0), _VOCAB.value)
  print(f"text file: {size / 2**20:.0f} MB, {len(text)} documents, written in {t1 - t0:.1f}s, "
        f"indexed in {t2 - t1:.1f}s; tokenizer {tok.vocab_size} pieces")
  rows = []
  for name, docs in (("built-in corpus", builtin), (f"text file ({_MB.value} MB)", text)):
    for workers in (0, _WORKERS.value):
      ds = pipeline.packed_dataset(docs, tok.encode, eos_id=tok.eos_id, seq_len=_SEQ.value,
                                   batch_size=_BATCH.value, seed=0)
      if workers:
        import grain
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
      seqs, toks = _measure(ds, _SECONDS.value)
      rows.append((name, "main process" if not workers else f"mp_prefetch x{workers}", seqs, toks))
  print(f"\nseq_len={_SEQ.value} batch_size={_BATCH.value} cpus={os.cpu_count()}")
  print(f"| {'source':<24} | {'mode':<16} | {'sequences/s':>12} | {'tokens/s':>12} |")
  print(f"|{'-' * 26}|{'-' * 18}|{'-' * 14}|{'-' * 14}|")
  for name, mode, seqs, toks in rows:
    print(f"| {name:<24} | {mode:<16} | {seqs:>12.1f} | {toks:>12.0f} |")


if __name__ == "__main__":
  app.run(main)
