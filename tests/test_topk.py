"""The truncated variant ``uld_loss(..., top_k=k)`` against the float64 reference
(``reference.uld.uld_loss_reference(top_k=k)``): losses, the student's and the teacher's
gradients, chunking, and ``k`` past both vocabularies equal to the exact loss."""

from __future__ import annotations

import pytest
import torch

import uld_kernels.topk as topk
from reference.uld import uld_loss_reference
from tests.helpers import assert_grads_close, assert_losses_close
from uld_kernels import uld_loss


def _rows(seed, n, vs, vt, dtype, device, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, vs, generator=g) * scale).to(dtype).to(device)
    teacher = (torch.randn(n, vt, generator=g) * scale).to(dtype).to(device)
    return student, teacher


CASES = [  # (seed, rows, Vs, Vt, k, T_s, T_t, dtype, reduction)
    (0, 6, 300, 200, 1, 1.0, 1.0, torch.float32, "none"),
    (1, 5, 300, 200, 37, 2.0, 2.0, torch.float32, "mean"),
    (2, 4, 120, 260, 150, 1.0, 0.5, torch.float32, "sum"),   # k between the vocabularies
    (3, 7, 500, 400, 100, 2.0, 2.0, torch.bfloat16, "none"),  # distillKitPlus's k and T, bf16 ties
    (4, 3, 64, 64, 64, 1.0, 1.0, torch.float16, "mean"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[4]}-{c[2]}x{c[3]}-{str(c[7])[6:]}-{c[8]}")
def test_matches_the_reference(case, device):
    seed, n, vs, vt, k, ts, tt, dtype, reduction = case
    student, teacher = _rows(seed, n, vs, vt, dtype, device)
    s_in, t_in = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    loss = uld_loss(s_in, t_in, student_temperature=ts, teacher_temperature=tt, reduction=reduction, top_k=k)
    # an upstream gradient that differs per row
    upstream = torch.linspace(0.5, 2.0, n, device=device) if reduction == "none" else torch.tensor(1.5, device=device)
    (loss * upstream).sum().backward()
    s64, t64 = student.double().requires_grad_(True), teacher.double().requires_grad_(True)
    ref = uld_loss_reference(s64, t64, student_temperature=ts, teacher_temperature=tt, reduction=reduction, top_k=k)
    (ref * upstream.double()).sum().backward()
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert_losses_close(loss, ref, torch.float32)
    assert s_in.grad.dtype == dtype and t_in.grad.dtype == dtype
    for ours, want, logits, what in ((s_in.grad, s64.grad, student, "student gradient"),
                                     (t_in.grad, t64.grad, teacher, "teacher gradient")):
        assert_grads_close(ours, want, logits, dtype, what=what)


def test_truncation_changes_the_loss(device):
    """A small k is a different loss from the exact one (the option is not ignored), and k
    past both vocabularies is the exact loss of the fused kernels."""
    student, teacher = _rows(5, 4, 300, 200, torch.float32, device)
    exact = uld_loss(student, teacher, reduction="none")
    truncated = uld_loss(student, teacher, reduction="none", top_k=10)
    assert (truncated < exact - 1e-3).all()
    assert_losses_close(uld_loss(student, teacher, reduction="none", top_k=300), exact, torch.float32)


def test_chunks_give_the_same_bits(monkeypatch, device):
    """Rows in chunks of one give what one chunk gives, loss and gradient."""
    student, teacher = _rows(6, 5, 256, 192, torch.bfloat16, device)
    results = []
    for chunk_bytes in (topk.CHUNK_BYTES, 4 * 256):
        monkeypatch.setattr(topk, "CHUNK_BYTES", chunk_bytes)
        s_in = student.clone().requires_grad_(True)
        loss = uld_loss(s_in, teacher, reduction="sum", top_k=50)
        loss.backward()
        results.append((loss.detach(), s_in.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_no_grad_keeps_nothing(device):
    student, teacher = _rows(7, 3, 100, 90, torch.float32, device)
    student.requires_grad_(True)
    with torch.no_grad():
        loss = uld_loss(student, teacher, top_k=20)
    assert loss.grad_fn is None
    assert_losses_close(loss, uld_loss_reference(student.detach().double(), teacher.double(), top_k=20), torch.float32)


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "100"])
def test_bad_top_k_names_itself(bad):
    student, teacher = _rows(8, 2, 10, 12, torch.float32, "cpu")
    with pytest.raises(ValueError, match="top_k"):
        uld_loss(student, teacher, top_k=bad)


def test_torch_compile_fullgraph(device):
    """Traces without a graph break; Inductor's fused arithmetic may differ in the last bits."""
    student, teacher = _rows(9, 4, 80, 60, torch.float32, device)
    results = []
    for call in (uld_loss, torch.compile(uld_loss, fullgraph=True)):
        s_in = student.clone().requires_grad_(True)
        loss = call(s_in, teacher, top_k=10, reduction="sum")
        loss.backward()
        results.append((loss.detach(), s_in.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)
