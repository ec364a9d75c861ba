"""Triton kernel: the student's cross-entropy on rows that have a target but no teacher row.

Rows that pair with a teacher row get their cross-entropy inside the ULD passes of
uld_split.py (the same passes over the row). This kernel covers the rest of the answer (past the shorter answer, or
the EOS token a distillation skips):

    ce = logsumexp(z) - z[label]            d ce / d z = softmax(z) - onehot(label)
"""

import triton
import triton.language as tl

from uld_kernels.kernels.uld_rows import _finish_lse, _load_logits, _online_lse_update


@triton.jit(do_not_specialize=["seq_len"])
def ce_rows_kernel(
    # data
    logits_ptr, index_ptr, label_ptr, weight_ptr, row_ce_ptr, grad_ptr,
    # shapes and strides: row r is at (r // seq_len) * batch_stride + (r % seq_len) * row_stride
    vocab, seq_len, batch_stride, row_stride, col_stride, grad_row_stride,
    # switches and sizes
    WRITE_GRAD: tl.constexpr, UNIT_COL_STRIDE: tl.constexpr, BLOCK: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Program r: row index[r] against token label[r] (skipped when either is negative);
    row_ce[r] = its cross-entropy, grad[index[r]] = weight[r] * its gradient."""
    r = tl.program_id(0)
    index = tl.load(index_ptr + r).to(tl.int64)
    label = tl.load(label_ptr + r).to(tl.int32)
    if (index < 0) | (label < 0):
        tl.store(row_ce_ptr + r, 0.0)
    else:
        row = logits_ptr + (index // seq_len) * batch_stride + (index % seq_len) * row_stride
        lanes = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        nans = tl.zeros([BLOCK], tl.int32)
        for start in tl.range(0, vocab, BLOCK, num_stages=STAGES):
            z, _in_row = _load_logits(row, start + lanes, col_stride, vocab, UNIT_COL_STRIDE)
            m, s = _online_lse_update(m, s, z)
            nans += (z != z).to(tl.int32)
        top, log_sum = _finish_lse(m, s)  # log-sum-exp = top + log_sum, kept apart
        log_sum = tl.where(tl.sum(nans, 0) > 0, float("nan"), log_sum)
        # A label past the vocabulary poisons the row (NaN), it is never read.
        label_logit = tl.load(row + label.to(tl.int64) * col_stride, mask=label < vocab,
                              other=float("nan")).to(tl.float32)
        tl.store(row_ce_ptr + r, (top - label_logit) + log_sum)
        if WRITE_GRAD:
            weight = tl.load(weight_ptr + r)
            out = grad_ptr + index * grad_row_stride
            for start in tl.range(0, vocab, BLOCK, num_stages=STAGES):
                idx = start + lanes
                z, _in_row = _load_logits(row, idx, col_stride, vocab, UNIT_COL_STRIDE)
                grad = weight * (tl.exp((z - top) - log_sum) - (idx == label).to(tl.float32))
                tl.store(out + idx, grad.to(grad_ptr.dtype.element_ty), mask=idx < vocab)
