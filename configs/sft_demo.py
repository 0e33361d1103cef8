"""SFT of the README demo model on the built-in procedural chat set (questions about the corpus world).

  llada-train --config=configs/demo.py --workdir=/tmp/llada_demo            # pre-train first
  llada-train --config=configs/sft_demo.py --workdir=/tmp/llada_demo_sft    # then fine-tune from it
"""

from llada_jax.configs import default


def get_config():
  c = default.get_config("demo")
  c.data.update(num_documents=5000)
  c.train.update(num_steps=300, checkpoint_every=100)
  c.optim.update(peak_lr=5e-4)
  return default.sft(c, init_from="/tmp/llada_demo")
