"""Engine knobs against each other in one process, in interleaved rounds: forward+backward
medians of uld_loss per (setting, kind), each setting timed once per round and the order
reversed every other round, so that no setting always meets the GPU at the same clock (an H200
at its power limit lowers its SM clock within seconds; separate processes compared different
clocks). A setting is a comma-separated list of launch.py attributes, e.g.
``HIST_BATCH=8192,HIST_PDL=False``; "default" is the module as imported. Each setting runs
once untimed first (its kernels compiled outside the timed calls).

    python bench/knob_rounds.py --kinds random,peaked default HIST_PDL=False HIST_BATCH=8192
"""

from __future__ import annotations

import argparse
import ast
import os
import statistics
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.shapes import KINDS, VOCAB_PAIRS, make_rows  # noqa: E402
from uld_kernels import launch, uld_loss  # noqa: E402


def parse_setting(spec: str) -> dict:
    if spec == "default":
        return {}
    setting = {}
    for item in spec.split(","):
        name, _, value = item.partition("=")
        if not hasattr(launch, name):
            raise SystemExit(f"knob_rounds: launch has no attribute {name!r} (setting {spec!r})")
        setting[name] = ast.literal_eval(value)
    return setting


def apply(setting: dict, defaults: dict) -> None:
    for name, value in defaults.items():
        setattr(launch, name, value)
    for name, value in setting.items():
        setattr(launch, name, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+")
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--pair", default="qwen_llama3", choices=list(VOCAB_PAIRS))
    parser.add_argument("--kinds", default="random,peaked",
                        help=f"comma-separated, of {', '.join(KINDS)} (one argument: settings may follow it)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rep", type=int, default=100, help="do_bench's rep per round, in milliseconds")
    args = parser.parse_args()

    kinds = args.kinds.split(",")
    if unknown := [kind for kind in kinds if kind not in KINDS]:
        raise SystemExit(f"knob_rounds: --kinds: unknown {unknown}; expected some of {list(KINDS)}")
    settings = {spec: parse_setting(spec) for spec in args.settings}
    names = {name for setting in settings.values() for name in setting}
    defaults = {name: getattr(launch, name) for name in names}
    vs, vt = VOCAB_PAIRS[args.pair]
    for kind in kinds:
        student, teacher = make_rows(kind, args.rows, vs, vt, seed=args.rows + vs + vt)
        student.requires_grad_(True)

        def forward_backward():
            return torch.autograd.grad(uld_loss(student, teacher), student)

        reference = None
        for spec, setting in settings.items():  # untimed: compiles, and every setting gives the same bits
            apply(setting, defaults)
            (grad,) = forward_backward()
            if reference is None:
                reference = grad
            elif not torch.equal(grad, reference):
                raise SystemExit(f"knob_rounds: {spec} gives another gradient than {args.settings[0]} ({kind})")
        del reference, grad
        times = {spec: [] for spec in settings}
        rounds = {spec: [] for spec in settings}
        for round_ in range(args.rounds):
            order = list(settings) if round_ % 2 == 0 else list(reversed(settings))
            for spec in order:
                apply(settings[spec], defaults)
                calls = triton.testing.do_bench(forward_backward, warmup=25, rep=args.rep, return_mode="all")
                times[spec] += calls
                rounds[spec].append(statistics.median(calls))
        apply({}, defaults)
        for spec in settings:
            per_round = " ".join(f"{t:.3f}" for t in rounds[spec])
            print(f"| {kind} | {spec} | {statistics.median(times[spec]):.3f} | {per_round} |", flush=True)
        del student, teacher
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
