"""Train-step speed: step time, tokens/s, model TFLOP/s, MFU and peak memory of the real jitted step.

  python benchmarks/train_step.py --config=configs/tiny.py --steps=2 --warmup=1       # CPU smoke
  python benchmarks/train_step.py --config=configs/default.py:llada_1b \\
      --config.train.batch_size=8 --config.train.seq_len=4096 --config.model.remat_policy=full   # GPU
  python benchmarks/train_step.py --config=configs/moe_tiny.py --num_devices=2 \\
      --config.mesh.fsdp=1 --config.mesh.expert=2 --config.mesh.rule_set=fsdp_ep               # MoE, CPU

Builds `llada_jax.train.setup(config)` on the configured mesh, initialises the state from the run's
root key (a LoRA config, `lora.rank` > 0, gets a random base model) and feeds the same random batch (the
fields the configured loss reads; no data pipeline, no tokenizer) to `Setup.step`: `--warmup` steps, then
`--steps` timed ones, each waited for. Step time is the median of the timed steps; compile time is the first
call's wall time less one median step.

Model FLOPs (`llada_jax.metrics.train_flops_per_token`), per trained token:
  3 * (2 * matmul_params + 4 * num_layers * seq_len * num_heads * head_dim)
i.e. forward + backward = 3x forward, every projection / SwiGLU / output-head weight once, and the full
L^2 bidirectional attention. A mixture-of-experts model counts its ACTIVE parameters only (the router, the
k chosen experts and the shared expert of each layer), so its MFU is that of the work a token needs, not
of the full expert count; the table shows both counts ("params", "active params": the weights a
token's matmuls use, counted here from the model's parameter tree: the embedding lookup and norms left out,
k/E of every routed-expert leaf). Recomputation by remat is not counted: these are model FLOPs, not hardware
FLOPs, so MFU does not rise when a policy recomputes more. MFU is given against the device's spec-sheet
bf16 peak and, with `--measure_ceilings`, against the rate a chain of large bf16 matmuls reaches on it
(benchmarks/ceilings.py, which also measures the device's copy bandwidth; both are printed and saved).
"""

import datetime
import json
import os
import statistics
import subprocess
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import ceilings  # benchmarks/ceilings.py (the script's folder is on sys.path)
from llada_jax import config as config_lib, metrics, model as model_lib, sharding, train
from llada_jax.cli import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (with :VARIANT).", lock_config=False)
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first (the first one compiles).", lower_bound=1)
_PEAK = flags.DEFINE_float("peak_tflops", None, "Per-device peak TFLOP/s (default: the spec-sheet table).")
_CEILINGS = flags.DEFINE_bool("measure_ceilings", None, "Measure the achievable bf16 matmul TFLOP/s and "
                              "copy bandwidth first (default: on GPU/TPU, not on CPU).")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "Fake this many CPU devices (planning).")
_PROFILE = flags.DEFINE_string("profile_dir", None, "Trace the timed steps with jax.profiler into this "
                               "folder (TensorBoard profile + a Perfetto trace.json.gz).")
_JSON = flags.DEFINE_string("json", None, "Also write the row (and the header facts) to this JSON file.")

FORMULA = ("3 * (2 * matmul_params + 4 * layers * seq_len * heads * head_dim); MoE: active matmul_params "
           "(router + k experts + shared); remat recompute not counted")


def _git_revision() -> str:
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True, check=True).stdout
    dirty = "+dirty" if git("status", "--porcelain", "-uno") else ""  # tracked files differ from HEAD
    return git("rev-parse", "--short", "HEAD").strip() + dirty
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def param_counts(cfg: config_lib.ModelConfig) -> tuple[int, int]:
  """(every parameter of the model, the active ones: the weights one token's matmuls use).

  Active leaves out the embedding lookup (unless tied: then it is also the head) and the norms, and counts
  k / num_experts of each routed-expert leaf (`ff_gate`, `ff_up`, `ff_down` of an MoE block); the router and
  a shared expert count whole. Independent of `metrics.train_flops_per_token`, which it should agree with:
  6 * active + attention = FLOPs per token.
  """
  _, state = model_lib.abstract_model(cfg)
  total, active = 0, 0.0
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    name = jax.tree_util.keystr(path)
    total += x.size
    if "norm" in name or (name.startswith("['embedding']") and not cfg.tie_embeddings):
      continue
    active += x.size * (cfg.experts_per_token / cfg.num_experts if cfg.moe and "['ff_" in name else 1)
  return total, round(active)


def random_batch(config: config_lib.Config, rows: int) -> dict[str, np.ndarray]:
  """Random tokens (never the mask id) with the fields `train.batch_fields` names."""
  rng = np.random.default_rng(0)
  vocab, mask_id, seq = config.model.vocab_size, config.diffusion.mask_token_id, config.train.seq_len
  tokens = rng.integers(0, vocab - 1, (rows, seq)).astype(np.int32)
  tokens += tokens >= mask_id  # skip the mask id, stay below vocab
  batch = {"tokens": tokens}
  if "prompt_len" in train.batch_fields(config):
    batch["prompt_len"] = rng.integers(1, seq // 2 + 1, rows).astype(np.int32)
    batch["valid"] = np.ones((rows, seq), bool)
  return batch


def time_steps(s: train.Setup, *, warmup: int, steps: int, profile_dir: str | None = None
               ) -> tuple[float, float, float]:
  """Runs `warmup` then `steps` real steps of `s` on one random batch (a LoRA run on a random base model),
  each waited for: (median step seconds, compile seconds, last loss)."""
  config = s.config
  state = s.init(train.root_key(config))
  if s.init_base is not None:
    state = s.attach_base(state, s.init_base(jax.random.key(1)), fresh=True)
  batch = train.global_batch(s, random_batch(config, config.train.batch_size // jax.process_count()))
  times = []
  with sharding.use_rules(config.mesh, s.mesh):
    for i in range(warmup + steps):
      if i == warmup and profile_dir:
        jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
      t0 = time.perf_counter()
      state, out = jax.block_until_ready(s.step(state, batch))
      times.append(time.perf_counter() - t0)
  if profile_dir:
    jax.profiler.stop_trace()
  step_s = statistics.median(times[warmup:])
  return step_s, times[0] - step_s, float(out["loss"])  # the first call compiles, then runs one step


def _peak_memory() -> tuple[float, float] | None:
  """(peak bytes in use, bytes limit) of the worst local device, or None where JAX keeps no stats."""
  stats = [d.memory_stats() for d in jax.local_devices()]
  if not all(s and "peak_bytes_in_use" in s for s in stats):
    return None
  worst = max(stats, key=lambda s: s["peak_bytes_in_use"])
  return worst["peak_bytes_in_use"], worst.get("bytes_limit", 0)


def main(argv):
  del argv
  if _NUM_DEVICES.value:
    common.fake_cpu_devices(_NUM_DEVICES.value)
  config = config_lib.stand_in_tokens(config_lib.from_config_dict(_CONFIG.value))
  m, t = config.model, config.train
  device, n_dev = jax.devices()[0], jax.device_count()
  rev, today = _git_revision(), datetime.datetime.now(datetime.timezone.utc).date().isoformat()
  print(f"rev {rev}, {today}, jax {jax.__version__}, "
        f"{n_dev} x {device.device_kind} ({device.platform})", flush=True)
  peak = _PEAK.value * 1e12 if _PEAK.value else metrics.peak_flops_per_device(device)

  s = train.setup(config)
  num_params = sum(x.size for x in jax.tree.leaves(s.abstract_state.params))  # trained (LoRA: the adapters)
  model_params, active_params = param_counts(m)
  step_s, compile_s, loss = time_steps(s, warmup=_WARMUP.value, steps=_STEPS.value, profile_dir=_PROFILE.value)
  mem = _peak_memory()  # before the ceilings below, whose buffers would count in the high-water mark

  # Ceilings after the train step and with its buffers freed, so they never crowd a full device.
  measure = _CEILINGS.value if _CEILINGS.value is not None else device.platform != "cpu"
  measured, bandwidth = (ceilings.matmul_tflops(), ceilings.copy_bandwidth_gbs()) if measure else (None, None)
  if measured:
    print(f"measured per device: bf16 matmul (8192^3 x 8) {measured:.4g} TFLOP/s, "
          f"copy bandwidth (read + write) {bandwidth:.4g} GB/s", flush=True)

  tokens = t.batch_size * t.seq_len
  flops_per_token = metrics.train_flops_per_token(m, t.seq_len)
  tflops_dev = flops_per_token * tokens / step_s / n_dev / 1e12
  row = {
      "config": config_flags.get_config_filename(flags.FLAGS["config"]),
      "overrides": {k: str(v) for k, v in config_flags.get_override_values(flags.FLAGS["config"]).items()},
      "mesh": "x".join(str(v) for v in s.mesh.shape.values()), "batch": t.batch_size, "seq_len": t.seq_len,
      "params": num_params, "model_params": model_params, "active_params": active_params, "dtype": m.dtype,
      "param_dtype": m.param_dtype, "mu_dtype": config.optim.mu_dtype,
      "remat_policy": m.remat_policy, "attention_impl": m.attention_impl,
      "loss_chunk_size": m.loss_chunk_size, "step_s": step_s, "compile_s": compile_s,
      "tokens_per_s": tokens / step_s, "tokens_per_s_per_device": tokens / step_s / n_dev,
      "tflops_per_device": tflops_dev, "mfu": tflops_dev * 1e12 / peak if peak else None,
      "measured_matmul_tflops": measured, "measured_copy_gbs": bandwidth,
      "mfu_vs_measured": tflops_dev / measured if measured else None,
      "peak_bytes": mem[0] if mem else None, "bytes_limit": mem[1] if mem else None, "loss": loss,
      "rev": rev, "date": today, "jax": jax.__version__,
      "device_kind": device.device_kind, "num_devices": n_dev, "flops_per_token": flops_per_token,
      "flops_formula": FORMULA,
  }
  pct = lambda v: f"{100 * v:.1f}%" if v is not None else "n/a"
  mem_s = f"{mem[0] / 2**30:.1f}/{mem[1] / 2**30:.0f}" if mem else "n/a"  # n/a: CPU keeps no stats
  peak_s = f"{peak / 1e12:.0f} TFLOP/s per device" if peak else "n/a (unknown device; --peak_tflops)"
  print(f"model FLOPs/token = {FORMULA}: {flops_per_token / 1e9:.4g} GFLOP at seq {t.seq_len}; "
        f"peak {peak_s}", flush=True)
  cols = ["config", "mesh (data,fsdp,expert,tensor)", "batch", "seq", "dtype/param[/mu]", "remat", "attn",
          "loss chunk", "params", "active params", "step ms", "compile s", "tokens/s", "tokens/s/dev", "TFLOP/s/dev",
          "MFU", "MFU vs matmul", "peak GiB/limit"]
  dtypes = f"{m.dtype}/{m.param_dtype}" + (f"/{config.optim.mu_dtype}" if config.optim.mu_dtype else "")
  count_s = lambda n: f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"
  vals = [row["config"] + "".join(f" {k}={v}" for k, v in row["overrides"].items()), row["mesh"],
          t.batch_size, t.seq_len, dtypes, m.remat_policy, m.attention_impl, m.loss_chunk_size,
          count_s(model_params), count_s(active_params),
          f"{step_s * 1e3:.1f}", f"{compile_s:.1f}",
          f"{tokens / step_s:.1f}", f"{tokens / step_s / n_dev:.1f}", f"{tflops_dev:.3f}", pct(row["mfu"]),
          pct(row["mfu_vs_measured"]), mem_s]
  print("| " + " | ".join(cols) + " |")
  print("|" + "|".join("---" for _ in cols) + "|")
  print("| " + " | ".join(map(str, vals)) + " |", flush=True)
  print(f"last loss {loss:.4f}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(row, f, indent=1)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
