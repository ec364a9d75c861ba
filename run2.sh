#!/usr/bin/env bash
set -u; export PYTHONUNBUFFERED=1; cd "$(dirname "$0")"
for g in 0 1 0 1; do
  echo "== gaps $g"
  ULD_HIST_GAPS=$g timeout 70 python3 bench/bench_uld.py --out "$OUT/b$g" --impls uld_kernels --rows 16384 --warmup 50 --rep 300 --pairs qwen_llama3 --kinds random peaked flagged dense gapped --full-only 2>&1 | grep -E "^\| uld"
done > "$OUT/ab.txt" 2>&1
for g in 0 1; do
  echo "== gaps $g"
  ULD_HIST_GAPS=$g timeout 60 python3 bench/profile_passes.py --rows 16384 --pairs qwen_llama3 --kinds random peaked flagged dense 2>&1 | grep -E "ms|rows="
done > "$OUT/passes.txt" 2>&1
