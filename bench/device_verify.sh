#!/usr/bin/env bash
# A short recorded run: GPU tests, the main table row pair, issue 4's benchmark, issue 5's calls.
# usage: ULD_COMMIT=<hash> bash bench/device_verify.sh
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
python3 -m pytest tests/test_gpu.py -q -p no:warnings -p no:cacheprovider --timeout 120 2>&1 | tee "$OUT/tests.txt" | tail -4
python3 bench/bench_uld.py --out "$OUT/table" --impls uld_kernels reference --rows 16384 --warmup 3 --rep 10 \
  --reference-kinds random --pairs qwen_llama3 2>&1 | tee "$OUT/bench.txt" | grep -E "^\| |copy"
python3 bench/bench_distill.py --skip-reference 2>&1 | tee "$OUT/distill.txt" | grep "^|"
timeout 45 python3 bench/stress.py --skip-large 2>&1 | tee "$OUT/stress.txt" | tail -3
