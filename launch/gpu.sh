#!/usr/bin/env bash
# Train llada_jax on NVIDIA GPUs: one process on this machine (all its GPUs), or one process per
# node over ssh, joined by jax.distributed through --coordinator_address/--num_processes/--process_id.
#
#   WORKDIR=/tmp/run1 ./launch/gpu.sh train                                  # this machine
#   NODES=gpu1,gpu2 WORKDIR=/shared/run1 VENV=.venv ./launch/gpu.sh install  # pip install ".[gpu]"
#   NODES=gpu1,gpu2 WORKDIR=/shared/run1 VENV=.venv ./launch/gpu.sh train    # 2 nodes
#
# Under SLURM, use `srun llada-train ... --distributed=yes` instead (launch/README.md).
# Every variable can be set in the environment or as --lower_case_name=VALUE (flags win).
# --dry_run (or DRY_RUN=1) prints each ssh / pip / llada-train command, shell-quoted, instead.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/lib.sh
source "$REPO_ROOT/launch/lib.sh"
readonly REPO_ROOT
readonly VARS=(NODES COORDINATOR COORDINATOR_PORT CONFIG WORKDIR TRAIN_FLAGS TRAIN_ENV REPO_DIR VENV
               PYTHON LOG_DIR LOG_NODE SSH_FLAGS DRY_RUN)

usage() {
  cat <<'EOF'
usage: [VAR=value ...] launch/gpu.sh [--dry_run] [--var_name=value ...] SUBCOMMAND

subcommands:
  install   pip install ".[gpu]" from REPO_DIR (into VENV when set, creating it), on this machine
            or, with NODES, on every node in turn over ssh
  train     without NODES: run llada-train here in the foreground (one process, all GPUs);
            with NODES: start one llada-train per node over ssh in the background (nohup), node i
            with --process_id=i, logging to REPO_DIR/LOG_DIR/train.node<i>.log on that node
  logs      follow node LOG_NODE's log (tail -f); needs NODES
  stop      SIGTERM llada-train here, or on every node (it checkpoints before exiting)
  slurm     print the srun line for an sbatch script (JAX reads the SLURM job; runs nothing)

variables (environment or --lower_case_name=VALUE):
  NODES             comma-separated ssh hosts ([user@]host), the first is process 0; empty: this machine
  COORDINATOR       address of process 0 as the other nodes reach it (default: the first node's host)
  COORDINATOR_PORT  default 12345
  CONFIG            default configs/llada_1b.py (relative to REPO_DIR on nodes, to . without NODES)
  WORKDIR           required for train: on several nodes, a path all of them share (NFS, gs://...)
  TRAIN_FLAGS       extra llada-train flags (word-split by the shell)
  TRAIN_ENV         VAR=value words set for llada-train (e.g. XLA_PYTHON_CLIENT_MEM_FRACTION=.95)
  REPO_DIR          this checkout's path on every node (default: this checkout's path here)
  VENV              virtualenv to install into / run from (relative to REPO_DIR or absolute);
                    empty: PYTHON's environment and llada-train from PATH
  PYTHON            interpreter for pip / for creating VENV, default python3 (needs >= 3.11)
  LOG_DIR           default logs (relative to REPO_DIR)
  LOG_NODE          node index that `logs` follows, default 0
  SSH_FLAGS         extra ssh flags (word-split), e.g. "-i ~/.ssh/cluster -o BatchMode=yes"
  DRY_RUN=1         same as --dry_run
EOF
}

parse_args "$@"
[[ -n "$subcommand" ]] || { usage >&2; exit 2; }
case "$subcommand" in
  install | train | logs | stop | slurm) ;;
  *) die_usage "unknown subcommand '$subcommand'" ;;
esac

NODES="${NODES:-}"
COORDINATOR_PORT="${COORDINATOR_PORT:-12345}"
CONFIG="${CONFIG:-configs/llada_1b.py}"
WORKDIR="${WORKDIR:-}"
TRAIN_FLAGS="${TRAIN_FLAGS:-}"
TRAIN_ENV="${TRAIN_ENV:-}"
REPO_DIR="${REPO_DIR:-$REPO_ROOT}"
VENV="${VENV:-}"
PYTHON="${PYTHON:-python3}"
LOG_DIR="${LOG_DIR:-logs}"
LOG_NODE="${LOG_NODE:-0}"
SSH_FLAGS="${SSH_FLAGS:-}"
DRY_RUN="${DRY_RUN:-0}"

nodes=()
if [[ -n "$NODES" ]]; then
  IFS=',' read -r -a nodes <<<"$NODES"
  for node in "${nodes[@]}"; do
    [[ -n "$node" && "$node" != *[[:space:]]* ]] || die_usage "NODES='$NODES' has an empty or blank entry"
  done
fi
num_nodes=${#nodes[@]}
if [[ $num_nodes -gt 0 ]]; then
  first="${nodes[0]}"
  COORDINATOR="${COORDINATOR:-${first#*@}}"
fi
[[ "$COORDINATOR_PORT" =~ ^[0-9]+$ ]] || die_usage "COORDINATOR_PORT must be a number (got '$COORDINATOR_PORT')"
[[ "$LOG_NODE" =~ ^[0-9]+$ ]] || die_usage "LOG_NODE must be a node index (got '$LOG_NODE')"

if [[ ( "$subcommand" == train || "$subcommand" == slurm ) && -z "$WORKDIR" ]]; then
  die_usage "WORKDIR is required for '$subcommand' (set WORKDIR=... or --workdir=...)"
fi
if [[ "$subcommand" == logs ]]; then
  [[ $num_nodes -gt 0 ]] || die_usage "NODES is required for 'logs' (a single-node train runs in the foreground)"
  [[ $LOG_NODE -lt $num_nodes ]] || die_usage "LOG_NODE=$LOG_NODE but NODES has $num_nodes entries"
fi



ssh_flags=()
# shellcheck disable=SC2206  # SSH_FLAGS is a list of flags on purpose
[[ -z "$SSH_FLAGS" ]] || ssh_flags=($SSH_FLAGS)

# Runs a shell command line on a node: on_node HOST COMMAND (-n: never read this script's stdin).
on_node() {
  run ssh -n ${ssh_flags[@]+"${ssh_flags[@]}"} "$1" "$2"
}

# The shell prefix that makes VENV's python/llada-train the ones used ("" without VENV).
venv_bin() {
  [[ -z "$VENV" ]] || printf '%s/bin/' "$VENV"
}

# VENV as a path here: relative paths are relative to REPO_DIR.
local_path() {
  if [[ "$1" == /* ]]; then printf '%s' "$1"; else printf '%s/%s' "$REPO_DIR" "$1"; fi
}

# --- subcommands ----------------------------------------------------------------------------------
do_install() {
  if [[ $num_nodes -eq 0 ]]; then
    local python="$PYTHON" venv
    if [[ -n "$VENV" ]]; then
      venv="$(local_path "$VENV")"
      [[ -x "$venv/bin/python" ]] || run "$PYTHON" -m venv "$venv"
      python="$venv/bin/python"
    fi
    run "$python" -m pip install "${REPO_DIR}[gpu]"
    return
  fi
  local python make_venv=""
  python="$(quote "$PYTHON")"
  if [[ -n "$VENV" ]]; then
    make_venv="if [ ! -x $(quote "$VENV")/bin/python ]; then $python -m venv $(quote "$VENV"); fi && "
    python="$(quote "$VENV")/bin/python"
  fi
  local node
  for node in "${nodes[@]}"; do  # in turn, not at once: REPO_DIR may be one shared directory
    on_node "$node" "cd $(quote "$REPO_DIR") && ${make_venv}$python -m pip install '.[gpu]'"
  done
}

do_train() {
  if [[ $num_nodes -eq 0 ]]; then
    local train=llada-train extra=() env_words=()
    [[ -z "$VENV" ]] || train="$(local_path "$VENV")/bin/llada-train"
    # Parsed as a shell would, so quoting in TRAIN_FLAGS means the same here as on a node.
    eval "extra=($TRAIN_FLAGS)"
    eval "env_words=($TRAIN_ENV)"
    local cmd=("$train" --config="$CONFIG" --workdir="$WORKDIR" ${extra[@]+"${extra[@]}"})
    [[ ${#env_words[@]} -eq 0 ]] || cmd=(env "${env_words[@]}" "${cmd[@]}")
    run "${cmd[@]}"
    return
  fi
  local train
  train="$(venv_bin)llada-train"
  if [[ "$WORKDIR" != /* && "$WORKDIR" != *://* ]]; then
    echo "gpu.sh: warning: WORKDIR=$WORKDIR is relative (to REPO_DIR on each node); every node" \
         "must see the same workdir (a shared filesystem or gs://)" >&2
  fi
  local i log cmd
  for ((i = 0; i < num_nodes; i++)); do
    log="$LOG_DIR/train.node$i.log"
    cmd="$train --config=$(quote "$CONFIG") --workdir=$(quote "$WORKDIR")"
    cmd+=" --coordinator_address=$(quote "$COORDINATOR:$COORDINATOR_PORT")"
    cmd+=" --num_processes=$num_nodes --process_id=$i"
    [[ -z "$TRAIN_FLAGS" ]] || cmd+=" $TRAIN_FLAGS"
    [[ -z "$TRAIN_ENV" ]] || cmd="env $TRAIN_ENV $cmd"
    on_node "${nodes[$i]}" "cd $(quote "$REPO_DIR") && mkdir -p $(quote "$LOG_DIR") && nohup $cmd > $(quote "$log") 2>&1 < /dev/null &"
  done
  if ! is_true "$DRY_RUN"; then
    echo "started $num_nodes processes; follow node 0 with: NODES=$NODES launch/gpu.sh logs" >&2
  fi
}

do_logs() {
  on_node "${nodes[$LOG_NODE]}" \
    "cd $(quote "$REPO_DIR") && tail -n 100 -F $(quote "$LOG_DIR/train.node$LOG_NODE.log")"
}

do_stop() {
  # [l]lada-train matches the process but not this command line itself.
  if [[ $num_nodes -eq 0 ]]; then
    run pkill -TERM -f '[l]lada-train' || echo "no llada-train running here" >&2
  else
    local node
    for node in "${nodes[@]}"; do
      on_node "$node" "pkill -TERM -f '[l]lada-train' || echo 'no llada-train running on '\$(hostname)"
    done
  fi
}

do_slurm() {
  # One task per GPU: under SLURM, JAX gives each process the GPU numbered SLURM_LOCALID.
  echo "# in an sbatch script with --ntasks-per-node=<GPUs per node> --gpus-per-node=<GPUs per node>" >&2
  local cmd
  cmd="srun $(venv_bin)llada-train --config=$(quote "$CONFIG") --workdir=$(quote "$WORKDIR") --distributed=yes"
  [[ -z "$TRAIN_FLAGS" ]] || cmd+=" $TRAIN_FLAGS"
  [[ -z "$TRAIN_ENV" ]] || cmd="env $TRAIN_ENV $cmd"
  printf '%s\n' "$cmd"
}

case "$subcommand" in
  slurm) do_slurm ;;
  install) do_install ;;
  train) do_train ;;
  logs) do_logs ;;
  stop) do_stop ;;
esac
