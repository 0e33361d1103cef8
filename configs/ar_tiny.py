"""The autoregressive baseline at the `tiny` shape: a causal mask and the next-token loss, with the same
sizes, data and steps as configs/tiny.py, so the two paradigms compare at equal parameters and compute.
"""

from llada_jax.configs import default


def get_config():
  c = default.get_config("tiny")
  c.model.causal = True
  c.diffusion.objective = "ar"
  return c
