"""LoRA SFT of the released LLaDA-8B weights (converted by `llada-convert`) on your JSONL chats: the base
frozen in bfloat16, rank-64 adapters on q, k, v and the up projection (d1's targets); a global batch of 64
sequences as 8 micro-batches of one sequence per device on one 8-device host (v5e-8, 8 GPUs).

  llada-convert --hf_dir=/models/LLaDA-8B-Instruct --out=/ckpt/llada8b_instruct
  llada-train --config=configs/lora_sft_llada_8b.py --workdir=/ckpt/llada8b_lora \\
      --config.train.init_from=/ckpt/llada8b_instruct --config.data.paths="('chats/*.jsonl',)"
  llada-export --workdir=/ckpt/llada8b_lora --out=/models/llada8b_lora_peft --adapter

Memory per device comes from `llada-train --config=configs/lora_sft_llada_8b.py --dry_run
--num_devices=N` (BUILD.md, "LoRA": what fits on one 16 / 32 / 80 GB device and on a v5e-8): the
frozen base is 16 GB in bfloat16, the adapters and their AdamW state ~0.3 GB; full remat keeps the
activations of a 4096-token sequence to one layer's. The paper gives no LoRA rate for LLaDA; 1e-4 with
the SFT schedule is the usual LoRA choice (d1 trained its GRPO adapters at 3e-6, its SFT ones at 1e-5).
"""

from llada_jax.configs import default


def get_config():
  c = default.get_config("llada_8b")
  c.data.update(source="jsonl", paths=("chats/*.jsonl",))
  c.train.update(batch_size=64, grad_accum_steps=8, seq_len=4096, num_steps=5000, checkpoint_every=500,
                 eval_every=0)
  c.lora.base_dtype = "bfloat16"
  c = default.sft(c, init_from="/ckpt/llada8b_instruct")
  return default.lora(c, rank=64, alpha=128.0, peak_lr=1e-4)
