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

import math

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


def _divergence_reference(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's generalized JSD per row, of log-probabilities ``[N, K]`` (not renormalized):
    ``beta = 0``: KL(teacher || student); ``beta = 1``: KL(student || teacher); otherwise, with
    ``m = beta * teacher + (1 - beta) * student``, ``beta KL(teacher || m) + (1 - beta)
    KL(student || m)``. A probability of 0 contributes 0."""
    def kl(p_log, q_log):  # sum p (ln p - ln q), 0 ln 0 = 0 (the inputs replaced there: no NaN gradient)
        present = p_log != -math.inf  # (NaN is present: it propagates)
        p_log, q_log = torch.where(present, p_log, 0.0), torch.where(present, q_log, 0.0)
        return torch.where(present, p_log.exp() * (p_log - q_log), 0.0).sum(dim=-1)

    if beta == 0:
        return kl(teacher_logp, student_logp)
    if beta == 1:
        return kl(student_logp, teacher_logp)
    mix = beta * teacher_logp.exp() + (1 - beta) * student_logp.exp()
    mix_log = torch.log(torch.where(mix > 0, mix, 1.0))  # where both are 0 neither kl reads it
    return beta * kl(teacher_logp, mix_log) + (1 - beta) * kl(student_logp, mix_log)


def uld_hybrid_row_losses_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_ids: torch.Tensor,
    teacher_ids: torch.Tensor,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    beta: float = 0.5,
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
    unmatched_top: int | None = None,
    prob_floor: float = 1e-8,
) -> torch.Tensor:
    """Per-row hybrid ULD loss of aligned rows ``[N, Vs]`` and ``[N, Vt]`` (TRL GOLD's
    ``uld_use_hybrid_loss``; NeMo RL's gold loss with ``beta=0``, weights 1 and 1,
    ``unmatched_top=8192``, ``prob_floor=0``); returns ``[N]``.

    ``student_ids[k]`` and ``teacher_ids[k]`` are the same token in the two vocabularies
    (``K`` pairs). With ``a = softmax(student / T_s)`` and ``b = softmax(teacher / T_t)``:

    - matched: ``_divergence_reference`` of ``max(a[student_ids], prob_floor)`` and
      ``max(b[teacher_ids], prob_floor)`` (``beta``, not renormalized);
    - unmatched: the other columns' probabilities of each side (not renormalized), sorted
      descending; ``unmatched_top=None``: the shorter zero-padded, L1 over all; ``n``: both
      cut to ``min(Vs - K, Vt - K, n)``, L1 over those; 0 if either side has no other column
      (TRL skips the term);
    - ``matched_weight * matched + unmatched_weight * unmatched``; both None: ``K / Vt`` and
      ``1 - K / Vt`` (TRL's adaptive weights).
    """
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    student_logp = F.log_softmax(student_logits.to(dtype) / student_temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.to(dtype) / teacher_temperature, dim=-1)
    floor = math.log(prob_floor) if prob_floor > 0 else -math.inf
    matched = _divergence_reference(student_logp[:, student_ids].clamp(min=floor),
                                    teacher_logp[:, teacher_ids].clamp(min=floor), beta)

    def complement(logp, ids):
        keep = torch.ones(logp.shape[-1], dtype=torch.bool, device=logp.device)
        keep[ids] = False
        return torch.sort(logp[:, keep].exp(), dim=-1, descending=True).values

    student_sorted = complement(student_logp, student_ids)
    teacher_sorted = complement(teacher_logp, teacher_ids)
    if matched_weight is None:
        matched_weight = student_ids.numel() / teacher_logits.shape[-1]
        unmatched_weight = 1.0 - matched_weight
    if min(student_sorted.shape[-1], teacher_sorted.shape[-1]) == 0:  # TRL skips the term
        return matched_weight * matched
    if unmatched_top is None:
        width = max(student_sorted.shape[-1], teacher_sorted.shape[-1])
        student_sorted = F.pad(student_sorted, (0, width - student_sorted.shape[-1]))
        teacher_sorted = F.pad(teacher_sorted, (0, width - teacher_sorted.shape[-1]))
    else:
        width = min(student_sorted.shape[-1], teacher_sorted.shape[-1], unmatched_top)
        student_sorted, teacher_sorted = student_sorted[:, :width], teacher_sorted[:, :width]
    unmatched = (student_sorted - teacher_sorted).abs().sum(dim=-1)
    return matched_weight * matched + unmatched_weight * unmatched
