"""Static checks of every kernel, no GPU needed: ahead-of-time compiles for sm_90 / sm_80 (and gfx942).

perf/static_checks.py compiles every kernel of kernels/ with the specialisation a real launch
gets, for every autotune config in float32 and the default config in the other dtypes, and
reads registers, local memory and the width of the hot loops' global accesses. This test runs
that sweep (``--quick``) in a subprocess, because tests/conftest.py sets TRITON_INTERPRET=1 on
machines without a GPU and interpreted kernels cannot be compiled, then fails on:

* any compile error;
* any register spill or local memory use (except KNOWN_SPILLS, which must stay exactly known);
* a float32 activation-tile load or store on CUDA that is not 128-bit (every representative
  shape is 16-element aligned, so the layout always allows it);
* a kernel or an autotune config that the sweep did not compile;
* a negative control that does not show its defect (the checks themselves would be blind).

The first part checks the judging logic on made-up results, so that a check that can never
fail cannot slip through.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_static_checks():
    # By path: perf/ is not installed, and the module imports nothing heavy at top level, so
    # loading it here does not touch Triton in this (possibly interpreted) process.
    spec = importlib.util.spec_from_file_location("tritonbn_perf_static_checks", ROOT / "perf" / "static_checks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sc = _load_static_checks()

# Spills that are understood and accepted, keyed (kernel, arch, dtype, config). They stay
# accepted only while every spill instruction is outside the loops; the test fails as much when
# one disappears (delete the entry) as when a new one appears.
KNOWN_SPILLS = {
    # ptxas 12.9 (Triton 3.9's) keeps one 32-bit value in an 8-byte stack frame across the
    # channel loop on sm_80 in this one config: one STL before the loop, one LDL after the
    # reduction, 56 registers used of 255 allowed. It costs two instructions per program;
    # sm_90 and every other config are clean.
    ("_bn_bwd_reduce_ncs", "sm_80", "float32", "TILE=2048 w4"),
    ("_bn_bwd_fused_ncs", "sm_80", "float32", "TILE=2048 w4"),
}


def _result(**overrides) -> dict:
    """A clean sm_90 float32 activation kernel result; overrides make it dirty."""
    base = {
        "kernel": "_bn_fwd_normalize_ncs", "module": "tritonbn.kernels.forward", "route": "ncs-split",
        "dtype": "float32", "flags": "-", "config": "TILE=2048 w4", "tile": "1x2048", "arch": "sm_90",
        "target": ["cuda", 90, 32], "family": "ncs_elementwise", "role": "sweep", "expect_vector": True,
        "bulk": True, "error": None, "regs": 32, "stack": 0, "local": 0, "spills": 0, "spills_in_loops": 0,
        "shared": 0, "warps": 4,
        "occupancy": 1.0, "occupancy_limiter": "warps", "gpu": "H100",
        "hot": {"ld": {"128": 4}, "st": {"128": 4}}, "other": {"ld": {"32": 4}, "st": {}},
    }
    base.update(overrides)
    return base


# ----------------------------------------------------------------------------------------------
# the judge, on made-up results
# ----------------------------------------------------------------------------------------------


def test_clean_result_passes():
    assert sc.problems(_result()) == []


@pytest.mark.parametrize("dirty, words", [
    ({"error": "CompilationError: boom"}, "compile error"),
    ({"local": 16}, "spills"),
    ({"stack": 8}, "spills"),
    ({"spills": 2}, "spills"),
    ({"hot": {"ld": {"128": 2, "32": 4}, "st": {"128": 4}}}, "loads not all 128-bit"),
    ({"hot": {"ld": {}, "st": {}}}, "loads not all 128-bit"),  # hot loop not found: fail, not pass
    ({"hot": {"ld": {"128": 4}, "st": {"64": 4}}}, "stores not all 128-bit"),
])
def test_dirty_results_fail(dirty, words):
    found = sc.problems(_result(**dirty))
    assert found and any(words in p for p in found), found


def test_scalar_loads_are_only_reported_where_not_expected():
    assert sc.problems(_result(dtype="bfloat16", expect_vector=False, hot={"ld": {"64": 8}, "st": {}})) == []


def test_negative_controls_fail_when_clean():
    assert sc.problems(_result(role="control-spill"))
    assert sc.problems(_result(role="control-spill", local=256)) == []
    assert sc.problems(_result(role="control-misaligned"))
    assert sc.problems(_result(role="control-misaligned", hot={"ld": {"32": 32}, "st": {}})) == []


def test_occupancy_model():
    h100 = sc.GPU_LIMITS[90]
    assert sc.occupancy(32, 4, 0, h100)["occupancy"] == 1.0
    # 128 registers x 32 lanes = 4096 per warp: 16 warps fit in 64K registers.
    assert sc.occupancy(128, 4, 0, h100) == {"occupancy": 0.25, "limiter": "regs", "blocks": 4}
    # 100 KB of shared memory (+1 KB reserved) per block: two blocks of 4 warps.
    assert sc.occupancy(32, 4, 100 * 1024, h100)["blocks"] == 2


def test_llir_widths_are_attributed_to_source_lines():
    llir = "\n".join([
        '%1 = tail call { i32, i32, i32, i32 } asm sideeffect "mov.u32 $0, $4;\\0A\\09@$9 ld.global.v4.b32 '
        '{ $0, $1, $2, $3 }, [ $8 + 0 ];", "=r,=r,=r,=r,r,r,r,r,l,b"(i32 0, ptr addrspace(1) %p, i1 %m), !dbg !7',
        '%2 = tail call i32 asm sideeffect "mov.u32 $0, 0x0;\\0A\\09ld.global.b32 { $0 }, [ $1 + 0 ];", '
        '"=r,l"(ptr addrspace(1) %q), !dbg !8',
        'tail call void asm sideeffect "@$2 st.global.v2.b32 [ $3 + 0 ], { $0, $1 };", "r,r,b,l"(i32 %a), !dbg !7',
        '!1 = !DIFile(filename: "forward.py", directory: "/src/kernels")',
        "!4 = distinct !DISubprogram(name: \"k\", scope: !1, file: !1, line: 10)",
        "!5 = distinct !DILexicalBlockFile(scope: !4, file: !1, discriminator: 0)",
        "!7 = !DILocation(line: 58, column: 17, scope: !5, inlinedAt: !9)",
        "!8 = !DILocation(line: 118, column: 13, scope: !4)",
        "!9 = !DILocation(line: 119, column: 23, scope: !4)",
    ])
    hot_lines = {(os.path.realpath("/src/kernels/forward.py"), 58): "ld"}
    found = sc.llir_accesses(llir, hot_lines)
    assert found["hot"] == {"ld": {128: 1}, "st": {}}
    # The store shares the load's line but is not a rank-2 store there: it stays "other".
    assert found["other"] == {"ld": {32: 1}, "st": {64: 1}}


def test_ttgir_rank2_accesses_resolve_through_names_and_callsites():
    ttgir = "\n".join([
        '#loc3 = loc("/src/kernels/forward.py":58:17)',
        '#loc9 = loc("/src/kernels/forward.py":119:23)',
        "#loc20 = loc(callsite(#loc3 at #loc9))",
        '#loc21 = loc("x"(#loc20))',
        "    %x = tt.load %p, %m, %c : tensor<1x2048x!tt.ptr<f32>, #blocked> loc(#loc21)",
        "    %s = tt.load %q : !tt.ptr<f32> loc(#loc9)",
        "    %v = tt.load %r : tensor<64x!tt.ptr<f32>, #blocked1> loc(#loc9)",
    ])
    assert sc.hot_access_lines(ttgir) == {(os.path.realpath("/src/kernels/forward.py"), 58): "ld"}


# ----------------------------------------------------------------------------------------------
# the sweep: real ahead-of-time compiles
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("static") / "sweep.json"
    start = time.perf_counter()
    proc = sc.run_subprocess(["--quick", "--quiet", "--workers", "2", "--json", str(out)], timeout=900)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0 and out.exists(), f"static sweep crashed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    data = json.loads(out.read_text())
    # Shown with -s or on failure: the sweep must stay cheap enough for every test run.
    print(f"static sweep: {len(data['results'])} compiles in {elapsed:.0f} s")
    return data


def _label(r: dict) -> str:
    return f"{r['kernel']} {r['dtype']} {r['arch']} [{r['config']}] {r['flags']} ({r['role']})"


def test_sweep_compiles_everything(sweep):
    errors = [f"{_label(r)}: {r['error']}" for r in sweep["results"] if r.get("error")]
    assert not errors, "\n".join(errors)


def test_every_kernel_and_every_config_is_compiled(sweep):
    assert not sweep["missing"], f"kernels never compiled: {sweep['missing']}"
    assert len(sweep["inventory"]) >= 15
    results = [r for r in sweep["results"] if r["role"] == "sweep" and r["dtype"] == "float32"]
    for arch in ("sm_90", "sm_80"):
        for kernel in sweep["inventory"]:
            mine = [r for r in results if r["kernel"] == kernel and r["arch"] == arch]
            assert mine, f"{kernel} has no float32 {arch} variant"
            family = mine[0]["family"]
            if family in sweep["config_labels"]:
                compiled = {r["config"] for r in mine}
                assert compiled == set(sweep["config_labels"][family]), (kernel, arch, compiled)
    # Per-channel kernels read only ACC-typed statistics, so other input dtypes compile them to
    # the float32 binaries (deduplicated); every activation kernel gets its own.
    streaming = {r["kernel"] for r in results if r["family"] != "per_channel"}
    for dtype in ("bfloat16", "float16", "float64"):
        compiled = {r["kernel"] for r in sweep["results"] if r["dtype"] == dtype}
        assert streaming <= compiled, (dtype, streaming - compiled)
    int64 = {r["kernel"] for r in sweep["results"] if r["role"] == "int64"}
    assert int64 and all("INT64_INDEX" in r["flags"] for r in sweep["results"] if r["role"] == "int64")


def test_no_spills_or_local_memory(sweep):
    spilled = collections.defaultdict(list)
    for r in sweep["results"]:
        if not r.get("error") and not r["role"].startswith("control") and (r["local"] or r["stack"] or r["spills"]):
            spilled[(r["kernel"], r["arch"], r["dtype"], r["config"])].append(r)
    bad = [f"{_label(r)}: {sc._local_text(r)}" for key, group in spilled.items() for r in group
           if key not in KNOWN_SPILLS or r.get("spills_in_loops") != 0]
    assert not bad, "register spills / local memory:\n" + "\n".join(bad)
    gone = KNOWN_SPILLS - set(spilled)
    assert not gone, f"known spills no longer happen, remove them from KNOWN_SPILLS: {sorted(gone)}"


def test_float32_hot_loops_are_128_bit(sweep):
    checked = [r for r in sweep["results"] if r["expect_vector"] and not r.get("error")]
    # Every float32 activation kernel of both CUDA targets, in all configs, is held to it.
    assert len(checked) >= 12 * 4 * 2
    bad = [f"{_label(r)}: hot loads {sc._widths(r['hot']['ld'])}, stores {sc._widths(r['hot']['st'])}"
           for r in checked if any("128-bit" in p for p in sc.problems(r))]
    assert not bad, "hot loops without 128-bit accesses:\n" + "\n".join(bad)


def test_negative_controls_show_their_defects(sweep):
    controls = [r for r in sweep["results"] if r["role"].startswith("control")]
    assert {r["role"] for r in controls} == {"control-misaligned", "control-spill"}
    bad = [f"{_label(r)}: {sc.problems(r)}" for r in controls if sc.problems(r)]
    assert not bad, "\n".join(bad)
