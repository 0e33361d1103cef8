"""Soak: train while being killed, restart each time, and check that nothing but bounded work was lost.

  python benchmarks/soak.py --seconds=300 --seed=0 --kill_fraction=0.7 [--workdir=/tmp/soak]

The command line of `llada_jax.testing.soak` (what it does, its checks and its flags: see there; the
fault tests import it too). Exit status 1 if any check fails.
"""

import sys

from llada_jax.testing import soak

if __name__ == "__main__":
  sys.exit(soak.main())
