#!/usr/bin/env bash
# The histogram engine on the GPU: agreement with the trie engine, kernel times, the table.
# usage (from the device tool): ULD_COMMIT=<short hash> bash bench/device_hist.sh [ENV=.. settings to sweep]
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
timeout 150 python3 bench/check_hist.py --rows 512 2>&1 | grep -v -i warn | tee "$OUT/check.txt"
timeout 60 python3 bench/check_hist.py --rows 256 --pairs qwen_llama3 --temperatures 2.0 0.5 2>&1 | grep -v -i warn | tee -a "$OUT/check.txt"
for spec in "ULD_ENGINE=hist" "$@"; do
  echo "== $spec"
  env ULD_ENGINE=hist $spec timeout 100 python3 bench/profile_passes.py --rows 16384 --pairs qwen_llama3 qwen_qwen \
    --kinds random 2>&1 | grep -v -i warn | grep -E "rows=|_kernel" | head -40
done 2>&1 | tee "$OUT/passes.txt"
ULD_ENGINE=hist timeout 200 python3 bench/bench_uld.py --out "$OUT/table" --impls uld_kernels --rows 16384 \
  --warmup 3 --rep 10 --pairs qwen_llama3 qwen_qwen 2>&1 | tee "$OUT/bench.txt" | grep -E "^\| |copy"
