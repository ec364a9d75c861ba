"""Issue 5's GPU stress run (recorded in bench/RESULTS.md, never a CI test).

1. The largest shape: 65,536 rows x 262,144 vocabulary on both sides, bf16, forward+backward.
   Prints the time, the peak memory beyond inputs and gradient, and whether the loss is finite.
2. 1,000 calls on varied shapes (rows, vocabularies, dtypes, temperatures, with and without
   gradient, the training loss too): torch.cuda.memory_allocated() after them must equal what
   it was before.

    python bench/stress.py [--skip-large] [--calls 1000]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uld_kernels import ULDLoss, uld_loss  # noqa: E402


def largest(rows: int, vocab: int) -> None:
    torch.cuda.empty_cache()
    gen = torch.Generator(device="cuda").manual_seed(0)
    student = torch.randn(rows, vocab, generator=gen, device="cuda", dtype=torch.bfloat16)
    teacher = torch.randn(rows, vocab, generator=gen, device="cuda", dtype=torch.bfloat16)
    student.requires_grad_(True)
    for attempt in ("first call, compile included", "second call"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        loss = uld_loss(student, teacher)
        (grad,) = torch.autograd.grad(loss, student)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - base - grad.numel() * grad.element_size()
        # Checked a slice at a time: isfinite of the whole gradient would take 17 GB more.
        grad_finite = all(bool(torch.isfinite(part).all()) for part in grad.split(4096))
        print(f"largest: {rows} x {vocab} / {vocab} bf16 forward+backward {seconds * 1e3:.0f} ms "
              f"({attempt}), loss {float(loss.detach()):.6f} finite={bool(torch.isfinite(loss.detach()))}, "
              f"grad finite={grad_finite}, peak extra {peak / 1e9:.3f} GB, "
              f"inputs {2 * student.numel() * 2 / 1e9:.1f} GB", flush=True)
        del grad, loss
    del student, teacher
    torch.cuda.empty_cache()


def repeated(calls: int) -> None:
    """`calls` calls on random shapes: rows (1 to 512), vocabularies (32,769 to 65,535 on each
    side, odd), temperatures, with and without gradient, and every tenth call the training loss.
    One dtype and one range of vocabulary sizes keep the number of compiled kernel variants to
    a handful (Triton compiles one per dtype, divisibility class of a size and number of
    chunks), so that this loop measures memory, not compilation."""
    rng = random.Random(0)
    dtypes = [torch.bfloat16]
    ce = ULDLoss(distillation_weight=0.5, skip_student_eos=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for call in range(calls):
        dtype = rng.choice(dtypes)
        rows, vs, vt = rng.randint(1, 512), rng.randint(16_384, 32_767) * 2 + 1, rng.randint(16_384, 32_767) * 2 + 1
        if call % 10 == 0:  # the training loss on a small labelled batch
            b, ls = rng.randint(1, 4), rng.randint(2, 64)
            s3 = torch.randn(b, ls, vs, device="cuda", dtype=dtype, requires_grad=True)
            t3 = torch.randn(b, ls, vt, device="cuda", dtype=dtype)
            labels_s = torch.randint(0, vs, (b, ls), device="cuda")
            labels_t = torch.randint(0, vt, (b, ls), device="cuda")
            labels_s[:, : ls // 3] = -100
            labels_t[:, : ls // 3] = -100
            ce(s3, t3, labels_s, labels_t)[0].backward()
            del s3, t3, labels_s, labels_t
        else:
            s = torch.randn(rows, vs, device="cuda", dtype=dtype, requires_grad=rng.random() < 0.7)
            t = torch.randn(rows, vt, device="cuda", dtype=dtype)
            loss = uld_loss(s, t, student_temperature=rng.uniform(0.5, 3.0),
                            teacher_temperature=rng.uniform(0.5, 3.0))
            if s.requires_grad:
                loss.backward()
            del loss, s, t
        if (call + 1) % 100 == 0:
            torch.cuda.synchronize()
            print(f"  {call + 1} calls, {time.perf_counter() - start:.0f} s, allocated "
                  f"{torch.cuda.memory_allocated() - base:+d} B", flush=True)
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    print(f"repeated: {calls} calls on varied shapes in {time.perf_counter() - start:.1f} s; "
          f"allocated before {base} B, after {after} B, difference {after - base} B "
          f"({'unchanged' if after == base else 'CHANGED'})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} commit {os.environ.get('ULD_COMMIT', '?')}")
    if not args.skip_large:
        largest(args.rows, args.vocab)
    repeated(args.calls)


if __name__ == "__main__":
    main()
