#!/usr/bin/env bash
# The histogram engine's recorded run, in device calls of at most 10 minutes (the tests alone need two). Steps (ULD_STEPS, in
# this order; default all but stress, worst and power): tests (test_hist_gaps.py, test_hist_subbins.py,
# test_hist_float32.py, test_hist.py, test_hist_edges.py, test_gpu.py, one pytest call each;
# ULD_TEST_FILES picks some), worst (the slowest kinds on Qwen/Qwen at six temperatures), check (agreement with
# the trie engine), bench (the table against the reference and Liger's fused JSD), fresh
# (Qwen/Llama-3 random and peaked, each in its own process), host (a
# call's host and GPU time, and each layer's host time: profile_host.py), passes (per-kernel GPU time), distill (the
# training loss), scaling (table and plot), stress (the largest shape), power (energy per call
# of random and peaked rows, forward+backward and forward alone: power_per_call.py); then knob settings to
# weigh, given as arguments. Logs under $OUT. do_bench's warmup and rep are milliseconds: at
# 12 ms a call, rep 300 takes the median of ~25 calls. Liger-Kernel is carried as a wheel in
# .whl/ (a benchmark comparison, never a dependency): once, here, `echo /.whl/ >>
# .git/info/exclude; python3 -m pip download --no-deps liger-kernel==0.8.5 -d .whl`, then name
# .whl in the device call's carry. Without it the table has no Liger row.
# usage (from the device tool): ULD_COMMIT=<short hash> [ULD_STEPS="tests bench"] bash bench/device_hist.sh ["ULD_X=1" ...]
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
STEPS=${ULD_STEPS:-tests check bench host passes distill scaling}
has() { [[ " $STEPS " == *" $1 "* ]]; }
# The SM clock and power each second (the H200 meets its 700 W limit within seconds of this
# load and lowers its clock: 11th session), summarized in $OUT/clocks.txt at the end over the
# seconds above 600 W (uld_kernels rows draw 650-700 W, the reference ~520 W at full clock).
nvidia-smi dmon -s pc -d 1 > "$OUT/dmon.txt" 2>&1 & DMON=$!
clocks() {
  kill "$DMON" 2>/dev/null
  awk '!/^#/ && $2 > 600 {print $6}' "$OUT/dmon.txt" | sort -n | awk '{c[NR] = $1}
    END {printf "seconds above 600 W: %d; SM clock there: min %s, median %s, max %s MHz\n", NR, c[1], c[int((NR + 1) / 2)], c[NR]}' \
    | tee "$OUT/clocks.txt"
}
trap clocks EXIT
IMPLS="uld_kernels reference"
if ls .whl/liger_kernel-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site .whl/liger_kernel-*.whl; then
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; IMPLS="$IMPLS liger_jsd"
fi
if has tests; then  # (all six files take ~15 minutes: two calls, ULD_TEST_FILES naming each one's half)
  for f in ${ULD_TEST_FILES:-test_hist_gaps test_hist_subbins test_hist_float32 test_hist test_hist_edges test_gpu}; do
    echo "== $f"; timeout 420 python3 -m pytest "tests/$f.py" -q -p no:warnings -p no:cacheprovider 2>&1 | tail -3
  done | tee "$OUT/tests.txt"
fi
if has worst; then  # the worst rows found (bench/NOTES.md, Next 1): every slow kind on Qwen/Qwen, by temperature
  for t in 1 0.5 0.1 0.01 0.004 2; do
    echo "== T=$t"; timeout 100 python3 bench/bench_uld.py --out "$OUT/worst_$t" --impls uld_kernels --rows 16384 \
      --warmup 30 --rep 200 --full-only --pairs qwen_qwen --kinds gapped flagged dense wide_masked --temperature "$t" \
      2>&1 | grep -E "^\| uld"
  done | tee "$OUT/worst.txt"
fi
if has check; then
  timeout 200 python3 bench/check_hist.py --rows 512 --pairs qwen_llama3 qwen_qwen 2>&1 | grep -v -i warn \
    | cut -c1-200 | tee "$OUT/check.txt"
fi
if has bench; then
  timeout 240 python3 bench/bench_uld.py --out "$OUT/table" --impls $IMPLS --rows 16384 --warmup 50 \
    --rep 300 --reference-kinds random --pairs qwen_llama3 qwen_qwen llama2_gemma 2>&1 | tee "$OUT/bench.txt" \
    | grep -E "^\| |copy"
fi
if has fresh; then  # one process per kind: the first row of a process had a clean backward column (10th session)
  for kind in random peaked; do
    timeout 60 python3 bench/bench_uld.py --out "$OUT/fresh_$kind" --impls uld_kernels --rows 16384 --warmup 50 \
      --rep 300 --pairs qwen_llama3 --kinds "$kind" 2>&1 | grep -E "^\| uld"
    # (the median at full precision: the table's 6.60 may lie either side of issue 3's 6.6)
    tail -1 "$OUT/fresh_$kind/bench_uld.csv" | awk -F, '{printf "  %s: fwd %.3f, fwd+bwd %.3f ms\n", $6, $7, $10}'
  done | tee "$OUT/fresh.txt"
fi
if has host; then
  timeout 60 python3 bench/profile_host.py --cprofile 0 --pairs qwen_llama3 qwen_qwen --kinds random near identical \
    2>&1 | grep -v -i warn | tee "$OUT/host.txt"
  # (the host's time per layer of a call on 8 rows; the device's CPU is noisy: least of rounds)
  timeout 60 python3 bench/profile_host.py --layers --layer-rows 8 --pairs qwen_llama3 --kinds random \
    2>&1 | grep -v -i warn | tee -a "$OUT/host.txt"
fi
if has passes; then
  timeout 30 python3 bench/profile_passes.py --rows 16384 --pairs qwen_llama3 --kinds random 2>&1 \
    | grep -v -i warn | grep -v "at::native" | tee "$OUT/passes.txt"
fi
if has distill; then
  timeout 45 python3 bench/bench_distill.py --skip-reference --profile 2>&1 | grep -E "^\| |aligned|ms" \
    | tee "$OUT/distill.txt"
fi
if has scaling; then
  timeout 70 python3 bench/scaling.py --out "$OUT" ${SCALING_ARGS:-} 2>&1 | grep -v -i warn | tee "$OUT/scaling.txt"
fi
if has stress; then
  timeout 50 python3 bench/stress.py --calls 10 2>&1 | grep -v -i warn | tail -6 | tee "$OUT/stress.txt"
fi
if has power; then  # (not by default: ~1 minute of calls back to back at the board's power limit)
  timeout 150 python3 bench/power_per_call.py --kinds random,peaked --modes fwdbwd,fwd --seconds 6 --rounds 2 \
    2>&1 | grep -E "^\|" | tee "$OUT/power.txt"
fi
for spec in "$@"; do
  echo "== $spec"
  env $spec timeout 30 python3 bench/bench_uld.py --out "$OUT/sweep" --impls uld_kernels --rows 16384 --warmup 50 \
    --rep 300 --pairs qwen_llama3 --kinds random --full-only 2>&1 | grep -E "^\| uld"
done 2>&1 | tee "$OUT/sweep.txt"
