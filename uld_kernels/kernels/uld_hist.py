"""Triton kernels: the exact ULD loss of bf16 logits from per-row histograms of their values.

A bf16 row of 150k logits holds only a few thousand distinct values, and a probability is a
monotone function of its logit: p = 2**k with k = (z - top) * scale - log_sum
(uld_rows._keys_of). So the sorted probabilities of a row are known exactly from a histogram of
its logits' bit patterns, and the counts that the sign of every element needs (uld_rows, top
of file) come from two such histograms, however close the two rows are. The passes:

    hist_kernel    per (pair, side), both sides in one launch: the histogram of the row's
                   logits over the fixed bins below, in shared memory (one read of the row,
                   about eight instructions per element; no statistics needed first); then,
                   from the bins, the row's largest logit (its highest occupied bin, found
                   first) and log-sum (and the cross-entropy's, at temperature 1), the prefix
                   counts of the bins and the list of the occupied ones (all that is written
                   per bin, 512 bins a step, a run of 4 per thread) and the row's flag
    sign_kernel    per (pair, side), over the side's occupied bins: the counts of both sides
                   above and at each bin's value (bounds from the k = log2 p of neighbouring
                   bins, recomputed from the bin: the bin itself on its own side, the bin of
                   the value's logit on the other; a search where runs of equal k get in the
                   way), its tie-rule sign, and the side's sum of count * p * sign
    finish_kernel  per pair: the loss from both sides' sums (and the cross-entropy)
    grad_kernel    per (pair, chunk): each element's slot, its sign from the slot's table,
                   and the softmax backward (plus the cross-entropy's)

Rows are those of aligned inputs, or (GATHER) those the pairs' row maps name, as in the trie
engine; a negative student index is padding.

Bins. A bf16 pattern b gives a key monotone in the logit (b if b >= 0, else b ^ 0x7FFF). Every
logit with 2**-23 <= |z| < 256 has a bin of its own (3,968 per sign); the tiny logits
|z| < 2**-23, zeros too, share one (exact when its two ends have the same k, which hist_kernel
checks: z - top rounds them all to -top unless the row's largest logit is itself small, below
about 2); logits <= -256 share one bin (exact when p(-256) is 0: at temperatures up to about
2.5; above, a row holding finite logits <= -256, such as a mask of -1e4, is flagged); -inf
(masked) is not counted. Shared memory holds the counts in *slots* (below), which two SIMD
clamps give for two logits at once; the bins are read through them. A row holding a logit
>= 256 (unless counted again, below), +inf or NaN, or failing a check, is *flagged*: the
launcher hands flagged rows to the trie engine (uld_split.py), so every result stays exact.

Rows past 256. A row flagged after its count whose logits are all finite, and some of
magnitude >= 256, is counted a second time by the same program with its magnitude bits less
a *shift* of whole binades (s * 128, the smallest s that brings its largest magnitude below
256): its bins then hold the logits times 2**-s, each a bf16 value of its own, and its k is
computed from those values at scale times 2**s, which gives every float32 k bit for bit as
the unshifted values would (scaling by a power of two commutes with rounding), so its counts,
signs and loss are exact under the same checks; magnitudes below 2**(s - 23) share the tiny
bin. Rows of logits like N(0, 100^2) take this path, and so do rows with finite masks (-1e4)
at temperatures where p(-256) > 0. In a row with an infinity the running maximum is the
infinity's: there one more read finds the largest finite magnitude (`_infinities`), and a row
with -inf masks is counted again the same way (its low bin then holds the -inf only); +inf and
NaN stay flagged, and so does a row whose scale times 2**s would pass float32. Each side stores its shift (_SHIFT) and its
largest logit unshifted (_TOP): sign_kernel takes top and scale to the shifted values,
grad_kernel shifts its slots the same, and finish_kernel needs neither.

Split tiny bins. A row whose largest logit is small (below about 2) resolves logits near 0
in z - top, so its tiny bin can hold logits of different k (a split bin, flagged). Where every
logit's magnitude is below 128 (and its largest is at least 2**-57), the row is counted a
second time with a *negative* shift: its values times 2**s for the largest s (at most 64)
that keeps them below 256, so that only
magnitudes below 2**(-23 - s) share the tiny bin, which then holds one k unless the row's
range is too wide for it (such a row stays flagged). Rows of logits N(0, 0.1^2), a freshly
initialised student's, split ~2% of their tiny bins at 152k columns (a float32 estimate):
bench kind `init`, 7.92 -> 6.78 ms on the GPU (bench/RESULTS.md, thirteenth session). The
rest is the same as above, with scale times 2**-s kept a normal float32. A pair with one side
scaled up and the other counting an occupied tiny bin unscaled is flagged (finish_kernel):
the two treat logits near 0 differently, which can break exact ties across the rows.

Gaps. A row whose tiny bin still splits, because its logits span too many binades for a
scaling of the whole row (the probability on a few logits within 2**-23 of 0, the rest near
-60: bench kinds `gapped` and `flagged`), is counted again with a *gap* where it has one: if
its bins hold a run of empty ones a binade (128 magnitude bits) or more wide, counting both
signs, between distances d0 - 1 and d1 from the tiny bin (the widest such run; the tiny bin at
0), every logit below d1 is counted g = d1 - d0 rounded down to whole binades higher (so that
the largest of them lands short of the bin d1; at most as far as keeps the subnormal bf16
values, magnitudes below 128, in the tiny bin, and the logits inside the bins; on top of a
scaling up where one applies). The row's bins stay in the order of value, and a bin below d1
stands for the logit g bits lower (`_logit_of_bin`: its k is the float32 k of the logit itself,
as for a shift); only magnitudes below 2**(-23 - g / 128) share the tiny bin, checked again.
Each side stores where its gap ends (d1, in shifted magnitude bits: the same test below it
maps a logit to its bin and a bin back, as no bin lies in the run) and its size (_GAPS); a row
with a gap is counted two logits at a time with the gap folded into the SIMD clamps
(ptx.smem_count_bf16_gap: exact as no magnitude lies in the run), its gradient's slots found
one logit at a time, and its passes over bins run a copy of their loops compiled with the gap
(rows without one run a copy compiled without). A row with a gap against one counting an occupied
tiny bin without is flagged, as for a scaling up (finish_kernel). hist_kernel runs every row
without gaps first (its code, and so every ordinary row's, is the code before the gaps: with
them compiled into the same kernel, its count loop took 0.08 ms more on the H200); a second
launch (REDO) finds the gap of each candidate row from the occupied bins the first listed, and
counts again, once, the rows that take one. The kernels' GAPS (`ULD_HIST_GAPS`, on by default,
launch.HIST_GAPS) compiles the gaps in; without, the gap is the constant 0 and the passes
compile to the code before them (SASS checked), leaving such rows to the trie.

Tiny sub-bins. A row whose tiny bin still splits after that (a logit in every binade from
2**-23 to its tail leaves no run for a gap: bench kind `dense`, every row at temperature 0.5;
or its gap leaves the tiny bin split) holds in its tiny bin logits of a few different k: the
k of its two ends, computed as everywhere, bound them, and consecutive float32 values have
consecutive keys (`_key`). Where the split is the row's only flag (4) and at most _SUB_BINS
keys lie between its ends' k (both live), the REDO launch reads the row once more and counts
its tiny logits by the key of their k (computed as grad_kernel computes it) into sub-bins: a
few counts past the bins (_SUB_P), and the row is unflagged, marked _SUBS in its _GAPS word.
Nothing else of the row changes: its bins still give every tiny element the k of the bin's
upper end, so any count of a side's elements at or above a value v from its bins (sign_kernel's)
is corrected by the sub-bins' prefix counts where that k is >= v (`_sub_counts`, both sides);
sign_kernel finds the sign of each sub-bin as of a bin whose value is its k (`_sub_signs`,
its bounds searched), and grad_kernel takes a tiny element's sign from its sub-bin's entry
past the slots (_SUB_SIGN). Both run this only in copies of their loops of its own (the
ordinary copies unchanged; grad_kernel's registers too, 56): sign_kernel's, and grad_kernel's
two, on the SIMD slots where the row has no gap (the tiny bin's are the clamps' 0 and 4096).
REDO's read finds the tiny logits by a block's least magnitude bits (a few instructions a
logit); only blocks holding one compute k and count. A row with sub-bins counts
as one with a gap against a side counting an occupied tiny bin without (finish_kernel, 16).

float32 rows. A bf16 model's logits upcast with `.float()` (as many training loops do before
a loss) are float32 values whose low 16 bits are 0: the high half of each is its bf16 pattern
(`_bf16_bits`), and every pass above runs on those patterns unchanged, reading 4 bytes a
logit and writing a float32 gradient. hist_kernel ORs the low halves of a row: a row holding
any value bf16 cannot hold is flagged (_NOT_BF16, no second count), and the launcher hands it
to the trie engine, which takes any float32.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from uld_kernels.kernels.const import const
from uld_kernels.kernels.ptx import (NEG_SLOTS, SLOT_M_HI, SLOT_M_LO, SMEM_THREADS, gather_f32, gather_i32, scatter,
                                     finite_top_bf16, slots_bf16, smem_add_one, smem_clear, smem_count_bf16,
                                     smem_count_bf16_gap, smem_load, smem_load_runs, smem_zero, scan_runs,
                                     store_runs_u32)
from uld_kernels.kernels.uld_rows import (LN2, LOG2E, STORE_EVICT, _block_raw, _exp2, _first_block, _load_raw, _log2_prob,
                                          _pair_rows, _tie_signs)

CAP = const(8192)  # words per row and side: the shared-memory histogram's 8,192
# Bins in order of value: 0 the logits <= -256, 1..3968 the logits -255 .. -2**-23, 3969 the
# tiny ones (|z| < 2**-23, zeros too), 3970..7937 the logits 2**-23 .. 255.
WIDTH = const(7938)
_LOW_BINS = const(1)
_TINY = const(3969)
_TINY_END = const(1.1920928955078125e-07 - 4.656612873077393e-10)  # 2**-23 - 2**-31
# Slots: where hist_kernel counts a logit and grad_kernel finds its sign. A bf16 pattern's
# magnitude bits m (|z|'s bits) clamped to [13311, 17280], minus 13311, plus 4,096 for a
# negative logit: a few integer instructions for two logits at once (ptx.smem_count_bf16).
# Positive logits: 0 the tiny ones, 1..3968 bins 3970..7937, 3969 the logits >= 256, +inf and
# NaN; negative: 4096 the tiny ones, 4097..8064 bins 3968..1, 8065 the logits <= -256, -inf and
# the NaNs with their sign bit set. Lanes past a row load +0 (slot 0) and are subtracted; -inf
# shares the low slot, and is counted apart by one more read of the row only where that slot
# matters (`_infinities`); a row's largest magnitude tells NaNs (> 32640) apart.
_POS_OUT_SLOT = const(3969)
_RUN = const(4)  # bins per thread in hist_kernel's pass over them
_EMPTY_SLOT = const(4000)  # never counted: what bins past WIDTH read
_NEG_TINY_SLOT = const(4096)
_LOW_SLOT = const(8065)
_INF_MAGNITUDE = const(32640)  # m of +-inf; NaNs above
_LISTED_SHIFT = const(21)  # hist_kernel's scan: counts below, occupied bins above
_COUNT_MASK = const((1 << 21) - 1)
MAX_VOCAB = const(1 << 21)  # a row shorter than this: its counts fit the scan's 21 bits
_NEG_INF_BITS = const(-128)  # -inf's pattern, 0xFF80, as an int16
_NOT_BF16 = const(32)  # flag bit: a float32 row holding a value bf16 cannot (the trie's)
# Per row and side: floats, then ints (PARAM_SLOTS each).
PARAM_SLOTS = const(5)
_TOP = const(0)
_LOG_SUM = const(1)
_MASS = const(2)  # sum over the side of p * sign
_CE_LOG_SUM = const(3)  # the student's base-2 log-sum at temperature 1 (cross-entropy)
_GAPS = const(4)  # ("Gaps", with GAPS) the row's gap_at | gap << 16, as float32 bits; 0: no gap
_FLAG = const(0)  # nonzero: the trie engine computes this row
_TOTAL = const(1)  # elements of nonzero probability
_OCCUPIED = const(2)  # bins holding any element (listed in order at list_ptr)
_DEAD = const(3)  # elements of probability 0 (their bins come first)
_SHIFT = const(4)  # the row's shift (magnitude bits; "Rows past 256" above); _TOP is the unshifted top
_SHIFT_STEP = const(128)  # a binade of bf16 magnitude bits: shifts are multiples of it
_MAX_UP = const(64)  # binades a row may be scaled up by ("Split tiny bins"): 2**-87 still tiny
_MIN_NORMAL = const(1.1754943508222875e-38)  # 2**-126: a scale below it would lose bits
# Sub-bins ("Tiny sub-bins"): a row whose split tiny bin no scaling or gap separates, its tiny
# logits counted by the key of their k. _SUBS marks such a row in its _GAPS word (a gap_at bit
# no gap sets: no magnitude reaches it, so its gap of 0 changes no slot). Words past the bins:
# in the side's counts, P[j] (the tiny elements of k below sub-bin j, j <= n) from _SUB_P and
# the key of sub-bin 0's k and n at _SUB_KEY and _SUB_N (hist_kernel's REDO; counts past WIDTH
# are never read); in its sign table the sub-bins' signs from _SUB_SIGN, with the key and n
# again (sign_kernel; grad_kernel reads no counts). Sub-bin j holds the k of key _SUB_KEY + j.
# 120 of them fit past the slots of the sign table (_LOW_SLOT, the highest, is 8,065), and
# keep `dense` rows in the engine at temperature 0.01 and, for the tests' rows, 0.004 (0.002:
# the trie's); 32 took them to about 0.02 (the trie's below: 45 ms for 16,384 rows of
# Qwen/Qwen at 0.01, twentieth session's run 7).
_SUBS = const(0x8000)
_SUB_BINS = const(120)  # sub-bins at most (the k of a tiny bin's two ends, that many keys apart)
_SUB_BLOCK = const(128)  # (the sub-bins as one block of lanes, the rest masked)
_SUB_P = const(8064)  # P[0..120] in the counts: 8,064..8,184 (past WIDTH, whose word is the total)
_SUB_KEY = const(8190)
_SUB_N = const(8191)
_SUB_SIGN = const(8066)  # the sign table's 8,066..8,185: past _LOW_SLOT
assert (_SUB_BINS.value <= _SUB_BLOCK.value and WIDTH.value < _SUB_P.value
        and _SUB_P.value + _SUB_BINS.value < _SUB_KEY.value < _SUB_N.value < CAP.value
        and _LOW_SLOT.value < _SUB_SIGN.value and _SUB_SIGN.value + _SUB_BINS.value <= _SUB_KEY.value), \
    "sub-bins: the words past the bins (counts) and past the slots (signs) must not overlap"

# Dependent launches (PDL, launch.HIST_PDL; sm_90 and later): a batch's launches after the
# call's first run with programmatic stream serialization, so each one's programs are placed
# while the previous launch drains, instead of after it has ended. Every program of every
# launch lets the next one start (`griddepcontrol.launch_dependents`, its first instruction:
# the next launch then starts once the last program of this one has), and waits for the
# previous launch to complete, its writes visible (`griddepcontrol.wait`), before it reads
# or writes any table: hist_kernel's first launch after its count (the logits alone, into
# shared memory), the others first. Every program waits, so a launch completes only after
# the one before it has: the chain holds back to the call's first launch, which runs without
# it (the logits may come from the launch just before it: a caller's matmul).


@triton.jit
def _after_previous_launch(PDL: tl.constexpr):
    """A PDL launch's first step (above): let the next launch start, then wait for the
    previous one. Nothing without PDL."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def _logit_of_bin(bins, TINY_AT_ZERO: tl.constexpr, gap_at=0, gap=0):
    """The logit a bin stands for (float32): its own value; -256 for the low bin (its end
    nearest 0); the tiny bin 0 (TINY_AT_ZERO) or its upper end 2**-23 - 2**-31. Built as
    float32 bits: bins below or above the tiny one, at distance d, hold magnitude bits
    SLOT_M_LO + d (bin 0: 17280, -256), with the sign of the side (three integer instructions,
    two more for TINY_AT_ZERO; the passes over bins call this for every bin).
    hist_kernel's top and exp-sums need the tiny bin at 0 exactly: a row whose largest logit
    is in it takes 0 as its top, and only then do its statistics match the other side's
    exactly where the two rows tie (a shifted or rescaled teacher; tests/test_hist_edges.py).
    Comparisons of k in an unflagged row (sign_kernel) may take the upper end: there the tiny
    bin, where occupied and live, has one k at both ends (hist_kernel flags it otherwise), so
    0's k too; where empty, its k moves a bound at most from the bin after it to it, and the
    count below the two is the same. In a row with a gap ("Gaps"), bins of magnitude bits
    below gap_at stand for the logits `gap` bits (whole binades) lower."""
    d = bins - _TINY
    magnitude = tl.abs(d) + SLOT_M_LO
    magnitude -= tl.where(magnitude < gap_at, gap, 0)
    bits = magnitude * 65536 | (d & -2147483648)
    if TINY_AT_ZERO:
        bits = tl.where(d == 0, 0, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _key(k):
    """An int32 key in the order of float32 values k (-0 and +0 alike; no NaN): consecutive
    float32 values take consecutive keys."""
    bits = k.to(tl.int32, bitcast=True)
    return tl.where(k == 0.0, 0, tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF))


@triton.jit
def _of_key(key):
    """The float32 value of a key (`_key`'s inverse)."""
    return tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _in_tiny_bin(slots):
    """Whether logits' slots are the tiny bin's (its positive or negative half)."""
    return (slots == 0) | (slots == _NEG_TINY_SLOT)


@triton.jit
def _sub_bin(k, key_low):
    """The sub-bin of a tiny logit of k ("Tiny sub-bins"; key_low: sub-bin 0's key), clamped
    to the sub-bins (REDO counts, and grad_kernel reads, by the same index)."""
    return tl.minimum(tl.maximum(_key(k) - key_low, 0), _SUB_BINS - 1)


@triton.jit
def _distance(magnitude):
    """A bf16 magnitude's distance from the tiny bin, in bins of its sign: its slot among the
    side's (magnitude bits clamped to [SLOT_M_LO, SLOT_M_HI], minus SLOT_M_LO)."""
    return tl.minimum(tl.maximum(magnitude, SLOT_M_LO), SLOT_M_HI) - SLOT_M_LO


@triton.jit
def _slots_of_bits(bits, shift, gap_at=0, gap=0):
    """Slots (above) and magnitude bits of bf16 patterns (sign-extended int32), the magnitudes
    less the row's `shift` (and those then below gap_at plus `gap`, "Gaps"): ptx.slots_bf16 in
    Triton operations (the interpreter's, and rows with a gap)."""
    magnitude = bits & 0x7FFF
    shifted = magnitude - shift
    shifted += tl.where(shifted < gap_at, gap, 0)
    return _distance(shifted) + tl.where(bits < 0, NEG_SLOTS, 0), magnitude


@triton.jit
def _bf16_bits(raw):
    """The bf16 patterns (int16) of loaded logits: a bf16 logit's own bits; a float32 logit's
    high half, which is the logit itself where its low half is 0 (a bf16 model's logits upcast
    with `.float()`: hist_kernel flags a row holding any other float32 value, "float32 rows")."""
    if raw.dtype == tl.float32:
        bits = (raw.to(tl.int32, bitcast=True) >> 16).to(tl.int16)
    else:
        bits = raw.to(tl.int16, bitcast=True)
    return bits


@triton.jit
def _slots(raw, shift, SIMD16: tl.constexpr, gap_at=0, gap=0):
    """The slots of bf16 logits already loaded, in a row of `shift` (and gap): two at a time
    with SIMD16 (sm_90's u16x2 instructions, inline PTX; no gap), else one at a time."""
    bits = _bf16_bits(raw)
    if SIMD16:
        slots = slots_bf16(bits, shift)
    else:
        slots, _magnitude = _slots_of_bits(bits.to(tl.int32), shift, gap_at, gap)
    return slots


@triton.jit
def _power_of_shift(shift, SIGN: tl.constexpr):
    """2 ** (SIGN * shift / 128) in float32, exactly (built from its exponent bits): the factor
    between a shifted row's bin values and its logits."""
    return ((127 + SIGN * (shift >> 7)) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _slot_of_bin(bins):
    """The slot a bin's count is read from (bins in [0, CAP): past WIDTH an empty one); the
    tiny bin's positive half."""
    return tl.where(bins > _TINY, tl.where(bins < WIDTH, bins - 3969, _EMPTY_SLOT),
                    tl.where(bins == _TINY, 0, _LOW_SLOT - bins))


@triton.jit
def _read_slots(raw_at, slots, USE_PTX: tl.constexpr):
    """The histogram's counts at `slots`: in shared memory, or at raw_at (the interpreter)."""
    if USE_PTX:
        counts = smem_load(slots)
    else:
        counts = tl.load(raw_at + slots)
    return counts


@triton.jit
def _slot_counts(raw_at, bins, tiny_more, USE_PTX: tl.constexpr, RUNS: tl.constexpr = False):
    """The histogram's counts at `bins` (in [0, CAP): 0 past WIDTH), through their slots, plus
    `tiny_more` in the tiny bin. RUNS: `bins` is [4, n], each thread's four a run of
    consecutive bins, read without bank conflicts where USE_PTX is 2 (`smem_load_runs`)."""
    if RUNS and USE_PTX >= 2:
        counts = smem_load_runs(_slot_of_bin(bins))
    else:
        counts = _read_slots(raw_at, _slot_of_bin(bins), USE_PTX)
    return counts + tl.where(bins == _TINY, tiny_more, 0)


@triton.jit
def _slot_count(raw_at, slot, USE_PTX: tl.constexpr):
    """One slot's count (a scalar)."""
    return tl.sum(_read_slots(raw_at, tl.full([1], slot, tl.int32), USE_PTX), 0)


@triton.jit
def _store_counts(counts_block, offsets, before, USE_PTX: tl.constexpr):
    """A step's counts below each bin, `offsets` [RUN, runs] from counts_block."""
    if USE_PTX:  # (one vector store per run, in the operands' layout)
        store_runs_u32(counts_block, offsets, before)
    else:
        tl.store(counts_block + offsets, before)


@triton.jit
def _store_listed(list_at, position, bins, occupied, USE_PTX: tl.constexpr):
    """The occupied bins at their positions in the row's list (int16)."""
    if USE_PTX:  # (in the operands' layout: tl.store would have the pass computed twice)
        scatter(list_at, position, bins, occupied, False)
    else:
        tl.store(list_at + position, bins.to(tl.int16), mask=occupied)


@triton.jit
def _infinities(row_ptr, col_stride, stop, UNIT_STRIDE: tl.constexpr, BLOCK: tl.constexpr):
    """One more read of a row that holds an infinity, for the rows that need it: how many of
    its logits are -inf, and the largest magnitude bits among its finite ones, or past
    _INF_MAGNITUDE where it holds +inf or a NaN (no shift helps those; "Rows past 256")."""
    minus_inf = tl.zeros([BLOCK], tl.int32)
    top = tl.zeros([BLOCK], tl.int32)
    for start in tl.range(0, stop, BLOCK):
        raw = _load_raw(row_ptr, start + tl.arange(0, BLOCK), col_stride, stop, UNIT_STRIDE, 0.0)
        bits = _bf16_bits(raw).to(tl.int32)
        magnitude = bits & 0x7FFF
        minus_inf += (bits == _NEG_INF_BITS).to(tl.int32)
        top = tl.maximum(top, tl.where(magnitude < _INF_MAGNITUDE, magnitude,
                                       tl.where(bits == _NEG_INF_BITS, 0, _INF_MAGNITUDE + 1)))
    return tl.sum(minus_inf, 0), tl.max(top, 0)


@triton.jit
def _finite_top(row_ptr, col_stride, stop, UNIT_STRIDE: tl.constexpr, SIMD16: tl.constexpr,
                PREFETCH: tl.constexpr, BLOCK: tl.constexpr):
    """`_infinities`' largest magnitude among a row's finite logits (past _INF_MAGNITUDE where
    it holds +inf), for a row holding no NaN (its count's largest magnitude is the infinity's):
    with SIMD16 two logits an instruction (ptx.finite_top_bf16) under loads one block ahead,
    as the count reads a row (`_infinities`, one logit at a time without either, ran at about
    the count's time; nineteenth session's bench/RESULTS.md: 1.15 ms a batch)."""
    if SIMD16:
        ahead = _first_block(row_ptr, tl.arange(0, BLOCK), col_stride, stop, UNIT_STRIDE, PREFETCH, 0.0)
        lifted = tl.zeros([BLOCK], tl.int16)
        positive = tl.zeros([BLOCK], tl.int16)
        for start in tl.range(0, stop, BLOCK, loop_unroll_factor=2):
            raw, ahead = _block_raw(ahead, row_ptr, start + tl.arange(0, BLOCK), col_stride, stop, BLOCK,
                                    UNIT_STRIDE, PREFETCH, 0.0)
            lifted, positive = finite_top_bf16(_bf16_bits(raw), lifted, positive)
        top = tl.max(lifted.to(tl.int32) & 0xFFFF, 0) - 0x8080  # (lanes past the row: +0, magnitude 0)
        top = tl.where(tl.max(positive.to(tl.int32), 0) >= _INF_MAGNITUDE, _INF_MAGNITUDE + 1, tl.maximum(top, 0))
    else:
        _minus_inf, top = _infinities(row_ptr, col_stride, stop, UNIT_STRIDE, BLOCK)
    return top


# hist_kernel calls it as a function: inlined, its loop shared the kernel's register allocation
# and moved the count loop's loads (random rows 0.02-0.05 ms slower in an A/B on the H200,
# twentieth session's run 4; called, as before the change).
_finite_top_call = triton.jit(noinline=True)(_finite_top.fn)


@triton.jit
def hist_kernel(student_ptr, teacher_ptr, student_index_ptr, teacher_index_ptr, count_ptr, list_ptr, raw_ptr,
                fparam_ptr, iparam_ptr, batch_start, student_vocab, teacher_vocab, student_seq_len,
                student_batch_stride, student_row_stride, student_col_stride, teacher_seq_len, teacher_batch_stride,
                teacher_row_stride, teacher_col_stride, student_inv_temperature, teacher_inv_temperature, n_pairs,
                GATHER: tl.constexpr, STUDENT_UNIT_STRIDE: tl.constexpr, TEACHER_UNIT_STRIDE: tl.constexpr,
                USE_PTX: tl.constexpr, SIMD16: tl.constexpr, HAS_CE: tl.constexpr, PREFETCH: tl.constexpr,
                BLOCK: tl.constexpr, TAIL_BLOCK: tl.constexpr, GAPS: tl.constexpr = False,
                REDO: tl.constexpr = False, PDL: tl.constexpr = False):
    """Both sides' rows of a batch of pairs in one launch: program (pair, side) runs `_hist_row`
    on the student's row (side 0; with HAS_CE, the cross-entropy's statistics too) or the
    teacher's (each branch keeps its own pointers' alignment, so its loads stay vectorised).

    REDO (with GAPS; "Gaps"): a second launch over the same batch of `n_pairs` pairs, after
    one without gaps, so that the rows without a gap run code compiled without them: program
    (g, side) reads the flags of pairs [g * REDO_PAIRS, (g + 1) * REDO_PAIRS), finds the gap
    of each row that may take one (a split tiny bin, or an unflagged row whose largest logit
    is in its tiny bin) from the bins the first launch listed, and where there is one counts
    the row once more with it (`_hist_row`, with the first launch's shift); the others' gaps
    are stored as none.

    PDL ("Dependent launches"): the first launch reads the workspace only after its count
    (`_hist_row`), REDO before anything.

    USE_PTX: 0 (False) the interpreter's way, no inline assembly; 1 the shared-memory histogram
    by inline PTX; 2 (launch.HIST_SCAN, the default on a GPU) also the pass over bins' loads
    and scan (`_scan_bins`)."""
    if PDL:
        gdc_launch_dependents()
    if USE_PTX:  # (the shared array is declared here, once, for both branches)
        smem_zero()
        tl.debug_barrier()
    if REDO:
        tl.static_assert(GAPS, "REDO runs the rows that may take a gap, with gaps")
        if PDL:
            gdc_wait()
        side = tl.program_id(1)
        first = tl.program_id(0) * REDO_PAIRS
        pairs = first + tl.arange(0, REDO_PAIRS)
        at = (pairs * 2 + side).to(tl.int64) * PARAM_SLOTS
        inside = pairs < n_pairs
        redo = inside & _may_take_a_gap(tl.load(iparam_ptr + at + _FLAG, mask=inside, other=0),
                                        tl.load(iparam_ptr + at + _SHIFT, mask=inside, other=0),
                                        tl.load(fparam_ptr + at + _TOP, mask=inside, other=1.0))
        tl.store(fparam_ptr + at + _GAPS, tl.zeros([REDO_PAIRS], tl.float32), mask=inside & ~redo)
        if tl.max(redo.to(tl.int32), 0) > 0:
            for index in tl.range(first, tl.minimum(first + REDO_PAIRS, n_pairs)):
                pair = tl.zeros([], tl.int32) + index  # (a tensor under the interpreter too)
                at_row = (pair * 2 + side).to(tl.int64)
                params = at_row * PARAM_SLOTS
                shift = tl.load(iparam_ptr + params + _SHIFT)
                if _may_take_a_gap(tl.load(iparam_ptr + params + _FLAG), shift, tl.load(fparam_ptr + params + _TOP)):
                    if not USE_PTX:  # (the launch without gaps counted this row there)
                        _clear_histogram(raw_ptr + at_row * CAP, USE_PTX, TAIL_BLOCK)
                    gap_at, gap = _gap_from_list(list_ptr + at_row * CAP, raw_ptr + at_row * CAP,
                                                 tl.load(iparam_ptr + params + _OCCUPIED), shift, USE_PTX, TAIL_BLOCK)
                    if gap > 0:  # one count, with the launch's shift and this gap
                        _hist_side(pair, side, student_ptr, teacher_ptr, student_index_ptr, teacher_index_ptr,
                                   count_ptr, list_ptr, raw_ptr, fparam_ptr, iparam_ptr, batch_start, student_vocab,
                                   teacher_vocab, student_seq_len, student_batch_stride, student_row_stride,
                                   student_col_stride, teacher_seq_len, teacher_batch_stride, teacher_row_stride,
                                   teacher_col_stride, student_inv_temperature, teacher_inv_temperature, GATHER,
                                   STUDENT_UNIT_STRIDE, TEACHER_UNIT_STRIDE, USE_PTX, SIMD16, HAS_CE, PREFETCH, BLOCK,
                                   TAIL_BLOCK, True, shift, gap_at, gap)
                        tl.debug_barrier()  # (the histogram read, then zeroed for the next row)
                        _clear_histogram(raw_ptr + at_row * CAP, USE_PTX, TAIL_BLOCK)
                    else:
                        tl.store(fparam_ptr + params + _GAPS, 0.0)
                    if tl.load(iparam_ptr + params + _FLAG) == 4:  # sub-bins, where the split tiny bin alone flags it
                        _hist_side(pair, side, student_ptr, teacher_ptr, student_index_ptr, teacher_index_ptr,
                                   count_ptr, list_ptr, raw_ptr, fparam_ptr, iparam_ptr, batch_start, student_vocab,
                                   teacher_vocab, student_seq_len, student_batch_stride, student_row_stride,
                                   student_col_stride, teacher_seq_len, teacher_batch_stride, teacher_row_stride,
                                   teacher_col_stride, student_inv_temperature, teacher_inv_temperature, GATHER,
                                   STUDENT_UNIT_STRIDE, TEACHER_UNIT_STRIDE, USE_PTX, SIMD16, HAS_CE, PREFETCH, BLOCK,
                                   TAIL_BLOCK, True, shift, gap_at, gap, True)
    else:
        _hist_side(tl.program_id(0), tl.program_id(1), student_ptr, teacher_ptr, student_index_ptr,
                   teacher_index_ptr, count_ptr, list_ptr, raw_ptr, fparam_ptr, iparam_ptr, batch_start,
                   student_vocab, teacher_vocab, student_seq_len, student_batch_stride, student_row_stride,
                   student_col_stride, teacher_seq_len, teacher_batch_stride, teacher_row_stride, teacher_col_stride,
                   student_inv_temperature, teacher_inv_temperature, GATHER, STUDENT_UNIT_STRIDE,
                   TEACHER_UNIT_STRIDE, USE_PTX, SIMD16, HAS_CE, PREFETCH, BLOCK, TAIL_BLOCK, False, 0, 0, 0,
                   PDL=PDL)


REDO_PAIRS = const(4)  # pairs per program of hist_kernel's REDO launch


@triton.jit
def _may_take_a_gap(flag, shift, top):
    """Rows a count with gaps may treat otherwise than one without (hist_kernel's REDO), from
    the flag, shift and top the launch without gaps stored: a tiny bin that still splits (flag
    4, or 8 where the cross-entropy's check at temperature 1 fails too; also rows with a live low
    bin, where no gap helps) in a row of finite bf16 logits (no flag 1, 2 or 32) counted unshifted
    or scaled up, an unflagged row counted once whose largest logit is in its tiny bin (its
    top stored as 0), or an unflagged row scaled up: a count with gaps gave such a row its gap
    on top of the scaling, as it did the other side's where that one's tiny bin still split
    (the student's checks at temperature 1 too): without it, identical rows scaled up alike, one
    of them gapped, rounded their log-sums apart and broke their ties, unflagged (a review of
    039e1bd: loss 5e-8 and gradients up to 0.034 where both are 0)."""
    return ((((flag & 12) != 0) & ((flag & 35) == 0) & (shift <= 0))
            | ((flag == 0) & (shift == 0) & (top == 0.0)) | ((flag == 0) & (shift < 0)))


@triton.jit
def _gap_from_list(list_at, raw_at, listed, shift, USE_PTX: tl.constexpr, TAIL_BLOCK: tl.constexpr):
    """hist_kernel's REDO: the gap a row's last count (its list of `listed` occupied bins, with
    `shift`) leaves room for ("Gaps"): each listed bin counted once at its slot of the zeroed
    histogram, then `_widest_gap`, in the bins of that count, which are those the count with
    the gap uses (a run of the unshifted bins stays a run there, moved up with the scaling, which
    only resolves logits below it; the widest run there may be wider, or another: a review found
    it at least as wide, and valid). Returns where the gap ends, in the shifted magnitude bits,
    and its size (0: none); leaves the histogram zeroed."""
    for start in tl.range(0, listed, TAIL_BLOCK):
        idx = start + tl.arange(0, TAIL_BLOCK)
        slots = _slot_of_bin(_listed(list_at, idx, listed))
        if USE_PTX:
            smem_add_one(slots, idx < listed)
        else:
            tl.atomic_add(raw_at + slots, 1, mask=idx < listed)
    tl.debug_barrier()  # the occupancy, visible to every thread
    width, above = _widest_gap(raw_at, USE_PTX)
    up_bits = -tl.minimum(shift, 0)
    # Within the run (the highest logit below it, a tiny one of magnitude SLOT_M_LO, 2**-23 -
    # 2**-31, at the least, must land short of the bin that ends it: a review found one taking
    # the value of a logit of -127.5), inside the bins (below SLOT_M_HI: that bin may be the low
    # one), and keeping subnormals in the tiny bin; `above` is already moved up with the shift.
    room = tl.minimum(tl.minimum(width, SLOT_M_HI - 1 - SLOT_M_LO - up_bits), SLOT_M_LO - _SHIFT_STEP - up_bits)
    gap = tl.maximum(room, 0) // _SHIFT_STEP * _SHIFT_STEP
    tl.debug_barrier()  # (read, then zeroed)
    _clear_histogram(raw_at, USE_PTX, TAIL_BLOCK)
    return tl.where(gap > 0, SLOT_M_LO + above, 0), gap


@triton.jit
def _clear_histogram(raw_at, USE_PTX: tl.constexpr, TAIL_BLOCK: tl.constexpr):
    """Zeroes a row's histogram (shared memory, or its words at raw_at), with the barrier after."""
    if USE_PTX:
        smem_clear()
    else:
        for word in tl.range(0, CAP, TAIL_BLOCK):
            tl.store(raw_at + word + tl.arange(0, TAIL_BLOCK), tl.zeros([TAIL_BLOCK], tl.int32))
    tl.debug_barrier()


@triton.jit
def _hist_side(pair, side, student_ptr, teacher_ptr, student_index_ptr, teacher_index_ptr, count_ptr, list_ptr,
               raw_ptr, fparam_ptr, iparam_ptr, batch_start, student_vocab, teacher_vocab, student_seq_len,
               student_batch_stride, student_row_stride, student_col_stride, teacher_seq_len, teacher_batch_stride,
               teacher_row_stride, teacher_col_stride, student_inv_temperature, teacher_inv_temperature,
               GATHER: tl.constexpr, STUDENT_UNIT_STRIDE: tl.constexpr, TEACHER_UNIT_STRIDE: tl.constexpr,
               USE_PTX: tl.constexpr, SIMD16: tl.constexpr, HAS_CE: tl.constexpr, PREFETCH: tl.constexpr,
               BLOCK: tl.constexpr, TAIL_BLOCK: tl.constexpr, GAPS: tl.constexpr, start_shift, start_gap_at,
               start_gap, SUBS: tl.constexpr = False, PDL: tl.constexpr = False):
    """`_hist_row` on the student's row of a pair (side 0) or the teacher's (SUBS: `_sub_bins_row`)."""
    if side == 0:
        if SUBS:
            _sub_bins_row(pair, 0, student_ptr, student_index_ptr, count_ptr, raw_ptr, fparam_ptr, iparam_ptr,
                          batch_start, student_vocab, student_seq_len, student_batch_stride, student_row_stride,
                          student_col_stride, student_inv_temperature, GATHER, STUDENT_UNIT_STRIDE, USE_PTX, PREFETCH,
                          BLOCK, TAIL_BLOCK, start_gap_at, start_gap)
        else:
            _hist_row(pair, 0, student_ptr, student_index_ptr, count_ptr, list_ptr, raw_ptr, fparam_ptr, iparam_ptr,
                      batch_start, student_vocab, student_seq_len, student_batch_stride, student_row_stride,
                      student_col_stride, student_inv_temperature, GATHER, STUDENT_UNIT_STRIDE, USE_PTX, SIMD16,
                      HAS_CE, PREFETCH, BLOCK, TAIL_BLOCK, GAPS, start_shift, start_gap_at, start_gap, PDL)
    else:
        if SUBS:
            _sub_bins_row(pair, 1, teacher_ptr, teacher_index_ptr, count_ptr, raw_ptr, fparam_ptr, iparam_ptr,
                          batch_start, teacher_vocab, teacher_seq_len, teacher_batch_stride, teacher_row_stride,
                          teacher_col_stride, teacher_inv_temperature, GATHER, TEACHER_UNIT_STRIDE, USE_PTX, PREFETCH,
                          BLOCK, TAIL_BLOCK, start_gap_at, start_gap)
        else:
            _hist_row(pair, 1, teacher_ptr, teacher_index_ptr, count_ptr, list_ptr, raw_ptr, fparam_ptr, iparam_ptr,
                      batch_start, teacher_vocab, teacher_seq_len, teacher_batch_stride, teacher_row_stride,
                      teacher_col_stride, teacher_inv_temperature, GATHER, TEACHER_UNIT_STRIDE, USE_PTX, SIMD16, False,
                      PREFETCH, BLOCK, TAIL_BLOCK, GAPS, start_shift, start_gap_at, start_gap, PDL)


@triton.jit
def _sub_bins_row(pair, side, logits_ptr, index_ptr, count_ptr, raw_ptr, fparam_ptr, iparam_ptr, batch_start, vocab,
                  seq_len, batch_stride, row_stride, col_stride, inv_temperature, GATHER: tl.constexpr,
                  UNIT_STRIDE: tl.constexpr, USE_PTX: tl.constexpr, PREFETCH: tl.constexpr, BLOCK: tl.constexpr,
                  TAIL_BLOCK: tl.constexpr, gap_at, gap):
    """hist_kernel's REDO, after a row's gap (`gap`, 0: none; "Tiny sub-bins"): where its flag
    is the split tiny bin's alone (4: no other check of the last count failed, nor the
    cross-entropy's), its tiny bin's k live at both ends and at most _SUB_BINS keys apart, one
    more read of the row counts its tiny logits (those of the count's slot 0 or
    _NEG_TINY_SLOT) by the key of their k, computed as grad_kernel computes it; their prefix
    counts go to the words past the bins, and the row is unflagged, marked _SUBS. Expects the
    histogram zeroed; leaves it so."""
    at = (pair * 2 + side).to(tl.int64)
    params = at * PARAM_SLOTS
    counts_at = count_ptr + at * CAP
    raw_at = raw_ptr + at * CAP
    flag = tl.load(iparam_ptr + params + _FLAG)
    shift = tl.load(iparam_ptr + params + _SHIFT)
    top = tl.load(fparam_ptr + params + _TOP)  # (unshifted)
    log_sum = tl.load(fparam_ptr + params + _LOG_SUM)
    # The split check as hist_kernel made it, in the shifted values
    scale = inv_temperature * LOG2E * _power_of_shift(shift, 1)
    shifted_top = top * _power_of_shift(shift, -1)
    tiny_end = _logit_of_bin(tl.zeros([], tl.int32) + _TINY, False, gap_at, gap)
    k_low = _log2_prob(-tiny_end, scale, shifted_top, log_sum)
    key_low = _key(k_low)
    n = _key(_log2_prob(tiny_end, scale, shifted_top, log_sum)) - key_low + 1
    tiny = tl.load(counts_at + _TINY + 1) - tl.load(counts_at + _TINY)
    low = tl.load(counts_at + 1) - tl.load(counts_at)
    low_live = _exp2(_log2_prob(-256.0, scale, shifted_top, log_sum)) > 0.0
    if ((flag == 4) & (shift <= 0) & (tiny > 0) & (n > 1) & (n <= _SUB_BINS) & (_exp2(k_low) > 0.0)
            & ((low == 0) | ~low_live)):
        row, _unused, row_ptr, _ = _pair_rows(batch_start + pair, logits_ptr, logits_ptr, index_ptr, index_ptr,
                                              seq_len, batch_stride, row_stride, seq_len, batch_stride,
                                              row_stride, GATHER)
        stop = tl.where(row >= 0, vocab, 0)
        unscaled = inv_temperature * LOG2E
        # The tiny bin's logits are those of magnitude bits at most `tiny_top` (their shifted
        # and gapped magnitude at most SLOT_M_LO, as `_slots_of_bits` maps them: below gap_at,
        # which lies above SLOT_M_LO, a magnitude moves up by the gap), and -inf past the row is
        # not among them: a block's least magnitude tells whether it holds one, in about two
        # instructions a logit (the slots of every logit, and a test of them, took ~23: 2.0
        # ms a batch of 5,461 `dense` pairs, more than the first launch's two counts). Few
        # blocks do; only there is k computed and counted (in the others every lane's add
        # would go to the spare word, one address: 32 of them a warp instruction).
        tiny_top = SLOT_M_LO + shift - gap
        ahead = _first_block(row_ptr, tl.arange(0, BLOCK), col_stride, stop, UNIT_STRIDE, PREFETCH)
        for start in tl.range(0, stop, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            raw, ahead = _block_raw(ahead, row_ptr, idx, col_stride, stop, BLOCK, UNIT_STRIDE, PREFETCH)
            magnitude = _bf16_bits(raw).to(tl.int32) & 0x7FFF
            if tl.min(magnitude, 0) <= tiny_top:
                counted = magnitude <= tiny_top
                k = _log2_prob(raw.to(tl.float32), unscaled, top, log_sum)
                sub = _sub_bin(k, key_low)
                if USE_PTX:
                    smem_add_one(sub, counted)
                else:
                    tl.atomic_add(raw_at + sub, 1, mask=counted)
        tl.debug_barrier()  # the counts, visible to every thread
        j = tl.arange(0, _SUB_BLOCK)
        counts = _read_slots(raw_at, j, USE_PTX)  # (0 past _SUB_BINS: the count clamps to them)
        tl.store(counts_at + _SUB_P + 1 + j, tl.cumsum(counts, 0), mask=j < _SUB_BINS)
        tl.store(counts_at + _SUB_P, 0)
        tl.store(counts_at + _SUB_KEY, key_low)
        tl.store(counts_at + _SUB_N, n)
        # (else left flagged: the trie's; a tiny logit keyed past the n sub-bins, which the k of
        # the bin's ends bound, would be counted in none: counted in n of them, or flagged)
        if tl.sum(tl.where(j < n, counts, 0), 0) == tiny:
            tl.store(iparam_ptr + params + _FLAG, 0)
            tl.store(fparam_ptr + params + _GAPS, _gaps_word(gap_at, gap, _SUBS))
        tl.debug_barrier()  # (read, then zeroed for the next row)
        _clear_histogram(raw_at, USE_PTX, TAIL_BLOCK)


@triton.jit
def _hist_row(pair, side, logits_ptr, index_ptr, count_ptr, list_ptr, raw_ptr, fparam_ptr, iparam_ptr, batch_start,
              vocab, seq_len, batch_stride, row_stride, col_stride, inv_temperature, GATHER: tl.constexpr,
              UNIT_STRIDE: tl.constexpr, USE_PTX: tl.constexpr, SIMD16: tl.constexpr, HAS_CE: tl.constexpr,
              PREFETCH: tl.constexpr, BLOCK: tl.constexpr, TAIL_BLOCK: tl.constexpr, GAPS: tl.constexpr,
              start_shift, start_gap_at, start_gap, PDL: tl.constexpr = False):
    """One row of one side: hist_kernel's program. First the histogram of its logits over the
    slots (above; in shared memory with USE_PTX, zeroed by the caller, else counted with global
    atomics at raw_ptr + (pair * 2 + side) * CAP, zeroed by the launcher). Then, from the bins: the row's largest
    logit and base-2 log-sum (and with HAS_CE the log-sum at temperature 1, the student's
    cross-entropy), the count of elements of nonzero probability below each bin (written at
    count_ptr; [WIDTH] = all of them), the bins holding any of them in order (int16 at
    list_ptr, the same offset) and the row's flag. With GATHER the row is index_ptr[pair]; a
    negative index is padding: an empty histogram, flagged (no finite logit), and no pass over
    the bins.

    SIMD16 (with USE_PTX, sm_90 and later): two logits' slots at a time (ptx.smem_count_bf16);
    it needs an even number of logits per thread. The pass over bins packs a block's occupied
    count above 21 bits of int32: at most 512 bins a step.

    Nothing else per bin leaves the program: a bin's k = log2 p is a function of (bin, top,
    log-sum), recomputed where it is needed (`_k_of_bins`).

    A row flagged for its range alone is counted a second time, shifted, by the same program
    ("Rows past 256", top of file): everything above is written again, with its shift.

    PDL: the previous launch waited for after the first count ("Dependent launches")."""
    tl.static_assert(TAIL_BLOCK == _RUN * SMEM_THREADS, "the pass over bins: a run of bins per thread, 512 a step "
                     "(its scan packs a step's occupied count in 10 bits)")
    if SIMD16:
        tl.static_assert(USE_PTX and BLOCK % (2 * SMEM_THREADS) == 0, "SIMD16: two logits per thread and step")
    row, _unused, row_ptr, _ = _pair_rows(batch_start + pair, logits_ptr, logits_ptr, index_ptr, index_ptr,
                                          seq_len, batch_stride, row_stride, seq_len, batch_stride,
                                          row_stride, GATHER)
    at = (pair * 2 + side).to(tl.int64)
    counts_at = count_ptr + at * CAP
    list_at = list_ptr + at * CAP
    raw_at = raw_ptr + at * CAP
    stop = tl.where(row >= 0, vocab, 0)
    tail_stop = tl.where(row >= 0, WIDTH, 0).to(tl.int32)  # (padding: nothing to read)
    params = at * PARAM_SLOTS
    # A row is counted once with shift 0; a row that this flags only for its range (a finite
    # logit of magnitude >= 256, no infinity or NaN) once more, with the smallest shift that
    # brings its largest magnitude below 256 ("Rows past 256"). Each pass writes all it has.
    # (GAPS: hist_kernel's REDO, one count with the shift and gap it found.)
    shift = tl.zeros([], tl.int32) + start_shift
    gap_at = tl.zeros([], tl.int32) + start_gap_at
    gap = tl.zeros([], tl.int32) + start_gap
    again = shift == shift  # (padding rows too: their one pass flags them)
    while again:
        # The bins' values are the row's logits times 2**-(shift / 128), and its k is that of
        # those values at scale times 2**(shift / 128): the same float32 k.
        power = _power_of_shift(shift, 1)
        scale = inv_temperature * LOG2E * power
        ce_scale = LOG2E * power
        if GAPS:  # (without, the gap is the constant 0: the passes compile as before the gaps)
            g_at = gap_at
            g = gap
            counting_first = shift != shift  # (REDO's one count: no other)
            magnitudes, low_bits = _count_row(row_ptr, raw_at, col_stride, stop, shift, gap_at, gap, UNIT_STRIDE,
                                              USE_PTX, SIMD16, PREFETCH, BLOCK, True)
        else:
            g_at = 0
            g = 0
            counting_first = shift == 0
            magnitudes, low_bits = _count_row(row_ptr, raw_at, col_stride, stop, shift, 0, 0, UNIT_STRIDE,
                                                 USE_PTX, SIMD16, PREFETCH, BLOCK)
        tl.debug_barrier()  # the counts, visible to every thread
        if PDL:  # the count read the logits alone; the previous launch's tables are read and written next
            gdc_wait()
        top_magnitude = tl.max(magnitudes, 0)
        tiny_more = _slot_count(raw_at, _NEG_TINY_SLOT, USE_PTX) - (tl.cdiv(stop, BLOCK) * BLOCK - stop)
        # The row's largest logit first: its highest occupied bin past the low one (`_top_bin`),
        # so the pass over the bins needs no online rescaling. Then one pass: the sum of
        # 2**((z - top) * scale), per lane (one reduction after the pass), and the count of
        # elements below each bin (written at count_ptr) and the list of occupied bins, from one
        # scan of both (the count in the low 21 bits: a block holds fewer than 2**21 elements,
        # launch.py checks the vocabulary). The elements of zero probability are those below the
        # first bin of nonzero p (bins are in the order of p), `_first_live` after the pass: the
        # passes that read these counts subtract the count below it (`_live_below`) and skip the
        # bins before it.
        top_shifted = top_magnitude - shift
        top_shifted += tl.where(top_shifted < g_at, g, 0)
        top_bin = _top_bin(raw_at, top_shifted, tiny_more, tail_stop, USE_PTX, TAIL_BLOCK)
        top = tl.where(top_bin > 0, _logit_of_bin(top_bin, True, g_at, g), 0.0)  # (none: flagged below)
        total, ce_total, below, listed = _scan_bins(raw_at, counts_at, list_at, tail_stop, tiny_more, top, scale,
                                                    ce_scale, g_at, g, HAS_CE, USE_PTX, TAIL_BLOCK)
        # logits >= 256 (times the shift's power), +inf and NaN (either sign): past the bins
        out = _slot_count(raw_at, _POS_OUT_SLOT, USE_PTX) + (top_magnitude > _INF_MAGNITUDE).to(tl.int32)
        flag = (top_bin == 0).to(tl.int32) + (out > 0).to(tl.int32) * 2 + (low_bits != 0).to(tl.int32) * _NOT_BF16
        log_sum = tl.log2(total.to(tl.float32))
        if HAS_CE:
            ce_log_sum = tl.log2(ce_total.to(tl.float32))
        else:
            ce_log_sum = log_sum
        # The low slot holds the logits <= -256 and the -inf ones: they are told apart (one more
        # read of the row) only where a row holds an infinity and the low bin's count matters,
        # at p(-256) > 0 (or the cross-entropy's).
        low_slot = _slot_count(raw_at, _LOW_SLOT, USE_PTX)
        low_live = _exp2(_log2_prob(-256.0, scale, top, log_sum)) > 0.0
        ce_low = _exp2(_log2_prob(-256.0, ce_scale, top, ce_log_sum)) > 0.0
        low_matters = low_live
        if HAS_CE:
            low_matters |= ce_low
        masked = tl.zeros([], tl.int32)
        if (low_slot > 0) & (top_magnitude == _INF_MAGNITUDE) & low_matters & (flag == 0):
            masked, _finite = _infinities(row_ptr, col_stride, stop, UNIT_STRIDE, BLOCK)
        low_raw = low_slot - masked
        tiny_raw = _slot_count(raw_at, 0, USE_PTX) + tiny_more
        # The elements of nonzero probability: from the first bin of nonzero p on (less the -inf
        # counted in the low bin, when that bin is live)
        first = _first_live(top, log_sum, scale, g_at, g)
        tl.debug_barrier()  # the counts below each bin, visible to every thread
        dead = tl.where(first > 0, tl.load(counts_at + first), masked)
        # The low bin is exact when p(-256) is 0 (then it is counted nowhere); the tiny bin when
        # both its ends have one k (its upper end: 2**-23 - 2**-31, lower with a gap).
        if GAPS:
            tiny_end = _logit_of_bin(tl.zeros([], tl.int32) + _TINY, False, g_at, g)
        else:
            tiny_end = _TINY_END
        tiny_split = _log2_prob(-tiny_end, scale, top, log_sum) != _log2_prob(tiny_end, scale, top, log_sum)
        # (the bin's k is that of 0; its positive logits may be live where 0 is not: the upper end)
        tiny_live = _exp2(tl.minimum(_log2_prob(tiny_end, scale, top, log_sum), 0.0)) > 0.0
        flag += (((low_raw > 0) & low_live) | ((tiny_raw > 0) & tiny_live & tiny_split)).to(tl.int32) * 4
        if HAS_CE:  # the same two checks at temperature 1
            ce_split = (_log2_prob(-tiny_end, ce_scale, top, ce_log_sum)
                        != _log2_prob(tiny_end, ce_scale, top, ce_log_sum))
            flag += (((low_raw > 0) & ce_low) | ((tiny_raw > 0) & ce_split)).to(tl.int32) * 4
            tl.store(fparam_ptr + at * PARAM_SLOTS + _CE_LOG_SUM, ce_log_sum)
        tl.store(fparam_ptr + params + _TOP, top * power)  # (exact: the largest logit itself)
        tl.store(fparam_ptr + params + _LOG_SUM, log_sum)
        tl.store(iparam_ptr + params + _FLAG, flag)
        tl.store(iparam_ptr + params + _TOTAL, below - dead)
        tl.store(iparam_ptr + params + _OCCUPIED, listed)
        tl.store(iparam_ptr + params + _DEAD, dead)
        tl.store(iparam_ptr + params + _SHIFT, shift)
        if GAPS:
            tl.store(fparam_ptr + params + _GAPS, _gaps_word(g_at, g, 0))
        # (a row with an infinity: the largest magnitude among its finite logits, one more read)
        finite = top_magnitude
        if counting_first & (flag > 1) & (top_magnitude == _INF_MAGNITUDE):
            finite = _finite_top_call(row_ptr, col_stride, stop, UNIT_STRIDE, SIMD16, PREFETCH, BLOCK)
        # Past 256: the smallest shift that brings the largest magnitude below 256. Below it
        # (the row was flagged for a split tiny bin: nothing else flags a row of finite logits
        # below 256 with an occupied bin), the largest scaling up that keeps it below 256
        # (a negative shift; none for a largest magnitude >= 128, and none where it would take
        # more than _MAX_UP binades: a clamped scaling would not follow a rescaled row's, and
        # two such rows tied across the sides would round apart, found by a review of 97329d4).
        up = (SLOT_M_HI - 1 - finite) // _SHIFT_STEP
        next_shift = tl.where(finite >= SLOT_M_HI, (finite - SLOT_M_HI + _SHIFT_STEP) // _SHIFT_STEP,
                              tl.where(up <= _MAX_UP, -up, 0)) * _SHIFT_STEP
        # Not where scale * 2**s leaves float32's normal range (a small temperature, past it:
        # there the top's k would be 0 * inf; a huge one, below it: k would lose bits): the
        # row stays flagged, as it is after this count.
        next_scale = inv_temperature * LOG2E * _power_of_shift(next_shift, 1)
        # (GAPS: REDO's one count, counting_first False: no other; the gap was chosen there)
        again = ((counting_first & (flag > 1) & (low_bits == 0)
                  & ((next_shift > 0) | ((next_shift < 0) & (top_bin > 0))) & (finite < _INF_MAGNITUDE)
                  & (next_scale < 3.4e38) & (next_scale >= _MIN_NORMAL)))
        if again:  # the histogram read, then zeroed for the second count
            tl.debug_barrier()
            _clear_histogram(raw_at, USE_PTX, TAIL_BLOCK)
        shift = next_shift


@triton.jit
def _scan_bins(raw_at, counts_at, list_at, tail_stop, tiny_more, top, scale, ce_scale, gap_at, gap,
               HAS_CE: tl.constexpr, USE_PTX: tl.constexpr, TAIL_BLOCK: tl.constexpr):
    """hist_kernel's pass over the bins of a row counted with `gap` (0: none; the caller passes
    the constant where it can, so that rows without a gap run code compiled without one): its
    sums of 2**((z - top) * scale) (and at ce_scale), and the count below each bin and the list
    of occupied bins, written from one scan of both; returns the two sums, the row's count and
    its occupied bins."""
    # A step's bins as [RUN, TAIL_BLOCK // RUN]: each thread holds a run of RUN consecutive
    # bins (the default layout), so the scan is serial within a run and one warp scan across
    # runs. With USE_PTX 2, both in inline PTX: the counts read without bank conflicts
    # (`smem_load_runs`) and the scan with one barrier a step (`scan_runs`; Triton's scan and
    # sum took three, each step a chain of shared-memory operations queued behind the other
    # programs' count reductions: the pass was 27% of hist_kernel's warp samples). Steps cover
    # [0, CAP): bins past WIDTH are empty, and their counts below (all the elements, [WIDTH]
    # among them) are written with the others, unmasked.
    runs: tl.constexpr = TAIL_BLOCK // _RUN
    offsets = tl.arange(0, runs)[None, :] * _RUN + tl.arange(0, _RUN)[:, None]
    totals = tl.zeros([_RUN, runs], tl.float64)
    ce_totals = tl.zeros([_RUN, runs], tl.float64)
    below = tl.zeros([], tl.int32)
    listed = tl.zeros([], tl.int32)
    # (the counts' pointer moves with the loop: bins stay 32-bit, which LLVM would widen to
    # 64 bits if their addresses were computed from them, doubling every comparison)
    counts_block = counts_at
    for start in tl.range(0, tail_stop, TAIL_BLOCK):
        bins = start + offsets
        counts = _slot_counts(raw_at, bins, tiny_more, USE_PTX, True)  # (0 past WIDTH: an empty slot)
        # (the low bin is left out: where its p matters the row is flagged, below)
        summed = tl.where(bins >= _LOW_BINS, counts, 0).to(tl.float64)
        z = _logit_of_bin(bins, True, gap_at, gap)
        # (bins above the top are empty: their exponents are clamped, not overflowed)
        totals += summed * _exp2(tl.minimum((z - top) * scale, 0.0)).to(tl.float64)
        if HAS_CE:
            ce_totals += summed * _exp2(tl.minimum((z - top) * ce_scale, 0.0)).to(tl.float64)
        both = counts + ((counts > 0).to(tl.int32) << _LISTED_SHIFT)
        if USE_PTX >= 2:
            before, block = scan_runs(both, (start // TAIL_BLOCK) & 1)
        else:
            run_total = tl.sum(both, 0)
            before = (tl.cumsum(both, 0) - both) + (tl.cumsum(run_total, 0) - run_total)[None, :]
            block = tl.sum(run_total, 0)
        _store_counts(counts_block, offsets, (before & _COUNT_MASK) + below, USE_PTX)
        counts_block += TAIL_BLOCK
        _store_listed(list_at, (before >> _LISTED_SHIFT) + listed, bins, counts > 0, USE_PTX)
        below += block & _COUNT_MASK
        listed += block >> _LISTED_SHIFT
    return tl.sum(tl.sum(totals, 1), 0), tl.sum(tl.sum(ce_totals, 1), 0), below, listed


@triton.jit
def _gap_of(fparam_ptr, at):
    """A side's gap ("Gaps"): where it starts (shifted magnitude bits; 0: none) and its size,
    and its _SUBS bit ("Tiny sub-bins"; 0: none)."""
    packed = tl.load(fparam_ptr + at * PARAM_SLOTS + _GAPS).to(tl.int32, bitcast=True)
    return packed & (_SUBS - 1), packed >> 16, packed & _SUBS


@triton.jit
def _gaps_word(gap_at, gap, marked):
    """The _GAPS word `_gap_of` reads (float32 bits): gap_at | gap << 16, with the _SUBS bit
    where `marked`."""
    return (gap_at | (gap << 16) | marked).to(tl.float32, bitcast=True)


@triton.jit
def _count_row(row_ptr, raw_at, col_stride, stop, shift, gap_at, gap, UNIT_STRIDE: tl.constexpr,
               USE_PTX: tl.constexpr, SIMD16: tl.constexpr, PREFETCH: tl.constexpr, BLOCK: tl.constexpr,
               GAPPED: tl.constexpr = False):
    """hist_kernel's count of one row into its slots, with the row's shift and gap (GAPPED; else
    none, 0 and 0, the code before the gaps): per lane the largest magnitude bits (unshifted;
    the caller reduces them after its barrier), and for float32 rows the OR of their low halves
    (0 for bf16 rows). Lanes past the row load +0: the tiny slot counts them, and the caller
    takes them off it."""
    ahead = _first_block(row_ptr, tl.arange(0, BLOCK), col_stride, stop, UNIT_STRIDE, PREFETCH, 0.0)
    if SIMD16:
        magnitudes = tl.zeros([BLOCK], tl.int16)
    else:
        magnitudes = tl.zeros([BLOCK], tl.int32)
    low_bits = tl.zeros([], tl.int32)
    for start in tl.range(0, stop, BLOCK, loop_unroll_factor=2):
        idx = start + tl.arange(0, BLOCK)
        raw, ahead = _block_raw(ahead, row_ptr, idx, col_stride, stop, BLOCK, UNIT_STRIDE, PREFETCH, 0.0)
        bits = _bf16_bits(raw)
        if raw.dtype == tl.float32:
            low_bits |= tl.max(raw.to(tl.int32, bitcast=True) & 0xFFFF, 0)
        if SIMD16 and GAPPED:
            magnitudes = smem_count_bf16_gap(bits, magnitudes, shift, gap_at, gap)
        elif SIMD16:
            magnitudes = smem_count_bf16(bits, magnitudes, shift)
        else:
            slots, magnitude = _slots_of_bits(bits.to(tl.int32), shift, gap_at, gap)
            magnitudes = tl.maximum(magnitudes, magnitude)
            if USE_PTX:
                smem_add_one(slots, True)
            else:
                tl.atomic_add(raw_at + slots, 1)
    return magnitudes.to(tl.int32), low_bits


@triton.jit
def _widest_gap(raw_at, USE_PTX: tl.constexpr):
    """The widest run of empty bins between the tiny bin and an occupied bin above it, in
    distance from the tiny bin (magnitude bits) counting both signs (the low bin counts, at
    3,969): its width and the distance of the occupied bin that ends it (0 and 0 if no bin is
    occupied past the tiny one; "Gaps"). One binade (128 distances) a step, its lowest and
    highest occupied distances: a run wider than a binade spans binades, so the runs between
    consecutive occupied binades and their ends are all a gap can use."""
    last = tl.zeros([], tl.int32)  # the highest occupied distance so far (the tiny bin: 0)
    width = tl.zeros([], tl.int32)
    above = tl.zeros([], tl.int32)
    for d0 in tl.range(1, _TINY + 1, _SHIFT_STEP):
        d = d0 + tl.arange(0, _SHIFT_STEP)
        inside = d <= _TINY
        positive = _slot_counts(raw_at, tl.where(inside, _TINY + d, CAP - 1), 0, USE_PTX)
        negative = _slot_counts(raw_at, tl.where(inside, _TINY - d, 0), 0, USE_PTX)
        occupied = inside & ((positive > 0) | (negative > 0))
        lowest = tl.min(tl.where(occupied, d, _TINY + 1), 0)
        wider = (lowest <= _TINY) & (lowest - last - 1 > width)
        width = tl.where(wider, lowest - last - 1, width)
        above = tl.where(wider, lowest, above)
        last = tl.maximum(last, tl.max(tl.where(occupied, d, 0), 0))
    return width, above


@triton.jit
def _top_bin(raw_at, top_magnitude, tiny_more, tail_stop, USE_PTX: tl.constexpr, TAIL_BLOCK: tl.constexpr):
    """A row's highest occupied bin past the low one (0 if none; padding, tail_stop 0: 0): bins
    are in the order of value, and none lies above the positive bin of the row's largest
    magnitude, where a scan down starts (mostly one step of TAIL_BLOCK bins)."""
    start = _TINY + tl.maximum(tl.minimum(top_magnitude, SLOT_M_HI - 1) - SLOT_M_LO, 0)
    end = tl.where(tail_stop > 0, start + 1, 0)  # past the bins to scan
    found = tl.zeros([], tl.int32)
    while (found == 0) & (end > _LOW_BINS):
        bins = end - TAIL_BLOCK + tl.arange(0, TAIL_BLOCK)
        counts = _slot_counts(raw_at, tl.maximum(bins, 0), tiny_more, USE_PTX)
        found = tl.max(tl.where((bins >= _LOW_BINS) & (counts > 0), bins, 0), 0)
        end -= TAIL_BLOCK
    return found


@triton.jit
def _first_live(top, log_sum, scale, gap_at, gap):
    """The first bin of nonzero p (WIDTH if none), by bisection: p is non-decreasing over the
    bins."""
    lo = tl.zeros([], tl.int32) - 1  # dead (or before the bins)
    hi = tl.zeros([], tl.int32) + WIDTH  # live (or past them)
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        live = _exp2(tl.minimum(_k_of_bins(mid, top, log_sum, scale, True, gap_at, gap), 0.0)) > 0.0
        hi = tl.where(live, mid, hi)
        lo = tl.where(live, lo, mid)
    return hi


@triton.jit
def _live_below(count_ptr, bins, dead, mask, USE_PTX: tl.constexpr):
    """Elements of nonzero probability below `bins` (in [0, WIDTH]), from hist_kernel's counts
    below each bin and the row's count of the others (`dead`: all below the first live bin)."""
    if USE_PTX:  # (the operands' layout, one wide multiply-add for the address)
        below = gather_i32(count_ptr, bins, mask)
    else:
        below = tl.load(count_ptr + bins, mask=mask, other=0)
    return tl.maximum(below - dead, 0)


@triton.jit
def _k_of_bins(bins, top, log_sum, scale, TINY_AT_ZERO: tl.constexpr = False, gap_at=0, gap=0):
    """k = log2 p of the logits bins stand for, non-decreasing over [0, WIDTH) (a function of
    the bin and the row's statistics: every pass that compares bins computes it here). Without
    TINY_AT_ZERO, the tiny bin at its upper end: exact in comparisons within an unflagged row
    (`_logit_of_bin`), two instructions fewer per evaluation (sign_kernel makes six a bin)."""
    return _log2_prob(_logit_of_bin(bins, TINY_AT_ZERO, gap_at, gap), scale, top, log_sum)


@triton.jit
def _estimate(v, top, log_sum, inv_scale, gap_at=0, gap=0):
    """A bin of a side near k = v: the bin of the logit with that k, rounded to bf16 (inv_scale
    = 1 / scale: an estimate, checked by the caller, needs no division), from its float32 bits:
    the bf16 magnitude clamped to the bins' range, on the side of its sign."""
    z = top + (v + log_sum) * inv_scale
    z = tl.minimum(tl.maximum(z, -60000.0), 60000.0)
    bits = z.to(tl.int32, bitcast=True)
    magnitude = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0x7FFF  # (round to nearest even)
    magnitude += tl.where(magnitude < gap_at, gap, 0)
    d = _distance(magnitude)
    return tl.minimum(tl.where(bits < 0, _TINY - d, _TINY + d), WIDTH - 1)


@triton.jit
def _at_or_past(bins, v, top, log_sum, scale, STRICT: tl.constexpr, gap_at=0, gap=0):
    """Whether bins (in [-1, WIDTH]) lie at or past a side's first bin with k >= v (k > v when
    STRICT): -1 lies before every bin, WIDTH past them all."""
    k = _k_of_bins(tl.minimum(tl.maximum(bins, 0), WIDTH - 1), top, log_sum, scale, False, gap_at, gap)
    if STRICT:
        hit = k > v
    else:
        hit = k >= v
    return (bins >= WIDTH) | ((bins >= 0) & hit)


@triton.jit
def _bound(v, start, top, log_sum, scale, active, STRICT: tl.constexpr, gap_at=0, gap=0):
    """A side's first bin with k >= v (k > v when STRICT; WIDTH if none), for the active lanes:
    from bin `start` (an estimate, mostly the bound itself or a neighbour) by steps that double
    away from it until the bound is bracketed, then by bisection. k is non-decreasing over the
    bins; its runs of equal values (logits near 0, which z - top rounds alike) cost a few
    doublings. The block loops until all its lanes are settled: two evaluations of k, mostly."""
    start = tl.minimum(tl.maximum(start, 0), WIDTH)
    down = _at_or_past(start, v, top, log_sum, scale, STRICT, gap_at, gap)  # the bound is at or below start
    # lo lies before the bound, hi at or past it; the probe is the end not yet known
    lo = tl.where(down, start - 1, start)
    hi = tl.where(down, start, start + 1)
    step = tl.full(start.shape, 1, tl.int32)
    going = active
    while tl.max(going.to(tl.int32), 0) > 0:
        probe = tl.where(down, lo, hi)
        hit = _at_or_past(probe, v, top, log_sum, scale, STRICT, gap_at, gap)
        going = going & (hit == down)  # the probe fell on the same side as start: not bracketed
        step = tl.where(going, step * 2, step)
        hi = tl.where(going, tl.where(down, probe, tl.minimum(probe + step, WIDTH)), hi)
        lo = tl.where(going, tl.where(down, tl.maximum(probe - step, -1), probe), lo)
    going = active & (hi - lo > 1)
    while tl.max(going.to(tl.int32), 0) > 0:
        mid = (lo + hi) >> 1
        hit = _at_or_past(mid, v, top, log_sum, scale, STRICT, gap_at, gap)
        hi = tl.where(going & hit, mid, hi)
        lo = tl.where(going & ~hit, mid, lo)
        going = active & (hi - lo > 1)
    return hi


@triton.jit
def _bin_signs(bins, listed, active, own_ge, own_gt, own_count, other_count, own_dead, other_dead, own_top,
               own_log_sum, own_scale, other_top, other_log_sum, other_scale, own_total, other_total, sign_ptr, side,
               store, own_gap_at, own_gap, other_gap_at, other_gap, own_subs, other_subs, USE_PTX: tl.constexpr,
               SUB: tl.constexpr):
    """sign_kernel's work on one block of occupied bins (`listed` lanes; `active` those of
    nonzero p; own_ge and own_gt: the side's live elements from the bin on and past it) of side
    `side`: their signs (stored at their slots from sign_ptr where `store`; 0 for the listed
    bins of probability 0, so that every slot an element of the row falls in holds a finite
    value: grad_kernel gathers without a mask) and their count * p * sign (float64, per
    lane). SUB: either side may count its tiny bin in sub-bins (own_subs, other_subs:
    `_sub_bins_of`); a side's own tiny bin then is `_sub_signs`' work."""
    written = listed
    if SUB:
        active &= (bins != _TINY) | (own_subs[1] == 0)
        written &= active | (own_ge <= own_gt)
    count = own_ge - own_gt  # the bin's own elements
    v = _k_of_bins(bins, own_top, own_log_sum, own_scale, False, own_gap_at, own_gap)
    # The four bounds from the neighbours' k, where a run of equal k or a missed estimate
    # does not get in the way (all but a few bins near logit 0); -1 where it does.
    own_first = tl.where((bins == 0) | (_k_of_bins(bins - 1, own_top, own_log_sum, own_scale, False, own_gap_at,
                                                   own_gap) < v), bins, -1)
    own_after = tl.where((bins == WIDTH - 1) | (_k_of_bins(bins + 1, own_top, own_log_sum, own_scale, False,
                                                           own_gap_at, own_gap) > v), bins + 1, -1)
    guess = _estimate(v, other_top, other_log_sum, 1.0 / other_scale, other_gap_at, other_gap)  # (a scalar division)
    k_guess = _k_of_bins(guess, other_top, other_log_sum, other_scale, False, other_gap_at, other_gap)
    k_before = _k_of_bins(guess - 1, other_top, other_log_sum, other_scale, False, other_gap_at, other_gap)
    k_next = _k_of_bins(guess + 1, other_top, other_log_sum, other_scale, False, other_gap_at, other_gap)
    at_guess = (k_guess >= v) & ((guess == 0) | (k_before < v))
    at_next = (k_guess < v) & ((guess == WIDTH - 1) | (k_next >= v))
    lower = tl.where(at_guess, guess, tl.where(at_next, guess + 1, -1))
    upper = tl.where(at_guess & (k_guess > v), guess,
                     tl.where((at_guess | at_next) & ((guess == WIDTH - 1) | (k_next > v)), guess + 1, -1))
    slow = active & ((own_first < 0) | (own_after < 0) | (lower < 0) | (upper < 0))
    if tl.max(slow.to(tl.int32), 0) > 0:
        own_first = tl.where(slow, _bound(v, bins, own_top, own_log_sum, own_scale, slow, False, own_gap_at, own_gap),
                             own_first)
        own_after = tl.where(slow, _bound(v, bins + 1, own_top, own_log_sum, own_scale, slow, True, own_gap_at,
                                          own_gap), own_after)
        lower = tl.where(slow, _bound(v, guess, other_top, other_log_sum, other_scale, slow, False, other_gap_at,
                                      other_gap), lower)
        upper = tl.where(slow, _bound(v, lower, other_top, other_log_sum, other_scale, slow, True, other_gap_at,
                                      other_gap), upper)
        # (elsewhere the bin's own run is the bin: the counts below it and the next one, read)
        own_ge = tl.where(slow, own_total - _live_below(own_count, own_first, own_dead, slow, USE_PTX), own_ge)
        own_gt = tl.where(slow, own_total - _live_below(own_count, own_after, own_dead, slow, USE_PTX), own_gt)
    other_ge, other_gt = _live_from(other_count, lower, upper, other_total, other_dead, active, USE_PTX)
    if SUB:
        own_ge, own_gt = _sub_counts(own_ge, own_gt, v, own_count, own_subs, active)
        other_ge, other_gt = _sub_counts(other_ge, other_gt, v, other_count, other_subs, active)
    # (the tie rule is symmetric: a teacher's sign is minus the student rule's with the sides
    # swapped, so one rule serves both, from the side's own point of view)
    sign, _unused = _tie_signs(own_gt - other_gt, own_ge - own_gt, other_ge - other_gt)
    sign = tl.where(side == 0, sign, -sign)
    if store:  # at the bins' slots, the tiny bin's at both of its own
        slots = _slot_of_bin(bins)
        stored = tl.where(active, sign, 0.0)
        if USE_PTX:  # (the operands' layout)
            sign_bits = stored.to(tl.int32, bitcast=True)
            scatter(sign_ptr, slots, sign_bits, written, True)
            scatter(sign_ptr, tl.full(bins.shape, _NEG_TINY_SLOT, tl.int32), sign_bits, written & (bins == _TINY),
                    True)
        else:
            tl.store(sign_ptr + slots, stored, mask=written)
            tl.store(sign_ptr + _NEG_TINY_SLOT + tl.zeros_like(bins), stored, mask=written & (bins == _TINY))
    p = _exp2(tl.minimum(v, 0.0))  # (k <= 0 where occupied)
    return tl.where(active, count.to(tl.float64) * p.to(tl.float64) * sign.to(tl.float64), 0.0)


@triton.jit
def _sub_bins_of(count_at, marked, top, log_sum, scale, gap_at, gap):
    """A side's sub-bins ("Tiny sub-bins"): the key of sub-bin 0's k, their number n (0: the
    side has none), their elements (P[n]) and the k its bins give its tiny bin (the k of the
    bin's upper end, which `_bound` and the counts from bins take for all its elements)."""
    subs = marked != 0
    key_low = tl.load(count_at + _SUB_KEY, mask=subs, other=0)
    n = tl.load(count_at + _SUB_N, mask=subs, other=0)
    total = tl.load(count_at + _SUB_P + n, mask=subs, other=0)
    return key_low, n, total, _k_of_bins(tl.zeros([], tl.int32) + _TINY, top, log_sum, scale, False, gap_at, gap)


@triton.jit
def _sub_counts(ge, gt, v, count_at, subs, mask):
    """A side's elements of k >= v and k > v from the counts its bins give (`ge`, `gt`: its
    tiny bin's elements all at the bin's k), its tiny elements taken by their sub-bins instead
    (no change where the side has none)."""
    key_low, n, total, k_tiny = subs
    key = _key(v) - key_low
    counted = mask & (n > 0)
    below = tl.load(count_at + _SUB_P + tl.minimum(tl.maximum(key, 0), n), mask=counted, other=0)
    upto = tl.load(count_at + _SUB_P + tl.minimum(tl.maximum(key + 1, 0), n), mask=counted, other=0)
    return (ge - tl.where(k_tiny >= v, total, 0) + total - below,
            gt - tl.where(k_tiny > v, total, 0) + total - upto)


@triton.jit
def _sub_signs(own_count, other_count, own_dead, other_dead, own_top, own_log_sum, own_scale, other_top,
               other_log_sum, other_scale, own_total, other_total, signs, side, store, own_gap_at, own_gap,
               other_gap_at, other_gap, own_subs, other_subs, USE_PTX: tl.constexpr):
    """sign_kernel's work on a side's sub-bins ("Tiny sub-bins"; none: nothing): as
    `_bin_signs`' on a bin, each sub-bin's value its own k, its four bounds searched (the bins
    give all its elements one k); their signs stored from signs + _SUB_SIGN (with the key and n,
    for grad_kernel) where `store`; returns their sum of count * p * sign."""
    key_low, n, _total, _k_tiny = own_subs
    j = tl.arange(0, _SUB_BLOCK)
    count = (tl.load(own_count + _SUB_P + 1 + j, mask=j < n, other=0)
             - tl.load(own_count + _SUB_P + j, mask=j < n, other=0))
    active = count > 0
    v = _of_key(key_low + j)
    bins = tl.full([_SUB_BLOCK], _TINY, tl.int32)
    own_first = _bound(v, bins, own_top, own_log_sum, own_scale, active, False, own_gap_at, own_gap)
    own_after = _bound(v, bins + 1, own_top, own_log_sum, own_scale, active, True, own_gap_at, own_gap)
    guess = _estimate(v, other_top, other_log_sum, 1.0 / other_scale, other_gap_at, other_gap)
    lower = _bound(v, guess, other_top, other_log_sum, other_scale, active, False, other_gap_at, other_gap)
    upper = _bound(v, lower, other_top, other_log_sum, other_scale, active, True, other_gap_at, other_gap)
    own_ge, own_gt = _live_from(own_count, own_first, own_after, own_total, own_dead, active, USE_PTX)
    other_ge, other_gt = _live_from(other_count, lower, upper, other_total, other_dead, active, USE_PTX)
    own_ge, own_gt = _sub_counts(own_ge, own_gt, v, own_count, own_subs, active)
    other_ge, other_gt = _sub_counts(other_ge, other_gt, v, other_count, other_subs, active)
    sign, _unused = _tie_signs(own_gt - other_gt, own_ge - own_gt, other_ge - other_gt)
    sign = tl.where(side == 0, sign, -sign)
    if store & (n > 0):
        tl.store(signs + _SUB_SIGN + j, sign, mask=active)
        tl.store(signs + _SUB_KEY, key_low.to(tl.float32, bitcast=True))
        tl.store(signs + _SUB_N, n.to(tl.float32, bitcast=True))
    p = _exp2(tl.minimum(v, 0.0))
    return tl.sum(tl.where(active, count.to(tl.float64) * p.to(tl.float64) * sign.to(tl.float64), 0.0), 0)


@triton.jit
def _listed(list_at, slots, listed):
    """Entries `slots` of a side's list of occupied bins (the low bin past its end)."""
    return tl.load(list_at + slots, mask=slots < listed, other=0).to(tl.int32)


@triton.jit
def _live_from(count_ptr, first, after, total, dead, mask, USE_PTX: tl.constexpr):
    """A side's live elements from bin `first` on and from bin `after` on (where mask; else
    `total` twice): at or above a value and above it, given the bounds of its run of bins."""
    return (total - _live_below(count_ptr, first, dead, mask, USE_PTX),
            total - _live_below(count_ptr, after, dead, mask, USE_PTX))


@triton.jit
def sign_kernel(fparam_ptr, iparam_ptr, count_ptr, list_ptr, sign_ptr, partial_ptr, student_inv_temperature,
                teacher_inv_temperature, STORE_STUDENT: tl.constexpr, STORE_TEACHER: tl.constexpr,
                USE_PTX: tl.constexpr, BLOCK: tl.constexpr, GAPS: tl.constexpr = False, PDL: tl.constexpr = False):
    """Signs of the occupied bins of one side (program_id(1): 0 student, 1 teacher) of one pair
    (program_id(0)) per program, BLOCK of them at a time from the side's list, written to the
    side's sign table when STORE_STUDENT / STORE_TEACHER (a gradient of that side is wanted;
    the entries of empty bins are never read); the side's sum of count * p * sign goes to
    partial_ptr[pair * 2 + side] (float64).

    For an occupied bin of value k = v: the counts of both sides at or above v and above v,
    from the prefix counts at four bounds: the ends of the bin's own run of equal k, and the
    other side's first bins with k >= v and k > v, near the bin of the logit with that k
    there. The k of the neighbours settle them almost everywhere; where they do not (runs of
    equal k near logit 0, an estimate off by more than a bin), `_bound` searches, for the
    whole block only when some lane needs it."""
    _after_previous_launch(PDL)
    pair = tl.program_id(0)
    side = tl.program_id(1)
    own = (pair * 2 + side).to(tl.int64)
    other = (pair * 2 + 1 - side).to(tl.int64)
    store = tl.where(side == 0, STORE_STUDENT, STORE_TEACHER)
    flag = tl.load(iparam_ptr + own * PARAM_SLOTS + _FLAG) | tl.load(iparam_ptr + other * PARAM_SLOTS + _FLAG)
    masses = tl.zeros([BLOCK], tl.float64)
    if flag == 0:
        own_count = count_ptr + own * CAP
        other_count = count_ptr + other * CAP
        # Each side's bins, top and scale in its shifted values (hist_kernel's, "Rows past 256")
        own_shift = tl.load(iparam_ptr + own * PARAM_SLOTS + _SHIFT)
        own_top = tl.load(fparam_ptr + own * PARAM_SLOTS + _TOP) * _power_of_shift(own_shift, -1)
        own_log_sum = tl.load(fparam_ptr + own * PARAM_SLOTS + _LOG_SUM)
        own_scale = (tl.where(side == 0, student_inv_temperature, teacher_inv_temperature) * LOG2E
                     * _power_of_shift(own_shift, 1))
        other_shift = tl.load(iparam_ptr + other * PARAM_SLOTS + _SHIFT)
        other_top = tl.load(fparam_ptr + other * PARAM_SLOTS + _TOP) * _power_of_shift(other_shift, -1)
        other_log_sum = tl.load(fparam_ptr + other * PARAM_SLOTS + _LOG_SUM)
        other_scale = (tl.where(side == 0, teacher_inv_temperature, student_inv_temperature) * LOG2E
                       * _power_of_shift(other_shift, 1))
        own_total = tl.load(iparam_ptr + own * PARAM_SLOTS + _TOTAL)
        other_total = tl.load(iparam_ptr + other * PARAM_SLOTS + _TOTAL)
        if GAPS:  # ("Gaps"; without, the constant 0: the pass compiles as before them)
            own_gap_at, own_gap, own_marked = _gap_of(fparam_ptr, own)
            other_gap_at, other_gap, other_marked = _gap_of(fparam_ptr, other)
        else:
            own_gap_at = 0
            own_gap = 0
            own_marked = 0
            other_gap_at = 0
            other_gap = 0
            other_marked = 0
        listed = tl.load(iparam_ptr + own * PARAM_SLOTS + _OCCUPIED)
        own_dead = tl.load(iparam_ptr + own * PARAM_SLOTS + _DEAD)
        other_dead = tl.load(iparam_ptr + other * PARAM_SLOTS + _DEAD)
        list_at = list_ptr + own * CAP
        signs = sign_ptr + own * CAP
        if (own_gap_at | other_gap_at | own_marked | other_marked) == 0:  # (no gap: the loop compiled without)
            masses = _sign_bins(list_at, listed, own_count, other_count, own_dead, other_dead, own_top, own_log_sum,
                                own_scale, other_top, other_log_sum, other_scale, own_total, other_total, signs, side,
                                store, 0, 0, 0, 0, (0, 0, 0, 0.0), (0, 0, 0, 0.0), USE_PTX, BLOCK, False)
        elif (own_marked | other_marked) == 0:  # (a gap: the loop compiled with, without sub-bins)
            masses = _sign_bins(list_at, listed, own_count, other_count, own_dead, other_dead, own_top, own_log_sum,
                                own_scale, other_top, other_log_sum, other_scale, own_total, other_total, signs, side,
                                store, own_gap_at, own_gap, other_gap_at, other_gap, (0, 0, 0, 0.0), (0, 0, 0, 0.0),
                                USE_PTX, BLOCK, False)
        else:  # (sub-bins, "Tiny sub-bins")
            own_subs = _sub_bins_of(own_count, own_marked, own_top, own_log_sum, own_scale, own_gap_at, own_gap)
            other_subs = _sub_bins_of(other_count, other_marked, other_top, other_log_sum, other_scale, other_gap_at,
                                      other_gap)
            masses = _sign_bins(list_at, listed, own_count, other_count, own_dead, other_dead, own_top, own_log_sum,
                                own_scale, other_top, other_log_sum, other_scale, own_total, other_total, signs, side,
                                store, own_gap_at, own_gap, other_gap_at, other_gap, own_subs, other_subs, USE_PTX,
                                BLOCK, True)
            sub_mass = _sub_signs(own_count, other_count, own_dead, other_dead, own_top, own_log_sum, own_scale,
                                  other_top, other_log_sum, other_scale, own_total, other_total, signs, side, store,
                                  own_gap_at, own_gap, other_gap_at, other_gap, own_subs, other_subs, USE_PTX)
            masses += tl.where(tl.arange(0, BLOCK) == 0, sub_mass, 0.0)
    tl.store(partial_ptr + own, tl.sum(masses, 0))


@triton.jit
def _sign_bins(list_at, listed, own_count, other_count, own_dead, other_dead, own_top, own_log_sum, own_scale,
               other_top, other_log_sum, other_scale, own_total, other_total, signs, side, store, own_gap_at,
               own_gap, other_gap_at, other_gap, own_subs, other_subs, USE_PTX: tl.constexpr, BLOCK: tl.constexpr,
               SUB: tl.constexpr):
    """sign_kernel's loop over a side's `listed` occupied bins, BLOCK at a time (`_bin_signs`;
    the gaps 0 as constants where the caller can, without SUB: the loop then compiles without
    them): per lane, the sums of count * p * sign (float64)."""
    masses = tl.zeros([BLOCK], tl.float64)
    # Software-pipelined: a step works on bins listed one step earlier and on their counts
    # read one step earlier, so no load waits in the step that issues it (the list two
    # steps ahead, the counts of the next step's bins).
    lanes = tl.arange(0, BLOCK)
    bins = _listed(list_at, lanes, listed)
    ahead = _listed(list_at, BLOCK + lanes, listed)
    own_ge, own_gt = _live_from(own_count, bins, bins + 1, own_total, own_dead, lanes < listed, USE_PTX)
    for start in tl.range(0, listed, BLOCK):
        later = _listed(list_at, start + 2 * BLOCK + lanes, listed)
        next_ge, next_gt = _live_from(own_count, ahead, ahead + 1, own_total, own_dead,
                                      start + BLOCK + lanes < listed, USE_PTX)
        active = own_ge > own_gt  # (occupied bins of probability 0 come first in the list: skipped)
        masses += _bin_signs(bins, start + lanes < listed, active, own_ge, own_gt, own_count, other_count, own_dead,
                             other_dead, own_top, own_log_sum, own_scale, other_top, other_log_sum, other_scale,
                             own_total, other_total, signs, side, store, own_gap_at, own_gap, other_gap_at, other_gap,
                             own_subs, other_subs, USE_PTX, SUB)
        bins = ahead
        ahead = later
        own_ge = next_ge
        own_gt = next_gt
    return masses


@triton.jit
def finish_kernel(fparam_ptr, iparam_ptr, count_ptr, partial_ptr, row_loss_ptr, flag_ptr, batch_start,
                  logits_ptr, index_ptr, ce_label_ptr, row_ce_ptr, vocab, seq_len, batch_stride, row_stride,
                  col_stride, GATHER: tl.constexpr, HAS_CE: tl.constexpr, GAPS: tl.constexpr = False,
                  PDL: tl.constexpr = False):
    """One pair per program: the loss from both sides' sums of p * sign (sign_kernel's), and
    the pair's flag (on the student side, and at flag_ptr[batch_start + pair]: nonzero hands it
    to the trie; also for a side scaled up against one that counts a tiny bin, below). With
    HAS_CE, the
    student's cross-entropy against ce_label_ptr[pair] (0 where negative): the log-sum-exp at
    temperature 1 minus the label's logit (logits_ptr: the student's)."""
    _after_previous_launch(PDL)
    pair = tl.program_id(0)
    s_at = (pair * 2).to(tl.int64)
    t_at = s_at + 1
    flag = tl.load(iparam_ptr + s_at * PARAM_SLOTS + _FLAG) | tl.load(iparam_ptr + t_at * PARAM_SLOTS + _FLAG)
    if flag == 0:
        # A side scaled up ("Split tiny bins") resolves its logits near 0 one by one; a side
        # that is not counts them at 0 in its tiny bin (and takes 0 as its top when its
        # largest logit is there). Values tied across the rows (a teacher that is the student
        # rescaled, or the student itself) then agree only in exact arithmetic: a log-sum an
        # ulp apart breaks the tie, and its elements get signs +-1 instead of the tie rule (a
        # review of ec2da32: loss 1.8e-7 and gradients up to 0.06 where both are 0). Such a
        # pair goes to the trie.
        s_shift = tl.load(iparam_ptr + s_at * PARAM_SLOTS + _SHIFT)
        t_shift = tl.load(iparam_ptr + t_at * PARAM_SLOTS + _SHIFT)
        s_tiny = tl.load(count_ptr + s_at * CAP + _TINY + 1) - tl.load(count_ptr + s_at * CAP + _TINY)
        t_tiny = tl.load(count_ptr + t_at * CAP + _TINY + 1) - tl.load(count_ptr + t_at * CAP + _TINY)
        s_near = s_shift < 0
        t_near = t_shift < 0
        if GAPS:  # (or a gap)
            s_gap_at, _s_gap, s_marked = _gap_of(fparam_ptr, s_at)
            t_gap_at, _t_gap, t_marked = _gap_of(fparam_ptr, t_at)
            s_near |= (s_gap_at | s_marked) > 0
            t_near |= (t_gap_at | t_marked) > 0
        mixed = (s_near & ~t_near & (t_tiny > 0)) | (t_near & ~s_near & (s_tiny > 0))
        flag = mixed.to(tl.int32) * 16
    s_mass = tl.load(partial_ptr + s_at)
    t_mass = tl.load(partial_ptr + t_at)
    tl.store(fparam_ptr + s_at * PARAM_SLOTS + _MASS, s_mass.to(tl.float32))
    tl.store(fparam_ptr + t_at * PARAM_SLOTS + _MASS, t_mass.to(tl.float32))
    tl.store(row_loss_ptr + batch_start + pair, (s_mass - t_mass).to(tl.float32))
    tl.store(iparam_ptr + s_at * PARAM_SLOTS + _FLAG, flag)
    tl.store(flag_ptr + batch_start + pair, flag)
    if HAS_CE:
        row, _unused, row_ptr, _ = _pair_rows(batch_start + pair, logits_ptr, logits_ptr, index_ptr, index_ptr,
                                              seq_len, batch_stride, row_stride, seq_len, batch_stride,
                                              row_stride, GATHER)
        label = tl.load(ce_label_ptr + batch_start + pair).to(tl.int32)
        label_logit = tl.load(row_ptr + tl.maximum(label, 0).to(tl.int64) * col_stride,
                              mask=(label < vocab) & (row >= 0), other=float("nan")).to(tl.float32)
        top = tl.load(fparam_ptr + s_at * PARAM_SLOTS + _TOP)
        ce = (top - label_logit) + tl.load(fparam_ptr + s_at * PARAM_SLOTS + _CE_LOG_SUM) * LN2
        tl.store(row_ce_ptr + batch_start + pair, tl.where((label >= 0) & (row >= 0), ce, 0.0))


@triton.jit
def grad_kernel(logits_ptr, index_ptr, grad_ptr, fparam_ptr, iparam_ptr, sign_ptr, row_weight_ptr, ce_label_ptr,
                ce_weight_ptr, batch_start, side, n_chunks, vocab, seq_len, batch_stride, row_stride, col_stride,
                grad_row_stride, inv_temperature, grad_scale, GATHER: tl.constexpr, HAS_CE: tl.constexpr,
                UNIT_STRIDE: tl.constexpr, PREFETCH: tl.constexpr, USE_PTX: tl.constexpr, SIMD16: tl.constexpr,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr, GAPS: tl.constexpr = False, PDL: tl.constexpr = False):
    """The gradient of one side (side 0 student: +, 1 teacher: -) of unflagged pairs, chunk by
    chunk: (p / T) * (sign at the element's slot - the side's sum of p * sign), times
    row_weight_ptr[pair] with GATHER (row index_ptr[pair] of the logits and of the gradient);
    with HAS_CE (student side) plus ce_weight * (softmax(z) - [i == label]). SIMD16 as in
    hist_kernel."""
    if SIMD16:  # (launched on 4 warps, like hist_kernel)
        tl.static_assert(USE_PTX and BLOCK % (2 * SMEM_THREADS) == 0, "SIMD16: two logits per thread and step")
    _after_previous_launch(PDL)
    program = tl.program_id(0)
    pair = program // n_chunks
    chunk = program % n_chunks
    flag = tl.load(iparam_ptr + (pair * 2).to(tl.int64) * PARAM_SLOTS + _FLAG)
    row, _unused, row_ptr, _ = _pair_rows(batch_start + pair, logits_ptr, logits_ptr, index_ptr, index_ptr,
                                          seq_len, batch_stride, row_stride, seq_len, batch_stride,
                                          row_stride, GATHER)
    if (flag == 0) & (row >= 0):
        at = (pair * 2 + side).to(tl.int64)
        top = tl.load(fparam_ptr + at * PARAM_SLOTS + _TOP)
        log_sum = tl.load(fparam_ptr + at * PARAM_SLOTS + _LOG_SUM)
        mass = tl.load(fparam_ptr + at * PARAM_SLOTS + _MASS)
        signs = sign_ptr + at * CAP
        shift = tl.load(iparam_ptr + at * PARAM_SLOTS + _SHIFT)  # (the slots'; top is the logit itself)
        scale = inv_temperature * LOG2E
        factor = inv_temperature * grad_scale * (1.0 - 2.0 * side)
        if GATHER:
            factor *= tl.load(row_weight_ptr + batch_start + pair)
        mass_factor = mass * factor
        ce_label = -1
        ce_factor = 0.0
        ce_log_sum = 0.0
        if HAS_CE:
            ce_label = tl.load(ce_label_ptr + batch_start + pair).to(tl.int32)
            ce_factor = tl.where(ce_label >= 0, tl.load(ce_weight_ptr + batch_start + pair), 0.0)
            ce_log_sum = tl.load(fparam_ptr + at * PARAM_SLOTS + _CE_LOG_SUM)
        grad_row = grad_ptr + row * grad_row_stride
        stop = tl.minimum(chunk * CHUNK + CHUNK, vocab)  # (CHUNK is a multiple of BLOCK)
        gap_at = 0
        gap = 0
        marked = 0
        if GAPS:
            gap_at, gap, marked = _gap_of(fparam_ptr, at)
        if (gap_at | marked) == 0:
            _grad_span(row_ptr, grad_row, signs, chunk * CHUNK, stop, vocab, col_stride, scale, top, log_sum, factor,
                       mass_factor, ce_label, ce_factor, ce_log_sum, shift, 0, 0, 0, 0, HAS_CE, UNIT_STRIDE,
                       PREFETCH, USE_PTX, SIMD16, BLOCK, False)
        elif marked == 0:  # (slots one at a time: the gradient's SIMD clamps have no gap)
            _grad_span(row_ptr, grad_row, signs, chunk * CHUNK, stop, vocab, col_stride, scale, top, log_sum, factor,
                       mass_factor, ce_label, ce_factor, ce_log_sum, shift, gap_at, gap, 0, 0, HAS_CE, UNIT_STRIDE,
                       PREFETCH, USE_PTX, False, BLOCK, False)
        else:  # (sub-bins, "Tiny sub-bins")
            sub_key = tl.load(signs + _SUB_KEY).to(tl.int32, bitcast=True)
            sub_n = tl.load(signs + _SUB_N).to(tl.int32, bitcast=True)
            if gap_at == 0:  # (no gap: the SIMD clamps give the tiny bin's slots, 0 and _NEG_TINY_SLOT, too)
                _grad_span(row_ptr, grad_row, signs, chunk * CHUNK, stop, vocab, col_stride, scale, top, log_sum,
                           factor, mass_factor, ce_label, ce_factor, ce_log_sum, shift, 0, 0, sub_key, sub_n, HAS_CE,
                           UNIT_STRIDE, PREFETCH, USE_PTX, SIMD16, BLOCK, True)
            else:
                _grad_span(row_ptr, grad_row, signs, chunk * CHUNK, stop, vocab, col_stride, scale, top, log_sum,
                           factor, mass_factor, ce_label, ce_factor, ce_log_sum, shift, gap_at, gap, sub_key, sub_n,
                           HAS_CE, UNIT_STRIDE, PREFETCH, USE_PTX, False, BLOCK, True)


@triton.jit
def _grad_span(row_ptr, grad_row, signs, begin, stop, vocab, col_stride, scale, top, log_sum, factor, mass_factor,
               ce_label, ce_factor, ce_log_sum, shift, gap_at, gap, sub_key, sub_n, HAS_CE: tl.constexpr,
               UNIT_STRIDE: tl.constexpr, PREFETCH: tl.constexpr, USE_PTX: tl.constexpr, SIMD16: tl.constexpr,
               BLOCK: tl.constexpr, SUB: tl.constexpr):
    """grad_kernel's loop over columns [begin, stop) of a row: each element's sign from its
    slot's table (the row's shift and gap), and its gradient. SUB: a row with sub_n sub-bins
    (0: none) takes its tiny elements' signs from theirs, by the key of k (sub_key: sub-bin 0's)."""
    ahead = _first_block(row_ptr, begin + tl.arange(0, BLOCK), col_stride, stop, UNIT_STRIDE, PREFETCH)
    for start in tl.range(begin, stop, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        raw, ahead = _block_raw(ahead, row_ptr, idx, col_stride, stop, BLOCK, UNIT_STRIDE, PREFETCH)
        z = raw.to(tl.float32)
        k = _log2_prob(z, scale, top, log_sum)
        p = _exp2(k)
        slots = _slots(raw, shift, SIMD16, gap_at, gap)
        if SUB:  # (a tiny element's sign: its sub-bin's entry, past the slots)
            slots = tl.where(_in_tiny_bin(slots) & (sub_n > 0), _SUB_SIGN + _sub_bin(k, sub_key), slots)
        # Every slot of the row's elements holds a finite value (sign_kernel writes 0 for the
        # listed bins of p = 0), so no mask: a lane of p = 0 gets 0 * finite. Sub-bin entries
        # are read where p > 0 only. (Lanes past the row load -inf and read the low slot, maybe
        # unwritten; their store is masked, and nothing sums over the lanes.)
        if USE_PTX:  # the table is read-only here: the non-coherent path, one wide address add
            if SUB:
                sign = gather_f32(signs, slots, p > 0.0)
            else:
                sign = gather_f32(signs, slots, None)
        elif SUB:
            sign = tl.load(signs + slots, mask=p > 0.0, other=0.0)
        else:
            sign = tl.load(signs + slots)
        grad = p * (sign * factor - mass_factor)  # (a fused multiply-add, and one product)
        if HAS_CE:  # the cross-entropy's softmax, temperature 1
            grad += ce_factor * (_exp2(_log2_prob(z, LOG2E, top, ce_log_sum))
                                 - (idx == ce_label).to(tl.float32))
        tl.store(grad_row + idx, grad.to(grad_row.dtype.element_ty), mask=idx < vocab, eviction_policy=STORE_EVICT)
