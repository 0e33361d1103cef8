"""Test set-up: 8 fake CPU devices (set before JAX starts) and shared, session-scoped fixtures."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

from llada_jax import config as config_lib  # noqa: E402
from llada_jax.configs import default  # noqa: E402


def tiny_config(**overrides) -> config_lib.Config:
  """The `tiny` preset with dotted overrides, e.g. tiny_config(**{"train.num_steps": 4})."""
  c = default.get_config("tiny")
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return config_lib.from_config_dict(c)


@pytest.fixture(scope="session")
def devices():
  assert len(jax.devices()) == 8, "tests expect 8 fake CPU devices (see conftest.py)"
  return jax.devices()
