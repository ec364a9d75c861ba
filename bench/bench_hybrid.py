"""The hybrid loss (``uld_loss_hybrid``, TRL GOLD's ``uld_use_hybrid_loss``; PyTorch by chunks)
timed beside the exact fused loss and the plain PyTorch definition (the float32 reference:
softmax, gathers, ``torch.sort``, autograd through it, the whole batch at once, as TRL runs
it): forward+backward medians (``triton.testing.do_bench``) and peak extra memory; then the
training loss (``ULDLoss(hybrid=...)``) on bench_distill.py's labelled batch (B = 8, L = 2,048).

The shared tokens are ``--shared`` random columns of each side (the count is a parameter:
no tokenizer is read here).

    python bench/bench_hybrid.py --rows 4096 --shared 100000
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_distill import labelled_batch  # noqa: E402
from bench.bench_topk import _measure  # noqa: E402
from reference.uld import uld_hybrid_row_losses_reference  # noqa: E402
from uld_kernels import HybridULD, ULDLoss, VocabMatch, uld_loss_hybrid  # noqa: E402


def _reference_loss(student, teacher, match, **options):
    return uld_hybrid_row_losses_reference(student.float(), teacher.float(), *match.on(student.device),
                                           **options).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, nargs=2, default=(151936, 128256), metavar=("VS", "VT"))
    parser.add_argument("--shared", type=int, default=100000)
    parser.add_argument("--reference-rows", type=int, default=1024,
                        help="rows for the plain PyTorch definition (its memory grows with rows x vocabulary)")
    args = parser.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    student = torch.randn(args.rows, args.vocab[0], device="cuda", generator=g).bfloat16().requires_grad_(True)
    teacher = torch.randn(args.rows, args.vocab[1], device="cuda", generator=g).bfloat16()
    cpu = torch.Generator().manual_seed(0)
    match = VocabMatch(torch.randperm(args.vocab[0], generator=cpu)[:args.shared],
                       torch.randperm(args.vocab[1], generator=cpu)[:args.shared])
    print(f"{args.rows} rows, Vs {args.vocab[0]}, Vt {args.vocab[1]}, {args.shared} shared tokens, bf16 random N(0, 1)")
    print("| loss | rows | fwd+bwd ms (median) | peak extra GB (the gradient included) |\n|---|---|---|---|")
    ms, gb = _measure(student, teacher)
    print(f"| exact ULD (fused) | {args.rows} | {ms:.2f} | {gb:.2f} |")
    for name, options in (("hybrid, TRL defaults", {}),
                          ("hybrid, NeMo gold (beta 0, top 8192, floor 0)",
                           dict(beta=0.0, matched_weight=1.0, unmatched_weight=1.0, unmatched_top=8192,
                                prob_floor=0.0))):
        ms, gb = _measure(student, teacher, uld_loss_hybrid, match, **options)
        print(f"| {name}, PyTorch chunks | {args.rows} | {ms:.2f} | {gb:.2f} |")
    n = args.reference_rows
    s_ref = student.detach()[:n].clone().requires_grad_(True)
    ms, gb = _measure(s_ref, teacher[:n], _reference_loss, match)
    print(f"| hybrid, TRL defaults, plain PyTorch (float32 reference) | {n} | {ms:.2f} | {gb:.2f} |")
    ours = uld_loss_hybrid(student[:n], teacher[:n], match, reduction="none")
    ref = uld_hybrid_row_losses_reference(student[:n].detach().double(), teacher[:n].double(), *match.on("cuda"))
    print(f"| hybrid, TRL defaults: largest row difference from the float64 reference | {n} | "
          f"{(ours.double() - ref).abs().max().item():.2e} | |")
    del student, teacher, s_ref, ours, ref
    student, teacher, s_labels, t_labels = labelled_batch(8, 2048, *args.vocab)
    student = student.requires_grad_(True)
    print(f"\ntraining loss, B = 8, L = 2,048, Vs {args.vocab[0]}, Vt {args.vocab[1]}, peaked rows, T = 1")
    print("| ULDLoss | fwd+bwd ms (median) | peak extra GB (the gradient included) |\n|---|---|---|")
    for name, hybrid in (("exact (fused)", None), ("hybrid, TRL defaults", HybridULD(match))):
        ms, gb = _measure(student, teacher, ULDLoss(hybrid=hybrid), s_labels, t_labels)
        print(f"| {name} | {ms:.2f} | {gb:.2f} |")


if __name__ == "__main__":
    main()
