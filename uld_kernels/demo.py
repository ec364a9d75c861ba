"""A small demonstration: uld_kernels against the PyTorch reference, on whatever is here.

    python -m uld_kernels.demo          # GPU: real vocabularies; CPU: the Triton interpreter

On a CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set here by
re-running this module), so the shapes are small.
"""

from __future__ import annotations

import os
import sys
import time


def _main() -> None:
    import torch

    from reference import uld_loss_reference
    from uld_kernels import uld_loss

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    rows, vs, vt = (256, 151936, 128256) if cuda else (4, 3000, 2500)
    print(f"device {device}: {rows} rows, student vocabulary {vs}, teacher vocabulary {vt}, bf16")
    gen = torch.Generator(device=device).manual_seed(0)
    student = (2 * torch.randn(rows, vs, generator=gen, device=device)).bfloat16().requires_grad_(True)
    teacher = (2 * torch.randn(rows, vt, generator=gen, device=device)).bfloat16()

    start = time.perf_counter()
    loss = uld_loss(student, teacher, student_temperature=1.0, teacher_temperature=1.0)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    ours_s = time.perf_counter() - start
    grad = student.grad.clone()

    check = slice(0, min(rows, 4))
    s64 = student.detach()[check].double().requires_grad_(True)
    ref = uld_loss_reference(s64, teacher[check].double(), reduction="sum")
    ref.backward()
    ours_rows = uld_loss(student.detach()[check], teacher[check], reduction="sum")
    how = "first call, includes compiling" if cuda else "Triton interpreter, slow by design"
    print(f"uld_kernels loss (mean over rows): {loss.item():.6f}   ({ours_s * 1e3:.1f} ms, {how})")
    print(f"first {check.stop} rows, summed: uld_kernels {ours_rows.item():.8f}  float64 reference {ref.item():.8f}")
    print(f"  |difference| = {abs(ours_rows.item() - ref.item()):.2e}")
    g_ours = grad[check].double().cpu() * rows  # d(mean)/d(row) = 1 / rows
    g_ref = s64.grad.cpu()
    worst = 0.0
    for r in range(g_ours.shape[0]):  # bf16 logits tie: compare gradients per group of equal logits
        _, group = torch.unique(student.detach()[r].float().cpu(), return_inverse=True)
        sums = torch.zeros(int(group.max()) + 1, 2, dtype=torch.float64)
        sums[:, 0].index_add_(0, group, g_ours[r])
        sums[:, 1].index_add_(0, group, g_ref[r])
        worst = max(worst, (sums[:, 0] - sums[:, 1]).abs().max().item())
    print(f"  gradient summed over each group of tied logits: max |ours - reference| = {worst:.2e}"
          f" (largest element {g_ref.abs().max().item():.2e})")


if __name__ == "__main__":
    try:
        import torch

        on_cpu = not torch.cuda.is_available()
    except ImportError:
        sys.exit("uld_kernels needs torch: pip install -e .")
    if on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is imported
        os.execv(sys.executable, [sys.executable, "-m", "uld_kernels.demo", *sys.argv[1:]])
    _main()
