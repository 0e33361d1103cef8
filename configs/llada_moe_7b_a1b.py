"""The `llada_moe_7b_a1b` preset; see configs/default.py for every field."""

from llada_jax.configs import default


def get_config():
  return default.get_config("llada_moe_7b_a1b")
