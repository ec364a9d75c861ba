"""Properties of the PyTorch reference, the oracle every kernel test trusts.

Everything runs in float64 on fresh random logits (a fixed seed per test). The properties are
those of ``shared/design/uld-math.md``: ``0 <= L <= 2``, ``L = 0`` when the sorted
probabilities agree, invariance to permuting either vocabulary, symmetry in student and
teacher; plus hand-computed values, temperatures, reductions, ``gradcheck`` and ``-inf``
logits acting as zero padding.
"""

import math

import pytest
import torch

from reference import uld_loss_reference, uld_row_losses_reference

DTYPE = torch.float64
# float64 sums of at most a few hundred terms of size <= 1: rounding stays far below this.
EXACT = dict(atol=1e-12, rtol=0.0)


def _logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    """Fresh N(0, scale^2) float64 logits ``[rows, vocab]``; different seeds, different rows."""
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(rows, vocab, generator=gen, dtype=DTYPE)


def _row_perms(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """One independent random permutation of ``range(vocab)`` per row, ``[rows, vocab]``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(vocab, generator=gen) for _ in range(rows)])


def _probs(values) -> torch.Tensor:
    return torch.tensor(values, dtype=DTYPE)


def _loss1(student, teacher, student_temperature=1.0, teacher_temperature=1.0) -> float:
    """Loss of one row given as 1-D logits."""
    return uld_row_losses_reference(
        student[None, :], teacher[None, :], student_temperature, teacher_temperature
    ).item()


# (rows, Vs, Vt, logit scale): reason
SHAPES = [
    pytest.param(4, 7, 7, 3.0, id="same-vocab"),  # the common Vs == Vt path
    pytest.param(4, 5, 11, 3.0, id="student-smaller"),  # student side zero-padded
    pytest.param(4, 11, 5, 3.0, id="student-larger"),  # teacher side zero-padded
    pytest.param(3, 1, 1, 3.0, id="both-V1"),  # softmax of one logit is exactly 1 on both sides
    pytest.param(3, 1, 9, 3.0, id="student-V1"),  # one-hot student against a spread teacher
    pytest.param(3, 9, 1, 3.0, id="teacher-V1"),  # the mirror image
    pytest.param(2, 257, 130, 3.0, id="prime-vs-npot"),  # prime and non-power-of-two vocabularies
    pytest.param(4, 64, 3, 30.0, id="peaked"),  # near one-hot rows: losses close to the bound 2
]


@pytest.mark.parametrize("rows, student_vocab, teacher_vocab, scale", SHAPES)
def test_loss_is_between_0_and_2(rows, student_vocab, teacher_vocab, scale):
    student = _logits(rows, student_vocab, seed=1, scale=scale)
    teacher = _logits(rows, teacher_vocab, seed=2, scale=scale)
    loss = uld_row_losses_reference(student, teacher)
    assert loss.shape == (rows,), f"row losses have shape {tuple(loss.shape)}, expected ({rows},)"
    assert loss.dtype == DTYPE, f"row losses are {loss.dtype}, expected {DTYPE}"
    assert torch.isfinite(loss).all(), f"non-finite row losses: {loss}"
    assert (loss >= 0).all() and (loss <= 2).all(), f"row losses outside [0, 2]: {loss}"
    # Independent form: |x - y| = x + y - 2 min(x, y) and each side sums to 1, so
    # L = 2 - 2 * sum_k min(a_(k), b_(k)) on the sorted, zero-padded vectors.
    vocab = max(student_vocab, teacher_vocab)
    a = torch.softmax(student, -1).sort(-1, descending=True).values
    b = torch.softmax(teacher, -1).sort(-1, descending=True).values
    a = torch.nn.functional.pad(a, (0, vocab - student_vocab))
    b = torch.nn.functional.pad(b, (0, vocab - teacher_vocab))
    overlap_form = 2.0 - 2.0 * a.minimum(b).sum(-1)
    torch.testing.assert_close(loss, overlap_form, **EXACT,
                               msg=lambda m: f"L differs from 2 - 2 * sum min(a_(k), b_(k))\n{m}")


@pytest.mark.parametrize(
    "student_vocab, teacher_vocab",
    [
        pytest.param(1, 4, id="V1-vs-4"),  # 2 - 2/4 = 1.5: a small uniform teacher
        pytest.param(1, 1000, id="V1-vs-1000"),  # 2 - 2/1000: the bound 2 is approached
    ],
)
def test_loss_approaches_2_for_one_hot_against_uniform(student_vocab, teacher_vocab):
    # a = [1, 0, ..., 0], b = [1/V, ..., 1/V]: |1 - 1/V| + (V - 1) * 1/V = 2 - 2/V.
    student = torch.full((1, student_vocab), 0.7, dtype=DTYPE)
    teacher = torch.full((1, teacher_vocab), -1.3, dtype=DTYPE)
    expected = 2.0 - 2.0 / teacher_vocab
    loss = uld_row_losses_reference(student, teacher).item()
    assert math.isclose(loss, expected, abs_tol=1e-12), f"loss {loss}, expected {expected}"


# (case, rows, vocab): reason
ZERO_CASES = [
    pytest.param("identical", 4, 13, id="identical"),  # the same softmax, bit for bit
    pytest.param("uniform", 3, 6, id="uniform"),  # equal logits (the one constant case): uniform
    pytest.param("permuted", 4, 13, id="permuted"),  # the same multiset of probabilities
    pytest.param("shifted", 4, 13, id="shifted"),  # a constant per row that softmax does not see
    pytest.param("permuted-shifted", 2, 1000, id="permuted-shifted-V1000"),  # both, longer rows
]


@pytest.mark.parametrize("case, rows, vocab", ZERO_CASES)
def test_loss_is_zero_when_sorted_probabilities_agree(case, rows, vocab):
    student = _logits(rows, vocab, seed=3)
    perm = _row_perms(rows, vocab, seed=4)
    if case == "identical":
        teacher = student.clone()
    elif case == "uniform":
        student = torch.full((rows, vocab), 2.5, dtype=DTYPE)
        teacher = torch.full((rows, vocab), -0.5, dtype=DTYPE)
    elif case == "permuted":
        teacher = student.gather(-1, perm)
    elif case == "shifted":
        teacher = student + torch.arange(1.0, rows + 1.0, dtype=DTYPE)[:, None]
    else:
        teacher = student.gather(-1, perm) - 7.0
    loss = uld_row_losses_reference(student, teacher)
    torch.testing.assert_close(loss, torch.zeros(rows, dtype=DTYPE), **EXACT,
                               msg=lambda m: f"{case}: loss not 0 for matching rows\n{m}")
    # Control: the same student against an unrelated teacher is far from 0, so the check bites.
    other = uld_row_losses_reference(student, _logits(rows, vocab, seed=5))
    assert (other > 1e-3).all(), f"unrelated teacher gave a near-zero loss: {other}"


@pytest.mark.parametrize(
    "rows, student_vocab, teacher_vocab, side",
    [
        pytest.param(4, 9, 9, "student", id="same-vocab-student"),  # permute the student only
        pytest.param(4, 9, 9, "teacher", id="same-vocab-teacher"),  # permute the teacher only
        pytest.param(4, 6, 17, "both", id="student-smaller-both"),  # both, with padding
        pytest.param(4, 17, 6, "student", id="student-larger-student"),  # padded teacher side
        pytest.param(2, 257, 130, "teacher", id="prime-teacher"),  # longer rows
    ],
)
def test_loss_is_invariant_to_permuting_either_vocabulary(rows, student_vocab, teacher_vocab, side):
    student = _logits(rows, student_vocab, seed=6)
    teacher = _logits(rows, teacher_vocab, seed=7)
    base = uld_row_losses_reference(student, teacher, 1.5, 0.75)
    if side in ("student", "both"):
        student = student.gather(-1, _row_perms(rows, student_vocab, seed=8))
    if side in ("teacher", "both"):
        teacher = teacher.gather(-1, _row_perms(rows, teacher_vocab, seed=9))
    permuted = uld_row_losses_reference(student, teacher, 1.5, 0.75)
    torch.testing.assert_close(permuted, base, **EXACT,
                               msg=lambda m: f"permuting the {side} vocabulary changed L\n{m}")
    assert (base > 1e-3).all(), f"degenerate inputs (near-zero loss) make this test vacuous: {base}"


@pytest.mark.parametrize(
    "rows, student_vocab, teacher_vocab, student_temperature, teacher_temperature",
    [
        pytest.param(4, 8, 8, 1.0, 1.0, id="same-vocab"),  # plain swap
        pytest.param(4, 5, 12, 2.0, 0.5, id="student-smaller"),  # padding and temperatures move too
        pytest.param(4, 12, 5, 0.3, 4.0, id="student-larger"),  # the mirror image
        pytest.param(3, 1, 7, 1.0, 3.0, id="V1"),  # one-entry vocabulary on one side
    ],
)
def test_loss_is_symmetric(rows, student_vocab, teacher_vocab, student_temperature,
                           teacher_temperature):
    student = _logits(rows, student_vocab, seed=10)
    teacher = _logits(rows, teacher_vocab, seed=11)
    forward = uld_row_losses_reference(student, teacher, student_temperature, teacher_temperature)
    swapped = uld_row_losses_reference(teacher, student, teacher_temperature, student_temperature)
    torch.testing.assert_close(swapped, forward, **EXACT,
                               msg=lambda m: f"swapping student and teacher changed the loss\n{m}")


NEG_INF = float("-inf")

# (student logits, teacher logits, T_s, T_t, expected loss): reason and arithmetic
HAND_CASES = [
    # a = [.5, .3, .2], b = [.6, .4, 0] (padded): |.5-.6| + |.3-.4| + |.2-0| = .1 + .1 + .2 = 0.4
    pytest.param(_probs([0.5, 0.3, 0.2]).log(), _probs([0.6, 0.4]).log(), 1.0, 1.0, 0.4,
                 id="brief-example"),
    # a = [1, 0] (padded), b = [.5, .5]: |1-.5| + |0-.5| = 0.5 + 0.5 = 1.0
    pytest.param(_probs([1.7]), _probs([-0.3, -0.3]), 1.0, 1.0, 1.0, id="V1-vs-uniform2"),
    # unsorted input: a sorted = [.6, .3, .1, 0], b = [.25] * 4:
    # |.6-.25| + |.3-.25| + |.1-.25| + |0-.25| = .35 + .05 + .15 + .25 = 0.8
    pytest.param(_probs([0.1, 0.6, 0.3]).log(), _probs([0.25] * 4).log(), 1.0, 1.0, 0.8,
                 id="unsorted-vs-uniform4"),
    # teacher larger and uneven: a = [.7, .3, 0, 0], b sorted = [.4, .3, .2, .1]:
    # |.7-.4| + |.3-.3| + |0-.2| + |0-.1| = .3 + 0 + .2 + .1 = 0.6
    pytest.param(_probs([0.3, 0.7]).log(), _probs([0.1, 0.4, 0.2, 0.3]).log(), 1.0, 1.0, 0.6,
                 id="teacher-larger-uneven"),
    # temperature: softmax(2 log p / 2) = p, so a = [.75, .25]; b = [.5, .5]:
    # |.75-.5| + |.25-.5| = .25 + .25 = 0.5
    pytest.param(2 * _probs([0.25, 0.75]).log(), _probs([0.5, 0.5]).log(), 2.0, 1.0, 0.5,
                 id="student-temperature-2"),
    # teacher temperature 1/2: softmax(log([.5, .25, .25]) / .5) is proportional to
    # [.25, .0625, .0625], i.e. [2/3, 1/6, 1/6];
    # a = [.5, .5, 0]: |.5 - 2/3| + |.5 - 1/6| + |0 - 1/6| = 1/6 + 2/6 + 1/6 = 2/3
    pytest.param(_probs([0.5, 0.5]).log(), _probs([0.5, 0.25, 0.25]).log(), 1.0, 0.5, 2.0 / 3.0,
                 id="teacher-temperature-half"),
    # -inf logits are probability 0: a = [.5, .5, 0], b = [1, 0, 0]: .5 + .5 = 1.0
    pytest.param(torch.tensor([math.log(0.5), NEG_INF, math.log(0.5)], dtype=DTYPE),
                 _probs([4.0]), 1.0, 1.0, 1.0, id="neg-inf-student"),
]


@pytest.mark.parametrize("student, teacher, student_temperature, teacher_temperature, expected",
                         HAND_CASES)
def test_hand_computed_cases(student, teacher, student_temperature, teacher_temperature, expected):
    loss = _loss1(student, teacher, student_temperature, teacher_temperature)
    assert math.isclose(loss, expected, abs_tol=1e-12), f"loss {loss!r}, expected {expected!r}"
    # Swapping sides must give the same hand value.
    swapped = _loss1(teacher, student, teacher_temperature, student_temperature)
    assert math.isclose(swapped, expected, abs_tol=1e-12), (
        f"swapped {swapped!r}, expected {expected!r}")


# (T_s, T_t): reason
TEMPERATURES = [
    pytest.param(2.0, 1.0, id="student-hot"),  # only the student is softened
    pytest.param(1.0, 0.25, id="teacher-cold"),  # only the teacher is sharpened
    pytest.param(0.5, 3.0, id="both"),  # different temperatures on the two sides
    pytest.param(7.0, 7.0, id="equal-large"),  # the usual distillation setting, large T
]


@pytest.mark.parametrize("student_temperature, teacher_temperature", TEMPERATURES)
def test_temperature_equals_scaled_logits(student_temperature, teacher_temperature):
    student = _logits(4, 11, seed=12)
    teacher = _logits(4, 6, seed=13)
    tempered = uld_row_losses_reference(student, teacher, student_temperature, teacher_temperature)
    scaled = uld_row_losses_reference(student / student_temperature, teacher / teacher_temperature)
    torch.testing.assert_close(tempered, scaled, **EXACT,
                               msg=lambda m: f"temperature T differs from logits / T\n{m}")
    # Only the ratio z / T matters: scaling logits and temperature together changes nothing.
    rescaled = uld_row_losses_reference(
        3.0 * student, 5.0 * teacher, 3.0 * student_temperature, 5.0 * teacher_temperature
    )
    torch.testing.assert_close(rescaled, tempered, **EXACT,
                               msg=lambda m: f"(c z, c T) differs from (z, T)\n{m}")
    # Control: the temperature is not ignored.
    plain = uld_row_losses_reference(student, teacher)
    assert (tempered - plain).abs().max() > 1e-3, "temperatures had no effect on the loss"


@pytest.mark.parametrize(
    "rows, student_vocab, teacher_vocab",
    [
        pytest.param(1, 7, 7, id="one-row"),  # mean == sum == the only row
        pytest.param(5, 9, 4, id="student-larger"),  # several rows, padding
        pytest.param(6, 3, 10, id="student-smaller"),
    ],
)
def test_reductions_agree(rows, student_vocab, teacher_vocab):
    student = _logits(rows, student_vocab, seed=14)
    teacher = _logits(rows, teacher_vocab, seed=15)
    kwargs = dict(student_temperature=1.3, teacher_temperature=0.8)
    row_losses = uld_row_losses_reference(student, teacher, 1.3, 0.8)
    none = uld_loss_reference(student, teacher, reduction="none", **kwargs)
    total = uld_loss_reference(student, teacher, reduction="sum", **kwargs)
    mean = uld_loss_reference(student, teacher, reduction="mean", **kwargs)
    default = uld_loss_reference(student, teacher, **kwargs)
    assert none.shape == (rows,), f"'none' gave shape {tuple(none.shape)}, expected ({rows},)"
    assert total.shape == () and mean.shape == (), (
        f"scalar reductions gave shapes {total.shape}, {mean.shape}")
    torch.testing.assert_close(none, row_losses, **EXACT)
    torch.testing.assert_close(total, row_losses.sum(), **EXACT)
    torch.testing.assert_close(mean, total / rows, **EXACT)
    torch.testing.assert_close(default, mean, **EXACT, msg="the default reduction is not 'mean'")
    # Distinct rows, so 'none' is not secretly a broadcast scalar.
    assert row_losses.unique().numel() == rows, f"rows collided: {row_losses}"


@pytest.mark.parametrize(
    "reduction",
    [
        pytest.param("avg", id="avg"),  # a plausible but unsupported name
        pytest.param("Mean", id="wrong-case"),  # names are case-sensitive
        pytest.param("", id="empty"),
        pytest.param(None, id="none-object"),  # None is not the string 'none'
    ],
)
def test_invalid_reduction_raises(reduction):
    student = _logits(2, 5, seed=16)
    teacher = _logits(2, 5, seed=17)
    with pytest.raises(ValueError, match="reduction"):
        uld_loss_reference(student, teacher, reduction=reduction)


def _tie_free_pair(rows, student_vocab, teacher_vocab, student_temperature, teacher_temperature,
                   seed, margin=1e-3):
    """Logits whose sorted probabilities have no near-ties within a side and no near-equal
    a_(k), b_(k) at any shared rank, so the loss is smooth around them (gradcheck's finite
    differences stay on one branch of every sort and every |.|)."""
    for attempt in range(200):
        student = _logits(rows, student_vocab, seed=seed + 1000 * attempt, scale=1.5)
        teacher = _logits(rows, teacher_vocab, seed=seed + 1000 * attempt + 1, scale=1.5)
        a = torch.softmax(student / student_temperature, -1).sort(-1, descending=True).values
        b = torch.softmax(teacher / teacher_temperature, -1).sort(-1, descending=True).values
        shared = min(student_vocab, teacher_vocab)
        gaps = [(a[:, :-1] - a[:, 1:]).flatten(), (b[:, :-1] - b[:, 1:]).flatten(),
                (a[:, :shared] - b[:, :shared]).abs().flatten()]
        if all(g.numel() == 0 or g.min() > margin for g in gaps):
            return student, teacher
    raise AssertionError("no tie-free inputs found; change the seed")


@pytest.mark.parametrize(
    "rows, student_vocab, teacher_vocab, student_temperature, teacher_temperature",
    [
        pytest.param(2, 5, 5, 1.0, 1.0, id="same-vocab"),
        pytest.param(2, 4, 7, 2.0, 0.7, id="student-smaller"),  # padded student ranks
        pytest.param(2, 7, 3, 0.6, 1.5, id="student-larger"),  # padded teacher ranks
        pytest.param(2, 1, 4, 1.0, 1.0, id="student-V1"),  # constant softmax: zero gradient
    ],
)
@pytest.mark.parametrize(
    "student_grad, teacher_grad",
    [
        pytest.param(True, False, id="student"),  # the usual case: frozen teacher
        pytest.param(False, True, id="teacher"),
        pytest.param(True, True, id="both"),
    ],
)
def test_gradcheck(rows, student_vocab, teacher_vocab, student_temperature, teacher_temperature,
                   student_grad, teacher_grad):
    student, teacher = _tie_free_pair(rows, student_vocab, teacher_vocab, student_temperature,
                                      teacher_temperature, seed=18)
    student.requires_grad_(student_grad)
    teacher.requires_grad_(teacher_grad)
    assert torch.autograd.gradcheck(
        lambda s, t: uld_row_losses_reference(s, t, student_temperature, teacher_temperature),
        (student, teacher),
        eps=1e-6, atol=1e-6, rtol=1e-4,
    )


# (side, vocab, indices set to -inf): reason
NEG_INF_CASES = [
    pytest.param("student", 8, [0], id="student-first"),  # -inf at the start of the row
    pytest.param("student", 8, [3, 5], id="student-middle"),  # scattered -inf
    pytest.param("student", 8, [7], id="student-last"),  # -inf at the end
    pytest.param("student", 8, [0, 1, 3, 4, 5, 6, 7], id="student-all-but-one"),  # acts as V = 1
    pytest.param("teacher", 9, [2, 4, 6], id="teacher-middle"),  # the teacher side too
    pytest.param("teacher", 130, list(range(0, 130, 2)), id="teacher-half"),  # half of a long row
]


@pytest.mark.parametrize("side, vocab, masked", NEG_INF_CASES)
def test_neg_inf_logits_equal_removed_entries(side, vocab, masked):
    other_vocab = 6
    row = _logits(3, vocab, seed=19)
    other = _logits(3, other_vocab, seed=20)
    keep = [i for i in range(vocab) if i not in set(masked)]
    with_inf = row.clone()
    with_inf[:, masked] = NEG_INF
    removed = row[:, keep]
    if side == "student":
        got = uld_row_losses_reference(with_inf, other, 1.2, 0.9)
        expected = uld_row_losses_reference(removed, other, 1.2, 0.9)
        unmasked = uld_row_losses_reference(row, other, 1.2, 0.9)
    else:
        got = uld_row_losses_reference(other, with_inf, 1.2, 0.9)
        expected = uld_row_losses_reference(other, removed, 1.2, 0.9)
        unmasked = uld_row_losses_reference(other, row, 1.2, 0.9)
    assert torch.isfinite(got).all(), f"-inf logits gave non-finite losses: {got}"
    torch.testing.assert_close(got, expected, **EXACT,
                               msg=lambda m: f"-inf {side} logits differ from removing them\n{m}")
    # Control: masking changed the distribution, so the comparison is not trivially equal.
    assert (got - unmasked).abs().max() > 1e-3, "masking entries had no effect on the loss"
