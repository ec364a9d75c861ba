"""Gathered row pairs (row maps inside the kernel) and the fused student cross-entropy,
against float64 autograd of the same weighted sum."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference import uld_row_losses_reference
from tests.helpers import assert_grads_close, assert_losses_close
from uld_kernels.launch import cross_entropy_rows, uld_pairs


def _case(device, dtype, seed, vs=90, vt=70):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(7, vs, generator=g) * 2).to(dtype).to(device)
    teacher = (torch.randn(6, vt, generator=g) * 2).to(dtype).to(device)
    # pairs: distinct student rows, teacher rows in any order, one padding entry
    s_idx = torch.tensor([4, 0, 6, -1, 2], dtype=torch.int64)
    t_idx = torch.tensor([1, 5, 0, -1, 3], dtype=torch.int64)
    weight = torch.rand(5, generator=g) + 0.25
    label = torch.tensor([3, -1, vs - 1, 0, 17], dtype=torch.int64)
    ce_weight = torch.rand(5, generator=g) + 0.25
    return student, teacher, [x.to(device) for x in (s_idx, t_idx, weight, label, ce_weight)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_ce", [False, True])
def test_gathered_pairs_match_float64_autograd(dtype, with_ce, device):
    student, teacher, (s_idx, t_idx, weight, label, ce_weight) = _case(device, dtype, seed=3)
    rows, status, row_ce, grad, _ = uld_pairs(
        student, teacher, 1.5, 0.75, True, False, 2.0, student_index=s_idx, teacher_index=t_idx,
        row_weight=weight, ce_label=label if with_ce else None,
        ce_weight=ce_weight if with_ce else None)
    valid = s_idx >= 0
    s64 = student.detach().double().requires_grad_(True)
    ref_rows = uld_row_losses_reference(s64[s_idx[valid]], teacher.double()[t_idx[valid]], 1.5, 0.75)
    total = 2.0 * (weight[valid].double() * ref_rows).sum()
    assert_losses_close(rows[valid], ref_rows.detach(), dtype)
    assert (rows[~valid] == 0).all()
    if with_ce:
        has = valid & (label >= 0)
        ref_ce = F.cross_entropy(s64[s_idx[has]], label[has], reduction="none")
        total = total + (ce_weight[has].double() * ref_ce).sum()
        assert_losses_close(row_ce[has], ref_ce.detach(), dtype, what="cross-entropy")
        assert (row_ce[~has] == 0).all()
    total.backward()
    untouched = torch.ones(student.shape[0], dtype=torch.bool)
    untouched[s_idx[valid].cpu()] = False
    assert (grad[untouched.to(device)] == 0).all(), "rows no pair reads must get zero gradient"
    assert_grads_close(grad, s64.grad, student, dtype)


def test_cross_entropy_rows(device):
    g = torch.Generator().manual_seed(8)
    logits = (torch.randn(6, 300, generator=g) * 3).to(device)
    index = torch.tensor([5, -1, 0, 2], device=device)
    label = torch.tensor([299, 4, -1, 0], device=device)
    weight = torch.tensor([0.5, 1.0, 1.0, 2.0], device=device)
    grad = torch.zeros_like(logits)
    ce = cross_entropy_rows(logits, index, label, weight, grad)
    x = logits.double().requires_grad_(True)
    use = torch.tensor([0, 3])
    ref = F.cross_entropy(x[index[use]], label[use], reduction="none")
    (weight[use].double() * ref).sum().backward()
    assert_losses_close(ce[use.to(device)], ref.detach(), torch.float32, what="cross-entropy")
    assert (ce[torch.tensor([1, 2], device=device)] == 0).all()
    assert_grads_close(grad, x.grad, logits, torch.float32)


def test_label_past_the_vocabulary_poisons_only_its_row(device):
    logits = torch.randn(3, 50, device=device)
    index = torch.tensor([0, 1, 2], device=device)
    label = torch.tensor([4, 50, 49], device=device)  # 50 is past the vocabulary
    weight = torch.ones(3, device=device)
    ce = cross_entropy_rows(logits, index, label, weight, None)
    assert torch.isnan(ce[1]) and torch.isfinite(ce[[0, 2]]).all(), ce
    student, teacher = logits.clone(), torch.randn(3, 40, device=device)
    rows, _, row_ce, _, _ = uld_pairs(student, teacher, 1.0, 1.0, False, False, 1.0,
                                      student_index=index, teacher_index=index, row_weight=weight,
                                      ce_label=label, ce_weight=weight)
    assert torch.isnan(row_ce[1]) and torch.isfinite(row_ce[[0, 2]]).all(), row_ce
    assert torch.isfinite(rows).all()


def test_nan_in_the_teacher_row_leaves_the_student_cross_entropy_alone(device):
    """A NaN teacher logit makes that pair's ULD loss NaN, but the student's cross-entropy
    depends on the student's row only (found by review: it was NaN too)."""
    student = torch.randn(3, 50, device=device)
    teacher = torch.randn(3, 40, device=device)
    teacher[1, 7] = float("nan")
    student_nan = student.clone()
    student_nan[2, 3] = float("nan")
    index = torch.tensor([0, 1, 2], device=device)
    label = torch.tensor([4, 5, 6], device=device)
    weight = torch.ones(3, device=device)
    rows, _, row_ce, _, _ = uld_pairs(student_nan, teacher, 1.0, 1.0, False, False, 1.0,
                                      student_index=index, teacher_index=index, row_weight=weight,
                                      ce_label=label, ce_weight=weight)
    expected = F.cross_entropy(student.double(), label, reduction="none")
    assert torch.isnan(rows[1]) and torch.isnan(rows[2]) and torch.isfinite(rows[0]), rows
    assert torch.isnan(row_ce[2]), row_ce
    assert_losses_close(row_ce[:2], expected[:2].to(row_ce.device), torch.float32, what="cross-entropy")
