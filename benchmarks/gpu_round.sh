#!/usr/bin/env bash
# One device call: install, the GPU tests (the kernel tests and every test marked gpu; their summary:
# benchmarks/results/gpu_tests/), then the kernel benchmark within a time budget.
# usage: [COMMIT=<sha>] [TEST_TIMEOUT=s] bash benchmarks/gpu_round.sh <bench budget s> [bench args...]
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
budget=$1; shift
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 || echo "pip install failed"
[ -n "${DIAG:-}" ] && timeout 120 python3 benchmarks/diag_kernels.py 2>&1 | tail -20
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
MACHINE="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) x $(nvidia-smi -L | wc -l)"
# Two runs, each with its summary: every kernel test (on CUDA here; about 450 s at -n 12 on an H200), then the
# tests marked gpu elsewhere.
gpu_tests() {  # <log name> <pytest args...>
    local log="$OUT/$1.log"; shift
    timeout ${TEST_TIMEOUT:-560} python3 -m pytest "$@" -v -n 12 -p no:cacheprovider -rf --tb=line > "$log" 2>&1
    local rc=$?
    grep -E "^(FAILED|ERROR|E )|passed|failed" "$log" | grep -v "PASSED" | cut -c1-300 | tail -20
    # The summary (date, commit, counts) goes to benchmarks/results/gpu_tests/ and, so that it comes back from
    # the device, to $OUT/gpu_tests/: copy it into the repository's benchmarks/results/gpu_tests/ (COMMIT=<sha>
    # names the commit tested where the machine has no git checkout).
    python3 benchmarks/gpu_tests_summary.py "$log" --exit-code "$rc" ${COMMIT:+--commit "$COMMIT"} \
        --command "python3 -m pytest $* -v -n 12 (timeout ${TEST_TIMEOUT:-560} s)" --machine "$MACHINE" \
        --copy-to "$OUT/gpu_tests"
}
gpu_tests tests_kernels tests/kernels
gpu_tests tests_marked -m gpu tests/inference/test_static_decode.py tests/test_losses.py tests/test_fused_ops.py
python3 benchmarks/bench_kernels.py --budget-s "$budget" --out "$OUT/kernels.jsonl" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^  !" ; grep "^  !" "$OUT/bench.log" | head -20
