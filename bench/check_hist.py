"""The histogram engine against the trie engine on real vocabularies (GPU): both are exact, so
their row losses agree to float32 rounding and their gradients to bf16 rounding.

    python bench/check_hist.py [--rows 512]

Prints, per (pair, kind): rows the histogram engine flagged (handed to the trie), the largest
loss difference, the largest gradient difference, and the widest window of bins.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.shapes import KINDS, make_rows, pair_kinds  # noqa: E402
from uld_kernels import launch  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--pairs", nargs="+", default=["qwen_llama3", "qwen_qwen", "llama2_gemma"])
    parser.add_argument("--temperatures", type=float, nargs=2, default=[1.0, 1.0])
    args = parser.parse_args()
    ts, tt = args.temperatures
    for pair, vs, vt, kind in pair_kinds(args.pairs, KINDS):
        s, t = make_rows(kind, args.rows, vs, vt, seed=1)
        loss_h, status_h, grad_h, _ = launch.hist_rows(s, t, ts, tt, True, False, 1.0)
        loss_h_only, flag_bits, _g, _ = launch.hist_rows(s, t, ts, tt, False, False, 1.0, fallback=False)
        reasons = {int(b): int(((flag_bits & b) != 0).sum()) for b in (1, 2, 4) if ((flag_bits & b) != 0).any()}
        loss_s, _status, _ce, grad_s, _ = launch.uld_pairs(s, t, ts, tt, True, False, 1.0)
        flagged = int((flag_bits != 0).sum())
        unflagged = flag_bits == 0
        loss_diff = (loss_h.double() - loss_s.double()).abs().max().item()
        hist_only_diff = ((loss_h_only.double() - loss_s.double()).abs()[unflagged].max().item()
                          if unflagged.any() else float("nan"))
        grad_diff = (grad_h.double() - grad_s.double()).abs().max().item()
        print(f"{pair:13s} {kind:9s} T={ts}/{tt} rows={args.rows} flagged={flagged} {reasons} "
              f"max|loss diff|={loss_diff:.3g} (hist alone, unflagged rows: {hist_only_diff:.3g}) "
              f"max|grad diff|={grad_diff:.3g} loss mean={loss_s.mean().item():.5f}", flush=True)


if __name__ == "__main__":
    main()
