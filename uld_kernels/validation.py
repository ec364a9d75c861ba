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
    if logits.shape[-1] < 1:
        raise ValueError(f"{name} must have a vocabulary of at least 1 (its last dimension), got shape "
                         f"{tuple(logits.shape)}")
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


def check_aligned_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       teacher_name: str = "teacher_logits") -> None:
    """Same number of rows, same device."""
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(
            f"student_logits and {teacher_name} must have the same number of rows, got "
            f"{student_logits.shape[0]} and {teacher_logits.shape[0]}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits and {teacher_name} must be on the same device, got "
            f"{student_logits.device} and {teacher_logits.device}"
        )


def check_finite(name: str, value: object) -> float:
    """A finite real number (a weight)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int past float's range
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def check_vocab_size(name: str, value: object, full: int) -> int:
    """None (all columns) or an int in [1, full]: the leading columns that are real tokens."""
    if value is None:
        return full
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= full:
        raise ValueError(f"{name} must be an int in [1, {full}] (the logits' last dimension), got {value!r}")
    return value


def check_top_k(name: str, value: object) -> int | None:
    """None (the exact loss over every rank) or an int >= 1: the sorted ranks kept."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be None or an int >= 1 (the sorted ranks kept), got {value!r}")
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


def check_row_mask(name: str, mask: object, logits: torch.Tensor) -> torch.Tensor | None:
    """None, or a bool tensor shaped like the logits' rows (``logits.shape[:-1]``) on their
    device."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True: the row counts), got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{name} must have shape {tuple(logits.shape[:-1])} (the logits' rows), got "
                         f"{tuple(mask.shape)}")
    if mask.device != logits.device:
        raise ValueError(f"{name} must be on the logits' device {logits.device}, got {mask.device}")
    return mask


def check_num_items(name: str, value: object) -> object:
    """None, a finite number > 0 (returned as given), or a one-element real tensor, returned
    0-D (Hugging Face passes the count as a device tensor: its value is not read here, which
    would cost a host sync a step)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.dtype.is_complex:
            raise ValueError(f"{name} must be a number or a one-element real tensor, got a "
                             f"{value.dtype} tensor of shape {tuple(value.shape)}")
        return value.reshape(())  # a scalar: the loss keeps its own shape
    if check_finite(name, value) <= 0:
        raise ValueError(f"{name} must be > 0 (the count of target tokens), got {value!r}")
    return value


INDEX_DTYPES = (torch.int32, torch.int64)


def check_row_pairs(student_rows: object, teacher_rows: object, row_weights: object,
                    student_flat_rows: int, teacher_flat_rows: int) -> tuple[object, object]:
    """Explicit pairs: 1-D integer tensors of one length, each row inside its side's flattened
    ``[B * L]`` rows, the student rows distinct; ``row_weights`` finite, one per pair, and only
    with the rows.

    The values are read on the host (one sync, this opt-in path only): a row out of range would
    be read out of bounds by the kernels, and a repeated student row would have its gradient
    row written twice. Under ``torch.compile`` the same tests run as device asserts (no host
    read in the graph); the rows come back all -1 (padding) when a test fails there, so that
    no kernel reads out of bounds before the assert reports it. Returns the rows to use.
    """
    if student_rows is None and teacher_rows is None:
        if row_weights is not None:
            raise ValueError("row_weights needs student_rows and teacher_rows")
        return student_rows, teacher_rows
    if student_rows is None or teacher_rows is None:
        missing = "student_rows" if student_rows is None else "teacher_rows"
        raise ValueError(f"student_rows and teacher_rows go together: {missing} is None")
    for name, rows in (("student_rows", student_rows), ("teacher_rows", teacher_rows)):
        if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype not in INDEX_DTYPES:
            got = (f"{rows.dtype} of shape {tuple(rows.shape)}" if isinstance(rows, torch.Tensor)
                   else type(rows).__name__)
            raise ValueError(f"{name} must be a 1-D int64 or int32 tensor, got {got}")
    if student_rows.numel() != teacher_rows.numel():
        raise ValueError(f"student_rows and teacher_rows must have the same length, got "
                         f"{student_rows.numel()} and {teacher_rows.numel()}")
    if row_weights is not None:
        if (not isinstance(row_weights, torch.Tensor) or not row_weights.dtype.is_floating_point
                or tuple(row_weights.shape) != tuple(student_rows.shape)):
            got = (f"{row_weights.dtype} of shape {tuple(row_weights.shape)}"
                   if isinstance(row_weights, torch.Tensor) else type(row_weights).__name__)
            raise ValueError(f"row_weights must be a floating tensor of shape {tuple(student_rows.shape)} "
                             f"(one weight per pair), got {got}")
    if student_rows.numel() == 0:
        return student_rows, teacher_rows
    device = student_rows.device
    weights_finite = (torch.isfinite(row_weights).all() if row_weights is not None
                      else torch.ones((), dtype=torch.bool))
    ordered = student_rows.long().sort().values
    stats = torch.stack([
        student_rows.min().long(), student_rows.max().long(), teacher_rows.min().long().to(device),
        teacher_rows.max().long().to(device), (ordered[1:] == ordered[:-1]).sum(),
        weights_finite.long().to(device),
    ])
    if torch.compiler.is_compiling():
        # No host read in a graph: the same tests as asserts on the device (a RuntimeError
        # with these messages on the CPU; a device-side assert on a GPU), before any kernel
        # reads a row out of bounds.
        tests = [((stats[0] >= 0) & (stats[1] < student_flat_rows),
                  f"student_rows must index the {student_flat_rows} flattened rows [B * L]"),
                 ((stats[2] >= 0) & (stats[3] < teacher_flat_rows),
                  f"teacher_rows must index the {teacher_flat_rows} flattened rows [B * L]"),
                 (stats[4] == 0, "student_rows must be distinct"), (stats[5] == 1, "row_weights must be finite")]
        for passed, message in tests:
            torch._assert_async(passed, message)
        # (the graph may run the asserts after the kernels: rows that fail read nothing)
        ok = torch.stack([passed for passed, _ in tests]).all()
        return torch.where(ok, student_rows, -1), torch.where(ok.to(teacher_rows.device), teacher_rows, -1)
    # Every value test in one host read.
    s_lo, s_hi, t_lo, t_hi, repeats, weights_finite = stats.tolist()
    for name, lo, hi, flat in (("student_rows", s_lo, s_hi, student_flat_rows),
                               ("teacher_rows", t_lo, t_hi, teacher_flat_rows)):
        if lo < 0 or hi >= flat:
            raise ValueError(f"{name} must index the {flat} flattened rows [B * L] (0 to {flat - 1}), "
                             f"got values from {lo} to {hi}")
    if repeats:
        raise ValueError(f"student_rows must be distinct (each student row is paired once; its "
                         f"gradient row is written by its pair), got {repeats} repeated")
    if not weights_finite:
        raise ValueError("row_weights must be finite")
    return student_rows, teacher_rows
