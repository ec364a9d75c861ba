"""Checks at the API boundary: run before any kernel, read only metadata (no host sync)."""

from __future__ import annotations

import math
from numbers import Real

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_logits(name: str, logits: object) -> torch.Tensor:
    """A 2-D floating tensor ``[N, V]`` with V >= 1, in a dtype the kernels read."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D [rows, vocabulary], got {logits.dim()}-D shape "
            f"{tuple(logits.shape)}; flatten the leading dimensions of [B, L, V] logits or "
            f"use ULD's answer-span API"
        )
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16 or float16, got {logits.dtype}"
            + (" (use reference.uld_loss_reference for float64)" if logits.dtype == torch.float64 else "")
        )
    if logits.shape[1] < 1:
        raise ValueError(f"{name} must have a vocabulary of at least 1, got shape {tuple(logits.shape)}")
    return logits


def check_temperature(name: str, value: object) -> float:
    """A finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
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
