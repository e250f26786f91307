"""Static checks of every kernel, no GPU needed: ahead-of-time compiles for sm_90 / sm_80 (and gfx942).

perf/static_checks.py compiles every kernel of kernels/ with the specialisation a real launch
gets, for every autotune config in float32 and the default config in the other dtypes, and
reads registers, local memory and the width of the hot loops' global accesses. test_static_sweep
runs that sweep (``--quick``, ~280 compiles: 50-100 s from a cold Triton cache on 2 cores, ~20 s
warm) in a subprocess, because tests/conftest.py sets TRITON_INTERPRET=1 on machines without a
GPU and interpreted kernels cannot be compiled. It fails on:

* any compile error;
* any harmful spill (more than an 8-byte frame, or spill code in a loop), but those KNOWN_SPILLS lists;
* a float32 activation-tile load or store on CUDA that is not 128-bit (every representative
  shape is 16-element aligned, so the layout always allows it);
* a kernel, or an autotune config of it, that the sweep did not compile;
* a negative control that does not show its defect (the checks themselves would be blind).

The other tests check the judging and parsing logic on made-up inputs, so that a check that can
never fail cannot slip through.
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

# Spills that are understood and accepted, keyed (kernel, arch, dtype, config), with the
# Triton versions that showed them: another version's register allocator may not spill, so an
# entry goes stale (and fails) only under its own. Benign frames (perf/static_checks.py:
# harmful_spill) need no entry. None are accepted now.
KNOWN_SPILLS: dict[tuple[str, str, str, str], set[str]] = {}


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
        "widest_reduction": 1024,
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
    ({"stack": 16, "spills": 2}, "spills"),
    ({"stack": 8, "spills": 2, "spills_in_loops": 1}, "spills"),
    ({"spills": 2, "spills_in_loops": None}, "spills"),  # AMD: not located, so it counts
    ({"hot": {"ld": {"128": 2, "32": 4}, "st": {"128": 4}}}, "loads not all 128-bit"),
    ({"hot": {"ld": {}, "st": {}}}, "loads not all 128-bit"),  # hot loop not found: fail, not pass
    ({"hot": {"ld": {"128": 4}, "st": {"64": 4}}}, "stores not all 128-bit"),
])
def test_dirty_results_fail(dirty, words):
    found = sc.problems(_result(**dirty))
    assert found and any(words in p for p in found), found


def test_wide_reductions_fail_only_in_reducing_kernels():
    assert sc.problems(_result()) == []  # an elementwise family may reduce as it likes
    for family in ("ncs_reduce", "ncs_reduce_bwd", "rows_reduce"):
        found = sc.problems(_result(family=family))
        assert any("tt.reduce folds 1024 values" in p for p in found), found
        assert sc.problems(_result(family=family, widest_reduction=2)) == []


# Excerpts of Triton 3.9 TTIR: a pairwise step of common.tree_sum, a plain tl.sum, and a
# reduction to a scalar.
_TTIR_REDUCES = """
    %x_10 = "tt.reduce"(%x_9) <{axis = 0 : i32}> ({
    ^bb0(%x_31: f32 loc(callsite(#loc11 at #loc27)), %x_32: f32 loc(callsite(#loc11 at #loc27))):
      %x_33 = arith.addf %x_31, %x_32 : f32 loc(#loc33)
      tt.reduce.return %x_33 : f32 loc(#loc30)
    }) : (tensor<2x1024x1xf32>) -> tensor<1024x1xf32> loc(#loc30)
    %17 = "tt.reduce"(%16) <{axis = 1 : i32}> ({
    ^bb0(%a: f64, %b: f64):
      %s = arith.addf %a, %b : f64
      tt.reduce.return %s : f64
    }) : (tensor<16x512xf64>) -> tensor<16xf64>
    %18 = "tt.reduce"(%17) <{axis = 0 : i32}> ({
    ^bb0(%a: f64, %b: f64):
      %s = arith.addf %a, %b : f64
      tt.reduce.return %s : f64
    }) : (tensor<16xf64>) -> f64
"""


def test_widest_reduction_reads_the_reduced_axis():
    assert sc.widest_reduction(_TTIR_REDUCES) == 512
    first = _TTIR_REDUCES[:_TTIR_REDUCES.index("%17")]
    assert sc.widest_reduction(first) == 2
    assert sc.widest_reduction("%1 = arith.addf %a, %b : f32") == 0


def test_a_benign_frame_is_reported_not_failed():
    assert sc.problems(_result(stack=8, spills=2, spills_in_loops=0)) == []
    assert sc.harmful_spill(_result(stack=8, spills=2, spills_in_loops=0)) is False


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


def _run_sweep(tmp_path: Path) -> dict:
    out = tmp_path / "sweep.json"
    start = time.perf_counter()
    proc = sc.run_subprocess(["--quick", "--quiet", "--workers", "2", "--json", str(out)], timeout=900)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0 and out.exists(), f"static sweep crashed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    data = json.loads(out.read_text())
    # Shown with -s: the sweep must stay cheap enough for every test run.
    print(f"static sweep: {len(data['results'])} compiles in {elapsed:.0f} s")
    return data


def _label(r: dict) -> str:
    return f"{r['kernel']} {r['dtype']} {r['arch']} [{r['config']}] {r['flags']} ({r['role']}, {r['route']})"


def _compile_errors(sweep: dict) -> list[str]:
    return [f"{_label(r)}: {r['error']}" for r in sweep["results"] if r.get("error")]


def _coverage(sweep: dict) -> list[str]:
    """Every kernel compiled, every autotune config of it in float32 on both CUDA targets."""
    found = []
    if sweep["missing"]:
        found.append(f"kernels never compiled: {sweep['missing']}")
    if len(sweep["inventory"]) < 15:
        found.append(f"only {len(sweep['inventory'])} kernels found: {sweep['inventory']}")
    results = [r for r in sweep["results"] if r["role"] == "sweep" and r["dtype"] == "float32"]
    for arch in ("sm_90", "sm_80"):
        for kernel in sweep["inventory"]:
            mine = [r for r in results if r["kernel"] == kernel and r["arch"] == arch]
            if not mine:
                found.append(f"{kernel} has no float32 {arch} variant")
                continue
            family = mine[0]["family"]
            compiled = {r["config"] for r in mine}
            if family in sweep["config_labels"] and compiled != set(sweep["config_labels"][family]):
                found.append(f"{kernel} {arch}: configs {sorted(compiled)}, all_configs: "
                             f"{sweep['config_labels'][family]}")
    # Per-channel kernels read only ACC-typed statistics, so other input dtypes compile them to
    # the float32 binaries (deduplicated); every activation kernel gets its own.
    streaming = {r["kernel"] for r in results if r["family"] != "per_channel"}
    for dtype in ("bfloat16", "float16", "float64"):
        absent = streaming - {r["kernel"] for r in sweep["results"] if r["dtype"] == dtype}
        if absent:
            found.append(f"no {dtype} variant of {sorted(absent)}")
    int64 = [r for r in sweep["results"] if r["role"] == "int64"]
    if not int64 or not all("INT64_INDEX" in r["flags"] for r in int64):
        found.append("no 64-bit indexing variants")
    return found


def _spills(sweep: dict) -> list[str]:
    spilled = collections.defaultdict(list)
    for r in sweep["results"]:
        if not r.get("error") and not r["role"].startswith("control") and sc.harmful_spill(r):
            spilled[(r["kernel"], r["arch"], r["dtype"], r["config"])].append(r)
    found = [f"{_label(r)}: {sc._local_text(r)}" for key, group in spilled.items() for r in group
             if key not in KNOWN_SPILLS]
    version = ".".join(sweep.get("triton", "").split(".")[:2])
    gone = {key for key, seen in KNOWN_SPILLS.items() if version in seen} - set(spilled)
    if gone:
        found.append(f"known spills no longer happen, remove them from KNOWN_SPILLS: {sorted(gone)}")
    return found


def _vector_accesses(sweep: dict) -> list[str]:
    checked = [r for r in sweep["results"] if r["expect_vector"] and not r.get("error")]
    # Every float32 activation kernel of both CUDA targets, in all configs, is held to it.
    if len(checked) < 12 * 4 * 2:
        return [f"only {len(checked)} variants were checked for 128-bit accesses"]
    return [f"{_label(r)}: hot loads {sc._widths(r['hot']['ld'])}, stores {sc._widths(r['hot']['st'])}"
            for r in checked if any("128-bit" in p for p in sc.problems(r))]


def _controls(sweep: dict) -> list[str]:
    controls = [r for r in sweep["results"] if r["role"].startswith("control")]
    found = [f"{_label(r)}: {sc.problems(r)}" for r in controls if sc.problems(r)]
    if {r["role"] for r in controls} != {"control-misaligned", "control-spill"}:
        found.append(f"negative controls missing: {sorted(r['role'] for r in controls)}")
    return found


def test_static_sweep(tmp_path):
    # One test, one sweep: separate tests sharing a fixture would each rerun it under xdist.
    sweep = _run_sweep(tmp_path)
    checks = {
        "compile errors": _compile_errors,
        "coverage": _coverage,
        "register spills / local memory": _spills,
        "float32 hot loops without 128-bit accesses": _vector_accesses,
        "negative controls that stayed clean (the checks are blind)": _controls,
    }
    report = [f"{title}:\n  " + "\n  ".join(found) for title, check in checks.items() if (found := check(sweep))]
    assert not report, "\n".join(report)


def test_every_launch_states_its_fp_fusion():
    """Every launch passes enable_fp_fusion (True, or False where FrozenBatchNorm2d needs two
    roundings): left unset, Triton 3.9 warns on each compile and 3.10 changes the default."""
    launches = sc._record_launches("float32")
    assert launches
    assert all(isinstance(launch.kwargs.get("enable_fp_fusion"), bool) for launch in launches)
