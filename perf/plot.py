"""Draw the perf report's CSV as PNGs (matplotlib, Agg: no display needed).

Usage::

    python perf/plot.py perf/results/<card-slug>/results.csv [--out DIR]

Per mode, two figures with one panel per dtype x layout for BatchNorm, and, in the three
training modes, one more panel per dtype x layout for the fused ops (BN+ReLU and BN+add+ReLU
side by side, against torch's unfused sequence) and one for GroupNorm (GroupNorm and
GN+SiLU side by side, against torch's GroupNorm and GroupNorm then SiLU):

* ``gbps_<mode>.png``: modelled GB/s (perf/common.py: BYTES; the fused ops: FUSED_BYTES, each
  provider scored by its own version's bytes) per shape for each provider, with the measured
  copy bandwidth as the ceiling line;
* ``speedup_<mode>.png``: tritonbn's speedup over eager torch and over torch.compile per
  shape, with the 1.0x line and the 1.5x geomean target; on the fused panels also the bytes
  bound (unfused / fused bytes: the speedup at equal bandwidth).

Eight PNGs in all, however many ops the CSV has: perf/gpu_run.sh packs them into one archive
beside the CSV, within the 8 files a lent GPU machine sends back. A smoke-run CSV gets the
smoke label in every title.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless machines and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

if __package__ in (None, ""):
    # Run as `python perf/plot.py`: make the `perf` package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf import common  # noqa: E402

# Ticks of the log speedup axis: decades for the smoke run's tiny ratios, finer around 1x.
SPEEDUP_TICKS = [1e-4, 1e-3, 1e-2, 0.1, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 4, 6, 8, 16]
PROVIDER_COLORS = {"tritonbn": "tab:orange", "torch": "tab:blue", "torch.compile": "tab:green"}


# Short labels of the fused ops on the shared panels' x axis.
FUSED_LABELS = {"bn_relu": "relu", "bn_add_relu": "add+relu", "group_norm": "gn", "gn_silu": "gn+silu"}
# The panel groups: BatchNorm, the fused BatchNorm ops (both in one), GroupNorm's ops (both in one).
OP_GROUPS = ((common.BATCH_NORM,), common.FUSED_OPS, common.GN_OPS)


def _file_mode(mode: str) -> str:
    return mode.replace("+", "_").replace("-", "_")


def _panels(tables: dict[str, dict], mode: str) -> list[tuple[tuple[str, ...], str, str]]:
    """(ops, dtype, layout) of each panel: BatchNorm's first, then the fused ops', then GroupNorm's."""
    panels = []
    for ops in OP_GROUPS:
        present = {(k[3], k[4]) for op in ops for k in tables[op] if k[2] == mode and k[1] != common.COPY}
        panels += [(ops, d, lay) for d in common.DTYPES for lay in common.LAYOUTS if (d, lay) in present]
    return panels


def _shape_order(rows: list[dict]) -> list[str]:
    seen = []
    for row in rows:
        if row["provider"] != common.COPY and row["shape_name"] not in seen:
            seen.append(row["shape_name"])
    return seen


def _grid(n_panels: int, n_shapes: int):
    cols = 2 if n_panels > 1 else 1
    rows = math.ceil(n_panels / cols)
    width = max(7.0, 0.5 * n_shapes + 2.5) * cols
    fig, axes = plt.subplots(rows, cols, figsize=(width, 4.8 * rows + 1.2), squeeze=False)
    for ax in axes.flat[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _title(fig, text: str, smoke: bool, device: str) -> None:
    if smoke:
        fig.suptitle(f"{common.SMOKE_LABEL}\n{text} ({device})", color="red", fontweight="bold")
    else:
        fig.suptitle(f"{text} ({device})")


def _count(value: str) -> int:
    number = common.as_float(value)
    return int(number) if math.isfinite(number) else 1


def _labels(items: list[tuple[str, str]], layers: dict[tuple[str, str], int]) -> list[str]:
    """Axis labels of (op, shape_name) items: the shape, its layer count, and the fused op's name."""
    labels = []
    for op, name in items:
        label = f"{name} x{layers[(op, name)]}" if layers.get((op, name), 1) > 1 else name
        labels.append(label if op == common.BATCH_NORM else f"{FUSED_LABELS.get(op, op)}: {label}")
    return labels


def _panel_title(ops: tuple[str, ...], mode: str, dtype: str, layout: str) -> str:
    if ops == (common.BATCH_NORM,):
        return f"{mode}, {dtype}, {layout}"
    what = " and ".join(common.OP_TITLES[op] for op in ops)
    if ops == common.GN_OPS:
        return f"{what} vs torch (GroupNorm, then SiLU), {mode}, {dtype}, {layout}"
    return f"fused {what} vs unfused torch, {mode}, {dtype}, {layout}"


def _items(tables: dict[str, dict], ops: tuple[str, ...], order: list[str], mode: str, dtype: str,
           layout: str) -> list[tuple[str, str]]:
    return [(op, n) for op in ops for n in order if any(k[2:] == (mode, dtype, layout, n) for k in tables[op])]


def _row(table: dict, provider: str, mode: str, dtype: str, layout: str, name: str) -> dict | None:
    hits = [r for k, r in table.items() if k[1:] == (provider, mode, dtype, layout, name)]
    return hits[0] if hits else None


def draw(csv_path: Path, out_dir: Path | None = None) -> list[Path]:
    """Write the PNGs for the CSV's (latest) rows; returns their paths."""
    rows = common.read_rows(Path(csv_path))
    out_dir = Path(out_dir or Path(csv_path).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {op: common.latest(rows, op) for op in common.OPS}
    smoke = any(r["device"] == common.SMOKE_DEVICE for r in rows)
    device = ", ".join(sorted({r["device"] for r in rows})) or "no rows"
    bandwidth = common.copy_gbps(rows)
    order = _shape_order(rows)
    layers = {(r["op"], r["shape_name"]): _count(r["layers"]) for r in rows if r["provider"] != common.COPY}
    speedups = {op: common.speedups(rows, op) for op in common.OPS}
    written = []
    for mode in common.MODES:
        panels = _panels(tables, mode)
        if not panels:
            continue
        items = {p: _items(tables, p[0], order, mode, p[1], p[2]) for p in panels}
        widest = max(len(v) for v in items.values())
        others = [common.OP_TITLES[op] for group in OP_GROUPS[1:] if any(p[0] == group for p in panels)
                  for op in group]
        also = f" (and {', '.join(others)})" if others else ""

        # GB/s per shape and provider, against the copy ceiling.
        fig, axes = _grid(len(panels), widest)
        for ax, panel in zip(axes, panels):
            ops, dtype, layout = panel
            names = items[panel]
            providers = [p for p in common.PROVIDERS
                         if any(_row(tables[op], p, mode, dtype, layout, n) for op, n in names)]
            width = 0.8 / max(len(providers), 1)
            for j, provider in enumerate(providers):
                values = []
                for op, n in names:
                    hit = _row(tables[op], provider, mode, dtype, layout, n)
                    values.append(common.as_float(hit["gbps"]) if hit else math.nan)
                xs = [i + (j - (len(providers) - 1) / 2) * width for i in range(len(names))]
                ax.bar(xs, values, width, label=provider, color=PROVIDER_COLORS.get(provider))
            if math.isfinite(bandwidth):
                ax.axhline(bandwidth, color="black", linestyle="--", linewidth=1,
                           label=f"copy {bandwidth:.0f} GB/s")
            ax.set_xticks(range(len(names)), _labels(names, layers), rotation=60, ha="right", fontsize=8)
            if ops == (common.BATCH_NORM,):
                ax.set_ylabel(f"GB/s (model: {common.BYTES[mode]}*E*s / p50)")
            else:
                models = ", ".join(f"{FUSED_LABELS[op]} {common.bytes_units(mode, op, 'tritonbn')}/"
                                   f"{common.bytes_units(mode, op, 'torch')}" for op in ops)
                ax.set_ylabel(f"GB/s (model fused/unfused *E*s: {models})", fontsize=8)
            ax.set_title(_panel_title(ops, mode, dtype, layout), fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)
        _title(fig, f"BatchNorm {mode}{also}: modelled bandwidth per shape", smoke, device)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.9 / fig.get_figheight()))  # room for the suptitle
        path = out_dir / f"gbps_{_file_mode(mode)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

        # tritonbn's speedup over each baseline.
        fig, axes = _grid(len(panels), widest)
        for ax, panel in zip(axes, panels):
            ops, dtype, layout = panel
            entries = []
            for op in ops:
                entries += sorted(speedups[op].get((mode, dtype, layout), []),
                                  key=lambda e: order.index(e["shape_name"]) if e["shape_name"] in order else 0)
            names = [(e["op"], e["shape_name"]) for e in entries]
            for j, (key, label, color) in enumerate((("vs_eager", "vs eager torch", "tab:blue"),
                                                     ("vs_compile", "vs torch.compile", "tab:green"))):
                values = [e[key] for e in entries]
                geo = common.geomean(values)
                xs = [i + (j - 0.5) * 0.4 for i in range(len(names))]
                bars = ax.bar(xs, values, 0.4, color=color,
                              label=f"{label} (geomean {geo:.3g}x)" if math.isfinite(geo) else f"{label} (n/a)")
                ax.bar_label(bars, labels=[f"{v:.2g}" if math.isfinite(v) else "" for v in values],
                             fontsize=6, rotation=90, padding=2)
            bounds = [common.bytes_bound(op, mode) for op, _ in names]
            if ops != (common.BATCH_NORM,) and names:
                # What the bytes alone allow: unfused / fused model, the speedup at equal bandwidth.
                ax.hlines(bounds, [i - 0.45 for i in range(len(names))], [i + 0.45 for i in range(len(names))],
                          colors="dimgray", linestyles="--", linewidth=1.2,
                          label="bytes bound (unfused / fused model)")
            # Ratios: a log axis shows 0.5x and 2x as equally far from parity.
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(SPEEDUP_TICKS))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            # Parity and the target always in view, with room above the bars for their labels.
            shown = [v for e in entries for v in (e["vs_eager"], e["vs_compile"]) if math.isfinite(v) and v > 0]
            if ops != (common.BATCH_NORM,):
                shown += bounds
            target = common.TARGET_FUSED_GEOMEAN_VS_EAGER if ops == common.FUSED_OPS else \
                common.TARGET_GEOMEAN_VS_EAGER
            ax.set_ylim(min(shown + [1.0]) / 1.4, max(shown + [target]) * 1.6)
            ax.axhline(1.0, color="black", linewidth=1)
            ax.axhline(target, color="red", linestyle=":", linewidth=1,
                       label=f"{target}x geomean target vs eager" + (" (unfused)" if ops == common.FUSED_OPS
                                                                     else ""))
            ax.set_xticks(range(len(names)), _labels(names, layers), rotation=60, ha="right", fontsize=8)
            ax.set_ylabel("speedup of tritonbn (baseline p50 / tritonbn p50)")
            ax.set_title(_panel_title(ops, mode, dtype, layout), fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)
        _title(fig, f"BatchNorm {mode}{also}: tritonbn speedup per shape", smoke, device)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.9 / fig.get_figheight()))  # room for the suptitle
        path = out_dir / f"speedup_{_file_mode(mode)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw the perf report's CSV as PNGs.")
    parser.add_argument("csv", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: beside the CSV)")
    args = parser.parse_args(argv)
    for path in draw(args.csv, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
