#!/usr/bin/env bash
# Launch-configuration sweep of uld_kernels on the GPU (one process per configuration, since
# the knobs are read at import). usage: bash bench/sweep.sh "P:E:W ..." [bench args...]
set -u
configs=$1; shift
OUT=${OUT:-bench/out}; mkdir -p "$OUT"
for c in $configs; do
  IFS=: read -r p e w <<<"$c"
  echo "== ULD_PROGRAMS_PER_SM=$p ULD_ENTRIES=$e ULD_NUM_WARPS=$w"
  ULD_PROGRAMS_PER_SM=$p ULD_ENTRIES=$e ULD_NUM_WARPS=$w PYTHONUNBUFFERED=1 \
    python3 bench/bench_uld.py --impls uld_kernels --full-only --out "$OUT/sweep_${p}_${e}_${w}" "$@" 2>&1 \
    | grep -E "uld_kernels +[a-z]" | tee -a "$OUT/sweep.txt"
done
