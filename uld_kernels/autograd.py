"""The autograd layer: two torch.library custom ops and the autograd Function around them.

``uld_kernels::uld_loss`` runs the fused kernel: the reduced loss and, for the sides that
need it, the gradient of that loss (upstream gradient 1). ``uld_kernels::scale_rows_``
multiplies a saved gradient by the real upstream gradient in place, on the device, and
skips rows whose factor is exactly 1. So backward never syncs with the host, and the usual
``loss.backward()`` moves no extra bytes. Both ops have fake (meta) implementations, so
``torch.compile(fullgraph=True)`` traces ``ULDFunction`` without a graph break.
"""

from __future__ import annotations

import torch

from uld_kernels.launch import scale_rows_, uld_rows

REDUCTIONS = ("mean", "sum", "none")


def _reduce_rows(row_loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return row_loss
    if reduction == "sum":
        return row_loss.sum()
    return row_loss.mean()


@torch.library.custom_op("uld_kernels::uld_loss", mutates_args=())
def uld_loss_op(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_temperature: float,
    teacher_temperature: float,
    reduction: str,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduced ULD loss and the gradients of it (empty tensors for sides not asked for)."""
    n_rows = student_logits.shape[0]
    grad_scale = 1.0 / n_rows if reduction == "mean" and n_rows > 0 else 1.0
    row_loss, _status, grad_student, grad_teacher = uld_rows(
        student_logits, teacher_logits, student_temperature, teacher_temperature,
        student_grad, teacher_grad, grad_scale,
    )
    return (
        _reduce_rows(row_loss, reduction),
        grad_student if grad_student is not None else student_logits.new_empty(0),
        grad_teacher if grad_teacher is not None else teacher_logits.new_empty(0),
    )


@uld_loss_op.register_fake
def _uld_loss_fake(student_logits, teacher_logits, student_temperature, teacher_temperature,
                   reduction, student_grad, teacher_grad):
    n_rows = student_logits.shape[0]
    loss_shape = (n_rows,) if reduction == "none" else ()
    loss = student_logits.new_empty(loss_shape, dtype=torch.float32)
    grad_student = student_logits.new_empty(student_logits.shape if student_grad else (0,))
    grad_teacher = teacher_logits.new_empty(teacher_logits.shape if teacher_grad else (0,))
    return loss, grad_student, grad_teacher


@torch.library.custom_op("uld_kernels::scale_rows_", mutates_args=("grad",))
def scale_rows_op(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """In place: each row of ``grad`` times ``scale`` (a scalar, or one value per row)."""
    scale_rows_(grad, scale.detach().reshape(-1).contiguous())


@scale_rows_op.register_fake
def _scale_rows_fake(grad, scale):
    return None


class ULDFunction(torch.autograd.Function):
    """Autograd Function of the fused ULD loss over aligned rows.

    ``ULDFunction.apply(student_logits, teacher_logits, student_temperature,
    teacher_temperature, reduction, grad_enabled)``; gradients flow to whichever logits
    require them. ``grad_enabled`` is ``torch.is_grad_enabled()`` at the call (inside
    ``forward`` grad mode is always off): under ``torch.no_grad()`` no gradient is computed or
    allocated, and the forward writes nothing per element.
    Calling backward twice through one graph (``retain_graph=True``) raises: the saved
    gradient is scaled in place.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, student_temperature, teacher_temperature,
                reduction, grad_enabled=True):
        student_grad = bool(ctx.needs_input_grad[0] and grad_enabled)
        teacher_grad = bool(ctx.needs_input_grad[1] and grad_enabled)
        loss, grad_student, grad_teacher = torch.ops.uld_kernels.uld_loss(
            student_logits, teacher_logits, float(student_temperature),
            float(teacher_temperature), reduction, student_grad, teacher_grad,
        )
        ctx.save_for_backward(grad_student, grad_teacher)
        ctx.student_grad = student_grad
        ctx.teacher_grad = teacher_grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_student, grad_teacher = ctx.saved_tensors
        if ctx.student_grad:
            torch.ops.uld_kernels.scale_rows_(grad_student, grad_loss)
        else:
            grad_student = None
        if ctx.teacher_grad:
            torch.ops.uld_kernels.scale_rows_(grad_teacher, grad_loss)
        else:
            grad_teacher = None
        return grad_student, grad_teacher, None, None, None, None
