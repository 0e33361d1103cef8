"""SFT of the released LLaDA-8B weights (converted by `llada-convert`) on your JSONL chats (REFERENCE §6).

  llada-convert --hf_dir=/models/LLaDA-8B-Base --out=/ckpt/llada8b_base
  llada-train --config=configs/sft_llada_8b.py --workdir=gs://BUCKET/llada8b_sft \\
      --config.train.init_from=/ckpt/llada8b_base --config.data.paths="('chats/*.jsonl',)"

The released tokenizer (tokenizer.json) comes from the init_from workdir; its mask id is 126336. The
paper's SFT: lr 0 -> 2.5e-5 over 50 steps, constant, linear to 2.5e-6 over the last 10%, global batch
256, 4.5M pairs x 3 epochs (~52.7k steps). Parameters and AdamW state are float32 (a bf16 import is
cast on restore): about 16 bytes/parameter, so plan the mesh with `llada-train --dry_run`.
"""

from llada_jax.configs import default


def get_config():
  c = default.get_config("llada_8b")
  c.data.update(source="jsonl", paths=("chats/*.jsonl",))
  c.train.update(batch_size=256, seq_len=4096, num_steps=52700, checkpoint_every=500, eval_every=0)
  c.optim.update(peak_lr=2.5e-5, weight_decay=0.1)
  return default.sft(c)
