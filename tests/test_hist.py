"""The histogram engine (`launch.hist_rows`, kernels/uld_hist.py) against the float64 reference.

Rows the engine cannot settle exactly are flagged and recomputed by the trie engine, so a
test that only looked at `hist_rows(..., fallback=True)` could pass through the fallback alone.
Which rows are flagged shows only with ``fallback=False`` (a nonzero status; with the fallback,
flagged rows carry the trie's status): where the engine is meant to handle a row itself, the
tests require it unflagged there, and where it must flag a row, flagged. Under the interpreter
a call costs about 1.3 s per row whatever the vocabulary (the passes over the row's thousands
of bins dominate), so rows stay few.
"""

from __future__ import annotations

import math

import pytest
import torch

import uld_kernels.launch as launch
from tests.helpers import assert_grads_close, assert_losses_close, cross_near_ties, reference_rows_and_grads


def _rows(kind, n, vs, vt, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":  # tie-free in float32, a few thousand bins per row in bf16
        s, t = torch.randn(n, vs, generator=g) * 3, torch.randn(n, vt, generator=g) * 2.5
    elif kind == "unit":  # small logits only: |z| < 4
        s, t = torch.randn(n, vs, generator=g), torch.randn(n, vt, generator=g)
    elif kind == "peaked":  # a few dominant logits, like an LLM's
        s, t = torch.randn(n, vs, generator=g), torch.randn(n, vt, generator=g)
        s[:, : min(3, vs)] += 12.0
        t[:, -min(2, vt):] += 10.0
    elif kind == "near":  # teacher close to student: most logits share a bf16 value
        s = torch.randn(n, vs, generator=g) * 2
        t = s + 0.01 * torch.randn(n, vt, generator=g)
    elif kind == "identical":  # the same row on both sides
        s = torch.randn(n, vs, generator=g) * 2
        t = s.clone()
    elif kind == "integers":  # 7 values per row: runs of ~40 equal logits
        s = torch.randint(-3, 4, (n, vs), generator=g).float()
        t = torch.randint(-3, 4, (n, vt), generator=g).float()
    elif kind == "huge":
        # Negative logits spread log-uniformly over 127 binades: no band (the row's largest
        # logit is below 0), and the window from the largest logit down to the smallest one of
        # nonzero probability spans ~16,000 bf16 keys, past the 8,192 bins the engine holds.
        # The ~230 logits within 2**-21 of 0 have one float32 probability c ~ 1/250 but
        # distinct float64 ones; the teacher, ~1/300 everywhere, stays below c over all of
        # their positions, so every one of them takes sign +1 in float32 and float64 alike.
        s = -(2.0 ** (torch.rand(n, vs, generator=g) * 127 - 120))
        t = 0.01 * torch.randn(n, vt, generator=g)
    elif kind == "wide":  # magnitudes 2**-20 to 2**9 of either sign: the largest logits past 256
        s = torch.randn(n, vs, generator=g).sign() * 2.0 ** (torch.rand(n, vs, generator=g) * 29 - 20)
        t = 0.01 * torch.randn(n, vt, generator=g)
    else:
        raise ValueError(kind)
    return s.to(dtype).to(device), t.to(dtype).to(device)


def _assert_no_cross_near_ties(student, teacher, ts=1.0, tt=1.0):
    """The inputs hold no student / teacher pair tied at float32 resolution: there the float64
    reference may take either sign and the comparison would test the seed, not the engine."""
    assert not cross_near_ties(student, teacher, ts, tt).any(), "inputs: a student value near-ties the teacher"
    assert not cross_near_ties(teacher, student, tt, ts).any(), "inputs: a teacher value near-ties the student"


def _assert_matches_reference(out, student, teacher, ts, tt, grad_scale=1.0, what=""):
    """Losses and both gradients of `hist_rows` (called with both gradients) against float64."""
    rows, _status, grad_s, grad_t = out
    ref_rows, ref_s, ref_t = reference_rows_and_grads(student, teacher, ts, tt, teacher_grad=True)
    assert grad_s.dtype == student.dtype and grad_t.dtype == teacher.dtype, (
        f"{what}gradient dtypes {grad_s.dtype} / {grad_t.dtype}, logits {student.dtype} / {teacher.dtype}")
    assert_losses_close(rows, ref_rows, student.dtype, what=f"{what}loss")
    assert_grads_close(grad_s, ref_s * grad_scale, student, student.dtype, what=f"{what}student gradient")
    assert_grads_close(grad_t, ref_t * grad_scale, teacher, teacher.dtype, what=f"{what}teacher gradient")


def _flagged(status):
    """Rows `hist_rows(..., fallback=False)` left to the trie engine (their status holds the
    engine's flag bits)."""
    return status.cpu() != 0


def _assert_unflagged(status, what):
    assert not _flagged(status).any(), (
        f"{what}: the histogram engine flagged rows it should handle itself, status {status.tolist()}")


# kind -> (student temperature, teacher temperature). Equal temperatures where the point is
# closeness: "near" rows differ by a few ulps, "identical" rows tie exactly across the two
# sides (loss 0 and gradient 0 through the tie rule).
BF16_KINDS = {
    "random": (1.5, 0.7),
    "peaked": (1.5, 0.7),
    "near": (1.5, 1.5),
    "identical": (1.5, 1.5),
    "integers": (1.5, 0.7),
}


@pytest.mark.parametrize("kind", list(BF16_KINDS))
def test_bf16_rows_are_exact_and_handled_by_the_engine(kind, device):
    ts, tt = BF16_KINDS[kind]
    # One row per kind (the other tests batch several): a call costs ~1.3 s per row here.
    student, teacher = _rows(kind, 1, 300, 300 if kind in ("near", "identical") else 250, torch.bfloat16,
                             device, seed=len(kind))
    if kind != "identical":  # there every value ties exactly, in float32 and float64 alike
        _assert_no_cross_near_ties(student, teacher, ts, tt)
    alone = launch.hist_rows(student, teacher, ts, tt, True, True, 1.0, fallback=False)
    _assert_unflagged(alone[1], kind)
    _assert_matches_reference(alone, student, teacher, ts, tt, what="fallback=False: ")
    # With the fallback on, unflagged rows are the engine's own results, untouched.
    rows, status, grad_s, grad_t = launch.hist_rows(student, teacher, ts, tt, True, True, 1.0)
    assert torch.equal(status, alone[1]), f"status {status.tolist()} with fallback, {alone[1].tolist()} without"
    for name, ours, theirs in (("loss", rows, alone[0]), ("student gradient", grad_s, alone[2]),
                               ("teacher gradient", grad_t, alone[3])):
        assert torch.equal(ours, theirs), f"the fallback changed the {name} of unflagged rows"


def test_fp16_rows_are_exact(device):
    """fp16 rows, flagged or not, come back exact: a row with logits up to ~10 and one of
    small logits only, at temperature 1."""
    large = _rows("random", 1, 200, 150, torch.float16, device, seed=16)
    small = _rows("unit", 1, 200, 150, torch.float16, device, seed=17)
    student, teacher = torch.cat([large[0], small[0]]), torch.cat([large[1], small[1]])
    _assert_no_cross_near_ties(student, teacher)
    out = launch.hist_rows(student, teacher, 1.0, 1.0, True, True, 1.0)
    _assert_matches_reference(out, student, teacher, 1.0, 1.0)


def test_nan_and_inf_rows_are_flagged_and_nan_like_the_trie(device):
    """A NaN logit (student, row 0) or a +inf one (teacher, row 1) poisons its own row as in
    the trie engine: same NaN pattern in losses and gradients. Row 2 of the same batch stays
    the engine's, exact."""
    student, teacher = _rows("random", 3, 200, 150, torch.bfloat16, device, seed=7)
    student[0, 5] = math.nan
    teacher[1, 3] = math.inf
    _rows_alone, status, _gs, _gt = launch.hist_rows(student, teacher, 1.5, 0.7, False, False, 1.0,
                                                     fallback=False)
    assert _flagged(status).tolist() == [True, True, False], (
        f"rows with NaN / +inf logits must be flagged, the finite row not: status {status.tolist()}")
    rows, _status, grad_s, grad_t = launch.hist_rows(student, teacher, 1.5, 0.7, True, True, 1.0)
    trie_rows, _st, _ce, trie_s, trie_t = launch.uld_pairs(student, teacher, 1.5, 0.7, True, True, 1.0)
    assert torch.isnan(trie_rows[:2]).all(), f"the trie engine's losses {trie_rows.tolist()}"
    for name, ours, trie in (("loss", rows, trie_rows), ("student gradient", grad_s, trie_s),
                             ("teacher gradient", grad_t, trie_t)):
        assert torch.equal(torch.isnan(ours), torch.isnan(trie)), (
            f"{name}: NaN in {torch.isnan(ours).flatten(1).sum(-1).tolist()} elements per row, the trie "
            f"engine in {torch.isnan(trie).flatten(1).sum(-1).tolist()}")
    _assert_matches_reference((rows[2:], None, grad_s[2:], grad_t[2:]), student[2:], teacher[2:], 1.5, 0.7)


def test_rows_past_the_bins_are_flagged_or_exact(device):
    """bf16 rows of huge range, one of each kind that a version of the engine cannot hold: the
    first version (ULD_HIST=1) flags the "huge" row (its window spans ~16,000 keys, past CAP
    bins), the second the "wide" one (logits >= 256 lie past its fixed bins). Without the
    fallback each row is flagged or already exact, and at least one is flagged, so the fallback
    runs on finite bf16 rows here; with it, both are exact."""
    huge = _rows("huge", 1, 300, 300, torch.bfloat16, device, seed=5)
    wide = _rows("wide", 1, 300, 300, torch.bfloat16, device, seed=6)
    student, teacher = torch.cat([huge[0], wide[0]]), torch.cat([huge[1], wide[1]])
    _assert_no_cross_near_ties(student, teacher, 1.0, 1.0)
    alone = launch.hist_rows(student, teacher, 1.0, 1.0, True, True, 1.0, fallback=False)
    flagged = _flagged(alone[1])
    assert flagged.any(), "neither row of huge range was flagged: the fallback never ran on a bf16 row"
    kept = (~flagged).to(student.device)
    rows, _status, grad_s, grad_t = alone
    _assert_matches_reference((rows[kept], None, grad_s[kept], grad_t[kept]), student[kept], teacher[kept],
                              1.0, 1.0, what="an unflagged row, fallback=False: ")
    out = launch.hist_rows(student, teacher, 1.0, 1.0, True, True, 1.0)
    _assert_matches_reference(out, student, teacher, 1.0, 1.0)


def test_masked_logits(device):
    """-inf logits (probability 0) on either side, and a row masked on both: exact, zero
    gradient where masked, and the engine's own rows."""
    student, teacher = _rows("random", 3, 200, 150, torch.bfloat16, device, seed=3)
    student[0, ::3] = -math.inf
    teacher[1, :10] = -math.inf
    student[2, 100:] = -math.inf
    teacher[2, 1::2] = -math.inf
    _assert_no_cross_near_ties(student, teacher, 1.5, 0.7)
    out = launch.hist_rows(student, teacher, 1.5, 0.7, True, True, 1.0, fallback=False)
    _assert_unflagged(out[1], "masked rows")
    _assert_matches_reference(out, student, teacher, 1.5, 0.7)
    _rows_out, _status, grad_s, grad_t = out
    masked_s, masked_t = student == -math.inf, teacher == -math.inf
    assert (grad_s[masked_s] == 0).all() and (grad_t[masked_t] == 0).all(), "masked logits must get zero gradient"


# bf16: the engine's own gradient kernel; fp16: rows of logits up to ~10, which it flags (the trie's)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_grad_scale(dtype, device):
    student, teacher = _rows("random", 2, 160, 200, dtype, device, seed=12)
    _assert_no_cross_near_ties(student, teacher, 1.5, 0.7)
    out = launch.hist_rows(student, teacher, 1.5, 0.7, True, True, 0.25)
    _assert_matches_reference(out, student, teacher, 1.5, 0.7, grad_scale=0.25)


# (Vs, Vt): why each point is here
VOCABS = [
    (300, 97),  # student longer: the teacher's sorted row is padded with zeros
    (97, 300),  # teacher longer
    (1, 50),  # a one-token student (probability 1) against a longer teacher
    (50, 1),  # and the other way round
    (1, 1),  # both one token: loss 0
]


@pytest.mark.parametrize("vs,vt", VOCABS)
def test_vocabulary_sizes(vs, vt, device):
    rows = 2 if min(vs, vt) > 1 else 1  # the one-token rows need no batch
    student, teacher = _rows("random", rows, vs, vt, torch.bfloat16, device, seed=vs * 7 + vt)
    if (vs, vt) != (1, 1):  # there both probabilities are 1: an exact tie, gradient 0 anyway
        _assert_no_cross_near_ties(student, teacher, 1.5, 0.7)
    out = launch.hist_rows(student, teacher, 1.5, 0.7, True, True, 1.0, fallback=False)
    _assert_unflagged(out[1], f"vocabularies {vs} / {vt}")
    _assert_matches_reference(out, student, teacher, 1.5, 0.7)
