"""The Universal Logit Distillation loss, written to be read.

For one aligned pair of rows (Boizard et al., arXiv 2402.12030):

    a = softmax(student_logits / T_s)        length Vs
    b = softmax(teacher_logits / T_t)        length Vt
    sort a and b descending, zero-pad the shorter one to max(Vs, Vt)
    loss = sum_k |a_(k) - b_(k)|

Everything here is plain PyTorch: softmax, ``torch.sort``, padding, L1, and autograd
through the sort. It runs in the dtype it is given (use float64 for an oracle) and keeps
no cleverness that could hide a bug. It is slow and memory-hungry on purpose: it is the
definition, not the implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def uld_row_losses_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """Per-row ULD loss of aligned rows ``[N, Vs]`` and ``[N, Vt]``; returns ``[N]``.

    Softmax and the L1 sum run in the dtype of the inputs (promoted to a common float type).
    ``top_k``: keep only the first ``top_k`` ranks of the sorted, padded vectors (the
    truncated variant; None keeps all).
    """
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    student_probs = F.softmax(student_logits.to(dtype) / student_temperature, dim=-1)
    teacher_probs = F.softmax(teacher_logits.to(dtype) / teacher_temperature, dim=-1)
    student_sorted = torch.sort(student_probs, dim=-1, descending=True).values
    teacher_sorted = torch.sort(teacher_probs, dim=-1, descending=True).values
    vocab = max(student_sorted.shape[-1], teacher_sorted.shape[-1])
    student_sorted = F.pad(student_sorted, (0, vocab - student_sorted.shape[-1]))
    teacher_sorted = F.pad(teacher_sorted, (0, vocab - teacher_sorted.shape[-1]))
    if top_k is not None:
        student_sorted, teacher_sorted = student_sorted[..., :top_k], teacher_sorted[..., :top_k]
    return (student_sorted - teacher_sorted).abs().sum(dim=-1)


def uld_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    reduction: str = "mean",
    top_k: int | None = None,
) -> torch.Tensor:
    """The ULD loss over aligned rows, reduced like ``uld_kernels.uld_loss``.

    ``reduction``: ``"mean"`` over rows, ``"sum"``, or ``"none"`` (shape ``[N]``).
    ``top_k``: the truncated variant's ranks (None: all).
    """
    rows = uld_row_losses_reference(
        student_logits, teacher_logits, student_temperature, teacher_temperature, top_k
    )
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.mean()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def uld_teacher_topk_row_losses_reference(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    student_temperature: float = 1.0,
    normalize_teacher: bool = False,
) -> torch.Tensor:
    """Per-row ULD loss of aligned rows ``[N, Vs]`` against a given teacher's top-K
    log-probabilities ``[N, K]`` (an offline teacher: axolotl's ULD): ``a =
    softmax(student_logits / T_s)``, ``b = exp(teacher_logprobs)`` as given (not renormalized;
    ``softmax(teacher_logprobs)`` with ``normalize_teacher``), both sorted descending, the
    shorter zero-padded, ``sum_k |a_(k) - b_(k)|``; returns ``[N]``."""
    dtype = torch.promote_types(student_logits.dtype, teacher_logprobs.dtype)
    student_probs = F.softmax(student_logits.to(dtype) / student_temperature, dim=-1)
    logprobs = teacher_logprobs.to(dtype)
    teacher_probs = F.softmax(logprobs, dim=-1) if normalize_teacher else torch.exp(logprobs)
    student_sorted = torch.sort(student_probs, dim=-1, descending=True).values
    teacher_sorted = torch.sort(teacher_probs, dim=-1, descending=True).values
    vocab = max(student_sorted.shape[-1], teacher_sorted.shape[-1])
    student_sorted = F.pad(student_sorted, (0, vocab - student_sorted.shape[-1]))
    teacher_sorted = F.pad(teacher_sorted, (0, vocab - teacher_sorted.shape[-1]))
    return (student_sorted - teacher_sorted).abs().sum(dim=-1)
