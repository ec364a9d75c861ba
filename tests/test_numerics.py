"""Extreme numerics, each with its stated outcome (README "Unusual input" table), checked
against the float64 reference under the interpreter on CPU and compiled on a GPU."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

import uld_kernels.launch as launch
from reference import uld_row_losses_reference
from tests.helpers import assert_grads_close, assert_losses_close, reference_rows_and_grads
from uld_kernels import uld_loss
from uld_kernels.kernels import uld_rows


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


@triton.jit
def _keys_of_fused(raw, scale, top, log_sum):
    """_keys_of (every pass's probabilities and keys) as the sm_90 build computes it:
    (z - top) * scale - log_sum fused into one multiply-add (one rounding), emulated in float64
    and rounded once. (The stats pass's key range is computed unfused under the interpreter.)"""
    z = raw.to(tl.float32)
    scale64 = tl.full([1], scale, tl.float32).to(tl.float64)
    x = ((z - top).to(tl.float64) * scale64 - log_sum.to(tl.float64)).to(tl.float32)
    p = tl.exp2(x)
    key = p.to(tl.int32, bitcast=True)
    return p, key, key > 0, z


@pytest.mark.skipif(torch.cuda.is_available(), reason="emulates under the interpreter the fused "
                    "multiply-add that compiled kernels perform for real (test_gpu.py)")
def test_keys_rounded_past_the_root_range_stay_exact(monkeypatch):
    """The root's key range may be computed with the rounded product (z - top) * scale; a
    compiled pass fuses it with the subtraction of the log-sum, so an element's key can fall a few ulps outside the
    range. Such keys must land in the edge bucket in every pass (they once read another row's
    signs). Rows 77 and 143 of this batch did, at T = 1.5 (found by review)."""
    g = torch.Generator().manual_seed(1)
    student = 1000 + torch.rand(160, 512, generator=g)
    teacher = 1000 + torch.rand(160, 512, generator=g)
    pick = [77, 143, 0, 5]
    student, teacher = student[pick].contiguous(), teacher[pick].contiguous()
    monkeypatch.setattr(uld_rows, "_keys_of", _keys_of_fused)
    rows, _status, _, _ = launch.uld_rows(student, teacher, 1.5, 1.5, False, False, 1.0)
    ref = uld_row_losses_reference(student.double(), teacher.double(), 1.5, 1.5)
    assert_losses_close(rows, ref, torch.float32)
