"""Where the time goes: GPU time per kernel of one forward+backward, from torch.profiler.

    python bench/profile_passes.py [--rows 16384] [--pairs qwen_llama3 qwen_qwen | --vocabs VS VT] [--kinds ...]

Prints, per (pair, kind), each kernel's total device time over one call (after warm-up), the
trie depth statistics of the rows (status >> 1) and, for bf16 rows in the histogram engine,
how many rows it flagged (the trie fallback's), so a change can be aimed at the pass that
costs most.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.shapes import KINDS, VOCAB_PAIRS, make_rows, pair_kinds  # noqa: E402
from uld_kernels import launch  # noqa: E402
from uld_kernels.launch import uld_rows  # noqa: E402


def kernel_times(fn) -> dict:
    """GPU time (microseconds) and launches of each kernel of one call of fn, by name."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    per_kernel = collections.defaultdict(lambda: [0.0, 0, []])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = per_kernel[event.name[:60]]
            t = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
            entry[0] += t
            entry[1] += 1
            entry[2].append(t)
    return per_kernel


def print_kernel_times(per_kernel: dict):
    """Each kernel's total, and its launches one by one in their order where there are a few
    (hist_kernel's first launch and REDO, batch by batch)."""
    for name, (t, n, each) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0]):
        launches = f"  ({' '.join(f'{x / 1e3:.3f}' for x in each)})" if 1 < n <= 8 else ""
        print(f"  {t / 1e3:8.3f} ms  {n:4d} launches  {name}{launches}")


def one_call(student, teacher, temperature=1.0):
    return uld_rows(student, teacher, temperature, temperature, True, False, 1.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--pairs", nargs="+", default=["qwen_llama3", "qwen_qwen"], choices=list(VOCAB_PAIRS))
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--temperature", type=float, default=1.0, help="both sides' softmax temperature")
    parser.add_argument("--vocabs", type=int, nargs=2, metavar=("VS", "VT"),
                        help="one pair of these vocabularies instead of --pairs (e.g. scaling.py's 32000 32000)")
    args = parser.parse_args()
    temperature = args.temperature
    shapes = pair_kinds(args.pairs, args.kinds)
    if args.vocabs:
        shapes = [(f"{args.vocabs[0]}_{args.vocabs[1]}", *args.vocabs, kind) for kind in args.kinds]
    for pair, vs, vt, kind in shapes:
        student, teacher = make_rows(kind, args.rows, vs, vt, seed=1)
        for _ in range(2):
            _, status, _, _ = one_call(student, teacher, temperature)
        per_kernel = kernel_times(lambda: one_call(student, teacher, temperature))
        total = sum(t for t, *_ in per_kernel.values())
        depth = (status >> 1).float()
        flagged = ""
        if launch.ENGINE == "hist" and student.dtype == torch.bfloat16:  # rows the trie fallback took
            flags = launch.hist_rows(student, teacher, temperature, temperature, True, False, 1.0, fallback=False)[1]
            flagged = f"; flagged rows {int((flags != 0).sum())}"
        print(f"\n{pair} {kind} T={temperature} rows={args.rows}: {total / 1e3:.2f} ms of kernels; trie depth mean "
              f"{depth.mean():.2f} max {int(depth.max())}; exhausted rows {int((status & 1).sum())}{flagged}")
        print_kernel_times(per_kernel)
        del student, teacher
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
