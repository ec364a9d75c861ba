#!/usr/bin/env bash
# The whole test suite on the GPU in one device call (~5 minutes, most of it compilation),
# stopping at the first failure; the tail of the log under $OUT. The recorded runs
# (device_hist.sh) run test_hist.py and test_gpu.py only, to fit their 10 minutes.
# usage (from the device tool): bash bench/device_tests.sh
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
timeout 560 python3 -m pytest tests -q -x -p no:warnings -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests.txt"
