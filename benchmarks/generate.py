"""Generation speed: ms per reverse-process step and tokens/s, per sampling mode.

  python benchmarks/generate.py --config=configs/tiny.py                      # CPU smoke table
  python benchmarks/generate.py --config=configs/default.py:llada_8b \\
      --gen_lengths=256 --batch_sizes=1 --prompt_length=64 --block_length=32 --bf16_params   # GPU

Random weights of the configured shape (no checkpoint needed). Modes: plain (the official schedule,
`steps = gen_length`), +threshold (Fast-dLLM tau=0.9), +prefix cache, +dual cache (both with the
threshold off, so steps are fixed and ms/step compares like with like). Beside each row: the
weight-streaming floor (parameter bytes / memory bandwidth, one read of the weights per step) and the
compute floor (model FLOPs of one step / peak FLOP/s). On a GPU/TPU both ceilings are measured first
(benchmarks/ceilings.py: copy bandwidth, bf16 matmul rate); elsewhere the spec sheet's, if known.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import ceilings  # benchmarks/ceilings.py (the script's folder is on sys.path)
from llada_jax import config as config_lib, metrics, model, sampling

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model config file.", lock_config=True)
_GEN = flags.DEFINE_list("gen_lengths", ["64", "256"], "Generation lengths.")
_BATCH = flags.DEFINE_list("batch_sizes", ["1", "4"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_length", 64, "Prompt tokens.")
_BLOCK = flags.DEFINE_integer("block_length", 32, "Semi-autoregressive block length.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per row (after one compile run).")
_BF16 = flags.DEFINE_bool("bf16_params", False, "Cast parameters to bfloat16 (inference).")
_MODES = flags.DEFINE_list("modes", ["plain", "threshold", "prefix", "dual"], "Modes to run.")

# HBM bandwidth in bytes/s by device_kind prefix (spec sheets).
BANDWIDTH = {"NVIDIA H200": 4.8e12, "NVIDIA H100": 3.35e12, "NVIDIA A100": 2.0e12, "TPU v5p": 2.76e12,
             "TPU v5 lite": 0.82e12, "TPU v5e": 0.82e12, "TPU v6 lite": 1.64e12, "TPU v6e": 1.64e12, "TPU v4": 1.2e12}
MODES = {"plain": {}, "threshold": {"threshold": 0.9}, "prefix": {"kv_cache": "prefix"},
         "dual": {"kv_cache": "dual"}}


def _lookup(table, device):
  for prefix in sorted(table, key=len, reverse=True):
    if device.device_kind.startswith(prefix):
      return table[prefix]
  return None


def main(argv):
  del argv
  cfg = config_lib.from_config_dict(_CONFIG.value).model
  device = jax.devices()[0]
  graphdef, _ = model.abstract_model(cfg)
  params = jax.jit(lambda k: model.init_params(cfg, k))(jax.random.key(0))
  if _BF16.value:
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  bandwidth, peak = _lookup(BANDWIDTH, device), metrics.peak_flops_per_device(device)
  if device.platform != "cpu":
    bandwidth, peak = ceilings.copy_bandwidth_gbs() * 1e9, ceilings.matmul_tflops() * 1e12
    print(f"measured: copy bandwidth {bandwidth / 1e9:.0f} GB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s")
  print(f"device {device.device_kind}; model {model.count_params(params) / 1e6:.3f}M params, "
        f"{weight_bytes / 2**30:.2f} GiB; prompt {_PROMPT.value}, block {_BLOCK.value}")
  print(f"| {'mode':<9} | {'batch':>5} | {'gen':>5} | {'steps':>5} | {'ms/step':>9} | {'tokens/s':>9} | "
        f"{'stream floor ms':>15} | {'compute floor ms':>16} |")
  print("|" + "|".join("-" * (w + 2) for w in (9, 5, 5, 5, 9, 9, 15, 16)) + "|")
  rng = np.random.default_rng(0)
  for gen in map(int, _GEN.value):
    for batch in map(int, _BATCH.value):
      prompt = rng.integers(10, cfg.vocab_size, (batch, _PROMPT.value)).astype(np.int32)
      valid = np.ones_like(prompt, bool)
      seq = _PROMPT.value + gen
      # One full forward pass: 2 FLOPs per weight per token plus attention scores and values.
      step_flops = batch * seq * (metrics.train_flops_per_token(cfg, seq) / 3)
      for mode in _MODES.value:
        opts = dict(gen_length=gen, steps=gen, block_length=min(_BLOCK.value, gen), **MODES[mode])
        run = lambda: sampling.generate(graphdef, params, prompt, valid, mask_id=4, eos_id=1,
                                        max_seq_len=seq, **opts)
        jax.block_until_ready(run())  # compile
        times, steps = [], 0
        for _ in range(_REPEATS.value):
          t0 = time.perf_counter()
          out = jax.block_until_ready(run())
          times.append(time.perf_counter() - t0)
          steps = int(np.max(out.steps_B))
        dt = min(times)
        stream = f"{weight_bytes / bandwidth * 1e3:.2f}" if bandwidth else "n/a"
        compute = f"{step_flops / peak * 1e3:.2f}" if peak else "n/a"
        print(f"| {mode:<9} | {batch:>5} | {gen:>5} | {steps:>5} | {dt / steps * 1e3:>9.2f} | "
              f"{batch * gen / dt:>9.1f} | {stream:>15} | {compute:>16} |", flush=True)


if __name__ == "__main__":
  app.run(main)
