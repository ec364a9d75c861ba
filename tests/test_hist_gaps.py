"""Rows whose tiny bin splits and no scaling of the whole row separates, counted again with a
gap (kernels/uld_hist.py, "Gaps"; ULD_HIST_GAPS=1, launch.HIST_GAPS, set on here): the probability on a few logits within 2**-23 of 0, the rest
far below. With a dead -200 in each row no scaling up applies (its magnitude is past 128), so
only the gap can keep such a row in the engine. Oracles: the float64 reference, and the trie
engine (`launch.uld_pairs`, for the training loss's path). Under the
interpreter, rows of a few hundred columns.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import uld_kernels.launch as launch
from uld_kernels.kernels import uld_hist
from uld_kernels.kernels.ptx import SLOT_M_LO, smem_add_one, smem_count_bf16_gap, smem_load, smem_zero
from bench.shapes import NO_GAP, tiny_top_rows
from tests.helpers import assert_gathered_pairs_match_the_trie, assert_hist_exact, hist_flags, poison_workspaces

BF16 = torch.bfloat16
DEAD = -200.0  # p = 0 at the temperatures here; its magnitude rules out a scaling up


@pytest.fixture(autouse=True)
def _gaps_on(monkeypatch):
    """The gaps (launch.HIST_GAPS) are on by default; on here whatever ULD_HIST_GAPS says."""
    monkeypatch.setattr(launch, "HIST_GAPS", True)


def _rows(seed, n, vs, vt, tail=(-60.0, 4.0), extra=(DEAD,)):
    g = torch.Generator().manual_seed(seed)
    return tuple(tiny_top_rows(g, n, v, *tail, "cpu", extra=extra).to(BF16) for v in (vs, vt))


def test_split_tiny_bins_with_a_gap_are_the_engines(device, monkeypatch):
    """Tiny logits carrying the probability, a tail near -60 and a dead -200: flagged without
    gaps (ULD_HIST_GAPS=0, the default), the engine's own with them, exact. At the teacher's temperature
    its tiny bin does not split, but it holds the row's largest logit: it takes a gap too (its
    top then the logit itself, as on the student's side). The workspaces start as NaN: the
    gradient reads the sign of every element's slot, the dead -200's too."""
    student, teacher = (x.to(device) for x in _rows(41, 2, 200, 160))
    ts, tt = 0.5, 2.0
    monkeypatch.setattr(launch, "HIST_GAPS", False)
    assert (hist_flags(student, teacher, ts, tt).cpu() & 4).all(), "the premise: no scaling separates the tiny bin"
    monkeypatch.setattr(launch, "HIST_GAPS", True)
    flags = hist_flags(student, teacher, ts, tt)
    assert (flags == 0).all(), f"flags {flags.tolist()}: the gap keeps these rows in the engine"
    poison_workspaces(monkeypatch, launch)
    assert_hist_exact(student, teacher, ts, tt, "gap")


def test_a_gap_on_top_of_a_scaling_up(device):
    """Without the dead logit the tail (magnitudes below 128) leaves room to scale the row up by
    a binade; the gap comes on top of it. Exact, and the engine's."""
    student, teacher = (x.to(device) for x in _rows(42, 1, 200, 200, extra=()))
    flags = hist_flags(student, teacher)
    assert (flags == 0).all(), f"flags {flags.tolist()}"
    assert_hist_exact(student, teacher, 1.0, 1.0, "gap and scaling")


@pytest.mark.parametrize("below", [NO_GAP, -(2.0 ** -20)])
def test_a_gap_above_logits_between_it_and_the_tiny_bin(below, device, monkeypatch):
    """A logit in the bin next to the tiny one (NO_GAP), or three binades above it: the gap
    opens above it, in the widest run of empty bins (up to the tail near -60), and that logit
    moves up with the tiny ones, keeping its value. Flagged without gaps, the engine's with
    them, exact."""
    g = torch.Generator().manual_seed(43)
    student = tiny_top_rows(g, 1, 200, -60.0, 4.0, "cpu", extra=(DEAD, below), count=15).to(BF16).to(device)
    teacher = tiny_top_rows(g, 1, 160, -60.0, 4.0, "cpu", extra=(DEAD,)).to(BF16).to(device)
    monkeypatch.setattr(launch, "HIST_GAPS", False)
    assert (hist_flags(student, teacher).cpu() & 4).all(), "the premise: no scaling separates the tiny bin"
    monkeypatch.setattr(launch, "HIST_GAPS", True)
    flags = hist_flags(student, teacher)
    assert (flags == 0).all(), f"flags {flags.tolist()}: the gap keeps this row in the engine"
    assert_hist_exact(student, teacher, 1.0, 1.0, "gap above a logit")


def test_identical_rows_with_gaps_tie_exactly(device):
    """The same rows on both sides take the same gap: every value ties across the sides, the
    loss is 0 and so is every gradient (the tie rule), bit for bit."""
    student, _ = _rows(44, 2, 200, 200)
    student = student.to(device)
    teacher = student.clone()
    rows, status, grad_s, grad_t = launch.hist_rows(student, teacher, 1.0, 1.0, True, True, 1.0)
    assert (status == 0).all(), f"status {status.tolist()}"
    assert (rows == 0).all(), f"losses {rows.tolist()}"
    assert (grad_s == 0).all() and (grad_t == 0).all(), "gradients of identical rows are 0"


def test_a_gap_against_an_occupied_tiny_bin_without_one_is_flagged(device):
    """A side with a gap resolves its logits near 0 one by one; a side counting them in its tiny
    bin (unsplit: its largest logit is large) takes them at 0. Such a pair goes to the trie, as
    for a scaling up (finish_kernel, flag 16), and stays exact."""
    student, _ = _rows(45, 1, 200, 160)
    g = torch.Generator().manual_seed(46)
    teacher = torch.randn(1, 160, generator=g) * 2
    teacher[:, :5] = 2.0 ** -30  # tiny logits, one k in the tiny bin at this row's top
    teacher = teacher.to(BF16)
    student, teacher = student.to(device), teacher.to(device)
    flags = hist_flags(student, teacher)
    assert (flags.cpu() == 16).all(), f"flags {flags.tolist()}"
    assert_hist_exact(student, teacher, 1.0, 1.0, "mixed")


def test_zeros_and_subnormal_logits_stay_in_the_tiny_bin(device):
    """Exact zeros and bf16 subnormals (magnitudes below 128) among the tiny logits of a row
    with a gap: they stay in the tiny bin (the gap is capped for them) and the results are
    exact."""
    student, teacher = _rows(47, 1, 200, 160)
    student[:, 10:14] = torch.tensor([0.0, -0.0, 1e-40, -3e-39]).to(BF16)
    teacher[:, 7:9] = torch.tensor([0.0, 5e-39]).to(BF16)
    student, teacher = student.to(device), teacher.to(device)
    flags = hist_flags(student, teacher)
    assert (flags == 0).all(), f"flags {flags.tolist()}"
    assert_hist_exact(student, teacher, 1.0, 1.0, "subnormals")


def test_gathered_pairs_with_cross_entropy_and_gaps_match_the_trie(device):
    """The training loss's path (row maps, padding, weights, the student's cross-entropy,
    whose temperature-1 statistics check the gapped tiny bin too) on rows with gaps: the same
    losses, cross-entropies and gradient as the trie engine."""
    student, teacher = (x.to(device) for x in _rows(48, 4, 160, 120))
    flags = assert_gathered_pairs_match_the_trie(student, teacher, 0.7, 1.3)
    assert (flags == 0).all(), f"flags {flags.tolist()}"


@pytest.mark.parametrize("case", ["gapped", "top"])
def test_a_gap_stops_short_of_the_nearest_bin(case, device):
    """The gap is a whole number of binades below the distance to the nearest bin: where that
    distance is itself whole binades (a logit of mantissa 0x7F, -63.75 or -127.5), the tiny
    bin's largest magnitude, 2**-23 - 2**-31, must not land in the nearest logit's bin and take
    its value (a review of 58c69da found loss 1.72 against 0.83, unflagged). "gapped": a split
    row of 16 tiny logits (one of them that magnitude), a tail from -63.75 down and a dead -200;
    "top": zeros and that magnitude (the row's top, in the tiny bin) and -127.5."""
    edge = torch.tensor([0x33FF], dtype=torch.int16).view(BF16).float().item()  # 2**-23 - 2**-31
    g = torch.Generator().manual_seed(49)
    if case == "gapped":
        student = (torch.randn(1, 200, generator=g) * 4 - 80).clamp(max=-70)
        student[0, :16] = (torch.rand(1, 16, generator=g) * 2 - 1) * 2.0 ** -23
        student[0, 0], student[0, 16], student[0, 17] = edge, -63.75, DEAD
    else:
        student = torch.zeros(1, 200)
        student[0, 0], student[0, 1] = edge, -127.5
    teacher = (torch.randn(1, 160, generator=g) * 2).clamp(min=0.01)
    student, teacher = student.to(BF16).to(device), teacher.to(BF16).to(device)
    flags = hist_flags(student, teacher)
    assert (flags == 0).all(), f"flags {flags.tolist()}: the gap keeps this row in the engine"
    assert_hist_exact(student, teacher, 1.0, 1.0, case)


def test_redo_over_more_pairs_than_a_program_leaves_other_rows_alone(device, monkeypatch):
    """The REDO launch (uld_hist.hist_kernel, REDO_PAIRS = 4 pairs a program) over 6 pairs whose
    student rows 1, 4 and 5 take a gap (tiny logits, a logit at -2**-23 below the run, a dead
    -200; the teacher's pair 4 holds a dead -300), the second program's chunk cut short: those
    rows are the engine's and exact, and every other pair keeps, bit for bit, the losses and
    gradients of a call without gaps."""
    g = torch.Generator().manual_seed(31)
    student = (torch.randn(6, 100, generator=g) * 2).to(BF16)
    teacher = (torch.randn(6, 80, generator=g) * 2).to(BF16)
    gapped = torch.tensor([i in (1, 4, 5) for i in range(6)])
    for row in (1, 4, 5):
        student[row] = ((torch.rand(100, generator=g) * 2 - 1) * 2.0 ** -23).to(student)
        student[row, 0] = DEAD
        student[row, 1] = NO_GAP
    teacher[4, 7] = -300.0
    student, teacher = student.to(device), teacher.to(device)
    monkeypatch.setattr(launch, "HIST_GAPS", False)
    off = launch.hist_rows(student, teacher, 0.5, 0.8, True, True, 1.0, fallback=False)
    assert ((off[1].cpu() != 0) == gapped).all(), f"the premise: flags without gaps {off[1].tolist()}"
    monkeypatch.setattr(launch, "HIST_GAPS", True)
    on = launch.hist_rows(student, teacher, 0.5, 0.8, True, True, 1.0, fallback=False)
    assert (on[1] == 0).all(), f"flags {on[1].tolist()}: the gaps keep every row in the engine"
    kept = (~gapped).to(device)
    for name, a, b in (("loss", on[0], off[0]), ("student gradient", on[2], off[2]),
                       ("teacher gradient", on[3], off[3])):
        assert torch.equal(a[kept], b[kept]), f"REDO changed the {name} of a row without a gap"
    assert_hist_exact(student, teacher, 0.5, 0.8, "REDO")


@pytest.mark.parametrize("seed", [12, 26])
def test_identical_rows_scaled_up_with_the_cross_entropy_tie_exactly(seed, device):
    """Identical rows of tiny logits and a tail near -60 (no dead logit: the rows scale up by a
    binade) at temperature 1.25, with the student's cross-entropy (weight 0): the scaling alone
    settles the teacher's tiny bin, while the student's check at temperature 1 still fails. A
    count with gaps gives both the same gap (the REDO launch takes rows the first scaled up
    too): loss and gradients exactly 0. Before that fix, the student alone took a gap, the
    log-sums rounded apart (3.99999976 against 4) and the pair, unflagged, had loss ~5e-8 and
    gradients up to 0.034 (a review of 039e1bd)."""
    g = torch.Generator().manual_seed(seed)
    student = tiny_top_rows(g, 1, 200, -60.0, 4.0, "cpu", extra=()).to(BF16).to(device)
    teacher = student.clone()
    index = torch.zeros(1, dtype=torch.long, device=device)
    kw = dict(student_index=index, teacher_index=index.clone(), row_weight=torch.ones(1, device=device),
              ce_label=index.clone(), ce_weight=torch.zeros(1, device=device))
    loss, status, _ce, grad_s, grad_t = launch.hist_pairs(student, teacher, 1.25, 1.25, True, True, 1.0,
                                                          fallback=False, **kw)
    assert status.tolist() == [0], f"flags {status.tolist()}: the engine's own"
    assert loss.tolist() == [0.0], f"loss {loss.tolist()}"
    assert (grad_s == 0).all() and (grad_t == 0).all(), (
        f"gradients of identical rows: max {grad_s.abs().max().item():.3g} / {grad_t.abs().max().item():.3g}")


@pytest.mark.gpu
@pytest.mark.parametrize("shift, gap_at, gap", [(0, 1000, 768), (-256, 600, 384), (-128, 2000, 1920)])
def test_the_simd_count_with_a_gap_counts_as_one_logit_at_a_time(shift, gap_at, gap):
    """REDO's count of a row with a gap, two logits an instruction (ptx.smem_count_bf16_gap:
    min(m + gap, max(m, gap_at + shift)) before the clamp), against the count one logit at a
    time (`_slots_of_bits`), over every bf16 pattern outside the empty run the gap is found in
    (shifted magnitudes in [gap_at - gap, gap_at), which no row counted with its gap holds):
    the same 8,192 counts, and not those of the same count without the gap."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("u16x2 instructions: sm_90 and later (the engine counts one logit at a time below)")
    gap_at += SLOT_M_LO.value
    patterns = torch.arange(-32768, 32768, dtype=torch.int32)
    shifted = (patterns & 0x7FFF) - shift
    kept = patterns[(shifted < gap_at - gap) | (shifted >= gap_at)]
    kept = torch.cat([kept, torch.zeros((-kept.numel()) % 1024, dtype=torch.int32)])  # (a whole number of blocks)
    bits = kept.to(torch.int16).cuda()
    counts = []
    for simd, g in ((True, gap), (False, gap), (True, 0)):
        out = torch.empty(8192, dtype=torch.int32, device="cuda")
        _count_kernel[(1,)](bits, out, bits.numel(), shift, gap_at if g else 0, g, SIMD=simd, BLOCK=1024,
                            num_warps=4)
        counts.append(out.cpu())
    assert counts[1].sum() == bits.numel(), "the count one logit at a time counts every pattern once"
    bad = (counts[0] != counts[1]).nonzero().flatten()
    assert bad.numel() == 0, (f"slots {bad[:8].tolist()}: {counts[0][bad[:8]].tolist()} counted two at a time, "
                              f"{counts[1][bad[:8]].tolist()} one at a time")
    assert not torch.equal(counts[0], counts[2]), "the gap moved no logit: the test would not see it"


@triton.jit
def _count_kernel(bits_ptr, out_ptr, n, shift, gap_at, gap, SIMD: tl.constexpr, BLOCK: tl.constexpr):
    """One histogram in shared memory of n int16 patterns (n a multiple of BLOCK), counted as
    hist_kernel's REDO counts a row with a gap: SIMD (two logits an instruction) or one at a
    time; written to out_ptr (8,192 words)."""
    smem_zero()
    tl.debug_barrier()
    for start in tl.range(0, n, BLOCK):
        bits = tl.load(bits_ptr + start + tl.arange(0, BLOCK))
        if SIMD:
            smem_count_bf16_gap(bits, tl.zeros([BLOCK], tl.int16), shift, gap_at, gap)
        else:
            slots, _magnitude = uld_hist._slots_of_bits(bits.to(tl.int32), shift, gap_at, gap)
            smem_add_one(slots, True)
    tl.debug_barrier()
    for word in tl.range(0, 8192, BLOCK):
        words = word + tl.arange(0, BLOCK)
        tl.store(out_ptr + words, smem_load(words))
