#!/usr/bin/env bash
# Issues 4 and 5 on the GPU: GPU tests, the training-loss benchmark, the stress run, and the
# row-kernel times at 16,384 rows. usage: ULD_COMMIT=<hash> bash bench/device_issue45.sh
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv | tee "$OUT/facts.txt"
python3 -m pytest tests/test_gpu.py -q -p no:warnings -p no:cacheprovider --timeout 240 2>&1 \
  | tee "$OUT/tests.txt" | tail -8
python3 bench/bench_distill.py 2>&1 | tee "$OUT/distill.txt"
python3 bench/stress.py 2>&1 | tee "$OUT/stress.txt"
python3 bench/bench_uld.py --out "$OUT/table" --impls uld_kernels --rows 16384 --full-only \
  --pairs qwen_llama3 qwen_qwen --warmup 5 --rep 10 2>&1 | tee "$OUT/bench.txt" | grep -E "^\| "
