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
"""

from __future__ import annotations

import functools
import math

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


def resolve(impl: str, *, dtype, head_dim: int, backend: str | None = None) -> str:
  """The concrete backend for `impl` ('auto' -> the best one here); rejects impossible requests.

  auto: 'cudnn' on a GPU backend for bfloat16/float16 with head_dim <= 256 and a multiple of 8;
  'splash' on TPU when head_dim is a multiple of 128 (lane-dense tiles; the sequence is padded to its
  blocks anyway); 'xla' otherwise (CPU, float32 on GPU, odd head sizes).
  """
  backend = backend or _backend()
  dtype = jnp.dtype(dtype).name
  cudnn_shape_ok = head_dim <= 256 and head_dim % 8 == 0
  if impl == "auto":
    if backend == "gpu" and dtype in _CUDNN_DTYPES and cudnn_shape_ok:
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
           causal: bool, impl: str, right_padded: bool = False) -> jax.Array:
  """Attention of T queries over S keys/values -> [B, T, N, H] in q's dtype (see module docstring).

  `causal`: query t sees keys s <= t (top-left aligned when T != S, as in jax.nn).
  `right_padded`: the caller guarantees each row of `valid_BS` is True on a prefix (lets cuDNN
  use per-row key lengths).
  """
  N, K, H = q_BTNH.shape[2], k_BSKH.shape[2], q_BTNH.shape[3]
  if N % K:
    raise ValueError(f"query heads ({N}) must be a multiple of key/value heads ({K})")
  impl = resolve(impl, dtype=q_BTNH.dtype, head_dim=H)
  if valid_BS is not None:
    valid_BS = valid_BS.astype(bool)
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
def _splash_fn(num_heads: int, T: int, S: int, causal: bool, interpret: bool):
  """The splash kernel for one example, [N, T, H] x [K, S, H] -> [N, T, H].

  Cached, since building the block masks is NumPy work at trace time; built under
  `ensure_compile_time_eval` so its mask arrays are constants, not tracers of the first caller's trace.
  """
  head = splash_mask.CausalMask((T, S)) if causal else splash_mask.FullMask((T, S))
  bq, bkv = _block(T), _block(S)
  blocks = splash_kernel.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                                    block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                                    block_kv_dq=bkv)
  with jax.ensure_compile_time_eval():
    return splash_kernel.make_splash_mha(splash_mask.MultiHeadMask((head,) * num_heads),
                                         block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                         interpret=interpret)


def _splash_local(q_BTNH, k_BSKH, v_BSKH, *valid, causal: bool):
  """Splash on this device's shard: pad T, S to the block grid, vmap the kernel over the batch."""
  (B, T, N, H), S = q_BTNH.shape, k_BSKH.shape[1]
  Tp, Sp = _round_up(T, _SPLASH_LANES), _round_up(S, _SPLASH_LANES)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
  # The kernel does not scale logits; scale q in float32 before rounding back to the compute dtype.
  q_BNTH = pad((q_BTNH.astype(jnp.float32) / math.sqrt(H)).astype(q_BTNH.dtype), Tp).transpose(0, 2, 1, 3)
  k_BKSH, v_BKSH = (pad(x, Sp).transpose(0, 2, 1, 3) for x in (k_BSKH, v_BSKH))
  kernel = _splash_fn(N, Tp, Sp, causal, jax.default_backend() != "tpu")
  if valid or Sp != S:
    # Queries are all segment 1, so a row whose keys are all padding (segment 0) sees only masked
    # logits; splash then averages them (finite), it never divides by zero.
    valid_BS = valid[0] if valid else jnp.ones((B, S), bool)
    segments = splash_kernel.SegmentIds(q=jnp.ones((B, Tp), jnp.int32),
                                        kv=pad(valid_BS, Sp).astype(jnp.int32))
    o_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH, segments)
  else:
    o_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH)
  return o_BNTH.transpose(0, 2, 1, 3)[:, :T]


def _splash(q_BTNH, k_BSKH, v_BSKH, valid_BS, causal):
  args = (q_BTNH, k_BSKH, v_BSKH) + (() if valid_BS is None else (valid_BS,))
  local = functools.partial(_splash_local, causal=causal)
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
  in_specs = (qkv, qkv, qkv) + (() if valid_BS is None else (P(batch, None),))
  return jax.shard_map(local, in_specs=in_specs, out_specs=qkv, check_vma=False)(*args)
