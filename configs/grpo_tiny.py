"""diffu-GRPO on the built-in verifiable task with the `tiny` model, from a fresh init (seconds; tests and
smoke runs): 2 prompts x G = 4 completions of 8 tokens per step, 2 updates per step.

  llada-train --config=configs/grpo_tiny.py --workdir=/tmp/llada_grpo_tiny
"""

from llada_jax.configs import default


def get_config():
  c = default.get_config("tiny")
  c.train.update(batch_size=8, seq_len=64, num_steps=4, log_every=1, checkpoint_every=2, num_samples=1,
                 eval_batches=1)
  c.grpo.update(num_generations=4, inner_iterations=2, gen_length=8, steps=8, block_length=8, temperature=1.0,
                ref_sync_every=0)
  c = default.grpo(c)
  c.optim.peak_lr = 3e-3
  return c
