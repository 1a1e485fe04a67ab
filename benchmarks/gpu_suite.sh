#!/usr/bin/env bash
# One-shot GPU check for the fused factorized convolutions, sized for a 5-minute device slot:
#   build (make build) -> `cuda` tests of tests/test_factorized_conv.py -> per-layer table -> end-to-end table.
# Usage: benchmarks/gpu_suite.sh [RESULTS_DIR]     (default: $OUT when set, else ./results)
# Writes RESULTS_DIR/{suite.json, gpu.txt, backend_info.json, cuda_tests.xml/.log, conv_layers_cuda.json, conv_e2e_cuda.json,
# conv_layers.log, conv_e2e.log}. Each step is time-boxed; a failing step is recorded and the next one runs.
# TRP_TRITON_AUTOTUNE=quick (3 tile configs per kernel) keeps autotuning inside the slot; set
# TRP_TRITON_AUTOTUNE=full and SUITE_BUDGET_S=900 for the complete search.
set -u
cd "$(dirname "$0")/.."
RES="${1:-${OUT:-results}}"
mkdir -p "$RES"
BUDGET="${SUITE_BUDGET_S:-290}"
export TRP_TRITON_AUTOTUNE="${TRP_TRITON_AUTOTUNE:-quick}"
export MAX_JOBS="${MAX_JOBS:-16}"
T0=$SECONDS
left() { echo $(( BUDGET - (SECONDS - T0) )); }
STEPS=()
step() {  # step NAME TIMEOUT CMD... : run with a time box, record rc and seconds
  local name=$1 limit=$2; shift 2
  if [ "$limit" -le 5 ]; then STEPS+=("{\"step\":\"$name\",\"rc\":null,\"skipped\":\"no time left\"}"); return; fi
  local t=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=5 "$limit" "$@"
  local rc=$?
  STEPS+=("{\"step\":\"$name\",\"rc\":$rc,\"seconds\":$((SECONDS - t)),\"limit\":$limit}")
  return $rc
}

if [ -z "${SKIP_BUILD:-}" ]; then step build 170 make build; fi
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$RES/gpu.txt" 2>&1
step backend_info 20 "$PY" -c "import json, trp_kernels; print(json.dumps(trp_kernels.backend_info(), indent=1))" \
  > "$RES/backend_info.json"
L=$(left); step cuda_tests $(( L < 70 ? L - 40 : 70 )) "$PY" -m pytest -q -m cuda tests/test_factorized_conv.py \
  -p no:cacheprovider --junitxml="$RES/cuda_tests.xml" > "$RES/cuda_tests.log" 2>&1
tail -3 "$RES/cuda_tests.log"
L=$(left); LB=$(( (L - 20) * 11 / 20 ))
step conv_layers $(( LB + 25 )) "$PY" benchmarks/conv_table.py --part layers --nets resnet20 resnet50 \
  --batches 1 32 128 --dtypes float16 float32 --iters 10 --budget-s "$LB" --out "$RES" > "$RES/conv_layers.log" 2>&1
L=$(left)
step conv_e2e $(( L - 10 )) "$PY" benchmarks/conv_table.py --part e2e --nets resnet20 resnet56 resnet50 \
  --batches 1 32 128 --dtypes float16 float32 --repeats 15 --budget-s $(( L - 40 )) --out "$RES" \
  > "$RES/conv_e2e.log" 2>&1
{
  echo "{\"date_utc\":\"$(date -u +%FT%TZ)\",\"seconds\":$((SECONDS - T0)),\"autotune\":\"$TRP_TRITON_AUTOTUNE\","
  echo "\"gpu\":\"$(head -1 "$RES/gpu.txt" | tr -d '"\\')\",\"steps\":["
  (IFS=,; echo "${STEPS[*]}")
  echo "]}"
} > "$RES/suite.json"
cat "$RES/suite.json"
