"""Metric windows, sinks and model-FLOPs accounting."""

import json

import jax.numpy as jnp
import pytest

from llada_jax import config as config_lib, metrics, model
from llada_jax.configs import default


def test_window_logger_averages_and_writes_one_step_late(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), enabled=True)
  logger = metrics.WindowLogger(writer, metrics.Progress(4), tokens_per_step=10, flops_per_step=100.0,
                                peak_flops=1e6)
  rows = lambda: [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  for step, loss in enumerate([4.0, 2.0, 3.0, 1.0], start=1):
    logger.add(step, {"loss": jnp.float32(loss), "learning_rate": jnp.float32(step / 10)},
               log_now=step % 2 == 0)
    if step == 2:
      assert rows() == []  # window 1-2 is written only once step 3 is under way
  last = logger.flush()
  writer.close()
  got = rows()
  assert [r["step"] for r in got] == [2, 4]
  assert got[0]["loss"] == pytest.approx(3.0) and got[1]["loss"] == pytest.approx(2.0)
  assert got[1]["learning_rate"] == pytest.approx(0.4)  # the window's last step, not its mean
  assert got[1]["mfu"] == pytest.approx(got[1]["tokens_per_s"] / 10 * 100.0 / 1e6)
  assert last["loss"] == pytest.approx(2.0)


@pytest.mark.parametrize("variant", ["llada_1b", "llada_8b"])
def test_train_flops_match_an_independent_count(variant):
  """6 FLOPs per matrix parameter per token (embedding lookup and norms are free) + 12 * L * T * H * dh."""
  cfg = config_lib.from_config_dict(default.get_config(variant)).model
  _, state = model.abstract_model(cfg)
  n = model.count_params(state)
  norms = cfg.num_layers * 2 * cfg.d_model + cfg.d_model
  matrix_params = n - cfg.vocab_size * cfg.d_model - norms
  seq = 4096
  expected = 6 * matrix_params + 12 * cfg.num_layers * seq * cfg.num_heads * cfg.head_dim
  assert metrics.train_flops_per_token(cfg, seq) == expected


def test_peak_flops_lookup_is_explicit_about_unknown_devices():
  class Dev:
    def __init__(self, kind):
      self.device_kind = kind
  assert metrics.peak_flops_per_device(Dev("TPU v5 lite")) == 197e12
  assert metrics.peak_flops_per_device(Dev("NVIDIA H100 80GB HBM3")) == 989e12
  assert metrics.peak_flops_per_device(Dev("cpu")) is None
