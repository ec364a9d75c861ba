"""Triton kernels: the passes of the exact ULD loss, every row pair split across programs.

Each pass is its own launch over a grid of (row pair, chunk of CHUNK columns): thousands of
short programs with few registers keep the SMs busy. The per-pair steps between passes
(combining log-sum-exps, deciding the buckets of a trie level) are done by whichever program
of the pair finishes a pass last (an acquire-release counter per pair and pass). That is
deterministic: the combined values are read in chunk order and every count is an integer.
(A first version walked whole row pairs in a persistent grid, two programs per SM; it was
latency-bound and 1.7x slower: bench/NOTES.md.)

One call handles a batch of pairs with a per-pair workspace (the trie of uld_rows.py):

    stats_kernel   both log-sum-exps per chunk; the last program of a pair combines them, sets
                   the root key range, and settles rows that need no counting (identical, NaN)
    root_kernel    the root histogram of both rows' keys; the last program resolves the root
    count_kernel   one trie level (launched for levels 1 .. SPLIT_LEVELS); the last program
                   resolves it
    deep_kernel    one program per pair finishes any deeper levels (rare: near-identical rows)
    loss_kernel    sum_i a_i g_i - sum_j b_j h_j per chunk; the last program writes the loss
                   (MASS: the buckets already summed their probabilities; no row is read)
    grad_kernel    the gradient, chunk by chunk

The math and the trie are documented in uld_rows.py.
"""

import triton
import triton.language as tl

from uld_kernels.kernels.uld_rows import (
    _CNT_S, _CNT_T, _KEY_HI, _KEY_LO, _MAX_S, _MAX_T, _MIN_S, _MIN_T, _NODE_TOP, _ROOT_BASE,
    _SHIFT_OFFSET, _clamp_key,
    INT_PLANES, MASS_SCALE, SIGN_PLANES,
    _count_level, _finish_lse, _key_of, _pair_rows, _probs_and_keys, _resolve_level,
    _signed_mass, _stats_range, _write_grad,
)
from uld_kernels.kernels.ptx import (
    smem_add_mass, smem_add_one, smem_add_one_packed, smem_load, smem_load_mass, smem_load_packed,
    smem_zero,
)

# Per-pair integers in the meta block of uld_rows.py (slots past its trie levels).
_FLAGS = tl.constexpr(48)  # bit 0: the row has a distribution; bit 1: student == teacher
_STATUS = tl.constexpr(49)  # open buckets of the last level resolved (-1: out of workspace)
_DEPTH = tl.constexpr(50)  # trie levels counted below the root
_DONE_STATS = tl.constexpr(51)  # per-pass counters of the programs that finished
_DONE_ROOT = tl.constexpr(52)
_DONE_LOSS = tl.constexpr(53)
_DONE_LEVEL = tl.constexpr(54)  # + level, levels 1 .. 8
_OPEN_LO = tl.constexpr(44)  # the keys of the root's open buckets lie in [_OPEN_LO, _OPEN_HI]
_OPEN_HI = tl.constexpr(45)
# Per-pair floats.
ROW_FLOATS = tl.constexpr(8)
_S_TOP = tl.constexpr(0)
_S_LOG_SUM = tl.constexpr(1)
_T_TOP = tl.constexpr(2)
_T_LOG_SUM = tl.constexpr(3)
_CE_MAX = tl.constexpr(4)
_CE_LOG_SUM = tl.constexpr(5)
_S_MASS = tl.constexpr(6)
_T_MASS = tl.constexpr(7)
# Per-chunk partial results.
PARTIAL_FLOATS = tl.constexpr(8)
PARTIAL_INTS = tl.constexpr(3)  # columns that differ, NaNs on either side, NaNs of the student


@triton.jit
def _last_of_pair(counter_ptr, n_chunks):
    """Counts this program as done with a pass over its pair; true for the pair's last one.

    The barrier orders every thread's writes before the release; the acquire makes the
    others' writes visible to the last program (which reads them through L2, `.cg`).
    """
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    return done == n_chunks - 1


@triton.jit
def _chunk_of(pid, n_chunks, batch_start, CHUNK: tl.constexpr):
    local = pid // n_chunks
    chunk = pid - local * n_chunks
    return local, batch_start + local, chunk, chunk * CHUNK


@triton.jit(do_not_specialize=["n_chunks", "batch_start", "student_seq_len", "teacher_seq_len"])
def stats_kernel(
    student_ptr, teacher_ptr, row_loss_ptr, status_ptr,
    ws_int_ptr, ws_sign_ptr, ws_meta_ptr, row_f_ptr, ws_mass_ptr, row_mass_ptr, partial_ptr, partial_i_ptr,
    student_index_ptr, teacher_index_ptr, ce_label_ptr, row_ce_ptr,
    n_chunks, batch_start, student_vocab, teacher_vocab,
    student_seq_len, student_batch_stride, student_row_stride, student_col_stride,
    teacher_seq_len, teacher_batch_stride, teacher_row_stride, teacher_col_stride,
    inv_student_temperature, inv_teacher_temperature,
    SAME_VOCAB: tl.constexpr, STUDENT_UNIT_STRIDE: tl.constexpr, TEACHER_UNIT_STRIDE: tl.constexpr,
    GATHER: tl.constexpr, HAS_CE: tl.constexpr,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, CHUNKS_POW2: tl.constexpr, ENTRIES: tl.constexpr,
    RESOLVE_BLOCK: tl.constexpr, MAX_LEVELS: tl.constexpr, STAGES: tl.constexpr,
    ROOT_BITS: tl.constexpr, MASS: tl.constexpr,
):
    """Per (pair, chunk): both rows' log-sum-exp over the chunk; the pair's last program
    combines the chunks and prepares the root."""
    local, pair, chunk, start = _chunk_of(tl.program_id(0), n_chunks, batch_start, CHUNK)
    s_index, t_index, s_row, t_row = _pair_rows(
        pair, student_ptr, teacher_ptr, student_index_ptr, teacher_index_ptr,
        student_seq_len, student_batch_stride, student_row_stride,
        teacher_seq_len, teacher_batch_stride, teacher_row_stride, GATHER)
    meta_ptr = ws_meta_ptr + local.to(tl.int64) * 64
    if s_index < 0:  # padding of the row maps: nothing to read, nothing to write
        if chunk == 0:
            tl.store(row_loss_ptr + pair, 0.0)
            tl.store(status_ptr + pair, 0)
            tl.store(meta_ptr + _FLAGS, 0)
            if HAS_CE:
                tl.store(row_ce_ptr + pair, 0.0)
    else:
        stop = tl.minimum(start + CHUNK, tl.maximum(student_vocab, teacher_vocab))
        (s_max, s_sum, t_max, t_sum, s_min, t_min, differ, nans, student_nans, c_max, c_sum) = _stats_range(
            s_row, t_row, start, stop, student_vocab, teacher_vocab, student_col_stride,
            teacher_col_stride, inv_student_temperature, inv_teacher_temperature,
            STUDENT_UNIT_STRIDE, TEACHER_UNIT_STRIDE, HAS_CE, BLOCK, STAGES)
        s_top, s_log_sum = _finish_lse(s_max, s_sum)
        t_top, t_log_sum = _finish_lse(t_max, t_sum)
        part = partial_ptr + (local.to(tl.int64) * CHUNKS_POW2 + chunk) * PARTIAL_FLOATS
        tl.store(part + 0, s_top)
        tl.store(part + 1, s_log_sum)
        tl.store(part + 2, t_top)
        tl.store(part + 3, t_log_sum)
        tl.store(part + 4, tl.min(s_min, 0))
        tl.store(part + 5, tl.min(t_min, 0))
        if HAS_CE:
            c_top, c_log_sum = _finish_lse(c_max, c_sum)
            tl.store(part + 6, c_top)
            tl.store(part + 7, c_log_sum)
        part_i = partial_i_ptr + (local.to(tl.int64) * CHUNKS_POW2 + chunk) * PARTIAL_INTS
        tl.store(part_i + 0, tl.sum(differ, 0))
        tl.store(part_i + 1, tl.sum(nans, 0))
        tl.store(part_i + 2, tl.sum(student_nans, 0))

        if _last_of_pair(meta_ptr + _DONE_STATS, n_chunks):
            chunks = tl.arange(0, CHUNKS_POW2)
            have = chunks < n_chunks
            parts = partial_ptr + (local.to(tl.int64) * CHUNKS_POW2 + chunks) * PARTIAL_FLOATS
            ws_ptr, sign_ptr, _mass, row_mass = _pair_workspace(local, ws_int_ptr, ws_sign_ptr, ws_mass_ptr,
                                                                row_mass_ptr, ENTRIES)
            row_f = row_f_ptr + local.to(tl.int64) * ROW_FLOATS
            student_top, student_log_sum = _combine_lse(parts + 0, parts + 1, have)
            teacher_top, teacher_log_sum = _combine_lse(parts + 2, parts + 3, have)
            lowest_s = tl.min(tl.load(parts + 4, mask=have, other=float("inf"), cache_modifier=".cg"), 0)
            lowest_t = tl.min(tl.load(parts + 5, mask=have, other=float("inf"), cache_modifier=".cg"), 0)
            parts_i = partial_i_ptr + (local.to(tl.int64) * CHUNKS_POW2 + chunks) * PARTIAL_INTS
            differ_total = tl.sum(tl.load(parts_i + 0, mask=have, other=0, cache_modifier=".cg"), 0)
            any_nan = tl.sum(tl.load(parts_i + 1, mask=have, other=0, cache_modifier=".cg"), 0) > 0
            student_log_sum = tl.where(any_nan, float("nan"), student_log_sum)
            teacher_log_sum = tl.where(any_nan, float("nan"), teacher_log_sum)
            row_ok = (tl.abs(student_top) < float("inf")) & (tl.abs(teacher_top) < float("inf")) & (
                tl.abs(student_log_sum) < float("inf")) & (tl.abs(teacher_log_sum) < float("inf"))
            identical = SAME_VOCAB & (differ_total == 0)
            tl.store(row_f + _S_TOP, student_top)
            tl.store(row_f + _S_LOG_SUM, student_log_sum)
            tl.store(row_f + _T_TOP, teacher_top)
            tl.store(row_f + _T_LOG_SUM, teacher_log_sum)
            if HAS_CE:
                ce_max, ce_log_sum = _combine_lse(parts + 6, parts + 7, have)
                student_nan = tl.sum(tl.load(parts_i + 2, mask=have, other=0, cache_modifier=".cg"), 0) > 0
                ce_log_sum = tl.where(student_nan, float("nan"), ce_log_sum)
                tl.store(row_f + _CE_MAX, ce_max)
                tl.store(row_f + _CE_LOG_SUM, ce_log_sum)
                ce_label = tl.load(ce_label_ptr + pair).to(tl.int32)
                # A label past the vocabulary poisons the row (NaN), it is never read.
                label_logit = tl.load(s_row + tl.maximum(ce_label, 0).to(tl.int64) * student_col_stride,
                                      mask=ce_label < student_vocab, other=float("nan"))
                tl.store(row_ce_ptr + pair, tl.where(ce_label >= 0, (ce_max - label_logit.to(tl.float32)) + ce_log_sum, 0.0))

            # The root: 2**ROOT_BITS power-of-two-aligned buckets over the keys the pair holds.
            ROOT_ENTRIES: tl.constexpr = 1 << ROOT_BITS
            key_hi = tl.maximum(_key_of(student_top, student_top, student_log_sum),
                                _key_of(teacher_top, teacher_top, teacher_log_sum))
            key_lo = tl.maximum(tl.minimum(_key_of(lowest_s, student_top, student_log_sum),
                                           _key_of(lowest_t, teacher_top, teacher_log_sum)), 1)
            root_shift = 0
            while ((key_hi >> root_shift) - (key_lo >> root_shift) >= ROOT_ENTRIES) & (root_shift < 31):
                root_shift += 1
            tl.store(ws_ptr + _NODE_TOP * ENTRIES, 0)
            tl.store(meta_ptr + 0, 0)
            tl.store(meta_ptr + 1, ROOT_ENTRIES)
            tl.store(meta_ptr + _SHIFT_OFFSET - 1, root_shift + ROOT_BITS)
            tl.store(meta_ptr + _SHIFT_OFFSET, root_shift)
            tl.store(meta_ptr + _ROOT_BASE, key_lo >> root_shift)
            root_lo = (key_lo >> root_shift).to(tl.int64) << root_shift
            root_hi = (((key_lo >> root_shift).to(tl.int64) + ROOT_ENTRIES) << root_shift) - 1
            tl.store(meta_ptr + _KEY_LO, root_lo.to(tl.int32))
            tl.store(meta_ptr + _KEY_HI, tl.minimum(root_hi, 2147483647).to(tl.int32))
            tl.store(meta_ptr + _DEPTH, 0)
            tl.store(meta_ptr + _FLAGS, row_ok.to(tl.int32) + 2 * identical.to(tl.int32))
            if MASS:
                tl.store(row_mass, tl.zeros([1], tl.float64).sum(0))
                tl.store(row_mass + 1, tl.zeros([1], tl.float64).sum(0))
            if row_ok & (~identical):
                tl.store(meta_ptr + _STATUS, 1)  # the root is still to be counted
            else:
                # Nothing to count: an empty root decides every bucket with sign 0 (identical
                # rows: every element ties exactly; rows without a distribution: NaN loss).
                for piece in tl.static_range(0, ROOT_ENTRIES, 1024):
                    root = piece + tl.arange(0, 1024)
                    tl.store(ws_ptr + _CNT_S * ENTRIES + root, tl.zeros([1024], tl.int32), mask=root < ROOT_ENTRIES)
                    tl.store(ws_ptr + _CNT_T * ENTRIES + root, tl.zeros([1024], tl.int32), mask=root < ROOT_ENTRIES)
                tl.debug_barrier()
                tl.store(meta_ptr + _STATUS, _resolve_level(ws_ptr, sign_ptr, meta_ptr, 0, ws_ptr, ws_ptr,
                                                            ENTRIES, RESOLVE_BLOCK, MAX_LEVELS, False))


@triton.jit
def _combine_lse(top_ptr, log_sum_ptr, have):
    """Log-sum-exp of a row from its chunks' (maximum, log sum exp(x - maximum)), kept apart."""
    tops = tl.load(top_ptr, mask=have, other=float("-inf"), cache_modifier=".cg")
    log_sums = tl.load(log_sum_ptr, mask=have, other=0.0, cache_modifier=".cg")
    top = tl.max(tops, 0)
    terms = tl.where(tops > float("-inf"), tl.exp((tops - top) + log_sums), 0.0)
    return top, tl.log(tl.sum(terms, 0))


@triton.jit
def _row_state(ws_meta_ptr, row_f_ptr, local):
    meta_ptr = ws_meta_ptr + local.to(tl.int64) * 64
    row_f = row_f_ptr + local.to(tl.int64) * ROW_FLOATS
    flags = tl.load(meta_ptr + _FLAGS)
    return meta_ptr, row_f, flags


@triton.jit
def _pair_workspace(local, ws_int_ptr, ws_sign_ptr, ws_mass_ptr, row_mass_ptr, ENTRIES: tl.constexpr):
    """The pair's trie (int planes, sign planes, int64 masses) and its two signed-mass sums."""
    local = local.to(tl.int64)
    return (ws_int_ptr + local * (INT_PLANES * ENTRIES), ws_sign_ptr + local * (SIGN_PLANES * ENTRIES),
            ws_mass_ptr + local * (2 * ENTRIES), row_mass_ptr + local * 2)


@triton.jit
def _count_level_both(s_row, t_row, student_col_stride, teacher_col_stride,
                      inv_student_temperature, inv_teacher_temperature, row_f, ws_ptr, meta_ptr, mass_ptr,
                      level, start, s_stop, t_stop,
                      ENTRIES: tl.constexpr, BLOCK: tl.constexpr, STUDENT_UNIT_STRIDE: tl.constexpr,
                      TEACHER_UNIT_STRIDE: tl.constexpr, STAGES: tl.constexpr, MAX_LEVELS: tl.constexpr,
                      MASS: tl.constexpr, USE_PTX: tl.constexpr, PREFETCH: tl.constexpr):
    """Counts `level` over columns [start, s_stop) of the student row and [start, t_stop) of
    the teacher row, walking only keys inside the root's open range."""
    key_lo = tl.load(meta_ptr + _OPEN_LO)
    key_hi = tl.load(meta_ptr + _OPEN_HI)
    _count_level(s_row, student_col_stride, inv_student_temperature,
                 tl.load(row_f + _S_TOP), tl.load(row_f + _S_LOG_SUM), ws_ptr, meta_ptr, level,
                 start, s_stop, key_lo, key_hi, mass_ptr,
                 _CNT_S, _MIN_S, _MAX_S, ENTRIES, BLOCK, STUDENT_UNIT_STRIDE, STAGES, MAX_LEVELS, MASS,
                 USE_PTX, PREFETCH)
    _count_level(t_row, teacher_col_stride, inv_teacher_temperature,
                 tl.load(row_f + _T_TOP), tl.load(row_f + _T_LOG_SUM), ws_ptr, meta_ptr, level,
                 start, t_stop, key_lo, key_hi, mass_ptr + ENTRIES,
                 _CNT_T, _MIN_T, _MAX_T, ENTRIES, BLOCK, TEACHER_UNIT_STRIDE, STAGES, MAX_LEVELS, MASS,
                 USE_PTX, PREFETCH)


@triton.jit(do_not_specialize=["n_chunks", "batch_start", "student_seq_len", "teacher_seq_len"])
def root_kernel(
    student_ptr, teacher_ptr, ws_int_ptr, ws_sign_ptr, ws_meta_ptr, row_f_ptr, ws_mass_ptr, row_mass_ptr,
    student_index_ptr, teacher_index_ptr, root_partial_ptr, root_mass_partial_ptr,
    n_chunks, batch_start, student_vocab, teacher_vocab,
    student_seq_len, student_batch_stride, student_row_stride, student_col_stride,
    teacher_seq_len, teacher_batch_stride, teacher_row_stride, teacher_col_stride,
    inv_student_temperature, inv_teacher_temperature,
    STUDENT_UNIT_STRIDE: tl.constexpr, TEACHER_UNIT_STRIDE: tl.constexpr, GATHER: tl.constexpr,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, ENTRIES: tl.constexpr,
    RESOLVE_BLOCK: tl.constexpr, MAX_LEVELS: tl.constexpr, STAGES: tl.constexpr,
    ROOT_BITS: tl.constexpr, USE_PTX: tl.constexpr, MASS: tl.constexpr,
):
    """Per (pair, chunk): the root histogram of the chunk's keys (2**ROOT_BITS buckets per
    side), written as the chunk's partial counts; the pair's last program adds the chunks up
    in order and decides the root buckets.

    USE_PTX (GPU): shared-memory reductions, one instruction per element (kernels/ptx.py);
    otherwise `tl.histogram` (the interpreter). MASS: each bucket also sums its elements'
    probabilities (int64 fixed point), so that resolving a bucket adds its signed mass to the
    loss and no pass over the rows is left to sum the loss."""
    ROOT_ENTRIES: tl.constexpr = 1 << ROOT_BITS
    if USE_PTX and MASS:
        tl.static_assert(CHUNK <= 65535, "16-bit shared-memory counts: at most 65,535 columns per chunk")
    local, pair, chunk, start = _chunk_of(tl.program_id(0), n_chunks, batch_start, CHUNK)
    meta_ptr, row_f, flags = _row_state(ws_meta_ptr, row_f_ptr, local)
    if flags == 1:  # a distribution on both sides, not identical
        s_index, t_index, s_row, t_row = _pair_rows(
            pair, student_ptr, teacher_ptr, student_index_ptr, teacher_index_ptr,
            student_seq_len, student_batch_stride, student_row_stride,
            teacher_seq_len, teacher_batch_stride, teacher_row_stride, GATHER)
        ws_ptr, sign_ptr, mass_ptr, row_mass = _pair_workspace(local, ws_int_ptr, ws_sign_ptr, ws_mass_ptr,
                                                               row_mass_ptr, ENTRIES)
        s_top = tl.load(row_f + _S_TOP)
        s_log_sum = tl.load(row_f + _S_LOG_SUM)
        t_top = tl.load(row_f + _T_TOP)
        t_log_sum = tl.load(row_f + _T_LOG_SUM)
        root_shift = tl.load(meta_ptr + _SHIFT_OFFSET)
        root_base = tl.load(meta_ptr + _ROOT_BASE)
        lanes = tl.arange(0, BLOCK)
        partial = root_partial_ptr + (local.to(tl.int64) * n_chunks + chunk) * (2 * ROOT_ENTRIES)
        stop = tl.minimum(start + CHUNK, tl.maximum(student_vocab, teacher_vocab))
        mass_partial = root_mass_partial_ptr + (local.to(tl.int64) * n_chunks + chunk) * (2 * ROOT_ENTRIES)
        if USE_PTX:
            smem_zero(MASS)
            tl.debug_barrier()
        else:
            student_hist = tl.zeros([ROOT_ENTRIES], tl.int32)
            teacher_hist = tl.zeros([ROOT_ENTRIES], tl.int32)
            if MASS:  # global atomics into this chunk's own partial (the interpreter)
                for piece in tl.static_range(0, 2 * ROOT_ENTRIES, 1024):
                    tl.store(mass_partial + piece + tl.arange(0, 1024), tl.zeros([1024], tl.int64))
                tl.debug_barrier()
        for block_start in tl.range(start, stop, BLOCK, num_stages=STAGES):
            idx = block_start + lanes
            ps, ks, counted_s, _zs = _probs_and_keys(s_row, idx, student_col_stride, student_vocab,
                                                     inv_student_temperature, s_top, s_log_sum,
                                                     STUDENT_UNIT_STRIDE)
            pt, kt, counted_t, _zt = _probs_and_keys(t_row, idx, teacher_col_stride, teacher_vocab,
                                                     inv_teacher_temperature, t_top, t_log_sum,
                                                     TEACHER_UNIT_STRIDE)
            ds = (_clamp_key(ks, meta_ptr) >> root_shift) - root_base  # in [0, ROOT_ENTRIES)
            dt = (_clamp_key(kt, meta_ptr) >> root_shift) - root_base
            if USE_PTX:
                if MASS:  # 16-bit counts, so that the masses fit beside them
                    smem_add_one_packed(tl.where(counted_s, ds, -1))
                    smem_add_one_packed(tl.where(counted_t, dt + ROOT_ENTRIES, -1))
                    smem_add_mass(tl.where(counted_s, ds, -1), (ps * MASS_SCALE).to(tl.int64))
                    smem_add_mass(tl.where(counted_t, dt + ROOT_ENTRIES, -1), (pt * MASS_SCALE).to(tl.int64))
                else:
                    smem_add_one(tl.where(counted_s, ds, -1))
                    smem_add_one(tl.where(counted_t, dt + ROOT_ENTRIES, -1))
            else:
                student_hist += tl.histogram(ds, ROOT_ENTRIES, mask=counted_s)
                teacher_hist += tl.histogram(dt, ROOT_ENTRIES, mask=counted_t)
                if MASS:
                    tl.atomic_add(mass_partial + ds, (ps * MASS_SCALE).to(tl.int64), mask=counted_s, sem="relaxed")
                    tl.atomic_add(mass_partial + ROOT_ENTRIES + dt, (pt * MASS_SCALE).to(tl.int64),
                                  mask=counted_t, sem="relaxed")
        if USE_PTX:
            tl.debug_barrier()
            for piece in tl.static_range(0, 2 * ROOT_ENTRIES, 1024):
                word = piece + tl.arange(0, 1024)
                if MASS:
                    tl.store(partial + word, smem_load_packed(word))
                    tl.store(mass_partial + word, smem_load_mass(word))
                else:
                    tl.store(partial + word, smem_load(word))
        else:
            root = tl.arange(0, ROOT_ENTRIES)
            tl.store(partial + root, student_hist)
            tl.store(partial + ROOT_ENTRIES + root, teacher_hist)
        if _last_of_pair(meta_ptr + _DONE_ROOT, n_chunks):
            counts_first = root_partial_ptr + local.to(tl.int64) * n_chunks * (2 * ROOT_ENTRIES)
            for piece in tl.static_range(0, ROOT_ENTRIES, 1024):
                root = piece + tl.arange(0, 1024)
                student_count = tl.zeros([1024], tl.int32)
                teacher_count = tl.zeros([1024], tl.int32)
                for c in range(0, n_chunks):
                    student_count += tl.load(counts_first + c * (2 * ROOT_ENTRIES) + root, cache_modifier=".cg")
                    teacher_count += tl.load(counts_first + c * (2 * ROOT_ENTRIES) + ROOT_ENTRIES + root,
                                             cache_modifier=".cg")
                tl.store(ws_ptr + _CNT_S * ENTRIES + root, student_count)
                tl.store(ws_ptr + _CNT_T * ENTRIES + root, teacher_count)
                if MASS:
                    first_mass = root_mass_partial_ptr + local.to(tl.int64) * n_chunks * (2 * ROOT_ENTRIES)
                    student_mass = tl.zeros([1024], tl.int64)
                    teacher_mass = tl.zeros([1024], tl.int64)
                    for c in range(0, n_chunks):
                        student_mass += tl.load(first_mass + c * (2 * ROOT_ENTRIES) + root, cache_modifier=".cg")
                        teacher_mass += tl.load(first_mass + c * (2 * ROOT_ENTRIES) + ROOT_ENTRIES + root,
                                                cache_modifier=".cg")
                    tl.store(mass_ptr + root, student_mass)
                    tl.store(mass_ptr + ENTRIES + root, teacher_mass)
            tl.debug_barrier()
            status = _resolve_level(ws_ptr, sign_ptr, meta_ptr, 0, mass_ptr, row_mass,
                                    ENTRIES, RESOLVE_BLOCK, MAX_LEVELS, MASS)
            tl.store(meta_ptr + _STATUS, status)
            if status > 0:
                # The key range of the open buckets (their signs are NaN): the levels below
                # walk only keys inside it.
                tl.debug_barrier()
                open_first = ROOT_ENTRIES
                open_last = -1
                for piece in tl.static_range(0, ROOT_ENTRIES, 1024):
                    root = piece + tl.arange(0, 1024)
                    sign = tl.load(sign_ptr + root, cache_modifier=".cg")
                    open_first = tl.minimum(open_first, tl.min(tl.where(sign != sign, root, ROOT_ENTRIES), 0))
                    open_last = tl.maximum(open_last, tl.max(tl.where(sign != sign, root, -1), 0))
                tl.store(meta_ptr + _OPEN_LO, ((root_base + open_first).to(tl.int64) << root_shift).to(tl.int32))
                tl.store(meta_ptr + _OPEN_HI, (((root_base + open_last + 1).to(tl.int64) << root_shift) - 1).to(tl.int32))


@triton.jit(do_not_specialize=["n_chunks", "batch_start", "level", "student_seq_len", "teacher_seq_len"])
def count_kernel(
    student_ptr, teacher_ptr, ws_int_ptr, ws_sign_ptr, ws_meta_ptr, row_f_ptr, ws_mass_ptr, row_mass_ptr,
    student_index_ptr, teacher_index_ptr,
    n_chunks, batch_start, level, student_vocab, teacher_vocab,
    student_seq_len, student_batch_stride, student_row_stride, student_col_stride,
    teacher_seq_len, teacher_batch_stride, teacher_row_stride, teacher_col_stride,
    inv_student_temperature, inv_teacher_temperature,
    STUDENT_UNIT_STRIDE: tl.constexpr, TEACHER_UNIT_STRIDE: tl.constexpr, GATHER: tl.constexpr,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, ENTRIES: tl.constexpr,
    RESOLVE_BLOCK: tl.constexpr, MAX_LEVELS: tl.constexpr, STAGES: tl.constexpr, MASS: tl.constexpr,
    USE_PTX: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Per (pair, chunk) of the pairs whose trie has open buckets at `level - 1`: count the
    chunk's keys one level down; the pair's last program resolves `level`."""
    local, pair, chunk, start = _chunk_of(tl.program_id(0), n_chunks, batch_start, CHUNK)
    meta_ptr, row_f, flags = _row_state(ws_meta_ptr, row_f_ptr, local)
    if (flags == 1) & (tl.load(meta_ptr + _STATUS) > 0) & (tl.load(meta_ptr + _DEPTH) == level - 1):
        s_index, t_index, s_row, t_row = _pair_rows(
            pair, student_ptr, teacher_ptr, student_index_ptr, teacher_index_ptr,
            student_seq_len, student_batch_stride, student_row_stride,
            teacher_seq_len, teacher_batch_stride, teacher_row_stride, GATHER)
        ws_ptr, sign_ptr, mass_ptr, row_mass = _pair_workspace(local, ws_int_ptr, ws_sign_ptr, ws_mass_ptr,
                                                               row_mass_ptr, ENTRIES)
        _count_level_both(s_row, t_row, student_col_stride, teacher_col_stride,
                          inv_student_temperature, inv_teacher_temperature, row_f, ws_ptr, meta_ptr, mass_ptr,
                          level, start, tl.minimum(start + CHUNK, student_vocab),
                          tl.minimum(start + CHUNK, teacher_vocab), ENTRIES, BLOCK, STUDENT_UNIT_STRIDE,
                          TEACHER_UNIT_STRIDE, STAGES, MAX_LEVELS, MASS, USE_PTX, PREFETCH)
        if _last_of_pair(meta_ptr + _DONE_LEVEL + level, n_chunks):
            tl.store(meta_ptr + _DEPTH, level)
            tl.store(meta_ptr + _STATUS, _resolve_level(ws_ptr, sign_ptr, meta_ptr, level, mass_ptr, row_mass,
                                                        ENTRIES, RESOLVE_BLOCK, MAX_LEVELS, MASS))


@triton.jit(do_not_specialize=["batch_start", "student_seq_len", "teacher_seq_len"])
def deep_kernel(
    student_ptr, teacher_ptr, ws_int_ptr, ws_sign_ptr, ws_meta_ptr, row_f_ptr, ws_mass_ptr, row_mass_ptr,
    student_index_ptr, teacher_index_ptr,
    batch_start, student_vocab, teacher_vocab,
    student_seq_len, student_batch_stride, student_row_stride, student_col_stride,
    teacher_seq_len, teacher_batch_stride, teacher_row_stride, teacher_col_stride,
    inv_student_temperature, inv_teacher_temperature,
    STUDENT_UNIT_STRIDE: tl.constexpr, TEACHER_UNIT_STRIDE: tl.constexpr, GATHER: tl.constexpr,
    BLOCK: tl.constexpr, ENTRIES: tl.constexpr,
    RESOLVE_BLOCK: tl.constexpr, MAX_LEVELS: tl.constexpr, STAGES: tl.constexpr, MASS: tl.constexpr,
    USE_PTX: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Per pair still open after the split levels: one program counts and resolves the
    remaining levels over the whole rows."""
    local = tl.program_id(0)
    pair = batch_start + local
    meta_ptr, row_f, flags = _row_state(ws_meta_ptr, row_f_ptr, local)
    status = tl.load(meta_ptr + _STATUS)
    if (flags == 1) & (status > 0):
        s_index, t_index, s_row, t_row = _pair_rows(
            pair, student_ptr, teacher_ptr, student_index_ptr, teacher_index_ptr,
            student_seq_len, student_batch_stride, student_row_stride,
            teacher_seq_len, teacher_batch_stride, teacher_row_stride, GATHER)
        ws_ptr, sign_ptr, mass_ptr, row_mass = _pair_workspace(local, ws_int_ptr, ws_sign_ptr, ws_mass_ptr,
                                                               row_mass_ptr, ENTRIES)
        depth = tl.load(meta_ptr + _DEPTH)
        while status > 0:
            depth += 1
            _count_level_both(s_row, t_row, student_col_stride, teacher_col_stride,
                              inv_student_temperature, inv_teacher_temperature, row_f, ws_ptr,
                              meta_ptr, mass_ptr, depth, 0, student_vocab, teacher_vocab, ENTRIES, BLOCK,
                              STUDENT_UNIT_STRIDE, TEACHER_UNIT_STRIDE, STAGES, MAX_LEVELS, MASS, USE_PTX, PREFETCH)
            tl.debug_barrier()
            status = _resolve_level(ws_ptr, sign_ptr, meta_ptr, depth, mass_ptr, row_mass,
                                    ENTRIES, RESOLVE_BLOCK, MAX_LEVELS, MASS)
            tl.debug_barrier()
        tl.store(meta_ptr + _DEPTH, depth)
        tl.store(meta_ptr + _STATUS, status)


@triton.jit(do_not_specialize=["n_chunks", "batch_start", "student_seq_len", "teacher_seq_len"])
def loss_kernel(
    student_ptr, teacher_ptr, row_loss_ptr, status_ptr,
    ws_int_ptr, ws_sign_ptr, ws_meta_ptr, row_f_ptr, ws_mass_ptr, row_mass_ptr, partial_ptr,
    student_index_ptr, teacher_index_ptr,
    n_chunks, batch_start, student_vocab, teacher_vocab,
    student_seq_len, student_batch_stride, student_row_stride, student_col_stride,
    teacher_seq_len, teacher_batch_stride, teacher_row_stride, teacher_col_stride,
    inv_student_temperature, inv_teacher_temperature,
    STUDENT_UNIT_STRIDE: tl.constexpr, TEACHER_UNIT_STRIDE: tl.constexpr, GATHER: tl.constexpr,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, CHUNKS_POW2: tl.constexpr, ENTRIES: tl.constexpr,
    MAX_LEVELS: tl.constexpr, STAGES: tl.constexpr, MASS: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Per (pair, chunk): sum p * sign over the chunk on both sides; the pair's last program
    writes the loss sum_i a_i g_i - sum_j b_j h_j and the status."""
    local, pair, chunk, start = _chunk_of(tl.program_id(0), n_chunks, batch_start, CHUNK)
    meta_ptr, row_f, flags = _row_state(ws_meta_ptr, row_f_ptr, local)
    s_index, t_index, s_row, t_row = _pair_rows(
        pair, student_ptr, teacher_ptr, student_index_ptr, teacher_index_ptr,
        student_seq_len, student_batch_stride, student_row_stride,
        teacher_seq_len, teacher_batch_stride, teacher_row_stride, GATHER)
    if s_index >= 0:
        depth = tl.load(meta_ptr + _DEPTH)
        if MASS:  # the signed masses were summed bucket by bucket while resolving the trie
            final = chunk == 0
            _ws, _sign, _mass, row_mass = _pair_workspace(local, ws_int_ptr, ws_sign_ptr, ws_mass_ptr,
                                                           row_mass_ptr, ENTRIES)
            student_mass = (tl.load(row_mass) * (1.0 / MASS_SCALE)).to(tl.float32)
            teacher_mass = (tl.load(row_mass + 1) * (1.0 / MASS_SCALE)).to(tl.float32)
        else:
            student_mass = 0.0
            teacher_mass = 0.0
            if flags == 1:  # identical rows and rows without a distribution have nothing to sum
                ws_ptr, sign_ptr, _mass, _row_mass = _pair_workspace(local, ws_int_ptr, ws_sign_ptr,
                                                                     ws_mass_ptr, row_mass_ptr, ENTRIES)
                student_mass = _signed_mass(
                    s_row, student_col_stride, inv_student_temperature,
                    tl.load(row_f + _S_TOP), tl.load(row_f + _S_LOG_SUM), ws_ptr, sign_ptr, meta_ptr, depth,
                    start, tl.minimum(start + CHUNK, student_vocab),
                    ENTRIES, BLOCK, STUDENT_UNIT_STRIDE, STAGES, MAX_LEVELS, PREFETCH)
                teacher_mass = _signed_mass(
                    t_row, teacher_col_stride, inv_teacher_temperature,
                    tl.load(row_f + _T_TOP), tl.load(row_f + _T_LOG_SUM), ws_ptr, sign_ptr + ENTRIES, meta_ptr,
                    depth, start, tl.minimum(start + CHUNK, teacher_vocab),
                    ENTRIES, BLOCK, TEACHER_UNIT_STRIDE, STAGES, MAX_LEVELS, PREFETCH)
            part = partial_ptr + (local.to(tl.int64) * CHUNKS_POW2 + chunk) * PARTIAL_FLOATS
            tl.store(part + 0, student_mass)
            tl.store(part + 1, teacher_mass)
            final = _last_of_pair(meta_ptr + _DONE_LOSS, n_chunks)
            if final:
                chunks = tl.arange(0, CHUNKS_POW2)
                parts = partial_ptr + (local.to(tl.int64) * CHUNKS_POW2 + chunks) * PARTIAL_FLOATS
                have = chunks < n_chunks
                student_mass = tl.sum(tl.load(parts + 0, mask=have, other=0.0, cache_modifier=".cg"), 0)
                teacher_mass = tl.sum(tl.load(parts + 1, mask=have, other=0.0, cache_modifier=".cg"), 0)
        if final:
            exhausted = tl.load(meta_ptr + _STATUS) < 0
            failed = ((flags & 1) == 0) | exhausted
            loss = tl.where(failed, float("nan"), student_mass - teacher_mass)
            tl.store(row_f + _S_MASS, tl.where(failed, float("nan"), student_mass))
            tl.store(row_f + _T_MASS, tl.where(failed, float("nan"), teacher_mass))
            tl.store(row_loss_ptr + pair, loss)
            # status: bit 0 = workspace exhausted, bits 1.. = trie levels counted below the root
            tl.store(status_ptr + pair, exhausted.to(tl.int32) + 2 * depth)


@triton.jit(do_not_specialize=["n_chunks", "batch_start", "student_seq_len", "teacher_seq_len"])
def grad_kernel(
    student_ptr, teacher_ptr, grad_student_ptr, grad_teacher_ptr,
    ws_int_ptr, ws_sign_ptr, ws_meta_ptr, row_f_ptr, ws_mass_ptr, row_mass_ptr,
    student_index_ptr, teacher_index_ptr, row_weight_ptr, ce_label_ptr, ce_weight_ptr,
    n_chunks, batch_start, student_vocab, teacher_vocab,
    student_seq_len, student_batch_stride, student_row_stride, student_col_stride,
    teacher_seq_len, teacher_batch_stride, teacher_row_stride, teacher_col_stride,
    grad_student_row_stride, grad_teacher_row_stride,
    inv_student_temperature, inv_teacher_temperature, grad_scale,
    STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    STUDENT_UNIT_STRIDE: tl.constexpr, TEACHER_UNIT_STRIDE: tl.constexpr,
    GATHER: tl.constexpr, HAS_CE: tl.constexpr,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, ENTRIES: tl.constexpr,
    MAX_LEVELS: tl.constexpr, STAGES: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Per (pair, chunk): the gradient of grad_scale * weight * loss (plus, with HAS_CE, the
    weighted cross-entropy's) over the chunk's columns."""
    local, pair, chunk, start = _chunk_of(tl.program_id(0), n_chunks, batch_start, CHUNK)
    meta_ptr, row_f, flags = _row_state(ws_meta_ptr, row_f_ptr, local)
    s_index, t_index, s_row, t_row = _pair_rows(
        pair, student_ptr, teacher_ptr, student_index_ptr, teacher_index_ptr,
        student_seq_len, student_batch_stride, student_row_stride,
        teacher_seq_len, teacher_batch_stride, teacher_row_stride, GATHER)
    if s_index >= 0:
        if GATHER:
            row_grad_scale = grad_scale * tl.load(row_weight_ptr + pair)
        else:
            row_grad_scale = grad_scale
        ws_ptr, sign_ptr, _mass, _row_mass = _pair_workspace(local, ws_int_ptr, ws_sign_ptr, ws_mass_ptr,
                                                             row_mass_ptr, ENTRIES)
        depth = tl.load(meta_ptr + _DEPTH)
        if STUDENT_GRAD:
            ce_max = 0.0
            ce_log_sum = 0.0
            ce_label = -1
            ce_factor = 0.0
            if HAS_CE:
                ce_max = tl.load(row_f + _CE_MAX)
                ce_log_sum = tl.load(row_f + _CE_LOG_SUM)
                ce_label = tl.load(ce_label_ptr + pair).to(tl.int32)
                ce_factor = tl.where(ce_label >= 0, tl.load(ce_weight_ptr + pair), 0.0)
            _write_grad(s_row, student_col_stride, inv_student_temperature,
                        tl.load(row_f + _S_TOP), tl.load(row_f + _S_LOG_SUM), ws_ptr, sign_ptr, meta_ptr,
                        depth, start, tl.minimum(start + CHUNK, student_vocab), tl.load(row_f + _S_MASS),
                        row_grad_scale, grad_student_ptr + s_index * grad_student_row_stride,
                        ce_max, ce_log_sum, ce_label, ce_factor,
                        ENTRIES, BLOCK, STUDENT_UNIT_STRIDE, STAGES, MAX_LEVELS, HAS_CE, PREFETCH)
        if TEACHER_GRAD:
            _write_grad(t_row, teacher_col_stride, inv_teacher_temperature,
                        tl.load(row_f + _T_TOP), tl.load(row_f + _T_LOG_SUM), ws_ptr, sign_ptr + ENTRIES,
                        meta_ptr, depth, start, tl.minimum(start + CHUNK, teacher_vocab),
                        tl.load(row_f + _T_MASS), -row_grad_scale,
                        grad_teacher_ptr + t_index * grad_teacher_row_stride,
                        0.0, 0.0, -1, 0.0,
                        ENTRIES, BLOCK, TEACHER_UNIT_STRIDE, STAGES, MAX_LEVELS, False, PREFETCH)
