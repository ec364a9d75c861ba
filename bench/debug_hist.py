"""Debug: the histogram engine's per-row parameters and flags on real rows (GPU)."""
import os, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.shapes import make_rows  # noqa: E402
from uld_kernels import launch  # noqa: E402
from uld_kernels.kernels import uld_hist  # noqa: E402

s, t = make_rows("random", 4, 151936, 128256, seed=1)
cap, slots = uld_hist.CAP.value, uld_hist.PARAM_SLOTS.value
n = 4
fparam = torch.zeros(n * 2 * slots, device="cuda")
iparam = torch.zeros(n * 2 * slots, dtype=torch.int32, device="cuda")
counts = torch.zeros(n * 2 * (cap + 1), dtype=torch.int32, device="cuda")
probs = torch.zeros(n * 2 * cap, device="cuda")
signs = torch.zeros(n * 2 * cap, device="cuda")
loss = torch.zeros(n, device="cuda")
import triton.language as tl
for use_ptx in (True, False):
    counts.zero_()
    for side, x in enumerate((s, t)):
        uld_hist.hist_kernel[(n,)](x, loss, fparam, iparam, counts, 0, side, x.shape[1], *launch._row_layout(x), 1.0,
                                   GATHER=False, UNIT_STRIDE=True, USE_PTX=use_ptx, BLOCK=4096, num_warps=4)
    torch.cuda.synchronize()
    print("USE_PTX", use_ptx)
    print(fparam.view(n, 2, slots)[:2].cpu())
    print(iparam.view(n, 2, slots)[:2].cpu())
    print("count sums", counts.view(n, 2, cap + 1).sum(-1).cpu().tolist())
uld_hist.merge_kernel[(n,)](fparam, iparam, counts, probs, signs, loss, 0, 1.0, 1.0, DTYPE_S=tl.bfloat16,
                            DTYPE_T=tl.bfloat16, BLOCK=1024, num_warps=4)
torch.cuda.synchronize()
print("after merge flags", iparam.view(n, 2, slots)[:, :, 4].cpu().tolist(), loss.cpu().tolist())
p = probs.view(n, 2, cap)[0, 0].cpu()
w = iparam.view(n, 2, slots)[0, 0, 3].item()
p = p[:w]
print("mono", bool((p[1:] >= p[:-1]).all()), "equal neighbours", int((p[1:] == p[:-1]).sum()))
import numpy as np
d = (p[1:] == p[:-1]).numpy()
runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], d.astype(int), [0]]))))[::2]
print("longest equal runs", sorted(runs.tolist())[-10:] if len(runs) else [])
