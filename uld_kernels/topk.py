"""The truncated ULD variant: the sorted L1 over the first ``k`` ranks only.

``uld_loss(..., top_k=k)`` and ``uld_distillation_loss(..., top_k=k)``. For each row,
``a = softmax(student / T_s)`` and ``b = softmax(teacher / T_t)`` over the *full*
vocabularies, sorted descending and zero-padded as in the paper, then
``loss = sum_{i < k} |a_(i) - b_(i)|``. This is what distillKitPlus computes (``torch.topk``
of both full softmaxes, ``k = 100``, one temperature 2.0) and what users of it arrive with;
``k >= max(Vs, Vt)`` is the exact loss, and ``uld_loss`` / ``uld_distillation_loss`` compute it
with the fused kernels (``truncates``).

Two engines with one saved state, so that memory stays ``O(rows * k)`` besides the gradient:
the forward keeps each side's log-sum-exp, its top-k column indices and their signs, and
``g - mass`` for each sign ``g`` (``mass = sum_i g_i p_i``; ``1 - mass`` summed as
``sum_i (1 - g_i) p_i``, which keeps its digits when a cold temperature puts ``mass`` near 1);
the backward recomputes the softmax, ``dL/dz_j = (p_j / T) * (g_j - mass)`` with
``g_j = sign(a_(i) - b_(i))`` at the rank ``i`` of column ``j`` (0 past rank ``k``).

- The Triton kernels (``kernels/uld_topk.py``, custom ops ``topk_rows`` / ``topk_grad``): on
  the GPU or under the interpreter, ``k <= launch.TOPK_MAX_K``. A radix select per pair of
  rows, and a gradient kernel that writes each row once.
- PyTorch (``torch.topk``), elsewhere: rows in chunks of at most ``CHUNK_BYTES`` of float32.

Rows given by index (``[B, L, V]`` logits and flat row indices, ``-1`` for padding slots,
which get loss 0) are read in place by the kernels and gathered a chunk at a time by PyTorch.

A given teacher (``uld_loss_teacher_topk``): an offline teacher's top ``K`` log-probabilities
(axolotl's KD datasets, vLLM's ``logprobs``) against the student's full softmax, the teacher
zero-padded as in the paper: ``loss = sum_{i < K} |a_(i) - b_(i)| + sum_{i >= K} a_(i)``,
``b = exp(logprobs)`` sorted (or their softmax: ``normalize_teacher``). Only the student's
top ``K`` are selected (the same kernel, GIVEN), and its backward is the one above with
``g = 1`` past rank ``K``: saved as ``g - 1`` (`_given_codes`), so that the tail keeps ``g = 0``.
Its rows may also be given by index (``[B, L, Vs]`` student logits read in place, the rows a
mask keeps; the teacher's K-wide rows already gathered, in the index's order).

Ties: each engine gives each rank one of a group of equal logits, so the gradient of a
tied group may fall on any of its members; its sum over the group is exact (as the
reference's autograd through ``torch.sort``, which also picks members).
"""

from __future__ import annotations

import torch

from uld_kernels import launch
from uld_kernels.autograd import call_op, custom_op

CHUNK_BYTES = 1 << 28  # float32 working set of a chunk of rows (256 MiB)


def truncates(top_k: int | None, student_vocab: int, teacher_vocab: int) -> bool:
    """Whether ``top_k`` drops ranks: ``k >= max(Vs, Vt)`` keeps every rank, the exact loss,
    which the callers compute with the fused kernels (O(rows) memory, not O(rows * k))."""
    return top_k is not None and top_k < max(student_vocab, teacher_vocab)


def _chunks(n_rows: int, vocab: int, budget: int | None = None):
    """Slices of at most ``budget`` (default ``CHUNK_BYTES``) of float32 rows; one empty slice
    for no rows (so that zero rows still save empty tensors)."""
    step = max(1, (CHUNK_BYTES if budget is None else budget) // (4 * max(vocab, 1)))
    return [slice(start, min(start + step, n_rows)) for start in range(0, max(n_rows, 1), step)]


def _rows(logits: torch.Tensor, index: torch.Tensor | None, part: slice):
    """The chunk's rows ``[c, V]`` (gathered by ``index`` into ``[B, L, V]`` logits when
    given) and which of them are real (``None``: all)."""
    if index is None:
        return logits[part], None
    flat = index[part]
    valid = flat >= 0
    safe = flat.clamp(min=0)
    return logits[safe // logits.shape[1], safe % logits.shape[1]], valid


def _top_probs(logits: torch.Tensor, temperature: float, k: int):
    """The row's largest logit ``top`` and log-sum ``[c]`` each (the log-sum-exp of z / T is
    ``top / T + log_sum``, kept apart: their float32 sum rounds at the logits' magnitude), the ``k`` largest probabilities
    ``[c, k]`` (descending), their columns, and the probability of the other columns ``[c]``
    (summed, not 1 minus the first ``k``: see `_gradient_factors`), of
    ``softmax(logits / temperature)`` in float32, as ``exp((z - top) / T)``: z - top is exact
    near the top, where z / T - top / T loses ``ulp(top / T)`` (kernels/uld_topk.py, `_prob`)."""
    z = logits.float()
    values, columns = torch.topk(z, k, dim=-1)
    top = values[:, 0]
    safe = torch.where(torch.isfinite(top), top, 0.0)
    scaled = torch.exp((z - safe[:, None]) / temperature)  # one exponential an element serves the sum and the tail
    total = scaled.sum(dim=-1)
    log_sum = torch.log(total)
    tail = scaled.scatter_(1, columns, 0.0).sum(dim=-1) / total
    return (safe, log_sum), torch.exp((values - safe[:, None]) / temperature - log_sum[:, None]), columns, tail


def _gradient_factors(probs, signs, tail):
    """``g - mass`` for g = 0, +1 and -1 ``[c]`` each (kernels/uld_topk.py's
    `_gradient_factors`): ``1 - mass = sum (1 - g_i) p_i``, never 1 minus a mass near 1."""
    plus = torch.where(signs > 0, probs, 0.0).sum(dim=-1)
    minus = torch.where(signs < 0, probs, 0.0).sum(dim=-1)
    zero = torch.where(signs == 0, probs, 0.0).sum(dim=-1) + tail
    return minus - plus, zero + 2 * minus, -(zero + 2 * plus)


def _given_codes(probs, signs, tail):
    """kernels/uld_topk.py's `_given_codes`: the codes (0 for sign +1, +1 for a tie, -1 for
    sign -1) and ``[c]`` factors of ``g - 1`` for a given teacher."""
    plus = torch.where(signs > 0, probs, 0.0).sum(dim=-1)
    minus = torch.where(signs < 0, probs, 0.0).sum(dim=-1)
    tie = torch.where(signs == 0, probs, 0.0).sum(dim=-1)
    codes = torch.where(signs > 0, 0, torch.where(signs < 0, -1, 1))
    return codes, (tie + 2 * minus, minus - plus - tail, -(2 * plus + 2 * tail + tie))


def _side_grad(logits, temperature, top, log_sum, columns, signs, factors, upstream):
    """``upstream * dL/dz`` of one side's rows, float32: ``p (g - mass) / T``, ``factors``
    ``[c, 3]`` the row's ``g - mass`` for g = 0, +1, -1; ``columns`` distinct in a row."""
    p = torch.exp((logits.float() - top[:, None]) / temperature - log_sum[:, None])
    grad = p * factors[:, :1]
    at_columns = torch.where(signs > 0, factors[:, 1:2], torch.where(signs < 0, factors[:, 2:3], factors[:, :1]))
    grad.scatter_(1, columns, p.gather(1, columns) * at_columns)
    return grad * (upstream / temperature)[:, None]


def _torch_rows(student_logits, teacher_logits, k, student_temperature, teacher_temperature, save,
                student_index=None, teacher_index=None):
    """``launch.topk_rows`` in PyTorch, by chunks of rows (any device, any ``k``): the rows'
    losses and, per side that ``save`` names, ``(stats [N, 5] (maximum, log-sum, g - mass for
    g = 0, +1, -1),
    columns [N, k'] int32, signs [N, k'] int8)``, ``k' = min(k, V)``."""
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    n_rows = student_logits.shape[0] if student_index is None else student_index.shape[0]
    ks, kt = min(k, vs), min(k, vt)
    ranks = min(k, max(vs, vt))
    rows = torch.empty(n_rows, dtype=torch.float32, device=student_logits.device)
    parts = {side: [] for side in (0, 1) if save[side]}
    for part in _chunks(n_rows, max(vs, vt)):
        student, valid = _rows(student_logits, student_index, part)
        teacher, _ = _rows(teacher_logits, teacher_index, part)
        lse_s, a, cols_s, tail_s = _top_probs(student, student_temperature, ks)
        lse_t, b, cols_t, tail_t = _top_probs(teacher, teacher_temperature, kt)
        diff = (torch.nn.functional.pad(a, (0, ranks - ks)) - torch.nn.functional.pad(b, (0, ranks - kt)))
        loss = diff.abs().sum(dim=-1)
        sign = torch.sign(diff)
        if valid is not None:  # padding slots: loss 0, no gradient (masked, not scaled by 0: NaN-safe)
            loss = torch.where(valid, loss, 0.0)
            sign = torch.where(valid[:, None], sign, 0.0)
        rows[part] = loss
        for side, lse, probs, cols, g, tail in ((0, lse_s, a, cols_s, sign[:, :ks], tail_s),
                                                (1, lse_t, b, cols_t, -sign[:, :kt], tail_t)):
            if save[side]:
                # A row whose loss is NaN (a NaN or +inf logit, or no finite logit, on either
                # side) gets NaN gradients on both sides, as in the exact kernels: sign(NaN) is 0.
                factors = [torch.where(torch.isnan(loss), loss, f) for f in _gradient_factors(probs, g, tail)]
                stats = torch.stack([*lse, *factors], dim=1)
                if valid is not None:
                    stats = torch.where(valid[:, None], stats, 0.0)
                parts[side].append((stats, cols.to(torch.int32), g.to(torch.int8)))
    saved = [tuple(torch.cat(p) for p in zip(*parts[side])) if save[side] else None for side in (0, 1)]
    return rows, saved


def _torch_rows_given(student_logits, teacher_probs, temperature, save, student_index=None):
    """``launch.topk_rows(..., given=True)`` in PyTorch, by chunks of rows: the rows' losses
    against the given teacher's ``[N, K]`` descending probabilities and, with ``save``, the
    student's ``(stats, columns, codes)``. With ``student_index`` (``[N]``) the student's rows
    are those of ``[B, L, Vs]`` logits it names (``-1``: a padding slot, loss 0; what
    is saved for it is read, then masked)."""
    n_rows, k = teacher_probs.shape
    ks = min(k, student_logits.shape[-1])
    rows = torch.empty(n_rows, dtype=torch.float32, device=student_logits.device)
    parts = []
    for part in _chunks(n_rows, max(student_logits.shape[-1], k)):
        chunk, valid = _rows(student_logits, student_index, part)
        lse, a, columns, tail = _top_probs(chunk, temperature, ks)
        diff = torch.nn.functional.pad(a, (0, k - ks)) - teacher_probs[part]
        loss = diff.abs().sum(dim=-1) + tail
        rows[part] = loss if valid is None else torch.where(valid, loss, 0.0)
        if save:
            codes, factors = _given_codes(a, torch.sign(diff[:, :ks]), tail)
            factors = [torch.where(torch.isnan(loss), loss, f) for f in factors]
            parts.append((torch.stack([*lse, *factors], dim=1), columns.to(torch.int32), codes.to(torch.int8)))
    return rows, (tuple(torch.cat(p) for p in zip(*parts)) if save else None)


def _torch_grad(logits, index, saved, upstream, temperature, k_side, out=None):
    """``launch.topk_grad`` in PyTorch, by chunks of rows; repeated ``index`` rows add up; with
    ``out`` (``[rows, width >= V]``; rows by index distinct) added into its rows instead,
    rounded once, and ``out`` returned."""
    stats, columns, signs = saved
    vocab = logits.shape[-1]
    grad = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device) if out is None else out
    flat = grad.view(-1, grad.shape[-1])[:, :vocab]
    for part in _chunks(stats.shape[0], vocab):
        rows, valid = _rows(logits, index, part)
        chunk = _side_grad(rows, temperature, stats[part, 0], stats[part, 1], columns[part, :k_side].long(),
                           signs[part, :k_side].float(), stats[part, 2:], upstream[part].float())
        if valid is None:
            if out is None:
                flat[part] = chunk.to(logits.dtype)
            else:
                flat[part] = (flat[part].float() + chunk).to(logits.dtype)
        elif out is None:  # rows by index (padding slots add zeros; repeated rows add up)
            chunk = torch.where(valid[:, None], chunk, 0.0)
            flat.index_add_(0, index[part].clamp(min=0), chunk.to(logits.dtype))
        else:  # into out's rows (distinct: the student's), rounded once as the kernel does
            at = index[part][valid]
            flat[at] = (flat[at].float() + chunk[valid]).to(logits.dtype)
    return grad


@custom_op("topk_rows")
def topk_rows_op(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, student_temperature: float,
                 teacher_temperature: float, save_student: bool, save_teacher: bool, gather: bool,
                 student_index: torch.Tensor, teacher_index: torch.Tensor) -> list[torch.Tensor]:
    """``launch.topk_rows`` as a custom op: ``[rows, *student's saved, *teacher's saved]``, a
    side not saved as three empty tensors."""
    rows, saved = launch.topk_rows(student_logits, teacher_logits, k, student_temperature, teacher_temperature,
                                   (save_student, save_teacher), *((student_index, teacher_index) if gather else ()))
    return [rows, *(t for side in saved for t in (side if side is not None else _nothing_saved(rows.device)))]


@topk_rows_op.register_fake
def _topk_rows_fake(student_logits, teacher_logits, k, student_temperature, teacher_temperature, save_student,
                    save_teacher, gather, student_index, teacher_index):
    n = student_index.shape[0] if gather else student_logits.shape[0]
    device = student_logits.device
    return [torch.empty(n, device=device), *(t for keep in (save_student, save_teacher)
                                             for t in (_saved_fake(n, k, device) if keep else _nothing_saved(device)))]


@custom_op("topk_rows_given")
def topk_rows_given_op(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temperature: float,
                       save_student: bool, gather: bool, student_index: torch.Tensor) -> list[torch.Tensor]:
    """``launch.topk_rows(..., given=True)`` as a custom op: ``[rows, *student's saved]``, not
    saved as three empty tensors; with ``gather`` the student's rows by ``student_index`` (the
    teacher's rows are its own, in order)."""
    index = (student_index, torch.arange(teacher_probs.shape[0], device=teacher_probs.device)) if gather else ()
    rows, (saved, _) = launch.topk_rows(student_logits, teacher_probs, teacher_probs.shape[-1], student_temperature,
                                        1.0, (save_student, False), *index, given=True)
    return [rows, *(saved if saved is not None else _nothing_saved(rows.device))]


@topk_rows_given_op.register_fake
def _topk_rows_given_fake(student_logits, teacher_probs, student_temperature, save_student, gather, student_index):
    n, device = teacher_probs.shape[0], student_logits.device
    saved = _saved_fake(n, teacher_probs.shape[-1], device) if save_student else _nothing_saved(device)
    return [torch.empty(n, device=device), *saved]


def _saved_fake(n, k, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One side's saved state as `launch.topk_rows` shapes it (stats, columns, signs)."""
    width = launch.topk_pad(k)
    return (torch.empty(n, launch.TOPK_STATS, device=device), torch.empty(n, width, dtype=torch.int32, device=device),
            torch.empty(n, width, dtype=torch.int8, device=device))


def _nothing_saved(device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.empty(0, dtype=dtype, device=device) for dtype in (torch.float32, torch.int32, torch.int8))


@custom_op("topk_grad")
def topk_grad_op(logits: torch.Tensor, gather: bool, index: torch.Tensor, stats: torch.Tensor, columns: torch.Tensor,
                 signs: torch.Tensor, upstream: torch.Tensor, temperature: float, k_side: int) -> torch.Tensor:
    """``launch.topk_grad`` as a custom op."""
    return launch.topk_grad(logits, index if gather else None, (stats, columns, signs), upstream, temperature, k_side)


@topk_grad_op.register_fake
def _topk_grad_fake(logits, gather, index, stats, columns, signs, upstream, temperature, k_side):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@custom_op("topk_grad_add_", mutates_args=("out",))
def topk_grad_add_op(out: torch.Tensor, logits: torch.Tensor, gather: bool, index: torch.Tensor,
                     stats: torch.Tensor, columns: torch.Tensor, signs: torch.Tensor, upstream: torch.Tensor,
                     temperature: float, k_side: int) -> None:
    """``launch.topk_grad`` added into ``out`` in place, as a custom op."""
    launch.topk_grad(logits, index if gather else None, (stats, columns, signs), upstream, temperature, k_side,
                     out=out)


@topk_grad_add_op.register_fake
def _topk_grad_add_fake(out, logits, gather, index, stats, columns, signs, upstream, temperature, k_side):
    return None


def _uses_kernels(logits: torch.Tensor, k: int) -> bool:
    """The Triton select (GPU, or CPU under the interpreter) up to ``launch.TOPK_MAX_K``."""
    return (logits.is_cuda or launch.interpreter_enabled()) and k <= launch.TOPK_MAX_K


def topk_forward(student_logits, teacher_logits, k, student_temperature, teacher_temperature, save,
                 student_index=None, teacher_index=None):
    """The truncated loss's rows ``[N]`` and what each side's backward needs (``save``: per
    side): ``(rows, tensors, kernels, student_index, teacher_index)``, ``tensors`` the student's
    and the teacher's (stats, columns, signs), None where not saved, ``kernels`` whether the
    Triton select ran (else PyTorch), and the index maps as the backward reads them (a padding
    slot one on both sides). Rows as ``ULDTopKFunction`` takes them."""
    if student_index is not None:  # a padding slot is one on both sides (no teacher gradient)
        student_index, teacher_index = student_index.contiguous(), teacher_index.contiguous()
        teacher_index = torch.where(student_index < 0, -1, teacher_index)
    kernels = _uses_kernels(student_logits, k)
    if kernels:
        gather = student_index is not None
        no_index = student_logits.new_empty(0, dtype=torch.int64)
        rows, *tensors = call_op("topk_rows", student_logits, teacher_logits, k, student_temperature,
                                 teacher_temperature, save[0], save[1], gather,
                                 student_index if gather else no_index, teacher_index if gather else no_index)
        tensors = [t if save[i // 3] else None for i, t in enumerate(tensors)]
    else:
        rows, saved = _torch_rows(student_logits, teacher_logits, k, student_temperature, teacher_temperature,
                                  save, student_index, teacher_index)
        tensors = [t for side in saved for t in (side if side is not None else (None,) * 3)]
    return rows, tensors, kernels, student_index, teacher_index


def topk_side_grad(logits, index, saved, upstream, temperature, k, kernels, out=None):
    """One side's gradient from `topk_forward`'s state (``saved``: its three tensors), times
    ``upstream`` per row, in the logits' dtype; with ``out`` added into its rows in place
    (``[rows, width >= V]``, the logits' flat row order) and ``out`` returned. ``kernels``:
    the Triton kernel (rows by index distinct), else PyTorch (``index_add_`` for repeated rows)."""
    k_side = min(k, logits.shape[-1])
    if kernels:
        gather = index is not None
        index_arg = index if gather else saved[0]
        if out is None:
            return call_op("topk_grad", logits, gather, index_arg, *saved, upstream, temperature, k_side)
        call_op("topk_grad_add_", out, logits, gather, index_arg, *saved, upstream, temperature, k_side)
        return out
    return _torch_grad(logits, index, saved, upstream, temperature, k_side, out)


class ULDTopKFunction(torch.autograd.Function):
    """Autograd Function of the truncated loss's rows: ``apply(student, teacher, k,
    student_temperature, teacher_temperature, grad_enabled, student_index=None,
    teacher_index=None)`` -> ``[N]`` float32. Without indices the logits are aligned
    ``[N, V]`` rows; with them, ``[B, L, V]`` logits and ``[N]`` flat row indices (``-1``:
    padding, loss 0), the student rows distinct. The Triton kernels
    (``kernels/uld_topk.py``) where they run, else PyTorch by chunks; the same saved state."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, k, student_temperature, teacher_temperature,
                grad_enabled=True, student_index=None, teacher_index=None):
        save = [bool(ctx.needs_input_grad[i] and grad_enabled) for i in (0, 1)]
        rows, tensors, kernels, student_index, teacher_index = topk_forward(
            student_logits, teacher_logits, k, student_temperature, teacher_temperature, save, student_index,
            teacher_index)
        ctx.save_for_backward(student_logits if save[0] else None, teacher_logits if save[1] else None,
                              student_index, teacher_index, *tensors)
        ctx.needs, ctx.kernels, ctx.k = save, kernels, k
        ctx.temperatures = (student_temperature, teacher_temperature)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        student_logits, teacher_logits, student_index, teacher_index, *tensors = ctx.saved_tensors
        grads = [None, None]
        for side, logits, index in ((0, student_logits, student_index), (1, teacher_logits, teacher_index)):
            if ctx.needs[side]:
                # Teacher rows by index may repeat: their sums go through index_add_ (PyTorch).
                grads[side] = topk_side_grad(logits, index, tensors[3 * side: 3 * side + 3], grad_rows,
                                             ctx.temperatures[side], ctx.k, ctx.kernels and (side == 0 or index is None))
        return grads[0], grads[1], None, None, None, None, None, None


# Teacher probabilities given as log-probabilities that sum past 1 by more than this (float32
# sums of a bf16 model's rounded log-probabilities stay far inside it) give the row a NaN loss:
# logits passed where log-probabilities belong, not a silent number. So does a sum of 0 (no
# teacher probability at all) or NaN.
TEACHER_SUM_SLACK = 1e-2


def teacher_topk_probs(teacher_logprobs: torch.Tensor, normalize: bool):
    """The given teacher's probabilities ``[N, K]`` float32, descending, their columns in
    ``teacher_logprobs`` (``[N, K]`` int64) and which rows are refused (``[N]`` bool:
    `TEACHER_SUM_SLACK`): ``exp(logprobs)``, or their softmax with ``normalize``."""
    logprobs = teacher_logprobs.float()
    probs = torch.softmax(logprobs, dim=-1) if normalize else torch.exp(logprobs)
    total = probs.sum(dim=-1)
    refused = ~((total > 0) & (total <= 1 + TEACHER_SUM_SLACK))
    probs, order = torch.sort(probs, dim=-1, descending=True)
    return probs.contiguous(), order, refused


class ULDTeacherTopKFunction(torch.autograd.Function):
    """Autograd Function of a given teacher's rows (``uld_loss_teacher_topk``): ``apply(student
    [N, Vs], teacher_logprobs [N, K], student_temperature, normalize_teacher, grad_enabled,
    student_index=None)`` -> ``[N]`` float32; with ``student_index`` (``[N]`` int64, distinct
    where not negative) the student is ``[B, L, Vs]`` and its rows those the index names (read
    in place; the gradient 0 in the others); ``-1`` is a padding slot: loss 0, zero gradients,
    its teacher row never checked (it may hold anything). The Triton select (GIVEN) where it
    runs, else PyTorch by chunks; the student's gradient is `topk_side_grad`, the teacher's (rarely
    wanted) in PyTorch from the saved codes."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logprobs, student_temperature, normalize_teacher, grad_enabled=True,
                student_index=None):
        k = teacher_logprobs.shape[-1]
        probs, order, refused = teacher_topk_probs(teacher_logprobs, normalize_teacher)
        if student_index is not None:  # a padding slot's teacher row is not refused: its loss is 0
            refused = refused & (student_index >= 0)
        save = bool(grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]))
        kernels = _uses_kernels(student_logits, k)
        if kernels:
            gather = student_index is not None
            rows, *saved = call_op("topk_rows_given", student_logits, probs, student_temperature, save, gather,
                                   student_index if gather else student_logits.new_empty(0, dtype=torch.int64))
        else:
            rows, saved = _torch_rows_given(student_logits, probs, student_temperature, save, student_index)
            saved = list(saved) if save else [None] * 3
        rows = torch.where(refused, float("nan"), rows)
        if save:  # refused rows: NaN gradients, as for a NaN loss (a new list: dynamo cannot assign into
            # the tuple that star-unpacking a custom op's outputs gives it)
            saved = [torch.where(refused[:, None] & (torch.arange(launch.TOPK_STATS, device=rows.device) >= 2),
                                 float("nan"), saved[0]), *saved[1:]]
        ctx.save_for_backward(student_logits if save else None, teacher_logprobs if save else None, probs, order,
                              rows, student_index, *(saved if save else [None] * 3))
        ctx.kernels, ctx.k, ctx.temperature, ctx.normalize = kernels, k, student_temperature, normalize_teacher
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        student_logits, teacher_logprobs, probs, order, rows, student_index, *saved = ctx.saved_tensors
        student_grad = teacher_grad = None
        if ctx.needs_input_grad[0]:
            student_grad = topk_side_grad(student_logits, student_index, saved, grad_rows, ctx.temperature, ctx.k,
                                          ctx.kernels)
        if ctx.needs_input_grad[1]:
            teacher_grad = _given_teacher_grad(teacher_logprobs, probs, order, rows, saved[2],
                                               student_logits.shape[-1], grad_rows, ctx.normalize)
            if student_index is not None:  # padding slots: none (their rows may hold NaN)
                teacher_grad = torch.where(student_index[:, None] >= 0, teacher_grad, 0)
        return student_grad, teacher_grad, None, None, None, None


def _given_teacher_grad(teacher_logprobs, probs, order, rows, codes, student_vocab, upstream, normalize):
    """d loss / d logprobs of a given teacher: ``-sign(a_(i) - b_(i))`` at each rank (from the
    student's codes; ``+1`` past the student's vocabulary, where ``a`` is 0), back to the
    columns, through ``exp`` (or the softmax with ``normalize``); NaN rows NaN."""
    ks = min(probs.shape[-1], student_vocab)
    codes = codes[:, :ks].float()
    sign = torch.where(codes == 0, 1.0, torch.where(codes < 0, -1.0, 0.0))
    sign = torch.cat([sign, -(probs[:, ks:] > 0).float()], dim=1)
    by_rank = torch.where(torch.isnan(rows)[:, None], float("nan"), -sign) * upstream.float()[:, None]
    by_column = torch.empty_like(by_rank).scatter_(1, order, by_rank)
    p = torch.empty_like(probs).scatter_(1, order, probs)
    if normalize:
        grad = p * (by_column - (by_column * p).sum(dim=-1, keepdim=True))
    else:
        grad = p * by_column
    return grad.to(teacher_logprobs.dtype)
