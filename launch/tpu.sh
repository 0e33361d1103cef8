#!/usr/bin/env bash
# Train llada_jax on a Cloud TPU VM or multi-host slice: create it, install this checkout on every
# worker, start `llada-train --distributed=yes` on all of them, follow the log, stop, delete.
#
#   TPU_NAME=my-tpu ZONE=us-east5-a WORKDIR=gs://my-bucket/run1 ./launch/tpu.sh all
#   ./launch/tpu.sh --dry_run --tpu_name=my-tpu --zone=us-east5-a --workdir=gs://b/r train
#
# Every variable below can be set in the environment or as --lower_case_name=VALUE (flags win).
# --dry_run (or DRY_RUN=1) prints each gcloud / pip command, shell-quoted, instead of running it.
# See launch/README.md for the full description.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/lib.sh
source "$REPO_ROOT/launch/lib.sh"
readonly REPO_ROOT
readonly VARS=(TPU_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION QUEUED SPOT QUEUED_RESOURCE
               CREATE_FLAGS POLL_SECONDS CONFIG WORKDIR TRAIN_FLAGS TRAIN_ENV REMOTE_DIR REMOTE_PYTHON
               LOCAL_PYTHON DIST_DIR DRY_RUN)

usage() {
  cat <<'EOF'
usage: [VAR=value ...] launch/tpu.sh [--dry_run] [--var_name=value ...] SUBCOMMAND

subcommands:
  create    create the TPU VM (QUEUED=1: a queued resource, waiting until it is ACTIVE)
  install   build a wheel of this checkout, copy it and configs/ to every worker, pip install it
            with the [tpu] extra into a virtualenv (REMOTE_DIR/venv) on each worker
  check     run llada-train --dry_run in the foreground on every worker (compile, print memory)
  train     start llada-train --distributed=yes in the background on every worker (nohup,
            log in REMOTE_DIR/train.log)
  logs      follow worker 0's log (tail -f)
  stop      SIGTERM llada-train on every worker (it checkpoints before exiting)
  delete    delete the TPU VM (QUEUED=1: the queued resource, --force)
  all       create, install, train, logs

variables (environment or --lower_case_name=VALUE):
  TPU_NAME          required: the TPU VM (node) name
  ZONE              required: e.g. us-east5-a
  PROJECT           Google Cloud project (default: gcloud's configured project)
  ACCELERATOR_TYPE  default v5p-8
  RUNTIME_VERSION   TPU software version (default: from ACCELERATOR_TYPE: v6e -> v2-alpha-tpuv6e,
                    v5p -> v2-alpha-tpuv5, v5litepod -> v2-alpha-tpuv5-lite, else tpu-ubuntu2204-base)
  QUEUED=1          create through `gcloud compute tpus queued-resources` (QUEUED_RESOURCE: its
                    name, default TPU_NAME-qr; POLL_SECONDS: wait interval, default 30)
  SPOT=1            Spot capacity (preemptible); default on-demand
  CREATE_FLAGS      extra flags for the create command (word-split), e.g. "--reserved"
  CONFIG            config file under configs/, default configs/llada_1b.py
  WORKDIR           required for check/train/all: run directory, gs://BUCKET/PATH on a slice
  TRAIN_FLAGS       extra llada-train flags (word-split on the workers)
  TRAIN_ENV         VAR=value words set for llada-train on the workers (e.g. TPU_STDERR_LOG_LEVEL=0)
  REMOTE_DIR        directory under the workers' home, default llada
  REMOTE_PYTHON     Python >= 3.11 on the workers (default: the first found, else apt python3.11)
  LOCAL_PYTHON      Python that builds the wheel here, default python3
  DIST_DIR          where the wheel is built, default REPO/dist
  DRY_RUN=1         same as --dry_run
EOF
}

parse_args "$@"
[[ -n "$subcommand" ]] || { usage >&2; exit 2; }
case "$subcommand" in
  create | install | check | train | logs | stop | delete | all) ;;
  *) die_usage "unknown subcommand '$subcommand'" ;;
esac

TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-8}"
QUEUED="${QUEUED:-0}"
SPOT="${SPOT:-0}"
QUEUED_RESOURCE="${QUEUED_RESOURCE:-${TPU_NAME}-qr}"
CREATE_FLAGS="${CREATE_FLAGS:-}"
POLL_SECONDS="${POLL_SECONDS:-30}"
CONFIG="${CONFIG:-configs/llada_1b.py}"
WORKDIR="${WORKDIR:-}"
TRAIN_FLAGS="${TRAIN_FLAGS:-}"
TRAIN_ENV="${TRAIN_ENV:-}"
REMOTE_DIR="${REMOTE_DIR:-llada}"
REMOTE_PYTHON="${REMOTE_PYTHON:-}"
LOCAL_PYTHON="${LOCAL_PYTHON:-python3}"
DIST_DIR="${DIST_DIR:-$REPO_ROOT/dist}"
DRY_RUN="${DRY_RUN:-0}"

if [[ -z "${RUNTIME_VERSION:-}" ]]; then
  case "$ACCELERATOR_TYPE" in
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi


require() {
  local var
  for var in "$@"; do
    [[ -n "${!var}" ]] || die_usage "$var is required for '$subcommand' (set $var=... or --$(printf '%s' "$var" | tr '[:upper:]' '[:lower:]')=...)"
  done
}

require TPU_NAME ZONE
case "$subcommand" in
  check | train | all) require WORKDIR ;;
esac


where=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || where+=(--project="$PROJECT")

# Runs a shell command line on the workers: tpu_ssh WORKER COMMAND.
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker="$1" --command="$2"
}

# The llada-train command line, for the workers' shell (TRAIN_FLAGS is word-split there).
train_command() {
  local cmd
  cmd="venv/bin/llada-train --config=$(quote "$CONFIG") --workdir=$(quote "$WORKDIR") --distributed=yes"
  [[ -z "$TRAIN_FLAGS" ]] || cmd+=" $TRAIN_FLAGS"
  [[ -z "$TRAIN_ENV" ]] || cmd="env $TRAIN_ENV $cmd"
  printf '%s' "$cmd"
}

# --- subcommands ----------------------------------------------------------------------------------
do_create() {
  local extra=()
  is_true "$SPOT" && extra+=(--spot)
  # shellcheck disable=SC2206  # CREATE_FLAGS is a list of flags on purpose
  [[ -z "$CREATE_FLAGS" ]] || extra+=($CREATE_FLAGS)
  if is_true "$QUEUED"; then
    run gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" --node-id="$TPU_NAME" \
      "${where[@]}" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
      ${extra[@]+"${extra[@]}"}
    local describe=(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" "${where[@]}"
                    --format='value(state.state)')
    if is_true "$DRY_RUN"; then
      show "${describe[@]}"  # polled until ACTIVE
      return
    fi
    local state
    while true; do
      state="$("${describe[@]}")"
      case "$state" in
        ACTIVE) echo "queued resource $QUEUED_RESOURCE is ACTIVE" >&2; break ;;
        FAILED | SUSPENDED | SUSPENDING | DELETING)
          echo "tpu.sh: queued resource $QUEUED_RESOURCE is $state" >&2
          exit 1 ;;
        *) echo "queued resource $QUEUED_RESOURCE: ${state:-unknown}; checking again in ${POLL_SECONDS}s" >&2
           sleep "$POLL_SECONDS" ;;
      esac
    done
  else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${where[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" ${extra[@]+"${extra[@]}"}
  fi
}

wheel_name() {
  local version
  version="$(sed -n 's/^ *version="\([^"]*\)".*/\1/p' "$REPO_ROOT/setup.py" | head -n 1)"
  printf 'llada_jax-%s-py3-none-any.whl' "${version:-0.1.0}"
}

# shellcheck disable=SC2016  # the single-quoted parts are for the workers' shell
do_install() {
  local wheel
  wheel="$(wheel_name)"
  run "$LOCAL_PYTHON" -m pip wheel --no-deps --wheel-dir="$DIST_DIR" "$REPO_ROOT"
  if ! is_true "$DRY_RUN" && [[ ! -f "$DIST_DIR/$wheel" ]]; then
    echo "tpu.sh: pip wheel did not write $DIST_DIR/$wheel" >&2
    exit 1
  fi
  tpu_ssh all "mkdir -p $(quote "$REMOTE_DIR")"
  run gcloud compute tpus tpu-vm scp "$DIST_DIR/$wheel" "$REPO_ROOT/configs" \
    "$TPU_NAME:$REMOTE_DIR/" "${where[@]}" --worker=all --recurse
  # On each worker: a Python >= 3.11 (jax 0.10 needs it; Ubuntu 22.04 images ship 3.10, so
  # python3.11 comes from apt when nothing newer is there), a virtualenv, the wheel with [tpu].
  local w py script
  w="$(quote "$wheel")"
  py="$(quote "$REMOTE_PYTHON")"
  script="set -e; cd $(quote "$REMOTE_DIR"); py=$py"
  script+='; if [ -z "$py" ]; then for c in python3 python3.13 python3.12 python3.11; do'
  script+=' if command -v "$c" >/dev/null && "$c" -c "import sys; sys.exit(sys.version_info < (3, 11))"; then py=$c; break; fi; done; fi'
  script+='; if [ -z "$py" ]; then echo "installing python3.11 (apt)"; sudo apt-get update -qq'
  script+='; sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv; py=python3.11; fi'
  script+='; if [ ! -x venv/bin/python ]; then "$py" -m venv venv || { sudo DEBIAN_FRONTEND=noninteractive'
  script+=' apt-get install -y -qq "$py-venv" && rm -rf venv && "$py" -m venv venv; }; fi'
  script+='; venv/bin/python -m pip install -q --upgrade pip'
  script+="; venv/bin/python -m pip install $(quote "${wheel}[tpu]")"
  script+="; venv/bin/python -m pip install --no-deps --force-reinstall $w"
  script+='; echo "llada_jax installed on $(hostname)"'
  tpu_ssh all "$script"
}

check_workdir() {
  if [[ "$WORKDIR" != gs://* ]]; then
    echo "tpu.sh: warning: WORKDIR=$WORKDIR is not gs://...; on a multi-host slice every worker" \
         "needs the same, shared workdir for checkpoints" >&2
  fi
}

do_check() {
  check_workdir
  tpu_ssh all "cd $(quote "$REMOTE_DIR") && $(train_command) --dry_run"
}

do_train() {
  check_workdir
  tpu_ssh all "cd $(quote "$REMOTE_DIR") && nohup $(train_command) > train.log 2>&1 < /dev/null &"
  if ! is_true "$DRY_RUN"; then
    echo "started on every worker of $TPU_NAME; follow with: launch/tpu.sh logs" >&2
  fi
}

do_logs() {
  tpu_ssh 0 "tail -n 100 -F $(quote "$REMOTE_DIR")/train.log"
}

do_stop() {
  # [l]lada-train matches the process but not this command line itself.
  tpu_ssh all "pkill -TERM -f '[l]lada-train' || echo 'no llada-train running on '\$(hostname)"
}

do_delete() {
  if is_true "$QUEUED"; then
    run gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" "${where[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${where[@]}" --quiet
  fi
}

case "$subcommand" in
  create) do_create ;;
  install) do_install ;;
  check) do_check ;;
  train) do_train ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
  all) do_create; do_install; do_train; do_logs ;;
esac
