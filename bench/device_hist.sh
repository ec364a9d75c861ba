#!/usr/bin/env bash
# The histogram engine's recorded run, within one 10-minute device call: agreement with the
# trie engine, the benchmark table against the reference, the per-pass profile, the training
# loss, the scaling table and plot, the GPU tests, then (LARGEST=1) the largest shape and knob
# settings to weigh next. Logs under $OUT. do_bench's warmup and rep are milliseconds: at
# 12 ms a call, rep 300 takes the median of ~25 calls (rep 10, used before the seventh
# session's run 4, timed one or two: their tables moved by up to 4 ms between runs).
# usage (from the device tool): ULD_COMMIT=<short hash of the tree sent> bash bench/device_hist.sh ["ULD_X=1" ...]
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
timeout 40 python3 bench/check_hist.py --rows 512 --pairs qwen_llama3 qwen_qwen 2>&1 | grep -v -i warn \
  | cut -c1-200 | tee "$OUT/check.txt"
timeout 160 python3 bench/bench_uld.py --out "$OUT/table" --impls uld_kernels reference --rows 16384 --warmup 50 \
  --rep 300 --reference-kinds random --pairs qwen_llama3 qwen_qwen llama2_gemma 2>&1 | tee "$OUT/bench.txt" \
  | grep -E "^\| |copy"
timeout 30 python3 bench/profile_passes.py --rows 16384 --pairs qwen_llama3 --kinds random 2>&1 \
  | grep -v -i warn | grep -v "at::native" | tee "$OUT/passes.txt"
timeout 45 python3 bench/bench_distill.py --skip-reference 2>&1 | grep -E "^\| |aligned" | tee "$OUT/distill.txt"
timeout 70 python3 bench/scaling.py --out "$OUT" ${SCALING_ARGS:-} 2>&1 | grep -v -i warn | tee "$OUT/scaling.txt"
timeout 200 python3 -m pytest tests/test_hist.py tests/test_gpu.py -q -p no:warnings -p no:cacheprovider 2>&1 \
  | tail -3 | tee "$OUT/tests.txt"
if [ "${LARGEST:-0}" = 1 ]; then
  timeout 50 python3 bench/stress.py --calls 10 2>&1 | grep -v -i warn | tail -6 | tee "$OUT/stress.txt"
fi
for spec in "$@"; do
  echo "== $spec"
  env $spec timeout 30 python3 bench/bench_uld.py --out "$OUT/sweep" --impls uld_kernels --rows 16384 --warmup 50 \
    --rep 300 --pairs qwen_llama3 --kinds random --full-only 2>&1 | grep -E "^\| uld"
done 2>&1 | tee "$OUT/sweep.txt"
