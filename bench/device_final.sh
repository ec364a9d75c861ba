#!/usr/bin/env bash
# The recorded run: GPU tests, then the benchmark table (bench/RESULTS.md), logs under $OUT.
# usage (from the device tool): ULD_COMMIT=<short hash of the tree sent> bash bench/device_final.sh
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv | tee "$OUT/facts.txt"
python3 -m pytest tests/test_gpu.py tests/test_kernels.py -q -p no:warnings -p no:cacheprovider \
  --timeout 240 2>&1 | tee "$OUT/tests.txt" | tail -15
python3 bench/bench_uld.py --out "$OUT/table" --impls uld_kernels reference --warmup 10 --rep 20 \
  --reference-kinds random --pairs qwen_llama3 llama2_gemma llama3_llama3 qwen_qwen 2>&1 \
  | tee "$OUT/bench.txt" | grep -E "^\| |copy|out of memory"
python3 bench/bench_uld.py --out "$OUT/compiled" --impls reference_compiled --rows 2048 \
  --pairs qwen_llama3 --kinds random --warmup 5 --rep 10 2>&1 | tee "$OUT/bench_compiled.txt" | grep -E "^\| "
