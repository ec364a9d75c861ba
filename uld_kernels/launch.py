"""Launchers: allocate outputs and workspace, pick block sizes, launch the Triton kernels.

Nothing here validates user input (api.py does) or knows about autograd (autograd.py does).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from dataclasses import dataclass

import torch
import triton

from uld_kernels.kernels import uld_hist, uld_split, uld_topk
from uld_kernels.kernels.cross_entropy import ce_rows_kernel
from uld_kernels.kernels.ptx import SMEM_THREADS
from uld_kernels.kernels.uld_rows import INT_PLANES, META_SLOTS, SIGN_PLANES, scale_rows_kernel, zero_rows_kernel

INT_PLANES, META_SLOTS, SIGN_PLANES = INT_PLANES.value, META_SLOTS.value, SIGN_PLANES.value


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1: Triton runs kernels on CPU tensors, slowly."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class CeKernelConfig:
    """Compile-time sizes of ce_rows_kernel (one program streams one row)."""

    block: int  # elements of a row read per step (4 per thread)
    num_warps: int
    stages: int  # row loads in flight per loop (software pipelining through shared memory)


_MAX_LEVELS = 10  # trie depth limit: a row that needs more is NaN (status bit 0)


def ce_kernel_config(vocab: int) -> CeKernelConfig:
    """The configuration used for cross-entropy rows of ``vocab`` entries."""
    block = min(1024, max(128, triton.next_power_of_2(vocab)))
    return CeKernelConfig(block=block, num_warps=max(1, block // 128), stages=3)


@dataclass(frozen=True)
class SplitConfig:
    """Sizes of the split engine (uld_kernels/kernels/uld_split.py)."""

    block: int  # elements of a row read per step
    chunk: int  # columns of a row per program (a multiple of block)
    entries: int  # trie entries per pair
    batch_rows: int  # pairs per batch (the workspace is per pair: batch_rows x entries)
    split_levels: int  # trie levels counted by chunk; deeper ones by one program per pair
    num_warps: int
    stages: int
    prefetch: bool  # count, loss and gradient loops load the next block before using this one
    root_bits: int  # the root has 2**root_bits buckets (10 to 12)
    smem: bool  # inline PTX (GPU only): root histogram in shared memory, count-level reductions
    level_cap: int  # entries the root's open buckets get below them, past 4 bits each


# Sizes of the engine on the GPU; each can be overridden for tuning (bench/NOTES.md records
# the sweeps) through its ULD_* variable, read at import. The dict is read at each call, so
# tests and benchmarks can change it.
SPLIT = dict(
    block=int(os.environ.get("ULD_SPLIT_BLOCK", 1024)),
    chunk=int(os.environ.get("ULD_CHUNK", 32768)),
    entries=int(os.environ.get("ULD_SPLIT_ENTRIES", 16384)),
    batch_rows=int(os.environ.get("ULD_BATCH_ROWS", 1024)),  # workspace 0.96 GB at real vocabularies
    split_levels=int(os.environ.get("ULD_SPLIT_LEVELS", 4)),  # level 1 also sums the loss: >= 1
    num_warps=4,  # the shared-memory histogram is laid out for 128 threads (kernels/ptx.py)
    stages=int(os.environ.get("ULD_SPLIT_STAGES", 1)),
    prefetch=os.environ.get("ULD_PREFETCH", "1") != "0",
    root_bits=int(os.environ.get("ULD_ROOT_BITS", 12)),
    smem=os.environ.get("ULD_SMEM", "1") != "0",
    level_cap=int(os.environ.get("ULD_LEVEL_CAP", 1024)),
)
# A pair whose trie needs more than `entries` runs out of workspace (status bit 0, its loss NaN):
# rows of one vocabulary drawn alike, in float32 or float16. On the H200 at 16,384 entries, of
# 256 Qwen/Qwen pairs: N(0, 1) rows 84 in float32, 0 in float16; "near" rows 21 and 8
# (`bench/probe_trie_workspace.py`, fourteenth session). uld_pairs computes such pairs again,
# alone, with 4x the entries (and a quarter of the pairs per batch: the same workspace), up to
# this many.
TRIE_RETRY_ENTRIES = int(os.environ.get("ULD_TRIE_RETRY_ENTRIES", 1 << 20))
# The trie fallback (flagged bf16 rows) counts level 1 in shared memory where it fits
# (uld_split.fallback_kernel, SMEM_L1: on the GPU; the interpreter caps level 1 alike and
# counts it with atomics): "0" keeps the global reductions and no cap.
FALLBACK_SMEM_L1 = os.environ.get("ULD_FALLBACK_SMEM_L1", "1") != "0"
# The fallback's levels below 1 count only the columns a level above listed as reaching its
# open buckets, where they fit the slot's spent root counts (uld_split._finish_pass): "0"
# reads the whole rows at every level.
FALLBACK_LIST = os.environ.get("ULD_FALLBACK_LIST", "1") != "0"
# "1": the lists are appended to by inline PTX (`ptx.list_append`), which removes two barriers
# a block from the listing pass (its PTX: 71 -> 35 bar.sync in the finish function; flagged
# Qwen/Qwen 57.3 -> 54.4 ms, sixteenth session); "0": by Triton's per-lane atomic_add.
FALLBACK_LIST_PTX = os.environ.get("ULD_FALLBACK_LIST_PTX", "1") != "0"
# Columns per step of the fallback's deeper levels (its finish pass; the other passes take the
# split engine's block).
FALLBACK_FINISH_BLOCK = int(os.environ.get("ULD_FALLBACK_FINISH_BLOCK", 512))
if FALLBACK_FINISH_BLOCK < 128 or FALLBACK_FINISH_BLOCK & (FALLBACK_FINISH_BLOCK - 1):
    raise ValueError(f"ULD_FALLBACK_FINISH_BLOCK must be a power of two >= 128, got {FALLBACK_FINISH_BLOCK}")
# Which engine computes bf16 rows: "hist" (uld_hist.py: histograms of the logits' values; rows
# it cannot settle exactly go to the trie) or "split" (the trie engine for every row). float32
# logits that hold bf16 values (a bf16 model's logits upcast with `.float()`) take the
# histogram engine too (ULD_HIST_FLOAT32, below); other float32 and fp16 rows take the trie:
# float32 has no small set of values, and fp16's 1,024 values per binade would need a
# histogram 8 times larger.
ENGINE = os.environ.get("ULD_ENGINE", "hist")
if ENGINE not in ("hist", "split"):
    raise ValueError(f"ULD_ENGINE must be 'hist' or 'split', got {ENGINE!r}")
# float32 logits go to the histogram engine where the first row of each side holds bf16 values
# only (a sample; rows of the call holding other values are flagged there and computed again
# by the trie, after one host sync): "0" sends every float32 call to the trie.
HIST_FLOAT32 = os.environ.get("ULD_HIST_FLOAT32", "1") != "0"
# "1" (the default): a row whose tiny bin splits is counted again with a gap where its bins
# hold a run of empty ones a binade wide (uld_hist.py, "Gaps"; the benchmark's `gapped` and
# `flagged` rows 10.7 ms against 46 through the trie, seventeenth session), by a second
# hist_kernel launch over the rows that may take one, so that the first launch's code, and
# every ordinary row's, is that without gaps. "0": such rows go to the trie.
HIST_GAPS = os.environ.get("ULD_HIST_GAPS", "1") != "0"
# The training loss's pairs (distill.py, gathered rows with the cross-entropy): "hist" (bf16
# pairs to the histogram engine: 13.66 ms against the trie's 17.48, RESULTS seventh session
# run 1) or "split" (the trie engine for every pair).
DISTILL_ENGINE = os.environ.get("ULD_DISTILL_ENGINE", "hist")
if DISTILL_ENGINE not in ("hist", "split"):
    raise ValueError(f"ULD_DISTILL_ENGINE must be 'hist' or 'split', got {DISTILL_ENGINE!r}")
# pairs per batch at most, 160 KB of workspace each: 6,144 (0.96 GB, within test_gpu's 1 GB
# bound beyond the gradient); 8,192 (1.34 GB) is 0.1 ms faster (tenth session, runs 4, 5)
HIST_BATCH = int(os.environ.get("ULD_HIST_BATCH", 6144))
# elements per step of hist_kernel's loop: 4,096 with the prefetch 8.01 ms, 2,048 without 8.42
# (ninth session, run 2)
HIST_BLOCK = int(os.environ.get("ULD_HIST_BLOCK", 4096))
# bins per step of sign_kernel's loop: 64 (62 registers, 32 programs an SM) 6.99 ms, 128 (104
# registers) 7.09, 32 7.36 (tenth session, run 2)
HIST_SIGN_BLOCK = int(os.environ.get("ULD_HIST_SIGN_BLOCK", 64))
HIST_SIGN_WARPS = int(os.environ.get("ULD_HIST_SIGN_WARPS", 1))
# sign_kernel's register cap with the gaps on (0: none): 64 keeps 32 one-warp programs an SM;
# uncapped, ptxas takes 67 for it (62 without the gaps), without spills at 64.
HIST_SIGN_MAXNREG = int(os.environ.get("ULD_HIST_SIGN_MAXNREG", 64))
# "1": the histogram engine's launches after a call's first are dependent launches (sm_90 on;
# uld_hist.py, "Dependent launches"): each one's programs placed while the previous drains.
HIST_PDL = os.environ.get("ULD_HIST_PDL", "1") != "0"
HIST_TAIL_BLOCK = 512  # bins per step of hist_kernel's pass over them: runs of 4 on each of 128 threads
# "1": hist_kernel's pass over bins reads each thread's run of counts without bank conflicts
# (ptx.smem_load_runs) and scans across the runs in inline PTX with one barrier a step
# (ptx.scan_runs), where Triton's scan and sum took three: hist 3.13 -> 3.05 ms, random 6.53 ->
# 6.49, peaked 6.61 -> 6.57 (twenty-eighth session, runs 3 and 4); "0": Triton's scan, as
# the interpreter runs it.
HIST_SCAN = os.environ.get("ULD_HIST_SCAN", "1") != "0"
# hist_kernel's register cap (0: none). Before rows past 256 were counted again (twelfth
# session), ptxas took 84 uncapped (88 allocated: 5 programs an SM); 80 gave 74 without spills
# and 6 programs, but measured no faster (6.94 against 6.88 ms, tenth session, run 3: the loop
# is bound by shared-memory atomics, not by warps). With the second count, uncapped, the
# cross-entropy's configuration takes 119 (4 programs an SM): 96 keeps 5, spilling one word
# outside the loops (`python tests/aot_sm90.py --resources hist`).
HIST_MAXNREG = int(os.environ.get("ULD_HIST_MAXNREG", 96))
# Loops of hist_kernel and grad_kernel load the next block before working on this one (two
# blocks in flight per thread): 8.13 ms against 8.42 at 2,048 (ninth session, run 2).
HIST_PREFETCH = os.environ.get("ULD_HIST_PREFETCH", "1") != "0"
HIST_GRAD_CHUNK = int(os.environ.get("ULD_HIST_GRAD_CHUNK", 32768))  # columns per grad_kernel program
# columns per step of its loop: 2,048 7.00 ms, 1,024 7.09 (tenth session, run 2)
HIST_GRAD_BLOCK = int(os.environ.get("ULD_HIST_GRAD_BLOCK", 2048))
if HIST_BLOCK % 256 or HIST_GRAD_BLOCK % 256:  # two logits per thread of 4 warps (SIMD16)
    raise ValueError(f"ULD_HIST_BLOCK and ULD_HIST_GRAD_BLOCK must be multiples of 256, got {HIST_BLOCK} and "
                     f"{HIST_GRAD_BLOCK}")
# Under the interpreter: small chunks and batches, so that short test rows still span several
# chunks and batches (every cross-program path runs), at a cost the interpreter can afford;
# a 1,024-bucket root (four resolve chunks: the carry across chunks runs) from tl.histogram.
SPLIT_INTERPRETED = dict(block=128, chunk=256, entries=8192, batch_rows=5, split_levels=2,
                         num_warps=4, stages=1, prefetch=True, root_bits=10, smem=False,
                         level_cap=512)


def split_config(on_gpu: bool) -> SplitConfig:
    knobs = dict(SPLIT if on_gpu else SPLIT_INTERPRETED)
    # The same sizes for every vocabulary: BLOCK and CHUNK are compile-time constants, and a
    # size derived from the vocabulary would compile the kernels anew for each one (masks
    # cover the columns past a short row).
    block = knobs["block"]
    chunk = max(block, knobs["chunk"] // block * block)
    if not 10 <= knobs["root_bits"] <= 12:
        raise ValueError(f"ULD_ROOT_BITS must be 10, 11 or 12, got {knobs['root_bits']}")
    if not 1 <= knobs["split_levels"] <= 8:
        raise ValueError(f"ULD_SPLIT_LEVELS must be in [1, 8] (a counter slot each; level 1 sums the loss), "
                         f"got {knobs['split_levels']}")
    if knobs["entries"] <= 1 << knobs["root_bits"]:
        raise ValueError(f"ULD_SPLIT_ENTRIES must exceed the root's {1 << knobs['root_bits']} buckets, "
                         f"got {knobs['entries']}")
    if knobs["level_cap"] < 1:
        raise ValueError(f"ULD_LEVEL_CAP must be a positive number of entries, got {knobs['level_cap']}")
    if knobs["block"] < 128 or knobs["block"] & (knobs["block"] - 1):
        raise ValueError(f"ULD_SPLIT_BLOCK must be a power of two >= 128, got {knobs['block']}")
    if chunk >= 65536:
        raise ValueError(f"ULD_CHUNK must be below 65,536 columns (16-bit partial root counts), got {chunk}")
    knobs.update(block=block, chunk=chunk)
    return SplitConfig(**knobs)


def _rows_and_vocab(logits: torch.Tensor) -> tuple[int, int]:
    """Rows (all leading dimensions) and vocabulary of 2-D ``[N, V]`` or 3-D ``[B, L, V]`` logits."""
    return (logits.shape[0] * logits.shape[1] if logits.dim() == 3 else logits.shape[0]), logits.shape[-1]


def _row_layout(logits: torch.Tensor) -> tuple[int, int, int, int]:
    """(sequence length, batch stride, row stride, column stride): row r of the flattened
    leading dimensions sits at (r // L) * batch stride + (r % L) * row stride, so a strided
    slice of [B, L, V] logits (``logits[:, :-1]``) is read in place, never flattened by copy."""
    if logits.dim() == 3:
        return max(logits.shape[1], 1), logits.stride(0), logits.stride(1), logits.stride(2)
    return max(logits.shape[0], 1), 0, logits.stride(0), logits.stride(1)


def uld_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_temperature: float,
    teacher_temperature: float,
    student_grad: bool,
    teacher_grad: bool,
    grad_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Row losses ``[N]`` (float32), status ``[N]`` (int32: bit 0 set when the trie's workspace
    ran out, even after `uld_pairs` gave the pair more (TRIE_RETRY_ENTRIES), and the row's
    loss is NaN; ``status >> 1`` = trie levels the row needed; 0 for rows the histogram engine
    settled) and the gradients of ``grad_scale * sum(row losses)``
    for the sides asked for (input dtypes).

    bf16 rows (and float32 ones holding bf16 values, `hist_takes`) go through the histogram
    engine (`hist_rows`) unless ULD_ENGINE=split, other dtypes through the trie engine
    (`uld_pairs`). Inputs are 2-D with any row stride; nothing
    is copied.
    """
    if ENGINE == "hist" and hist_takes(student_logits, teacher_logits):
        return hist_rows(student_logits, teacher_logits, student_temperature, teacher_temperature,
                         student_grad, teacher_grad, grad_scale)
    row_loss, status, _ce, grad_student, grad_teacher = uld_pairs(
        student_logits, teacher_logits, student_temperature, teacher_temperature,
        student_grad, teacher_grad, grad_scale)
    return row_loss, status, grad_student, grad_teacher


def _pair_outputs(student_logits, teacher_logits, student_index, has_ce, student_grad, teacher_grad,
                  grad_student, grad_teacher):
    """The pairs' count and what both engines return for them: row losses, cross-entropies
    (with the cross-entropy), and the gradients asked for, allocated unless given (gathered:
    zero-filled, for rows no pair reads)."""
    n_student_rows, student_vocab = _rows_and_vocab(student_logits)
    n_teacher_rows, teacher_vocab = _rows_and_vocab(teacher_logits)
    gather = student_index is not None
    n_pairs = student_index.numel() if gather else n_student_rows
    device = student_logits.device
    row_loss = torch.empty(n_pairs, dtype=torch.float32, device=device)
    row_ce = torch.empty(n_pairs, dtype=torch.float32, device=device) if has_ce else None
    new = torch.zeros if gather else torch.empty
    if student_grad and grad_student is None:
        grad_student = new((n_student_rows, student_vocab), dtype=student_logits.dtype, device=device)
    if teacher_grad and grad_teacher is None:
        grad_teacher = new((n_teacher_rows, teacher_vocab), dtype=teacher_logits.dtype, device=device)
    return (n_pairs, row_loss, row_ce, grad_student if student_grad else None,
            grad_teacher if teacher_grad else None)


def hist_takes(student_logits, teacher_logits) -> bool:
    """Whether the histogram engine computes these logits: rows shorter than 2**21 (its scan
    of counts per bin holds 21 bits), both bf16, or both float32 holding bf16 values in the
    first row of each side (`_holds_bf16`; ULD_HIST_FLOAT32)."""
    if max(student_logits.shape[-1], teacher_logits.shape[-1]) >= uld_hist.MAX_VOCAB.value:
        return False
    if student_logits.dtype == teacher_logits.dtype == torch.bfloat16:
        return True
    return (HIST_FLOAT32 and student_logits.dtype == teacher_logits.dtype == torch.float32
            and _holds_bf16(student_logits) and _holds_bf16(teacher_logits))


def _holds_bf16(logits: torch.Tensor) -> bool:
    """Whether the first row of float32 logits holds bf16 values only (the low 16 bits of each
    0): a sample, one host sync, that sends a bf16 model's upcast logits to the histogram
    engine and a float32 model's straight to the trie (the engine flags any other row)."""
    if logits.numel() == 0:
        return True
    first = logits[(0,) * (logits.dim() - 1)]
    return not bool((first.view(torch.int32) & 0xFFFF).any())


def _hist_blocks(dtype: torch.dtype, on_gpu: bool) -> tuple[int, int]:
    """Logits per step of hist_kernel's and grad_kernel's loops: float32 rows take half the
    steps of bf16 ones (the same bytes a step, the same registers)."""
    if not on_gpu:
        return 256, 128
    wide = 2 if dtype == torch.float32 else 1
    return HIST_BLOCK // wide, HIST_GRAD_BLOCK // wide


def hist_rows(student_logits, teacher_logits, student_temperature, teacher_temperature,
              student_grad, teacher_grad, grad_scale, *, fallback=True):
    """`uld_rows` through the histogram engine (kernels/uld_hist.py; bf16 logits). Rows it
    flags (those it cannot settle exactly) are computed again by the trie engine when
    ``fallback`` is set, and carry the trie's status; the others have status 0. Without
    ``fallback``, the status is the engine's flag bits (nonzero: no valid loss or gradient;
    for tests and diagnostics: which rows did the histogram engine settle, and why not?)."""
    row_loss, status, _ce, grad_s, grad_t = hist_pairs(
        student_logits, teacher_logits, student_temperature, teacher_temperature, student_grad, teacher_grad,
        grad_scale, fallback=fallback)
    return row_loss, status, grad_s, grad_t


def hist_pairs(student_logits, teacher_logits, student_temperature, teacher_temperature, student_grad,
               teacher_grad, grad_scale, *, student_index=None, teacher_index=None, row_weight=None,
               ce_label=None, ce_weight=None, grad_student=None, grad_teacher=None, fallback=True):
    """`uld_pairs` (the same arguments and results) through the histogram engine: bf16 logits,
    or float32 ones holding bf16 values (`hist_takes`). Flagged pairs go to the trie engine as
    in `hist_rows` (float32 ones through `_split_subset`, after one host sync); padding pairs
    (a negative student index) have loss 0, cross-entropy 0, status 0, and no gradient
    written."""
    if not hist_takes(student_logits, teacher_logits):
        raise ValueError(f"the histogram engine takes bf16 logits (or float32 ones holding bf16 values) shorter "
                         f"than {uld_hist.MAX_VOCAB.value}, got {student_logits.dtype} "
                         f"{tuple(student_logits.shape)} (student) and {teacher_logits.dtype} "
                         f"{tuple(teacher_logits.shape)} (teacher)")
    gather = student_index is not None
    has_ce = ce_label is not None
    _, student_vocab = _rows_and_vocab(student_logits)
    _, teacher_vocab = _rows_and_vocab(teacher_logits)
    device = student_logits.device
    on_gpu = device.type == "cuda"
    n_pairs, row_loss, row_ce, grad_student, grad_teacher = _pair_outputs(
        student_logits, teacher_logits, student_index, has_ce, student_grad, teacher_grad, grad_student,
        grad_teacher)
    flags = torch.empty(n_pairs, dtype=torch.int32, device=device)  # (finish_kernel writes every pair's)
    if n_pairs == 0:
        return row_loss, flags, row_ce, grad_student, grad_teacher
    padding = None
    if gather:  # the teacher side of a padding pair is padding too
        padding = student_index < 0
        teacher_index = torch.where(padding, -1, teacher_index)
    sides = ((student_logits, 1.0 / student_temperature, grad_student, student_vocab, student_index),
             (teacher_logits, 1.0 / teacher_temperature, grad_teacher, teacher_vocab, teacher_index))
    _hist_batches(row_loss, flags, row_ce, sides, grad_scale, n_pairs, on_gpu, row_weight, ce_label, ce_weight)
    status = flags
    if gather:
        row_loss = torch.where(padding, 0.0, row_loss)
        status = torch.where(padding, 0, status)
    args = (student_logits, teacher_logits, row_loss, status, row_ce, grad_student, grad_teacher,
            student_temperature, teacher_temperature, grad_scale, student_index, teacher_index, row_weight,
            ce_label, ce_weight)
    if fallback and student_logits.dtype == torch.bfloat16:
        # Flagged pairs, again through the trie: one launch whatever their number (none, as a
        # rule), nothing waits for the GPU; their losses, statuses, cross-entropies and
        # gradient rows are written in place.
        _trie_fallback(*args, n_pairs)
    elif fallback:
        # float32: the flagged pairs (rows holding values bf16 cannot, mostly) through the
        # split engine, which takes any float32 and retries a pair that runs out of workspace.
        flagged = torch.nonzero(status).flatten()
        if flagged.numel():
            _split_subset(flagged, split_config(on_gpu), *args)
            _retry_exhausted(*args)
    return row_loss, status, row_ce, grad_student, grad_teacher


def _hist_batches(row_loss, flags, row_ce, sides, grad_scale, n_pairs, on_gpu, row_weight, ce_label, ce_weight):
    """The histogram engine's launches (kernels/uld_hist.py), batch by batch: losses (and
    cross-entropies) and flags of every pair, gradients of the unflagged ones."""
    device = row_loss.device
    cap, slots = uld_hist.CAP.value, uld_hist.PARAM_SLOTS.value
    # Batches of equal size (the last one is not a short tail of a few pairs), at most HIST_BATCH.
    batch = triton.cdiv(n_pairs, triton.cdiv(n_pairs, HIST_BATCH if on_gpu else 3))
    fparam = torch.empty(batch * 2 * slots, dtype=torch.float32, device=device)
    iparam = torch.empty(batch * 2 * slots, dtype=torch.int32, device=device)
    counts = torch.empty(batch * 2 * cap, dtype=torch.int32, device=device)  # prefix counts per bin
    occupied = torch.empty(batch * 2 * cap, dtype=torch.int16, device=device)  # the occupied bins, listed
    signs = torch.empty(batch * 2 * cap, dtype=torch.float32, device=device)
    use_ptx = on_gpu and SPLIT["smem"]
    simd16 = use_ptx and torch.cuda.get_device_capability(device) >= (9, 0)  # u16x2 instructions: sm_90 on
    # the histogram's slots without shared memory (the interpreter), apart from the prefix counts
    pdl = simd16 and HIST_PDL  # (uld_hist.py, "Dependent launches": not the call's first launch)
    raw = torch.empty(batch * 2 * cap if not use_ptx else 1, dtype=torch.int32, device=device)
    hist_block, block = _hist_blocks(sides[0][0].dtype, on_gpu)
    chunk = max(block, HIST_GRAD_CHUNK // block * block) if on_gpu else 256
    partial = torch.empty(batch * 2, dtype=torch.float64, device=device)  # each side's sum of p * sign
    student_logits, student_inv_t, student_grad, student_vocab, student_index = sides[0]
    teacher_logits, teacher_inv_t, teacher_grad, teacher_vocab, teacher_index = sides[1]
    gather = student_index is not None
    has_ce = row_ce is not None
    unused = row_loss  # stands for pointers a configuration never reads
    for batch_start in range(0, n_pairs, batch):
        rows = min(batch, n_pairs - batch_start)
        if not use_ptx:
            raw.zero_()
        # Both sides of every pair; with the gaps, again the rows that may take one, in a launch
        # of their own (uld_hist.py, "Gaps": the first one's code is that without gaps).
        for grid, redo in [((rows, 2), False), *([((triton.cdiv(rows, uld_hist.REDO_PAIRS.value), 2), True)]
                                                 if HIST_GAPS else [])]:
            uld_hist.hist_kernel[grid](
                student_logits, teacher_logits, student_index if gather else unused,
                teacher_index if gather else unused, counts, occupied, raw, fparam, iparam, batch_start,
                student_vocab, teacher_vocab, *_row_layout(student_logits), *_row_layout(teacher_logits),
                student_inv_t, teacher_inv_t, rows, GATHER=gather, STUDENT_UNIT_STRIDE=student_logits.stride(-1) == 1,
                TEACHER_UNIT_STRIDE=teacher_logits.stride(-1) == 1, USE_PTX=use_ptx and 1 + HIST_SCAN, SIMD16=simd16,
                HAS_CE=has_ce,
                PREFETCH=HIST_PREFETCH or not on_gpu, BLOCK=hist_block, TAIL_BLOCK=HIST_TAIL_BLOCK, GAPS=redo,
                REDO=redo, PDL=pdl, launch_pdl=pdl and (batch_start > 0 or redo), num_warps=4,
                **({"maxnreg": HIST_MAXNREG} if on_gpu and HIST_MAXNREG else {}))
        uld_hist.sign_kernel[(rows, 2)](  # both sides of every pair
            fparam, iparam, counts, occupied, signs, partial, student_inv_t, teacher_inv_t,
            STORE_STUDENT=student_grad is not None, STORE_TEACHER=teacher_grad is not None, USE_PTX=use_ptx,
            BLOCK=HIST_SIGN_BLOCK if on_gpu else 512, GAPS=HIST_GAPS, PDL=pdl, launch_pdl=pdl,
            num_warps=HIST_SIGN_WARPS if on_gpu else 4,
            **({"maxnreg": HIST_SIGN_MAXNREG} if on_gpu and HIST_GAPS and HIST_SIGN_MAXNREG else {}))
        uld_hist.finish_kernel[(rows,)](
            fparam, iparam, counts, partial, row_loss, flags, batch_start, student_logits,
            student_index if gather else unused, ce_label if has_ce else unused, row_ce if has_ce else unused,
            student_vocab, *_row_layout(student_logits), GATHER=gather, HAS_CE=has_ce, GAPS=HIST_GAPS, PDL=pdl,
            launch_pdl=pdl, num_warps=1)
        for side, (logits, inv_t, grad, vocab, index) in enumerate(sides):
            if grad is None:
                continue
            n_chunks = triton.cdiv(vocab, chunk)
            uld_hist.grad_kernel[(rows * n_chunks,)](
                logits, index if gather else unused, grad, fparam, iparam, signs,
                row_weight if gather else unused, ce_label if has_ce else unused, ce_weight if has_ce else unused,
                batch_start, side, n_chunks, vocab, *_row_layout(logits), grad.stride(-2), inv_t, grad_scale,
                GATHER=gather, HAS_CE=has_ce and side == 0, UNIT_STRIDE=logits.stride(-1) == 1,
                PREFETCH=HIST_PREFETCH or not on_gpu, USE_PTX=use_ptx, SIMD16=simd16, CHUNK=chunk,
                BLOCK=block, GAPS=HIST_GAPS, PDL=pdl, launch_pdl=pdl, num_warps=4)


def uld_pairs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_temperature: float,
    teacher_temperature: float,
    student_grad: bool,
    teacher_grad: bool,
    grad_scale: float,
    *,
    student_index: torch.Tensor | None = None,
    teacher_index: torch.Tensor | None = None,
    row_weight: torch.Tensor | None = None,
    ce_label: torch.Tensor | None = None,
    ce_weight: torch.Tensor | None = None,
    grad_student: torch.Tensor | None = None,
    grad_teacher: torch.Tensor | None = None,
):
    """ULD over pairs of rows, optionally gathered by index, optionally with the student's
    cross-entropy fused in. Returns (row losses, status, row cross-entropies or None,
    student gradient or None, teacher gradient or None).

    Inputs are 2-D ``[N, V]`` or 3-D ``[B, L, V]`` (rows = the flattened leading dimensions),
    any strides. Without indices, pair r is row r of both inputs. With ``student_index`` /
    ``teacher_index`` (int64 ``[M]``, rows of the 2-D inputs; a negative student index is
    padding), pair r reads those rows, its gradient is weighted by ``row_weight[r]``
    (float32), and the gradients are full-size (those allocated here: zero on rows no pair
    reads). With
    ``ce_label`` (int64 ``[M]``, negative: none) and ``ce_weight`` (float32 ``[M]``), the
    student's temperature-1 cross-entropy of each pair's row is returned and its gradient,
    weighted, is added to the student's. ``grad_student``: a 2-D buffer to write the student
    gradient into (its row stride may exceed the vocabulary: padded lm_head columns); the rows
    of the pairs are written whole, the others are left as they are. ``grad_teacher``: the
    same for the teacher's gradient.
    """
    n_pairs, row_loss, row_ce, grad_student, grad_teacher = _pair_outputs(
        student_logits, teacher_logits, student_index, ce_label is not None, student_grad, teacher_grad,
        grad_student, grad_teacher)
    status = torch.empty(n_pairs, dtype=torch.int32, device=student_logits.device)
    if n_pairs == 0:
        return row_loss, status, row_ce, grad_student, grad_teacher
    args = (student_logits, teacher_logits, row_loss, status, row_ce, grad_student, grad_teacher,
            student_temperature, teacher_temperature, grad_scale, student_index, teacher_index, row_weight,
            ce_label, ce_weight)
    _split_pairs(*args, n_pairs)
    _retry_exhausted(*args)
    return row_loss, status, row_ce, grad_student, grad_teacher


def _retry_exhausted(student_logits, teacher_logits, row_loss, status, row_ce, grad_student, grad_teacher,
                     student_temperature, teacher_temperature, grad_scale, student_index, teacher_index,
                     row_weight, ce_label, ce_weight):
    """The pairs that ran out of workspace (status bit 0), computed again alone with 4x the
    trie entries each time, up to TRIE_RETRY_ENTRIES, in place: their losses, statuses,
    cross-entropies and gradient rows. One host sync (the count of such pairs) per call of the
    trie engine; the histogram engine's bf16 rows never come here. A pair still out of
    workspace at the largest size keeps its NaN loss, with a warning."""
    cfg = split_config(student_logits.device.type == "cuda")
    while True:
        exhausted = torch.nonzero(status & 1).flatten()
        n = exhausted.numel()
        if n == 0:
            return
        if cfg.entries * 4 > TRIE_RETRY_ENTRIES:
            warnings.warn(f"uld_kernels: {n} row pair(s) ran out of trie workspace at {cfg.entries} entries "
                          f"(ULD_TRIE_RETRY_ENTRIES); their loss is NaN", RuntimeWarning, stacklevel=3)
            return
        cfg = dataclasses.replace(cfg, entries=cfg.entries * 4, batch_rows=max(1, cfg.batch_rows // 4))
        _split_subset(exhausted, cfg, student_logits, teacher_logits, row_loss, status, row_ce, grad_student,
                      grad_teacher, student_temperature, teacher_temperature, grad_scale, student_index,
                      teacher_index, row_weight, ce_label, ce_weight)


def _split_subset(pairs, cfg, student_logits, teacher_logits, row_loss, status, row_ce, grad_student, grad_teacher,
                  student_temperature, teacher_temperature, grad_scale, student_index, teacher_index, row_weight,
                  ce_label, ce_weight):
    """Pairs ``pairs`` (int64 indices) computed again by the split engine with sizes ``cfg``,
    in place: their losses, statuses, cross-entropies and gradient rows."""
    n = pairs.numel()
    gather = student_index is not None
    device = student_logits.device
    sub_loss = torch.empty(n, dtype=torch.float32, device=device)
    sub_status = torch.empty(n, dtype=torch.int32, device=device)
    sub_ce = torch.empty(n, dtype=torch.float32, device=device) if ce_label is not None else None
    # Gathered, whatever the call was: pair r of the subset reads the rows of pair pairs[r] and
    # writes their gradient rows whole into the same buffers (weight 1 for aligned rows).
    _split_pairs(student_logits, teacher_logits, sub_loss, sub_status, sub_ce, grad_student, grad_teacher,
                 student_temperature, teacher_temperature, grad_scale,
                 student_index[pairs] if gather else pairs,
                 teacher_index[pairs] if gather else pairs,
                 row_weight[pairs] if gather else torch.ones(n, dtype=torch.float32, device=device),
                 ce_label[pairs] if ce_label is not None else None,
                 ce_weight[pairs] if ce_weight is not None else None, n, cfg=cfg)
    row_loss[pairs] = sub_loss
    status[pairs] = sub_status
    if row_ce is not None:
        row_ce[pairs] = sub_ce


def _trie_workspace(batch, cfg, n_chunks, chunks_pow2, device):
    """The trie engine's workspace for `batch` pairs at a time: (int planes, sign planes, meta,
    row floats, bucket masses, row masses), the per-chunk partial floats and ints, the root's
    per-chunk partial counts."""
    trie = (torch.empty(batch * INT_PLANES * cfg.entries, dtype=torch.int32, device=device),
            torch.empty(batch * SIGN_PLANES * cfg.entries, dtype=torch.float32, device=device),
            torch.empty(batch * META_SLOTS, dtype=torch.int32, device=device),
            torch.empty(batch * uld_split.ROW_FLOATS.value, dtype=torch.float32, device=device),
            # int64 masses of the buckets below the root, both sides
            torch.empty(batch * 2 * (cfg.entries - (1 << cfg.root_bits)), dtype=torch.int64, device=device),
            torch.empty(batch * 2, dtype=torch.float64, device=device))
    partial = torch.empty(batch * chunks_pow2 * uld_split.PARTIAL_FLOATS.value, dtype=torch.float32, device=device)
    partial_i = torch.empty(batch * chunks_pow2 * uld_split.PARTIAL_INTS.value, dtype=torch.int32, device=device)
    root_partial = torch.empty(batch * n_chunks << cfg.root_bits, dtype=torch.int32, device=device)
    return trie, partial, partial_i, root_partial


def _fallback_list_mode() -> int:
    """fallback_kernel's LIST: 0 no lists, 1 lists, 2 lists appended by inline PTX."""
    return 0 if not FALLBACK_LIST else 2 if FALLBACK_LIST_PTX else 1


def _fallback_list_cap(root_chunks: int, cfg: SplitConfig) -> int:
    """Columns a side that the fallback's finish pass may list (`FALLBACK_LIST`): half of a
    slot's root partial counts (root_chunks << root_bits int32 words), spent by then."""
    return (root_chunks << cfg.root_bits) // 2


def _trie_fallback(student_logits, teacher_logits, row_loss, status, row_ce, grad_student, grad_teacher,
                   student_temperature, teacher_temperature, grad_scale, student_index, teacher_index,
                   row_weight, ce_label, ce_weight, n_pairs):
    """The trie engine over the pairs of nonzero ``status`` (the histogram engine's flags), in
    place and in one launch (`uld_split.fallback_kernel`): a persistent grid of up to
    ``batch_rows`` programs, each with a workspace slot, walks every pair and computes the
    flagged ones whole."""
    gather = student_index is not None
    has_ce = ce_label is not None
    _, student_vocab = _rows_and_vocab(student_logits)
    _, teacher_vocab = _rows_and_vocab(teacher_logits)
    device = student_logits.device
    cfg = split_config(device.type == "cuda")
    programs = min(n_pairs, cfg.batch_rows)
    root_chunks = triton.cdiv(max(student_vocab, teacher_vocab), cfg.chunk)
    trie, partial, partial_i, root_partial = _trie_workspace(programs, cfg, root_chunks, 2, device)
    unused = row_loss  # stands for pointers a configuration never reads
    uld_split.fallback_kernel[(programs,)](
        student_logits, teacher_logits, row_loss, status,
        grad_student if grad_student is not None else unused, grad_teacher if grad_teacher is not None else unused,
        *trie, partial, partial_i, root_partial, student_index if gather else unused,
        teacher_index if gather else unused, row_weight if gather else unused, ce_label if has_ce else unused,
        ce_weight if has_ce else unused, row_ce if has_ce else unused, n_pairs, root_chunks,
        _fallback_list_cap(root_chunks, cfg), student_vocab,
        teacher_vocab, *_row_layout(student_logits), *_row_layout(teacher_logits),
        grad_student.stride(0) if grad_student is not None else 0,
        grad_teacher.stride(0) if grad_teacher is not None else 0,
        1.0 / student_temperature, 1.0 / teacher_temperature, grad_scale,
        SAME_VOCAB=student_vocab == teacher_vocab, STUDENT_UNIT_STRIDE=student_logits.stride(-1) == 1,
        TEACHER_UNIT_STRIDE=teacher_logits.stride(-1) == 1, GATHER=gather, HAS_CE=has_ce,
        STUDENT_GRAD=grad_student is not None, TEACHER_GRAD=grad_teacher is not None,
        BLOCK=cfg.block, FINISH_BLOCK=min(cfg.block, FALLBACK_FINISH_BLOCK), ROOT_CHUNK=cfg.chunk, ENTRIES=cfg.entries,
        RESOLVE_BLOCK=256, MAX_LEVELS=_MAX_LEVELS, ROOT_BITS=cfg.root_bits,
        USE_PTX=cfg.smem and device.type == "cuda", LEVEL_CAP=cfg.level_cap, PREFETCH=cfg.prefetch,
        SMEM_L1=FALLBACK_SMEM_L1, LIST=_fallback_list_mode(), num_warps=cfg.num_warps, num_stages=1)


def _split_pairs(student_logits, teacher_logits, row_loss, status, row_ce, grad_student,
                 grad_teacher, student_temperature, teacher_temperature, grad_scale,
                 student_index, teacher_index, row_weight, ce_label, ce_weight, n_pairs, cfg=None):
    """The split engine: per batch of pairs, one launch per pass over a (pair, chunk) grid
    (`cfg`: its sizes, `split_config` unless given)."""
    gather = student_index is not None
    has_ce = ce_label is not None
    _, student_vocab = _rows_and_vocab(student_logits)
    _, teacher_vocab = _rows_and_vocab(teacher_logits)
    longest = max(student_vocab, teacher_vocab)
    device = student_logits.device
    cfg = cfg or split_config(device.type == "cuda")
    n_chunks = triton.cdiv(longest, cfg.chunk)
    chunks_pow2 = triton.next_power_of_2(n_chunks)
    batch = min(n_pairs, cfg.batch_rows)
    trie, partial, partial_i, root_partial = _trie_workspace(batch, cfg, n_chunks, chunks_pow2, device)
    unused = row_loss  # stands for pointers a configuration never reads
    s_index = student_index if gather else unused
    t_index = teacher_index if gather else unused
    layouts = (*_row_layout(student_logits), *_row_layout(teacher_logits))
    temps = (1.0 / student_temperature, 1.0 / teacher_temperature)
    strides = dict(STUDENT_UNIT_STRIDE=student_logits.stride(-1) == 1,
                   TEACHER_UNIT_STRIDE=teacher_logits.stride(-1) == 1, GATHER=gather)
    sizes = dict(BLOCK=cfg.block, ENTRIES=cfg.entries, MAX_LEVELS=_MAX_LEVELS, STAGES=cfg.stages,
                 ROOT_BITS=cfg.root_bits, num_warps=cfg.num_warps)
    use_ptx = cfg.smem and device.type == "cuda"  # inline PTX (kernels/ptx.py): never interpreted
    for batch_start in range(0, n_pairs, batch):
        rows = min(batch, n_pairs - batch_start)
        grid = (rows * n_chunks,)
        trie[2].zero_()  # the per-pass counters of the last program of each pair
        uld_split.stats_kernel[grid](
            student_logits, teacher_logits, row_loss, status, *trie, partial, partial_i,
            s_index, t_index, ce_label if has_ce else unused, row_ce if has_ce else unused,
            n_chunks, batch_start, student_vocab, teacher_vocab, *layouts, *temps,
            SAME_VOCAB=student_vocab == teacher_vocab, HAS_CE=has_ce, CHUNK=cfg.chunk,
            CHUNKS_POW2=chunks_pow2, RESOLVE_BLOCK=256, **strides, **sizes)
        common = (student_logits, teacher_logits, *trie, s_index, t_index)
        uld_split.root_kernel[grid](
            *common, root_partial, n_chunks, batch_start, student_vocab,
            teacher_vocab, *layouts, *temps, CHUNK=cfg.chunk, RESOLVE_BLOCK=256, USE_PTX=use_ptx,
            LEVEL_CAP=cfg.level_cap, **strides, **sizes)
        for level in range(1, cfg.split_levels + 1):
            uld_split.count_kernel[grid](
                *common, partial, n_chunks, batch_start, level, student_vocab, teacher_vocab, *layouts,
                *temps, CHUNK=cfg.chunk, CHUNKS_POW2=chunks_pow2, RESOLVE_BLOCK=256, LOSS=level == 1,
                USE_PTX=use_ptx, PREFETCH=cfg.prefetch, **strides, **sizes)
        uld_split.finish_kernel[(rows,)](
            student_logits, teacher_logits, row_loss, status, *trie, partial, s_index, t_index,
            n_chunks, batch_start, student_vocab, teacher_vocab, *layouts, *temps,
            CHUNKS_POW2=chunks_pow2, RESOLVE_BLOCK=256, USE_PTX=use_ptx, PREFETCH=cfg.prefetch, **strides,
            **dict(sizes, BLOCK=min(cfg.block, 512)))  # 8 elements per thread spill more here
        if grad_student is not None or grad_teacher is not None:
            uld_split.grad_kernel[grid](
                student_logits, teacher_logits,
                grad_student if grad_student is not None else unused,
                grad_teacher if grad_teacher is not None else unused,
                *trie, s_index, t_index, row_weight if gather else unused,
                ce_label if has_ce else unused, ce_weight if has_ce else unused,
                n_chunks, batch_start, student_vocab, teacher_vocab, *layouts,
                grad_student.stride(0) if grad_student is not None else 0,
                grad_teacher.stride(0) if grad_teacher is not None else 0,
                *temps, grad_scale, STUDENT_GRAD=grad_student is not None,
                TEACHER_GRAD=grad_teacher is not None, HAS_CE=has_ce, CHUNK=cfg.chunk,
                USE_PTX=use_ptx, PREFETCH=cfg.prefetch, **strides, **sizes)


def cross_entropy_rows(
    logits: torch.Tensor,
    index: torch.Tensor,
    label: torch.Tensor,
    weight: torch.Tensor,
    grad: torch.Tensor | None,
) -> torch.Tensor:
    """Temperature-1 cross-entropy of rows ``index[r]`` of 2-D ``logits`` against tokens
    ``label[r]`` (``[M]`` float32; 0 where either is negative); when ``grad`` is given,
    writes ``weight[r]`` times each row's gradient into ``grad[index[r]]`` (other rows are
    left as they are)."""
    n = index.numel()
    row_ce = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return row_ce
    _, vocab = _rows_and_vocab(logits)
    cfg = ce_kernel_config(vocab)
    ce_rows_kernel[(n,)](
        logits, index, label, weight, row_ce, grad if grad is not None else row_ce,
        vocab, *_row_layout(logits), grad.stride(0) if grad is not None else 0,
        WRITE_GRAD=grad is not None, UNIT_COL_STRIDE=logits.stride(-1) == 1,
        BLOCK=cfg.block, STAGES=cfg.stages, num_warps=cfg.num_warps,
    )
    return row_ce


def _row_grid(grad: torch.Tensor) -> tuple[int, int, tuple[int, int]]:
    """Block, rows per program and persistent grid (row programs, programs per row) of the
    elementwise row kernels: at most 8 programs of 8 warps an SM, whatever the number of rows,
    so that a launch with little to do (rows already written, a scale of exactly 1) costs a few
    hundred programs, not one per block of the gradient. Each row program takes a run of
    consecutive rows."""
    n_rows, width = grad.shape
    block = 4096 if grad.is_cuda else 1024
    splits = max(1, min(triton.cdiv(width, block), 8))
    rows_per_program = triton.cdiv(n_rows, max(1, _resident_programs(grad.device) // splits))
    return block, rows_per_program, (triton.cdiv(n_rows, rows_per_program), splits)


def _contiguous_rows(grad: torch.Tensor) -> tuple[int, int]:
    """(rows, columns) of a gradient the row kernels index as ``row * columns + column``."""
    n_rows, width = grad.shape
    if grad.stride() != (width, 1):
        raise ValueError(f"grad must be a contiguous [rows, columns] tensor, got strides {grad.stride()}")
    return n_rows, width


def rows_written(n_rows: int, *indices: torch.Tensor, device) -> torch.Tensor:
    """``[n_rows]`` int8: 1 at each row some index names (negative entries name none), the
    ``written`` map of `zero_unwritten_`."""
    written = torch.zeros(n_rows + 1, dtype=torch.int8, device=device)  # entry n_rows takes the negatives
    for index in indices:
        written.index_fill_(0, torch.where(index >= 0, index, n_rows).long(), 1)
    return written[:n_rows]


def zero_unwritten_(grad: torch.Tensor, written: torch.Tensor, used: int) -> None:
    """In place, on a contiguous ``[rows, width]`` gradient about to be written by the kernels:
    zeroes the rows they will not write (``written[r] == 0``) and, in the others, the columns
    past ``used``. Cheaper than zeroing the whole buffer first, which the written rows
    would overwrite."""
    n_rows, width = _contiguous_rows(grad)
    if n_rows == 0 or width == 0:
        return
    block, rows_per_program, grid = _row_grid(grad)
    zero_rows_kernel[grid](grad, written, n_rows, rows_per_program, used, width, BLOCK=block, ROWS=128,
                           num_warps=8)


def scale_rows_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """In place: ``grad[r] *= scale`` (``scale`` one element, or one per row) on a contiguous
    ``[rows, vocab]`` gradient. Rows whose scale is exactly 1 are not touched, so the common
    ``loss.backward()`` moves no bytes (and its launch is a persistent grid of a few hundred
    programs)."""
    n_rows, vocab = _contiguous_rows(grad)
    if scale.numel() not in (1, n_rows) or not scale.is_contiguous():
        raise ValueError(f"scale must be a contiguous tensor of 1 or {n_rows} (rows) elements, got shape "
                         f"{tuple(scale.shape)}")
    if n_rows == 0 or vocab == 0:
        return
    block, rows_per_program, grid = _row_grid(grad)
    scale_rows_kernel[grid](grad, scale, n_rows, rows_per_program, vocab, SCALE_PER_ROW=scale.numel() != 1,
                            BLOCK=block, num_warps=8)


TOPK_MAX_K = 1024  # the largest top_k the Triton select takes (a sort of k keys a row); past it, PyTorch
TOPK_STATS = uld_topk.STATS.value  # saved floats a row and side
TOPK_BLOCK = 1024  # elements of a row per step of the top_k kernels
TOPK_WARPS = 4  # the shared histogram's helpers (kernels/ptx.py) take 4 warps
TOPK_PREFETCH = True  # the select's passes load the next block before working on this one
TOPK_MAXNREG = 80  # the select's register cap: 6 programs an SM (the shared array allows 6; 128 registers gave 4: 5.31 -> 4.51 ms, NOTES)
TOPK_RUNS = 4  # the collect pass's runs a step (one a warp, each counting its own: `_collect_by_run`)
# Bins of the shared histogram read at a time (all 8,192 at once took 254 registers, 38.8 ms
# against 23.9 ms a forward: run 7).
TOPK_BIN_CHUNK = 1024
# The sort's keys must fit beside the shared histogram: past 1,024 int64 (Triton's 8 KB plus the
# 32 KB array) a launch needs more than 48 KB of shared memory and fails (run 7, k = 1,000).
TOPK_SORT_MAX = 1024
TOPK_SORT_FACTOR = 4  # the select sorts up to this many times k_pad logits a side instead of refining (0: never)
# Blocks of a row sampled for a first guess at the select's threshold, at most (kernels/uld_topk.py,
# `_sample_threshold`: one block in four of a shorter row; under 2 blocks, 0 or 1 here included,
# no guess: every row takes the histogram passes).
TOPK_SAMPLE = 16


def topk_level_bits(dtype: torch.dtype) -> tuple[int, int, int]:
    """Bits of the float32 order key that each level of the top_k select resolves: all the
    significant bits of the dtype's logits (float16: sign, 8 exponent bits as float32, 10
    mantissa bits), so that the last level's bin holds equal logits only."""
    return {torch.float32: (13, 13, 6), torch.bfloat16: (13, 3, 0), torch.float16: (13, 6, 0)}[dtype]


def topk_pad(k: int) -> int:
    """Ranks a row's select keeps, a power of two."""
    return max(16, triton.next_power_of_2(k))


def topk_sizes(k: int) -> dict:
    """The select's sizes at ``k`` (kernels/uld_topk.py's constexprs): the ranks kept
    (``K_PAD``), the most logits a side sorted instead of refining (``SORT_CAP``), the sort's
    size, the collect pass's runs and each run's region (half of what is sorted), and the
    scratch row's length in int64 (2 SORT_CAP: 8 KiB a pair at k = 100, 16 KiB from k = 513;
    freed after the forward), and the most blocks sampled for a first guess."""
    k_pad = topk_pad(k)
    sort_cap = min(TOPK_SORT_FACTOR * k_pad, max(k_pad, TOPK_SORT_MAX))
    sort_pad = max(k_pad, sort_cap)
    region = sort_cap // 2
    return dict(K_PAD=k_pad, SORT_CAP=sort_cap, SORT_PAD=sort_pad, RUNS=TOPK_RUNS, REGION=region,
                SCRATCH=max(sort_pad, TOPK_RUNS * region), SAMPLE=TOPK_SAMPLE)


def topk_rows(student_logits, teacher_logits, k, student_temperature, teacher_temperature, save,
              student_index=None, teacher_index=None, given=False):
    """The truncated loss's rows (``[N]`` float32) and, for each side that ``save`` names,
    what its backward needs: ``(stats [N, 5] float32 (largest logit (not over T), log-sum, and
    ``g - mass`` for g = 0, +1, -1: kernels/uld_topk.py, `_gradient_factors`),
    columns [N, K] int32, signs [N, K] int8)``, ``K = topk_pad(k)``, else None. Rows aligned
    ``[N, V]``, or ``[B, L, V]`` with flat ``[N]`` index maps (``-1``: padding slot).

    ``given``: ``teacher_logits`` is the teacher's first ``k`` probabilities, ``[N, k]``
    float32 descending, and the loss the full sorted L1 against them (kernels/uld_topk.py,
    GIVEN; the student's signs are then `_given_codes`' codes); ``save[1]`` must be False."""
    if given and save[1]:
        raise ValueError("topk_rows: a given teacher (given=True) has no saved state: save[1] must be False")
    gather = student_index is not None
    n = student_index.shape[0] if gather else student_logits.shape[0]
    device = student_logits.device
    sizes = topk_sizes(k)
    k_pad = sizes["K_PAD"]
    loss = torch.empty(n, dtype=torch.float32, device=device)
    saved = [(torch.empty(n, TOPK_STATS, dtype=torch.float32, device=device),
              torch.empty(n, k_pad, dtype=torch.int32, device=device),
              torch.empty(n, k_pad, dtype=torch.int8, device=device)) if keep else None for keep in save]
    if n == 0:
        return loss, saved
    smem = not interpreter_enabled()
    if smem and not TOPK_WARPS == TOPK_RUNS == SMEM_THREADS.value // 32:
        # the shared histogram is sized for 4 warps, and the collect pass's runs are the warps
        raise ValueError(f"launch.TOPK_WARPS and TOPK_RUNS must be {SMEM_THREADS.value // 32} on the GPU, got "
                         f"{TOPK_WARPS} and {TOPK_RUNS}")
    scratch = torch.empty(n, sizes["SCRATCH"], dtype=torch.int64, device=device)  # a row a pair
    outputs = [side if side is not None else (loss, loss, loss) for side in saved]
    indices = (student_index.contiguous(), teacher_index.contiguous()) if gather else (loss, loss)
    uld_topk.topk_rows_kernel[(n,)](
        student_logits, teacher_logits, *indices, loss, *outputs[0], *outputs[1], scratch,
        student_logits.shape[-1], teacher_logits.shape[-1], k,
        *_row_layout(student_logits), *_row_layout(teacher_logits),
        1.0 / student_temperature, 1.0 / teacher_temperature,
        GATHER=gather, SAVE_STUDENT=bool(save[0]), SAVE_TEACHER=bool(save[1]),
        STUDENT_UNIT_STRIDE=student_logits.stride(-1) == 1, TEACHER_UNIT_STRIDE=teacher_logits.stride(-1) == 1,
        **dict(zip(("S_BITS1", "S_BITS2", "S_BITS3"), topk_level_bits(student_logits.dtype))),
        **dict(zip(("T_BITS1", "T_BITS2", "T_BITS3"), topk_level_bits(teacher_logits.dtype))),
        **sizes, BLOCK=TOPK_BLOCK, SMEM=smem,
        CHUNK=TOPK_BIN_CHUNK, PREFETCH=TOPK_PREFETCH, num_warps=TOPK_WARPS,
        **({"maxnreg": TOPK_MAXNREG} if TOPK_MAXNREG else {}), **({"GIVEN": True} if given else {}),
    )
    return loss, saved


def topk_grad(logits, index, saved, upstream, temperature, k_side, out=None):
    """One side's gradient of the truncated loss, ``upstream[r]`` times row r's, in the logits'
    dtype and shape (rows by ``index``, distinct, when given: the others 0); with ``out``
    (``[rows, width >= V]`` of the logits' dtype, rows in the logits' flat order) added into
    its rows instead, in place, and ``out`` returned."""
    stats, columns, signs = saved
    n = stats.shape[0]
    if out is None:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        row_stride = logits.shape[-1]
        if index is not None and row_stride > 0:  # zeros in the rows no program writes (left out, padding) only
            rows = grad.view(-1, row_stride)
            zero_unwritten_(rows, rows_written(rows.shape[0], index, device=grad.device), row_stride)
    else:
        grad, row_stride = out, out.stride(0)
    if n == 0 or logits.shape[-1] == 0:
        return grad
    upstream = upstream.float().expand(n).contiguous()
    uld_topk.topk_grad_kernel[(n,)](
        logits, index.contiguous() if index is not None else stats, stats, columns, signs, upstream, grad,
        logits.shape[-1], k_side, *_row_layout(logits), row_stride, 1.0 / temperature,
        GATHER=index is not None, UNIT_COL_STRIDE=logits.stride(-1) == 1, K_PAD=columns.shape[1],
        BLOCK=TOPK_BLOCK, ACCUMULATE=out is not None, num_warps=TOPK_WARPS,
    )
    return grad


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _resident_programs(device: torch.device) -> int:
    """Programs of 8 warps that fit on the device at once (8 an SM); 16 off a GPU."""
    if device.type != "cuda":
        return 16
    return 8 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
