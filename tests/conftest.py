"""Test setup: the interpreter is switched on here, before Triton is imported, unless a GPU
is present (then kernels compile for it). Markers: ``gpu`` tests need CUDA and skip cleanly
without it; ``slow`` interpreter tests are kept few. Under the interpreter, its reduction by
XOR (``tl.sort``'s) goes through numpy and its re-patching of triton.language looks only at
the builtins' names (tests/interpreter_speedups.py)."""

import os

import pytest

try:  # decide before anything imports triton
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("ULD_INTERPRETER_SPEEDUPS", "1") != "0":
    from tests import interpreter_speedups

    # tl.sort's xor_sum through numpy, and the builtins listed once: the same results, faster
    # (ULD_INTERPRETER_SPEEDUPS=0 runs Triton's own paths)
    interpreter_speedups.install()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped elsewhere)")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """Where kernel tests run: the GPU if there is one, else CPU under the interpreter."""
    return "cuda" if _HAS_CUDA else "cpu"
