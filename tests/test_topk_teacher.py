"""``uld_loss_teacher_topk``: the student's full softmax against an offline teacher's top-K
log-probabilities, zero-padded, against the float64 reference
(``reference.uld.uld_teacher_topk_row_losses_reference``): losses, the student's and the
teacher's gradients on both engines, the normalized form against the exact loss, ``-inf``
entries, refused and NaN rows, zero rows, and bad arguments."""

from __future__ import annotations

import pytest
import torch

import uld_kernels.launch as launch
import uld_kernels.topk as topk
from reference.uld import uld_teacher_topk_row_losses_reference
from tests.helpers import assert_grads_close, assert_losses_close
from uld_kernels import uld_loss, uld_loss_teacher_topk


def _inputs(seed, n, vs, k, dtype, device, teacher_dtype=torch.float32, vt=400, scale=2.0):
    """Student logits ``[n, vs]`` and the top ``k`` log-probabilities of a teacher of ``vt``
    columns, in a shuffled order (which tokens they are does not matter)."""
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, vs, generator=g) * scale).to(dtype).to(device)
    full = (torch.randn(n, vt, generator=g) * scale).log_softmax(dim=-1)
    logprobs = full.topk(k, dim=-1).values[:, torch.randperm(k, generator=g)]
    return student, logprobs.to(teacher_dtype).to(device)


@pytest.fixture(params=["kernels", "torch"], autouse=True)
def engine(request, monkeypatch):
    """Every test twice: the Triton select (GIVEN; on the GPU or the interpreter) and PyTorch."""
    if request.param == "torch":
        monkeypatch.setattr(launch, "TOPK_MAX_K", 0)
    return request.param


def _reference(student, logprobs, temperature, normalize, upstream):
    s64 = student.detach().double().requires_grad_(True)
    t64 = logprobs.detach().double().requires_grad_(True)
    rows = uld_teacher_topk_row_losses_reference(s64, t64, temperature, normalize)
    (rows * upstream.double()).sum().backward()
    return rows.detach(), s64.grad, t64.grad


CASES = [  # (seed, rows, Vs, K, T_s, normalize, dtype, teacher dtype)
    (0, 5, 300, 20, 1.0, False, torch.float32, torch.float32),
    (1, 4, 300, 100, 2.0, False, torch.bfloat16, torch.bfloat16),  # bf16 ties on both sides
    (2, 4, 250, 1, 0.5, False, torch.float32, torch.float32),
    (3, 3, 40, 64, 1.0, False, torch.float32, torch.float32),  # K past the student's vocabulary
    (4, 4, 300, 30, 1.0, True, torch.float16, torch.float32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[2]}-k{c[3]}-T{c[4]}-{'norm' if c[5] else 'exp'}-"
                                                     f"{str(c[6])[6:]}")
def test_matches_the_reference(case, device):
    seed, n, vs, k, temperature, normalize, dtype, teacher_dtype = case
    student, logprobs = _inputs(seed, n, vs, k, dtype, device, teacher_dtype)
    s_in, t_in = student.clone().requires_grad_(True), logprobs.clone().requires_grad_(True)
    rows = uld_loss_teacher_topk(s_in, t_in, student_temperature=temperature, normalize_teacher=normalize,
                                 reduction="none")
    upstream = torch.linspace(0.5, 2.0, n, device=device)
    (rows * upstream).sum().backward()
    ref, s_grad, t_grad = _reference(student, logprobs, temperature, normalize, upstream)
    assert rows.dtype == torch.float32 and rows.shape == (n,)
    assert_losses_close(rows, ref, torch.float32)
    assert s_in.grad.dtype == dtype and t_in.grad.dtype == teacher_dtype
    assert_grads_close(s_in.grad, s_grad, student, dtype, what="student gradient")
    assert_grads_close(t_in.grad, t_grad, logprobs, teacher_dtype, what="teacher gradient")


def test_the_tail_counts(device):
    """The loss is ``sum_{i < K} |a_(i) - b_(i)|`` plus the student's probability past rank K
    (the identity the engines use, against the padded sort of the reference), and that tail is
    most of it here: not ``uld_loss(..., top_k=K)``'s truncation."""
    student, logprobs = _inputs(5, 4, 300, 10, torch.float32, device, scale=1.0)
    rows = uld_loss_teacher_topk(student, logprobs, reduction="none").double().cpu()
    probs = torch.softmax(student.double().cpu(), dim=-1)
    top = probs.topk(10, dim=-1).values
    teacher = logprobs.double().cpu().exp().sort(dim=-1, descending=True).values
    tail = 1 - top.sum(dim=-1)
    torch.testing.assert_close(rows, (top - teacher).abs().sum(dim=-1) + tail, atol=2e-6, rtol=1e-5)
    assert (tail > 0.5 * rows).all()


def test_normalized_is_the_exact_loss(device):
    """``normalize_teacher=True``: the exact loss with the K log-probabilities as the teacher's
    logits (``uld_loss``, the fused exact engine), loss and student gradient."""
    student, logprobs = _inputs(6, 4, 300, 25, torch.float32, device)
    results = []
    for call in (lambda s: uld_loss_teacher_topk(s, logprobs, normalize_teacher=True, reduction="sum"),
                 lambda s: uld_loss(s, logprobs, reduction="sum")):
        s_in = student.clone().requires_grad_(True)
        loss = call(s_in)
        loss.backward()
        results.append((loss.detach(), s_in.grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-4)


def test_minus_inf_entries_are_absent(device):
    """Rows with fewer than K log-probabilities, padded with ``-inf``: the loss and gradients
    of the same rows without those entries."""
    student, logprobs = _inputs(7, 3, 200, 12, torch.float32, device)
    padded = torch.cat([logprobs, torch.full((3, 4), float("-inf"), device=device)], dim=1)
    results = []
    for lp in (logprobs, padded):
        s_in = student.clone().requires_grad_(True)
        loss = uld_loss_teacher_topk(s_in, lp, reduction="sum")
        loss.backward()
        results.append((loss.detach(), s_in.grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["logits", "all-minus-inf", "nan-teacher", "nan-student"])
def test_a_refused_or_nan_row_stays_in_its_row(kind, device):
    """Teacher values summing past 1 (logits passed as log-probabilities), to 0, or NaN, and a
    NaN student logit: that row's loss and both gradients are NaN, the others match the
    reference."""
    student, logprobs = _inputs(8, 4, 120, 16, torch.float32, device)
    if kind == "logits":
        logprobs[1] = torch.randn(16, device=device) * 2
    elif kind == "all-minus-inf":
        logprobs[1] = float("-inf")
    elif kind == "nan-teacher":
        logprobs[1, 3] = float("nan")
    else:
        student[1, 5] = float("nan")
    s_in, t_in = student.clone().requires_grad_(True), logprobs.clone().requires_grad_(True)
    rows = uld_loss_teacher_topk(s_in, t_in, reduction="none")
    rows.sum().backward()
    keep = torch.tensor([True, False, True, True], device=device)
    ref, _, _ = _reference(student[keep], logprobs[keep], 1.0, False, torch.ones(3, device=device))
    assert torch.isnan(rows[1]) and torch.isfinite(rows[keep]).all()
    assert_losses_close(rows[keep], ref, torch.float32)
    for grad in (s_in.grad, t_in.grad):
        assert torch.isnan(grad[1]).all() and torch.isfinite(grad[keep]).all()


def test_a_sum_within_the_slack_is_kept(device):
    """A teacher whose K values sum to 1 up to rounding (its whole distribution) is kept."""
    student, _ = _inputs(9, 2, 100, 8, torch.float32, device)
    logprobs = torch.randn(2, 8, device=device).log_softmax(dim=-1) + 0.5 * topk.TEACHER_SUM_SLACK
    rows = uld_loss_teacher_topk(student, logprobs, reduction="none")
    assert torch.isfinite(rows).all()


def test_reductions_and_zero_rows(device):
    student, logprobs = _inputs(10, 3, 90, 9, torch.float32, device)
    rows = uld_loss_teacher_topk(student, logprobs, reduction="none")
    for reduction, want in (("mean", rows.mean()), ("sum", rows.sum())):
        torch.testing.assert_close(uld_loss_teacher_topk(student, logprobs, reduction=reduction), want, atol=0,
                                   rtol=0)
    for reduction in ("mean", "sum", "none"):
        empty = torch.randn(0, 90, device=device, requires_grad=True)
        out = uld_loss_teacher_topk(empty, torch.zeros(0, 9, device=device), reduction=reduction)
        out.sum().backward()
        assert empty.grad.shape == (0, 90)
        assert out.shape == ((0,) if reduction == "none" else ())


def test_no_grad_and_teacher_only_grad(device):
    """Under ``torch.no_grad()`` no graph; a teacher that alone requires a gradient gets the
    reference's."""
    student, logprobs = _inputs(11, 3, 150, 10, torch.float32, device)
    with torch.no_grad():
        assert uld_loss_teacher_topk(student, logprobs).grad_fn is None
    t_in = logprobs.clone().requires_grad_(True)
    uld_loss_teacher_topk(student, t_in, reduction="sum").backward()
    _, _, t_grad = _reference(student, logprobs, 1.0, False, torch.ones(3, device=device))
    assert_grads_close(t_in.grad, t_grad, logprobs, torch.float32, what="teacher gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_batched_rows_under_a_mask(dtype, device):
    """``[B, L, Vs]`` student rows read in place from a strided slice (``logits[:, :-1]``) and
    ``[B, L, K]`` teacher rows, a mask leaving rows out: the kept rows are the reference's
    (losses and both gradients), the others 0, and a NaN student row or an all ``-inf``
    teacher row left out does not reach anything."""
    b, l, vs, k = 2, 5, 300, 20
    full, logprobs = _inputs(13, b * (l + 1), vs, k, dtype, device)
    full = full.view(b, l + 1, vs)
    logprobs = logprobs.view(b, l + 1, k)[:, 1:]
    mask = torch.tensor([[True, False, True, True, False], [False, True, True, False, True]], device=device)
    full[0, 1], full[1, 3] = float("nan"), float("nan")  # left out: student rows (0, 1) and (1, 3)
    logprobs = logprobs.clone()
    logprobs[1, 0] = float("-inf")  # left out: a teacher row with no probability
    s_leaf = full.clone().requires_grad_(True)
    t_in = logprobs.clone().requires_grad_(True)
    student = s_leaf[:, :-1]
    assert not student.is_contiguous()
    rows = uld_loss_teacher_topk(student, t_in, mask=mask, student_temperature=1.5, reduction="none")
    upstream = torch.linspace(0.5, 2.0, b * l, device=device).view(b, l)
    (rows * upstream).sum().backward()
    kept = mask.reshape(-1)
    ref, s_grad, t_grad = _reference(student.reshape(-1, vs)[kept], logprobs.reshape(-1, k)[kept], 1.5, False,
                                     upstream.reshape(-1)[kept])
    assert rows.shape == (b, l) and rows.dtype == torch.float32
    assert (rows[~mask] == 0).all()
    assert_losses_close(rows[mask], ref, torch.float32)
    grad = s_leaf.grad[:, :-1].reshape(-1, vs)
    assert (s_leaf.grad[:, -1] == 0).all() and (grad[~kept] == 0).all()
    assert_grads_close(grad[kept], s_grad, student.reshape(-1, vs)[kept], dtype, what="student gradient")
    assert (t_in.grad.reshape(-1, k)[~kept] == 0).all()
    assert_grads_close(t_in.grad.reshape(-1, k)[kept], t_grad, logprobs.reshape(-1, k)[kept], torch.float32,
                       what="teacher gradient")


def test_the_gradient_buffer_garbage_never_leaks(device, monkeypatch):
    """Every floating ``torch.empty`` filled with NaN (the gradient buffer's rows left out by
    the mask are zeroed, not the whole buffer first): the rows left out come out 0, the kept
    ones the unpoisoned call's."""
    student, logprobs = _inputs(15, 6, 120, 12, torch.float32, device)
    mask = torch.tensor([[True, False, True], [False, False, True]], device=device)
    grads = []
    for poison in (False, True):
        if poison:
            real = torch.empty

            def empty(*args, **kwargs):
                out = real(*args, **kwargs)
                return out.fill_(float("nan")) if out.is_floating_point() else out

            monkeypatch.setattr(torch, "empty", empty)
        s_in = student.view(2, 3, 120).clone().requires_grad_(True)
        uld_loss_teacher_topk(s_in, logprobs.view(2, 3, 12), mask=mask, reduction="sum").backward()
        grads.append(s_in.grad)
    monkeypatch.undo()
    assert (grads[1][~mask] == 0).all()
    torch.testing.assert_close(grads[1], grads[0], atol=0, rtol=0)


def test_rows_without_a_mask_and_two_d_rows_with_one(device):
    """``[B, L]`` rows without a mask are the flattened ``[B * L]`` rows; a 2-D mask's rows are
    those rows selected first; mean and sum over the kept rows only; no row kept: the mean
    NaN, the sum 0, gradients 0."""
    student, logprobs = _inputs(14, 6, 120, 12, torch.float32, device)
    flat = uld_loss_teacher_topk(student, logprobs, reduction="none")
    batched = uld_loss_teacher_topk(student.view(2, 3, 120), logprobs.view(2, 3, 12), reduction="none")
    torch.testing.assert_close(batched, flat.view(2, 3), atol=0, rtol=0)
    mask = torch.tensor([True, False, False, True, True, False], device=device)
    picked = uld_loss_teacher_topk(student[mask], logprobs[mask], reduction="none")
    rows = uld_loss_teacher_topk(student, logprobs, mask=mask, reduction="none")
    torch.testing.assert_close(rows[mask], picked, atol=0, rtol=0)
    for reduction, want in (("mean", picked.mean()), ("sum", picked.sum())):  # summed with the zeros: rounding
        assert_losses_close(uld_loss_teacher_topk(student, logprobs, mask=mask, reduction=reduction), want,
                            torch.float32)
    s_in = student.clone().requires_grad_(True)
    none = torch.zeros(6, dtype=torch.bool, device=device)
    assert torch.isnan(uld_loss_teacher_topk(s_in, logprobs, mask=none))
    total = uld_loss_teacher_topk(s_in, logprobs, mask=none, reduction="sum")
    total.backward()
    assert total.item() == 0 and (s_in.grad == 0).all()


@pytest.mark.parametrize("bad, error, match", [
    (dict(student_logits=torch.zeros(30)), ValueError, r"student_logits must be 2-D \[rows, vocabulary\] or 3-D"),
    (dict(mask=torch.ones(3, dtype=torch.uint8)), TypeError, "mask must be a bool tensor"),
    (dict(mask=torch.ones(4, dtype=torch.bool)), ValueError, r"mask must have shape \(3,\)"),
    (dict(student_logits=torch.zeros(1, 3, 10)), ValueError, "teacher_logprobs must be 3-D"),
    (dict(student_logits=torch.zeros(1, 3, 10), teacher_logprobs=torch.zeros(1, 2, 4)), ValueError,
     "must have the same rows"),

    (dict(teacher_logprobs=torch.zeros(3, 4, dtype=torch.int64)), TypeError, "teacher_logprobs must be float32"),
    (dict(teacher_logprobs=torch.zeros(3)), ValueError, "teacher_logprobs must be 2-D"),
    (dict(teacher_logprobs=torch.zeros(2, 4)), ValueError, "same number of rows"),
    (dict(teacher_logprobs=torch.zeros(3, 0)), ValueError, "teacher_logprobs must have a vocabulary of at least 1"),
    (dict(normalize_teacher="yes"), TypeError, "normalize_teacher must be a bool"),
    (dict(student_temperature=0.0), ValueError, "student_temperature must be finite and > 0"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
])
def test_bad_arguments_name_themselves(bad, error, match):
    args = dict(student_logits=torch.zeros(3, 10), teacher_logprobs=torch.full((3, 4), -2.0))
    args.update(bad)
    with pytest.raises(error, match=match):
        uld_loss_teacher_topk(args.pop("student_logits"), args.pop("teacher_logprobs"), **args)


def test_torch_compile_fullgraph(device):
    """Traces without a graph break (the custom op's fake); the same loss and gradient."""
    student, logprobs = _inputs(12, 3, 80, 10, torch.float32, device)
    results = []
    for call in (uld_loss_teacher_topk, torch.compile(uld_loss_teacher_topk, fullgraph=True)):
        s_in = student.clone().requires_grad_(True)
        loss = call(s_in, logprobs, reduction="sum")
        loss.backward()
        results.append((loss.detach(), s_in.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)


def test_torch_compile_fullgraph_under_a_mask(device):
    """A mask is traced, not read on the host (its rows left out are padding slots of the
    index): fullgraph, and the same loss and gradients as eager, the teacher's too."""
    student, logprobs = _inputs(16, 8, 90, 10, torch.float32, device)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]], device=device)
    results = []
    for call in (uld_loss_teacher_topk, torch.compile(uld_loss_teacher_topk, fullgraph=True)):
        s_in = student.view(2, 4, 90).clone().requires_grad_(True)
        t_in = logprobs.view(2, 4, 10).clone().requires_grad_(True)
        loss = call(s_in, t_in, mask=mask)
        loss.backward()
        results.append((loss.detach(), s_in.grad, t_in.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)
    assert (results[1][1][~mask] == 0).all() and (results[1][2][~mask] == 0).all()


def test_a_mask_costs_no_host_sync(device):
    """The mask is never read on the host: under ``torch.cuda.set_sync_debug_mode("error")``
    a sync would raise (on the CPU the call runs as on the GPU, with nothing to check)."""
    student, logprobs = _inputs(17, 6, 90, 10, torch.float32, device)
    mask = torch.tensor([True, False, True, True, False, True], device=device)
    s_in = student.clone().requires_grad_(True)
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        loss = uld_loss_teacher_topk(s_in, logprobs, mask=mask)
        loss.backward()
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    want = uld_loss_teacher_topk(student[mask], logprobs[mask])
    assert_losses_close(loss, want, torch.float32)
