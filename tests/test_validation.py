"""Bad input to ``uld_kernels.uld_loss`` fails fast, with an error that names the argument.

Every error case uses CPU tensors: validation runs before any kernel, so even under the Triton
interpreter these tests take milliseconds. ``test_errors_come_before_any_kernel`` proves the
ordering by trapping the launcher.
"""

import re

import pytest
import torch

import uld_kernels
import uld_kernels.api
import uld_kernels.autograd
import uld_kernels.launch
from uld_kernels import uld_loss

NAMES = ("student_logits", "teacher_logits")


def _logits(rows: int, vocab: int, seed: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen).to(dtype=dtype, device=device)


def _call(name: str, bad, **kwargs):
    """``uld_loss`` with ``bad`` in place of the argument ``name``; the other one is valid."""
    student = _logits(3, 5, seed=1)
    teacher = _logits(3, 7, seed=2)
    if name == "student_logits":
        return uld_loss(bad, teacher, **kwargs)
    return uld_loss(student, bad, **kwargs)


def _other(name: str) -> str:
    return NAMES[1 - NAMES.index(name)]


def test_mismatched_rows_raise():
    student = _logits(3, 5, seed=3)
    teacher = _logits(4, 5, seed=4)  # one row more than the student
    with pytest.raises(ValueError, match="rows") as excinfo:
        uld_loss(student, teacher)
    message = str(excinfo.value)
    assert "3" in message and "4" in message, f"message does not give both row counts: {message}"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((5,), id="1-D"),  # one row without its row dimension
        pytest.param((2, 3, 5), id="3-D"),  # [B, L, V] logits not flattened
        pytest.param((), id="0-D"),  # a scalar
    ],
)
def test_wrong_ndim_raises(name, shape):
    bad = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=re.escape(name)) as excinfo:
        _call(name, bad)
    assert _other(name) not in str(excinfo.value), f"blames the other argument: {excinfo.value}"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param(torch.int64, id="int64"),  # token ids passed by mistake
        pytest.param(torch.int32, id="int32"),
        pytest.param(torch.float64, id="float64"),  # the kernels do not read it; the reference does
        pytest.param(torch.complex64, id="complex64"),  # not real-valued
        pytest.param(torch.bool, id="bool"),  # a mask passed by mistake
    ],
)
def test_unsupported_dtype_raises(name, dtype):
    bad = (10 * _logits(3, 6, seed=6)).to(dtype)
    with pytest.raises(TypeError, match=re.escape(name)) as excinfo:
        _call(name, bad)
    assert _other(name) not in str(excinfo.value), f"blames the other argument: {excinfo.value}"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "bad",
    [
        pytest.param([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], id="list"),  # nested Python lists
        pytest.param(None, id="None"),  # a missing tensor
    ],
)
def test_not_a_tensor_raises(name, bad):
    with pytest.raises(TypeError, match=re.escape(name)):
        _call(name, bad)


@pytest.mark.parametrize("name", NAMES)
def test_empty_vocabulary_raises(name):
    bad = torch.empty(3, 0)  # 3 rows of no columns
    with pytest.raises(ValueError, match=re.escape(name)) as excinfo:
        _call(name, bad)
    assert "vocabulary" in str(excinfo.value), f"message does not say what: {excinfo.value}"


@pytest.mark.gpu
def test_mixed_devices_raise():
    student = _logits(3, 5, seed=7)  # cpu
    teacher = _logits(3, 7, seed=8, device="cuda")
    with pytest.raises(ValueError, match="device"):
        uld_loss(student, teacher)
    with pytest.raises(ValueError, match="device"):
        uld_loss(teacher.cpu(), student.cuda())


# (value, exception): reason
BAD_TEMPERATURES = [
    pytest.param(0, ValueError, id="zero-int"),  # division by zero
    pytest.param(0.0, ValueError, id="zero-float"),
    pytest.param(-1, ValueError, id="negative"),  # reverses the softmax order
    pytest.param(float("inf"), ValueError, id="inf"),  # flattens every row to uniform
    pytest.param(float("-inf"), ValueError, id="neg-inf"),
    pytest.param(1e38, ValueError, id="huge"),  # 1 / T subnormal in float32: the kernels' scalar would be fp64
    pytest.param(1e-38, ValueError, id="minute"),  # 1 / T past float32
    pytest.param(float("nan"), ValueError, id="nan"),  # every comparison with it is false
    pytest.param("2.0", TypeError, id="string"),  # a number in a config file, not parsed
    pytest.param(True, TypeError, id="bool"),  # bool is an int in Python; reject it anyway
    pytest.param(None, TypeError, id="None"),
]


@pytest.mark.parametrize("name", ["student_temperature", "teacher_temperature"])
@pytest.mark.parametrize("value, error", BAD_TEMPERATURES)
def test_bad_temperature_raises(name, value, error):
    student = _logits(3, 5, seed=9)
    teacher = _logits(3, 7, seed=10)
    with pytest.raises(error, match=re.escape(name)) as excinfo:
        uld_loss(student, teacher, **{name: value})
    other = "teacher_temperature" if name == "student_temperature" else "student_temperature"
    assert other not in str(excinfo.value), f"error blames the wrong argument: {excinfo.value}"


@pytest.mark.parametrize(
    "reduction",
    [
        pytest.param("avg", id="avg"),  # a plausible but unsupported name
        pytest.param("MEAN", id="wrong-case"),  # names are case-sensitive
        pytest.param(None, id="None"),  # None is not the string 'none'
    ],
)
def test_bad_reduction_raises(reduction):
    student = _logits(3, 5, seed=11)
    teacher = _logits(3, 7, seed=12)
    with pytest.raises(ValueError, match="reduction"):
        uld_loss(student, teacher, reduction=reduction)


@pytest.fixture
def kernel_trap(monkeypatch):
    """Any path that would compute the loss raises AssertionError("kernel ran") instead."""

    def trap(*args, **kwargs):
        raise AssertionError("kernel ran")

    class KernelTrap:  # stands in for a @triton.jit kernel: launching is kernel[grid](...)
        def __getitem__(self, grid):
            return trap

    monkeypatch.setattr(uld_kernels.launch, "uld_rows", trap)
    monkeypatch.setattr(uld_kernels.autograd, "uld_rows", trap)  # the name actually called
    monkeypatch.setattr(uld_kernels.launch.uld_split, "stats_kernel", KernelTrap())  # the first pass of any path
    monkeypatch.setattr(uld_kernels.launch, "scale_rows_kernel", KernelTrap())
    import reference.uld

    monkeypatch.setattr(reference.uld, "uld_loss_reference", trap)  # CPU path without Triton
    return trap


def test_kernel_trap_catches_valid_input(kernel_trap):
    # Control: with valid input the trap fires, so the test below would see a kernel run.
    with pytest.raises(AssertionError, match="kernel ran"):
        uld_loss(_logits(3, 5, seed=13), _logits(3, 7, seed=14))


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(student_temperature=0.0), id="student-temperature"),
        pytest.param(dict(teacher_temperature=float("nan")), id="teacher-temperature"),
        pytest.param(dict(reduction="avg"), id="reduction"),  # checked last of all
    ],
)
def test_errors_come_before_any_kernel(kernel_trap, kwargs):
    with pytest.raises(ValueError, match=re.escape(next(iter(kwargs)))):
        uld_loss(_logits(3, 5, seed=15), _logits(3, 7, seed=16), **kwargs)


@pytest.mark.parametrize("student_grad", [False, True], ids=["no-grad", "student-grad"])
def test_zero_rows(student_grad):
    # N = 0 is valid: an empty batch of answer tokens. The docstring promises
    # nan (mean), 0 (sum) and an empty [0] tensor (none).
    student = torch.randn(0, 5).requires_grad_(student_grad)
    teacher = torch.randn(0, 7)
    none = uld_loss(student, teacher, reduction="none")
    assert none.shape == (0,), f"'none' on 0 rows gave shape {tuple(none.shape)}, expected (0,)"
    total = uld_loss(student, teacher, reduction="sum")
    assert total.shape == () and total.item() == 0.0, f"'sum' on 0 rows gave {total}, expected 0"
    mean = uld_loss(student, teacher, reduction="mean")
    assert mean.shape == () and torch.isnan(mean), f"'mean' on 0 rows gave {mean}, expected nan"
    for loss in (none, total, mean):
        assert loss.dtype == torch.float32, f"loss on 0 rows is {loss.dtype}, expected float32"


@pytest.mark.parametrize("knob,value,message", [
    ("ULD_HIST_GRAD_BLOCK", "1000", "must be multiples of 256, got 4096 and 1000"),
    ("ULD_HIST_BLOCK", "2000", "must be multiples of 256, got 2000 and 2048"),
])
def test_histogram_knobs_out_of_range_fail_at_import(knob, value, message):
    """A tuning knob the histogram kernels cannot run with (an odd number of logits per thread
    breaks the two-at-a-time slots) fails when the launcher is imported, naming the variable."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, **{knob: value})
    proc = subprocess.run([sys.executable, "-c", "import uld_kernels.launch"], capture_output=True, text=True,
                          env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
