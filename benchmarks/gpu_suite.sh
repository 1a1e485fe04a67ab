#!/usr/bin/env bash
# The device suite: everything this project needs to check and measure on a lent GPU machine, in one command
# sized for its slot (<= 8 minutes, <= 8 result files, no network: the machine's own python3 and torch, no
# venv, no pip).
#
#   benchmarks/gpu_suite.sh [--dry-run] [RESULTS_DIR]      (default RESULTS_DIR: $OUT when set, else ./results/gpu)
#
# Steps, in order, each time-boxed (a failing or cut step is recorded and the next one runs):
#   build            setup.py build_ext --inplace, CUDA required, sm_90 only (TORCH_CUDA_ARCH_LIST overrides)
#   backend_info     what was built and what each op runs
#   lowrank_tests    `cuda` tests of lowrank_project (+ edge cases: n 54/55/64, B 0 and 200000, zeros, dtypes,
#                    side stream, TF32 on) and of its warm start (the CUDA kernel against its Python spec and
#                    the full solve over trajectories, fallbacks, n = 1536, RankPruner on a CUDA model)
#   racecheck        compute-sanitizer racecheck of the Jacobi kernel (benchmarks/sanitize_jacobi.py)
#   conv_tests       `cuda` tests of the fused convs, modules and decomposition with one tile config per shape
#                    (inductor, channels_last, autocast included)
#   lowrank_table    the TRP trajectory first (RankPruner.step() warm vs the full solve vs the per-layer SVD loop,
#                    ResNet-56 channel, ResNet-50 channel and spatial), then projection vs per-layer SVD loop vs
#                    batched SVD, Jacobi vs cuSOLVER (ResNet-56, ResNet-50); one JSON
#   pruner_overhead  TRP step overhead at periods 1/5/20, fp32 and bf16 autocast (ResNet-20/56, ResNet-50)
#   conv_layers      fused vs two cuDNN convs vs dense per layer, fp16/fp32, batch 1/32/128
#   conv_e2e         decomposed vs dense networks end to end (auto's per-shape choices included)
# Every table writes its JSON after each row, so a step cut by its time box keeps what it measured.
# Result files (8): suite.json (steps, GPU, backend info, test counts and failures), build.log, tests.log,
# lowrank_project_cuda.json, pruner_overhead_cuda.json, conv_layers_cuda.json, conv_e2e_cuda.json, sanitizer.log.
#
# --dry-run (any machine, CPU only): the same script and steps, but no build (the extension must already be
# built), pytest steps only collect (their selections must find tests), the sanitizer workload and the
# tables run once on the CPU in their --smoke sizes. tests/test_gpu_suite.py runs it, so CI catches a broken
# suite before a GPU slot is spent on it.
set -u
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
RES="${1:-${OUT:-results/gpu}}"
mkdir -p "$RES"
RES="$(cd "$RES" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="${MAX_JOBS:-16}"
export TRP_TRITON_AUTOTUNE="${TRP_TRITON_AUTOTUNE:-quick}"
BUDGET="${SUITE_BUDGET_S:-470}"
T0=$SECONDS
: > "$WORK/steps.jsonl"

# step NAME LIMIT LOG CMD...: run CMD with at most min(LIMIT, time left - 5) seconds, output appended to LOG
step() {
  local name=$1 limit=$2 log=$3; shift 3
  local left=$(( BUDGET - (SECONDS - T0) - 5 ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "{\"step\":\"$name\",\"rc\":null,\"skipped\":\"no time left\"}" >> "$WORK/steps.jsonl"
    return
  fi
  local t=$SECONDS
  echo "== $name (limit ${limit}s)" | tee -a "$log"
  timeout --kill-after=5 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "{\"step\":\"$name\",\"rc\":$rc,\"seconds\":$((SECONDS - t)),\"limit\":$limit}" >> "$WORK/steps.jsonl"
  tail -2 "$log"
}

# pytest NAME LIMIT ARGS...: a test step with a JUnit file for the summary; a dry run only collects
pytest_step() {
  local name=$1 limit=$2; shift 2
  local mode=()
  [ $DRY = 1 ] && mode=(--collect-only)
  step "$name" "$limit" "$RES/tests.log" "$PY" -m pytest -q -p no:cacheprovider "${mode[@]}" \
    --junitxml="$WORK/$name.xml" "$@"
}

if [ $DRY = 1 ]; then
  DEV=cpu; SMOKE=(--smoke)
  echo "dry run: no GPU steps, tables in smoke sizes on the CPU" > "$RES/build.log"
else
  DEV=cuda; SMOKE=()
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$WORK/gpu.txt" 2>&1
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" TRP_KERNELS_CUDA=1 \
    step build 150 "$RES/build.log" "$PY" setup.py build_ext --inplace
fi
step backend_info 30 "$WORK/backend_info.log" "$PY" -c \
  "import json, trp_kernels; print(json.dumps(trp_kernels.backend_info()))"

pytest_step lowrank_tests 90 -m cuda tests/test_lowrank_project.py tests/test_lowrank_project_cuda.py \
  tests/test_warm_projection.py
if [ $DRY = 1 ]; then
  step racecheck 30 "$RES/sanitizer.log" "$PY" benchmarks/sanitize_jacobi.py --device cpu
else
  step racecheck 45 "$RES/sanitizer.log" compute-sanitizer --tool racecheck --racecheck-report hazard \
    --error-exitcode 3 "$PY" benchmarks/sanitize_jacobi.py --device cuda
fi
TRP_TRITON_AUTOTUNE=off pytest_step conv_tests 90 -m cuda tests/test_factorized_conv.py tests/test_modules.py \
  tests/test_decompose.py

step lowrank_table 75 "$RES/tables.log" "$PY" benchmarks/lowrank_table.py --device $DEV --repeats-scale 0.6 \
  --part trajectory static --budget-s 60 --out "$RES/lowrank_project_$DEV.json" "${SMOKE[@]}"
step pruner_overhead 50 "$RES/tables.log" "$PY" benchmarks/pruner_overhead_table.py --device $DEV \
  --models resnet20 resnet56 torchvision:resnet50 --amp off bf16 --rounds 6 --budget 5 --total-budget 35 \
  --out "$RES/pruner_overhead_$DEV.json" "${SMOKE[@]}"
step conv_layers 55 "$RES/tables.log" "$PY" benchmarks/conv_table.py --device $DEV --part layers \
  --nets resnet20 resnet50 --batches 1 32 128 --dtypes float16 float32 --iters 10 --budget-s 40 --out "$RES"
step conv_e2e 55 "$RES/tables.log" "$PY" benchmarks/conv_table.py --device $DEV --part e2e \
  --nets resnet20 resnet56 resnet50 --batches 1 32 128 --dtypes float16 float32 --repeats 15 --budget-s 40 \
  --out "$RES" "${SMOKE[@]}"

# the table logs are progress lines (every row is in the JSON): keep their tails in tests.log, not a 9th file
{ echo "== tables.log (tail)"; tail -40 "$RES/tables.log"; } >> "$RES/tests.log" 2>/dev/null
rm -f "$RES/tables.log"
"$PY" benchmarks/gpu_suite_summary.py --work "$WORK" --out "$RES/suite.json" --seconds $((SECONDS - T0)) \
  --dry-run $DRY
