"""The `moe_tiny` preset; see configs/default.py for every field."""

from llada_jax.configs import default


def get_config():
  return default.get_config("moe_tiny")
