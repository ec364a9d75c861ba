"""The truncated variant (``top_k=k``) timed beside the exact fused loss on the same rows:
forward+backward medians (``triton.testing.do_bench``) and peak extra memory, for
``uld_loss`` on aligned rows (the Triton select and PyTorch's chunks, which it replaces, and
how far their losses differ) and for the training loss (``ULDLoss``) on bench_distill.py's
labelled batch (B = 8, L = 2,048, Qwen2.5 / Llama-3), and ``uld_loss_teacher_topk`` against
the teacher rows' top-k log-probabilities (an offline teacher), also as a batch under a mask.

    python bench/bench_topk.py --rows 16384 --k 100 --temperature 2.0
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_distill import labelled_batch  # noqa: E402
from bench.shapes import VOCAB_PAIRS  # noqa: E402
from uld_kernels import ULDLoss, launch, uld_loss, uld_loss_teacher_topk  # noqa: E402


def _measure(student, teacher, loss=uld_loss, *labels, **options):
    def step():
        student.grad = None
        out = loss(student, teacher, *labels, **options)
        (out[0] if isinstance(out, tuple) else out).backward()

    step()
    student.grad = None  # the base holds the inputs only: the step's gradient counts in its peak
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
    ms, gb = _measure(student, teacher, **temperatures)
    print(f"| exact (fused) | {ms:.2f} | {gb:.2f} |")
    triton_max_k = launch.TOPK_MAX_K
    for k in args.k:
        losses = {}
        for engine, max_k in (("Triton select", triton_max_k), ("PyTorch chunks", 0)):
            launch.TOPK_MAX_K = max_k
            ms, gb = _measure(student, teacher, top_k=k, **temperatures)
            with torch.no_grad():
                losses[engine] = uld_loss(student, teacher, top_k=k, reduction="none", **temperatures)
            print(f"| top_k={k}, {engine} | {ms:.2f} | {gb:.2f} |")
        launch.TOPK_MAX_K = triton_max_k
        diff = (losses["Triton select"] - losses["PyTorch chunks"]).abs().max().item()
        print(f"| top_k={k}: the engines' largest row loss difference | {diff:.2e} | |")
    # An offline teacher's top-K log-probabilities (uld_loss_teacher_topk): the teacher's
    # K values of log_softmax at T, the student's full softmax at T against them
    for k in args.k:
        logprobs = (teacher.float() / args.temperature).log_softmax(dim=-1).topk(k, dim=-1).values
        losses = {}
        for engine, max_k in (("Triton select", triton_max_k), ("PyTorch chunks", 0)):
            launch.TOPK_MAX_K = max_k
            ms, gb = _measure(student, logprobs, uld_loss_teacher_topk, student_temperature=args.temperature)
            with torch.no_grad():
                losses[engine] = uld_loss_teacher_topk(student, logprobs, student_temperature=args.temperature,
                                                       reduction="none")
            print(f"| teacher top-{k} log-probs, {engine} | {ms:.2f} | {gb:.2f} |")
        launch.TOPK_MAX_K = triton_max_k
        diff = (losses["Triton select"] - losses["PyTorch chunks"]).abs().max().item()
        print(f"| teacher top-{k}: the engines' largest row loss difference | {diff:.2e} | |")
        # The same rows as a batch of 8 sequences under a mask (the second half of each: the
        # answer tokens), read in place by index
        batch, vocab = 8, student.shape[-1]
        mask = (torch.arange(args.rows // batch, device="cuda") >= args.rows // batch // 2).expand(batch, -1)

        def masked(s, lp, **options):
            return uld_loss_teacher_topk(s.view(batch, -1, vocab), lp.view(batch, -1, k), mask=mask, **options)

        ms, gb = _measure(student, logprobs, masked, student_temperature=args.temperature)
        with torch.no_grad():
            rows = masked(student, logprobs, student_temperature=args.temperature, reduction="none")
        diff = (rows[mask] - losses["Triton select"].view(batch, -1)[mask]).abs().max().item()
        print(f"| teacher top-{k}, [8, {args.rows // batch}] rows, half masked, Triton select | {ms:.2f} | {gb:.2f} |")
        print(f"| teacher top-{k} masked: largest difference from the same rows unmasked | {diff:.2e} | |")
        del logprobs
    del student, teacher
    vs, vt = VOCAB_PAIRS["qwen_llama3"][:2]
    student, teacher, s_labels, t_labels = labelled_batch(8, 2048, vs, vt)
    student = student.requires_grad_(True)
    print(f"\ntraining loss, B = 8, L = 2,048, Vs {vs}, Vt {vt}, peaked rows, T = {args.temperature}")
    print("| ULDLoss | fwd+bwd ms (median) | peak extra GB (the gradient included) |\n|---|---|---|")
    for k in [None, *args.k]:
        uld = ULDLoss(top_k=k, alignment="trl_observed", **temperatures)
        ms, gb = _measure(student, teacher, uld, s_labels, t_labels)
        print(f"| {'exact (fused)' if k is None else f'top_k={k}'} | {ms:.2f} | {gb:.2f} |")


if __name__ == "__main__":
    main()
