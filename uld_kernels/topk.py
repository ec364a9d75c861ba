"""The truncated ULD variant: the sorted L1 over the first ``k`` ranks only.

``uld_loss(..., top_k=k)``. For each row, ``a = softmax(student / T_s)`` and
``b = softmax(teacher / T_t)`` over the *full* vocabularies, sorted descending and
zero-padded as in the paper, then ``loss = sum_{i < k} |a_(i) - b_(i)|``. This is what
distillKitPlus computes (``torch.topk`` of both full softmaxes, ``k = 100``, one temperature
2.0) and what users of it arrive with; ``k >= max(Vs, Vt)`` is the exact loss.

Plain PyTorch (``torch.topk`` of ``k`` values a row needs no Triton), with a handwritten
backward so that memory stays ``O(rows * k)``: the forward keeps each side's log-sum-exp, its
top-k column indices and their signs; the backward recomputes the softmax chunk by chunk,
``dL/dz_j = (p_j / T) * (g_j - sum_i g_i p_i)`` with ``g_j = sign(a_(i) - b_(i))`` at the
rank ``i`` of column ``j`` (0 past rank ``k``). Rows are processed in chunks of at most
``CHUNK_BYTES`` of float32.

Ties: ``torch.topk`` gives each rank one of a group of equal logits, so the gradient of a
tied group may fall on any of its members; its sum over the group is exact (as the
reference's autograd through ``torch.sort``, which also picks members).
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 1 << 28  # float32 working set of a chunk of rows (256 MiB)


def _chunks(n_rows: int, vocab: int):
    step = max(1, CHUNK_BYTES // (4 * max(vocab, 1)))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _top_probs(logits: torch.Tensor, temperature: float, k: int):
    """Log-sum-exp ``[c]``, the ``k`` largest probabilities ``[c, k]`` (descending) and their
    columns, of ``softmax(logits / temperature)`` in float32."""
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    values, columns = torch.topk(z, k, dim=-1)
    return lse, torch.exp(values - lse[:, None]), columns


def _side_grad(logits, temperature, lse, columns, signs, mass, upstream):
    """``upstream * dL/dz`` of one side's rows, in the logits' dtype: ``mass`` is
    ``sum_i g_i p_i`` a row."""
    z = logits.float() / temperature
    p = torch.exp(z - lse[:, None])
    grad = p * (-mass)[:, None]
    grad.scatter_add_(1, columns, p.gather(1, columns) * signs)
    return (grad * (upstream / temperature)[:, None]).to(logits.dtype)


class ULDTopKFunction(torch.autograd.Function):
    """Autograd Function of the truncated loss's rows: ``apply(student, teacher, k,
    student_temperature, teacher_temperature, grad_enabled)`` -> ``[N]`` float32."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, k, student_temperature, teacher_temperature,
                grad_enabled=True):
        n_rows, vs = student_logits.shape
        vt = teacher_logits.shape[1]
        ks, kt = min(k, vs), min(k, vt)
        ranks = min(k, max(vs, vt))
        needs = [bool(ctx.needs_input_grad[i] and grad_enabled) for i in (0, 1)]
        rows = torch.empty(n_rows, dtype=torch.float32, device=student_logits.device)
        saved = {side: [] for side in (0, 1) if needs[side]}
        for part in _chunks(n_rows, max(vs, vt)):
            lse_s, a, cols_s = _top_probs(student_logits[part], student_temperature, ks)
            lse_t, b, cols_t = _top_probs(teacher_logits[part], teacher_temperature, kt)
            diff = (torch.nn.functional.pad(a, (0, ranks - ks)) - torch.nn.functional.pad(b, (0, ranks - kt)))
            rows[part] = diff.abs().sum(dim=-1)
            sign = torch.sign(diff)
            for side, lse, probs, cols, g in ((0, lse_s, a, cols_s, sign[:, :ks]), (1, lse_t, b, cols_t, -sign[:, :kt])):
                if needs[side]:
                    saved[side].append((lse, cols, g.to(torch.int8), (g * probs).sum(dim=-1)))
        tensors = []
        for side in (0, 1):
            if needs[side]:
                lse, cols, g, mass = (torch.cat(parts) for parts in zip(*saved[side]))
                tensors += [lse, cols.to(torch.int32), g, mass]
            else:
                tensors += [None] * 4
        ctx.save_for_backward(student_logits if needs[0] else None, teacher_logits if needs[1] else None, *tensors)
        ctx.needs = needs
        ctx.temperatures = (student_temperature, teacher_temperature)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        student_logits, teacher_logits, *tensors = ctx.saved_tensors
        grads = [None, None]
        for side, logits in ((0, student_logits), (1, teacher_logits)):
            if not ctx.needs[side]:
                continue
            lse, cols, g, mass = tensors[4 * side: 4 * side + 4]
            grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
            for part in _chunks(logits.shape[0], logits.shape[1]):
                grad[part] = _side_grad(logits[part], ctx.temperatures[side], lse[part], cols[part].long(),
                                        g[part].float(), mass[part], grad_rows[part].float())
            grads[side] = grad
        return grads[0], grads[1], None, None, None, None
