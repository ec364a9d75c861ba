"""Inline PTX (GPU only): a per-program histogram in shared memory, and the count levels'
global reductions.

Triton has no shared-memory atomics: `tl.histogram` costs about log2(bins) ballots plus
bins / 32 popcounts per 32 elements (65 instructions at 256 bins), and global atomics run
at about 100 G/s on the H200. Shared-memory reductions (`red.shared.add`) cost one
instruction per element whatever the number of bins, so the root can have 4,096 buckets.

The buffer is a function-scope `.shared` array declared once, by `smem_zero`, whose inline
assembly is emitted exactly once per kernel: it runs on a tensor of one element per thread
(SMEM_THREADS = 32 x num_warps threads, so the kernels using it run with 4 warps). Every
other helper refers to the array by name. Callers put `tl.debug_barrier()` between zeroing,
adding and reading back. Two layouts:

    COUNTS_ONLY (32 KB): int32 counts of 2 x 4,096 buckets at byte 0
    WITH_MASS   (40 KB): 16-bit counts of 2 x 2,048 buckets, two to a word, at byte 0 (a
                         program counts at most CHUNK = 32,768 elements per side: no carry),
                         then their int64 fixed-point masses (sum of p * 2**52) at byte
                         MASS_OFFSET

Static shared memory plus the kernel's own (Triton's, about 1 KB) must stay within 48 KB, or
the launch fails without an opt-in; a 48 KB layout with int32 counts failed exactly so.

The count levels' global reductions (`count_key`) are inline PTX for another reason: Triton
gives its own atomics on gathered addresses a layout of one element per thread, and converts
the vectorised row loads' layout to it through shared memory, with barriers, at every level of
the trie walk; an elementwise inline-asm op takes whatever layout its operands have.

Nothing here runs under TRITON_INTERPRET (inline assembly): the kernels fall back to
`tl.histogram` and global atomics there (a constexpr switch), and the GPU tests check this
path.
"""

import triton
import triton.language as tl

SMEM_THREADS = tl.constexpr(128)  # 4 warps
COUNTS_ONLY_BYTES = tl.constexpr(32768)
WITH_MASS_BYTES = tl.constexpr(40960)
MASS_OFFSET = tl.constexpr(8192)  # after 2 x 2,048 16-bit counts


def _zero_asm(size: int, threads: int) -> str:
    stride = 16 * threads
    stores = " ".join(f"st.shared.v4.u32 [a+{stride * i}], {{0, 0, 0, 0}};" for i in range(size // stride))
    return (f".shared .align 16 .b8 uld_smem[{size}];\n"
            f"{{ .reg .u32 a; mov.u32 a, uld_smem; mad.lo.u32 a, $1, 16, a; {stores} mov.u32 $0, 0; }}")


_ZERO_COUNTS_ONLY = tl.constexpr(_zero_asm(COUNTS_ONLY_BYTES.value, SMEM_THREADS.value))
_ZERO_WITH_MASS = tl.constexpr(_zero_asm(WITH_MASS_BYTES.value, SMEM_THREADS.value))
_ADD_ONE_ASM = tl.constexpr(
    "{ .reg .pred p; .reg .u32 a; setp.ge.s32 p, $1, 0; mov.u32 a, uld_smem; "
    "mad.lo.u32 a, $1, 4, a; @p red.shared.add.u32 [a], 1; mov.u32 $0, 0; }")
_ADD_MASS_ASM = tl.constexpr(
    "{ .reg .pred p; .reg .u32 a; setp.ge.s32 p, $1, 0; mov.u32 a, uld_smem; "
    f"add.u32 a, a, {MASS_OFFSET.value}; mad.lo.u32 a, $1, 8, a; @p red.shared.add.u64 [a], $2; mov.u32 $0, 0; }}")
_ADD_ONE_PACKED_ASM = tl.constexpr(
    "{ .reg .pred p; .reg .u32 a, h, v; setp.ge.s32 p, $1, 0; shr.u32 a, $1, 1; "
    "and.b32 h, $1, 1; shl.b32 h, h, 4; shl.b32 v, 1, h; mov.u32 h, uld_smem; mad.lo.u32 a, a, 4, h; "
    "@p red.shared.add.u32 [a], v; mov.u32 $0, 0; }")
_LOAD_PACKED_ASM = tl.constexpr(
    "{ .reg .u32 a, h, x; shr.u32 a, $1, 1; mov.u32 h, uld_smem; mad.lo.u32 a, a, 4, h; "
    "ld.shared.u32 x, [a]; and.b32 h, $1, 1; shl.b32 h, h, 4; shr.u32 x, x, h; and.b32 $0, x, 65535; }")
_COUNT_KEY_ASM = tl.constexpr(
    "{ .reg .pred p; setp.ne.s32 p, $1, 0; @p red.global.add.u32 [$2], 1; "
    "@p red.global.min.s32 [$3], $4; @p red.global.max.s32 [$5], $4; mov.u32 $0, 0; }")
_LOAD_ASM = tl.constexpr(
    "{ .reg .u32 a; mov.u32 a, uld_smem; mad.lo.u32 a, $1, 4, a; ld.shared.u32 $0, [a]; }")
_LOAD_MASS_ASM = tl.constexpr(
    "{ .reg .u32 a; mov.u32 a, uld_smem; "
    f"add.u32 a, a, {MASS_OFFSET.value}; mad.lo.u32 a, $1, 8, a; ld.shared.u64 $0, [a]; }}")


@triton.jit
def smem_zero(WITH_MASS: tl.constexpr):
    """Declares the shared array (one of the two layouts) and zeroes it."""
    thread = tl.arange(0, SMEM_THREADS)
    if WITH_MASS:
        tl.inline_asm_elementwise(_ZERO_WITH_MASS, "=r,r", [thread], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise(_ZERO_COUNTS_ONLY, "=r,r", [thread], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def smem_add_one(word):
    """counts[word] += 1 for every lane whose word is >= 0."""
    tl.inline_asm_elementwise(_ADD_ONE_ASM, "=r,r", [word], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def smem_add_one_packed(bucket):
    """16-bit counts[bucket] += 1 for every lane whose bucket is >= 0 (WITH_MASS layout)."""
    tl.inline_asm_elementwise(_ADD_ONE_PACKED_ASM, "=r,r", [bucket], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def smem_load_packed(bucket):
    """16-bit counts[bucket], one value per lane (WITH_MASS layout)."""
    return tl.inline_asm_elementwise(_LOAD_PACKED_ASM, "=r,r", [bucket], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def smem_add_mass(word, mass):
    """masses[word] += mass (int64) for every lane whose word is >= 0 (WITH_MASS layout)."""
    tl.inline_asm_elementwise(_ADD_MASS_ASM, "=r,r,l", [word, mass], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def smem_load(word):
    """counts[word], one value per lane."""
    return tl.inline_asm_elementwise(_LOAD_ASM, "=r,r", [word], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def smem_load_mass(word):
    """masses[word], one int64 per lane (WITH_MASS layout)."""
    return tl.inline_asm_elementwise(_LOAD_MASS_ASM, "=l,r", [word], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def count_key(reached, count_ptr, key_min_ptr, key_max_ptr, key):
    """Where `reached`: count += 1, key_min = min(key_min, key), key_max = max(key_max, key),
    through relaxed global reductions (integers: the result does not depend on their order).
    The three pointers are global-memory addresses (the workspace), passed as 64-bit operands."""
    tl.inline_asm_elementwise(_COUNT_KEY_ASM, "=r,r,l,l,r,l",
                              [reached.to(tl.int32), count_ptr, key_min_ptr, key, key_max_ptr],
                              dtype=tl.int32, is_pure=False, pack=1)
