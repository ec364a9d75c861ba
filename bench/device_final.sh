#!/usr/bin/env bash
# The recorded run: GPU tests, the benchmark table (bench/RESULTS.md), the per-pass profile,
# issue 5's largest shape with 200 varied calls, issue 4's benchmark; logs under $OUT.
# usage (from the device tool): ULD_COMMIT=<short hash of the tree sent> bash bench/device_final.sh
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv > "$OUT/facts.txt"
timeout 280 python3 -m pytest tests/test_gpu.py tests/test_kernels.py -q -p no:warnings -p no:cacheprovider --timeout 200 2>&1 | tail -4 | tee "$OUT/tests.txt"
timeout 200 python3 bench/bench_uld.py --out "$OUT/table" --impls uld_kernels reference --rows 16384 --warmup 3 --rep 10 \
  --reference-kinds random --pairs qwen_llama3 qwen_qwen llama2_gemma 2>&1 | tee "$OUT/bench.txt" | grep -E "^\| |copy"
timeout 60 python3 bench/profile_passes.py --rows 16384 --pairs qwen_llama3 --kinds random peaked 2>&1 | grep -v -i warn > "$OUT/passes.txt"
cat "$OUT/passes.txt"
timeout 100 python3 bench/stress.py --calls 200 2>&1 | tee "$OUT/stress.txt" | grep -v "calls, "
timeout 60 python3 bench/bench_distill.py --skip-reference 2>&1 | tee "$OUT/distill.txt" | tail -3
