"""Every tolerance of a comparison with the float64 reference, in one table: the tests' and
the demo's (`python -m uld_kernels.demo`).

Losses are compared with the float64 reference on the same inputs (upcast). The kernels
accumulate in float32, so a loss carries float32 rounding of a sum of up to 2 * 262,144
terms of size <= 1: absolute 2e-5 covers it with room (observed ~1e-7 at 300 elements,
~1e-6 at 152k). Gradients are compared element by element on tie-free float32 inputs, and
per tie group (sums over groups of equal student values) on bf16 / fp16 inputs, where the
kernel's float32 result is rounded once to the input dtype.
"""

import torch

# dtype -> (loss_atol, loss_rtol, grad_atol, grad_rtol)
TOLERANCES = {
    torch.float32: (2e-5, 1e-5, 1e-6, 1e-4),
    torch.bfloat16: (2e-5, 1e-5, 2e-3, 1e-2),
    torch.float16: (2e-5, 1e-5, 5e-4, 2e-3),
}

# Parameter gradients of a tiny float32 model (test_trainer.py), read back from an SGD step
# ((w - w') / lr): the step's own rounding (|w| ~ 0.02-1, float32) is ~1e-7 / lr, and the
# micro-batches' matmuls differ from the whole batch's in summation order.
MODEL_GRAD_TOL = dict(atol=1e-5, rtol=1e-4)


def loss_tol(dtype: torch.dtype) -> dict:
    atol, rtol, _, _ = TOLERANCES[dtype]
    return dict(atol=atol, rtol=rtol)


def grad_tol(dtype: torch.dtype) -> dict:
    _, _, atol, rtol = TOLERANCES[dtype]
    return dict(atol=atol, rtol=rtol)
