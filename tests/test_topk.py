"""The truncated variant ``uld_loss(..., top_k=k)`` against the float64 reference
(``reference.uld.uld_loss_reference(top_k=k)``): losses, the student's and the teacher's
gradients, chunking, what is kept for the backward, empty and NaN rows, padding slots, and
``k`` past both vocabularies equal to the exact loss."""

from __future__ import annotations

import pytest
import torch

import uld_kernels.launch as launch
import uld_kernels.topk as topk
from reference.uld import uld_loss_reference
from tests.helpers import assert_grads_close, assert_losses_close, spy_saved_tensors
from uld_kernels import uld_loss
from uld_kernels.topk import ULDTopKFunction


def _rows(seed, n, vs, vt, dtype, device, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, vs, generator=g) * scale).to(dtype).to(device)
    teacher = (torch.randn(n, vt, generator=g) * scale).to(dtype).to(device)
    return student, teacher


@pytest.fixture(params=["kernels", "kernels-levels", "torch"], autouse=True)
def engine(request, monkeypatch):
    """Every test three times: the Triton select (on the GPU, or the interpreter), as it runs
    and with every level of its select (never sorting a bin whole), and PyTorch's chunks."""
    if request.param == "torch":
        monkeypatch.setattr(launch, "TOPK_MAX_K", 0)
    if request.param == "kernels-levels":
        monkeypatch.setattr(launch, "TOPK_SORT_FACTOR", 0)
    return request.param


CASES = [  # (seed, rows, Vs, Vt, k, T_s, T_t, dtype, reduction)
    (0, 6, 300, 200, 1, 1.0, 1.0, torch.float32, "none"),
    (1, 5, 300, 200, 37, 2.0, 2.0, torch.float32, "mean"),
    (2, 4, 120, 260, 150, 1.0, 0.5, torch.float32, "sum"),   # k between the vocabularies
    (3, 7, 500, 400, 100, 2.0, 2.0, torch.bfloat16, "none"),  # distillKitPlus's k and T, bf16 ties
    (4, 3, 64, 64, 60, 1.0, 1.0, torch.float16, "mean"),
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
    """A small k is a different loss from the exact one (the option is not ignored)."""
    student, teacher = _rows(5, 4, 300, 200, torch.float32, device)
    exact = uld_loss(student, teacher, reduction="none")
    truncated = uld_loss(student, teacher, reduction="none", top_k=10)
    assert (truncated < exact - 1e-3).all()


def test_every_rank_is_the_exact_loss(device, monkeypatch, engine):
    """``k`` past both vocabularies: the truncated Function's loss and gradient are the exact
    ones, and ``uld_loss`` gives that case to the fused kernels (never calling the Function;
    that part, the same for every engine, runs once: the exact engine is slow under the
    interpreter)."""
    student, teacher = _rows(5, 2, 300, 200, torch.float32, device)
    s_in = student.clone().requires_grad_(True)
    ULDTopKFunction.apply(s_in, teacher, 300, 1.0, 1.0, True).sum().backward()
    s_exact = student.clone().requires_grad_(True)
    exact = uld_loss(s_exact, teacher, reduction="none")
    exact.sum().backward()
    rows = ULDTopKFunction.apply(student, teacher, 300, 1.0, 1.0, True)
    assert_losses_close(rows, exact.detach(), torch.float32)
    assert_grads_close(s_in.grad, s_exact.grad.double(), student, torch.float32, per_tie_group=False)

    def refuse(*args):
        raise AssertionError("top_k past both vocabularies must take the exact path")

    if engine != "kernels":
        return
    monkeypatch.setattr(ULDTopKFunction, "apply", refuse)
    for k in (300, 10**9):
        s_k = student.clone().requires_grad_(True)
        loss = uld_loss(s_k, teacher, reduction="none", top_k=k)
        loss.sum().backward()
        assert torch.equal(loss, exact) and torch.equal(s_k.grad, s_exact.grad)


def test_chunks_give_the_same_bits(monkeypatch, device, engine):
    """Rows in chunks of one give what one chunk gives, loss and gradient (the PyTorch
    engine's chunks; the kernels take a program a row)."""
    monkeypatch.setattr(launch, "TOPK_MAX_K", 0)
    student, teacher = _rows(6, 5, 256, 192, torch.bfloat16, device)
    results = []
    for chunk_bytes in (topk.CHUNK_BYTES, 4 * 256):
        monkeypatch.setattr(topk, "CHUNK_BYTES", chunk_bytes)
        s_in = student.clone().requires_grad_(True)
        loss = uld_loss(s_in, teacher, reduction="sum", top_k=50)
        loss.backward()
        results.append((loss.detach(), s_in.grad))
    assert len(topk._chunks(5, 256)) == 5, "the small chunks must split the rows"
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_what_the_backward_keeps(device, monkeypatch, engine):
    """Under ``torch.no_grad()`` nothing is saved; with grad, only the sides that need one keep
    their logits and per-row state ([N, 5]: log-sum-exp and g - mass per sign, [N, k] columns and signs; the
kernels' k a power of two)."""
    saved = spy_saved_tensors(monkeypatch)
    student, teacher = _rows(7, 3, 100, 90, torch.float32, device)
    student.requires_grad_(True)
    with torch.no_grad():
        loss = uld_loss(student, teacher, top_k=20)
    assert loss.grad_fn is None
    assert all(t is None for t in saved[-1]), "saved tensors under no_grad"
    assert_losses_close(loss, uld_loss_reference(student.detach().double(), teacher.double(), top_k=20), torch.float32)
    uld_loss(student, teacher, top_k=20)
    kept = [None if t is None else tuple(t.shape) for t in saved[-1]]
    width = 20 if engine == "torch" else launch.topk_pad(20)
    assert kept == [(3, 100), None, None, None, (3, 5), (3, width), (3, width), None, None, None]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_rows(reduction, device):
    """No rows: the reference's loss (nan for the mean, 0, []) and an empty gradient."""
    student = torch.randn(0, 30, device=device, requires_grad=True)
    teacher = torch.randn(0, 20, device=device, requires_grad=True)
    loss = uld_loss(student, teacher, reduction=reduction, top_k=5)
    loss.sum().backward()
    ref = uld_loss_reference(student.detach().double(), teacher.double(), reduction=reduction, top_k=5)
    torch.testing.assert_close(loss.double(), ref, equal_nan=True)
    assert student.grad.shape == (0, 30) and teacher.grad.shape == (0, 20)


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_a_nan_row_stays_in_its_row(side, device):
    """A NaN logit on either side: that row's loss and both sides' gradients are NaN (the
    exact kernels' contract; ``sign(NaN)`` is 0, so it must be carried on purpose), the
    other rows match the reference."""
    student, teacher = _rows(10, 4, 60, 50, torch.float32, device)
    (student if side == "student" else teacher)[1, 7] = float("nan")
    s_in, t_in = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    loss = uld_loss(s_in, t_in, reduction="none", top_k=6)
    loss.sum().backward()
    ref = uld_loss_reference(student.double(), teacher.double(), reduction="none", top_k=6)
    keep = torch.tensor([True, False, True, True], device=device)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[keep]).all()
    assert_losses_close(loss[keep], ref[keep], torch.float32)
    for grad in (s_in.grad, t_in.grad):
        assert torch.isnan(grad[1]).all() and torch.isfinite(grad[keep]).all()


@pytest.mark.parametrize("k", [8, 35])  # 35: between the vocabularies (Vt = 30 < k < Vs = 40)
def test_rows_by_index(k, device):
    """Rows by index (``[B, L, V]`` logits, strided index maps, a repeated teacher row, ``-1``
    padding slots, one of them beside a real teacher row): losses and both sides' gradients
    against the reference on the gathered rows. Padding slots read row 0, NaN on both sides
    and used by no pair: loss 0 and no gradient (masked, never 0 * NaN)."""
    g = torch.Generator().manual_seed(11)
    student = torch.randn(2, 3, 40, generator=g).to(device) * 2
    teacher = torch.randn(2, 4, 30, generator=g).to(device) * 2
    student[0, 0], teacher[0, 0] = float("nan"), float("nan")
    maps = torch.tensor([[-1, 3], [2, 3], [4, 7], [-1, -1], [5, 1]], device=device)
    s_index, t_index = maps[:, 0], maps[:, 1]  # strided views (stride 2)
    s_in, t_in = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    rows = ULDTopKFunction.apply(s_in, t_in, k, 1.0, 0.5, True, s_index, t_index)
    upstream = torch.arange(1.0, 6.0, device=device)
    (rows * upstream).sum().backward()
    real = s_index >= 0
    assert (rows[~real] == 0).all()
    s64 = student.view(-1, 40)[s_index[real]].double().requires_grad_(True)
    t64 = teacher.view(-1, 30)[t_index[real]].double().requires_grad_(True)
    ref = uld_loss_reference(s64, t64, teacher_temperature=0.5, reduction="none", top_k=k)
    (ref * upstream[real].double()).sum().backward()
    assert_losses_close(rows[real], ref.detach(), torch.float32)
    for ours, logits, index, grad in ((s_in.grad, student, s_index, s64.grad), (t_in.grad, teacher, t_index, t64.grad)):
        want = torch.zeros(logits.view(-1, logits.shape[-1]).shape, dtype=torch.float64, device=device)
        want.index_add_(0, index[real], grad)  # the repeated teacher row's two pairs add up
        assert torch.isfinite(ours).all()
        assert_grads_close(ours.view(want.shape), want, logits.view(want.shape).nan_to_num(), torch.float32,
                           per_tie_group=False)


def _edge(seed, vs=300, vt=200, dtype=torch.float32, scale=2.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(3, vs, generator=g) * scale + shift).to(dtype),
            (torch.randn(3, vt, generator=g) * scale + shift / 3).to(dtype))


def _masked():
    student, teacher = _edge(20, vs=200, vt=150)
    student[:, ::2], teacher[:, 1::3] = float("-inf"), float("-inf")
    return student, teacher


def _signed_zeros():
    g = torch.Generator().manual_seed(21)
    student = torch.zeros(3, 300)
    student[:, ::2] = -0.0
    student[0, 5] = 1.0
    return student, torch.where(torch.rand(3, 250, generator=g) > 0.5, 0.0, -0.0)


def _few_values():
    g = torch.Generator().manual_seed(22)
    return ((torch.randint(0, 4, (3, 600), generator=g) / 2).to(torch.bfloat16),
            (torch.randint(0, 3, (3, 500), generator=g) / 3).to(torch.bfloat16))


def _crowded_runs():
    """200 top logits of the student in the first 50 columns of each of 4 steps of 1,024, one
    bin of the first level: on every layout one warp's run of the Triton collect pass
    (kernels/uld_topk.py, `_collect_by_run`) holds them all, more than its region, and the row
    is collected again in column order (helper-38's review: a crowd in the first 200 columns
    overflowed the interpreter's run but not the GPU's float32 layout)."""
    g = torch.Generator().manual_seed(32)
    student, teacher = torch.randn(3, 4096, generator=g) * 2, torch.randn(3, 3000, generator=g) * 2
    for step in range(4):
        student[:, step * 1024:step * 1024 + 50] = 10.0 + torch.rand(3, 50, generator=g) * 0.4
    teacher[:, 1024:1074] = 9.0 + torch.linspace(0.0, 0.3, 50)  # in a second step
    return student, teacher


def _crowded_bin(dtype, values):
    """700 logits of a row on `values` values of one first-level bin ([1, 1.0625)), the rest far
    below, k = 100: the select refines (every bit) and then collects by runs."""
    g = torch.Generator().manual_seed(33)
    student = torch.randn(2, 2000, generator=g) - 4
    crowd = 1.0 + torch.randint(0, values, (2, 700), generator=g) / (16 * values)
    student.scatter_(1, torch.stack([torch.randperm(2000, generator=g)[:700] for _ in range(2)]), crowd)
    return student.to(dtype), torch.randn(2, 1500, generator=g).to(dtype)


def _sampled(width):
    """The columns of a row of `width` that the Triton select's guess samples
    (kernels/uld_topk.py, `_sample_threshold`: launch.TOPK_SAMPLE blocks, or one in four of a
    shorter row, evenly spaced; none under two)."""
    blocks = min(launch.TOPK_SAMPLE, width // (4 * launch.TOPK_BLOCK))
    sampled = torch.zeros(width, dtype=torch.bool)
    if blocks >= 2:
        gap = width // (blocks * launch.TOPK_BLOCK) * launch.TOPK_BLOCK
        for b in range(blocks):
            sampled[b * gap:b * gap + launch.TOPK_BLOCK] = True
    return sampled


def test_sampled_blocks_by_width():
    """The guess's sample (as `_sampled` mirrors it): 16 blocks from 65,536 columns, one block
    in four below (7 at 30,000: a step of float32's two blocks and bf16's four half past the
    sample), none under 8 blocks."""
    block = launch.TOPK_BLOCK
    for width, blocks in ((70_000, 16), (65_536, 16), (30_000, 7), (9_000, 2), (8 * block, 2), (8 * block - 1, 0)):
        assert int(_sampled(width).sum()) == blocks * block, width


def _wide(kind, dtype=torch.float32, widths=(20_000, 18_000)):
    """Three rows a side wide enough for the Triton select's guess from a sample of blocks
    (`widths`: 4 blocks sampled a side, one in four; 70,000 / 66,000 for all 16):
    as drawn (the guess holds the first k); the student's sampled blocks far above the rest
    (too few logits at or above the guess: the passes from the start), far below it (too
    many), or the teacher's far above; the student's top logits crowded in one warp's columns
    of six steps (that warp's region overflows, the count fits the sort) or spread outside the
    sample (past SORT_CAP, no region full); rows of -inf with 300 and 120 finite logits (the
    guess lands on -inf's bin: not finite, refused); finite logits whose guessed bin over T
    overflows float32 (T = 1e-37: the select works with z - max, never z / T); a NaN or +inf outside the sample, or a NaN inside
    it and a negative NaN outside (helper-44's review)."""
    g = torch.Generator().manual_seed(34)
    student, teacher = (torch.randn(3, width, generator=g) * 2 for width in widths)
    sampled = _sampled(student.shape[1])
    inside, outside = sampled.nonzero()[:, 0], (~sampled).nonzero()[:, 0]
    if kind == "sample-high":
        student[:, sampled] += 6.0
    if kind == "sample-low":
        student[:, ~sampled] += 6.0
    if kind == "teacher-sample-high":
        teacher[:, _sampled(teacher.shape[1])] += 6.0
    if kind == "one-warp-crowded":  # the first 47 columns of a step: one warp on every layout
        block = launch.TOPK_BLOCK
        for step in [s for s in range(student.shape[1] // block) if not sampled[s * block]][:6]:
            student[:, step * block:step * block + 47] = 10.0 + torch.rand(3, 47, generator=g) * 0.4
    if kind == "past-the-sort":
        for row in student:
            row[outside[torch.randperm(len(outside), generator=g)[:500]]] = 8.0 + torch.rand(500, generator=g)
    if kind == "masked":
        for row, finite in zip(student[:2], (300, 120)):
            keep = torch.zeros(len(row), dtype=torch.bool)
            keep[torch.randperm(len(row), generator=g)[:finite]] = True
            row[~keep] = float("-inf")
    if kind == "z-over-t-overflows":
        student.fill_(-1e4)
        for row in student:
            columns = torch.randperm(len(row), generator=g)
            row[columns[:150]] = 1.0 + torch.rand(150, generator=g)
            row[columns[150:300]] = -50.0 - torch.rand(150, generator=g)
    if kind == "nan-inf":
        student[0, outside[-1]], student[1, outside[-1]] = float("nan"), float("inf")
    if kind == "nan-inside":
        student[0, inside[5]] = float("nan")
        student[1, outside[7]] = -float("nan")
        assert student[1, outside[7]].view(torch.int32) < 0, "a negative NaN"
    return student.to(dtype), teacher.to(dtype)


def _cold_large():
    """float32 logits near 25 spread over a few 1e-4 (T = 1e-4 gives a few ranks weight): z / T
    is near 2.5e5, where float32's ulp is 0.016, so z / T - max / T (rounded, or fused into an
    FMA on the GPU) was off by up to 1% in each probability; z - max is exact."""
    g = torch.Generator().manual_seed(36)
    return 25.0 + 3e-4 * torch.randn(3, 2_000, generator=g), 25.0 + 1e-3 * torch.randn(3, 1_500, generator=g)


EDGES = {  # name: (rows, k, student temperature, teacher temperature); from helper-36's review
    "k-equal-to-Vt": (lambda: _edge(23), 200, 1.0, 1.0),
    "k-past-Vt": (lambda: _edge(24, vs=40, vt=3), 5, 1.0, 1.0),
    "masked-k-past-the-finite": (_masked, 150, 1.0, 1.0),
    "one-value-rows": (lambda: (torch.full((3, 300), 1.5), _edge(25)[1]), 7, 1.0, 1.0),
    "one-value-rows-bf16": (lambda: (torch.full((3, 500), 0.75, dtype=torch.bfloat16),
                                     torch.full((3, 400), -3.0, dtype=torch.bfloat16)), 100, 1.0, 1.0),
    "few-values-bf16": (_few_values, 100, 1.0, 1.0),
    "signed-zeros": (_signed_zeros, 20, 1.0, 1.0),
    "temperatures-0.05-and-20": (lambda: _edge(26), 30, 0.05, 20.0),  # failed on the GPU before 1 - mass was summed
    "cold-student-0.03": (lambda: _edge(4, scale=1.0), 30, 0.03, 3.0),  # failed on both engines so
    "cold-large-logits": (_cold_large, 20, 1e-4, 1e-3),
    "logits-near-3e4": (lambda: _edge(27, shift=3e4), 40, 1.0, 1.0),
    "logits-near-minus-3e4": (lambda: _edge(28, shift=-3e4), 40, 1.0, 1.0),
    "fp16-subnormals": (lambda: (_edge(29, scale=1e-5)[0].half(), _edge(29)[1].half()), 50, 1.0, 1.0),
    "fp16-student-bf16-teacher": (lambda: (_edge(30)[0].half(), _edge(30)[1].bfloat16()), 60, 1.0, 1.0),
    "column-strides": (lambda: tuple(x.t().contiguous().t() for x in _edge(31)), 30, 1.0, 1.0),
    "crowded-runs": (_crowded_runs, 37, 1.0, 1.0),
    "crowded-bin-bf16": (lambda: _crowded_bin(torch.bfloat16, 8), 100, 1.0, 1.0),
    "crowded-bin-fp16": (lambda: _crowded_bin(torch.float16, 64), 100, 1.0, 1.0),
    "wide-guessed": (lambda: _wide("as-drawn", widths=(70_000, 66_000)), 100, 2.0, 2.0),
    "wide-guessed-k1-bf16": (lambda: _wide("as-drawn", torch.bfloat16, widths=(70_000, 66_000)), 1, 1.0, 1.0),
    "wide-sample-high": (lambda: _wide("sample-high"), 100, 2.0, 2.0),
    "wide-sample-low": (lambda: _wide("sample-low"), 100, 2.0, 2.0),
    "wide-teacher-sample-high": (lambda: _wide("teacher-sample-high"), 100, 2.0, 2.0),
    "wide-one-warp-crowded": (lambda: _wide("one-warp-crowded"), 100, 1.0, 1.0),
    "wide-past-the-sort": (lambda: _wide("past-the-sort"), 100, 1.0, 1.0),
    "wide-masked": (lambda: _wide("masked"), 100, 1.0, 1.0),
    "wide-z-over-t-overflows": (lambda: _wide("z-over-t-overflows"), 100, 1e-37, 1.0),
    # rows of 9,000 and 30,000 columns: 2 and 7 blocks sampled
    "narrow-guessed": (lambda: _wide("as-drawn", widths=(9_000, 30_000)), 100, 2.0, 2.0),
    "narrow-guessed-bf16": (lambda: _wide("as-drawn", torch.bfloat16, widths=(30_000, 9_000)), 60, 1.0, 1.0),
}


@pytest.mark.parametrize("name", list(EDGES))
def test_edge_rows(name, device):
    """Edge rows on every engine: losses and both sides' gradients against the reference."""
    make, k, ts, tt = EDGES[name]
    student, teacher = (x.to(device) for x in make())
    s_in, t_in = student.detach().requires_grad_(True), teacher.detach().requires_grad_(True)
    rows = ULDTopKFunction.apply(s_in, t_in, k, ts, tt, True)
    upstream = torch.linspace(0.5, 2.0, rows.shape[0], device=device)
    (rows * upstream).sum().backward()
    s64, t64 = student.double().requires_grad_(True), teacher.double().requires_grad_(True)
    ref = uld_loss_reference(s64, t64, student_temperature=ts, teacher_temperature=tt, reduction="none", top_k=k)
    (ref * upstream.double()).sum().backward()
    assert_losses_close(rows, ref.detach(), torch.float32)
    for ours, want, logits, what in ((s_in.grad, s64.grad, student, "student"), (t_in.grad, t64.grad, teacher, "teacher")):
        assert_grads_close(ours, want, logits, logits.dtype, what=what, per_tie_group=True)


@pytest.mark.parametrize("kind, k", [("nan-inf", 50), ("nan-inside", 1)])
def test_wide_rows_with_nan_or_inf(kind, k, device):
    """A NaN or +inf logit outside the sampled blocks of a wide row (the guess holds the first
    k), or a NaN inside them and a negative NaN outside (at k = 1 the guess is the NaN's bin:
    refused): those rows' loss and both gradients NaN, the other row's the reference's."""
    student, teacher = (x.to(device) for x in _wide(kind))
    s_in, t_in = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    loss = ULDTopKFunction.apply(s_in, t_in, k, 1.0, 1.0, True)
    loss.sum().backward()
    ref = uld_loss_reference(student[2:].double(), teacher[2:].double(), reduction="none", top_k=k)
    assert torch.isnan(loss[:2]).all() and torch.isfinite(loss[2])
    assert_losses_close(loss[2:], ref, torch.float32)
    for grad in (s_in.grad, t_in.grad):
        assert torch.isnan(grad[:2]).all() and torch.isfinite(grad[2]).all()


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


def test_the_gpu_select_takes_four_warps(monkeypatch):
    """The select's shared-memory helpers and its collect pass's runs assume 4 warps: another
    warp count is refused before any launch (it would write past the scratch rows)."""
    monkeypatch.setattr(launch, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(launch, "TOPK_WARPS", 8)
    student, teacher = _rows(0, 2, 30, 20, torch.float32, "cpu")
    with pytest.raises(ValueError, match="TOPK_WARPS and TOPK_RUNS must be 4"):
        launch.topk_rows(student, teacher, 5, 1.0, 1.0, (True, False))
