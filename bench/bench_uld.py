"""Benchmark: uld_kernels against the PyTorch reference and torch.compile of it, on a GPU.

Measures, with ``triton.testing.do_bench`` (median over interleaved rounds), per (rows, vocabulary pair, kind of
rows, implementation): forward without grad, forward with grad, backward (= forward+backward
minus forward with grad), forward+backward, and the peak device memory taken beyond the
inputs and the gradient. Reports achieved GB/s of forward+backward (bytes a fused pass must
move: read both logit rows once, write the student gradient once) beside a device-to-device
copy bandwidth measured in the same run. Writes a CSV and a PNG plot.

    python bench/bench_uld.py                       # the full table (about 10 minutes)
    python bench/bench_uld.py --quick               # one shape per kind, a smoke run
    python bench/bench_uld.py --rows 16384 --pairs qwen_llama3 --impls uld_kernels
    python bench/bench_uld.py --rows 16384 --pairs qwen_qwen --kinds random --impls uld_kernels liger_jsd
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import functools
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.shapes import KINDS, VOCAB_PAIRS, make_rows  # noqa: E402
from reference import uld_loss_reference  # noqa: E402
from uld_kernels import uld_loss  # noqa: E402


def _compiled_reference():
    return torch.compile(uld_loss_reference, dynamic=False)


def _liger_jsd():
    """Liger-Kernel's fused JSD (a comparison, never a dependency: carried to the GPU as a
    wheel). It takes log-probabilities of one shared vocabulary; `run` gives it bf16
    log-softmaxes of the same rows, computed outside the timed region, so it moves the same
    bytes as ULD on a same-vocabulary pair."""
    from liger_kernel.ops import LigerJSDFunction

    return lambda log_q, log_p: LigerJSDFunction.apply(log_q, log_p)


IMPLS = {
    "uld_kernels": lambda: uld_loss,
    "reference": lambda: uld_loss_reference,
    "reference_compiled": _compiled_reference,
    "liger_jsd": _liger_jsd,
}
# Implementations that take log-probabilities of one vocabulary, not logits.
LOG_PROB_IMPLS = {"liger_jsd"}


@dataclass
class Result:
    impl: str
    rows: int
    pair: str
    student_vocab: int
    teacher_vocab: int
    kind: str
    fwd_ms: float
    fwd_grad_ms: float
    bwd_ms: float
    fwd_bwd_ms: float
    peak_extra_gb: float
    gbps: float
    loss: float


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of 4 GiB, counting bytes read plus bytes written."""
    src = torch.empty(2**31, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    gbps = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return gbps


ROUNDS = 3  # interleaved rounds of the timed modes (measure)


def measure(impl_name, fn, student, teacher, warmup, rep, full_only=False) -> tuple[float, ...]:
    def forward_no_grad():
        with torch.no_grad():
            return fn(student, teacher)

    def forward_with_grad():
        return fn(student, teacher)

    def forward_backward():
        loss = fn(student, teacher)
        return torch.autograd.grad(loss, student)

    # The three modes in interleaved rounds, each mode's median over all its calls: an H200 at
    # its 700 W power limit lowers its SM clock within seconds of sustained load (1,980 ->
    # 1,845-1,905 MHz, 11th session), so medians taken one mode after the other compared
    # different clocks and made the backward column (their difference) up to 0.4 ms.
    modes = [forward_backward] if full_only else [forward_no_grad, forward_with_grad, forward_backward]
    times = [[] for _ in modes]
    for round_ in range(ROUNDS):  # every other round in reverse, so no mode always comes last
        order = range(len(modes)) if round_ % 2 == 0 else reversed(range(len(modes)))
        for m in order:
            times[m] += triton.testing.do_bench(modes[m], warmup=warmup, rep=max(1, rep // ROUNDS), return_mode="all")
    medians = [statistics.median(calls) for calls in times]
    nan = float("nan")
    fwd, fwd_grad, full = medians if not full_only else (nan, nan, medians[0])

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    (grad,) = forward_backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base - grad.numel() * grad.element_size()
    del grad
    with torch.no_grad():
        loss = float(fn(student, teacher))
    bwd = nan if full_only else max(full - fwd_grad, 0.0)
    return fwd, fwd_grad, bwd, full, peak / 1e9, loss


def run(args) -> list[Result]:
    results = []
    for pair in args.pairs:
        vs, vt = VOCAB_PAIRS[pair]
        for rows in args.rows:
            for kind in args.kinds:
                if KINDS[kind].same_vocab and vs != vt:
                    continue
                student, teacher = make_rows(kind, rows, vs, vt, seed=rows + vs + vt)
                if args.dtype != "bfloat16":  # float32: the bf16 rows upcast, as a training loop's `.float()`
                    student, teacher = student.float(), teacher.float()
                    if args.dtype == "float32-full":  # float32 values bf16 cannot hold (a float32 model's)
                        for x in (student, teacher):
                            x.add_(torch.randn_like(x) * x.abs() * 2.0 ** -12)
                student.requires_grad_(True)
                moved = (student.numel() * 2 + teacher.numel()) * student.element_size()
                for impl in args.impls:
                    if impl != "uld_kernels" and (kind not in args.reference_kinds or rows > args.reference_max_rows):
                        continue
                    inputs = (student, teacher)
                    if impl in LOG_PROB_IMPLS:
                        if vs != vt:
                            continue
                        with torch.no_grad():
                            inputs = tuple((x.float() / args.temperature).log_softmax(-1).to(x.dtype) for x in inputs)
                        inputs[0].requires_grad_(True)
                    fn = IMPLS[impl]()
                    if impl not in LOG_PROB_IMPLS and args.temperature != 1.0:
                        fn = functools.partial(fn, student_temperature=args.temperature,
                                               teacher_temperature=args.temperature)
                    try:
                        fwd, fwd_grad, bwd, full, peak, loss = measure(
                            impl, fn, *inputs, args.warmup, args.rep, args.full_only)
                    except torch.OutOfMemoryError:
                        print(f"{impl} {pair} rows={rows} {kind}: out of memory", flush=True)
                        torch.cuda.empty_cache()
                        continue
                    r = Result(impl, rows, pair, vs, vt, kind, fwd, fwd_grad, bwd, full, peak,
                               moved / (full * 1e-3) / 1e9, loss)
                    results.append(r)
                    print(f"{impl:>18} {pair:>14} rows={rows:>6} {kind:>10}: fwd {fwd:8.2f} ms  "
                          f"fwd(grad) {fwd_grad:8.2f}  fwd+bwd {full:8.2f} ms  {r.gbps:7.0f} GB/s  "
                          f"peak extra {peak:7.3f} GB  loss {loss:.6f}", flush=True)
                    del inputs
                    torch.cuda.empty_cache()
                del student, teacher
                torch.cuda.empty_cache()
    return results


def pyplot():
    """matplotlib.pyplot without a display, or None (and a message) where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return None
    return plt


def write_outputs(results: list[Result], copy_gbps: float, out_dir: str, header: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "bench_uld.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"# {header}; copy bandwidth {copy_gbps:.0f} GB/s"])
        writer.writerow(list(Result.__dataclass_fields__))
        for r in results:
            writer.writerow([getattr(r, k) for k in Result.__dataclass_fields__])
    table = [
        "| impl | rows | Vs / Vt | kind | fwd ms | fwd+bwd ms | bwd ms | GB/s (% copy) | peak extra GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        table.append(
            f"| {r.impl} | {r.rows} | {r.student_vocab} / {r.teacher_vocab} | {r.kind} | "
            f"{r.fwd_ms:.2f} | {r.fwd_bwd_ms:.2f} | {r.bwd_ms:.2f} | "
            f"{r.gbps:.0f} ({100 * r.gbps / copy_gbps:.0f}%) | {r.peak_extra_gb:.3f} |"
        )
    md = "\n".join([f"{header}; device-to-device copy: {copy_gbps:.0f} GB/s", "", *table])
    with open(os.path.join(out_dir, "bench_uld.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for impl in sorted({r.impl for r in results}):
        for kind in sorted({r.kind for r in results}):
            for pair in sorted({r.pair for r in results}):
                pts = sorted((r.rows, r.fwd_bwd_ms) for r in results
                             if r.impl == impl and r.kind == kind and r.pair == pair)
                if len(pts) > 1:
                    axes[0].plot(*zip(*pts), marker="o", label=f"{impl} {pair} {kind}")
    axes[0].set(xscale="log", yscale="log", xlabel="rows", ylabel="forward+backward ms (median)",
                title="time against rows")
    axes[0].legend(fontsize=6)
    ours = [r for r in results if r.impl == "uld_kernels"]
    labels = [f"{r.pair}\n{r.rows} {r.kind}" for r in ours]
    axes[1].bar(range(len(ours)), [100 * r.gbps / copy_gbps for r in ours])
    axes[1].set_xticks(range(len(ours)), labels, rotation=90, fontsize=5)
    axes[1].set(ylabel="% of copy bandwidth (fwd+bwd)", title="uld_kernels achieved bandwidth")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "bench_uld.png"), dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--pairs", nargs="+", default=list(VOCAB_PAIRS), choices=list(VOCAB_PAIRS))
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--impls", nargs="+", default=[i for i in IMPLS if i not in LOG_PROB_IMPLS],
                        choices=list(IMPLS), help="liger_jsd (same-vocabulary pairs only) needs liger-kernel")
    parser.add_argument("--reference-kinds", nargs="+", default=["random"],
                        help="row kinds on which the (slow) references run; their time does not depend on the data")
    parser.add_argument("--reference-max-rows", type=int, default=16384)
    parser.add_argument("--warmup", type=int, default=50, help="do_bench's warm-up, in milliseconds")
    parser.add_argument("--rep", type=int, default=300,
                        help="do_bench's timed calls, in milliseconds (300: ~25 calls at 12 ms; 10 times one)")
    parser.add_argument("--full-only", action="store_true", help="time forward+backward only")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="softmax temperature of both sides (above ~2.9 the masked kind is counted twice, shifted)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float32-full"],
                        help="logits: bf16; float32 holding the bf16 values (a bf16 model's logits upcast); "
                             "float32 with low bits too (a float32 model's)")
    parser.add_argument("--quick", action="store_true", help="2,048 rows, one pair, ours only")
    parser.add_argument("--out", default=os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "out")))
    args = parser.parse_args()
    if args.quick:
        args.rows, args.pairs, args.impls = [2048], ["qwen_llama3"], ["uld_kernels"]
    if not torch.cuda.is_available():
        sys.exit("bench_uld.py measures on a CUDA GPU; on CPU run `python -m uld_kernels.demo`")
    # The device machine gets the working tree without .git: pass ULD_COMMIT there.
    commit = os.environ.get("ULD_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
        cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
    header = (f"{dt.date.today()} {torch.cuda.get_device_name()} torch {torch.__version__} "
              f"triton {triton.__version__} commit {commit}: `python bench/bench_uld.py "
              f"{' '.join(sys.argv[1:])}`")
    copy_gbps = copy_bandwidth_gbps()
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s", flush=True)
    results = run(args)
    write_outputs(results, copy_gbps, args.out, header)


if __name__ == "__main__":
    main()
