"""Orbax checkpoints: one step = {train state, data iterator, config}. The only module that calls Orbax.

Saves are asynchronous (training continues while the previous step is written) and atomic (Orbax writes
to a temporary directory and renames it when complete), so a crash mid-save leaves the last complete
step intact. Restores go into an abstract target that carries the *current* mesh's shardings, so a run
can resume on a different device layout.

Integrity: each step also stores every array's shape and checksum (item "integrity": a plain and a
position-weighted sum of the array's raw bits, computed on the devices at save time). A restore recomputes them
and refuses a step whose bytes changed on disk, naming the array; `restore_latest_good` then moves that
step aside (to `checkpoints_corrupt/`, never deleted) and falls back to the previous one. A failed
write (a full disk, say) raises `errors.RunHalted` naming the step and the last complete one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from llada_jax import errors, files, hosts

CHECKPOINT_DIR = "checkpoints"
QUARANTINE_DIR = "checkpoints_corrupt"


class CorruptCheckpoint(ValueError):
  """A step whose files are missing, unreadable or no longer match their checksums."""


def _kept(state: Any) -> list[str]:
  """A dataclass state's fields that checkpoints hold: all but those whose metadata says
  `checkpoint: False` (e.g. frozen LoRA base weights, which are reloaded from their own checkpoint)."""
  return [f.name for f in dataclasses.fields(state) if f.metadata.get("checkpoint", True)]


def _stored(state: Any) -> Any:
  """What a step stores of a state: its checkpointed fields as a dict, leaving out fields that are None
  (a train state without a frozen reference has the layout of the states written before that field
  existed)."""
  if dataclasses.is_dataclass(state) and not isinstance(state, type):
    return {k: getattr(state, k) for k in _kept(state) if getattr(state, k) is not None}
  return state


def _rebuilt(abstract: Any, stored: Any) -> Any:
  """The state `_stored` turned into a dict, back in `abstract`'s type (fields not checkpointed: None)."""
  if dataclasses.is_dataclass(abstract) and not isinstance(abstract, type):
    kept = _kept(abstract)
    skipped = {f.name: None for f in dataclasses.fields(abstract) if f.name not in kept}
    return dataclasses.replace(abstract, **skipped, **stored)
  return stored


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """Each element's row-major position (mod 2^32), built from iotas: no reshape, so a sharded array
  is never gathered to compute it."""
  index, stride = jnp.zeros(shape, jnp.uint32), 1
  for d in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride % 2**32)
    stride *= shape[d]
  return index


@jax.jit
def _leaf_sums(leaves: list[jax.Array]) -> list[jax.Array]:
  out = []
  for x in leaves:
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)
    weights = _flat_index(x.shape) * jnp.uint32(2) + jnp.uint32(1)
    out.append(jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)]))
  return out


def checksums(state: Any) -> dict[str, list]:
  """{leaf name: [dtype, sum of the raw bits, position-weighted sum]}, both sums mod 2^32.

  Any single changed bit changes the first sum; swapped or shifted words change the second."""
  named = jax.tree_util.tree_flatten_with_path(_stored(state))[0]
  sums = jax.device_get(_leaf_sums([x for _, x in named]))
  return {jax.tree_util.keystr(path): [str(x.dtype), int(s[0]), int(s[1])]
          for (path, x), s in zip(named, sums)}


def _shapes(tree: Any) -> dict[str, list[int]]:
  named = jax.tree_util.tree_flatten_with_path(_stored(tree))[0]
  return {jax.tree_util.keystr(path): list(x.shape) for path, x in named}


def _check_layout(abstract: Any, saved: dict[str, list[int]], where: str) -> None:
  """Every array `abstract` asks for must be in the checkpoint with the same shape (dtypes may differ:
  restores cast). Raises ValueError naming the first array that does not fit."""
  want = _shapes(abstract)
  missing = [name for name in want if name not in saved]
  if missing:
    raise ValueError(f"{where} could not be restored into the current config: it has no array {missing[0]}"
                     f" ({len(missing)} missing); the optimizer or model config differs from the run that "
                     "saved it (use that run's config, or a new --workdir)")
  for name, shape in want.items():
    if saved[name] != shape:
      raise ValueError(f"{where} could not be restored into the current config: array {name} has shape "
                       f"{tuple(saved[name])} there and {tuple(shape)} in this config (use that run's "
                       "config, or a new --workdir)")


def _verify(restored: Any, stored: dict[str, list], where: str) -> None:
  """Raises CorruptCheckpoint naming the first array whose checksum differs. Arrays restored into
  another dtype (a run resumed with a new param_dtype) cannot be compared and are skipped."""
  for name, (dtype, *sums) in checksums(restored).items():
    if name in stored and stored[name][0] == dtype and stored[name][1:] != sums:
      raise CorruptCheckpoint(f"{where}: array {name} does not match the checksum saved with it "
                              "(its bytes changed on disk)")


def _existing_checkpoint_dir(path: str) -> epath.Path:
  """To read: `path` may be a workdir (holding checkpoints/) or the checkpoints folder itself."""
  inner = files.path(path, CHECKPOINT_DIR)
  return inner if inner.is_dir() else files.path(path)


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with the item layout this package uses.

  The newest `max_to_keep` steps are kept, plus every multiple of `keep_every` (0: none).

  `read_only=True` opens someone else's checkpoints (e.g. a pre-trained run to fine-tune from) without
  creating, deleting or writing anything there. `save_host_gb` bounds how many GB of a save are copied
  from the devices to host memory at once (the save then blocks on writes as it goes): for one-off
  saves of a model that already fills host memory, such as a conversion on a CPU host.
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 3, keep_every: int = 0, async_save: bool = True,
               read_only: bool = False, save_host_gb: int | None = None):
    self.directory = (_existing_checkpoint_dir(workdir) if read_only
                      else files.path(workdir, CHECKPOINT_DIR))
    if read_only and not self.directory.is_dir():
      raise FileNotFoundError(f"no checkpoints found at {self.directory}")
    # keep_period: steps that are multiples of `keep_every` survive max_to_keep's garbage collection.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, keep_period=keep_every or None,
                                           create=not read_only, enable_async_checkpointing=async_save,
                                           read_only=read_only)
    handlers = None
    self._state_save = ocp.args.StandardSave
    if save_host_gb:
      # StandardSave's handler has no such bound; its base handler writes the same format.
      handlers = {"state": ocp.PyTreeCheckpointHandler(save_device_host_concurrent_gb=save_host_gb,
                                                       save_concurrent_gb=save_host_gb),
                  "config": ocp.JsonCheckpointHandler(), "integrity": ocp.JsonCheckpointHandler()}
      self._state_save = ocp.args.PyTreeSave
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._writing: int | None = None  # the step of the last save started
    self._unreported: list[int] = []  # steps saved whose completion `committed` has not reported yet

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, data_iterator: grain.DatasetIterator | None,
           config: dict[str, Any], force: bool = False, base: dict[str, Any] | None = None) -> bool:
    """Starts writing `step` (asynchronously unless async_save=False). An error of this or the previous
    save (they surface here, or in `wait`) raises errors.RunHalted: the steps already complete stay.
    `base`: what the state depends on but does not hold (a LoRA run's base checkpoint: path, step and
    `fingerprint`), kept with the checksums and read back by `base_record`."""
    record = {"checksums": checksums(state), "shapes": _shapes(state)}
    if base is not None:
      record["base"] = base
    items = {"state": self._state_save(_stored(state)), "config": ocp.args.JsonSave(config),
             "integrity": ocp.args.JsonSave(record)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.wait()  # the previous write's error belongs to that step (Orbax would wait here anyway)
    self._writing = step
    try:
      started = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # Orbax raises a write's error as is (OSError, ValueError, ...)
      raise self._save_failed(step, e) from e
    if started:
      self._unreported.append(step)
    return started

  def committed(self) -> list[int]:
    """Steps saved since the last call that are now complete on disk (each reported once), without
    blocking: a step still being written waits for a later call. A failed write raises
    errors.RunHalted, as `wait` does."""
    if self._unreported and self._manager.is_saving_in_progress():
      # Only the newest can still be writing: each save waits for the previous one to finish.
      done, self._unreported = self._unreported[:-1], self._unreported[-1:]
      return done
    if self._unreported:
      self.wait()  # returns at once (the write has ended); raises if it failed
    done, self._unreported = self._unreported, []
    return done

  def _save_failed(self, step: int, e: Exception) -> errors.RunHalted:
    try:
      complete = [s for s in self._manager.all_steps() if s != step]  # (a failed step may be listed)
    except Exception:  # the folder itself may be unreadable
      complete = []
    last = f"step {max(complete)}" if complete else "none"
    return errors.RunHalted(
        f"writing checkpoint step {step} in {self.directory} failed ({type(e).__name__}: {e}); the last "
        f"complete checkpoint is {last}. Free space or fix the folder, then rerun the same command to "
        "resume from it")

  def restore(self, step: int, abstract_state: Any, *,
              data_iterator: grain.DatasetIterator | None = None) -> Any:
    """Restores the train state into `abstract_state`'s shapes/shardings; the iterator in place."""
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} "
                              f"(available: {self.all_steps() or 'none'})")
    items = {"state": ocp.args.StandardRestore(_stored(abstract_state))}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return _rebuilt(abstract_state, self._restore_checked(step, abstract_state, items)["state"])

  def _restore_checked(self, step: int, abstract: Any, items: dict[str, Any]) -> Any:
    """Restores `items` of `step`. The arrays' names and shapes are compared with `abstract` first (a
    mismatch is a config problem: ValueError), so a failure to read after that is the files' fault
    (CorruptCheckpoint), and the values read back must match their checksums."""
    where = f"checkpoint step {step} at {self.directory / str(step)}"
    record = self._integrity(step, where)
    if record is not None:
      _check_layout(abstract, record["shapes"], f"checkpoint step {step} in {self.directory}")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      if record is None:  # a step from before checksums: no telling a damaged file from a misfit
        raise ValueError(f"checkpoint step {step} in {self.directory} could not be restored into the "
                         f"current config: {_first_line(e)}") from e
      raise CorruptCheckpoint(f"{where} could not be read ({type(e).__name__}: {_first_line(e)})") from e
    if record is not None:
      _verify(restored["state"], record["checksums"], where)
    return restored

  def _integrity(self, step: int, where: str) -> dict[str, Any] | None:
    path = self.directory / str(step) / "integrity" / "metadata"
    if not path.exists():
      if (self.directory / str(step) / "integrity").exists():
        raise CorruptCheckpoint(f"{where}: its checksum file {path} is missing")
      return None  # written before checksums existed
    try:
      record = json.loads(path.read_text())
      if not isinstance(record["checksums"], dict) or not isinstance(record["shapes"], dict):
        raise TypeError("not a checksum record")
      return record
    except (ValueError, KeyError, TypeError) as e:
      raise CorruptCheckpoint(f"{where}: its checksum file {path} is unreadable ({e})") from e

  def restore_latest_good(self, abstract_state: Any, *, data_iterator: grain.DatasetIterator | None = None,
                          check_config: Callable[[dict[str, Any]], None] | None = None,
                          log: Callable[[str], None] = print) -> tuple[int, Any] | None:
    """Restores the newest step that reads back intact; None when there is no step at all.

    A corrupt step (unreadable config or arrays, checksum mismatch) is reported, moved aside to
    `checkpoints_corrupt/STEP-TIME` beside the checkpoints folder (kept, never deleted) and the previous
    step is tried. `check_config(saved config)` may raise ValueError for a config that does not fit the
    run (a user error, not a corruption): that propagates.
    """
    bad = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        saved = self.restore_config(step)
      except (ValueError, FileNotFoundError) as e:  # invalid JSON, or the config item is gone
        error = f"checkpoint step {step} at {self.directory / str(step)}: {e}"
      else:
        if check_config is not None:
          check_config(saved)
        try:
          return step, self.restore(step, abstract_state, data_iterator=data_iterator)
        except CorruptCheckpoint as e:
          error = e
      moved = self._quarantine(step)
      bad.append(step)
      log(f"warning: {error}; moved it to {moved} and falling back to the previous step")
    if bad:
      raise ValueError(f"no usable checkpoint left in {self.directory}: steps {bad} were corrupt (moved to "
                       f"{self.directory.parent / QUARANTINE_DIR}); restore a copy or start a new --workdir")
    return None

  def _quarantine(self, step: int) -> epath.Path:
    target = self.directory.parent / QUARANTINE_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(target)
    hosts.barrier(f"quarantine {step}")
    self._manager.reload()
    return target

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Restores only the parameters of a step (no optimizer state, no iterator): for fine-tuning."""
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} "
                              f"(available: {self.all_steps() or 'none'})")
    item = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    return self._restore_checked(step, item, {"state": args})["state"]["params"]

  def base_record(self, step: int) -> dict[str, Any] | None:
    """The `base` a step was saved with (see `save`), or None."""
    record = self._integrity(step, f"checkpoint step {step} at {self.directory / str(step)}")
    return None if record is None else record.get("base")

  def fingerprint(self, step: int) -> str:
    """A short hash identifying the parameters of `step`, of the checksums and shapes its integrity
    record holds for them (nothing else is read)."""
    where = f"checkpoint step {step} at {self.directory / str(step)}"
    record = self._integrity(step, where)
    if record is None:
      raise ValueError(f"{where} was written before checkpoints carried checksums, so it cannot anchor LoRA "
                       "adapters; save it again (e.g. a 0-step run with train.init_from pointing at it)")
    entries = {k: [v, record["shapes"].get(k)] for k, v in record["checksums"].items() if k.startswith("['params']")}
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:16]

  def restore_config(self, step: int) -> dict[str, Any]:
    path = self.directory / str(step) / "config" / "metadata"
    if not path.exists():
      raise FileNotFoundError(f"checkpoint step {step} in {self.directory} is incomplete ({path} is missing); "
                              f"use another step (available: {self.all_steps() or 'none'})")
    try:
      return json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"checkpoint config {path} is not valid JSON: {e}") from e

  def reached_preemption(self, step: int) -> bool:
    """Multi-host: True at the one step where every host agrees to save after a SIGTERM anywhere."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    """Blocks until the last save is complete; its error, if any, raises errors.RunHalted."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._save_failed(self._writing, e) from e

  def close(self) -> None:
    self._manager.close()


def restore_base(path: str, abstract_params: Any, *, expected: dict[str, Any] | None = None, label: str = "",
                 check_config: Callable[[dict[str, Any], epath.Path], None] | None = None
                 ) -> tuple[Any, dict[str, Any]]:
  """The parameters of a base model a LoRA run adapts: step `expected['step']` of the workdir (or
  checkpoints folder) `path`, else its latest, restored into `abstract_params`, and the record the run's
  checkpoints keep of it: {'path', 'step', 'fingerprint'}. A base whose fingerprint differs from
  `expected`'s is refused (ValueError). `label` names `path` in errors (e.g. the config field);
  `check_config(saved config, directory)` may refuse the base's config first."""
  name = label or path
  source = Checkpointer(path, read_only=True)
  try:
    step = source.latest_step() if expected is None else expected["step"]
    if step is None:
      raise FileNotFoundError(f"{name}: no checkpoint in {source.directory}; train that run first, or point at "
                              "a workdir whose checkpoints/ holds a step")
    if step not in source.all_steps():
      raise FileNotFoundError(f"{name}: step {step} of {source.directory}, the base model the LoRA adapters "
                              f"were trained on, is gone (available: {source.all_steps() or 'none'})")
    if check_config is not None:
      check_config(source.restore_config(step), source.directory)
    record = {"path": str(path), "step": step, "fingerprint": source.fingerprint(step)}
    if expected is not None and record["fingerprint"] != expected["fingerprint"]:  # before reading any weight
      raise ValueError(f"{name}: step {step} of {path} is not the base model the LoRA adapters were trained on "
                       f"(fingerprint {record['fingerprint']}; the adapters' checkpoint records "
                       f"{expected['fingerprint']} of {expected['path']}); point at that base, or train new "
                       "adapters")
    return source.restore_params(step, abstract_params), record
  finally:
    source.close()


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else ""


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` placed with `shardings` (a concrete mesh: Orbax needs one)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
