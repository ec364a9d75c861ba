"""Summarise an Nsight Compute source page (CSV, SASS): the share of each warp-stall reason,
then the lines with the most stall samples.

    python3 bench/ncu_top.py source.csv [lines]     # lines: how many hot lines (default 40)

With a kernel that calls functions (uld_split.fallback_kernel calls its five passes), also the
share of samples from each call target's first instruction to the next target's, named in
call order (fallback_kernel: 0 stats, 1 root, 2 level-1 count, 3 finish, 4 grad); the kernel's
own code before the first target is left out (0.3% of fallback_kernel's samples).
"""
import csv
import sys


def num(x: str) -> float:
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def main() -> None:
    rows = list(csv.reader(open(sys.argv[1], errors="replace")))
    header_i = next(i for i, r in enumerate(rows) if any(c.startswith("Source") for c in r))
    header = rows[header_i]
    body = [r for r in rows[header_i + 1:] if len(r) == len(header)]
    src = next(i for i, c in enumerate(header) if c.startswith("Source"))
    samp = next(i for i, c in enumerate(header) if "Sampling (All" in c)
    stalls = [i for i, c in enumerate(header) if c.startswith("stall_") and "Not Issued" not in c]
    totals = {header[i]: sum(num(r[i]) for r in body) for i in stalls}
    share = sum(totals.values()) or 1
    print("stall reasons (share of samples):", ", ".join(
        f"{k[6:]} {100 * v / share:.0f}%" for k, v in sorted(totals.items(), key=lambda kv: -kv[1])[:8]))
    total = sum(num(r[samp]) for r in body) or 1
    for r in sorted(body, key=lambda r: -num(r[samp]))[: int(sys.argv[2]) if len(sys.argv) > 2 else 40]:
        print(f"{100 * num(r[samp]) / total:5.1f}%  {r[src][:110]}")
    address = next(i for i, c in enumerate(header) if c == "Address")
    targets = [r[src].split()[-1].lower() for r in body if "CALL.REL" in r[src]]
    starts = {r[address].lower(): k for k, r in enumerate(body)}
    found = sorted((starts[t], n) for n, t in enumerate(targets) if t in starts)
    for (first, n), (last, _) in zip(found, found[1:] + [(len(body), None)]):
        print(f"call {n} (at {targets[n]}): {100 * sum(num(r[samp]) for r in body[first:last]) / total:.1f}% of samples")


if __name__ == "__main__":
    main()
