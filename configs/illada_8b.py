"""The `illada_8b` preset; see configs/default.py for every field."""

from llada_jax.configs import default


def get_config():
  return default.get_config("illada_8b")
