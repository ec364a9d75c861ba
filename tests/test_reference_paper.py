"""The paper's distillation loss (``reference.paper``), checked against hand-built batches.

Every expected value is computed here without calling the function under test: the pairs of
rows are written out by hand from the labels (the arithmetic is in the comments), each pair's
ULD loss comes from the overlap form ``2 - 2 * sum_k min(a_(k), b_(k))`` (not the L1 code of
``reference.uld``), the reductions are spelled out, and the cross-entropy comes from
``F.cross_entropy`` on the shifted logits. CPU, float64, small.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference import uld_distillation_loss_reference

DTYPE = torch.float64
# float64 sums of a few dozen terms of size <= 2: rounding stays far below this.
EXACT = dict(atol=1e-12, rtol=0.0)
IGN = -100
# Student [B=2, Ls=6, Vs=5] against teacher [B=2, Lt=7, Vt=4]: different lengths and vocabularies.
B, LS, LT, VS, VT = 2, 6, 7, 5, 4


def _logits(batch: int, length: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    """Fresh N(0, scale^2) float64 logits: distinct values, so no ties in any sort."""
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(batch, length, vocab, generator=gen, dtype=DTYPE)


def _labels(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def _row_loss(student_row, teacher_row, student_temperature=1.0, teacher_temperature=1.0):
    """ULD loss of one pair of rows, in the overlap form: |x - y| = x + y - 2 min(x, y), and
    each padded sorted vector sums to 1, so L = 2 - 2 * sum_k min(a_(k), b_(k))."""
    a = torch.softmax(student_row / student_temperature, -1).sort(descending=True).values
    b = torch.softmax(teacher_row / teacher_temperature, -1).sort(descending=True).values
    shared = min(a.numel(), b.numel())  # past it one side is zero padding: min = 0
    return 2.0 - 2.0 * torch.minimum(a[:shared], b[:shared]).sum()


def _expected_row_losses(student, teacher, pairs, student_temperature=1.0, teacher_temperature=1.0):
    """``pairs[i]`` lists ``(student_row, teacher_row)`` of sample i; returns one list of
    row-loss scalars per sample."""
    return [[_row_loss(student[i, s], teacher[i, t], student_temperature, teacher_temperature)
             for s, t in sample_pairs] for i, sample_pairs in enumerate(pairs)]


def _expected_distillation(row_losses, reduction, num_items_in_batch=None):
    """The reductions of the distillation term, written out."""
    sample_means = [sum(rows) / len(rows) if rows else None for rows in row_losses]
    all_rows = [loss for rows in row_losses for loss in rows]
    total = sum(all_rows) if all_rows else torch.zeros((), dtype=DTYPE)
    if reduction == "paper":
        present = [m for m in sample_means if m is not None]
        return sum(present) / len(present) if present else torch.zeros((), dtype=DTYPE)
    if reduction == "token_mean":
        count = num_items_in_batch if num_items_in_batch is not None else len(all_rows)
        return total / count if count else torch.zeros((), dtype=DTYPE)
    if reduction == "sum":
        return total
    return torch.stack([m if m is not None else torch.zeros((), dtype=DTYPE)
                        for m in sample_means])


def _expected_crossentropy(student, labels, reduction, num_items_in_batch=None):
    """Hugging Face's causal-LM loss, from ``F.cross_entropy`` on the shifted logits."""
    logits, targets = student[:, :-1], labels[:, 1:]
    flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    total = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGN, reduction="sum")
    count = int((flat_targets != IGN).sum())
    if reduction == "none":
        per_sample = []
        for i in range(student.shape[0]):
            if (targets[i] != IGN).any():
                per_sample.append(F.cross_entropy(logits[i], targets[i], ignore_index=IGN))
            else:
                per_sample.append(torch.zeros((), dtype=DTYPE))
        return torch.stack(per_sample)
    if reduction == "sum":
        return total
    if reduction == "paper" and num_items_in_batch is None:
        return F.cross_entropy(flat_logits, flat_targets, ignore_index=IGN)  # HF's mean
    return total / (num_items_in_batch if num_items_in_batch is not None else count)


def _close(actual, expected, what):
    expected = torch.as_tensor(expected, dtype=DTYPE)
    torch.testing.assert_close(actual.detach(), expected.detach(), **EXACT,
                               msg=lambda m: f"{what}: {m}")


# The labels of case "prompt-lengths-differ", reused by several cases.
STUDENT_A = [[IGN, IGN, 1, 2, 3, 4],  # leading run 2 -> start 1, size 4
             [IGN, 0, 1, 2, IGN, IGN]]  # leading run 1 -> start 0, size 3, padded at the end
TEACHER_A = [[IGN, IGN, IGN, 0, 1, 2, 3],  # leading run 3 -> start 2, size 4
             [IGN, IGN, IGN, IGN, 3, 2, IGN]]  # leading run 4 -> start 3, size 2

# (student labels, teacher labels, options, pairs per sample): the pairs by hand.
CASES = [
    # 0: n = min(4, 4) = 4: student rows 1..4 with teacher rows 2..5.
    # 1: n = min(3, 2) = 2: student rows 0, 1 with teacher rows 3, 4.
    pytest.param(STUDENT_A, TEACHER_A, {},
                 [[(1, 2), (2, 3), (3, 4), (4, 5)], [(0, 3), (1, 4)]],
                 id="prompt-lengths-differ"),
    # 0: student labels start with an answer token: start 0, size 6; teacher start 1, size 4:
    #    n = 4: student rows 0..3 with teacher rows 1..4.
    # 1: student start 2, size 2 (end padding); teacher answer from position 0: start 0,
    #    size 3: n = 2: student rows 2, 3 with teacher rows 0, 1.
    pytest.param([[3, 1, 2, 0, 4, 1], [IGN, IGN, IGN, 2, 2, IGN]],
                 [[IGN, IGN, 0, 1, 2, 3, IGN], [1, 2, 3, IGN, IGN, IGN, IGN]], {},
                 [[(0, 1), (1, 2), (2, 3), (3, 4)], [(2, 0), (3, 1)]],
                 id="labels-not-starting-with-ignore"),
    # skip the student EOS: sizes 3 / 4 -> n = 3 (rows 1..3 with 2..4); 2 / 2 -> n = 2.
    # Temperatures change every row loss (checked by the overlap form at the same T).
    pytest.param(STUDENT_A, TEACHER_A,
                 dict(skip_student_eos=True, student_temperature=2.0, teacher_temperature=0.5),
                 [[(1, 2), (2, 3), (3, 4)], [(0, 3), (1, 4)]],
                 id="skip-student-eos-with-temperatures"),
    # skip the teacher EOS: sizes 4 / 3 -> n = 3; 3 / 1 -> n = 1 (student row 0, teacher row 3).
    pytest.param(STUDENT_A, TEACHER_A, dict(skip_teacher_eos=True, distillation_weight=1.5),
                 [[(1, 2), (2, 3), (3, 4)], [(0, 3)]],
                 id="skip-teacher-eos-weighted"),
    # both: 0: sizes 3 / 3 -> n = 3. 1: student answer of one token, start 3: size 1 - 1 = 0,
    # so sample 1 has no rows (the paper's code: NaN; here: skipped / counted as 0).
    pytest.param([STUDENT_A[0], [IGN, IGN, IGN, IGN, 4, IGN]], TEACHER_A,
                 dict(skip_student_eos=True, skip_teacher_eos=True),
                 [[(1, 2), (2, 3), (3, 4)], []],
                 id="skip-both-eos-empties-a-sample"),
    # teacher labels of sample 1 are all ignored: size 0, no rows for that sample.
    pytest.param(STUDENT_A, [TEACHER_A[0], [IGN] * LT], {},
                 [[(1, 2), (2, 3), (3, 4), (4, 5)], []],
                 id="all-ignored-teacher-sample"),
    # No sample has rows: the distillation term is 0 under every reduction.
    pytest.param([[IGN] * LS, [IGN, IGN, IGN, IGN, 4, IGN]], TEACHER_A,
                 dict(skip_student_eos=True), [[], []],
                 id="no-sample-has-rows"),
    # trl_observed: every row one later. 0: student rows 2..5 with teacher rows 3..6.
    # 1: student rows 1, 2 with teacher rows 4, 5.
    pytest.param(STUDENT_A, TEACHER_A, dict(alignment="trl_observed"),
                 [[(2, 3), (3, 4), (4, 5), (5, 6)], [(1, 4), (2, 5)]],
                 id="trl-observed"),
    # trl_observed past the end: student answer from position 0 (start 0, size 6), first row
    # 1, so rows 1..5 exist (Ls = 6) and the sixth pair (student row 6) is dropped; teacher
    # start 0 (leading run 1), size 6, first row 1, rows 1..6 exist (Lt = 7): n = 5.
    # Sample 1 as in "prompt-lengths-differ", shifted by one.
    pytest.param([[3, 1, 2, 0, 4, 1], STUDENT_A[1]], [[IGN, 0, 1, 2, 3, 0, 1], TEACHER_A[1]],
                 dict(alignment="trl_observed"),
                 [[(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)], [(1, 4), (2, 5)]],
                 id="trl-observed-drops-rows-past-the-end"),
    # The same labels with the paper's alignment: nothing runs off, n = 6 (rows 0..5 both).
    pytest.param([[3, 1, 2, 0, 4, 1], STUDENT_A[1]], [[IGN, 0, 1, 2, 3, 0, 1], TEACHER_A[1]], {},
                 [[(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5)], [(0, 3), (1, 4)]],
                 id="paper-alignment-full-answer"),
]
REDUCTIONS = ["paper", "token_mean", "sum", "none"]


@pytest.mark.parametrize("student_labels, teacher_labels, options, pairs", CASES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_hand_built_batches(student_labels, teacher_labels, options, pairs, reduction):
    student, teacher = _logits(B, LS, VS, seed=1), _logits(B, LT, VT, seed=2)
    student_labels, teacher_labels = _labels(student_labels), _labels(teacher_labels)
    total, ce, distillation = uld_distillation_loss_reference(
        student, teacher, student_labels, teacher_labels, reduction=reduction, **options)

    row_losses = _expected_row_losses(student, teacher, pairs,
                                      options.get("student_temperature", 1.0),
                                      options.get("teacher_temperature", 1.0))
    weight = options.get("distillation_weight", 1.0)
    expected = weight * _expected_distillation(row_losses, reduction)
    expected_ce = _expected_crossentropy(student, student_labels, reduction)
    _close(distillation, expected, f"distillation ({reduction})")
    _close(ce, expected_ce, f"cross-entropy ({reduction})")
    _close(total, expected + expected_ce, f"total ({reduction})")
    assert distillation.dtype == DTYPE and ce.dtype == DTYPE, "float64 in, float64 out"
    shape = (B,) if reduction == "none" else ()
    assert tuple(total.shape) == shape, f"total has shape {tuple(total.shape)}, expected {shape}"
    assert torch.isfinite(total).all(), f"non-finite total {total}"


@pytest.mark.parametrize("reduction", ["paper", "sum"])
def test_trl_observed_drops_teacher_rows_past_the_end(reduction):
    # A shorter teacher (Lt = 5) binds this time. Student: leading run 1 -> start 0, size 5,
    # first row 1, rows 1..5 exist. Teacher: answer from position 0 -> start 0, size 5, first
    # row 1, only rows 1..4 exist. n = min(5, 5) = 5 cut to 4: pairs (1, 1) .. (4, 4).
    student, teacher = _logits(1, LS, VS, seed=21), _logits(1, 5, VT, seed=22)
    student_labels, teacher_labels = _labels([[IGN, 1, 2, 3, 4, 0]]), _labels([[2, 1, 0, 3, 1]])
    _, _, distillation = uld_distillation_loss_reference(
        student, teacher, student_labels, teacher_labels, alignment="trl_observed",
        reduction=reduction)
    row_losses = _expected_row_losses(student, teacher, [[(1, 1), (2, 2), (3, 3), (4, 4)]])
    _close(distillation, _expected_distillation(row_losses, reduction),
           f"trl_observed with the teacher's rows running out ({reduction})")


def test_vocab_size_leaves_padded_columns_out():
    # Padded lm_head columns with large logits: they would carry most of the mass.
    student, teacher = _logits(B, LS, VS + 3, seed=3), _logits(B, LT, VT + 2, seed=4)
    student[..., VS:] = 6.0
    teacher[..., VT:] = 6.0
    student_labels, teacher_labels = _labels(STUDENT_A), _labels(TEACHER_A)
    pairs = [[(1, 2), (2, 3), (3, 4), (4, 5)], [(0, 3), (1, 4)]]
    total, ce, distillation = uld_distillation_loss_reference(
        student, teacher, student_labels, teacher_labels,
        student_vocab_size=VS, teacher_vocab_size=VT)
    row_losses = _expected_row_losses(student[..., :VS], teacher[..., :VT], pairs)
    _close(distillation, _expected_distillation(row_losses, "paper"), "truncated distillation")
    _close(ce, _expected_crossentropy(student[..., :VS], student_labels, "paper"),
           "truncated cross-entropy")
    # Control: with the padded columns in, both terms differ, so the check bites.
    _, ce_padded, distillation_padded = uld_distillation_loss_reference(
        student, teacher, student_labels, teacher_labels)
    assert (distillation_padded - distillation).abs() > 1e-3, "padded columns did not matter"
    assert (ce_padded - ce).abs() > 1e-3, "padded columns did not matter to the cross-entropy"


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_num_items_in_batch(reduction, as_tensor):
    student, teacher = _logits(B, LS, VS, seed=5), _logits(B, LT, VT, seed=6)
    student_labels, teacher_labels = _labels(STUDENT_A), _labels(TEACHER_A)
    pairs = [[(1, 2), (2, 3), (3, 4), (4, 5)], [(0, 3), (1, 4)]]
    items = 17  # a global count from other micro-batches: 6 rows and 6 targets here
    _, ce, distillation = uld_distillation_loss_reference(
        student, teacher, student_labels, teacher_labels, reduction=reduction,
        num_items_in_batch=torch.tensor(items) if as_tensor else items)
    row_losses = _expected_row_losses(student, teacher, pairs)
    # token_mean divides both terms by it; "paper" only the cross-entropy (HF's rule); the
    # paper's distillation mean, "sum" and "none" do not use it.
    dist_items = items if reduction == "token_mean" else None
    _close(distillation, _expected_distillation(row_losses, reduction, dist_items),
           f"distillation with num_items_in_batch ({reduction})")
    ce_items = items if reduction in ("token_mean", "paper") else None
    _close(ce, _expected_crossentropy(student, student_labels, reduction, ce_items),
           f"cross-entropy with num_items_in_batch ({reduction})")


def _accumulation_batch():
    """Four samples with different prompts on each side, one of them with no distillation row."""
    student_labels = _labels([[IGN, IGN, 1, 2, 3, 4], [IGN, 0, 1, 2, IGN, IGN],
                              [IGN, IGN, IGN, IGN, 3, IGN], [IGN, 4, 4, 0, 1, IGN]])
    teacher_labels = _labels([[IGN, IGN, IGN, 0, 1, 2, 3], [IGN, IGN, IGN, IGN, 3, 2, IGN],
                              [IGN] * LT, [IGN, IGN, 1, 1, 2, 3, IGN]])
    return (_logits(4, LS, VS, seed=7), _logits(4, LT, VT, seed=8), student_labels,
            teacher_labels)


def test_gradient_accumulation_over_halves_matches_the_full_batch():
    student, teacher, student_labels, teacher_labels = _accumulation_batch()
    # Counted here from the labels: CE targets are labels[:, 1:] not ignored (4 + 3 + 1 + 4); the
    # distillation rows are min(answer sizes) per sample (4 + 2 + 0 + 4).
    ce_count = int((student_labels[:, 1:] != IGN).sum())
    answer_sizes = (student_labels != IGN).sum(1), (teacher_labels != IGN).sum(1)
    row_count = int(torch.minimum(*answer_sizes).sum())
    assert (ce_count, row_count) == (12, 10), "the batch is not the one the comments describe"
    options = dict(reduction="token_mean", distillation_weight=1.5, crossentropy_weight=0.5,
                   skip_student_eos=False)

    def run(rows, items):
        s = student[rows].clone().requires_grad_(True)
        total, ce, distillation = uld_distillation_loss_reference(
            s, teacher[rows], student_labels[rows], teacher_labels[rows],
            num_items_in_batch=items, **options)
        total.backward()
        return total.detach(), ce.detach(), distillation.detach(), s.grad

    halves = [slice(0, 2), slice(2, 4)]
    for items in (ce_count, row_count, 23):
        full_total, _, _, full_grad = run(slice(0, 4), items)
        parts = [run(half, items) for half in halves]
        _close(parts[0][0] + parts[1][0], full_total,
               f"sum of the halves' totals vs the full batch (num_items_in_batch={items})")
        torch.testing.assert_close(torch.cat([parts[0][3], parts[1][3]]), full_grad, **EXACT,
                                   msg=lambda m: f"accumulated student gradient differs: {m}")
    # Each term is the full batch's token mean when the halves divide by the full count.
    _, full_ce, full_distillation, _ = run(slice(0, 4), None)
    _close(sum(run(half, ce_count)[1] for half in halves), full_ce,
           "halves' cross-entropy with the full target count vs the full-batch mean")
    _close(sum(run(half, row_count)[2] for half in halves), full_distillation,
           "halves' distillation with the full row count vs the full-batch mean")
    # And the full batch against hand-built pairs.
    pairs = [[(1, 2), (2, 3), (3, 4), (4, 5)], [(0, 3), (1, 4)], [],
             [(0, 1), (1, 2), (2, 3), (3, 4)]]
    expected = 1.5 * _expected_distillation(_expected_row_losses(student, teacher, pairs),
                                            "token_mean")
    _close(full_distillation, expected, "full-batch token_mean distillation")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_crossentropy_is_hf_causal_lm_loss_at_temperature_1(reduction):
    student, teacher = _logits(B, LS, VS, seed=9), _logits(B, LT, VT, seed=10)
    # Sample 1 has a single label at position 0: no row predicts it, so it has no target.
    student_labels = _labels([[IGN, 3, IGN, 2, 1, 0], [4, IGN, IGN, IGN, IGN, IGN]])
    _, ce, _ = uld_distillation_loss_reference(
        student, teacher, student_labels, _labels(TEACHER_A), reduction=reduction,
        crossentropy_weight=0.25, student_temperature=3.0, teacher_temperature=2.0)
    expected = 0.25 * _expected_crossentropy(student, student_labels, reduction)
    _close(ce, expected, f"cross-entropy vs F.cross_entropy on shifted logits ({reduction})")
    if reduction == "paper":  # the same, spelled out: 4 targets in sample 0, rows 0, 2, 3, 4
        manual = sum(torch.logsumexp(student[0, j], -1) - student[0, j, student_labels[0, j + 1]]
                     for j in (0, 2, 3, 4)) / 4
        _close(ce, 0.25 * manual, "cross-entropy vs log-sum-exp minus the target logit")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_explicit_row_maps(reduction):
    student, teacher = _logits(B, LS, VS, seed=11), _logits(B, LT, VT, seed=12)
    # Flat rows: student 1, 2 (sample 0) and 6 + 3 (sample 1); teacher 5, 0 and 7 + 6.
    student_rows = torch.tensor([1, 2, 9])
    teacher_rows = torch.tensor([5, 0, 13])
    losses = [_row_loss(student[0, 1], teacher[0, 5], 1.5, 1.0),
              _row_loss(student[0, 2], teacher[0, 0], 1.5, 1.0),
              _row_loss(student[1, 3], teacher[1, 6], 1.5, 1.0)]
    # Labels that would pair nothing at all: the maps must not look at them.
    student_labels, teacher_labels = _labels([[IGN] * LS] * B), _labels([[IGN] * LT] * B)
    common = dict(reduction=reduction, distillation_weight=2.0, student_temperature=1.5,
                  skip_student_eos=True, alignment="trl_observed")
    for weights in (None, torch.tensor([0.5, 0.25, 2.0], dtype=DTYPE)):
        w = weights.tolist() if weights is not None else [1 / 3] * 3
        _, _, distillation = uld_distillation_loss_reference(
            student, teacher, student_labels, teacher_labels, student_rows=student_rows,
            teacher_rows=teacher_rows, row_weights=weights, **common)
        terms = [2.0 * wr * lr for wr, lr in zip(w, losses)]
        # reduction does not apply; "none" gives each row's term to its student row's sample
        if reduction == "none":
            expected = torch.stack([terms[0] + terms[1], terms[2]])
        else:
            expected = sum(terms)
        _close(distillation, expected, f"explicit rows, weights {w} ({reduction})")


def test_explicit_empty_row_maps_give_zero():
    student, teacher = _logits(B, LS, VS, seed=13), _logits(B, LT, VT, seed=14)
    empty = torch.zeros(0, dtype=torch.int64)
    _, _, distillation = uld_distillation_loss_reference(
        student, teacher, _labels(STUDENT_A), _labels(TEACHER_A), student_rows=empty,
        teacher_rows=empty)
    _close(distillation, 0.0, "empty explicit rows")


def _paper_code_distillation(student, teacher, student_labels, teacher_labels, skip_student_eos,
                             skip_teacher_eos, student_temperature, teacher_temperature):
    """A transcription of llm-recipes ``DistillationLoss.forward`` (distillation term, weight 1),
    on detached copies (it writes into its inputs); float64 result buffer."""
    student, teacher = student.detach().clone(), teacher.detach().clone()

    def start_and_size(answers):
        index, size = [], []
        for answer in answers:
            is_value = answer.eq(IGN)
            size.append(len(answer) - int(is_value.sum()))
            indices = is_value.nonzero(as_tuple=True)[0]
            if len(indices) == 0 or indices[0] != 0:
                index.append(0)
            else:
                diff_indices = indices[1:] - indices[:-1]
                break_index = (diff_indices != 1).nonzero()
                length = (break_index[0].item() + 1) if len(break_index) > 0 else len(indices)
                index.append(length - 1)
        return index, size

    student_index, student_size = start_and_size(student_labels)
    teacher_index, teacher_size = start_and_size(teacher_labels)
    if skip_student_eos:
        student_size = [size - 1 for size in student_size]
    if skip_teacher_eos:
        teacher_size = [size - 1 for size in teacher_size]
    sides = ((student, student_index, student_size, student_temperature),
             (teacher, teacher_index, teacher_size, teacher_temperature))
    for logits, index, sizes, temperature in sides:
        for i in range(logits.size(0)):
            shift, size = index[i], sizes[i]
            logits[i] = torch.cat((
                F.softmax(logits[i, shift:shift + size, :] / temperature, dim=-1),
                torch.zeros_like(logits[i, :(logits.size(1) - size), :])), dim=0)
    longest = max(max(student_size), max(teacher_size))
    student, teacher = student[:, :longest, :], teacher[:, :longest, :]
    student = student.sort(dim=-1, descending=True).values
    teacher = teacher.sort(dim=-1, descending=True).values
    diff_size = student.size(2) - teacher.size(2)
    if diff_size > 0:
        teacher = F.pad(teacher, (0, diff_size), value=0)
    elif diff_size < 0:
        student = F.pad(student, (0, abs(diff_size)), value=0)
    loss = torch.zeros(student.size(0), dtype=DTYPE)
    for i in range(student.size(0)):
        size = min(student_size[i], teacher_size[i])
        loss[i] = abs(student[i][:size] - teacher[i][:size]).sum(-1).mean(-1)
    return loss.mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_transcription_of_the_paper_code(seed):
    # Random prompt and answer lengths on each side, every sample with at least one pair.
    gen = torch.Generator().manual_seed(100 + seed)
    batch, student_length, teacher_length, student_vocab, teacher_vocab = 3, 9, 11, 13, 7
    student_labels = torch.full((batch, student_length), IGN)
    teacher_labels = torch.full((batch, teacher_length), IGN)
    for labels, length, vocab in ((student_labels, student_length, student_vocab),
                                  (teacher_labels, teacher_length, teacher_vocab)):
        for i in range(batch):
            prompt = int(torch.randint(1, length - 3, (1,), generator=gen))
            answer = int(torch.randint(2, length - prompt + 1, (1,), generator=gen))
            labels[i, prompt:prompt + answer] = torch.randint(0, vocab, (answer,), generator=gen)
    student = _logits(batch, student_length, student_vocab, seed=200 + seed)
    teacher = _logits(batch, teacher_length, teacher_vocab, seed=300 + seed)
    options = dict(skip_student_eos=True, skip_teacher_eos=False, student_temperature=1.3,
                   teacher_temperature=0.7)
    _, ce, distillation = uld_distillation_loss_reference(
        student, teacher, student_labels, teacher_labels, **options)
    expected = _paper_code_distillation(student, teacher, student_labels, teacher_labels, **options)
    _close(distillation, expected,
           f"distillation vs the paper's code (student labels {student_labels.tolist()})")
    _close(ce, _expected_crossentropy(student, student_labels, "paper"), "cross-entropy")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(reduction):
    # Autograd flows through softmax, sort and the loop to both logits (no custom backward).
    student = _logits(B, LS, VS, seed=15).requires_grad_(True)
    teacher = _logits(B, LT, VT, seed=16).requires_grad_(True)
    student_labels, teacher_labels = _labels(STUDENT_A), _labels(TEACHER_A)

    def total(s, t):
        return uld_distillation_loss_reference(s, t, student_labels, teacher_labels,
                                               reduction=reduction, student_temperature=1.7)[0]

    # fast_mode: numerical against analytical derivative along random directions (the full
    # Jacobian takes seconds per reduction on a loaded CPU).
    assert torch.autograd.gradcheck(total, (student, teacher), fast_mode=True), (
        f"gradcheck failed ({reduction})")


def test_no_rows_still_backpropagates_the_crossentropy():
    student = _logits(B, LS, VS, seed=17).requires_grad_(True)
    teacher = _logits(B, LT, VT, seed=18)
    total, ce, distillation = uld_distillation_loss_reference(
        student, teacher, _labels(STUDENT_A), _labels([[IGN] * LT] * B))
    _close(distillation, 0.0, "distillation with no rows")
    total.backward()
    expected_grad = torch.autograd.grad(
        _expected_crossentropy(student, _labels(STUDENT_A), "paper"), student)[0]
    torch.testing.assert_close(student.grad, expected_grad, **EXACT,
                               msg=lambda m: f"gradient with no distillation rows: {m}")


# (keyword overrides, argument named in the error): what is wrong
BAD_ARGUMENTS = [
    pytest.param(dict(reduction="mean"), "reduction", id="bad-reduction"),
    pytest.param(dict(alignment="observed"), "alignment", id="bad-alignment"),
    pytest.param(dict(student_labels=torch.full((B, LS - 1), IGN)), "student_labels",
                 id="student-labels-short"),
    pytest.param(dict(teacher_labels=torch.full((B + 1, LT), IGN)), "teacher_labels",
                 id="teacher-labels-batch"),
    pytest.param(dict(student_labels=torch.full((B, LT), IGN)), "student_labels",
                 id="student-labels-with-teacher-length"),
    pytest.param(dict(student_rows=torch.tensor([0, 1])), "teacher_rows",
                 id="student-rows-alone"),
    pytest.param(dict(teacher_rows=torch.tensor([0, 1])), "student_rows",
                 id="teacher-rows-alone"),
    pytest.param(dict(student_rows=torch.tensor([0, 1]), teacher_rows=torch.tensor([0])),
                 "same length", id="rows-lengths-differ"),
    pytest.param(dict(student_rows=torch.tensor([0, B * LS]), teacher_rows=torch.tensor([0, 1])),
                 "student_rows", id="student-rows-out-of-range"),
    pytest.param(dict(student_rows=torch.tensor([0]), teacher_rows=torch.tensor([0]),
                      row_weights=torch.ones(2, dtype=DTYPE)), "row_weights",
                 id="row-weights-length"),
    pytest.param(dict(student_vocab_size=VS + 1), "student_vocab_size", id="vocab-size-too-big"),
    pytest.param(dict(num_items_in_batch=0), "num_items_in_batch", id="num-items-zero"),
]


@pytest.mark.parametrize("overrides, named", BAD_ARGUMENTS)
def test_bad_arguments_raise_value_errors_naming_them(overrides, named):
    arguments = dict(student_logits=_logits(B, LS, VS, seed=19),
                     teacher_logits=_logits(B, LT, VT, seed=20),
                     student_labels=_labels(STUDENT_A), teacher_labels=_labels(TEACHER_A))
    arguments.update(overrides)
    positional = [arguments.pop(name) for name in
                  ("student_logits", "teacher_logits", "student_labels", "teacher_labels")]
    with pytest.raises(ValueError, match=named):
        uld_distillation_loss_reference(*positional, **arguments)
