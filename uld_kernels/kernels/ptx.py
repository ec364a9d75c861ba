"""Inline PTX (GPU only): a per-program histogram in shared memory, the count levels'
global reductions, and a flush-to-zero exp2.

Triton has no shared-memory atomics: `tl.histogram` costs about log2(bins) ballots plus
bins / 32 popcounts per 32 elements (65 instructions at 256 bins), and global atomics run
at about 100 G/s on the H200. Shared-memory reductions (`red.shared.add`) cost one
instruction per element whatever the number of bins, so the root can have 4,096 buckets.

The buffer is a function-scope `.shared` array (int32 counts of 2 x 4,096 buckets, 32 KB)
declared once, by `smem_zero`, whose inline assembly is emitted exactly once per kernel: it
runs on a tensor of one element per thread (SMEM_THREADS = 32 x num_warps threads, so the
kernels using it run with 4 warps). Every other helper refers to the array by name. Callers
put `tl.debug_barrier()` between zeroing, adding and reading back. Static shared memory plus
the kernel's own (Triton's, about 1 KB) must stay within 48 KB, or the launch fails without
an opt-in (a 48 KB layout failed exactly so).

The count levels' global reductions (`count_key`) are inline PTX for two more reasons:
Triton gives its own atomics on gathered addresses a layout of one element per thread, and
converts the vectorised row loads' layout to it through shared memory, with barriers, at
every level of the trie walk (an elementwise inline-asm op takes whatever layout its operands
have); and a branch inside the assembly skips the address arithmetic, the mass conversion and
the four reductions for lanes that reach no open bucket (most of them), where Triton would
issue them predicated off.

`exp2_ftz` is `ex2.approx.ftz.f32`: one MUFU instruction, where `tl.exp` and `tl.exp2` emit the
non-flushing form, which rescales subnormal results (four more instructions per element).
Probabilities below 2**-126 become 0: they are left out of every count, like masked logits,
and change a loss by less than 1e-33.

Nothing here runs under TRITON_INTERPRET (inline assembly): the kernels fall back to
`tl.histogram`, `tl.exp2` and global atomics there (constexpr switches), and the GPU tests
check these paths.
"""

import triton
import triton.language as tl

SMEM_THREADS = tl.constexpr(128)  # 4 warps
SMEM_BYTES = tl.constexpr(32768)  # int32 counts of 2 x 4,096 buckets (zeroed, read back)
SMEM_SPARE = tl.constexpr(8192)  # one more word past them, never read: `smem_add_one`'s sink
MASS_SCALE = tl.constexpr(4503599627370496.0)  # 2**52: masses are int64 sums of p * 2**52


def _zero_asm(size: int, threads: int) -> str:
    stride = 16 * threads
    stores = " ".join(f"st.shared.v4.u32 [a+{stride * i}], {{0, 0, 0, 0}};" for i in range(size // stride))
    return (f".shared .align 16 .b8 uld_smem[{size + 16}];\n"
            f"{{ .reg .u32 a; mov.u32 a, uld_smem; mad.lo.u32 a, $1, 16, a; {stores} mov.u32 $0, 0; }}")


_ZERO_ASM = tl.constexpr(_zero_asm(SMEM_BYTES.value, SMEM_THREADS.value))
# Unconditional: lanes with nothing to count add to the spare word instead of branching around
# the add (a predicated shared add costs a branch and a convergence barrier per element).
_ADD_ONE_ASM = tl.constexpr(
    "{ .reg .u32 a; mov.u32 a, uld_smem; "
    "mad.lo.u32 a, $1, 4, a; red.shared.add.u32 [a], 1; mov.u32 $0, 0; }")


def _reductions(entry: str, key: str, p: str, planes: tuple[str, str, str, str]) -> str:
    """PTX: at bucket `entry` of the count, key-min, key-max and mass planes, count += 1,
    key-min/max with `key`, mass += trunc(p * 2**52) (0f59800000 = 2**52)."""
    count, key_min, key_max, mass = planes
    return (f"mad.wide.s32 a, {entry}, 4, {count}; red.global.add.u32 [a], 1; "
            f"mad.wide.s32 a, {entry}, 4, {key_min}; red.global.min.s32 [a], {key}; "
            f"mad.wide.s32 a, {entry}, 4, {key_max}; red.global.max.s32 [a], {key}; "
            f"mul.f32 f, {p}, 0f59800000; cvt.rzi.s64.f32 m, f; "
            f"mad.wide.s32 a, {entry}, 8, {mass}; red.global.add.u64 [a], m; ")


def _step(entry: str, key: str, child: str, shift: str, digit_mask: str, out: str) -> str:
    """PTX: the bucket one level below `entry` that `key` falls in: child node + digit."""
    return (f"mad.wide.s32 a, {entry}, 4, {child}; ld.global.s32 c, [a]; "
            f"shr.s32 d, {key}, {shift}; and.b32 d, d, {digit_mask}; add.s32 {out}, c, d; ")


# $1 reached, $2 entry, $3 key, $4 p; $5..$8 the count, key-min, key-max and mass planes.
# Labels are local to the braces, so the block can be inlined once per element.
_COUNT_KEY_ASM = tl.constexpr(
    "{ .reg .pred p; .reg .u64 a; .reg .f32 f; .reg .s64 m; setp.eq.s32 p, $1, 0; @p bra SKIP; "
    + _reductions("$2", "$3", "$4", ("$5", "$6", "$7", "$8")) + "SKIP: mov.u32 $0, 0; }")
# The sign of a key from its side's sign runs (uld_rows._run_sign): hi_sign at or above hi_key,
# lo_sign below lo_key; a key in between (the middle, rare) reads its root bucket's sign, after
# the clamp into the root's range. Shared by the two blocks below; $1 key, $3 hi key, $4 lo key,
# $5 hi sign, $6 lo sign, $7/$8 the clamp range, $9 root shift, $10 root base, $11 sign plane;
# leaves the clamped key in k and the root entry in e, and branches to DONE outside the middle.
_RUN_SIGN = ("setp.ge.s32 h, $1, $3; selp.f32 $0, $5, $6, h; setp.lt.s32 o, $1, $4; or.pred o, o, h; "
             "@o bra DONE; max.s32 k, $1, $7; min.s32 k, k, $8; shr.s32 e, k, $9; sub.s32 e, e, $10; "
             "mad.wide.s32 a, e, 4, $11; ld.global.nc.f32 $0, [a]; ")
# The level-1 pass: the sign of each key, and for a key in an open root bucket (NaN sign) one
# step down from it and count_key's reductions there, with sign 0 (its mass is summed through
# the bucket it reaches). $2 p; $12 child plane, $13..$16 the count, key-min, key-max and mass
# planes, $17 level 1's shift, $18 its digit mask.
_LOSS_SIGN_ASM = tl.constexpr(
    "{ .reg .pred h, o, q; .reg .u64 a; .reg .s32 k, e, c, d; .reg .f32 f; .reg .s64 m; " + _RUN_SIGN
    + "setp.num.f32 q, $0, $0; @q bra DONE; mov.f32 $0, 0f00000000; " + _step("e", "k", "$12", "$17", "$18", "c")
    + _reductions("c", "k", "$2", ("$13", "$14", "$15", "$16")) + "DONE: }")
# The gradient pass: the sign of each key, walking a middle key down from an open root bucket
# (NaN sign) while its bucket is open, at most `depth` levels. $2 unused (p), $12 child plane,
# $13 the level shifts (meta + _SHIFT_OFFSET: level v's at [v]), $14 depth.
_WALK_SIGN_ASM = tl.constexpr(
    "{ .reg .pred h, o, q; .reg .u64 a; .reg .s32 k, e, c, d, v, s, t; " + _RUN_SIGN
    + "mov.s32 v, 0; mov.s32 s, $9; "
    "LOOP: setp.num.f32 q, $0, $0; @q bra DONE; setp.ge.s32 q, v, $14; @q bra DONE; add.s32 v, v, 1; "
    "mad.wide.s32 a, v, 4, $13; ld.global.s32 t, [a]; sub.s32 d, s, t; "
    "mad.wide.s32 a, e, 4, $12; ld.global.s32 c, [a]; bfe.u32 e, k, t, d; add.s32 e, e, c; "
    "mad.wide.s32 a, e, 4, $11; ld.global.f32 $0, [a]; mov.s32 s, t; bra LOOP; DONE: }")
_LOAD_ASM = tl.constexpr(
    "{ .reg .u32 a; mov.u32 a, uld_smem; mad.lo.u32 a, $1, 4, a; ld.shared.u32 $0, [a]; }")


@triton.jit
def smem_zero():
    """Declares the shared array and zeroes it."""
    thread = tl.arange(0, SMEM_THREADS)
    tl.inline_asm_elementwise(_ZERO_ASM, "=r,r", [thread], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def smem_add_one(word, counted):
    """counts[word] += 1 for every lane that is counted (word in [0, 8192))."""
    tl.inline_asm_elementwise(_ADD_ONE_ASM, "=r,r", [tl.where(counted, word, SMEM_SPARE)], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def smem_load(word):
    """counts[word], one value per lane."""
    return tl.inline_asm_elementwise(_LOAD_ASM, "=r,r", [word], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def count_key(reached, entry, key, p, count_ptr, key_min_ptr, key_max_ptr, mass_ptr):
    """Where `reached`: at bucket `entry`, count += 1, key_min = min(key_min, key), key_max =
    max(key_max, key) and mass += trunc(p * 2**52), through relaxed global reductions
    (integers: the result does not depend on their order). The four plane pointers are scalars
    (global addresses of the workspace: int32 planes, int64 masses)."""
    lanes = tl.zeros_like(entry)  # the pointers, one per lane (inline asm takes tensors)
    tl.inline_asm_elementwise(_COUNT_KEY_ASM, "=r,r,r,r,f,l,l,l,l",
                              [reached.to(tl.int32), entry, key, p, count_ptr + lanes, key_min_ptr + lanes,
                               key_max_ptr + lanes, mass_ptr + lanes],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def loss_sign(key, p, runs, clamp, root, sign_ptr, child_ptr, count_ptr, key_min_ptr, key_max_ptr, mass_ptr,
              shift, digit_mask):
    """The level-1 pass's sign of each key (`uld_rows._run_sign` outside the middle of its runs,
    the root bucket's sign in it), 0 for a key in an open root bucket, which instead steps one
    level down (child node + digit) and is counted there by `count_key`'s reductions.
    runs = (hi key, lo key, hi sign, lo sign); clamp = the root's key range; root = (shift,
    base). Lanes outside the middle branch around the rest: in this pass almost every warp."""
    lanes = tl.zeros_like(key)
    hi_key, lo_key, hi_sign, lo_sign = runs
    key_lo, key_hi = clamp
    root_shift, root_base = root
    return tl.inline_asm_elementwise(
        _LOSS_SIGN_ASM, "=f,r,f,r,r,f,f,r,r,r,r,l,l,l,l,l,l,r,r",
        [key, p, hi_key + lanes, lo_key + lanes, hi_sign + lanes.to(tl.float32), lo_sign + lanes.to(tl.float32),
         key_lo + lanes, key_hi + lanes, root_shift + lanes, root_base + lanes, sign_ptr + lanes, child_ptr + lanes,
         count_ptr + lanes, key_min_ptr + lanes, key_max_ptr + lanes, mass_ptr + lanes, shift + lanes,
         digit_mask + lanes],
        dtype=tl.float32, is_pure=False, pack=1)


@triton.jit
def walk_sign(key, runs, clamp, root, sign_ptr, child_ptr, shift_ptr, depth):
    """The gradient pass's sign of each key: from its side's runs outside their middle; in it,
    the root bucket's sign, and while that is NaN (open) one level further down, at most
    `depth` levels (shift_ptr[v]: level v's shift). Arguments as `loss_sign`'s."""
    lanes = tl.zeros_like(key)
    hi_key, lo_key, hi_sign, lo_sign = runs
    key_lo, key_hi = clamp
    root_shift, root_base = root
    return tl.inline_asm_elementwise(
        _WALK_SIGN_ASM, "=f,r,f,r,r,f,f,r,r,r,r,l,l,l,r",
        [key, lanes.to(tl.float32), hi_key + lanes, lo_key + lanes, hi_sign + lanes.to(tl.float32),
         lo_sign + lanes.to(tl.float32), key_lo + lanes, key_hi + lanes, root_shift + lanes, root_base + lanes,
         sign_ptr + lanes, child_ptr + lanes, shift_ptr + lanes, depth + lanes],
        dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def exp2_ftz(x):
    """2**x, flushing subnormal results to 0 (one MUFU.EX2)."""
    return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)
