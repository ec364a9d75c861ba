"""Device functions: the exact ULD loss of aligned rows and its gradient, without sorting.

The passes that use them are in uld_split.py; this file holds the math and the trie.
(See ../shared/design/uld-math.md in the design notes, and README.md.)

    a = softmax(z_s / T_s), b = softmax(z_t / T_t), both sorted descending, zero-padded,
    L = sum_k |a_(k) - b_(k)| = sum_i a_i g_i - sum_j b_j h_j

where g_i (h_j) is the sign of a_(k) - b_(k) at the rank k of a_i (b_j). With
A(v) = #{a > v}, B(v) = #{b > v} and D = A - B, a student element of value v that ties
with nothing has g = +1 when D(v) >= 0 and -1 otherwise. In general, a group of ms student
and mt teacher elements sharing one value v, with D = A(v) - B(v) above it, gets the average
signs over all orders of the tie (`_tie_signs`). Padding is free: zeros never exceed any
value, so they change no count.

So every element needs only D at its own value. We find it with a radix trie over the
float32 bit pattern of each probability (monotone for p >= 0): the root splits the keys the
row pair actually holds, [min p, max p], into 2**ROOT_BITS power-of-two-aligned buckets. A
bucket whose elements all share one sign is *decided*: with D the count difference above the
bucket and cs, ct its counts, that is D >= ct (all +1) or D + cs <= 0 (all -1). A bucket
holding a single value per side is resolved exactly by the tie rule. Any other bucket is
*open*: it gets a child node
that splits it by the next bits, and one more pass over the rows counts its elements (integer
atomics: deterministic). The trie lives in a per-pair workspace of the batch being processed,
so extra memory is O(batch), not O(rows x vocabulary). The first counting pass also sums the
loss: an element whose root bucket is decided adds p * sign; an element of an open bucket adds
p (int64 fixed point) to each bucket it reaches, and a bucket adds sign * its mass when it is
decided. Then one pass writes the gradient

    dL/dz_s = (a / T_s) * (g - <g, a>)       dL/dz_t = -(b / T_t) * (h - <h, b>).
"""

import os

import triton
import triton.language as tl

from uld_kernels.kernels.const import const
from uld_kernels.kernels.ptx import (MASS_SCALE, count_key, descend, exp2_ftz, gather_f32, list_append,
                                     step_and_count, step_and_count_smem)

# Planes of the int32 workspace, each ENTRIES long, per pair.
# Eviction hints (ULD_EVICT: "both", the default, "loads", "stores", or "none"): the logits'
# loads and the histogram engine's gradient stores marked evict_first (L1 and L2: each is read
# or written once a pass), so that the tables gathered from (signs, counts) stay cached. Random
# and peaked rows 6.60 -> 6.57 ms (twenty-second session, runs 2-4: three calls, two rounds
# each); "loads" alone 6.61, "stores" alone 6.59.
_EVICT = os.environ.get("ULD_EVICT", "both")
if _EVICT not in ("both", "loads", "stores", "none"):
    raise ValueError(f"ULD_EVICT must be 'both', 'loads', 'stores' or 'none', got {_EVICT!r}")
LOAD_EVICT = const("evict_first" if _EVICT in ("loads", "both") else "")
STORE_EVICT = const("evict_first" if _EVICT in ("stores", "both") else "")
_CNT_S = const(0)  # student elements in the bucket
_CNT_T = const(1)  # teacher elements in the bucket
_MIN_S = const(2)  # smallest / largest student key in the bucket
_MAX_S = const(3)
_MIN_T = const(4)  # smallest / largest teacher key in the bucket
_MAX_T = const(5)
_CHILD = const(6)  # first entry of the child node, 0 when the bucket is resolved
_NODE_TOP = const(7)  # at a node's first entry: D at the top of the node
INT_PLANES = const(8)
SIGN_PLANES = const(2)  # float32: student sign, teacher sign of a resolved bucket
META_SLOTS = const(64)  # level starts at [0, 31); the shift of level l at [33 + l]
_SHIFT_OFFSET = const(33)  # [32]: root shift + ROOT_BITS, as if the root had a parent
_ROOT_BASE = const(31)  # the root digit of a key is (key >> root shift) - [31]
_KEY_LO = const(46)  # every key is clamped into the root's range [_KEY_LO, _KEY_HI]
_KEY_HI = const(47)

_MAX_CHILD_BITS = const(8)
_MIN_CHILD_BITS = const(4)  # a level may take more than its cap (`_resolve_level`) up to here
LOG2E = const(1.4426950408889634)
LN2 = const(0.6931471805599453)
# Compiled kernels take exp2 from one flush-to-zero MUFU instruction (kernels/ptx.py); the
# interpreter cannot run inline assembly and uses tl.exp2.
_FAST_EXP2 = const(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))
_KEY_NONE_MIN = const(2147483647)
_KEY_NONE_MAX = const(-1)


@triton.jit
def _load_raw(ptr, idx, col_stride, vocab, UNIT_COL_STRIDE: tl.constexpr, PAST: tl.constexpr = float("-inf")):
    """Logits idx of one row in the input dtype; PAST (-inf) past the row."""
    if UNIT_COL_STRIDE:
        offsets = idx
    else:
        offsets = idx.to(tl.int64) * col_stride
    return tl.load(ptr + offsets, mask=idx < vocab, other=PAST, eviction_policy=LOAD_EVICT)


@triton.jit
def _load_logits(ptr, idx, col_stride, vocab, UNIT_COL_STRIDE: tl.constexpr):
    """Logits idx of one row as float32; -inf past the row."""
    return _load_raw(ptr, idx, col_stride, vocab, UNIT_COL_STRIDE).to(tl.float32), idx < vocab


@triton.jit
def _first_block(ptr, idx, col_stride, stop, UNIT_COL_STRIDE: tl.constexpr, PREFETCH: tl.constexpr,
                 PAST: tl.constexpr = float("-inf")):
    """What a prefetching loop over [idx[0], stop) carries into its first iteration: the first
    block's logits with PREFETCH, else nothing (zeros of the same type)."""
    if PREFETCH:
        ahead = _load_raw(ptr, idx, col_stride, stop, UNIT_COL_STRIDE, PAST)
    else:
        ahead = tl.zeros(idx.shape, ptr.dtype.element_ty)
    return ahead


@triton.jit
def _block_raw(ahead, ptr, idx, col_stride, stop, BLOCK: tl.constexpr, UNIT_COL_STRIDE: tl.constexpr,
               PREFETCH: tl.constexpr, PAST: tl.constexpr = float("-inf")):
    """Logits idx (input dtype) of a loop over [.., stop), and what to carry to the next
    iteration. With PREFETCH, `ahead` holds this block already (loaded one iteration earlier)
    and the next block's load is issued here: two loads in flight per thread while this block
    is worked on."""
    if PREFETCH:
        raw = ahead
        ahead = _load_raw(ptr, idx + BLOCK, col_stride, stop, UNIT_COL_STRIDE, PAST)
    else:
        raw = _load_raw(ptr, idx, col_stride, stop, UNIT_COL_STRIDE, PAST)
    return raw, ahead


@triton.jit
def _block_keys(ahead, ptr, idx, col_stride, stop, scale, top, log_sum,
                BLOCK: tl.constexpr, UNIT_COL_STRIDE: tl.constexpr, PREFETCH: tl.constexpr):
    """`_probs_and_keys` of block `idx` of a loop over [.., stop) through `_block_raw` (with
    PREFETCH the trie walk and sign gathers run under the next load: bench/NOTES.md, run 7:
    2% faster), and what to carry to the next iteration."""
    raw, ahead = _block_raw(ahead, ptr, idx, col_stride, stop, BLOCK, UNIT_COL_STRIDE, PREFETCH)
    p, key, counted, z = _keys_of(raw, scale, top, log_sum)
    return p, key, counted, z, ahead


@triton.jit
def _probs_and_keys(ptr, idx, col_stride, vocab, scale, top, log_sum, UNIT_COL_STRIDE: tl.constexpr):
    """Probabilities, their order keys (float32 bits as int32) and which lanes count, of
    logits idx of one row."""
    return _keys_of(_load_raw(ptr, idx, col_stride, vocab, UNIT_COL_STRIDE), scale, top, log_sum)


@triton.jit
def _exp2(x):
    if _FAST_EXP2:
        return exp2_ftz(x)
    else:
        return tl.exp2(x)


@triton.jit
def _log2_prob(z, scale, top, log_sum):
    """k = log2 p of float32 logits; both engines compute every probability through it."""
    return (z - top) * scale - log_sum


@triton.jit
def _keys_of(raw, scale, top, log_sum):
    """Probabilities p = 2**((z - top) * scale - log_sum) of logits already loaded (input
    dtype), their keys and which lanes count. scale = log2(e) / T; top is the row's largest
    logit and log_sum its base-2 log-sum (`_lse_block`), kept apart: z - top is exact near the
    top (and cannot overflow), so neither huge logits nor huge temperatures lose precision.

    Zero probabilities (masked logits, lanes past the row, results below 2**-126) never exceed
    any value, so they are left out of every count: exactly like the zero padding of the
    shorter vocabulary. The passes that count run only on rows with a finite log-sum-exp, so
    no probability there is NaN.
    """
    z = raw.to(tl.float32)
    p = _exp2(_log2_prob(z, scale, top, log_sum))
    key = p.to(tl.int32, bitcast=True)
    return p, key, key > 0, z


@triton.jit
def _online_lse_update(m, s, x):
    """One step of a per-lane online log-sum-exp, with one exp per element: the smaller of
    the running maximum and x is exponentiated relative to the larger. -inf lanes stay
    (m=-inf, s=0); a NaN x leaves the state alone (NaNs are counted apart)."""
    d = x - m
    e = tl.exp(-tl.abs(d))  # NaN only when both are -inf, or x is NaN
    up = d > 0
    s = tl.where(up, s * e + 1.0, tl.where(d == d, s + e, s))
    return tl.where(up, x, m), s


@triton.jit
def _finish_lse(m, s):
    """Row maximum and log(sum exp(x - maximum)) from the per-lane online state.

    The two are kept apart (log-sum-exp = their sum): adding them in float32 would round at
    the logits' magnitude (half an ulp of 1e4 is 5e-4), and every probability with it.
    """
    row_max = tl.max(m, 0)
    scale = tl.where(m > float("-inf"), tl.exp(m - row_max), 0.0)
    return row_max, tl.log(tl.sum(s * scale, 0))


@triton.jit
def _lse_block(top, total, z, scale):
    """One block of a per-thread online log-sum-exp in base 2. z: [R, 8] float32 logits, a
    row of 8 per thread; top: [R], the largest logit so far; total: [R], the sum of
    2**((z - top) * scale) so far. One exp2 per element plus one per row of 8, where an
    elementwise online update needs compares and selects per element. A NaN logit makes the
    total NaN (that row's loss is NaN); -inf adds 0."""
    new_top = tl.maximum(top, tl.max(z, axis=1))
    safe = tl.where(new_top > float("-inf"), new_top, 0.0)
    total = total * _exp2((top - safe) * scale) + tl.sum(_exp2((z - safe[:, None]) * scale), axis=1)
    return new_top, total


@triton.jit
def _finish_lse2(top, total, scale):
    """A chunk's largest logit and base-2 log-sum from the per-thread states of `_lse_block`."""
    chunk_top = tl.max(top, 0)
    weight = tl.where(top > float("-inf"), _exp2((top - chunk_top) * scale), 0.0)  # NaN totals stay NaN
    return chunk_top, tl.log2(tl.sum(total * weight, 0))


@triton.jit
def _pair_rows(pair, student_ptr, teacher_ptr, student_index_ptr, teacher_index_ptr,
               student_seq_len, student_batch_stride, student_row_stride,
               teacher_seq_len, teacher_batch_stride, teacher_row_stride, GATHER: tl.constexpr):
    """Row indices and row pointers of pair `pair`: row `pair` of both sides, or with GATHER the
    rows the index maps name (a negative student index is padding). Row r of a side sits at
    (r // seq_len) * batch_stride + (r % seq_len) * row_stride."""
    if GATHER:
        s_index = tl.load(student_index_ptr + pair).to(tl.int64)
        t_index = tl.load(teacher_index_ptr + pair).to(tl.int64)
    else:
        s_index = tl.cast(pair, tl.int64)
        t_index = tl.cast(pair, tl.int64)
    s_safe = tl.maximum(s_index, 0)
    t_safe = tl.maximum(t_index, 0)
    s_row = student_ptr + (s_safe // student_seq_len) * student_batch_stride + (
        s_safe % student_seq_len) * student_row_stride
    t_row = teacher_ptr + (t_safe // teacher_seq_len) * teacher_batch_stride + (
        t_safe % teacher_seq_len) * teacher_row_stride
    return s_index, t_index, s_row, t_row


@triton.jit
def _stats_range(s_row, t_row, start, stop, student_vocab, teacher_vocab, student_col_stride,
                 teacher_col_stride, student_scale, teacher_scale,
                 STUDENT_UNIT_STRIDE: tl.constexpr, TEACHER_UNIT_STRIDE: tl.constexpr,
                 SAME_VOCAB: tl.constexpr, HAS_CE: tl.constexpr, BLOCK: tl.constexpr):
    """Statistics of columns [start, stop) of both rows, per thread: base-2 online log-sum-exp
    states (student, teacher and, with HAS_CE, the student's at temperature 1, which shares
    the student's largest logit), the smallest finite logits, and (SAME_VOCAB) how many columns
    differ between the rows.

    Each thread reads a row of 8 consecutive columns per step (one 16-byte load in bf16), so
    the maximum that the online update needs is taken in registers once per 8 elements."""
    ROWS: tl.constexpr = BLOCK // 8
    lanes = tl.arange(0, ROWS)[:, None] * 8 + tl.arange(0, 8)[None, :]
    s_top = tl.full([ROWS], float("-inf"), tl.float32)
    s_total = tl.zeros([ROWS], tl.float32)
    t_top = tl.full([ROWS], float("-inf"), tl.float32)
    t_total = tl.zeros([ROWS], tl.float32)
    c_total = tl.zeros([ROWS], tl.float32)  # cross-entropy: temperature 1
    s_low = tl.full([ROWS], float("inf"), tl.float32)  # smallest finite logit
    t_low = tl.full([ROWS], float("inf"), tl.float32)
    differ = tl.zeros([ROWS], tl.int32)
    for block_start in tl.range(start, stop, BLOCK):
        idx = block_start + lanes
        zs = _load_raw(s_row, idx, student_col_stride, student_vocab, STUDENT_UNIT_STRIDE).to(tl.float32)
        zt = _load_raw(t_row, idx, teacher_col_stride, teacher_vocab, TEACHER_UNIT_STRIDE).to(tl.float32)
        if HAS_CE:
            _same_top, c_total = _lse_block(s_top, c_total, zs, LOG2E)
        s_top, s_total = _lse_block(s_top, s_total, zs, student_scale)
        t_top, t_total = _lse_block(t_top, t_total, zt, teacher_scale)
        s_low = tl.minimum(s_low, tl.min(tl.where(zs > float("-inf"), zs, float("inf")), axis=1))
        t_low = tl.minimum(t_low, tl.min(tl.where(zt > float("-inf"), zt, float("inf")), axis=1))
        if SAME_VOCAB:
            differ += tl.sum((zs != zt).to(tl.int32), axis=1)
    return s_top, s_total, t_top, t_total, c_total, s_low, t_low, differ


@triton.jit
def _tie_signs(d, cs, ct):
    """Average signs of a tie: cs student and ct teacher elements sharing one value.

    d = (#students above the value) - (#teachers above it). The students hold ranks
    A+1..A+cs; a rank k gets +1 where b_(k) < v (k > B + ct) and -1 where b_(k) > v
    (k <= B). Symmetrically for the teachers. Averaging over the group is the mean
    subgradient over all orders of the tie and keeps the loss exact.
    """
    student_plus = tl.minimum(tl.maximum(d + cs - ct, 0), cs)
    student_minus = tl.minimum(tl.maximum(-d, 0), cs)
    teacher_plus = tl.minimum(tl.maximum(d, 0), ct)
    teacher_minus = tl.minimum(tl.maximum(ct - cs - d, 0), ct)
    student_sign = (student_plus - student_minus).to(tl.float32) / tl.maximum(cs, 1).to(tl.float32)
    teacher_sign = (teacher_plus - teacher_minus).to(tl.float32) / tl.maximum(ct, 1).to(tl.float32)
    return student_sign, teacher_sign


@triton.jit
def _clamp_key(key, meta_ptr):
    """The key, clamped into the root's range. The range comes from the pair's extreme logits,
    but a compiled pass may round an element's key differently (a fused multiply-add of
    z * (1 / T) - max where the range used a rounded product): a few ulps past the range. Every
    pass clamps the same way, so such a key lands in the edge bucket consistently; at worst it
    ties with the edge value, a few ulps away."""
    return tl.minimum(tl.maximum(key, tl.load(meta_ptr + _KEY_LO)), tl.load(meta_ptr + _KEY_HI))


@triton.jit
def _walk(key, counted, child_ptr, meta_ptr, depth, MAX_LEVELS: tl.constexpr):
    """Follow each key from the root down `depth` levels or to its resolved bucket.

    Returns the entry where each key stopped and whether it got all the way down. The loop
    is unrolled (levels past `depth` are masked off) so that the pass around it has no inner
    loop and Triton can software-pipeline its row loads. `key` is already clamped
    (`_clamp_key`) by its only caller, `_count_level`, which filters on it first.
    """
    entry = (key >> tl.load(meta_ptr + _SHIFT_OFFSET)) - tl.load(meta_ptr + _ROOT_BASE)
    active = counted
    for level in tl.static_range(1, MAX_LEVELS):
        if level <= depth:
            child = tl.load(child_ptr + entry, mask=active, other=0)
            active = active & (child > 0)
            shift = tl.load(meta_ptr + _SHIFT_OFFSET + level)
            bits = tl.load(meta_ptr + _SHIFT_OFFSET + level - 1) - shift
            digit = (key >> shift) & ((1 << bits) - 1)
            entry = tl.where(active, child + digit, entry)
    return entry, active


@triton.jit
def _walk_sign(key, counted, child_ptr, sign_ptr, meta_ptr, depth, MAX_LEVELS: tl.constexpr,
               USE_PTX: tl.constexpr, NC_SIGNS: tl.constexpr = True):
    """The sign of each key: read at its root bucket, and one level further down only where
    the bucket read is open (its sign is NaN), so that keys decided near the root cost one
    gather. Lanes not counted get 0. USE_PTX: each level is an inline-PTX step that a warp
    with no open lane skips in one branch (kernels/ptx.py: `descend`)."""
    key = _clamp_key(key, meta_ptr)
    entry = (key >> tl.load(meta_ptr + _SHIFT_OFFSET)) - tl.load(meta_ptr + _ROOT_BASE)
    if USE_PTX:
        sign = gather_f32(sign_ptr, entry, counted, NC_SIGNS)
    else:
        sign = tl.load(sign_ptr + entry, mask=counted, other=0.0)
    for level in tl.static_range(1, MAX_LEVELS):
        if level <= depth:
            shift = tl.load(meta_ptr + _SHIFT_OFFSET + level)
            bits = tl.load(meta_ptr + _SHIFT_OFFSET + level - 1) - shift
            if USE_PTX:
                sign, entry = descend(sign, entry, key, child_ptr, sign_ptr, shift, (1 << bits) - 1)
            else:
                descend_mask = counted & (sign != sign)
                child = tl.load(child_ptr + entry, mask=descend_mask, other=0)
                entry = tl.where(descend_mask, child + ((key >> shift) & ((1 << bits) - 1)), entry)
                sign = tl.where(descend_mask, tl.load(sign_ptr + entry, mask=descend_mask, other=0.0), sign)
    return sign

@triton.jit
def _bucket_states(ws_ptr, meta_ptr, level, chunk_start, above, ENTRIES: tl.constexpr,
                   RESOLVE_BLOCK: tl.constexpr):
    """Decide a chunk of the buckets of one level; returns their signs and what is open.

    `above`: the count difference of the level's buckets past this chunk that belong to the
    same node. Only a root wider than a chunk has such buckets (the split engine's 4,096
    bucket root); every deeper node fits inside one chunk, and there it is 0."""
    level_start = tl.load(meta_ptr + level)
    level_end = tl.load(meta_ptr + level + 1)
    node_bits = tl.load(meta_ptr + _SHIFT_OFFSET + level - 1) - tl.load(
        meta_ptr + _SHIFT_OFFSET + level)
    lanes = tl.arange(0, RESOLVE_BLOCK)
    entry = chunk_start + lanes
    in_level = entry < level_end
    student_count = tl.load(ws_ptr + _CNT_S * ENTRIES + entry, mask=in_level, other=0,
                            cache_modifier=".cg")
    teacher_count = tl.load(ws_ptr + _CNT_T * ENTRIES + entry, mask=in_level, other=0,
                            cache_modifier=".cg")
    # D at the top of each bucket: D at the top of its node plus the count difference of
    # the buckets above it in the same node (a segmented suffix sum; nodes never straddle
    # a chunk because chunks start at node boundaries and hold whole nodes).
    diff = student_count - teacher_count
    suffix = tl.cumsum(diff, 0, reverse=True)
    node_first = level_start + (((entry - level_start) >> node_bits) << node_bits)
    next_lane = node_first + (1 << node_bits) - chunk_start
    suffix_next = tl.gather(suffix, tl.minimum(next_lane, RESOLVE_BLOCK - 1), 0)
    suffix_next = tl.where(next_lane < RESOLVE_BLOCK, suffix_next, 0)
    node_top = tl.load(ws_ptr + _NODE_TOP * ENTRIES + node_first, mask=in_level, other=0)
    d = node_top + suffix - diff - suffix_next + above

    decided = (d >= teacher_count) | (d + student_count <= 0)
    student_sign, teacher_sign = _tie_signs(d, student_count, teacher_count)
    width_one = tl.load(meta_ptr + _SHIFT_OFFSET + level) == 0  # one key per bucket: a tie group
    if level == 0:  # the root is a histogram: no key range per bucket
        resolved = decided | width_one
    else:
        s_min = tl.load(ws_ptr + _MIN_S * ENTRIES + entry, mask=in_level, other=0,
                        cache_modifier=".cg")
        s_max = tl.load(ws_ptr + _MAX_S * ENTRIES + entry, mask=in_level, other=0,
                        cache_modifier=".cg")
        t_min = tl.load(ws_ptr + _MIN_T * ENTRIES + entry, mask=in_level, other=0,
                        cache_modifier=".cg")
        t_max = tl.load(ws_ptr + _MAX_T * ENTRIES + entry, mask=in_level, other=0,
                        cache_modifier=".cg")
        single = ((s_min == s_max) | (student_count == 0)) & ((t_min == t_max) | (teacher_count == 0))
        both = single & (student_count > 0) & (teacher_count > 0)
        # One student value above one teacher value: two tie groups in that order.
        s_above = both & (s_max > t_max)
        gs_above, _unused = _tie_signs(d, student_count, 0)
        _unused2, gt_below = _tie_signs(d + student_count, 0, teacher_count)
        t_above = both & (s_max < t_max)
        _unused3, gt_above = _tie_signs(d, 0, teacher_count)
        gs_below, _unused4 = _tie_signs(d - teacher_count, student_count, 0)
        student_sign = tl.where(s_above, gs_above, tl.where(t_above, gs_below, student_sign))
        teacher_sign = tl.where(s_above, gt_below, tl.where(t_above, gt_above, teacher_sign))
        resolved = decided | single | width_one
    open_bucket = in_level & (~resolved) & (student_count + teacher_count > 0)
    return entry, in_level, d, student_sign, teacher_sign, open_bucket


@triton.jit
def _count_difference(ws_ptr, chunk_start, level_end, ENTRIES: tl.constexpr, RESOLVE_BLOCK: tl.constexpr):
    """Student minus teacher count of each bucket in a chunk of a level (0 past its end)."""
    entry = chunk_start + tl.arange(0, RESOLVE_BLOCK)
    in_level = entry < level_end
    student_count = tl.load(ws_ptr + _CNT_S * ENTRIES + entry, mask=in_level, other=0, cache_modifier=".cg")
    teacher_count = tl.load(ws_ptr + _CNT_T * ENTRIES + entry, mask=in_level, other=0, cache_modifier=".cg")
    return student_count - teacher_count


@triton.jit
def _resolve_level(ws_ptr, sign_ptr, meta_ptr, level, mass_ptr, row_mass_ptr, ENTRIES: tl.constexpr,
                   RESOLVE_BLOCK: tl.constexpr, MAX_LEVELS: tl.constexpr, MASS_SPAN: tl.constexpr,
                   LEVEL_CAP: tl.constexpr, SMEM_CAP: tl.constexpr = 0):
    """Sign every bucket of `level`; give each open bucket a child node on `level + 1`.

    Returns the number of open buckets, or -1 when the workspace or the depth ran out.
    Buckets below the root also hold their probability mass (int64 sums of p * 2**52,
    student at mass_ptr + entry, teacher at mass_ptr + MASS_SPAN + entry; the root has none),
    and the signed mass of every such bucket resolved here, sum sign * mass per side, is added
    to row_mass_ptr[0:2] (float64, units of 2**-52): the part of the loss that the level-1
    pass could not sum, because the root left those elements open.

    SMEM_CAP (the trie fallback's root): where at least one bit per open bucket fits, the
    child nodes take at most SMEM_CAP entries, so that level 1 is counted in shared memory
    (`uld_split._count_level_both`); fewer child bits cost nothing there, as the level's
    buckets that hold one value per side are resolved whatever their width.
    """
    level_start = tl.load(meta_ptr + level)
    level_end = tl.load(meta_ptr + level + 1)
    shift = tl.load(meta_ptr + _SHIFT_OFFSET + level)
    # A root node wider than RESOLVE_BLOCK spans chunks: carry the count difference of the
    # chunks above each chunk (level_total minus what the chunks up to this one hold).
    level_total = 0
    if level == 0:
        for chunk_start in range(level_start, level_end, RESOLVE_BLOCK):
            level_total += tl.sum(_count_difference(ws_ptr, chunk_start, level_end, ENTRIES, RESOLVE_BLOCK), 0)
    below = 0
    open_total = 0
    for chunk_start in range(level_start, level_end, RESOLVE_BLOCK):
        below += tl.sum(_count_difference(ws_ptr, chunk_start, level_end, ENTRIES, RESOLVE_BLOCK), 0)
        _e, _i, _d, _gs, _gt, open_bucket = _bucket_states(
            ws_ptr, meta_ptr, level, chunk_start, tl.where(level == 0, level_total - below, 0),
            ENTRIES, RESOLVE_BLOCK)
        open_total += tl.sum(open_bucket.to(tl.int32), 0)
    # Child nodes split the next `child_bits` bits (up to 8: every level costs a pass over
    # the rows, so as few levels as possible); spend at most half of the free entries on
    # this level so that deeper levels still find room, and past _MIN_CHILD_BITS at most
    # LEVEL_CAP entries: every fresh entry is zeroed and resolved by one program of the pair
    # (at 16,384 entries, 8 bits for a handful of open root buckets cost more than the deeper
    # levels they might save: bench/NOTES.md, fifth session).
    child_bits = 0
    half_free = (ENTRIES - level_end) // 2
    if SMEM_CAP > 0:
        fits = open_total * 2 <= SMEM_CAP
    else:
        fits = open_total < 0  # false
    if open_total > 0:
        while (child_bits < _MAX_CHILD_BITS) & (child_bits < shift) & (
                (open_total << (child_bits + 1)) <= half_free) & (
                (child_bits < _MIN_CHILD_BITS) | ((open_total << (child_bits + 1)) <= LEVEL_CAP)) & (
                (~fits) | ((open_total << (child_bits + 1)) <= SMEM_CAP)):
            child_bits += 1
    status = open_total
    if open_total > 0:
        if (child_bits == 0) | (level + 1 >= MAX_LEVELS):
            status = -1
    child_size = 1 << child_bits
    next_end = level_end
    if status > 0:
        next_end = level_end + open_total * child_size
        # Fresh child nodes: empty counts, no keys seen yet.
        for zero_start in range(level_end, next_end, RESOLVE_BLOCK):
            entry = zero_start + tl.arange(0, RESOLVE_BLOCK)
            fresh = entry < next_end
            zeros = tl.zeros([RESOLVE_BLOCK], tl.int32)
            tl.store(ws_ptr + _CNT_S * ENTRIES + entry, zeros, mask=fresh)
            tl.store(ws_ptr + _CNT_T * ENTRIES + entry, zeros, mask=fresh)
            tl.store(ws_ptr + _MIN_S * ENTRIES + entry, zeros + _KEY_NONE_MIN, mask=fresh)
            tl.store(ws_ptr + _MAX_S * ENTRIES + entry, zeros + _KEY_NONE_MAX, mask=fresh)
            tl.store(ws_ptr + _MIN_T * ENTRIES + entry, zeros + _KEY_NONE_MIN, mask=fresh)
            tl.store(ws_ptr + _MAX_T * ENTRIES + entry, zeros + _KEY_NONE_MAX, mask=fresh)
            tl.store(ws_ptr + _CHILD * ENTRIES + entry, zeros, mask=fresh)
            tl.store(mass_ptr + entry, zeros.to(tl.int64), mask=fresh)
            tl.store(mass_ptr + MASS_SPAN + entry, zeros.to(tl.int64), mask=fresh)
        tl.store(meta_ptr + level + 2, next_end)
        tl.store(meta_ptr + _SHIFT_OFFSET + level + 1, shift - child_bits)
    opened = 0
    below = 0
    student_acc = tl.zeros([1], tl.float64).sum(0)
    teacher_acc = tl.zeros([1], tl.float64).sum(0)
    for chunk_start in range(level_start, level_end, RESOLVE_BLOCK):
        below += tl.sum(_count_difference(ws_ptr, chunk_start, level_end, ENTRIES, RESOLVE_BLOCK), 0)
        entry, in_level, d, student_sign, teacher_sign, open_bucket = _bucket_states(
            ws_ptr, meta_ptr, level, chunk_start, tl.where(level == 0, level_total - below, 0),
            ENTRIES, RESOLVE_BLOCK)
        is_open = (open_bucket & (status > 0)).to(tl.int32)
        # An open bucket's sign is NaN: `_walk_sign` descends only where it reads one.
        tl.store(sign_ptr + entry, tl.where(is_open > 0, float("nan"), student_sign), mask=in_level)
        tl.store(sign_ptr + ENTRIES + entry, tl.where(is_open > 0, float("nan"), teacher_sign), mask=in_level)
        rank = opened + tl.cumsum(is_open, 0) - is_open
        child = level_end + rank * child_size
        tl.store(ws_ptr + _CHILD * ENTRIES + entry, tl.where(is_open > 0, child, 0), mask=in_level)
        tl.store(ws_ptr + _NODE_TOP * ENTRIES + child, d, mask=is_open > 0)
        opened += tl.sum(is_open, 0)
        resolved = in_level & (is_open == 0) & (level > 0)
        student_mass = tl.load(mass_ptr + entry, mask=resolved, other=0, cache_modifier=".cg")
        teacher_mass = tl.load(mass_ptr + MASS_SPAN + entry, mask=resolved, other=0, cache_modifier=".cg")
        student_acc += tl.sum(tl.where(resolved, student_sign.to(tl.float64) * student_mass.to(tl.float64), 0.0), 0)
        teacher_acc += tl.sum(tl.where(resolved, teacher_sign.to(tl.float64) * teacher_mass.to(tl.float64), 0.0), 0)
    if level > 0:
        tl.store(row_mass_ptr, tl.load(row_mass_ptr) + student_acc)
        tl.store(row_mass_ptr + 1, tl.load(row_mass_ptr + 1) + teacher_acc)
    return status


@triton.jit
def _count_level(row_ptr, col_stride, scale, top, log_sum, ws_ptr, sign_ptr, mass_ptr,
                 meta_ptr, level, start, stop, key_lo, key_hi, count,
                 CNT: tl.constexpr, KEY_MIN: tl.constexpr, KEY_MAX: tl.constexpr,
                 ENTRIES: tl.constexpr, BLOCK: tl.constexpr, UNIT_COL_STRIDE: tl.constexpr,
                 STAGES: tl.constexpr, MAX_LEVELS: tl.constexpr, LOSS: tl.constexpr,
                 USE_PTX: tl.constexpr, PREFETCH: tl.constexpr, NC_SIGNS: tl.constexpr = True,
                 SMEM_L1: tl.constexpr = False, l1_table=0, l1_start=0,
                 LIST: tl.constexpr = False, list_ptr=0, listed_ptr=0, list_cap=0):
    """One pass over columns [start, stop) of a row. Where `count`: count (and sum the mass of)
    its keys that reach the open buckets of `level`. With LOSS (level 1): also return
    sum p * sign over the elements that the root decided, reading each sign at its root
    bucket; the open root buckets' signs are NaN, and exactly their elements walk down.
    Without LOSS, keys outside [key_lo, key_hi] (a range known to hold every open bucket) skip
    the walk: no gathers, no atomics. USE_PTX (GPU): the reductions as inline PTX, which keep
    the row loads' layout and branch around lanes that reach nothing (kernels/ptx.py), and the
    root signs gathered through the read-only path unless NC_SIGNS is off (a launch that
    writes the sign tables it reads: `uld_split.fallback_kernel`). SMEM_L1 (LOSS, USE_PTX): level
    1 is counted into the shared table at `l1_table` (kernels/ptx.py, L1_CAP) instead, bucket
    = entry - l1_start. LIST (without LOSS): the columns that reach the level's open buckets are
    also appended to the list at `list_ptr` (the int32 at `listed_ptr` counts them; those past
    `list_cap` are counted, not stored), for `_count_listed` to count the levels below from;
    LIST == 2 with USE_PTX: appended by inline PTX (`ptx.list_append`), which keeps the row's
    layout where Triton's atomic converts the lanes' mask through shared memory."""
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    root_shift = tl.load(meta_ptr + _SHIFT_OFFSET)
    root_base = tl.load(meta_ptr + _ROOT_BASE)
    level_shift = tl.load(meta_ptr + _SHIFT_OFFSET + 1)  # level 1's digit (LOSS and USE_PTX)
    digit_mask = (1 << (root_shift - level_shift)) - 1
    ahead = _first_block(row_ptr, start + lanes, col_stride, stop, UNIT_COL_STRIDE, PREFETCH)
    for block_start in tl.range(start, stop, BLOCK, num_stages=STAGES):
        idx = block_start + lanes
        p, key, counted, _z, ahead = _block_keys(ahead, row_ptr, idx, col_stride, stop, scale,
                                                  top, log_sum, BLOCK, UNIT_COL_STRIDE, PREFETCH)
        key = _clamp_key(key, meta_ptr)
        if LOSS:
            root_entry = (key >> root_shift) - root_base
            if USE_PTX:  # the root's signs do not change during this pass
                sign = gather_f32(sign_ptr, root_entry, counted, NC_SIGNS)
            else:
                sign = tl.load(sign_ptr + root_entry, mask=counted, other=0.0)
            decided = sign == sign
            acc += tl.where(decided, p * sign, 0.0)
            walking = counted & (~decided)
        else:
            walking = counted & (key >= key_lo) & (key <= key_hi)
        if LOSS and USE_PTX:
            # Level 1: an open root bucket (NaN sign) exists only while the root is being
            # counted below (`count`), so `walking` alone says which lanes step and count.
            if SMEM_L1:
                step_and_count_smem(walking, root_entry, key, p, ws_ptr + _CHILD * ENTRIES, level_shift, digit_mask,
                                    l1_table, l1_start)
            else:
                step_and_count(walking, root_entry, key, p, ws_ptr + _CHILD * ENTRIES, ws_ptr + CNT * ENTRIES,
                               ws_ptr + KEY_MIN * ENTRIES, ws_ptr + KEY_MAX * ENTRIES, mass_ptr, level_shift,
                               digit_mask)
        elif count:
            entry, reached = _walk(key, walking, ws_ptr + _CHILD * ENTRIES, meta_ptr, level, MAX_LEVELS)
            _count_reached(reached, entry, key, p, ws_ptr, mass_ptr, CNT, KEY_MIN, KEY_MAX, ENTRIES, USE_PTX)
            if LIST:  # one relaxed atomic per reaching lane: few lanes reach the levels below 1
                if USE_PTX and LIST == 2:
                    list_append(reached, idx, listed_ptr, list_ptr, list_cap)
                else:
                    at = tl.atomic_add(listed_ptr + lanes * 0, 1, mask=reached, sem="relaxed")
                    tl.store(list_ptr + at, idx, mask=reached & (at < list_cap))
    return tl.sum(acc, 0)


@triton.jit
def _count_reached(reached, entry, key, p, ws_ptr, mass_ptr, CNT: tl.constexpr, KEY_MIN: tl.constexpr,
                   KEY_MAX: tl.constexpr, ENTRIES: tl.constexpr, USE_PTX: tl.constexpr):
    """Where `reached`: at bucket `entry`, count += 1, key-min / key-max with `key`, mass +=
    trunc(p * 2**52), by relaxed reductions (integers: the result does not depend on their
    order)."""
    if USE_PTX:
        count_key(reached, entry, key, p, ws_ptr + CNT * ENTRIES, ws_ptr + KEY_MIN * ENTRIES,
                  ws_ptr + KEY_MAX * ENTRIES, mass_ptr)
    else:
        tl.atomic_add(ws_ptr + CNT * ENTRIES + entry, 1, mask=reached, sem="relaxed")
        tl.atomic_min(ws_ptr + KEY_MIN * ENTRIES + entry, key, mask=reached, sem="relaxed")
        tl.atomic_max(ws_ptr + KEY_MAX * ENTRIES + entry, key, mask=reached, sem="relaxed")
        tl.atomic_add(mass_ptr + entry, (p * MASS_SCALE).to(tl.int64), mask=reached, sem="relaxed")


@triton.jit
def _count_listed(row_ptr, col_stride, vocab, scale, top, log_sum, ws_ptr, mass_ptr, meta_ptr, level, key_lo,
                  key_hi, list_ptr, n_listed, CNT: tl.constexpr, KEY_MIN: tl.constexpr, KEY_MAX: tl.constexpr,
                  ENTRIES: tl.constexpr, BLOCK: tl.constexpr, UNIT_COL_STRIDE: tl.constexpr,
                  MAX_LEVELS: tl.constexpr, USE_PTX: tl.constexpr):
    """`_count_level`'s count (without LOSS) of `level` over the `n_listed` columns listed at
    `list_ptr` only: a level above listed every column that reached its open buckets, and a
    key reaches an open bucket of this level only through one of those. The same keys
    (`_probs_and_keys`), filter and walk as the pass over the whole row, so the same counts;
    a level of a few listed columns costs a few gathers instead of a read of the row."""
    lanes = tl.arange(0, BLOCK)
    for first in range(0, n_listed, BLOCK):
        listed = first + lanes < n_listed
        idx = tl.load(list_ptr + first + lanes, mask=listed, other=vocab)  # past the row: not counted
        p, key, counted, _z = _probs_and_keys(row_ptr, idx, col_stride, vocab, scale, top, log_sum,
                                              UNIT_COL_STRIDE)
        key = _clamp_key(key, meta_ptr)
        walking = counted & (key >= key_lo) & (key <= key_hi)
        entry, reached = _walk(key, walking, ws_ptr + _CHILD * ENTRIES, meta_ptr, level, MAX_LEVELS)
        _count_reached(reached, entry, key, p, ws_ptr, mass_ptr, CNT, KEY_MIN, KEY_MAX, ENTRIES, USE_PTX)


@triton.jit
def _write_grad(row_ptr, col_stride, inv_temperature, scale, top, log_sum, ws_ptr, sign_ptr,
                meta_ptr, depth, start, stop, signed_mass, factor, grad_ptr, ce_top, ce_log_sum, ce_label, ce_factor,
                ENTRIES: tl.constexpr, BLOCK: tl.constexpr, UNIT_COL_STRIDE: tl.constexpr,
                STAGES: tl.constexpr, MAX_LEVELS: tl.constexpr, HAS_CE: tl.constexpr,
                USE_PTX: tl.constexpr, PREFETCH: tl.constexpr, NC_SIGNS: tl.constexpr = True):
    """grad_i = factor * (p_i / T) * (sign_i - signed_mass): the softmax backward of signs,
    plus, with HAS_CE, ce_factor * (softmax(z)_i - [i == ce_label]): the cross-entropy's.
    Columns [start, stop)."""
    lanes = tl.arange(0, BLOCK)
    ahead = _first_block(row_ptr, start + lanes, col_stride, stop, UNIT_COL_STRIDE, PREFETCH)
    for block_start in tl.range(start, stop, BLOCK, num_stages=STAGES):
        idx = block_start + lanes
        p, key, counted, z, ahead = _block_keys(ahead, row_ptr, idx, col_stride, stop, scale,
                                                top, log_sum, BLOCK, UNIT_COL_STRIDE, PREFETCH)
        sign = _walk_sign(key, counted, ws_ptr + _CHILD * ENTRIES, sign_ptr, meta_ptr, depth, MAX_LEVELS,
                          USE_PTX, NC_SIGNS)
        grad = factor * (p * inv_temperature) * (sign - signed_mass)
        if HAS_CE:  # ce_top, ce_log_sum: the base-2 statistics of the row at temperature 1
            grad += ce_factor * (_exp2((z - ce_top) * LOG2E - ce_log_sum) - (idx == ce_label).to(tl.float32))
        tl.store(grad_ptr + idx, grad.to(grad_ptr.dtype.element_ty), mask=idx < stop)


@triton.jit
def zero_rows_kernel(grad_ptr, written_ptr, n_rows, rows_per_program, used, width, BLOCK: tl.constexpr,
                     ROWS: tl.constexpr):
    """Zeroes what no kernel writes in a [rows, width] gradient: all of row r where
    written[r] is 0, and the columns past `used` (padded lm_head columns) where it is 1.
    Persistent (launch._row_grid): program (i, j) takes rows [i * rows_per_program, ...) and,
    in a row to zero, its blocks j, j + num_programs(1), ... It reads the flags of ROWS rows
    at a time and skips them in one step when all are written and no column is padding (the
    usual case: a few hundred programs, a few loads each)."""
    zeros = tl.zeros([BLOCK], grad_ptr.dtype.element_ty)
    first = tl.program_id(0) * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, last, ROWS):
        rows = start + tl.arange(0, ROWS)
        flags = tl.load(written_ptr + rows, mask=rows < last, other=1).to(tl.int32)
        if (tl.min(flags) == 0) | (used < width):
            for row in range(start, tl.minimum(start + ROWS, last)):
                base = grad_ptr + tl.cast(row, tl.int64) * width
                if tl.load(written_ptr + row) == 0:
                    for block_start in range(tl.program_id(1) * BLOCK, width, tl.num_programs(1) * BLOCK):
                        idx = block_start + tl.arange(0, BLOCK)
                        tl.store(base + idx, zeros, mask=idx < width)
                elif tl.program_id(1) == 0:
                    for block_start in range(used, width, BLOCK):  # a few hundred columns at most
                        idx = block_start + tl.arange(0, BLOCK)
                        tl.store(base + idx, zeros, mask=idx < width)


@triton.jit
def scale_rows_kernel(grad_ptr, scale_ptr, n_rows, rows_per_program, vocab, SCALE_PER_ROW: tl.constexpr,
                      BLOCK: tl.constexpr):
    """grad[row, :] *= scale (one scalar or one per row). Persistent (launch._row_grid):
    program (i, j) takes rows [i * rows_per_program, ...) and, in each, the blocks j, j +
    num_programs(1), ... Rows whose scale is exactly 1 are left alone, so the usual
    loss.backward() (a scalar 1) costs each of a few hundred programs one load."""
    scale = tl.load(scale_ptr).to(tl.float32)
    if SCALE_PER_ROW or scale != 1.0:
        first = tl.program_id(0) * rows_per_program
        for row in range(first, tl.minimum(first + rows_per_program, n_rows)):
            if SCALE_PER_ROW:
                scale = tl.load(scale_ptr + row).to(tl.float32)
            if scale != 1.0:
                base = grad_ptr + tl.cast(row, tl.int64) * vocab
                for block_start in range(tl.program_id(1) * BLOCK, vocab, tl.num_programs(1) * BLOCK):
                    idx = block_start + tl.arange(0, BLOCK)
                    g = tl.load(base + idx, mask=idx < vocab)
                    tl.store(base + idx, (g.to(tl.float32) * scale).to(g.dtype), mask=idx < vocab)
