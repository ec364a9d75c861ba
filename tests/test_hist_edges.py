"""Edge cases of the histogram engine (kernels/uld_hist.py) after the tenth session's changes
(0a89f66..6b87013): the row's top found first by `_top_bin` and the pass over bins in runs of
4 with its counts stored unmasked past WIDTH; the tiny bin's stand-in (c96c10d moved it from 0
to its upper end 2**-23 - 2**-31, which broke exact ties across the sides: back at 0);
`_estimate` rounding in integer arithmetic; both sides in one
launch of hist_kernel and sign_kernel (per-side strides, temperatures and HAS_CE, the
teacher's sign as minus the student rule with the sides swapped); sign_kernel's software
pipelining; finish_kernel writing the flags.

Oracles: the float64 reference (`reference/`) with the tolerances of reference/tolerances.py
(through tests/helpers.py), and, where float32 merges probabilities that float64 keeps apart,
the trie engine (`launch.uld_pairs`), which works on float32 probabilities too. Under the
interpreter hist_kernel runs 256 logits a step and sign_kernel 512 occupied bins a step.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

import uld_kernels.launch as launch
from bench.shapes import NO_GAP, tiny_top_rows
from tests.helpers import (assert_grads_close, assert_losses_close, cross_near_ties, keep_trie_workspaces,
                           level_one_sizes, reference_rows_and_grads)
from uld_kernels import uld_distillation_loss, uld_loss
from uld_kernels.kernels import uld_hist, uld_split

BF16 = torch.bfloat16
CAP, WIDTH, TINY, SLOTS = uld_hist.CAP.value, uld_hist.WIDTH.value, uld_hist._TINY.value, uld_hist.PARAM_SLOTS.value


def _no_cross_near_ties(student, teacher, ts, tt):
    """Inputs with no student / teacher value tied at float32 resolution (there the float64
    reference may take either sign, and a comparison would test the inputs, not the engine)."""
    assert not cross_near_ties(student, teacher, ts, tt).any(), "inputs: a student value near-ties the teacher"
    assert not cross_near_ties(teacher, student, tt, ts).any(), "inputs: a teacher value near-ties the student"


def _assert_matches_reference(rows, grad_s, grad_t, student, teacher, ts, tt, what=""):
    """Losses and the gradients given (None: not asked for) against float64 autograd."""
    ref_rows, ref_s, ref_t = reference_rows_and_grads(student, teacher, ts, tt, teacher_grad=True)
    assert_losses_close(rows, ref_rows, BF16, what=f"{what}loss")
    if grad_s is not None:
        assert_grads_close(grad_s, ref_s, student, BF16, what=f"{what}student gradient")
    if grad_t is not None:
        assert_grads_close(grad_t, ref_t, teacher, BF16, what=f"{what}teacher gradient")


def _bins_of(logits):
    """Each bf16 logit's histogram bin (uld_hist.py, "Bins"): -inf and logits <= -256 in bin 0,
    |z| < 2**-23 in the tiny bin 3969; no logit >= 256 here."""
    bits = logits.contiguous().view(torch.int16).to(torch.int32)
    d = (bits & 0x7FFF).clamp(13311, 17280) - 13311
    bins = torch.where(bits < 0, TINY - d, TINY + d)
    assert (bins < WIDTH).all(), "test input: a logit >= 256"
    return bins.to(torch.int64)


# --- _estimate: the other side's bin from a k value ------------------------------------------


@triton.jit
def _estimate_kernel(v_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    # top 0, log-sum 0, 1 / scale 1: the estimate of the logit v itself
    tl.store(out_ptr + i, uld_hist._estimate(tl.load(v_ptr + i), 0.0, 0.0, 1.0))


def test_estimate_rounds_to_the_nearest_bf16_bin_on_both_signs(device):
    """`_estimate` rounds a float32 logit to bf16 in integer arithmetic (c96c10d): the bin it
    gives is that of torch's round-to-nearest-even, for positive and negative logits, exactly
    on the midpoints between two bf16 values (ties to even), an ulp either side of them, at
    the carries into the next binade, and clamped at the ends (<= -256: bin 0; >= 256: the
    last bin)."""
    patterns = torch.arange(0, 0x7F80, 5, dtype=torch.int32)  # bf16 magnitudes, as float32 bits
    bits = patterns << 16
    probes = torch.cat([bits, bits + 0x8000, bits + 0x7FFF, bits + 0x8001, bits + 0x18000, bits + 1, bits - 1])
    values = probes.view(torch.float32)
    values = values[torch.isfinite(values)]
    extra = torch.tensor([0.0, 1e-30, 1e-45, 2.0 ** -23, 2.0 ** -23 - 2.0 ** -31, 255.5, 255.9, 256.0, 300.0,
                          6e4, 7e4, 3.4e38])
    values = torch.cat([values, extra, -values, -extra])
    n = 1 << (values.numel() - 1).bit_length()
    v = torch.zeros(n)
    v[:values.numel()] = values
    out = torch.empty(n, dtype=torch.int32, device=device)
    _estimate_kernel[(1,)](v.to(device), out, N=n)
    out = out.cpu()
    rounded = v.to(BF16)
    expected = torch.where(rounded.float().abs() >= 256, torch.where(rounded > 0, WIDTH - 1, 0),
                           _bins_of(torch.where(rounded.float().abs() >= 256, 0.0, rounded.float()).to(BF16)))
    bad = (out.to(torch.int64) != expected).nonzero().flatten()
    assert bad.numel() == 0, (
        f"{bad.numel()} estimates off the bf16 bin, first: "
        + ", ".join(f"v={v[i].item()!r} (0x{v[i:i + 1].view(torch.int32).item() & 0xFFFFFFFF:08x}) "
                    f"got {out[i].item()} expected {expected[i].item()}" for i in bad[:5]))


# --- hist_kernel's pass over bins, launched alone ----------------------------------------------


def test_hist_kernel_counts_list_and_top_stay_in_each_rows_region(device):
    """hist_kernel alone (as `launch._hist_batches` launches it: both sides in one grid,
    gathered, the teacher read through a column stride of 2): for every (pair, side) the
    counts below each bin over all of [0, CAP) (past WIDTH: every counted element, -inf
    included; stored unmasked), the list of occupied bins and its length, and the top
    (`_top_bin`: the largest logit, for rows whose largest logit is not tiny) against a
    histogram computed here; a padding pair (index -1) leaves its region untouched and is
    flagged; nothing is written past the batch's regions (sentinel guards)."""
    g = torch.Generator().manual_seed(5)
    vs, vt = 700, 1200
    student = torch.empty(3, vs)
    student[0] = torch.randn(vs, generator=g) * 3
    student[1] = -(torch.rand(vs, generator=g) * 200 + 0.01)  # negative only: the top is negative
    student[1, ::3] = -math.inf  # (the largest magnitude is -inf's: the scan starts at the top bin)
    student[1, 5] = -1e4
    student[2] = 0.0  # zeros of both signs: the top in the tiny bin
    student[2, ::2] = -0.0
    teacher = torch.empty(3, vt)
    # 1,100 distinct values (0.0078 .. 3.1: a step of 512 bins full, lists past 1,024), then 2s
    teacher[0] = torch.cat([(torch.arange(1100) + 0x3C00).to(torch.int16).view(BF16).float(),
                            torch.full((100,), 2.0)])
    teacher[1] = (torch.rand(vt, generator=g) * 2 - 1) * 2.0 ** -23  # tiny only, both signs
    teacher[2] = torch.randn(vt, generator=g) * 60
    teacher[2, :6] = torch.tensor([255.0, -255.0, -256.0, -1e4, 2.0 ** -23, -(2.0 ** -23)])
    student = student.to(BF16).to(device)
    wide = torch.zeros(3, 2 * vt, dtype=BF16)
    wide[:, ::2] = teacher.to(BF16)
    teacher = wide.to(device)[:, ::2]
    assert teacher.stride(-1) == 2
    student_index = torch.tensor([0, 1, 2, -1])
    teacher_index = torch.tensor([2, 0, 1, -1])
    pairs, guard, sentinel = 4, 4096, -777
    on = dict(device=device)
    counts = torch.full((pairs * 2 * CAP + guard,), sentinel, dtype=torch.int32, **on)
    listed = torch.full((pairs * 2 * CAP + guard,), sentinel, dtype=torch.int16, **on)
    raw = torch.zeros(pairs * 2 * CAP + guard, dtype=torch.int32, **on)
    fparam = torch.full((pairs * 2 * SLOTS + 8,), math.nan, **on)
    iparam = torch.full((pairs * 2 * SLOTS + 8,), sentinel, dtype=torch.int32, **on)
    uld_hist.hist_kernel[(pairs, 2)](
        student, teacher, student_index.to(device), teacher_index.to(device), counts, listed,
        raw, fparam, iparam, 0, vs, vt, *launch._row_layout(student), *launch._row_layout(teacher), 1.0, 1.0, pairs,
        GATHER=True, STUDENT_UNIT_STRIDE=True, TEACHER_UNIT_STRIDE=False, USE_PTX=False, SIMD16=False, HAS_CE=False,
        PREFETCH=True, BLOCK=256, TAIL_BLOCK=512, num_warps=4)
    counts, listed, fparam, iparam = counts.cpu(), listed.cpu(), fparam.cpu(), iparam.cpu()
    assert (counts[pairs * 2 * CAP:] == sentinel).all(), "counts written past the batch's regions"
    assert (listed[pairs * 2 * CAP:] == sentinel).all(), "the list written past the batch's regions"
    assert (iparam[pairs * 2 * SLOTS:] == sentinel).all() and fparam[pairs * 2 * SLOTS:].isnan().all()
    counts = counts[:pairs * 2 * CAP].view(pairs, 2, CAP).to(torch.int64)
    listed = listed[:pairs * 2 * CAP].view(pairs, 2, CAP).to(torch.int64)
    iparam, fparam = iparam[:pairs * 2 * SLOTS].view(pairs, 2, SLOTS), fparam[:pairs * 2 * SLOTS].view(pairs, 2, SLOTS)
    for pair in range(pairs):
        for side, (logits, index) in enumerate(((student, student_index), (teacher, teacher_index))):
            what = f"pair {pair}, side {side}"
            if index[pair] < 0:
                assert (counts[pair, side] == sentinel).all() and (listed[pair, side] == sentinel).all(), (
                    f"{what}: a padding row's region was written")
                assert iparam[pair, side, uld_hist._FLAG.value] != 0, f"{what}: a padding row unflagged"
                assert iparam[pair, side, uld_hist._OCCUPIED.value] == 0, f"{what}: a padding row's bins listed"
                continue
            row = logits[index[pair]].cpu()
            bins = _bins_of(row)
            hist = torch.bincount(bins, minlength=CAP)
            below = torch.cumsum(hist, 0) - hist
            bad = (counts[pair, side] != below).nonzero().flatten()
            assert bad.numel() == 0, (f"{what}: counts below bins {bad[:6].tolist()} are "
                                      f"{counts[pair, side, bad[:6]].tolist()}, expected {below[bad[:6]].tolist()}")
            occupied = torch.unique(bins)
            assert iparam[pair, side, uld_hist._OCCUPIED.value] == occupied.numel(), f"{what}: occupied bins"
            assert torch.equal(listed[pair, side, :occupied.numel()], occupied), f"{what}: the list of occupied bins"
            assert (listed[pair, side, occupied.numel():] == sentinel).all(), f"{what}: written past the list"
            top = row.float().max()
            if bins.max() != TINY:
                assert fparam[pair, side, uld_hist._TOP.value] == top, (
                    f"{what}: top {fparam[pair, side, uld_hist._TOP.value].item()} for a largest logit {top.item()}")
            assert iparam[pair, side, uld_hist._FLAG.value] == 0, f"{what}: flagged"


# --- rows whose largest logit is in the tiny bin ---------------------------------------------


def _tiny_top_rows(v, seed):
    """Four student rows whose highest occupied bin is the tiny one (|z| < 2**-23, zeros)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.empty(4, v)
    s[0] = -(torch.rand(v, generator=g) * 6)  # <= 0, with exact zeros
    s[0, ::5] = 0.0
    s[1] = 0.0  # all exactly 0
    s[2] = (torch.rand(v, generator=g) * 2 - 1) * 2.0 ** -23  # magnitudes below 2**-23 only, both signs
    s[2, ::7] = 0.0
    s[3] = -(torch.rand(v, generator=g) * 6)  # <= 0 with zeros (and a -0), masked with -inf
    s[3, ::6] = 0.0
    s[3, 2] = -0.0
    s[3, 1::4] = -math.inf
    return s.to(BF16)


@pytest.mark.parametrize("ts", [0.5, 4.0])  # (1.0 and 2.0 too until the twenty-fifth session: CI's time)
def test_rows_whose_largest_logit_is_in_the_tiny_bin(ts, device):
    """Student rows whose top is the tiny bin (its stand-in 0; c96c10d had moved it to
    2**-23 - 2**-31): <= 0 with zeros, all 0, tiny only, and masked with -inf (at 4 the low bin's p is
    nonzero, so its -inf are counted apart). Rows 1 and 2 hold one float32 probability, 1/300
    (row 2's float64 ones differ a little), above every teacher probability (600 columns
    near 1/600), so every rank among them takes one sign and the float64 reference is a fair
    oracle per tie group. Through the fallback (flagged rows: the trie) and without it (the
    rows the engine settles itself)."""
    student = _tiny_top_rows(300, seed=1).to(device)
    teacher = (torch.randn(4, 600, generator=torch.Generator().manual_seed(4)) * 0.1).to(BF16).to(device)
    tt = 0.8
    _no_cross_near_ties(student, teacher, ts, tt)
    rows, _status, grad_s, grad_t = launch.hist_rows(student, teacher, ts, tt, True, True, 1.0)
    _assert_matches_reference(rows, grad_s, grad_t, student, teacher, ts, tt, what=f"T={ts}: ")
    alone = launch.hist_rows(student, teacher, ts, tt, True, True, 1.0, fallback=False)
    kept = (alone[1] == 0).to(student.device)
    if ts >= 2.0:  # (at 0.5 and 1 some of them split the tiny bin: flagged, the trie's)
        assert kept.all(), f"T={ts}: flags {alone[1].tolist()}"
    _assert_matches_reference(alone[0][kept], alone[2][kept], alone[3][kept], student[kept], teacher[kept], ts, tt,
                              what=f"T={ts}, unflagged rows, fallback=False: ")


# --- exact ties across the sides ------------------------------------------------------------


def _tie_case(name):
    """(student, teacher, Ts, Tt) whose two float64 softmaxes are equal element for element
    (bf16 sums and doublings of small integers are exact, so are the reference's z / T and
    z - max): loss 0 and gradient 0 exactly in the reference, through the tie rule in the
    engines."""
    g = torch.Generator().manual_seed(len(name))
    if name.startswith("tiny top"):  # the student's largest logit is 0 (the tiny bin)
        # (at temperature 1 the tiny bin splits below a log-sum of 8: 800 columns)
        repeats = 200 if name.endswith("T=1") else 4
        student = torch.tensor([0.0, -1.0, -2.0, -3.0]).repeat_interleave(repeats)[None]
    else:  # the largest logit is 3
        student = torch.randint(-3, 4, (1, 200), generator=g).float()
    student = student[:, torch.randperm(student.shape[1], generator=g)]
    ts = 1.0 if name.endswith("T=1") else 4.0
    if "identical" in name:
        teacher, tt = student.clone(), ts
    elif "shifted" in name:
        teacher, tt = student + 0.5, ts
    else:  # "rescaled": the teacher at twice the temperature, z_t / T_t = z_s / T_s
        teacher, tt = student * 2, 2 * ts
    return student.to(BF16), teacher.to(BF16), ts, tt


TIE_CASES = ["identical", "shifted", "rescaled", "tiny top identical", "tiny top shifted", "tiny top rescaled",
             "tiny top shifted, T=1", "tiny top rescaled, T=1"]


@pytest.mark.parametrize("name", TIE_CASES)
def test_exact_ties_across_the_sides(name, device):
    """The teacher the student shifted by a constant, or at another temperature: every value
    ties across the sides exactly, in float64 and in the trie engine (whose tops are the
    rows' largest logits), and `uld_loss` must give loss 0 and gradient 0 per tie group. With
    the student's largest logit 0 (the tiny bin), c96c10d made its top 2**-23 - 2**-31, so its
    k came from z - 1.19e-7 while the shifted teacher's came from z + 0.5 - 0.5: the ties
    broke by an ulp, the row was not flagged, and every tie group got one sign (|group sum|
    up to ~0.18 at T=1). The tiny bin stands at 0 again."""
    student, teacher, ts, tt = _tie_case(name)
    student = student.to(device).requires_grad_(True)
    teacher = teacher.to(device).requires_grad_(True)
    rows = uld_loss(student, teacher, student_temperature=ts, teacher_temperature=tt, reduction="none")
    rows.sum().backward()
    ref_rows, ref_s, ref_t = reference_rows_and_grads(student, teacher, ts, tt, teacher_grad=True)
    assert (ref_rows == 0).all() and (ref_s == 0).all() and (ref_t == 0).all(), "premise: exact ties in float64"
    trie = launch.uld_pairs(student.detach(), teacher.detach(), ts, tt, True, True, 1.0)
    assert (trie[0] == 0).all() and (trie[3] == 0).all() and (trie[4] == 0).all(), "premise: exact ties in the trie"
    assert_losses_close(rows, ref_rows, BF16, what=f"{name}: loss")
    assert_grads_close(student.grad, ref_s, student.detach(), BF16, what=f"{name}: student gradient")
    assert_grads_close(teacher.grad, ref_t, teacher.detach(), BF16, what=f"{name}: teacher gradient")


def _scaled_against_unscaled(name):
    """(student, teacher, Ts, Tt, cross-entropy) whose float64 softmaxes are equal element for
    element, where one side is scaled up ("Split tiny bins") and the other counts a tiny bin:
    found by a review of ec2da32, which lost these ties (loss ~1e-7, gradients up to 0.06)."""
    if name in ("rescaled", "both below 2**-56"):
        student = torch.tensor([[2.0 ** -26, 0, 0, 0] + [-1.0, -2.0, -3.0] * 4], dtype=torch.float64)
        if name == "rescaled":  # the student's tiny bin splits at T = 0.5; the teacher's (4x at 2) does not
            return student.to(BF16), (student * 4).to(BF16), 0.5, 2.0, False
        # every magnitude below 2**-56 on both sides: a scaling up by more than 64 binades, which
        # 97329d4 clamped to 64 on both sides (a review found the tie broken there)
        student = student * 2.0 ** -62
        return student.to(BF16), (student * 2).to(BF16), 2.0 ** -63, 2.0 ** -62, False
    z = torch.linspace(-7.0, -10.0, 200)  # "identical": the student splits at the cross-entropy's T = 1 only
    z[1:10] = 0.0
    z[0] = 2.0 ** -24
    return z[None].to(BF16), z[None].to(BF16), 2.0, 2.0, True


@pytest.mark.parametrize("name", ["rescaled", "identical", "both below 2**-56"])
@pytest.mark.parametrize("gaps", [False, True], ids=["no gaps", "gaps"])
def test_ties_across_a_side_scaled_up_and_one_not(name, gaps, device, monkeypatch):
    """A side scaled up resolves its logits near 0 one by one, a side that is not counts them
    at 0: their log-sums may differ by an ulp, breaking exact ties across the rows. Without
    gaps (ULD_HIST_GAPS=0) the pair must go to the trie (flagged); with them, a side whose
    largest logit is in its tiny bin takes a gap where it has one and resolves them too
    ("Gaps"). Either way the results are loss 0 and gradient 0, as in float64."""
    monkeypatch.setattr(launch, "HIST_GAPS", gaps)
    student, teacher, ts, tt, with_ce = _scaled_against_unscaled(name)
    student, teacher = student.to(device), teacher.to(device)
    kw = {}
    if with_ce:
        kw = dict(student_index=torch.tensor([0], device=device), teacher_index=torch.tensor([0], device=device),
                  row_weight=torch.ones(1, device=device), ce_label=torch.tensor([5], device=device),
                  ce_weight=torch.ones(1, device=device))
    ref_rows, ref_s, ref_t = reference_rows_and_grads(student, teacher, ts, tt, teacher_grad=True)
    assert (ref_rows == 0).all() and (ref_s == 0).all() and (ref_t == 0).all(), "premise: exact ties in float64"
    alone = launch.hist_pairs(student, teacher, ts, tt, True, True, 1.0, fallback=False, **kw)
    assert gaps or (alone[1] != 0).all(), f"{name}: flags {alone[1].tolist()}: the pair must go to the trie"
    rows, _status, ce, grad_s, grad_t = launch.hist_pairs(student, teacher, ts, tt, True, True, 1.0, **kw)
    assert_losses_close(rows, ref_rows, BF16, what=f"{name}: loss")
    assert (grad_t == 0).all(), f"{name}: teacher gradient {grad_t.abs().max()}"
    if with_ce:  # the student's gradient holds the cross-entropy's too: the trie's is the oracle
        trie = launch.uld_pairs(student, teacher, ts, tt, True, True, 1.0, **kw)
        assert_losses_close(ce, trie[2], BF16, what=f"{name}: cross-entropy")
        assert_grads_close(grad_s, trie[3], student, BF16, what=f"{name}: student gradient against the trie")
    else:
        assert (grad_s == 0).all(), f"{name}: student gradient {grad_s.abs().max()}"


def test_within_row_float32_ties_share_one_sign(device):
    """The float32 tie contract (README, "Exactness"): distinct logits of one row whose k rounds
    to one float32 value are one tie group. Here 0, +-1e-8, +-5e-8 and 1e-7 share the tiny bin
    of rows whose largest logit is ~10, where z - top rounds them all alike: the engine keeps
    the rows (unflagged), gives every one of them the same gradient (one p, one sign), and, no
    value of the other row lying within float32 resolution of them, matches the float64
    reference element by element, which orders them apart."""
    g = torch.Generator().manual_seed(77)
    tiny = torch.tensor([0.0, 1e-8, -1e-8, 5e-8, -5e-8, 1e-7, 0.0, -0.0, 3e-8, -1e-7])
    student = torch.randn(2, 260, generator=g) * 3
    student[:, 40:50] = tiny
    student[:, 100:110] = tiny.flip(0)
    student[:, 7] = 10.0
    teacher = torch.randn(2, 230, generator=g) * 2.5
    student, teacher = student.to(BF16).to(device), teacher.to(BF16).to(device)
    grouped = student.float().abs() < 2.0 ** -23
    assert (student.float()[grouped].unique().numel() >= 7), "test input: the tiny logits rounded together"
    _no_cross_near_ties(student, teacher, 1.0, 1.0)
    rows, status, grad_s, grad_t = launch.hist_rows(student, teacher, 1.0, 1.0, True, True, 1.0, fallback=False)
    assert (status == 0).all(), f"flags {status.tolist()}"
    for row in range(2):
        group = grad_s[row][grouped[row]]
        assert (group == group[0]).all(), f"row {row}: one tie group, gradients {group.unique().tolist()}"
    ref_rows, ref_s, ref_t = reference_rows_and_grads(student, teacher, 1.0, 1.0, teacher_grad=True)
    assert_losses_close(rows, ref_rows, BF16, what="loss")
    assert_grads_close(grad_s, ref_s, student, BF16, what="student gradient", per_tie_group=False)
    assert_grads_close(grad_t, ref_t, teacher, BF16, what="teacher gradient")


# --- both sides in one launch: strides, vocabularies, gradients asked for -------------------


def _stride_case(name, device):
    """(student, teacher) views of one call: one side contiguous, the other a column-strided
    view of a wider tensor, or 3-D [B, L, V] batches sliced as logits[:, :-1] (views taken on
    the device: a copy would make them contiguous)."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    if name == "teacher strided, student longer":
        student = (torch.randn(3, 300, generator=g) * 3).to(BF16).to(device)
        wide = torch.zeros(3, 400, dtype=BF16)
        wide[:, ::2] = (torch.randn(3, 200, generator=g) * 2.5).to(BF16)
        teacher = wide.to(device)[:, ::2]
    elif name == "student strided, teacher longer":
        wide = torch.zeros(3, 450, dtype=BF16)
        wide[:, ::3] = (torch.randn(3, 150, generator=g) * 3).to(BF16)
        student = wide.to(device)[:, ::3]
        teacher = (torch.randn(3, 320, generator=g) * 2.5).to(BF16).to(device)
    else:  # "3-D sliced": student [2, 3, 260][:, :-1]; teacher [2, 3, 2 * 190][:, :-1, ::2]
        student = (torch.randn(2, 3, 260, generator=g) * 3).to(BF16).to(device)[:, :-1]
        teacher = (torch.randn(2, 3, 380, generator=g) * 2.5).to(BF16).to(device)[:, :-1, ::2]
    return student, teacher


STRIDE_CASES = ["teacher strided, student longer", "student strided, teacher longer", "3-D sliced"]


@pytest.mark.parametrize("name", STRIDE_CASES)
def test_sides_with_their_own_strides_and_vocabularies(name, device):
    """Student and teacher read in one hist_kernel launch with different column strides
    (STUDENT_UNIT_STRIDE / TEACHER_UNIT_STRIDE), row layouts and vocabularies, both ways, both
    gradients: the engine's own pairs, exact. A side read with the other's stride or layout
    would histogram the wrong logits."""
    student, teacher = _stride_case(name, device)
    flat_s = student.reshape(-1, student.shape[-1]).contiguous()
    flat_t = teacher.reshape(-1, teacher.shape[-1]).contiguous()
    assert not student.is_contiguous() or not teacher.is_contiguous(), "premise: a strided side"
    ts, tt = 1.5, 0.7
    _no_cross_near_ties(flat_s, flat_t, ts, tt)
    rows, status, _ce, grad_s, grad_t = launch.hist_pairs(student, teacher, ts, tt, True, True, 1.0, fallback=False)
    assert (status == 0).all(), f"{name}: flags {status.tolist()}"
    _assert_matches_reference(rows, grad_s, grad_t, flat_s, flat_t, ts, tt, what=f"{name}: ")


@pytest.mark.parametrize("grads", [(False, True), (True, False)], ids=["teacher only", "student only"])
def test_one_sides_gradient(grads, device):
    """A gradient of one side only (sign_kernel's STORE_STUDENT / STORE_TEACHER: the other
    side's sign table is not written): the side asked for matches the float64 reference and
    equals, bit for bit, what a call asking for both gives; the other is None. The teacher
    is a strided view (its own stride in grad_kernel)."""
    student, teacher = _stride_case("teacher strided, student longer", device)
    ts, tt = 1.5, 0.7
    _no_cross_near_ties(student, teacher, ts, tt)
    both = launch.hist_rows(student, teacher, ts, tt, True, True, 1.0, fallback=False)
    rows, status, grad_s, grad_t = launch.hist_rows(student, teacher, ts, tt, *grads, 1.0, fallback=False)
    assert (status == 0).all(), f"flags {status.tolist()}"
    assert (grad_s is not None) == grads[0] and (grad_t is not None) == grads[1]
    assert torch.equal(rows, both[0]), "the loss depends on which gradients are asked for"
    for ours, theirs, what in ((grad_s, both[2], "student"), (grad_t, both[3], "teacher")):
        if ours is not None:
            assert torch.equal(ours, theirs), f"the {what} gradient differs from the call asking for both"
    _assert_matches_reference(rows, grad_s, grad_t, student, teacher.contiguous(), ts, tt)


def test_the_teachers_gradient_through_uld_loss(device):
    """`uld_loss` with only the teacher's logits requiring grad (the student a column-strided
    view): the loss and the teacher's gradient against float64, no student gradient."""
    student, teacher = _stride_case("student strided, teacher longer", device)
    teacher = teacher.clone().requires_grad_(True)
    ts, tt = 2.0, 0.8
    _no_cross_near_ties(student, teacher, ts, tt)
    loss = uld_loss(student, teacher, student_temperature=ts, teacher_temperature=tt, reduction="sum")
    loss.backward()
    ref_rows, _ref_s, ref_t = reference_rows_and_grads(student.contiguous(), teacher, ts, tt, teacher_grad=True)
    assert_losses_close(loss, ref_rows.sum(), BF16)
    assert_grads_close(teacher.grad, ref_t, teacher.detach(), BF16, what="teacher gradient")
    assert student.grad is None


# --- the sign rule from either side ---------------------------------------------------------


def _swap_rows(device):
    g = torch.Generator().manual_seed(77)
    s = torch.empty(4, 240)
    t = torch.empty(4, 180)
    s[0], t[0] = torch.randn(240, generator=g) * 3, torch.randn(180, generator=g) * 2.5  # random
    s[1], t[1] = torch.randint(-3, 4, (240,), generator=g).float(), torch.randint(-3, 4, (180,), generator=g).float()
    s[2], t[2] = torch.randn(240, generator=g), torch.randn(180, generator=g)  # peaked
    s[2, :3] += 12.0
    t[2, -2:] += 10.0
    s[3], t[3] = torch.randn(240, generator=g) * 2, torch.randn(180, generator=g) * 0.5
    s[3, ::4] = -math.inf
    return s.to(BF16).to(device), t.to(BF16).to(device)


def test_swapping_the_sides(device):
    """sign_kernel's teacher sign is minus the student rule with the sides swapped (e69b049):
    swapping student and teacher (and their temperatures) must give the same losses bit for
    bit and swap the two gradients bit for bit, and both calls match the float64 reference.
    Rows of one exact-tie class (a permutation, equal vocabularies) as well: loss 0, gradient
    0 from both sides."""
    student, teacher = _swap_rows(device)
    ts, tt = 1.5, 0.7
    _no_cross_near_ties(student, teacher, ts, tt)
    ab = launch.hist_rows(student, teacher, ts, tt, True, True, 1.0, fallback=False)
    ba = launch.hist_rows(teacher, student, tt, ts, True, True, 1.0, fallback=False)
    assert (ab[1] == 0).all() and (ba[1] == 0).all(), f"flags {ab[1].tolist()} / {ba[1].tolist()}"
    assert torch.equal(ab[0], ba[0]), f"losses {ab[0].tolist()} swapped {ba[0].tolist()}"
    assert torch.equal(ab[2], ba[3]) and torch.equal(ab[3], ba[2]), "the gradients do not swap"
    _assert_matches_reference(ab[0], ab[2], ab[3], student, teacher, ts, tt, what="student, teacher: ")
    _assert_matches_reference(ba[0], ba[2], ba[3], teacher, student, tt, ts, what="teacher, student: ")
    g = torch.Generator().manual_seed(78)
    s = torch.randint(-4, 5, (2, 200), generator=g).float()
    t = s[:, torch.randperm(200, generator=g)]
    s, t = s.to(BF16).to(device), t.to(BF16).to(device)
    for a, b in ((s, t), (t, s)):
        rows, status, grad_a, grad_b = launch.hist_rows(a, b, 1.5, 1.5, True, True, 1.0, fallback=False)
        assert (status == 0).all() and (rows == 0).all(), f"a permutation: losses {rows.tolist()}"
        assert (grad_a == 0).all() and (grad_b == 0).all(), "a permutation: nonzero gradient"


# --- sign_kernel's pipelined loop over the occupied bins -------------------------------------

# 1,537 distinct bins: the bf16 magnitudes 2**-4 .. 4 of both signs, and 0
_POOL = torch.arange(0x3D80, 0x4080, dtype=torch.int32)
_POOL = torch.cat([_POOL, _POOL | 0x8000, torch.tensor([0])]).to(torch.int16).view(BF16)
_FEW = torch.tensor([-2.0, -1.0, 0.5, 1.0, 2.0]).to(BF16)


def _row_of_distinct(distinct, vocab, g):
    """A row of `vocab` logits holding exactly `distinct` distinct bins ("few": 5)."""
    values = _FEW if distinct == "few" else _POOL[torch.randperm(_POOL.numel(), generator=g)[:distinct]]
    fill = values[torch.randint(0, values.numel(), (vocab - values.numel(),), generator=g)]
    row = torch.cat([values, fill])
    return row[torch.randperm(vocab, generator=g)]


class _SignBlock:
    """Stands for uld_hist.sign_kernel with its BLOCK replaced (the launcher passes 512 under
    the interpreter), so that the GPU's block (launch.HIST_SIGN_BLOCK) runs here too."""

    def __init__(self, kernel, block):
        self.kernel, self.block = kernel, block

    def __getitem__(self, grid):
        launcher = self.kernel[grid]

        def run(*args, **kwargs):
            assert "BLOCK" in kwargs, "sign_kernel's launch no longer names BLOCK"
            return launcher(*args, **dict(kwargs, BLOCK=self.block))

        return run


def _occupied_pairs(block):
    """(student's, teacher's) occupied bins: one distinct value, fewer than a block, one block
    exactly and one more, two blocks and one more, three blocks and one more, on either side."""
    few = [(1, "few"), ("few", 1)]
    around = [block - 1, block, block + 1, 2 * block, 2 * block + 1, 3 * block + 1]
    return few + [(n, "few") for n in around] + [("few", n) for n in around[1:]]


@pytest.mark.parametrize("block", [512, launch.HIST_SIGN_BLOCK], ids=["interpreter block", "gpu block"])
def test_occupied_bins_around_the_sign_block(block, device, monkeypatch):
    """sign_kernel's loop reads the list two blocks ahead and the counts one ahead (d083991):
    lists around one, two and three blocks of occupied bins on either side (the interpreter's
    512, and the GPU's HIST_SIGN_BLOCK, 64, through the launch), one call each (batches of
    three pairs), against float64."""
    if block != 512:
        monkeypatch.setattr(uld_hist, "sign_kernel", _SignBlock(uld_hist.sign_kernel, block))
    pairs = _occupied_pairs(block)
    width = max(n for pair in pairs for n in pair if n != "few")
    assert width <= _POOL.numel()
    g = torch.Generator().manual_seed(1 if block == 512 else 2)
    student = torch.stack([_row_of_distinct(a, width + 63, g) for a, _ in pairs]).to(device)
    teacher = torch.stack([_row_of_distinct(b, width + 13, g) for _, b in pairs]).to(device)
    ts, tt = 2.0, 1.3
    _no_cross_near_ties(student, teacher, ts, tt)
    for row, (a, b) in enumerate(pairs):
        assert [torch.unique(student[row]).numel(), torch.unique(teacher[row]).numel()] == [
            5 if a == "few" else a, 5 if b == "few" else b], f"premise: distinct values of pair {row}"
    rows, status, grad_s, grad_t = launch.hist_rows(student, teacher, ts, tt, True, True, 1.0, fallback=False)
    assert (status == 0).all(), f"flags {status.tolist()}"
    _assert_matches_reference(rows, grad_s, grad_t, student, teacher, ts, tt, what=f"block {block}: ")


# --- the cross-entropy's checks are the student's alone ---------------------------------------


def _ce_kwargs(n, vocab, device):
    return dict(student_index=torch.arange(n, device=device), teacher_index=torch.arange(n, device=device),
                row_weight=torch.ones(n, device=device),
                ce_label=torch.tensor([3, vocab - 1, 0][:n], device=device),
                ce_weight=torch.ones(n, device=device))


@pytest.mark.parametrize("case", ["low bin", "tiny bin"])
def test_teacher_rows_are_not_held_to_the_cross_entropy_checks(case, device):
    """With the cross-entropy (HAS_CE, the student's branch of hist_kernel only), teacher rows
    that would fail its checks at temperature 1 but pass at their own temperature:
    "low bin": logits near -190, the largest -175, some finite -300 (at temperature 1 a logit
    of -256 has a probability, 2**-117, at the teacher's 0.5 it has not, 2**-234); "tiny bin": the largest
    logit 0.125 and zeros, at a teacher temperature of 0.001 (the zeros have no probability
    there; at temperature 1 the tiny bin's ends differ in k). The pairs must stay the
    engine's (flags 0), with the trie's losses, cross-entropies and gradients, and the
    float64 reference's losses."""
    g = torch.Generator().manual_seed(11 if case == "low bin" else 12)
    n, vs, vt = 2, 260, 200
    student = (torch.randn(n, vs, generator=g) * 2).to(BF16)
    if case == "low bin":
        teacher = -190.0 + 3.0 * torch.randn(n, vt, generator=g)
        teacher[:, 0] = -175.0
        teacher[:, 1::9] = -300.0
        tt = 0.5
    else:
        teacher = -(torch.rand(n, vt, generator=g) * 4 + 6)
        teacher[:, 0] = 0.125
        teacher[:, 5::20] = 0.0
        tt = 0.001
    teacher = teacher.to(BF16)
    student, teacher = student.to(device), teacher.to(device)
    ts = 1.5
    kw = _ce_kwargs(n, vs, device)
    ours = launch.hist_pairs(student, teacher, ts, tt, True, True, 1.0, fallback=False, **kw)
    assert (ours[1] == 0).all(), f"{case}: flags {ours[1].tolist()}: the teacher held to the cross-entropy's checks"
    trie = launch.uld_pairs(student, teacher, ts, tt, True, True, 1.0, **kw)
    assert_losses_close(ours[0], trie[0], BF16, what="loss against the trie")
    assert_losses_close(ours[2], trie[2], BF16, what="cross-entropy against the trie")
    assert_grads_close(ours[3], trie[3], student, BF16, what="student gradient against the trie")
    assert_grads_close(ours[4], trie[4], teacher, BF16, what="teacher gradient against the trie")
    ref_rows, _, _ = reference_rows_and_grads(student, teacher, ts, tt)
    assert_losses_close(ours[0], ref_rows, BF16, what="loss against float64")
    ref_ce = torch.nn.functional.cross_entropy(student.double(), kw["ce_label"], reduction="none")
    assert_losses_close(ours[2], ref_ce, BF16, what="cross-entropy against float64")


def test_training_loss_with_teacher_rows_failing_the_cross_entropy_checks(device, monkeypatch):
    """The same through `uld_distillation_loss` (the histogram engine, [B, L, V] logits sliced
    as logits[:, :-1], labels): teacher logits near -190 with finite -300s at a teacher
    temperature of 0.5; no pair is flagged (nothing reaches the trie), and the losses and the
    student's gradient match the paper's semantics in float64."""
    from reference.paper import uld_distillation_loss_reference

    monkeypatch.setattr(launch, "DISTILL_ENGINE", "hist")
    fallback = launch._trie_fallback
    flagged = []

    def spy(*args):
        flagged.append(int((args[3] != 0).sum()))
        return fallback(*args)

    monkeypatch.setattr(launch, "_trie_fallback", spy)
    g = torch.Generator().manual_seed(13)
    batch, ls, lt, vs, vt = 2, 6, 7, 70, 50
    student = (torch.randn(batch, ls + 1, vs, generator=g) * 2).to(BF16)[:, :-1].to(device)
    teacher = -190.0 + 3.0 * torch.randn(batch, lt, vt, generator=g)
    teacher[..., 0] = -175.0
    teacher[..., 1::9] = -300.0
    teacher = teacher.to(BF16).to(device)
    s_labels = torch.full((batch, ls), -100)
    t_labels = torch.full((batch, lt), -100)
    s_labels[:, 1:5] = torch.randint(0, vs, (batch, 4), generator=g)
    t_labels[:, 2:6] = torch.randint(0, vt, (batch, 4), generator=g)
    s_labels, t_labels = s_labels.to(device), t_labels.to(device)
    options = dict(reduction="sum", teacher_temperature=0.5, student_temperature=1.5)
    student = student.detach().requires_grad_(True)
    total, ce, distill = uld_distillation_loss(student, teacher, s_labels, t_labels, **options)
    total.backward()
    assert flagged and sum(flagged) == 0, f"flagged pairs per call: {flagged}"
    s64 = student.detach().double().requires_grad_(True)
    ref_total, ref_ce, ref_distill = uld_distillation_loss_reference(s64, teacher.double(), s_labels, t_labels,
                                                                     **options)
    ref_total.backward()
    for ours, ref, what in ((total, ref_total, "total"), (ce, ref_ce, "ce"), (distill, ref_distill, "distillation")):
        assert_losses_close(ours, ref.detach(), BF16, what=what)
    assert_grads_close(student.grad.reshape(-1, vs), s64.grad.reshape(-1, vs), student.detach().reshape(-1, vs), BF16)


def _flagged_like(rows, seed, device):
    """Student and teacher rows of 6,000 columns that the histogram engine flags without gaps
    (launch.HIST_GAPS off: the tests that use them set it): 15 logits within 2**-23 of 0, one
    at -2**-23, the rest N(-60, 10^2) (the benchmark's `flagged` kind, narrower)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(tiny_top_rows(g, rows, 6000, -60.0, 10.0, "cpu", extra=(NO_GAP,), count=15).to(BF16).to(device)
                 for _ in range(2))


def test_fallback_levels_below_one_from_listed_columns(device, monkeypatch):
    """The fallback's finish pass lists the columns that reach a level's open buckets and
    counts the levels below from the list (launch.FALLBACK_LIST, uld_split._finish_pass): the
    same trie, so bit for bit the same losses, gradients and status as reading the whole rows
    at every level, and also where the lists overflow their capacity (3 columns a side: every
    level reads the rows again and lists anew). Premises, from the workspace: a level below
    the listed one was counted (depth >= 3), the lists fit at the default capacity and not at
    3."""
    student, teacher = _flagged_like(1, 6, device)
    workspaces = keep_trie_workspaces(monkeypatch, launch)
    results, listed = [], []
    for listing, cap in ((True, None), (True, 3), (False, None)):
        monkeypatch.setattr(launch, "HIST_GAPS", False)  # (the rows to the fallback; undone below)
        monkeypatch.setattr(launch, "FALLBACK_LIST", listing)
        if cap is not None:
            monkeypatch.setattr(launch, "_fallback_list_cap", lambda *args: cap)
        results.append(launch.uld_rows(student, teacher, 1.0, 1.0, True, False, 1.0)[:3])
        meta = workspaces[-1][0][2].cpu()
        listed.append((int(meta[uld_split._LISTED_S.value]), int(meta[uld_split._LISTED_T.value])))
        monkeypatch.undo()
        workspaces = keep_trie_workspaces(monkeypatch, launch)
    depth = int(results[0][1][0]) >> 1
    assert depth >= 3, f"test input: trie depth {depth}, no level counted from a list"
    cfg = launch.split_config(student.device.type == "cuda")
    assert 0 < max(listed[0]) <= launch._fallback_list_cap(triton.cdiv(6000, cfg.chunk), cfg), (
        f"test input: listed {listed[0]}")
    assert max(listed[1]) > 3, f"test input: listed {listed[1]} fit 3 a side"
    for (rows, status, grad), what in zip(results[1:], ("overflowing lists", "whole rows")):
        assert torch.equal(status, results[0][1]), f"{what}: status {status.tolist()} vs {results[0][1].tolist()}"
        assert torch.equal(rows, results[0][0]), f"{what}: losses differ"
        assert torch.equal(grad, results[0][2]), f"{what}: gradients differ"


def test_fallback_level_one_capped_for_shared_memory_stays_exact(device, monkeypatch):
    """The trie fallback with level 1 capped to the shared table's 1,536 buckets
    (launch.FALLBACK_SMEM_L1: under the interpreter the same capped trie, counted with atomics;
    on the GPU in shared memory) and without, on `flagged`-like rows of one vocabulary (16
    logits within 2**-23 of 0, the rest N(-60, 10^2), 6,000 columns: every row goes to the
    fallback, and 104-113 root buckets stay open under the GPU's 4,096-bucket root and the
    interpreter's 1,024 alike, so 4 child bits each pass the cap): both exact against
    float64 (near-ties across the rows checked by their bound), losses agreeing; the premise
    (the cap took level 1 from above 1,536 buckets to below) read from the workspace."""
    monkeypatch.setattr(launch, "HIST_GAPS", False)
    student, teacher = _flagged_like(2, 4, device)
    workspaces = keep_trie_workspaces(monkeypatch, launch)
    losses, level_one = [], []
    for capped in (True, False):
        monkeypatch.setattr(launch, "FALLBACK_SMEM_L1", capped)
        rows, status, grad, _ = launch.uld_rows(student, teacher, 1.0, 1.0, True, False, 1.0)
        assert ((status & 1) == 0).all() and (status > 0).all(), f"status {status.tolist()}"
        level_one.append(level_one_sizes(workspaces[-1], 2).tolist())
        ref_rows, ref_grad, _ = reference_rows_and_grads(student, teacher)
        assert_losses_close(rows, ref_rows, BF16)
        assert_grads_close(grad, ref_grad, student, BF16, near_ties=cross_near_ties(student, teacher))
        losses.append(rows)
    assert max(level_one[0]) <= 1536 < max(level_one[1]), f"test input: level 1 sizes {level_one}"
    assert_losses_close(losses[0], losses[1], BF16, what="capped level 1 against uncapped")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_the_largest_finite_magnitude_two_logits_at_a_time(dtype, layout):
    """The read of a row holding an infinity for its largest finite magnitude (`_finite_top`:
    two logits an instruction, ptx.finite_top_bf16, called as hist_kernel calls it) against the
    same read one logit at a time (`_infinities`) and against torch, on rows holding no NaN (the
    only rows it reads): every non-NaN bf16 pattern in one row (+inf in it: past
    _INF_MAGNITUDE; without: the largest finite, 0x7F7F), N(0, 100^2) rows masked with -inf (as
    bench kind `wide_masked`) at lengths that end inside a block, a row of -inf and zeros (0),
    and float32 rows holding bf16 values (their high halves); "strided": every other column of
    a buffer whose columns between hold NaN and +inf, read without loads ahead (a stride or a
    wrong offset would read them)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("u16x2 instructions: sm_90 and later (the engine reads one logit at a time below)")
    patterns = torch.arange(-32768, 32768, dtype=torch.int32)
    patterns = patterns[(patterns & 0x7FFF) <= 0x7F80]  # (no NaN)
    g = torch.Generator().manual_seed(5)
    rows = [patterns[torch.randperm(patterns.numel(), generator=g)], patterns[patterns != 0x7F80]]
    for n in (151936, 1000, 4096 * 3 + 2):
        wide = (torch.randn(n, generator=g) * 100).to(BF16)
        wide[torch.randperm(n, generator=g)[: n // 100]] = -math.inf
        rows.append(wide.view(torch.int16).to(torch.int32))
    rows.append(torch.tensor([0xFF80 - 65536, 0, 0x8000 - 65536] * 7, dtype=torch.int32))
    strided = layout == "strided"
    for bits in rows:
        magnitudes = bits & 0x7FFF
        finite = magnitudes[magnitudes < 0x7F80]
        expected = 0x7F81 if (bits == 0x7F80).any() else int(finite.max()) if finite.numel() else 0
        row = bits.to(torch.int16).view(BF16).to(dtype)
        if strided:  # (every other column of a buffer holding NaN and +inf between)
            poison = torch.tensor([math.nan, math.inf], dtype=dtype).repeat(row.numel() // 2 + 1)[: row.numel()]
            row = torch.stack([row, poison], dim=1).flatten().cuda()[0::2]
        else:
            row = row.cuda()
        out = torch.empty(2, dtype=torch.int32, device="cuda")
        _finite_top_kernel[(1,)](row, out, row.numel(), row.stride(0), UNIT_STRIDE=not strided, PREFETCH=not strided,
                                 BLOCK=4096, num_warps=4)
        assert out.tolist() == [expected, expected], (
            f"{row.numel()} logits ({layout}): two at a time {out[0].item():#x}, one at a time {out[1].item():#x}, "
            f"torch {expected:#x}")


@triton.jit
def _finite_top_kernel(row_ptr, out_ptr, n, stride, UNIT_STRIDE: tl.constexpr, PREFETCH: tl.constexpr,
                       BLOCK: tl.constexpr):
    """`_finite_top` of one row of n logits two at a time (out_ptr[0], called as hist_kernel
    calls it) and one at a time (out_ptr[1])."""
    tl.store(out_ptr, uld_hist._finite_top_call(row_ptr, stride, n, UNIT_STRIDE, True, PREFETCH, BLOCK))
    tl.store(out_ptr + 1, uld_hist._finite_top(row_ptr, stride, n, UNIT_STRIDE, False, PREFETCH, BLOCK))
