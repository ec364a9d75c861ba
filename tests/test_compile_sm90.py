"""Every kernel configuration used at large vocabularies compiles for sm_90 (H100/H200)
ahead of time, on a machine without a GPU (Triton's bundled ptxas builds the cubin).

The compile runs in a subprocess without TRITON_INTERPRET (conftest turns the interpreter
on for this process, which replaces @triton.jit functions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from filelock import FileLock

# Mostly one worker runs this file (`--dist loadgroup`), but xdist still gave two of its tests
# to the other worker near the end of a CI run, and each worker compiled everything (115 s of
# a 2-core machine each). The compile runs once a session: the first worker to need it writes
# its output where every worker of the session finds it, under a lock.
pytestmark = pytest.mark.xdist_group("sm90")

_SCRIPT = os.path.join(os.path.dirname(__file__), "aot_sm90.py")


def _compile_all() -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, _SCRIPT], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, f"sm_90 compile failed:\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    if "PYTEST_XDIST_WORKER" not in os.environ:  # (no xdist: this process alone)
        out = _compile_all()
    else:  # the parent of a worker's base directory is this session's, shared by its workers
        shared = tmp_path_factory.getbasetemp().parent / "aot_sm90.out"
        with FileLock(str(shared) + ".lock"):
            if not shared.is_file():
                shared.write_text(_compile_all())
            out = shared.read_text()
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_every_configuration_compiles(compiled):
    names = [c["name"] for c in compiled]
    assert sum(n.startswith("ce_rows") for n in names) == 6, names
    assert sum(n.startswith("scale_rows") for n in names) == 6, names
    assert sum(n.startswith("zero_rows") for n in names) == 3, names
    assert sum(n.startswith("topk_rows") for n in names) == 7, names  # 3 dtypes, gathered, k = 1,000, given (2)
    assert sum(n.startswith("topk_grad") for n in names) == 5, names  # 3 dtypes, bf16 gathered, alone and adding
    assert sum(n.startswith("split") and "gathered" not in n for n in names) == 18, names
    assert sum(n.startswith("split") and "gathered" in n for n in names) == 2, names
    assert sum(n.startswith("fallback") for n in names) == 2, names
    for c in compiled:
        assert c["cubin_bytes"] > 0 and (c["sm80"] if c["name"].startswith("sm80") else c["sm90"]), c


def test_the_histogram_engine_compiles_for_sm80(compiled):
    """The bf16 engine's row passes also build for sm_80 / sm_89 (A100, L40S, RTX 4090):
    there without the u16x2 instructions that only sm_90 has (SIMD16=False, launch.py)."""
    names = [c["name"] for c in compiled if c["name"].startswith("sm80")]
    assert names == ["sm80 hist bf16", "sm80 grad bf16"], names


def test_row_loads_are_vectorized_and_fit(compiled):
    for c in compiled:
        if c["name"].startswith("zero_rows"):  # writes only
            assert c["vector_stores"], f"{c['name']}: no 8- or 16-byte stores"
        elif c["name"].startswith(("hist finish", "hist sign")):
            pass  # per-pair sums, and gathers of prefix counts at bins: nothing to stream
        else:
            assert c["vector_loads"], f"{c['name']}: no 16-byte loads (vocabulary specialization lost?)"
        assert c["shared"] <= 228 * 1024, c
        # Static (inline PTX) plus Triton's dynamic shared memory past 48 KB fails to launch
        # without an opt-in (CUDA "invalid argument", seen on the H200).
        assert c["static_shared"] == 0 or c["static_shared"] + c["shared"] <= 48 * 1024, c
        if not c["name"].startswith("fallback"):
            # (The fallback runs every pass of the trie in one program, each pass a called
            # function: 128 registers and 8 to 32 bytes of spills a function, compiled for sm_90
            # on 2026-11-29; it runs for flagged rows only.)
            # This sees the PTX's local arrays only: ptxas's spills are not in it. The top_k
            # select spills 48-124 B under its register cap (launch.TOPK_MAXNREG = 80, measured
            # faster with them: bench/NOTES.md, thirty-sixth session); `python
            # tests/aot_sm90.py --resources` reports every kernel's spills.
            assert not c["local_memory"], f"{c['name']}: uses local memory (stack arrays)"


def test_count_levels_convert_no_layouts(compiled):
    """The count levels' reductions are inline PTX, so the trie walk keeps the row loads'
    layout. With `tl.atomic_*` there, Triton converts keys, entries and masks through shared
    memory at every walk level: 201 shared stores in the bf16 count kernel against 21."""
    walks = [c for c in compiled if c["name"].startswith(("split count", "split finish"))]
    assert len(walks) == 9, [c["name"] for c in compiled]
    for c in walks:
        assert c["shared_stores"] < 64, c


def test_the_fallback_reads_its_own_sign_tables_coherently(compiled):
    """fallback_kernel writes the sign tables it reads in the same launch (and again for every
    pair that reuses a workspace slot), where the read-only path (`ld.global.nc`) promises
    nothing: its sign gathers are plain loads. The split passes, which read tables an earlier
    launch wrote, keep the read-only path."""
    by_name = {c["name"]: c for c in compiled}
    for name in ("fallback bf16", "fallback gathered ce bf16"):
        assert by_name[name]["nc_f32_loads"] == 0, by_name[name]
    for name in ("split count level 1 (sums the loss) bf16", "split grad bf16"):
        assert by_name[name]["nc_f32_loads"] > 0, by_name[name]


def test_histogram_launches_wait_before_touching_tables(compiled):
    """The histogram engine's dependent launches (launch.HIST_PDL, uld_hist.py "Dependent
    launches"), on every path from a program's start (both sides' branches of hist_kernel
    included): each configuration lets the next launch start, no path exits without waiting
    for the previous one, and before its wait hist_kernel's first launch reads (the logits) and
    counts in shared memory but writes nothing global and calls nothing, while every other
    launch (hist_kernel's REDO, sign, finish, grad) touches no global memory at all."""
    from uld_kernels.launch import HIST_PDL

    hist = [c for c in compiled if c["name"].startswith("hist ")]
    assert len(hist) == 19, [c["name"] for c in hist]
    assert HIST_PDL, "the shipped configurations are compiled with the dependent launches (ULD_HIST_PDL=1)"
    for c in hist:
        assert c["launches_dependents"] and c["waits_on_every_path"], c
        assert not c["global_writes_before_wait"] and not c["calls_before_wait"], c
        first_count = c["name"].startswith("hist hist") and not c["name"].endswith("gaps")  # (REDO: with gaps)
        if first_count:
            assert c["global_reads_before_wait"] and c["shared_counts_before_wait"], c
        else:
            assert not c["global_reads_before_wait"] and not c["shared_counts_before_wait"], c


_PTX_ENTRY = """.visible .entry probe(
\t.param .u64 probe_param_0
)
{
\t.reg .pred \t%p<2>;
\tgriddepcontrol.launch_dependents; // dummy %r1
BODY
\tret;

}
"""


@pytest.mark.parametrize("body, facts", [
    # the wait first on every path: nothing before it
    ("\tgriddepcontrol.wait; // dummy %r2\n\tsetp.eq.s32 \t%p1, %r1, 0;\n\t@%p1 bra \t$L__BB0_2;\n"
     "\tst.global.b32 \t[%rd1], %r3;\n$L__BB0_2:", dict(waits_on_every_path=True, global_writes_before_wait=False)),
    # a branch around the wait: a store and the exit reached without it
    ("\tsetp.eq.s32 \t%p1, %r1, 0;\n\t@%p1 bra \t$L__BB0_2;\n\tgriddepcontrol.wait; // dummy %r2\n"
     "$L__BB0_2:\n\tst.global.b32 \t[%rd1], %r3;", dict(waits_on_every_path=False, global_writes_before_wait=True)),
    # a branch laid out after the wait, which reads and counts before its own wait
    ("\tsetp.eq.s32 \t%p1, %r1, 0;\n\t@%p1 bra \t$L__BB0_2;\n\tgriddepcontrol.wait; // dummy %r2\n\tret;\n"
     "$L__BB0_2:\n\t{ ld.global.nc.b32 %r4, [%rd1]; red.shared.add.u32 [%r5], 1; }\n\tgriddepcontrol.wait; // dummy %r6",
     dict(waits_on_every_path=True, global_reads_before_wait=True, shared_counts_before_wait=True)),
])
def test_the_wait_check_follows_every_branch(body, facts):
    """The PTX walk behind the test above, on hand-written entries: it follows predicated
    branches past a wait's place in the text, and reads the statements of one-line inline
    assembly."""
    from tests.aot_sm90 import _grid_dependency

    found = _grid_dependency(_PTX_ENTRY.replace("BODY", body))
    assert {k: found[k] for k in facts} == facts, found
