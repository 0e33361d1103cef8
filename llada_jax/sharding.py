"""Meshes, logical axis rules, and shardings for parameters, optimizer state and batches.

The only module that knows how Flax spells sharding metadata (`out_sharding`, `eager_sharding`) and how
the mesh is laid out. The model names axes logically ('batch', 'length', 'embed', 'heads', 'kv', 'mlp',
'vocab', 'layers', 'norm', 'expert'); a named rule set (`MeshConfig.rule_set`, tables in `RULE_SETS`,
single entries overridable by `MeshConfig.rules`) maps those names onto the mesh axes ('data', 'fsdp',
'expert', 'tensor').
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from llada_jax import config as config_lib
from llada_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")

_ALWAYS = (("length", None), ("kv", None), ("layers", None), ("norm", None))
RULE_SETS: dict[str, tuple[tuple[str, Any], ...]] = {
    # Every device holds all parameters; the batch is split over data*fsdp.
    "dp": (("batch", ("data", "fsdp")), ("embed", None), ("heads", None), ("mlp", None),
           ("vocab", None), ("expert", None)) + _ALWAYS,
    # ZeRO-3 style: parameters (and optimizer state) split over fsdp along 'embed', gathered per layer.
    "fsdp": (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", None), ("mlp", None),
             ("vocab", None), ("expert", None)) + _ALWAYS,
    # fsdp, plus attention heads, MLP hidden units and the vocabulary split over 'tensor'.
    "fsdp_tp": (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"),
                ("vocab", "tensor"), ("expert", None)) + _ALWAYS,
    # fsdp, plus expert parallelism: each device of the 'expert' axis holds num_experts / expert of every
    # layer's experts (stacked [experts, ...] leaves split on it, then over fsdp along 'embed'), and the
    # batch is split over every axis. Each device routes its own tokens (`map_batch_shards`) and sends every
    # assignment to its expert's device and back by all-to-all (llada_jax.moe.dispatch_split).
    "fsdp_ep": (("batch", ("data", "fsdp", "expert")), ("embed", "fsdp"), ("heads", None), ("mlp", None),
                ("vocab", None), ("expert", "expert")) + _ALWAYS,
}
assert tuple(RULE_SETS) == config_lib.RULE_SETS
assert all({name for name, _ in table} == set(config_lib.LOGICAL_AXES) for table in RULE_SETS.values())


def rules(cfg: MeshConfig) -> tuple[tuple[str, Any], ...]:
  """The logical -> mesh axis rules of `cfg`: its named set with `cfg.rules` entries replacing those."""
  table = dict(RULE_SETS[cfg.rule_set])
  table.update(dict(cfg.rules))
  return tuple(table.items())


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds the ('data', 'fsdp', 'expert', 'tensor') mesh with Auto axes (GSPMD-style propagation)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = cfg.axis_sizes(len(devices))
  auto = (AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def make_mesh_or_fallback(cfg: MeshConfig) -> tuple[MeshConfig, jax.sharding.Mesh]:
  """`make_mesh(cfg)` when its shape fits this machine's devices, else the same rules over an fsdp axis
  holding every device (a checkpoint saved on another topology, loaded for inference)."""
  try:
    cfg.axis_sizes(len(jax.devices()))
  except ValueError:
    cfg = dataclasses.replace(cfg, data=1, fsdp=-1, expert=1, tensor=1)
  return cfg, make_mesh(cfg)


def without_leading_axis(s: NamedSharding) -> NamedSharding:
  """The sharding of one slice `x[i]` of an array sharded as `s` (e.g. one layer of a stacked leaf)."""
  return NamedSharding(s.mesh, P(*s.spec[1:]))


def param(value: jax.Array, names: Sequence[str | None]) -> nnx.Param:
  """An `nnx.Param` annotated with logical axis names.

  Eager sharding is off: parameters are created abstractly (or on one device in tests) and placed by
  `jax.jit(..., out_shardings=...)`, so Flax must not try to shard them at construction.
  """
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


@contextlib.contextmanager
def use_rules(cfg: MeshConfig, mesh: jax.sharding.Mesh) -> Iterator[None]:
  """Activates `mesh` and the logical rules for tracing: `constrain` and `logical_spec` read them."""
  with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(rules(cfg)):
    yield


def logical_spec(names: Sequence[str | None], rule_table: Sequence[tuple[str, Any]] | None = None) -> P:
  """Logical axis names -> PartitionSpec over mesh axes. A mesh axis is used at most once per spec."""
  table = dict(flax_spmd.get_logical_axis_rules() if rule_table is None else rule_table)
  used: set[str] = set()
  out = []
  for name in names:
    target = table.get(name) if name is not None else None
    axes = target if isinstance(target, tuple) else ((target,) if target else ())
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op outside `use_rules`."""
  if not flax_spmd.get_logical_axis_rules() or jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(names))


def map_batch_shards(fn: Callable[..., Any], rows: Sequence[jax.Array], whole: Sequence[jax.Array] = (),
                     split: Sequence[jax.Array] = ()) -> Any:
  """`fn(*rows, *split, *whole, split_axis=...)` run on each device's share of the batch: a `shard_map` over
  the mesh axes the 'batch' rule names, the leading axis of every `rows` array (and of every output) split
  over them and each `whole` array given entire to every device (XLA gathers it first, as FSDP gathers a
  layer). The `split` arrays have their leading axis split over the mesh axes the 'expert' rule names, and
  `fn` gets those axes as `split_axis` (for its collectives); when they are unsplit (size 1, or not dividing
  the leading axis) the `split` arrays come whole and `split_axis` is None.

  For computations whose cost must follow the local batch, not the global one (the mixture-of-experts
  dispatch sorts its tokens: under automatic partitioning a sort over a split axis runs on the gathered
  global axis). Outside `use_rules`, on one device, or when the mesh does not divide the rows, `fn` runs
  on the whole arrays (split_axis None).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or not flax_spmd.get_logical_axis_rules():
    return fn(*rows, *split, *whole, split_axis=None)
  size = lambda spec: int(np.prod([mesh.shape[a] for a in (spec if isinstance(spec, tuple) else (spec,))]))
  axis = logical_spec(("batch",))[0]
  if axis is None or rows[0].shape[0] % size(axis):
    return fn(*rows, *split, *whole, split_axis=None)
  experts = logical_spec(("expert",))[0]
  if experts is not None and (size(experts) == 1 or any(x.shape[0] % size(experts) for x in split)):
    experts = None
  in_specs = (tuple(P(axis) for _ in rows) + tuple(P(experts) for _ in split) + tuple(P() for _ in whole))
  body = functools.partial(fn, split_axis=experts)
  return jax.shard_map(body, in_specs=in_specs, out_specs=P(axis))(*rows, *split, *whole)


def _var_names(v: nnx.Variable) -> tuple[str | None, ...]:
  names = v.get_metadata().get("out_sharding")
  return tuple(names) if names else (None,) * len(v.shape)


def param_logical_axes(abstract_state: nnx.State) -> dict:
  """Pure dict (same tree as the params) of logical axis-name tuples."""
  return nnx.to_pure_dict(jax.tree.map(
      lambda v: v.replace(_var_names(v)), abstract_state,
      is_leaf=lambda x: isinstance(x, nnx.Variable)))


def tree_shardings(logical_axes: Any, cfg: MeshConfig, mesh: jax.sharding.Mesh) -> Any:
  """Maps a tree of logical-name tuples to NamedShardings on `mesh` (concrete: Orbax can use them)."""
  return jax.tree.map(lambda names: NamedSharding(mesh, logical_spec(names, rules(cfg))), logical_axes,
                      is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(cfg: MeshConfig, mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, length, ...] input array."""
  return NamedSharding(mesh, logical_spec(("batch",) + (None,) * (ndim - 1), rules(cfg)))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(cfg: MeshConfig, mesh: jax.sharding.Mesh) -> int:
  """How many ways the batch dimension is split; global batches must be a multiple of it."""
  spec = logical_spec(("batch",), rules(cfg))[0]
  axes = spec if isinstance(spec, tuple) else ((spec,) if spec else ())
  return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
