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

# One CSV, long format: a row per (provider, mode, dtype, layout, shape), plus one copy row.
COLUMNS = (
    "provider", "mode", "dtype", "layout", "shape", "shape_name", "layers",
    "ms_p20", "ms_p50", "ms_p80", "gbps", "bytes_model", "backend",
    "device", "driver", "cuda", "torch", "triton", "date",
    # Beyond the core schema: tritonbn's kernel route, the correctness check against eager
    # torch (tritonbn rows only), and whether the row is a measurement or a smoke run.
    "route", "max_abs_err", "check", "label",
)

# Targets of the project (perf/notes.md): tritonbn over eager torch and torch.compile.
TARGET_EVERY_SHAPE_VS_EAGER = 1.0
TARGET_GEOMEAN_VS_EAGER = 1.5
TARGET_GEOMEAN_VS_COMPILE = 1.0
TARGET_EVAL_COPY_FRACTION = 0.95
# Eval bandwidth is judged on shapes that move at least this much: small ones are launch-bound
# and can never approach the copy bandwidth.
EVAL_TARGET_MIN_BYTES = 256 * 2**20


def bytes_model(mode: str, numel: int, element_size: int) -> int:
    return BYTES[mode] * numel * element_size


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def as_float(value: str | float | None) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def latest(rows: list[dict]) -> dict[tuple, dict]:
    """The last row of each (device, provider, mode, dtype, layout, shape_name): resumed runs append."""
    table = {}
    for row in rows:
        table[(row["device"], row["provider"], row["mode"], row["dtype"], row["layout"], row["shape_name"])] = row
    return table


def copy_gbps(rows: list[dict]) -> float:
    """The copy bandwidth of the latest copy row (NaN when none)."""
    copies = [as_float(r["gbps"]) for r in rows if r["provider"] == COPY]
    return copies[-1] if copies else math.nan


def geomean(values: list[float]) -> float:
    good = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in good) / len(good)) if good else math.nan


def speedups(rows: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """Per (mode, dtype, layout): one entry per shape with tritonbn's speedup over each baseline.

    Speedup = baseline p50 / tritonbn p50 (above 1 is tritonbn faster); NaN where a
    provider has no timing.
    """
    table = latest(rows)
    out: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for (device, provider, mode, dtype, layout, shape_name), row in table.items():
        if provider != "tritonbn":
            continue
        ours = as_float(row["ms_p50"])

        def other(name: str) -> float:
            base = table.get((device, name, mode, dtype, layout, shape_name))
            return as_float(base["ms_p50"]) / ours if base and ours > 0 else math.nan

        out[(mode, dtype, layout)].append({
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


def summary_lines(rows: list[dict]) -> list[str]:
    """The summary table: geomean speedups per mode/dtype/layout, the worst shape, the targets."""
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
    def rank(values: tuple[str, ...], value: str) -> int:
        return values.index(value) if value in values else len(values)

    for key in sorted(table, key=lambda k: (rank(MODES, k[0]), rank(DTYPES, k[1]), rank(LAYOUTS, k[2]))):
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
        # Only when all 53 layers were measured (a run cut short by its time budget has fewer).
        rn50 = [e for e in entries if e["shape_name"].startswith("rn50-")]
        eager_total = sum(e["layers"] * e["eager_ms"] for e in rn50)
        ours_total = sum(e["layers"] * e["ms"] for e in rn50)
        complete = sum(e["layers"] for e in rn50) == RESNET50_BN_LAYERS
        rn50_speedup = eager_total / ours_total if complete and ours_total > 0 else math.nan
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
    return lines
