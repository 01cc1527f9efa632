#!/usr/bin/env bash
# One call on a GPU machine: install, GPU tests, demo, benchmarks; a short table last.
#   device run: bash scripts/gpu_check.sh [tests|bench|ncu|all] [quick|full]   (carry .whl for expecttest)
# Two calls fit the 10-minute limit better than one: "tests" (GPU tests, demo, ISA), then "bench".
set -uo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-all}
MODE=${2:-quick}
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
# The device's throwaway copy: map the top-level parts into the package the way the installed
# package-dir mapping does (an editable install there cannot build without network access).
for part in lowering templates cuda; do [ -e "inductor_moe/$part" ] || ln -s "../$part" "inductor_moe/$part"; done
export INDUCTOR_MOE_COMMIT=${INDUCTOR_MOE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
python3 - <<'PY'
import torch, triton
print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
PY
echo "commit: $INDUCTOR_MOE_COMMIT"

if [ "$WHAT" = ncu ]; then  # stall reasons of the FP4 decode kernels (benchmarks/profile_fp4.py)
  ncu --profile-from-start off --clock-control none --kernel-name regex:"moe_mega|moe_gemm|block_scaled_gemm|fp4_gemv|matmul_ogs" \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis --section SourceCounters \
    -f -o "$OUT/fp4" python3 -m benchmarks.profile_fp4 ${NCU_ARGS:-} 2>&1 | tail -20
  ncu --import "$OUT/fp4.ncu-rep" --page details --csv > "$OUT/fp4_details.csv"
  ncu --import "$OUT/fp4.ncu-rep" --page source --csv --print-source sass > "$OUT/fp4_source.csv" 2>&1
  ncu --import "$OUT/fp4.ncu-rep" --page raw --csv > "$OUT/fp4_raw.csv"
  python3 -m benchmarks.ncu_summary "$OUT/fp4_details.csv" "$OUT/fp4_raw.csv"
  exit 0
fi
status=()
if [ "$WHAT" != bench ]; then
python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
status+=("gpu tests: $(tail -1 "$OUT/gpu_tests.log")")
python3 -m examples.demo 2>&1 | tee "$OUT/demo.log" | tail -12
status+=("demo: $(grep 'relative error' "$OUT/demo.log")")
python3 -m inductor_moe.isa 2>&1 | tee "$OUT/isa.log" | tail -20
fi
[ "$WHAT" = tests ] && { echo; echo "==== summary"; printf '%s\n' "${status[@]}"; exit 0; }
if [ "$MODE" = full ]; then BENCH_ARGS=""; else BENCH_ARGS="--quick"; fi
python3 -m benchmarks.moe $BENCH_ARGS 2>&1 | tee "$OUT/bench_moe.log" | tail -60
[ -f benchmarks/fp4_gemm.py ] && python3 -m benchmarks.fp4_gemm $BENCH_ARGS 2>&1 | tee "$OUT/bench_fp4.log" | tail -30
echo; echo "==== summary"; printf '%s\n' "${status[@]}"
