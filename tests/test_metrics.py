"""Metric windows, sinks and model-FLOPs accounting."""

import json

import jax
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


def test_moe_flops_count_the_active_experts_router_and_shared_expert():
  """An MoE layer costs what a dense SwiGLU of width k * f + shared costs, plus the router's d * E: the
  FLOPs grow with the experts a token uses (k), and with the expert count (E) only through the router."""
  base = dict(vocab_size=256, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=16)
  moe = lambda **kw: config_lib.ModelConfig(**base | dict(num_experts=8, experts_per_token=2) | kw)
  seq, router = 64, 6 * 2 * 32  # one expert's router column: 6 FLOPs per weight, d_model weights, 2 layers
  for k, shared in ((1, 0), (2, 0), (2, 24), (8, 0)):
    dense = config_lib.ModelConfig(**base | dict(mlp_dim=k * 16 + shared))
    got = metrics.train_flops_per_token(moe(experts_per_token=k, shared_expert_dim=shared), seq)
    assert got == metrics.train_flops_per_token(dense, seq) + 8 * router, (k, shared)
  one_more_expert = 6 * 2 * 3 * 32 * 16  # a SwiGLU of width 16 in each of 2 layers
  assert (metrics.train_flops_per_token(moe(experts_per_token=3), seq)
          - metrics.train_flops_per_token(moe(experts_per_token=2), seq)) == one_more_expert
  assert (metrics.train_flops_per_token(moe(num_experts=64), seq)
          - metrics.train_flops_per_token(moe(num_experts=8), seq)) == 56 * router


@pytest.mark.parametrize("variant", ["llada_moe_7b_a1b", "illada_8b"])
def test_moe_and_tied_flops_match_the_parameters_a_token_uses(variant):
  """From the model's own parameter tree: k/E of every expert leaf, the router, every projection; the
  head once even when tied (then only the embedding holds it); no norms."""
  cfg = config_lib.from_config_dict(default.get_config(variant)).model
  _, state = model.abstract_model(cfg)
  active = 0.0
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    name = jax.tree_util.keystr(path)
    if "norm" in name or (name.startswith("['embedding']") and not cfg.tie_embeddings):
      continue
    share = cfg.experts_per_token / cfg.num_experts if cfg.moe and "ff_" in name else 1
    active += x.size * share
  seq = 4096
  expected = 6 * active + 12 * cfg.num_layers * seq * cfg.num_heads * cfg.head_dim
  assert metrics.train_flops_per_token(cfg, seq) == pytest.approx(expected, rel=1e-12)
  if cfg.moe:  # ~1.4B of 7.4B parameters active (embedding excluded), as the preset's name says
    assert 1.3e9 < active < 1.5e9 and model.count_params(state) > 7e9


def test_peak_flops_lookup_is_explicit_about_unknown_devices():
  class Dev:
    def __init__(self, kind):
      self.device_kind = kind
  assert metrics.peak_flops_per_device(Dev("TPU v5 lite")) == 197e12
  assert metrics.peak_flops_per_device(Dev("NVIDIA H100 80GB HBM3")) == 989e12
  assert metrics.peak_flops_per_device(Dev("cpu")) is None
