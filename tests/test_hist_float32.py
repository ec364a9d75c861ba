"""float32 logits through the histogram engine (kernels/uld_hist.py, "float32 rows").

A bf16 model's logits upcast with `.float()` hold bf16 values: the engine counts their high
halves and writes a float32 gradient. Its results must be those of the same logits in bf16
(losses bit for bit; the gradient is the bf16 call's before rounding), and match the float64
reference at float32's tolerances. A row holding any other float32 value is flagged
(`uld_hist._NOT_BF16`) and computed by the trie engine; a call whose first row holds such
values goes to the trie whole (`launch.hist_takes`). Under the interpreter, rows of a few
hundred columns.
"""

from __future__ import annotations

import pytest
import torch

import uld_kernels.launch as launch
from tests.helpers import assert_grads_close, assert_losses_close, reference_rows_and_grads
from uld_kernels.kernels import uld_hist

BF16 = torch.bfloat16
F32 = torch.float32
NOT_BF16 = uld_hist._NOT_BF16.value


def _bf16_rows(kind, n, vs, vt, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, vs, generator=g) * 3
    if kind == "random":
        t = torch.randn(n, vt, generator=g) * 2.5
    elif kind == "near":  # most logits share a bf16 value with the student's
        t = s[:, :vt] + 0.01 * torch.randn(n, vt, generator=g)
    else:
        raise ValueError(kind)
    return s.to(BF16), t.to(BF16)


def _assert_is_the_unrounded(grad32, grad16, what):
    """grad16 (a bf16 call's gradient) is grad32 rounded to bf16: to nearest even as the GPU
    rounds, or toward zero as the interpreter does."""
    nearest = grad32.to(BF16)
    toward_zero = (grad32.view(torch.int32) & ~0xFFFF).view(F32).to(BF16)
    same = (grad16 == nearest) | (grad16 == toward_zero)
    assert same.all(), (f"{what}: {int((~same).sum())} elements of the bf16 gradient are not the float32 one "
                        f"rounded, e.g. {grad16[~same][:3].tolist()} vs {grad32[~same][:3].tolist()}")


def _assert_matches_reference(out, student, teacher, ts, tt, what):
    rows, _status, grad_s, grad_t = out
    ref_rows, ref_s, ref_t = reference_rows_and_grads(student, teacher, ts, tt, teacher_grad=True)
    assert grad_s.dtype == grad_t.dtype == F32, f"{what}: gradients {grad_s.dtype} / {grad_t.dtype}"
    assert_losses_close(rows, ref_rows, F32, what=f"{what} loss")
    assert_grads_close(grad_s, ref_s, student, F32, what=f"{what} student gradient")
    assert_grads_close(grad_t, ref_t, teacher, F32, what=f"{what} teacher gradient")


@pytest.mark.parametrize("kind", ["random", "near"])
def test_upcast_bf16_rows_are_the_engines_and_match_their_bf16_call(kind, device):
    """The upcast rows: unflagged, the bf16 call's losses bit for bit, its gradients before
    rounding, and the reference's at float32 tolerances."""
    s16, t16 = (x.to(device) for x in _bf16_rows(kind, 3, 300, 260, seed=31))
    s32, t32 = s16.float(), t16.float()
    ts, tt = (1.5, 0.7) if kind == "random" else (1.0, 1.0)
    assert launch.hist_takes(s32, t32)
    flags = launch.hist_rows(s32, t32, ts, tt, False, False, 1.0, fallback=False)[1]
    assert (flags == 0).all(), f"{kind}: flags {flags.tolist()}: the engine's own rows"
    out32 = launch.uld_rows(s32, t32, ts, tt, True, True, 1.0)
    out16 = launch.uld_rows(s16, t16, ts, tt, True, True, 1.0)
    assert (out32[1] == 0).all(), f"{kind}: status {out32[1].tolist()}"
    assert torch.equal(out32[0], out16[0]), f"{kind}: losses {out32[0].tolist()} vs bf16 {out16[0].tolist()}"
    _assert_is_the_unrounded(out32[2], out16[2], f"{kind} student")
    _assert_is_the_unrounded(out32[3], out16[3], f"{kind} teacher")
    _assert_matches_reference(out32, s32, t32, ts, tt, kind)


def test_rows_holding_other_float32_values_are_flagged_and_take_the_trie(device):
    """Rows 1 and 3 (student, teacher) hold values bf16 cannot: flagged with _NOT_BF16 alone,
    computed by the trie (its status, its results); the others stay the engine's (status 0)."""
    s16, t16 = _bf16_rows("random", 4, 280, 240, seed=32)
    s32, t32 = s16.float().to(device), t16.float().to(device)
    s32[1, 17] += 1e-3
    t32[3, 5] *= 1.0 + 2.0 ** -20
    assert launch.hist_takes(s32, t32), "the first rows hold bf16 values: the engine takes the call"
    flags = launch.hist_rows(s32, t32, 1.0, 1.0, False, False, 1.0, fallback=False)[1]
    assert flags.tolist() == [0, NOT_BF16, 0, NOT_BF16], f"flags {flags.tolist()}"
    out = launch.uld_rows(s32, t32, 1.0, 1.0, True, True, 1.0)
    trie = launch.uld_pairs(s32, t32, 1.0, 1.0, True, True, 1.0)
    assert out[1].tolist() == [0, trie[1][1].item(), 0, trie[1][3].item()], (
        f"status {out[1].tolist()}, the trie's {trie[1].tolist()}")
    assert torch.equal(out[0][[1, 3]], trie[0][[1, 3]]), "the flagged rows' losses are the trie's"
    assert torch.equal(out[2][[1, 3]], trie[3][[1, 3]]) and torch.equal(out[3][[1, 3]], trie[4][[1, 3]]), (
        "the flagged rows' gradients are the trie's")
    _assert_matches_reference(out, s32, t32, 1.0, 1.0, "mixed rows")


def test_float32_logits_of_a_float32_model_go_to_the_trie(device, monkeypatch):
    """A first row holding values bf16 cannot (on either side) sends the call to the trie,
    as does ULD_HIST_FLOAT32=0 (`launch.HIST_FLOAT32`); the results are exact either way."""
    s16, t16 = _bf16_rows("random", 2, 200, 150, seed=33)
    s32, t32 = s16.float().to(device), t16.float().to(device)
    assert launch.hist_takes(s32, t32)
    teacher = t32.clone()
    teacher[0] += 1e-4 * torch.randn(150, generator=torch.Generator().manual_seed(1)).to(device)
    assert not launch.hist_takes(s32, teacher) and not launch.hist_takes(teacher, s32[:, :150])
    with pytest.raises(ValueError, match="float32 ones holding bf16 values"):
        launch.hist_rows(s32, teacher, 1.0, 1.0, False, False, 1.0)
    out = launch.uld_rows(s32, teacher, 1.0, 1.0, True, True, 1.0)
    assert (out[1] != 0).all(), f"status {out[1].tolist()}: the trie's (levels), not the engine's 0"
    _assert_matches_reference(out, s32, teacher, 1.0, 1.0, "a float32 model's")
    monkeypatch.setattr(launch, "HIST_FLOAT32", False)
    assert not launch.hist_takes(s32, t32)
    assert launch.hist_takes(s16, t16), "bf16 rows stay the engine's"


def test_gathered_float32_pairs_with_cross_entropy_match_the_trie(device):
    """The training loss's path on upcast logits (row maps, padding, weights, the student's
    cross-entropy), one student row holding a value bf16 cannot: the same losses,
    cross-entropies and gradient as the trie engine on all the pairs."""
    s16, t16 = _bf16_rows("random", 5, 260, 190, seed=34)
    student, teacher = s16.float().to(device), t16[:4].float().to(device)
    student[3, 9] = 0.1  # not a bf16 value: pair 0 reads it
    kw = dict(student_index=torch.tensor([3, -1, 0, 4], device=device),
              teacher_index=torch.tensor([1, 2, 3, 0], device=device),
              row_weight=torch.tensor([0.5, 1.0, 2.0, 0.25], device=device),
              ce_label=torch.tensor([7, -1, 259, -1], device=device),
              ce_weight=torch.tensor([1.5, 1.0, 0.75, 1.0], device=device))
    flags = launch.hist_pairs(student, teacher, 1.5, 0.7, True, False, 1.0, fallback=False, **kw)[1]
    assert flags.tolist() == [NOT_BF16, 0, 0, 0], f"flags {flags.tolist()}"
    ours = launch.hist_pairs(student, teacher, 1.5, 0.7, True, False, 1.0, **kw)
    trie = launch.uld_pairs(student, teacher, 1.5, 0.7, True, False, 1.0, **kw)
    assert ours[1].tolist()[1:] == [0, 0, 0] and ours[1][0] == trie[1][0], f"status {ours[1].tolist()}"
    assert_losses_close(ours[0], trie[0], F32, what="loss")
    assert_losses_close(ours[2], trie[2], F32, what="cross-entropy")
    assert ours[0][1] == 0 and ours[2][1] == 0, "a padding pair has loss and cross-entropy 0"
    assert (ours[3][[1, 2]] == 0).all(), "rows no pair reads get no gradient"
    assert ours[3].dtype == F32
    assert_grads_close(ours[3], trie[3], student, F32)
