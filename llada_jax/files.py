"""Workdir files on a local disk or in a bucket (gs://...), spelt one way for every module.

Paths go through `etils.epath` (the path library Orbax itself uses), so a run's tokenizer, config,
metrics and checkpoints can live in Cloud Storage, where every host of a TPU slice sees the same files
and a preempted slice's successor finds them. gs:// needs `gcsfs` (the `[tpu]` / `[gcs]` extras).
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def path(root: str | os.PathLike, *parts: str) -> epath.Path:
  """`root/parts...`; a local root is made absolute (Orbax wants absolute directories)."""
  root = os.fspath(root)
  base = epath.Path(root if is_remote(root) else os.path.abspath(root))
  return base.joinpath(*parts)


def write_atomic(target: epath.Path, data: str | bytes) -> None:
  """Replaces `target` whole: never a half-written file beside a good checkpoint. Local files go via a
  synced temporary file and a rename; bucket objects only ever appear complete."""
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(target):
    (target.write_bytes if isinstance(data, bytes) else target.write_text)(data)
    return
  tmp = target.parent / (target.name + ".tmp")
  with open(os.fspath(tmp), "wb") as f:
    f.write(data if isinstance(data, bytes) else data.encode())
    f.flush()
    os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the file
  os.replace(tmp, target)


def write_atomic_with(target: epath.Path, write: Callable[[str], None]) -> None:
  """Like `write_atomic` for a library that writes a local file itself (`write(local_path)`, e.g.
  safetensors' save_file): locally the file is written beside `target`, synced and renamed into place;
  for a bucket it is written to a local temporary file and uploaded whole. Nothing is held in memory."""
  target.parent.mkdir(parents=True, exist_ok=True)
  if not is_remote(target):
    tmp = os.fspath(target.parent / (target.name + ".tmp"))
    write(tmp)
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, target)
    return
  with tempfile.TemporaryDirectory() as d:
    local = os.path.join(d, target.name)
    write(local)
    epath.Path(local).copy(target, overwrite=True)
