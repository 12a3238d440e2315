#!/usr/bin/env bash
# One-shot GPU check for the fused ops (run on a machine with a CUDA device; < 5 minutes):
#   1. the kernel + ops tests with the REAL Triton kernels (TRITON_INTERPRET=0, CUDA tensors);
#   2. the kernel benchmarks (naive vs chunked torch vs Triton, time + peak memory);
#   3. a Markdown table of the results.
# Everything is written to $OUT when set (else bench/results/); exits non-zero if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch" | tee "$OUT_DIR/gpu_check.log"
    exit 2
fi
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
export TRITON_INTERPRET=0
status=0

echo "== kernel tests (real Triton, no interpreter)"
timeout 180 python -m pytest tests/kernels tests/ops -q -p no:cacheprovider \
    --junitxml="$OUT_DIR/gpu_kernel_tests.xml" 2>&1 | tee "$OUT_DIR/gpu_kernel_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== kernel benchmarks"
LATENTR3_BENCH_RESULTS="$OUT_DIR" timeout 150 python -m pytest bench/test_bench_ops.py \
    --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT_DIR/pytest_benchmark_cuda.json" 2>&1 | tee "$OUT_DIR/gpu_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

python bench/to_markdown.py "$OUT_DIR" | tee "$OUT_DIR/gpu_bench.md"
echo "gpu_check: exit status $status (results in $OUT_DIR)"
exit $status
