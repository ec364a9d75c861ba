"""Board power and energy per call of uld_loss's forward+backward, kind against kind: each kind
runs back to back for --seconds while nvidia-smi samples board power and SM clock every 100 ms,
in interleaved rounds (the order reversed every other round). An H200 under this load meets
its 700 W limit within a second, and then its clock, so its time per call, follows the
energy a call takes (bench/NOTES.md, twenty-fifth and twenty-sixth sessions): two kinds with
the same kernels' times can differ at the limit if one draws more power.

    python bench/power_per_call.py --kinds random,peaked --seconds 6 --rounds 2 [--modes fwdbwd,fwd]

--modes picks what a call is: `fwdbwd` the forward+backward (the loss and the student's
gradient), `fwd` the forward alone under torch.no_grad() (the histogram, sign and loss
launches, no gradient pass): their difference is the gradient pass's share. Prints per kind,
mode and round: ms per call (wall time over the stretch / calls), the median board
power and SM clock of the samples past the first second, and joules per call (that power
times the time per call).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.shapes import KINDS, VOCAB_PAIRS, make_rows  # noqa: E402
from uld_kernels import uld_loss  # noqa: E402

SETTLE_S = 1.0  # samples from a stretch's first second are left out (the board ramping up)


def _forward_backward(student, teacher):
    return lambda: torch.autograd.grad(uld_loss(student, teacher), student)


def _forward(student, teacher):
    def call():
        with torch.no_grad():
            return uld_loss(student, teacher)
    return call


MODES = {"fwdbwd": _forward_backward, "fwd": _forward}  # what one call runs (--modes)


class PowerLog:
    """nvidia-smi's board power (W) and SM clock (MHz) every 100 ms, with the host time each
    sample arrived."""

    def __init__(self):
        self.samples: list[tuple[float, float, float]] = []
        self._smi = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=power.draw,clocks.sm", "--format=csv,noheader,nounits", "-lms", "100",
             "-i", str(torch.cuda.current_device())], stdout=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self._smi.stdout:
            try:
                power, clock = (float(v) for v in line.split(","))
            except ValueError:  # ("[N/A]" and the like)
                continue
            self.samples.append((time.monotonic(), power, clock))

    def between(self, start: float, stop: float) -> tuple[float, float, int]:
        """Median power and clock of the samples in [start, stop), and their number."""
        chosen = [(p, c) for t, p, c in self.samples if start <= t < stop]
        if not chosen:
            return float("nan"), float("nan"), 0
        return statistics.median(p for p, _ in chosen), statistics.median(c for _, c in chosen), len(chosen)

    def close(self):
        self._smi.terminate()
        self._smi.wait()


def stretch(fn, seconds: float) -> tuple[float, float, int]:
    """Calls fn back to back for about `seconds` (a sync every 8 calls bounds the queue);
    returns the stretch's host start and end (after the last call finished) and the calls."""
    torch.cuda.synchronize()
    start = time.monotonic()
    calls = 0
    while time.monotonic() - start < seconds:
        for _ in range(8):
            fn()
        calls += 8
        torch.cuda.synchronize()
    return start, time.monotonic(), calls


def _listed(option: str, value: str, known) -> list[str]:
    """The comma-separated names of `option`, each one of `known`."""
    names = value.split(",")
    if unknown := [name for name in names if name not in known]:
        raise SystemExit(f"power_per_call: {option}: unknown {unknown}; expected some of {list(known)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--pair", default="qwen_llama3", choices=list(VOCAB_PAIRS))
    parser.add_argument("--kinds", default="random,peaked", help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="each (kind, mode)'s stretch of calls per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="fwdbwd", help=f"comma-separated, of {', '.join(MODES)}")
    args = parser.parse_args()
    kinds = _listed("--kinds", args.kinds, KINDS)
    modes = _listed("--modes", args.modes, MODES)
    if args.seconds <= SETTLE_S:
        raise SystemExit(f"power_per_call: --seconds must exceed the {SETTLE_S} s left out at each stretch's start")
    if not torch.cuda.is_available():
        raise SystemExit("power_per_call: needs a CUDA GPU (and nvidia-smi)")

    vs, vt = VOCAB_PAIRS[args.pair]
    calls = {}
    for kind in kinds:
        student, teacher = make_rows(kind, args.rows, vs, vt, seed=args.rows + vs + vt)
        student.requires_grad_(True)
        for mode in modes:
            calls[kind, mode] = MODES[mode](student, teacher)
            calls[kind, mode]()  # untimed: compiles
    log = PowerLog()
    print("| kind | mode | round | ms per call | board W | SM MHz | J per call | samples |", flush=True)
    print("|---|---|---|---|---|---|---|---|", flush=True)
    try:
        for round_ in range(args.rounds):
            for kind, mode in calls if round_ % 2 == 0 else list(reversed(calls)):
                start, stop, n = stretch(calls[kind, mode], args.seconds)
                ms = (stop - start) * 1e3 / n
                power, clock, samples = log.between(start + SETTLE_S, stop)
                print(f"| {kind} | {mode} | {round_ + 1} | {ms:.3f} | {power:.0f} | {clock:.0f} | "
                      f"{power * ms / 1e3:.3f} | {samples} |", flush=True)
    finally:
        log.close()


if __name__ == "__main__":
    main()
