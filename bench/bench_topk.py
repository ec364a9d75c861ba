"""The truncated variant (``uld_loss(..., top_k=k)``) timed beside the exact fused loss on the
same rows: forward+backward medians (``triton.testing.do_bench``) and peak extra memory.

    python bench/bench_topk.py --rows 16384 --k 100 --temperature 2.0
"""

from __future__ import annotations

import argparse

import torch
import triton.testing

from uld_kernels import uld_loss


def _measure(student, teacher, **options):
    def step():
        student.grad = None
        uld_loss(student, teacher, **options).backward()

    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9
    return triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median"), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--vocab", type=int, nargs=2, default=(151936, 128256), metavar=("VS", "VT"))
    parser.add_argument("--k", type=int, nargs="+", default=[100])
    parser.add_argument("--temperature", type=float, default=2.0)
    args = parser.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    student = torch.randn(args.rows, args.vocab[0], device="cuda", generator=g).bfloat16().requires_grad_(True)
    teacher = torch.randn(args.rows, args.vocab[1], device="cuda", generator=g).bfloat16()
    print(f"{args.rows} rows, Vs {args.vocab[0]}, Vt {args.vocab[1]}, bf16 random N(0, 1), T = {args.temperature}")
    print("| loss | fwd+bwd ms (median) | peak extra GB (the gradient included) |\n|---|---|---|")
    temperatures = dict(student_temperature=args.temperature, teacher_temperature=args.temperature)
    for k in [None, *args.k]:
        ms, gb = _measure(student, teacher, top_k=k, **temperatures)
        print(f"| {'exact (fused)' if k is None else f'top_k={k}'} | {ms:.2f} | {gb:.2f} |")


if __name__ == "__main__":
    main()
