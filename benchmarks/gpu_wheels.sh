#!/usr/bin/env bash
# Wheels of the packages llada_jax needs that a GPU image without a package index may lack (grain and its
# array-record / portpicker, ml-collections), for CPython 3.12 on x86-64 Linux, downloaded here so they can
# travel with the checkout:
#
#   bash benchmarks/gpu_wheels.sh [DIR]        # default DIR: .whl (ignored by git)
#
# and, on the GPU machine, before benchmarks/gpu_suite.sh:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#
# The versions are the ones this checkout is tested with; the image's own jax, flax, optax, orbax, chex
# and absl-py are used as they are.
set -euo pipefail
dir=${1:-.whl}
python_version=${PYTHON_VERSION:-3.12}
packages=(grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
mkdir -p "$dir"
python3 -m pip download --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
  "${platforms[@]}" -d "$dir" "${packages[@]}"
ls -l "$dir"
