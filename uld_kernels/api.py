"""User API: ``uld_loss`` over aligned rows."""

from __future__ import annotations

import torch

from uld_kernels.autograd import REDUCTIONS, ULDFunction, reduce_rows
from uld_kernels.launch import interpreter_enabled
from uld_kernels.topk import ULDTopKFunction, truncates
from uld_kernels.validation import (
    check_aligned_rows,
    check_choice,
    check_logits,
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
