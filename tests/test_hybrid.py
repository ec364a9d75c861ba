"""Hybrid ULD (uld_kernels/hybrid.py) against the float64 reference
(reference.uld.uld_hybrid_row_losses_reference): losses and both gradients, TRL's and NeMo's
settings, the shared tokens from vocabularies, bad arguments; and as the training loss's row
loss (``ULDLoss(hybrid=...)``) against reference/paper.py."""

from __future__ import annotations

import math

import pytest
import torch

import uld_kernels.hybrid as hybrid
from reference.paper import uld_distillation_loss_reference
from reference.uld import uld_hybrid_row_losses_reference, uld_row_losses_reference
from tests.helpers import assert_grads_close, assert_losses_close
from tests.test_distill import _assert_matches_the_papers_semantics, _batch
from uld_kernels import HybridULD, ULDLoss, VocabMatch, uld_distillation_loss, uld_loss_hybrid


def _inputs(seed, n, vs, vt, k, device, dtype=torch.float32, scale=2.0):
    """Rows ``[n, vs]`` / ``[n, vt]`` and ``k`` shared tokens at random columns of each side."""
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, vs, generator=g) * scale).to(dtype).to(device)
    teacher = (torch.randn(n, vt, generator=g) * scale).to(dtype).to(device)
    match = VocabMatch(torch.randperm(vs, generator=g)[:k], torch.randperm(vt, generator=g)[:k])
    return student, teacher, match


# (name, options): TRL's defaults; TRL's forward KL (beta 0) on peaked rows, where matched
# probabilities fall under its floor of 1e-8; NeMo's gold loss (T applied, T**2 left to the
# caller); reverse KL with fixed weights; a teacher larger than the student; one shared token.
CASES = [
    ("trl", dict(vs=60, vt=45, k=20, options={})),
    ("trl-kl-peaked", dict(vs=60, vt=45, k=20, options=dict(beta=0.0), scale=8.0)),
    ("nemo", dict(vs=50, vt=70, k=25, options=dict(beta=0.0, matched_weight=1.0, unmatched_weight=1.0,
                                                    unmatched_top=8, prob_floor=0.0,
                                                    student_temperature=2.0, teacher_temperature=2.0))),
    ("reverse", dict(vs=40, vt=40, k=30, options=dict(beta=1.0, matched_weight=0.3, unmatched_weight=0.7))),
    ("jsd-0.9-top-past-the-rows", dict(vs=33, vt=47, k=10, options=dict(beta=0.9, unmatched_top=1000,
                                                                        student_temperature=0.7))),
    ("one-shared", dict(vs=30, vt=20, k=1, options=dict(beta=0.25))),
]


def _reference(student, teacher, match, options, upstream):
    """The float64 reference's rows and both gradients of ``sum(rows * upstream)``."""
    s64 = student.detach().double().cpu().requires_grad_(True)
    t64 = teacher.detach().double().cpu().requires_grad_(True)
    rows = uld_hybrid_row_losses_reference(s64, t64, match.student_ids, match.teacher_ids, **options)
    (rows * upstream.double().cpu()).sum().backward()
    return rows.detach(), s64.grad, t64.grad


@pytest.mark.parametrize("name, case", CASES, ids=[c[0] for c in CASES])
def test_matches_the_reference(name, case, device):
    student, teacher, match = _inputs(len(name), 5, case["vs"], case["vt"], case["k"], device,
                                      scale=case.get("scale", 2.0))
    if name == "trl-kl-peaked":  # the floor is reached on both sides
        for logits, ids in ((student, match.student_ids), (teacher, match.teacher_ids)):
            assert (logits.softmax(dim=-1)[:, ids.to(device)] < 1e-8).any()
    s_in, t_in = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    rows = uld_loss_hybrid(s_in, t_in, match, reduction="none", **case["options"])
    upstream = torch.linspace(0.5, 2.0, 5, device=device)
    (rows * upstream).sum().backward()
    ref, s_grad, t_grad = _reference(student, teacher, match, case["options"], upstream)
    assert rows.shape == (5,) and rows.dtype == torch.float32
    assert_losses_close(rows, ref, torch.float32)
    assert_grads_close(s_in.grad, s_grad, student, torch.float32, what="student gradient")
    assert_grads_close(t_in.grad, t_grad, teacher, torch.float32, what="teacher gradient")


@pytest.mark.parametrize("floor", [0.0, 1e-8])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_minus_inf_logits(beta, floor, device):
    """``-inf`` logits (a masked vocabulary): at a shared token on both sides and at other
    columns of either side. Without a floor, probabilities of 0 add 0 (a NaN used to reach the
    gradient through ``where``); with TRL's, they are the floor (the plain forms). Losses and
    gradients finite and the reference's."""
    student, teacher, match = _inputs(21, 4, 40, 36, 12, device)
    student[:, match.student_ids[:3].to(device)] = float("-inf")
    teacher[:, match.teacher_ids[:3].to(device)] = float("-inf")
    rest_s = [c for c in range(40) if c not in match.student_ids.tolist()][:4]
    rest_t = [c for c in range(36) if c not in match.teacher_ids.tolist()][:5]
    student[:, rest_s], teacher[:, rest_t] = float("-inf"), float("-inf")
    options = dict(beta=beta, prob_floor=floor)
    s_in, t_in = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    rows = uld_loss_hybrid(s_in, t_in, match, reduction="none", **options)
    rows.sum().backward()
    ref, s_grad, t_grad = _reference(student, teacher, match, options, torch.ones(4))
    assert torch.isfinite(rows).all() and torch.isfinite(s_in.grad).all() and torch.isfinite(t_in.grad).all()
    assert torch.isfinite(s_grad).all() and torch.isfinite(t_grad).all()
    assert_losses_close(rows, ref, torch.float32)
    finite_s, finite_t = torch.isfinite(student), torch.isfinite(teacher)
    assert_grads_close(s_in.grad[finite_s], s_grad[finite_s.cpu()], student[finite_s], torch.float32,
                       what="student gradient")
    assert_grads_close(t_in.grad[finite_t], t_grad[finite_t.cpu()], teacher[finite_t], torch.float32,
                       what="teacher gradient")
    assert (s_in.grad[~finite_s] == 0).all() and (t_in.grad[~finite_t] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_sixteen_bit_rows(dtype, device):
    """bf16 / fp16 logits (ties the rule): losses to float32 rounding, gradients per tie group,
    in the logits' dtype."""
    student, teacher, match = _inputs(3, 4, 70, 50, 15, device, dtype)
    s_in, t_in = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    uld_loss_hybrid(s_in, t_in, match, reduction="sum").backward()
    ref, s_grad, t_grad = _reference(student, teacher, match, {}, torch.ones(4))
    assert s_in.grad.dtype == dtype and t_in.grad.dtype == dtype
    assert_losses_close(uld_loss_hybrid(student, teacher, match, reduction="none"), ref, torch.float32)
    assert_grads_close(s_in.grad, s_grad, student, dtype, what="student gradient")
    assert_grads_close(t_in.grad, t_grad, teacher, dtype, what="teacher gradient")


def test_the_reference_by_hand():
    """One row of two columns a side: a = (1/2, 1/2), b = (3/4, 1/4); the student's column 0 is
    the teacher's column 1. KL(teacher || student) on it: 1/4 ln(1/4 / 1/2); the rest: |1/2 -
    3/4|; TRL's weights 1/2 and 1/2."""
    student = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    teacher = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    rows = uld_hybrid_row_losses_reference(student, teacher, torch.tensor([0]), torch.tensor([1]), beta=0.0)
    want = 0.5 * (0.25 * math.log(0.5)) + 0.5 * 0.25
    assert abs(rows.item() - want) < 1e-15, (rows.item(), want)
    jsd = uld_hybrid_row_losses_reference(student, teacher, torch.tensor([0]), torch.tensor([1]), beta=0.5)
    mix = 0.5 * 0.25 + 0.5 * 0.5
    want = 0.5 * (0.5 * 0.25 * math.log(0.25 / mix) + 0.5 * 0.5 * math.log(0.5 / mix)) + 0.5 * 0.25
    assert abs(jsd.item() - want) < 1e-15, (jsd.item(), want)


def test_nothing_shared_is_the_exact_loss(device):
    """No shared token: TRL's adaptive weights give the unmatched part alone, ULD itself."""
    student, teacher, _ = _inputs(4, 6, 40, 55, 0, device)
    none = VocabMatch(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    rows = uld_loss_hybrid(student, teacher, none, reduction="none")
    assert_losses_close(rows, uld_row_losses_reference(student.double(), teacher.double()), torch.float32)


def test_chunks_change_nothing(device, monkeypatch):
    """Rows split into chunks of one give the same losses and gradients, bit for bit: rows
    are independent."""
    student, teacher, match = _inputs(5, 7, 64, 48, 12, device)
    results = []
    for chunk_bytes in (hybrid.CHUNK_BYTES, 1):
        monkeypatch.setattr(hybrid, "CHUNK_BYTES", chunk_bytes)
        s_in, t_in = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
        rows = uld_loss_hybrid(s_in, t_in, match, reduction="none")
        (rows * torch.arange(1.0, 8.0, device=device)).sum().backward()
        results.append((rows.detach(), s_in.grad, t_in.grad))
    for one, chunked in zip(*results):
        torch.testing.assert_close(chunked, one, atol=0, rtol=0)


@pytest.mark.parametrize("per_row", [False, True])
def test_the_upstream_scaling_without_the_kernel(per_row, device, monkeypatch):
    """``_scale_rows_`` by PyTorch (a CPU tensor without the interpreter) equals the
    ``scale_rows_`` kernel's (on the device: the GPU, or the interpreter), bit for bit, one
    factor or one a row. float32: the interpreter rounds float32 to bf16 toward zero, PyTorch
    and the GPU to nearest."""
    g = torch.Generator().manual_seed(8)
    grad = torch.randn(6, 50, generator=g)
    scale = torch.linspace(0.5, 3.0, 6) if per_row else torch.tensor(0.37)
    on_device = grad.clone().to(device)
    hybrid._scale_rows_(on_device, scale.to(device))
    monkeypatch.setattr(hybrid.launch, "interpreter_enabled", lambda: False)
    on_cpu = grad.clone()
    hybrid._scale_rows_(on_cpu, scale)
    torch.testing.assert_close(on_cpu, on_device.cpu(), atol=0, rtol=0)
    assert not torch.equal(on_cpu, grad)


def test_fp16_mean_under_a_loss_scale(device):
    """fp16 logits, ``"mean"`` over 2,048 rows, upstream 65,536 (a GradScaler's): the saved
    gradient is each row's own (the 1 / N goes into the backward's factor), so no entry the
    reference puts above 1e-3 flushes to 0 (folding 1 / N in first, thousands did)."""
    student, teacher, match = _inputs(31, 2048, 64, 48, 16, device, torch.float16)
    s_in = student.clone().requires_grad_(True)
    (uld_loss_hybrid(s_in, teacher, match) * 65536.0).backward()
    _, s_grad, _ = _reference(student, teacher, match, {}, torch.full((2048,), 65536.0 / 2048))
    large = s_grad.abs() > 1e-3
    assert (s_in.grad.cpu()[large] != 0).all(), int((s_in.grad.cpu()[large] == 0).sum())
    assert_grads_close(s_in.grad, s_grad, student, torch.float16)


def test_a_second_backward_raises(device):
    """The saved gradient is scaled in place: a second backward through one graph raises."""
    student, teacher, match = _inputs(8, 6, 50, 40, 10, device)
    loss = uld_loss_hybrid(student.clone().requires_grad_(True), teacher, match)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def _spy_needs(monkeypatch):
    """Record the ``needs`` each `hybrid.hybrid_forward` call gets."""
    calls, real = [], hybrid.hybrid_forward

    def spy(*args, **kwargs):
        calls.append(list(args[5]))
        return real(*args, **kwargs)

    monkeypatch.setattr(hybrid, "hybrid_forward", spy)
    return calls


def test_no_grad_computes_no_gradient(device, monkeypatch):
    """Under torch.no_grad() the loss is the same, and no gradient is computed: neither side
    is asked for, and autograd is never called."""
    student, teacher, match = _inputs(9, 4, 30, 30, 6, device)
    want = uld_loss_hybrid(student, teacher, match)
    calls = _spy_needs(monkeypatch)
    monkeypatch.setattr(hybrid.torch.autograd, "grad", lambda *a, **k: pytest.fail("autograd.grad called"))
    s_in = student.clone().requires_grad_(True)
    with torch.no_grad():
        loss = uld_loss_hybrid(s_in, teacher, match)
    assert not loss.requires_grad and calls == [[False, False]]
    torch.testing.assert_close(loss, want, atol=0, rtol=0)


def test_reductions_and_only_the_sides_asked_for(device, monkeypatch):
    student, teacher, match = _inputs(6, 5, 30, 30, 8, device)
    rows = uld_loss_hybrid(student, teacher, match, reduction="none")
    assert_losses_close(uld_loss_hybrid(student, teacher, match), rows.mean(), torch.float32)
    assert_losses_close(uld_loss_hybrid(student, teacher, match, reduction="sum"), rows.sum(), torch.float32)
    calls = _spy_needs(monkeypatch)
    s_in = student.clone().requires_grad_(True)
    uld_loss_hybrid(s_in, teacher, match).backward()
    assert calls == [[True, False]] and s_in.grad.abs().sum() > 0


def test_a_side_without_other_columns_has_no_unmatched_term(device):
    """Every student column shared (the student's vocabulary inside the teacher's): TRL skips
    the unmatched term, so the loss is the matched part alone; then, every column of both
    shared, a NaN row stays NaN (not dropped with the absent probabilities)."""
    g = torch.Generator().manual_seed(30)
    student = torch.randn(2, 6, generator=g).to(device)
    teacher = torch.randn(2, 9, generator=g).to(device)
    match = VocabMatch(torch.randperm(6, generator=g), torch.randperm(9, generator=g)[:6])
    rows = uld_loss_hybrid(student, teacher, match, reduction="none", matched_weight=0.5, unmatched_weight=2.0)
    matched_only = uld_loss_hybrid(student, teacher, match, reduction="none", matched_weight=0.5,
                                   unmatched_weight=0.0)
    torch.testing.assert_close(rows, matched_only, atol=0, rtol=0)
    ref, _, _ = _reference(student, teacher, match, dict(matched_weight=0.5, unmatched_weight=2.0), torch.ones(2))
    assert_losses_close(rows, ref, torch.float32)
    same = VocabMatch(torch.arange(6), torch.arange(6))
    teacher6 = teacher[:, :6].clone()
    teacher6[1, 2] = float("nan")
    for beta in (0.0, 1.0):
        rows = uld_loss_hybrid(student, teacher6, same, reduction="none", beta=beta)
        assert torch.isfinite(rows[0]) and torch.isnan(rows[1]), (beta, rows)


def test_shared_tokens_from_vocabularies():
    """TRL's rule: equal strings, special tokens included, no normalization; by teacher id;
    one id of two strings (an added token over a base one): its first pair kept."""
    class Tokenizer:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return dict(self.vocab)

    student = {"a": 0, "\u0120b": 1, "<eos>": 2, "c": 3, "d": 4}
    teacher = {"d": 0, "\u2581b": 1, "c": 2, "<eos>": 3, "a": 4, "x": 5}
    for s, t in ((student, teacher), (Tokenizer(student), Tokenizer(teacher))):
        match = VocabMatch.from_vocabs(s, t)
        assert match.teacher_ids.tolist() == [0, 2, 3, 4]
        assert match.student_ids.tolist() == [4, 3, 2, 0]
        assert len(match) == 4 and match.student_vocab == 5 and match.teacher_vocab == 5
    aliased = VocabMatch.from_vocabs({"a": 0, "b": 0, "c": 1}, {"a": 2, "b": 3, "c": 0})
    assert aliased.teacher_ids.tolist() == [0, 2] and aliased.student_ids.tolist() == [1, 0]


@pytest.mark.parametrize("ids, error, message", [
    ((torch.tensor([0, 1]), torch.tensor([0])), ValueError, "must pair up"),
    ((torch.tensor([0, 0]), torch.tensor([0, 1])), ValueError, "student_ids must be distinct"),
    ((torch.tensor([0, 1]), torch.tensor([-1, 1])), ValueError, "teacher_ids must be >= 0"),
    ((torch.tensor([0.0]), torch.tensor([0])), TypeError, "student_ids must be a 1-D int32 or int64"),
    ((torch.tensor([[0]]), torch.tensor([0])), TypeError, "student_ids must be a 1-D"),
])
def test_bad_matches(ids, error, message):
    with pytest.raises(error, match=message):
        VocabMatch(*ids)


@pytest.mark.parametrize("bad, error, message", [
    (dict(match=(0, 1)), TypeError, "match must be a uld_kernels.VocabMatch"),
    (dict(match=VocabMatch(torch.tensor([12]), torch.tensor([0]))), ValueError,
     "match's student ids must lie inside student_logits' 12 columns, got an id of 12"),
    (dict(match=VocabMatch(torch.tensor([0]), torch.tensor([9]))), ValueError, "match's teacher ids"),
    (dict(beta=1.5), ValueError, r"beta must lie in \[0, 1\]"),
    (dict(beta="0.5"), TypeError, "beta must be a real number"),
    (dict(matched_weight=0.5), ValueError, "must both be None"),
    (dict(matched_weight=-1.0, unmatched_weight=1.0), ValueError, "matched_weight must lie in"),
    (dict(matched_weight=1.0, unmatched_weight=float("inf")), ValueError, "unmatched_weight must be finite"),
    (dict(unmatched_top=0), ValueError, "unmatched_top must be None or an int >= 1"),
    (dict(unmatched_top=True), ValueError, "unmatched_top must be None or an int >= 1"),
    (dict(prob_floor=1.0), ValueError, "prob_floor must be < 1"),
    (dict(prob_floor=-0.1), ValueError, "prob_floor must lie in"),
    (dict(reduction="batchmean"), ValueError, "reduction must be one of"),
    (dict(teacher_logits=torch.zeros(2, 9)), ValueError, "the same number of rows"),
    (dict(student_temperature=0.0), ValueError, "student_temperature must be finite and > 0"),
])
def test_bad_arguments(bad, error, message):
    args = {**dict(student_logits=torch.zeros(3, 12), teacher_logits=torch.zeros(3, 9),
                   match=VocabMatch(torch.tensor([0, 5]), torch.tensor([1, 2]))), **bad}
    with pytest.raises(error, match=message):
        uld_loss_hybrid(args.pop("student_logits"), args.pop("teacher_logits"), args.pop("match"), **args)


# The training loss with the hybrid row loss (ULDLoss(hybrid=...)): the paper's semantics
# (reference/paper.py with the same HybridULD) on test_distill's batches (Vs 40, Vt 33).
def _hybrid(seed, **options):
    g = torch.Generator().manual_seed(seed)
    return HybridULD(VocabMatch(torch.randperm(40, generator=g)[:15], torch.randperm(33, generator=g)[:15]), **options)


TRAINING = [
    ("paper", dict(hybrid=_hybrid(1))),
    ("none-nemo", dict(reduction="none", skip_student_eos=True, student_temperature=2.0, teacher_temperature=2.0,
                       hybrid=_hybrid(2, beta=0.0, matched_weight=1.0, unmatched_weight=1.0, unmatched_top=6,
                                      prob_floor=0.0))),
    ("sum-no-ce", dict(reduction="sum", crossentropy_weight=0.0, distillation_weight=1.5,
                       hybrid=_hybrid(3, beta=1.0))),
    ("token-mean-observed", dict(reduction="token_mean", num_items_in_batch=13, alignment="trl_observed",
                                 hybrid=_hybrid(4, beta=0.3))),
]


@pytest.mark.parametrize("name, options", TRAINING, ids=[t[0] for t in TRAINING])
def test_the_training_loss_with_the_hybrid_rows(name, options, device):
    _assert_matches_the_papers_semantics(*_batch(len(name), device), options, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_the_training_loss_with_the_hybrid_rows_in_sixteen_bits(dtype, device, monkeypatch):
    """16-bit logits (gradients per tie group), and the pairs in chunks of one row (the index
    path's weights, rows and adds across chunks)."""
    monkeypatch.setattr(hybrid, "CHUNK_BYTES", 1)
    _assert_matches_the_papers_semantics(*_batch(7, device, dtype), dict(hybrid=_hybrid(7), skip_student_eos=True),
                                         dtype)


def test_the_training_loss_per_sample_with_weights_that_learn(device):
    """``reduction="none"`` under an uneven upstream gradient (each sample's factor scales its
    rows' hybrid gradient), explicit rows whose weights require grad: the student's and the
    weights' gradients against the reference."""
    student, teacher, s_labels, t_labels = _batch(9, device)
    rows = dict(student_rows=torch.tensor([0, 4, 10, 20], device=device),
                teacher_rows=torch.tensor([3, 3, 12, 30], device=device))
    upstream = torch.tensor([0.5, 2.0, 3.0], device=device)
    results = []
    for loss, s, t in ((uld_distillation_loss, student, teacher),
                       (uld_distillation_loss_reference, student.double(), teacher.double())):
        s_in = s.detach().requires_grad_(True)
        weights = torch.tensor([0.1, 0.2, 0.3, 0.4], device=device, dtype=s.dtype, requires_grad=True)
        total = loss(s_in, t, s_labels, t_labels, reduction="none", hybrid=_hybrid(9), row_weights=weights,
                     **rows)[0]
        (total * upstream.to(s.dtype)).sum().backward()
        results.append((total.detach(), s_in.grad, weights.grad))
    (total, s_grad, w_grad), (ref, s_ref, w_ref) = results
    assert_losses_close(total, ref, torch.float32)
    assert_losses_close(w_grad, w_ref, torch.float32, what="row_weights' gradient")
    assert_grads_close(s_grad.reshape(-1, 40), s_ref.reshape(-1, 40), student.reshape(-1, 40).detach(),
                       torch.float32)


def test_the_training_loss_on_the_cpu_takes_the_reference(monkeypatch):
    """CPU tensors without the interpreter: reference/paper.py with the same HybridULD."""
    import uld_kernels.distill as distill_module
    monkeypatch.setattr(distill_module, "interpreter_enabled", lambda: False)
    student, teacher, s_labels, t_labels = _batch(10, "cpu")
    total = uld_distillation_loss(student, teacher, s_labels, t_labels, hybrid=_hybrid(10))[0]
    want = uld_distillation_loss_reference(student.double(), teacher.double(), s_labels, t_labels,
                                           hybrid=_hybrid(10))[0]
    assert_losses_close(total, want, torch.float32)


def test_the_training_loss_with_explicit_rows_and_padded_vocabularies(device):
    """Explicit pairs and weights, and lm_head padding left out (``student_vocab_size``): the
    adaptive weights count the teacher's columns as read."""
    student, teacher, s_labels, t_labels = _batch(5, device, vs_full=44)
    options = dict(hybrid=_hybrid(5), student_vocab_size=40, teacher_vocab_size=30, reduction="none",
                   student_rows=torch.tensor([0, 4, 10, 20], device=device),
                   teacher_rows=torch.tensor([3, 3, 12, 30], device=device),
                   row_weights=torch.tensor([0.1, 0.2, 0.3, 0.4], device=device))
    with pytest.raises(ValueError, match=r"match's teacher ids must lie inside teacher_logits \(teacher_vocab_size\)"):
        uld_distillation_loss(student, teacher, s_labels, t_labels, **options)
    options["hybrid"] = HybridULD(VocabMatch(torch.tensor([0, 39, 7]), torch.tensor([29, 0, 5])))
    _assert_matches_the_papers_semantics(student, teacher, s_labels, t_labels, options, torch.float32)


def test_the_training_loss_refuses_bad_hybrids():
    with pytest.raises(TypeError, match="hybrid must be None or a uld_kernels.HybridULD"):
        ULDLoss(hybrid=VocabMatch(torch.tensor([0]), torch.tensor([0])))
    with pytest.raises(ValueError, match="top_k and hybrid cannot be combined"):
        ULDLoss(top_k=4, hybrid=_hybrid(6))
    with pytest.raises(TypeError, match="match must be a uld_kernels.VocabMatch"):
        HybridULD((torch.tensor([0]), torch.tensor([0])))
