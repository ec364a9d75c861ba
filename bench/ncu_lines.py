"""Summarise an Nsight Compute source page exported with its source lines
(`ncu -i rep --page source --csv --print-source cuda,sass > lines.csv`): the share of
warp-stall samples, executed instructions and shared-memory wavefronts of each source line
(summed over the SASS instructions under it), then of each loop (a backward branch that ran:
the instructions from its target to it, so nested loops are counted in each).

    python3 bench/ncu_lines.py lines.csv [lines]     # lines: how many hot lines (default 30)

(bench/profile_stalls.sh writes such a page per profile; bench/ncu_top.py reads the SASS-only
page.) Twenty-eighth session: hist_kernel's count loop 62% of samples, its pass over bins 27%.
"""
import csv
import os
import re
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.ncu_top import num  # noqa: E402


def read(path: str):
    """SASS rows as (address, instruction, samples, executed, wavefronts, (file, line, text))."""
    sass, header, line = [], None, None
    where = None
    for r in csv.reader(open(path, errors="replace")):
        if not r:
            continue
        if r[0] == "File Path":
            where = r[1].split("/")[-1]
        elif r[0] == "Line No":
            header = r
            samples = next(i for i, c in enumerate(header) if "Sampling (All" in c)
            executed = header.index("Instructions Executed")
            waves = header.index("L1 Wavefronts Shared")
        elif header is None or r[0] == "Function Name":
            continue
        elif r[0] != "":
            line = (where, r[0], r[1])
        elif len(r) == len(header) and r[2] not in ("", "..."):
            sass.append((int(r[2], 16), r[3].strip(), num(r[samples]), num(r[executed]), num(r[waves]), line))
    if not sass:
        raise SystemExit(f"ncu_lines: no SASS rows with source lines in {path} (exported with --print-source cuda,sass?)")
    return sorted(sass)


def main() -> None:
    sass = read(sys.argv[1])
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    totals = [sum(row[k] for row in sass) or 1.0 for k in (2, 3, 4)]
    by_line = defaultdict(lambda: [0.0, 0.0, 0.0])
    for row in sass:
        for k in range(3):
            by_line[row[5]][k] += row[2 + k]
    print(f"samples {totals[0]:.0f}, instructions {totals[1]:.0f}, shared wavefronts {totals[2]:.0f}")
    print("samples  instr  wavefr  line")
    for (where, number, text), v in sorted(by_line.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{100 * v[0] / totals[0]:6.1f}% {100 * v[1] / totals[1]:5.1f}% {100 * v[2] / totals[2]:6.1f}%  "
              f"{where}:{number}  {text.strip()[:80]}")
    base = sass[0][0]
    for address, instruction, _s, executed, _w, line in sass:
        target = re.search(r"BRA\s+(?:\S+,\s*)?0x([0-9a-f]+)", instruction)
        if target and executed and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            body = [row for row in sass if start <= row[0] <= address]
            share = [100 * sum(row[2 + k] for row in body) / totals[k] for k in range(3)]
            print(f"loop {start - base:#x}..{address - base:#x} ({len(body)} instructions, branch at "
                  f"{line[0]}:{line[1]}, taken up to {executed:.0f} times): {share[0]:.1f}% of samples, "
                  f"{share[1]:.1f}% of instructions, {share[2]:.1f}% of shared wavefronts")


if __name__ == "__main__":
    main()
