"""Drop-in ULD distillation for training: answer spans from labels, alignment, the student's
cross-entropy in the same passes, reductions. ``uld_distillation_loss`` and ``ULDLoss``.

Layers: alignment.py computes the row pairs and weights on the device (no host sync); the
custom op ``uld_kernels::uld_distill`` runs the fused kernels over the ``[B, L, V]`` logits
in place (rows gathered by index inside the kernels, never copied); ``ULDDistillFunction``
scales the gradient computed in the forward pass by the upstream gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from uld_kernels.alignment import ALIGNMENTS, next_token_targets, pair_rows
from uld_kernels.api import reference_module
from uld_kernels import launch
from uld_kernels.autograd import call_op, custom_op
from uld_kernels.hybrid import HybridULD, hybrid_forward
from uld_kernels.topk import topk_forward, topk_side_grad, truncates
from uld_kernels.launch import (cross_entropy_rows, hist_pairs, interpreter_enabled, rows_written, uld_pairs,
                                zero_unwritten_)
from uld_kernels.validation import (
    check_choice,
    check_finite,
    check_labels,
    check_logits,
    check_num_items,
    check_row_pairs,
    check_temperature,
    check_top_k,
    check_vocab_size,
)

REDUCTIONS = ("paper", "token_mean", "sum", "none")


@custom_op("uld_distill")
def uld_distill_op(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_vocab: int,
    teacher_vocab: int,
    student_index: torch.Tensor,
    teacher_index: torch.Tensor,
    pair_weight: torch.Tensor,
    ce_index: torch.Tensor,
    ce_label: torch.Tensor,
    ce_weight: torch.Tensor,
    student_temperature: float,
    teacher_temperature: float,
    has_ce: bool,
    student_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row ULD losses of the pairs, cross-entropies of the pairs' rows and of the other
    answer rows, and the gradient (``[B, Ls, V]``, empty when not asked) of
    ``sum pair_weight * uld + sum ce_weight * ce``."""
    student = student_logits[..., :student_vocab]
    teacher = teacher_logits[..., :teacher_vocab]
    n_rows = student_logits.shape[0] * student_logits.shape[1]
    device = student_logits.device
    grad = grad_used = None
    if student_grad:
        # Full width, so that padded lm_head columns get their zero gradient without a copy;
        # only what the kernels below leave unwritten is zeroed.
        grad = torch.empty((n_rows, student_logits.shape[-1]), dtype=student_logits.dtype, device=device)
        # Rows written whole below: the pairs' student rows (uld_pairs) and, with the
        # cross-entropy, row ce_index[r] where ce_index[r] and ce_label[r] are both >= 0
        # (cross_entropy_rows).
        ce_rows = (torch.where(ce_label >= 0, ce_index, -1),) if has_ce else ()
        zero_unwritten_(grad, rows_written(n_rows, student_index, *ce_rows, device=device), student_vocab)
        grad_used = grad[:, :student_vocab]
    # Pairs first, padding slots last (a stable order: deterministic): the engine's batches
    # then hold pairs only, and the trailing all-padding ones cost their launches alone.
    order = torch.argsort((student_index < 0).to(torch.int8), stable=True)
    pair_student, pair_teacher = student_index[order], teacher_index[order]
    safe = pair_student.clamp(min=0)
    pair_label = torch.where(pair_student >= 0, ce_label[safe], -1) if has_ce else None
    # The pairs' ULD and cross-entropy: bf16 pairs (and float32 ones holding bf16 values)
    # through the histogram engine (unless ULD_DISTILL_ENGINE=split), others through the trie.
    engine = hist_pairs if (launch.DISTILL_ENGINE == "hist" and launch.hist_takes(student, teacher)) else uld_pairs
    rows, _status, pair_ce, _, _ = engine(
        student, teacher, student_temperature, teacher_temperature, student_grad, False, 1.0,
        student_index=pair_student, teacher_index=pair_teacher, row_weight=pair_weight[order],
        ce_label=pair_label, ce_weight=ce_weight[safe] if has_ce else None, grad_student=grad_used)
    rows = torch.empty_like(rows).scatter_(0, order, rows)
    if has_ce:
        pair_ce = torch.empty_like(pair_ce).scatter_(0, order, pair_ce)
        other_ce = cross_entropy_rows(student, ce_index, ce_label, ce_weight, grad_used)
    else:
        other_ce = torch.zeros(ce_index.shape, dtype=torch.float32, device=device)
        pair_ce = torch.zeros_like(rows)
    grad = grad.view(student_logits.shape) if student_grad else student_logits.new_empty(0)
    return rows, pair_ce, other_ce, grad


@uld_distill_op.register_fake
def _uld_distill_fake(student_logits, teacher_logits, student_vocab, teacher_vocab, student_index,
                      teacher_index, pair_weight, ce_index, ce_label, ce_weight,
                      student_temperature, teacher_temperature, has_ce, student_grad):
    rows = student_index.new_empty(student_index.shape, dtype=torch.float32)
    grad = student_logits.new_empty(student_logits.shape if student_grad else (0,))
    return rows, torch.empty_like(rows), ce_index.new_empty(ce_index.shape, dtype=torch.float32), grad


class ULDDistillFunction(torch.autograd.Function):
    """Autograd of the full distillation loss: ``total`` carries the gradient; ``ce`` and
    ``distillation`` are returned for logging and are not differentiable.

    With ``plan["top_k"]`` the ULD term is the truncated variant (uld_kernels/topk.py): the
    fused op computes the cross-entropy of every answer row and its gradient, and the truncated
    rows' gradient is added into that buffer in the backward (one ``[B, Ls, V]`` buffer, not a
    second one that autograd sums)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, pair_weight, plan):
        top_k, hybrid = plan["top_k"], plan["hybrid"]
        student_grad = bool(ctx.needs_input_grad[0] and plan["grad_enabled"])
        student_index, teacher_index = plan["student_index"], plan["teacher_index"]
        no_pairs = student_index[:0]
        rows, pair_ce, other_ce, grad = call_op(
            "uld_distill", student_logits, teacher_logits, plan["student_vocab"], plan["teacher_vocab"],
            *((no_pairs, no_pairs, pair_weight[:0]) if top_k or hybrid else (student_index, teacher_index, pair_weight)),
            plan["ce_index"], plan["ce_label"], plan["ce_weight"],
            plan["student_temperature"], plan["teacher_temperature"], plan["has_ce"],
            student_grad and (plan["has_ce"] or not top_k),  # top_k alone: its gradient in the backward
        )
        saved = (None,) * 3
        if top_k:  # the teacher gets no gradient from the training loss
            rows, tensors, ctx.kernels, _, _ = topk_forward(
                student_logits[..., :plan["student_vocab"]], teacher_logits.detach()[..., :plan["teacher_vocab"]],
                top_k, plan["student_temperature"], plan["teacher_temperature"], (student_grad, False),
                student_index, teacher_index)
            saved = tensors[:3]
            pair_ce = torch.zeros_like(rows)  # every answer row's cross-entropy is in other_ce
        if hybrid:  # PyTorch by chunks: its gradient added into the cross-entropy's buffer now, scaled with it
            rows, _ = hybrid_forward(
                student_logits[..., :plan["student_vocab"]], teacher_logits.detach()[..., :plan["teacher_vocab"]],
                hybrid, (plan["student_temperature"], plan["teacher_temperature"]), pair_weight, (student_grad, False),
                student_index, teacher_index, out=grad.view(-1, grad.shape[-1]) if student_grad else None)
            pair_ce = torch.zeros_like(rows)
        batch = student_logits.shape[0]
        distill = pair_weight * rows
        ce_pairs = plan["ce_weight"][student_index.clamp(min=0)] * pair_ce
        ce_other = plan["ce_weight"] * other_ce
        if plan["per_sample"]:
            seq_len = student_logits.shape[1]
            distill = _per_sample(distill, student_index, batch, seq_len)
            ce = _per_sample(ce_pairs, student_index, batch, seq_len) + ce_other.view(batch, -1).sum(dim=1)
        else:
            distill, ce = distill.sum(), ce_pairs.sum() + ce_other.sum()
        ctx.student_grad = student_grad
        # Explicit row_weights that require grad: d total / d pair_weight[i] = rows[i].
        ctx.weight_grad = bool(ctx.needs_input_grad[2] and plan["grad_enabled"])
        truncated = bool(top_k) and student_grad
        ctx.save_for_backward(grad, rows if ctx.weight_grad else None,
                              student_index if ctx.weight_grad or truncated else None,
                              student_logits if truncated else None, pair_weight if truncated else None, *saved)
        ctx.seq_len = student_logits.shape[1]
        ctx.top_k, ctx.has_ce = top_k, plan["has_ce"]
        ctx.plan = {key: plan[key] for key in ("student_vocab", "student_temperature")}
        ctx.mark_non_differentiable(ce, distill)
        return ce + distill, ce, distill

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_distill):
        grad, rows, student_index, student_logits, pair_weight, *saved = ctx.saved_tensors
        # Per sample ("none"): each pair's factor is its student row's sample's.
        def per_pair(values):
            return values[student_index.clamp(min=0) // ctx.seq_len] if values.dim() == 1 else values

        grad_weight = per_pair(grad_total) * rows if ctx.weight_grad else None
        if not ctx.student_grad:
            return None, None, grad_weight, None
        if ctx.top_k and not ctx.has_ce:  # no cross-entropy buffer: one for the truncated rows' gradient alone
            grad = torch.zeros_like(student_logits, memory_format=torch.contiguous_format)
        flat = grad.view(-1, grad.shape[-1])
        if ctx.has_ce or not ctx.top_k:
            scale = grad_total.repeat_interleave(ctx.seq_len) if grad_total.dim() == 1 else grad_total
            call_op("scale_rows_", flat, scale)
        if ctx.top_k:  # the truncated rows' gradient, added into the cross-entropy's
            topk_side_grad(student_logits[..., :ctx.plan["student_vocab"]], student_index, saved,
                           pair_weight * per_pair(grad_total), ctx.plan["student_temperature"], ctx.top_k,
                           ctx.kernels, out=flat)
        return grad, None, grad_weight, None


def _check_hybrid(hybrid, top_k, student_vocab=None, teacher_vocab=None):
    """A HybridULD or None, not with top_k; with the widths, its ids inside them."""
    if hybrid is None:
        return
    if not isinstance(hybrid, HybridULD):
        raise TypeError(f"hybrid must be None or a uld_kernels.HybridULD, got {type(hybrid).__name__}")
    if top_k is not None:
        raise ValueError(f"top_k and hybrid cannot be combined (top_k={top_k}): the hybrid loss sorts every "
                         "unmatched column, or cuts both sides at its own unmatched_top")
    if student_vocab is not None:
        hybrid.check_widths(student_vocab, teacher_vocab, ("student_logits (student_vocab_size)",
                                                           "teacher_logits (teacher_vocab_size)"))


def _check_inputs(student_logits, teacher_logits, student_labels, teacher_labels):
    check_logits("student_logits", student_logits, ndim=3)
    check_logits("teacher_logits", teacher_logits, ndim=3)
    check_labels("student_labels", student_labels, student_logits)
    check_labels("teacher_labels", teacher_labels, teacher_logits)
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"student_logits and teacher_logits must have the same batch size, got "
                         f"{student_logits.shape[0]} and {teacher_logits.shape[0]}")
    devices = {t.device for t in (student_logits, teacher_logits, student_labels, teacher_labels)}
    if len(devices) > 1:
        raise ValueError(f"logits and labels must be on one device, got {sorted(map(str, devices))}")


def _check_options(reduction, alignment, student_temperature, teacher_temperature,
                   distillation_weight, crossentropy_weight) -> tuple[float, float, float, float]:
    """The options that do not depend on the batch; the numbers as floats."""
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("alignment", alignment, ALIGNMENTS)
    return (check_temperature("student_temperature", student_temperature),
            check_temperature("teacher_temperature", teacher_temperature),
            check_finite("distillation_weight", distillation_weight),
            check_finite("crossentropy_weight", crossentropy_weight))


def uld_distillation_loss(
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
    hybrid: HybridULD | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's ULD training loss on two batches read through two tokenizers.

    Args:
        student_logits: ``[B, Ls, Vs]`` (any strides: ``logits[:, :-1]`` is read in place).
        teacher_logits: ``[B, Lt, Vt]``.
        student_labels, teacher_labels: ``[B, Ls]`` / ``[B, Lt]`` integer labels,
            ``ignore_index`` on prompt and padding.
        distillation_weight: weight of the ULD term. The paper's class defaults to 1.0 and
            its training used 1.5.
        crossentropy_weight: weight of the student's next-token cross-entropy (Hugging Face's
            shift: row j predicts label j + 1; temperature 1). 0 skips it at no cost.
        student_temperature, teacher_temperature: softmax temperatures of the ULD term.
        skip_student_eos, skip_teacher_eos: drop the last answer token of that side (the paper
            trained with ``skip_student_eos=True``).
        reduction: ``"paper"`` (ULD: mean over each sample's rows, then over samples that have
            rows; CE: mean over the batch's target tokens), ``"token_mean"`` (both: sum over
            rows / ``num_items_in_batch``, or / their count), ``"sum"``, or ``"none"`` (``[B]``
            per sample). With ``num_items_in_batch``, ``"paper"`` and ``"token_mean"`` divide
            the cross-entropy sum by it, as Hugging Face does for gradient accumulation, and
            ``"token_mean"`` divides the ULD sum by it too. A number > 0, or a one-element
            tensor (Hugging Face's; its value is not read on the host).
        student_vocab_size, teacher_vocab_size: leave out padded lm_head columns (Qwen2.5's
            lm_head has 151,936 or 152,064 rows for 151,665 tokens).
        alignment: ``"paper"`` (default) or ``"trl_observed"`` (one row later on both sides:
            TRL GOLD's default slice, which TRL PR #5905 calls misaligned; for reproducing
            TRL runs).
        student_rows, teacher_rows, row_weights: explicit pairs instead of the alignment: 1-D
            int64 or int32 flat row indices into ``B * Ls`` / ``B * Lt`` (student rows distinct)
            and finite weights (default ``1 / len``); their values are checked on the host (one
            sync a call, on this path only; under ``torch.compile``, asserts in the graph). The ULD term is then ``distillation_weight *
            sum(row_weights * row_loss)`` (with ``"none"``: that sum per sample of the student
            row); ``reduction`` applies to the cross-entropy only.
        top_k: None (the paper's loss), or ``k >= 1``: the truncated variant of
            ``uld_loss(top_k=k)`` for the ULD term (distillKitPlus: ``top_k=100``, both
            temperatures 2.0, ``alignment="trl_observed"``): the top-k select
            (uld_kernels/topk.py) beside the fused cross-entropy, its gradient added into the
            cross-entropy's ``[B, Ls, Vs]`` buffer in the backward (one buffer). The teacher
            gets no gradient. ``k`` past both vocabulary sizes is the exact loss, computed by the
            fused kernels.
        hybrid: None, or a ``HybridULD(match, ...)``: TRL GOLD's hybrid loss
            (``uld_loss_hybrid``) as the row loss of the ULD term, on the same pairs and
            weights. TRL's adaptive weights count the teacher's columns as read
            (``teacher_vocab_size`` if given). It runs in PyTorch by chunks (not fused; host syncs
            in each chunk, so no ``fullgraph`` trace), its gradient added into the
            cross-entropy's buffer. Not with ``top_k``.

    Returns:
        ``(total, ce, distillation)``, float32, with the weights applied;
        ``total = ce + distillation``. Only ``total`` is differentiable (the other two are for
        logging). Scalars, or ``[B]`` for ``reduction="none"``.

    A sample with no answer rows (after the EOS skip) contributes nothing to the ULD term.
    The paper's code returns NaN there.
    """
    _check_inputs(student_logits, teacher_logits, student_labels, teacher_labels)
    (student_temperature, teacher_temperature, distillation_weight,
     crossentropy_weight) = _check_options(reduction, alignment, student_temperature, teacher_temperature,
                                           distillation_weight, crossentropy_weight)
    student_vocab = check_vocab_size("student_vocab_size", student_vocab_size, student_logits.shape[-1])
    teacher_vocab = check_vocab_size("teacher_vocab_size", teacher_vocab_size, teacher_logits.shape[-1])
    num_items_in_batch = check_num_items("num_items_in_batch", num_items_in_batch)
    top_k = check_top_k("top_k", top_k)
    _check_hybrid(hybrid, top_k, student_vocab, teacher_vocab)
    student_rows, teacher_rows = check_row_pairs(
        student_rows, teacher_rows, row_weights, student_logits.shape[0] * student_logits.shape[1],
        teacher_logits.shape[0] * teacher_logits.shape[1])

    if student_logits.device.type == "cpu" and not interpreter_enabled():
        # (the teacher detached and only total differentiable, as on the kernels' path)
        total, ce, distill = reference_module("paper").uld_distillation_loss_reference(
            student_logits.float(), teacher_logits.detach().float(), student_labels, teacher_labels,
            distillation_weight=distillation_weight, crossentropy_weight=crossentropy_weight,
            student_temperature=student_temperature, teacher_temperature=teacher_temperature,
            skip_student_eos=skip_student_eos, skip_teacher_eos=skip_teacher_eos,
            ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
            student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size,
            alignment=alignment, student_rows=student_rows, teacher_rows=teacher_rows,
            row_weights=row_weights, top_k=top_k, hybrid=hybrid)
        return total, ce.detach(), distill.detach()

    plan = _plan(student_logits, student_labels, teacher_labels, distillation_weight,
                 crossentropy_weight, skip_student_eos, skip_teacher_eos, ignore_index, reduction,
                 num_items_in_batch, alignment, student_rows, teacher_rows, row_weights)
    plan.update(student_vocab=student_vocab, teacher_vocab=teacher_vocab,
                student_temperature=student_temperature, teacher_temperature=teacher_temperature,
                has_ce=crossentropy_weight != 0.0,
                top_k=top_k if truncates(top_k, student_vocab, teacher_vocab) else None, hybrid=hybrid)
    if plan["top_k"] or hybrid:  # the fused op computes no pair: every answer row's cross-entropy is its own kernel's
        plan["ce_index"] = torch.where(plan["ce_label"] >= 0, torch.arange(plan["ce_label"].numel(),
                                                                            device=plan["ce_label"].device), -1)
    # Grad mode is off inside forward: record it here, so that evaluation under
    # torch.no_grad() computes no gradient.
    plan["grad_enabled"] = torch.is_grad_enabled()
    return ULDDistillFunction.apply(student_logits, teacher_logits, plan.pop("pair_weight"), plan)


def _per_sample(values, student_index, batch, seq_len):
    """Each pair's value summed into the sample of its student row (padding slots: -1, none):
    a masked sum over a one-hot ``[B, N]``, deterministic (an index_add on the GPU is not), and
    masked rather than multiplied so that one sample's NaN stays in that sample."""
    sample = student_index // seq_len
    group = sample[None, :] == torch.arange(batch, device=sample.device)[:, None]
    return torch.where(group, values[None, :], 0.0).sum(dim=1)


def _plan(student_logits, student_labels, teacher_labels, distillation_weight,
          crossentropy_weight, skip_student_eos, skip_teacher_eos, ignore_index, reduction,
          num_items_in_batch, alignment, student_rows, teacher_rows, row_weights) -> dict:
    """Row maps and per-row weights of both terms, as device tensors (no host sync)."""
    batch, student_len = student_labels.shape
    device = student_labels.device
    targets = next_token_targets(student_labels, ignore_index).reshape(-1)
    has_target = targets >= 0
    if student_rows is not None:
        student_index = student_rows.to(device=device, dtype=torch.int64)
        teacher_index = teacher_rows.to(device=device, dtype=torch.int64)
        weights = (row_weights.to(device=device, dtype=torch.float32) if row_weights is not None
                   else torch.full(student_index.shape, 1.0 / max(student_index.numel(), 1), device=device))
        pair_weight = distillation_weight * weights
    else:
        pairs = pair_rows(student_labels, teacher_labels, ignore_index=ignore_index,
                          skip_student_eos=skip_student_eos, skip_teacher_eos=skip_teacher_eos,
                          alignment=alignment)
        student_index, teacher_index = pairs.student_index, pairs.teacher_index
        valid = student_index >= 0
        per_sample = pairs.rows_per_sample.repeat_interleave(pairs.slots).clamp(min=1).float()
        if reduction == "paper":
            samples = (pairs.rows_per_sample > 0).sum().clamp(min=1).float()
            weights = 1.0 / (per_sample * samples)
        elif reduction == "token_mean":
            count = num_items_in_batch if num_items_in_batch is not None else valid.sum().clamp(min=1)
            weights = torch.ones_like(per_sample) / torch.as_tensor(count, device=device).float()
        elif reduction == "sum":
            weights = torch.ones_like(per_sample)
        else:
            weights = 1.0 / per_sample
        pair_weight = torch.where(valid, distillation_weight * weights, 0.0)

    # Cross-entropy weights per student row.
    if reduction == "none":
        count = has_target.view(batch, student_len).sum(dim=1).clamp(min=1).float()
        ce_weight = crossentropy_weight / count.repeat_interleave(student_len)
    elif reduction == "sum":
        ce_weight = torch.full(targets.shape, crossentropy_weight, device=device)
    else:
        count = num_items_in_batch if num_items_in_batch is not None else has_target.sum().clamp(min=1)
        ce_weight = crossentropy_weight / torch.as_tensor(count, device=device).float().expand(targets.shape)
    ce_weight = torch.where(has_target, ce_weight, 0.0).contiguous()

    # Rows with a target that no pair reads get their cross-entropy from their own kernel.
    n_rows = batch * student_len
    paired = torch.zeros(n_rows + 1, dtype=torch.bool, device=device)
    paired.scatter_(0, torch.where(student_index >= 0, student_index, n_rows),
                    torch.ones_like(student_index, dtype=torch.bool))
    rows = torch.arange(n_rows, device=device)
    ce_index = torch.where(has_target & ~paired[:n_rows], rows, -1)
    return dict(student_index=student_index.contiguous(), teacher_index=teacher_index.contiguous(),
                pair_weight=pair_weight.float().contiguous(), ce_index=ce_index,
                ce_label=targets.contiguous(), ce_weight=ce_weight.float(),
                per_sample=reduction == "none")


class ULDLoss(nn.Module):
    """``nn.Module`` form of ``uld_distillation_loss``: the options go to the constructor,
    the batch to ``forward``, which returns ``(total, ce, distillation)``.

    Example::

        uld = ULDLoss(distillation_weight=1.5, skip_student_eos=True)
        total, ce, distill = uld(student_logits, teacher_logits, student_labels, teacher_labels)
        total.backward()

    In a Hugging Face ``Trainer``, use ``uld_kernels.trainer.ULDTrainer``: with
    ``num_items_in_batch`` the Trainer stops dividing by the accumulation steps, which the
    ``"paper"`` reduction's ULD term (a per-sample mean) then needs from the caller.
    """

    def __init__(self, *, distillation_weight: float = 1.0, crossentropy_weight: float = 1.0,
                 student_temperature: float = 1.0, teacher_temperature: float = 1.0,
                 skip_student_eos: bool = False, skip_teacher_eos: bool = False,
                 ignore_index: int = -100, reduction: str = "paper",
                 student_vocab_size: int | None = None, teacher_vocab_size: int | None = None,
                 alignment: str = "paper", top_k: int | None = None, hybrid: HybridULD | None = None):
        super().__init__()
        self.options = dict(
            distillation_weight=distillation_weight, crossentropy_weight=crossentropy_weight,
            student_temperature=student_temperature, teacher_temperature=teacher_temperature,
            skip_student_eos=skip_student_eos, skip_teacher_eos=skip_teacher_eos,
            ignore_index=ignore_index, reduction=reduction, student_vocab_size=student_vocab_size,
            teacher_vocab_size=teacher_vocab_size, alignment=alignment, top_k=check_top_k("top_k", top_k),
            hybrid=hybrid)
        _check_hybrid(hybrid, self.options["top_k"])
        _check_options(reduction, alignment, student_temperature, teacher_temperature,
                       distillation_weight, crossentropy_weight)

    def forward(self, student_logits, teacher_logits, student_labels, teacher_labels, *,
                num_items_in_batch=None, student_rows=None, teacher_rows=None, row_weights=None):
        return uld_distillation_loss(
            student_logits, teacher_logits, student_labels, teacher_labels,
            num_items_in_batch=num_items_in_batch, student_rows=student_rows,
            teacher_rows=teacher_rows, row_weights=row_weights, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
