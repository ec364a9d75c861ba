"""Extreme numerics, each with its stated outcome (README "Unusual input" table), checked
against the float64 reference under the interpreter on CPU and compiled on a GPU."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import assert_grads_close, assert_losses_close, reference_rows_and_grads
from uld_kernels import uld_loss


def _check(student, teacher, dtype, per_tie_group=True):
    student = student.detach().requires_grad_(True)
    rows = uld_loss(student, teacher, reduction="none")
    rows.sum().backward()
    ref_rows, ref_grad, _ = reference_rows_and_grads(student, teacher)
    assert torch.isfinite(rows).all(), rows
    assert_losses_close(rows, ref_rows, dtype)
    assert torch.isfinite(student.grad).all()
    assert_grads_close(student.grad, ref_grad, student, dtype, per_tie_group=per_tie_group)
    return rows


def _randn(shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("magnitude", [1e4, -1e4])
def test_huge_float32_logits(magnitude, device):
    """Logits around +-1e4 (float32): softmax is taken relative to the row maximum; exact."""
    student = (_randn((3, 120), 1, 30.0) + magnitude).to(device)
    teacher = (_randn((3, 90), 2, 30.0) + magnitude).to(device)
    _check(student, teacher, torch.float32, per_tie_group=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_largest_finite_16_bit_logits(dtype, device):
    """The largest finite fp16 / bf16 values in the rows: finite loss, matches float64."""
    top = torch.finfo(dtype).max
    student = _randn((2, 100), 3, 4.0).to(dtype)
    teacher = _randn((2, 80), 4, 4.0).to(dtype)
    student[:, 7] = top
    teacher[0, 3] = top
    teacher[1, 3] = -top
    _check(student.to(device), teacher.to(device), dtype)


def test_rows_with_one_finite_logit(device):
    """All -inf but one: a one-hot distribution; the loss is that of one-hot against the other row."""
    student = torch.full((2, 50), -math.inf)
    student[0, 9] = 1.0
    student[1, 0] = -3.0
    teacher = _randn((2, 40), 5)
    teacher[1] = -math.inf
    teacher[1, 39] = 0.0  # one-hot against one-hot: loss 0
    rows = _check(student.to(device), teacher.to(device), torch.float32)
    assert rows[1].abs() < 1e-6


def test_uniform_rows_every_value_tied(device):
    """All-equal rows: every probability ties within its row; exact (loss |1/Vs - 1/Vt| terms)."""
    student = torch.full((2, 64), 0.5)
    teacher = torch.full((2, 96), -2.0)
    rows = _check(student.to(device), teacher.to(device), torch.float32)
    expected = 64 * (1 / 64 - 1 / 96) + 32 * (1 / 96)
    assert abs(float(rows[0].detach()) - expected) < 1e-6


def test_float16_softmax_underflow(device):
    """fp16 logits spanning 60 units: most probabilities underflow to 0 in float32 too and act as
    padding; the loss still matches float64 (the underflowed mass is below 1e-26)."""
    student = (_randn((3, 200), 6, 1.0) * 20).clamp(-60, 0).to(torch.float16)
    teacher = (_randn((3, 150), 7, 1.0) * 20).clamp(-60, 0).to(torch.float16)
    _check(student.to(device), teacher.to(device), torch.float16)
