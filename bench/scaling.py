"""Issue 3's scaling check: forward+backward time of uld_kernels against rows and against
vocabulary (GPU; bf16 random rows), with the peak extra memory, as a table and a plot.

    python bench/scaling.py [--rows 2048 4096 8192 16384 32768 65536] [--vocabs 32000 65536 131072 262144]

Rows vary at Qwen2.5 / Llama-3 vocabularies (151,936 / 128,256); vocabularies vary on both
sides at once at --vocab-rows rows. Linear scaling shows as a flat "ns per row" (or "ns per
1k columns") column and as a straight line of slope 1 on the log-log plot.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_uld import IMPLS, measure, pyplot  # noqa: E402
from bench.shapes import VOCAB_PAIRS, make_rows  # noqa: E402


def time_shape(rows: int, vs: int, vt: int, warmup: int, rep: int) -> tuple[float, float]:
    """(forward+backward ms, peak extra GB) of uld_kernels on fresh random rows."""
    student, teacher = make_rows("random", rows, vs, vt, seed=rows + vs + vt)
    student.requires_grad_(True)
    impl = IMPLS["uld_kernels"]()
    for _ in range(3):  # (untimed; they did not remove the slow first point of each series: bench/NOTES.md, Next 6)
        torch.autograd.grad(impl(student, teacher), student)
    _fwd, _fwd_grad, _bwd, full, peak, _loss = measure("uld_kernels", impl, student, teacher,
                                                       warmup, rep, full_only=True)
    del student, teacher
    torch.cuda.empty_cache()
    return full, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 65536, 131072, 262144])
    parser.add_argument("--vocab-rows", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--rep", type=int, default=300)
    parser.add_argument("--out", default=os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "out")))
    args = parser.parse_args()
    vs, vt = VOCAB_PAIRS["qwen_llama3"]
    lines = ["| rows | Vs / Vt | fwd+bwd ms | ns per row | peak extra GB |", "|---|---|---|---|---|"]
    by_rows = []
    for rows in args.rows:
        ms, peak = time_shape(rows, vs, vt, args.warmup, args.rep)
        by_rows.append((rows, ms))
        lines.append(f"| {rows:,} | {vs:,} / {vt:,} | {ms:.2f} | {ms * 1e6 / rows:.0f} | {peak:.3f} |")
        print(lines[-1], flush=True)
    lines += ["", "| rows | V (both sides) | fwd+bwd ms | ns per 1k columns | peak extra GB |", "|---|---|---|---|---|"]
    by_vocab = []
    for vocab in args.vocabs:
        ms, peak = time_shape(args.vocab_rows, vocab, vocab, args.warmup, args.rep)
        by_vocab.append((vocab, ms))
        lines.append(f"| {args.vocab_rows:,} | {vocab:,} | {ms:.2f} | {ms * 1e6 / (vocab / 1e3):.0f} | {peak:.3f} |")
        print(lines[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scaling.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plt = pyplot()
    if plt is None:
        return
    from matplotlib.ticker import NullFormatter
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, points, xlabel, title in (
            (axes[0], by_rows, "rows", f"Vs / Vt = {vs:,} / {vt:,}"),
            (axes[1], by_vocab, "vocabulary (both sides)", f"{args.vocab_rows:,} rows")):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label="uld_kernels")
        ax.plot(xs, [ys[0] * x / xs[0] for x in xs], linestyle="--", color="gray", label="linear from the first")
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="forward+backward ms (median)", title=title)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "scaling.png"), dpi=110)


if __name__ == "__main__":
    main()
