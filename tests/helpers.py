"""Comparisons against the float64 reference, shared by the CPU (interpreter) and GPU tests."""

from __future__ import annotations

import os

import torch

from reference import uld_row_losses_reference
from reference.tolerances import grad_tol, loss_tol

# Examples per hypothesis test are sized for CI (the interpreter runs these kernels slowly,
# and the suite must stay under 20 minutes on two cores); a thorough run multiplies them:
# ULD_TEST_EXAMPLES=3 python -m pytest tests. The examples are derandomized either way.
EXAMPLES_SCALE = float(os.environ.get("ULD_TEST_EXAMPLES", "1"))


def examples(n: int) -> int:
    """Hypothesis max_examples: n at CI's scale, times ULD_TEST_EXAMPLES."""
    return max(1, round(n * EXAMPLES_SCALE))


def reference_rows_and_grads(student, teacher, student_temperature=1.0, teacher_temperature=1.0,
                             teacher_grad=False):
    """float64 row losses and the gradients of their sum (autograd through the sort)."""
    s = student.detach().double().requires_grad_(True)
    t = teacher.detach().double().requires_grad_(teacher_grad)
    rows = uld_row_losses_reference(s, t, student_temperature, teacher_temperature)
    rows.sum().backward()
    return rows.detach(), s.grad, (t.grad if teacher_grad else None)


def assert_losses_close(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what="loss"):
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    torch.testing.assert_close(ours, ref, **loss_tol(dtype), equal_nan=True,
                               msg=lambda m: f"{what} differs from the float64 reference: {m}")


# Probabilities are computed in float32 as exp(x - lse): the rounding of x - lse (half an
# ulp of |x - lse| < 32, 1.9e-6) dominates, about 2e-6 relative error in p. Two values of
# the two rows closer than twice that may be ordered either way.
NEAR_TIE_RELATIVE_GAP = 4e-6


def cross_near_ties(student, teacher, student_temperature=1.0, teacher_temperature=1.0):
    """Student elements whose probability lies within float32 resolution of a teacher
    probability. Only such an element can change sign between float32 and float64: the order
    within one row is exact (exp is monotone), so only a crossing of the element itself with
    a value of the other row changes the counts above it."""
    a = torch.softmax(student.detach().double() / student_temperature, -1)
    b = torch.softmax(teacher.detach().double() / teacher_temperature, -1)
    b_sorted = b.sort(-1).values
    pos = torch.searchsorted(b_sorted, a.contiguous()).clamp(1, b.shape[-1] - 1) if b.shape[-1] > 1 else None
    if pos is None:
        nearest = (a - b_sorted).abs()
    else:
        nearest = torch.minimum((a - b_sorted.gather(-1, pos - 1)).abs(), (a - b_sorted.gather(-1, pos)).abs())
    return (nearest <= NEAR_TIE_RELATIVE_GAP * a) & (a > 0)


# Two logits of one row closer than this may get one float32 probability in the kernels (the
# rounding of log2 p: about 2**-24 * 32 absolute), which is then a tie there and not in the
# float64 reference: 12 N(0, 1) float32 rows of 151,936 held 4 to 24 elements each where the
# two split a pair's gradient differently (fourteenth session). At temperature 1; a larger
# temperature only narrows the gap that merges.
NEAR_TIE_LOGIT_GAP = 4e-6


def _joins_previous(values: torch.Tensor) -> torch.Tensor:
    """Of sorted values (last dimension), whether each past the first ties with the one before."""
    return ((values[..., 1:] - values[..., :-1]) <= NEAR_TIE_LOGIT_GAP) | (values[..., 1:] == values[..., :-1])


def _tie_groups(logits_row: torch.Tensor):
    """Group index of each element (runs of sorted values, each tied with the one before) and
    the number of groups."""
    values, order = logits_row.double().sort()
    new = torch.ones(values.numel(), dtype=torch.long)
    new[1:] = (~_joins_previous(values)).long()
    sorted_group = new.cumsum(0) - 1
    group = torch.empty_like(sorted_group)
    group[order] = sorted_group
    return group, int(new.sum())


def has_ties(logits: torch.Tensor) -> bool:
    """Whether some row holds two values within NEAR_TIE_LOGIT_GAP (or equal)."""
    return bool(_joins_previous(logits.detach().double().sort(-1).values).any())


def _group_sums(grad_row: torch.Tensor, logits_row: torch.Tensor):
    """Sum and absolute sum of the gradient over each group of (near-)equal logits."""
    group, n = _tie_groups(logits_row)
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, group, grad_row.double())
    abs_sums = torch.zeros(n, dtype=torch.float64).index_add_(0, group, grad_row.double().abs())
    return sums, abs_sums


def assert_grads_close(ours: torch.Tensor, ref: torch.Tensor, logits: torch.Tensor,
                       dtype: torch.dtype, what="gradient", per_tie_group: bool | None = None,
                       near_ties: torch.Tensor | None = None):
    """Element by element on float32 inputs without ties; per group of equal values (and of
    values within NEAR_TIE_LOGIT_GAP, tied at float32 resolution) on 16-bit inputs, where ties
    are the rule, and on rows that hold one: any split of a group's gradient is a valid
    subgradient.

    ``near_ties`` (from ``cross_near_ties``) marks elements tied with the other row at
    float32 resolution: there any sign in [-1, 1] is right, so only |diff| <= 2 p / T is
    checked, through the bound |ours - ref| <= 2 * max(|ours|, |ref|) + atol (per element, or
    per tie group on the absolute sums of a group that holds one)."""
    ours, ref, logits = ours.detach().cpu(), ref.detach().cpu(), logits.detach().cpu()
    tol = grad_tol(dtype)
    if per_tie_group is None:
        per_tie_group = dtype != torch.float32 or has_ties(logits)
    if not per_tie_group:
        if near_ties is not None:
            near_ties = near_ties.cpu()
            o, r = ours.double()[near_ties], ref.double()[near_ties]
            assert ((o - r).abs() <= 2 * torch.maximum(o.abs(), r.abs()) + tol["atol"]).all(), (
                f"{what}: a near-tie element is off by more than a sign change")
            ours, ref = ours.masked_fill(near_ties, 0), ref.masked_fill(near_ties, 0)
        torch.testing.assert_close(ours.double(), ref.double(), **tol,
                                   msg=lambda m: f"{what} differs element by element: {m}")
        return
    # (a NaN or infinity compares false with any bound: where either side holds one, both must)
    nonfinite = ~ours.isfinite()
    assert torch.equal(nonfinite, ~ref.isfinite()), (
        f"{what}: {int((nonfinite != ~ref.isfinite()).sum())} elements not finite on one side only "
        f"(ours {int(nonfinite.sum())}, reference {int((~ref.isfinite()).sum())})")
    ours, ref = ours.masked_fill(nonfinite, 0), ref.masked_fill(nonfinite, 0)
    for row in range(logits.shape[0]):
        ours_sum, ours_abs = _group_sums(ours[row], logits[row])
        ref_sum, ref_abs = _group_sums(ref[row], logits[row])
        bound = tol["atol"] + tol["rtol"] * ref_abs
        if near_ties is not None:  # a group holding a near-tie: any signs in [-1, 1] are right
            near, _ = _group_sums(near_ties[row].cpu().double(), logits[row])
            bound = torch.where(near > 0, 2 * torch.maximum(ours_abs, ref_abs) + tol["atol"], bound)
        bad = (ours_sum - ref_sum).abs() > bound
        assert not bad.any(), (
            f"{what}, row {row}: {int(bad.sum())} tie groups differ; worst "
            f"{float((ours_sum - ref_sum).abs().max()):.3g} (group sums ours "
            f"{ours_sum[bad][:4].tolist()} vs reference {ref_sum[bad][:4].tolist()})"
        )


def hist_flags(student, teacher, student_temperature=1.0, teacher_temperature=1.0):
    """The histogram engine's flags of each pair (0: its own; no fallback)."""
    from uld_kernels import launch
    return launch.hist_rows(student, teacher, student_temperature, teacher_temperature, False, False, 1.0,
                            fallback=False)[1]


def assert_hist_exact(student, teacher, student_temperature, teacher_temperature, what, dtype=torch.bfloat16):
    """`launch.hist_rows` (with its fallback) against the float64 reference: losses and both
    gradients."""
    from uld_kernels import launch
    rows, _status, grad_s, grad_t = launch.hist_rows(student, teacher, student_temperature, teacher_temperature,
                                                     True, True, 1.0)
    ref_rows, ref_s, ref_t = reference_rows_and_grads(student, teacher, student_temperature, teacher_temperature,
                                                      teacher_grad=True)
    assert_losses_close(rows, ref_rows, dtype, what=f"{what}: loss")
    assert_grads_close(grad_s, ref_s, student, dtype, what=f"{what}: student gradient")
    assert_grads_close(grad_t, ref_t, teacher, dtype, what=f"{what}: teacher gradient")


def gathered_pairs(student) -> dict:
    """The training loss's arguments for four gathered pairs of 4-row inputs: row maps (pair 2
    padding), weights and cross-entropy labels (one at the student's last column)."""
    device = student.device
    return dict(student_index=torch.tensor([2, 0, -1, 3], device=device),
                teacher_index=torch.tensor([0, 1, 2, 3], device=device),
                row_weight=torch.tensor([0.5, 2.0, 1.0, 1.5], device=device),
                ce_label=torch.tensor([5, 11, -1, student.shape[-1] - 1], device=device),
                ce_weight=torch.tensor([1.0, 0.5, 1.0, 2.0], device=device))


def assert_gathered_pairs_match_the_trie(student, teacher, student_temperature, teacher_temperature,
                                         dtype=torch.bfloat16):
    """The training loss's path through the histogram engine (four gathered pairs of 4-row
    inputs: row maps, a padding pair, weights, the student's cross-entropy) against the trie
    engine: losses, cross-entropies and the student gradient. Returns the engine's own flags."""
    from uld_kernels import launch
    kw = gathered_pairs(student)
    temperatures = (student_temperature, teacher_temperature, True, False, 1.0)
    flags = launch.hist_pairs(student, teacher, *temperatures, fallback=False, **kw)[1]
    ours = launch.hist_pairs(student, teacher, *temperatures, **kw)
    trie = launch.uld_pairs(student, teacher, *temperatures, **kw)
    assert_losses_close(ours[0], trie[0], dtype, what="loss")
    assert_losses_close(ours[2], trie[2], dtype, what="cross-entropy")
    assert_grads_close(ours[3], trie[3], student, dtype)
    return flags


def poison_workspaces(monkeypatch, launch) -> None:
    """Every floating-point tensor launch.py takes from `torch.empty` starts as NaN (its other
    uses of torch unchanged): a table entry a kernel reads before any kernel writes it then
    shows as a NaN loss or gradient, where leftover memory would mostly hold finite values."""
    real = torch.empty

    def empty(*args, **kwargs):
        tensor = real(*args, **kwargs)
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        return tensor

    class PoisonedTorch:
        def __getattr__(self, name):
            return empty if name == "empty" else getattr(torch, name)

    monkeypatch.setattr(launch, "torch", PoisonedTorch())


def keep_trie_workspaces(monkeypatch, launch) -> list:
    """Has `launch._trie_workspace` keep every workspace it makes (in order, in the returned
    list), for tests that read the trie's meta slots after a call."""
    workspaces = []
    make_workspace = launch._trie_workspace

    def kept_workspace(*args, **kwargs):
        workspaces.append(make_workspace(*args, **kwargs))
        return workspaces[-1]

    monkeypatch.setattr(launch, "_trie_workspace", kept_workspace)
    return workspaces


def level_one_sizes(workspace, pairs: int) -> torch.Tensor:
    """Buckets of trie level 1 per workspace slot (a fallback workspace of one slot per pair:
    `pairs` programs), from its meta slots (level starts at 1 and 2)."""
    meta = workspace[0][2].view(pairs, -1).cpu()
    return meta[:, 2] - meta[:, 1]


def spy_saved_tensors(monkeypatch) -> list:
    """Every ``ctx.save_for_backward(...)`` call's tensors (``None`` slots kept), in order:
    what an autograd Function keeps alive for its backward."""
    calls = []
    original = torch.autograd.function.FunctionCtx.save_for_backward

    def save(ctx, *tensors):
        calls.append(tensors)
        return original(ctx, *tensors)

    monkeypatch.setattr(torch.autograd.function.FunctionCtx, "save_for_backward", save)
    return calls
