"""`llada-export`: a llada_jax checkpoint -> the Hugging Face LLaDA layout (safetensors + config.json).

  llada-export --workdir=/tmp/llada_demo_sft --out=/tmp/llada_demo_hf --dtype=bfloat16
  llada-export --workdir=/tmp/llada_demo_lora --out=/tmp/llada_demo_lora_hf --merge      # a LoRA run, merged
  llada-export --workdir=/tmp/llada_demo_lora --out=/tmp/llada_demo_lora_peft --adapter  # its PEFT adapter

The folder gets `config.json` (LLaDA keys; a mixture-of-experts model: LLaDA-MoE's), `model.safetensors`
(or `model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`) and the tokenizer files. To load
it with PyTorch `transformers`, copy the released `modeling_llada.py` and `configuration_llada.py` (LLaDA-MoE:
`modeling_lladamoe.py` and `configuration_lladamoe.py`) beside them (trust_remote_code).
A LoRA run's workdir exports with `--merge` (its base model with the adapters merged in) or `--adapter`
(`adapter_model.safetensors` + `adapter_config.json` in PEFT's layout, for `PeftModel.from_pretrained`).
"""

from absl import app, flags

from llada_jax import hf, peft
from llada_jax.cli import common, parsing

_WORKDIR = flags.DEFINE_string("workdir", None, "Training (or converted) workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OUT = flags.DEFINE_string("out", None, "New, empty folder for the Hugging Face files.")
_DTYPE = flags.DEFINE_enum("dtype", "keep", list(hf.DTYPES), "Weight dtype: keep the checkpoint's, or cast.")
_MERGE = flags.DEFINE_bool("merge", False, "A LoRA run: export its base model with the adapters merged in.")
_ADAPTER = flags.DEFINE_bool("adapter", False, "A LoRA run: export only its adapters, as PEFT files.")
_SHARD = flags.DEFINE_float("max_shard_gb", 2.0, "Largest safetensors file, in GiB (its tensors are held in "
                            "host memory while it is written).", lower_bound=0.001)


@common.user_errors("llada-export")
def main(argv):
  del argv
  if _MERGE.value and _ADAPTER.value:
    raise app.UsageError("--merge and --adapter exclude each other: merged weights, or the adapters alone")
  if _ADAPTER.value:
    names = peft.export_adapter(_WORKDIR.value, _OUT.value, step=_STEP.value, dtype=_DTYPE.value)
    print(f"wrote {_OUT.value}: {', '.join(names)} (PEFT LoRA adapter)")
    return 0
  names = hf.export_checkpoint(_WORKDIR.value, _OUT.value, step=_STEP.value, dtype=_DTYPE.value,
                               max_shard_bytes=int(_SHARD.value * 2**30), merge=_MERGE.value)
  print(f"wrote {_OUT.value}: config.json, {len(names)} safetensors file(s), tokenizer files")
  return 0


def run():
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main, flags_parser=parsing.flags_parser("llada-export"))


if __name__ == "__main__":
  run()
