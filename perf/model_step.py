"""Model-level benchmark: one training step of torchvision's ResNet-50, torch's BatchNorm against tritonbn's.

Usage::

    python -m perf.model_step [--batches 32 128] [--precisions float32 bfloat16] [--variants ...]
                              [--budget S] [--csv PATH] [--resume]

What a step is: ``zero_grad(set_to_none=True)``, forward, cross-entropy loss, backward and
``SGD(lr=0.01, momentum=0.9).step()``: the optimizer step is inside every timed step, eager,
compiled and CUDA-graph alike. Inputs are random 224x224 images and random labels of 1000
classes, one fixed batch per (batch size, precision), the same for every variant (a step moves
gigabytes of activations, far past L2, so rotating input batches would change nothing).

Cases, in the order they run (the most important first, so a run cut short by its time budget
still has them): per batch size (32, then 128), eager before ``torch.compile``, bfloat16
before float32, and torch's model, ``tritonbn.convert_model`` and ``tritonbn.fuse_model``
(applied after ``convert_model``, so that the BatchNorms it does not fuse, ResNet's 4
downsample ones, are tritonbn's too) side by side; the CUDA-graph cases last.

* precision ``float32``: NCHW model and input, torch's defaults (cuDNN convolutions may use
  TF32, ``torch.backends.cudnn.allow_tf32``; recorded in the backend column);
* precision ``bfloat16``: ``torch.autocast("cuda", torch.bfloat16)``, model and input in
  channels_last, parameters float32 (as mixed-precision training runs);
* mode ``eager``; ``torch.compile`` (``torch.compile(model)``, default options; loss,
  backward and optimizer step as the user writes them); ``cuda-graph``: the whole eager step
  captured with ``torch.cuda.graph`` as torch's documentation does it (warm-up steps on a side
  stream, ``zero_grad(set_to_none=True)`` before the capture, static input and labels,
  autocast with ``cache_enabled=False``), and each timed step a ``replay()``.

Every variant starts from a deep copy of one initial model (``weights=None``, seed 0). Before
timing, the losses of its first two steps (the first shows the forward, the second the
backward and update of the first) are compared with torch's on the same batch: eager torch's,
or for tritonbn's compiled models torch's compiled one (so that Inductor's own BatchNorm
numerics are not counted against tritonbn). A difference beyond the tolerance (float32 1e-3
relative, bfloat16 5e-2) is flagged in the row's ``check`` column, never hidden. At ResNet-50's
sizes the check is well conditioned (1568 values per channel in the last stage at batch 32);
at the debug path's toy sizes (a few values per channel) BatchNorm's backward is rounding
noise times a large 1/std, so the second loss may differ there without any bug.

Timing (perf notes, "Method"; the workplace's METHOD.md): warm-up steps first (tritonbn's
autotuning, cuDNN's plans, the allocator; for ``torch.compile`` the first step, compile
included, is recorded as ``compile_s``), then N steps back to back with no host
synchronisation between them (as a training loop runs), one CUDA event recorded after each, so
that a step's time is the interval between consecutive events: GPU time when the GPU is the
bottleneck, host launch time when the host is. Median, p20 and p80 of those intervals;
images/s = batch / median. N: about 3 s of steps, at least 20 and at most 200. Peak memory:
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, reset after the warm-up
(eager, compile), or before the capture for a CUDA graph (a replay allocates nothing: its
memory is the graph's private pool, allocated during the capture).

The run stays within a time budget: a case starts only when its estimated cost (``ESTIMATE_S``,
guesses until measured) fits in what is left; the skipped ones are printed. Rows go to a CSV
in the report's long format (``perf/common.py`` COLUMNS, op ``resnet50_step``, provider
torch / tritonbn.convert_model / tritonbn.fuse_model, mode eager / torch.compile / cuda-graph,
ms_p20/ms_p50/ms_p80 the step time) plus the model columns ``MODEL_COLUMNS``, written row by
row; a markdown table (``summary_table``) is printed last.

Without CUDA it prints "model-level benchmark: SKIPPED (needs a CUDA GPU)" and measures
nothing; likewise without torchvision. A hidden ``--device cpu --model resnet18 --image-size
32`` debug path runs the same code on the CPU (Triton's interpreter; with TRITON_INTERPRET=0,
tritonbn's fallback to torch's CPU batch norm, much faster) to prove it works end to end, CUDA
graphs aside: its numbers mean nothing and its rows are labelled so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import gc
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    # Run as `python perf/model_step.py`: make the `perf` package importable.
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from perf import common  # noqa: E402

SKIP_NO_CUDA = "model-level benchmark: SKIPPED (needs a CUDA GPU)"
DEBUG_LABEL = "CPU DEBUG RUN \u2014 not a performance measurement"
MODEL = "resnet50"
BATCHES = (32, 128)
IMAGE_SIZE = 224
NUM_CLASSES = 1000
# Precision -> (dtype column, layout column, what the table says).
PRECISIONS = {
    "bfloat16": ("bfloat16", "channels_last", "bf16 autocast channels_last"),
    "float32": ("float32", "contiguous", "float32 NCHW"),
}
PRECISION_ORDER = ("bfloat16", "float32")  # bf16 channels_last first: what training runs today
PROVIDERS = {"torch": "torch", "convert": "tritonbn.convert_model", "fuse": "tritonbn.fuse_model"}
MODES = {"eager": "eager", "compile": "torch.compile", "graph": "cuda-graph"}
# Every variant is "<model>-<mode>". The issue asks for a CUDA graph of the converted model and
# of torch's; the fused one can be asked for by name.
ALL_VARIANTS = tuple(f"{p}-{m}" for m in MODES for p in PROVIDERS)
DEFAULT_VARIANTS = tuple(v for v in ALL_VARIANTS if v != "fuse-graph")
# Columns beyond common.COLUMNS, last so that a reader by position finds the report's where
# they are. step_ms is ms_p50 (ms_p20, ms_p80 beside it).
MODEL_COLUMNS = ("images_per_s", "peak_mem_mb", "compile_s", "first_step_s", "steps")
CSV_COLUMNS = (*common.COLUMNS, *MODEL_COLUMNS)
LR, MOMENTUM = 0.01, 0.9
CHECK_STEPS = 2
# First two losses against torch's (Runner.reference): float32 differs by BatchNorm's rounding only (the
# convolutions are the same cuDNN calls); bfloat16 by a rounding of every BatchNorm output,
# carried through 50 layers.
LOSS_RTOL = {"float32": 1e-3, "bfloat16": 5e-2}
WARMUP_STEPS = 3  # after the check steps (graphs: on the side stream, before capture)
GRAPH_REPLAY_WARMUP = 3
TARGET_TIMED_S, MIN_STEPS, MAX_STEPS = 3.0, 20, 200
# Seconds a case is expected to take, compile and tuning included: a case starts only if this
# fits in the budget left. Guesses for an H100/H200 until a run measures them (the log prints
# each case's real time).
ESTIMATE_S = {"eager": 20.0, "compile": 100.0, "graph": 25.0}
ESTIMATE_LARGE_BATCH_EXTRA_S = 10.0  # batch >= 128: slower steps, more to tune
DEFAULT_BUDGET_S = 540.0  # one device call (600 s) with room to start and copy out


@dataclass(frozen=True)
class Case:
    """One row: a batch size, a precision, a model variant, a mode."""

    batch: int
    precision: str  # a key of PRECISIONS
    provider: str  # a key of PROVIDERS
    mode: str  # a key of MODES

    @property
    def dtype(self) -> str:
        return PRECISIONS[self.precision][0]

    @property
    def layout(self) -> str:
        return PRECISIONS[self.precision][1]

    @property
    def name(self) -> str:
        return f"b{self.batch} {self.precision} {self.provider}-{self.mode}"

    def key(self) -> tuple[str, str, str, str, str]:
        """What identifies its row in a CSV: (provider, mode, dtype, layout, batch)."""
        return PROVIDERS[self.provider], MODES[self.mode], self.dtype, self.layout, str(self.batch)


def plan(batches: Sequence[int] = BATCHES, precisions: Iterable[str] = PRECISION_ORDER,
         variants: Iterable[str] = DEFAULT_VARIANTS) -> list[Case]:
    """The cases in the order they run: per batch, eager then compile (bf16 then float32, torch
    then convert then fuse); the CUDA graphs of every batch last."""
    wanted = set(variants)
    unknown = wanted - set(ALL_VARIANTS)
    if unknown:
        raise ValueError(f"unknown variant(s) {sorted(unknown)}; known: {', '.join(ALL_VARIANTS)}")
    precs = [p for p in PRECISION_ORDER if p in set(precisions)]
    cases = []
    for batch in batches:
        for mode in ("eager", "compile"):
            for precision in precs:
                cases += [Case(batch, precision, p, mode) for p in PROVIDERS if f"{p}-{mode}" in wanted]
    for batch in batches:
        for precision in precs:
            cases += [Case(batch, precision, p, "graph") for p in PROVIDERS if f"{p}-graph" in wanted]
    return cases


def estimate_s(case: Case) -> float:
    return ESTIMATE_S[case.mode] + (ESTIMATE_LARGE_BATCH_EXTRA_S if case.batch >= 128 else 0.0)


# ----------------------------------------------------------------------------------------------
# environment and rows
# ----------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, str]:
    """The fields every row records: card, driver, CUDA, torch, triton, date, label."""
    import triton

    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if device.type == "cuda":
        from perf.report import driver_version  # the report's helper: nvidia-smi, else NVML

        return {"device": torch.cuda.get_device_name(device), "driver": driver_version(),
                "cuda": str(torch.version.cuda), "torch": torch.__version__, "triton": triton.__version__,
                "date": date, "label": common.MEASUREMENT_LABEL}
    import tritonbn

    # The debug path: Triton's interpreter when TRITON_INTERPRET=1 was set before tritonbn was
    # imported (main() does), else tritonbn's CPU fallback to torch's own batch norm.
    backend = tritonbn.backend_for(torch.empty(0))
    return {"device": f"cpu-debug-{backend}", "driver": "n/a", "cuda": "n/a", "torch": torch.__version__,
            "triton": triton.__version__, "date": date, "label": DEBUG_LABEL}


@dataclass
class Measured:
    """What a case produced; NaN (written empty) where it does not apply or was not reached."""

    ms: tuple[float, float, float] = (math.nan, math.nan, math.nan)  # p20, p50, p80
    peak_mem_mb: float = math.nan
    compile_s: float = math.nan
    first_step_s: float = math.nan
    steps: int = 0
    loss_diff: float = math.nan  # max |loss - torch's loss| over the check steps (Runner.reference)
    check: str = ""
    backend: str = ""
    bn_modules: str = ""  # which BatchNorm classes the model ran, and how many
    bn_count: int = 0


def _num(value: float, spec: str) -> str:
    return format(value, spec) if math.isfinite(value) else ""


def make_row(case: Case, measured: Measured, env: dict[str, str], model: str = MODEL,
             image_size: int = IMAGE_SIZE) -> dict[str, str]:
    """A CSV row (CSV_COLUMNS) of one case. Also the hook the tests feed fabricated values to."""
    p20, p50, p80 = measured.ms
    images = case.batch / (p50 * 1e-3) if math.isfinite(p50) and p50 > 0 else math.nan
    row = {c: "" for c in CSV_COLUMNS}
    row.update(env)
    row.update(
        op=f"{model}_step", provider=PROVIDERS[case.provider], mode=MODES[case.mode], dtype=case.dtype,
        layout=case.layout, shape=f"{case.batch}x3x{image_size}x{image_size}", shape_name=f"{model}-b{case.batch}",
        layers=str(measured.bn_count) if measured.bn_count else "", backend=measured.backend,
        route=measured.bn_modules, ms_p20=_num(p20, ".4f"), ms_p50=_num(p50, ".4f"), ms_p80=_num(p80, ".4f"),
        max_abs_err=_num(measured.loss_diff, ".3e"), check=measured.check,
        images_per_s=_num(images, ".1f"), peak_mem_mb=_num(measured.peak_mem_mb, ".1f"),
        compile_s=_num(measured.compile_s, ".2f"), first_step_s=_num(measured.first_step_s, ".2f"),
        steps=str(measured.steps) if measured.steps else "",
    )
    return row


def write_rows(path: Path, rows: Iterable[dict]) -> None:
    """Append rows to the CSV at path, writing the header first when the file is new (or has
    another header: then it is rewritten in CSV_COLUMNS, as the report does)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
        if header != list(CSV_COLUMNS):
            old = read_rows(path) if header else []
            with open(path, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, CSV_COLUMNS, restval="", extrasaction="ignore")
                writer.writeheader()
                writer.writerows(old)
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, CSV_COLUMNS).writeheader()
    with open(path, "a", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, CSV_COLUMNS, restval="", extrasaction="ignore").writerows(rows)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _row_key(row: dict) -> tuple:
    batch = row["shape"].split("x")[0]
    return row["device"], row["op"], row["provider"], row["mode"], row["dtype"], row["layout"], batch


def _precision_title(row: dict) -> str:
    for dtype, layout, title in PRECISIONS.values():
        if (row["dtype"], row["layout"]) == (dtype, layout):
            return title
    return f"{row['dtype']} {row['layout']}"


def summary_table(rows: Iterable[dict]) -> str:
    """A markdown table of the rows: the latest row of each case (a resumed CSV appends), in
    plan order, with each row's speedup over torch's model in the same batch, precision and mode."""
    latest: dict[tuple, dict] = {}
    for row in rows:
        latest[_row_key(row)] = row
    if not latest:
        return "model-level benchmark: no rows"
    provider_rank = {label: i for i, label in enumerate(PROVIDERS.values())}
    mode_rank = {label: i for i, label in enumerate(MODES.values())}
    precision_rank = {PRECISIONS[p][:2]: i for i, p in enumerate(PRECISION_ORDER)}

    def order(key: tuple) -> tuple:
        device, op, provider, mode, dtype, layout, batch = key
        return (device, op, mode == "cuda-graph", int(batch) if batch.isdigit() else 0, mode_rank.get(mode, 9),
                precision_rank.get((dtype, layout), 9), provider_rank.get(provider, 9))

    first = next(iter(latest.values()))
    devices = sorted({r["device"] for r in latest.values()})
    lines = [
        f"### Model-level: {first['op']} (SGD momentum {MOMENTUM}, optimizer step inside every timed step), "
        f"{', '.join(devices)}, torch {first['torch']}, triton {first['triton']}",
    ]
    for label in sorted({r["label"] for r in latest.values()} - {common.MEASUREMENT_LABEL, ""}):
        lines.append(f"**{label}**")
    lines += [
        "",
        "| batch | precision | mode | model | step ms (p50) | p20-p80 ms | images/s | vs torch | peak MiB "
        "| compile s | check |",
        "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for key in sorted(latest, key=order):
        row = latest[key]
        device, op, provider, mode, dtype, layout, batch = key
        base = latest.get((device, op, PROVIDERS["torch"], mode, dtype, layout, batch))
        ours, theirs = common.as_float(row["ms_p50"]), common.as_float(base["ms_p50"]) if base else math.nan
        vs = f"{theirs / ours:.2f}x" if ours > 0 and math.isfinite(theirs) else "-"
        spread = (f"{common.as_float(row['ms_p20']):.2f}-{common.as_float(row['ms_p80']):.2f}"
                  if row["ms_p20"] and row["ms_p80"] else "-")

        def cell(name: str) -> str:
            return (row.get(name) or "-").replace("|", "\\|")  # an error message must not split the row

        step = f"{ours:.2f}" if math.isfinite(ours) else "-"
        lines.append(f"| {batch} | {_precision_title(row)} | {mode} | {provider} | {step} | {spread} "
                     f"| {cell('images_per_s')} | {vs} | {cell('peak_mem_mb')} | {cell('compile_s')} "
                     f"| {cell('check')} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# models and steps
# ----------------------------------------------------------------------------------------------


def build_base_model(model: str, seed: int = 0) -> torch.nn.Module:
    """torchvision's model with random weights (nothing is downloaded), on the CPU: each case
    deep-copies it, so every variant starts from the same weights."""
    import torchvision

    torch.manual_seed(seed)
    return getattr(torchvision.models, model)(weights=None, num_classes=NUM_CLASSES)


def build_variant(base: torch.nn.Module, case: Case, device: torch.device) -> torch.nn.Module:
    import tritonbn

    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    net = copy.deepcopy(base).to(device=device, memory_format=fmt).train()
    if case.provider in ("convert", "fuse"):
        net = tritonbn.convert_model(net)
    if case.provider == "fuse":
        # After convert_model: the BatchNorms fuse_model leaves plain (downsample) are tritonbn's too.
        net = tritonbn.fuse_model(net)
    return net


def bn_inventory(net: torch.nn.Module) -> tuple[int, str]:
    """How many BatchNorm modules run, and of which classes ("torch.BatchNorm2d x53")."""
    counts: dict[str, int] = {}
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            name = f"{type(module).__module__.split('.')[0]}.{type(module).__name__}"
            counts[name] = counts.get(name, 0) + 1
    return sum(counts.values()), " + ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def make_inputs(case: Case, device: torch.device, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One random batch and its labels, drawn from a seed of the batch size: every variant and
    precision of a batch size sees the same numbers (never zeros: METHOD.md)."""
    gen = torch.Generator().manual_seed(1000 + case.batch)
    x = torch.randn(case.batch, 3, image_size, image_size, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (case.batch,), generator=gen)
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    return x.to(device).contiguous(memory_format=fmt), y.to(device)


def make_step(call: Callable, net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              case: Case, device: torch.device, autocast_cache: bool = True) -> Callable[[], torch.Tensor]:
    """One training step as a user writes it; returns the loss (a tensor: reading it syncs)."""

    def autocast():
        if case.dtype == "bfloat16":
            # A graph capture needs cache_enabled=False (torch.cuda.graphs docs); eager and
            # compile keep autocast's default, as users run it.
            return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=autocast_cache)
        return contextlib.nullcontext()

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = torch.nn.functional.cross_entropy(call(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def timed_steps(fn: Callable[[], object], n: int, device: torch.device) -> tuple[list[float], float]:
    """Per-step milliseconds of n back-to-back calls, and the host wall clock per step.

    CUDA: an event after each step, none synchronised inside the loop (the host may run ahead,
    as in training), so step i is the interval between events i and i+1. CPU (debug path
    only): the host clock around each call.
    """
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        _sync(device)
        start = time.perf_counter()
        events[0].record()
        for i in range(n):
            fn()
            events[i + 1].record()
        torch.cuda.synchronize(device)
        wall = (time.perf_counter() - start) * 1e3 / n
        return [events[i].elapsed_time(events[i + 1]) for i in range(n)], wall
    times = []
    for _ in range(n):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    return times, sum(times) / n


def steps_for(step_ms: float, fixed: int | None) -> int:
    """How many steps to time: fixed if given, else about TARGET_TIMED_S of them within bounds."""
    if fixed:
        return fixed
    if not math.isfinite(step_ms) or step_ms <= 0:
        return MIN_STEPS
    return max(MIN_STEPS, min(MAX_STEPS, math.ceil(TARGET_TIMED_S * 1e3 / step_ms)))


def _wall_of(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call, synchronised on both sides."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def judge_losses(losses: list[float], reference: list[float] | None, case: Case) -> tuple[float, str]:
    """(max abs difference, verdict) of a variant's first losses against eager torch's."""
    if any(not math.isfinite(v) for v in losses):
        return math.nan, f"MISMATCH: non-finite loss {losses}"
    if reference is None:
        return math.nan, "no reference"
    diffs = [abs(a - b) for a, b in zip(losses, reference)]
    rtol = LOSS_RTOL[case.dtype]
    ok = all(d <= rtol * abs(b) for d, b in zip(diffs, reference))
    text = "ok" if ok else (f"MISMATCH: loss {', '.join(f'{v:.5g}' for v in losses)} vs torch "
                            f"{', '.join(f'{v:.5g}' for v in reference)} (rtol {rtol:g})")
    return max(diffs), text


def _backend(case: Case, device: torch.device) -> str:
    """What the rows' convolutions and step ran as, beyond the BatchNorms."""
    if device.type != "cuda":
        conv = "cpu"
    elif case.dtype == "float32":
        conv = f"cudnn tf32={'on' if torch.backends.cudnn.allow_tf32 else 'off'}"
    else:
        conv = "cudnn bf16 autocast"
    autotune = "off" if os.environ.get("TRITONBN_AUTOTUNE", "1") == "0" else "on"
    extra = f"; tritonbn autotune {autotune}" if case.provider != "torch" else ""
    return f"{conv}; SGD(momentum={MOMENTUM}) in step{extra}"


class Runner:
    """Runs cases on one device; keeps eager torch's first losses per (batch, precision)."""

    def __init__(self, device: torch.device, model: str, image_size: int, steps: int | None,
                 log: Callable[[str], None]):
        self.device = device
        self.model = model
        self.image_size = image_size
        self.steps = steps
        self.log = log
        self.base = build_base_model(model)
        # (batch, precision, mode) -> torch's first CHECK_STEPS losses in that mode.
        self.references: dict[tuple[int, str, str], list[float]] = {}

    def reference(self, case: Case) -> list[float] | None:
        """The losses a case is checked against; None for eager torch, which is the reference.

        tritonbn's compiled models are checked against torch's compiled model when that ran
        (it runs first): Inductor's own BatchNorm numerics (no bfloat16 rounding between
        BatchNorm and ReLU) must not count against tritonbn. Everything else, torch's compiled
        model included, against eager torch (a graph's checked steps are eager warm-up steps).
        """
        if (case.provider, case.mode) == ("torch", "eager"):
            return None
        if case.mode == "compile" and case.provider != "torch":
            same_mode = self.references.get((case.batch, case.precision, "compile"))
            if same_mode is not None:
                return same_mode
        key = (case.batch, case.precision, "eager")
        if key not in self.references:
            ref_case = Case(case.batch, case.precision, "torch", "eager")
            net = build_variant(self.base, ref_case, self.device)
            opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
            x, y = make_inputs(ref_case, self.device, self.image_size)
            step = make_step(net, net, opt, x, y, ref_case, self.device)
            self.references[key] = [step().item() for _ in range(CHECK_STEPS)]
            del net, opt, x, y, step
            _free(self.device)
        return self.references[key]

    def run_case(self, case: Case) -> Measured:
        measured = Measured(backend=_backend(case, self.device))
        reference = self.reference(case)
        net = build_variant(self.base, case, self.device)
        measured.bn_count, measured.bn_modules = bn_inventory(net)
        opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
        x, y = make_inputs(case, self.device, self.image_size)
        if case.mode == "graph":
            return self._graph_case(case, measured, net, opt, x, y, reference)
        if case.mode == "compile":
            torch._dynamo.reset()  # a fresh compile per case: no cache from the previous variant
            call = torch.compile(net)
        else:
            call = net
        step = make_step(call, net, opt, x, y, case, self.device)

        # The check steps are also the first warm-up steps; the first one's wall time is the
        # one-off cost (compile, tritonbn's autotuning of new shapes, cuDNN's plans).
        losses = []
        for i in range(CHECK_STEPS):
            _sync(self.device)
            start = time.perf_counter()
            losses.append(step().item())
            if i == 0:
                measured.first_step_s = time.perf_counter() - start
        if case.mode == "compile":
            measured.compile_s = measured.first_step_s
        self._judge(case, measured, losses, reference)
        for _ in range(WARMUP_STEPS - 1):
            step()
        estimate_ms = _wall_of(step, self.device) * 1e3
        _reset_peak(self.device)
        self._time(case, measured, step, estimate_ms)
        return measured

    def _judge(self, case: Case, measured: Measured, losses: list[float], reference: list[float] | None) -> None:
        if reference is None:  # eager torch: the reference of its batch and precision
            measured.loss_diff, measured.check = 0.0, "reference"
            if any(not math.isfinite(v) for v in losses):
                measured.check = f"MISMATCH: non-finite loss {losses}"
        else:
            measured.loss_diff, measured.check = judge_losses(losses, reference, case)
        if case.provider == "torch" and case.mode != "graph":
            self.references[(case.batch, case.precision, case.mode)] = losses
        self.log(f"check {case.name}: losses {', '.join(f'{v:.6g}' for v in losses)} -> {measured.check}")

    def _time(self, case: Case, measured: Measured, fn: Callable[[], object], estimate_ms: float) -> None:
        n = steps_for(estimate_ms, self.steps)
        times, wall = timed_steps(fn, n, self.device)
        measured.ms = (_percentile(times, 0.2), _percentile(times, 0.5), _percentile(times, 0.8))
        measured.steps = n
        measured.peak_mem_mb = _peak_mb(self.device)
        # The host clock over the whole loop, as a cross-check of the events (printed only).
        self.log(f"{case.name}: {n} steps, median {measured.ms[1]:.3f} ms (p20 {measured.ms[0]:.3f}, "
                 f"p80 {measured.ms[2]:.3f}; host clock {wall:.3f} ms/step), peak {measured.peak_mem_mb:.0f} MiB")

    def _graph_case(self, case: Case, measured: Measured, net: torch.nn.Module, opt: torch.optim.Optimizer,
                    x: torch.Tensor, y: torch.Tensor, reference: list[float] | None) -> Measured:
        """The whole eager step in one CUDA graph, following torch.cuda.graphs' documentation."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        # x and y are the static input and labels: a real loop would copy each batch into them.
        step = make_step(net, net, opt, x, y, case, self.device, autocast_cache=False)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        losses = []
        _sync(self.device)  # the model's copy to the device is not the first step's time
        with torch.cuda.stream(side):
            # Warm-up outside the capture: tritonbn's autotuning (it synchronises, which a
            # capture forbids), cuDNN's plans, SGD's momentum buffers (created on the first step).
            for i in range(CHECK_STEPS + WARMUP_STEPS):
                start = time.perf_counter()
                loss = step()
                if i < CHECK_STEPS:
                    losses.append(loss.item())
                if i == 0:
                    measured.first_step_s = time.perf_counter() - start
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._judge(case, measured, losses, reference)

        graph = torch.cuda.CUDAGraph()
        # Gradients set to None before the capture: backward inside it allocates them from the
        # graph's private pool, and each replay overwrites them (torch's documented recipe).
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(self.device)
        _reset_peak(self.device)  # the capture allocates the step's memory; a replay nothing
        with torch.cuda.graph(graph):
            static_loss = step()
        for _ in range(GRAPH_REPLAY_WARMUP):
            graph.replay()
        estimate_ms = _wall_of(graph.replay, self.device) * 1e3
        self._time(case, measured, graph.replay, estimate_ms)
        final = static_loss.item()
        if not math.isfinite(final):
            measured.check = f"MISMATCH: non-finite loss after the replays ({final})"
        del graph, static_loss
        return measured


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


def torchvision_missing() -> str | None:
    """Why torchvision cannot be imported, or None when it can."""
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install (operator registration errors)
        return f"{type(exc).__name__}: {exc}"
    return None


def run(time_budget_s: float, out_csv: Path | None, batches: Sequence[int] = BATCHES,
        variants: Iterable[str] = DEFAULT_VARIANTS, precisions: Iterable[str] = PRECISION_ORDER,
        device: str | None = None, model: str = MODEL, image_size: int = IMAGE_SIZE, steps: int | None = None,
        resume: bool = False, env: dict[str, str] | None = None,
        log: Callable[[str], None] | None = None) -> list[dict]:
    """Measure the cases within time_budget_s seconds; return their rows (CSV_COLUMNS).

    Rows are appended to out_csv as they are measured (when given). device None means CUDA;
    "cpu" is the debug path. Without CUDA (device None) or without torchvision, prints why
    and returns no rows. env: the row fields of environment() (the report passes its own).
    resume: skip the cases out_csv already holds for this device.
    """
    start = time.monotonic()

    def say(text: str) -> None:
        if log is None:
            print(text, flush=True)
        else:
            log(text)

    if device is None:
        if not torch.cuda.is_available():
            say(SKIP_NO_CUDA)
            return []
        device = "cuda"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    missing = torchvision_missing()
    if missing:
        say(f"model-level benchmark: SKIPPED (torchvision is not importable: {missing})")
        return []
    cases = plan(batches, precisions, variants)
    if dev.type != "cuda":
        dropped = [c.name for c in cases if c.mode == "graph"]
        cases = [c for c in cases if c.mode != "graph"]
        if dropped:
            say(f"model-level benchmark: CUDA-graph cases need CUDA, not run: {', '.join(dropped)}")
    env = env or environment(dev)
    if resume and out_csv is not None and out_csv.exists():
        done = {_row_key(r) for r in read_rows(out_csv) if r.get("ms_p50")}
        kept = [c for c in cases if (env["device"], f"{model}_step", *c.key()) not in done]
        if len(kept) < len(cases):
            say(f"model-level benchmark: {len(cases) - len(kept)} case(s) already in {out_csv} (--resume), skipped")
        cases = kept
    if not cases:
        say("model-level benchmark: nothing to run")
        return []
    budget_text = "no time limit" if math.isinf(time_budget_s) else f"budget {max(time_budget_s, 0.0):.0f} s"
    say(f"model-level benchmark: {model} training step on {env['device']}, {len(cases)} case(s), {budget_text}")

    rows: list[dict] = []
    skipped: list[str] = []
    runner: Runner | None = None
    for case in cases:
        left = time_budget_s - (time.monotonic() - start)
        if left < estimate_s(case):
            skipped.append(case.name)
            continue
        case_start = time.monotonic()
        try:
            if runner is None:
                runner = Runner(dev, model, image_size, steps, say)
            measured = runner.run_case(case)
        except Exception as exc:  # one broken case (an OOM, a compile error) must not lose the others
            say(f"ERROR in {case.name}:\n{traceback.format_exc()}")
            measured = Measured(backend=_backend(case, dev), check=f"error: {type(exc).__name__}: {exc}"[:200])
        finally:
            torch._dynamo.reset()  # drop the compiled graphs of this case with its model
            _free(dev)
        row = make_row(case, measured, env, model, image_size)
        rows.append(row)
        if out_csv is not None:
            write_rows(out_csv, [row])
        say(f"[{time.monotonic() - start:6.1f}s] {case.name}: {row['ms_p50'] or '-'} ms/step, "
            f"{row['images_per_s'] or '-'} images/s, check {row['check']} ({time.monotonic() - case_start:.1f} s)")
    if skipped:
        say(f"model-level benchmark: time budget ({budget_text}) spent: {len(skipped)} case(s) not run "
            f"(python -m perf.model_step --resume adds them): {', '.join(skipped)}")
    return rows


def report_section(env, args: argparse.Namespace, elapsed_s: float, out_dir: Path, issues: list[str]) -> list[str]:
    """The report's hook (perf/report.py, at the end): run the benchmark or say why not, and
    return the lines to append to its summary.

    env is the report's RunEnv; args its options (model_step: None = on with CUDA;
    time_budget: 0 = no limit; resume). Loss mismatches and errors are added to issues.
    """
    wanted = env.cuda if args.model_step is None else args.model_step
    if not env.cuda:
        line = SKIP_NO_CUDA
        print(line)
        return ["", line]
    if not wanted:
        line = "model-level benchmark: not run (--no-model-step; python -m perf.model_step runs it alone)"
        print(line)
        return ["", line]
    budget = args.time_budget - elapsed_s if args.time_budget else math.inf
    out_csv = out_dir / "model_step.csv"
    fields = {"device": env.device_name, "driver": env.driver, "cuda": env.cuda_version, "torch": env.torch_version,
              "triton": env.triton_version, "date": env.date, "label": env.label}
    notes: list[str] = []

    def log(text: str) -> None:
        print(text, flush=True)
        if text.startswith("model-level benchmark:"):  # what was skipped and why: the summary says it too
            notes.append(text)

    print()
    rows = run(budget, out_csv, env=fields, resume=args.resume, log=log)
    for row in rows:
        if row["check"] not in ("ok", "reference"):
            issues.append(f"model step {row['shape_name']} {row['dtype']} {row['layout']} {row['provider']} "
                          f"{row['mode']}: {row['check']}")
    table = saved_section(out_dir, env.device_name) or (["", summary_table(rows)] if rows else [])
    return ["", *notes, *table]


def saved_section(out_dir: Path, device_name: str | None = None) -> list[str]:
    """Summary lines of the model_step.csv in out_dir (for the report's --summarize too); [] if none."""
    path = out_dir / "model_step.csv"
    if not path.exists():
        return []
    rows = [r for r in read_rows(path) if device_name is None or r["device"] == device_name]
    return ["", summary_table(rows)] if rows else []


def default_csv() -> Path:
    from perf.report import GPU_RESULTS_DIR, card_slug

    return GPU_RESULTS_DIR / card_slug(torch.cuda.get_device_name()) / "model_step.csv"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--precisions", nargs="+", choices=PRECISION_ORDER, default=list(PRECISION_ORDER),
                        help="bfloat16: autocast + channels_last; float32: NCHW. Default: both")
    parser.add_argument("--variants", nargs="+", choices=ALL_VARIANTS, default=list(DEFAULT_VARIANTS),
                        metavar="VARIANT",
                        help=f"<model>-<mode> of {', '.join(ALL_VARIANTS)}; default: all but fuse-graph")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="S",
                        help="start no case that is not expected to finish within S seconds of the start "
                        f"(default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--csv", type=Path, default=None,
                        help="CSV to append rows to (default on a GPU: perf/results/<card-slug>/model_step.csv)")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    parser.add_argument("--resume", action="store_true", help="skip the cases the CSV already holds")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed steps per case (default: about {TARGET_TIMED_S:.0f} s of steps, "
                        f"{MIN_STEPS} to {MAX_STEPS})")
    # The CPU debug path: proves the code runs end to end without a GPU; not a measurement.
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=MODEL, help=argparse.SUPPRESS)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device is not None and torch.device(args.device).type == "cpu":
        # tritonbn's kernels run on the CPU only in Triton's interpreter, read at import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(min(torch.get_num_threads(), 2))  # a small shared CPU
    elif args.device is None and not torch.cuda.is_available():
        print(SKIP_NO_CUDA)
        return 0
    out_csv = None
    if not args.no_csv:
        out_csv = args.csv or (default_csv() if torch.device(args.device or "cuda").type == "cuda" else None)
    rows = run(args.budget, out_csv, batches=args.batches, variants=args.variants, precisions=args.precisions,
               device=args.device, model=args.model, image_size=args.image_size, steps=args.steps,
               resume=args.resume)
    if out_csv is not None and out_csv.exists():
        device_names = {r["device"] for r in rows}
        table_rows = [r for r in read_rows(out_csv) if not device_names or r["device"] in device_names]
        print(f"\nwrote {out_csv}")
    else:
        table_rows = rows
    if table_rows:
        print()
        print(summary_table(table_rows))
    bad = [r for r in rows if r["check"] not in ("ok", "reference")]
    return 3 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
