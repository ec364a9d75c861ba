export PYTHONUNBUFFERED=1
timeout 120 python3 bench/check_hist.py --rows 512 --pairs qwen_llama3 qwen_qwen 2>&1 | grep -v -i warn | cut -c1-200
for spec in "ULD_HIST_PREFIX_WARPS=16" "ULD_HIST_PREFIX_WARPS=32" "ULD_HIST_PREFIX_WARPS=8"; do
  echo "== $spec"
  env $spec timeout 100 python3 bench/profile_passes.py --rows 16384 --pairs qwen_llama3 --kinds random 2>&1 | grep -v -i warn | grep -E "rows=|_kernel" | head -12
done
