"""Where a call's host time goes: one forward+backward of `uld_loss`, measured from the host.

    python bench/profile_host.py [--rows 16384] [--pairs qwen_llama3 qwen_qwen] [--kinds ...]

Per (pair, kind): the call's median wall time (do_bench), the host's time to enqueue it
(the GPU idle before it starts), the GPU's time for it (CUDA events), the driver calls a call
makes (kernel launches, synchronisations, allocations, copies: torch.profiler's CPU events)
and, with --cprofile, the Python functions that take the host's time. With --timeline, the
GPU's timeline of one call after do_bench's cache flush (each kernel's start, duration and the
idle gap before it) and the caching allocator's device allocations and retries over 20 calls.
With --layers, the host's time per call of each layer of the call, outermost first, on rows
few enough (--layer-rows) that the GPU never holds the host back: what each layer adds.
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


def layer_host_us(student, teacher, calls: int = 200, rounds: int = 5) -> list[tuple[str, float]]:
    """Host time per call (us) of each layer of a forward+backward: the least over `rounds`
    rounds (the layers interleaved) of the mean over `calls` back-to-back calls."""
    from uld_kernels import launch
    from uld_kernels.autograd import _FUNCTIONS, ULDFunction

    n = student.shape[0]
    grad = torch.empty_like(student)
    one = torch.ones((), device=student.device)
    small = torch.zeros(8, device=student.device, requires_grad=True)

    def hist_pairs():
        return launch.hist_pairs(student, teacher, 1.0, 1.0, True, False, 1.0 / n, fallback=False)

    kernels = {k: getattr(launch.uld_hist, k) for k in ("hist_kernel", "sign_kernel", "finish_kernel", "grad_kernel")}

    def stubbed():  # every kernel of the histogram engine a no-op: the rest of hist_pairs is Python
        for k in kernels:
            setattr(launch.uld_hist, k, _NoLaunch())
        try:
            return _host_us(hist_pairs, calls)
        finally:
            for k, kernel in kernels.items():
                setattr(launch.uld_hist, k, kernel)

    def timed(fn):
        return lambda: _host_us(fn, calls)

    layers = [  # (name, its host time per call)
        ("uld_loss + autograd.grad", timed(lambda: torch.autograd.grad(uld_loss(student, teacher), student))),
        ("uld_loss (forward, graph kept)", timed(lambda: uld_loss(student, teacher))),
        ("  autograd.grad alone (forward untimed)", lambda: _host_us(
            lambda loss: torch.autograd.grad(loss, student), calls, setup=lambda: uld_loss(student, teacher))),
        ("  autograd.grad of x.sum() (the engine)", timed(lambda: torch.autograd.grad(small.sum(), small))),
        ("ULDFunction.apply (no checks)", timed(lambda: ULDFunction.apply(student, teacher, 1.0, 1.0, "mean", True))),
        ("torch.ops.uld_kernels.uld_loss", timed(lambda: torch.ops.uld_kernels.uld_loss(
            student, teacher, 1.0, 1.0, "mean", True, False))),
        ("  its Python function, no dispatcher", timed(lambda: _FUNCTIONS["uld_loss"][0](
            student, teacher, 1.0, 1.0, "mean", True, False))),
        ("launch.uld_rows", timed(lambda: launch.uld_rows(student, teacher, 1.0, 1.0, True, False, 1.0 / n))),
        ("launch.hist_pairs, no fallback", timed(hist_pairs)),
        ("  the same, Triton launches stubbed", stubbed),
        ("torch.ops.uld_kernels.scale_rows_", timed(lambda: torch.ops.uld_kernels.scale_rows_(grad, one))),
        ("  its Python function, no dispatcher", timed(lambda: _FUNCTIONS["scale_rows_"][0](grad, one))),
        ("launch.scale_rows_", timed(lambda: launch.scale_rows_(grad, one.reshape(-1)))),
    ]
    best = [float("inf")] * len(layers)
    for _ in range(rounds):
        for i, (_name, host_us) in enumerate(layers):
            best[i] = min(best[i], host_us())
    return [(name, us) for (name, _), us in zip(layers, best)]


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _host_us(fn, calls: int, setup=None) -> float:
    """Mean host time of fn over back-to-back calls; with `setup`, fn takes setup()'s result,
    made before each call and not timed."""
    for _ in range(20):
        fn() if setup is None else fn(setup())
    torch.cuda.synchronize()
    host = 0.0
    if setup is None:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host = time.perf_counter() - t0
    else:
        for _ in range(calls):
            x = setup()
            t0 = time.perf_counter()
            fn(x)
            host += time.perf_counter() - t0
    torch.cuda.synchronize()
    return host * 1e6 / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--pairs", nargs="+", default=["qwen_llama3", "qwen_qwen"], choices=list(VOCAB_PAIRS))
    parser.add_argument("--kinds", nargs="+", default=["random", "near"], choices=list(KINDS))
    parser.add_argument("--cprofile", type=int, default=15, help="Python functions to list (0: none)")
    parser.add_argument("--timeline", action="store_true", help="the GPU timeline of one call, and allocator counts")
    parser.add_argument("--layers", action="store_true", help="host time of each layer of a call, then exit")
    parser.add_argument("--layer-rows", type=int, default=64)
    args = parser.parse_args()
    if args.layers:
        for pair, vs, vt, kind in pair_kinds(args.pairs, args.kinds):
            student, teacher = make_rows(kind, args.layer_rows, vs, vt, seed=vs + vt)
            student.requires_grad_(True)
            print(f"== {pair} {kind} rows={args.layer_rows}: host us per call, back to back")
            for name, us in layer_host_us(student, teacher):
                print(f"   {name:40} {us:8.1f} us")
        return
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
