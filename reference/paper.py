"""The distillation loss of the ULD paper's code, written to be read.

Boizard et al. (arXiv 2402.12030) train with the loss of ``DistillationLoss`` in llm-recipes
``models/distillation_model.py``:

    total = crossentropy_weight * CE(student) + distillation_weight * ULD(aligned answer rows)

For each sample the answer is found from the labels of each side separately:

    size  = number of labels != ignore_index
    start = (length of the leading run of ignore_index) - 1, or 0 if labels[0] != ignore_index

``start`` is the logits row that predicts the first answer token. ``skip_*_eos`` drops the last
answer token of that side. The first ``n = min(size_student, size_teacher)`` answer rows are
paired one to one (student row ``start_s + k`` with teacher row ``start_t + k``), each pair
gets the ULD row loss (``reference.uld.uld_row_losses_reference``), and the paper averages over
the sample's rows, then over the samples.

This file is the oracle: an explicit Python loop over samples, no vectorised gathers, autograd
through plain PyTorch ops, any float dtype (use float64). Slow on purpose.

Where it departs from the paper's code, on purpose and only where that code breaks:

- a sample with no paired rows contributes nothing (the paper's code returns NaN for it);
  if no sample has rows the distillation term is 0;
- ``skip_*_eos`` never makes an answer size negative;
- a pair whose student or teacher row would fall past the end of its sequence is dropped.
  With ``alignment="paper"`` no row can (the last answer row is at most ``L - 1``); with
  ``"trl_observed"`` labels that are answer from their first position reach row ``L``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reference.uld import uld_hybrid_row_losses_reference, uld_row_losses_reference
# The argument checks are the package's, so that both give one answer to bad input; the loss
# itself is computed here alone.
from uld_kernels.validation import check_num_items, check_row_pairs, check_top_k

REDUCTIONS = ("paper", "token_mean", "sum", "none")
ALIGNMENTS = ("paper", "trl_observed")


def answer_start_and_size(labels: torch.Tensor, ignore_index: int = -100) -> tuple[int, int]:
    """The paper's ``__get_start_and_size_answers`` for one row of labels ``[L]``.

    Returns ``(start, size)``: ``size`` counts the labels that are not ``ignore_index`` (wherever
    they are); ``start`` is the length of the leading run of ``ignore_index`` minus one (the row
    that predicts the first answer token), or 0 when ``labels[0]`` is not ``ignore_index``.
    """
    is_ignored = [bool(value == ignore_index) for value in labels.tolist()]
    size = len(is_ignored) - sum(is_ignored)
    leading_ignored = 0
    for ignored in is_ignored:
        if not ignored:
            break
        leading_ignored += 1
    start = leading_ignored - 1 if leading_ignored > 0 else 0
    return start, size


def _check_arguments(student_logits, teacher_logits, student_labels, teacher_labels, reduction,
                     alignment, num_items_in_batch, student_vocab_size, teacher_vocab_size,
                     student_rows, teacher_rows, row_weights):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, Ls, Vs], got shape "
                         f"{tuple(student_logits.shape)}")
    if teacher_logits.dim() != 3:
        raise ValueError(f"teacher_logits must be [B, Lt, Vt], got shape "
                         f"{tuple(teacher_logits.shape)}")
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(
            f"teacher_logits must have the batch size of student_logits "
            f"({student_logits.shape[0]}), got {teacher_logits.shape[0]}")
    if tuple(student_labels.shape) != tuple(student_logits.shape[:2]):
        raise ValueError(
            f"student_labels must have shape {tuple(student_logits.shape[:2])} (student_logits' "
            f"[B, Ls]), got {tuple(student_labels.shape)}")
    if tuple(teacher_labels.shape) != tuple(teacher_logits.shape[:2]):
        raise ValueError(
            f"teacher_labels must have shape {tuple(teacher_logits.shape[:2])} (teacher_logits' "
            f"[B, Lt]), got {tuple(teacher_labels.shape)}")
    for name, size, logits in (("student_vocab_size", student_vocab_size, student_logits),
                               ("teacher_vocab_size", teacher_vocab_size, teacher_logits)):
        if size is not None and not 1 <= size <= logits.shape[-1]:
            raise ValueError(f"{name} must be between 1 and {logits.shape[-1]} (the logits' last "
                             f"dimension), got {size}")
    check_row_pairs(student_rows, teacher_rows, row_weights,
                    student_logits.shape[0] * student_logits.shape[1],
                    teacher_logits.shape[0] * teacher_logits.shape[1])
    return check_num_items("num_items_in_batch", num_items_in_batch)  # a tensor as a 0-D one


def _cross_entropy(student_logits, student_labels, ignore_index, reduction, num_items_in_batch):
    """The student's next-token loss as Hugging Face computes it (``ForCausalLMLoss``):
    ``logits[:, :-1]`` predict ``labels[:, 1:]``, at temperature 1, in at least float32 (HF
    upcasts the logits with ``.float()``; float64 stays float64)."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    logits = student_logits[:, :-1, :].to(dtype)
    targets = student_labels[:, 1:]
    batch = logits.shape[0]
    # Per-sample sums and counts; the reductions below are spelled out from them.
    sample_sums, sample_counts = [], []
    for i in range(batch):
        token_losses = F.cross_entropy(logits[i], targets[i], ignore_index=ignore_index,
                                       reduction="none")  # 0 at ignored targets
        sample_sums.append(token_losses.sum())
        sample_counts.append(int((targets[i] != ignore_index).sum()))
    total_sum = torch.stack(sample_sums).sum() if batch > 0 else logits.sum()
    total_count = sum(sample_counts)
    if reduction == "none":
        return torch.stack([s / c if c > 0 else s for s, c in zip(sample_sums, sample_counts)])
    if reduction == "sum":
        return total_sum
    # "paper" and "token_mean" agree here: HF divides the sum by num_items_in_batch when it is
    # given (gradient accumulation), else takes the mean over the batch's non-ignored targets.
    if num_items_in_batch is not None:
        return total_sum / num_items_in_batch
    return total_sum / total_count if total_count > 0 else total_sum


def uld_distillation_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_labels: torch.Tensor,
    *,
    distillation_weight: float = 1.0,
    crossentropy_weight: float = 1.0,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    skip_student_eos: bool = False,
    skip_teacher_eos: bool = False,
    ignore_index: int = -100,
    reduction: str = "paper",
    num_items_in_batch: int | torch.Tensor | None = None,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    alignment: str = "paper",
    student_rows: torch.Tensor | None = None,
    teacher_rows: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    top_k: int | None = None,
    hybrid=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's distillation loss: weighted cross-entropy plus weighted ULD on answer rows.

    Args:
        student_logits: ``[B, Ls, Vs]``, row ``j`` predicts label ``j + 1`` (a causal LM's output).
        teacher_logits: ``[B, Lt, Vt]``.
        student_labels: ``[B, Ls]`` int64, ``ignore_index`` on prompt and padding.
        teacher_labels: ``[B, Lt]`` int64, the same answer in the teacher's tokens.
        distillation_weight, crossentropy_weight: multiply the two terms.
        student_temperature, teacher_temperature: of the ULD softmaxes only; the
            cross-entropy is always at temperature 1.
        skip_student_eos, skip_teacher_eos: drop the last answer token of that side
            (the answer size never goes below 0).
        ignore_index: the label of positions that are not answer.
        reduction: of both terms, over the batch:

            - ``"paper"``: distillation is the mean over each sample's rows, then the mean
              over the samples that have rows (0 if none has); cross-entropy is HF's: mean
              over the batch's non-ignored targets, or their sum / ``num_items_in_batch``.
            - ``"token_mean"``: sum over all rows (targets) / ``num_items_in_batch`` if given,
              else / the number of rows (targets); 0 when there are none.
            - ``"sum"``: sum over all rows (targets).
            - ``"none"``: per sample ``[B]``: the mean over the sample's rows (targets), 0 for
              a sample with none.

            ``num_items_in_batch`` is used only by ``"token_mean"`` and by the cross-entropy of
            ``"paper"``.
        num_items_in_batch: the global count to divide by (gradient accumulation, as HF).
        student_vocab_size, teacher_vocab_size: use only ``logits[..., :vocab_size]``
            (padded lm_head columns left out), for both terms.
        alignment: ``"paper"`` pairs student row ``start_s + k`` with teacher row
            ``start_t + k``; ``"trl_observed"`` pairs ``start_s + 1 + k`` with
            ``start_t + 1 + k`` (TRL GOLD's default "observed" slice, one row late per
            TRL PR #5905; offered to reproduce TRL runs). Pairs with a row past the end of
            its sequence are dropped.
        student_rows, teacher_rows: 1-D int64 or int32 indices into the flattened ``[B*Ls]`` /
            ``[B*Lt]`` rows, paired one to one, the student rows distinct. When given, labels, ``skip_*_eos`` and
            ``alignment`` do not affect the distillation term, and ``reduction`` does not
            apply to it: distillation = ``distillation_weight * sum_r row_weights[r] * L_r``
            (a scalar; with ``reduction="none"`` each row's term is attributed to the sample
            of its student row, giving ``[B]``). Labels still give the cross-entropy.
        row_weights: ``[N]`` weights of the explicit rows; default ``1 / N``.
        top_k: the ULD row loss over the first ``top_k`` sorted ranks only (the truncated
            variant, ``reference.uld.uld_row_losses_reference``); None: all ranks.
        hybrid: None, or a ``uld_kernels.HybridULD``: the row loss is then
            ``reference.uld.uld_hybrid_row_losses_reference`` with its shared tokens and
            options (TRL's adaptive weights over the teacher's columns as read here).

    Returns:
        ``(total, crossentropy, distillation)`` where ``crossentropy`` includes
        ``crossentropy_weight``, ``distillation`` includes ``distillation_weight`` and
        ``total = crossentropy + distillation``.

    Shape:
        Scalars, or ``[B]`` each with ``reduction="none"``.

    Example::

        >>> s = torch.randn(2, 6, 5, dtype=torch.float64)  # student [B, Ls, Vs]
        >>> t = torch.randn(2, 7, 4, dtype=torch.float64)  # teacher [B, Lt, Vt]
        >>> ls = torch.tensor([[-100, -100, 1, 2, 3, 4], [-100, 0, 1, -100, -100, -100]])
        >>> lt = torch.tensor([[-100, -100, -100, 0, 1, 2, 3],
        ...                    [-100, -100, 3, 2, -100, -100, -100]])
        >>> total, ce, dist = uld_distillation_loss_reference(s, t, ls, lt)
    """
    num_items_in_batch = _check_arguments(
        student_logits, teacher_logits, student_labels, teacher_labels, reduction, alignment,
        num_items_in_batch, student_vocab_size, teacher_vocab_size, student_rows, teacher_rows, row_weights)

    check_top_k("top_k", top_k)
    if top_k is not None and hybrid is not None:
        raise ValueError("top_k and hybrid cannot be combined")
    # Padded lm_head columns get real logits: leave them out, or they become fake tail mass.
    if student_vocab_size is not None:
        student_logits = student_logits[..., :student_vocab_size]
    if teacher_vocab_size is not None:
        teacher_logits = teacher_logits[..., :teacher_vocab_size]
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(student_logits.device)

    batch, student_length, _ = student_logits.shape
    teacher_length = teacher_logits.shape[1]

    crossentropy = crossentropy_weight * _cross_entropy(
        student_logits, student_labels, ignore_index, reduction, num_items_in_batch)

    if student_rows is not None:
        distillation = distillation_weight * _explicit_rows_distillation(
            student_logits, teacher_logits, student_rows, teacher_rows, row_weights,
            student_temperature, teacher_temperature, per_sample=reduction == "none", top_k=top_k, hybrid=hybrid)
        return crossentropy + distillation, crossentropy, distillation

    row_offset = 1 if alignment == "trl_observed" else 0
    sample_row_losses = []  # one [n_i] tensor per sample
    for i in range(batch):
        student_start, student_size = answer_start_and_size(student_labels[i], ignore_index)
        teacher_start, teacher_size = answer_start_and_size(teacher_labels[i], ignore_index)
        if skip_student_eos:
            student_size = max(student_size - 1, 0)
        if skip_teacher_eos:
            teacher_size = max(teacher_size - 1, 0)
        student_first = student_start + row_offset
        teacher_first = teacher_start + row_offset
        pairs = min(student_size, teacher_size)
        # Rows must stay inside the sequences: pairs that would run past either end are dropped.
        pairs = max(0, min(pairs, student_length - student_first, teacher_length - teacher_first))
        student_answer_rows = student_logits[i, student_first:student_first + pairs, :]
        teacher_answer_rows = teacher_logits[i, teacher_first:teacher_first + pairs, :]
        sample_row_losses.append(_row_losses(
            student_answer_rows, teacher_answer_rows, student_temperature, teacher_temperature, top_k, hybrid))

    all_row_losses = torch.cat(sample_row_losses)
    # An empty sum: 0 in the loss dtype, still part of the autograd graph.
    zero = all_row_losses.sum()
    if reduction == "paper":
        sample_means = [rows.mean() for rows in sample_row_losses if rows.numel() > 0]
        distillation = torch.stack(sample_means).mean() if sample_means else zero
    elif reduction == "token_mean":
        if num_items_in_batch is not None:
            distillation = all_row_losses.sum() / num_items_in_batch
        elif all_row_losses.numel() > 0:
            distillation = all_row_losses.sum() / all_row_losses.numel()
        else:
            distillation = zero
    elif reduction == "sum":
        distillation = all_row_losses.sum()
    else:  # "none"
        distillation = torch.stack(
            [rows.mean() if rows.numel() > 0 else rows.sum() for rows in sample_row_losses])
    distillation = distillation_weight * distillation
    return crossentropy + distillation, crossentropy, distillation


def _row_losses(student_rows, teacher_rows, student_temperature, teacher_temperature, top_k, hybrid):
    """The row loss of aligned rows: ULD (``top_k`` ranks), or the hybrid loss."""
    if hybrid is None:
        return uld_row_losses_reference(student_rows, teacher_rows, student_temperature, teacher_temperature, top_k)
    return uld_hybrid_row_losses_reference(
        student_rows, teacher_rows, hybrid.match.student_ids, hybrid.match.teacher_ids, student_temperature,
        teacher_temperature, beta=hybrid.beta, matched_weight=hybrid.matched_weight,
        unmatched_weight=hybrid.unmatched_weight, unmatched_top=hybrid.unmatched_top, prob_floor=hybrid.prob_floor)


def _explicit_rows_distillation(student_logits, teacher_logits, student_rows, teacher_rows,
                                row_weights, student_temperature, teacher_temperature,
                                per_sample, top_k=None, hybrid=None):
    """``sum_r row_weights[r] * L_r`` over explicitly paired flat rows (weights default 1/N);
    with ``per_sample`` the terms are summed per sample of the student row instead, ``[B]``."""
    batch, student_length, student_vocab = student_logits.shape
    teacher_vocab = teacher_logits.shape[-1]
    student_flat = student_logits.reshape(-1, student_vocab)
    teacher_flat = teacher_logits.reshape(-1, teacher_vocab)
    row_losses = _row_losses(student_flat[student_rows.long()], teacher_flat[teacher_rows.long()],
                             student_temperature, teacher_temperature, top_k, hybrid)
    pairs = row_losses.numel()
    if row_weights is None:
        weights = torch.full((pairs,), 1.0 / max(pairs, 1), dtype=row_losses.dtype,
                             device=row_losses.device)
    else:
        weights = row_weights.to(device=row_losses.device, dtype=row_losses.dtype)
    weighted = weights * row_losses
    if not per_sample:
        return weighted.sum()
    sample_of_row = student_rows.long().tolist()
    per_sample_terms = []
    for i in range(batch):
        mine = [r for r, flat in enumerate(sample_of_row) if flat // student_length == i]
        per_sample_terms.append(weighted[mine].sum())
    return torch.stack(per_sample_terms)
