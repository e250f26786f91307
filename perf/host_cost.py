"""Host cost: CPU time per step of tritonbn's modules beside torch's own, and launches per op.

A kernel only helps if the host keeps the GPU fed: this measures the Python (and C++) time a
step spends before its kernels are queued. Per case it prints microseconds of CPU time per
step for tritonbn and for torch's module, their ratio, and tritonbn's kernel launches in
forward and in backward.

* On a GPU, tensors are tiny, so the GPU idles and a step's CPU time is host time.
* On a CPU-only machine, tritonbn runs Triton's real launch path (binding, specialisation,
  kernel cache, our launch plans) against perf/mock_driver.py: kernels compile for sm_90,
  launches do nothing. torch's module runs its own CPU kernel on a tiny tensor of the same
  layout (so its time includes a little real arithmetic: in its favour). The output says
  what is stubbed.

Method: time.process_time_ns (CPU time of this process, one intra-op thread), the two
sides interleaved round-robin, ``steps`` steps per round and side, medians over rounds.
These machines are shared and noisy: medians of interleaved rounds keep a busy neighbour
from favouring one side.

    python -m perf.host_cost [--rounds R] [--steps K] [--csv PATH] [--cases SUBSTRING ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

ON_GPU = torch.cuda.is_available()
if not ON_GPU and os.environ.get("TRITON_INTERPRET", "0") != "1":
    # Before tritonbn is imported: its backend choice is made at import.
    from perf import mock_driver

    mock_driver.install()
    # Tuned configs go to a private directory: the mock's tuning is not a measurement.
    os.environ.setdefault("TRITONBN_CACHE_DIR", tempfile.mkdtemp(prefix="tritonbn-mock-tuning-"))

import tritonbn  # noqa: E402
from tritonbn import _launch  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
# Budgets from the host-cost issue (#10): tritonbn / torch CPU time per step.
TARGETS = {"train-one-launch": 1.0, "train-split": 1.3, "eval": 1.5}
# Launch budgets: forward, backward.
LAUNCH_TARGETS = {"one-launch": (1, 1), "split": (3, 3)}


@dataclass
class Side:
    """One side of a case: a module and what its step feeds it."""

    module: torch.nn.Module
    x: torch.Tensor
    grad: torch.Tensor | None = None  # train: the output gradient
    residual: torch.Tensor | None = None

    def forward(self) -> torch.Tensor:
        return self.module(self.x) if self.residual is None else self.module(self.x, self.residual)

    def step(self) -> None:
        if self.grad is None:
            with torch.no_grad():
                self.forward()
            return
        # x stands for a conv's output, whose gradient flows on: it is not accumulated. (A leaf
        # x would add dx into x.grad, a real CPU add on tritonbn's larger mock-driver input.)
        self.x.grad = None
        if self.residual is not None:
            self.residual.grad = None
        self.forward().backward(self.grad)


@dataclass
class Case:
    name: str
    route: str  # "one-launch" or "split" (BatchNorm), "group-norm"
    make: Callable[[], tuple[Side, Side]]  # (tritonbn, torch)
    target: float | None  # None: no budget set (GroupNorm: reported, not judged)


def _shapes(route: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(tritonbn's shape, torch's shape). tritonbn's picks the route (the split heuristic needs
    long channels: the smallest input that takes the split route in both layouts, as a CPU
    allocation of a megabyte can cost page faults that a GPU's caching allocator never has);
    torch's is tiny, as only its host cost is wanted."""
    return ((2, 8, 4, 4), (2, 8, 4, 4)) if route == "one-launch" else ((2, 2, 128, 160), (2, 2, 4, 4))


def _input(shape, layout: str, requires_grad: bool) -> torch.Tensor:
    x = torch.randn(shape, device=DEVICE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def _side(module, shape, layout: str, train: bool, residual: bool = False) -> Side:
    module = module.to(DEVICE).train(train)
    x = _input(shape, layout, train)
    return Side(module, x, torch.randn_like(x) if train else None,
                _input(shape, layout, train) if residual else None)


class _TorchBnAct(torch.nn.Module):
    """torch's unfused sequence as torchvision writes it: bn, (+= residual), relu in place."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(channels)
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x, residual=None):
        out = self.bn(x)
        if residual is not None:
            out += residual
        return self.relu(out)


def _bn_case(route: str, layout: str, train: bool) -> Case:
    ours_shape, torch_shape = _shapes(route)

    def make():
        return (_side(tritonbn.BatchNorm2d(ours_shape[1]), ours_shape, layout, train),
                _side(torch.nn.BatchNorm2d(torch_shape[1]), torch_shape, layout, train))

    kind = "train" if train else "eval"
    target = TARGETS[f"train-{route}"] if train else TARGETS["eval"]
    return Case(f"BatchNorm2d {kind} {route} {layout}", route, make, target)


def _fused_case(route: str, residual: bool) -> Case:
    ours_shape, torch_shape = _shapes(route)

    def make():
        return (_side(tritonbn.BatchNormAct2d(ours_shape[1], activation="relu"), ours_shape, "contiguous", True,
                      residual),
                _side(_TorchBnAct(torch_shape[1]), torch_shape, "contiguous", True, residual))

    name = "BN+add+ReLU" if residual else "BN+ReLU"
    return Case(f"{name} train {route} contiguous", route, make, TARGETS[f"train-{route}"])


def _sync_case(route: str) -> Case:
    ours_shape, torch_shape = _shapes(route)

    def make():
        return (_side(tritonbn.SyncBatchNorm(ours_shape[1]), ours_shape, "contiguous", True),
                _side(torch.nn.SyncBatchNorm(torch_shape[1]), torch_shape, "contiguous", True))

    return Case(f"SyncBatchNorm (no group) train {route} contiguous", route, make, TARGETS[f"train-{route}"])


class _TorchGroupNormSiLU(torch.nn.GroupNorm):
    """torch's unfused sequence as diffusers writes it: GroupNorm, then SiLU."""

    def forward(self, x):
        return torch.nn.functional.silu(super().forward(x))


def _group_norm_case(fused: bool) -> Case:
    shape = (2, 8, 4, 4)

    def make():
        if fused:
            return (_side(tritonbn.GroupNormAct(4, shape[1], activation="silu"), shape, "contiguous", True),
                    _side(_TorchGroupNormSiLU(4, shape[1]), shape, "contiguous", True))
        return (_side(tritonbn.GroupNorm(4, shape[1]), shape, "contiguous", True),
                _side(torch.nn.GroupNorm(4, shape[1]), shape, "contiguous", True))

    return Case(f"{'GN+SiLU' if fused else 'GroupNorm'} train contiguous", "group-norm", make, None)


def cases() -> list[Case]:
    out = []
    for route in ("one-launch", "split"):
        for layout in ("contiguous", "channels_last"):
            for train in (True, False):
                out.append(_bn_case(route, layout, train))
    for route in ("one-launch", "split"):
        out.append(_fused_case(route, False))
        out.append(_fused_case(route, True))
    out.append(_sync_case("one-launch"))
    if hasattr(tritonbn, "GroupNorm"):
        out += [_group_norm_case(False), _group_norm_case(True)]
    return out


def _cpu_us_per_step(step: Callable[[], None], steps: int) -> float:
    start = time.process_time_ns()
    for _ in range(steps):
        step()
    if ON_GPU:
        torch.cuda.synchronize()
    return (time.process_time_ns() - start) / steps / 1e3


def _launches(fn: Callable[[], object]) -> int:
    before = _launch.launch_count
    fn()
    return _launch.launch_count - before


def measure(case: Case, rounds: int, steps: int) -> dict:
    ours, theirs = case.make()
    for _ in range(3):  # warm-up: compile, tune, build plans, allocator caches
        ours.step()
        theirs.step()
    ours_us, theirs_us = [], []
    for _ in range(rounds):
        ours_us.append(_cpu_us_per_step(ours.step, steps))
        theirs_us.append(_cpu_us_per_step(theirs.step, steps))
    train = ours.grad is not None
    with torch.set_grad_enabled(train):
        forward = _launches(ours.forward)
    total = _launches(ours.step)
    ours_median, theirs_median = statistics.median(ours_us), statistics.median(theirs_us)
    return {
        "case": case.name, "tritonbn_us": ours_median, "torch_us": theirs_median,
        "ratio": ours_median / theirs_median, "target": case.target, "train": train,
        "launches_fwd": forward, "launches_bwd": total - forward if train else None,
        "launch_target": LAUNCH_TARGETS.get(case.route),
    }


def environment_line() -> str:
    import platform

    import triton

    where = (f"GPU {torch.cuda.get_device_name()}" if ON_GPU else
             "CPU only, mock Triton driver (stubbed: " + "; ".join(mock_driver.STUBBED) + ")")
    return (f"host cost, {where}; torch {torch.__version__}, triton {triton.__version__}, "
            f"python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")


def table(rows: list[dict]) -> str:
    lines = [
        "| case | tritonbn µs/step | torch µs/step | ratio | target | launches fwd/bwd (max) |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        target, lt = r["target"], r["launch_target"]
        flag = "" if target is None or r["ratio"] <= target else " **over**"
        bwd = "-" if r["launches_bwd"] is None else r["launches_bwd"]
        budget = f" ({lt[0]}/{lt[1]})" if lt else ""
        lines.append(f"| {r['case']} | {r['tritonbn_us']:.1f} | {r['torch_us']:.1f} | {r['ratio']:.2f}{flag} | "
                     f"{'-' if target is None else f'{target:.1f}'} | {r['launches_fwd']}/{bwd}{budget} |")
    return "\n".join(lines)


def run(rounds: int = 21, steps: int = 10, only: list[str] | None = None, out=print) -> list[dict]:
    torch.set_num_threads(1)  # CPU time of one thread on both sides
    rows = []
    for case in cases():
        if only and not any(s in case.name for s in only):
            continue
        rows.append(measure(case, rounds, steps))
        out(f"  {rows[-1]['case']}: {rows[-1]['ratio']:.2f}x")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cases", nargs="*", default=None, help="substrings of case names to run")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the rows as JSON to PATH ('-': as the last line of the output)")
    args = parser.parse_args(argv)
    print(environment_line())
    rows = run(args.rounds, args.steps, args.cases)
    print(table(rows))
    if args.json:
        text = json.dumps({"environment": environment_line(), "rows": rows}) if args.json != "-" else json.dumps(rows)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
