"""``python -m uld_kernels.demo`` (README's first command on a machine without a GPU) runs and
ends with its verdict against the float64 reference."""

from __future__ import annotations

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_demo_runs_and_agrees_with_the_reference():
    run = subprocess.run([sys.executable, "-m", "uld_kernels.demo"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, f"demo failed ({run.returncode}):\n{run.stdout}\n{run.stderr[-3000:]}"
    assert "OK: loss and gradient agree" in run.stdout, run.stdout
