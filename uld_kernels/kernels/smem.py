"""A per-program histogram in shared memory, through inline PTX (GPU only).

Triton has no shared-memory atomics: `tl.histogram` costs about log2(bins) ballots plus
bins / 32 popcounts per 32 elements (65 instructions at 256 bins), and global atomics run
at about 100 G/s on the H200. Shared-memory reductions (`red.shared.add`) cost one
instruction per element whatever the number of bins, so the root can have 4,096 buckets.

The buffer is a function-scope `.shared` array declared once, by `smem_zero`, whose inline
assembly is emitted exactly once per kernel: it runs on a tensor of one element per thread
(SMEM_THREADS = 32 x num_warps threads, so the kernels using it run with 4 warps). Every
other helper refers to the array by name. Callers put `tl.debug_barrier()` between zeroing,
adding and reading back.

Nothing here runs under TRITON_INTERPRET (inline assembly): the kernels fall back to
`tl.histogram` there (a constexpr switch), and the GPU tests check this path.
"""

import triton
import triton.language as tl

SMEM_WORDS = tl.constexpr(8192)  # 32 KB of int32 counts: two sides x 4,096 buckets
SMEM_THREADS = tl.constexpr(128)  # 4 warps


def _zero_asm(words: int, threads: int) -> str:
    stores = " ".join(f"st.shared.u32 [a+{4 * threads * i}], 0;" for i in range(words // threads))
    return (f".shared .align 16 .b32 uld_smem[{words}];\n"
            f"{{ .reg .u32 a; mov.u32 a, uld_smem; mad.lo.u32 a, $1, 4, a; {stores} mov.u32 $0, 0; }}")


_ZERO_ASM = tl.constexpr(_zero_asm(SMEM_WORDS.value, SMEM_THREADS.value))
_ADD_ONE_ASM = tl.constexpr(
    "{ .reg .pred p; .reg .u32 a; setp.ge.s32 p, $1, 0; mov.u32 a, uld_smem; "
    "mad.lo.u32 a, $1, 4, a; @p red.shared.add.u32 [a], 1; mov.u32 $0, 0; }")
_LOAD_ASM = tl.constexpr(
    "{ .reg .u32 a; mov.u32 a, uld_smem; mad.lo.u32 a, $1, 4, a; ld.shared.u32 $0, [a]; }")


@triton.jit
def smem_zero():
    """Declares the shared array and zeroes it (each thread its own words)."""
    thread = tl.arange(0, SMEM_THREADS)
    tl.inline_asm_elementwise(_ZERO_ASM, "=r,r", [thread], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def smem_add_one(word):
    """uld_smem[word] += 1 for every lane whose word is >= 0."""
    tl.inline_asm_elementwise(_ADD_ONE_ASM, "=r,r", [word], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def smem_load(word):
    """uld_smem[word], one value per lane."""
    return tl.inline_asm_elementwise(_LOAD_ASM, "=r,r", [word], dtype=tl.int32, is_pure=False, pack=1)
