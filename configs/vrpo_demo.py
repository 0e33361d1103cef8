"""VRPO of the README's SFT demo model on the built-in procedural preference set (CPU minutes).

  llada-train --config=configs/demo.py --workdir=/tmp/llada_demo              # pre-train
  llada-train --config=configs/sft_demo.py --workdir=/tmp/llada_demo_sft      # SFT from it
  llada-train --config=configs/vrpo_demo.py --workdir=/tmp/llada_demo_vrpo    # VRPO from the SFT model
  python benchmarks/vrpo_demo.py --before=/tmp/llada_demo_sft --after=/tmp/llada_demo_vrpo  # held-out check

The pairs ask about the corpus world: the true fact is preferred over a wrong one, and a one-word answer
over a full sentence where the question asks for one word. Held-out pairs ask about entities no training
pair mentions. The reference model is the SFT checkpoint; VRPO's defaults: 8 samples per ELBO, one mask
per timestep, policy and reference sharing timesteps and masks.
"""

from llada_jax.configs import default


def get_config():
  c = default.get_config("demo")
  c.data.update(num_documents=4000)
  c.train.update(batch_size=16, seq_len=64, num_steps=150, checkpoint_every=50, eval_every=50, eval_batches=4,
                 log_every=10, num_samples=4)
  c.optim.update(peak_lr=1e-4)
  c.preference.update(beta=0.1, budget=8, n_mask=1, antithetic=True)
  return default.preference(c, init_from="/tmp/llada_demo_sft")
