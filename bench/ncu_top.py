"""Summarise an Nsight Compute source page (CSV, SASS): the lines with the most stall samples."""
import csv
import sys

rows = list(csv.reader(open(sys.argv[1], errors="replace")))
header_i = next(i for i, r in enumerate(rows) if any("Source" == c or c.startswith("Source") for c in r))
header = rows[header_i]
body = [r for r in rows[header_i + 1:] if len(r) == len(header)]
src = next(i for i, c in enumerate(header) if c.startswith("Source"))
samp = next(i for i, c in enumerate(header) if "Sampling (All" in c)
def num(x):
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0
total = sum(num(r[samp]) for r in body) or 1
print("columns:", header)
for r in sorted(body, key=lambda r: -num(r[samp]))[: int(sys.argv[2]) if len(sys.argv) > 2 else 60]:
    print(f"{100 * num(r[samp]) / total:5.1f}%  {r[src][:110]}")
