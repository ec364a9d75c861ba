"""Hybrid ULD: a divergence on the tokens both vocabularies share, sorted L1 on the rest.

TRL GOLD's ``uld_use_hybrid_loss`` and NeMo RL's gold loss (bench/NOTES.md, thirty-ninth
session, has both codes' formulas). Tokens whose strings are equal in the two vocabularies
(``VocabMatch``) are compared column to column, by TRL's generalized JSD; the others, where
ids cannot be matched, by ULD's sorted L1. For each aligned pair of rows, with ``a =
softmax(student / T_s)``, ``b = softmax(teacher / T_t)`` over each side's full vocabulary and
``K`` matched pairs ``(s_k, t_k)``:

    matched    D_beta(max(a[s], floor), max(b[t], floor))          (not renormalized)
    unmatched  sum_i |a'_(i) - b'_(i)|                              a', b': a, b at the other
                                                                    columns (not renormalized),
                                                                    sorted descending, zero-padded
                                                                    (or both cut to n ranks)
    loss       w_m * matched + w_u * unmatched                      (TRL: w_m = K / Vt, w_u = 1 - w_m)

**Engine: PyTorch, by chunks of rows** (extra memory: one chunk's autograd graph, besides
the gradient itself, which the forward computes, as the fused losses do, by autograd through
each chunk's ``torch.sort``). Not fused yet: the exact engine's kernels would need a column mask in their
count, sign and gradient passes (bench/NOTES.md, Next).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F

from uld_kernels import launch
from uld_kernels.autograd import REDUCTIONS, call_op, reduce_rows
from uld_kernels.topk import _chunks, _rows
from uld_kernels.validation import check_aligned_rows, check_choice, check_logits, check_temperature

# Each chunk's autograd graph holds about ten float32-sized values an element and side (the
# log-softmax, the probabilities, the sort's values and int64 indices, the L1's terms): a
# budget of CHUNK_BYTES is ~190 Qwen / Llama-3 rows a chunk. (At topk's 256 MiB, 24 rows a
# chunk took 559 ms for 4,096 rows on the H200: launches, not sorts; bench/RESULTS.md.)
GRAPH_VALUES_PER_ELEMENT = 10
CHUNK_BYTES = 1 << 31


@dataclass(frozen=True, eq=False)
class VocabMatch:
    """The tokens two vocabularies share: ``student_ids[k]`` and ``teacher_ids[k]`` are the
    same token (int64 ``[K]``, on the CPU). Checked once, here (distinct, >= 0), so that the
    loss reads no id on the host; ``student_vocab`` / ``teacher_vocab`` are one past the
    largest id of each side, which the logits must cover."""

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor

    def __post_init__(self):
        for name in ("student_ids", "teacher_ids"):
            ids = getattr(self, name)
            if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"VocabMatch: {name} must be a 1-D int32 or int64 tensor, got "
                                f"{getattr(ids, 'dtype', type(ids).__name__)} "
                                f"shape {tuple(getattr(ids, 'shape', ()))}")
            ids = ids.detach().to("cpu", torch.int64)
            if ids.numel() and int(ids.min()) < 0:
                raise ValueError(f"VocabMatch: {name} must be >= 0, got {int(ids.min())}")
            if ids.unique().numel() != ids.numel():
                raise ValueError(f"VocabMatch: {name} must be distinct (a token matches one token)")
            object.__setattr__(self, name, ids)
        if self.student_ids.numel() != self.teacher_ids.numel():
            raise ValueError(f"VocabMatch: student_ids and teacher_ids must pair up, got "
                             f"{self.student_ids.numel()} and {self.teacher_ids.numel()} ids")
        object.__setattr__(self, "_on", {})

    @classmethod
    def from_vocabs(cls, student_vocab, teacher_vocab) -> "VocabMatch":
        """TRL GOLD's rule: tokens whose strings are equal in ``get_vocab()`` (a tokenizer, or
        the ``{string: id}`` dict itself), special tokens included, no normalization (``Ġa``
        and ``▁a`` differ); ordered by teacher id. Where a vocabulary gives one id to two
        strings, the first pair of each id is kept (ids stay distinct; TRL would repeat one)."""
        student_vocab, teacher_vocab = (v.get_vocab() if hasattr(v, "get_vocab") else v
                                        for v in (student_vocab, teacher_vocab))
        pairs, seen = [], (set(), set())
        for t_id, s_id in sorted((t_id, student_vocab[token]) for token, t_id in teacher_vocab.items()
                                 if token in student_vocab):
            if s_id not in seen[0] and t_id not in seen[1]:  # (two strings of one id: the first pair kept)
                pairs.append((t_id, s_id))
                seen[0].add(s_id), seen[1].add(t_id)
        return cls(torch.tensor([s for _, s in pairs], dtype=torch.int64),
                   torch.tensor([t for t, _ in pairs], dtype=torch.int64))

    @property
    def student_vocab(self) -> int:
        return int(self.student_ids.max()) + 1 if self.student_ids.numel() else 0

    @property
    def teacher_vocab(self) -> int:
        return int(self.teacher_ids.max()) + 1 if self.teacher_ids.numel() else 0

    def __len__(self) -> int:
        return self.student_ids.numel()

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Both ids on ``device``, copied there once."""
        if device not in self._on:
            self._on[device] = (self.student_ids.to(device), self.teacher_ids.to(device))
        return self._on[device]

    def rest(self, student_width: int, teacher_width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each side's other columns (ascending) of logits that wide, on ``device``, built once."""
        key = (student_width, teacher_width, device)
        if key not in self._on:
            keep = [torch.ones(width, dtype=torch.bool).index_fill_(0, ids, False)
                    for width, ids in ((student_width, self.student_ids), (teacher_width, self.teacher_ids))]
            self._on[key] = tuple(k.nonzero().squeeze(1).to(device) for k in keep)
        return self._on[key]


def _generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float,
                     zeros: bool = True) -> torch.Tensor:
    """TRL's generalized JSD per row, from log-probabilities (``beta`` 0: KL(teacher ||
    student), 1: KL(student || teacher); the mixture's log by logsumexp, as TRL forms it).
    With ``zeros`` (no floor: a ``-inf`` logit is a probability of 0) such entries add 0, and
    no NaN to the gradient: their inputs are replaced, not only their results (a NaN there
    would reach the gradient through ``where``'s other branch). Without (a floor: every
    log-probability finite or NaN), the plain forms, with fewer ``[rows, K]`` temporaries."""
    def kl(p_log, q_log):  # sum p (ln p - ln q), 0 ln 0 = 0
        if not zeros:
            return (p_log.exp() * (p_log - q_log)).sum(dim=-1)
        present = p_log != -math.inf  # (NaN is present: it propagates)
        p_log, q_log = (torch.where(present, x, 0.0) for x in (p_log, q_log))
        return torch.where(present, p_log.exp() * (p_log - q_log), 0.0).sum(dim=-1)

    if beta == 0:
        return kl(teacher_logp, student_logp)
    if beta == 1:
        return kl(student_logp, teacher_logp)
    if zeros:  # a mixture of 0 where both are: its log is never read
        neither = (student_logp == -math.inf) & (teacher_logp == -math.inf)
        student_logp, teacher_logp = (torch.where(neither, 0.0, x) for x in (student_logp, teacher_logp))
    mix_log = torch.logsumexp(torch.stack([student_logp + math.log1p(-beta), teacher_logp + math.log(beta)]), dim=0)
    if zeros:
        student_logp, teacher_logp = (torch.where(neither, -math.inf, x) for x in (student_logp, teacher_logp))
    return beta * kl(teacher_logp, mix_log) + (1 - beta) * kl(student_logp, mix_log)


def _hybrid_rows(student, teacher, columns, options) -> torch.Tensor:
    """One chunk's row losses ``[c]`` in float32 (differentiable); ``columns``: each side's
    shared ids, then each side's other columns (`VocabMatch.rest`: only those are sorted)."""
    student_t, teacher_t, beta, w_m, w_u, top, floor = options
    student_ids, teacher_ids, student_rest, teacher_rest = columns
    student_logp = F.log_softmax(student.float() / student_t, dim=-1)
    teacher_logp = F.log_softmax(teacher.float() / teacher_t, dim=-1)
    log_floor = math.log(floor) if floor > 0 else -math.inf
    # index_select, not logp[:, ids]: its backward is an index_add_ (one add a column: the ids
    # are distinct), where indexing's sorts the indices first (157 of 277 ms on the H200).
    matched = _generalized_jsd(student_logp.index_select(1, student_ids).clamp(min=log_floor),
                               teacher_logp.index_select(1, teacher_ids).clamp(min=log_floor), beta, floor == 0)
    a = student_logp.index_select(1, student_rest).exp().sort(dim=-1, descending=True).values
    b = teacher_logp.index_select(1, teacher_rest).exp().sort(dim=-1, descending=True).values
    if min(a.shape[-1], b.shape[-1]) == 0:  # a side with no other column: no unmatched term (TRL skips it)
        return w_m * matched + w_u * (a.sum(dim=-1) + b.sum(dim=-1)) * 0.0
    width = max(a.shape[-1], b.shape[-1]) if top is None else min(a.shape[-1], b.shape[-1], top)
    a, b = (F.pad(x, (0, width - x.shape[-1])) if top is None else x[:, :width] for x in (a, b))
    return w_m * matched + w_u * (a - b).abs().sum(dim=-1)


def _check_fraction(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low:g}, {high:g}], got {value}")
    return value


@dataclass(frozen=True, eq=False)
class HybridULD:
    """The hybrid loss's options, checked once (`uld_loss_hybrid` documents each; the training
    loss takes them as ``ULDLoss(hybrid=HybridULD(match, ...))``)."""

    match: VocabMatch
    beta: float = 0.5
    matched_weight: float | None = None
    unmatched_weight: float | None = None
    unmatched_top: int | None = None
    prob_floor: float = 1e-8

    def __post_init__(self):
        if not isinstance(self.match, VocabMatch):
            raise TypeError(f"match must be a uld_kernels.VocabMatch, got {type(self.match).__name__}")
        object.__setattr__(self, "beta", _check_fraction("beta", self.beta, 0.0, 1.0))
        if (self.matched_weight is None) != (self.unmatched_weight is None):
            raise ValueError("matched_weight and unmatched_weight must both be None (adaptive) or both be numbers, "
                             f"got {self.matched_weight!r} and {self.unmatched_weight!r}")
        if self.matched_weight is not None:
            for name in ("matched_weight", "unmatched_weight"):
                value = _check_fraction(name, getattr(self, name), 0.0, math.inf)
                if value == math.inf:
                    raise ValueError(f"{name} must be finite, got inf")
                object.__setattr__(self, name, value)
        top = self.unmatched_top
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
            raise ValueError(f"unmatched_top must be None or an int >= 1, got {top!r}")
        object.__setattr__(self, "prob_floor", _check_fraction("prob_floor", self.prob_floor, 0.0, 1.0))
        if self.prob_floor == 1.0:
            raise ValueError("prob_floor must be < 1, got 1.0")

    def check_widths(self, student_width: int, teacher_width: int, names=("student_logits", "teacher_logits")):
        """The shared ids inside the columns each side's loss reads."""
        for side, name, width, vocab in (("student", names[0], student_width, self.match.student_vocab),
                                         ("teacher", names[1], teacher_width, self.match.teacher_vocab)):
            if vocab > width:
                raise ValueError(f"match's {side} ids must lie inside {name}' {width} columns, got an id of {vocab - 1}")

    def row_options(self, student_temperature: float, teacher_temperature: float, teacher_width: int) -> tuple:
        """`_hybrid_rows`' options; TRL's adaptive weights over the teacher's width."""
        w_m, w_u = self.matched_weight, self.unmatched_weight
        if w_m is None:
            w_m = len(self.match) / teacher_width
            w_u = 1.0 - w_m
        return (student_temperature, teacher_temperature, self.beta, w_m, w_u, self.unmatched_top, self.prob_floor)


def hybrid_forward(student, teacher, hybrid: HybridULD, temperatures, weight, needs, student_index=None,
                   teacher_index=None, out=None):
    """The hybrid rows ``[P]`` float32 and, for the sides in ``needs``, the gradient of ``sum_r
    weight[r] * rows[r]`` (``weight`` a number or ``[P]``) by chunks: ``(rows, grads)``.

    Without indices the rows are aligned ``[N, V]`` rows and ``grads`` new buffers shaped like
    the logits. With ``student_index`` / ``teacher_index`` (``[P]`` flat rows of ``[B, L, V]``
    logits, ``-1`` a padding slot: row 0, no gradient) the student's gradient is added into
    ``out``'s rows (``[B * L, >= Vs]``, the student's rows distinct), rounded once."""
    if out is not None and needs[1]:
        raise ValueError("hybrid_forward: with out (the student's buffer by index), no teacher gradient")
    columns = (*hybrid.match.on(student.device),
               *hybrid.match.rest(student.shape[-1], teacher.shape[-1], student.device))
    options = hybrid.row_options(*temperatures, teacher.shape[-1])
    inputs, indices = (student, teacher), (student_index, teacher_index)
    n_rows = student.shape[0] if student_index is None else student_index.numel()
    rows = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    grads = [torch.empty(x.shape, dtype=x.dtype, device=x.device) if need and out is None else None
             for x, need in zip(inputs, needs)]
    flat = out[:, :student.shape[-1]] if out is not None else None
    for part in _chunks(n_rows, GRAPH_VALUES_PER_ELEMENT * (student.shape[-1] + teacher.shape[-1]), CHUNK_BYTES):
        (chunk_s, valid), (chunk_t, _) = (_rows(x, index, part) for x, index in zip(inputs, indices))
        # float32 leaves: the gradient comes back in float32 and is rounded to the logits' dtype once
        chunk = [x.detach().float().requires_grad_(need) for x, need in zip((chunk_s, chunk_t), needs)]
        with torch.enable_grad():
            chunk_rows = _hybrid_rows(*chunk, columns, options)
            if valid is not None:
                chunk_rows = torch.where(valid, chunk_rows, 0.0)
            if any(needs):
                factor = weight[part] if isinstance(weight, torch.Tensor) else weight
                chunk_grads = iter(torch.autograd.grad((chunk_rows * factor).sum(),
                                                       [x for x, need in zip(chunk, needs) if need]))
        rows[part] = chunk_rows.detach()
        for side, need in enumerate(needs):
            if not need:
                continue
            grad = next(chunk_grads)
            if out is None:
                grads[side][part] = grad
            else:  # the student's rows by index (the caller passes no teacher gradient then)
                at = student_index[part][valid]
                flat[at] = (flat[at].float() + grad[valid]).to(flat.dtype)
    return rows, grads


class ULDHybridFunction(torch.autograd.Function):
    """Autograd Function of the hybrid loss over aligned rows: ``apply(student [N, Vs],
    teacher [N, Vt], hybrid, temperatures, reduction, grad_enabled)`` -> the reduced float32
    loss. As ``ULDFunction`` does, the forward computes the gradient (`hybrid_forward`: each
    row's own, by autograd through each chunk's sort; a row's loss depends on its own rows
    only) into buffers of the logits' shape and dtype, and the backward scales them in place
    by the upstream gradient, over N for "mean" (calling it twice through one graph raises). Under
    ``torch.no_grad()`` nothing is computed per element."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, hybrid, temperatures, reduction, grad_enabled=True):
        needs = [bool(ctx.needs_input_grad[i] and grad_enabled) for i in (0, 1)]
        # Each row's own gradient (weight 1), saved in the logits' dtype; "mean"'s 1 / N goes into the
        # backward's factor, so that small entries do not flush to 0 in fp16 before a loss scale.
        rows, grads = hybrid_forward(student_logits, teacher_logits, hybrid, temperatures, 1.0, needs)
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.needs = needs
        ctx.mean_of = max(student_logits.shape[0], 1) if reduction == "mean" else None
        return reduce_rows(rows, reduction)

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if need else None for need in ctx.needs]
        scale = grad_loss if ctx.mean_of is None else grad_loss / ctx.mean_of
        for grad in grads:
            if grad is not None:
                _scale_rows_(grad, scale)
        return grads[0], grads[1], None, None, None, None


def _scale_rows_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """``grad[r] *= scale`` (one value, or one a row) in place, rounded once: the
    ``scale_rows_`` kernel on the GPU and under the interpreter, PyTorch by chunks elsewhere."""
    if grad.is_cuda or launch.interpreter_enabled():
        call_op("scale_rows_", grad, scale)
        return
    scale = scale.detach().float().reshape(-1)
    for part in _chunks(grad.shape[0], grad.shape[-1]):
        factor = scale if scale.numel() == 1 else scale[part, None]
        grad[part] = (grad[part].float() * factor).to(grad.dtype)


def uld_loss_hybrid(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    match: VocabMatch,
    *,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    beta: float = 0.5,
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
    unmatched_top: int | None = None,
    prob_floor: float = 1e-8,
    reduction: str = "mean",
) -> torch.Tensor:
    """Hybrid ULD loss over aligned rows: TRL GOLD's ``uld_use_hybrid_loss`` by default.

    Args:
        student_logits: ``[N, Vs]`` float32, bfloat16 or float16 (its width the logits', lm_head
            padding included, as TRL counts it).
        teacher_logits: ``[N, Vt]``, the same rows, same device.
        match: the shared tokens (``VocabMatch.from_vocabs(student_tokenizer,
            teacher_tokenizer)``); its ids must lie inside each side's logits.
        student_temperature, teacher_temperature: softmax temperatures (no ``T**2`` factor).
        beta: the matched tokens' generalized JSD, in [0, 1] (TRL's ``beta``, default 0.5): 0 is
            KL(teacher || student), 1 KL(student || teacher).
        matched_weight, unmatched_weight: both None (TRL's adaptive ``K / Vt`` and ``1 - K /
            Vt``), or both real numbers >= 0.
        unmatched_top: None (TRL: the unmatched probabilities fully sorted, the shorter
            zero-padded), or ``n >= 1``: both sides cut to their first ``min(Vs - K, Vt - K,
            n)`` ranks (NeMo RL's ``uncommon_topk``, 8192).
        prob_floor: the matched probabilities are clamped to at least this (TRL: 1e-8; NeMo:
            0), in [0, 1).
        reduction: ``"mean"`` over rows (default), ``"sum"``, or ``"none"`` (``[N]``).

    NeMo RL's gold loss is ``beta=0, matched_weight=1, unmatched_weight=1, unmatched_top=8192,
    prob_floor=0`` times ``T**2``, with one temperature ``T`` on both sides, for chunks of one
    token each (NeMo compares chunk-averaged log-probabilities) and a student without lm_head
    padding (NeMo's student softmax includes it, its uncommon set leaves it out).

    Returns:
        float32 loss (a scalar, or ``[N]`` for ``"none"``). Gradients flow to both logits.

    Runs in PyTorch by chunks of rows (module docstring): correct at any size, not fused.
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    check_aligned_rows(student_logits, teacher_logits)
    hybrid = HybridULD(match, beta=beta, matched_weight=matched_weight, unmatched_weight=unmatched_weight,
                       unmatched_top=unmatched_top, prob_floor=prob_floor)
    hybrid.check_widths(student_logits.shape[-1], teacher_logits.shape[-1])
    temperatures = (check_temperature("student_temperature", student_temperature),
                    check_temperature("teacher_temperature", teacher_temperature))
    check_choice("reduction", reduction, REDUCTIONS)
    return ULDHybridFunction.apply(student_logits, teacher_logits, hybrid, temperatures, reduction,
                                   torch.is_grad_enabled())
