"""Generation speed: ms per reverse-process step and tokens/s, per sampling mode.

  python benchmarks/generate.py --config=configs/tiny.py                      # CPU smoke table
  python benchmarks/generate.py --config=configs/default.py:llada_8b \\
      --gen_lengths=256 --batch_sizes=1 --prompt_length=64 --block_length=32 --bf16_params   # GPU

Random weights of the configured shape (no checkpoint needed). Modes: plain (the official schedule,
`steps = gen_length`), +threshold (Fast-dLLM tau=0.9), +prefix cache, +dual cache (both with the
threshold off, so steps are fixed and ms/step compares like with like), and the block-diffusion
sampler (`blocks`: the same weights as a block model of `--block_length`, `sampling.generate_blocks`:
the prompt prefilled, each block decoded against the exact cache of the completed ones, one token per
step). Beside each row: the
weight-streaming floor (parameter bytes / memory bandwidth, one read of the weights per step) and the
compute floor (model FLOPs of one step / peak FLOP/s). On a GPU/TPU both ceilings are measured first
(benchmarks/ceilings.py: copy bandwidth, bf16 matmul rate); elsewhere the spec sheet's, if known.
"""

import dataclasses
import json
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
_MODES = flags.DEFINE_list("modes", ["plain", "threshold", "prefix", "dual", "blocks"], "Modes to run.")
_ROWS = flags.DEFINE_list("rows", None, "MODE:BATCH pairs to run instead of every mode at every batch size, "
                          "e.g. plain:1,dual:1,dual:8.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows (and the header facts) to this JSON file.")
_PROFILE = flags.DEFINE_string("profile_dir", None, "Trace one more run of each --profile_rows row with "
                               "jax.profiler into PROFILE_DIR/MODE_bBATCH (benchmarks/trace_summary.py reads it).")
_PROFILE_ROWS = flags.DEFINE_list("profile_rows", [], "MODE:BATCH rows to trace (with --profile_dir).")

# HBM bandwidth in bytes/s by device_kind prefix (spec sheets).
BANDWIDTH = {"NVIDIA H200": 4.8e12, "NVIDIA H100": 3.35e12, "NVIDIA A100": 2.0e12, "TPU v5p": 2.76e12,
             "TPU v5 lite": 0.82e12, "TPU v5e": 0.82e12, "TPU v6 lite": 1.64e12, "TPU v6e": 1.64e12, "TPU v4": 1.2e12}
MODES = {"plain": {}, "threshold": {"threshold": 0.9}, "prefix": {"kv_cache": "prefix"},
         "dual": {"kv_cache": "dual"}, "blocks": {}}


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
  block_graphdef, _ = model.abstract_model(dataclasses.replace(cfg, block_size=_BLOCK.value))  # same parameters
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
  rows, results = _rows(), []
  for gen in map(int, _GEN.value):
    for batch in dict.fromkeys(b for _, b in rows):
      prompt = rng.integers(10, cfg.vocab_size, (batch, _PROMPT.value)).astype(np.int32)
      valid = np.ones_like(prompt, bool)
      seq = _PROMPT.value + gen
      # One full forward pass: 2 FLOPs per weight per token plus attention scores and values.
      step_flops = batch * seq * (metrics.train_flops_per_token(cfg, seq) / 3)
      for mode in (m for m, b in rows if b == batch):
        opts = dict(gen_length=gen, steps=gen, block_length=min(_BLOCK.value, gen), **MODES[mode])
        run = lambda: sampling.generate(graphdef, params, prompt, valid, mask_id=4, eos_id=1,
                                        max_seq_len=seq, **opts)
        if mode == "blocks":  # steps per block; the canvas is whole blocks
          opts.update(steps=_BLOCK.value, block_length=_BLOCK.value)
          run = lambda: sampling.generate_blocks(block_graphdef, params, prompt, valid, block_size=_BLOCK.value,
                                                 mask_id=4, eos_id=1, **opts)
        jax.block_until_ready(run())  # compile
        times, steps = [], 0
        for _ in range(_REPEATS.value):
          t0 = time.perf_counter()
          out = jax.block_until_ready(run())
          times.append(time.perf_counter() - t0)
          steps = int(np.max(out.steps_B))
        dt = min(times)
        if _PROFILE.value and f"{mode}:{batch}" in _PROFILE_ROWS.value:
          jax.profiler.start_trace(f"{_PROFILE.value}/{mode}_b{batch}", create_perfetto_trace=True)
          jax.block_until_ready(run())
          jax.profiler.stop_trace()
        stream = f"{weight_bytes / bandwidth * 1e3:.2f}" if bandwidth else "n/a"
        compute = f"{step_flops / peak * 1e3:.2f}" if peak else "n/a"
        print(f"| {mode:<9} | {batch:>5} | {gen:>5} | {steps:>5} | {dt / steps * 1e3:>9.2f} | "
              f"{batch * gen / dt:>9.1f} | {stream:>15} | {compute:>16} |", flush=True)
        results.append(dict(mode=mode, batch=batch, gen_length=gen, steps=steps, ms_per_step=dt / steps * 1e3,
                            tokens_per_s=batch * gen / dt, options=opts))
        if _JSON.value:  # rewritten after every row: a run cut short keeps the rows it finished
          with open(_JSON.value, "w") as f:
            json.dump(dict(device=device.device_kind, jax=jax.__version__, params=model.count_params(params),
                           weight_bytes=weight_bytes, prompt_length=_PROMPT.value,
                           bandwidth_bytes_per_s=bandwidth, peak_flops=peak, rows=results), f, indent=1)


def _rows() -> list[tuple[str, int]]:
  """(mode, batch) pairs: --rows, else every mode at every batch size."""
  if not _ROWS.value:
    return [(m, int(b)) for b in _BATCH.value for m in _MODES.value]
  pairs = [r.split(":") for r in _ROWS.value]
  for pair in pairs:
    if len(pair) != 2 or pair[0] not in MODES or not pair[1].isdigit() or int(pair[1]) < 1:
      raise app.UsageError(f"--rows takes MODE:BATCH pairs with MODE in {sorted(MODES)}; got {':'.join(pair)!r}")
  return [(m, int(b)) for m, b in pairs]


if __name__ == "__main__":
  app.run(main)
