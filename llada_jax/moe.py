"""Mixture-of-experts feed-forward (REFERENCE §13): routing, grouped dispatch, auxiliary losses.

Pure functions of arrays (the model, llada_jax.model, owns the parameters):

  route      router logits [N, E] -> each token's k experts and their weights. Scores are softmax or sigmoid
             of the logits in float32; an optional per-expert bias is added for *choosing* only (LLaDA2.0's
             aux-loss-free balancing), never to the weights; the chosen scores are optionally renormalised to
             sum to 1, then multiplied by `scaling`.
  dispatch   the experts' SwiGLU on the tokens routed to them: the N*k (token, expert) assignments are sorted
             by expert, run through `jax.lax.ragged_dot` (one grouped matmul per projection: row block e
             meets expert e's matrix) and combined back, weighted. Dropless unless `capacity` caps each
             expert's assignments; the dropped ones (latest tokens first) are sorted past the last group,
             where ragged_dot computes nothing, and contribute zero.
  dispatch_split the same with the experts split over a mesh axis: assignments travel to their expert's
             device and back by all-to-alls (expert parallelism, inside a shard_map).
  router_stats / router_losses   load-balancing loss, router z-loss and per-expert load, for the objective.

Worked example: E = 4 experts, k = 2, softmax scores of one token [0.1, 0.5, 0.3, 0.1]: it goes to experts
1 and 2 with weights 0.5 and 0.3 (renormalised: 0.625, 0.375). With a selection bias [0, 0, 0, 0.3] it goes
to 1 and 3 with weights 0.5 and 0.1: the bias changed the choice, not the weight.

Load balancing (Switch Transformer eq. 4, as the released LLaDA-MoE code's Mixtral-derived function): per
layer aux = E * sum_e f_e * P_e, f_e = the share of tokens choosing expert e (sums to k over experts),
P_e = their mean router probability (softmax scores; sigmoid scores normalised per token); balanced routing
gives k. The z-loss (ST-MoE) is the mean over tokens of logsumexp(router logits)^2. Both are averaged over
tokens that are not padding and over layers (the released code pools every layer's tokens into one mean).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
  expert_NK: jax.Array   # int32: the k experts each token goes to, best first
  weight_NK: jax.Array   # float32: their weights in the combination
  probs_NE: jax.Array    # float32: router probabilities over all experts (for the balance loss)
  logits_NE: jax.Array   # float32: the router logits (for the z-loss)


def route(logits_NE: jax.Array, *, k: int, score: str = "softmax", renorm: bool = False,
          scaling: float = 1.0, bias_E: jax.Array | None = None) -> Routing:
  """Top-k routing of N tokens over E experts (see the module docstring), all in float32."""
  logits = logits_NE.astype(jnp.float32)
  if score == "softmax":
    scores = jax.nn.softmax(logits, axis=-1)
    probs = scores
  elif score == "sigmoid":
    scores = jax.nn.sigmoid(logits)
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  else:
    raise ValueError(f"router score must be 'softmax' or 'sigmoid'; got {score!r}")
  choose = scores if bias_E is None else scores + jax.lax.stop_gradient(bias_E.astype(jnp.float32))
  _, expert_NK = jax.lax.top_k(choose, k)
  weight_NK = jnp.take_along_axis(scores, expert_NK, axis=-1)
  if renorm:
    weight_NK = weight_NK / jnp.sum(weight_NK, axis=-1, keepdims=True)
  return Routing(expert_NK.astype(jnp.int32), weight_NK * scaling, probs, logits)


def capacity(num_tokens: int, *, k: int, num_experts: int, factor: float) -> int | None:
  """Assignments one expert may take: ceil(factor * tokens * k / experts); None (dropless) for factor 0."""
  if not factor:
    return None
  return max(1, math.ceil(factor * num_tokens * k / num_experts))


def _by_expert(expert_NK: jax.Array, num_experts: int, capacity: int | None
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The assignments (a = n * K + j) sorted by expert, then by token: (order [A], their experts [A], each
  expert's count [E] after the capacity, which sorted assignments the capacity keeps [A])."""
  expert_A = expert_NK.reshape(-1)
  order_A = jnp.argsort(expert_A, stable=True)
  sorted_expert = expert_A[order_A]
  counts_E = jnp.bincount(expert_A, length=num_experts).astype(jnp.int32)
  if capacity is None:
    return order_A, sorted_expert, counts_E, jnp.ones(expert_A.shape, bool)
  starts_E = jnp.cumsum(counts_E) - counts_E
  keep_sorted = jnp.arange(expert_A.shape[0]) - starts_E[sorted_expert] < capacity
  return order_A, sorted_expert, jnp.minimum(counts_E, capacity), keep_sorted


def _swiglu_groups(x_RD: jax.Array, gate_EDF: jax.Array, up_EDF: jax.Array, down_EFD: jax.Array,
                   group_sizes_E: jax.Array) -> jax.Array:
  """Rows grouped by expert through their expert's SwiGLU (rows past the last group give zeros)."""
  dt = x_RD.dtype
  gate = jax.lax.ragged_dot(x_RD, gate_EDF.astype(dt), group_sizes_E)
  up = jax.lax.ragged_dot(x_RD, up_EDF.astype(dt), group_sizes_E)
  return jax.lax.ragged_dot(jax.nn.silu(gate) * up, down_EFD.astype(dt), group_sizes_E)


def _combine(y_AD: jax.Array, kept_A: jax.Array, routing: Routing) -> tuple[jax.Array, jax.Array]:
  """Each token's expert outputs (assignment order) summed with their weights, in float32; dropped
  assignments weigh 0. Returns the result in y's dtype and the kept mask [N, K]."""
  N, K = routing.expert_NK.shape
  kept_NK = kept_A.reshape(N, K)
  w_NK = jnp.where(kept_NK, routing.weight_NK, 0.0)
  y_ND = jnp.einsum("nkd,nk->nd", y_AD.reshape(N, K, -1).astype(jnp.float32), w_NK)
  return y_ND.astype(y_AD.dtype), kept_NK


def dispatch(x_ND: jax.Array, routing: Routing, gate_EDF: jax.Array, up_EDF: jax.Array, down_EFD: jax.Array,
             *, capacity: int | None = None) -> tuple[jax.Array, jax.Array]:
  """sum_j weight[n, j] * SwiGLU_{expert[n, j]}(x[n]) for every token, and which assignments ran [N, k].

  The matmuls run in x's dtype (the weights are cast to it); the combination in float32.
  """
  K, E = routing.expert_NK.shape[1], gate_EDF.shape[0]
  order_A, sorted_expert, group_sizes_E, keep_sorted = _by_expert(routing.expert_NK, E, capacity)
  kept_A = jnp.zeros(keep_sorted.shape, bool).at[order_A].set(keep_sorted)
  if capacity is not None:
    # Kept assignments stay grouped by expert in front; dropped ones move past the last group.
    order_A = order_A[jnp.argsort(jnp.where(keep_sorted, sorted_expert, E), stable=True)]
  y_AD = _swiglu_groups(jnp.take(x_ND, order_A // K, axis=0), gate_EDF, up_EDF, down_EFD, group_sizes_E)
  return _combine(jnp.zeros_like(y_AD).at[order_A].set(y_AD), kept_A, routing)  # back to assignment order


def dispatch_split(x_ND: jax.Array, routing: Routing, gate_EDF: jax.Array, up_EDF: jax.Array,
                   down_EFD: jax.Array, *, axis, capacity: int | None = None) -> tuple[jax.Array, jax.Array]:
  """`dispatch` with the experts split over the mesh axis `axis` (expert parallelism; call inside a
  `shard_map` over it): each of its P devices holds E/P consecutive experts ([E/P, ...] leaves here), and
  every assignment travels to the device of its expert and back by two all-to-alls.

  Send buffer: P slots of N*k rows (room for every assignment going to one device: dropless), slot j
  holding this device's assignments to device j's experts, sorted by expert. A device receives P such
  slots, regroups their rows by its own experts for the grouped matmuls (rows past a slot's count are
  padding, sorted past the last group, where ragged_dot computes nothing), returns each result to its slot,
  and the all-to-all back brings them home. Equal to `dispatch` with every expert local, up to summation
  order; the buffers are P x N*k rows per device.
  """
  N, K = routing.expert_NK.shape
  E_local, D = gate_EDF.shape[0], x_ND.shape[-1]
  P = jax.lax.axis_size(axis)
  A = N * K
  order_A, sorted_expert, counts_E, keep_sorted = _by_expert(routing.expert_NK, E_local * P, capacity)
  # Slot of each kept row: its device's slot, at its rank among the kept rows sent there.
  dest = sorted_expert // E_local
  sent_P = counts_E.reshape(P, E_local).sum(axis=1)
  rank = jnp.cumsum(keep_sorted) - 1 - (jnp.cumsum(sent_P) - sent_P)[dest]
  row = jnp.where(keep_sorted, dest * A + rank, P * A)  # dropped rows point past the buffer
  x_sorted = jnp.take(x_ND, order_A // K, axis=0)
  send = jnp.zeros((P * A, D), x_ND.dtype).at[row].set(x_sorted, mode="drop")
  recv = jax.lax.all_to_all(send, axis, 0, 0, tiled=True)
  recv_counts = jax.lax.all_to_all(counts_E.reshape(P, E_local), axis, 0, 0, tiled=True)  # [source, mine]
  # Each received row's local expert (E_local: padding), from its position within its source's slot.
  ends = jnp.cumsum(recv_counts, axis=1)                                     # [P, E_local]
  within = jnp.arange(A)
  local_expert = jax.vmap(lambda e: jnp.searchsorted(e, within, side="right"))(ends).reshape(-1)
  order_R = jnp.argsort(local_expert, stable=True)
  y_R = _swiglu_groups(jnp.take(recv, order_R, axis=0), gate_EDF, up_EDF, down_EFD, recv_counts.sum(axis=0))
  back = jax.lax.all_to_all(jnp.zeros_like(y_R).at[order_R].set(y_R), axis, 0, 0, tiled=True)
  y_sorted = jnp.take(back, jnp.minimum(row, P * A - 1), axis=0)
  y_AD = jnp.zeros((A, D), y_R.dtype).at[order_A].set(jnp.where(keep_sorted[:, None], y_sorted, 0))
  return _combine(y_AD, jnp.zeros((A,), bool).at[order_A].set(keep_sorted), routing)


def router_stats(routing: Routing, kept_NK: jax.Array, valid_N: jax.Array | None = None) -> dict[str, jax.Array]:
  """One layer's statistics over its non-padding tokens: 'aux' (load-balancing loss), 'z' (router z-loss),
  'load' [E] (share of assignments each expert was chosen for; sums to 1) and 'dropped' (share of
  assignments over capacity)."""
  N, K = routing.expert_NK.shape
  E = routing.probs_NE.shape[-1]
  w_N = jnp.ones((N,), jnp.float32) if valid_N is None else valid_N.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w_N), 1.0)
  chosen_NE = jnp.sum(jax.nn.one_hot(routing.expert_NK, E, dtype=jnp.float32), axis=1)  # [N, E], rows sum to K
  f_E = jnp.einsum("ne,n->e", chosen_NE, w_N) / n
  p_E = jnp.einsum("ne,n->e", routing.probs_NE, w_N) / n
  lse_N = jax.nn.logsumexp(routing.logits_NE, axis=-1)
  return {"aux": E * jnp.sum(f_E * p_E), "z": jnp.sum(w_N * lse_N ** 2) / n, "load": f_E / K,
          "dropped": jnp.sum(w_N[:, None] * (~kept_NK)) / (n * K)}


def mean_stats(stats: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
  """The mean of several calls' statistics, each already a mean over its layers."""
  return jax.tree.map(lambda *xs: sum(xs) / len(xs), *stats)


def router_losses(stats: dict[str, jax.Array], *, aux_weight: float, z_weight: float
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(weighted loss to add, metrics) from layer-averaged statistics: moe_aux_loss and moe_z_loss (unweighted),
  moe_dropped, expert_load_max (the busiest expert's share times E: 1 when balanced) and one
  'expert_load/NNN' per expert (its share of assignments)."""
  load_E = stats["load"]
  metrics = {"moe_aux_loss": stats["aux"], "moe_z_loss": stats["z"], "moe_dropped": stats["dropped"],
             "expert_load_max": jnp.max(load_E) * load_E.shape[0]}
  width = len(str(load_E.shape[0] - 1))
  metrics.update({f"expert_load/{e:0{width}d}": load_E[e] for e in range(load_E.shape[0])})
  return aux_weight * stats["aux"] + z_weight * stats["z"], metrics
