"""Checks at the API boundary: run before any kernel, read only metadata (no host sync)."""

from __future__ import annotations

import math
from numbers import Real

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_logits(name: str, logits: object, ndim: int = 2) -> torch.Tensor:
    """A floating tensor ``[N, V]`` (or ``[B, L, V]`` with ``ndim=3``) with V >= 1, in a dtype
    the kernels read."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != ndim:
        expected = "2-D [rows, vocabulary]" if ndim == 2 else "3-D [batch, sequence, vocabulary]"
        hint = ("; flatten the leading dimensions of [B, L, V] logits, or use "
                "uld_distillation_loss for batches with labels") if ndim == 2 else ""
        raise ValueError(f"{name} must be {expected}, got {logits.dim()}-D shape "
                         f"{tuple(logits.shape)}{hint}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16 or float16, got {logits.dtype}"
            + (" (use reference.uld_loss_reference for float64)" if logits.dtype == torch.float64 else "")
        )
    if logits.shape[1] < 1:
        raise ValueError(f"{name} must have a vocabulary of at least 1, got shape {tuple(logits.shape)}")
    return logits


# The kernels take 1 / T as a float32 argument (a normal float32 from 1.2e-38 to 3.4e38); a
# temperature outside these bounds would reach them as a float64 (Triton's type for other
# values) or overflow: far outside any use (0.1 to 10 in practice), refused with an error.
MIN_TEMPERATURE = 1e-30
MAX_TEMPERATURE = 1e30


def check_temperature(name: str, value: object) -> float:
    """A finite real number in [MIN_TEMPERATURE, MAX_TEMPERATURE]."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    if not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        raise ValueError(f"{name} must lie in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (the kernels take 1 / "
                         f"{name} in float32), got {value}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_aligned_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Same number of rows, same device."""
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(
            "student_logits and teacher_logits must have the same number of rows, got "
            f"{student_logits.shape[0]} and {teacher_logits.shape[0]}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            "student_logits and teacher_logits must be on the same device, got "
            f"{student_logits.device} and {teacher_logits.device}"
        )


def check_finite(name: str, value: object) -> float:
    """A finite real number (a weight)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_vocab_size(name: str, value: object, full: int) -> int:
    """None (all columns) or an int in [1, full]: the leading columns that are real tokens."""
    if value is None:
        return full
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= full:
        raise ValueError(f"{name} must be an int in [1, {full}] (the logits' last dimension), got {value!r}")
    return value


def check_labels(name: str, labels: object, logits: torch.Tensor) -> torch.Tensor:
    """Integer labels shaped like the logits' ``[B, L]``."""
    if (not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point
            or labels.dtype.is_complex or labels.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"{name} must have shape {tuple(logits.shape[:2])} (the logits' batch and "
                         f"sequence), got {tuple(labels.shape)}")
    return labels
