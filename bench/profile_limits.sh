#!/usr/bin/env bash
# What limits each pass of the histogram engine: one Nsight Compute run over the second call's
# hist, sign and grad launches (one workspace batch of ROWS pairs), with the speed-of-light,
# occupancy and warp-state sections; logs under $OUT.
# usage: ROWS=6144 KIND=random bash bench/profile_limits.sh
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"
ROWS=${ROWS:-6144}; KIND=${KIND:-random}
NCU=$(ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1); NCU=${NCU:-ncu}
# the first call's five launches (hist x2, sign x2, grad) compile; the second call's are profiled
timeout 240 $NCU --clock-control none --section SpeedOfLight --section WarpStateStats --section Occupancy \
  --section LaunchStats -k regex:"hist_kernel|sign_kernel|grad_kernel" --launch-skip 5 --launch-count 5 \
  -o "$OUT/limits_$KIND" python3 bench/profile_ncu.py "$KIND" "$ROWS" qwen_llama3 > "$OUT/limits_$KIND.log" 2>&1
$NCU -i "$OUT/limits_$KIND.ncu-rep" --page details > "$OUT/limits_$KIND.txt" 2>&1
grep -E "^  [a-z_]+kernel|Duration|DRAM Throughput|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issue Slots Busy|Issued Ipc|Warp Cycles Per Issued|Stall" \
  "$OUT/limits_$KIND.txt" | head -120
# the stall reasons, cycles per issued instruction, of each profiled launch (raw page)
$NCU -i "$OUT/limits_$KIND.ncu-rep" --page raw --csv > "$OUT/limits_${KIND}_raw.csv" 2>&1
python3 - "$OUT/limits_${KIND}_raw.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
head, body = rows[0], rows[2:]
name = head.index("Kernel Name")
cols = [i for i, h in enumerate(head)
        if h.startswith("smsp__average_warps_issue_stalled_") and h.endswith("_per_issue_active.ratio")]
for r in body:
    pairs = sorted(((float(r[i] or 0), head[i][34:-23]) for i in cols), reverse=True)[:7]
    print(r[name][:40], " ".join(f"{n} {v:.2f}" for v, n in pairs))
PY
