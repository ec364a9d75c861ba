"""Which student row meets which teacher row, computed on the device from the labels.

Everything here is a fixed-size tensor computation: no Python loop over samples, no
data-dependent shape, so no host synchronisation. Pairs live in ``[B, K]`` slots
(``K = min(Ls, Lt)``), a slot with no pair holds -1.

The paper's alignment (llm-recipes ``models/distillation_model.py``): for each sample and
side, answer size = number of labels that are not ``ignore_index``; answer start = length of
the leading run of ``ignore_index`` minus 1 (0 when the labels do not start with it), i.e. the
logits row that predicts the first answer token. ``skip_*_eos`` drops the last answer token of
that side. The first ``n = min(size_s, size_t)`` answer rows pair up one to one. TRL GOLD's
default "observed" slice reads each side one row later (TRL PR #5905 calls it misaligned; it
is offered to reproduce TRL runs). A pair whose row would fall past the sequence is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALIGNMENTS = ("paper", "trl_observed")


@dataclass
class RowPairs:
    """Flat row indices (into the ``B * L`` rows of each side) of the distillation pairs."""

    student_index: torch.Tensor  # [B * K] int64, -1 where a slot holds no pair
    teacher_index: torch.Tensor  # [B * K] int64
    rows_per_sample: torch.Tensor  # [B] int64
    slots: int  # K


def answer_spans(labels: torch.Tensor, ignore_index: int, skip_eos: bool):
    """Per sample: (start row, answer size) of ``labels [B, L]`` as the paper's code reads them."""
    answer = labels != ignore_index
    size = answer.sum(dim=1)
    # The leading run of ignored labels: L when none is answer, 0 rows when L is 0.
    leading = (answer.cumsum(dim=1) == 0).sum(dim=1)
    start = (leading - 1).clamp(min=0)
    if skip_eos:
        size = (size - 1).clamp(min=0)
    return start, size


def pair_rows(student_labels: torch.Tensor, teacher_labels: torch.Tensor, *, ignore_index: int,
              skip_student_eos: bool, skip_teacher_eos: bool, alignment: str) -> RowPairs:
    batch, student_len = student_labels.shape
    teacher_len = teacher_labels.shape[1]
    device = student_labels.device
    s_start, s_size = answer_spans(student_labels, ignore_index, skip_student_eos)
    t_start, t_size = answer_spans(teacher_labels, ignore_index, skip_teacher_eos)
    shift = 1 if alignment == "trl_observed" else 0
    slots = min(student_len, teacher_len)
    k = torch.arange(slots, device=device)
    n = torch.minimum(s_size, t_size)[:, None]
    s_pos = s_start[:, None] + shift + k
    t_pos = t_start[:, None] + shift + k
    valid = (k < n) & (s_pos < student_len) & (t_pos < teacher_len)
    b = torch.arange(batch, device=device)[:, None]
    student_index = torch.where(valid, b * student_len + s_pos, -1)
    teacher_index = torch.where(valid, b * teacher_len + t_pos, -1)
    return RowPairs(student_index.reshape(-1), teacher_index.reshape(-1), valid.sum(dim=1), slots)


def next_token_targets(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``[B, L]``: the token each logits row predicts (Hugging Face's shift: row j predicts
    label j + 1), -1 where there is none (ignored, or past the end)."""
    targets = torch.full_like(labels, -1)
    targets[:, :-1] = torch.where(labels[:, 1:] != ignore_index, labels[:, 1:], -1)
    return targets
