"""Run uld_rows twice on a benchmark batch (one workspace batch: every pass is one launch per
call, the count pass one per split level, 4 by default) so that Nsight Compute can profile the
second call's launch.

    ncu --clock-control none --set full --import-source yes -k regex:count_kernel \
        --launch-skip 4 --launch-count 1 -o prof python3 bench/profile_ncu.py random 2048

    arguments: kind rows [pair [pairs per workspace batch: rows unless given]]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.shapes import VOCAB_PAIRS, make_rows  # noqa: E402
from uld_kernels import launch  # noqa: E402
from uld_kernels.launch import uld_rows  # noqa: E402

kind, rows = sys.argv[1], int(sys.argv[2])
pair = sys.argv[3] if len(sys.argv) > 3 else "qwen_llama3"
launch.SPLIT["batch_rows"] = int(sys.argv[4]) if len(sys.argv) > 4 else rows
student, teacher = make_rows(kind, rows, *VOCAB_PAIRS[pair], seed=1)
for _ in range(2):  # the first launch compiles; the profiler skips it
    loss, status, grad, _ = uld_rows(student, teacher, 1.0, 1.0, True, False, 1.0)
torch.cuda.synchronize()
levels = (status >> 1).float()
print(f"{kind} {pair} rows={rows}: levels below root mean {levels.mean():.2f} max {int(levels.max())}, exhausted {int((status & 1).sum())}")
