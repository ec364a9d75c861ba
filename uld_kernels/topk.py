"""The truncated ULD variant: the sorted L1 over the first ``k`` ranks only.

``uld_loss(..., top_k=k)`` and ``uld_distillation_loss(..., top_k=k)``. For each row,
``a = softmax(student / T_s)`` and ``b = softmax(teacher / T_t)`` over the *full*
vocabularies, sorted descending and zero-padded as in the paper, then
``loss = sum_{i < k} |a_(i) - b_(i)|``. This is what distillKitPlus computes (``torch.topk``
of both full softmaxes, ``k = 100``, one temperature 2.0) and what users of it arrive with;
``k >= max(Vs, Vt)`` is the exact loss, and ``uld_loss`` / ``uld_distillation_loss`` compute it
with the fused kernels (``truncates``).

Plain PyTorch (``torch.topk`` of ``k`` values a row needs no Triton), with a handwritten
backward so that memory stays ``O(rows * k)``: the forward keeps each side's log-sum-exp, its
top-k column indices and their signs; the backward recomputes the softmax chunk by chunk,
``dL/dz_j = (p_j / T) * (g_j - sum_i g_i p_i)`` with ``g_j = sign(a_(i) - b_(i))`` at the
rank ``i`` of column ``j`` (0 past rank ``k``). Rows are processed in chunks of at most
``CHUNK_BYTES`` of float32; rows given by index (``[B, L, V]`` logits and flat row indices,
``-1`` for padding slots, which get loss 0) are gathered a chunk at a time.

Ties: ``torch.topk`` gives each rank one of a group of equal logits, so the gradient of a
tied group may fall on any of its members; its sum over the group is exact (as the
reference's autograd through ``torch.sort``, which also picks members).
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 1 << 28  # float32 working set of a chunk of rows (256 MiB)


def truncates(top_k: int | None, student_vocab: int, teacher_vocab: int) -> bool:
    """Whether ``top_k`` drops ranks: ``k >= max(Vs, Vt)`` keeps every rank, the exact loss,
    which the callers compute with the fused kernels (O(rows) memory, not O(rows * k))."""
    return top_k is not None and top_k < max(student_vocab, teacher_vocab)


def _chunks(n_rows: int, vocab: int):
    """Slices of at most ``CHUNK_BYTES`` of float32 rows; one empty slice for no rows (so that
    zero rows still save empty tensors)."""
    step = max(1, CHUNK_BYTES // (4 * max(vocab, 1)))
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
    """Log-sum-exp ``[c]``, the ``k`` largest probabilities ``[c, k]`` (descending) and their
    columns, of ``softmax(logits / temperature)`` in float32."""
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    values, columns = torch.topk(z, k, dim=-1)
    return lse, torch.exp(values - lse[:, None]), columns


def _side_grad(logits, temperature, lse, columns, signs, mass, upstream):
    """``upstream * dL/dz`` of one side's rows, float32: ``mass`` is ``sum_i g_i p_i`` a row."""
    z = logits.float() / temperature
    p = torch.exp(z - lse[:, None])
    grad = p * (-mass)[:, None]
    grad.scatter_add_(1, columns, p.gather(1, columns) * signs)
    return grad * (upstream / temperature)[:, None]


class ULDTopKFunction(torch.autograd.Function):
    """Autograd Function of the truncated loss's rows: ``apply(student, teacher, k,
    student_temperature, teacher_temperature, grad_enabled, student_index=None,
    teacher_index=None)`` -> ``[N]`` float32. Without indices the logits are aligned
    ``[N, V]`` rows; with them, ``[B, L, V]`` logits and ``[N]`` flat row indices (``-1``:
    padding, loss 0), the student rows distinct."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, k, student_temperature, teacher_temperature,
                grad_enabled=True, student_index=None, teacher_index=None):
        vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
        n_rows = student_logits.shape[0] if student_index is None else student_index.shape[0]
        ks, kt = min(k, vs), min(k, vt)
        ranks = min(k, max(vs, vt))
        needs = [bool(ctx.needs_input_grad[i] and grad_enabled) for i in (0, 1)]
        rows = torch.empty(n_rows, dtype=torch.float32, device=student_logits.device)
        saved = {side: [] for side in (0, 1) if needs[side]}
        for part in _chunks(n_rows, max(vs, vt)):
            student, valid = _rows(student_logits, student_index, part)
            teacher, _ = _rows(teacher_logits, teacher_index, part)
            lse_s, a, cols_s = _top_probs(student, student_temperature, ks)
            lse_t, b, cols_t = _top_probs(teacher, teacher_temperature, kt)
            diff = (torch.nn.functional.pad(a, (0, ranks - ks)) - torch.nn.functional.pad(b, (0, ranks - kt)))
            loss = diff.abs().sum(dim=-1)
            sign = torch.sign(diff)
            if valid is not None:  # padding slots: loss 0, no gradient (masked, not scaled by 0: NaN-safe)
                loss = torch.where(valid, loss, 0.0)
                sign = torch.where(valid[:, None], sign, 0.0)
            rows[part] = loss
            for side, lse, probs, cols, g in ((0, lse_s, a, cols_s, sign[:, :ks]), (1, lse_t, b, cols_t, -sign[:, :kt])):
                if needs[side]:
                    # A row whose loss is NaN (a NaN or +inf logit, or no finite logit, on either
                    # side) gets NaN gradients on both sides, as in the exact kernels: sign(NaN) is 0.
                    mass = torch.where(torch.isnan(loss), loss, (g * probs).sum(dim=-1))
                    if valid is not None:
                        lse, mass = torch.where(valid, lse, 0.0), torch.where(valid, mass, 0.0)
                    saved[side].append((lse, cols, g.to(torch.int8), mass))
        tensors = []
        for side in (0, 1):
            if needs[side]:
                lse, cols, g, mass = (torch.cat(parts) for parts in zip(*saved[side]))
                tensors += [lse, cols.to(torch.int32), g, mass]
            else:
                tensors += [None] * 4
        ctx.save_for_backward(student_logits if needs[0] else None, teacher_logits if needs[1] else None,
                              student_index, teacher_index, *tensors)
        ctx.needs = needs
        ctx.temperatures = (student_temperature, teacher_temperature)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        student_logits, teacher_logits, student_index, teacher_index, *tensors = ctx.saved_tensors
        grads = [None, None]
        for side, logits, index in ((0, student_logits, student_index), (1, teacher_logits, teacher_index)):
            if not ctx.needs[side]:
                continue
            lse, cols, g, mass = tensors[4 * side: 4 * side + 4]
            grad = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
            for part in _chunks(lse.shape[0], logits.shape[-1]):
                rows, valid = _rows(logits, index, part)
                chunk = _side_grad(rows, ctx.temperatures[side], lse[part], cols[part].long(),
                                   g[part].float(), mass[part], grad_rows[part].float())
                if valid is None:
                    grad[part] = chunk.to(logits.dtype)
                else:  # rows by index (distinct on the student side; padding slots add zeros)
                    chunk = torch.where(valid[:, None], chunk, 0.0)
                    grad.view(-1, logits.shape[-1]).index_add_(0, index[part].clamp(min=0), chunk.to(logits.dtype))
            grads[side] = grad
        return grads[0], grads[1], None, None, None, None, None, None
