"""tests/interpreter_speedups.py gives what Triton's own interpreter path gives: xor_sum along
each axis (kept or not) and over the whole block, in int8 / int32 / int64, and tl.sort."""

import os

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from tests import interpreter_speedups

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's paths only")


@triton.jit
def _xor_and_sort_kernel(x_ptr, f_ptr, rows_ptr, cols_ptr, all_ptr, kept_ptr, sorted_ptr,
                         R: tl.constexpr, C: tl.constexpr):
    r, c = tl.arange(0, R), tl.arange(0, C)
    x = tl.load(x_ptr + r[:, None] * C + c[None, :])
    tl.store(rows_ptr + r, tl.xor_sum(x, 1))
    tl.store(cols_ptr + c, tl.xor_sum(x, 0))
    tl.store(all_ptr, tl.xor_sum(tl.reshape(x, R * C), 0))
    tl.store(kept_ptr + r[:, None] + c[None, :] * 0, tl.xor_sum(x, 1, keep_dims=True) + tl.zeros_like(x))
    f = tl.load(f_ptr + c)
    tl.store(sorted_ptr + c, tl.sort(f, descending=True))


def _run(x, f):
    n_rows, n_cols = x.shape
    out = (torch.empty(n_rows, dtype=x.dtype), torch.empty(n_cols, dtype=x.dtype), torch.empty(1, dtype=x.dtype),
           torch.empty(n_rows, dtype=x.dtype), torch.empty(n_cols))
    _xor_and_sort_kernel[(1,)](x, f, *out, R=n_rows, C=n_cols)
    return out


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64])
def test_fast_xor_is_tritons(dtype):
    assert interpreter_speedups.install()
    ops = interpreter_speedups._parts()[0]
    g = torch.Generator().manual_seed(7)
    info = torch.iinfo(dtype)
    x = torch.randint(info.min, info.max, (8, 16), generator=g, dtype=torch.int64).to(dtype)
    f = torch.randn(16, generator=g)
    f[3], f[5], f[9] = f[4], float("-inf"), -0.0
    fast = _run(x, f)
    patched = ops.apply_impl
    ops.apply_impl = patched.original  # Triton's own (element by element)
    try:
        slow = _run(x, f)
    finally:
        ops.apply_impl = patched
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)
    xs = x.numpy()
    assert np.array_equal(fast[0].numpy(), np.bitwise_xor.reduce(xs, axis=1))
    assert np.array_equal(fast[1].numpy(), np.bitwise_xor.reduce(xs, axis=0))
    assert fast[2].item() == np.bitwise_xor.reduce(xs.ravel()).item()
    assert torch.equal(fast[3], fast[0])
    assert torch.equal(fast[4], torch.sort(f, descending=True).values)
