#!/usr/bin/env bash
# Pairs per launch against workspace entries per pair (both set the extra memory): fwd+bwd
# times, peak extra memory and, on same-vocabulary rows, trie depth and exhausted rows.
# usage (from the device tool): bash bench/sweep_batch.sh "1024 16384" "2048 8192" ...
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
for spec in "$@"; do
  set -- $spec
  echo "== ULD_BATCH_ROWS=$1 ULD_SPLIT_ENTRIES=$2"
  ULD_BATCH_ROWS=$1 ULD_SPLIT_ENTRIES=$2 timeout 120 python3 bench/bench_uld.py --out "$OUT/sweep_$1_$2" \
    --impls uld_kernels --rows 16384 --warmup 3 --rep 10 --pairs qwen_llama3 qwen_qwen --kinds random peaked near \
    2>&1 | grep -E "^\| uld"
  ULD_BATCH_ROWS=$1 ULD_SPLIT_ENTRIES=$2 timeout 60 python3 bench/profile_passes.py --rows 16384 --pairs qwen_qwen \
    --kinds random near 2>&1 | grep "rows="
done 2>&1 | tee "$OUT/sweep.txt"
