#!/usr/bin/env bash
# The test suite on the GPU, stopping at the first failure; the tail of the log under $OUT.
# From a cold machine the whole suite takes longer than one 10-minute device call (mostly
# compilation: the eighth session's runs 2 to 4 split it), so give it the files for one call:
#   bash bench/device_tests.sh tests/test_hist.py tests/test_gpu.py tests/test_distill.py tests/test_gather_ce.py
#   bash bench/device_tests.sh tests/test_kernels.py tests/test_numerics.py tests/test_properties.py \
#       tests/test_validation.py tests/test_reference.py tests/test_reference_paper.py
# (no arguments: every file, within the call's limit).
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
timeout 560 python3 -m pytest "${@:-tests}" -q -x -p no:warnings -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests.txt"
