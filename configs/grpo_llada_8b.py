"""diffu-GRPO (d1) of LLaDA-8B-Instruct (converted by `llada-convert`) on your JSONL prompts, d1's recipe.

  llada-convert --hf_dir=/models/LLaDA-8B-Instruct --out=/ckpt/llada8b_instruct
  llada-train --config=configs/grpo_llada_8b.py --workdir=gs://BUCKET/llada8b_grpo \\
      --config.train.init_from=/ckpt/llada8b_instruct --config.data.paths="('gsm8k_train.jsonl',)"

Prompt records: `{"prompt": "...", "answer": "72"}` (or a `messages` history ending with the user's
turn), any other fields passed to the reward functions (countdown: `numbers`, `target`). From d1
(REFERENCE §10, its train.yaml): G = 6, mu = 12, eps 0.5, beta 0.04, reference = the base (adapters off)
synced every 64 steps, lr 3e-6 constant, AdamW (0.9, 0.99), weight decay 0.1, clipping 0.2, LoRA r 128 /
alpha 64 / dropout 0.05, rollouts of 256 tokens in 128 steps, blocks of 32, low-confidence remasking,
temperature 0.9, prompts up to 200 tokens, 96 completions per optimizer update (8 GPUs x 6 x 2 micro-
batches). d1 quantises the base to 4 bits; here it is bfloat16 (16 GB, sharded). Rewards: d1's GSM8K set
is five small functions; `gsm8k` (2.0 for the right number), `integer_answer` (0.5) and `format` carry
the same signal. NOT from d1: the number of steps (each step = 12 updates; 300 steps ~ 3.6k updates).
Memory: `llada-train --config=configs/grpo_llada_8b.py --dry_run --num_devices=8` sizes the update step.
"""

from llada_jax.configs import default


def get_config():
  c = default.get_config("llada_8b")
  c.data.update(source="jsonl", paths=("gsm8k_train.jsonl",))
  c.train.update(batch_size=96, grad_accum_steps=2, seq_len=456, num_steps=300, checkpoint_every=25,
                 eval_every=0, log_every=1)
  c.grpo.update(num_generations=6, inner_iterations=12, clip_eps=0.5, beta=0.04, p_mask_prompt=0.15,
                ref_sync_every=64, gen_length=256, steps=128, block_length=32, temperature=0.9,
                remasking="low_confidence", rewards=("gsm8k", "integer_answer", "format"))
  c.lora.update(base_dtype="bfloat16", dropout=0.05)
  c = default.grpo(c, init_from="/ckpt/llada8b_instruct")
  c.optim.update(peak_lr=3e-6)
  return default.lora(c, rank=128, alpha=64.0, peak_lr=3e-6)
