#!/usr/bin/env bash
# The device suite: everything this project needs to check and measure on a lent GPU machine, in one command
# sized for its slot (<= 8 minutes, <= 8 result files, no network: the machine's own python3 and torch, no
# venv, no pip).
#
#   benchmarks/gpu_suite.sh [--dry-run] [RESULTS_DIR]      (default RESULTS_DIR: $OUT when set, else ./results/gpu)
#   benchmarks/gpu_suite.sh --limits                       (each step's time limit and the budget; tests read it)
#
# Steps, in order of value, each time-boxed (a failing or cut step is recorded and the next one runs); their
# limits (LIMIT below) add up to at most the budget, so none is cut for lack of time (tests/test_gpu_suite.py):
#   preflight        every module the suite imports, the GPU and the CUDA toolkit, in seconds: stops the suite
#   build            setup.py build_ext --inplace, CUDA required, sm_90 only (TORCH_CUDA_ARCH_LIST overrides)
#   build_checks     the built kernels' launch bounds against their registers, no FMA (tests/test_cuda_build.py)
#   self_checks      every custom kernel's first-use check against the float64 reference, as errors
#                    (benchmarks/gpu_self_checks.py), and backend_info: what was built and what each op runs
#   lowrank_tests    `cuda` tests of lowrank_project (+ edge cases: n 54/55/64, B 0 and 200000, zeros, dtypes,
#                    side stream, TF32 on, cuBLASLt, the Jacobi kernel bit for bit equal to the CPU) and of its warm
#                    start (the CUDA kernel against its Python spec and the full solve over trajectories, fallbacks,
#                    n = 1536, RankPruner on a CUDA model, syncs per step)
#   racecheck        compute-sanitizer racecheck of the Jacobi kernel (benchmarks/sanitize_jacobi.py)
#   lowrank_table    the TRP trajectory first (RankPruner.step() warm vs the full solve vs the per-layer SVD loop,
#                    ResNet-56 channel, ResNet-50 channel and spatial), then projection vs per-layer SVD loop vs
#                    batched SVD, Jacobi vs cuSOLVER (ResNet-56, ResNet-50); one JSON
#   pruner_overhead  TRP step overhead at periods 1/5/20, fp32 and bf16 autocast (ResNet-20/56, ResNet-50)
#   conv_tests       `cuda` tests of the fused convs (network decoupling's too), modules and decomposition with one
#                    tile config per shape (inductor, channels_last, autocast included)
#   conv_layers      fused vs two cuDNN convs vs dense per layer, fp16/fp32, batch 1/32/128
#   conv_e2e         decomposed vs dense networks end to end (auto's per-shape choices included)
# Every table writes its JSON after each row, so a step cut by its time box keeps what it measured. Failed
# self-checks are errors here (TRP_KERNELS_SELF_CHECK_FAILURE=error), not fallbacks.
# Result files (8): suite.json (steps, GPU, backend info, test counts and failures), build.log, tests.log,
# lowrank_project_cuda.json, pruner_overhead_cuda.json, conv_layers_cuda.json, conv_e2e_cuda.json, sanitizer.log.
#
# --dry-run (any machine, CPU only): the same script and steps, but no build (the extension must already be
# built), pytest steps only collect (their selections must find tests), the self-checks run the C++ CPU kernels,
# the sanitizer workload and the tables run once on the CPU in their --smoke sizes. tests/test_gpu_suite.py runs
# it, so CI catches a broken suite before a GPU slot is spent on it.
set -u
cd "$(dirname "$0")/.."
BUDGET="${SUITE_BUDGET_S:-470}"
# Each step's limit in seconds, in the order the steps run; the sum stays within BUDGET (a test checks it).
STEPS=(preflight build build_checks self_checks lowrank_tests racecheck lowrank_table pruner_overhead conv_tests
       conv_layers conv_e2e)
declare -A LIMIT=([preflight]=10 [build]=130 [build_checks]=15 [self_checks]=35 [lowrank_tests]=65
                  [racecheck]=20 [lowrank_table]=45 [pruner_overhead]=25 [conv_tests]=65 [conv_layers]=30
                  [conv_e2e]=20)
if [ "${1:-}" = "--limits" ]; then
  for name in "${STEPS[@]}"; do echo "$name ${LIMIT[$name]}"; done
  echo "budget $BUDGET"
  exit 0
fi
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
export TRP_KERNELS_SELF_CHECK_FAILURE=error
T0=$SECONDS
: > "$WORK/steps.jsonl"
LOWRANK_TESTS=(tests/test_lowrank_project.py tests/test_lowrank_project_cuda.py tests/test_warm_projection.py
               tests/test_tf32_guard.py)
CONV_TESTS=(tests/test_factorized_conv.py tests/test_decoupled_conv.py tests/test_depthwise_decoupled_conv.py
            tests/test_modules.py tests/test_decompose.py)
BUILD_TESTS=(tests/test_cuda_build.py)
SCRIPTS=(benchmarks/gpu_self_checks.py benchmarks/sanitize_jacobi.py benchmarks/lowrank_table.py
         benchmarks/pruner_overhead_table.py benchmarks/conv_table.py benchmarks/gpu_suite_summary.py setup.py)

# step NAME LOG CMD...: run CMD with at most min(LIMIT[NAME], time left - 5) seconds, output appended to LOG;
# its exit status in LAST_RC. A dry run has DRY_SCALE times the limits and the budget: its smoke sizes run on a
# CPU (2 cores in CI), which is slower than the GPU steps it stands in for.
step() {
  local name=$1 log=$2; shift 2
  local limit=$(( ${LIMIT[$name]} * SCALE ))
  local left=$(( BUDGET - (SECONDS - T0) - 5 ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "{\"step\":\"$name\",\"rc\":null,\"skipped\":\"no time left\"}" >> "$WORK/steps.jsonl"
    LAST_RC=124
    return
  fi
  local t=$SECONDS
  echo "== $name (limit ${limit}s)" | tee -a "$log"
  timeout --kill-after=5 "$limit" "$@" >> "$log" 2>&1
  LAST_RC=$?
  echo "{\"step\":\"$name\",\"rc\":$LAST_RC,\"seconds\":$((SECONDS - t)),\"limit\":$limit}" >> "$WORK/steps.jsonl"
  tail -2 "$log"
}

# pytest_step NAME ARGS...: a test step with a JUnit file for the summary; a dry run only collects
pytest_step() {
  local name=$1; shift
  local mode=()
  [ $DRY = 1 ] && mode=(--collect-only)
  step "$name" "$RES/tests.log" "$PY" -m pytest -q -p no:cacheprovider "${mode[@]}" \
    --junitxml="$WORK/$name.xml" "$@"
}

summary() {
  # the table logs are progress lines (every row is in the JSON): keep their tails in tests.log, not a 9th file
  if [ -f "$RES/tables.log" ]; then
    { echo "== tables.log (tail)"; tail -40 "$RES/tables.log"; } >> "$RES/tests.log"
    rm -f "$RES/tables.log"
  fi
  "$PY" benchmarks/gpu_suite_summary.py --work "$WORK" --out "$RES/suite.json" --seconds $((SECONDS - T0)) \
    --dry-run $DRY
}

DRY_SCALE=3
SCALE=1
if [ $DRY = 1 ]; then
  SCALE=$DRY_SCALE; BUDGET=$(( BUDGET * DRY_SCALE ))
  DEV=cpu; SMOKE=(--smoke); PREFLIGHT=(--dry-run)
  echo "dry run: no GPU steps, tables in smoke sizes on the CPU" > "$RES/build.log"
else
  DEV=cuda; SMOKE=(); PREFLIGHT=()
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$WORK/gpu.txt" 2>&1
fi
step preflight "$RES/build.log" "$PY" benchmarks/gpu_suite_preflight.py "${PREFLIGHT[@]}" "${LOWRANK_TESTS[@]}" \
  "${CONV_TESTS[@]}" "${BUILD_TESTS[@]}" "${SCRIPTS[@]}"
if [ $LAST_RC != 0 ]; then  # a missing module or GPU: nothing below could run
  summary
  exit 1
fi
if [ $DRY = 0 ]; then
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" TRP_KERNELS_CUDA=1 \
    step build "$RES/build.log" "$PY" setup.py build_ext --inplace
fi
pytest_step build_checks "${BUILD_TESTS[@]}"
step self_checks "$WORK/backend_info.log" "$PY" benchmarks/gpu_self_checks.py --device $DEV

pytest_step lowrank_tests -m cuda "${LOWRANK_TESTS[@]}"
if [ $DRY = 1 ]; then
  step racecheck "$RES/sanitizer.log" "$PY" benchmarks/sanitize_jacobi.py --device cpu
else
  step racecheck "$RES/sanitizer.log" compute-sanitizer --tool racecheck --racecheck-report hazard \
    --error-exitcode 3 "$PY" benchmarks/sanitize_jacobi.py --device cuda
fi
step lowrank_table "$RES/tables.log" "$PY" benchmarks/lowrank_table.py --device $DEV --repeats-scale 0.6 \
  --part trajectory static --budget-s 38 --out "$RES/lowrank_project_$DEV.json" "${SMOKE[@]}"
step pruner_overhead "$RES/tables.log" "$PY" benchmarks/pruner_overhead_table.py --device $DEV \
  --models resnet20 resnet56 torchvision:resnet50 --amp off bf16 --rounds 6 --budget 3 --total-budget 18 \
  --out "$RES/pruner_overhead_$DEV.json" "${SMOKE[@]}"

TRP_TRITON_AUTOTUNE=off pytest_step conv_tests -m cuda "${CONV_TESTS[@]}"
step conv_layers "$RES/tables.log" "$PY" benchmarks/conv_table.py --device $DEV --part layers \
  --nets resnet20 resnet50 --batches 1 32 128 --dtypes float16 float32 --iters 10 --budget-s 23 --out "$RES"
step conv_e2e "$RES/tables.log" "$PY" benchmarks/conv_table.py --device $DEV --part e2e \
  --nets resnet20 resnet56 resnet50 --batches 1 32 128 --dtypes float16 float32 --repeats 15 --budget-s 14 \
  --out "$RES" "${SMOKE[@]}"
summary
