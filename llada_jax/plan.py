"""Memory planning: where every parameter and optimizer leaf lives, and what one train step needs.

`leaf_placements` and `shardings_table` read the shardings a `train.Setup` was built with (no device
memory is touched); `dry_run` also compiles the train step for abstract inputs and asks XLA how much
memory the compiled program needs per device, so a user learns whether a model, batch, mesh and remat
policy fit before running anything. Both back `llada-train --print_shardings` / `--dry_run`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import numpy as np

from llada_jax import sharding, train

GiB = 1024 ** 3

# Memory per JAX device (one TPU chip, or one GPU), for the "fits on" column of the report.
DEVICE_MEMORY_GIB = {
    "TPU v4": 32, "TPU v5e": 16, "TPU v5p": 95, "TPU v6e": 32, "A100-80GB": 80, "H100": 80, "H200": 141,
}


@dataclasses.dataclass(frozen=True)
class LeafPlacement:
  """One array of the train state: its global shape, how it is split, and its bytes on one device."""

  path: str
  shape: tuple[int, ...]
  dtype: str
  spec: str
  total_bytes: int
  device_bytes: int  # of the largest shard


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def leaf_placements(abstract_tree: Any) -> list[LeafPlacement]:
  """Placements of a tree of ShapeDtypeStructs that carry shardings (e.g. `Setup.abstract_state`)."""
  rows = []
  for path, x in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]:
    itemsize = np.dtype(x.dtype).itemsize
    shard = x.sharding.shard_shape(x.shape)
    spec = x.sharding.spec if isinstance(x.sharding, jax.sharding.NamedSharding) else x.sharding
    rows.append(LeafPlacement(_path_str(path), tuple(x.shape), str(x.dtype), str(spec),
                              math.prod(x.shape) * itemsize, math.prod(shard) * itemsize))
  return rows


def format_bytes(n: float) -> str:
  for unit, scale in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{int(n)} B"


def shardings_table(s: train.Setup) -> str:
  """A table of every parameter, optimizer-state and reference-model leaf: shape, dtype, PartitionSpec, bytes
  per device."""
  lines = [f"mesh {dict(s.mesh.shape)}, rule set {s.config.mesh.rule_set!r}"
           + (f" with overrides {s.config.mesh.rules}" if s.config.mesh.rules else "")]
  trees = [("params", s.abstract_state.params), ("opt_state", s.abstract_state.opt_state)]
  if s.abstract_state.frozen is not None:
    trees.append(("reference (frozen)", s.abstract_state.frozen))
  if s.abstract_state.base is not None:
    trees.append(("base model (frozen; params are its LoRA adapters)", s.abstract_state.base))
  for name, tree in trees:
    rows = leaf_placements(tree)
    width = max(len(r.path) for r in rows)
    lines.append(f"\n{name}:")
    lines.append(f"  {'leaf':<{width}}  {'shape':<22} {'dtype':<9} {'spec':<36} per device")
    for r in rows:
      lines.append(f"  {r.path:<{width}}  {str(r.shape):<22} {r.dtype:<9} {r.spec:<36} "
                   f"{format_bytes(r.device_bytes)}")
    lines.append(f"  total {format_bytes(sum(r.total_bytes for r in rows))}, per device "
                 f"{format_bytes(sum(r.device_bytes for r in rows))}")
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Bytes per device of one compiled train step (XLA's `memory_analysis` of the SPMD program)."""

  num_devices: int
  mesh_shape: dict[str, int]
  params_total: int           # the whole model, all devices together
  params_per_device: int
  opt_per_device: int
  reference_per_device: int   # a frozen reference model (preference objectives), else 0
  base_per_device: int        # LoRA: the frozen base model (params/opt are then the adapters'), else 0
  batch_per_device: int
  temp_per_device: int        # activations, gradients in flight, collectives' buffers
  peak_per_device: int        # arguments + temporaries + outputs not aliased to (donated) arguments
  compile_s: float

  def table(self) -> str:
    rows = [("LoRA adapters" if self.base_per_device else "parameters", self.params_per_device),
            ("optimizer state", self.opt_per_device)]
    if self.base_per_device:
      rows.append(("base model (frozen)", self.base_per_device))
    if self.reference_per_device:
      rows.append(("reference model (frozen)", self.reference_per_device))
    rows += [("batch", self.batch_per_device), ("activations + temporaries", self.temp_per_device),
            ("peak (estimate)", self.peak_per_device)]
    out = [f"dry run: {self.num_devices} devices, mesh {self.mesh_shape}, compiled in {self.compile_s:.1f}s",
           f"{'LoRA adapters' if self.base_per_device else 'model parameters'}: {format_bytes(self.params_total)} in total",
           f"{'per device':<28} {'bytes':>14} {'':>12}"]
    out += [f"{name:<28} {n:>14,d} {format_bytes(n):>12}" for name, n in rows]
    fits = [f"{chip} ({gib} GiB): {'yes' if self.peak_per_device <= gib * GiB else 'no'}"
            for chip, gib in DEVICE_MEMORY_GIB.items()]
    out.append("fits on: " + ", ".join(fits))
    return "\n".join(out)


def abstract_batch(s: train.Setup) -> dict[str, jax.ShapeDtypeStruct]:
  """A training batch as ShapeDtypeStructs with the batch shardings of `s`."""
  return {k: jax.ShapeDtypeStruct(f.shape(s.config), np.dtype(f.dtype), sharding=s.batch_shardings[k])
          for k, f in s.objective.batch.items()}


def dry_run(s: train.Setup) -> MemoryReport:
  """Compiles `s.step` for abstract inputs (nothing is allocated or run) and reports bytes per device."""
  batch = abstract_batch(s)
  t0 = time.time()
  with sharding.use_rules(s.config.mesh, s.mesh):
    compiled = s.jit_step.lower(s.abstract_state, batch).compile()
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  params = leaf_placements(s.abstract_state.params)
  opt = leaf_placements(s.abstract_state.opt_state)
  reference = leaf_placements(s.abstract_state.frozen) if s.abstract_state.frozen is not None else []
  base = leaf_placements(s.abstract_state.base) if s.abstract_state.base is not None else []
  batch_bytes = sum(r.device_bytes for r in leaf_placements(batch))
  peak = (mem.argument_size_in_bytes + mem.temp_size_in_bytes
          + max(mem.output_size_in_bytes - mem.alias_size_in_bytes, 0))
  return MemoryReport(
      num_devices=s.mesh.size, mesh_shape=dict(s.mesh.shape),
      params_total=sum(r.total_bytes for r in params),
      params_per_device=sum(r.device_bytes for r in params),
      opt_per_device=sum(r.device_bytes for r in opt),
      reference_per_device=sum(r.device_bytes for r in reference),
      base_per_device=sum(r.device_bytes for r in base), batch_per_device=batch_bytes,
      temp_per_device=int(mem.temp_size_in_bytes), peak_per_device=int(peak), compile_s=compile_s)
