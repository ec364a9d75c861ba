#!/usr/bin/env bash
# The split engine on the GPU: tests, stress, per-pass profile, a small sweep, issue 4's
# benchmark and the table. usage: ULD_COMMIT=<hash> bash bench/device_split.sh
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv | tee "$OUT/facts.txt"
python3 -m pytest tests/test_gpu.py -q -p no:warnings -p no:cacheprovider --timeout 240 2>&1 \
  | tee "$OUT/tests.txt" | tail -6
timeout 150 python3 bench/stress.py --skip-large 2>&1 | tee "$OUT/stress.txt" | tail -4
python3 bench/profile_passes.py --rows 16384 --kinds random peaked near identical 2>&1 | grep -v Warn | tee "$OUT/passes.txt"
bench() { env "$@" python3 bench/bench_uld.py --out "$OUT/b" --impls uld_kernels --rows 16384 --full-only \
  --pairs qwen_llama3 --kinds random peaked --warmup 3 --rep 10 2>&1 | grep -E "^\| uld" | sed "s/^/$* /"; }
{ bench ULD_SPLIT_BLOCK=1024; bench ULD_SPLIT_STAGES=2; bench ULD_ROOT_BITS=11
  bench ULD_ENGINE=persistent; } 2>&1 | tee "$OUT/sweep.txt"
python3 bench/bench_distill.py 2>&1 | tee "$OUT/distill.txt"
python3 bench/bench_uld.py --out "$OUT/table" --impls uld_kernels reference --rows 16384 --warmup 3 --rep 10 \
  --reference-kinds random --pairs qwen_llama3 llama2_gemma qwen_qwen 2>&1 | tee "$OUT/bench.txt" | grep -E "^\| "
