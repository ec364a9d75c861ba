#!/usr/bin/env bash
# The recorded run: GPU tests, the benchmark table (bench/RESULTS.md), the other engine setting,
# issue 4's benchmark, issue 5's repeated calls and the per-pass profile; logs under $OUT.
# usage (from the device tool): ULD_COMMIT=<short hash of the tree sent> bash bench/device_final.sh
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv | tee "$OUT/facts.txt"
python3 -m pytest tests/test_gpu.py tests/test_kernels.py -q -p no:warnings -p no:cacheprovider --timeout 240 2>&1 \
  | tee "$OUT/tests.txt" | tail -6
python3 bench/bench_uld.py --out "$OUT/table" --impls uld_kernels reference --rows 16384 --warmup 3 --rep 10 \
  --reference-kinds random --pairs qwen_llama3 qwen_qwen 2>&1 | tee "$OUT/bench.txt" | grep -E "^\| |copy"
ULD_MASS=1 ULD_ROOT_BITS=11 python3 bench/bench_uld.py --out "$OUT/mass" --impls uld_kernels --rows 16384 --full-only \
  --pairs qwen_llama3 --kinds random peaked --warmup 3 --rep 10 2>&1 | grep -E "^\| uld" | sed "s/^/masses root-2048 /" | tee "$OUT/sweep.txt"
for knobs in "ULD_BATCH_ROWS=128" "ULD_BATCH_ROWS=2048" "ULD_MASS=1 ULD_ROOT_BITS=11 ULD_BATCH_ROWS=128"; do
  env $knobs python3 bench/bench_uld.py --out "$OUT/sweep" --impls uld_kernels --rows 16384 --full-only \
    --pairs qwen_llama3 --kinds random --warmup 3 --rep 10 2>&1 | grep -E "^\| uld" | sed "s/^/$knobs /" | tee -a "$OUT/sweep.txt"
done
timeout 150 python3 bench/stress.py --skip-large 2>&1 | tee "$OUT/stress.txt" | tail -4
python3 bench/bench_distill.py --skip-reference 2>&1 | tee "$OUT/distill.txt"
python3 bench/profile_passes.py --rows 16384 --pairs qwen_llama3 --kinds random peaked 2>&1 | grep -v -i warn | tee "$OUT/passes.txt"
