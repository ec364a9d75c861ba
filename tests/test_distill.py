"""The full training loss (uld_distillation_loss / ULDLoss) against the float64 transcription
of the paper's semantics (reference/paper.py), on randomized batches."""

from __future__ import annotations

import itertools
import pathlib
import subprocess
import sys

import pytest
import torch

from reference.paper import uld_distillation_loss_reference
from tests.helpers import assert_grads_close, assert_losses_close, spy_saved_tensors
from uld_kernels import ULDLoss, uld_distillation_loss
from uld_kernels.launch import zero_unwritten_

IGNORE = -100
REPO = pathlib.Path(__file__).resolve().parent.parent


def _batch(seed, device, dtype=torch.float32, batch=3, ls=9, lt=11, vs=40, vt=33, vs_full=None):
    """Prompts of varied lengths, answers of varied lengths, padding at the end."""
    g = torch.Generator().manual_seed(seed)
    vs_full = vs_full or vs
    student = (torch.randn(batch, ls + 1, vs_full, generator=g) * 2).to(dtype)
    teacher = (torch.randn(batch, lt, vt, generator=g) * 2).to(dtype)
    s_labels = torch.full((batch, ls + 1), IGNORE)
    t_labels = torch.full((batch, lt), IGNORE)
    for b in range(batch):
        for labels, length, vocab in ((s_labels, ls + 1, vs), (t_labels, lt, vt)):
            prompt = int(torch.randint(0, 4, (1,), generator=g))
            answer = int(torch.randint(0, length - prompt + 1, (1,), generator=g))
            labels[b, prompt:prompt + answer] = torch.randint(0, vocab, (answer,), generator=g)
    if batch > 1:
        s_labels[-1] = IGNORE  # a sample without answer
    # the student's logits arrive as logits[:, :-1] (a strided view, never copied)
    return (student[:, :-1].to(device), teacher.to(device), s_labels[:, :-1].to(device), t_labels.to(device))


OPTIONS = [
    dict(),
    dict(reduction="token_mean", num_items_in_batch=13),
    dict(reduction="sum", skip_student_eos=True, student_temperature=2.0),
    dict(reduction="none", skip_teacher_eos=True, teacher_temperature=0.5, distillation_weight=1.5),
    dict(alignment="trl_observed", crossentropy_weight=0.0),
    dict(distillation_weight=0.0, crossentropy_weight=2.0),
    # the truncated variant (distillKitPlus: one row later, T = 2), k inside and between the vocabularies
    dict(top_k=5, alignment="trl_observed", student_temperature=2.0, teacher_temperature=2.0),
    dict(top_k=35, reduction="none", skip_student_eos=True, distillation_weight=1.5),
    dict(top_k=3, reduction="token_mean", num_items_in_batch=13),
    dict(top_k=4, reduction="sum", student_temperature=0.5, crossentropy_weight=0.0),
    dict(top_k=1000, reduction="none"),  # past both vocabularies: the exact loss, fused
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_matches_the_papers_semantics(options, device):
    _assert_matches_the_papers_semantics(*_batch(len(str(options)), device), options, torch.float32)


def _assert_matches_the_papers_semantics(student, teacher, s_labels, t_labels, options, dtype):
    """Losses and the student's gradient against reference/paper.py in float64 (gradients per
    tie group on 16-bit logits, element by element on float32 ones)."""
    student = student.detach().requires_grad_(True)
    total, ce, distill = uld_distillation_loss(student, teacher, s_labels, t_labels, **options)
    total.sum().backward()
    s64 = student.detach().double().requires_grad_(True)
    ref_total, ref_ce, ref_distill = uld_distillation_loss_reference(
        s64, teacher.double(), s_labels, t_labels, **options)
    ref_total.sum().backward()
    for ours, ref, what in ((total, ref_total, "total"), (ce, ref_ce, "ce"), (distill, ref_distill, "distillation")):
        assert_losses_close(ours, ref.detach(), dtype, what=what)
    vocab = student.shape[-1]
    assert_grads_close(student.grad.reshape(-1, vocab), s64.grad.reshape(-1, vocab),
                       student.reshape(-1, vocab).detach(), dtype)


@pytest.mark.parametrize("options", [o for o in OPTIONS if o.get("top_k", 1000) < 40],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_truncated_rows_by_pytorch_add_into_the_cross_entropy_gradient(options, device, monkeypatch):
    """``top_k`` past the Triton select's largest ``k`` (PyTorch's chunks): the truncated rows'
    gradient added into the cross-entropy's buffer (`topk._torch_grad`'s ``out``) as the
    kernel adds it, against the reference."""
    import uld_kernels.launch as launch
    monkeypatch.setattr(launch, "TOPK_MAX_K", 0)
    _assert_matches_the_papers_semantics(*_batch(len(str(options)) + 1, device), options, torch.float32)


@pytest.mark.parametrize("top_k", [None, 4])
def test_cpu_without_the_interpreter_takes_the_reference(top_k, monkeypatch):
    """CPU tensors without TRITON_INTERPRET: reference/paper.py's values, and as on the kernels'
    path the teacher gets no gradient and only ``total`` is differentiable."""
    import uld_kernels.distill as distill_module
    monkeypatch.setattr(distill_module, "interpreter_enabled", lambda: False)
    student, teacher, s_labels, t_labels = _batch(12, "cpu")
    student, teacher = student.detach().requires_grad_(True), teacher.detach().requires_grad_(True)
    total, ce, distill = uld_distillation_loss(student, teacher, s_labels, t_labels, top_k=top_k)
    assert not ce.requires_grad and not distill.requires_grad
    total.backward()
    assert teacher.grad is None
    ref, _, _ = uld_distillation_loss_reference(student.detach().double(), teacher.detach().double(), s_labels,
                                                t_labels, top_k=top_k)
    assert_losses_close(total, ref, torch.float32)


@pytest.mark.parametrize("crossentropy_weight", [0.0, 1.0])
def test_a_confident_student_keeps_its_top_gradient_in_bf16(crossentropy_weight, device):
    """bf16, top_k, a student near one-hot: the truncated gradient at its top column is small
    (``p (1 - mass)``) beside each of its parts (``p mass``, ``p``); added into the
    cross-entropy's buffer it must be rounded once, not once a part (helper-39's review: the
    parts rounded apart gave 0.0105 against 0.0076)."""
    g = torch.Generator().manual_seed(40)
    student = torch.randn(2, 6, 64, generator=g) * 0.5
    student[..., 7] += 9.0
    teacher = torch.randn(2, 6, 50, generator=g) * 2
    s_labels, t_labels = torch.randint(0, 64, (2, 6), generator=g), torch.randint(0, 50, (2, 6), generator=g)
    s_labels[:, 0] = t_labels[:, 0] = IGNORE
    options = dict(top_k=4, reduction="sum", crossentropy_weight=crossentropy_weight)
    _assert_matches_the_papers_semantics(student.bfloat16().to(device), teacher.bfloat16().to(device),
                                         s_labels.to(device), t_labels.to(device), options, torch.bfloat16)


@pytest.mark.parametrize("top_k", [None, 6])
def test_padded_lm_head_columns_are_left_out(top_k, device):
    student, teacher, s_labels, t_labels = _batch(5, device, vs=40, vs_full=48)
    teacher = torch.cat([teacher, torch.full_like(teacher[..., :5], 9.0)], dim=-1)  # 5 padded columns
    student = student.detach().requires_grad_(True)
    total, _, _ = uld_distillation_loss(student, teacher, s_labels, t_labels, student_vocab_size=40,
                                        teacher_vocab_size=33, top_k=top_k)
    total.backward()
    s64 = student.detach().double().requires_grad_(True)
    ref, _, _ = uld_distillation_loss_reference(s64, teacher.double(), s_labels, t_labels,
                                                student_vocab_size=40, teacher_vocab_size=33, top_k=top_k)
    ref.backward()
    assert_losses_close(total, ref.detach(), torch.float32)
    assert (student.grad[..., 40:] == 0).all()
    assert_grads_close(student.grad, s64.grad, student.reshape(-1, 48).detach(), torch.float32,
                       per_tie_group=False)


@pytest.mark.parametrize("top_k", [None, 4])
@pytest.mark.parametrize("reduction", ["paper", "none"])
@pytest.mark.parametrize("weights_need_grad", [False, True])
def test_explicit_row_maps(reduction, weights_need_grad, top_k, device):
    """Explicit pairs against the reference: losses, the student's gradient and, when the
    weights require grad, theirs (each pair's loss times its sample's upstream factor)."""
    student, teacher, s_labels, t_labels = _batch(6, device)
    student = student.detach().requires_grad_(True)
    s_rows = torch.tensor([0, 4, 10, 20], device=device)
    t_rows = torch.tensor([3, 3, 12, 30], device=device)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], device=device, requires_grad=weights_need_grad)
    w64 = w.detach().double().requires_grad_(weights_need_grad)
    # An upstream gradient that differs per sample, so a pair given another sample's factor fails.
    upstream = torch.tensor([0.5, -1.25, 2.0], device=device) if reduction == "none" else torch.tensor(0.75)
    total, _, distill = uld_distillation_loss(student, teacher, s_labels, t_labels, student_rows=s_rows,
                                              teacher_rows=t_rows, row_weights=w, crossentropy_weight=0.5,
                                              distillation_weight=1.5, reduction=reduction, top_k=top_k)
    (total * upstream.to(device)).sum().backward()
    s64 = student.detach().double().requires_grad_(True)
    ref, _, ref_distill = uld_distillation_loss_reference(
        s64, teacher.double(), s_labels, t_labels, student_rows=s_rows, teacher_rows=t_rows,
        row_weights=w64, crossentropy_weight=0.5, distillation_weight=1.5, reduction=reduction, top_k=top_k)
    (ref * upstream.double().to(device)).sum().backward()
    assert_losses_close(total, ref.detach(), torch.float32)
    assert_losses_close(distill, ref_distill.detach(), torch.float32, what="distillation")
    assert_grads_close(student.grad, s64.grad, student.reshape(-1, student.shape[-1]).detach(),
                       torch.float32, per_tie_group=False)
    if weights_need_grad:
        assert w.grad is not None, "row_weights requires grad but got none"
        assert_losses_close(w.grad, w64.grad, torch.float32, what="row_weights' gradient")
    else:
        assert w.grad is None


def test_gradient_accumulation_with_num_items_in_batch(device):
    """Two half batches with the global token count give the full batch's loss and gradient."""
    student, teacher, s_labels, t_labels = _batch(7, device, batch=4)
    count = int((s_labels[:, 1:] != IGNORE).sum())
    uld = ULDLoss(reduction="token_mean", distillation_weight=1.5)
    full = student.detach().requires_grad_(True)
    uld(full, teacher, s_labels, t_labels, num_items_in_batch=count)[0].backward()
    halves = student.detach().requires_grad_(True)
    total = 0.0
    for part in (slice(0, 2), slice(2, 4)):
        loss = uld(halves[part], teacher[part], s_labels[part], t_labels[part], num_items_in_batch=count)[0]
        loss.backward()
        total += float(loss.detach())
    full_loss = float(uld(full.detach(), teacher, s_labels, t_labels, num_items_in_batch=count)[0])
    assert abs(total - full_loss) < 1e-5
    torch.testing.assert_close(halves.grad, full.grad, atol=1e-6, rtol=1e-5)


def test_bad_arguments_name_themselves():
    student, teacher, s_labels, t_labels = _batch(8, "cpu")
    cases = [
        (dict(reduction="mean"), "reduction"),
        (dict(alignment="bayesian"), "alignment"),
        (dict(student_vocab_size=99), "student_vocab_size"),
        (dict(teacher_temperature=0.0), "teacher_temperature"),
        (dict(distillation_weight=float("nan")), "distillation_weight"),
        (dict(student_rows=torch.tensor([1, 2])), "teacher_rows"),
    ]
    for options, name in cases:
        with pytest.raises(ValueError, match=name):
            uld_distillation_loss(student, teacher, s_labels, t_labels, **options)
    with pytest.raises(ValueError, match="student_labels"):
        uld_distillation_loss(student, teacher, s_labels[:, :-1], t_labels)
    with pytest.raises(TypeError, match="teacher_labels"):
        uld_distillation_loss(student, teacher, s_labels, t_labels.float())


# Explicit pairs the kernels must never see: each is refused before any kernel, by the package
# and by the reference alike (one check serves both), with an error naming the argument. The
# batch has 3 x 9 student rows and 3 x 11 teacher rows.
BAD_PAIRS = {
    "student_row_past_the_end": (dict(student_rows=torch.tensor([0, 27]), teacher_rows=torch.tensor([0, 1])),
                                 ValueError, "student_rows must index the 27"),
    "negative_teacher_row": (dict(student_rows=torch.tensor([0, 1]), teacher_rows=torch.tensor([-1, 1])),
                             ValueError, "teacher_rows must index the 33"),
    "repeated_student_row": (dict(student_rows=torch.tensor([4, 2, 4]), teacher_rows=torch.tensor([0, 1, 2])),
                             ValueError, "student_rows must be distinct"),
    "weights_without_rows": (dict(row_weights=torch.tensor([1.0])), ValueError, "row_weights needs"),
    "weights_not_finite": (dict(student_rows=torch.tensor([0, 1]), teacher_rows=torch.tensor([0, 1]),
                                row_weights=torch.tensor([0.5, float("inf")])), ValueError, "row_weights must be finite"),
    "weights_of_another_length": (dict(student_rows=torch.tensor([0, 1]), teacher_rows=torch.tensor([0, 1]),
                                       row_weights=torch.tensor([0.5])), ValueError, "row_weights must be"),
    "rows_as_a_list": (dict(student_rows=[0, 1], teacher_rows=torch.tensor([0, 1])), ValueError, "student_rows must be a 1-D"),
    "float_rows": (dict(student_rows=torch.tensor([0.0, 1.0]), teacher_rows=torch.tensor([0, 1])),
                   ValueError, "student_rows must be a 1-D"),
    "lengths_differ": (dict(student_rows=torch.tensor([0, 1]), teacher_rows=torch.tensor([0])),
                       ValueError, "same length"),
    "teacher_rows_alone": (dict(teacher_rows=torch.tensor([0, 1])), ValueError, "student_rows is None"),
    "no_items": (dict(reduction="token_mean", num_items_in_batch=0), ValueError, "num_items_in_batch must be"),
    "negative_items": (dict(num_items_in_batch=-3.0), ValueError, "num_items_in_batch must be"),
    "items_as_a_string": (dict(num_items_in_batch="12"), TypeError, "num_items_in_batch must be"),
    "items_as_a_vector": (dict(num_items_in_batch=torch.tensor([3, 4])), ValueError, "num_items_in_batch must be"),
    "items_past_float": (dict(num_items_in_batch=10 ** 400), ValueError, "num_items_in_batch must be"),
}


@pytest.mark.parametrize("name", list(BAD_PAIRS))
@pytest.mark.parametrize("loss", ["package", "reference"])
def test_bad_rows_and_counts_are_refused(name, loss, device, monkeypatch):
    """Out-of-range rows once crashed the interpreter's process or gave inf, repeated student rows
    double-counted, weights without rows were ignored, a count of 0 gave NaN: now each is an
    error, raised before any kernel runs."""
    import uld_kernels.launch as launch

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran on input that should have been refused")

    monkeypatch.setattr(launch, "uld_pairs", no_kernel)
    monkeypatch.setattr(launch, "hist_pairs", no_kernel)
    student, teacher, s_labels, t_labels = _batch(8, device)
    options, error, message = BAD_PAIRS[name]
    options = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    fn = uld_distillation_loss if loss == "package" else uld_distillation_loss_reference
    with pytest.raises(error, match=message):
        fn(student, teacher, s_labels, t_labels, **options)


@pytest.mark.parametrize("count_shape", [(), (1,), (1, 1)])
def test_int32_rows_and_a_device_count_are_accepted(count_shape, device):
    """What the checks must let through: int32 row maps, and num_items_in_batch as a
    one-element tensor of any shape (Hugging Face's Trainer passes a 0-D one), against the
    reference; the loss stays a scalar."""
    student, teacher, s_labels, t_labels = _batch(10, device)
    s_rows = torch.tensor([26, 3, 0], dtype=torch.int32, device=device)
    t_rows = torch.tensor([32, 32, 5], dtype=torch.int32, device=device)
    count = torch.full(count_shape, 7, device=device)
    got = uld_distillation_loss(student, teacher, s_labels, t_labels, student_rows=s_rows, teacher_rows=t_rows,
                                reduction="token_mean", num_items_in_batch=count)[0]
    want = uld_distillation_loss_reference(student.double(), teacher.double(), s_labels, t_labels,
                                           student_rows=s_rows, teacher_rows=t_rows,
                                           reduction="token_mean", num_items_in_batch=count)[0]
    assert got.shape == want.shape == (), f"loss shapes {tuple(got.shape)} / {tuple(want.shape)}"
    assert_losses_close(got, want, torch.float32)


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("reduction", ["paper", "none"])
def test_sequences_of_length_zero(reduction, top_k, device):
    """``[B, 0, V]`` logits (no position at all) give the reference's zeros and an empty
    gradient; the alignment once failed on them inside ``argmax``."""
    g = torch.Generator().manual_seed(11)
    student = torch.randn(2, 0, 12, generator=g).to(device).requires_grad_(True)
    teacher = torch.randn(2, 5, 9, generator=g).to(device)
    s_labels = torch.zeros(2, 0, dtype=torch.long, device=device)
    t_labels = torch.randint(0, 9, (2, 5), generator=g).to(device)
    total, ce, distill = uld_distillation_loss(student, teacher, s_labels, t_labels, reduction=reduction,
                                               top_k=top_k)
    total.sum().backward()
    ref = uld_distillation_loss_reference(student.detach().double(), teacher.double(), s_labels, t_labels,
                                          reduction=reduction, top_k=top_k)
    for got, want in zip((total, ce, distill), ref):
        assert_losses_close(got, want, torch.float32)
    assert student.grad.shape == student.shape


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_empty_vocabulary_of_a_batch_is_refused(which):
    student, teacher, s_labels, t_labels = _batch(12, "cpu")
    if which == "student":
        student = student[..., :0]
    else:
        teacher = teacher[..., :0]
    with pytest.raises(ValueError, match=f"{which}_logits must have a vocabulary of at least 1"):
        uld_distillation_loss(student, teacher, s_labels, t_labels)


@pytest.mark.parametrize("options, error, name", [
    (dict(student_temperature=-1.0), ValueError, "student_temperature"),
    (dict(teacher_temperature="hot"), TypeError, "teacher_temperature"),
    (dict(distillation_weight=float("inf")), ValueError, "distillation_weight"),
    (dict(crossentropy_weight=None), TypeError, "crossentropy_weight"),
    (dict(reduction="mean"), ValueError, "reduction"),
])
def test_uld_loss_module_checks_its_options_when_built(options, error, name):
    with pytest.raises(error, match=name):
        ULDLoss(**options)


EDGE_LABELS = {
    # sequences of one token; a sample whose only label is ignored
    "length_one": (torch.tensor([[5], [IGNORE]]), torch.tensor([[3], [4]])),
    # nothing to learn from: loss 0, gradient 0
    "all_ignored": (torch.full((2, 6), IGNORE), torch.full((2, 5), IGNORE)),
    # ignore_index inside the answers (the paper counts labels, then slices contiguous rows)
    "ignore_inside_answers": (torch.tensor([[IGNORE, 1, 2, IGNORE, 4, 5], [IGNORE, IGNORE, 7, 8, 9, IGNORE]]),
                              torch.tensor([[IGNORE, IGNORE, 1, 2, 3], [IGNORE, 4, IGNORE, 6, 7]])),
}


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("name", list(EDGE_LABELS))
def test_edge_batches(name, top_k, device):
    s_labels, t_labels = (x.to(device) for x in EDGE_LABELS[name])
    g = torch.Generator().manual_seed(len(name))
    student = torch.randn(*s_labels.shape, 20, generator=g).to(device).requires_grad_(True)
    teacher = torch.randn(*t_labels.shape, 17, generator=g).to(device)
    total, _, _ = uld_distillation_loss(student, teacher, s_labels, t_labels, reduction="sum", top_k=top_k)
    total.backward()
    s64 = student.detach().double().requires_grad_(True)
    ref, _, _ = uld_distillation_loss_reference(s64, teacher.double(), s_labels, t_labels, reduction="sum",
                                                top_k=top_k)
    ref.backward()
    assert_losses_close(total, ref.detach(), torch.float32)
    assert_grads_close(student.grad, s64.grad, student.reshape(-1, 20).detach(), torch.float32,
                       per_tie_group=False)


@pytest.mark.parametrize("top_k", [None, 4])
def test_torch_compile_fullgraph(top_k, device):
    """The training loss traces without a graph break; compiled and eager gradients agree bit
    for bit (with ``top_k``, the truncated rows' gradient added into the cross-entropy's in
    place), the losses to float32 rounding: inductor compiles the PyTorch arithmetic around the
    kernels (the pair weights, their weighted sum) its own way. On the H200, ``top_k=4``'s
    distillation term came out 1 ulp apart, and bit-equal under ``backend="aot_eager"``
    (bench/RESULTS.md, thirty-ninth session)."""
    student, teacher, s_labels, t_labels = _batch(9, device)
    eager_in = student.detach().clone().requires_grad_(True)
    compiled_in = student.detach().clone().requires_grad_(True)
    uld = ULDLoss(distillation_weight=1.5, skip_student_eos=True, top_k=top_k)
    eager = uld(eager_in, teacher, s_labels, t_labels)[0]
    compiled = torch.compile(uld, fullgraph=True)(compiled_in, teacher, s_labels, t_labels)[0]
    (eager * 2).backward()
    (compiled * 2).backward()
    torch.testing.assert_close(compiled.detach(), eager.detach(), rtol=4 * 2.0 ** -24, atol=0)
    assert torch.equal(eager_in.grad, compiled_in.grad)


_BAD_ROWS = (([0, 4, 10, 27], "student_rows must index"), ([0, 4, 4, 20], "student_rows must be distinct"))


def _compiled_call_with_rows(device, rows, weights=None):
    student, teacher, s_labels, t_labels = _batch(10, device)
    fn = torch.compile(uld_distillation_loss, fullgraph=True)
    return fn(student, teacher, s_labels, t_labels, student_rows=torch.tensor(rows, device=device),
              teacher_rows=torch.tensor([3, 3, 12, 30], device=device), row_weights=weights)


def test_torch_compile_checks_explicit_rows(device):
    """Under torch.compile explicit rows are not read on the host: their tests run as asserts
    in the graph. In range, compiled equals eager (the weights' gradient too); out of range or
    repeated, the call fails with the argument's name: a RuntimeError on the CPU, a device-side
    assert on a GPU (which ends the CUDA context: checked in a process of its own there)."""
    student, teacher, s_labels, t_labels = _batch(10, device)
    results = []
    for call in (uld_distillation_loss, torch.compile(uld_distillation_loss, fullgraph=True)):
        s_in = student.detach().clone().requires_grad_(True)
        w = torch.tensor([0.1, 0.2, 0.3, 0.4], device=device, requires_grad=True)
        total = call(s_in, teacher, s_labels, t_labels, student_rows=torch.tensor([0, 4, 10, 20], device=device),
                     teacher_rows=torch.tensor([3, 3, 12, 30], device=device), row_weights=w)[0]
        total.backward()
        results.append((total.detach(), s_in.grad, w.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
    for rows, message in _BAD_ROWS:
        if device == "cpu":
            with pytest.raises(RuntimeError, match=message):
                _compiled_call_with_rows(device, rows)
            continue
        script = ("import torch; from tests.test_distill import _compiled_call_with_rows as f; "
                  f"f('cuda', {rows}); torch.cuda.synchronize(); print('no error')")
        run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert run.returncode != 0 and "no error" not in run.stdout, f"rows {rows}: the compiled call did not fail"
        assert "device-side assert" in run.stderr or message in run.stderr, run.stderr[-2000:]


def test_no_grad_evaluation_of_the_training_loss_computes_no_gradient(monkeypatch, device):
    """ULDLoss under torch.no_grad(): no student gradient is computed (the kernels get
    student_grad=False), and the losses equal those of a training call."""
    import uld_kernels.distill as distill

    calls = []
    real = distill.uld_pairs

    def spy(*args, **kwargs):
        calls.append(args[4])  # student_grad
        return real(*args, **kwargs)

    monkeypatch.setattr(distill, "uld_pairs", spy)
    g = torch.Generator().manual_seed(3)
    student = torch.randn(2, 12, 60, generator=g).to(device).requires_grad_(True)
    teacher = torch.randn(2, 12, 50, generator=g).to(device)
    labels_s = torch.randint(0, 60, (2, 12), generator=g)
    labels_t = torch.randint(0, 50, (2, 12), generator=g)
    labels_s[:, :4] = -100
    labels_t[:, :3] = -100
    labels_s, labels_t = labels_s.to(device), labels_t.to(device)
    uld = ULDLoss()
    with torch.no_grad():
        evaluated = uld(student, teacher, labels_s, labels_t)
    trained = uld(student, teacher, labels_s, labels_t)
    assert calls == [False, True], calls
    for a, b in zip(evaluated, trained):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize("rows", ["few", "many"])
@pytest.mark.parametrize("width_blocks", [0, 3, 9])
@pytest.mark.parametrize("padding", [0, 13])
def test_zero_unwritten_rows_and_padded_columns(rows, width_blocks, padding, device):
    """The distillation gradient buffer starts uninitialised: rows no kernel writes are zeroed
    whole, the written ones only past the used vocabulary; written columns are left alone.
    Rows wider than one block take several programs each (as real vocabularies do), rows wider
    than 8 blocks several blocks a program; with many rows, each program of the persistent grid
    takes a run of them, in steps of 128 rows (those all written, without padding, skipped at
    once: here the first half)."""
    block = 4096 if device == "cuda" else 1024
    used = width_blocks * block + 37
    if rows == "few":
        written = torch.tensor([1, 0, 0, 1, 1, 0], dtype=torch.int8)
    else:  # more rows than the grid has row programs (launch._row_grid), more than 128 a program
        n_rows = 40 if width_blocks < 9 else 300
        if device == "cuda":  # (more than 128 rows a program there too: 132 row programs at 9 blocks)
            n_rows *= 100 if width_blocks < 9 else 60
        written = (torch.rand(n_rows, generator=torch.Generator().manual_seed(width_blocks)) < 0.7).to(torch.int8)
        written[: n_rows // 2] = 1
    grad = torch.full((len(written), used + padding), float("nan"), dtype=torch.bfloat16, device=device)
    zero_unwritten_(grad, written.to(device), used)
    keep = written.bool()
    out = grad.cpu()
    assert (out[~keep] == 0).all()
    assert (out[keep][:, used:] == 0).all()
    assert torch.isnan(out[keep][:, :used]).all()


@pytest.mark.parametrize("crossentropy_weight", [0.0, 1.0])
def test_gradient_buffer_garbage_never_leaks(crossentropy_weight, device, monkeypatch):
    """The training loss's gradient buffer comes from torch.empty: filled with NaN before the
    zeroing, every row the kernels do not write (prompt rows, padded lm_head columns, and with
    crossentropy_weight=0 the rows only the cross-entropy would write) must still come out
    exact."""
    import uld_kernels.distill as distill

    real = distill.zero_unwritten_

    def poisoned(grad, written, used):
        grad.fill_(float("nan"))
        real(grad, written, used)

    monkeypatch.setattr(distill, "zero_unwritten_", poisoned)
    student, teacher, s_labels, t_labels = _batch(7, device, vs=40, vs_full=48)
    student = student.detach().requires_grad_(True)
    options = dict(student_vocab_size=40, crossentropy_weight=crossentropy_weight, skip_student_eos=True)
    total, _, _ = uld_distillation_loss(student, teacher, s_labels, t_labels, **options)
    total.backward()
    s64 = student.detach().double().requires_grad_(True)
    ref, _, _ = uld_distillation_loss_reference(s64, teacher.double(), s_labels, t_labels, **options)
    ref.backward()
    assert torch.isfinite(student.grad).all()
    assert (student.grad[..., 40:] == 0).all()
    assert_grads_close(student.grad, s64.grad, student.reshape(-1, 48).detach(), torch.float32,
                       per_tie_group=False)


def test_the_histogram_engine_as_the_training_loss_engine(device, monkeypatch):
    """The training loss's default engine for bf16 (`ULD_DISTILL_ENGINE=hist`): its pairs
    through the histogram engine (gathered rows, padding, row weights, the fused cross-entropy)
    on bf16 batches, against
    the paper's semantics in float64."""
    import uld_kernels.launch as launch

    monkeypatch.setattr(launch, "DISTILL_ENGINE", "hist")
    options = dict(reduction="sum", skip_student_eos=True, student_temperature=2.0)
    _assert_matches_the_papers_semantics(*_batch(5, device, dtype=torch.bfloat16), options, torch.bfloat16)


def test_truncated_training_loss_in_bf16(device):
    """``top_k`` on bf16 batches (ties within each logit row) against the paper's semantics."""
    options = dict(top_k=7, reduction="none", teacher_temperature=2.0)
    _assert_matches_the_papers_semantics(*_batch(8, device, dtype=torch.bfloat16), options, torch.bfloat16)


@pytest.mark.parametrize("top_k", [None, 4])
def test_the_teacher_gets_no_gradient(top_k, device):
    """A teacher that requires grad (a model not frozen) gets none from the training loss."""
    student, teacher, s_labels, t_labels = _batch(9, device)
    student, teacher = student.detach().requires_grad_(True), teacher.detach().requires_grad_(True)
    total, _, _ = uld_distillation_loss(student, teacher, s_labels, t_labels, top_k=top_k)
    total.backward()
    assert student.grad is not None and teacher.grad is None


def test_truncated_loss_without_cross_entropy_keeps_one_copy(device, monkeypatch):
    """``top_k`` with ``crossentropy_weight=0``: nothing of the logits' size is saved for the
    backward but the logits themselves (no cross-entropy gradient buffer of ``[B, L, Vs]``)."""
    saved = spy_saved_tensors(monkeypatch)
    student, teacher, s_labels, t_labels = _batch(10, device)
    student = student.detach().requires_grad_(True)
    for ce_weight, big_buffers in ((0.0, 0), (0.5, 1)):
        saved.clear()
        uld_distillation_loss(student, teacher, s_labels, t_labels, top_k=4, crossentropy_weight=ce_weight)
        big = [t for call in saved for t in call
               if t is not None and t.numel() >= student.numel() and t.data_ptr() != student.data_ptr()]
        assert len(big) == big_buffers, (ce_weight, [tuple(t.shape) for t in big])


@pytest.mark.parametrize("top_k", [None, 4])
def test_a_nan_row_stays_in_its_sample(top_k, device):
    """``reduction="none"``: a NaN answer row of sample 0 makes sample 0's losses NaN and
    leaves the other samples' losses and gradients finite and right."""
    student, teacher, s_labels, t_labels = _batch(11, device)
    row = int((s_labels[0] != IGNORE).nonzero()[0])
    assert (s_labels[1] != IGNORE).any(), "the batch needs a second sample with answers"
    student = student.detach().clone()
    student[0, row] = float("nan")
    student.requires_grad_(True)
    total, ce, distill = uld_distillation_loss(student, teacher, s_labels, t_labels, reduction="none", top_k=top_k)
    total.sum().backward()
    clean = student.detach()[1:].double().requires_grad_(True)
    ref = uld_distillation_loss_reference(clean, teacher[1:].double(), s_labels[1:], t_labels[1:],
                                          reduction="none", top_k=top_k)
    ref[0].sum().backward()
    assert torch.isnan(total[0]) and torch.isnan(distill[0])
    for ours, want, what in zip((total, ce, distill), ref, ("total", "ce", "distillation")):
        assert_losses_close(ours[1:], want.detach(), torch.float32, what=what)
    assert_grads_close(student.grad[1:], clean.grad, student.detach()[1:].reshape(-1, student.shape[-1]),
                       torch.float32, per_tie_group=False)


@pytest.mark.parametrize("top_k", [None, 4])
def test_int16_labels_give_what_int64_labels_give(top_k, device):
    student, teacher, s_labels, t_labels = _batch(12, device)
    wide = uld_distillation_loss(student, teacher, s_labels, t_labels, top_k=top_k)
    narrow = uld_distillation_loss(student, teacher, s_labels.to(torch.int16), t_labels.to(torch.int16), top_k=top_k)
    for a, b in zip(wide, narrow):
        assert torch.equal(a, b)


def test_a_second_backward_through_one_graph_raises(device):
    """The training loss's saved gradient is scaled in place by the first backward: a second
    one through the same graph must raise (the scaled tensor's version went up), never scale
    it again."""
    student, teacher, s_labels, t_labels = _batch(5, device)
    student = student.detach().requires_grad_(True)
    total, _, _ = uld_distillation_loss(student, teacher, s_labels, t_labels)
    (total * 2).backward(retain_graph=True)
    first = student.grad.clone()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (total * 2).backward()
    assert torch.equal(student.grad, first)
