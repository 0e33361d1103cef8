"""Orbax checkpoints: one step = {train state, data iterator, config}. The only module that calls Orbax.

Saves are asynchronous (training continues while the previous step is written) and atomic (Orbax writes
to a temporary directory and renames it when complete), so a crash mid-save leaves the last complete
step intact. Restores go into an abstract target that carries the *current* mesh's shardings, so a run
can resume on a different device layout.
"""

from __future__ import annotations

import json
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from llada_jax import files

CHECKPOINT_DIR = "checkpoints"


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
                  "config": ocp.JsonCheckpointHandler()}
      self._state_save = ocp.args.PyTreeSave
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, data_iterator: grain.DatasetIterator | None,
           config: dict[str, Any], force: bool = False) -> bool:
    items = {"state": self._state_save(state), "config": ocp.args.JsonSave(config)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: Any, *,
              data_iterator: grain.DatasetIterator | None = None) -> Any:
    """Restores the train state into `abstract_state`'s shapes/shardings; the iterator in place."""
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} "
                              f"(available: {self.all_steps() or 'none'})")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise ValueError(f"checkpoint step {step} in {self.directory} could not be restored into the "
                       f"current config: {e}") from e
    return restored["state"]

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Restores only the parameters of a step (no optimizer state, no iterator): for fine-tuning."""
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} "
                              f"(available: {self.all_steps() or 'none'})")
    item = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(state=args))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise ValueError(f"parameters of checkpoint step {step} in {self.directory} do not fit the current "
                       f"model config: {e}") from e
    return restored["state"]["params"]

  def restore_config(self, step: int) -> dict[str, Any]:
    path = self.directory / str(step) / "config" / "metadata"
    if not path.exists():
      raise FileNotFoundError(f"checkpoint config not found: {path}")
    try:
      return json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"checkpoint config {path} is not valid JSON: {e}") from e

  def reached_preemption(self, step: int) -> bool:
    """Multi-host: True at the one step where every host agrees to save after a SIGTERM anywhere."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` placed with `shardings` (a concrete mesh: Orbax needs one)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
