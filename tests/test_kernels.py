"""uld_kernels against the float64 reference on small shapes.

On a CPU these run the Triton kernels under the interpreter (conftest sets
TRITON_INTERPRET=1), so shapes stay small; on a GPU the same tests run compiled.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import uld_kernels.launch as launch
from bench.shapes import make_rows
from tests.helpers import assert_grads_close, assert_losses_close, cross_near_ties, reference_rows_and_grads
from uld_kernels import uld_loss


def _rows(kind, n, vs, vt, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":  # tie-free in float32
        s, t = torch.randn(n, vs, generator=g) * 3, torch.randn(n, vt, generator=g) * 2.5
    elif kind == "peaked":  # a few dominant logits, like an LLM's
        s, t = torch.randn(n, vs, generator=g), torch.randn(n, vt, generator=g)
        s[:, : min(3, vs)] += 12.0
        t[:, -min(2, vt):] += 10.0
    elif kind == "near":  # teacher close to student: the hard case for counting
        s = torch.randn(n, vs, generator=g) * 2
        t = s + 0.01 * torch.randn(n, vt, generator=g)
    elif kind == "integers":  # exact ties inside and across the two rows
        s = torch.randint(-3, 4, (n, vs), generator=g).float()
        t = torch.randint(-3, 4, (n, vt), generator=g).float()
    elif kind == "permuted":  # same distribution, other order: loss 0 through ties only
        s = torch.randint(-4, 5, (n, vs), generator=g).float()
        t = s[:, torch.randperm(vs, generator=g)]
    else:
        raise ValueError(kind)
    return s.to(dtype).to(device), t.to(dtype).to(device)


# (rows, Vs, Vt): why each point is here
SHAPES = [
    (1, 1, 1),  # one-element vocabularies: loss 0
    (3, 1, 7),  # student of one token against a longer teacher
    (2, 7, 1),  # and the other way round
    (4, 100, 77),  # neither a power of two, student longer
    (2, 257, 1000),  # teacher much longer: padding of the student
    (3, 300, 300),  # equal vocabularies
]


@pytest.mark.parametrize("n,vs,vt", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_student_grad_match_reference(n, vs, vt, dtype, device):
    student, teacher = _rows("random", n, vs, vt, dtype, device, seed=vs * 7 + vt)
    student.requires_grad_(True)
    rows = uld_loss(student, teacher, reduction="none")
    rows.sum().backward()
    ref_rows, ref_grad, _ = reference_rows_and_grads(student, teacher)
    assert_losses_close(rows, ref_rows, dtype)
    assert student.grad.dtype == dtype
    assert_grads_close(student.grad, ref_grad, student, dtype)


@pytest.mark.parametrize("kind", ["peaked", "near", "integers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_distributions(kind, dtype, device):
    student, teacher = _rows(kind, 3, 200, 200 if kind == "near" else 150, dtype, device,
                             seed=len(kind))
    student.requires_grad_(True)
    rows = uld_loss(student, teacher, reduction="none")
    rows.sum().backward()
    ref_rows, ref_grad, _ = reference_rows_and_grads(student, teacher)
    assert_losses_close(rows, ref_rows, dtype)
    # Integer logits tie in every dtype: compare per tie group there.
    assert_grads_close(student.grad, ref_grad, student, dtype,
                       per_tie_group=dtype != torch.float32 or kind == "integers")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_distribution_in_another_order(dtype, device):
    """Loss 0 up to rounding. The gradient is not compared: at an exact tie of the two
    sorted vectors every sign in [-1, 1] is a subgradient, and which one the float64
    reference picks depends on the last bit of its two log-sum-exps."""
    student, teacher = _rows("permuted", 3, 300, 300, dtype, device, seed=4)
    rows = uld_loss(student, teacher, reduction="none")
    ref_rows, _, _ = reference_rows_and_grads(student, teacher)
    assert_losses_close(rows, ref_rows, dtype)


def test_exact_ties_across_the_two_rows(device):
    """Uniform rows over the same support, shifted by a masked entry so that they are not
    equal element by element: every probability ties across the two sides, exactly (sums
    of ones are exact), and the tie rule must give loss 0 and gradient 0."""
    n, v = 2, 300
    student = torch.zeros(n, v + 1, device=device)
    teacher = torch.zeros(n, v + 1, device=device)
    student[:, -1] = -math.inf
    teacher[:, 0] = -math.inf
    student.requires_grad_(True)
    rows = uld_loss(student, teacher, reduction="none")
    rows.sum().backward()
    assert torch.equal(rows, torch.zeros_like(rows)), rows
    assert torch.equal(student.grad, torch.zeros_like(student.grad))


def test_temperatures_and_teacher_grad(device):
    student, teacher = _rows("random", 3, 150, 120, torch.float32, device, seed=3)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    rows = uld_loss(student, teacher, student_temperature=2.0, teacher_temperature=0.5,
                    reduction="none")
    rows.sum().backward()
    ref_rows, ref_s, ref_t = reference_rows_and_grads(student, teacher, 2.0, 0.5, teacher_grad=True)
    assert_losses_close(rows, ref_rows, torch.float32)
    assert_grads_close(student.grad, ref_s, student, torch.float32, what="student gradient")
    assert_grads_close(teacher.grad, ref_t, teacher, torch.float32, what="teacher gradient")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_upstream_gradient(reduction, device):
    student, teacher = _rows("random", 4, 90, 60, torch.float32, device, seed=11)
    student.requires_grad_(True)
    loss = uld_loss(student, teacher, reduction=reduction)
    upstream = torch.rand(loss.shape, device=device) * 3 + 0.5  # never exactly 1
    (loss * upstream).sum().backward()
    s = student.detach().double().requires_grad_(True)
    from reference import uld_loss_reference

    ref = uld_loss_reference(s, teacher.double(), reduction=reduction)
    (ref * upstream.double()).sum().backward()
    assert_losses_close(loss, ref, torch.float32)
    assert_grads_close(student.grad, s.grad, student, torch.float32)


@pytest.mark.parametrize("width", ["narrow", "wide"])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_rows_over_more_rows_than_programs(width, per_row, dtype, device):
    """launch.scale_rows_ (backward's in-place scaling) runs a persistent grid: each program
    takes several rows, and in a row wider than 8 blocks, several blocks. Every row is scaled
    exactly like the float32 product rounded once (as the device rounds), and rows of scale
    exactly 1 are left as they were, bit for bit."""
    block = 4096 if device == "cuda" else 1024
    n_rows, vocab = (100, 1500) if width == "narrow" else (20, 8 * block + 900)
    if device == "cuda":
        n_rows *= 50
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(n_rows, vocab, generator=g).to(dtype).to(device)
    if per_row:
        scale = (torch.rand(n_rows, generator=g) * 2 + 0.25).to(device)
        scale[::3] = 1.0  # rows left alone
    else:
        scale = torch.tensor([0.375], device=device)
    product = grad.float() * (scale[:, None] if per_row else scale)
    if dtype == torch.bfloat16 and device == "cpu":  # Triton's interpreter truncates float32 to bf16
        expected = (product.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
    else:  # the GPU rounds to nearest even, as torch does
        expected = product.to(dtype)
    ours = grad.clone()
    launch.scale_rows_(ours, scale)
    assert torch.equal(ours, expected)
    unchanged = grad.clone()
    launch.scale_rows_(unchanged, torch.ones(1, device=device))
    assert torch.equal(unchanged, grad)


@pytest.mark.parametrize("n_rows,width", [(1, 10), (7, 100), (5000, 151936), (65536, 4096), (100, 262144)])
def test_row_grid_is_persistent_and_covers_every_row(n_rows, width, device):
    """launch._row_grid: at most the resident programs (8 an SM), each row in one program's run."""
    grad = torch.empty(n_rows, width, dtype=torch.bfloat16, device=device)  # (never touched)
    block, rows_per_program, (row_programs, splits) = launch._row_grid(grad)
    assert row_programs * splits <= launch._resident_programs(grad.device)
    assert (row_programs - 1) * rows_per_program < n_rows <= row_programs * rows_per_program
    assert 1 <= splits <= 8 and (splits - 1) * block < width


def test_scale_rows_rejects_what_it_cannot_scale(device):
    grad = torch.zeros(4, 6, device=device)
    with pytest.raises(ValueError, match="grad must be a contiguous"):
        launch.scale_rows_(grad.t(), torch.ones(1, device=device))
    with pytest.raises(ValueError, match="scale must be a contiguous tensor of 1 or 4"):
        launch.scale_rows_(grad, torch.ones(3, device=device))


def test_masked_vocabulary_and_nan_rows(device):
    student, teacher = _rows("random", 4, 64, 48, torch.float32, device, seed=5)
    student[0, ::3] = -math.inf  # masked entries: probability 0
    teacher[1, :10] = -math.inf
    student[2, 7] = math.nan  # a NaN poisons its own row only
    teacher[3, 0] = math.inf  # so does +inf
    student.requires_grad_(True)
    rows = uld_loss(student, teacher, reduction="none")
    rows.sum().backward()
    assert torch.isnan(rows[2:]).all(), f"rows with NaN / +inf logits must give NaN, got {rows}"
    assert torch.isnan(student.grad[2:]).all()
    ref_rows, ref_grad, _ = reference_rows_and_grads(student[:2], teacher[:2])
    assert_losses_close(rows[:2], ref_rows, torch.float32)
    assert_grads_close(student.grad[:2], ref_grad, student[:2], torch.float32)
    assert (student.grad[0, ::3] == 0).all(), "masked logits must get zero gradient"


def test_strided_rows_are_read_in_place(device):
    base = torch.randn(3, 5, 130, device=device)  # [B, L, V]
    teacher_base = torch.randn(3, 5, 90, device=device)
    student = base[:, 2, :]  # row stride 5 * 130, not contiguous
    teacher = teacher_base[:, 1:4, :].transpose(0, 1)[1]  # another stride
    transposed = torch.randn(90, 3, device=device).t()  # column stride 3
    assert not student.is_contiguous() and not transposed.is_contiguous()
    for t in (teacher, transposed):
        rows = uld_loss(student, t, reduction="none")
        ref_rows, _, _ = reference_rows_and_grads(student, t)
        assert_losses_close(rows, ref_rows, torch.float32)


def test_no_rows(device):
    student = torch.randn(0, 10, device=device, requires_grad=True)
    teacher = torch.randn(0, 12, device=device)
    assert uld_loss(student, teacher, reduction="none").shape == (0,)
    total = uld_loss(student, teacher, reduction="sum")
    assert total.item() == 0.0
    assert math.isnan(uld_loss(student, teacher, reduction="mean").item())
    total.backward()
    assert student.grad.shape == (0, 10)


def test_deterministic_and_independent_of_batch(device):
    student, teacher = _rows("near", 6, 300, 300, torch.bfloat16, device, seed=9)
    student.requires_grad_(True)
    first = uld_loss(student, teacher, reduction="none")
    (g1,) = torch.autograd.grad(first.sum(), student)
    second = uld_loss(student, teacher, reduction="none")
    (g2,) = torch.autograd.grad(second.sum(), student)
    assert torch.equal(first, second) and torch.equal(g1, g2), "results differ between runs"
    part = uld_loss(student[2:4], teacher[2:4], reduction="none")
    (gp,) = torch.autograd.grad(part.sum(), student)
    assert torch.equal(part, first[2:4]), "a row's loss depends on the other rows of its batch"
    assert torch.equal(gp[2:4], g1[2:4])


@pytest.mark.parametrize("entries", [1024, 300, 20])
def test_small_workspace_stays_exact_or_says_nan(entries, device, monkeypatch):
    """A smaller trie (`entries` below the root) splits fewer bits per level: still exact.
    When even one bit per open bucket no longer fits and no retry may take more
    (ULD_TRIE_RETRY_ENTRIES 0 here), the row's loss is NaN, with a warning (never a wrong
    number, never a silent one). (The rows' float32 values are integers, which bf16 holds: the
    histogram engine would take them, ULD_HIST_FLOAT32=0 keeps them in the trie.)"""
    monkeypatch.setattr(launch, "HIST_FLOAT32", False)
    for knobs in (launch.SPLIT, launch.SPLIT_INTERPRETED):
        monkeypatch.setitem(knobs, "entries", (1 << knobs["root_bits"]) + entries)
    monkeypatch.setattr(launch, "TRIE_RETRY_ENTRIES", 0)
    student, teacher = _rows("permuted", 2, 400, 400, torch.float32, device, seed=2)
    student.requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows, status, grad, _ = launch.uld_rows(student, teacher, 1.0, 1.0, True, False, 1.0)
    ref_rows, ref_grad, _ = reference_rows_and_grads(student, teacher)
    ok = (status & 1) == 0
    assert torch.isnan(rows[~ok]).all(), "a row whose workspace ran out must be NaN"
    said = [w for w in caught if "ran out of trie workspace" in str(w.message)]
    assert len(said) == int(not ok.all()), f"one warning where rows are NaN: {[str(w.message) for w in caught]}"
    if entries >= 1024:
        assert ok.all(), f"1,024 entries suffice for 400 elements, status {status.tolist()}"
    if entries <= 20:
        assert not ok.any(), f"20 entries cannot split these rows' open buckets, status {status.tolist()}"
    assert_losses_close(rows[ok], ref_rows[ok.cpu()], torch.float32)
    # Every value ties with one of the other row: which sign each group gets depends on the
    # last bit of each side's log-sum-exp (test_same_distribution_in_another_order), so only
    # the bound of a near-tie applies.
    near = cross_near_ties(student[ok], teacher[ok])
    assert_grads_close(grad[ok], ref_grad[ok.cpu()], student[ok], torch.float32, per_tie_group=False,
                       near_ties=near)


def _out_of_workspace_rows(device, monkeypatch, pairs=6):
    """float32 rows of one vocabulary drawn alike (the trie's hard case), on a workspace where
    some run out at the first size: under the interpreter, a teacher that is the student plus a
    little noise, 2,048 entries and 3,000 columns (pair 1 of these runs out; the first `pairs`
    of the 6 drawn are returned); on the GPU, the
    real 16,384 entries and independent N(0, 1) Qwen/Qwen rows (84 of 256 ran out there, rows
    0 and 2 of these among them: `bench/probe_trie_workspace.py`, fourteenth session). Returns
    them and the size."""
    if device == "cpu":
        monkeypatch.setitem(launch.SPLIT_INTERPRETED, "entries", 2048)
        student, teacher = make_rows("near", 6, 3000, 3000, seed=3, dtype=torch.float32, device="cpu")
        student, teacher = student[:pairs].contiguous(), teacher[:pairs].contiguous()
    else:
        student, teacher = make_rows("random", 12, 151936, 151936, seed=5, dtype=torch.float32, device=device)
    return student, teacher, launch.split_config(device == "cuda").entries


def test_pairs_out_of_workspace_are_computed_again_with_more(device, monkeypatch):
    """A pair whose trie needs more entries than it has (status bit 0, loss NaN: the premise,
    with retries off) is computed again alone with 4x the entries (launch._retry_exhausted):
    every row exact against float64, the retried ones bit for bit what that size gives them
    from the start, the others untouched; no warning."""
    student, teacher, entries = _out_of_workspace_rows(device, monkeypatch, pairs=3)  # 1 out, 2 not (CPU)
    monkeypatch.setattr(launch, "TRIE_RETRY_ENTRIES", entries)
    with pytest.warns(RuntimeWarning, match="ran out of trie workspace"):
        first, status, _, first_grad, _ = launch.uld_pairs(student, teacher, 1.0, 1.0, True, False, 1.0)
    out = (status & 1) != 0
    assert out.any(), f"test input: no pair ran out of {entries} entries, status {status.tolist()}"
    monkeypatch.setattr(launch, "TRIE_RETRY_ENTRIES", 1 << 20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows, status, _, grad, _ = launch.uld_pairs(student, teacher, 1.0, 1.0, True, False, 1.0)
    assert not (status & 1).any(), f"status {status.tolist()}"
    assert not [w for w in caught if "ran out of trie workspace" in str(w.message)], "a warning after the retry"
    assert torch.equal(rows[~out], first[~out]) and torch.equal(grad[~out], first_grad[~out]), (
        "a pair that did not run out changed")
    key = "SPLIT_INTERPRETED" if device == "cpu" else "SPLIT"
    monkeypatch.setitem(getattr(launch, key), "entries", entries * 4)
    bigger, _, _, bigger_grad, _ = launch.uld_pairs(student, teacher, 1.0, 1.0, True, False, 1.0)
    assert torch.equal(rows[out], bigger[out]) and torch.equal(grad[out], bigger_grad[out]), (
        "a retried pair differs from the same pair computed with the larger trie from the start")
    ref_rows, ref_grad, _ = reference_rows_and_grads(student, teacher)
    assert_losses_close(rows, ref_rows, torch.float32)
    assert_grads_close(grad, ref_grad, student, torch.float32, near_ties=cross_near_ties(student, teacher))


def test_gathered_pairs_out_of_workspace_keep_their_weights_and_cross_entropy(device, monkeypatch):
    """The same through the training loss's path: gathered pairs (reordered, one padding),
    row weights, the cross-entropy fused. The retried pairs get the losses, cross-entropies
    and gradient rows that the larger trie gives them from the start."""
    if device != "cpu":
        pytest.skip("the interpreter's small workspace makes the case; on the GPU the aligned test covers the retry")
    student, teacher, entries = _out_of_workspace_rows(device, monkeypatch)
    kw = dict(student_index=torch.tensor([5, 1, -1, 3, 0]), teacher_index=torch.tensor([5, 1, 2, 3, 0]),
              row_weight=torch.tensor([0.5, 2.0, 1.0, 1.5, 1.0]), ce_label=torch.tensor([7, 2999, -1, 0, 11]),
              ce_weight=torch.tensor([1.0, 0.5, 1.0, 2.0, 1.0]))
    monkeypatch.setattr(launch, "TRIE_RETRY_ENTRIES", entries)
    with pytest.warns(RuntimeWarning, match="ran out of trie workspace"):
        first = launch.uld_pairs(student, teacher, 1.0, 1.0, True, True, 0.25, **kw)
    out = (first[1] & 1) != 0
    assert out.any(), f"test input: no pair ran out, status {first[1].tolist()}"
    monkeypatch.setattr(launch, "TRIE_RETRY_ENTRIES", 1 << 20)
    rows, status, ce, grad_s, grad_t = launch.uld_pairs(student, teacher, 1.0, 1.0, True, True, 0.25, **kw)
    assert not (status & 1).any(), f"status {status.tolist()}"
    monkeypatch.setitem(launch.SPLIT_INTERPRETED, "entries", entries * 4)
    big = launch.uld_pairs(student, teacher, 1.0, 1.0, True, True, 0.25, **kw)
    retried_rows = kw["student_index"][out]
    assert torch.equal(rows[out], big[0][out]) and torch.equal(ce[out], big[2][out]), "losses or cross-entropies"
    assert torch.equal(grad_s[retried_rows], big[3][retried_rows]), "the retried pairs' student gradient rows"
    assert torch.equal(grad_t[kw["teacher_index"][out]], big[4][kw["teacher_index"][out]]), "teacher gradient rows"
    kept = kw["student_index"][~out & (kw["student_index"] >= 0)]
    assert torch.equal(grad_s[kept], first[3][kept]) and torch.equal(rows[~out], first[0][~out]), "the other pairs"


def test_gradient_matches_finite_differences(device):
    """Central differences of the kernel's own loss (float32, tie-free rows far from
    near-ties): the handwritten gradient is the derivative of what the forward computes."""
    g = torch.Generator().manual_seed(21)
    student = (torch.randn(2, 40, generator=g) * 3).to(device).requires_grad_(True)
    teacher = (torch.randn(2, 30, generator=g) * 3).to(device)
    weights = torch.tensor([1.0, 0.5], device=device)
    (uld_loss(student, teacher, student_temperature=1.5, reduction="none") * weights).sum().backward()
    eps = 1e-3
    for row, col in [(0, 0), (0, 17), (1, 5), (1, 39), (0, 33)]:
        def loss_at(delta):
            moved = student.detach().clone()
            moved[row, col] += delta
            return float((uld_loss(moved, teacher, student_temperature=1.5, reduction="none") * weights).sum())
        numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
        analytic = float(student.grad[row, col])
        assert abs(numeric - analytic) <= 2e-4 + 2e-3 * abs(analytic), (
            f"d loss / d z[{row}, {col}]: finite differences {numeric:.6g}, kernel {analytic:.6g}")


def _check_rows_with_a_nan_row(kind, device, seed):
    """7 rows of `kind` (several batches and chunks), row 3 with a NaN: the other rows' losses
    and gradients match the reference, row 3 is NaN."""
    student, teacher = _rows(kind, 7, 600, 600 if kind == "near" else 450, torch.float32, device, seed=seed)
    student[3, 7] = float("nan")
    student.requires_grad_(True)
    rows, status, grad, _ = launch.uld_rows(student, teacher, 1.0, 1.0, True, False, 1.0)
    ref_rows, ref_grad, _ = reference_rows_and_grads(student, teacher)
    assert torch.isnan(rows[3]) and torch.isnan(grad[3]).all(), "a NaN row stays NaN"
    keep = torch.arange(7, device=rows.device) != 3
    assert_losses_close(rows[keep], ref_rows[keep.cpu()], torch.float32)
    assert_grads_close(grad[keep], ref_grad[keep.cpu()], student[keep], torch.float32,
                       per_tie_group=kind in ("integers",))


@pytest.mark.parametrize("kind", ["near"])  # (the deepest tries; also random and integers before the 25th session)
def test_without_prefetch(kind, device, monkeypatch):
    """ULD_PREFETCH=0: the count, loss and gradient loops load each block where they use it
    instead of one iteration ahead (the default). Same results."""
    monkeypatch.setitem(launch.SPLIT_INTERPRETED, "prefetch", False)
    monkeypatch.setitem(launch.SPLIT, "prefetch", False)
    _check_rows_with_a_nan_row(kind, device, seed=41)


@pytest.mark.parametrize("cap,kind", [(1, "random"), (1, "near"), (1, "integers"), (1 << 20, "integers")])
def test_level_cap(cap, kind, device, monkeypatch):
    """ULD_LEVEL_CAP bounds the entries under the root's open buckets past 4 bits each: 1 keeps
    just the 4 bits (more levels), a huge cap none (as before the cap). Same results."""
    monkeypatch.setitem(launch.SPLIT_INTERPRETED, "level_cap", cap)
    monkeypatch.setitem(launch.SPLIT, "level_cap", cap)
    _check_rows_with_a_nan_row(kind, device, seed=43)


def test_no_grad_evaluation_computes_no_gradient(device, monkeypatch):
    """Under torch.no_grad() the logits may still require grad (a model's output in an
    evaluation loop): the kernels must not compute or allocate a gradient then."""
    import uld_kernels.autograd as autograd

    calls = []
    real = autograd.uld_rows

    def spy(*args):
        calls.append(args[4])  # student_grad
        return real(*args)

    monkeypatch.setattr(autograd, "uld_rows", spy)
    student, teacher = _rows("random", 3, 50, 40, torch.float32, device, seed=5)
    student.requires_grad_(True)
    with torch.no_grad():
        evaluated = uld_loss(student, teacher)
    trained = uld_loss(student, teacher)
    assert calls == [False, True], calls
    assert torch.equal(evaluated, trained.detach())


def test_every_global_a_kernel_reads_is_cheap_to_check():
    """Triton compares every global a kernel reads (through the functions it calls) with its
    value at compile time, at each launch; tl.constexpr's != took ~2 us each, and
    hist_kernel reads 40 (the fallback 75 through its callees). Each must be a `const`, whose != of an unchanged value
    is one comparison, and which behaves as tl.constexpr otherwise. (In a process without the
    interpreter, whose kernels are not JITFunctions.)"""
    script = """
import triton
import triton.language as tl
from uld_kernels import launch
from uld_kernels.kernels import cross_entropy, uld_hist, uld_rows, uld_split
from uld_kernels.kernels.const import const

kernels = [k for m in (uld_hist, uld_rows, uld_split, cross_entropy, launch) for k in vars(m).values()
           if isinstance(k, triton.runtime.jit.JITFunction)]
assert len(kernels) > 20, len(kernels)
for kernel in kernels:
    kernel.cache_key  # (collects the globals)
    loose = [name for (name, _), (value, _) in kernel.used_global_vals.items() if type(value) is not const]
    assert not loose, (kernel.__name__, loose)
assert sum(len(k.used_global_vals) for k in kernels) > 100
for a, b in [(3, 3), (3, 4), ("x", "x"), ("x", "y"), (1, True), (True, True), (2.5, 2.5)]:
    fast, slow = const(a) != const(b), tl.constexpr(a) != tl.constexpr(b)
    assert isinstance(fast, tl.constexpr) and fast.value == slow.value, (a, b)
assert repr(const(7)) == repr(tl.constexpr(7))  # (a kernel's cache key holds its globals' reprs)
# Triton's check, as JITFunction.run makes it, answered without tl.constexpr.__ne__ (the slow one):
def slow(self, other):
    raise AssertionError(f"tl.constexpr.__ne__ called for {self!r}")
tl.constexpr.__ne__ = slow
checked = 0
for kernel in kernels:
    for (name, _), (value, globals_dict) in kernel.used_global_vals.items():
        assert not (globals_dict[name] != value), name
        checked += 1
assert checked > 100
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_eager_calls_skip_the_dispatcher_where_nothing_needs_it(device, monkeypatch):
    """Eager calls on plain tensors run the custom ops' Python functions directly
    (autograd.call_op: the dispatcher's path cost ~0.1 ms of host time a call); under the
    profiler the ops run and are named in its trace. Loss and gradient are the same both ways."""
    import uld_kernels.autograd as autograd

    direct = []
    for name, (fn, mutated) in list(autograd._FUNCTIONS.items()):
        monkeypatch.setitem(autograd._FUNCTIONS, name,
                            (lambda *args, _fn=fn, _name=name: direct.append(_name) or _fn(*args), mutated))
    student, teacher = _rows("random", 3, 50, 40, torch.float32, device, seed=6)
    eager = student.clone().requires_grad_(True)
    eager_loss = uld_loss(eager, teacher)
    eager_loss.backward()
    assert direct == ["uld_loss", "scale_rows_"]
    direct.clear()
    profiled = student.clone().requires_grad_(True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        profiled_loss = uld_loss(profiled, teacher)
        profiled_loss.backward()
    assert direct == []
    names = {event.name for event in prof.events()}
    assert {"uld_kernels::uld_loss", "uld_kernels::scale_rows_"} <= names, sorted(names)[:20]
    assert torch.equal(eager_loss, profiled_loss)
    assert torch.equal(eager.grad, profiled.grad)


def test_what_needs_the_dispatcher_keeps_it():
    """`_dispatch_free` is False wherever the op must run: fake tensors (a dispatch mode), a
    torch function mode, a torch.func transform, the profiler, meta tensors, tensor subclasses."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from uld_kernels.autograd import _dispatch_free

    x = torch.ones(3)
    assert _dispatch_free((x, 1.0, "mean", True))
    assert not _dispatch_free((torch.ones(3, device="meta"),))
    assert not _dispatch_free((torch.nn.Parameter(x),))
    with FakeTensorMode():
        assert not _dispatch_free((x,))
    with torch.overrides.TorchFunctionMode():
        assert not _dispatch_free((x,))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert not _dispatch_free((x,))
    seen = []
    torch.func.grad(lambda y: seen.append(_dispatch_free((y,))) or y.sum())(x)
    assert seen == [False]
    assert _dispatch_free((x,))


def test_meta_tensors_get_shapes_without_kernels():
    """On meta tensors (shape checks, memory planning) the op's fake implementation runs:
    loss and gradient of the right shapes, and no kernel."""
    student = torch.empty(3, 50, device="meta", requires_grad=True)
    teacher = torch.empty(3, 40, device="meta")
    for reduction, shape in [("mean", ()), ("none", (3,))]:
        loss = uld_loss(student, teacher, reduction=reduction)
        assert loss.device.type == "meta" and tuple(loss.shape) == shape
    (grad,) = torch.autograd.grad(uld_loss(student, teacher), student)
    assert grad.device.type == "meta" and tuple(grad.shape) == (3, 50)


def test_a_second_backward_through_one_graph_raises(device):
    """The saved gradient is scaled in place by the first backward: a second one through the
    same graph (retain_graph=True) must raise, through the op or its Python function alike,
    never scale it again (the version counter of the mutated tensor goes up either way)."""
    student, teacher = _rows("random", 3, 50, 40, torch.float32, device, seed=7)
    for profiled in (False, True):
        x = student.clone().requires_grad_(True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profiled else \
                contextlib.nullcontext():
            loss = uld_loss(x, teacher) * 2
            loss.backward(retain_graph=True)
            first = x.grad.clone()
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()
        assert torch.equal(x.grad, first)


def test_reduction_is_checked_by_the_function_too():
    """ULDFunction.apply called directly (not through uld_loss) names a bad reduction."""
    from uld_kernels.autograd import ULDFunction

    with pytest.raises(ValueError, match="reduction"):
        ULDFunction.apply(torch.ones(2, 3), torch.ones(2, 3), 1.0, 1.0, None, True)
