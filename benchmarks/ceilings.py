"""Hardware ceilings of one device, measured: dense bf16 matmul rate and device-memory copy bandwidth.

  python benchmarks/ceilings.py            # prints both for jax.devices()[0]
  python benchmarks/ceilings.py --n=256 --gib=0.01   # tiny sizes (the suite's CPU rehearsal)

Imported by train_step.py and generate.py so their MFU and bandwidth floors are read against rates
measured in the same run, not only against spec sheets.
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp


def _best_seconds(f, *args, repeats: int) -> float:
  jax.block_until_ready(f(*args))  # compile + warm
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def matmul_tflops(n: int = 8192, chain: int = 8, repeats: int = 5) -> float:
  """Achievable dense bf16 TFLOP/s: best of `repeats` runs of a chain of `chain` [n, n] @ [n, n]."""
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.random.normal(k1, (n, n), jnp.bfloat16)
  w = (jax.random.normal(k2, (n, n)) * n ** -0.5).astype(jnp.bfloat16)  # keeps |x| ~ 1 along the chain
  f = jax.jit(lambda x, w: functools.reduce(lambda y, _: y @ w, range(chain), x))
  return 2 * n ** 3 * chain / _best_seconds(f, x, w, repeats=repeats) / 1e12


def copy_bandwidth_gbs(gib: float = 2.0, chain: int = 8, repeats: int = 5) -> float:
  """Achievable device-memory bandwidth in GB/s (bytes read + written) of elementwise passes.

  `chain` dependent passes `y = y * a + b` over a `gib`-GiB float32 buffer, each one a full read and a
  full write (a fused chain would read once, so every pass is kept apart by an optimization barrier).
  """
  n = int(gib * 2**30) // 4
  x = jnp.ones((n,), jnp.float32)

  def passes(y):
    for i in range(chain):
      y = jax.lax.optimization_barrier(y * 1.0001 + i)
    return y

  f = jax.jit(passes)
  return 2 * n * 4 * chain / _best_seconds(f, x, repeats=repeats) / 1e9


def main(argv=None):
  parser = argparse.ArgumentParser(description="Measured bf16 matmul rate and copy bandwidth of one device.")
  parser.add_argument("--n", type=int, default=8192, help="matmul size n (a chain of [n, n] @ [n, n])")
  parser.add_argument("--gib", type=float, default=2.0, help="copy buffer size in GiB")
  args = parser.parse_args(argv)
  d = jax.devices()[0]
  print(f"{d.device_kind} ({d.platform}), jax {jax.__version__}")
  print(f"bf16 matmul {args.n}^3 x 8: {matmul_tflops(args.n):.1f} TFLOP/s")
  print(f"memory copy (read + write), {args.gib:g} GiB f32 x 8: {copy_bandwidth_gbs(args.gib):.0f} GB/s")


if __name__ == "__main__":
  main()
