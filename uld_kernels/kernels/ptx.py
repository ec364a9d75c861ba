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

The histogram engine's stores and gathers of its per-bin tables (`store_runs_u32`,
`scatter`, `gather_i32`) are inline PTX for the same first reason: an
elementwise op takes its operands' layout, where a `tl.store` of a contiguous tensor next to a
gathered one gives each its own layout, and Triton then computes the values twice, once in
each (hist_kernel's pass over bins ran its scan twice so).

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

from uld_kernels.kernels.const import const

SMEM_THREADS = const(128)  # 4 warps
SMEM_BYTES = const(32768)  # int32 counts of 2 x 4,096 buckets (zeroed, read back)
SMEM_SPARE = const(8192)  # one more word past them, never read: `smem_add_one`'s sink
MASS_SCALE = const(4503599627370496.0)  # 2**52: masses are int64 sums of p * 2**52


def _zero_asm(size: int, threads: int, declare: bool, base: str = "uld_smem") -> str:
    """PTX: zeroes `size` bytes of shared memory from `base` (16 bytes a store per thread $1),
    declaring the array first where `declare`."""
    stride = 16 * threads
    assert size % stride == 0, (size, stride)
    stores = " ".join(f"st.shared.v4.u32 [a+{stride * i}], {{0, 0, 0, 0}};" for i in range(size // stride))
    declaration = f".shared .align 16 .b8 uld_smem[{size + 16}];\n" if declare else ""
    return (f"{declaration}{{ .reg .u32 a; mov.u32 a, {base}; mad.lo.u32 a, $1, 16, a; {stores} "
            "mov.u32 $0, 0; }")


_ZERO_ASM = const(_zero_asm(SMEM_BYTES.value, SMEM_THREADS.value, True))
_CLEAR_ASM = const(_zero_asm(SMEM_BYTES.value, SMEM_THREADS.value, False))
# Level 1 of the trie fallback in shared memory (`step_and_count_smem`), one side at a time,
# in the array `smem_zero` declared in another function (the root pass), reached through its
# address: per bucket w < L1_CAP, the count at word w, INT_MAX - key-min at L1_CAP + w (0:
# none, as zeroed), key-max at 2 L1_CAP + w (0: none; counted keys are positive) and the
# int64 mass at byte 12 L1_CAP + 8 w. 5 x 1,536 words fit the 8,192.
L1_CAP = const(1536)
L1_KEY_FLIP = const(2147483647)  # key-min is kept as L1_KEY_FLIP - key, by max
_L1_BYTES = 20 * L1_CAP.value
assert _L1_BYTES <= SMEM_BYTES.value, "the level-1 table must fit the shared array"
_CLEAR_L1_ASM = const(_zero_asm(_L1_BYTES, SMEM_THREADS.value, False, base="$2"))
# Unconditional: lanes with nothing to count add to the spare word instead of branching around
# the add (a predicated shared add costs a branch and a convergence barrier per element).
_ADD_ONE_ASM = const(
    "{ .reg .u32 a; mov.u32 a, uld_smem; "
    "mad.lo.u32 a, $1, 4, a; red.shared.add.u32 [a], 1; mov.u32 $0, 0; }")
# Predicated: where few lanes count (a select's later levels, one bin's logits of a row), the
# others skip the add; sent to the spare word they would all hit one bank, 32 lanes in turn.
_ADD_ONE_IF_ASM = const(
    "{ .reg .u32 a; .reg .pred p; setp.ne.u32 p, $2, 0; mov.u32 a, uld_smem; "
    "mad.lo.u32 a, $1, 4, a; @p red.shared.add.u32 [a], 1; mov.u32 $0, 0; }")


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
_COUNT_KEY_ASM = const(
    "{ .reg .pred p; .reg .u64 a; .reg .f32 f; .reg .s64 m; setp.eq.s32 p, $1, 0; @p bra SKIP; "
    + _reductions("$2", "$3", "$4", ("$5", "$6", "$7", "$8")) + "SKIP: mov.u32 $0, 0; }")
# The level-1 pass's open elements: one step down from the root bucket, then count_key's
# reductions. $1 walking, $2 root entry, $3 key, $4 p, $5 child plane, $6..$9 the count,
# key-min, key-max and mass planes, $10 the level's shift, $11 its digit mask.
_STEP_AND_COUNT_ASM = const(
    "{ .reg .pred p; .reg .u64 a; .reg .s32 c, d; .reg .f32 f; .reg .s64 m; setp.eq.s32 p, $1, 0; "
    "@p bra SKIP; " + _step("$2", "$3", "$5", "$10", "$11", "c")
    + _reductions("c", "$3", "$4", ("$6", "$7", "$8", "$9")) + "SKIP: mov.u32 $0, 0; }")
# The same into the shared level-1 table (L1_CAP): $1 walking, $2 root entry, $3 key, $4 p,
# $5 child plane, $6 the level's shift, $7 its digit mask, $8 the table's address, $9 level
# 1's first entry. The int64 mass is added as two 32-bit words: sm_90 has no 64-bit shared
# add (ptxas builds red.shared.add.u64 as a compare-and-swap loop, which took half of the
# fallback's level-1 pass on `flagged` rows: fifteenth session, Nsight Compute), so the low
# word is added with atom (its old value tells the carry) and the high word, plus the carry,
# with red, each only where nonzero (the rows' far tails have masses that truncate to 0). The
# sum is exact modulo 2**64, as one 64-bit add would be; read back as one u64 after a barrier.
_STEP_AND_COUNT_SMEM_ASM = const(
    "{ .reg .pred p; .reg .u64 a; .reg .s32 c, d; .reg .u32 s, lo, hi, old; .reg .f32 f; .reg .s64 m; "
    "setp.eq.s32 p, $1, 0; @p bra SKIP; " + _step("$2", "$3", "$5", "$6", "$7", "c")
    + f"sub.s32 c, c, $9; mad.lo.u32 s, c, 4, $8; red.shared.add.u32 [s], 1; sub.s32 d, {L1_KEY_FLIP.value}, $3; "
    f"red.shared.max.s32 [s+{4 * L1_CAP.value}], d; red.shared.max.s32 [s+{8 * L1_CAP.value}], $3; "
    "mul.f32 f, $4, 0f59800000; cvt.rzi.s64.f32 m, f; setp.eq.s64 p, m, 0; @p bra SKIP; "
    f"mov.b64 {{lo, hi}}, m; mad.lo.u32 s, c, 8, $8; add.u32 s, s, {12 * L1_CAP.value}; "
    "setp.eq.u32 p, lo, 0; @p bra HIGH; atom.shared.add.u32 old, [s], lo; add.u32 lo, old, lo; "
    "setp.lt.u32 p, lo, old; @p add.u32 hi, hi, 1; "
    "HIGH: setp.eq.u32 p, hi, 0; @p bra SKIP; red.shared.add.u32 [s+4], hi; SKIP: mov.u32 $0, 0; }")
_LOAD_L1_ASM = const("{ .reg .u32 a; mad.lo.u32 a, $1, 4, $2; ld.shared.u32 $0, [a]; }")
_LOAD_L1_MASS_ASM = const(
    f"{{ .reg .u32 a; mad.lo.u32 a, $1, 8, $2; ld.shared.u64 $0, [a+{12 * L1_CAP.value}]; }}")
# One level of the sign walk, only for lanes whose sign is NaN (an open bucket): the child
# node of the bucket, the key's digit there, and that bucket's sign. $2 entry, $3 sign, $4 key,
# $5 child plane, $6 sign plane, $7 shift, $8 digit mask; out: $0 sign, $1 entry.
_DESCEND_ASM = const(
    "{ .reg .pred p; .reg .u64 a; .reg .s32 c, d; mov.b32 $0, $3; mov.b32 $1, $2; "
    "setp.num.f32 p, $3, $3; @p bra DONE; " + _step("$2", "$4", "$5", "$7", "$8", "$1")
    + "mad.wide.s32 a, $1, 4, $6; ld.global.f32 $0, [a]; DONE: }")
# A masked gather of float32 through the read-only path, one wide multiply-add for the address
# (Triton spends four instructions on a 64-bit address from a signed 32-bit index). $1 index,
# $2 mask, $3 base; 0 where masked. The coherent form (a plain load) is for tables written in
# the same launch, where the read-only path's contract does not hold.
_GATHER_ASM = const(
    "{ .reg .pred p; .reg .u64 a; mov.b32 $0, 0; setp.ne.s32 p, $2, 0; mad.wide.s32 a, $1, 4, $3; "
    "@p ld.global.nc.f32 $0, [a]; }")
# Unmasked (every lane reads): $1 index, $2 base.
_GATHER_ALL_ASM = const("{ .reg .u64 a; mad.wide.s32 a, $1, 4, $2; ld.global.nc.f32 $0, [a]; }")


def _scatter_asm(kind: str, size: int) -> str:
    """PTX: base[$1] = $3 (`st.global.<kind>`, `size` bytes) where $2; $4 the base."""
    return ("{ .reg .pred p; .reg .u64 a; mov.b32 $0, 0; setp.ne.s32 p, $2, 0; "
            f"mad.wide.s32 a, $1, {size}, $4; @p st.global.{kind} [a], $3; }}")


_SCATTER_U16_ASM = const(_scatter_asm("u16", 2))
_SCATTER_B32_ASM = const(_scatter_asm("b32", 4))
_SCATTER_B64_ASM = const(_scatter_asm("b64", 8))
# Four consecutive int32 of a thread (pack=4, 16-byte aligned) with one vector store: $4 the
# address of the first (the others' are unused), $8..$11 the values.
_STORE_RUN_ASM = const("{ st.global.v4.u32 [$4], {$8, $9, $10, $11}; mov.b32 $0, 0; mov.b32 $1, 0; "
                              "mov.b32 $2, 0; mov.b32 $3, 0; }")
_GATHER_COHERENT_ASM = const(_GATHER_ASM.value.replace("ld.global.nc.f32", "ld.global.f32"))
# bf16 logits, two to a 32-bit register (inline assembly with pack=2 on int16 bit patterns):
# their histogram slots in SIMD halves (uld_hist.py, "Slots"): the magnitude bits m clamped to
# [lo, hi] by two VIMNMX.U16x2, the sign bit moved to the NEG_SLOTS bit, minus lo (each half
# stays in [0, 8192): no carry crosses halves). lo and hi are SLOT_M_LO and SLOT_M_HI plus the
# row's shift (uld_hist.py, "Rows past 256": 0 for most rows), in both halves of a 32-bit
# scalar: $lo and $hi (an int32 operand takes a register per element with pack=2, both the same
# loop-invariant one: nothing is packed per step); 0x10001000 is the sign bit's move in both
# halves. $w: the pair of patterns; leaves the slots' pair in `c`.
SLOT_M_LO = const(13311)  # magnitudes below 13312 (|z| < 2**-23): the tiny slots
SLOT_M_HI = const(17280)  # magnitudes from 17280 (|z| >= 256, inf, NaN): the out slots
NEG_SLOTS = const(4096)  # negative logits' slots start here
_MAGNITUDES_X2 = "and.b32 m, $w, 0x7FFF7FFF; "


def _clamp_x2(magnitudes: str) -> str:
    """The slot pair of the magnitude pair in register `magnitudes` (the sign from $w)."""
    return (f"max.u16x2 c, {magnitudes}, $lo; min.u16x2 c, c, $hi; shr.b32 s, $w, 3; "
            "and.b32 s, s, 0x10001000; add.u32 c, c, s; sub.u32 c, c, $lo; ")


_SLOTS_X2 = _MAGNITUDES_X2 + _clamp_x2("m")
# With a gap (uld_hist.py, "Gaps"): the magnitudes below $ga (gap_at plus the shift, both
# halves) move up by $g (the gap, both halves) before the clamp: min(m + g, max(m, ga)), which is
# m + g below ga and m from it on wherever no magnitude lies in [ga - g, ga) (the empty run the
# gap was found in: hist_kernel's REDO counts a row with the gap of its own last count). Three
# more instructions for two logits; no half passes 16 bits (m + g < 2 * 32768).
_SLOTS_X2_GAP = _MAGNITUDES_X2 + "add.u32 v, m, $g; max.u16x2 t, m, $ga; min.u16x2 v, v, t; " + _clamp_x2("v")
# Counts both slots in the shared histogram (like `smem_add_one`, every lane) and keeps a
# running maximum of the magnitudes: $0 the new maximum pair, $1 the patterns, $2 the old one,
# $3 (and $4) lo, $5 (and $6) hi; with the gap, $7 (and $8) gap_at plus the shift, $9 (and $10)
# the gap.
_COUNT_X2 = ("max.u16x2 $0, $2, m; "
             "mov.u32 base, uld_smem; and.b32 s, c, 0xFFFF; mad.lo.u32 a, s, 4, base; red.shared.add.u32 [a], 1; "
             "shr.b32 s, c, 16; mad.lo.u32 a, s, 4, base; red.shared.add.u32 [a], 1; }")
_COUNT_BF16X2_ASM = const(
    "{ .reg .b32 m, c, s, a, base; " + _SLOTS_X2.replace("$w", "$1").replace("$lo", "$3").replace("$hi", "$5")
    + _COUNT_X2)
_COUNT_BF16X2_GAP_ASM = const(
    "{ .reg .b32 m, c, s, a, base, t, v; "
    + _SLOTS_X2_GAP.replace("$w", "$1").replace("$lo", "$3").replace("$hi", "$5").replace("$ga", "$7")
    .replace("$g", "$9")
    + _COUNT_X2)
# The two slots as 32-bit integers: $0, $1 out, $2 the patterns, $3 (and $4) lo, $5 (and $6) hi.
_SLOTS_BF16X2_ASM = const(
    "{ .reg .b32 m, c, s; " + _SLOTS_X2.replace("$w", "$2").replace("$lo", "$3").replace("$hi", "$5")
    + "and.b32 $0, c, 0xFFFF; shr.b32 $1, c, 16; }")
# The largest finite magnitude of bf16 logits, two to a register (uld_hist._finite_top): the
# magnitude plus 0x8080 in each half (add.u16x2 wraps within the half) is 0x8080..0xFFFF for the
# finite magnitudes 0..0x7F7F, in their order, and 0..0x7F for inf and the NaNs (0x7F80..0x7FFF),
# under every finite one; $0 its running maximum. $1: the signed running maximum of the patterns
# themselves, 0x7F80 or more where a logit is +inf or a positive NaN. $2 the patterns, $3 and $4
# the old maxima. Four instructions for two logits (the constant's move leaves the loop).
_FINITE_TOP_BF16X2_ASM = const(
    "{ .reg .b32 m, k; and.b32 m, $2, 0x7FFF7FFF; mov.b32 k, 0x80808080; add.u16x2 m, m, k; "
    "max.u16x2 $0, $3, m; max.s16x2 $1, $4, $2; }")
_LOAD_ASM = const(
    "{ .reg .u32 a; mov.u32 a, uld_smem; mad.lo.u32 a, $1, 4, a; ld.shared.u32 $0, [a]; }")


@triton.jit
def smem_zero():
    """Declares the shared array and zeroes it."""
    thread = tl.arange(0, SMEM_THREADS)
    tl.inline_asm_elementwise(_ZERO_ASM, "=r,r", [thread], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def smem_address():
    """The shared array's address in the shared window (a scalar int32), for functions that
    reach it without its name (`l1_clear`, `step_and_count_smem`): called after `smem_zero`,
    in the function that declared it."""
    one = tl.zeros([1], tl.int32)
    return tl.sum(tl.inline_asm_elementwise("mov.u32 $0, uld_smem;", "=r,r", [one], dtype=tl.int32, is_pure=False,
                                            pack=1), 0)


@triton.jit
def smem_clear():
    """Zeroes the shared array again (declared by `smem_zero`, which a kernel calls once)."""
    thread = tl.arange(0, SMEM_THREADS)
    tl.inline_asm_elementwise(_CLEAR_ASM, "=r,r", [thread], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def l1_clear(base):
    """Zeroes the shared level-1 table at `base` (the address `smem_zero` returned)."""
    thread = tl.arange(0, SMEM_THREADS)
    tl.inline_asm_elementwise(_CLEAR_L1_ASM, "=r,r,r", [thread, base + tl.zeros_like(thread)], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def l1_load(base, word):
    """The shared level-1 table's int32 word `word` (counts, then the key bounds: L1_CAP)."""
    return tl.inline_asm_elementwise(_LOAD_L1_ASM, "=r,r,r", [word, base + tl.zeros_like(word)], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def l1_load_mass(base, bucket):
    """The shared level-1 table's int64 mass of `bucket`."""
    return tl.inline_asm_elementwise(_LOAD_L1_MASS_ASM, "=l,r,r", [bucket, base + tl.zeros_like(bucket)],
                                     dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def step_and_count_smem(walking, root_entry, key, p, child_ptr, shift, digit_mask, base, level_start):
    """`step_and_count` into the shared level-1 table at `base` (bucket = entry - level_start <
    L1_CAP): count += 1, (INT_MAX - key-min) and key-max by max, mass += trunc(p * 2**52)."""
    lanes = tl.zeros_like(root_entry)
    tl.inline_asm_elementwise(_STEP_AND_COUNT_SMEM_ASM, "=r,r,r,r,f,l,r,r,r,r",
                              [walking.to(tl.int32), root_entry, key, p, child_ptr + lanes, shift + lanes,
                               digit_mask + lanes, base + lanes, level_start + lanes],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def smem_add_one(word, counted):
    """counts[word] += 1 for every lane that is counted (word in [0, 8192))."""
    tl.inline_asm_elementwise(_ADD_ONE_ASM, "=r,r", [tl.where(counted, word, SMEM_SPARE)], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def smem_add_one_sparse(word, counted):
    """`smem_add_one` where few lanes are counted: the others add nothing (predicated off)."""
    tl.inline_asm_elementwise(_ADD_ONE_IF_ASM, "=r,r,r", [word, counted.to(tl.int32)], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def smem_count_bf16(bits, top_magnitude, shift):
    """Counts bf16 logits (their int16 bit patterns) in the shared histogram at their slots
    (magnitude bits less `shift`, a scalar multiple of 128: 0 for most rows), two per
    instruction sequence, and returns the running maximum of their magnitude bits
    (`top_magnitude`, int16, the same shape: start from zeros)."""
    lo, hi = _clamp_ends(bits, shift)
    return tl.inline_asm_elementwise(_COUNT_BF16X2_ASM, "=r,r,r,r,r,r,r", [bits, top_magnitude, lo, hi],
                                     dtype=tl.int16, is_pure=False, pack=2)


@triton.jit
def smem_count_bf16_gap(bits, top_magnitude, shift, gap_at, gap):
    """`smem_count_bf16` in a row with a gap: magnitudes whose shifted value is below gap_at
    are counted `gap` higher (uld_hist.py, "Gaps"; exact where the row has no shifted
    magnitude in [gap_at - gap, gap_at))."""
    lo, hi = _clamp_ends(bits, shift)
    at = tl.full(bits.shape, 0, tl.int32) + (gap_at + shift) * 65537
    up = tl.full(bits.shape, 0, tl.int32) + gap * 65537
    return tl.inline_asm_elementwise(_COUNT_BF16X2_GAP_ASM, "=r,r,r,r,r,r,r,r,r,r,r",
                                     [bits, top_magnitude, lo, hi, at, up], dtype=tl.int16, is_pure=False, pack=2)


@triton.jit
def finite_top_bf16(bits, lifted, positive):
    """The running maxima of `_FINITE_TOP_BF16X2_ASM` over bf16 logits given as int16 bit
    patterns: `lifted` (unsigned: the largest finite magnitude plus 0x8080, below 0x8080 where
    none) and `positive` (signed: the largest pattern), both int16 of bits' shape: start from
    zeros."""
    return tl.inline_asm_elementwise(_FINITE_TOP_BF16X2_ASM, "=r,=r,r,r,r", [bits, lifted, positive],
                                     dtype=(tl.int16, tl.int16), is_pure=True, pack=2)


@triton.jit
def slots_bf16(bits, shift):
    """The histogram slots (int32) of bf16 logits given as int16 bit patterns, their magnitude
    bits less `shift` (as in `smem_count_bf16`)."""
    lo, hi = _clamp_ends(bits, shift)
    return tl.inline_asm_elementwise(_SLOTS_BF16X2_ASM, "=r,=r,r,r,r,r,r", [bits, lo, hi], dtype=tl.int32,
                                     is_pure=True, pack=2)


@triton.jit
def _clamp_ends(bits, shift):
    """The clamp's ends of the slot sequences, SLOT_M_LO and SLOT_M_HI plus `shift` in both
    halves of an int32, broadcast to bits' shape."""
    lo = tl.full(bits.shape, 0, tl.int32) + (SLOT_M_LO + shift) * 65537
    hi = tl.full(bits.shape, 0, tl.int32) + (SLOT_M_HI + shift) * 65537
    return lo, hi


# A thread's run of four consecutive slots (pack=4: $4..$7, in the run's order) read without
# bank conflicts: lane l reads its run's words from (l >> 3) & 3 on, rotated, so that in each of
# the four loads the 32 lanes' runs (4 words apart, or 4 words down: the negative slots) meet 32
# banks (in order, lanes 8 apart read the same banks: a 4-way conflict, 3.9 wavefronts a load
# on the H200); the values rotated back. p1, p2: the rotation's two bits, as two stages of
# selects.
_LOAD_RUN_ASM = const(
    "{ .reg .u32 l, b, a0, a1, a2, a3, t0, t1, t2, t3, v0, v1, v2, v3; .reg .pred p1, p2; "
    "mov.u32 l, %laneid; and.b32 b, l, 8; setp.ne.u32 p1, b, 0; and.b32 b, l, 16; setp.ne.u32 p2, b, 0; "
    "selp.b32 t0, $5, $4, p1; selp.b32 t1, $6, $5, p1; selp.b32 t2, $7, $6, p1; selp.b32 t3, $4, $7, p1; "
    "selp.b32 a0, t2, t0, p2; selp.b32 a1, t3, t1, p2; selp.b32 a2, t0, t2, p2; selp.b32 a3, t1, t3, p2; "
    "mov.u32 b, uld_smem; mad.lo.u32 a0, a0, 4, b; mad.lo.u32 a1, a1, 4, b; mad.lo.u32 a2, a2, 4, b; "
    "mad.lo.u32 a3, a3, 4, b; ld.shared.u32 v0, [a0]; ld.shared.u32 v1, [a1]; ld.shared.u32 v2, [a2]; "
    "ld.shared.u32 v3, [a3]; "
    "selp.b32 t0, v2, v0, p2; selp.b32 t1, v3, v1, p2; selp.b32 t2, v0, v2, p2; selp.b32 t3, v1, v3, p2; "
    "selp.b32 $0, t3, t0, p1; selp.b32 $1, t0, t1, p1; selp.b32 $2, t1, t2, p1; selp.b32 $3, t2, t3, p1; }")
# The exclusive prefix sums of int32 over a block whose threads each hold a run of four ($4..$7,
# pack=4; thread t = 32 warp + lane holds run t): the run's total t, a warp scan of it by
# shuffles, each warp's total to shared memory at word $12 + warp, one barrier, the earlier
# warps' totals read back. $8: 0 or 4, alternate calls' words (a call's stores then never meet
# the reads of the call before it: those came before this call's barrier in every thread).
# `_WARPS_TOTAL_ASM` then reads the block's total from the same words.
_SCAN_RUNS_ASM = const(
    "{ .reg .u32 t, x, y, l, w, a, b0, b1, b2, b3, o, r1, r2; .reg .pred p; "
    "add.u32 r1, $4, $5; add.u32 r2, r1, $6; add.u32 t, r2, $7; mov.u32 x, t; "
    "shfl.sync.up.b32 y|p, x, 1, 0, -1; @p add.u32 x, x, y; "
    "shfl.sync.up.b32 y|p, x, 2, 0, -1; @p add.u32 x, x, y; "
    "shfl.sync.up.b32 y|p, x, 4, 0, -1; @p add.u32 x, x, y; "
    "shfl.sync.up.b32 y|p, x, 8, 0, -1; @p add.u32 x, x, y; "
    "shfl.sync.up.b32 y|p, x, 16, 0, -1; @p add.u32 x, x, y; "
    "mov.u32 l, %laneid; mov.u32 w, %tid.x; shr.u32 w, w, 5; add.u32 a, $12, $8; mov.u32 b0, uld_smem; "
    "mad.lo.u32 a, a, 4, b0; setp.eq.u32 p, l, 31; mad.lo.u32 o, w, 4, a; @p st.shared.u32 [o], x; bar.sync 0; "
    "ld.shared.v4.u32 {b0, b1, b2, b3}, [a]; "
    "setp.ge.u32 p, w, 1; selp.b32 o, b0, 0, p; "
    "setp.ge.u32 p, w, 2; selp.b32 y, b1, 0, p; add.u32 o, o, y; "
    "setp.ge.u32 p, w, 3; selp.b32 y, b2, 0, p; add.u32 o, o, y; "
    "sub.u32 x, x, t; add.u32 x, x, o; mov.u32 $0, x; add.u32 $1, x, $4; add.u32 $2, x, r1; add.u32 $3, x, r2; }")
_WARPS_TOTAL_ASM = const(
    "{ .reg .u32 a, b0, b1, b2, b3; add.u32 a, $2, $1; mov.u32 b0, uld_smem; mad.lo.u32 a, a, 4, b0; "
    "ld.shared.v4.u32 {b0, b1, b2, b3}, [a]; add.u32 b0, b0, b1; add.u32 b0, b0, b2; add.u32 $0, b0, b3; }")
SCAN_WORDS = const(8184)  # `scan_runs`' eight words in the shared array: past every slot (8,065) and sub-bin


@triton.jit
def smem_load(word):
    """counts[word], one value per lane."""
    return tl.inline_asm_elementwise(_LOAD_ASM, "=r,r", [word], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def smem_load_runs(word):
    """The shared array's words `word` ([4, n] int32, each thread's four a run of consecutive
    words, up or down), four loads a thread without bank conflicts (`_LOAD_RUN_ASM`)."""
    return tl.inline_asm_elementwise(_LOAD_RUN_ASM, "=r,=r,=r,=r,r,r,r,r", [word], dtype=tl.int32, is_pure=False,
                                     pack=4)


@triton.jit
def scan_runs(value, parity):
    """The exclusive prefix sums of `value` (int32 [4, 128], Triton's default layout: each thread
    a run of four in order, thread t run t) over the block in order, with one barrier
    (`_SCAN_RUNS_ASM`), and the block's total (a scalar, `_WARPS_TOTAL_ASM`); `parity` 0 or 1,
    alternating between consecutive calls."""
    words = parity * 4
    before = tl.inline_asm_elementwise(_SCAN_RUNS_ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r",
                                       [value, value * 0 + words, value * 0 + SCAN_WORDS], dtype=tl.int32,
                                       is_pure=False, pack=4)
    total = tl.inline_asm_elementwise(_WARPS_TOTAL_ASM, "=r,r,r", [words, SCAN_WORDS + words * 0],
                                      dtype=tl.int32, is_pure=False, pack=1)
    return before, total


# The trie fallback's list of columns (uld_rows._count_level, LIST): per reaching lane, a slot
# from the counter at $3 and, below the capacity $5, the column $2 stored there (list at $4).
# As inline PTX, so that the lanes keep the row's layout (Triton's atomic on one address
# converted the mask through shared memory, two barriers a block).
_LIST_APPEND_ASM = const(
    "{ .reg .pred p; .reg .u32 at; .reg .u64 a; setp.eq.s32 p, $1, 0; @p bra SKIP; "
    "atom.global.add.u32 at, [$3], 1; setp.ge.u32 p, at, $5; @p bra SKIP; "
    "mad.wide.u32 a, at, 4, $4; st.global.u32 [a], $2; SKIP: mov.u32 $0, 0; }")


# The top_k collect pass (uld_topk._collect_by_run): where taken, a slot from warp w's counter
# (word w of the shared array, w = tid.x / 32) and, below the capacity, the key above the
# column (one int64, the column in its low word) stored at base + w * capacity + slot.
# A warp with no lane taking skips it in one branch: in that pass almost every warp.
def _append_keys_asm(n: int) -> str:
    """PTX of `smem_append_key` for n consecutive elements of a thread (pack=n): $0..$(n-1) the
    outputs (0), then n operands each of taken, column, key, base and cap. One branch past all
    n where none is taken (almost always), then one per element."""
    taken, column, key, base, cap = (range(n * (i + 1), n * (i + 2)) for i in range(5))
    any_taken = " ".join(f"or.b32 t, t, ${i};" for i in taken[1:])
    body = "".join(
        f"setp.eq.s32 p, ${taken[j]}, 0; @p bra NEXT{j}; atom.shared.add.u32 at, [s], 1; "
        f"setp.ge.u32 p, at, ${cap[j]}; @p bra NEXT{j}; mad.lo.u32 at, w, ${cap[j]}, at; "
        f"mov.b64 v, {{${column[j]}, ${key[j]}}}; mad.wide.u32 a, at, 8, ${base[j]}; st.global.b64 [a], v; NEXT{j}: "
        for j in range(n))
    outputs = " ".join(f"mov.u32 ${j}, 0;" for j in range(n))
    return ("{ .reg .pred p; .reg .u32 t, w, s, at; .reg .u64 a, v; "
            f"mov.b32 t, ${taken[0]}; {any_taken} setp.eq.s32 p, t, 0; @p bra SKIP; "
            "mov.u32 w, %tid.x; shr.u32 w, w, 5; mov.u32 s, uld_smem; mad.lo.u32 s, w, 4, s; "
            f"{body}SKIP: {outputs} }}")


APPEND_PACK = const(4)  # elements a thread takes one branch for (its layout's runs: 4 or 8)
_APPEND_KEYS_ASM = const(_append_keys_asm(APPEND_PACK.value))
_APPEND_KEYS_CONSTRAINTS = const(",".join(c for c in ("=r", "r", "r", "r", "l", "r") for _ in range(APPEND_PACK.value)))


@triton.jit
def smem_append_key(taken, column, key, base_ptr, cap):
    """Where `taken`: ``key << 32 | column`` (int32 each) -> base_ptr[w * cap + counter_w++]
    while below `cap`, w the lane's warp (4 warps: counters at words 0..3 of the shared array,
    zero before, which keep counting past `cap`; read them with `smem_load` after a barrier).
    A thread's elements go APPEND_PACK at a time (one branch past them where none is taken)."""
    lanes = tl.zeros_like(column)
    tl.inline_asm_elementwise(_APPEND_KEYS_ASM, _APPEND_KEYS_CONSTRAINTS,
                              [taken.to(tl.int32), column, key, base_ptr + lanes, cap + lanes],
                              dtype=tl.int32, is_pure=False, pack=APPEND_PACK)


@triton.jit
def list_append(reached, column, counter_ptr, list_ptr, cap):
    """Where `reached`: column -> list_ptr[counter++] while the counter is below `cap` (a
    relaxed global atomic per lane; the counter keeps counting past the capacity)."""
    lanes = tl.zeros_like(column)
    tl.inline_asm_elementwise(_LIST_APPEND_ASM, "=r,r,r,l,l,r",
                              [reached.to(tl.int32), column, counter_ptr + lanes, list_ptr + lanes, cap + lanes],
                              dtype=tl.int32, is_pure=False, pack=1)


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
def step_and_count(walking, root_entry, key, p, child_ptr, count_ptr, key_min_ptr, key_max_ptr, mass_ptr,
                   shift, digit_mask):
    """Where `walking`: the bucket one level below root bucket `root_entry` that `key` falls in
    (its child node plus the key's digit), then `count_key` there. Lanes not walking skip it
    all, and a warp with no lane walking skips it in one branch: in the level-1 pass that is
    almost every warp."""
    lanes = tl.zeros_like(root_entry)
    tl.inline_asm_elementwise(_STEP_AND_COUNT_ASM, "=r,r,r,r,f,l,l,l,l,l,r,r",
                              [walking.to(tl.int32), root_entry, key, p, child_ptr + lanes, count_ptr + lanes,
                               key_min_ptr + lanes, key_max_ptr + lanes, mass_ptr + lanes, shift + lanes,
                               digit_mask + lanes],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def descend(sign, entry, key, child_ptr, sign_ptr, shift, digit_mask):
    """One level of the sign walk (uld_rows._walk_sign) where `sign` is NaN; other lanes keep
    their sign and entry. (ptxas predicates the short branch; the gain over Triton's version is
    the address arithmetic: one wide multiply-add per gather. A warp-uniform branch through
    `vote` made ptxas spill.)"""
    lanes = tl.zeros_like(entry)
    return tl.inline_asm_elementwise(_DESCEND_ASM, "=f,=r,r,f,r,l,l,r,r",
                                     [entry, sign, key, child_ptr + lanes, sign_ptr + lanes, shift + lanes,
                                      digit_mask + lanes],
                                     dtype=(tl.float32, tl.int32), is_pure=True, pack=1)


@triton.jit
def gather_f32(base_ptr, index, mask, NC: tl.constexpr = True):
    """base_ptr[index] where mask, else 0 (float32); mask None: every lane, no predicate
    (the NC form only). NC: through the read-only (non-coherent) path, for a table that does
    not change during the kernel; else a plain load, which sees what this program wrote
    before a barrier."""
    if mask is None:
        tl.static_assert(NC, "an unmasked gather: the read-only path")
        value = tl.inline_asm_elementwise(_GATHER_ALL_ASM, "=r,r,l", [index, base_ptr + tl.zeros_like(index)],
                                          dtype=tl.float32, is_pure=True, pack=1)
    else:
        if NC:
            asm: tl.constexpr = _GATHER_ASM
        else:
            asm: tl.constexpr = _GATHER_COHERENT_ASM
        value = tl.inline_asm_elementwise(asm, "=r,r,r,l", [index, mask.to(tl.int32),
                                                            base_ptr + tl.zeros_like(index)],
                                          dtype=tl.float32, is_pure=True, pack=1)
    return value


@triton.jit
def scatter(base_ptr, index, value, mask, WIDE: tl.constexpr):
    """base_ptr[index] = value where mask: the low 16 bits of int32 values, or (WIDE) all 32
    (int32, or float32 bits as int32). A masked scatter that takes its operands' layout, where
    `tl.store` would give its gathered addresses a layout of one element per thread and have
    the values computed a second time in it."""
    if WIDE:
        asm: tl.constexpr = _SCATTER_B32_ASM
    else:
        asm: tl.constexpr = _SCATTER_U16_ASM
    tl.inline_asm_elementwise(asm, "=r,r,r,r,l", [index, mask.to(tl.int32), value, base_ptr + tl.zeros_like(index)],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def scatter_i64(base_ptr, index, value, mask):
    """base_ptr[index] = value (int64) where mask, in the operands' layout (`scatter`)."""
    tl.inline_asm_elementwise(_SCATTER_B64_ASM, "=r,r,r,l,l", [index, mask.to(tl.int32), value,
                                                             base_ptr + tl.zeros_like(index)],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def store_runs_u32(base_ptr, offsets, value):
    """base_ptr[offsets] = value (int32, [4, n] with offsets[:, j] four consecutive words from a
    multiple of 4): one vector store per thread and run, in the operands' layout (Triton's
    default for [4, n] gives each thread one column), where `tl.store` would choose its own."""
    tl.inline_asm_elementwise(_STORE_RUN_ASM, "=r,=r,=r,=r,l,l,l,l,r,r,r,r", [base_ptr + offsets, value],
                              dtype=tl.int32, is_pure=False, pack=4)


@triton.jit
def gather_i32(base_ptr, index, mask):
    """base_ptr[index] where mask, else 0 (int32), through the read-only path (a table written
    by an earlier launch), in the operands' layout."""
    return tl.inline_asm_elementwise(_GATHER_ASM, "=r,r,r,l", [index, mask.to(tl.int32),
                                                               base_ptr + tl.zeros_like(index)],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def exp2_ftz(x):
    """2**x, flushing subnormal results to 0 (one MUFU.EX2)."""
    return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)
