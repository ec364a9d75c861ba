#!/usr/bin/env bash
# The top_k engine on the GPU in one device call (thirty-fourth session's runs 1-4 as a script):
# its GPU tests, bench_topk.py (aligned rows and the training loss: times and peak memory),
# profile_topk.py (forward and backward apart, k = 100 and 1,000, float32 rows), then Nsight
# Compute's source view of the select (bench/ncu_lines.py's loops). Logs under $OUT (at most 8
# files come back from a device call: the profiles are packed into one archive).
#   ULD_TOPK_STEPS="tests bench profile ncu" bash bench/device_topk.sh
# (also: caps, narrow; ULD_TOPK_TESTS: test_topk's -k expression, ULD_TOPK_TEST_LIMIT: its seconds).
# profile_topk.py's configs: fields left out take launch's defaults (since the thirty-sixth
# session, its register cap 80 included; an explicit maxnreg 0 is no cap).
# The thirty-fifth session's calls: test_topk's kernel engines ~85 s on a warm machine (their
# Triton cache kept), past 200 s cold; the training loss's top_k tests ~30 s; the bench ~85 s;
# a profile ~30 s each. Split the steps over two calls where the budget allows (each `pytest`
# ends at its own limit without a summary line: count its dots).
set -u; export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}; mkdir -p "$OUT"
STEPS=${ULD_TOPK_STEPS:-tests bench profile ncu}
t0=$(date +%s)
echo "commit $(cat .commit 2>/dev/null || git rev-parse --short HEAD)"
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv
for step in $STEPS; do
  case $step in
    tests) timeout ${ULD_TOPK_TEST_LIMIT:-240} python3 -m pytest tests/test_topk.py -k "${ULD_TOPK_TESTS:-not torch}" -q -x -p no:warnings \
             -p no:cacheprovider 2>&1 | tail -4
           timeout 100 python3 -m pytest tests/test_distill.py -k "top_k or truncat or topk" -q -x -p no:warnings \
             -p no:cacheprovider 2>&1 | tail -4 ;;
    bench) timeout 200 python3 bench/bench_topk.py --rows 16384 --k 100 1000 --temperature 2.0 2>&1 ;;
    profile) timeout 150 python3 bench/profile_topk.py --rows 16384 --k 100 --configs 1024:4:4:1024 1024:4:4:1024:1:0:0 \
               2048:4:4:1024:1:0:16 1024:4:4:1024:1:96:16 1024:4:4:1024:1:80:16 2>&1
             timeout 60 python3 bench/profile_topk.py --rows 16384 --k 1000 --configs 1024:4:4:1024 2>&1 | tail -1
             timeout 60 python3 bench/profile_topk.py --rows 16384 --k 100 --dtype float32 --configs 1024:4:4:1024 2>&1 | tail -1 ;;
    caps) # register caps (6 programs an SM at 80: the shared array allows 6), bf16, float32, k = 1,000
          timeout 150 python3 bench/profile_topk.py --rows 16384 --k 100 --configs 1024:4:4:1024:1:0:16 1024:4:4:1024:1:80:16 \
            1024:4:4:1024:1:72:16 1024:4:4:1024:1:64:16 2>&1
          timeout 80 python3 bench/profile_topk.py --rows 16384 --k 100 --dtype float32 --configs 1024:4:4:1024:1:0:16 \
            1024:4:4:1024:1:80:16 2>&1
          timeout 80 python3 bench/profile_topk.py --rows 16384 --k 1000 --configs 1024:4:4:1024:1:0:16 1024:4:4:1024:1:80:16 \
            2>&1 ;;
    narrow) # the guess on rows under 65,536 columns (sample 0: off), with and without the register cap
          for vocab in "32000 32000" "50304 32000"; do
            timeout 100 python3 bench/profile_topk.py --rows 16384 --k 100 --vocab $vocab --configs 1024:4:4:1024 \
              1024:4:4:1024:1:80:0 1024:4:4:1024:1:0:16 1024:4:4:1024:1:0:0 2>&1
          done ;;
    ncu) ULD_STALL_SCRIPT=bench/profile_topk.py ULD_STALL_SPECS="--rows 2048 --k 100 --once" \
           OUT=/tmp/prof timeout 150 bash bench/profile_stalls.sh topk_rows 1 2>&1
         (cd /tmp/prof && tar czf "$OUT/prof_topk.tgz" lines_*.csv details_*.txt) ;;
  esac
  echo "== $step done at $(( $(date +%s) - t0 )) s"
done
nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv
