"""Triton kernels of the truncated loss (``top_k``; uld_kernels/topk.py holds the math).

A row's loss over its first ``k`` ranks needs each side's ``k`` largest probabilities in
order, and its gradient needs their columns. Both come from a radix select over the order key
of each logit (its float32 bits, negatives' magnitude bits flipped: the key's signed order is
the logits' order), one program per pair of rows:

1. one pass per side: the row's largest logit and a histogram of the key's top ``BITS1``
   bits; the bin holding rank ``k`` is read off the histogram;
2. one pass per further level: the histogram of the next bits inside that bin, until every
   significant bit of the ``k``-th largest logit is known (float32: 13 + 13 + 6 bits,
   bfloat16: 13 + 3, float16: 13 + 6; the launcher's ``topk_level_bits``), counted in
   shared memory on the GPU (kernels/ptx.py);
3. one pass that collects the logits at or above that bin (at most ``SORT_CAP``) as
   ``key << 32 | column`` into a scratch row, and sums ``exp((z - max) / T)`` of the others
   (with that of the logits taken, after the sort, the row's log-sum: one exp a logit). Each
   warp's columns (a run) go to the warp's own region of the scratch row, so a step needs no
   other warp's count and no barrier; a run past its region (half of what is sorted), or a
   last bin of equal logits past ``SORT_CAP``, has the row collected again in column order
   (prefix sums across the warps), up to rank ``k``. Which columns a warp holds is the
   compiler's layout (float32 and bf16 rows differ), so which rows fall back does too.
   Sorted, the keys give the side's first ``k`` probabilities in order and their columns
   (ties: the larger column first, like any sort's choice a valid member of the tied group).

Before these passes, a guess (``SAMPLE`` blocks spread over the row, or one block in four of a
shorter row, at least two: rows of 8 blocks and more; `_sample_threshold`): the bin of rank
``2 k S / V`` of the sample's histogram (S logits sampled), and the collect pass of step 3 with
that bin. Where it took at least ``k`` logits and at most ``SORT_CAP`` (most rows: ~2k are
aimed at), they hold the first ``k`` and the row is read once; otherwise steps 1-3 follow.

Where the first level's bin of rank ``k`` and the bins above it hold at most ``SORT_CAP``
logits (most rows: a bin is 1/16 of an octave), step 2 is skipped: the collect pass takes
them all and the sort picks the first ``k``.

Then the rank signs ``s = sign(a - b)``, the loss ``sum |a - b|``, and what the backward needs
per side: the row's largest logit and log-sum (the log-sum-exp of z / T is their ``top / T +
log_sum``, kept apart), ``g - mass`` for each sign
(``mass = sum g p``, see `_gradient_factors`) and the ``k`` columns with their signs ``g``
(``s`` for the student, ``-s`` for the teacher).

The backward, one program per row of one side, writes ``up / T * p * (g - mass)``: a pass over
the row with ``g = 0``, then, after a barrier, the ``k`` columns again with their sign. The
rows' passes read a row of 300 KB several times: one program per pair keeps it in L2.
"""

import triton
import triton.language as tl

from uld_kernels.kernels.const import const
from uld_kernels.kernels.ptx import (exp2_ftz, scatter_i64, smem_add_one, smem_add_one_sparse, smem_append_key, smem_clear,
                                     smem_load, smem_zero)
from uld_kernels.kernels.uld_rows import _block_raw, _first_block, _load_logits, _pair_rows

_PACKED_NONE = const(-9223372036854775808)  # sorts below every packed key
STATS = const(5)  # saved floats a row and side: maximum, log-sum, g - mass for g = 0, +1, -1
SAMPLE_RANKS = const(2)  # the sample's guess aims at this many times k logits of the row


@triton.jit
def _order_key(z):
    """int32 whose signed order is the float32 order of z (NaN above +inf, -NaN below -inf)."""
    bits = z.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _from_order_key(key):
    """The float32 of an order key (the map is its own inverse)."""
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _high_bits(z, RESOLVED):
    """The top RESOLVED bits of z's key as an unsigned number (unsigned order = z's order)."""
    unsigned = _order_key(z).to(tl.uint32, bitcast=True) ^ 0x80000000
    return unsigned >> (32 - RESOLVED)


@triton.jit
def _lowest_key(prefix, resolved):
    """The signed order key (`_order_key`) of the lowest logit whose top ``resolved`` bits are
    ``prefix``: a key at or past it is in that bin or above."""
    return ((prefix << (32 - resolved)) ^ 0x80000000).to(tl.int32, bitcast=True)


@triton.jit
def _prob(z, inv_t, top, log_sum):
    """softmax(z / T) of logits z given the row's largest logit ``top`` and log-sum (kept
    apart), as ``exp((z - top) / T - log_sum)``: z - top is exact near the top (like the exact
    engine's `uld_rows._keys_of`). ``z / T - top / T`` was not: the GPU fuses it into one FMA,
    whose exact product minus top / T's rounded one left the largest logit ``exp(+-ulp(top /
    T))`` instead of 1 where that ulp is not small (T = 1e-37: NaN; this session's run 3)."""
    return tl.exp((z - top) * inv_t - log_sum)


@triton.jit
def _rest_weight(z, inv_t, ref, FTZ: tl.constexpr):
    """exp((z - ref) / T), the unnormalised probability of a logit not taken (ref a logit at
    least z: every weight at most 1; the collect pass sums them, scaled and divided by the
    row's sum after the sort): a subtraction, a product and, with FTZ (the GPU), one
    `ex2.approx.ftz` (subnormal results 0: less than V 2**-126 of exp(ref / T) in all), where
    `tl.exp` rescales subnormals."""
    t = (z - ref) * (inv_t * 1.4426950408889634)
    if FTZ:
        return exp2_ftz(t)
    else:
        return tl.exp2(t)


@triton.jit
def _count(hist, bins, counted, BITS: tl.constexpr, SMEM: tl.constexpr, SPARSE: tl.constexpr = False):
    """Adds the counted lanes' bins to the histogram: in the shared array (inline PTX, one
    `red.shared` an element, predicated off for the others where few count: SPARSE; `hist`
    stays zeros) with SMEM, else `tl.histogram`, whose ballots cost 8.9 ms a pass over 16,384
    rows of 151,936 at 256 bins and 85 ms at 2,048 (H200, run 5: a plain pass is 1.4 ms)."""
    if SMEM:
        if SPARSE:
            smem_add_one_sparse(bins, counted)
        else:
            smem_add_one(bins, counted)
    else:
        hist += tl.histogram(bins, 1 << BITS, mask=counted)
    return hist


@triton.jit
def _pick(hist, above, k_side):
    """In a run of bins in ascending key order, with ``above`` elements above all of them: the
    bin holding rank ``k_side`` (-1: none of them), the elements above it, and in it."""
    bins = tl.arange(0, hist.shape[0])
    at_or_above = above + tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
    pick = tl.max(tl.where(at_or_above >= k_side, bins, -1), 0)
    return pick, above + tl.sum(tl.where(bins > pick, hist, 0), 0), tl.sum(tl.where(bins == pick, hist, 0), 0)


@triton.jit
def _select_bin(hist, prefix, above, k_side, BITS: tl.constexpr, SMEM: tl.constexpr, CHUNK: tl.constexpr):
    """The bin of rank ``k_side`` among the candidates that `_count` counted by their next BITS
    bits, given ``above`` elements above every candidate: the prefix extended by it, and the
    elements above that bin and in it. With SMEM the counts are in the shared array, read
    CHUNK bins at a time from the top until the bin is found (all 8,192 at once held them in
    registers several times over), and then zeroed for the next histogram; a level of fewer
    bins is read whole."""
    if SMEM:
        WIDTH: tl.constexpr = CHUNK if CHUNK < (1 << BITS) else (1 << BITS)
        tl.debug_barrier()
        bins = tl.arange(0, WIDTH)
        pick = tl.full([], -1, tl.int32)
        new_above = above
        in_bin = tl.zeros([], tl.int32)
        first = tl.full([], 1 << BITS, tl.int32)
        while (pick < 0) & (first > 0):  # from the top, until the bin of rank k_side
            first -= WIDTH
            counts = smem_load(first + bins)
            here, new_above, in_bin = _pick(counts, above, k_side)
            pick = tl.where(here >= 0, first + here, -1)
            above += tl.sum(counts, 0)
        tl.debug_barrier()
        smem_clear()
        tl.debug_barrier()
    else:
        pick, new_above, in_bin = _pick(hist, above, k_side)
    return (prefix << BITS) | pick.to(tl.uint32), new_above, in_bin


@triton.jit
def _refine(row, vocab, col_stride, prefix, above, k_side, RESOLVED: tl.constexpr, BITS: tl.constexpr,
            UNIT_COL_STRIDE: tl.constexpr, BLOCK: tl.constexpr, SMEM: tl.constexpr, CHUNK: tl.constexpr):
    """One level of the select: the histogram of the next BITS bits of the logits whose top
    RESOLVED bits are ``prefix``, and the bin of rank ``k_side`` among it (`_select_bin`)."""
    lanes = tl.arange(0, BLOCK)
    hist = tl.zeros([1 << BITS], tl.int32)
    for start in tl.range(0, vocab, BLOCK):
        z, in_row = _load_logits(row, start + lanes, col_stride, vocab, UNIT_COL_STRIDE)
        bits = _high_bits(z, RESOLVED + BITS)
        candidate = in_row & ((bits >> BITS) == prefix)
        hist = _count(hist, (bits & ((1 << BITS) - 1)).to(tl.int32), candidate, BITS, SMEM, SPARSE=True)
    return _select_bin(hist, prefix, above, k_side, BITS, SMEM, CHUNK)


@triton.jit
def _packed(z, idx):
    """The sort's key of logit z at column idx: its order key above the column."""
    return (_order_key(z).to(tl.int64) << 32) | idx.to(tl.int64)


@triton.jit
def _store_keys(scratch, at, keys, mask, SMEM: tl.constexpr):
    """scratch[at] = keys where mask. On the GPU (SMEM) in inline PTX, in the keys' layout:
    `tl.store`'s own layout for gathered addresses (one element a thread) would move the
    pointers, keys and mask through shared memory, with barriers, at every step."""
    if SMEM:
        scatter_i64(scratch, at, keys, mask)
    else:
        tl.store(scratch + at, keys, mask=mask)


@triton.jit
def _collect_by_run(row, vocab, col_stride, inv_t, ref, prefix, resolved, scratch,
                    UNIT_COL_STRIDE: tl.constexpr, BLOCK: tl.constexpr, RUNS: tl.constexpr, REGION: tl.constexpr,
                    SMEM: tl.constexpr, PREFETCH: tl.constexpr):
    """The logits whose top ``resolved`` bits are ``prefix`` or above, packed (`_packed`) into
    the scratch row, run r's in the region ``[r REGION, (r + 1) REGION)``, and the sum of
    `_rest_weight` over the logits not taken. Returns each run's count ``[RUNS]`` (past REGION:
    the rest not stored) and that sum.

    On the GPU (SMEM) a run is whatever columns the layout gives a warp: its lanes take slots
    from the warp's counter in shared memory (`ptx.smem_append_key`, zero from the last bin
    search), and a warp where no lane takes (almost all) skips it in one branch; the slots'
    order varies, the sort's does not. Elsewhere (the interpreter) run r is the columns
    ``[r RUN, (r + 1) RUN)`` of each step, counting by its own prefix sums."""
    RUN: tl.constexpr = BLOCK // RUNS
    runs = tl.arange(0, RUNS)
    columns = runs[:, None] * RUN + tl.arange(0, RUN)[None, :]
    filled = tl.zeros([RUNS], tl.int32)
    rest = tl.zeros([RUNS, RUN], tl.float32)
    lowest = _lowest_key(prefix, resolved)
    ahead = _first_block(row, columns, col_stride, vocab, UNIT_COL_STRIDE, PREFETCH)
    for start in tl.range(0, vocab, BLOCK):
        idx = start + columns
        raw, ahead = _block_raw(ahead, row, idx, col_stride, vocab, BLOCK, UNIT_COL_STRIDE, PREFETCH)
        z, in_row = raw.to(tl.float32), idx < vocab
        key = _order_key(z)
        take = in_row & (key >= lowest)
        # (past the row z = -inf: a weight of 0, or NaN where the row's maximum is -inf and its loss NaN)
        rest += tl.where(take, 0.0, _rest_weight(z, inv_t, ref, SMEM))
        if SMEM:
            smem_append_key(take, idx, key, scratch, REGION)
        else:
            at = filled[:, None] + tl.cumsum(take.to(tl.int32), 1) - 1
            tl.store(scratch + runs[:, None] * REGION + at, _packed(z, idx), mask=take & (at < REGION))
            filled += tl.sum(take.to(tl.int32), 1)
    if SMEM:
        tl.debug_barrier()  # every lane's slot taken
        filled = smem_load(runs)
        tl.debug_barrier()
        smem_clear()  # (the next histogram starts from zeros)
        tl.debug_barrier()  # (after a refused guess, pass 1 counts next: helper-44's review)
    return filled, tl.sum(tl.sum(rest, 1), 0)


@triton.jit
def _region_slots(filled, slots, REGION: tl.constexpr):
    """Where sort slot s finds `_collect_by_run`'s keys (the runs' regions read one after
    another, each its count long), and their number."""
    counts = tl.minimum(filled, REGION)
    ends = tl.cumsum(counts, 0)
    starts = ends - counts
    runs = tl.arange(0, filled.shape[0])
    run_of = tl.sum((slots[:, None] >= ends[None, :]).to(tl.int32), 1)
    start_of = tl.sum(tl.where(run_of[:, None] == runs[None, :], starts[None, :], 0), 1)
    taken = tl.sum(counts, 0)
    return tl.where(slots < taken, run_of * REGION + slots - start_of, 0), taken


@triton.jit
def _collect_in_order(row, vocab, col_stride, inv_t, ref, prefix, resolved, need, scratch,
                      UNIT_COL_STRIDE: tl.constexpr, BLOCK: tl.constexpr, SMEM: tl.constexpr):
    """The logits whose top ``resolved`` bits are above ``prefix`` and the first ``need`` of
    those equal to it, in column order, packed into the scratch row's first slots (prefix sums
    over each step: two scans and three sums, each through shared memory across the warps).
    Returns their number and the sum of `_rest_weight` over the logits not taken."""
    lanes = tl.arange(0, BLOCK)
    taken = tl.zeros([], tl.int32)
    ties = tl.zeros([], tl.int32)
    rest = tl.zeros([], tl.float32)
    for start in tl.range(0, vocab, BLOCK):
        idx = start + lanes
        z, in_row = _load_logits(row, idx, col_stride, vocab, UNIT_COL_STRIDE)
        bits = _high_bits(z, resolved)
        equal = in_row & (bits == prefix)
        take = (in_row & (bits > prefix)) | (equal & (ties + tl.cumsum(equal.to(tl.int32), 0) <= need))
        at = taken + tl.cumsum(take.to(tl.int32), 0) - 1
        _store_keys(scratch, at, _packed(z, idx), take, SMEM)
        rest += tl.sum(tl.where(take | ~in_row, 0.0, _rest_weight(z, inv_t, ref, SMEM)), 0)
        taken += tl.sum(take.to(tl.int32), 0)
        ties += tl.sum(equal.to(tl.int32), 0)
    return taken, rest


@triton.jit
def _sample_threshold(row, vocab, col_stride, k_side, BITS1: tl.constexpr, UNIT_COL_STRIDE: tl.constexpr,
                      BLOCK: tl.constexpr, SMEM: tl.constexpr, CHUNK: tl.constexpr, SAMPLE: tl.constexpr,
                      SORT_CAP: tl.constexpr):
    """A guess at the bin of rank ``k_side`` from blocks spread over the row (SAMPLE of them,
    fewer on a row under four times SAMPLE blocks: one block in four, at least two): the bin
    of rank ``SAMPLE_RANKS k_side`` of the sample, scaled to its size (rounded up), so that
    about SAMPLE_RANKS k_side logits of the row are at or above it; and whether the row is long
    enough for a guess (two blocks sampled, four gaps a sampled block, the rank in the sample's
    top eighth) and ``k_side`` small enough (twice the logits aimed at fit the sort:
    SORT_CAP)."""
    sampled = tl.minimum(vocab // (4 * BLOCK), SAMPLE)  # blocks sampled
    gap = vocab // tl.maximum(sampled * BLOCK, 1)  # blocks from one sampled block to the next
    rank = (SAMPLE_RANKS * k_side * (sampled * BLOCK) + vocab - 1) // tl.maximum(vocab, 1)
    usable = (sampled >= 2) & (rank * 8 <= sampled * BLOCK) & (2 * SAMPLE_RANKS * k_side <= SORT_CAP)
    prefix = tl.zeros([], tl.uint32)
    if usable:
        # 8 KiB of blocks a step, their loads in flight together (16 KiB: 153 registers in float32)
        PER_STEP: tl.constexpr = 8192 // (BLOCK * (row.dtype.element_ty.primitive_bitwidth // 8))
        AT_ONCE: tl.constexpr = PER_STEP if PER_STEP >= 1 and SAMPLE % PER_STEP == 0 else 1
        blocks = tl.arange(0, AT_ONCE)[:, None]
        lanes = tl.arange(0, BLOCK)[None, :]
        hist = tl.zeros([1 << BITS1], tl.int32)
        for b in tl.range(0, sampled, AT_ONCE):
            # (a step's blocks past the sample start past the row: not loaded, not counted)
            first = tl.where(b + blocks < sampled, ((b + blocks) * gap) * BLOCK, vocab)
            z, in_row = _load_logits(row, first + lanes, col_stride, vocab, UNIT_COL_STRIDE)
            bins = tl.reshape(_high_bits(z, BITS1).to(tl.int32), [AT_ONCE * BLOCK])
            hist = _count(hist, bins, tl.reshape(in_row, [AT_ONCE * BLOCK]), BITS1, SMEM)
        prefix, _, _ = _select_bin(hist, prefix, tl.zeros([], tl.int32), rank, BITS1, SMEM, CHUNK)
    return prefix, usable


@triton.jit
def _side_top(row, vocab, col_stride, inv_t, k_side, scratch,
              BITS1: tl.constexpr, BITS2: tl.constexpr, BITS3: tl.constexpr, UNIT_COL_STRIDE: tl.constexpr,
              K_PAD: tl.constexpr, SORT_CAP: tl.constexpr, SORT_PAD: tl.constexpr, RUNS: tl.constexpr,
              REGION: tl.constexpr, BLOCK: tl.constexpr, SMEM: tl.constexpr, CHUNK: tl.constexpr,
              PREFETCH: tl.constexpr, SAMPLE: tl.constexpr):
    """One side's first ``k_side`` probabilities of softmax(z / T) in descending order
    (``[K_PAD]``, 0 past ``k_side``), their columns, the row's largest logit ``top`` and
    log-sum (the log-sum-exp of z / T is ``top / T + log_sum``, kept apart) and the
    probability past rank ``k_side`` (summed, not 1 minus the first ones: see
    `_gradient_factors`). ``scratch``: this row's ``max(SORT_PAD, RUNS REGION)``
    int64.

    With SAMPLE, first one pass: the logits at or above a bin guessed from a sample
    (`_sample_threshold`) collected by runs. Where that took at least ``k_side`` logits and at
    most SORT_CAP (no run past its region), they hold the first ``k_side`` and the select is
    done; otherwise the passes below, from the start."""
    slots = tl.arange(0, SORT_PAD)
    source = slots
    taken = tl.zeros([], tl.int32)
    # the sum of `_rest_weight` over what is not taken, relative to exp(ref / T): ref a logit
    # at least every logit not taken
    rest = tl.zeros([], tl.float32)
    ref = tl.zeros([], tl.float32)
    done = tl.zeros([], tl.int32) > 0
    if SAMPLE > 0:
        guess, usable = _sample_threshold(row, vocab, col_stride, k_side, BITS1, UNIT_COL_STRIDE, BLOCK, SMEM,
                                          CHUNK, SAMPLE, SORT_CAP)
        # the logits not taken are below the bin's lowest value
        ref = _from_order_key(_lowest_key(guess, BITS1))
        if usable & (tl.abs(ref) < float("inf")):
            tl.debug_barrier()  # (the other side's loads of the same scratch row are done)
            filled, rest = _collect_by_run(row, vocab, col_stride, inv_t, ref, guess, BITS1, scratch,
                                           UNIT_COL_STRIDE, BLOCK, RUNS, REGION, SMEM, PREFETCH)
            source, taken = _region_slots(filled, slots, REGION)
            done = (tl.max(filled, 0) <= REGION) & (taken >= k_side) & (taken <= SORT_CAP)
    if not done:
        # Pass 1: the histogram and the row's maximum. Its log-sum is summed by the collect
        # pass (the logits not taken) and after the sort (those taken): one exp a logit.
        lanes = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        hist = tl.zeros([1 << BITS1], tl.int32)
        ahead = _first_block(row, lanes, col_stride, vocab, UNIT_COL_STRIDE, PREFETCH)
        for start in tl.range(0, vocab, BLOCK):
            raw, ahead = _block_raw(ahead, row, start + lanes, col_stride, vocab, BLOCK, UNIT_COL_STRIDE, PREFETCH)
            z, in_row = raw.to(tl.float32), start + lanes < vocab
            m = tl.maximum(m, z)  # (NaN or not: a NaN logit makes the sum below NaN)
            hist = _count(hist, _high_bits(z, BITS1).to(tl.int32), in_row, BITS1, SMEM)
        ref = tl.max(m, 0)

        prefix, above, in_bin = _select_bin(hist, tl.zeros([], tl.uint32), tl.zeros([], tl.int32), k_side, BITS1,
                                            SMEM, CHUNK)
        # Few enough logits at or above the bin of rank k (SORT_CAP): sort them all, no more levels.
        resolved = tl.full([], BITS1, tl.int32)
        if above + in_bin > SORT_CAP:
            if BITS2 > 0:
                prefix, above, in_bin = _refine(row, vocab, col_stride, prefix, above, k_side, BITS1, BITS2,
                                                UNIT_COL_STRIDE, BLOCK, SMEM, CHUNK)
            if BITS3 > 0:
                prefix, above, in_bin = _refine(row, vocab, col_stride, prefix, above, k_side, BITS1 + BITS2, BITS3,
                                                UNIT_COL_STRIDE, BLOCK, SMEM, CHUNK)
            resolved = tl.full([], BITS1 + BITS2 + BITS3, tl.int32)

        # Collect the logits at or above the prefix, in the runs' regions; where that is more
        # than SORT_CAP (every bit resolved: the last bin holds equal logits), or a run's region
        # overflows, in column order, up to rank k_side.
        tl.debug_barrier()  # (the other side's loads of the same scratch row are done)
        ordered = above + in_bin > SORT_CAP
        if above + in_bin <= SORT_CAP:
            filled, rest = _collect_by_run(row, vocab, col_stride, inv_t, ref, prefix, resolved, scratch,
                                           UNIT_COL_STRIDE, BLOCK, RUNS, REGION, SMEM, PREFETCH)
            ordered = tl.max(filled, 0) > REGION
            source, taken = _region_slots(filled, slots, REGION)
        if ordered:
            need = tl.where(above + in_bin > SORT_CAP, k_side - above, in_bin)
            taken, rest = _collect_in_order(row, vocab, col_stride, inv_t, ref, prefix, resolved, need,
                                            scratch, UNIT_COL_STRIDE, BLOCK, SMEM)
            source = slots
    tl.debug_barrier()  # the scratch row's stores, by every thread, before its loads
    packed = tl.sort(tl.load(scratch + source, mask=slots < taken, other=_PACKED_NONE), descending=True)
    # The row's maximum (the first taken) and sum: the rest and what was taken (a NaN logit, or
    # +inf, or no finite one: NaN). The tail (ranks past k_side): the rest, and what was taken
    # past rank k_side (bins sorted whole).
    z = _from_order_key((packed >> 32).to(tl.int32))
    top = tl.sum(tl.where(slots == 0, z, 0.0), 0)
    weights = tl.where(slots < taken, tl.exp((z - top) * inv_t), 0.0)
    rest = rest * tl.exp((ref - top) * inv_t)
    total = rest + tl.sum(weights, 0)
    log_sum = tl.log(total)
    tail = (rest + tl.sum(tl.where(slots >= k_side, weights, 0.0), 0)) / total
    if SORT_PAD > K_PAD:  # the first K_PAD of the sorted keys, through the scratch row
        tl.debug_barrier()
        tl.store(scratch + slots, packed)
        tl.debug_barrier()
        ranks = tl.arange(0, K_PAD)
        packed = tl.load(scratch + ranks)
    ranks = tl.arange(0, K_PAD)
    z = _from_order_key((packed >> 32).to(tl.int32))
    columns = (packed & 0xFFFFFFFF).to(tl.int32)
    probs = tl.where(ranks < k_side, _prob(z, inv_t, top, log_sum), 0.0)
    return probs, columns, top, log_sum, tail


@triton.jit
def _gradient_factors(probs, signs, tail):
    """``g - mass`` for g = 0, +1 and -1 (``mass = sum g p``). ``1 - mass`` is computed as
    ``sum (1 - g_i) p_i`` (the tail, the ranks of sign 0, twice those of sign -1) and
    ``-1 - mass`` likewise, never as 1 minus a mass near 1: a peaked row (a cold temperature)
    lost its largest probability's gradient to that cancellation (8% off at T = 0.05, run 10)."""
    plus = tl.sum(tl.where(signs > 0, probs, 0.0), 0)
    minus = tl.sum(tl.where(signs < 0, probs, 0.0), 0)
    zero = tl.sum(tl.where(signs == 0, probs, 0.0), 0) + tail
    return minus - plus, zero + 2 * minus, -(zero + 2 * plus)


@triton.jit
def _given_codes(probs, signs, tail):
    """The student's saved codes and factors where the teacher is given (GIVEN): the loss
    ``sum_{i < k} |a_(i) - b_(i)| + tail`` has ``g = sign`` at the first k ranks and ``g = 1``
    past them; the backward takes ``g - 1`` (the same ``g - mass``): 0 past rank k and where
    the sign is +1, -1 for a tie, -2 for sign -1, saved as codes 0, +1 and -1 with the factors
    ``g - 1 - mass'`` of each, in the tested form (`_gradient_factors`: sums of probabilities,
    never 1 minus a mass near 1; ``1 = plus + minus + tie + tail``)."""
    plus = tl.sum(tl.where(signs > 0, probs, 0.0), 0)
    minus = tl.sum(tl.where(signs < 0, probs, 0.0), 0)
    tie = tl.sum(tl.where(signs == 0, probs, 0.0), 0)
    codes = tl.where(signs > 0, 0.0, tl.where(signs < 0, -1.0, 1.0))
    return codes, tie + 2 * minus, minus - plus - tail, -(2 * plus + 2 * tail + tie)


@triton.jit
def _save_side(stats_ptr, columns_ptr, signs_ptr, pair, top, log_sum, probs, tail, columns, signs, k_side, loss,
               K_PAD: tl.constexpr, GIVEN: tl.constexpr = False):
    """One side's saved state: ``[maximum, log-sum, g - mass for g = 0, +1, -1]`` and its
    first k_side columns and signs (0 past them); with GIVEN (the student against a given
    teacher), `_given_codes`' codes and factors instead. A row whose loss is NaN (a NaN or +inf
    logit, or no finite one, on either side) gets NaN factors, so NaN gradients on both sides
    (sign(NaN) is 0)."""
    ranks = tl.arange(0, K_PAD)
    kept = ranks < k_side
    signs = tl.where(kept, signs, 0.0)
    if GIVEN:
        signs, to_zero, to_plus, to_minus = _given_codes(probs, signs, tail)
        signs = tl.where(kept, signs, 0.0)
    else:
        to_zero, to_plus, to_minus = _gradient_factors(probs, signs, tail)
    nan = loss != loss
    row = stats_ptr + pair * STATS
    tl.store(row, top)
    tl.store(row + 1, log_sum)
    tl.store(row + 2, tl.where(nan, loss, to_zero))
    tl.store(row + 3, tl.where(nan, loss, to_plus))
    tl.store(row + 4, tl.where(nan, loss, to_minus))
    tl.store(columns_ptr + pair * K_PAD + ranks, tl.where(kept, columns, 0))
    tl.store(signs_ptr + pair * K_PAD + ranks, signs.to(tl.int8))


@triton.jit(do_not_specialize=["k", "student_seq_len", "teacher_seq_len"])
def topk_rows_kernel(
    # data
    student_ptr, teacher_ptr, student_index_ptr, teacher_index_ptr, loss_ptr,
    # saved for the backward, per side: [N, STATS] (`_save_side`), [N, K_PAD] columns and signs
    student_stats_ptr, student_columns_ptr, student_signs_ptr,
    teacher_stats_ptr, teacher_columns_ptr, teacher_signs_ptr,
    scratch_ptr,  # [N, SCRATCH] int64: a row a pair, the student's then the teacher's
    # shapes, strides, temperatures
    student_vocab, teacher_vocab, k,
    student_seq_len, student_batch_stride, student_row_stride, student_col_stride,
    teacher_seq_len, teacher_batch_stride, teacher_row_stride, teacher_col_stride,
    student_inv_t, teacher_inv_t,
    # switches and sizes
    GATHER: tl.constexpr, SAVE_STUDENT: tl.constexpr, SAVE_TEACHER: tl.constexpr,
    STUDENT_UNIT_STRIDE: tl.constexpr, TEACHER_UNIT_STRIDE: tl.constexpr,
    S_BITS1: tl.constexpr, S_BITS2: tl.constexpr, S_BITS3: tl.constexpr,
    T_BITS1: tl.constexpr, T_BITS2: tl.constexpr, T_BITS3: tl.constexpr,
    K_PAD: tl.constexpr, SORT_CAP: tl.constexpr, SORT_PAD: tl.constexpr, RUNS: tl.constexpr, REGION: tl.constexpr,
    SCRATCH: tl.constexpr, BLOCK: tl.constexpr, SMEM: tl.constexpr, CHUNK: tl.constexpr, PREFETCH: tl.constexpr,
    SAMPLE: tl.constexpr, GIVEN: tl.constexpr = False,
):
    """Program p: the truncated loss of pair p (rows p, or with GATHER the rows the index maps
    name; a negative student index is a padding slot: loss 0, nothing saved but zeros).

    GIVEN: the teacher's row is its first ``k`` probabilities themselves, float32, descending
    (an offline teacher's top-k; topk.py prepares them), and the loss is the full sorted L1
    against them, zero-padded: ``sum_{i < k} |a_(i) - b_(i)|`` plus the student's
    probability past rank k. Only the student's state is saved (SAVE_TEACHER off)."""
    # The scratch row holds what is sorted, and the runs' regions.
    tl.static_assert(K_PAD <= SORT_PAD and SORT_CAP <= SORT_PAD and SORT_PAD <= SCRATCH and RUNS * REGION <= SCRATCH)
    tl.static_assert(BLOCK % RUNS == 0)
    pair = tl.program_id(0).to(tl.int64)
    s_index, t_index, s_row, t_row = _pair_rows(
        pair, student_ptr, teacher_ptr, student_index_ptr, teacher_index_ptr,
        student_seq_len, student_batch_stride, student_row_stride,
        teacher_seq_len, teacher_batch_stride, teacher_row_stride, GATHER)
    if SMEM:  # 4 warps (ptx.SMEM_THREADS): the shared histogram's array, declared and zeroed
        smem_zero()
        tl.debug_barrier()
    zeros = tl.zeros([K_PAD], tl.float32)
    if s_index < 0:
        tl.store(loss_ptr + pair, 0.0)
        if SAVE_STUDENT:
            _save_side(student_stats_ptr, student_columns_ptr, student_signs_ptr, pair, 0.0, 0.0, zeros, 0.0,
                       tl.zeros([K_PAD], tl.int32), zeros, 0, 0.0, K_PAD)
        if SAVE_TEACHER:
            _save_side(teacher_stats_ptr, teacher_columns_ptr, teacher_signs_ptr, pair, 0.0, 0.0, zeros, 0.0,
                       tl.zeros([K_PAD], tl.int32), zeros, 0, 0.0, K_PAD)
    else:
        s_k = tl.minimum(k, student_vocab)
        t_k = tl.minimum(k, teacher_vocab)
        a, s_columns, s_top, s_log_sum, s_tail = _side_top(
            s_row, student_vocab, student_col_stride, student_inv_t, s_k,
            scratch_ptr + pair * SCRATCH, S_BITS1, S_BITS2, S_BITS3, STUDENT_UNIT_STRIDE, K_PAD,
            SORT_CAP, SORT_PAD, RUNS, REGION, BLOCK, SMEM, CHUNK, PREFETCH, SAMPLE)
        if GIVEN:
            ranks = tl.arange(0, K_PAD)
            b = tl.load(t_row + ranks * teacher_col_stride, mask=ranks < t_k, other=0.0)
        else:
            b, t_columns, t_top, t_log_sum, t_tail = _side_top(
                t_row, teacher_vocab, teacher_col_stride, teacher_inv_t, t_k,
                scratch_ptr + pair * SCRATCH, T_BITS1, T_BITS2, T_BITS3, TEACHER_UNIT_STRIDE, K_PAD,
                SORT_CAP, SORT_PAD, RUNS, REGION, BLOCK, SMEM, CHUNK, PREFETCH, SAMPLE)
        diff = a - b  # both 0 past their side's k, so past k
        sign = (diff > 0).to(tl.float32) - (diff < 0).to(tl.float32)
        loss = tl.sum(tl.abs(diff), 0)
        if GIVEN:  # the teacher zero-padded past its k: the student's tail, each rank at +1
            loss += s_tail
        tl.store(loss_ptr + pair, loss)
        if SAVE_STUDENT:
            _save_side(student_stats_ptr, student_columns_ptr, student_signs_ptr, pair, s_top, s_log_sum, a, s_tail,
                       s_columns, sign, s_k, loss, K_PAD, GIVEN)
        if SAVE_TEACHER:
            _save_side(teacher_stats_ptr, teacher_columns_ptr, teacher_signs_ptr, pair, t_top, t_log_sum, b, t_tail,
                       t_columns, -sign, t_k, loss, K_PAD)


@triton.jit(do_not_specialize=["k_side", "seq_len"])
def topk_grad_kernel(
    logits_ptr, index_ptr, stats_ptr, columns_ptr, signs_ptr, upstream_ptr, grad_ptr,
    vocab, k_side, seq_len, batch_stride, row_stride, col_stride, grad_row_stride, inv_t,
    GATHER: tl.constexpr, UNIT_COL_STRIDE: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    """Program r: the gradient of row r of one side (with GATHER the row index[r] names; a
    negative index writes nothing) times upstream[r], into grad's row of the same index; with
    ACCUMULATE added to what that row holds (the training loss's cross-entropy gradient), in
    float32 and rounded once to grad's dtype."""
    r = tl.program_id(0).to(tl.int64)
    if GATHER:
        index = tl.load(index_ptr + r).to(tl.int64)
    else:
        index = r
    if index >= 0:
        row = logits_ptr + (index // seq_len) * batch_stride + (index % seq_len) * row_stride
        out = grad_ptr + index * grad_row_stride
        top = tl.load(stats_ptr + r * STATS)
        log_sum = tl.load(stats_ptr + r * STATS + 1)
        to_zero = tl.load(stats_ptr + r * STATS + 2)  # g - mass at g = 0: -mass
        to_plus = tl.load(stats_ptr + r * STATS + 3)
        to_minus = tl.load(stats_ptr + r * STATS + 4)
        scale = tl.load(upstream_ptr + r) * inv_t
        ranks = tl.arange(0, K_PAD)
        kept = ranks < k_side
        columns = tl.load(columns_ptr + r * K_PAD + ranks, mask=kept, other=0)
        if ACCUMULATE:  # the k columns' old values, before the pass below overwrites them
            old_k = tl.load(out + columns, mask=kept, other=0.0).to(tl.float32)
            tl.debug_barrier()
        lanes = tl.arange(0, BLOCK)
        for start in tl.range(0, vocab, BLOCK):
            idx = start + lanes
            z, in_row = _load_logits(row, idx, col_stride, vocab, UNIT_COL_STRIDE)
            value = _prob(z, inv_t, top, log_sum) * (to_zero * scale)
            if ACCUMULATE:
                value += tl.load(out + idx, mask=in_row, other=0.0).to(tl.float32)
            tl.store(out + idx, value.to(grad_ptr.dtype.element_ty), mask=in_row)
        tl.debug_barrier()  # the first k columns are written again, with their sign
        g = tl.load(signs_ptr + r * K_PAD + ranks, mask=kept, other=0).to(tl.float32)
        z = tl.load(row + columns.to(tl.int64) * col_stride, mask=kept, other=0.0).to(tl.float32)
        factor = tl.where(g > 0, to_plus, tl.where(g < 0, to_minus, to_zero))
        value = _prob(z, inv_t, top, log_sum) * (factor * scale)
        if ACCUMULATE:  # onto the old value, not the pass's: rounded once
            value += old_k
        tl.store(out + columns, value.to(grad_ptr.dtype.element_ty), mask=kept)
