"""Issue 4's benchmark: the whole training loss (CE + ULD, forward+backward) on a labelled batch.

Compares, on one GPU, B = 8, Ls = Lt = 2,048, Qwen2.5 student / Llama-3 teacher, bf16:
  - uld_kernels.ULDLoss (rows gathered by index, CE fused);
  - the v1 row kernel (uld_kernels.uld_loss) on the same, already gathered, aligned rows;
  - the paper-code-style PyTorch loss (reference.paper, softmax/sort/pad/L1 + F.cross_entropy).

    python bench/bench_distill.py [--batch 8 --length 2048] [--skip-reference]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.profile_passes import kernel_times, print_kernel_times  # noqa: E402
from bench.shapes import VOCAB_PAIRS, make_rows  # noqa: E402
from reference.paper import uld_distillation_loss_reference  # noqa: E402
from uld_kernels import ULDLoss, uld_loss  # noqa: E402
from uld_kernels.alignment import pair_rows  # noqa: E402


def labelled_batch(batch, length, vs, vt, seed=0):
    g = torch.Generator().manual_seed(seed)
    student, teacher = make_rows("peaked", batch * length, vs, vt, seed=seed)
    s_labels = torch.full((batch, length), -100)
    t_labels = torch.full((batch, length), -100)
    for b in range(batch):
        prompt_s = int(torch.randint(64, 512, (1,), generator=g))
        prompt_t = prompt_s + int(torch.randint(-32, 32, (1,), generator=g))
        answer = int(torch.randint(length // 2, length - 600, (1,), generator=g))
        s_labels[b, prompt_s:prompt_s + answer] = torch.randint(0, vs, (answer,), generator=g)
        t_labels[b, prompt_t:prompt_t + answer + 7] = torch.randint(0, vt, (answer + 7,), generator=g)
    return (student.view(batch, length, vs), teacher.view(batch, length, vt),
            s_labels.cuda(), t_labels.cuda())


def host_ms(fn, calls: int = 10) -> float:
    """Median host time of one call, without waiting for the GPU: when it nears the kernels'
    time, the call is bound by launches, not by the GPU."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also print each case's kernels (GPU time)")
    args = parser.parse_args()
    vs, vt = VOCAB_PAIRS["qwen_llama3"]
    student, teacher, s_labels, t_labels = labelled_batch(args.batch, args.length, vs, vt)
    student.requires_grad_(True)
    uld = ULDLoss(distillation_weight=1.5, skip_student_eos=True)
    pairs = pair_rows(s_labels, t_labels, ignore_index=-100, skip_student_eos=True,
                      skip_teacher_eos=False, alignment="paper")
    keep = pairs.student_index >= 0
    rows_s = student.detach().view(-1, vs)[pairs.student_index[keep]].requires_grad_(True)
    rows_t = teacher.view(-1, vt)[pairs.teacher_index[keep]]

    def full():
        return torch.autograd.grad(uld(student, teacher, s_labels, t_labels)[0], student)

    def rows_only():
        return torch.autograd.grad(uld_loss(rows_s, rows_t), rows_s)

    def reference():
        return torch.autograd.grad(uld_distillation_loss_reference(
            student, teacher, s_labels, t_labels, distillation_weight=1.5, skip_student_eos=True)[0], student)

    cases = [("ULDLoss (CE + ULD, gathered)", full), ("v1 row kernel, same rows, ULD only", rows_only)]
    if not args.skip_reference:
        cases.append(("paper-style PyTorch (reference.paper)", reference))
    print(f"B={args.batch} L={args.length} Vs={vs} Vt={vt} bf16, {int(keep.sum())} aligned rows")
    print("| implementation | forward+backward ms | peak extra GB |\n|---|---|---|")
    for name, fn in cases:
        try:
            ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 1e9
            print(f"| {name} | {ms:.2f} | {peak:.2f} |", flush=True)
            if args.profile:
                per_kernel = kernel_times(fn)
                print(f"  {name}: {sum(t for t, *_ in per_kernel.values()) / 1e3:.2f} ms of kernels, "
                      f"{host_ms(fn):.2f} ms of host time per call (median of 10, GPU queue not waited on)")
                print_kernel_times(per_kernel)
        except torch.OutOfMemoryError:
            print(f"| {name} | out of memory | - |")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
