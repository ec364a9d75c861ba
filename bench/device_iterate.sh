#!/usr/bin/env bash
# One iteration on the GPU between recorded runs: the histogram engine's GPU tests, agreement
# with the trie, our times on every kind (no reference: it does not change), the per-pass
# profile, knob settings against each other, and warp stalls of three passes (a launch of
# each in the second call: hist and sign run twice per call, grad once here and once in the
# trie fallback).
# Logs under $OUT. usage (from the device tool): bash bench/device_iterate.sh ["ULD_X=1 ULD_Y=2" ...]
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest tests/test_hist.py -q -x -p no:warnings -p no:cacheprovider 2>&1 \
  | tail -3 | tee "$OUT/tests.txt"
for temps in "1 1" "2 1"; do
  timeout 60 python3 bench/check_hist.py --rows 512 --temperatures $temps --pairs qwen_llama3 qwen_qwen 2>&1 \
    | grep -v -i warn | cut -c1-200
done | tee "$OUT/check.txt"
timeout 120 python3 bench/bench_uld.py --out "$OUT/table" --impls uld_kernels --rows 16384 --warmup 50 --rep 300 \
  --pairs qwen_llama3 qwen_qwen llama2_gemma 2>&1 | tee "$OUT/bench.txt" | grep -E "^\| uld|copy"
timeout 60 python3 bench/profile_passes.py --rows 16384 --pairs qwen_llama3 qwen_qwen --kinds random identical 2>&1 \
  | grep -v -i warn | tee "$OUT/passes.txt"
for spec in "$@"; do
  echo "== $spec"
  env $spec timeout 60 python3 bench/bench_uld.py --out "$OUT/sweep" --impls uld_kernels --rows 16384 --warmup 50 \
    --rep 300 --pairs qwen_llama3 --kinds random --full-only 2>&1 | grep -E "^\| uld"
done 2>&1 | tee "$OUT/sweep.txt"
NCU=$(ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1); NCU=${NCU:-ncu}
for spec in "hist_kernel 2" "grad_kernel 2" "sign_kernel 2"; do
  set -- $spec
  timeout 100 $NCU --clock-control none --section SpeedOfLight --section WarpStateStats --section Occupancy \
    --section SourceCounters --import-source yes -k regex:$1 --launch-skip $2 --launch-count 1 -o "$OUT/prof_$1" \
    python3 bench/profile_ncu.py random 2048 > /dev/null 2>&1
  $NCU -i "$OUT/prof_$1.ncu-rep" --page details > "$OUT/details.txt" 2>&1
  $NCU -i "$OUT/prof_$1.ncu-rep" --page source --csv --print-source sass > "$OUT/source.csv" 2>&1
  echo "== $1"; grep -E "Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Issue Slots Busy|Warp Cycles Per Issued" \
    "$OUT/details.txt" | head -8
  python3 bench/ncu_top.py "$OUT/source.csv" 12
  rm -f "$OUT/prof_$1.ncu-rep"
done 2>&1 | tee "$OUT/ncu.txt"
rm -f "$OUT/details.txt" "$OUT/source.csv"
