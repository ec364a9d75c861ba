"""Compile every kernel configuration used at large vocabularies for sm_90, without a GPU.

Run as a script with TRITON_INTERPRET unset (tests/test_compile_sm90.py does); prints one
JSON line per configuration with the facts the test checks and the compiler's resource use.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from uld_kernels.kernels.cross_entropy import ce_rows_kernel  # noqa: E402
from uld_kernels.kernels import uld_split  # noqa: E402
from uld_kernels.kernels.uld_rows import scale_rows_kernel, zero_rows_kernel  # noqa: E402
from uld_kernels.kernels.uld_topk import topk_grad_kernel, topk_rows_kernel  # noqa: E402
from uld_kernels.launch import (HIST_BLOCK, HIST_GRAD_BLOCK, HIST_PDL, HIST_SCAN, HIST_SIGN_MAXNREG, _hist_blocks, HIST_GRAD_CHUNK, HIST_SIGN_BLOCK,  # noqa: E402
                                HIST_MAXNREG, HIST_TAIL_BLOCK, FALLBACK_FINISH_BLOCK, FALLBACK_SMEM_L1, _fallback_list_mode,
                                ce_kernel_config, split_config)
from uld_kernels.launch import TOPK_BIN_CHUNK, TOPK_BLOCK, TOPK_MAXNREG, TOPK_PREFETCH, TOPK_WARPS, topk_level_bits, topk_pad, topk_sizes  # noqa: E402

HIST_OPTIONS = dict(num_warps=4, **({"maxnreg": HIST_MAXNREG} if HIST_MAXNREG else {}))  # as launch.py
TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(kernel, types: dict, constexprs: dict, aligned: list[str], options, target=TARGET):
    """options: num_warps, or a dict of compile options (num_warps, num_stages) as launch.py
    passes them."""
    names = kernel.arg_names
    signature = {name: types.get(name, "constexpr") for name in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = options if isinstance(options, dict) else dict(num_warps=options)
    return triton.compile(src, target=target, options=options)


def facts(name: str, compiled) -> dict:
    ptx = compiled.asm["ptx"]
    return dict(
        name=name,
        cubin_bytes=len(compiled.asm["cubin"]),
        sm90=".target sm_90" in ptx,
        sm80=".target sm_80" in ptx,
        # 8- or 16-byte row loads: plain vector loads, or pipelined copies to shared memory
        # (cache qualifiers such as launch.py's eviction hints, `.L1::evict_first.L2::cache_hint`,
        # stand between the space and the width)
        vector_loads=bool(re.search(
            r"ld\.global(\.nc)?(\.L[12]::\w+)*\.v[24]|cp\.async\.\w+\.shared\.global \[[^\]]*\], \[[^\]]*\], "
            r"(0x8|0x10|8|16)\b", ptx)),
        vector_stores=bool(re.search(r"st\.global(\.L[12]::\w+)*\.v[24]", ptx)),
        pipelined=("cp.async" in ptx),
        shared=compiled.metadata.shared,
        # static shared memory declared by inline PTX (kernels/ptx.py)
        static_shared=sum(int(n) for n in re.findall(r"\.shared \.align \d+ \.b8 \w+\[(\d+)\]", ptx)),
        local_memory=".local" in ptx,
        # stores to shared memory: layout conversions go through it (kernels/ptx.py)
        shared_stores=len(re.findall(r"\bst\.shared", ptx)),
        # float32 loads through the read-only path (ptx.gather_f32's sign gathers)
        nc_f32_loads=len(re.findall(r"ld\.global\.nc\.f32", ptx)),
        **_grid_dependency(ptx),
    )


def _grid_dependency(ptx: str) -> dict:
    """The dependent launches' instructions (uld_hist.py, "Dependent launches") and what the
    kernel may run before a `griddepcontrol.wait`: every instruction some path from the entry
    reaches before one (a walk over the entry's branches, each path ending at a wait; the
    instructions of a called function are not followed, so a call counts as reached), and
    whether a path returns without one (a program that exits unwaited breaks the chain)."""
    body = ptx[ptx.index("{", ptx.index(")", ptx.index(".entry"))):]
    lines = [line.strip() for line in body[:re.search(r"^\}", body, re.M).start()].splitlines()]
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"(\$L__BB\w+):", line))}
    seen, paths, reached, unwaited_exit = set(), [0], [], False
    while paths:
        i = paths.pop()
        while i < len(lines) and i not in seen:
            seen.add(i)
            line = lines[i]
            if line.startswith("griddepcontrol.wait"):
                break
            reached.append(line)
            guarded = line.startswith("@")
            op = re.sub(r"^@!?%p\w+\s+", "", line)
            if (branch := re.match(r"bra(\.uni)?\s+(\$L__BB\w+);", op)):
                paths.append(labels[branch.group(2)])
                if not guarded:
                    break
            elif re.match(r"(ret|exit);", op):
                unwaited_exit = True
                if not guarded:
                    break
            i += 1
    # (searched anywhere in a line: an inline assembly's statements share one line)
    def any_reached(op: str) -> bool:
        return any(re.search(rf"(?<![\w.$]){op}", line) for line in reached)

    not_global = r"(?!shared|param|local|const)"  # (a generic address may be global)
    return dict(launches_dependents="griddepcontrol.launch_dependents" in ptx,
                waits_on_every_path=not unwaited_exit,
                global_reads_before_wait=any_reached(rf"(ld|ldu|cp\.async)\.{not_global}"),
                global_writes_before_wait=any_reached(rf"(st|atom|red|cp\.reduce)\.{not_global}"),
                calls_before_wait=any_reached(r"call\b"),
                shared_counts_before_wait=any_reached(r"red\.shared"))


def distill_kernel_configs():
    """The cross-entropy kernel of the training loss, for rows without a teacher partner."""
    cfg = ce_kernel_config(151936)
    for dtype, write_grad in itertools.product(TRITON_TYPE, [False, True]):
        logits = "*" + TRITON_TYPE[dtype]
        types = dict(logits_ptr=logits, index_ptr="*i64", label_ptr="*i64", weight_ptr="*fp32",
                     row_ce_ptr="*fp32", grad_ptr=logits, vocab="i32", seq_len="i32",
                     batch_stride="i64", row_stride="i64", col_stride="i32", grad_row_stride="i64")
        yield (f"ce_rows {TRITON_TYPE[dtype]} grad={write_grad}", ce_rows_kernel, types,
               dict(WRITE_GRAD=write_grad, UNIT_COL_STRIDE=True, BLOCK=cfg.block, STAGES=cfg.stages),
               ["logits_ptr", "grad_ptr", "vocab", "row_stride", "batch_stride", "grad_row_stride"],
               cfg.num_warps)


def _types_by_name(kernel, logits: str) -> dict:
    """Triton types of a kernel's runtime arguments, from the naming convention of kernels/."""
    split = kernel.fn.__module__ == uld_split.__name__
    types = {}
    for name in kernel.arg_names:
        if name[0].isupper():
            continue  # constexpr
        if name in ("student_ptr", "teacher_ptr", "grad_student_ptr", "grad_teacher_ptr", "logits_ptr", "grad_ptr"):
            types[name] = logits
        elif name in ("student_index_ptr", "teacher_index_ptr", "ce_label_ptr", "index_ptr", "scratch_ptr"):
            types[name] = "*i64"
        elif name.endswith("columns_ptr"):
            types[name] = "*i32"
        elif name.endswith("signs_ptr"):
            types[name] = "*i8"
        elif name in ("ws_int_ptr", "ws_meta_ptr", "status_ptr", "partial_i_ptr", "root_partial_ptr", "iparam_ptr",
                      "count_ptr", "raw_ptr", "flag_ptr"):
            types[name] = "*i32"
        elif name == "list_ptr":
            types[name] = "*i16"
        elif name == "ws_mass_ptr":
            types[name] = "*i64"
        elif name == "row_mass_ptr" or (name == "partial_ptr" and not split):
            types[name] = "*fp64"  # (the histogram engine's partial sums; the split engine's are float32)
        elif name.endswith("_ptr"):
            types[name] = "*fp32"
        elif name.endswith(("batch_stride", "row_stride")):
            types[name] = "i64"
        elif "inv_temperature" in name or name.endswith("inv_t") or name == "grad_scale":
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


def split_kernel_configs():
    """The split engine's passes (the default engine), bf16/fp16/fp32, as launch.py runs them
    at a 151,936-column vocabulary."""
    cfg = split_config(on_gpu=True)
    chunks_pow2 = triton.next_power_of_2(triton.cdiv(151936, cfg.chunk))
    aligned_names = ["student_ptr", "teacher_ptr", "grad_student_ptr", "grad_teacher_ptr",
                     "student_vocab", "teacher_vocab", "student_row_stride", "teacher_row_stride",
                     "student_batch_stride", "teacher_batch_stride", "grad_student_row_stride",
                     "grad_teacher_row_stride"]
    kernels = [
        ("stats", uld_split.stats_kernel, dict(SAME_VOCAB=False, HAS_CE=False, CHUNKS_POW2=chunks_pow2,
                                               RESOLVE_BLOCK=256)),
        ("root", uld_split.root_kernel, dict(RESOLVE_BLOCK=256, USE_PTX=cfg.smem, LEVEL_CAP=cfg.level_cap)),
        ("count level 1 (sums the loss)", uld_split.count_kernel,
         dict(RESOLVE_BLOCK=256, CHUNKS_POW2=chunks_pow2, LOSS=True, USE_PTX=cfg.smem, PREFETCH=cfg.prefetch)),
        ("count", uld_split.count_kernel,
         dict(RESOLVE_BLOCK=256, CHUNKS_POW2=chunks_pow2, LOSS=False, USE_PTX=cfg.smem, PREFETCH=cfg.prefetch)),
        ("finish", uld_split.finish_kernel, dict(RESOLVE_BLOCK=256, CHUNKS_POW2=chunks_pow2, USE_PTX=cfg.smem,
                                                 PREFETCH=cfg.prefetch)),
        ("grad", uld_split.grad_kernel, dict(STUDENT_GRAD=True, TEACHER_GRAD=False, HAS_CE=False,
                                             USE_PTX=cfg.smem, PREFETCH=cfg.prefetch)),
    ]
    for dtype, (label, kernel, extra) in itertools.product(TRITON_TYPE, kernels):
        names = kernel.arg_names
        constexprs = dict(STUDENT_UNIT_STRIDE=True, TEACHER_UNIT_STRIDE=True, GATHER=False,
                          BLOCK=cfg.block, ENTRIES=cfg.entries, MAX_LEVELS=10, STAGES=cfg.stages,
                          ROOT_BITS=cfg.root_bits, **extra)
        if "CHUNK" in names:
            constexprs["CHUNK"] = cfg.chunk
        if label == "finish":
            constexprs["BLOCK"] = min(cfg.block, 512)  # as launch.py runs it
        yield (f"split {label} {TRITON_TYPE[dtype]}", kernel, _types_by_name(kernel, "*" + TRITON_TYPE[dtype]),
               constexprs, [n for n in aligned_names if n in names], cfg.num_warps)
    # The histogram engine's fallback: every pass of a flagged pair in one program (launch.py:
    # `_trie_fallback`, num_stages=1). The gathered configuration appends to the finish pass's
    # lists by Triton's atomics (ULD_FALLBACK_LIST_PTX=0; inline PTX by default), so that
    # both ways are compiled.
    for label, gathered in (("", False), (" gathered ce", True)):
        kernel = uld_split.fallback_kernel
        constexprs = dict(SAME_VOCAB=False, STUDENT_UNIT_STRIDE=True, TEACHER_UNIT_STRIDE=True, GATHER=gathered,
                          HAS_CE=gathered, STUDENT_GRAD=True, TEACHER_GRAD=False, BLOCK=cfg.block,
                          FINISH_BLOCK=min(cfg.block, FALLBACK_FINISH_BLOCK), ROOT_CHUNK=cfg.chunk, ENTRIES=cfg.entries,
                          RESOLVE_BLOCK=256, MAX_LEVELS=10, ROOT_BITS=cfg.root_bits, USE_PTX=cfg.smem,
                          LEVEL_CAP=cfg.level_cap, PREFETCH=cfg.prefetch, SMEM_L1=FALLBACK_SMEM_L1,
                          LIST=1 if gathered else _fallback_list_mode())
        yield (f"fallback{label} bf16", kernel, _types_by_name(kernel, "*bf16"), constexprs,
               [n for n in aligned_names if n in kernel.arg_names], dict(num_warps=cfg.num_warps, num_stages=1))
    for label, kernel, extra in [("stats", uld_split.stats_kernel, kernels[0][2]),
                                 ("grad", uld_split.grad_kernel, kernels[-1][2])]:
        names = kernel.arg_names
        constexprs = dict(STUDENT_UNIT_STRIDE=True, TEACHER_UNIT_STRIDE=True, BLOCK=cfg.block,
                          ENTRIES=cfg.entries, MAX_LEVELS=10, STAGES=cfg.stages, CHUNK=cfg.chunk,
                          ROOT_BITS=cfg.root_bits, **dict(extra, GATHER=True, HAS_CE=True))
        yield (f"split {label} gathered bf16 ce=True", kernel, _types_by_name(kernel, "*bf16"),
               constexprs, [n for n in aligned_names if n in names], cfg.num_warps)

def hist_kernel_configs():
    """The histogram engine's passes (uld_hist.py), as launch.hist_rows runs them: on bf16
    logits, without gaps (the default) and with them (ULD_HIST_GAPS=1), and without gaps on
    float32 ones (a bf16 model's logits upcast, at launch._hist_blocks' sizes)."""
    from uld_kernels.kernels import uld_hist
    # Workspace buffers are allocated by the launcher (16-byte aligned, as Triton specializes
    # them at run time); the logits as in the split engine's configurations.
    aligned = ["logits_ptr", "grad_ptr", "vocab", "row_stride", "batch_stride", "grad_row_stride", "count_ptr",
               *[f"{side}_{name}" for side in ("student", "teacher") for name in ("ptr", "vocab", "row_stride",
                                                                                 "batch_stride")],
               "fparam_ptr", "iparam_ptr", "sign_ptr", "partial_ptr", "list_ptr", "raw_ptr"]
    for dtype, gaps in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, False)):
        hist_block, grad_block = _hist_blocks(dtype, True)
        rows = dict(USE_PTX=True, SIMD16=True, PREFETCH=True)
        pdl = dict(PDL=HIST_PDL)  # (uld_hist.py, "Dependent launches")
        hist = dict(rows, **pdl, STUDENT_UNIT_STRIDE=True, TEACHER_UNIT_STRIDE=True, BLOCK=hist_block,
                    TAIL_BLOCK=HIST_TAIL_BLOCK, GAPS=gaps, REDO=gaps, USE_PTX=1 + HIST_SCAN)
        grad = dict(rows, **pdl, UNIT_STRIDE=True, CHUNK=HIST_GRAD_CHUNK, BLOCK=grad_block, GAPS=gaps)
        sign_options = dict(num_warps=1, **({"maxnreg": HIST_SIGN_MAXNREG} if gaps and HIST_SIGN_MAXNREG else {}))
        configs = [
            ("hist", uld_hist.hist_kernel, dict(hist, GATHER=False, HAS_CE=False), HIST_OPTIONS),
            ("hist gathered ce", uld_hist.hist_kernel, dict(hist, GATHER=True, HAS_CE=True), HIST_OPTIONS),
            ("finish gathered ce", uld_hist.finish_kernel, dict(GATHER=True, HAS_CE=True, GAPS=gaps, **pdl), 1),
            ("grad", uld_hist.grad_kernel, dict(grad, GATHER=False, HAS_CE=False), 4),
            ("grad gathered ce", uld_hist.grad_kernel, dict(grad, GATHER=True, HAS_CE=True), 4),
        ]
        if dtype == torch.bfloat16:  # (no logits read)
            configs += [("sign", uld_hist.sign_kernel, dict(STORE_STUDENT=True, STORE_TEACHER=False, USE_PTX=True,
                                                           BLOCK=HIST_SIGN_BLOCK, GAPS=gaps, **pdl), sign_options),
                        ("finish", uld_hist.finish_kernel, dict(GATHER=False, HAS_CE=False, GAPS=gaps, **pdl), 1)]
        for label, kernel, constexprs, warps in configs:
            names = kernel.arg_names
            yield (f"hist {label} {TRITON_TYPE[dtype]}{' gaps' if gaps else ''}", kernel,
                   _types_by_name(kernel, "*" + TRITON_TYPE[dtype]), constexprs, [n for n in aligned if n in names],
                   warps)


def hist_sm80_configs():
    """The histogram engine's row passes as an sm_80 / sm_89 GPU runs them (A100, L40S): no
    u16x2 instructions (SIMD16=False), the shared-memory histogram still."""
    from uld_kernels.kernels import uld_hist
    aligned = ["logits_ptr", "grad_ptr", "vocab", "row_stride", "batch_stride", "grad_row_stride", "count_ptr",
               *[f"{side}_{name}" for side in ("student", "teacher") for name in ("ptr", "vocab", "row_stride",
                                                                                 "batch_stride")],
               "fparam_ptr", "iparam_ptr", "sign_ptr", "list_ptr", "raw_ptr"]
    for label, kernel, constexprs in [
        ("hist", uld_hist.hist_kernel, dict(GATHER=False, STUDENT_UNIT_STRIDE=True, TEACHER_UNIT_STRIDE=True,
                                            USE_PTX=1 + HIST_SCAN, SIMD16=False, HAS_CE=True,
                                            PREFETCH=True, BLOCK=HIST_BLOCK, TAIL_BLOCK=HIST_TAIL_BLOCK)),
        ("grad", uld_hist.grad_kernel, dict(GATHER=True, HAS_CE=True, UNIT_STRIDE=True, PREFETCH=True, USE_PTX=True,
                                            SIMD16=False, CHUNK=HIST_GRAD_CHUNK, BLOCK=HIST_GRAD_BLOCK)),
    ]:
        yield (f"sm80 {label} bf16", kernel, _types_by_name(kernel, "*bf16"), constexprs,
               [n for n in aligned if n in kernel.arg_names], 4)


def scale_kernel_configs():
    for dtype, per_row in itertools.product(TRITON_TYPE, [False, True]):
        types = dict(grad_ptr="*" + TRITON_TYPE[dtype], scale_ptr="*fp32", n_rows="i32", rows_per_program="i32",
                     vocab="i32")
        yield (f"scale_rows {TRITON_TYPE[dtype]} per_row={per_row}", scale_rows_kernel, types,
               dict(SCALE_PER_ROW=per_row, BLOCK=4096), ["grad_ptr", "scale_ptr", "vocab"], 8)


def zero_kernel_configs():
    """The distillation gradient's zeroing of what no kernel writes (launch.zero_unwritten_)."""
    for dtype in TRITON_TYPE:
        types = dict(grad_ptr="*" + TRITON_TYPE[dtype], written_ptr="*i8", n_rows="i32", rows_per_program="i32",
                     used="i32", width="i32")
        yield (f"zero_rows {TRITON_TYPE[dtype]}", zero_rows_kernel, types, dict(BLOCK=4096, ROWS=128),
               ["grad_ptr", "written_ptr", "width"], 8)


def topk_kernel_configs():
    """The top_k select and its gradient kernel (launch.topk_rows / topk_grad) at k = 100, the
    select at k = 1,000 (the largest sort), and against a given teacher (GIVEN: bf16 student,
    the teacher's float32 probabilities; uld_loss_teacher_topk's rows, and its batch or mask
    by index); the gradient as it is written, and by index, alone or added."""
    for dtype, gather, k, given in [*((d, False, 100, False) for d in TRITON_TYPE), (torch.bfloat16, True, 100, False),
                                    (torch.bfloat16, False, 1000, False), (torch.bfloat16, False, 100, True),
                                    (torch.bfloat16, True, 100, True)]:
        types = _types_by_name(topk_rows_kernel, "*" + TRITON_TYPE[dtype])
        if given:
            types["teacher_ptr"] = "*fp32"
        bits, t_bits = (dict(zip(("BITS1", "BITS2", "BITS3"), topk_level_bits(d)))
                        for d in (dtype, torch.float32 if given else dtype))  # launch: the teacher's own dtype
        constexprs = dict(GATHER=gather, SAVE_STUDENT=True, SAVE_TEACHER=False, STUDENT_UNIT_STRIDE=True,
                          TEACHER_UNIT_STRIDE=True, **topk_sizes(k), BLOCK=TOPK_BLOCK, SMEM=True,
                          PREFETCH=TOPK_PREFETCH,
                          CHUNK=TOPK_BIN_CHUNK, GIVEN=given,
                          **{f"S_{b}": v for b, v in bits.items()}, **{f"T_{b}": v for b, v in t_bits.items()})
        aligned = [n for n in types if n.endswith(("_ptr", "vocab", "row_stride", "batch_stride"))]
        yield (f"topk_rows {TRITON_TYPE[dtype]} gather={gather} k={k}" + (" given" if given else ""), topk_rows_kernel,
               types, constexprs, aligned, dict(num_warps=TOPK_WARPS, **({"maxnreg": TOPK_MAXNREG} if TOPK_MAXNREG else {})))
    k_pad = topk_pad(100)
    for dtype, gather, accumulate in [*((d, False, False) for d in TRITON_TYPE), (torch.bfloat16, True, False),
                                      (torch.bfloat16, True, True)]:
        types = _types_by_name(topk_grad_kernel, "*" + TRITON_TYPE[dtype])
        aligned = [n for n in types if n.endswith(("_ptr", "vocab", "row_stride", "batch_stride"))]
        name = f"topk_grad {TRITON_TYPE[dtype]}" + (" gather" if gather else "") + (" accumulate" if accumulate else "")
        yield (name, topk_grad_kernel, types,
               dict(GATHER=gather, UNIT_COL_STRIDE=True, K_PAD=k_pad, BLOCK=TOPK_BLOCK, ACCUMULATE=accumulate),
               aligned, TOPK_WARPS)

def main():
    resources = "--resources" in sys.argv  # print ptxas -v of each kernel instead of facts
    only = [a for a in sys.argv[1:] if not a.startswith("--")]  # name prefixes to compile
    configs = [*split_kernel_configs(), *hist_kernel_configs(), *distill_kernel_configs(), *scale_kernel_configs(),
               *zero_kernel_configs(), *topk_kernel_configs()]
    configs += [(*c, GPUTarget("cuda", 80, 32)) for c in hist_sm80_configs()]
    for name, kernel, types, constexprs, aligned, warps, *target in configs:
        if only and not any(name.startswith(o) for o in only):
            continue
        compiled = compile_kernel(kernel, types, constexprs, aligned, warps, *target)
        if resources:
            print(f"{name}: {ptxas_resources(compiled)}", flush=True)
        else:
            print(json.dumps(facts(name, compiled)), flush=True)



def ptxas_resources(compiled) -> str:
    """Registers, spills and stack of a compiled kernel, from Triton's bundled ptxas -v."""
    import re
    import subprocess
    import tempfile

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    lines = [line for line in out.stderr.splitlines() if re.search(r"registers|spill|stack", line)]
    return " | ".join(s.split("info    :")[-1].strip() for s in lines)


if __name__ == "__main__":
    main()
