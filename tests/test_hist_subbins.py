"""Rows whose tiny bin splits where neither a scaling up nor a gap separates it (a logit in every
binade from 2**-23 to the tail: bench kind `dense`), their tiny logits counted by the key of
their k in sub-bins (kernels/uld_hist.py, "Tiny sub-bins"; part of the gaps' REDO launch,
ULD_HIST_GAPS=1, on here). Without them every such row went to the trie (43.6 ms for 16,384
`dense` rows at temperature 0.5, seventeenth session). Oracles: the float64 reference, the
trie engine, and exact zeros where the two rows tie. Rows of a few hundred columns.

The two rows of a pair never share a logit value here (the teacher's ladder is 1.5 times the
student's): equal logits in both rows put their probabilities within float32 rounding of each
other, where the float64 reference and any float32 engine may order them apart.
"""

from __future__ import annotations

import pytest
import torch

import uld_kernels.launch as launch
from bench.shapes import LADDER, tiny_top_rows
from tests.helpers import (assert_gathered_pairs_match_the_trie, assert_hist_exact, hist_flags, poison_workspaces,
                           reference_rows_and_grads)
from uld_kernels.kernels import uld_hist
from uld_kernels.kernels.const import const

BF16 = torch.bfloat16
DEAD = -200.0  # p = 0 here; a run of empty bins above the tail, where the gap goes (it then still splits)
TEACHER_LADDER = tuple(1.5 * x for x in LADDER[:-1])


@pytest.fixture(autouse=True)
def _gaps_on(monkeypatch):
    """The sub-bins are the gaps' REDO launch's: on (launch.HIST_GAPS)."""
    monkeypatch.setattr(launch, "HIST_GAPS", True)


def _dense(seed, n, vs, vt, extra=(DEAD,), teacher_ladder=TEACHER_LADDER):
    g = torch.Generator().manual_seed(seed)
    student = tiny_top_rows(g, n, vs, -60.0, 4.0, "cpu", extra=(*extra, *LADDER), count=15).to(BF16)
    teacher = tiny_top_rows(g, n, vt, -60.0, 4.0, "cpu", extra=(*extra, *teacher_ladder), count=15).to(BF16)
    return student, teacher


@pytest.mark.parametrize("extra", [(DEAD,), ()], ids=["after-a-gap", "scaled-up"])
def test_dense_rows_take_sub_bins(extra, device, monkeypatch):
    """`dense` rows at temperature 0.5 on both sides: flagged without the REDO launch (split
    tiny bins), the engine's with it, exact. With a dead -200 the rows take a gap above the
    tail first and still split; without it they are scaled up a binade, no gap (the premise
    checked once: it is the same split)."""
    student, teacher = (x.to(device) for x in _dense(60, 2, 200, 160, extra))
    if extra:
        monkeypatch.setattr(launch, "HIST_GAPS", False)
        assert (hist_flags(student, teacher, 0.5, 0.5).cpu() & 4).all(), "the premise: split tiny bins"
        monkeypatch.setattr(launch, "HIST_GAPS", True)
    flags = hist_flags(student, teacher, 0.5, 0.5)
    assert (flags == 0).all(), f"flags {flags.tolist()}: the sub-bins keep these rows in the engine"
    assert_hist_exact(student, teacher, 0.5, 0.5, "sub-bins")


def test_sub_bins_against_a_gap(device, monkeypatch):
    """A `dense` student against a teacher of tiny logits and a tail (a gap, no sub-bins), at
    temperatures 0.5 and 0.7: the engine's, exact. The workspaces start as NaN: the teacher's
    gradient reads every element's sign without a mask, from a table written in the sub-bins'
    pass over bins."""
    g = torch.Generator().manual_seed(61)
    student = tiny_top_rows(g, 1, 200, -60.0, 4.0, "cpu", extra=(DEAD, *LADDER), count=15).to(BF16).to(device)
    teacher = tiny_top_rows(g, 1, 160, -60.0, 4.0, "cpu", extra=(DEAD,)).to(BF16).to(device)
    flags = hist_flags(student, teacher, 0.5, 0.7)
    assert (flags == 0).all(), f"flags {flags.tolist()}"
    poison_workspaces(monkeypatch, launch)
    assert_hist_exact(student, teacher, 0.5, 0.7, "sub-bins against a gap")


def test_identical_rows_with_sub_bins_tie_exactly(device):
    """The same `dense` row on both sides, its columns shuffled: the same sub-bins, every
    value tied across the sides, loss and gradients exactly 0."""
    student, _ = _dense(62, 2, 200, 160)
    teacher = student[:, torch.randperm(200, generator=torch.Generator().manual_seed(7))]
    student, teacher = student.to(device), teacher.clone().to(device)
    _assert_the_engines_exact_ties(student, teacher, 0.5, 0.5)


def _assert_the_engines_exact_ties(student, teacher, student_temperature, teacher_temperature):
    """Rows tied across the sides element for element: the engine's own (no flag), loss and
    both gradients exactly 0."""
    rows, status, grad_s, grad_t = launch.hist_rows(student, teacher, student_temperature, teacher_temperature,
                                                    True, True, 1.0, fallback=False)
    assert (status == 0).all(), f"flags {status.tolist()}: the engine's own"
    assert (rows == 0).all(), f"losses {rows.tolist()}"
    assert (grad_s == 0).all() and (grad_t == 0).all(), (
        f"gradients up to {grad_s.abs().max().item()} / {grad_t.abs().max().item()} where the rows tie")


def test_a_rescaled_teacher_with_sub_bins_ties_exactly(device, monkeypatch):
    """A `dense` teacher that is the student doubled, at twice its temperature: every value
    tied across the sides in float64, so loss and gradients exactly 0. The student is scaled
    up a binade and the teacher, whose largest magnitude is twice as large, not at all: their
    tiny bins then hold the same logits (|z| < 2**-24), and both split and take sub-bins,
    keyed by the same k. Leaving the student unscaled for its sub-bins (a read fewer: tried in
    the nineteenth session) puts logits of 2**-24 <= |z| < 2**-23 in its tiny bin and not in
    the teacher's: the two round their log-sums apart, and this pair, unflagged, gave loss
    1.5e-7 and gradients up to 0.035."""
    student, _ = _dense(70, 2, 200, 160, ())
    teacher = (student.double() * 2).to(BF16)
    student, teacher = student.to(device), teacher.to(device)
    ref_rows, ref_s, ref_t = reference_rows_and_grads(student, teacher, 0.5, 1.0, teacher_grad=True)
    assert (ref_rows == 0).all() and (ref_s == 0).all() and (ref_t == 0).all(), "premise: exact ties in float64"
    monkeypatch.setattr(launch, "HIST_GAPS", False)
    assert (hist_flags(student, teacher, 0.5, 1.0).cpu() & 4).all(), "the premise: split tiny bins"
    monkeypatch.setattr(launch, "HIST_GAPS", True)
    _assert_the_engines_exact_ties(student, teacher, 0.5, 1.0)


def test_sub_bins_against_an_occupied_tiny_bin_without_them_are_flagged(device):
    """A side with sub-bins resolves its logits near 0 by their k; a side whose tiny bin holds
    logits of one k at its top of 0 counts them there: such a pair goes to the trie (flag 16,
    as for a gap or a scaling up), exact."""
    student, _ = _dense(63, 1, 200, 160)
    g = torch.Generator().manual_seed(64)
    teacher = torch.randn(1, 160, generator=g) * 2
    teacher[:, :5] = 2.0 ** -30
    student, teacher = student.to(device), teacher.to(BF16).to(device)
    flags = hist_flags(student, teacher, 0.5, 0.5)
    assert (flags.cpu() == 16).all(), f"flags {flags.tolist()}"
    assert_hist_exact(student, teacher, 0.5, 0.5, "mixed")


@pytest.mark.parametrize("temperature, kept", [(0.01, True), (0.002, False)])
def test_sub_bins_down_to_a_temperature_near_0_01(temperature, kept, device, monkeypatch):
    """At temperature 0.01 these rows' tiny bin (after their gap) holds more values of k than
    the 32 sub-bins of the eighteenth session took (the premise, checked under the interpreter,
    which reads the kernels' constants when it runs them: flagged with 32; such rows were the
    trie's, 45 ms for 16,384 `dense` rows of Qwen/Qwen), and fewer than the 120 there are now:
    the engine's, exact. At 0.002 they hold more than 120: the rows stay the trie's, exact."""
    student, teacher = (x.to(device) for x in _dense(65, 1, 200, 160))
    if kept and launch.interpreter_enabled():
        with monkeypatch.context() as m:
            m.setattr(uld_hist, "_SUB_BINS", const(32))
            assert (hist_flags(student, teacher, temperature, temperature).cpu() & 4).all(), (
                "premise: more than 32 sub-bins")
    flags = hist_flags(student, teacher, temperature, temperature)
    if kept:
        assert (flags == 0).all(), f"flags {flags.tolist()}: the sub-bins keep these rows in the engine"
    else:
        assert (flags.cpu() & 4).all(), f"flags {flags.tolist()}: too many sub-bins"
    assert_hist_exact(student, teacher, temperature, temperature, f"sub-bins at {temperature}")


def test_gathered_pairs_with_cross_entropy_and_sub_bins_match_the_trie(device):
    """The training loss's path (row maps, padding, weights, the student's cross-entropy) on
    `dense` rows at temperature 0.5: the trie engine's losses, cross-entropies and gradient.
    A student row whose tiny bin splits at temperature 1 too (the cross-entropy's check) stays
    flagged (8: no sub-bins for it); the others are the engine's."""
    student, teacher = (x.to(device) for x in _dense(66, 4, 160, 120))
    flags = assert_gathered_pairs_match_the_trie(student, teacher, 0.5, 0.5)[[0, 1, 3]]
    assert ((flags == 0) | (flags == 8)).all() and (flags == 0).any(), f"flags of the real pairs {flags.tolist()}"


def test_sub_bins_counted_where_the_other_row_changes_rank(device):
    """The counts at or above each value that the sub-bins correct, made to matter: a `dense`
    student's ~20 largest probabilities (its tiny logits and the ladder's smallest) lie within a
    few float32 values of each other, in its sub-bins and the bins next to them (ties at the
    bins' k); a teacher of B logits at 1 (p ~ 1/B, well above them) and the rest at -10 (well
    below) changes sign in the middle of that run, at student rank B. Without the sub-bins'
    counts the signs of those ties are wrong (a mutation of `_sub_counts` fails here, passing
    every other test); far from every teacher value, the float64 reference orders them as the
    kernels do."""
    g = torch.Generator().manual_seed(67)
    n = 4
    student = tiny_top_rows(g, n, 200, -60.0, 4.0, "cpu", extra=(DEAD, *LADDER), count=15).to(BF16)
    teacher = torch.full((n, 160), -10.0)
    for row, b in enumerate((12, 16, 20, 24)):
        teacher[row, :b] = 1.0
    student, teacher = student.to(device), teacher.to(BF16).to(device)
    flags = hist_flags(student, teacher, 0.5, 0.5)
    assert (flags == 0).all(), f"flags {flags.tolist()}"
    assert_hist_exact(student, teacher, 0.5, 0.5, "ranks across the sub-bins")
