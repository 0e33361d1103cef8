"""A short SFT of the README demo model on the built-in verifiable task: the start of `grpo_demo.py`.

  llada-train --config=configs/demo.py --workdir=/tmp/llada_demo                  # pre-train first
  llada-train --config=configs/sft_task_demo.py --workdir=/tmp/llada_demo_task    # then this

The task (llada_jax.data.tasks) asks arithmetic, counting and fact questions about the corpus world and
wants the answer as `<answer>X</answer>`; SFT on its worked solutions teaches the format and part of the
skill, as d1 runs masked SFT before RL. Kept short on purpose: RL then has something left to learn.
"""

from llada_jax.configs import default


def get_config():
  c = default.get_config("demo")
  c.data.update(source="task", num_documents=5000)
  c.train.update(seq_len=80, num_steps=150, checkpoint_every=50, eval_every=50, log_every=25)
  c.optim.update(peak_lr=5e-4)
  return default.sft(c, init_from="/tmp/llada_demo")
