"""`llada-export`: a llada_jax checkpoint -> the Hugging Face LLaDA layout (safetensors + config.json).

  llada-export --workdir=/tmp/llada_demo_sft --out=/tmp/llada_demo_hf --dtype=bfloat16

The folder gets `config.json` (LLaDA keys), `model.safetensors` (or `model-0000k-of-0000n.safetensors`
plus `model.safetensors.index.json`) and the tokenizer files. To load it with PyTorch `transformers`,
copy the released `modeling_llada.py` and `configuration_llada.py` beside them (trust_remote_code).
"""

from absl import app, flags

from llada_jax import hf
from llada_jax.cli import common, parsing

_WORKDIR = flags.DEFINE_string("workdir", None, "Training (or converted) workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OUT = flags.DEFINE_string("out", None, "New, empty folder for the Hugging Face files.")
_DTYPE = flags.DEFINE_enum("dtype", "keep", list(hf.DTYPES), "Weight dtype: keep the checkpoint's, or cast.")
_SHARD = flags.DEFINE_float("max_shard_gb", 2.0, "Largest safetensors file, in GiB (its tensors are held in "
                            "host memory while it is written).", lower_bound=0.001)


@common.user_errors("llada-export")
def main(argv):
  del argv
  names = hf.export_checkpoint(_WORKDIR.value, _OUT.value, step=_STEP.value, dtype=_DTYPE.value,
                               max_shard_bytes=int(_SHARD.value * 2**30))
  print(f"wrote {_OUT.value}: config.json, {len(names)} safetensors file(s), tokenizer files")
  return 0


def run():
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main, flags_parser=parsing.flags_parser("llada-export"))


if __name__ == "__main__":
  run()
