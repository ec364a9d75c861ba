#!/usr/bin/env bash
set -u; export PYTHONUNBUFFERED=1; cd "$(dirname "$0")"
for g in 0 1 0 1; do
  echo "== gaps $g"
  ULD_HIST_GAPS=$g timeout 70 python3 bench/bench_uld.py --out "$OUT/b$g" --impls uld_kernels --rows 16384 --warmup 50 --rep 300 --pairs qwen_llama3 --kinds random peaked flagged dense --full-only 2>&1 | grep -E "^\| uld"
done > "$OUT/ab.txt" 2>&1
timeout 60 python3 bench/profile_passes.py --rows 16384 --pairs qwen_llama3 --kinds random flagged dense 2>&1 | grep -E "ms|rows=" > "$OUT/passes.txt" 2>&1
for t in 0.5; do
  timeout 90 python3 bench/bench_uld.py --out "$OUT/t$t" --impls uld_kernels --rows 16384 --warmup 50 --rep 300 --pairs qwen_llama3 qwen_qwen --kinds dense flagged random --full-only --temperature $t 2>&1 | grep -E "^\| uld"
done > "$OUT/temp.txt" 2>&1
for f in test_hist_gaps test_gpu; do
  echo "== $f"; timeout 240 python3 -m pytest "tests/$f.py" -q -p no:warnings -p no:cacheprovider 2>&1 | tail -4
done > "$OUT/tests.txt" 2>&1
