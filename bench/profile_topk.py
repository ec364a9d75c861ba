"""Where the top_k kernels' time goes: the forward select (``topk_rows_kernel``) and the
backward (``topk_grad_kernel``) timed apart (``triton.testing.do_bench`` medians) on the bench
rows, for each block size, warp count and sort factor (``launch.TOPK_SORT_FACTOR``; 0: every
level of the select) and bin chunk (``launch.TOPK_BIN_CHUNK``) given.

    python bench/profile_topk.py --rows 16384 --k 100 --configs 1024:4:4 1024:4:0

``--once``: one forward (student saved) and one backward after a first call of each, nothing
timed, for Nsight Compute (`ULD_STALL_SCRIPT=bench/profile_topk.py bash bench/profile_stalls.sh
topk_rows 1`, specs such as ``--rows 2048 --k 100 --once``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uld_kernels import launch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--vocab", type=int, nargs=2, default=(151936, 128256), metavar=("VS", "VT"))
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--configs", nargs="+", default=["1024:4:4"], help="BLOCK:num_warps:sort factor[:bins of the shared histogram read at a time, a power of two[:prefetch 0/1[:maxnreg, 0 none[:blocks sampled, 0 none]]]]; fields left out: launch's defaults (its register cap included)")
    parser.add_argument("--once", action="store_true", help="two calls of each kernel, untimed (for a profiler)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    student = torch.randn(args.rows, args.vocab[0], device="cuda", generator=g).to(dtype)
    teacher = torch.randn(args.rows, args.vocab[1], device="cuda", generator=g).to(dtype)
    upstream = torch.ones(args.rows, device="cuda")
    if args.once:
        for _ in range(2):
            _, saved = launch.topk_rows(student, teacher, args.k, 2.0, 2.0, (True, False))
            launch.topk_grad(student, None, saved[0], upstream, 2.0, args.k)
        torch.cuda.synchronize()
        return
    print(f"{args.rows} rows, Vs {args.vocab[0]}, Vt {args.vocab[1]}, {args.dtype} N(0, 1), k = {args.k}, T = 2")
    print("| BLOCK:warps:sort factor:bin chunk[:prefetch:maxnreg:sample] | forward, no save (ms) | forward, student saved (ms) | backward, student (ms) |\n|---|---|---|---|")
    for config in args.configs:
        parts = [int(x) for x in config.split(":")]
        # (fields left out: the kernel as shipped, launch's cap included; an explicit maxnreg 0: no cap)
        defaults = [1024, 4, 4, 1024, 1, launch.TOPK_MAXNREG or 0, launch.TOPK_SAMPLE]
        block, warps, factor, chunk, prefetch, maxnreg, sample = parts + defaults[len(parts):]
        launch.TOPK_BLOCK, launch.TOPK_WARPS, launch.TOPK_SORT_FACTOR, launch.TOPK_BIN_CHUNK = block, warps, factor, chunk
        launch.TOPK_PREFETCH, launch.TOPK_MAXNREG, launch.TOPK_SAMPLE = bool(prefetch), maxnreg or None, sample
        fwd = triton.testing.do_bench(lambda: launch.topk_rows(student, teacher, args.k, 2.0, 2.0, (False, False)),
                                      warmup=25, rep=200, return_mode="median")
        fwd_save = triton.testing.do_bench(lambda: launch.topk_rows(student, teacher, args.k, 2.0, 2.0, (True, False)),
                                           warmup=25, rep=200, return_mode="median")
        _, saved = launch.topk_rows(student, teacher, args.k, 2.0, 2.0, (True, False))
        bwd = triton.testing.do_bench(lambda: launch.topk_grad(student, None, saved[0], upstream, 2.0, args.k),
                                      warmup=25, rep=200, return_mode="median")
        print(f"| {config} | {fwd:.2f} | {fwd_save:.2f} | {bwd:.2f} |")


if __name__ == "__main__":
    main()
