#!/usr/bin/env bash
# The recorded run: GPU tests, the benchmark table (bench/RESULTS.md), a batch/workspace sweep,
# issue 5's stress run, issue 4's benchmark and the per-pass profile; logs under $OUT.
# usage (from the device tool): ULD_COMMIT=<short hash of the tree sent> bash bench/device_final.sh
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv > "$OUT/facts.txt"
python3 -m pytest tests/test_gpu.py tests/test_kernels.py -q -p no:warnings -p no:cacheprovider --timeout 200 2>&1 | tail -4 | tee "$OUT/tests.txt"
python3 bench/bench_uld.py --out "$OUT/table" --impls uld_kernels reference --rows 16384 --warmup 3 --rep 10 \
  --reference-kinds random --pairs qwen_llama3 qwen_qwen llama2_gemma 2>&1 | tee "$OUT/bench.txt" | grep -E "^\| |copy"
for knobs in "ULD_BATCH_ROWS=512" "ULD_BATCH_ROWS=1024 ULD_SPLIT_ENTRIES=8192"; do
  env $knobs python3 bench/bench_uld.py --out "$OUT/sweep" --impls uld_kernels --rows 16384 --full-only \
    --pairs qwen_llama3 --kinds random peaked --warmup 3 --rep 10 2>&1 | grep -E "^\| uld" | sed "s/^/$knobs /" | tee -a "$OUT/sweep.txt"
done
# does a smaller workspace run out on the hard rows? (exhausted rows are NaN)
ULD_SPLIT_ENTRIES=8192 python3 bench/profile_passes.py --rows 16384 --pairs qwen_qwen --kinds random near 2>&1 \
  | grep "trie depth" | sed "s/^/entries 8192: /" | tee -a "$OUT/sweep.txt"
timeout 200 python3 bench/stress.py 2>&1 | tee "$OUT/stress.txt" | grep -v "calls, "
python3 bench/bench_distill.py --skip-reference 2>&1 | tee "$OUT/distill.txt" | tail -3
python3 bench/profile_passes.py --rows 16384 --pairs qwen_llama3 --kinds random peaked 2>&1 | grep -v -i warn > "$OUT/passes.txt"
cat "$OUT/passes.txt"
