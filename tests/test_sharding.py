"""Rule sets -> PartitionSpecs (golden table for the 8B model), rule overrides, and the memory plan."""

import os
import re
import subprocess
import sys

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from llada_jax import config as config_lib, model as model_lib, plan, sharding, train
from llada_jax.configs import default

_L = None  # the stacked 'layers' axis is never split
GOLDEN = {
    "dp": {
        "embedding": P(None, None), "lm_head": P(None, None), "final_norm": P(None),
        "blocks/attn_norm": P(_L, None), "blocks/ff_norm": P(_L, None),
        "blocks/q_proj": P(_L, None, None, None), "blocks/k_proj": P(_L, None, None, None),
        "blocks/v_proj": P(_L, None, None, None), "blocks/attn_out": P(_L, None, None, None),
        "blocks/ff_gate": P(_L, None, None), "blocks/ff_up": P(_L, None, None),
        "blocks/ff_down": P(_L, None, None),
    },
    "fsdp": {
        "embedding": P(None, "fsdp"), "lm_head": P("fsdp", None), "final_norm": P(None),
        "blocks/attn_norm": P(_L, None), "blocks/ff_norm": P(_L, None),
        "blocks/q_proj": P(_L, "fsdp", None, None), "blocks/k_proj": P(_L, "fsdp", None, None),
        "blocks/v_proj": P(_L, "fsdp", None, None), "blocks/attn_out": P(_L, None, None, "fsdp"),
        "blocks/ff_gate": P(_L, "fsdp", None), "blocks/ff_up": P(_L, "fsdp", None),
        "blocks/ff_down": P(_L, None, "fsdp"),
    },
    "fsdp_tp": {
        "embedding": P("tensor", "fsdp"), "lm_head": P("fsdp", "tensor"), "final_norm": P(None),
        "blocks/attn_norm": P(_L, None), "blocks/ff_norm": P(_L, None),
        "blocks/q_proj": P(_L, "fsdp", "tensor", None), "blocks/k_proj": P(_L, "fsdp", "tensor", None),
        "blocks/v_proj": P(_L, "fsdp", "tensor", None), "blocks/attn_out": P(_L, "tensor", None, "fsdp"),
        "blocks/ff_gate": P(_L, "fsdp", "tensor"), "blocks/ff_up": P(_L, "fsdp", "tensor"),
        "blocks/ff_down": P(_L, "tensor", "fsdp"),
    },
}


CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _abstract_8b_params() -> dict:
  cfg = config_lib.from_config_dict(default.get_config("llada_8b"))
  return nnx.to_pure_dict(model_lib.abstract_model(cfg.model)[1])


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


@pytest.mark.parametrize("rule_set", sorted(GOLDEN))
def test_rule_sets_give_the_golden_specs_for_every_8b_parameter(rule_set):
  mesh_cfg = config_lib.MeshConfig(rule_set=rule_set, tensor=2 if rule_set == "fsdp_tp" else 1)
  cfg = config_lib.from_config_dict(default.get_config("llada_8b"))
  axes = _flat(sharding.param_logical_axes(model_lib.abstract_model(cfg.model)[1]))
  specs = {path: sharding.logical_spec(names, sharding.rules(mesh_cfg)) for path, names in axes.items()}
  assert specs == GOLDEN[rule_set]


def test_rule_overrides_replace_single_entries():
  cfg = config_lib.MeshConfig(rule_set="fsdp", rules=(("vocab", "fsdp"),))
  table = dict(sharding.rules(cfg))
  assert table["vocab"] == "fsdp" and table["embed"] == "fsdp" and table["heads"] is None
  # 'fsdp' is taken by 'vocab' first, so the embedding's 'embed' axis stays whole.
  assert sharding.logical_spec(("vocab", "embed"), sharding.rules(cfg)) == P("fsdp", None)


@pytest.mark.parametrize("overrides, field", [
    ({"mesh.rule_set": "zero3"}, "mesh.rule_set"),
    ({"mesh.tensor": 2, "mesh.fsdp": -1}, "mesh.tensor"),   # tensor > 1 needs fsdp_tp
    ({"mesh.rules": (("embed", "model"),)}, "mesh.rules"),   # no such mesh axis
    ({"mesh.rules": (("embd", "fsdp"),)}, "mesh.rules"),     # no such logical axis
])
def test_bad_mesh_settings_name_the_field(overrides, field):
  with pytest.raises(ValueError, match=re.escape(field)):
    tiny_config(**overrides)


def test_shardings_table_lists_every_parameter_and_optimizer_leaf(devices):
  cfg = tiny_config()
  s = train.setup(cfg)
  rows = plan.leaf_placements(s.abstract_state.params)
  assert len(rows) == len(jax.tree.leaves(s.abstract_state.params))
  emb = next(r for r in rows if r.path == "embedding")
  assert emb.device_bytes * 8 == emb.total_bytes  # split 8 ways over fsdp
  norm = next(r for r in rows if r.path == "final_norm")
  assert norm.device_bytes == norm.total_bytes    # replicated
  text = plan.shardings_table(s)
  assert "opt_state:" in text and "blocks/q_proj" in text and "P(None, 'fsdp', None, None)" in text


def _run_cli(*args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the CLI fakes its own devices
  return subprocess.run([sys.executable, "-m", "llada_jax.cli.train", *args], capture_output=True,
                        text=True, env=env, timeout=600)


def _report_bytes(out: str, row: str) -> int:
  return int(re.search(rf"^{re.escape(row)}\s+([\d,]+)", out, re.M).group(1).replace(",", ""))


def test_dry_run_of_8b_on_64_devices_adds_up_to_the_model(tmp_path):
  """`--dry_run --num_devices=64` compiles the 8B train step on an abstract 64-device mesh; parameter
  bytes per device times 64 equal the model's total (only the tiny norms are replicated), Adam holds
  two float32 copies, and the compiled program needs activation memory on top."""
  proc = _run_cli(f"--config={CONFIGS}/llada_8b.py", "--dry_run", "--num_devices=64",
                  "--config.train.batch_size=64", "--config.train.seq_len=512")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "64 devices" in out and "'fsdp': 64" in out
  params = _flat(_abstract_8b_params())
  total = sum(x.size * x.dtype.itemsize for x in params.values())
  norms = sum(x.size * x.dtype.itemsize for path, x in params.items() if path.endswith("norm"))
  assert total > 8e9 * 4  # float32 parameters of an 8B model
  per_device = _report_bytes(out, "parameters")
  assert per_device * 64 == total + 63 * norms
  assert _report_bytes(out, "optimizer state") == pytest.approx(2 * per_device, rel=1e-6, abs=64)
  assert _report_bytes(out, "activations + temporaries") > 0
  assert _report_bytes(out, "peak (estimate)") >= per_device * 3


def test_print_shardings_cli_exits_without_training(tmp_path):
  proc = _run_cli(f"--config={CONFIGS}/tiny.py", "--print_shardings", "--num_devices=4",
                  "--config.mesh.rule_set=fsdp_tp", "--config.mesh.tensor=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "'tensor': 2" in proc.stdout and "P('fsdp', 'tensor')" in proc.stdout  # lm_head
  assert "dry run" not in proc.stdout
