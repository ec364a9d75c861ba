"""The histogram engine (`launch.hist_rows`, kernels/uld_hist.py) against the float64 reference.

Rows the engine cannot settle exactly are flagged and recomputed by the trie engine, so a
test that only looked at `hist_rows(..., fallback=True)` could pass through the fallback alone.
Which rows are flagged shows only with ``fallback=False`` (a nonzero status; with the fallback,
flagged rows carry the trie's status): where the engine is meant to handle a row itself, the
tests require it unflagged there, and where it must flag a row, flagged. Under the interpreter
a call costs about 0.2 s per row of a few hundred columns (hist_kernel's tail over the row's
7,938 bins dominates; it was 2.4 s before the prefix pass was folded into it), so most tests
hold one or two rows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import uld_kernels.launch as launch
from tests.helpers import (assert_grads_close, assert_losses_close, cross_near_ties, examples, poison_workspaces,
                           reference_rows_and_grads)


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
        # Negative logits spread log-uniformly over 127 binades, most of them in the tiny bin.
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
    student, teacher = _rows(kind, 1, 300, 300 if kind in ("near", "identical") else 250, torch.bfloat16,
                             device, seed=len(kind))
    if kind != "identical":  # there every value ties exactly, in float32 and float64 alike
        _assert_no_cross_near_ties(student, teacher, ts, tt)
    out = launch.hist_rows(student, teacher, ts, tt, True, True, 1.0, fallback=False)
    _assert_unflagged(out[1], kind)
    _assert_matches_reference(out, student, teacher, ts, tt, what="fallback=False: ")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_other_dtypes_are_refused_here_and_take_the_trie(dtype, device):
    """The engine reads bf16 bit patterns: fp16 logits, and float32 ones holding values bf16
    cannot (these; upcast bf16 values are its own, tests/test_hist_float32.py), are refused by
    name, and `uld_rows` (the path every loss takes) sends them to the trie engine, exact."""
    student, teacher = _rows("unit", 2, 200, 150, dtype, device, seed=17)
    with pytest.raises(ValueError, match="bf16"):
        launch.hist_rows(student, teacher, 1.0, 1.0, True, False, 1.0)
    rows, _status, grad_s, _ = launch.uld_rows(student, teacher, 1.0, 1.0, True, False, 1.0)
    ref_rows, ref_s, _ = reference_rows_and_grads(student, teacher)
    assert_losses_close(rows, ref_rows, dtype)
    assert_grads_close(grad_s, ref_s, student, dtype)


def test_rows_of_2_21_columns_or_more_are_refused_here(device):
    """hist_kernel's scan keeps a block's count in 21 bits: rows as long as 2**21 are not the
    engine's (`uld_rows` sends them to the trie), and `hist_rows` refuses them by name."""
    long = torch.zeros(1, 2**21, dtype=torch.bfloat16, device=device)
    short = torch.zeros(1, 2**21 - 1, dtype=torch.bfloat16, device=device)
    assert launch.hist_takes(short, short) and not launch.hist_takes(short, long)
    with pytest.raises(ValueError, match="shorter than 2097152"):
        launch.hist_rows(long, short, 1.0, 1.0, False, False, 1.0)


def test_nan_and_inf_rows_are_flagged_and_nan_like_the_trie(device):
    """A NaN logit (student, row 0), a +inf one (teacher, row 1) or a NaN with its sign bit set
    (student, row 2: what `inf - inf` gives on a CPU) poisons its own row as in the trie engine:
    same NaN pattern in losses and gradients."""
    student, teacher = _rows("random", 3, 200, 150, torch.bfloat16, device, seed=7)
    student[0, 5] = math.nan
    teacher[1, 3] = math.inf
    student.view(torch.int16)[2, 9] = -64  # 0xFFC0
    assert torch.isnan(student[2, 9]) and student[2, 9].view(torch.int16) < 0
    _rows_alone, status, _gs, _gt = launch.hist_rows(student, teacher, 1.5, 0.7, False, False, 1.0,
                                                     fallback=False)
    assert _flagged(status).all(), f"rows with NaN / +inf logits must be flagged, status {status.tolist()}"
    rows, _status, grad_s, grad_t = launch.hist_rows(student, teacher, 1.5, 0.7, True, True, 1.0)
    trie_rows, _st, _ce, trie_s, trie_t = launch.uld_pairs(student, teacher, 1.5, 0.7, True, True, 1.0)
    assert torch.isnan(trie_rows).all(), f"the trie engine's losses {trie_rows.tolist()}"
    for name, ours, trie in (("loss", rows, trie_rows), ("student gradient", grad_s, trie_s),
                             ("teacher gradient", grad_t, trie_t)):
        assert torch.equal(torch.isnan(ours), torch.isnan(trie)), (
            f"{name}: NaN in {torch.isnan(ours).flatten(1).sum(-1).tolist()} elements per row, the trie "
            f"engine in {torch.isnan(trie).flatten(1).sum(-1).tolist()}")


def _past_256_rows(case, seed):
    """One student / teacher pair of bf16 rows with finite logits of magnitude >= 256 (200 and
    240 columns), and the temperatures it is taken at."""
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(1, 200, generator=g), torch.randn(1, 240, generator=g)
    if case == "wide":  # magnitudes 2**-20 to 2**9 of either sign (shift 1), a near-uniform teacher
        s = s.sign() * 2.0 ** (torch.rand(1, 200, generator=g) * 29 - 20)
        t = 0.01 * t
        temperatures = (1.0, 1.0)
    elif case == "both_sides":  # shifts 2 and 5, at temperatures that keep a few hundred live
        s, t = s * 200, t * 3000
        temperatures = (60.0, 900.0)
    elif case == "low_bin_live":  # -1e4 masks at a temperature where p(-256) > 0 (shift 6)
        s, t = s * 3, t * 2.5
        s[:, ::4] = -1e4
        t[:, 1::5] = -1e4
        temperatures = (3.0, 3.0)
    elif case == "minus_inf":  # logits past 256 masked with -inf: the largest finite magnitude read
        s, t = s * 100, t * 50
        s[:, ::9] = -math.inf
        t[:, 1::11] = -math.inf
        temperatures = (2.0, 1.0)
    elif case == "low_bin_live_minus_inf":  # -1e4 and -inf masks at T = 3: the low bin holds -inf only
        s, t = s * 3, t * 2.5
        s[:, ::4] = -1e4
        s[:, 2::8] = -math.inf
        t[:, 1::5] = -1e4
        temperatures = (3.0, 3.0)
    elif case == "teacher_only":  # a teacher peaked at ~400 (shift 1), an ordinary student
        s, t = s * 3, t * 30
        t[:, :3] += 400.0
        temperatures = (1.5, 40.0)
    else:
        raise ValueError(case)
    return s.to(torch.bfloat16), t.to(torch.bfloat16), temperatures


PAST_256 = ["wide", "both_sides", "low_bin_live", "teacher_only", "minus_inf", "low_bin_live_minus_inf"]


@pytest.mark.parametrize("case", PAST_256)
def test_rows_past_256_are_counted_again_shifted_and_exact(case, device, monkeypatch):
    """A row whose finite logits reach magnitudes >= 256 (or, at a high temperature, whose
    logits <= -256 have a probability), masked with -inf or not, is counted a second time with
    its magnitude bits shifted by whole binades (hist_kernel, "Rows past 256"): the engine keeps
    it (unflagged, nothing reaches the trie) and its loss and both gradients match float64.
    The workspaces start as NaN: the gradient reads the signs of the second count's slots."""
    poison_workspaces(monkeypatch, launch)
    student, teacher, (ts, tt) = _past_256_rows(case, seed=PAST_256.index(case) + 40)
    student, teacher = student.to(device), teacher.to(device)
    finite = torch.cat([student.float().flatten(), teacher.float().flatten()])
    assert finite[finite.isfinite()].abs().max() >= 256, "test input: nothing past 256"
    _assert_no_cross_near_ties(student, teacher, ts, tt)
    out = launch.hist_rows(student, teacher, ts, tt, True, True, 1.0, fallback=False)
    _assert_unflagged(out[1], case)
    _assert_matches_reference(out, student, teacher, ts, tt, what=f"{case}: ")


def _split_tiny_rows(seed):
    """Twelve student rows of 300 flat logits (N(0, s^2), s from 0.02 to 0.5, the range of a
    freshly initialised model's) with logits below 2**-23 planted (and zeros, on every other
    column in half the rows): at these temperatures some rows' tiny bins split."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(12, 300, generator=g) * torch.tensor([0.02, 0.05, 0.1, 0.2, 0.3, 0.5] * 2)[:, None]
    s[:, ::9] = (torch.rand(12, 34, generator=g) * 2 - 1) * 2.0 ** -23
    s[:, 5] = 0.0
    s[6:, ::2] = 0.0
    teacher = torch.randn(12, 250, generator=g) * 3
    return s.to(torch.bfloat16), teacher.to(torch.bfloat16)


@pytest.mark.parametrize("ts", [0.5])  # (1.0 too until the twenty-fifth session: CI's time)
def test_split_tiny_bins_are_counted_again_scaled_up(ts, device, monkeypatch):
    """Rows whose largest logit is small split their tiny bin (logits near 0 of different k).
    Counted again with their values scaled up (a negative shift: hist_kernel, "Split tiny
    bins"), they are the engine's own: unflagged, and exact against float64. The premise, and
    the rows that cannot be scaled: the same rows with one dead logit of -200 (a magnitude past
    128 leaves no room) are flagged, as at the first count, where no gap is given
    (ULD_HIST_GAPS=0; tests/test_hist_gaps.py has the rows a gap keeps)."""
    student, teacher = _split_tiny_rows(seed=8)
    student, teacher = student.to(device), teacher.to(device)
    kept = student.clone()
    kept[:, -1] = -200.0
    monkeypatch.setattr(launch, "HIST_GAPS", False)
    split = _flagged(launch.hist_rows(kept, teacher, ts, 1.0, True, True, 1.0, fallback=False)[1])
    monkeypatch.setattr(launch, "HIST_GAPS", True)
    assert int(split.sum()) >= 3, f"test input: {int(split.sum())} of 12 rows split their tiny bin"
    _assert_no_cross_near_ties(student, teacher, ts, 1.0)
    out = launch.hist_rows(student, teacher, ts, 1.0, True, True, 1.0, fallback=False)
    _assert_unflagged(out[1], "rows of a split tiny bin")
    _assert_matches_reference(out, student, teacher, ts, 1.0, what=f"T={ts}: ")


def test_a_shifted_scale_past_float32_is_flagged(device):
    """A logit of 2e38 (shift 120 binades) at a student temperature of 0.005: scale * 2**120
    overflows float32, where the top's k would be 0 * inf (NaN); the row is flagged and exact
    through the fallback (found by a review of 8509d22, which left it unflagged with loss 1.0
    against 1.6033 and NaN gradients)."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(1, 100, generator=g) * 3
    student[0, 5] = 2e38
    teacher = torch.randn(1, 120, generator=g) * 3
    student, teacher = student.to(torch.bfloat16).to(device), teacher.to(torch.bfloat16).to(device)
    alone = launch.hist_rows(student, teacher, 0.005, 1.0, True, True, 1.0, fallback=False)
    assert _flagged(alone[1]).all(), f"flags {alone[1].tolist()}"
    _assert_matches_reference(launch.hist_rows(student, teacher, 0.005, 1.0, True, True, 1.0), student, teacher,
                              0.005, 1.0)


def test_rows_of_huge_range_are_the_engines_own(device):
    """bf16 rows of huge range, none flagged: "huge" (tiny negative logits over 127 binades),
    "wide" (logits past 256: counted again, shifted) and "wide" masked with -inf (the same,
    after one more read for the largest finite magnitude, "Rows past 256"); exact, and the same
    bit for bit with the fallback on."""
    huge = _rows("huge", 1, 300, 300, torch.bfloat16, device, seed=5)
    wide = _rows("wide", 1, 300, 300, torch.bfloat16, device, seed=6)
    masked = _rows("wide", 1, 300, 300, torch.bfloat16, device, seed=7)
    masked[0][0, ::7] = -math.inf
    student, teacher = torch.cat([huge[0], wide[0], masked[0]]), torch.cat([huge[1], wide[1], masked[1]])
    _assert_no_cross_near_ties(student, teacher, 1.0, 1.0)
    alone = launch.hist_rows(student, teacher, 1.0, 1.0, True, True, 1.0, fallback=False)
    _assert_unflagged(alone[1], "rows of huge range")
    _assert_matches_reference(alone, student, teacher, 1.0, 1.0)
    out = launch.hist_rows(student, teacher, 1.0, 1.0, True, True, 1.0)
    for name, ours, theirs in (("loss", out[0], alone[0]), ("student gradient", out[2], alone[2]),
                               ("teacher gradient", out[3], alone[3])):
        assert torch.equal(ours, theirs), f"the fallback changed the {name} of an unflagged row"


def test_the_fallback_walks_more_pairs_than_programs(device, monkeypatch):
    """The fallback kernel's persistent grid (`launch.SPLIT_INTERPRETED`: 5 programs under the
    interpreter) over 11 pairs, flagged ones at 1, 6, 9 and 10 (student rows of logits below 2**-23, their tiny bin split;
    pairs 6 and 1, 9 share a program; without gaps, which would keep them): every flagged pair gets the trie engine's
    loss, status and both gradients, and the unflagged ones keep the engine's own results bit for bit."""
    monkeypatch.setattr(launch, "HIST_GAPS", False)
    g = torch.Generator().manual_seed(31)
    student = (torch.randn(11, 150, generator=g) * 2).to(torch.bfloat16)
    teacher = (torch.randn(11, 120, generator=g) * 2).to(torch.bfloat16)
    for row in (1, 6, 9, 10):  # logits below 2**-23 only: a tiny bin split at this temperature
        student[row] = ((torch.rand(150, generator=g) * 2 - 1) * 2.0 ** -23).to(student)
        student[row, 0] = -200.0  # (dead, a magnitude past 128: not scaled up, "Split tiny bins")
        student[row, 1] = -(2.0 ** -23)  # (the bin next to the tiny one: no gap, "Gaps")
    teacher[9, 7] = -300.0  # and one past the bins on the teacher's side (dead here: no second count)
    student, teacher = student.to(device), teacher.to(device)
    alone = launch.hist_rows(student, teacher, 0.5, 0.8, True, True, 1.0, fallback=False)
    flagged = _flagged(alone[1])
    assert flagged.tolist() == [i in (1, 6, 9, 10) for i in range(11)], f"flags {alone[1].tolist()}"
    if device == "cpu":
        assert launch.split_config(False).batch_rows < 11, "the grid must be shorter than the pairs"
    ours = launch.hist_rows(student, teacher, 0.5, 0.8, True, True, 1.0)
    trie = launch.uld_pairs(student, teacher, 0.5, 0.8, True, True, 1.0)
    assert_losses_close(ours[0], trie[0], torch.bfloat16, what="loss against the trie")
    assert ours[1].tolist() == torch.where(flagged.to(device), trie[1], 0).tolist(), "statuses"
    assert_grads_close(ours[2], trie[3], student, torch.bfloat16, what="student gradient against the trie")
    assert_grads_close(ours[3], trie[4], teacher, torch.bfloat16, what="teacher gradient against the trie")
    kept = (~flagged).to(device)
    for name, mine, engine in (("loss", ours[0], alone[0]), ("student gradient", ours[2], alone[2]),
                               ("teacher gradient", ours[3], alone[3])):
        assert torch.equal(mine[kept], engine[kept]), f"the fallback changed the {name} of an unflagged row"


def test_masked_logits(device, monkeypatch):
    """-inf logits (probability 0): a row masked on the student side, one on both sides:
    exact, zero gradient where masked, and the engine's own rows. The workspaces start as NaN:
    grad_kernel reads the sign of every element's slot, those of p = 0 too."""
    poison_workspaces(monkeypatch, launch)
    student, teacher = _rows("random", 2, 200, 150, torch.bfloat16, device, seed=3)
    student[0, ::3] = -math.inf
    student[1, 100:] = -math.inf
    teacher[1, 1::2] = -math.inf
    _assert_no_cross_near_ties(student, teacher, 1.5, 0.7)
    out = launch.hist_rows(student, teacher, 1.5, 0.7, True, True, 1.0, fallback=False)
    _assert_unflagged(out[1], "masked rows")
    _assert_matches_reference(out, student, teacher, 1.5, 0.7)
    _rows_out, _status, grad_s, grad_t = out
    masked_s, masked_t = student == -math.inf, teacher == -math.inf
    assert (grad_s[masked_s] == 0).all() and (grad_t[masked_t] == 0).all(), "masked logits must get zero gradient"


def test_logits_of_zero_probability_in_bins_of_their_own(device, monkeypatch):
    """Logits from -200 to -100 (a third of each row) and -1e4 (a few) have probability 0 at
    these temperatures (below 2**-126) for the most part, in bins of their own below the row's
    first live one (hist_kernel's bisection), whose bins sign_kernel skips (writing their signs
    as 0: the workspaces start as NaN here, and grad_kernel reads every element's sign): the
    rows stay the engine's own and exact. (Those elements lie below every live value, so they
    change no count above one; skipping live bins, as a first live bin found far too high
    would, does.)"""
    poison_workspaces(monkeypatch, launch)
    student, teacher = _rows("random", 2, 450, 380, torch.bfloat16, device, seed=71)
    g = torch.Generator().manual_seed(72)
    student[:, ::3] = (-100.0 - 100.0 * torch.rand(2, 150, generator=g)).to(student)
    teacher[:, 1::3] = (-100.0 - 100.0 * torch.rand(2, 127, generator=g)).to(teacher)
    student[0, 10:14] = -1e4
    _assert_no_cross_near_ties(student, teacher, 1.5, 0.7)
    out = launch.hist_rows(student, teacher, 1.5, 0.7, True, True, 1.0, fallback=False)
    _assert_unflagged(out[1], "rows with dead bins")
    _assert_matches_reference(out, student, teacher, 1.5, 0.7)


def test_rows_read_with_a_column_stride(device):
    """Rows read through a column stride of 2 and 3 (views into wider tensors: hist_kernel's
    and grad_kernel's strided loads, the -inf recount too), the engine's own and exact."""
    student, teacher = _rows("random", 2, 400, 330, torch.bfloat16, device, seed=81)
    wide_s = torch.zeros(2, 800, dtype=torch.bfloat16, device=device)
    wide_t = torch.zeros(2, 990, dtype=torch.bfloat16, device=device)
    wide_s[:, ::2], wide_t[:, ::3] = student, teacher
    strided_s, strided_t = wide_s[:, ::2], wide_t[:, ::3]
    strided_s[0, ::7] = -math.inf
    assert strided_s.stride(-1) == 2 and strided_t.stride(-1) == 3
    _assert_no_cross_near_ties(strided_s, strided_t, 60.0, 0.7)
    out = launch.hist_rows(strided_s, strided_t, 60.0, 0.7, True, True, 1.0, fallback=False)
    _assert_unflagged(out[1], "strided rows")
    _assert_matches_reference(out, strided_s.contiguous(), strided_t.contiguous(), 60.0, 0.7)


def test_a_block_of_bins_all_occupied(device):
    """1,100 consecutive bf16 values (2**-7 to ~3: every bin of 8.6 binades occupied, so whole
    steps of hist_kernel's pass over bins are full, 512 occupied bins in a step): the packed
    scan's occupied count at its widest, against the trie engine."""
    g = torch.Generator().manual_seed(91)
    bits = (torch.arange(1100) + 0x3C00).to(torch.int16)
    student = bits.view(torch.bfloat16)[torch.randperm(1100, generator=g)].reshape(1, 1100).to(device)
    teacher = (torch.randn(1, 700, generator=g) * 2).to(torch.bfloat16).to(device)
    ours = launch.hist_rows(student, teacher, 1.3, 0.8, True, True, 1.0, fallback=False)
    _assert_unflagged(ours[1], "a row of 1,100 distinct values")
    trie = launch.uld_pairs(student, teacher, 1.3, 0.8, True, True, 1.0)
    assert_losses_close(ours[0], trie[0], torch.bfloat16, what="loss against the trie")
    assert_grads_close(ours[2], trie[3], student, torch.bfloat16, what="student gradient against the trie")
    assert_grads_close(ours[3], trie[4], teacher, torch.bfloat16, what="teacher gradient against the trie")


def _interpreter_exp2(k: float) -> float:
    """numpy's float32 exp2 of k as the interpreter's tl.exp2 computes it: on an array (numpy's
    SIMD path, which may differ from its scalar one)."""
    return float(np.exp2(np.full(32, k, dtype=np.float32))[0])


def _interpreter_exp2_zero_from() -> float:
    """The largest float32 k whose exp2 the interpreter gives as 0. It depends on numpy's SIMD
    path for the CPU: -149.5 or so on the machines this test was written on, -150 (rounded to
    the nearest subnormal) on an AVX2 machine without AVX-512 (numpy 2.3.5)."""
    bits = np.arange(np.float32(120).view(np.int32), np.float32(160).view(np.int32), dtype=np.int32)
    k = -bits.view(np.float32)  # every float32 from -120 down to -160, on numpy's array path
    return float(k[np.exp2(k) == 0].max())


def test_tiny_logits_live_where_zero_is_not(device, monkeypatch):
    """The tiny bin stands for |z| < 2**-23 and takes the k of 0. At a student temperature
    where p(0) underflows to 0 while p(1e-7) does not (top 0.125: k(0) = -0.125 * scale just
    past the threshold: below 2**-126 the GPU's exp2 flushes to 0, the interpreter's numpy from
    about 2**-149.5 or 2**-150 by the CPU), the tiny elements are live and the bin splits: the
    pair must be flagged (the review of b3d5d6a found it unflagged, and its tiny elements' sign entries
    never written), and through the fallback the trie's. (Without gaps: the gap between the
    tiny bin and -5 would resolve the tiny logits one by one, "Gaps".)"""
    monkeypatch.setattr(launch, "HIST_GAPS", False)
    threshold = 126.0 if device == "cuda" else -_interpreter_exp2_zero_from()

    def dead(k):
        return k < -126.0 if device == "cuda" else bool(_interpreter_exp2(k) == 0)

    tiny = torch.tensor(1e-7).to(torch.bfloat16).float().item()
    scale = 8.0 * (threshold + 7e-5)  # k(0) = -threshold - 7e-5, k(tiny) = k(0) + ~1.4e-4
    temperature = 1.4426950408889634 / scale
    k0 = -0.125 * float(np.float32(np.float32(1.0 / temperature) * np.float32(1.4426950408889634)))
    assert dead(k0) and not dead(k0 + tiny * scale - 1e-5), f"premise: k(0) = {k0}"
    student = torch.full((1, 40), -5.0)
    student[0, 0] = 0.125
    student[0, 1:21] = tiny
    student[0, 39] = -200.0  # (dead: it keeps the row from being scaled up, "Split tiny bins")
    student = student.to(torch.bfloat16).to(device)
    teacher = torch.randn(1, 30, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(device)
    flags = launch.hist_rows(student, teacher, temperature, 1.0, True, False, 1.0, fallback=False)[1]
    assert int(flags[0]) & 4, f"flags {flags.tolist()}: the tiny bin's logits are live and split"
    ours = launch.hist_rows(student, teacher, temperature, 1.0, True, False, 1.0)
    trie = launch.uld_pairs(student, teacher, temperature, 1.0, True, False, 1.0)
    assert_losses_close(ours[0], trie[0], torch.bfloat16, what="loss against the trie")
    assert_grads_close(ours[2], trie[3], student, torch.bfloat16, what="student gradient against the trie")


def test_the_cross_entropy_alone_needs_the_minus_inf_counted(device):
    """A student row whose logits all lie near -190 (top < -169), masked with -inf: at the
    cross-entropy's temperature 1 a logit of -256 has a probability, at the ULD's 0.5 it has
    not, so only the cross-entropy's check looks at the low slot, which holds the -inf: they
    are counted apart and the pair stays the engine's, with the trie's loss, cross-entropy and
    gradient."""
    g = torch.Generator().manual_seed(95)
    student = (-190.0 + 5.0 * torch.randn(1, 300, generator=g)).to(torch.bfloat16)
    student[0, ::4] = -math.inf
    teacher = torch.randn(1, 250, generator=g).to(torch.bfloat16)
    student, teacher = student.to(device), teacher.to(device)
    kw = dict(student_index=torch.tensor([0], device=device), teacher_index=torch.tensor([0], device=device),
              row_weight=torch.ones(1, device=device), ce_label=torch.tensor([5], device=device),
              ce_weight=torch.ones(1, device=device))
    ours = launch.hist_pairs(student, teacher, 0.5, 1.0, True, False, 1.0, fallback=False, **kw)
    assert ours[1].tolist() == [0], f"flags {ours[1].tolist()}: the -inf are not logits <= -256"
    trie = launch.uld_pairs(student, teacher, 0.5, 1.0, True, False, 1.0, **kw)
    assert_losses_close(ours[0], trie[0], torch.bfloat16, what="loss")
    assert_losses_close(ours[2], trie[2], torch.bfloat16, what="cross-entropy")
    assert_grads_close(ours[3], trie[3], student, torch.bfloat16)


def test_grad_scale(device):
    student, teacher = _rows("random", 1, 160, 200, torch.bfloat16, device, seed=12)
    _assert_no_cross_near_ties(student, teacher, 1.5, 0.7)
    out = launch.hist_rows(student, teacher, 1.5, 0.7, True, True, 0.25)
    _assert_matches_reference(out, student, teacher, 1.5, 0.7, grad_scale=0.25)


# (Vs, Vt): why each point is here
VOCABS = [
    (300, 97),  # student longer: the teacher's sorted row is padded with zeros
    (97, 300),  # teacher longer
    (1, 50),  # a one-token student (probability 1) against a longer teacher
    (50, 1),  # and the other way round
]


@pytest.mark.parametrize("vs,vt", VOCABS)
def test_vocabulary_sizes(vs, vt, device):
    student, teacher = _rows("random", 1, vs, vt, torch.bfloat16, device, seed=vs * 7 + vt)
    _assert_no_cross_near_ties(student, teacher, 1.5, 0.7)
    out = launch.hist_rows(student, teacher, 1.5, 0.7, True, True, 1.0, fallback=False)
    _assert_unflagged(out[1], f"vocabularies {vs} / {vt}")
    _assert_matches_reference(out, student, teacher, 1.5, 0.7)


def test_gathered_pairs_with_cross_entropy_match_the_trie(device):
    """`hist_pairs` with row maps, padding, row weights and the student's cross-entropy (the
    training loss's path, `ULD_DISTILL_ENGINE=hist`): the same losses, cross-entropies and
    gradient as the trie engine on the same pairs (both exact), the pairs the engine's own."""
    g = torch.Generator().manual_seed(21)
    student = (torch.randn(5, 260, generator=g) * 2).to(torch.bfloat16).to(device)
    teacher = (torch.randn(4, 190, generator=g) * 2).to(torch.bfloat16).to(device)
    student_index = torch.tensor([3, -1, 0, 4], device=device)
    teacher_index = torch.tensor([1, 2, 3, 0], device=device)
    weight = torch.tensor([0.5, 1.0, 2.0, 0.25], device=device)
    ce_label = torch.tensor([7, -1, 259, -1], device=device)
    ce_weight = torch.tensor([1.5, 1.0, 0.75, 1.0], device=device)
    kw = dict(student_index=student_index, teacher_index=teacher_index, row_weight=weight, ce_label=ce_label,
              ce_weight=ce_weight)
    ours = launch.hist_pairs(student, teacher, 1.5, 0.7, True, False, 1.0, fallback=False, **kw)
    assert (ours[1] == 0).all(), f"flags {ours[1].tolist()}: the engine must settle these pairs itself"
    trie = launch.uld_pairs(student, teacher, 1.5, 0.7, True, False, 1.0, **kw)
    assert_losses_close(ours[0], trie[0], torch.bfloat16, what="loss")
    assert_losses_close(ours[2], trie[2], torch.bfloat16, what="cross-entropy")
    assert ours[0][1] == 0 and ours[2][1] == 0, "a padding pair has loss and cross-entropy 0"
    assert (ours[3][[1, 2]] == 0).all(), "rows no pair reads get no gradient"
    assert_grads_close(ours[3], trie[3], student, torch.bfloat16)


@pytest.mark.parametrize("case", ["tiny", "tiny_scaled", "past_256", "past_256_masked"])
def test_flagged_gathered_pairs_with_cross_entropy_go_through_the_fallback(case, device, monkeypatch):
    """The training loss's path with an unusual student row 0 among ordinary and padding pairs:
    logits below 2**-23 only (its tiny bin split at this temperature) with a dead -200 (so that
    it cannot be scaled up: flagged, through the fallback) or without (counted again scaled
    up, its statistics at temperature 1 too: "Split tiny bins"), or a logit of 300, its cross-entropy's label (counted again, shifted, its
    statistics at temperature 1 too: "Rows past 256"), also masked with -inf (the same, after
    a read for its largest finite magnitude). The same losses, cross-entropies and gradient as
    the trie engine on all the pairs. Without gaps ("tiny" would take one)."""
    monkeypatch.setattr(launch, "HIST_GAPS", False)
    g = torch.Generator().manual_seed(22)
    student = (torch.randn(4, 230, generator=g) * 2).to(torch.bfloat16).to(device)
    teacher = (torch.randn(3, 170, generator=g) * 2).to(torch.bfloat16).to(device)
    if case.startswith("tiny"):
        student[0] = ((torch.rand(230, generator=g) * 2 - 1) * 2.0 ** -23).to(student)
        if case == "tiny":
            student[0, 100] = -200.0
            student[0, 101] = -(2.0 ** -23)  # (no gap, "Gaps")
    else:
        student[0, 11] = 300.0
    if case == "past_256_masked":
        student[0, 40:60] = -math.inf
    flagged = case == "tiny"
    student_index = torch.tensor([2, 0, -1, 3], device=device)
    teacher_index = torch.tensor([0, 1, 2, 2], device=device)
    kw = dict(student_index=student_index, teacher_index=teacher_index,
              row_weight=torch.tensor([0.5, 2.0, 1.0, 1.5], device=device),
              ce_label=torch.tensor([5, 11, -1, 229], device=device),
              ce_weight=torch.tensor([1.0, 0.5, 1.0, 2.0], device=device))
    flags = launch.hist_pairs(student, teacher, 0.5, 0.7, True, False, 1.0, fallback=False, **kw)[1]
    assert (flags.tolist()[1] != 0) == flagged and flags.tolist()[0] == flags.tolist()[3] == 0, (
        f"flags {flags.tolist()}")
    ours = launch.hist_pairs(student, teacher, 0.5, 0.7, True, False, 1.0, **kw)
    trie = launch.uld_pairs(student, teacher, 0.5, 0.7, True, False, 1.0, **kw)
    assert_losses_close(ours[0], trie[0], torch.bfloat16, what="loss")
    assert_losses_close(ours[2], trie[2], torch.bfloat16, what="cross-entropy")
    assert ours[1].tolist()[1] == (trie[1].tolist()[1] if flagged else 0), (
        "a flagged pair carries the trie's status, a kept one 0")
    assert ours[0][2] == 0 and ours[2][2] == 0, "a padding pair has loss and cross-entropy 0"
    assert_grads_close(ours[3], trie[3], student, torch.bfloat16)


def test_rows_near_zero_whose_float32_probabilities_merge(device):
    """Logits all within ~2**-8 of 0, on 700 columns: k = (z - top) * scale - log_sum rounds at
    the ulp of log_sum (~2**-20), coarser than the bf16 spacing of the smallest logits, so
    neighbouring bins share one k and sign_kernel must find its bounds by search, not from the
    neighbours alone (the teacher, the student with three logits raised, sits a near-tie away
    everywhere). These probabilities are ~1/700 each: a wrong bound moves the loss by far more
    than the tolerance. The float64 reference keeps them distinct, so the oracle is the trie
    engine, which works on the same float32 probabilities."""
    g = torch.Generator().manual_seed(31)
    student = torch.randn(2, 700, generator=g) * 2.0 ** -10
    teacher = student.clone()
    teacher[:, :3] += 0.01
    student, teacher = student.to(torch.bfloat16).to(device), teacher.to(torch.bfloat16).to(device)
    values = torch.unique(student[0].float().cpu())
    log_sum = torch.log2(torch.exp2((values - values.max()) * 1.4426950408889634).sum())
    merged = len(values) - len(torch.unique((values - values.max()) * 1.4426950408889634 - log_sum))
    assert merged > 0, "no two bins share a float32 k: the search is not reached"
    ours = launch.hist_rows(student, teacher, 1.0, 1.0, True, True, 1.0, fallback=False)
    _assert_unflagged(ours[1], "rows near 0")
    trie_rows, _status, _ce, trie_s, trie_t = launch.uld_pairs(student, teacher, 1.0, 1.0, True, True, 1.0)
    assert_losses_close(ours[0], trie_rows, torch.bfloat16, what="loss against the trie")
    assert_grads_close(ours[2], trie_s, student, torch.bfloat16, what="student gradient against the trie")
    assert_grads_close(ours[3], trie_t, teacher, torch.bfloat16, what="teacher gradient against the trie")


def test_the_cross_entropy_checks_the_tiny_bin_at_its_own_temperature(device, monkeypatch):
    """At a student temperature of 0.001 the logit 0 has no ULD probability (2**-180: 0 in
    float32, on the GPU and in the interpreter alike), but at the cross-entropy's temperature 1
    it has, and the tiny bin's two ends have different k there: the pair must be flagged for
    the cross-entropy's sake (the review of d99b858 found the check counting only the elements
    of nonzero ULD probability), and through the fallback its cross-entropy is the trie's.

    The row is built so that the two ends' k differ by ~3 ulps at temperature 1 (top 0.125,
    one zero: |k| ~ 1.09), with one rounding (the GPU's fused multiply-add) or two (the
    interpreter); a top of 1.5 and 20 zeros (|k| ~ 6.5) split only without the fused
    multiply-add, and this test failed on the GPU (2026-11-29). Without gaps: the gap between
    the tiny bin and 0.125 would resolve the zero alone ("Gaps"), and the pair be the engine's
    (exact too: the trie comparison below holds either way)."""
    monkeypatch.setattr(launch, "HIST_GAPS", False)
    g = torch.Generator().manual_seed(41)
    student = -(torch.rand(1, 120, generator=g) * 4 + 6)  # -10 .. -6
    student[0, 0] = 0.125
    student[0, 5] = 0.0
    student[0, 7] = -200.0  # (dead: it keeps the row from being scaled up, "Split tiny bins")
    student = student.to(torch.bfloat16)
    teacher = (torch.rand(1, 90, generator=g) * 1.5).to(torch.bfloat16)
    student, teacher = student.to(device), teacher.to(device)
    kw = dict(student_index=torch.tensor([0], device=device), teacher_index=torch.tensor([0], device=device),
              row_weight=torch.ones(1, device=device), ce_label=torch.tensor([3], device=device),
              ce_weight=torch.ones(1, device=device))
    flags = launch.hist_pairs(student, teacher, 0.001, 1.0, True, False, 1.0, fallback=False, **kw)[1]
    assert int(flags[0]) & 4, f"flags {flags.tolist()}: the tiny bin splits at temperature 1"
    ours = launch.hist_pairs(student, teacher, 0.001, 1.0, True, False, 1.0, **kw)
    trie = launch.uld_pairs(student, teacher, 0.001, 1.0, True, False, 1.0, **kw)
    assert_losses_close(ours[2], trie[2], torch.bfloat16, what="cross-entropy")


@settings(max_examples=examples(6), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), student_vocab=st.integers(1, 300), teacher_vocab=st.integers(1, 300),
       scale=st.sampled_from([2.0 ** -10, 0.5, 2.0, 8.0]), near=st.booleans(),
       temperatures=st.sampled_from([(1.0, 1.0), (0.5, 2.0), (2.0, 0.7)]))
def test_unflagged_rows_agree_with_the_trie(seed, student_vocab, teacher_vocab, scale, near, temperatures, device):
    """Drawn bf16 rows (both vocabularies, the logits' scale: from near 0, where float32
    merges probabilities, to wide; a teacher drawn apart or, on one vocabulary, the student
    plus noise; temperatures): every row the engine settles itself matches the trie engine,
    which works on the same float32 probabilities (the float64 reference would not: near-ties
    across the sides are allowed here)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, student_vocab, generator=g) * scale
    if near:
        teacher_vocab = student_vocab
        teacher = student + 0.02 * scale * torch.randn(2, teacher_vocab, generator=g)
    else:
        teacher = torch.randn(2, teacher_vocab, generator=g) * scale
    student, teacher = student.to(torch.bfloat16).to(device), teacher.to(torch.bfloat16).to(device)
    ts, tt = temperatures
    rows, status, grad_s, grad_t = launch.hist_rows(student, teacher, ts, tt, True, True, 1.0, fallback=False)
    trie_rows, _status, _ce, trie_s, trie_t = launch.uld_pairs(student, teacher, ts, tt, True, True, 1.0)
    kept = ~_flagged(status).to(student.device)
    assert_losses_close(rows[kept], trie_rows[kept], torch.bfloat16, what="loss against the trie")
    assert_grads_close(grad_s[kept], trie_s[kept], student[kept], torch.bfloat16, what="student gradient")
    assert_grads_close(grad_t[kept], trie_t[kept], teacher[kept], torch.bfloat16, what="teacher gradient")


@pytest.mark.parametrize("ts", [4.0, 60.0])
def test_minus_inf_masks_at_a_high_temperature(ts, device):
    """At a student temperature of 4 a logit of -256 has a probability (2**-93 or so, the
    rows' largest logits near 3; at 60, about a tenth of an average one), so the low bin's
    count matters, and its slot holds the -inf logits too. A row masked with -inf (600 columns:
    past one block of hist_kernel's loop) stays the engine's and exact: hist_kernel counts its
    -inf apart by one more read of the row, and leaves them out of every count. A row also
    holding a finite -300 is counted again, shifted, after one more read for its largest finite
    magnitude ("Rows past 256"): its low bin then holds the -inf only; exact too."""
    student, teacher = _rows("random", 2, 600, 450, torch.bfloat16, device, seed=61)
    student[:, ::5] = -math.inf
    student[1, 7] = -300.0
    tt = 0.7
    _assert_no_cross_near_ties(student, teacher, ts, tt)
    alone = launch.hist_rows(student, teacher, ts, tt, True, True, 1.0, fallback=False)
    _assert_unflagged(alone[1], "rows masked with -inf")
    _assert_matches_reference(alone, student, teacher, ts, tt, what="fallback=False: ")
    _assert_matches_reference(launch.hist_rows(student, teacher, ts, tt, True, True, 1.0), student, teacher, ts, tt)
