#!/usr/bin/env bash
# The split engine on the GPU: tests, per-pass profile, A/B against the persistent engine,
# a small sweep, issue 4's benchmark and issue 5's stress run.
# usage: ULD_COMMIT=<hash> bash bench/device_split.sh
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv | tee "$OUT/facts.txt"
python3 -m pytest tests/test_gpu.py -q -x -p no:warnings -p no:cacheprovider --timeout 240 2>&1 \
  | tee "$OUT/tests.txt" | tail -4
python3 bench/profile_passes.py --rows 16384 2>&1 | tee "$OUT/passes.txt"
{
for engine in split persistent; do
  ULD_ENGINE=$engine python3 bench/bench_uld.py --out "$OUT/t_$engine" --impls uld_kernels --rows 16384 \
    --full-only --pairs qwen_llama3 --kinds random peaked --warmup 3 --rep 10 2>&1 | grep -E "^\| uld" | sed "s/^/$engine /"
done
for knobs in "ULD_CHUNK=8192" "ULD_CHUNK=32768" "ULD_SPLIT_BLOCK=1024" "ULD_SPLIT_WARPS=8 ULD_SPLIT_BLOCK=1024" "ULD_BATCH_ROWS=2048" "ULD_SPLIT_STAGES=1" "ULD_SPLIT_STAGES=3"; do
  env $knobs python3 bench/bench_uld.py --out "$OUT/sweep" --impls uld_kernels --rows 16384 \
    --full-only --pairs qwen_llama3 --kinds random peaked --warmup 3 --rep 10 2>&1 | grep -E "^\| uld" | sed "s/^/$knobs /"
done
} 2>&1 | tee "$OUT/ab_sweep.txt"
python3 bench/bench_distill.py --skip-reference 2>&1 | tee "$OUT/distill.txt"
python3 bench/stress.py --calls 1000 2>&1 | tee "$OUT/stress.txt"
