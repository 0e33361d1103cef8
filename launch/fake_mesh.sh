#!/usr/bin/env bash
# Train on a fake 8-device CPU mesh: ./launch/fake_mesh.sh configs/tiny.py /tmp/tiny_mesh [--config.mesh.data=2]
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [FLAGS...]" >&2
  exit 2
fi
config="$1"; workdir="$2"; shift 2
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
exec llada-train --config="$config" --workdir="$workdir" "$@"
