"""Multi-head attention behind one function, with the kernel chosen by `ModelConfig.attention_impl`.

`attend(q_BTNH, k_BSKH, v_BSKH, valid_BS=..., causal=..., impl=...)` computes
softmax(q k^T / sqrt(H) + mask) v per head, the softmax in float32, with grouped-query attention
(query head n reads kv head n // (N // K)). `valid_BS` is a key-padding mask: keys marked False are
never attended. Outputs at padded *query* positions are finite but meaningless; callers ignore them.

Backends:
  xla     `jax.nn.dot_product_attention` on XLA: any backend, any shape; materialises [B, N, T, S].
  cudnn   cuDNN flash attention (NVIDIA GPU, bfloat16/float16, head_dim <= 256 and a multiple of 8).
          cuDNN takes padding only as per-row key lengths (a broadcast boolean mask fails), which is
          right only when each row's valid keys are a prefix. Callers must vouch for that with
          `right_padded=True` (training batches); otherwise (the samplers left-pad prompts) a padded
          call falls back to xla.
  splash  Pallas splash attention (TPU; Pallas interpret mode elsewhere, for tests). Padding goes
          through segment ids (queries 1, valid keys 1, padded keys 0). Its blocks need T and S to be
          multiples of 128, so shorter or ragged sequences are padded up inside `attend` (the extra
          keys are masked, the extra query rows dropped). Under a multi-device mesh it runs inside a
          `shard_map` over the batch (and head) axes, since Mosaic kernels cannot be auto-partitioned.
  auto    see `resolve`.

Block-causal attention (block diffusion, REFERENCE §14) comes as `blocks=Blocks(...)`: every query and key
has a position, a half (x_t "noised" or x_0 "clean") and optionally a document id, and `block_table` says
who sees whom. xla applies it as a dense mask; splash takes it as a static `NumpyMask` (when the positions
are compile-time constants: training and prefill) with the documents and padding as segment ids; a call
whose positions are traced (a KV-cached decode step at a traced offset) runs on xla. cuDNN's fused
attention in jax takes only causal, padding and sliding-window masks, none of which is block-causal: an
explicit 'cudnn' is refused for block models (`resolve`), 'auto' picks xla there.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from llada_jax import sharding
from llada_jax.config import ATTENTION_IMPLS

_CUDNN_DTYPES = ("bfloat16", "float16")
_SPLASH_LANES = 128  # splash's block sizes must be multiples of the TPU lane width


def _backend() -> str:
  return jax.default_backend()  # a seam for tests: routing as if on a GPU


class StagedSize(NamedTuple):
  """A block size chosen at run time among static ones (a block-size schedule): `sizes[index]`."""

  sizes: tuple[int, ...]
  index: Any  # traced int32 scalar

  @property
  def value(self) -> jax.Array:
    return jnp.asarray(self.sizes, jnp.int32)[self.index]


class Blocks(NamedTuple):
  """The block structure of one attention call (module docstring). Positions and halves are numpy arrays
  when they are compile-time constants (`static`), else traced; None halves: all clean; None documents:
  one document."""

  size: Any                 # tokens per block: an int, or a schedule's StagedSize
  q_pos: Any                # [T] query positions
  k_pos: Any                # [S] key positions
  q_noised: Any = None      # [T] bool: the query is in the noised (x_t) half
  k_noised: Any = None      # [S] bool
  q_doc: Any = None         # [B, T] int document ids (packed data): attention stays inside a document
  k_doc: Any = None         # [B, S]

  @property
  def static_positions(self) -> bool:
    return all(isinstance(a, np.ndarray) for a in (self.q_pos, self.k_pos, self.q_noised, self.k_noised)
               if a is not None)

  def table(self, xp=np):
    """bool [T, S]: `block_table` of this call's positions and halves (numpy, or jnp for traced ones)."""
    size = self.size.value if isinstance(self.size, StagedSize) else self.size
    return block_table(self.q_pos, self.k_pos, self.q_noised, self.k_noised, size=size, xp=xp)


def block_table(q_pos, k_pos, q_noised=None, k_noised=None, *, size: int, xp=np):
  """Who sees whom under block diffusion (REFERENCE §14), with b(k) = position // size:

    clean query -> clean key    b(key) <= b(query)   (block-causal x_0)
    noised query -> noised key  b(key) == b(query)   (x_t inside its own block)
    noised query -> clean key   b(key) <  b(query)   (x_t reads the clean earlier blocks)
    clean query -> noised key   never

  Without halves every token is clean: plain block-causal attention, what sampling runs. Example (size 2,
  positions 0..3, all clean): query 1 sees keys 0, 1; query 2 sees keys 0..3.
  """
  bq, bk = xp.asarray(q_pos)[:, None] // size, xp.asarray(k_pos)[None, :] // size
  clean = bk <= bq
  if q_noised is None and k_noised is None:
    return clean
  T, S = bq.shape[0], bk.shape[1]
  nq = xp.zeros((T, 1), bool) if q_noised is None else xp.asarray(q_noised, bool)[:, None]
  nk = xp.zeros((1, S), bool) if k_noised is None else xp.asarray(k_noised, bool)[None, :]
  return xp.where(nq, xp.where(nk, bk == bq, bk < bq), ~nk & clean)


def resolve(impl: str, *, dtype, head_dim: int, backend: str | None = None, blocks: bool = False) -> str:
  """The concrete backend for `impl` ('auto' -> the best one here); rejects impossible requests.

  auto: 'cudnn' on a GPU backend for bfloat16/float16 with head_dim <= 256 and a multiple of 8;
  'splash' on TPU when head_dim is a multiple of 128 (lane-dense tiles; the sequence is padded to its
  blocks anyway); 'xla' otherwise (CPU, float32 on GPU, odd head sizes). `blocks`: the model is
  block-causal, which cuDNN cannot express (module docstring).
  """
  backend = backend or _backend()
  dtype = jnp.dtype(dtype).name
  cudnn_shape_ok = head_dim <= 256 and head_dim % 8 == 0
  if impl == "cudnn" and blocks:
    raise ValueError("model.attention_impl='cudnn' cannot express block-causal attention (model.block_size > 0: "
                     "jax's cuDNN attention takes only causal, padding and window masks); use 'xla', 'splash' "
                     "(TPU) or 'auto'")
  if impl == "auto":
    if backend == "gpu" and dtype in _CUDNN_DTYPES and cudnn_shape_ok and not blocks:
      return "cudnn"
    if backend == "tpu" and head_dim % _SPLASH_LANES == 0:
      return "splash"
    return "xla"
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"model.attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
  if impl == "cudnn":
    if backend != "gpu":
      raise ValueError(f"model.attention_impl='cudnn' needs a GPU backend, this one is {backend!r}; "
                       "use 'xla' or 'auto'")
    if dtype not in _CUDNN_DTYPES:
      raise ValueError(f"model.attention_impl='cudnn' needs model.dtype in {_CUDNN_DTYPES}, got {dtype!r}")
    if not cudnn_shape_ok:
      raise ValueError(f"model.attention_impl='cudnn' needs head_dim <= 256 and a multiple of 8, "
                       f"got {head_dim}")
  return impl


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *, valid_BS: jax.Array | None,
           causal: bool, impl: str, right_padded: bool = False, blocks: Blocks | None = None) -> jax.Array:
  """Attention of T queries over S keys/values -> [B, T, N, H] in q's dtype (see module docstring).

  `causal`: query t sees keys s <= t (top-left aligned when T != S, as in jax.nn).
  `right_padded`: the caller guarantees each row of `valid_BS` is True on a prefix (lets cuDNN
  use per-row key lengths). `blocks`: block-causal attention (`block_table`) on top of the padding.
  """
  N, K, H = q_BTNH.shape[2], k_BSKH.shape[2], q_BTNH.shape[3]
  if N % K:
    raise ValueError(f"query heads ({N}) must be a multiple of key/value heads ({K})")
  impl = resolve(impl, dtype=q_BTNH.dtype, head_dim=H, blocks=blocks is not None)
  if valid_BS is not None:
    valid_BS = valid_BS.astype(bool)
  if blocks is not None:
    if impl == "splash" and blocks.static_positions:
      if isinstance(blocks.size, StagedSize):  # one static kernel per size of the schedule
        branches = [functools.partial(_splash, valid_BS=valid_BS, causal=False, blocks=blocks._replace(size=n))
                    for n in blocks.size.sizes]
        return jax.lax.switch(blocks.size.index, branches, q_BTNH, k_BSKH, v_BSKH)
      return _splash(q_BTNH, k_BSKH, v_BSKH, valid_BS, False, blocks)
    mask_BTS = jnp.asarray(blocks.table(jnp))[None]
    if blocks.q_doc is not None:
      mask_BTS = mask_BTS & (blocks.q_doc[:, :, None] == blocks.k_doc[:, None, :])
    if valid_BS is not None:
      mask_BTS = mask_BTS & valid_BS[:, None, :]
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], implementation="xla")
  if impl == "splash":
    return _splash(q_BTNH, k_BSKH, v_BSKH, valid_BS, causal)
  if impl == "cudnn" and (valid_BS is None or right_padded):
    # A fully padded row (length 0) is clamped to 1 key: its output is ignored, but must not be NaN,
    # since NaN values at padded positions would leak through the next layer's zero attention weights.
    lengths_B = None if valid_BS is None else jnp.maximum(valid_BS.sum(-1, dtype=jnp.int32), 1)
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=causal,
                                        key_value_seq_lengths=lengths_B, implementation="cudnn")
  mask_B11S = None if valid_BS is None else valid_BS[:, None, None, :]
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_B11S, is_causal=causal,
                                      implementation="xla")


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _block(n: int) -> int:
  return next(b for b in (512, 256, 128) if n % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_fn(num_heads: int, T: int, S: int, causal: bool, interpret: bool, table_key: tuple | None = None):
  """The splash kernel for one example, [N, T, H] x [K, S, H] -> [N, T, H].

  Cached, since building the block masks is NumPy work at trace time; built under
  `ensure_compile_time_eval` so its mask arrays are constants, not tracers of the first caller's trace.
  `table_key` (`_table_key`): a static block-causal table instead of a full or causal mask; the padded
  queries see the padded keys (so no row of the grid is empty).
  """
  if table_key is not None:
    size, q_pos, k_pos, q_noised, k_noised, t, s = table_key
    table = np.zeros((T, S), bool)
    table[:t, :s] = block_table(np.asarray(q_pos), np.asarray(k_pos),
                                None if q_noised is None else np.asarray(q_noised),
                                None if k_noised is None else np.asarray(k_noised), size=size)
    table[t:, s:] = True
    head = splash_mask.NumpyMask(table)
  else:
    head = splash_mask.CausalMask((T, S)) if causal else splash_mask.FullMask((T, S))
  bq, bkv = _block(T), _block(S)
  blocks = splash_kernel.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                                    block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                                    block_kv_dq=bkv)
  with jax.ensure_compile_time_eval():
    return splash_kernel.make_splash_mha(splash_mask.MultiHeadMask((head,) * num_heads),
                                         block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                         interpret=interpret)


def _table_key(blocks: Blocks, T: int, S: int) -> tuple:
  tup = lambda a: None if a is None else tuple(int(v) for v in np.asarray(a))
  return (blocks.size, tup(blocks.q_pos), tup(blocks.k_pos), tup(blocks.q_noised), tup(blocks.k_noised), T, S)


def _splash_local(q_BTNH, k_BSKH, v_BSKH, *extra, causal: bool, table_key: tuple | None = None):
  """Splash on this device's shard: pad T, S to the block grid, vmap the kernel over the batch. `extra`:
  the key validity [B, S], then (with `table_key`) the query and key document ids [B, T], [B, S]."""
  (B, T, N, H), S = q_BTNH.shape, k_BSKH.shape[1]
  Tp, Sp = _round_up(T, _SPLASH_LANES), _round_up(S, _SPLASH_LANES)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
  # The kernel does not scale logits; scale q in float32 before rounding back to the compute dtype.
  q_BNTH = pad((q_BTNH.astype(jnp.float32) / math.sqrt(H)).astype(q_BTNH.dtype), Tp).transpose(0, 2, 1, 3)
  k_BKSH, v_BKSH = (pad(x, Sp).transpose(0, 2, 1, 3) for x in (k_BSKH, v_BSKH))
  kernel = _splash_fn(N, Tp, Sp, causal, jax.default_backend() != "tpu", table_key)
  valid = extra[:1]
  if table_key is not None:
    # Segments: a real query's document + 1, a valid key's document + 1, padding 0 (padded queries see the
    # padded keys, which the table allows); so a query never reads padding or another document.
    valid_BS, q_doc_BT, k_doc_BS = extra
    segments = splash_kernel.SegmentIds(q=pad(q_doc_BT + 1, Tp).astype(jnp.int32),
                                        kv=pad(jnp.where(valid_BS, k_doc_BS + 1, 0), Sp).astype(jnp.int32))
    o_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH, segments)
  elif valid or Sp != S:
    # Queries are all segment 1, so a row whose keys are all padding (segment 0) sees only masked
    # logits; splash then averages them (finite), it never divides by zero.
    valid_BS = valid[0] if valid else jnp.ones((B, S), bool)
    segments = splash_kernel.SegmentIds(q=jnp.ones((B, Tp), jnp.int32),
                                        kv=pad(valid_BS, Sp).astype(jnp.int32))
    o_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH, segments)
  else:
    o_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH)
  return o_BNTH.transpose(0, 2, 1, 3)[:, :T]


def _splash(q_BTNH, k_BSKH, v_BSKH, valid_BS, causal, blocks: Blocks | None = None):
  args = (q_BTNH, k_BSKH, v_BSKH) + (() if valid_BS is None else (valid_BS,))
  table_key = None
  if blocks is not None:
    (B, T), S = q_BTNH.shape[:2], k_BSKH.shape[1]
    table_key = _table_key(blocks, T, S)
    zeros = lambda n: jnp.zeros((B, n), jnp.int32)
    args = (q_BTNH, k_BSKH, v_BSKH, jnp.ones((B, S), bool) if valid_BS is None else valid_BS,
            zeros(T) if blocks.q_doc is None else blocks.q_doc, zeros(S) if blocks.k_doc is None else blocks.k_doc)
  local = functools.partial(_splash_local, causal=causal, table_key=table_key)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return local(*args)
  # Split batch and heads as the logical rules do; a dimension the mesh does not divide stays whole.
  spec = sharding.logical_spec(("batch", "length", "heads", "kv"))
  size = lambda axes: int(np.prod([mesh.shape[a] for a in
                                   (axes if isinstance(axes, tuple) else (axes,) if axes else ())]))
  batch = spec[0] if q_BTNH.shape[0] % size(spec[0]) == 0 else None
  heads = spec[2] if q_BTNH.shape[2] % size(spec[2]) == 0 and k_BSKH.shape[2] % size(spec[2]) == 0 else None
  qkv = P(batch, None, heads, None)
  in_specs = (qkv, qkv, qkv) + (P(batch, None),) * (len(args) - 3)
  return jax.shard_map(local, in_specs=in_specs, out_specs=qkv, check_vma=False)(*args)
