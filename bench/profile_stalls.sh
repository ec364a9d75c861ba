#!/usr/bin/env bash
# Warp-stall breakdown of one pass (default: the count pass, level 1) on two kinds of rows;
# logs under $OUT. usage: bash bench/profile_stalls.sh [kernel name] [launches to skip]
# (root_kernel 1, count_kernel 4 = ULD_SPLIT_LEVELS, loss_kernel 1: the first call of
# profile_ncu.py compiles, and the count pass is one launch per split level). ULD_STALL_SPECS:
# ";"-separated profile_ncu.py arguments (kind rows pair [batch rows]) instead of the two below.
# Besides the SASS page (bench/ncu_top.py), the page with source lines, lines_*.csv, summed by
# line and by loop (bench/ncu_lines.py). The histogram engine's first hist launch of the
# second call: `bash bench/profile_stalls.sh hist_kernel 2`. ULD_STALL_SCRIPT: the driver
# (default bench/profile_ncu.py); the top_k select: `ULD_STALL_SCRIPT=bench/profile_topk.py
# ULD_STALL_SPECS="--rows 2048 --k 100 --once" bash bench/profile_stalls.sh topk_rows 1`.
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"
KERNEL=${1:-count_kernel}; SKIP=${2:-4}
NCU=$(ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1); NCU=${NCU:-ncu}
IFS=";" read -r -a SPECS <<< "${ULD_STALL_SPECS:-peaked 2048 qwen_llama3;random 2048 qwen_llama3}"
for spec in "${SPECS[@]}"; do
  set -- $spec; name=$(echo "$spec" | tr -d '-' | tr ' ' _)
  timeout 150 $NCU --clock-control none --section SpeedOfLight --section WarpStateStats \
    --section Occupancy --section LaunchStats --section SourceCounters --import-source yes \
    -k regex:$KERNEL --launch-skip $SKIP --launch-count 1 -f -o "$OUT/prof_$name" \
    python3 ${ULD_STALL_SCRIPT:-bench/profile_ncu.py} "$@" > "$OUT/ncu_$name.log" 2>&1
  $NCU -i "$OUT/prof_$name.ncu-rep" --page details > "$OUT/details_$name.txt" 2>&1
  $NCU -i "$OUT/prof_$name.ncu-rep" --page source --csv --print-source sass > "$OUT/source_$name.csv" 2>&1
  $NCU -i "$OUT/prof_$name.ncu-rep" --page source --csv --print-source cuda,sass > "$OUT/lines_$name.csv" 2>&1
  echo "== $spec"; grep -E "Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Issue Slots Busy|Warp Cycles Per Issued|Stall" "$OUT/details_$name.txt" | head -20
  python3 bench/ncu_top.py "$OUT/source_$name.csv" 0
  python3 bench/ncu_lines.py "$OUT/lines_$name.csv" 10  # (per source line, and per loop)
done
