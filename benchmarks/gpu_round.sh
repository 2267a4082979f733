#!/usr/bin/env bash
# One device call: install, GPU kernel tests, then the benchmark within a time budget.
# usage: bash benchmarks/gpu_round.sh <bench budget s> [bench args...]
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
budget=$1; shift
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 || echo "pip install failed"
[ -n "${DIAG:-}" ] && timeout 120 python3 benchmarks/diag_kernels.py 2>&1 | tail -20
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest tests/kernels -q -n 8 -p no:cacheprovider -rf --tb=line > "$OUT/tests.log" 2>&1; grep -E "^(FAILED|E )|passed|failed" "$OUT/tests.log" | cut -c1-300 | tail -30
python3 benchmarks/bench_kernels.py --budget-s "$budget" --out "$OUT/kernels.jsonl" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^  !" ; grep "^  !" "$OUT/bench.log" | head -20
