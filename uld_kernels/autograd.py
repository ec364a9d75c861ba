"""The autograd layer: two torch.library custom ops and the autograd Function around them.

``uld_kernels::uld_loss`` runs the fused kernel: the reduced loss and, for the sides that
need it, the gradient of that loss (upstream gradient 1). ``uld_kernels::scale_rows_``
multiplies a saved gradient by the real upstream gradient in place, on the device, and
skips rows whose factor is exactly 1. So backward never syncs with the host, and the usual
``loss.backward()`` moves no extra bytes. Both ops have fake (meta) implementations, so
``torch.compile(fullgraph=True)`` traces ``ULDFunction`` without a graph break. In eager mode
on plain tensors (`call_op`) the Functions call the ops' Python functions themselves: the
dispatcher's path cost ~0.1 ms of host time a call.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from uld_kernels.launch import scale_rows_, uld_rows
from uld_kernels.validation import check_choice

REDUCTIONS = ("mean", "sum", "none")


def reduce_rows(row_loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return row_loss
    if reduction == "sum":
        return row_loss.sum()
    return row_loss.mean()


_FUNCTIONS: dict[str, tuple[Callable, tuple[int, ...]]] = {}  # name -> (function, positions it mutates)


def custom_op(name: str, mutates_args: tuple[str, ...] = ()):
    """``torch.library.custom_op("uld_kernels::<name>")``, whose Python function `call_op` may
    also call itself."""
    def register(fn):
        params = list(inspect.signature(fn).parameters)
        _FUNCTIONS[name] = (fn, tuple(params.index(arg) for arg in mutates_args))
        return torch.library.custom_op(f"uld_kernels::{name}", fn, mutates_args=mutates_args)
    return register


def call_op(name: str, *args):
    """The custom op ``uld_kernels::<name>`` on ``args``, or, where nothing needs the
    dispatcher, its Python function itself: the dispatcher's path (the autograd key, a
    redispatch, the Python kernel's wrappers) took 0.05-0.23 ms of host time a forward on the
    GPU machine and 22 us a backward, a tenth of a small call's (bench/RESULTS.md,
    twenty-first session). The direct call does what the op's dispatch adds for eager plain
    tensors: the version of each tensor it mutates goes up (so a second backward through a
    graph whose saved gradient was scaled in place raises, as through the op).
    The op runs under torch.compile (its fake implementation traces), a dispatch mode (fake
    tensors) or a torch function mode, a torch.func transform, the profiler (whose traces name
    the op), and for meta tensors and tensor subclasses."""
    if not _dispatch_free(args):
        return getattr(torch.ops.uld_kernels, name)(*args)
    fn, mutated = _FUNCTIONS[name]
    out = fn(*args)
    for position in mutated:
        torch.autograd.graph.increment_version(args[position])
    return out


def _dispatch_free(args) -> bool:
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active()
                or torch._C._autograd._profiler_enabled()
                or any(isinstance(a, torch.Tensor) and (type(a) is not torch.Tensor or a.is_meta) for a in args))


@custom_op("uld_loss")
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
        reduce_rows(row_loss, reduction),
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


@custom_op("scale_rows_", mutates_args=("grad",))
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
        check_choice("reduction", reduction, REDUCTIONS)  # (the op's schema checked types; a direct call does not)
        student_grad = bool(ctx.needs_input_grad[0] and grad_enabled)
        teacher_grad = bool(ctx.needs_input_grad[1] and grad_enabled)
        loss, grad_student, grad_teacher = call_op(
            "uld_loss", student_logits, teacher_logits, float(student_temperature),
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
            call_op("scale_rows_", grad_student, grad_loss)
        else:
            grad_student = None
        if ctx.teacher_grad:
            call_op("scale_rows_", grad_teacher, grad_loss)
        else:
            grad_teacher = None
        return grad_student, grad_teacher, None, None, None, None
