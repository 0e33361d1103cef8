"""Random-access document sources for grain: text files, JSONL, ArrayRecord token files, TFDS.

Every source has `__len__` and `__getitem__(int)`, the protocol of `grain.MapDataset.source`. A document
is a `str` (text, tokenized later) or an int32 `np.ndarray` (ids tokenized ahead of time).

Sources are pickled when grain ships a pipeline to its prefetch workers, so they hold only paths and
numpy offset indexes; file descriptors are opened lazily in whichever process reads, never pickled. File
sources index their files once, at construction (byte offsets, one vectorized pass per file), and read
a document with one positional read.

A record that cannot become a document (text that is not UTF-8; a JSONL line that is not JSON, not an
object, or fails its check) is found while indexing, before training starts, and handled by one policy,
`data.on_bad_record`: 'error' stops with "path:line: what is wrong", 'skip' leaves it out and logs how
many were dropped (the first few as "path:line").
"""

from __future__ import annotations

import codecs
import glob
import json
import mmap
import operator
import os
import threading
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import grain
import numpy as np

from llada_jax.config import DataConfig

_CHUNK = 1 << 26             # bytes per read while indexing: bounds memory on multi-GB files
_BOM = b"\xef\xbb\xbf"       # a UTF-8 byte-order mark some editors put at the start of a file
_MAX_OPEN_FILES = 256        # beyond this many files, open/close per read instead of caching fds
_MAX_SKIPPED_EXAMPLES = 5
_DECODE_WINDOW = 1 << 22     # bytes decoded at a time while checking UTF-8: bounds the str it makes
ON_BAD_RECORD = ("error", "skip")  # the values of data.on_bad_record


def expand_paths(patterns: Sequence[str]) -> list[str]:
  """Files named by `patterns` (paths or globs, `**` included): sorted per pattern, first occurrence kept.

  Example: expand_paths(["b.txt", "shards/*.txt"]) -> ["b.txt", "shards/0.txt", "shards/1.txt"].
  """
  if isinstance(patterns, (str, os.PathLike)):  # one path, not a sequence of characters
    patterns = [patterns]
  if not patterns:
    raise ValueError("config field 'data.paths' must name one or more files or globs; got none")
  out: list[str] = []
  seen: set[str] = set()
  for pattern in patterns:
    pattern = os.path.expanduser(os.fspath(pattern))
    # A literal path wins over glob syntax, so a file named "a[1].txt" is still found.
    matches = [pattern] if os.path.isfile(pattern) else sorted(glob.glob(pattern, recursive=True))
    files = [m for m in matches if os.path.isfile(m)]
    if not files:
      if os.path.isdir(pattern):
        hint = " (it is a directory; use a glob such as 'dir/*.txt')"
      elif not os.path.isabs(pattern):
        hint = f" (relative paths start from the current directory, {os.getcwd()})"
      else:
        hint = ""
      raise FileNotFoundError(f"data.paths entry {pattern!r} matches no file{hint}")
    for f in files:
      if f not in seen:
        seen.add(f)
        out.append(f)
  return out


def _normalize_index(index: Any, length: int) -> int:
  i = operator.index(index)  # grain passes numpy integers
  if i < 0:
    i += length
  if not 0 <= i < length:
    raise IndexError(f"document index {index} out of range for a source of {length} documents")
  return i


class _FileReader:
  """Positional reads from a fixed list of files, with descriptors opened lazily in each process.

  `os.pread` does not move a shared file offset, so threads, and processes forked after a descriptor
  was opened, can read concurrently without seeking over each other.
  """

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)
    self._reset()

  def _reset(self) -> None:
    self._fds: dict[int, int] = {}
    self._lock = threading.Lock()
    self._pid = os.getpid()

  def __getstate__(self) -> dict:
    return {"paths": self.paths}

  def __setstate__(self, state: dict) -> None:
    self.paths = state["paths"]
    self._reset()

  def _fd(self, file_index: int) -> tuple[int, bool]:
    """A descriptor for the file, and whether the caller must close it."""
    if self._pid != os.getpid():  # forked: the parent's lock may be held by a thread we don't have
      self._reset()
    fd = self._fds.get(file_index)
    if fd is not None:
      return fd, False
    with self._lock:
      fd = self._fds.get(file_index)
      if fd is None:
        fd = os.open(self.paths[file_index], os.O_RDONLY)
        if len(self._fds) >= _MAX_OPEN_FILES:
          return fd, True
        self._fds[file_index] = fd
    return fd, False

  def read(self, file_index: int, start: int, length: int) -> bytes:
    fd, close = self._fd(file_index)
    try:
      parts, done = [], 0
      while done < length:  # pread may return less than asked (e.g. > 2 GiB on Linux)
        part = os.pread(fd, length - done, start + done)
        if not part:
          raise ValueError(f"{self.paths[file_index]}: file shrank after it was indexed "
                           f"(wanted bytes [{start}, {start + length}))")
        parts.append(part)
        done += len(part)
      return b"".join(parts)
    finally:
      if close:
        os.close(fd)

  def close(self) -> None:
    if self._pid == os.getpid():
      for fd in self._fds.values():
        os.close(fd)
    self._fds = {}

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown: os may already be gone
      pass


def _line_spans(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Byte ranges [start, end) of the non-empty lines of `path`, without '\\n' or '\\r\\n'."""
  newlines, crs = [], []
  size, prev_last = 0, 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      data = np.frombuffer(chunk, np.uint8)
      nl = np.flatnonzero(data == 10)
      # The byte before each '\n' tells a CRLF line; for a '\n' at the chunk's start it is the last
      # byte of the previous chunk.
      before = data[np.maximum(nl - 1, 0)]
      if len(nl) and nl[0] == 0:
        before[0] = prev_last
      newlines.append(nl + size)
      crs.append(before == 13)
      prev_last = int(data[-1])
      size += len(chunk)
  nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
  cr = np.concatenate(crs) if crs else np.zeros(0, bool)
  starts = np.concatenate([[0], nl + 1]).astype(np.int64)
  ends = np.concatenate([nl - cr, [size]]).astype(np.int64)
  if size >= 3 and _read_head(path, 3) == _BOM:
    starts[0] = 3  # the mark holds no '\n', so it always sits inside the first line
  keep = ends > starts
  return starts[keep], ends[keep]


def _read_head(path: str, n: int) -> bytes:
  with open(path, "rb") as f:
    return f.read(n)


def _line_numbers(path: str, offsets: Sequence[int]) -> list[int]:
  """1-based numbers of the lines holding the byte `offsets` (error paths only: it rereads the file)."""
  newlines, size = [], 0
  end = max(offsets, default=0)
  with open(path, "rb") as f:
    while size < end and (chunk := f.read(min(_CHUNK, end - size))):
      newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + size)
      size += len(chunk)
  nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
  return [int(np.searchsorted(nl, o, side="left")) + 1 for o in offsets]  # '\n's before each offset


def _invalid_utf8(path: str, starts: np.ndarray, ends: np.ndarray) -> list[tuple[int, int, str]]:
  """(document index, byte offset, reason) for each document [starts[k], ends[k]) of `path` that is not
  valid UTF-8, in file order.

  One strict decode of the whole file, which is valid exactly when every document is: '\n' and '\r'
  (where documents are cut) never occur inside a multi-byte sequence, so each bad byte lies in one
  document. After a bad byte the decode resumes at the end of its document.
  """
  size = os.path.getsize(path)
  if size == 0:
    return []
  window = max(_DECODE_WINDOW, 8)  # > 3: a window always decodes at least one (possibly partial) character
  out = []
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
    pos = 0
    while pos < size:
      piece = data[pos:pos + window]
      try:
        _, used = codecs.utf_8_decode(piece, "strict", pos + len(piece) >= size)
        pos += used
      except UnicodeDecodeError as e:
        bad = pos + e.start
        k = int(np.searchsorted(ends, bad, side="right"))  # the document with start <= bad < end
        out.append((k, bad, e.reason))
        pos = int(ends[k])
  return out


class _BadRecords:
  """The data.on_bad_record policy for one source: 'error' raises on the first bad record, 'skip'
  counts them (keeping the first few locations) and `report` logs the count."""

  def __init__(self, policy: str):
    if policy not in ON_BAD_RECORD:
      raise ValueError(f"config field 'data.on_bad_record' must be one of {ON_BAD_RECORD}; got {policy!r}")
    self.policy = policy
    self.count = 0
    self.examples: list[str] = []

  def found(self, where: str, problem: str) -> None:
    if self.policy == "error":
      raise ValueError(f"{where}: {problem} (set data.on_bad_record='skip' to skip bad records)")
    self.count += 1
    if len(self.examples) < _MAX_SKIPPED_EXAMPLES:
      self.examples.append(where)

  def report(self, kind: str) -> None:
    if self.count:
      logging.warning("%s: skipped %d bad records (data.on_bad_record='skip'), e.g. %s", kind, self.count,
                      ", ".join(self.examples))


class TextSource:
  """Documents from UTF-8 text files: every non-empty line (`unit='line'`) or every whole file ('file').

  Lines lose their terminator ('\\n' or '\\r\\n'); empty lines and empty files are not documents.
  A document that is not valid UTF-8 raises ValueError("path:line: ...") with `on_error='error'`; with
  'skip' it is left out and counted in `num_skipped` (the first few "path:line" in `skipped_examples`).
  Example: TextSource(["a.txt"]) over "x\\n\\ny\\n" -> ["x", "y"].
  """

  def __init__(self, paths: Sequence[str], unit: str = "line", on_error: str = "error"):
    if unit not in ("line", "file"):
      raise ValueError(f"config field 'data.text_unit' must be one of ('line', 'file'); got {unit!r}")
    bad = _BadRecords(on_error)
    self.paths = expand_paths(paths)
    self.unit = unit
    starts, ends = [], []
    for path in self.paths:
      if unit == "line":
        s, e = _line_spans(path)
      else:
        size = os.path.getsize(path)
        first = 3 if size >= 3 and _read_head(path, 3) == _BOM else 0
        s, e = (np.array([first]), np.array([size])) if size > first else (np.zeros(0), np.zeros(0))
      s, e = s.astype(np.int64), e.astype(np.int64)
      invalid = _invalid_utf8(path, s, e)
      if invalid:
        # Line numbers only for what is shown: counting lines rereads the file.
        shown = invalid[:1] if on_error == "error" else invalid[:_MAX_SKIPPED_EXAMPLES - len(bad.examples)]
        lines = _line_numbers(path, [offset for _, offset, _ in shown])
        for i, (_, offset, reason) in enumerate(invalid):
          where = f"{path}:{lines[i]}" if i < len(lines) else path
          bad.found(where, f"not valid UTF-8 ({reason} at byte {offset} of the file)")
        keep = np.ones(len(s), bool)
        keep[[k for k, _, _ in invalid]] = False
        s, e = s[keep], e[keep]
      starts.append(s)
      ends.append(e)
    bad.report("text")
    self.num_skipped, self.skipped_examples = bad.count, bad.examples
    self._starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    self._ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    # Document i lives in the first file whose cumulative count exceeds i.
    self._file_ends = np.cumsum([len(s) for s in starts]).astype(np.int64)
    self._reader = _FileReader(self.paths)

  def __len__(self) -> int:
    return len(self._starts)

  def _locate(self, index: Any) -> tuple[int, int, int]:
    i = _normalize_index(index, len(self))
    return int(np.searchsorted(self._file_ends, i, side="right")), int(self._starts[i]), int(self._ends[i])

  def __getitem__(self, index: Any) -> str:
    file_index, start, end = self._locate(index)
    raw = self._reader.read(file_index, start, end - start)
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:  # checked at construction, so the file changed since
      path = self.paths[file_index]
      line, = _line_numbers(path, [start + e.start])
      raise ValueError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {start + e.start} of the "
                       "file); was the file modified after it was indexed?") from None

  def __repr__(self) -> str:
    return (f"TextSource({len(self.paths)} files, unit={self.unit!r}, {len(self)} documents, "
            f"{self.num_skipped} skipped)")


class Mapped:
  """A random-access source with a function applied on access (picklable if `fn` is).

  Example: Mapped(["a", "b"], str.upper)[1] -> "B". JSONL readers use it to normalise records lazily.
  """

  def __init__(self, parent: Sequence[Any], fn: Callable[[Any], Any]):
    self._parent, self._fn = parent, fn

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, index: int) -> Any:
    return self._fn(self._parent[index])


class JsonlRecords:
  """One JSON object per non-empty line of `paths`; `__getitem__` returns the parsed dict.

  Every line is parsed once at construction. A line that is not JSON, not an object, or that `validate`
  rejects (it returns an error message, or None for a good record) raises ValueError("path:line: ...")
  with `on_error='error'`; with 'skip' it is left out and counted in `num_skipped` (the first few
  "path:line" in `skipped_examples`). `validate` is used only here, so it need not be picklable.
  """

  def __init__(self, paths: Sequence[str], on_error: str = "error",
               validate: Callable[[dict], str | None] | None = None):
    bad = _BadRecords(on_error)
    self.paths = expand_paths(paths)
    starts, lengths, counts = [], [], []
    for path in self.paths:
      n_before = len(starts)
      offset = 0
      with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
          start, offset = offset, offset + len(raw)
          body = raw.rstrip(b"\r\n")
          if lineno == 1 and body.startswith(_BOM):
            body, start = body[3:], start + 3
          if not body.strip():
            continue
          err = self._check(body, validate)
          if err is not None:
            bad.found(f"{path}:{lineno}", err)
            continue
          starts.append(start)
          lengths.append(len(body))
      counts.append(len(starts) - n_before)
    bad.report("JSONL")
    self.num_skipped, self.skipped_examples = bad.count, bad.examples
    self._starts = np.asarray(starts, np.int64)
    self._lengths = np.asarray(lengths, np.int64)
    self._file_ends = np.cumsum(counts).astype(np.int64)
    self._reader = _FileReader(self.paths)

  @staticmethod
  def _check(body: bytes, validate: Callable[[dict], str | None] | None) -> str | None:
    try:
      obj = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
      return f"not valid UTF-8 ({e.reason})"
    except json.JSONDecodeError as e:
      return f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
      return f"expected a JSON object, got a JSON {type(obj).__name__}"
    return validate(obj) if validate is not None else None

  def __len__(self) -> int:
    return len(self._starts)

  def __getitem__(self, index: Any) -> dict:
    i = _normalize_index(index, len(self))
    file_index = int(np.searchsorted(self._file_ends, i, side="right"))
    raw = self._reader.read(file_index, int(self._starts[i]), int(self._lengths[i]))
    try:
      return json.loads(raw.decode("utf-8"))
    except ValueError as e:  # validated at construction, so the file changed since
      raise ValueError(f"{self.paths[file_index]}: record at byte {self._starts[i]} no longer parses "
                       f"({e}); was the file modified after it was indexed?") from None

  def __repr__(self) -> str:
    return f"{type(self).__name__}({len(self.paths)} files, {len(self)} records, {self.num_skipped} skipped)"


class JsonlSource(JsonlRecords):
  """Text documents from JSONL: document i is the string `record[field]` of the i-th good line."""

  def __init__(self, paths: Sequence[str], field: str = "text", on_error: str = "error"):
    self.field = field
    super().__init__(paths, on_error=on_error, validate=self._check_field)

  def _check_field(self, record: dict) -> str | None:
    if self.field not in record:
      return f"no field '{self.field}' (data.text_field); the record has {sorted(record)[:10]}"
    value = record[self.field]
    if not isinstance(value, str):
      return f"field '{self.field}' (data.text_field) must be a string, got {type(value).__name__}"
    return None

  def __getitem__(self, index: Any) -> str:
    return super().__getitem__(index)[self.field]


def _array_record_error(path: str, detail: str) -> ValueError:
  return ValueError(f"{path}: not a readable ArrayRecord file ({detail}); data.source='array_record' "
                    "expects files written by llada_jax.data.sources.write_token_records")


class ArrayRecordTokenSource:
  """Pre-tokenized documents from ArrayRecord files; each record is the bytes of a little-endian
  int32 array (see `write_token_records`), returned as an int32 `np.ndarray`."""

  def __init__(self, paths: Sequence[str]):
    from array_record.python import array_record_module

    self.paths = expand_paths(paths)
    counts = []
    for path in self.paths:
      try:
        reader = array_record_module.ArrayRecordReader(path)
      except RuntimeError as e:  # e.g. "file should be at least 64KB big"
        raise _array_record_error(path, str(e)) from None
      ok = reader.ok()  # a garbage file opens, but is not ok()
      if ok:
        counts.append(reader.num_records())
      try:
        reader.close()
      except RuntimeError:  # closing a reader that is not ok() re-raises its failure
        pass
      if not ok:
        raise _array_record_error(path, "corrupted, truncated or not an ArrayRecord file")
    self._file_ends = np.cumsum(counts).astype(np.int64)
    # "path[start:end]" tells grain the record counts we already have, so it does not reopen every file.
    self._source = grain.sources.ArrayRecordDataSource([f"{p}[0:{n}]" for p, n in zip(self.paths, counts)])

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: Any) -> np.ndarray:
    i = _normalize_index(index, len(self))
    record = self._source[i]
    if len(record) % 4:
      path = self.paths[int(np.searchsorted(self._file_ends, i, side="right"))]
      raise ValueError(f"{path}: record of {len(record)} bytes is not an int32 array (document {i})")
    return np.frombuffer(record, "<i4").astype(np.int32)  # copy: native order, writable

  def __repr__(self) -> str:
    return f"ArrayRecordTokenSource({len(self.paths)} files)"


def write_token_records(path: str, sequences: Iterator[Sequence[int]] | Sequence[Sequence[int]]) -> int:
  """Writes each sequence of token ids as one int32 record of an ArrayRecord file; returns the count.

  Example: write_token_records("train.arrayrecord", [[5, 6, 7], [8]]) -> 2.
  """
  from array_record.python import array_record_module

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # group_size:1 makes every record its own chunk, the layout grain needs for fast random access.
  writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
  if not writer.ok():
    raise ValueError(f"{path}: cannot open for writing an ArrayRecord file")
  n = 0
  try:
    for seq in sequences:
      arr = np.asarray(seq)
      if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{path}: sequence {n} must be a 1-D sequence of integer ids; got shape "
                         f"{arr.shape}, dtype {arr.dtype}")
      if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{path}: sequence {n} has ids outside the int32 range")
      writer.write(arr.astype("<i4").tobytes())
      n += 1
  finally:
    writer.close()
  return n


class TfdsTextSource:
  """Text documents from the `field` feature of a prepared TFDS dataset, read in array_record format.

  Never downloads: an unknown name, or a dataset not prepared (as array_record) under `data_dir`, is
  a ValueError that says how to prepare it with `tfds build`.
  """

  def __init__(self, name: str, split: str = "train", data_dir: str = "", field: str = "text"):
    import tensorflow_datasets as tfds  # slow to import: only for this source

    self.name, self.split, self.field = name, split, field
    self.data_dir = data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    try:
      # No file_format here: for a dataset prepared in another format, that would fail with an
      # opaque error instead of the how-to below.
      builder = tfds.builder(name, data_dir=self.data_dir)
    except tfds.core.DatasetNotFoundError as e:
      first = str(e).splitlines()[0] if str(e) else ""
      raise ValueError(f"config field 'data.tfds_name'={name!r}: no TFDS dataset of that name is "
                       f"registered or prepared under data.tfds_data_dir={data_dir!r} ({first}); check "
                       "the spelling (e.g. 'lm1b', 'name/config:version')") from None
    except (ValueError, AssertionError) as e:  # unknown config or version
      raise ValueError(f"config field 'data.tfds_name'={name!r}: {e}") from None
    root = os.fspath(builder.data_dir_root)
    how = (f"prepare it once with `tfds build {name} --data_dir={root} --file_format=array_record` "
           "(training never downloads)")
    if not builder.is_prepared():
      raise ValueError(f"TFDS dataset {name!r} (data.tfds_name) is not prepared in {root} "
                       f"(data.tfds_data_dir): {how}")
    from tensorflow_datasets.core import file_adapters
    formats = builder.info.available_file_formats()
    if file_adapters.FileFormat.ARRAY_RECORD not in formats:
      have = ", ".join(sorted(f.value for f in formats)) or "an unknown format"
      raise ValueError(f"TFDS dataset {name!r} is prepared in {root} as {have}, but training reads it "
                       f"with random access from array_record files: {how}")
    features = list(builder.info.features.keys())
    if field not in features:
      raise ValueError(f"TFDS dataset {name!r} has no feature '{field}' (data.text_field); its features "
                       f"are {features}")
    try:
      self._ds = self._open()
    except (KeyError, ValueError) as e:
      raise ValueError(f"TFDS dataset {name!r}: cannot read split {split!r} (data.tfds_split); its splits "
                       f"are {list(builder.info.splits)} ({e})") from None
    self._len = len(self._ds)

  def _open(self) -> Sequence[dict]:
    import tensorflow_datasets as tfds

    return tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False,
                            builder_kwargs={"file_format": "array_record"})

  # The TFDS source pickles a reference to its builder class, which a worker may not be able to import
  # (a dataset defined in a script); by name, a worker finds it in the registry or from the prepared
  # files' own metadata.
  def __getstate__(self) -> dict:
    return {k: v for k, v in self.__dict__.items() if k != "_ds"}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._ds = None

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: Any) -> str:
    if self._ds is None:
      self._ds = self._open()
    example = self._ds[_normalize_index(index, len(self))]
    if self.field not in example:
      raise ValueError(f"TFDS dataset {self.name!r} has no feature '{self.field}' (data.text_field); its "
                       f"features are {sorted(example)}")
    value = example[self.field]
    if isinstance(value, np.ndarray) and value.ndim == 0:
      value = value.item()
    if isinstance(value, bytes):
      return value.decode("utf-8")
    if isinstance(value, str):
      return value
    raise ValueError(f"TFDS dataset {self.name!r}: feature '{self.field}' (data.text_field) is not text; "
                     f"got {type(value).__name__}")

  def __repr__(self) -> str:
    return f"TfdsTextSource({self.name!r}, split={self.split!r}, {len(self)} documents)"


def make_source(cfg: DataConfig) -> Sequence[Any]:
  """The pre-training document source `cfg.source` names; 'procedural' is built by the caller."""
  if cfg.source == "text":
    source: Sequence[Any] = TextSource(cfg.paths, unit=cfg.text_unit, on_error=cfg.on_bad_record)
  elif cfg.source == "jsonl":
    source = JsonlSource(cfg.paths, field=cfg.text_field, on_error=cfg.on_bad_record)
  elif cfg.source == "array_record":
    source = ArrayRecordTokenSource(cfg.paths)
  elif cfg.source == "tfds":
    source = TfdsTextSource(cfg.tfds_name, cfg.tfds_split, cfg.tfds_data_dir, cfg.text_field)
  else:
    raise ValueError(f"config field 'data.source'={cfg.source!r} has no file source here; "
                     "'procedural' documents come from llada_jax.data.corpus")
  if len(source) == 0:  # an empty source would make the endless training loop spin forever
    where = f"data.tfds_name={cfg.tfds_name!r}" if cfg.source == "tfds" else f"data.paths={cfg.paths!r}"
    raise ValueError(f"{where} holds no documents for data.source={cfg.source!r}")
  return source


def sample_texts(source: Sequence[Any], n: int, seed: int) -> Iterator[str]:
  """Up to `n` distinct documents of `source` in a seeded random order, text only (for tokenizers)."""
  size = len(source)
  if size == 0 or n <= 0:
    return
  for i in np.random.default_rng(seed).choice(size, size=min(n, size), replace=False):
    doc = source[int(i)]
    if isinstance(doc, str):
      yield doc
