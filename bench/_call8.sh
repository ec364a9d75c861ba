export PYTHONUNBUFFERED=1
timeout 120 python3 bench/check_hist.py --rows 512 --pairs qwen_llama3 qwen_qwen 2>&1 | grep -v -i warn | cut -c1-200
timeout 100 python3 bench/profile_passes.py --rows 16384 --pairs qwen_llama3 qwen_qwen --kinds random near 2>&1 | grep -v -i warn | grep -E "rows=|_kernel" | head -30
timeout 200 python3 bench/bench_uld.py --out "$OUT/table" --impls uld_kernels --rows 16384 \
  --warmup 3 --rep 10 --pairs qwen_llama3 qwen_qwen 2>&1 | grep -E "^\| |copy"
