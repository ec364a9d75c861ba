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
                   resolves it. Level 1 (LOSS) also sums p * sign over every element the root
                   decided, so no separate pass over the rows sums the loss; the elements the
                   root left open carry their probability into the buckets they reach, and each
                   bucket adds its signed mass when it is resolved
    finish_kernel  one program per pair: any deeper levels (rare: near-identical rows), then
                   the loss from the level-1 sums and the resolved buckets' masses
    grad_kernel    the gradient, chunk by chunk

The math and the trie are documented in uld_rows.py.
"""

import triton
import triton.language as tl

from uld_kernels.kernels.const import const
from uld_kernels.kernels.uld_rows import (
    _CNT_S, _CNT_T, _KEY_HI, _KEY_LO, _MAX_S, _MAX_T, _MIN_S, _MIN_T, _NODE_TOP, _ROOT_BASE,
    _KEY_NONE_MAX, _KEY_NONE_MIN, _SHIFT_OFFSET, _clamp_key,
    INT_PLANES, LN2, LOG2E, MASS_SCALE, META_SLOTS, SIGN_PLANES,
    _count_level, _count_listed, _finish_lse2, _keys_of, _pair_rows, _probs_and_keys, _resolve_level,
    _stats_range, _write_grad,
)
from uld_kernels.kernels.ptx import L1_CAP, L1_KEY_FLIP, l1_clear, l1_load, l1_load_mass, smem_add_one, smem_address, smem_load, smem_zero

# Per-pair integers in the meta block of uld_rows.py (slots past its trie levels).
_FLAGS = const(48)  # bit 0: the row has a distribution; bit 1: student == teacher
_STATUS = const(49)  # open buckets of the last level resolved (-1: out of workspace)
_DEPTH = const(50)  # trie levels counted below the root
_DONE_STATS = const(51)  # per-pass counters of the programs that finished
_DONE_ROOT = const(52)
_DONE_LEVEL = const(54)  # + level, levels 1 .. 8
_OPEN_LO = const(44)  # the keys of the root's open buckets lie in [_OPEN_LO, _OPEN_HI]
_OPEN_HI = const(45)
_LISTED_S = const(53)  # columns the trie fallback's finish pass listed, student and teacher
_LISTED_T = const(63)  # free while _DONE_LEVEL + split levels (at most 8: launch.py) < 63
# Per-pair floats: largest logits (tops) and base-2 log-sums (uld_rows._keys_of).
ROW_FLOATS = const(8)
_S_TOP = const(0)
_S_LOG_SUM = const(1)
_T_TOP = const(2)
_T_LOG_SUM = const(3)
_CE_TOP = const(4)
_CE_LOG_SUM = const(5)
_S_MASS = const(6)  # sum p * sign of each side: the softmax backward needs the student's
_T_MASS = const(7)
# Per-chunk partial results: the stats pass's (below), then the level-1 pass's signed sums at 0, 1.
PARTIAL_FLOATS = const(8)
_P_S_TOP = const(0)
_P_S_LOG_SUM = const(1)
_P_T_TOP = const(2)
_P_T_LOG_SUM = const(3)
_P_S_LOW = const(4)  # smallest finite logit
_P_T_LOW = const(5)
_P_CE_LOG_SUM = const(6)  # the cross-entropy's top is the student's
PARTIAL_INTS = const(1)  # columns that differ between the rows


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
    ROOT_BITS: tl.constexpr,
):
    """Per (pair, chunk): both rows' log-sum-exp over the chunk; the pair's last program
    combines the chunks and prepares the root."""
    local, pair, chunk, start = _chunk_of(tl.program_id(0), n_chunks, batch_start, CHUNK)
    _stats_pass(
        local, pair, chunk, start, student_ptr, teacher_ptr, row_loss_ptr, status_ptr, ws_int_ptr, ws_sign_ptr,
        ws_meta_ptr, row_f_ptr, ws_mass_ptr, row_mass_ptr, partial_ptr, partial_i_ptr, student_index_ptr,
        teacher_index_ptr, ce_label_ptr, row_ce_ptr, n_chunks, student_vocab, teacher_vocab, student_seq_len,
        student_batch_stride, student_row_stride, student_col_stride, teacher_seq_len, teacher_batch_stride,
        teacher_row_stride, teacher_col_stride, inv_student_temperature, inv_teacher_temperature, SAME_VOCAB,
        STUDENT_UNIT_STRIDE, TEACHER_UNIT_STRIDE, GATHER, HAS_CE, BLOCK, CHUNK, CHUNKS_POW2, ENTRIES,
        RESOLVE_BLOCK, MAX_LEVELS, STAGES, ROOT_BITS)


@triton.jit
def _stats_pass(
    local, pair, chunk, start, student_ptr, teacher_ptr, row_loss_ptr, status_ptr, ws_int_ptr, ws_sign_ptr,
    ws_meta_ptr, row_f_ptr, ws_mass_ptr, row_mass_ptr, partial_ptr, partial_i_ptr, student_index_ptr,
    teacher_index_ptr, ce_label_ptr, row_ce_ptr, n_chunks, student_vocab, teacher_vocab, student_seq_len,
    student_batch_stride, student_row_stride, student_col_stride, teacher_seq_len, teacher_batch_stride,
    teacher_row_stride, teacher_col_stride, inv_student_temperature, inv_teacher_temperature,
    SAME_VOCAB: tl.constexpr, STUDENT_UNIT_STRIDE: tl.constexpr, TEACHER_UNIT_STRIDE: tl.constexpr,
    GATHER: tl.constexpr, HAS_CE: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
    CHUNKS_POW2: tl.constexpr, ENTRIES: tl.constexpr, RESOLVE_BLOCK: tl.constexpr, MAX_LEVELS: tl.constexpr,
    STAGES: tl.constexpr, ROOT_BITS: tl.constexpr,
):
    """`stats_kernel` for one (pair, chunk): `local` is the pair's workspace slot, `pair` its
    index in the outputs and the row maps."""
    s_index, t_index, s_row, t_row = _pair_rows(
        pair, student_ptr, teacher_ptr, student_index_ptr, teacher_index_ptr,
        student_seq_len, student_batch_stride, student_row_stride,
        teacher_seq_len, teacher_batch_stride, teacher_row_stride, GATHER)
    meta_ptr = ws_meta_ptr + local.to(tl.int64) * 64
    student_scale = inv_student_temperature * LOG2E
    teacher_scale = inv_teacher_temperature * LOG2E
    if s_index < 0:  # padding of the row maps: nothing to read, nothing to write
        if chunk == 0:
            tl.store(row_loss_ptr + pair, 0.0)
            tl.store(status_ptr + pair, 0)
            tl.store(meta_ptr + _FLAGS, 0)
            if HAS_CE:
                tl.store(row_ce_ptr + pair, 0.0)
    else:
        stop = tl.minimum(start + CHUNK, tl.maximum(student_vocab, teacher_vocab))
        (s_top, s_total, t_top, t_total, c_total, s_low, t_low, differ) = _stats_range(
            s_row, t_row, start, stop, student_vocab, teacher_vocab, student_col_stride,
            teacher_col_stride, student_scale, teacher_scale,
            STUDENT_UNIT_STRIDE, TEACHER_UNIT_STRIDE, SAME_VOCAB, HAS_CE, BLOCK)
        part = partial_ptr + (local.to(tl.int64) * CHUNKS_POW2 + chunk) * PARTIAL_FLOATS
        chunk_top, chunk_log_sum = _finish_lse2(s_top, s_total, student_scale)
        tl.store(part + _P_S_TOP, chunk_top)
        tl.store(part + _P_S_LOG_SUM, chunk_log_sum)
        if HAS_CE:
            _same_top, chunk_log_sum = _finish_lse2(s_top, c_total, LOG2E)
            tl.store(part + _P_CE_LOG_SUM, chunk_log_sum)
        chunk_top, chunk_log_sum = _finish_lse2(t_top, t_total, teacher_scale)
        tl.store(part + _P_T_TOP, chunk_top)
        tl.store(part + _P_T_LOG_SUM, chunk_log_sum)
        tl.store(part + _P_S_LOW, tl.min(s_low, 0))
        tl.store(part + _P_T_LOW, tl.min(t_low, 0))
        tl.store(partial_i_ptr + local.to(tl.int64) * CHUNKS_POW2 + chunk, tl.sum(differ, 0))

        if _last_of_pair(meta_ptr + _DONE_STATS, n_chunks):
            chunks = tl.arange(0, CHUNKS_POW2)
            have = chunks < n_chunks
            parts = partial_ptr + (local.to(tl.int64) * CHUNKS_POW2 + chunks) * PARTIAL_FLOATS
            ws_ptr, sign_ptr, mass_ptr, row_mass = _pair_workspace(local, ws_int_ptr, ws_sign_ptr, ws_mass_ptr,
                                                                   row_mass_ptr, ENTRIES, ROOT_BITS)
            row_f = row_f_ptr + local.to(tl.int64) * ROW_FLOATS
            student_top, student_log_sum = _combine_lse(parts + _P_S_TOP, parts + _P_S_LOG_SUM, have,
                                                        student_scale)
            teacher_top, teacher_log_sum = _combine_lse(parts + _P_T_TOP, parts + _P_T_LOG_SUM, have,
                                                        teacher_scale)
            # A NaN anywhere in the pair makes both sides' log-sums NaN: the row has no loss.
            any_nan = (student_log_sum != student_log_sum) | (teacher_log_sum != teacher_log_sum)
            student_log_sum = tl.where(any_nan, float("nan"), student_log_sum)
            teacher_log_sum = tl.where(any_nan, float("nan"), teacher_log_sum)
            lowest_s = tl.min(tl.load(parts + _P_S_LOW, mask=have, other=float("inf"), cache_modifier=".cg"), 0)
            lowest_t = tl.min(tl.load(parts + _P_T_LOW, mask=have, other=float("inf"), cache_modifier=".cg"), 0)
            differ_total = tl.sum(tl.load(partial_i_ptr + local.to(tl.int64) * CHUNKS_POW2 + chunks, mask=have,
                                          other=0, cache_modifier=".cg"), 0)
            row_ok = (tl.abs(student_top) < float("inf")) & (tl.abs(teacher_top) < float("inf")) & (
                tl.abs(student_log_sum) < float("inf")) & (tl.abs(teacher_log_sum) < float("inf"))
            # Equal logits give equal distributions only at equal temperatures.
            identical = SAME_VOCAB & (differ_total == 0) & (student_scale == teacher_scale)
            tl.store(row_f + _S_TOP, student_top)
            tl.store(row_f + _S_LOG_SUM, student_log_sum)
            tl.store(row_f + _T_TOP, teacher_top)
            tl.store(row_f + _T_LOG_SUM, teacher_log_sum)
            if HAS_CE:
                ce_top, ce_log_sum = _combine_lse(parts + _P_S_TOP, parts + _P_CE_LOG_SUM, have, LOG2E)
                tl.store(row_f + _CE_TOP, ce_top)
                tl.store(row_f + _CE_LOG_SUM, ce_log_sum)
                ce_label = tl.load(ce_label_ptr + pair).to(tl.int32)
                # A label past the vocabulary poisons the row (NaN), it is never read.
                label_logit = tl.load(s_row + tl.maximum(ce_label, 0).to(tl.int64) * student_col_stride,
                                      mask=ce_label < student_vocab, other=float("nan")).to(tl.float32)
                ce = (ce_top - label_logit) + ce_log_sum * LN2  # log-sum-exp - label logit
                tl.store(row_ce_ptr + pair, tl.where(ce_label >= 0, ce, 0.0))

            # The root: 2**ROOT_BITS power-of-two-aligned buckets over the keys the pair holds.
            ROOT_ENTRIES: tl.constexpr = 1 << ROOT_BITS
            _p, key_s_hi, _c, _z = _keys_of(student_top, student_scale, student_top, student_log_sum)
            _p, key_t_hi, _c, _z = _keys_of(teacher_top, teacher_scale, teacher_top, teacher_log_sum)
            _p, key_s_lo, _c, _z = _keys_of(lowest_s, student_scale, student_top, student_log_sum)
            _p, key_t_lo, _c, _z = _keys_of(lowest_t, teacher_scale, teacher_top, teacher_log_sum)
            key_hi = tl.maximum(key_s_hi, key_t_hi)
            key_lo = tl.maximum(tl.minimum(key_s_lo, key_t_lo), 1)
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
            tl.store(row_mass, tl.zeros([1], tl.float64).sum(0))
            tl.store(row_mass + 1, tl.zeros([1], tl.float64).sum(0))
            if row_ok & (~identical):
                tl.store(meta_ptr + _STATUS, 1)  # the root is still to be counted
            else:
                # Nothing to count (identical rows: every element ties exactly; rows without a
                # distribution: NaN loss): every root bucket gets sign 0, and no level below it.
                tl.store(meta_ptr + _STATUS, 0)
                for piece in tl.static_range(0, ROOT_ENTRIES, 1024):
                    root = piece + tl.arange(0, 1024)
                    tl.store(sign_ptr + root, tl.zeros([1024], tl.float32), mask=root < ROOT_ENTRIES)
                    tl.store(sign_ptr + ENTRIES + root, tl.zeros([1024], tl.float32), mask=root < ROOT_ENTRIES)


@triton.jit
def _combine_lse(top_ptr, log_sum_ptr, have, scale):
    """A row's largest logit and base-2 log-sum from its chunks', kept apart; NaN when any
    chunk's is."""
    tops = tl.load(top_ptr, mask=have, other=float("-inf"), cache_modifier=".cg")
    log_sums = tl.load(log_sum_ptr, mask=have, other=0.0, cache_modifier=".cg")
    top = tl.max(tops, 0)
    terms = tl.where(tops > float("-inf"), tl.exp2((tops - top) * scale + log_sums), 0.0)
    any_nan = tl.max((log_sums != log_sums).to(tl.int32), 0) > 0
    return top, tl.where(any_nan, float("nan"), tl.log2(tl.sum(terms, 0)))


@triton.jit
def _row_state(ws_meta_ptr, row_f_ptr, local):
    meta_ptr = ws_meta_ptr + local.to(tl.int64) * 64
    row_f = row_f_ptr + local.to(tl.int64) * ROW_FLOATS
    flags = tl.load(meta_ptr + _FLAGS)
    return meta_ptr, row_f, flags


@triton.jit
def _pair_workspace(local, ws_int_ptr, ws_sign_ptr, ws_mass_ptr, row_mass_ptr, ENTRIES: tl.constexpr,
                    ROOT_BITS: tl.constexpr):
    """The pair's trie (int planes, sign planes), its int64 bucket masses and its two signed-mass
    sums. Masses exist only below the root: the returned mass pointer is offset so that entry
    e's student mass is at mass + e (e >= 2**ROOT_BITS), the teacher's ENTRIES - 2**ROOT_BITS
    further."""
    local = local.to(tl.int64)
    span: tl.constexpr = ENTRIES - (1 << ROOT_BITS)
    return (ws_int_ptr + local * (INT_PLANES * ENTRIES), ws_sign_ptr + local * (SIGN_PLANES * ENTRIES),
            ws_mass_ptr + local * (2 * span) - (1 << ROOT_BITS), row_mass_ptr + local * 2)


@triton.jit
def _count_level_both(s_row, t_row, student_col_stride, teacher_col_stride,
                      inv_student_temperature, inv_teacher_temperature, row_f, ws_ptr, sign_ptr, meta_ptr,
                      mass_ptr, level, start, s_stop, t_stop, count,
                      ENTRIES: tl.constexpr, BLOCK: tl.constexpr, STUDENT_UNIT_STRIDE: tl.constexpr,
                      TEACHER_UNIT_STRIDE: tl.constexpr, STAGES: tl.constexpr, MAX_LEVELS: tl.constexpr,
                      ROOT_BITS: tl.constexpr, LOSS: tl.constexpr, USE_PTX: tl.constexpr,
                      PREFETCH: tl.constexpr, NC_SIGNS: tl.constexpr = True, SMEM_CAP: tl.constexpr = 0,
                      l1_table=0, LIST: tl.constexpr = False, list_ptr=0, list_cap=0):
    """`_count_level` over columns [start, s_stop) of the student row and [start, t_stop) of the
    teacher row; returns both sides' sums of p * sign over the elements the root decided (LOSS).
    SMEM_CAP (the trie fallback, level 1): a level 1 of at most SMEM_CAP buckets is counted
    in the shared table at `l1_table`, one side at a time (`_count_side`). LIST: the columns
    that reach the level's open buckets are listed (`_count_level`), the student's at
    `list_ptr`, the teacher's `list_cap` further, counted at meta _LISTED_S and _LISTED_T."""
    key_lo = tl.load(meta_ptr + _OPEN_LO)
    key_hi = tl.load(meta_ptr + _OPEN_HI)
    span: tl.constexpr = ENTRIES - (1 << ROOT_BITS)
    l1_start = tl.load(meta_ptr + 1)
    in_smem = count & (tl.load(meta_ptr + 2) - l1_start <= SMEM_CAP)
    student_sum = _count_side(
        s_row, student_col_stride, inv_student_temperature * LOG2E, tl.load(row_f + _S_TOP),
        tl.load(row_f + _S_LOG_SUM), ws_ptr, sign_ptr, mass_ptr, meta_ptr, level,
        start, s_stop, key_lo, key_hi, count, in_smem, l1_table, l1_start,
        _CNT_S, _MIN_S, _MAX_S, ENTRIES, BLOCK, STUDENT_UNIT_STRIDE, STAGES, MAX_LEVELS, LOSS, USE_PTX, PREFETCH,
        NC_SIGNS, SMEM_CAP, LIST, list_ptr, meta_ptr + _LISTED_S, list_cap)
    teacher_sum = _count_side(
        t_row, teacher_col_stride, inv_teacher_temperature * LOG2E, tl.load(row_f + _T_TOP),
        tl.load(row_f + _T_LOG_SUM), ws_ptr, sign_ptr + ENTRIES, mass_ptr + span, meta_ptr, level,
        start, t_stop, key_lo, key_hi, count, in_smem, l1_table, l1_start,
        _CNT_T, _MIN_T, _MAX_T, ENTRIES, BLOCK, TEACHER_UNIT_STRIDE, STAGES, MAX_LEVELS, LOSS, USE_PTX, PREFETCH,
        NC_SIGNS, SMEM_CAP, LIST, list_ptr + list_cap, meta_ptr + _LISTED_T, list_cap)
    return student_sum, teacher_sum


@triton.jit
def _count_side(row_ptr, col_stride, scale, top, log_sum, ws_ptr, sign_ptr, mass_ptr, meta_ptr, level, start,
                stop, key_lo, key_hi, count, in_smem, l1_table, l1_start,
                CNT: tl.constexpr, KEY_MIN: tl.constexpr, KEY_MAX: tl.constexpr, ENTRIES: tl.constexpr,
                BLOCK: tl.constexpr, UNIT_COL_STRIDE: tl.constexpr, STAGES: tl.constexpr,
                MAX_LEVELS: tl.constexpr, LOSS: tl.constexpr, USE_PTX: tl.constexpr, PREFETCH: tl.constexpr,
                NC_SIGNS: tl.constexpr, SMEM_CAP: tl.constexpr, LIST: tl.constexpr = False, list_ptr=0,
                listed_ptr=0, list_cap=0):
    """`_count_level` of one side; with SMEM_CAP, USE_PTX and `in_smem`, level 1 in the shared
    table (zeroed, counted, then copied to the side's planes of the workspace: the same counts,
    key bounds and masses the global reductions would leave there)."""
    if SMEM_CAP > 0 and USE_PTX:
        tl.static_assert(LOSS, "the shared level-1 table serves the level-1 pass only")
        if in_smem:
            l1_clear(l1_table)
            tl.debug_barrier()
            total = _count_level(row_ptr, col_stride, scale, top, log_sum, ws_ptr, sign_ptr, mass_ptr, meta_ptr, level,
                                 start, stop, key_lo, key_hi, count, CNT, KEY_MIN, KEY_MAX, ENTRIES, BLOCK,
                                 UNIT_COL_STRIDE, STAGES, MAX_LEVELS, LOSS, USE_PTX, PREFETCH, NC_SIGNS,
                                 True, l1_table, l1_start)
            tl.debug_barrier()
            size = tl.load(meta_ptr + 2) - l1_start
            for first in range(0, size, 512):
                bucket = first + tl.arange(0, 512)
                live = bucket < size
                bucket = tl.where(live, bucket, 0)
                counted = l1_load(l1_table, bucket)
                key_min = L1_KEY_FLIP - l1_load(l1_table, bucket + L1_CAP)
                key_max = l1_load(l1_table, bucket + 2 * L1_CAP)
                mass = l1_load_mass(l1_table, bucket)
                entry = l1_start + bucket
                tl.store(ws_ptr + CNT * ENTRIES + entry, counted, mask=live)
                tl.store(ws_ptr + KEY_MIN * ENTRIES + entry, tl.where(counted > 0, key_min, _KEY_NONE_MIN), mask=live)
                tl.store(ws_ptr + KEY_MAX * ENTRIES + entry, tl.where(counted > 0, key_max, _KEY_NONE_MAX), mask=live)
                tl.store(mass_ptr + entry, mass, mask=live)
            tl.debug_barrier()
        else:
            total = _count_level(row_ptr, col_stride, scale, top, log_sum, ws_ptr, sign_ptr, mass_ptr, meta_ptr, level,
                                 start, stop, key_lo, key_hi, count, CNT, KEY_MIN, KEY_MAX, ENTRIES, BLOCK,
                                 UNIT_COL_STRIDE, STAGES, MAX_LEVELS, LOSS, USE_PTX, PREFETCH, NC_SIGNS)
    else:
        total = _count_level(row_ptr, col_stride, scale, top, log_sum, ws_ptr, sign_ptr, mass_ptr, meta_ptr, level,
                             start, stop, key_lo, key_hi, count, CNT, KEY_MIN, KEY_MAX, ENTRIES, BLOCK,
                             UNIT_COL_STRIDE, STAGES, MAX_LEVELS, LOSS, USE_PTX, PREFETCH, NC_SIGNS,
                             LIST=LIST, list_ptr=list_ptr, listed_ptr=listed_ptr, list_cap=list_cap)
    return total


@triton.jit
def _count_listed_both(s_row, t_row, student_col_stride, teacher_col_stride, student_vocab, teacher_vocab,
                       inv_student_temperature, inv_teacher_temperature, row_f, ws_ptr, meta_ptr, mass_ptr, level,
                       list_ptr, list_cap, ENTRIES: tl.constexpr, BLOCK: tl.constexpr,
                       STUDENT_UNIT_STRIDE: tl.constexpr, TEACHER_UNIT_STRIDE: tl.constexpr,
                       MAX_LEVELS: tl.constexpr, ROOT_BITS: tl.constexpr, USE_PTX: tl.constexpr):
    """`_count_level_both`'s count of a level below 1 from the columns listed by a level above
    (`_count_listed`, both sides)."""
    key_lo = tl.load(meta_ptr + _OPEN_LO)
    key_hi = tl.load(meta_ptr + _OPEN_HI)
    span: tl.constexpr = ENTRIES - (1 << ROOT_BITS)
    _count_listed(s_row, student_col_stride, student_vocab, inv_student_temperature * LOG2E,
                  tl.load(row_f + _S_TOP), tl.load(row_f + _S_LOG_SUM), ws_ptr, mass_ptr, meta_ptr, level, key_lo,
                  key_hi, list_ptr, tl.load(meta_ptr + _LISTED_S), _CNT_S, _MIN_S, _MAX_S, ENTRIES, BLOCK,
                  STUDENT_UNIT_STRIDE, MAX_LEVELS, USE_PTX)
    _count_listed(t_row, teacher_col_stride, teacher_vocab, inv_teacher_temperature * LOG2E,
                  tl.load(row_f + _T_TOP), tl.load(row_f + _T_LOG_SUM), ws_ptr, mass_ptr + span, meta_ptr, level,
                  key_lo, key_hi, list_ptr + list_cap, tl.load(meta_ptr + _LISTED_T), _CNT_T, _MIN_T, _MAX_T,
                  ENTRIES, BLOCK, TEACHER_UNIT_STRIDE, MAX_LEVELS, USE_PTX)


@triton.jit(do_not_specialize=["n_chunks", "batch_start", "student_seq_len", "teacher_seq_len"])
def root_kernel(
    student_ptr, teacher_ptr, ws_int_ptr, ws_sign_ptr, ws_meta_ptr, row_f_ptr, ws_mass_ptr, row_mass_ptr,
    student_index_ptr, teacher_index_ptr, root_partial_ptr,
    n_chunks, batch_start, student_vocab, teacher_vocab,
    student_seq_len, student_batch_stride, student_row_stride, student_col_stride,
    teacher_seq_len, teacher_batch_stride, teacher_row_stride, teacher_col_stride,
    inv_student_temperature, inv_teacher_temperature,
    STUDENT_UNIT_STRIDE: tl.constexpr, TEACHER_UNIT_STRIDE: tl.constexpr, GATHER: tl.constexpr,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, ENTRIES: tl.constexpr,
    RESOLVE_BLOCK: tl.constexpr, MAX_LEVELS: tl.constexpr, STAGES: tl.constexpr,
    ROOT_BITS: tl.constexpr, USE_PTX: tl.constexpr, LEVEL_CAP: tl.constexpr,
):
    """Per (pair, chunk): the root histogram of the chunk's keys (2**ROOT_BITS buckets per
    side), written as the chunk's partial counts (student in the low 16 bits of a word, teacher
    in the high 16: a chunk has fewer than 65,536 columns); the pair's last program adds the
    chunks up in order and decides the root buckets.

    USE_PTX (GPU): shared-memory reductions, one instruction per element (kernels/ptx.py);
    otherwise `tl.histogram` (the interpreter)."""
    local, pair, chunk, start = _chunk_of(tl.program_id(0), n_chunks, batch_start, CHUNK)
    _root_pass(
        local, pair, chunk, start, student_ptr, teacher_ptr, ws_int_ptr, ws_sign_ptr, ws_meta_ptr, row_f_ptr,
        ws_mass_ptr, row_mass_ptr, student_index_ptr, teacher_index_ptr, root_partial_ptr, n_chunks,
        student_vocab, teacher_vocab, student_seq_len, student_batch_stride, student_row_stride,
        student_col_stride, teacher_seq_len, teacher_batch_stride, teacher_row_stride, teacher_col_stride,
        inv_student_temperature, inv_teacher_temperature, STUDENT_UNIT_STRIDE, TEACHER_UNIT_STRIDE, GATHER,
        BLOCK, CHUNK, ENTRIES, RESOLVE_BLOCK, MAX_LEVELS, STAGES, ROOT_BITS, USE_PTX, LEVEL_CAP)


@triton.jit
def _root_pass(
    local, pair, chunk, start, student_ptr, teacher_ptr, ws_int_ptr, ws_sign_ptr, ws_meta_ptr, row_f_ptr,
    ws_mass_ptr, row_mass_ptr, student_index_ptr, teacher_index_ptr, root_partial_ptr, n_chunks, student_vocab,
    teacher_vocab, student_seq_len, student_batch_stride, student_row_stride, student_col_stride,
    teacher_seq_len, teacher_batch_stride, teacher_row_stride, teacher_col_stride, inv_student_temperature,
    inv_teacher_temperature, STUDENT_UNIT_STRIDE: tl.constexpr, TEACHER_UNIT_STRIDE: tl.constexpr,
    GATHER: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, ENTRIES: tl.constexpr,
    RESOLVE_BLOCK: tl.constexpr, MAX_LEVELS: tl.constexpr, STAGES: tl.constexpr, ROOT_BITS: tl.constexpr,
    USE_PTX: tl.constexpr, LEVEL_CAP: tl.constexpr, SMEM_CAP: tl.constexpr = 0,
):
    """`root_kernel` for one (pair, chunk) (`_stats_pass` says what `local` and `pair` are).
    Returns the shared array's address where USE_PTX (0 otherwise, and for pairs with nothing to
    count): the trie fallback counts level 1 there (SMEM_CAP, `_resolve_level`)."""
    ROOT_ENTRIES: tl.constexpr = 1 << ROOT_BITS
    tl.static_assert(CHUNK < 65536, "16-bit partial counts: fewer than 65,536 columns per chunk")
    meta_ptr, row_f, flags = _row_state(ws_meta_ptr, row_f_ptr, local)
    table = local * 0
    if flags == 1:  # a distribution on both sides, not identical
        s_index, t_index, s_row, t_row = _pair_rows(
            pair, student_ptr, teacher_ptr, student_index_ptr, teacher_index_ptr,
            student_seq_len, student_batch_stride, student_row_stride,
            teacher_seq_len, teacher_batch_stride, teacher_row_stride, GATHER)
        ws_ptr, sign_ptr, mass_ptr, row_mass = _pair_workspace(local, ws_int_ptr, ws_sign_ptr, ws_mass_ptr,
                                                               row_mass_ptr, ENTRIES, ROOT_BITS)
        student_scale = inv_student_temperature * LOG2E
        teacher_scale = inv_teacher_temperature * LOG2E
        s_top = tl.load(row_f + _S_TOP)
        s_log_sum = tl.load(row_f + _S_LOG_SUM)
        t_top = tl.load(row_f + _T_TOP)
        t_log_sum = tl.load(row_f + _T_LOG_SUM)
        root_shift = tl.load(meta_ptr + _SHIFT_OFFSET)
        root_base = tl.load(meta_ptr + _ROOT_BASE)
        lanes = tl.arange(0, BLOCK)
        partial = root_partial_ptr + (local.to(tl.int64) * n_chunks + chunk) * ROOT_ENTRIES
        stop = tl.minimum(start + CHUNK, tl.maximum(student_vocab, teacher_vocab))
        if USE_PTX:
            smem_zero()
            table = smem_address()
            tl.debug_barrier()
        else:
            student_hist = tl.zeros([ROOT_ENTRIES], tl.int32)
            teacher_hist = tl.zeros([ROOT_ENTRIES], tl.int32)
        for block_start in tl.range(start, stop, BLOCK, num_stages=STAGES):
            idx = block_start + lanes
            _ps, ks, counted_s, _zs = _probs_and_keys(s_row, idx, student_col_stride, student_vocab,
                                                      student_scale, s_top, s_log_sum, STUDENT_UNIT_STRIDE)
            _pt, kt, counted_t, _zt = _probs_and_keys(t_row, idx, teacher_col_stride, teacher_vocab,
                                                      teacher_scale, t_top, t_log_sum, TEACHER_UNIT_STRIDE)
            ds = (_clamp_key(ks, meta_ptr) >> root_shift) - root_base  # in [0, ROOT_ENTRIES)
            dt = (_clamp_key(kt, meta_ptr) >> root_shift) - root_base
            if USE_PTX:
                smem_add_one(ds, counted_s)
                smem_add_one(dt + ROOT_ENTRIES, counted_t)
            else:
                student_hist += tl.histogram(ds, ROOT_ENTRIES, mask=counted_s)
                teacher_hist += tl.histogram(dt, ROOT_ENTRIES, mask=counted_t)
        if USE_PTX:
            tl.debug_barrier()
            for piece in tl.static_range(0, ROOT_ENTRIES, 1024):
                word = piece + tl.arange(0, 1024)
                tl.store(partial + word, smem_load(word) | (smem_load(word + ROOT_ENTRIES) << 16))
        else:
            tl.store(partial + tl.arange(0, ROOT_ENTRIES), student_hist | (teacher_hist << 16))
        if _last_of_pair(meta_ptr + _DONE_ROOT, n_chunks):
            counts_first = root_partial_ptr + local.to(tl.int64) * n_chunks * ROOT_ENTRIES
            for piece in tl.static_range(0, ROOT_ENTRIES, 1024):
                root = piece + tl.arange(0, 1024)
                student_count = tl.zeros([1024], tl.int32)
                teacher_count = tl.zeros([1024], tl.int32)
                for c in range(0, n_chunks):
                    word = tl.load(counts_first + c * ROOT_ENTRIES + root, cache_modifier=".cg")
                    student_count += word & 0xFFFF
                    teacher_count += (word >> 16) & 0xFFFF
                tl.store(ws_ptr + _CNT_S * ENTRIES + root, student_count)
                tl.store(ws_ptr + _CNT_T * ENTRIES + root, teacher_count)
            tl.debug_barrier()
            status = _resolve_level(ws_ptr, sign_ptr, meta_ptr, 0, mass_ptr, row_mass,
                                    ENTRIES, RESOLVE_BLOCK, MAX_LEVELS, ENTRIES - ROOT_ENTRIES, LEVEL_CAP, SMEM_CAP)
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
    return table


@triton.jit(do_not_specialize=["n_chunks", "batch_start", "level", "student_seq_len", "teacher_seq_len"])
def count_kernel(
    student_ptr, teacher_ptr, ws_int_ptr, ws_sign_ptr, ws_meta_ptr, row_f_ptr, ws_mass_ptr, row_mass_ptr,
    student_index_ptr, teacher_index_ptr, partial_ptr,
    n_chunks, batch_start, level, student_vocab, teacher_vocab,
    student_seq_len, student_batch_stride, student_row_stride, student_col_stride,
    teacher_seq_len, teacher_batch_stride, teacher_row_stride, teacher_col_stride,
    inv_student_temperature, inv_teacher_temperature,
    STUDENT_UNIT_STRIDE: tl.constexpr, TEACHER_UNIT_STRIDE: tl.constexpr, GATHER: tl.constexpr,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, CHUNKS_POW2: tl.constexpr, ENTRIES: tl.constexpr,
    RESOLVE_BLOCK: tl.constexpr, MAX_LEVELS: tl.constexpr, STAGES: tl.constexpr, ROOT_BITS: tl.constexpr,
    LOSS: tl.constexpr, USE_PTX: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Per (pair, chunk) of the pairs whose trie has open buckets at `level - 1`: count the
    chunk's keys one level down; the pair's last program resolves `level`.

    LOSS (level 1): every pair with a distribution runs, open buckets or not, and writes the
    chunk's sums of p * sign over the elements the root decided (partial slots 0 and 1)."""
    local, pair, chunk, start = _chunk_of(tl.program_id(0), n_chunks, batch_start, CHUNK)
    _count_pass(
        local, pair, chunk, start, student_ptr, teacher_ptr, ws_int_ptr, ws_sign_ptr, ws_meta_ptr, row_f_ptr,
        ws_mass_ptr, row_mass_ptr, student_index_ptr, teacher_index_ptr, partial_ptr, n_chunks, level,
        student_vocab, teacher_vocab, student_seq_len, student_batch_stride, student_row_stride,
        student_col_stride, teacher_seq_len, teacher_batch_stride, teacher_row_stride, teacher_col_stride,
        inv_student_temperature, inv_teacher_temperature, STUDENT_UNIT_STRIDE, TEACHER_UNIT_STRIDE, GATHER,
        BLOCK, CHUNK, CHUNKS_POW2, ENTRIES, RESOLVE_BLOCK, MAX_LEVELS, STAGES, ROOT_BITS, LOSS, USE_PTX,
        PREFETCH)


@triton.jit
def _count_pass(
    local, pair, chunk, start, student_ptr, teacher_ptr, ws_int_ptr, ws_sign_ptr, ws_meta_ptr, row_f_ptr,
    ws_mass_ptr, row_mass_ptr, student_index_ptr, teacher_index_ptr, partial_ptr, n_chunks, level,
    student_vocab, teacher_vocab, student_seq_len, student_batch_stride, student_row_stride,
    student_col_stride, teacher_seq_len, teacher_batch_stride, teacher_row_stride, teacher_col_stride,
    inv_student_temperature, inv_teacher_temperature, STUDENT_UNIT_STRIDE: tl.constexpr,
    TEACHER_UNIT_STRIDE: tl.constexpr, GATHER: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
    CHUNKS_POW2: tl.constexpr, ENTRIES: tl.constexpr, RESOLVE_BLOCK: tl.constexpr, MAX_LEVELS: tl.constexpr,
    STAGES: tl.constexpr, ROOT_BITS: tl.constexpr, LOSS: tl.constexpr, USE_PTX: tl.constexpr,
    PREFETCH: tl.constexpr,
    NC_SIGNS: tl.constexpr = True, SMEM_CAP: tl.constexpr = 0, l1_table=0,
):
    """`count_kernel` for one (pair, chunk) (`_stats_pass` says what `local` and `pair` are);
    SMEM_CAP and `l1_table`: `_count_level_both`'s (the trie fallback's level 1)."""
    meta_ptr, row_f, flags = _row_state(ws_meta_ptr, row_f_ptr, local)
    status = tl.load(meta_ptr + _STATUS)
    count = (flags == 1) & (status > 0) & (tl.load(meta_ptr + _DEPTH) == level - 1)
    if LOSS:
        run = flags == 1
    else:
        run = count
    if run:
        s_index, t_index, s_row, t_row = _pair_rows(
            pair, student_ptr, teacher_ptr, student_index_ptr, teacher_index_ptr,
            student_seq_len, student_batch_stride, student_row_stride,
            teacher_seq_len, teacher_batch_stride, teacher_row_stride, GATHER)
        ws_ptr, sign_ptr, mass_ptr, row_mass = _pair_workspace(local, ws_int_ptr, ws_sign_ptr, ws_mass_ptr,
                                                               row_mass_ptr, ENTRIES, ROOT_BITS)
        student_sum, teacher_sum = _count_level_both(
            s_row, t_row, student_col_stride, teacher_col_stride,
            inv_student_temperature, inv_teacher_temperature, row_f, ws_ptr, sign_ptr, meta_ptr, mass_ptr,
            level, start, tl.minimum(start + CHUNK, student_vocab), tl.minimum(start + CHUNK, teacher_vocab),
            count, ENTRIES, BLOCK, STUDENT_UNIT_STRIDE, TEACHER_UNIT_STRIDE, STAGES, MAX_LEVELS, ROOT_BITS,
            LOSS, USE_PTX, PREFETCH, NC_SIGNS, SMEM_CAP, l1_table)
        if LOSS:
            part = partial_ptr + (local.to(tl.int64) * CHUNKS_POW2 + chunk) * PARTIAL_FLOATS
            tl.store(part + 0, student_sum)
            tl.store(part + 1, teacher_sum)
        if count:
            if _last_of_pair(meta_ptr + _DONE_LEVEL + level, n_chunks):
                tl.store(meta_ptr + _DEPTH, level)
                # LEVEL_CAP = ENTRIES: no cap below level 1 (only the root's children are capped)
                tl.store(meta_ptr + _STATUS, _resolve_level(ws_ptr, sign_ptr, meta_ptr, level, mass_ptr, row_mass,
                                                            ENTRIES, RESOLVE_BLOCK, MAX_LEVELS,
                                                            ENTRIES - (1 << ROOT_BITS), ENTRIES))


@triton.jit(do_not_specialize=["n_chunks", "batch_start", "student_seq_len", "teacher_seq_len"])
def finish_kernel(
    student_ptr, teacher_ptr, row_loss_ptr, status_ptr,
    ws_int_ptr, ws_sign_ptr, ws_meta_ptr, row_f_ptr, ws_mass_ptr, row_mass_ptr, partial_ptr,
    student_index_ptr, teacher_index_ptr,
    n_chunks, batch_start, student_vocab, teacher_vocab,
    student_seq_len, student_batch_stride, student_row_stride, student_col_stride,
    teacher_seq_len, teacher_batch_stride, teacher_row_stride, teacher_col_stride,
    inv_student_temperature, inv_teacher_temperature,
    STUDENT_UNIT_STRIDE: tl.constexpr, TEACHER_UNIT_STRIDE: tl.constexpr, GATHER: tl.constexpr,
    BLOCK: tl.constexpr, CHUNKS_POW2: tl.constexpr, ENTRIES: tl.constexpr,
    RESOLVE_BLOCK: tl.constexpr, MAX_LEVELS: tl.constexpr, STAGES: tl.constexpr, ROOT_BITS: tl.constexpr,
    USE_PTX: tl.constexpr, PREFETCH: tl.constexpr,
):
    """One program per pair: count and resolve any levels still open after the split levels
    (over the whole rows), then write the loss

        sum_i a_i g_i - sum_j b_j h_j = (level-1 sums, in chunk order) + (resolved bucket masses)

    and the status."""
    local = tl.program_id(0)
    pair = batch_start + local
    _finish_pass(
        local, pair, student_ptr, teacher_ptr, row_loss_ptr, status_ptr, ws_int_ptr, ws_sign_ptr, ws_meta_ptr,
        row_f_ptr, ws_mass_ptr, row_mass_ptr, partial_ptr, student_index_ptr, teacher_index_ptr, n_chunks,
        student_vocab, teacher_vocab, student_seq_len, student_batch_stride, student_row_stride,
        student_col_stride, teacher_seq_len, teacher_batch_stride, teacher_row_stride, teacher_col_stride,
        inv_student_temperature, inv_teacher_temperature, STUDENT_UNIT_STRIDE, TEACHER_UNIT_STRIDE, GATHER,
        BLOCK, CHUNKS_POW2, ENTRIES, RESOLVE_BLOCK, MAX_LEVELS, STAGES, ROOT_BITS, USE_PTX, PREFETCH)


@triton.jit
def _finish_pass(
    local, pair, student_ptr, teacher_ptr, row_loss_ptr, status_ptr, ws_int_ptr, ws_sign_ptr, ws_meta_ptr,
    row_f_ptr, ws_mass_ptr, row_mass_ptr, partial_ptr, student_index_ptr, teacher_index_ptr, n_chunks,
    student_vocab, teacher_vocab, student_seq_len, student_batch_stride, student_row_stride,
    student_col_stride, teacher_seq_len, teacher_batch_stride, teacher_row_stride, teacher_col_stride,
    inv_student_temperature, inv_teacher_temperature, STUDENT_UNIT_STRIDE: tl.constexpr,
    TEACHER_UNIT_STRIDE: tl.constexpr, GATHER: tl.constexpr, BLOCK: tl.constexpr, CHUNKS_POW2: tl.constexpr,
    ENTRIES: tl.constexpr, RESOLVE_BLOCK: tl.constexpr, MAX_LEVELS: tl.constexpr, STAGES: tl.constexpr,
    ROOT_BITS: tl.constexpr, USE_PTX: tl.constexpr, PREFETCH: tl.constexpr,
    NC_SIGNS: tl.constexpr = True, LIST: tl.constexpr = False, list_ptr=0, list_cap=0,
):
    """`finish_kernel` for one pair (`_stats_pass` says what `local` and `pair` are).

    LIST (the trie fallback; 2: the append as inline PTX, `_count_level`): a level counted
    over the whole rows also lists the columns that
    reach its open buckets (up to `list_cap` a side, at `list_ptr`), and while both lists are
    whole, the levels below count those columns only (`_count_listed_both`). Rows of one
    vocabulary drawn alike open level after level for a handful of near-equal keys (the
    `flagged` kind: 16 logits within 2**-23 of 0), and each level cost a read of both rows."""
    meta_ptr, row_f, flags = _row_state(ws_meta_ptr, row_f_ptr, local)
    s_index, t_index, s_row, t_row = _pair_rows(
        pair, student_ptr, teacher_ptr, student_index_ptr, teacher_index_ptr,
        student_seq_len, student_batch_stride, student_row_stride,
        teacher_seq_len, teacher_batch_stride, teacher_row_stride, GATHER)
    if s_index >= 0:
        ws_ptr, sign_ptr, mass_ptr, row_mass = _pair_workspace(local, ws_int_ptr, ws_sign_ptr, ws_mass_ptr,
                                                               row_mass_ptr, ENTRIES, ROOT_BITS)
        status = tl.load(meta_ptr + _STATUS)
        depth = tl.load(meta_ptr + _DEPTH)
        if (flags == 1) & (status > 0):
            listed = status < 0  # false: whether the lists hold every column that can reach an open bucket
            while status > 0:
                depth += 1
                if LIST:
                    listed = listed & (tl.load(meta_ptr + _LISTED_S) <= list_cap) & (
                        tl.load(meta_ptr + _LISTED_T) <= list_cap)
                    # Every warp reads the counters before any resets them below: a warp that
                    # read a reset counter would take the other branch (and miscount its lanes).
                    tl.debug_barrier()
                    if listed:
                        _count_listed_both(s_row, t_row, student_col_stride, teacher_col_stride, student_vocab,
                                           teacher_vocab, inv_student_temperature, inv_teacher_temperature, row_f,
                                           ws_ptr, meta_ptr, mass_ptr, depth, list_ptr, list_cap, ENTRIES, BLOCK,
                                           STUDENT_UNIT_STRIDE, TEACHER_UNIT_STRIDE, MAX_LEVELS, ROOT_BITS, USE_PTX)
                    else:
                        tl.store(meta_ptr + _LISTED_S, 0)
                        tl.store(meta_ptr + _LISTED_T, 0)
                        tl.debug_barrier()
                        _count_level_both(s_row, t_row, student_col_stride, teacher_col_stride,
                                          inv_student_temperature, inv_teacher_temperature, row_f, ws_ptr, sign_ptr,
                                          meta_ptr, mass_ptr, depth, 0, student_vocab, teacher_vocab, status > 0,
                                          ENTRIES, BLOCK, STUDENT_UNIT_STRIDE, TEACHER_UNIT_STRIDE, STAGES,
                                          MAX_LEVELS, ROOT_BITS, False, USE_PTX, PREFETCH, NC_SIGNS, LIST=LIST,
                                          list_ptr=list_ptr, list_cap=list_cap)
                        listed = status > 0  # true
                else:
                    _count_level_both(s_row, t_row, student_col_stride, teacher_col_stride,
                                      inv_student_temperature, inv_teacher_temperature, row_f, ws_ptr, sign_ptr,
                                      meta_ptr, mass_ptr, depth, 0, student_vocab, teacher_vocab, status > 0,
                                      ENTRIES, BLOCK, STUDENT_UNIT_STRIDE, TEACHER_UNIT_STRIDE, STAGES, MAX_LEVELS,
                                      ROOT_BITS, False, USE_PTX, PREFETCH, NC_SIGNS)
                tl.debug_barrier()
                # LEVEL_CAP = ENTRIES: no cap below level 1 (only the root's children are capped)
                status = _resolve_level(ws_ptr, sign_ptr, meta_ptr, depth, mass_ptr, row_mass,
                                        ENTRIES, RESOLVE_BLOCK, MAX_LEVELS, ENTRIES - (1 << ROOT_BITS), ENTRIES)
                tl.debug_barrier()
            tl.store(meta_ptr + _DEPTH, depth)
            tl.store(meta_ptr + _STATUS, status)
        student_mass = 0.0
        teacher_mass = 0.0
        if flags == 1:  # identical rows and rows without a distribution have nothing to sum
            chunks = tl.arange(0, CHUNKS_POW2)
            parts = partial_ptr + (local.to(tl.int64) * CHUNKS_POW2 + chunks) * PARTIAL_FLOATS
            have = chunks < n_chunks
            student_sum = tl.sum(tl.load(parts + 0, mask=have, other=0.0).to(tl.float64), 0)
            teacher_sum = tl.sum(tl.load(parts + 1, mask=have, other=0.0).to(tl.float64), 0)
            student_mass = (student_sum + tl.load(row_mass) * (1.0 / MASS_SCALE)).to(tl.float32)
            teacher_mass = (teacher_sum + tl.load(row_mass + 1) * (1.0 / MASS_SCALE)).to(tl.float32)
        exhausted = status < 0
        failed = ((flags & 1) == 0) | exhausted
        tl.store(row_f + _S_MASS, tl.where(failed, float("nan"), student_mass))
        tl.store(row_f + _T_MASS, tl.where(failed, float("nan"), teacher_mass))
        tl.store(row_loss_ptr + pair, tl.where(failed, float("nan"), student_mass - teacher_mass))
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
    MAX_LEVELS: tl.constexpr, STAGES: tl.constexpr, ROOT_BITS: tl.constexpr, USE_PTX: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Per (pair, chunk): the gradient of grad_scale * weight * loss (plus, with HAS_CE, the
    weighted cross-entropy's) over the chunk's columns."""
    local, pair, chunk, start = _chunk_of(tl.program_id(0), n_chunks, batch_start, CHUNK)
    _grad_pass(
        local, pair, chunk, start, student_ptr, teacher_ptr, grad_student_ptr, grad_teacher_ptr, ws_int_ptr,
        ws_sign_ptr, ws_meta_ptr, row_f_ptr, ws_mass_ptr, row_mass_ptr, student_index_ptr, teacher_index_ptr,
        row_weight_ptr, ce_label_ptr, ce_weight_ptr, n_chunks, student_vocab, teacher_vocab, student_seq_len,
        student_batch_stride, student_row_stride, student_col_stride, teacher_seq_len, teacher_batch_stride,
        teacher_row_stride, teacher_col_stride, grad_student_row_stride, grad_teacher_row_stride,
        inv_student_temperature, inv_teacher_temperature, grad_scale, STUDENT_GRAD, TEACHER_GRAD,
        STUDENT_UNIT_STRIDE, TEACHER_UNIT_STRIDE, GATHER, HAS_CE, BLOCK, CHUNK, ENTRIES, MAX_LEVELS, STAGES,
        ROOT_BITS, USE_PTX, PREFETCH)


@triton.jit
def _grad_pass(
    local, pair, chunk, start, student_ptr, teacher_ptr, grad_student_ptr, grad_teacher_ptr, ws_int_ptr,
    ws_sign_ptr, ws_meta_ptr, row_f_ptr, ws_mass_ptr, row_mass_ptr, student_index_ptr, teacher_index_ptr,
    row_weight_ptr, ce_label_ptr, ce_weight_ptr, n_chunks, student_vocab, teacher_vocab, student_seq_len,
    student_batch_stride, student_row_stride, student_col_stride, teacher_seq_len, teacher_batch_stride,
    teacher_row_stride, teacher_col_stride, grad_student_row_stride, grad_teacher_row_stride,
    inv_student_temperature, inv_teacher_temperature, grad_scale, STUDENT_GRAD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr, STUDENT_UNIT_STRIDE: tl.constexpr, TEACHER_UNIT_STRIDE: tl.constexpr,
    GATHER: tl.constexpr, HAS_CE: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
    ENTRIES: tl.constexpr, MAX_LEVELS: tl.constexpr, STAGES: tl.constexpr, ROOT_BITS: tl.constexpr,
    USE_PTX: tl.constexpr, PREFETCH: tl.constexpr,
    NC_SIGNS: tl.constexpr = True
):
    """`grad_kernel` for one (pair, chunk) (`_stats_pass` says what `local` and `pair` are)."""
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
                                                             row_mass_ptr, ENTRIES, ROOT_BITS)
        depth = tl.load(meta_ptr + _DEPTH)
        if STUDENT_GRAD:
            ce_top = 0.0
            ce_log_sum = 0.0
            ce_label = -1
            ce_factor = 0.0
            if HAS_CE:
                ce_top = tl.load(row_f + _CE_TOP)
                ce_log_sum = tl.load(row_f + _CE_LOG_SUM)
                ce_label = tl.load(ce_label_ptr + pair).to(tl.int32)
                ce_factor = tl.where(ce_label >= 0, tl.load(ce_weight_ptr + pair), 0.0)
            _write_grad(s_row, student_col_stride, inv_student_temperature, inv_student_temperature * LOG2E,
                        tl.load(row_f + _S_TOP), tl.load(row_f + _S_LOG_SUM), ws_ptr, sign_ptr, meta_ptr,
                        depth, start, tl.minimum(start + CHUNK, student_vocab), tl.load(row_f + _S_MASS),
                        row_grad_scale, grad_student_ptr + s_index * grad_student_row_stride,
                        ce_top, ce_log_sum, ce_label, ce_factor,
                        ENTRIES, BLOCK, STUDENT_UNIT_STRIDE, STAGES, MAX_LEVELS, HAS_CE, USE_PTX, PREFETCH,
                        NC_SIGNS)
        if TEACHER_GRAD:
            _write_grad(t_row, teacher_col_stride, inv_teacher_temperature, inv_teacher_temperature * LOG2E,
                        tl.load(row_f + _T_TOP), tl.load(row_f + _T_LOG_SUM), ws_ptr, sign_ptr + ENTRIES,
                        meta_ptr, depth, start, tl.minimum(start + CHUNK, teacher_vocab),
                        tl.load(row_f + _T_MASS), -row_grad_scale,
                        grad_teacher_ptr + t_index * grad_teacher_row_stride,
                        0.0, 0.0, -1, 0.0,
                        ENTRIES, BLOCK, TEACHER_UNIT_STRIDE, STAGES, MAX_LEVELS, False, USE_PTX, PREFETCH,
                        NC_SIGNS)


# fallback_kernel calls the passes as functions, where the split kernels inline them: inlined
# into one kernel they share one register allocation, 255 registers with ~100 B of spills and 2
# programs per SM; called, each keeps its own, 128 registers in all with 8 B of spills, 4 per
# SM (ptxas, sm_90a, bf16).
_stats_call, _root_call, _count_call, _finish_call, _grad_call = (
    triton.jit(noinline=True)(f.fn) for f in (_stats_pass, _root_pass, _count_pass, _finish_pass, _grad_pass))


@triton.jit(do_not_specialize=["n_pairs", "root_chunks", "list_cap", "student_seq_len", "teacher_seq_len"])
def fallback_kernel(
    student_ptr, teacher_ptr, row_loss_ptr, status_ptr, grad_student_ptr, grad_teacher_ptr,
    ws_int_ptr, ws_sign_ptr, ws_meta_ptr, row_f_ptr, ws_mass_ptr, row_mass_ptr, partial_ptr, partial_i_ptr,
    root_partial_ptr, student_index_ptr, teacher_index_ptr, row_weight_ptr, ce_label_ptr, ce_weight_ptr,
    row_ce_ptr, n_pairs, root_chunks, list_cap, student_vocab, teacher_vocab,
    student_seq_len, student_batch_stride, student_row_stride, student_col_stride,
    teacher_seq_len, teacher_batch_stride, teacher_row_stride, teacher_col_stride,
    grad_student_row_stride, grad_teacher_row_stride,
    inv_student_temperature, inv_teacher_temperature, grad_scale,
    SAME_VOCAB: tl.constexpr, STUDENT_UNIT_STRIDE: tl.constexpr, TEACHER_UNIT_STRIDE: tl.constexpr,
    GATHER: tl.constexpr, HAS_CE: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    BLOCK: tl.constexpr, FINISH_BLOCK: tl.constexpr, ROOT_CHUNK: tl.constexpr, ENTRIES: tl.constexpr,
    RESOLVE_BLOCK: tl.constexpr, MAX_LEVELS: tl.constexpr, ROOT_BITS: tl.constexpr, USE_PTX: tl.constexpr,
    LEVEL_CAP: tl.constexpr, PREFETCH: tl.constexpr, SMEM_L1: tl.constexpr = False, LIST: tl.constexpr = False,
):
    """The trie over the pairs whose status is nonzero (those the histogram engine flagged),
    every pass of a pair in one program, in one launch whatever the number of pairs.

    A persistent grid: program s walks pairs s, s + programs, ... and gives each flagged one
    workspace slot s (its per-pass counters zeroed), then the passes in turn: the stats over
    the whole rows (one chunk), the root chunk by chunk (ROOT_CHUNK < 65,536 columns: 16-bit
    partial counts), level 1 with the loss's sums, the deeper levels (`_finish_pass`), and the
    gradients. The sign tables it writes are read back in the same launch, so through plain
    loads, not the read-only path (`NC_SIGNS=False`). It writes the pair's loss, status (the
    trie's: 0 when the root settled it), cross-entropy and gradient rows in place; other pairs
    are not touched. The launches of the split passes over every pair "just in case" cost ~10
    ms of host time at 16,384 rows (bench/NOTES.md, seventh session); this costs one launch,
    and a program per pair reading its rows a few times is fast enough for the rare flagged
    row.

    SMEM_L1: level 1 is counted in shared memory where it fits (L1_CAP buckets, `_count_side`;
    USE_PTX, else with atomics on the same capped trie), since the program owns its pair: rows of one vocabulary drawn alike leave
    most root buckets open, and their global reductions (four per element) took the time.
    LIST: the levels below 1 count from lists of the columns that reach them (`_finish_pass`)."""
    WHOLE: tl.constexpr = 1 << 30  # a chunk longer than any row
    if SMEM_L1:  # the interpreter caps level 1 alike (the same trie), and counts it with atomics
        SMEM_CAP: tl.constexpr = L1_CAP
    else:
        SMEM_CAP: tl.constexpr = 0
    slot = tl.program_id(0)
    meta_ptr = ws_meta_ptr + slot.to(tl.int64) * META_SLOTS
    # The slot's root partial counts are spent once the root is decided: the finish pass lists
    # columns there (LIST), `list_cap` a side (at most half of them: launch.py).
    list_ptr = root_partial_ptr + slot.to(tl.int64) * root_chunks * (1 << ROOT_BITS)
    for pair in range(slot, n_pairs, tl.num_programs(0)):
        if tl.load(status_ptr + pair) != 0:
            tl.store(meta_ptr + tl.arange(0, META_SLOTS), tl.zeros([META_SLOTS], tl.int32))
            tl.debug_barrier()
            _stats_call(
                slot, pair, 0, 0, student_ptr, teacher_ptr, row_loss_ptr, status_ptr, ws_int_ptr, ws_sign_ptr,
                ws_meta_ptr, row_f_ptr, ws_mass_ptr, row_mass_ptr, partial_ptr, partial_i_ptr, student_index_ptr,
                teacher_index_ptr, ce_label_ptr, row_ce_ptr, 1, student_vocab, teacher_vocab, student_seq_len,
                student_batch_stride, student_row_stride, student_col_stride, teacher_seq_len,
                teacher_batch_stride, teacher_row_stride, teacher_col_stride, inv_student_temperature,
                inv_teacher_temperature, SAME_VOCAB, STUDENT_UNIT_STRIDE, TEACHER_UNIT_STRIDE, GATHER, HAS_CE,
                BLOCK, WHOLE, 2, ENTRIES, RESOLVE_BLOCK, MAX_LEVELS, 1, ROOT_BITS)
            tl.debug_barrier()
            table = slot * 0
            for chunk in range(0, root_chunks):
                table = _root_call(
                    slot, pair, chunk, chunk * ROOT_CHUNK, student_ptr, teacher_ptr, ws_int_ptr, ws_sign_ptr,
                    ws_meta_ptr, row_f_ptr, ws_mass_ptr, row_mass_ptr, student_index_ptr, teacher_index_ptr,
                    root_partial_ptr, root_chunks, student_vocab, teacher_vocab, student_seq_len,
                    student_batch_stride, student_row_stride, student_col_stride, teacher_seq_len,
                    teacher_batch_stride, teacher_row_stride, teacher_col_stride, inv_student_temperature,
                    inv_teacher_temperature, STUDENT_UNIT_STRIDE, TEACHER_UNIT_STRIDE, GATHER, BLOCK, ROOT_CHUNK,
                    ENTRIES, RESOLVE_BLOCK, MAX_LEVELS, 1, ROOT_BITS, USE_PTX, LEVEL_CAP, SMEM_CAP)
                tl.debug_barrier()  # the shared histogram is read back before the next chunk zeroes it
            _count_call(
                slot, pair, 0, 0, student_ptr, teacher_ptr, ws_int_ptr, ws_sign_ptr, ws_meta_ptr, row_f_ptr,
                ws_mass_ptr, row_mass_ptr, student_index_ptr, teacher_index_ptr, partial_ptr, 1, 1,
                student_vocab, teacher_vocab, student_seq_len, student_batch_stride, student_row_stride,
                student_col_stride, teacher_seq_len, teacher_batch_stride, teacher_row_stride, teacher_col_stride,
                inv_student_temperature, inv_teacher_temperature, STUDENT_UNIT_STRIDE, TEACHER_UNIT_STRIDE,
                GATHER, BLOCK, WHOLE, 2, ENTRIES, RESOLVE_BLOCK, MAX_LEVELS, 1, ROOT_BITS, True, USE_PTX,
                PREFETCH, False, SMEM_CAP, table)
            tl.debug_barrier()
            _finish_call(
                slot, pair, student_ptr, teacher_ptr, row_loss_ptr, status_ptr, ws_int_ptr, ws_sign_ptr,
                ws_meta_ptr, row_f_ptr, ws_mass_ptr, row_mass_ptr, partial_ptr, student_index_ptr,
                teacher_index_ptr, 1, student_vocab, teacher_vocab, student_seq_len, student_batch_stride,
                student_row_stride, student_col_stride, teacher_seq_len, teacher_batch_stride,
                teacher_row_stride, teacher_col_stride, inv_student_temperature, inv_teacher_temperature,
                STUDENT_UNIT_STRIDE, TEACHER_UNIT_STRIDE, GATHER, FINISH_BLOCK, 2, ENTRIES, RESOLVE_BLOCK,
                MAX_LEVELS, 1, ROOT_BITS, USE_PTX, PREFETCH, NC_SIGNS=False, LIST=LIST, list_ptr=list_ptr,
                list_cap=list_cap)
            tl.debug_barrier()
            if STUDENT_GRAD or TEACHER_GRAD:
                _grad_call(
                    slot, pair, 0, 0, student_ptr, teacher_ptr, grad_student_ptr, grad_teacher_ptr, ws_int_ptr,
                    ws_sign_ptr, ws_meta_ptr, row_f_ptr, ws_mass_ptr, row_mass_ptr, student_index_ptr,
                    teacher_index_ptr, row_weight_ptr, ce_label_ptr, ce_weight_ptr, 1, student_vocab,
                    teacher_vocab, student_seq_len, student_batch_stride, student_row_stride, student_col_stride,
                    teacher_seq_len, teacher_batch_stride, teacher_row_stride, teacher_col_stride,
                    grad_student_row_stride, grad_teacher_row_stride, inv_student_temperature,
                    inv_teacher_temperature, grad_scale, STUDENT_GRAD, TEACHER_GRAD, STUDENT_UNIT_STRIDE,
                    TEACHER_UNIT_STRIDE, GATHER, HAS_CE, BLOCK, WHOLE, ENTRIES, MAX_LEVELS, 1, ROOT_BITS,
                    USE_PTX, PREFETCH, NC_SIGNS=False)
            tl.debug_barrier()  # before the next pair takes the slot
