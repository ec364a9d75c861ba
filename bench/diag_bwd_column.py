"""Where does forward+backward's extra time in bench_uld's rows come from? (11th session)

Times forward+backward of Qwen/Llama-3 rows as bench_uld.measure does, several times over in
one process, printing the 10/50/90% quantiles of do_bench's calls: as measured first, again,
after emptying the allocator's cache, with Python's garbage collector off, and on fresh rows.
"""
import gc
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_uld import measure  # noqa: E402
from bench.shapes import make_rows  # noqa: E402
from uld_kernels import uld_loss  # noqa: E402


def quantiles(student, teacher, label):
    def full():
        return torch.autograd.grad(uld_loss(student, teacher), student)

    def fwd_grad():
        return uld_loss(student, teacher)

    for name, fn in (("fwd+bwd", full), ("fwd(grad)", fwd_grad)):
        times = torch.tensor(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="all"))
        q = torch.quantile(times, torch.tensor([0.1, 0.5, 0.9])).tolist()
        print(f"{label:>28} {name:>9}: n={len(times)} p10 {q[0]:.3f} p50 {q[1]:.3f} p90 {q[2]:.3f} "
              f"max {times.max():.3f}", flush=True)


kind = sys.argv[1] if len(sys.argv) > 1 else "peaked"
vs, vt, rows = 151936, 128256, 16384
student, teacher = make_rows(kind, rows, vs, vt, seed=rows + vs + vt)
student.requires_grad_(True)
r = measure("uld_kernels", uld_loss, student, teacher, 50, 300)
print(f"{kind}: bench_uld.measure fwd {r[0]:.3f} fwd(grad) {r[1]:.3f} bwd {r[2]:.3f} full {r[3]:.3f}", flush=True)
quantiles(student, teacher, f"{kind} after measure")
quantiles(student, teacher, f"{kind} again")
torch.cuda.empty_cache()
print(f"reserved after empty_cache {torch.cuda.memory_reserved() / 1e9:.1f} GB", flush=True)
quantiles(student, teacher, f"{kind} after empty_cache")
gc.disable()
quantiles(student, teacher, f"{kind} gc off")
gc.enable()
del student, teacher
torch.cuda.empty_cache()
other = "random" if kind == "peaked" else "peaked"
student, teacher = make_rows(other, rows, vs, vt, seed=rows + vs + vt)
student.requires_grad_(True)
quantiles(student, teacher, f"{other} fresh rows")
r = measure("uld_kernels", uld_loss, student, teacher, 50, 300)
print(f"{other}: bench_uld.measure fwd {r[0]:.3f} fwd(grad) {r[1]:.3f} bwd {r[2]:.3f} full {r[3]:.3f}", flush=True)
