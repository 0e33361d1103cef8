#!/usr/bin/env bash
# The GPU measurements behind BENCHMARKS.md's H200 tables.
#
#   bash benchmarks/gpu_suite.sh [--smoke] OUTDIR [PART...]
#
# PART: ceilings attention train1b profile1b mlp5632 train1b_xla train8b generate generate_unrolled, or
# `speed`: the accelerator-speed issue's one device call (ceilings, the generation rows, llada_1b at
# FFN 5634 padded to 128, llada_8b with dots_no_batch remat), whose limits add up to 8.5 minutes.
# Default: speed.
#
# Each command runs under `timeout` (a hung or out-of-memory run costs its slot, not the rest); its output
# goes to OUTDIR/PART.log, each train-step row to OUTDIR/<name>.json and the generation rows to
# OUTDIR/generate*.json. ROWS=REGEX runs only the train-step rows whose name matches. The exit status is
# the number of commands that failed (0: all ran). Needs llada_jax importable (`pip install -e .`, or
# PYTHONPATH=<repo root>) on a machine with one NVIDIA GPU.
#
# --smoke runs the same parts on CPU at tiny shapes (configs/tiny.py, gen 16, no cuDNN) with the same
# flags and overrides, so that a typo fails here, in tests/test_benchmarks.py, and not on the device.
#
# On a GPU image without grain / ml-collections (and no package index), first `bash
# benchmarks/gpu_wheels.sh` here, carry .whl/ along, and run there:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site:$PWD bash benchmarks/gpu_suite.sh "$OUT/speed" speed
set -u
smoke=0
if [[ ${1:-} == --smoke ]]; then smoke=1; shift; fi
out=${1:?usage: gpu_suite.sh [--smoke] OUTDIR [PART...]}; shift
parts=${*:-speed}
if [[ $parts == speed ]]; then
  parts="ceilings generate train1b train8b"
  ROWS=${ROWS:-'^(1b_b8_none_cudnn_pad128|8b_b2_dots_cudnn)$'}
fi
mkdir -p "$out"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.95}  # JAX takes 75% by default
export PYTHONUNBUFFERED=1
failed=0

# The shapes: the real ones, or --smoke's tiny stand-ins (same overrides, CPU-sized).
if ((smoke)); then
  export JAX_PLATFORMS=cpu
  one_b=(--config=configs/tiny.py --config.train.seq_len=32 --config.model.loss_chunk_size=16)
  eight_b=("${one_b[@]}" --config.model.param_dtype=bfloat16 --config.optim.mu_dtype=bfloat16)
  eight_b_gen=(--config=configs/tiny.py)
  gen_shape=(--gen_lengths=16 --prompt_length=8 --block_length=8 --repeats=1)
  ceiling_args=(--n=256 --gib=0.01)
  attn=auto  # xla on CPU
else
  one_b=(--config=configs/default.py:llada_1b --config.train.seq_len=4096 --config.model.loss_chunk_size=1024)
  eight_b=(--config=configs/default.py:llada_8b --config.train.seq_len=4096 --config.model.loss_chunk_size=1024
           --config.model.param_dtype=bfloat16 --config.optim.mu_dtype=bfloat16)
  eight_b_gen=(--config=configs/default.py:llada_8b)
  gen_shape=(--gen_lengths=256 --prompt_length=64 --block_length=32 --repeats=2)
  ceiling_args=()
  attn=cudnn
fi

run() {  # run TIMEOUT_S CMD...: one command under timeout; counts a failure
  local limit=$1; shift
  timeout "$limit" "$@" 2>&1 | grep -vE "^(WARNING|I0000|W0000|I[0-9]{4} )"
  local rc=${PIPESTATUS[0]}
  ((rc == 0)) || { echo "== FAILED (exit $rc): $*"; failed=$((failed + 1)); }
}

step() {  # step NAME TIMEOUT_S CONFIG_ARGS...: one train_step.py row (skipped unless NAME matches $ROWS)
  local name=$1 limit=$2; shift 2
  [[ $name =~ ${ROWS:-.} ]] || return 0
  echo "== $name: $*"
  run "$limit" python3 benchmarks/train_step.py --steps=3 --warmup=1 --json="$out/$name.json" "$@"
  echo "== $name: done"
}

gen() {  # gen NAME TIMEOUT_S ARGS...: generate.py at the target shape (llada_8b, bf16 weights)
  local name=$1 limit=$2; shift 2
  run "$limit" python3 benchmarks/generate.py "${eight_b_gen[@]}" --bf16_params "${gen_shape[@]}" \
    --json="$out/$name.json" "$@"
}

keep_trace() {  # keep_trace PROFILE_DIR DEST: copy the newest Perfetto trace a profiler run left there
  # shellcheck disable=SC2012  # profiler-made names: ls -t finds the newest
  cp "$(ls -t "$1"/plugins/profile/*/perfetto_trace.json.gz | head -1)" "$2" || failed=$((failed + 1))
}

part() {
  case $1 in
    ceilings) run 40 python3 benchmarks/ceilings.py "${ceiling_args[@]}" ;;
    attention)  # the llada_1b (GQA, head 64) and llada_8b (MHA, head 128) attention shapes at seq 4096
      run 120 python3 benchmarks/attention.py --batch=8 --seq=4096 --heads=32 --kv_heads=4 --head_dim=64
      run 120 python3 benchmarks/attention.py --batch=2 --seq=4096 --heads=32 --kv_heads=32 --head_dim=128 ;;
    train1b)  # the preset runs the SwiGLU zero-padded to 5760 wide (model.mlp_pad_to=128); _nopad: 5634
      step 1b_b8_none_cudnn 170 "${one_b[@]}" --config.train.batch_size=8 --config.model.remat_policy=none \
        --config.model.attention_impl=$attn
      step 1b_b8_none_cudnn_pad128 100 "${one_b[@]}" --config.train.batch_size=8 --config.model.remat_policy=none \
        --config.model.attention_impl=$attn --config.model.mlp_pad_to=128
      step 1b_b8_none_cudnn_nopad 170 "${one_b[@]}" --config.train.batch_size=8 --config.model.remat_policy=none \
        --config.model.attention_impl=$attn --config.model.mlp_pad_to=0
      XLA_FLAGS=--xla_gpu_enable_triton_gemm=false step 1b_b8_none_cudnn_cublas 170 "${one_b[@]}" \
        --config.train.batch_size=8 --config.model.remat_policy=none --config.model.attention_impl=$attn
      step 1b_b16_dots_cudnn 170 "${one_b[@]}" --config.train.batch_size=16 \
        --config.model.remat_policy=dots_no_batch --config.model.attention_impl=$attn
      step 1b_b16_full_cudnn 170 "${one_b[@]}" --config.train.batch_size=16 --config.model.remat_policy=full \
        --config.model.attention_impl=$attn ;;
    profile1b)  # one profiled llada_1b step: the kernel-time breakdown behind the gap to the matmul rate
      step 1b_b8_none_cudnn_profiled 170 "${one_b[@]}" --config.train.batch_size=8 --config.model.remat_policy=none \
        --config.model.attention_impl=$attn --config.model.mlp_pad_to=0 --profile_dir="$out/prof" --steps=1
      run 60 python3 benchmarks/trace_summary.py "$out/prof" --top=45
      keep_trace "$out/prof" "$out/trace.json.gz"
      rm -rf "$out/prof" ;;
    mlp5632)  # the unpadded step with the FFN width rounded to a multiple of 128 (5634 = 2 * 2817 is not)
      step 1b_b8_none_cudnn_mlp5632 170 "${one_b[@]}" --config.train.batch_size=8 --config.model.remat_policy=none \
        --config.model.attention_impl=$attn --config.model.mlp_dim=5632 --config.model.mlp_pad_to=0 ;;
    train1b_xla)  # the same step with the reference attention, for the backend's share
      step 1b_b8_full_xla 170 "${one_b[@]}" --config.train.batch_size=8 --config.model.remat_policy=full \
        --config.model.attention_impl=xla ;;
    train8b)
      step 8b_b2_full_cudnn 240 "${eight_b[@]}" --config.train.batch_size=2 --config.model.remat_policy=full \
        --config.model.attention_impl=$attn
      step 8b_b2_dots_cudnn 150 "${eight_b[@]}" --config.train.batch_size=2 \
        --config.model.remat_policy=dots_no_batch --config.model.attention_impl=$attn ;;
    generate)  # the issue's rows: every mode at batch 1, plain and dual cache at batch 8 (layers scanned);
      # the two headline rows traced once more, summarised, their traces kept
      gen generate 210 --rows=plain:1,threshold:1,prefix:1,dual:1,plain:8,dual:8 \
        --profile_dir="$out/genprof" --profile_rows=plain:1,dual:1
      for row in plain_b1 dual_b1; do
        echo "== profile of $row"
        run 60 python3 benchmarks/trace_summary.py "$out/genprof/$row" --top=25
        keep_trace "$out/genprof/$row" "$out/generate_$row.trace.json.gz"
      done
      rm -rf "$out/genprof" ;;
    generate_unrolled)  # the same shape with the layers unrolled, as serving.load runs them off CPU
      gen generate_unrolled 200 --rows=plain:1,prefix:1,dual:1 --config.model.scan_layers=False ;;
    *) echo "unknown part $1" >&2; failed=$((failed + 1)) ;;
  esac
}

for p in $parts; do
  # `part` runs in this shell (its failure count must survive); tee gets its output through a FIFO.
  exec 3> >(tee "$out/$p.log")
  tee_pid=$!
  part "$p" >&3 2>&1
  exec 3>&-
  wait "$tee_pid"
done
echo "== gpu_suite: $failed failed"
exit "$failed"
