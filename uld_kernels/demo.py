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
    from reference.tolerances import grad_tol, loss_tol
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
    tol = loss_tol(torch.bfloat16)
    loss_diff = abs(ours_rows.item() - ref.item())
    loss_ok = loss_diff <= tol["atol"] + tol["rtol"] * abs(ref.item())
    print(f"first {check.stop} rows, summed: uld_kernels {ours_rows.item():.8f}  float64 reference {ref.item():.8f}")
    print(f"  |difference| = {loss_diff:.2e}  ({'within' if loss_ok else 'OUTSIDE'} the tests' tolerance)")
    g_ours = grad[check].double().cpu() * rows  # d(mean)/d(row) = 1 / rows
    g_ref = s64.grad.cpu()
    # bf16 logits tie: any split of a group's gradient is right, so compare per group of equal
    # logits, as the tests do (each group's sum within atol + rtol * its absolute sum).
    tol = grad_tol(torch.bfloat16)
    worst, grads_ok = 0.0, True
    for r in range(g_ours.shape[0]):
        _, group = torch.unique(student.detach()[r].float().cpu(), return_inverse=True)
        sums = torch.zeros(int(group.max()) + 1, 3, dtype=torch.float64)
        sums[:, 0].index_add_(0, group, g_ours[r])
        sums[:, 1].index_add_(0, group, g_ref[r])
        sums[:, 2].index_add_(0, group, g_ref[r].abs())
        diff = (sums[:, 0] - sums[:, 1]).abs()
        worst = max(worst, diff.max().item())
        grads_ok &= bool((diff <= tol["atol"] + tol["rtol"] * sums[:, 2]).all())
    print(f"  gradient summed over each group of tied logits: max |ours - reference| = {worst:.2e}"
          f" (largest element {g_ref.abs().max().item():.2e}; {'within' if grads_ok else 'OUTSIDE'} the tests' tolerance)")
    if not (loss_ok and grads_ok):
        sys.exit("uld_kernels disagrees with the float64 reference beyond reference/tolerances.py")
    print("OK: loss and gradient agree with the float64 reference within reference/tolerances.py")

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
