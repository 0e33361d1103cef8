"""diffu-GRPO of the task-SFT demo model on the built-in verifiable task (CPU minutes).

  llada-train --config=configs/demo.py --workdir=/tmp/llada_demo                  # pre-train
  llada-train --config=configs/sft_task_demo.py --workdir=/tmp/llada_demo_task    # short SFT on the task
  llada-train --config=configs/grpo_demo.py --workdir=/tmp/llada_demo_grpo        # RL from it
  python benchmarks/grpo_demo.py --workdirs=/tmp/llada_demo_task,/tmp/llada_demo_grpo  # held-out accuracy

Each step samples G = 6 completions of 6 prompts with the jitted reverse process (temperature 1, 24
tokens in 12 steps, Fast-dLLM's prefix cache: the prompt's keys and values computed once), rewards them
with `correct` (the `<answer>` matches) + `format` (one well-formed answer tag), and makes 2 policy
updates on them against the SFT model as the KL reference. Validation: greedy
completions of held-out problems, their mean rewards (`eval_reward/correct` is the accuracy).
"""

from llada_jax.configs import default


def get_config():
  c = default.get_config("demo")
  c.data.update(num_documents=5000)
  c.train.update(batch_size=36, seq_len=84, num_steps=100, log_every=10, checkpoint_every=50, eval_every=50,
                 eval_batches=4, num_samples=4)
  c.grpo.update(num_generations=6, inner_iterations=2, gen_length=24, steps=12, block_length=24,
                temperature=1.0, kv_cache="prefix", beta=0.04, clip_eps=0.5, ref_sync_every=0,
                rewards=("correct", "format"))
  c = default.grpo(c, init_from="/tmp/llada_demo_task")
  c.optim.update(peak_lr=5e-5)
  return c
