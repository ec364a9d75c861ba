#!/usr/bin/env bash
# The histogram engine's recorded run: GPU tests, agreement with the trie engine on real
# vocabularies, the benchmark table against the reference, the per-pass profile; logs under $OUT.
# usage (from the device tool): ULD_COMMIT=<short hash of the tree sent> bash bench/device_hist.sh
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
# (run 11's 170 s limit cut these after 61 tests: give them the time they take)
timeout 420 python3 -m pytest tests/test_gpu.py tests/test_kernels.py tests/test_hist.py -q -p no:warnings \
  -p no:cacheprovider 2>&1 | tail -4 | tee "$OUT/tests.txt"
timeout 200 python3 -m pytest tests/test_distill.py -k "histogram or papers" -q -p no:warnings -p no:cacheprovider \
  2>&1 | tail -3 | tee -a "$OUT/tests.txt"
timeout 60 python3 bench/check_hist.py --rows 512 --pairs qwen_llama3 qwen_qwen llama2_gemma 2>&1 | grep -v -i warn \
  | cut -c1-200 | tee "$OUT/check.txt"
timeout 150 python3 bench/bench_uld.py --out "$OUT/table" --impls uld_kernels reference --rows 16384 --warmup 3 \
  --rep 10 --reference-kinds random --pairs qwen_llama3 qwen_qwen llama2_gemma 2>&1 | tee "$OUT/bench.txt" \
  | grep -E "^\| |copy"
timeout 40 python3 bench/profile_passes.py --rows 16384 --pairs qwen_llama3 --kinds random 2>&1 | grep -v -i warn \
  | tee "$OUT/passes.txt"
# issue 4: the training loss on each engine (ULD_DISTILL_ENGINE=hist has not run on a GPU yet)
for engine in split hist; do
  echo "== ULD_DISTILL_ENGINE=$engine"
  ULD_DISTILL_ENGINE=$engine timeout 90 python3 bench/bench_distill.py --skip-reference 2>&1 | grep -E "^\| |aligned"
done 2>&1 | tee "$OUT/distill.txt"
