"""The autoregressive baseline at the `demo` shape: a causal mask and the next-token loss, with the same
sizes, data and steps as configs/demo.py, so the two paradigms compare at equal parameters and compute.

  llada-train --config=configs/demo.py --workdir=/tmp/llada_demo        # diffusion
  llada-train --config=configs/ar_demo.py --workdir=/tmp/llada_ar_demo  # autoregressive
  llada-sample --workdir=/tmp/llada_ar_demo --prompt="the capital of" --gen_length=32
"""

from llada_jax.configs import default


def get_config():
  c = default.get_config("demo")
  c.model.causal = True
  c.diffusion.objective = "ar"
  return c
