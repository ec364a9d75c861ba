"""Triton kernels: the exact ULD loss of 16-bit logits from per-row histograms of their values.

A bf16 (or fp16) row of 150k logits holds only a few thousand distinct values, and a
probability is a monotone function of its logit: p = 2**k with k = (z - top) * scale - log_sum
(uld_rows._keys_of). So the sorted probabilities of a row are known exactly from a histogram of
its logits' bit patterns, and the counts the sign of every element needs (uld_rows, top of
file) come from two such histograms, however close the rows are. The passes:

    hist_kernel    one program per row (per side): the row's statistics (largest logit,
                   base-2 log-sum, smallest logit), the histogram of its logits over the row's
                   *window* of bins (below) in shared memory, and from it the side's prefix
                   counts and the probability of every bin
    sign_kernel    per (pair, block of bins), for each side: the counts of both sides above and
                   at each occupied bin's value (a local search around an estimate), its
                   tie-rule sign, and the block's sum of count * p * sign
    finish_kernel  per pair: the sums of p * sign of both sides, and the loss
    grad_kernel    per (pair, chunk): each element's bin, its sign from the bin's table, and
                   the softmax backward

Bins. A 16-bit logit's pattern b gives a key monotone in the logit (b if b >= 0, else
b ^ 0x7FFF). The window is the key range [K_lo, K_hi]: K_hi the row's largest logit, K_lo just
below the smallest logit whose probability can be nonzero (logits below it have k < -150: p is
0 in every mode, and zero probabilities are left out of every count). Logits near 0 waste keys:
every tiny logit has its own pattern while z - top rounds them to a handful of values. So the
keys of |z| < z_b (the *band*, z_b a power of two per row) are replaced by bins of k itself:
there k lies within BAND_J steps h of k0 = k(0), on a grid of spacing h (half an ulp of k0, so
k - k0 is exact), and bin = j + BAND_J with j = (k - k0) / h. Every bin then holds one value of
k, the bins are in the order of k, and a row of N(0, 1) or LLM-like logits needs about 4,600
of them. A row is *flagged* when something falls outside what this engine handles exactly
(a window wider than CAP bins, a band value past BAND_J steps, a search that does not settle
within SEARCH_R bins, non-finite statistics); the launcher hands flagged rows to the trie
engine (uld_split.py), so every row's result stays exact.
"""

import triton
import triton.language as tl

from uld_kernels.kernels.ptx import smem_add_one, smem_load, smem_zero
from uld_kernels.kernels.uld_rows import _exp2, _finish_lse2, _lse_block, _load_raw, _pair_rows, _tie_signs

CAP = tl.constexpr(8192)  # bins per row and side: the shared-memory histogram's 8,192 words
BAND_J = tl.constexpr(1024)  # band bins j in [-BAND_J, BAND_J]
SEARCH_R = tl.constexpr(4)  # a local search reads 2 * SEARCH_R + 1 bins around its estimate
# Per row and side: floats, then ints (PARAM_SLOTS each).
PARAM_SLOTS = tl.constexpr(8)
_TOP = tl.constexpr(0)
_LOG_SUM = tl.constexpr(1)
_K0 = tl.constexpr(2)  # k at z = 0
_H = tl.constexpr(3)  # band grid spacing
_Z_BAND = tl.constexpr(4)  # z_b
_MASS = tl.constexpr(5)  # sum over the side of p * sign
_K_LO = tl.constexpr(0)
_K_BAND = tl.constexpr(1)  # the band holds keys [-K_BAND, K_BAND)
_BAND_W = tl.constexpr(2)  # bins of the band (at most 2 * BAND_J + 1), or 0 without a band
_WIDTH = tl.constexpr(3)  # bins of the window
_FLAG = tl.constexpr(4)  # nonzero: the trie engine computes this row
_J_MIN = tl.constexpr(5)  # the band's first bin holds k0 + J_MIN * h


@triton.jit
def _key_of_bits(b):
    """Monotone key of a 16-bit float's pattern (sign-extended int32); its own inverse."""
    return tl.where(b >= 0, b, b ^ 0x7FFF)


@triton.jit
def _key16(x, DTYPE: tl.constexpr):
    """Key of float32 values rounded to the 16-bit input type."""
    return _key_of_bits(x.to(tl.float32).to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32))


@triton.jit
def _log2_prob(z, scale, top, log_sum):
    """k = log2 p of float32 logits: the expression of uld_rows._keys_of."""
    return (z - top) * scale - log_sum


@triton.jit
def _pow2(e):
    """2**e for an int32 exponent in [-126, 127], exactly."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _exponent(x):
    """floor(log2 |x|) of a normal float32."""
    return ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def _bins_of(raw, scale, top, log_sum, k0, inv_h, k_lo, k_band, j_min, band_w):
    """Bins of logits already loaded (input dtype), whether they fall in the window, whether in
    the band, and their band offsets j."""
    key = _key_of_bits(raw.to(tl.int16, bitcast=True).to(tl.int32))
    z = raw.to(tl.float32)
    j = tl.minimum(tl.maximum((_log2_prob(z, scale, top, log_sum) - k0) * inv_h, -1048576.0), 1048576.0)
    j = j.to(tl.int32)
    base = -k_band - k_lo
    bins = tl.where(key < -k_band, key - k_lo,
                    tl.where(key < k_band, base + j - j_min, key - k_band + base + band_w))
    in_band = (key >= -k_band) & (key < k_band)
    return bins, key >= k_lo, in_band, j


@triton.jit
def _bin_log2_probs(bins, k_lo, k_band, j_min, band_w, top, scale, log_sum, k0, h, DTYPE: tl.constexpr):
    """k of every bin: the value its logits have (the inverse of `_bins_of`)."""
    base = -k_band - k_lo
    key = tl.where(bins < base, bins + k_lo, bins - base - band_w + k_band)
    z = _key_of_bits(key).to(tl.int16).to(DTYPE, bitcast=True).to(tl.float32)
    in_band = (bins >= base) & (bins < base + band_w)
    return tl.where(in_band, k0 + (bins - base + j_min).to(tl.float32) * h, _log2_prob(z, scale, top, log_sum))


@triton.jit
def stats_kernel(logits_ptr, index_ptr, stats_ptr, batch_start, side, n_chunks, vocab, seq_len, batch_stride,
                 row_stride, col_stride, inv_temperature, GATHER: tl.constexpr, UNIT_STRIDE: tl.constexpr,
                 CHUNK: tl.constexpr, CHUNKS_POW2: tl.constexpr, BLOCK: tl.constexpr):
    """Per (pair, chunk of CHUNK columns) of one side: the chunk's largest logit, base-2 log-sum
    and smallest finite logit, at stats_ptr[((pair * 2 + side) * CHUNKS_POW2 + chunk) * 4]."""
    program = tl.program_id(0)
    pair = program // n_chunks
    chunk = program % n_chunks
    _row, _unused, row_ptr, _ = _pair_rows(batch_start + pair, logits_ptr, logits_ptr, index_ptr, index_ptr,
                                           seq_len, batch_stride, row_stride, seq_len, batch_stride,
                                           row_stride, GATHER)
    scale = inv_temperature * 1.4426950408889634
    ROWS: tl.constexpr = BLOCK // 8
    lanes = tl.arange(0, ROWS)[:, None] * 8 + tl.arange(0, 8)[None, :]
    tops = tl.full([ROWS], float("-inf"), tl.float32)
    totals = tl.zeros([ROWS], tl.float32)
    lows = tl.full([ROWS], float("inf"), tl.float32)
    for start in tl.range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, vocab), BLOCK):
        z = _load_raw(row_ptr, start + lanes, col_stride, vocab, UNIT_STRIDE).to(tl.float32)
        tops, totals = _lse_block(tops, totals, z, scale)
        lows = tl.minimum(lows, tl.min(tl.where(z > float("-inf"), z, float("inf")), axis=1))
    top, log_sum = _finish_lse2(tops, totals, scale)
    at = (((pair * 2 + side) * CHUNKS_POW2 + chunk) * 4).to(tl.int64)
    tl.store(stats_ptr + at, top)
    tl.store(stats_ptr + at + 1, log_sum)
    tl.store(stats_ptr + at + 2, tl.min(lows, 0))


@triton.jit
def hist_kernel(logits_ptr, index_ptr, stats_ptr, fparam_ptr, iparam_ptr, count_ptr, prob_ptr, batch_start,
                side, n_chunks, vocab, seq_len, batch_stride, row_stride, col_stride, inv_temperature,
                GATHER: tl.constexpr, UNIT_STRIDE: tl.constexpr, USE_PTX: tl.constexpr,
                CHUNKS_POW2: tl.constexpr, BLOCK: tl.constexpr):
    """One row of one side per program: the statistics (from stats_kernel's chunks), window,
    histogram, and from it the side's prefix counts and bin probabilities (`_prefix`).
    Workspace per row and side, at pair * 2 + side: count_ptr CAP + 1 int32 (zeroed by the
    launcher when USE_PTX is off: the histogram is counted there), prob_ptr CAP float32."""
    pair = tl.program_id(0)
    at = (pair * 2 + side).to(tl.int64)
    row, _unused, row_ptr, _ = _pair_rows(batch_start + pair, logits_ptr, logits_ptr, index_ptr, index_ptr,
                                          seq_len, batch_stride, row_stride, seq_len, batch_stride,
                                          row_stride, GATHER)
    DTYPE: tl.constexpr = logits_ptr.dtype.element_ty
    scale = inv_temperature * 1.4426950408889634
    ROWS: tl.constexpr = BLOCK // 8
    lanes = tl.arange(0, ROWS)[:, None] * 8 + tl.arange(0, 8)[None, :]
    chunks = tl.arange(0, CHUNKS_POW2)
    stats = stats_ptr + (at * CHUNKS_POW2 + chunks) * 4
    real = chunks < n_chunks
    tops = tl.load(stats, mask=real, other=float("-inf"))
    top = tl.max(tops, 0)
    weight = tl.where(tops > float("-inf"), _exp2((tops - top) * scale), 0.0)  # NaN totals stay NaN
    log_sum = tl.log2(tl.sum(tl.where(real, tl.exp2(tl.load(stats + 1, mask=real, other=0.0)) * weight, 0.0), 0))
    low = tl.min(tl.load(stats + 2, mask=real, other=float("inf")), 0)
    finite = (top < float("inf")) & (log_sum == log_sum) & (log_sum < float("inf")) & (row >= 0)
    top = tl.where(finite, top, 0.0)
    log_sum = tl.where(finite, log_sum, 0.0)
    # The window: logits below z_cut have k < -150 (p is 0 even without flushing subnormals).
    z_cut = tl.maximum(top + (log_sum - 152.0) / scale, tl.where(finite, low, 0.0))
    k_lo = _key16(z_cut, DTYPE) - 1
    k_hi = _key16(top, DTYPE)
    # The band: k within BAND_J / 4 steps of k0 for |z| < z_b (the row check below makes sure).
    k0 = _log2_prob(0.0, scale, top, log_sum)
    e0 = _exponent(k0)
    band_ok = (e0 >= -100) & (k0 < 0.0)
    e0 = tl.where(band_ok, e0, 0)
    h = _pow2(e0 - 24)
    inv_h = _pow2(24 - e0)
    eb = tl.minimum(tl.maximum(_exponent(h * (BAND_J * 0.25) / scale), -126), 100)
    z_band = _pow2(eb)
    k_band = _key16(z_band, DTYPE)
    # The band's bins run from k(-z_b) to k(z_b) (both on the grid): the bins next to the
    # band hold those two values, so the bins' values stay in order across its edges.
    j_min = ((_log2_prob(-z_band, scale, top, log_sum) - k0) * inv_h).to(tl.int32)
    j_max = ((_log2_prob(z_band, scale, top, log_sum) - k0) * inv_h).to(tl.int32)
    band_ok = (band_ok & (k_band >= 1) & (k_lo < -k_band) & (k_hi >= k_band) & (j_min >= -BAND_J)
               & (j_max <= BAND_J))
    k_band = tl.where(band_ok, k_band, 0)
    j_min = tl.where(band_ok, j_min, 0)
    band_w = tl.where(band_ok, j_max - j_min + 1, 0)
    width = k_hi - k_lo + 1 - 2 * k_band + band_w
    flag = (~finite).to(tl.int32) + (width > CAP).to(tl.int32) * 2

    counts = count_ptr + at * (CAP + 1)
    if flag == 0:
        if USE_PTX:
            smem_zero()
            tl.debug_barrier()
        far = tl.zeros([ROWS, 8], tl.int32)
        for start in tl.range(0, vocab, BLOCK):
            raw = _load_raw(row_ptr, start + lanes, col_stride, vocab, UNIT_STRIDE)
            bins, inside, in_band, j = _bins_of(raw, scale, top, log_sum, k0, inv_h, k_lo, k_band, j_min, band_w)
            far = tl.maximum(far, (in_band & inside & ((j < j_min) | (j - j_min >= band_w))).to(tl.int32))
            counted = inside & (bins >= 0) & (bins < CAP)
            if USE_PTX:
                smem_add_one(bins, counted)
            else:
                tl.atomic_add(counts + bins, 1, mask=counted)
        if USE_PTX:
            tl.debug_barrier()
        _total, ordered = _prefix(counts, prob_ptr + at * CAP, width, top, log_sum, k0, h, k_lo, k_band, j_min,
                                  band_w, scale, DTYPE, USE_PTX, 1024)
        flag = tl.max(tl.max(far, 1), 0) * 4 + (1 - ordered.to(tl.int32)) * 16
    params = at * PARAM_SLOTS
    tl.store(fparam_ptr + params + _TOP, top)
    tl.store(fparam_ptr + params + _LOG_SUM, log_sum)
    tl.store(fparam_ptr + params + _K0, k0)
    tl.store(fparam_ptr + params + _H, h)
    tl.store(fparam_ptr + params + _Z_BAND, tl.where(band_ok, z_band, 0.0))
    tl.store(iparam_ptr + params + _K_LO, k_lo)
    tl.store(iparam_ptr + params + _K_BAND, k_band)
    tl.store(iparam_ptr + params + _BAND_W, band_w)
    tl.store(iparam_ptr + params + _J_MIN, j_min)
    tl.store(iparam_ptr + params + _WIDTH, width)
    tl.store(iparam_ptr + params + _FLAG, flag)


@triton.jit
def _side(fparam_ptr, iparam_ptr, pair):
    params = pair.to(tl.int64) * PARAM_SLOTS
    return (tl.load(fparam_ptr + params + _TOP), tl.load(fparam_ptr + params + _LOG_SUM),
            tl.load(fparam_ptr + params + _K0), tl.load(fparam_ptr + params + _H),
            tl.load(fparam_ptr + params + _Z_BAND), tl.load(iparam_ptr + params + _K_LO),
            tl.load(iparam_ptr + params + _K_BAND), tl.load(iparam_ptr + params + _J_MIN),
            tl.load(iparam_ptr + params + _BAND_W), tl.load(iparam_ptr + params + _WIDTH))


@triton.jit
def _prefix(count_ptr, prob_ptr, width, top, log_sum, k0, h, k_lo, k_band, j_min, band_w, scale,
            DTYPE: tl.constexpr, USE_PTX: tl.constexpr, BLOCK: tl.constexpr):
    """From one side's histogram (shared memory with USE_PTX, else count_ptr): count[i] = elements of nonzero probability in bins
    below i (count[width] = all of them); prob[i] = the bin's probability. Returns the count
    and whether the occupied bins' probabilities are in order (the searches rely on it; an
    exp2 that was not monotone would flag the row)."""
    carry = tl.zeros([], tl.int32)
    ceiling = tl.zeros([], tl.float32)
    disorder = tl.zeros([], tl.int32)
    for start in tl.range(0, width, BLOCK):
        bins = start + tl.arange(0, BLOCK)
        inside = bins < width
        if USE_PTX:
            counts = tl.where(inside, smem_load(bins), 0)
        else:
            counts = tl.load(count_ptr + bins, mask=inside, other=0)
        p = _exp2(_bin_log2_probs(bins, k_lo, k_band, j_min, band_w, top, scale, log_sum, k0, h, DTYPE))
        p = tl.where(inside, p, 0.0)
        counts = tl.where(p > 0.0, counts, 0)
        ordered = tl.maximum(tl.associative_scan(p, 0, _max_combine), ceiling)
        disorder += tl.sum(((counts > 0) & (p < ordered)).to(tl.int32), 0)
        p = ordered
        below = tl.cumsum(counts, 0) - counts + carry
        tl.store(count_ptr + bins, below, mask=inside)
        tl.store(prob_ptr + bins, p, mask=inside)
        carry += tl.sum(counts, 0)
        ceiling = tl.maximum(ceiling, tl.max(p, 0))
    tl.store(count_ptr + width, carry)
    return carry, disorder == 0


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _bounds(prob_ptr, width, estimate, v, active, R: tl.constexpr):
    """First bins with probability >= v and > v, of a side whose probabilities are
    non-decreasing over [0, width), from the 2R + 1 bins around `estimate`, and whether the
    window settles both (else the true bounds may lie outside it)."""
    first = tl.maximum(estimate - R, 0)
    stop = tl.minimum(estimate + R + 1, width)
    below = tl.zeros_like(estimate)
    at_most = tl.zeros_like(estimate)
    for m in tl.static_range(2 * R + 1):
        idx = estimate - R + m
        ok = (idx >= 0) & (idx < width)
        p = tl.load(prob_ptr + idx, mask=active & ok, other=0.0)
        below += (ok & (p < v)).to(tl.int32)
        at_most += (ok & (p <= v)).to(tl.int32)
    lower = first + below
    upper = first + at_most
    settled = (((below > 0) | (first == 0)) & ((lower < stop) | (stop == width))
               & ((at_most > 0) | (first == 0)) & ((upper < stop) | (stop == width)))
    return lower, upper, settled | ~active


@triton.jit
def _estimate(v, top, log_sum, k0, h, z_band, k_lo, k_band, j_min, band_w, width, scale, DTYPE: tl.constexpr):
    """A bin of a side near probability v (v > 0): through the logit of that probability."""
    k = tl.log2(tl.maximum(v, 1e-38))
    z = top + (k + log_sum) / scale
    z = tl.minimum(tl.maximum(z, -60000.0), 60000.0)
    key = _key16(z, DTYPE)
    base = -k_band - k_lo
    j = tl.minimum(tl.maximum((k - k0) / h, -BAND_J), BAND_J).to(tl.int32)
    j = tl.minimum(tl.maximum(j - j_min, 0), tl.maximum(band_w - 1, 0))
    band = (band_w > 0) & (tl.abs(z) < z_band)
    seg = tl.where(key < -k_band, key - k_lo, tl.where(key < k_band, base - j_min, key - k_band + base + band_w))
    return tl.minimum(tl.maximum(tl.where(band, base + j, seg), 0), width - 1)


@triton.jit
def sign_kernel(fparam_ptr, iparam_ptr, count_ptr, prob_ptr, sign_ptr, partial_ptr, partial_ok_ptr,
                own_inv_temperature, other_inv_temperature, SIDE: tl.constexpr, DTYPE_OTHER: tl.constexpr,
                BLOCK: tl.constexpr):
    """Signs of BLOCK bins of one side (SIDE 0 student, 1 teacher) of one pair per program
    (grid: pairs x CAP / BLOCK), written to the side's sign table; the block's sum of
    count * p * sign and whether its searches settled go to partial_ptr (float64) and
    partial_ok_ptr, at (pair * 2 + SIDE) * (CAP / BLOCK) + block."""
    pair = tl.program_id(0)
    block = tl.program_id(1)
    own = (pair * 2 + SIDE).to(tl.int64)
    other = (pair * 2 + 1 - SIDE).to(tl.int64)
    slot = own * (CAP // BLOCK) + block
    flag = tl.load(iparam_ptr + own * PARAM_SLOTS + _FLAG) | tl.load(iparam_ptr + other * PARAM_SLOTS + _FLAG)
    own_width = tl.load(iparam_ptr + own * PARAM_SLOTS + _WIDTH)
    mass = tl.zeros([], tl.float64)
    settled = tl.full([], 1, tl.int32)
    if (flag == 0) & (block * BLOCK < own_width):
        o_top, o_ls, o_k0, o_h, o_zb, o_klo, o_kb, o_jm, o_bw, o_w = _side(fparam_ptr, iparam_ptr, other)
        own_count = count_ptr + own * (CAP + 1)
        other_count = count_ptr + other * (CAP + 1)
        own_prob = prob_ptr + own * CAP
        other_prob = prob_ptr + other * CAP
        own_total = tl.load(own_count + own_width)
        other_total = tl.load(other_count + o_w)
        o_scale = other_inv_temperature * 1.4426950408889634
        bins = block * BLOCK + tl.arange(0, BLOCK)
        inside = bins < own_width
        below = tl.load(own_count + bins, mask=inside, other=0)
        count = tl.load(own_count + bins + 1, mask=inside, other=0) - below
        active = inside & (count > 0)
        v = tl.load(own_prob + bins, mask=inside, other=0.0)
        lo, hi, ok_own = _bounds(own_prob, own_width, bins, v, active, SEARCH_R)
        guess = _estimate(v, o_top, o_ls, o_k0, o_h, o_zb, o_klo, o_kb, o_jm, o_bw, o_w, o_scale, DTYPE_OTHER)
        o_lo, o_hi, ok_other = _bounds(other_prob, o_w, guess, v, active, SEARCH_R)
        own_ge = own_total - tl.load(own_count + lo, mask=active, other=0)
        own_gt = own_total - tl.load(own_count + hi, mask=active, other=0)
        other_ge = other_total - tl.load(other_count + o_lo, mask=active, other=0)
        other_gt = other_total - tl.load(other_count + o_hi, mask=active, other=0)
        if SIDE == 0:
            sign, _unused = _tie_signs(own_gt - other_gt, own_ge - own_gt, other_ge - other_gt)
        else:
            _unused, sign = _tie_signs(other_gt - own_gt, other_ge - other_gt, own_ge - own_gt)
        sign = tl.where(active, sign, 0.0)
        tl.store(sign_ptr + own * CAP + bins, sign, mask=inside)
        mass = tl.sum(tl.where(active, count.to(tl.float64) * v.to(tl.float64) * sign.to(tl.float64), 0.0), 0)
        settled = tl.min((ok_own & ok_other).to(tl.int32), 0)
    tl.store(partial_ptr + slot, mass)
    tl.store(partial_ok_ptr + slot, settled)


@triton.jit
def finish_kernel(fparam_ptr, iparam_ptr, partial_ptr, partial_ok_ptr, row_loss_ptr, batch_start,
                  BLOCKS: tl.constexpr):
    """One pair per program: both sides' sums of p * sign (the blocks' partials, in order),
    the loss, and the pair's flag (on the student side: nonzero hands it to the trie)."""
    pair = tl.program_id(0)
    s_at = (pair * 2).to(tl.int64)
    t_at = s_at + 1
    flag = tl.load(iparam_ptr + s_at * PARAM_SLOTS + _FLAG) | tl.load(iparam_ptr + t_at * PARAM_SLOTS + _FLAG)
    blocks = tl.arange(0, BLOCKS)
    s_mass = tl.sum(tl.load(partial_ptr + s_at * BLOCKS + blocks), 0)
    t_mass = tl.sum(tl.load(partial_ptr + t_at * BLOCKS + blocks), 0)
    settled = tl.min(tl.load(partial_ok_ptr + s_at * BLOCKS + blocks), 0) * tl.min(
        tl.load(partial_ok_ptr + t_at * BLOCKS + blocks), 0)
    flag = flag | ((1 - settled) * 8)
    tl.store(fparam_ptr + s_at * PARAM_SLOTS + _MASS, s_mass.to(tl.float32))
    tl.store(fparam_ptr + t_at * PARAM_SLOTS + _MASS, t_mass.to(tl.float32))
    tl.store(row_loss_ptr + batch_start + pair, (s_mass - t_mass).to(tl.float32))
    tl.store(iparam_ptr + s_at * PARAM_SLOTS + _FLAG, flag)


@triton.jit
def grad_kernel(logits_ptr, index_ptr, grad_ptr, fparam_ptr, iparam_ptr, sign_ptr, batch_start, side,
                n_chunks, vocab, seq_len, batch_stride, row_stride, col_stride, grad_row_stride,
                inv_temperature, grad_scale, GATHER: tl.constexpr, UNIT_STRIDE: tl.constexpr,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """The gradient of one side (side 0 student: +, 1 teacher: -) of unflagged pairs, chunk by
    chunk: (p / T) * (sign of the element's bin - the side's sum of p * sign)."""
    program = tl.program_id(0)
    pair = program // n_chunks
    chunk = program % n_chunks
    flag = tl.load(iparam_ptr + (pair * 2).to(tl.int64) * PARAM_SLOTS + _FLAG)
    row, _unused, row_ptr, _ = _pair_rows(batch_start + pair, logits_ptr, logits_ptr, index_ptr, index_ptr,
                                          seq_len, batch_stride, row_stride, seq_len, batch_stride,
                                          row_stride, GATHER)
    if (flag == 0) & (row >= 0):
        at = pair * 2 + side
        top, log_sum, k0, h, _zb, k_lo, k_band, j_min, band_w, width = _side(fparam_ptr, iparam_ptr, at)
        mass = tl.load(fparam_ptr + at.to(tl.int64) * PARAM_SLOTS + _MASS)
        signs = sign_ptr + at.to(tl.int64) * CAP
        scale = inv_temperature * 1.4426950408889634
        inv_h = 1.0 / h
        factor = inv_temperature * grad_scale * (1.0 - 2.0 * side)
        grad_row = grad_ptr + row * grad_row_stride
        for start in tl.range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, vocab), BLOCK):
            idx = start + tl.arange(0, BLOCK)
            raw = _load_raw(row_ptr, idx, col_stride, vocab, UNIT_STRIDE)
            bins, inside, _in_band, _j = _bins_of(raw, scale, top, log_sum, k0, inv_h, k_lo, k_band, j_min, band_w)
            p = _exp2(_log2_prob(raw.to(tl.float32), scale, top, log_sum))
            sign = tl.load(signs + bins, mask=inside & (p > 0.0), other=0.0)
            tl.store(grad_row + idx, (p * factor * (sign - mass)).to(grad_ptr.dtype.element_ty), mask=idx < vocab)
