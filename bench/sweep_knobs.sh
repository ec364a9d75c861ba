#!/usr/bin/env bash
# Engine knobs (launch.py's ULD_* variables) against each other: fwd+bwd times and peak extra
# memory, and on same-vocabulary rows the trie depth and exhausted rows. One argument per
# setting, each a list of assignments; logs under $OUT.
# usage (from the device tool): bash bench/sweep_knobs.sh "ULD_BATCH_ROWS=1024" "ULD_LEVEL_CAP=2048" ...
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
for spec in "$@"; do
  echo "== $spec"
  env $spec timeout 120 python3 bench/bench_uld.py --out "$OUT/sweep" --impls uld_kernels --rows 16384 --warmup 50 \
    --rep 300 --pairs qwen_llama3 qwen_qwen --kinds random peaked near 2>&1 | grep -E "^\| uld"
  env $spec timeout 60 python3 bench/profile_passes.py --rows 16384 --pairs qwen_llama3 qwen_qwen \
    --kinds random near 2>&1 | grep -E "rows=|count_kernel|root_kernel"
done 2>&1 | tee "$OUT/sweep.txt"
