"""User API: ``uld_loss`` over aligned rows; ``uld_loss_teacher_topk`` against an offline
teacher's top-K log-probabilities."""

from __future__ import annotations

import torch

from uld_kernels.autograd import REDUCTIONS, ULDFunction, reduce_rows
from uld_kernels.launch import interpreter_enabled
from uld_kernels.topk import ULDTeacherTopKFunction, ULDTopKFunction, truncates
from uld_kernels.validation import (
    check_aligned_rows,
    check_choice,
    check_logits,
    check_row_mask,
    check_temperature,
    check_top_k,
)


def reference_module(name: str):
    """``reference.<name>``, the PyTorch reference this package computes CPU tensors with
    (without the interpreter). Imported only then: ``import uld_kernels`` never reads the
    top-level ``reference`` package, which a module of the user's named ``reference`` shadows."""
    # (import statements, not importlib: torch.compile traces these, also on a first call)
    try:
        if name == "paper":
            import reference.paper as module
        else:
            import reference.uld as module
        return module
    except ImportError as error:
        raise ImportError(
            f"CPU tensors are computed by uld_kernels' PyTorch reference (reference.{name}), which could "
            f"not be imported ({error}); a module named 'reference' of your own may shadow it. Move the "
            "tensors to a GPU, or set TRITON_INTERPRET=1 to run the kernels on the CPU") from error


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    reduction: str = "mean",
    top_k: int | None = None,
) -> torch.Tensor:
    """Exact Universal Logit Distillation loss of aligned rows, fused in Triton.

    For each row: ``a = softmax(student / T_s)``, ``b = softmax(teacher / T_t)``, both sorted
    descending, the shorter zero-padded, ``loss = sum_k |a_(k) - b_(k)|`` (Boizard et al.,
    arXiv 2402.12030). No sort runs and nothing of size ``[N, V]`` is allocated except the
    gradient: softmax and sums run in float32 whatever the input dtype (the paper's code runs
    them in bf16; we are more accurate on purpose).

    Args:
        student_logits: ``[N, Vs]`` float32, bfloat16 or float16; any row stride.
        teacher_logits: ``[N, Vt]``, same device and rows; Vt may differ from Vs.
        student_temperature: softmax temperature of the student, finite and > 0.
        teacher_temperature: softmax temperature of the teacher, finite and > 0.
        reduction: ``"mean"`` over rows (default), ``"sum"``, or ``"none"``.
        top_k: None (default: the paper's loss, every rank), or ``k >= 1``: the truncated
            variant ``sum_{i < k} |a_(i) - b_(i)|`` over the first ``k`` ranks of the same
            sorted, padded full-vocabulary softmaxes (distillKitPlus's ULD: ``top_k=100``,
            both temperatures 2.0). Plain PyTorch (``torch.topk``; ``uld_kernels.topk``),
            on any device, ``O(rows * k)`` extra memory. ``k >= max(Vs, Vt)`` keeps every
            rank: the exact loss, computed by the fused kernels.

    Returns:
        float32 loss: a scalar, or ``[N]`` for ``reduction="none"``.

    Shape:
        ``[N, Vs]``, ``[N, Vt]`` -> ``[]`` or ``[N]``. ``N = 0`` gives ``nan`` (mean), ``0``
        (sum) or an empty tensor.

    Gradients flow to whichever input requires them, in its dtype. Ties (common in bf16)
    get the average sign of their group: an exact subgradient. ``-inf`` logits are
    probability 0. A row with a NaN or ``+inf`` logit, or with no finite logit, gets a NaN
    loss and NaN gradients; other rows are unaffected.

    On CUDA tensors the Triton kernels run. On CPU tensors they run under Triton's
    interpreter when ``TRITON_INTERPRET=1`` is set; otherwise CPU tensors use the PyTorch
    reference (``reference.uld_loss_reference``, upcast to float32).

    Example:
        >>> s = torch.randn(4, 151936, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        >>> t = torch.randn(4, 128256, device="cuda", dtype=torch.bfloat16)
        >>> uld_loss(s, t).backward()
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    check_aligned_rows(student_logits, teacher_logits)
    student_temperature = check_temperature("student_temperature", student_temperature)
    teacher_temperature = check_temperature("teacher_temperature", teacher_temperature)
    check_choice("reduction", reduction, REDUCTIONS)
    top_k = check_top_k("top_k", top_k)

    if truncates(top_k, student_logits.shape[-1], teacher_logits.shape[-1]):
        rows = ULDTopKFunction.apply(student_logits, teacher_logits, top_k, student_temperature,
                                     teacher_temperature, torch.is_grad_enabled())
        return reduce_rows(rows, reduction)
    if student_logits.device.type == "cpu" and not interpreter_enabled():
        return reference_module("uld").uld_loss_reference(
            student_logits.float(), teacher_logits.float(),
            student_temperature=student_temperature,
            teacher_temperature=teacher_temperature, reduction=reduction,
        )
    return ULDFunction.apply(
        student_logits, teacher_logits, student_temperature, teacher_temperature, reduction,
        torch.is_grad_enabled(),
    )


def uld_loss_teacher_topk(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    student_temperature: float = 1.0,
    normalize_teacher: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """ULD loss against an offline teacher's top-K log-probabilities (axolotl's ULD loss on
    its KD datasets; vLLM's ``logprobs``): the teacher's logits are never materialized.

    For each row: ``a = softmax(student / T_s)`` over the student's full vocabulary, ``b =
    exp(teacher_logprobs)`` (K values, as given: the teacher's probability outside its top K
    is dropped, not spread), both sorted descending, the teacher zero-padded to the student's
    length, ``loss = sum_i |a_(i) - b_(i)| = sum_{i < K} |a_(i) - b_(i)| + sum_{i >= K}
    a_(i)``. Only the student's first K probabilities are selected (the top_k kernels), so it
    costs about what ``uld_loss(..., top_k=K)`` does for the student's side alone.

    Args:
        student_logits: ``[N, Vs]`` or ``[B, L, Vs]`` float32, bfloat16 or float16; any
            strides (``[B, L, Vs]`` rows are read in place, e.g. ``logits[:, :-1]``).
        teacher_logprobs: ``[N, K]`` or ``[B, L, K]`` floating, the student's rows, same
            device: the teacher's log probabilities of its top K tokens, in any order (which
            tokens they are does not matter: ULD compares sorted values). ``-inf`` entries are
            probability 0 (rows with fewer than K).
        mask: ``None`` (every row), or bool, shaped like the rows (``[N]`` or ``[B, L]``):
            only the True rows count (e.g. axolotl's target mask, the answer tokens). The
            others are never read past their index: no loss, zero gradient, and NaN or
            ``-inf`` there does not matter. No host sync and no copy of either side's rows
            (the rows left out are padding slots of the kernels' index).
        student_temperature: the student's softmax temperature, finite and > 0. The teacher's
            probabilities are used as given. (axolotl also multiplies its loss by ``T_s**2``:
            multiply the result to reproduce its numbers.)
        normalize_teacher: ``softmax(teacher_logprobs)`` instead of ``exp``: the K values
            renormalized to sum to 1 (then the same as
            ``uld_loss(student_logits, teacher_logprobs)``, the exact loss with a teacher
            vocabulary of K).
        reduction: ``"mean"`` over the rows that count (default; NaN if none does),
            ``"sum"``, or ``"none"``.

    Returns:
        float32 loss: a scalar, or for ``reduction="none"`` one per row (``[N]`` or ``[B,
        L]``), 0 at the rows ``mask`` leaves out.

    A row whose teacher probabilities sum past ``1 + topk.TEACHER_SUM_SLACK`` (logits passed
    where log-probabilities belong), to 0 (every entry ``-inf``) or to NaN gets a NaN loss
    and NaN gradients, as does a row with a NaN or ``+inf`` student logit, or no finite one.
    Gradients flow to the student (the top_k engine's backward) and, if it requires them, to
    ``teacher_logprobs``. ``K <= launch.TOPK_MAX_K`` runs the Triton kernels on CUDA tensors
    (and under ``TRITON_INTERPRET=1``); otherwise PyTorch (``torch.topk``), in chunks.

    Example:
        >>> s = torch.randn(4, 151936, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        >>> lp = torch.randn(4, 128256, device="cuda").log_softmax(-1).topk(100).values
        >>> uld_loss_teacher_topk(s, lp).backward()
    """
    batched = isinstance(student_logits, torch.Tensor) and student_logits.dim() == 3
    if isinstance(student_logits, torch.Tensor) and student_logits.dim() not in (2, 3):
        raise ValueError(f"student_logits must be 2-D [rows, vocabulary] or 3-D [batch, sequence, vocabulary], got "
                         f"{student_logits.dim()}-D shape {tuple(student_logits.shape)}")
    check_logits("student_logits", student_logits, 3 if batched else 2)
    check_logits("teacher_logprobs", teacher_logprobs, 3 if batched else 2)
    check_aligned_rows(student_logits, teacher_logprobs, "teacher_logprobs")
    if student_logits.shape[:-1] != teacher_logprobs.shape[:-1]:
        raise ValueError(f"student_logits and teacher_logprobs must have the same rows, got shapes "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logprobs.shape)}")
    mask = check_row_mask("mask", mask, student_logits)
    student_temperature = check_temperature("student_temperature", student_temperature)
    if not isinstance(normalize_teacher, bool):
        raise TypeError(f"normalize_teacher must be a bool, got {type(normalize_teacher).__name__}")
    check_choice("reduction", reduction, REDUCTIONS)
    options = (student_temperature, normalize_teacher, torch.is_grad_enabled())
    if mask is None and not batched:
        return reduce_rows(ULDTeacherTopKFunction.apply(student_logits, teacher_logprobs, *options), reduction)
    # Rows by index, the student's read in place ([B, L, Vs]; a 2-D student as [1, N, Vs]); a row
    # the mask leaves out is a padding slot (-1: loss 0, zero gradients), so no host sync.
    shape = student_logits.shape[:-1]
    index = torch.arange(shape.numel(), device=student_logits.device)
    if mask is not None:
        index = torch.where(mask.reshape(-1), index, -1)
    student = student_logits if batched else student_logits.unsqueeze(0)
    teacher = teacher_logprobs.reshape(-1, teacher_logprobs.shape[-1])
    rows = ULDTeacherTopKFunction.apply(student, teacher, *options, index)
    if reduction == "none":
        return rows.view(shape)
    if reduction == "mean" and mask is not None:  # over the kept rows (0 / 0: NaN if none)
        return rows.sum() / mask.sum()
    return reduce_rows(rows, reduction)
