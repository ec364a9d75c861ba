"""Vocabulary pairs from real models and the kinds of rows the benchmark and GPU tests use.

One table each, shared by bench/ and tests/: never hard-code a vocabulary twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# name -> (student vocabulary, teacher vocabulary)
VOCAB_PAIRS = {
    "qwen_llama3": (151936, 128256),  # Qwen2.5 student, Llama-3 teacher
    "llama2_gemma": (32000, 256000),  # Llama-2 student, Gemma teacher
    "llama3_llama3": (128256, 128256),  # same tokenizer
    "qwen_qwen": (151936, 151936),  # same tokenizer, the hard case
}


@dataclass(frozen=True)
class Kind:
    make: Callable[[torch.Generator, int, int, int, str], tuple[torch.Tensor, torch.Tensor]]
    same_vocab: bool  # only meaningful when both sides share a vocabulary
    doc: str


def _randn(gen, rows, vocab, device):
    return torch.randn(rows, vocab, generator=gen, device=device)


def _random(gen, rows, vs, vt, device):
    return _randn(gen, rows, vs, device), _randn(gen, rows, vt, device)


def _peaked_row(gen, rows, vocab, device):
    """LLM-like: Gumbel noise plus a few large logits per row."""
    u = torch.rand(rows, vocab, generator=gen, device=device).clamp_(1e-9, 1 - 1e-9)
    z = -torch.log(-torch.log(u)) * 2.0
    top = torch.randint(0, vocab, (rows, 5), generator=gen, device=device)
    boost = torch.tensor([22.0, 19.0, 17.0, 16.0, 14.0], device=device).expand(rows, 5)
    return z.scatter_add_(1, top, boost)


def _peaked(gen, rows, vs, vt, device):
    return _peaked_row(gen, rows, vs, device), _peaked_row(gen, rows, vt, device)


def _near(gen, rows, vs, vt, device):
    student = _peaked_row(gen, rows, vs, device)
    return student, student + 0.1 * _randn(gen, rows, vs, device)


def _identical(gen, rows, vs, vt, device):
    student = _peaked_row(gen, rows, vs, device)
    return student, student.clone()


def _wide(gen, rows, vs, vt, device):
    """Logits of standard deviation 100: each row holds some past +-256, beyond the histogram
    engine's bins, so every row is counted a second time, shifted (uld_hist.py, "Rows past
    256")."""
    return _randn(gen, rows, vs, device) * 100.0, _randn(gen, rows, vt, device) * 100.0


def _wide_masked(gen, rows, vs, vt, device):
    """`wide` rows with 1% of their columns masked by -inf: the row's largest magnitude is
    -inf's, so the largest finite one takes one more read before the second count."""
    return tuple(x.masked_fill_(torch.rand(x.shape, generator=gen, device=device) < 0.01, -torch.inf)
                 for x in _wide(gen, rows, vs, vt, device))


def _init(gen, rows, vs, vt, device):
    """A freshly initialised student (flat logits N(0, 0.1^2)) and a peaked teacher: at 152k
    columns ~2% of the student's rows hold a logit below 2**-23 in a split tiny bin, counted
    again scaled up (uld_hist.py, "Split tiny bins"; before 2026-11-30, the trie's)."""
    return _randn(gen, rows, vs, device) * 0.1, _peaked_row(gen, rows, vt, device)


# The first bf16 value past the tiny bin's (|z| < 2**-23): a logit there leaves a row no gap
# next to its tiny bin (uld_hist.py, "Gaps").
NO_GAP = -(2.0 ** -23)


def _gapped(gen, rows, vs, vt, device):
    """Rows whose probability sits on 16 logits of magnitude below 2**-23, the others N(-60, 4^2)
    (live, far below): at temperature 1 (log-sum ~4) the tiny bin's two ends have different k.
    The tail's magnitudes (up to ~78) leave room to scale the row up by one binade only
    ("Split tiny bins"), and its tiny bin still splits there (k sits at -4 = -log2 16, where
    float32's spacing changes). Until the sixteenth session every such row went to the trie
    fallback (this was the kind `flagged`: 47.1 ms on Qwen/Llama-3, 57.2 on Qwen/Qwen); the gap
    between the tiny bin and the tail now keeps them in the histogram engine ("Gaps")."""
    return tiny_top_rows(gen, rows, vs, -60.0, 4.0, device), tiny_top_rows(gen, rows, vt, -60.0, 4.0, device)


def _flagged(gen, rows, vs, vt, device):
    """`gapped` rows with one of the 16 logits near 0 at -2**-23, in the bin next to the tiny
    one: without gaps every row is flagged and goes to the trie fallback (47-55 ms in the
    sixteenth session); with them (seventeenth) the gap opens above that logit."""
    return tuple(tiny_top_rows(gen, rows, v, -60.0, 4.0, device, extra=(NO_GAP,), count=15) for v in (vs, vt))


# One logit in every binade from 2**-23 to 2**5 (with a tail near -60, every binade up to 2**6
# holds one): a row with no run of empty bins a binade wide, so no gap ("Gaps").
LADDER = tuple(-(2.0 ** e) for e in range(-23, 6))


def _dense(gen, rows, vs, vt, device):
    """`gapped` rows with 15 logits near 0 and the LADDER: no gap anywhere, so the rows whose
    tiny bin splits (most of them at temperature 1, all at 0.5) go to the trie fallback: the
    histogram engine's worst case found since the gaps."""
    return tuple(tiny_top_rows(gen, rows, v, -60.0, 4.0, device, extra=LADDER, count=15) for v in (vs, vt))


def tiny_top_rows(gen, rows, vocab, mean, std, device, extra=(), count=16):
    """float32 rows N(mean, std^2) with `count` logits of magnitude below 2**-23 in random
    columns (and each value of `extra` in one more), drawn in that order from `gen`: with a
    tail far below 0, the rows whose tiny bin splits (`gapped`, `flagged`; tests vary the
    tail). 16 logits near 0 put k near -4 = -log2 16, where float32's spacing changes: a logit
    of `extra` near 0 takes the place of one of them (`count` 15)."""
    row = _randn(gen, rows, vocab, device) * std + mean
    columns = torch.rand(rows, vocab, generator=gen, device=device).argsort(-1)[:, :count + len(extra)]
    values = (torch.rand(rows, count, generator=gen, device=device) * 2 - 1) * 2.0 ** -23
    if extra:
        values = torch.cat([values, torch.tensor(extra, device=device).expand(rows, -1)], 1)
    return row.scatter_(1, columns, values)


def _masked(gen, rows, vs, vt, device):
    """Peaked rows with a quarter of each row's columns masked by a finite -1e4 (what a
    vocabulary mask in the logits looks like). At temperature 1 the masks have probability 0;
    above ~2.9 the lowest bin (-256 and below) has probability, and the histogram engine counts
    every such row a second time, shifted so that -1e4 has a bin of its own
    (`bench_uld.py --temperature 3`; uld_hist.py, "Rows past 256")."""
    def one(vocab):
        row = _peaked_row(gen, rows, vocab, device)
        return row.masked_fill_(torch.rand(rows, vocab, generator=gen, device=device) < 0.25, -1e4)
    return one(vs), one(vt)


KINDS = {
    "random": Kind(_random, False, "student and teacher logits N(0, 1)"),
    "peaked": Kind(_peaked, False, "Gumbel(0, 2) logits plus five large ones per row"),
    "near": Kind(_near, True, "teacher = student (peaked) + N(0, 0.1^2), same vocabulary"),
    "identical": Kind(_identical, True, "teacher identical to student"),
    "masked": Kind(_masked, False, "peaked, a quarter of the columns at -1e4 (counted again, shifted, at "
                                   "temperatures above ~2.9)"),
    "wide": Kind(_wide, False, "logits N(0, 100^2): every row past the histogram's bins, counted again, shifted"),
    "wide_masked": Kind(_wide_masked, False, "wide, 1% of the columns -inf: counted again after one more read"),
    "init": Kind(_init, False, "student logits N(0, 0.1^2) (freshly initialised), teacher peaked"),
    "gapped": Kind(_gapped, False, "16 logits below 2**-23, the rest N(-60, 4^2): a gap keeps them in the engine"),
    "flagged": Kind(_flagged, False, "`gapped` and a logit at -2**-23: a gap above it"),
    "dense": Kind(_dense, False, "`gapped` and a logit in every binade from 2**-23 up: no gap, the fallback's"),
}


def pair_kinds(pairs, kinds):
    """(pair name, student vocabulary, teacher vocabulary, kind) for every pair and kind, except
    the same-vocabulary kinds on pairs of two vocabularies."""
    for pair in pairs:
        vs, vt = VOCAB_PAIRS[pair]
        for kind in kinds:
            if not (KINDS[kind].same_vocab and vs != vt):
                yield pair, vs, vt, kind


def make_rows(kind: str, rows: int, student_vocab: int, teacher_vocab: int, *, seed: int = 0,
              dtype: torch.dtype = torch.bfloat16, device: str = "cuda"):
    """Fresh random student and teacher logits of one kind, in ``dtype``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    student, teacher = KINDS[kind].make(gen, rows, student_vocab, teacher_vocab, device)
    return student.to(dtype), teacher.to(dtype)
