#!/usr/bin/env bash
# The GPU measurements behind BENCHMARKS.md's H200 tables, in the order they were run.
#
#   bash benchmarks/gpu_suite.sh OUTDIR [PART...]     PART: ceilings attention train1b profile1b
#                                                  mlp5632 train1b_xla train8b generate
#
# Each command runs under `timeout` (a hung or out-of-memory run costs its slot, not the rest); its output
# goes to OUTDIR/PART.log and each train-step row to OUTDIR/<name>.json. ROWS=REGEX runs only the
# train-step rows whose name matches. Needs llada_jax importable
# (`pip install -e .`, or PYTHONPATH=<repo root>) on a machine with one NVIDIA GPU.
set -u
out=${1:?usage: gpu_suite.sh OUTDIR [PART...]}; shift
parts=${*:-ceilings attention train1b train8b generate}
mkdir -p "$out"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.95}  # JAX takes 75% by default
export PYTHONUNBUFFERED=1

step() {  # step NAME TIMEOUT_S CONFIG_ARGS...: one train_step.py row (skipped unless NAME matches $ROWS)
  local name=$1 limit=$2; shift 2
  [[ $name =~ ${ROWS:-.} ]] || return 0
  echo "== $name: $*"
  timeout "$limit" python3 benchmarks/train_step.py --steps=3 --warmup=1 --json="$out/$name.json" "$@" 2>&1 \
    | grep -vE "^(WARNING|I0000|W0000)" | tail -12
  echo "== $name: exit ${PIPESTATUS[0]}"
}

one_b=(--config=configs/default.py:llada_1b --config.train.seq_len=4096 --config.model.loss_chunk_size=1024)
eight_b=(--config=configs/default.py:llada_8b --config.train.seq_len=4096 --config.model.loss_chunk_size=1024
         --config.model.param_dtype=bfloat16 --config.optim.mu_dtype=bfloat16)

for part in $parts; do
  case $part in
    ceilings) timeout 120 python3 benchmarks/ceilings.py ;;
    attention)  # the llada_1b (GQA, head 64) and llada_8b (MHA, head 128) attention shapes at seq 4096
      timeout 120 python3 benchmarks/attention.py --batch=8 --seq=4096 --heads=32 --kv_heads=4 --head_dim=64
      timeout 120 python3 benchmarks/attention.py --batch=2 --seq=4096 --heads=32 --kv_heads=32 --head_dim=128 ;;
    train1b)  # the preset runs the SwiGLU zero-padded to 5760 wide (model.mlp_pad_to=128); _nopad: 5634
      step 1b_b8_none_cudnn 170 "${one_b[@]}" --config.train.batch_size=8 --config.model.remat_policy=none \
        --config.model.attention_impl=cudnn
      step 1b_b8_none_cudnn_nopad 170 "${one_b[@]}" --config.train.batch_size=8 --config.model.remat_policy=none \
        --config.model.attention_impl=cudnn --config.model.mlp_pad_to=0
      XLA_FLAGS=--xla_gpu_enable_triton_gemm=false step 1b_b8_none_cudnn_cublas 170 "${one_b[@]}" \
        --config.train.batch_size=8 --config.model.remat_policy=none --config.model.attention_impl=cudnn
      step 1b_b16_dots_cudnn 170 "${one_b[@]}" --config.train.batch_size=16 \
        --config.model.remat_policy=dots_no_batch --config.model.attention_impl=cudnn
      step 1b_b16_full_cudnn 170 "${one_b[@]}" --config.train.batch_size=16 --config.model.remat_policy=full \
        --config.model.attention_impl=cudnn ;;
    profile1b)  # one profiled llada_1b step: the kernel-time breakdown behind the gap to the matmul rate
      step 1b_b8_none_cudnn_profiled 170 "${one_b[@]}" --config.train.batch_size=8 --config.model.remat_policy=none \
        --config.model.attention_impl=cudnn --config.model.mlp_pad_to=0 --profile_dir="$out/prof" --steps=1
      python3 benchmarks/trace_summary.py "$out/prof" --top=45
      cp "$(ls -t "$out"/prof/plugins/profile/*/perfetto_trace.json.gz | head -1)" "$out/trace.json.gz"
      rm -rf "$out/prof" ;;
    mlp5632)  # the unpadded step with the FFN width rounded to a multiple of 128 (5634 = 2 * 2817 is not)
      step 1b_b8_none_cudnn_mlp5632 170 "${one_b[@]}" --config.train.batch_size=8 --config.model.remat_policy=none \
        --config.model.attention_impl=cudnn --config.model.mlp_dim=5632 --config.model.mlp_pad_to=0 ;;
    train1b_xla)  # the same step with the reference attention, for the backend's share
      step 1b_b8_full_xla 170 "${one_b[@]}" --config.train.batch_size=8 --config.model.remat_policy=full \
        --config.model.attention_impl=xla ;;
    train8b)
      step 8b_b2_full_cudnn 240 "${eight_b[@]}" --config.train.batch_size=2 --config.model.remat_policy=full \
        --config.model.attention_impl=cudnn
      step 8b_b2_dots_cudnn 240 "${eight_b[@]}" --config.train.batch_size=2 \
        --config.model.remat_policy=dots_no_batch --config.model.attention_impl=cudnn ;;
    generate)  # the sampling issue's target shape, layers scanned (the default) and unrolled
      for scan in True False; do
        timeout 200 python3 benchmarks/generate.py --config=configs/default.py:llada_8b --bf16_params \
          --gen_lengths=256 --batch_sizes=1 --prompt_length=64 --block_length=32 --repeats=2 \
          --modes=plain,prefix,dual --config.model.scan_layers=$scan
      done ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac 2>&1 | tee "$out/$part.log"
done
