"""Host memory and time of `llada-convert` / `llada-export` on a synthetic checkpoint of a real shape.

  python benchmarks/convert_memory.py --shape=llada_1b            # ~3 GB of bf16 safetensors, ~6 GB disk
  python benchmarks/convert_memory.py --shape=tiny --keep         # seconds; a smoke run

Writes a random-weight LLaDA directory in the released Hugging Face layout (several safetensors files
plus an index, a small stand-in tokenizer whose mask id the config names), then runs the two commands
as child processes and reads each one's peak resident set size (`ru_maxrss`). The table compares it
with the size of the parameters: on a CPU host the converted parameters themselves live in host
memory, so about 1x is the floor; 2x would mean the model was held twice.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
from absl import app, flags

from llada_jax import hf
from llada_jax.config import ModelConfig

_SHAPE = flags.DEFINE_enum("shape", "llada_1b", ["tiny", "llada_1b", "llada_8b"], "Model shape.")
_DIR = flags.DEFINE_string("dir", None, "Scratch folder (default: a new temporary one).")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the scratch folder.")

SHAPES = {  # REFERENCE §1
    "tiny": ModelConfig(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128),
    "llada_1b": ModelConfig(vocab_size=126464, d_model=2048, num_layers=22, num_heads=32, num_kv_heads=4,
                            mlp_dim=5634),
    "llada_8b": ModelConfig(vocab_size=126464, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                            mlp_dim=12288),
}


def _write_tokenizer(folder: str) -> dict[str, int]:
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  words = ["the", "a", "cat", "sat", "on", "mat", "[UNK]"]
  specials = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>",
              "<|end_header_id|>", "<|eot_id|>"]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(specials)
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": specials[0], "eos_token": specials[1], "pad_token": specials[1]}, f)
  return {s: tok.token_to_id(s) for s in specials}


def write_synthetic(folder: str, m: ModelConfig) -> int:
  """Random bf16 weights in the HF layout, about two layers per file. Returns the bytes written."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  ids = _write_tokenizer(folder)
  cfg = hf.hf_config_from_model(m, mask_id=ids["<|mdm_mask|>"], eos_id=ids["<|endoftext|>"],
                                pad_id=ids["<|endoftext|>"])
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f)
  rng = np.random.default_rng(0)
  tensors = hf.layout(m)
  groups = [tensors[i:i + 18] for i in range(0, len(tensors), 18)]
  weight_map, total = {}, 0
  for n, group in enumerate(groups):
    name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
    arrays = {t.name: (0.02 * rng.standard_normal(t.shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)
              for t in group}
    st_numpy.save_file(arrays, os.path.join(folder, name), metadata={"format": "pt"})
    weight_map.update({t.name: name for t in group})
    total += sum(a.nbytes for a in arrays.values())
    del arrays
  with open(os.path.join(folder, hf.INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  return total


def _child(args: list[str]) -> tuple[float, float]:
  """Runs a command; returns (seconds, its peak RSS in bytes). Each run gets a fresh measuring process,
  so the peak is this command's alone."""
  code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
          "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
  start = time.perf_counter()
  r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
  if r.returncode:
    raise RuntimeError(f"{' '.join(args)} failed:\n{r.stderr[-3000:]}")
  return time.perf_counter() - start, int(r.stdout.strip().splitlines()[-1]) * 1024


def main(argv):
  del argv
  m = SHAPES[_SHAPE.value]
  root = _DIR.value or tempfile.mkdtemp(prefix="llada_convert_")
  try:
    start = time.perf_counter()
    nbytes = write_synthetic(os.path.join(root, "hf"), m)
    print(f"wrote {nbytes / 1e9:.2f} GB of bf16 safetensors in {time.perf_counter() - start:.0f} s "
          f"({sum(np.prod(t.shape) for t in hf.layout(m)) / 1e9:.2f}B parameters)", flush=True)
    env_cpu = ["env", "JAX_PLATFORMS=cpu"]
    rows = [("baseline: python + jax + llada_jax", [*env_cpu, sys.executable, "-c",
                                                    "import jax; jax.devices(); import llada_jax.hf"]),
            ("llada-convert (keep bf16)", [*env_cpu, sys.executable, "-m", "llada_jax.cli.convert",
                                           f"--hf_dir={root}/hf", f"--out={root}/work"]),
            ("llada-export (bf16)", [*env_cpu, sys.executable, "-m", "llada_jax.cli.export",
                                     f"--workdir={root}/work", f"--out={root}/exported"])]
    print("\n| shape | command | wall s | peak RSS GB | model GB | peak / model |")
    print("|---|---|---|---|---|---|")
    for label, cmd in rows:
      seconds, rss = _child(cmd)
      print(f"| {_SHAPE.value} | {label} | {seconds:.0f} | {rss / 1e9:.2f} | {nbytes / 1e9:.2f} | "
            f"{rss / nbytes:.2f} |", flush=True)
  finally:
    if not _KEEP.value:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
