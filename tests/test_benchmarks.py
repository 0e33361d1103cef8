"""benchmarks/ scripts run end to end on tiny configs (their numbers are not checked, only their shape)."""

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(script, *args):
  # One CPU device unless a run asks for more: conftest's 8 fake devices would only slow the compile.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
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
  out = _train_step("configs/tiny.py", f"--json={tmp_path / 'row.json'}", f"--profile_dir={tmp_path / 'prof'}")
  assert "jax " in out.splitlines()[0] and "remat recompute not counted" in out
  row = _table(out)
  assert row["mesh (data,fsdp,tensor)"] == "1x1x1" and row["batch"] == "8" and row["seq"] == "32"
  assert row["peak GiB/limit"] == "n/a" and row["MFU"] == "n/a"  # CPU: no memory stats, no peak
  for col in ("step ms", "tokens/s", "tokens/s/dev"):
    assert math.isfinite(float(row[col])) and float(row[col]) > 0, row
  saved = json.loads((tmp_path / "row.json").read_text())
  assert saved["step_s"] > 0 and saved["tokens_per_s"] > 0 and math.isfinite(saved["loss"])
  assert saved["peak_bytes"] is None and saved["num_devices"] == 1
  assert saved["measured_matmul_tflops"] is None  # ceilings are measured on accelerators only by default
  # The profiled timed steps summarise into kernel rows whose shares add up to the busy time.
  summary = _script("trace_summary.py", str(tmp_path / "prof"), "--top=1000")
  busy = float(summary.split("busy time ")[1].split(" ms")[0])
  rows = [l.split("|") for l in summary.splitlines() if l.startswith("| ") and l.count("|") == 5]
  assert busy > 0 and rows and abs(sum(float(r[3]) for r in rows[1:]) - busy) < 0.01 * busy + 0.05 * len(rows)


def test_attention_benchmark_compares_backends_to_xla():
  out = _script("attention.py", "--batch=1", "--seq=128", "--heads=2", "--kv_heads=1", "--repeats=1")
  rows = {r[1].strip(): r for r in (l.split("|") for l in out.splitlines()) if len(r) == 7}
  assert set(rows) >= {"xla", "splash"}, out  # CPU: splash runs in Pallas interpret mode
  assert float(rows["xla"][4]) == 0 and 0 < float(rows["splash"][4]) < 0.05 and float(rows["splash"][5]) < 0.05


def test_train_step_benchmark_sft_remat_two_devices():
  # The SFT batch fields (prompt_len, valid), a remat policy and a 2-device FSDP mesh in one run.
  row = _table(_train_step("configs/sft_tiny.py", "--config.model.remat_policy=full", "--num_devices=2"))
  assert row["remat"] == "full" and row["mesh (data,fsdp,tensor)"] == "1x2x1" and row["seq"] == "64"
  assert float(row["tokens/s"]) > 0
