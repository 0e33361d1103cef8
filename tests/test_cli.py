"""The `llada-train` console script, as a user runs it."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def _llada_train(*args):
  exe = shutil.which("llada-train")
  cmd = [exe] if exe else [sys.executable, "-m", "llada_jax.cli.train"]
  return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=600)


def test_train_cli_trains_and_samples(tmp_path):
  r = _llada_train(f"--config={TINY}", f"--workdir={tmp_path}", "--config.train.num_steps=3",
                   "--config.optim.warmup_steps=1")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "unigram entropy" in r.stdout and "sample: " in r.stdout and "done: step 3" in r.stdout
  assert (tmp_path / "checkpoints" / "3").is_dir() and (tmp_path / "tokenizer.model").exists()


@pytest.mark.parametrize("flag,field", [
    ("--config.model.num_heads=3", "model.num_heads"),
    ("--config.optim.peak_lr=-0.1", "optim.peak_lr"),
    ("--config.diffusion.mask_token_id=9999", "diffusion.mask_token_id"),
])
def test_train_cli_rejects_bad_values_in_one_line(tmp_path, flag, field):
  r = _llada_train(f"--config={TINY}", f"--workdir={tmp_path}", flag)
  assert r.returncode == 1
  assert field in r.stderr and "Traceback" not in r.stderr
  assert not (tmp_path / "checkpoints").exists()  # nothing was started
