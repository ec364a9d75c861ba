"""How many trie entries row pairs need (GPU): for each (pair, kind, dtype) and workspace size,
the pairs that run out of it (status bit 0) with the retry off, and the rows by trie depth
(levels below the root; bf16 rows: those the histogram engine flagged, 0 for the others). Picks the sizes the workspace
and its retry (launch.TRIE_RETRY_ENTRIES) are set from, and the inputs of the retry's test.

    python bench/probe_trie_workspace.py [--rows 256] [--entries 2048 4096 8192 16384]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.shapes import KINDS, make_rows, pair_kinds  # noqa: E402
from uld_kernels import launch  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--entries", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--pairs", nargs="+", default=["qwen_qwen", "qwen_llama3"])
    parser.add_argument("--kinds", nargs="+", default=["near", "identical", "random", "peaked"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"], choices=sorted(DTYPES))
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    launch.TRIE_RETRY_ENTRIES = 0
    warnings.simplefilter("ignore")
    for pair, vs, vt, kind in pair_kinds(args.pairs, {k: KINDS[k] for k in args.kinds}):
        for name in args.dtypes:
            s, t = make_rows(kind, args.rows, vs, vt, seed=args.seed, dtype=DTYPES[name], device="cuda")
            counts = []
            for entries in args.entries:
                launch.SPLIT["entries"] = entries
                _, status, _, _, _ = launch.uld_pairs(s, t, 1.0, 1.0, False, False, 1.0)
                out = torch.nonzero(status & 1).flatten().tolist()
                depths = torch.bincount((status >> 1).flatten().cpu()).tolist()
                counts.append(f"{entries}: {len(out)}" + (f" (first {out[:6]})" if out else "")
                              + f", rows by trie depth {depths}")
            print(f"{pair} {kind} {name} {args.rows} rows, out of workspace at " + "; ".join(counts), flush=True)


if __name__ == "__main__":
    main()
