"""Attention backends side by side: forward + backward time, TFLOP/s and error against `xla`.

  python benchmarks/attention.py                                   # CPU smoke: xla and splash (interpret)
  python benchmarks/attention.py --batch=4 --seq=4096 --heads=32 --kv_heads=4 --head_dim=64   # GPU

Runs `llada_jax.attention.attend` for each backend the device supports on random bf16 q, k, v
(right-padded rows: each row keeps a random 75-100% of its keys), as `value_and_grad` of a weighted sum
of the output, so the time covers what a training step spends in attention. FLOPs counted: 4 * B * T
* S * N * H forward (scores + values, full non-causal L^2) and 2.5x that for the backward (the flash
backward recomputes the scores: 5 matmuls), 3.5x in all. The error column is the largest absolute
difference of the outputs from `xla`'s, and of the gradients relative to their largest magnitude.
"""

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from llada_jax import attention

_BATCH = flags.DEFINE_integer("batch", 2, "Batch size.")
_SEQ = flags.DEFINE_integer("seq", 256, "Sequence length (queries = keys).")
_HEADS = flags.DEFINE_integer("heads", 4, "Query heads.")
_KV = flags.DEFINE_integer("kv_heads", 2, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head size.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls (median) after one compile call.")
_IMPLS = flags.DEFINE_list("impls", None, "Backends to run (default: every one this device supports).")


def _supported() -> list[str]:
  backend = jax.default_backend()
  return ["xla"] + (["cudnn"] if backend == "gpu" else []) + (["splash"] if backend in ("tpu", "cpu") else [])


def main(argv):
  del argv
  B, L, N, K, H = _BATCH.value, _SEQ.value, _HEADS.value, _KV.value, _HEAD_DIM.value
  kq, kk, kv, kl, kw = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(kq, (B, L, N, H), jnp.bfloat16)
  k = jax.random.normal(kk, (B, L, K, H), jnp.bfloat16)
  v = jax.random.normal(kv, (B, L, K, H), jnp.bfloat16)
  lengths = jax.random.randint(kl, (B,), (3 * L) // 4, L + 1)
  valid = jnp.arange(L)[None, :] < lengths[:, None]
  w = jax.random.normal(kw, (B, L, N, H), jnp.float32)
  flops = 3.5 * 4 * B * L * L * N * H
  device = jax.devices()[0]
  print(f"{device.device_kind} ({device.platform}), jax {jax.__version__}; B={B} L={L} N={N} K={K} H={H}, "
        f"bf16; {flops / 1e12:.3f} TFLOP per forward + backward")
  print("| impl | ms (fwd+bwd) | TFLOP/s | max abs(out - xla) | max abs(grad - xla) / max abs(grad) |")
  print("|---|---|---|---|---|")
  ref = None
  for impl in _IMPLS.value or _supported():
    def loss(q, k, v, impl=impl):
      out = attention.attend(q, k, v, valid_BS=valid, causal=False, impl=impl, right_padded=True)
      return jnp.sum(out.astype(jnp.float32) * w), out
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = jax.block_until_ready(f(q, k, v))
    times = []
    for _ in range(_REPEATS.value):
      t0 = time.perf_counter()
      jax.block_until_ready(f(q, k, v))
      times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    rows = valid[:, :, None, None]  # padded query rows are meaningless by contract
    out = jnp.where(rows, out.astype(jnp.float32), 0)
    grads = [jnp.where(rows, g.astype(jnp.float32), 0) for g in grads]
    if ref is None:
      ref = out, grads
    err_out = float(jnp.max(jnp.abs(out - ref[0])))
    err_grad = max(float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r))) for g, r in zip(grads, ref[1]))
    print(f"| {impl} | {ms:.2f} | {flops / ms / 1e9:.1f} | {err_out:.3g} | {err_grad:.3g} |", flush=True)


if __name__ == "__main__":
  app.run(main)
