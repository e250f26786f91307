"""What the report, the plots and the summary share: the CSV schema, the bytes model, summaries.

Nothing here imports torch or triton, so ``perf/plot.py`` can redraw a CSV on any machine.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

MODES = ("forward-train", "backward", "forward+backward", "eval")
PROVIDERS = ("tritonbn", "torch", "torch.compile")
# What a row measures (the CSV's `op` column). batch_norm: BatchNorm alone, each provider's
# own. The fused ops: tritonbn's batch_norm_act (one kernel) against torch's unfused sequence
# as torchvision writes it (F.batch_norm, `out += residual`, relu in place), eager and compiled.
BATCH_NORM = "batch_norm"
FUSED_OPS = ("bn_relu", "bn_add_relu")
# GroupNorm (tritonbn.GroupNorm against torch.nn.GroupNorm) and GroupNorm + SiLU
# (tritonbn.GroupNormAct, one kernel, against torch's GroupNorm then SiLU), as diffusion
# UNets and VAEs and detection heads run them. No running statistics: no eval mode.
GROUP_NORM = "group_norm"
GN_OPS = (GROUP_NORM, "gn_silu")
OPS = (BATCH_NORM, *FUSED_OPS, *GN_OPS)
FUSED_MODES = ("forward-train", "backward", "forward+backward")  # no eval for the fused ops
OP_TITLES = {BATCH_NORM: "BatchNorm", "bn_relu": "BN+ReLU", "bn_add_relu": "BN+add+ReLU", GROUP_NORM: "GroupNorm",
             "gn_silu": "GN+SiLU"}
DTYPES = ("float32", "bfloat16")
LAYOUTS = ("contiguous", "channels_last")
COPY = "copy"  # provider and mode of the one device-to-device copy row

SMOKE_DEVICE = "cpu-interpreter"
SMOKE_LABEL = "INTERPRETER SMOKE RUN \u2014 not a performance measurement"
MEASUREMENT_LABEL = "measurement"
RESNET50_BN_LAYERS = 53  # perf/shapes.py builds and checks them

# Bytes that a two-pass BatchNorm must move through device memory, in units of E * s (E
# elements of s bytes each; the per-channel vectors are negligible next to them). GB/s in the
# report is this model over the median time, so every provider is scored against the same
# amount of work, whatever it really moves.
#
# The model is two-pass on purpose: statistics need all of a channel before any output, so a
# kernel reads x once for them and once more to normalise. tritonbn's fused route reads x
# twice too (the second read mostly from L2, which is why its modelled GB/s can exceed the
# copy bandwidth); the split route reads it twice from DRAM.
BYTES = {
    "forward-train": 3,  # statistics pass reads x; normalise pass reads x again and writes y
    "backward": 5,  # reduce pass reads x and dy; dx pass reads x and dy again and writes dx
    "forward+backward": 8,  # the two above, back to back
    "eval": 2,  # running statistics are given: read x, write y
}

# The fused ops, per version: "fused" is one BatchNorm + epilogue (tritonbn's batch_norm_act),
# "unfused" torch's three ops, each a round trip through memory. Same units, same two-pass
# convention as BYTES. Forward, fused: the statistics pass reads x; the normalise pass reads x
# (and the residual) and writes y. Forward, unfused: BatchNorm 3 (as above), `out +=
# residual` 3 (read out and the residual, write out), relu_ 2 (read, write in place).
# Backward, fused (kernels/backward.py, relu: the mask is the sign of the saved output y): the
# reduce pass reads x, dy and y; the dx pass reads x, dy and y again and writes dx (3 + 4).
# With a residual, the reduce pass also writes dz (= dresidual, a tensor of its own) and the
# dx pass reads x and dz instead (4 + 3; the one-program-per-channel route rereads from L2 and
# writes dresidual in its second pass, which the same model covers). Backward, unfused: relu's backward
# reads y and dy and writes dz (3); the add's backward hands that same dz to both branches
# (no copy, 0); BatchNorm's backward 5 (as above).
FUSED_BYTES = {
    ("bn_relu", "fused"): {"forward-train": 3, "backward": 3 + 4, "forward+backward": 3 + 7},
    ("bn_relu", "unfused"): {"forward-train": 3 + 2, "backward": 3 + 5, "forward+backward": 5 + 8},
    ("bn_add_relu", "fused"): {"forward-train": 4, "backward": 4 + 3, "forward+backward": 4 + 7},
    ("bn_add_relu", "unfused"): {"forward-train": 3 + 3 + 2, "backward": 3 + 0 + 5, "forward+backward": 8 + 8},
}
# GroupNorm, same units and two-pass convention (a group's statistics need all of it before any
# output): "plain" is GroupNorm alone, any provider. GN+SiLU fused: the statistics pass reads
# x, the normalise pass reads x and writes y (3); backward recomputes z = GN(x) from x and the
# saved statistics, so the reduce pass reads x and dy, the dx pass reads them again and writes
# dx (2 + 3). Unfused (torch's GroupNorm, then F.silu): forward GroupNorm 3 + SiLU 2 (read z,
# write y); backward SiLU's reads z and dy and writes dz (3), GroupNorm's 5.
GN_BYTES = {
    (GROUP_NORM, "plain"): {"forward-train": 3, "backward": 5, "forward+backward": 8},
    ("gn_silu", "fused"): {"forward-train": 3, "backward": 2 + 3, "forward+backward": 3 + 5},
    ("gn_silu", "unfused"): {"forward-train": 3 + 2, "backward": 3 + 5, "forward+backward": 5 + 8},
}
# Whose bytes a provider's rows of a fused op are scored against. torch.compile gets the fused
# model: Inductor fuses the add and the relu into its own normalise kernel (and can do no
# better than one BatchNorm plus epilogue), so that is the least it must move.
FUSED_VERSION = {"tritonbn": "fused", "torch": "unfused", "torch.compile": "fused"}

# One CSV, long format: a row per (provider, mode, dtype, layout, shape), plus one copy row.
COLUMNS = (
    "provider", "mode", "dtype", "layout", "shape", "shape_name", "layers",
    "ms_p20", "ms_p50", "ms_p80", "gbps", "bytes_model", "backend",
    "device", "driver", "cuda", "torch", "triton", "date",
    # Beyond the core schema: tritonbn's kernel route, the correctness check against eager
    # torch (tritonbn rows only), and whether the row is a measurement or a smoke run.
    "route", "max_abs_err", "check", "label",
    # What was measured (OPS; the copy row: COPY). Last, so that a reader by position still
    # finds the older columns where they were; read_rows gives rows of an older CSV, which
    # lacks it, op batch_norm.
    "op",
)

# Targets of the project (perf/notes.md): tritonbn over eager torch and torch.compile.
TARGET_EVERY_SHAPE_VS_EAGER = 1.0
TARGET_GEOMEAN_VS_EAGER = 1.5
TARGET_GEOMEAN_VS_COMPILE = 1.0
TARGET_EVAL_COPY_FRACTION = 0.95
# Eval bandwidth is judged on shapes that move at least this much: small ones are launch-bound
# and can never approach the copy bandwidth.
EVAL_TARGET_MIN_BYTES = 256 * 2**20
# The fused ops (issue: "at least 1.5x the unfused torch sequence on ResNet-50 shapes"):
# geomean of tritonbn's fused op over eager torch's unfused sequence, every fused row on a
# ResNet-50 shape (both ops, every mode, dtype and layout).
TARGET_FUSED_GEOMEAN_VS_EAGER = 1.5
# How many of ResNet-50's 53 BatchNorm layers each fused op replaces (perf/shapes.py checks):
# bn1 and every block's bn1 and bn2 are followed by a ReLU, every block's bn3 by the residual
# add and a ReLU; the 4 downsample BatchNorms stay plain.
RESNET50_FUSED_LAYERS = {"bn_relu": 33, "bn_add_relu": 16}


def bytes_units(mode: str, op: str = BATCH_NORM, provider: str = "tritonbn") -> int:
    """The bytes model of one row in units of E * s: BYTES, or FUSED_BYTES for the provider's version."""
    if op == BATCH_NORM:
        return BYTES[mode]
    if op == GROUP_NORM:
        return GN_BYTES[(op, "plain")][mode]
    if op in GN_OPS:
        return GN_BYTES[(op, FUSED_VERSION[provider])][mode]
    return FUSED_BYTES[(op, FUSED_VERSION[provider])][mode]


def bytes_model(mode: str, numel: int, element_size: int, op: str = BATCH_NORM, provider: str = "tritonbn") -> int:
    return bytes_units(mode, op, provider) * numel * element_size


def bytes_bound(op: str, mode: str) -> float:
    """Unfused over fused bytes: the fused op's speedup if both ran at the same bandwidth."""
    if op in (BATCH_NORM, GROUP_NORM):
        return 1.0
    table = GN_BYTES if op in GN_OPS else FUSED_BYTES
    return table[(op, "unfused")][mode] / table[(op, "fused")][mode]


def op_of(row: dict) -> str:
    """A row's op; rows of a CSV written before the op column get batch_norm (the copy row: COPY)."""
    op = row.get("op") or ""
    if op:
        return op
    return COPY if row.get("provider") == COPY else BATCH_NORM


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["op"] = op_of(row)
    return rows


def as_float(value: str | float | None) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def latest(rows: list[dict], op: str = BATCH_NORM) -> dict[tuple, dict]:
    """The last row of each (device, provider, mode, dtype, layout, shape_name) of one op, and
    the copy rows: resumed runs append."""
    table = {}
    for row in rows:
        if op_of(row) in (op, COPY):
            table[(row["device"], row["provider"], row["mode"], row["dtype"], row["layout"], row["shape_name"])] = row
    return table


def copy_gbps(rows: list[dict]) -> float:
    """The copy bandwidth of the latest copy row (NaN when none)."""
    copies = [as_float(r["gbps"]) for r in rows if r["provider"] == COPY]
    return copies[-1] if copies else math.nan


def geomean(values: list[float]) -> float:
    good = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in good) / len(good)) if good else math.nan


def speedups(rows: list[dict], op: str = BATCH_NORM) -> dict[tuple[str, str, str], list[dict]]:
    """Per (mode, dtype, layout): one entry per shape with tritonbn's speedup over each baseline.

    Speedup = baseline p50 / tritonbn p50 (above 1 is tritonbn faster); NaN where a
    provider has no timing. For a fused op the baselines are torch's unfused sequence, eager
    ("torch") and compiled.
    """
    table = latest(rows, op)
    out: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for (device, provider, mode, dtype, layout, shape_name), row in table.items():
        if provider != "tritonbn":
            continue
        ours = as_float(row["ms_p50"])

        def other(name: str) -> float:
            base = table.get((device, name, mode, dtype, layout, shape_name))
            return as_float(base["ms_p50"]) / ours if base and ours > 0 else math.nan

        out[(mode, dtype, layout)].append({
            "op": op,
            "shape_name": shape_name,
            "shape": row["shape"],
            "layers": int(as_float(row["layers"])) if math.isfinite(as_float(row["layers"])) else 1,
            "ms": ours,
            "gbps": as_float(row["gbps"]),
            "bytes": as_float(row["bytes_model"]),
            "vs_eager": other("torch"),
            "vs_compile": other("torch.compile"),
            "eager_ms": as_float(table[(device, "torch", mode, dtype, layout, shape_name)]["ms_p50"])
            if (device, "torch", mode, dtype, layout, shape_name) in table else math.nan,
        })
    return out


def _fmt(x: float, spec: str = "", suffix: str = "x") -> str:
    if not math.isfinite(x):
        return "-"
    # Two decimals for real speedups; significant digits for the smoke run's tiny ratios.
    return f"{x:{spec or ('.2f' if abs(x) >= 0.1 else '.2g')}}{suffix}"


def _rank(values: tuple[str, ...], value: str) -> int:
    return values.index(value) if value in values else len(values)


def _table_order(key: tuple) -> tuple:
    """Sort key of a (mode, dtype, layout) summary row: the suite's own order of each."""
    mode, dtype, layout = key
    return _rank(MODES, mode), _rank(DTYPES, dtype), _rank(LAYOUTS, layout)


def _rn50_net(entries: list[dict], layers_total: int) -> float:
    """ResNet-50's total time of this op, eager over tritonbn, each shape weighted by its layer
    count; NaN unless every layer was measured (a run cut short by its time budget has fewer)."""
    rn50 = [e for e in entries if e["shape_name"].startswith("rn50-")]
    eager_total = sum(e["layers"] * e["eager_ms"] for e in rn50)
    ours_total = sum(e["layers"] * e["ms"] for e in rn50)
    complete = sum(e["layers"] for e in rn50) == layers_total
    return eager_total / ours_total if complete and ours_total > 0 else math.nan


def summary_lines(rows: list[dict]) -> list[str]:
    """The summary table: geomean speedups per mode/dtype/layout, the worst shape, the targets.

    BatchNorm first; then, when the CSV has them, the fused ops against torch's unfused
    sequence; the targets last.
    """
    smoke = any(r["device"] == SMOKE_DEVICE for r in rows)
    devices = sorted({r["device"] for r in rows})
    bandwidth = copy_gbps(rows)
    lines = []
    if smoke:
        lines += ["=" * 100, f"  {SMOKE_LABEL}", "=" * 100]
    lines.append(f"SUMMARY  device: {', '.join(devices)}   copy bandwidth: {_fmt(bandwidth, '.1f', ' GB/s')}")
    header = (f"{'mode':<17} {'dtype':<9} {'layout':<14} {'shapes':>6} {'vs eager':>9} {'vs compile':>10} "
              f"{'rn50 net':>8}  {'worst vs eager (shape)':<34} {'eval %copy':>10}")
    lines += [header, "-" * len(header)]
    every_shape_ok = True
    all_eager, all_compile, eval_fractions = [], [], []
    table = speedups(rows)
    for key in sorted(table, key=_table_order):
        mode, dtype, layout = key
        entries = table[key]
        eager = [e["vs_eager"] for e in entries]
        compiled = [e["vs_compile"] for e in entries]
        all_eager += eager
        all_compile += compiled
        finite = [e for e in entries if math.isfinite(e["vs_eager"])]
        worst = min(finite, key=lambda e: e["vs_eager"]) if finite else None
        if worst is not None and worst["vs_eager"] < TARGET_EVERY_SHAPE_VS_EAGER:
            every_shape_ok = False
        # Whole-network number: ResNet-50's BatchNorm time, each shape weighted by its layer count.
        rn50_speedup = _rn50_net(entries, RESNET50_BN_LAYERS)
        eval_text = "-"
        if mode == "eval" and math.isfinite(bandwidth):
            big = [e for e in entries if e["bytes"] >= EVAL_TARGET_MIN_BYTES and math.isfinite(e["gbps"])]
            if big:
                low = min(big, key=lambda e: e["gbps"])
                eval_fractions.append(low["gbps"] / bandwidth)
                eval_text = f"{100 * low['gbps'] / bandwidth:.0f}% min"
        worst_text = f"{_fmt(worst['vs_eager'])} {worst['shape_name']}" if worst else "-"
        lines.append(f"{mode:<17} {dtype:<9} {layout:<14} {len(entries):>6} {_fmt(geomean(eager)):>9} "
                     f"{_fmt(geomean(compiled)):>10} {_fmt(rn50_speedup):>8}  {worst_text:<34} {eval_text:>10}")
    lines.append("-" * len(header))
    overall_eager, overall_compile = geomean(all_eager), geomean(all_compile)
    lines.append(f"overall geomean: vs eager {_fmt(overall_eager)}, vs torch.compile {_fmt(overall_compile)}")

    fused_lines, fused_eager, fused_compile, rn50_fused = _fused_summary(rows)
    lines += fused_lines
    lines += _group_norm_summary(rows)
    fused_target = geomean(rn50_fused)
    if smoke:
        lines.append("targets: not judged (interpreter smoke run: timings are meaningless)")
    else:
        def verdict(ok: bool | None) -> str:
            return "n/a" if ok is None else ("PASS" if ok else "FAIL")

        lines.append(
            "targets: every shape >= 1.0x eager: " + verdict(every_shape_ok if all_eager else None)
            + f" | geomean >= {TARGET_GEOMEAN_VS_EAGER}x eager: "
            + verdict(overall_eager >= TARGET_GEOMEAN_VS_EAGER if math.isfinite(overall_eager) else None)
            + f" | geomean >= {TARGET_GEOMEAN_VS_COMPILE}x compile: "
            + verdict(overall_compile >= TARGET_GEOMEAN_VS_COMPILE if math.isfinite(overall_compile) else None)
            + f" | eval >= {TARGET_EVAL_COPY_FRACTION:.0%} copy BW: "
            + verdict(min(eval_fractions) >= TARGET_EVAL_COPY_FRACTION if eval_fractions else None)
        )
        lines.append(
            f"fused target: geomean >= {TARGET_FUSED_GEOMEAN_VS_EAGER}x the unfused eager sequence on ResNet-50 "
            f"shapes ({_fmt(fused_target)}): "
            + verdict(fused_target >= TARGET_FUSED_GEOMEAN_VS_EAGER if math.isfinite(fused_target) else None)
        )
    return [line.rstrip() for line in lines]


def _worst_text(entries: list[dict]) -> str:
    """The shape where tritonbn is slowest against eager torch, and that speedup."""
    finite = [e for e in entries if math.isfinite(e["vs_eager"])]
    worst = min(finite, key=lambda e: e["vs_eager"]) if finite else None
    return f"{_fmt(worst['vs_eager'])} {worst['shape_name']}" if worst else "-"


def _fused_summary(rows: list[dict]) -> tuple[list[str], list[float], list[float], list[float]]:
    """The fused ops' part of the summary: lines, and every speedup vs eager / vs torch.compile
    (and vs eager on ResNet-50 shapes alone, what the target is judged on)."""
    tables = {op: speedups(rows, op) for op in FUSED_OPS}
    if not any(tables.values()):
        return [], [], [], []
    header = (f"{'op':<12} {'mode':<17} {'dtype':<9} {'layout':<14} {'shapes':>6} {'vs eager':>9} "
              f"{'vs compile':>10} {'rn50 net':>8} {'bytes bound':>11}  {'worst vs eager (shape)':<34}")
    lines = ["", "FUSED BatchNorm + activation: tritonbn batch_norm_act (one kernel) vs torch's unfused sequence "
             "(F.batch_norm, += residual, relu_)",
             "  vs eager / vs compile: the unfused sequence in eager torch / under torch.compile; bytes bound: "
             "unfused / fused bytes model (the speedup at equal bandwidth)",
             header, "-" * len(header)]
    all_eager, all_compile, rn50_eager = [], [], []
    for op in FUSED_OPS:
        table = tables[op]
        for key in sorted(table, key=_table_order):
            mode, dtype, layout = key
            entries = table[key]
            eager = [e["vs_eager"] for e in entries]
            compiled = [e["vs_compile"] for e in entries]
            all_eager += eager
            all_compile += compiled
            rn50_eager += [e["vs_eager"] for e in entries if e["shape_name"].startswith("rn50-")]
            worst_text = _worst_text(entries)
            rn50 = _rn50_net(entries, RESNET50_FUSED_LAYERS[op])
            lines.append(f"{op:<12} {mode:<17} {dtype:<9} {layout:<14} {len(entries):>6} {_fmt(geomean(eager)):>9} "
                         f"{_fmt(geomean(compiled)):>10} {_fmt(rn50):>8} {_fmt(bytes_bound(op, mode)):>11}  "
                         f"{worst_text:<34}")
    lines.append("-" * len(header))
    lines.append(f"fused ops geomean: vs unfused eager {_fmt(geomean(all_eager))}, "
                 f"vs torch.compile {_fmt(geomean(all_compile))}")
    return lines, all_eager, all_compile, rn50_eager


def _group_norm_summary(rows: list[dict]) -> list[str]:
    """GroupNorm and GN+SiLU: geomean speedups per op/mode/dtype/layout and the worst shape.

    No target is judged on them yet (issue #12 sets none): the table says where tritonbn
    stands against eager torch and torch.compile on diffusion and detection shapes.
    """
    tables = {op: speedups(rows, op) for op in GN_OPS}
    if not any(tables.values()):
        return []
    header = (f"{'op':<12} {'mode':<17} {'dtype':<9} {'layout':<14} {'shapes':>6} {'vs eager':>9} "
              f"{'vs compile':>10} {'bytes bound':>11}  {'worst vs eager (shape)':<34} {'best GB/s (shape)':<30}")
    lines = ["", "GroupNorm: tritonbn GroupNorm / GroupNormAct (GN+SiLU in one kernel) vs torch's GroupNorm "
             "(then F.silu), eager and under torch.compile",
             "  bytes bound: unfused / fused bytes model (the speedup at equal bandwidth)",
             header, "-" * len(header)]
    all_eager, all_compile = [], []
    for op in GN_OPS:
        table = tables[op]
        for key in sorted(table, key=_table_order):
            mode, dtype, layout = key
            entries = table[key]
            eager = [e["vs_eager"] for e in entries]
            compiled = [e["vs_compile"] for e in entries]
            all_eager += eager
            all_compile += compiled
            worst_text = _worst_text(entries)
            fast = [e for e in entries if math.isfinite(e["gbps"])]
            best = max(fast, key=lambda e: e["gbps"]) if fast else None
            best_text = f"{_fmt(best['gbps'], '.3g', '')} {best['shape_name']}" if best else "-"
            lines.append(f"{op:<12} {mode:<17} {dtype:<9} {layout:<14} {len(entries):>6} {_fmt(geomean(eager)):>9} "
                         f"{_fmt(geomean(compiled)):>10} {_fmt(bytes_bound(op, mode)):>11}  {worst_text:<34} "
                         f"{best_text:<30}")
    lines.append("-" * len(header))
    lines.append(f"GroupNorm ops geomean: vs eager {_fmt(geomean(all_eager))}, "
                 f"vs torch.compile {_fmt(geomean(all_compile))}")
    return lines
