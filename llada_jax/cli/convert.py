"""`llada-convert`: a Hugging Face LLaDA checkpoint (safetensors) -> a llada_jax workdir, offline.

LLaDA, iLLaDA (tied embeddings) and LLaDA-MoE folders are read alike: the layout follows config.json's keys
(llada_jax.hf_layouts), and every size and special id comes from config.json and the tokenizer files.

  llada-convert --hf_dir=/models/LLaDA-8B-Instruct --out=/ckpt/llada8b_instruct
  llada-chat --workdir=/ckpt/llada8b_instruct
  llada-convert --adapter=/models/my-peft-lora --base=/ckpt/llada8b_instruct --out=/ckpt/llada8b_lora

The workdir holds an Orbax step 0 with the parameters, the resolved config and the tokenizer, and is
read by `llada-sample`, `llada-chat`, `llada-eval` and fine-tuning (`--config.train.init_from=`).
Tensors stream one at a time into the parameters' sharding over this host's devices. Needs the `hf`
extra (`pip install 'llada_jax[hf]'`: safetensors, tokenizers).

With `--adapter`, a PEFT LoRA folder (adapter_model.safetensors + adapter_config.json, LLaDA module
names) becomes a LoRA workdir over `--base` (a converted or trained workdir of the model it was made
for): sampling, chat and `llada-export --merge` read it as they read a LoRA run.
"""

from absl import app, flags

from llada_jax import hf, peft
from llada_jax.cli import common, parsing

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Folder with config.json, *.safetensors and tokenizer files.")
_ADAPTER = flags.DEFINE_string("adapter", None, "Instead of --hf_dir: a PEFT LoRA folder to import over --base.")
_BASE = flags.DEFINE_string("base", None, "With --adapter: the llada_jax workdir of the adapter's base model.")
_OUT = flags.DEFINE_string("out", None, "New workdir to write (local path or gs://).")
_DTYPE = flags.DEFINE_enum("dtype", "keep", list(hf.DTYPES), "Parameter dtype: keep the stored one, or cast.")
_COMPUTE = flags.DEFINE_enum("compute_dtype", "bfloat16", ["bfloat16", "float32", "float16"],
                             "Activation dtype recorded in the config (model.dtype).")
_INSTRUCT = flags.DEFINE_enum("instruct", "auto", ["auto", "true", "false"],
                              "A chat model (prompts get the chat template)? auto: 'instruct' in the folder name "
                              "(with --adapter: as the base model is).")


@common.user_errors("llada-convert")
def main(argv):
  del argv
  if (_HF_DIR.value is None) == (_ADAPTER.value is None):
    raise app.UsageError("give exactly one of --hf_dir (a model) and --adapter (a PEFT LoRA adapter)")
  instruct = None if _INSTRUCT.value == "auto" else _INSTRUCT.value == "true"
  if _ADAPTER.value is not None:
    if not _BASE.value:
      raise app.UsageError("--adapter needs --base=WORKDIR: the converted or trained workdir of its base model")
    lora, record = peft.import_adapter(_ADAPTER.value, _BASE.value, _OUT.value, chat=instruct)
    print(f"wrote {_OUT.value}: LoRA rank {lora.rank} (alpha {lora.alpha:g}) on {', '.join(lora.targets)} over "
          f"step {record['step']} of {_BASE.value}")
    return 0
  model = hf.import_checkpoint(_HF_DIR.value, _OUT.value, dtype=_DTYPE.value, compute_dtype=_COMPUTE.value,
                               instruct=instruct)
  m = model.model_config
  kind = "instruct (chat template)" if model.chat else "base"
  experts = f", {m.num_experts} experts (top-{m.experts_per_token})" if m.moe else ""
  print(f"wrote {_OUT.value}: {m.num_layers} layers, d_model {m.d_model}{experts}, vocab {m.vocab_size}, "
        f"{m.param_dtype} parameters, {kind} model, mask id {model.mask_id}")
  return 0


def run():
  flags.mark_flags_as_required(["out"])
  app.run(main, flags_parser=parsing.flags_parser("llada-convert"))


if __name__ == "__main__":
  run()
