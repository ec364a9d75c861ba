"""Where a call's host time goes: one forward+backward of `uld_loss`, measured from the host.

    python bench/profile_host.py [--rows 16384] [--pairs qwen_llama3 qwen_qwen] [--kinds ...]

Per (pair, kind): the call's median wall time (do_bench), the host's time to enqueue it
(the GPU idle before it starts), the GPU's time for it (CUDA events), the driver calls a call
makes (kernel launches, synchronisations, allocations, copies: torch.profiler's CPU events)
and, with --cprofile, the Python functions that take the host's time. With --timeline, the
GPU's timeline of one call after do_bench's cache flush (each kernel's start, duration and the
idle gap before it) and the caching allocator's device allocations and retries over 20 calls.
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import io
import os
import pstats
import statistics
import sys
import time

import torch
import triton
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.shapes import KINDS, VOCAB_PAIRS, make_rows, pair_kinds  # noqa: E402
from uld_kernels import uld_loss  # noqa: E402

DRIVER_CALLS = ("LaunchKernel", "Synchronize", "Malloc", "Free", "Memcpy", "Memset", "EventQuery")


def host_and_gpu_ms(fn, calls: int = 10) -> tuple[float, float]:
    """Medians of the host's enqueue time and the GPU's time of fn, each call on an idle GPU."""
    host, gpu = [], []
    for _ in range(calls):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end))
    return statistics.median(host), statistics.median(gpu)


def driver_calls(fn) -> dict:
    """Count and host time (us) of the CUDA runtime and driver calls of one call of fn."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    calls = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CPU and any(k in event.name for k in DRIVER_CALLS):
            calls[event.name][0] += 1
            calls[event.name][1] += event.cpu_time_total
    return calls


def gpu_timeline(fn) -> list[tuple[str, float, float]]:
    """(kernel, start us from the first kernel, duration us) of one call of fn, after
    do_bench's flush of the L2 (a 256 MB write) as in the timed calls."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        flush.zero_()
        fn()
        torch.cuda.synchronize()
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    t0 = kernels[1][0] if len(kernels) > 1 else 0.0  # the first is the flush
    return [(name, start - t0, end - start) for start, end, name in kernels[1:]]


def allocator_counts(fn, calls: int = 20) -> dict:
    """Device allocations, frees and allocation retries of the caching allocator over calls."""
    keys = ("num_device_alloc", "num_device_free", "num_alloc_retries")
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    after = torch.cuda.memory_stats()
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--pairs", nargs="+", default=["qwen_llama3", "qwen_qwen"], choices=list(VOCAB_PAIRS))
    parser.add_argument("--kinds", nargs="+", default=["random", "near"], choices=list(KINDS))
    parser.add_argument("--cprofile", type=int, default=15, help="Python functions to list (0: none)")
    parser.add_argument("--timeline", action="store_true", help="the GPU timeline of one call, and allocator counts")
    args = parser.parse_args()
    for pair, vs, vt, kind in pair_kinds(args.pairs, args.kinds):
        student, teacher = make_rows(kind, args.rows, vs, vt, seed=args.rows + vs + vt)
        student.requires_grad_(True)

        def call():
            return torch.autograd.grad(uld_loss(student, teacher), student)

        wall = triton.testing.do_bench(call, warmup=50, rep=300, return_mode="median")
        host, gpu = host_and_gpu_ms(call)
        print(f"== {pair} {kind} rows={args.rows}: wall {wall:.2f} ms, host enqueue {host:.2f} ms, "
              f"GPU {gpu:.2f} ms", flush=True)
        for name, (count, us) in sorted(driver_calls(call).items(), key=lambda kv: -kv[1][1]):
            print(f"   {name[:40]:40} x{count:4d}  {us / 1e3:7.2f} ms host")
        if args.timeline:
            print(f"   allocator over 20 calls: {allocator_counts(call)}")
            end = 0.0
            for name, start, dur in gpu_timeline(call):
                print(f"   {start:9.1f} us  +{dur:8.1f} us  gap {start - end:7.1f} us  {name[:60]}")
                end = start + dur
        if args.cprofile:
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(5):
                call()
            prof.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.cprofile)
            lines = [line for line in text.getvalue().splitlines() if line.strip()]
            start = next(i for i, line in enumerate(lines) if "ncalls" in line)
            print("   cProfile, 5 calls, by own time:")
            for line in lines[start:]:
                print("   " + line[:150])
        del student, teacher
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
