#!/usr/bin/env bash
# One call on the GPU machine: facts, tests, benchmark; logs under $OUT.
# usage: bash bench/device_run.sh [tests|bench|all] [extra bench args...]
set -u
what=${1:-all}; shift || true
OUT=${OUT:-bench/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
  python3 -c 'import torch, triton, numpy; print("torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__)'
  git log --oneline -1 2>/dev/null; } 2>&1 | tee "$OUT/facts.txt"
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest tests/test_gpu.py tests/test_kernels.py -q -p no:warnings -p no:cacheprovider \
    --timeout 300 2>&1 | tee "$OUT/tests.txt" | tail -40
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 bench/bench_uld.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.txt" | tail -60
fi
