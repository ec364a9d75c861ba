#!/usr/bin/env bash
set -u; export PYTHONUNBUFFERED=1; cd "$(dirname "$0")"
for f in test_hist_gaps test_hist_float32 test_hist test_hist_edges; do
  echo "== $f"; timeout 150 python3 -m pytest "tests/$f.py" -q -p no:warnings -p no:cacheprovider 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -6
done > "$OUT/tests.txt" 2>&1
