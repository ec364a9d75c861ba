#!/usr/bin/env bash
# Warp-stall breakdown of uld_rows_kernel (final config) on two kinds of rows; logs under $OUT.
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"
NCU=$(ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1); NCU=${NCU:-ncu}
for spec in "identical 2048 qwen_qwen" "random 2048 qwen_llama3"; do
  set -- $spec
  timeout 150 $NCU --clock-control none --section SpeedOfLight --section WarpStateStats \
    --section Occupancy --section LaunchStats --section SourceCounters --import-source yes \
    -k regex:uld_rows_kernel --launch-skip 1 --launch-count 1 -o "$OUT/prof_$1" \
    python3 bench/profile_ncu.py "$1" "$2" "$3" > "$OUT/ncu_$1.log" 2>&1
  $NCU -i "$OUT/prof_$1.ncu-rep" --page details > "$OUT/details_$1.txt" 2>&1
  $NCU -i "$OUT/prof_$1.ncu-rep" --page source --csv --print-source sass > "$OUT/source_$1.csv" 2>&1
  echo "== $1"; grep -E "Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Issue Slots Busy|Warp Cycles Per Issued|Stall" "$OUT/details_$1.txt" | head -20
  python3 - "$OUT/source_$1.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1], errors="replace")))
h = next(i for i, r in enumerate(rows) if "Source" in r)
hdr = rows[h]; body = [r for r in rows[h + 1:] if len(r) == len(hdr)]
cols = [i for i, c in enumerate(hdr) if c.startswith("stall_") and "Not Issued" not in c]
num = lambda x: float(x.replace(",", "") or 0) if x.replace(",", "").replace(".", "").isdigit() else 0.0
tot = {hdr[i]: sum(num(r[i]) for r in body) for i in cols}
s = sum(tot.values()) or 1
print("stall reasons (share of samples):", ", ".join(f"{k[6:]} {100 * v / s:.0f}%" for k, v in sorted(tot.items(), key=lambda kv: -kv[1])[:8]))
PY
done
