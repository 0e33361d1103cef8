"""grain pipelines: documents -> token ids + EOS -> packed fixed-length sequences -> host-local batches.

Documents are tokenized, EOS-terminated, concatenated and cut into `seq_len` chunks (packing, as in the
paper); the 1% random-length crop happens later, in the loss module. Each host reads its own shard
(`jax.process_index()` of `jax.process_count()`) and yields `batch_size // process_count` rows, so the
global batch is the per-host batch times the number of hosts. The iterator is a grain `DatasetIterator`:
its state is saved in the same checkpoint step as the model, so a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Sequence

import grain
import jax
import numpy as np

from llada_jax.config import Config


def host_batch_size(global_batch: int, process_count: int | None = None) -> int:
  n = jax.process_count() if process_count is None else process_count
  if global_batch % n:
    raise ValueError(f"config field 'train.batch_size'={global_batch} must be a multiple of the "
                     f"number of hosts ({n})")
  return global_batch // n


def packed_dataset(documents: Sequence[str], encode, *, eos_id: int, seq_len: int, batch_size: int,
                   seed: int, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """An endless, seeded, host-sharded dataset of {'tokens': int32 [batch_size, seq_len]} batches."""
  ds = grain.MapDataset.source(list(documents))[process_index::process_count]
  ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.map(lambda doc: {"tokens": np.asarray(encode(doc) + [eos_id], np.int32)})
  ds = grain.experimental.ConcatThenSplitIterDataset(ds.to_iter_dataset(), length_struct={"tokens": seq_len})
  ds = ds.map(lambda ex: {"tokens": ex["tokens"]})
  return ds.batch(batch_size, drop_remainder=True)


def make_train_iterator(config: Config, documents: Sequence[str], tokenizer) -> grain.DatasetIterator:
  """The training iterator for `config` on this host."""
  return iter(packed_dataset(
      documents, tokenizer.encode, eos_id=tokenizer.eos_id, seq_len=config.train.seq_len,
      batch_size=host_batch_size(config.train.batch_size), seed=config.data.shuffle_seed,
      process_index=jax.process_index(), process_count=jax.process_count()))
