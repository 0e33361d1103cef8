"""Agreement between the processes of a multi-host run, through JAX's coordination service.

`jax.experimental.multihost_utils.sync_global_devices` and `broadcast_one_to_all` are device
collectives: on CPU hosts (tests, laptops) the first one over a set of devices opens a gloo context,
which fails after 30 s if another process is that much behind (a slower host still importing, or
busy writing a checkpoint). The coordination service that `jax.distributed.initialize` started
waits as long as we ask, and needs no devices. Orbax is pointed at it too (`use_for_checkpoints`).

Every function is a no-op on a single process.
"""

import itertools

import jax
from absl import flags
from orbax.checkpoint import multihost as ocp_multihost

TIMEOUT_S = 600  # a host still compiling or writing a large checkpoint may be minutes behind
_sequence = itertools.count()  # every process calls these in the same order: the same keys


def _key(name: str) -> str:
  return f"llada_jax/{next(_sequence)}/{name}"


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier `name`."""
  if jax.process_count() == 1:
    return
  ocp_multihost.get_jax_distributed_client().wait_at_barrier(_key(name), TIMEOUT_S * 1000)


def process_0_says(name: str, value: bool) -> bool:
  """Process 0's `value` on every process (the others' own `value` is ignored)."""
  if jax.process_count() == 1:
    return value
  client, key = ocp_multihost.get_jax_distributed_client(), _key(name)
  if jax.process_index() == 0:
    client.key_value_set(key, "1" if value else "0")
  return client.blocking_key_value_get(key, TIMEOUT_S * 1000) == "1"


def use_for_checkpoints() -> None:
  """Orbax's barriers (around every save and restore) go through the coordination service too."""
  flag = "experimental_orbax_use_distributed_barrier"
  if flag in flags.FLAGS:
    flags.FLAGS[flag].value = True
