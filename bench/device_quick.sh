#!/usr/bin/env bash
# A development run: the GPU tests, then the per-pass profile and the table of uld_kernels alone
# on the rows a change aims at; logs under $OUT. (The recorded run is device_final.sh.)
# usage (from the device tool): ULD_COMMIT=<short hash> bash bench/device_quick.sh
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
timeout 280 python3 -m pytest tests/test_gpu.py tests/test_kernels.py tests/test_distill.py -q -x -p no:warnings -p no:cacheprovider --timeout 200 2>&1 | tail -15 | tee "$OUT/tests.txt"
timeout 90 python3 bench/profile_passes.py --rows 16384 --pairs qwen_llama3 qwen_qwen --kinds random peaked near identical 2>&1 | grep -v -i warn | tee "$OUT/passes.txt"
timeout 150 python3 bench/bench_uld.py --out "$OUT/table" --impls uld_kernels --rows 16384 --warmup 3 --rep 10 \
  --pairs qwen_llama3 qwen_qwen 2>&1 | tee "$OUT/bench.txt" | grep -E "^\| |copy"
