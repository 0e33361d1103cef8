"""The block-diffusion counterpart of `sft_task_demo.py` (REFERENCE §14): the same SFT on the built-in
verifiable task, from the same pure-diffusion checkpoint, but the model made block-causal over blocks of
16 tokens and trained with `block_sft` (x_t ++ x_0, the prompt clean, rows rounded up to whole blocks).

  llada-train --config=configs/demo.py --workdir=/tmp/llada_demo                        # pre-train first
  llada-train --config=configs/block_sft_task_demo.py --workdir=/tmp/llada_demo_block   # then this

Samples come from `sampling.generate_blocks` (exact KV cache, threshold decoding); benchmarks/block_diffusion.py
compares it with the pure-diffusion SFT (`sft_task_demo.py`) on quality and decode speed.
"""

from llada_jax.configs import default


def get_config():
  c = default.get_config("demo")
  c.data.update(source="task", num_documents=5000)
  c.train.update(seq_len=80, num_steps=150, checkpoint_every=50, eval_every=50, log_every=25)
  c.optim.update(peak_lr=5e-4)
  return default.block(default.sft(c), block_size=16, init_from="/tmp/llada_demo", sft=True)
