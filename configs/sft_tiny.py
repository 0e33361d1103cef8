"""SFT of the `tiny` model on the built-in procedural chat set (tests).

  llada-train --config=configs/sft_tiny.py --workdir=/tmp/sft_tiny --config.train.init_from=/tmp/tiny
"""

from llada_jax.configs import default


def get_config():
  c = default.get_config("tiny")
  c.data.update(num_documents=300)
  c.train.update(seq_len=64, num_steps=20)
  return default.sft(c)
