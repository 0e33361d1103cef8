"""Metric sinks (metrics.jsonl, TensorBoard event files, a progress line) and model-FLOPs accounting."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Mapping

import jax

from llada_jax import files
from llada_jax.config import ModelConfig

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix (vendor spec sheets). Unknown devices
# (CPUs included) report no MFU rather than a made-up one.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H200": 989e12, "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind
  for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
    if kind.startswith(prefix):
      return PEAK_FLOPS[prefix]
  return None


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs per trained token, forward + backward (3x forward).

  Forward: 2 FLOPs per multiply-add of every matrix a token goes through (attention projections, the
  feed-forward, the output head; the embedding lookup is free) plus attention scores and values,
  2 * 2 * seq_len * num_heads * head_dim per layer. Attention is bidirectional, so the full L^2 term is
  counted; the causal baseline is counted the same way (what the hardware computes without a causal kernel).
  The output head counts even when tied to the embedding (`tie_embeddings`): the matmul still runs.

  A mixture-of-experts FFN (`num_experts` > 0) counts ACTIVE parameters only: the router (d_model x
  num_experts), the k = experts_per_token chosen experts' SwiGLU (3 * d_model * mlp_dim each) and the shared
  expert (3 * d_model * shared_expert_dim); the other experts' weights cost nothing for this token. So it
  equals the dense count with mlp_dim = k * mlp_dim + shared_expert_dim, plus d_model * num_experts per
  layer. E.g. llada_moe_7b_a1b (d 2048, 16 layers, k 8 of 64, width 1024, vocab 157184): 1.40B active
  matrix parameters (head included) of 7.36B, 6 * 1.40e9 + 12 * 16 * 4096 * 2048 = 10.0 GFLOP per token
  at seq 4096.
  Dispatch (sort, gather, scatter) and zero-padding (`mlp_pad_to`) are not model FLOPs.
  """
  d, h = cfg.d_model, cfg.head_dim
  ffn_width = cfg.experts_per_token * cfg.mlp_dim + cfg.shared_expert_dim if cfg.moe else cfg.mlp_dim
  router = d * cfg.num_experts if cfg.moe else 0
  per_layer = d * h * (cfg.num_heads * 2 + cfg.num_kv_heads * 2) + 3 * d * ffn_width + router
  matmul_params = cfg.num_layers * per_layer + d * cfg.vocab_size
  attention = cfg.num_layers * 4 * seq_len * cfg.num_heads * h
  return 3 * (2 * matmul_params + attention)


class MetricsWriter:
  """Writes scalars to WORKDIR/metrics.jsonl and TensorBoard; only process 0 writes anything.

  A bucket object cannot be appended to, so in a gs:// workdir the (small) jsonl file is rewritten
  whole at each logging step; a local one is appended to.
  """

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      self._path = files.path(workdir, "metrics.jsonl")
      self._path.parent.mkdir(parents=True, exist_ok=True)
      if files.is_remote(self._path):
        self._text = self._path.read_text() if self._path.exists() else ""
      else:
        self._jsonl = open(self._path, "a", encoding="utf-8")
      from tensorboardX import SummaryWriter  # imported lazily: only the writing process needs it
      self._tb = SummaryWriter(os.fspath(files.path(workdir, "tensorboard")))

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    line = json.dumps(row) + "\n"
    if self._jsonl is None:
      self._text += line
      files.write_atomic(self._path, self._text)
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    for k, v in row.items():
      if k != "step":
        self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


class WindowLogger:
  """Averages step metrics over each logging window and writes them one step late.

  Sums stay on device (no host sync per step); a finished window is fetched only after the next step
  has been dispatched, so the host never stalls the device. `learning_rate` is reported at the window's
  last step rather than averaged.
  """

  def __init__(self, writer: MetricsWriter, progress: "Progress", *, tokens_per_step: int,
               flops_per_step: float, peak_flops: float | None):
    self.writer, self.progress = writer, progress
    self.tokens_per_step, self.flops_per_step, self.peak_flops = tokens_per_step, flops_per_step, peak_flops
    self._sum, self._count, self._pending = None, 0, None
    self._t = time.time()
    self.last: dict[str, float] = {}

  def add(self, step: int, metrics: Mapping[str, jax.Array], *, log_now: bool) -> None:
    self._write_pending()
    self._sum = dict(metrics) if self._sum is None else jax.tree.map(lambda a, b: a + b, self._sum, dict(metrics))
    self._count += 1
    if log_now:
      self._pending = (step, self._sum, self._count, metrics["learning_rate"])
      self._sum, self._count = None, 0

  def flush(self) -> dict[str, float]:
    """Writes the last window (waiting for it); returns the last written scalars."""
    self._write_pending()
    return self.last

  def _write_pending(self) -> None:
    if self._pending is None:
      return
    step, sums, count, lr = jax.device_get(self._pending)
    self._pending = None
    now = time.time()
    dt, self._t = max(now - self._t, 1e-9), now
    scalars = {k: float(v) / count for k, v in sums.items()}
    scalars["learning_rate"] = float(lr)
    scalars["tokens_per_s"] = count * self.tokens_per_step / dt
    if self.peak_flops:
      scalars["mfu"] = count * self.flops_per_step / dt / self.peak_flops
    self.writer.write(step, scalars)
    self.progress.print(step, scalars)
    self.last = scalars


class Progress:
  """One line per log step: step, metrics, throughput and ETA."""

  def __init__(self, total_steps: int, start_step: int = 0):
    self.total, self.start, self.t0 = total_steps, start_step, time.time()

  def line(self, step: int, scalars: Mapping[str, float]) -> str:
    done = max(step - self.start, 1)
    elapsed = time.time() - self.t0
    eta = elapsed / done * (self.total - step)
    # Families of scalars ('expert_load/07', ...) go to the files only: one line stays readable.
    fields = " ".join(f"{k}={_fmt(v)}" for k, v in scalars.items() if "/" not in k)
    return f"step {step}/{self.total} {fields} elapsed={elapsed:.0f}s eta={eta:.0f}s"

  def print(self, step: int, scalars: Mapping[str, float]) -> None:
    if jax.process_index() == 0:
      print(self.line(step, scalars), file=sys.stdout, flush=True)


def _fmt(v: float) -> str:
  return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}"
