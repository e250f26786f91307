"""The perf report: tritonbn against eager torch and torch.compile, over the shape suite.

Usage (``perf/run_report.sh`` sets up an environment and runs this)::

    python -m perf.report [--ops ...] [--modes ...] [--dtypes ...] [--layouts ...] [--providers ...]
                          [--shapes SUBSTRING ...] [--time-budget S] [--resume] [--smoke]
                          [--model-step | --no-model-step]

For every shape x dtype x layout it first checks tritonbn against eager torch (max abs error
of y, dx, dweight, dbias, running statistics, eval y; a mismatch is flagged in the CSV and
in the output, and makes the exit status 3), then times each provider in each mode:

* forward-train: module in train mode, forward only (autograd on, as in training);
* backward: autograd.grad of a prebuilt forward graph (retain_graph; no accumulation, so
  no extra add kernel is timed);
* forward+backward: both;
* eval: module in eval mode under no_grad.

Besides BatchNorm alone (op ``batch_norm``), the fused ops ``bn_relu`` and ``bn_add_relu``
(tritonbn's ``BatchNormAct2d``: act(BN(x) + residual) in one kernel) run against torch's
unfused sequence as torchvision writes it (BatchNorm, ``out += residual``, ``relu`` in place),
eager and under torch.compile, on the ResNet-50 shapes where the network has them, in the
three training modes; checked the same way first (y, running statistics, dx, dresidual,
dweight, dbias). Their bytes model is per version (perf/common.py: FUSED_BYTES).

GroupNorm (ops ``group_norm`` and ``gn_silu``, perf/gn_report.py): ``tritonbn.GroupNorm``
against ``torch.nn.GroupNorm``, and ``tritonbn.GroupNormAct`` (GroupNorm + SiLU in one kernel)
against torch's GroupNorm then ``F.silu``, eager and under torch.compile, on Stable Diffusion
UNet and VAE-decoder shapes and a detection head (perf/shapes.py), in the three training
modes; bytes models in perf/common.py: GN_BYTES.

On a GPU timings are ``triton.testing.do_bench`` medians with the 20th/80th percentiles,
inputs rotated across buffers totalling past the L2 cache. Without a GPU the same pipeline
runs tiny shapes through Triton's interpreter (TRITON_INTERPRET=1, set here before tritonbn
is imported) with a wall-clock loop: an INTERPRETER SMOKE RUN that proves the script works
and says nothing about speed.

Writes one long-format CSV (perf/common.py: COLUMNS) to perf/results/<card-slug>/ on a GPU
or perf/out/ on a CPU, PNGs beside it (perf/plot.py), and prints the summary table last.

Last, with CUDA (``--model-step``, the default there; ``--no-model-step`` to leave it out),
the model-level benchmark of perf/model_step.py (a ResNet-50 training step, torch's model
against convert_model and fuse_model) runs in what is left of the time budget, into
model_step.csv beside results.csv, and its table follows the summary; on a CPU the summary
says it was skipped.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import gc
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    # Run as `python perf/report.py`: make the `perf` package importable.
    sys.path.insert(0, str(REPO))

# torch may be imported before TRITON_INTERPRET is decided: importing it jit-compiles no
# Triton code. tritonbn and triton are imported in prepare(), after the decision.
import torch  # noqa: E402

from perf import common, shapes  # noqa: E402

CPU_OUT_DIR = REPO / "perf" / "out"
GPU_RESULTS_DIR = REPO / "perf" / "results"
DEFAULT_L2_BYTES = 50 * 2**20  # an H100's, when torch cannot say
MAX_INPUT_SETS = 1024  # rotation buffers for the tiniest shapes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Order of the (dtype, layout) passes: a run cut short by its time budget still has whole
# passes, starting with the classic case and the one modern training uses most.
PASS_ORDER = (("float32", "contiguous"), ("bfloat16", "channels_last"),
              ("bfloat16", "contiguous"), ("float32", "channels_last"))
# Correctness tolerance, max |ours - torch| <= ATOL + RTOL * max |torch|, per tensor. float32:
# reduction-order differences over up to 2^30 elements; bfloat16: one rounding of the output
# (2^-8 relative) on either side.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1e-2, 2e-2)}


@dataclass
class RunEnv:
    """Where and with what the report runs; recorded with every row."""

    cuda: bool
    device: torch.device
    device_name: str  # the card's name, or common.SMOKE_DEVICE
    slug: str
    driver: str
    cuda_version: str
    torch_version: str
    triton_version: str
    date: str
    l2_bytes: int
    label: str

    @property
    def smoke(self) -> bool:
        return not self.cuda


def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def driver_version() -> str:
    """The NVIDIA driver's version, from nvidia-smi or else NVML."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        if out:
            return out.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # NVML missing or unusable: say so in the CSV instead
        return "unknown"


def use_cuda(smoke_forced: bool) -> bool:
    return torch.cuda.is_available() and not smoke_forced


def default_out_dir(smoke_forced: bool = False) -> Path:
    if not use_cuda(smoke_forced):
        return CPU_OUT_DIR
    return GPU_RESULTS_DIR / card_slug(torch.cuda.get_device_name())


def prepare(smoke_forced: bool, autotune: bool) -> RunEnv:
    """Decide GPU or interpreter, set the environment accordingly, then import tritonbn."""
    cuda = use_cuda(smoke_forced)
    if not cuda:
        # Read when @triton.jit runs, i.e. when tritonbn's kernels are imported: set it first.
        os.environ["TRITON_INTERPRET"] = "1"
        # One intra-op thread: on a small, shared CPU (2 cores in CI) OpenMP threads spin
        # against other processes and turn a 40 us eager op into 25 ms, for nothing.
        torch.set_num_threads(1)
    if not autotune:
        os.environ["TRITONBN_AUTOTUNE"] = "0"
    # A fresh tuning cache, so that the first call of each shape shows the real tuning cost
    # (the "first call" lines); a cache of an earlier run would hide it.
    os.environ.setdefault("TRITONBN_CACHE_DIR", tempfile.mkdtemp(prefix="tritonbn-report-tuning-"))
    import triton

    import tritonbn

    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if cuda:
        device = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        env = RunEnv(True, device, name, card_slug(name), driver_version(), str(torch.version.cuda),
                     torch.__version__, triton.__version__, date,
                     int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES), common.MEASUREMENT_LABEL)
    else:
        env = RunEnv(False, torch.device("cpu"), common.SMOKE_DEVICE, "cpu", "n/a", "n/a",
                     torch.__version__, triton.__version__, date, DEFAULT_L2_BYTES, common.SMOKE_LABEL)
    # Catches a tritonbn imported before TRITON_INTERPRET was set (the kernels would then be
    # plain jit functions that cannot run on the CPU, and the module would fall back to torch).
    expected = "triton" if cuda else "triton-interpreter"
    got = tritonbn.backend_for(torch.empty(0, device=env.device))
    if got != expected:
        raise RuntimeError(f"tritonbn runs as {got!r} here, expected {expected!r}: the report would not "
                           "measure the Triton kernels")
    return env


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


class Timer:
    """(p20, p50, p80) in milliseconds of one call of fn."""

    def __init__(self, env: RunEnv, args: argparse.Namespace):
        self.env = env
        self.args = args

    def __call__(self, fn) -> tuple[float, float, float]:
        if self.env.cuda:
            import triton.testing

            p50, p20, p80 = triton.testing.do_bench(fn, warmup=self.args.warmup_ms, rep=self.args.rep_ms,
                                                    quantiles=[0.5, 0.2, 0.8])
            return float(p20), float(p50), float(p80)
        # No CUDA, so no events and no do_bench: a wall-clock loop. Good enough to prove the
        # pipeline; the numbers are interpreter overhead, not kernel speed.
        times = []
        for _ in range(self.args.cpu_repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return _percentile(times, 0.2), _percentile(times, 0.5), _percentile(times, 0.8)

    def sync(self) -> None:
        if self.env.cuda:
            torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# inputs, modules, modes
# ----------------------------------------------------------------------------------------------


def layouts_for(case: shapes.Case) -> tuple[str, ...]:
    return common.LAYOUTS if len(case.shape) in (4, 5) else ("contiguous",)


def memory_format(layout: str, ndim: int) -> torch.memory_format:
    if layout == "contiguous":
        return torch.contiguous_format
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def random_input(case: shapes.Case, dtype: torch.dtype, layout: str, device: torch.device,
                 gen: torch.Generator) -> torch.Tensor:
    """Normal data with a per-channel scale and offset, allocated directly in the layout.

    Never zeros: zeros hide unwritten outputs and can run faster than real data. The offset
    gives each channel a mean away from zero, as a convolution's output has.
    """
    ndim = len(case.shape)
    x = torch.empty(case.shape, dtype=dtype, device=device, memory_format=memory_format(layout, ndim))
    x.normal_(generator=gen)
    per_channel = (1, case.shape[1]) + (1,) * (ndim - 2)
    scale = torch.rand(per_channel, device=device, generator=gen).add_(0.5).to(dtype)
    offset = torch.randn(per_channel, device=device, generator=gen).to(dtype)
    return x.mul_(scale).add_(offset)


def make_params(channels: int, device: torch.device, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A BatchNorm state_dict in float32 (as under autocast), away from the 1/0 defaults."""
    def randn(scale: float) -> torch.Tensor:
        return torch.randn(channels, device=device, generator=gen) * scale

    return {
        "weight": 1.0 + randn(0.25),
        "bias": randn(0.25),
        "running_mean": randn(0.5),
        "running_var": 0.5 + torch.rand(channels, device=device, generator=gen),
        "num_batches_tracked": torch.tensor(0, dtype=torch.long, device=device),
    }


def build_module(provider: str, case: shapes.Case, params: dict, device: torch.device):
    """(module, callable): the callable is the module itself, or its torch.compile wrapper."""
    import tritonbn

    lib = tritonbn if provider == "tritonbn" else torch.nn
    cls = {2: lib.BatchNorm1d, 3: lib.BatchNorm1d, 4: lib.BatchNorm2d, 5: lib.BatchNorm3d}[len(case.shape)]
    module = cls(case.shape[1], device=device)
    module.load_state_dict(params)
    if provider == "torch.compile":
        # dynamic=False: a kernel specialised to each shape, as a fixed-shape training run gets.
        return module, torch.compile(module, dynamic=False)
    return module, module


class _UnfusedBnRelu:
    """torch's unfused sequence, as torchvision's ResNet writes it: BatchNorm, ``out +=
    residual`` in place on the BatchNorm output, ``relu(inplace=True)``."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(input)
        if residual is not None:
            out += residual
        return torch.nn.functional.relu(out, inplace=True)


class UnfusedBnRelu1d(_UnfusedBnRelu, torch.nn.BatchNorm1d):
    pass


class UnfusedBnRelu2d(_UnfusedBnRelu, torch.nn.BatchNorm2d):
    pass


class UnfusedBnRelu3d(_UnfusedBnRelu, torch.nn.BatchNorm3d):
    pass


def build_fused_module(provider: str, case: shapes.Case, params: dict, device: torch.device):
    """(module, callable) of a fused op: tritonbn's BatchNormAct (relu), or torch's unfused
    sequence, eager or under torch.compile; called as (x) or (x, residual). Same state_dict."""
    import tritonbn

    ndim = len(case.shape)
    if provider == "tritonbn":
        cls = {2: tritonbn.BatchNormAct1d, 3: tritonbn.BatchNormAct1d, 4: tritonbn.BatchNormAct2d,
               5: tritonbn.BatchNormAct3d}[ndim]
        module = cls(case.shape[1], device=device, activation="relu")
    else:
        cls = {2: UnfusedBnRelu1d, 3: UnfusedBnRelu1d, 4: UnfusedBnRelu2d, 5: UnfusedBnRelu3d}[ndim]
        module = cls(case.shape[1], device=device)
    module.load_state_dict(params)
    if provider == "torch.compile":
        return module, torch.compile(module, dynamic=False)
    return module, module


def make_fn(mode: str, module, call, inputs: list[tuple[torch.Tensor, ...]], dys: list[torch.Tensor]):
    """A no-argument callable doing one `mode` step, rotating through the input sets.

    inputs: per set, what ``call`` takes: (x,), or (x, residual) for bn_add_relu; training
    modes differentiate with respect to all of them and the affine parameters.
    """
    order = itertools.cycle(range(len(inputs)))
    params = (module.weight, module.bias)
    if mode == "eval":
        module.eval()

        def fn():
            i = next(order)
            with torch.no_grad():
                call(*inputs[i])

        return fn
    module.train()
    if mode == "forward-train":
        return lambda: call(*inputs[next(order)])
    if mode == "forward+backward":
        def fn():
            i = next(order)
            torch.autograd.grad(call(*inputs[i]), (*inputs[i], *params), dys[i])

        return fn
    # backward: each set's forward graph is built once, outside the timed region; grad() (not
    # backward()) so that no gradient accumulation kernel is timed.
    ys = [call(*args) for args in inputs]

    def fn():
        i = next(order)
        torch.autograd.grad(ys[i], (*inputs[i], *params), dys[i], retain_graph=True)

    return fn


def eager_backend(x: torch.Tensor, module, training: bool) -> str:
    """The batch-norm implementation eager torch picks for this input (cudnn, miopen, native)."""
    try:
        # torch >= 2.1: (input, weight, bias, running_mean, running_var, training, eps) -> enum
        chosen = torch._C._select_batch_norm_backend(x, module.weight, module.bias, module.running_mean,
                                                     module.running_var, training, module.eps)
        return str(chosen).split(".")[-1].lower()
    except Exception:  # a private API: older or newer torch may lack or change it
        return "unknown"


def input_sets(case: shapes.Case, element_size: int, env: RunEnv, tensors: int = 2) -> int:
    """How many (x, dy[, residual]) sets to rotate through so that together they exceed L2 twice over."""
    if not env.cuda:
        return 2
    set_bytes = tensors * case.numel * element_size
    if set_bytes >= 2 * env.l2_bytes:
        return 1  # one set is already past L2 (and do_bench flushes L2 between calls anyway)
    return min(math.ceil(2 * env.l2_bytes / set_bytes), MAX_INPUT_SETS)


# ----------------------------------------------------------------------------------------------
# correctness
# ----------------------------------------------------------------------------------------------


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    # float32 unless a float64 reference is involved: no copy of a float32 tensor, and the
    # 4 GiB case keeps its temporaries small.
    wide = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return (a.detach().to(wide) - b.detach().to(wide)).abs().max().item()


@dataclass
class Verdict:
    """tritonbn against eager torch for one mode: max abs error, pass, and which tensors failed."""

    error: float
    ok: bool
    bad: list[str]
    note: str = ""

    @property
    def text(self) -> str:
        return "ok" if self.ok else "MISMATCH:" + ",".join(self.bad)


def _outputs(module, x: torch.Tensor, dy: torch.Tensor, training: bool) -> dict[str, torch.Tensor]:
    """What a BatchNorm step produces: y, and in training the running stats and the three grads."""
    if not training:
        module.eval()
        with torch.no_grad():
            return {"y": module(x)}
    module.train()
    x = x.detach().requires_grad_()
    y = module(x)
    dx, dweight, dbias = torch.autograd.grad(y, (x, module.weight, module.bias), dy)
    return {"y": y.detach(), "running_mean": module.running_mean, "running_var": module.running_var,
            "dx": dx, "dweight": dweight, "dbias": dbias}


def _judge(case: shapes.Case, params: dict, x: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype,
           device: torch.device, training: bool) -> dict[str, tuple[float, bool, str]]:
    """Per output tensor: (max abs error vs eager torch, pass, note).

    Within tolerance of torch passes. Otherwise a float64 reference decides: torch is not
    exact either (its CPU channels_last reductions, for one, sum sequentially in float32), so
    tritonbn passes when it is no further from float64 than torch is.
    """
    ours = _outputs(build_module("tritonbn", case, params, device)[0], x, dy, training)
    ref = _outputs(build_module("torch", case, params, device)[0], x, dy, training)
    return _compare(ours, ref, dtype, lambda: _outputs(build_module("torch", case, params, device)[0].double(),
                                                       x.double(), dy.double(), training))


def _compare(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], dtype: torch.dtype,
             exact_outputs) -> dict[str, tuple[float, bool, str]]:
    """Per tensor (max abs error, pass, note); exact_outputs() gives the float64 reference, only
    computed when something is out of tolerance."""
    atol, rtol = TOLERANCE[dtype]
    result = {}
    for name in ours:
        error = _max_abs(ours[name], ref[name])
        result[name] = (error, error <= atol + rtol * ref[name].detach().abs().max().item(), "")  # NaN fails
    if all(ok for _, ok, _ in result.values()):
        return result
    exact = exact_outputs()
    for name, (error, ok, _) in list(result.items()):
        if not ok and _max_abs(ours[name], exact[name]) <= _max_abs(ref[name], exact[name]):
            result[name] = (error, True, "no further from float64 than torch")
    return result


def check(case: shapes.Case, params: dict, x: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype,
          env: RunEnv) -> dict[str, Verdict]:
    """Per mode: tritonbn's outputs against eager torch's on the same input and parameters."""
    from tritonbn import _launch

    launches = _launch.launch_count
    train = _judge(case, params, x, dy, dtype, env.device, training=True)
    evaluation = _judge(case, params, x, dy, dtype, env.device, training=False)
    if _launch.launch_count == launches:
        raise RuntimeError("tritonbn launched no kernel: the check would compare torch with itself")

    forward = ("y", "running_mean", "running_var")
    backward = ("dx", "dweight", "dbias")
    return {
        "forward-train": _verdict(train, forward),
        "backward": _verdict(train, backward),
        "forward+backward": _verdict(train, forward + backward),
        "eval": _verdict(evaluation, ("y",)),
    }


def _verdict(parts: dict[str, tuple[float, bool, str]], names: tuple[str, ...]) -> Verdict:
    chosen = {n: parts[n] for n in names if n in parts}
    notes = sorted({f"{n}: {note}" for n, (_, _, note) in chosen.items() if note})
    return Verdict(max(err for err, _, _ in chosen.values()), all(ok for _, ok, _ in chosen.values()),
                   [n for n, (_, ok, _) in chosen.items() if not ok], "; ".join(notes))


# relu's kink: where the pre-activation z = BN(x) + residual is within rounding of 0, the mask
# (and so dx, dresidual, dweight, dbias) depends on how each implementation rounds z: torch
# rounds the BatchNorm output to the dtype before adding the residual, tritonbn does not. Two
# equally valid gradients would differ by a whole w * rstd * dy there (and large shapes have
# dozens of such elements), so the check moves x off the kink first, as the tests do. Margin
# in units of z (bfloat16: a rounding of |BN(x)| <= 8 is <= 2^-6); step in units of x,
# representable next to |x| < 16 in bfloat16.
KINK_MARGIN = {torch.float32: 1e-3, torch.bfloat16: 0.05}
KINK_STEP = {torch.float32: 0.01, torch.bfloat16: 0.125}


def away_from_kink(x: torch.Tensor, residual: torch.Tensor | None, params: dict, dtype: torch.dtype,
                   fmt: torch.memory_format) -> torch.Tensor:
    """A copy of x (in memory format fmt) in which no training pre-activation, computed in
    float64, lies within KINK_MARGIN of 0."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    weight, bias = params["weight"].double(), params["bias"].double()
    step = (KINK_STEP[dtype] * torch.sign(params["weight"]).view(view)).to(x.dtype)
    x = x.detach().clone(memory_format=fmt)
    for _ in range(8):  # each round moves the statistics a little: recheck
        z = torch.nn.functional.batch_norm(x.double(), None, None, weight, bias, True, 0.0, 1e-5)
        if residual is not None:
            z = z + residual.double()
        near = z.abs() < KINK_MARGIN[dtype]
        if not bool(near.any()):
            break
        x = torch.where(near, x + step, x).contiguous(memory_format=fmt)
    return x


def _fused_outputs(module, x: torch.Tensor, residual: torch.Tensor | None,
                   dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """A fused op's training step: y, the running statistics, and the gradients."""
    module.train()
    inputs = [x.detach().requires_grad_()]
    if residual is not None:
        inputs.append(residual.detach().requires_grad_())
    y = module(*inputs)
    grads = torch.autograd.grad(y, (*inputs, module.weight, module.bias), dy)
    out = {"y": y.detach(), "running_mean": module.running_mean, "running_var": module.running_var,
           "dx": grads[0], "dweight": grads[-2], "dbias": grads[-1]}
    if residual is not None:
        out["dresidual"] = grads[1]
    return out


def check_fused(case: shapes.Case, params: dict, x: torch.Tensor, residual: torch.Tensor | None, dy: torch.Tensor,
                dtype: torch.dtype, layout: str, env: RunEnv) -> dict[str, Verdict]:
    """Per training mode: tritonbn's fused op against torch's unfused sequence, on x moved off the kink."""
    from tritonbn import _launch

    x = away_from_kink(x, residual, params, dtype, memory_format(layout, x.dim()))
    launches = _launch.launch_count
    ours = _fused_outputs(build_fused_module("tritonbn", case, params, env.device)[0], x, residual, dy)
    if _launch.launch_count == launches:
        raise RuntimeError("tritonbn launched no kernel: the check would compare torch with itself")
    ref = _fused_outputs(build_fused_module("torch", case, params, env.device)[0], x, residual, dy)
    parts = _compare(ours, ref, dtype, lambda: _fused_outputs(
        build_fused_module("torch", case, params, env.device)[0].double(), x.double(),
        residual.double() if residual is not None else None, dy.double()))
    forward = ("y", "running_mean", "running_var")
    backward = ("dx", "dresidual", "dweight", "dbias")
    return {
        "forward-train": _verdict(parts, forward),
        "backward": _verdict(parts, backward),
        "forward+backward": _verdict(parts, forward + backward),
    }


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


class CsvSink:
    """Appends rows as they are measured, so a run cut off by a time limit keeps its results."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (resume and path.exists()):
            with open(path, "w", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, common.COLUMNS).writeheader()
            return
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
        if header != list(common.COLUMNS):
            # A CSV from an older schema (before the op column): rewrite it in this one, so
            # that the rows appended now line up with the header (read_rows fills op in).
            rows = common.read_rows(path)
            with open(path, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, common.COLUMNS, restval="", extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, common.COLUMNS).writerow(row)


class Report:
    def __init__(self, env: RunEnv, args: argparse.Namespace, sink: CsvSink, done: set[tuple]):
        self.env = env
        self.args = args
        self.sink = sink
        self.done = done
        self.timer = Timer(env, args)
        self.start = time.monotonic()
        self.issues: list[str] = []
        self.skipped: list[str] = []
        self.first_calls: list[tuple[str, float]] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def log(self, text: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {text}", flush=True)

    def row(self, **values) -> dict:
        env = self.env
        base = {"device": env.device_name, "driver": env.driver, "cuda": env.cuda_version, "torch": env.torch_version,
                "triton": env.triton_version, "date": env.date, "label": env.label}
        return {**{c: "" for c in common.COLUMNS}, **base, **values}

    def measure_copy(self) -> None:
        """Device-to-device copy bandwidth, bytes read + written: the ceiling for every mode."""
        numel = 2**28 if self.env.cuda else 2**24  # 1 GiB / 64 MiB of float32
        src = torch.empty(numel, device=self.env.device).normal_()
        dst = torch.empty_like(src)
        p20, p50, p80 = self.timer(lambda: dst.copy_(src))
        moved = 2 * numel * src.element_size()
        gbps = moved / (p50 * 1e-3) / 1e9
        what = "device-to-device" if self.env.cuda else "host memory (CPU smoke run)"
        self.log(f"copy bandwidth ({what}, {moved / 2**30:.2f} GiB read+written): {gbps:.1f} GB/s")
        self.sink.write(self.row(provider=common.COPY, mode=common.COPY, op=common.COPY, dtype="float32",
                                 layout="contiguous",
                                 shape=str(numel), shape_name=f"copy-{numel * 4 // 2**20}MiB", layers=0,
                                 ms_p20=f"{p20:.6f}", ms_p50=f"{p50:.6f}", ms_p80=f"{p80:.6f}", gbps=f"{gbps:.2f}",
                                 bytes_model=moved, backend="torch.Tensor.copy_"))

    def run(self, cases: list[shapes.Case]) -> None:
        args = self.args
        passes = [(d, lay) for d, lay in PASS_ORDER if d in args.dtypes and lay in args.layouts]
        for index, (dtype_name, layout) in enumerate(passes):
            providers = list(args.providers)
            if self.env.smoke and index > 0 and not args.smoke_compile_all:
                # Inductor's CPU compiles cost seconds each: the smoke run proves the compile
                # path on its first pass only, and stays within CI's couple of minutes.
                providers = [p for p in providers if p != "torch.compile"]
            for case in cases:
                if layout not in layouts_for(case):
                    continue
                name = f"{case.name} {dtype_name} {layout}"
                if case.op != common.BATCH_NORM:
                    name = f"{case.op} {name}"
                wanted = {(p, m) for p in providers for m in self.modes(case)}
                have = {(p, m) for o, p, m, d, lay, s in self.done
                        if (o, d, lay, s) == (case.op, dtype_name, layout, case.name)}
                if wanted <= have:
                    self.log(f"{name}: already in the CSV (--resume), skipped")
                    continue
                if args.time_budget and self.elapsed() > args.time_budget:
                    self.skipped.append(name)
                    continue
                try:
                    self.run_combo(case, dtype_name, layout, providers)
                except Exception as exc:  # one broken case must not lose the others
                    self.issues.append(f"{name}: ERROR {type(exc).__name__}: {exc}")
                    self.log(f"ERROR in {name}:\n{traceback.format_exc()}")
                finally:
                    gc.collect()
                    if self.env.cuda:
                        torch.cuda.empty_cache()

    def first_call(self, case: shapes.Case, params: dict, inputs: tuple, dy: torch.Tensor, tag: str) -> None:
        """Wall time of tritonbn's first training step on this shape: compile and autotune
        included when the shape bucket is new (the cost a user pays once per bucket)."""
        build = build_fused_module if case.op != common.BATCH_NORM else build_module
        module, call = build("tritonbn", case, params, self.env.device)
        if self.env.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = call(*inputs)
        torch.autograd.grad(out, inputs, dy)
        if self.env.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.first_calls.append((tag, seconds))
        self.log(f"first call {tag}: {seconds:.2f} s (compile + autotune when the shape bucket is new)")

    def first_call_lines(self) -> list[str]:
        if not self.first_calls:
            return []
        times = sorted(t for _, t in self.first_calls)
        worst = max(self.first_calls, key=lambda item: item[1])
        return [f"first call per new shape (tritonbn forward+backward, compile + autotune, fresh tuning cache): "
                f"median {times[len(times) // 2]:.2f} s, max {worst[1]:.2f} s ({worst[0]}), "
                f"{len(times)} shape(s); later processes read the tuned configs from disk"]

    def modes(self, case: shapes.Case) -> list[str]:
        """The modes to run on a case: the fused ops have no eval."""
        if case.op == common.BATCH_NORM:
            return list(self.args.modes)
        return [m for m in self.args.modes if m in common.FUSED_MODES]  # fused ops and GroupNorm: no eval

    def time_row(self, tag: str, mode: str, provider: str, fields: dict, make) -> None:
        """Time the step ``make()`` builds and write its row (an error row, and an issue, if it fails)."""
        env = self.env
        try:
            fn = make()
            # Compile, autotune, allocator warm-up: none of it is timed. On the CPU only
            # torch.compile needs it (the check already ran the other two), and each
            # interpreted call costs real seconds of the smoke run's budget.
            for _ in range(2 if env.cuda else int(provider == "torch.compile")):
                fn()
            self.timer.sync()
            p20, p50, p80 = self.timer(fn)
            del fn
        except Exception as exc:  # record it and go on with the next one
            self.issues.append(f"{tag} {mode} {provider}: ERROR {type(exc).__name__}: {exc}")
            self.log(f"ERROR {tag} {mode} {provider}:\n{traceback.format_exc()}")
            self.sink.write(self.row(**fields, check=f"error: {type(exc).__name__}"))
            return
        gbps = fields["bytes_model"] / (p50 * 1e-3) / 1e9
        self.sink.write(self.row(**fields, ms_p20=f"{p20:.6f}", ms_p50=f"{p50:.6f}", ms_p80=f"{p80:.6f}",
                                 gbps=f"{gbps:.2f}"))
        self.log(f"{tag:<38} {mode:<16} {provider:<13} {p50:10.4f} ms  {gbps:9.1f} GB/s  [{fields['backend']}]")

    def run_combo(self, case: shapes.Case, dtype_name: str, layout: str, providers: list[str]) -> None:
        if case.op in common.GN_OPS:
            from perf import gn_report

            return gn_report.run_combo(self, case, dtype_name, layout, providers)
        from tritonbn import _launch

        env = self.env
        op = case.op
        fused = op != common.BATCH_NORM
        modes = self.modes(case)
        if not modes:
            return
        dtype = DTYPES[dtype_name]
        tag = f"{case.name} {dtype_name} {layout}"
        if fused:
            tag = f"{op} {tag}"
        # A fixed seed per case (not Python's salted hash): reruns draw the same data.
        gen = torch.Generator(device=env.device).manual_seed(zlib.crc32(tag.encode()))
        params = make_params(case.shape[1], env.device, gen)
        with_residual = op == "bn_add_relu"
        sets = input_sets(case, torch.finfo(dtype).bits // 8, env, 3 if with_residual else 2)
        xs = [random_input(case, dtype, layout, env.device, gen).requires_grad_() for _ in range(sets)]
        dys = [random_input(case, dtype, layout, env.device, gen) for _ in range(sets)]
        if with_residual:
            rs = [random_input(case, dtype, layout, env.device, gen).requires_grad_() for _ in range(sets)]
            inputs = list(zip(xs, rs))
        else:
            inputs = [(x,) for x in xs]
        route = _launch.route(xs[0])
        if "tritonbn" in providers:
            self.first_call(case, params, inputs[0], dys[0], tag)

        if fused:
            results = check_fused(case, params, xs[0], inputs[0][1] if with_residual else None, dys[0], dtype,
                                  layout, env)
        else:
            results = check(case, params, xs[0], dys[0], dtype, env)
        verdicts = []
        for mode in modes:
            v = results[mode]
            verdicts.append(f"{mode} {v.text} {v.error:.2e}" + (f" ({v.note})" if v.note else ""))
            if not v.ok:
                self.issues.append(f"{tag} {mode}: MISMATCH vs eager torch (and float64) in {','.join(v.bad)}, "
                                   f"max abs error {v.error:.3e}")
        self.log(f"check {tag} ({case.shape_str}, route {route}, {sets} input set(s)): " + "; ".join(verdicts))

        if "torch.compile" in providers:
            torch._dynamo.reset()  # fresh, static compiles per case; no recompile limit reached
        element_size = torch.finfo(dtype).bits // 8
        epilogue = (" + add_" if with_residual else "") + " + relu_"
        for provider in providers:
            build = build_fused_module if fused else build_module
            module, call = build(provider, case, params, env.device)
            for mode in modes:
                moved = common.bytes_model(mode, case.numel, element_size, op, provider)
                if provider == "tritonbn":
                    import tritonbn

                    backend = tritonbn.backend_for(xs[0]) + (" fused" if fused else "")
                    row_route = route if mode != "eval" else route.split("-")[0] + "-normalize"
                    extra = {"route": row_route, "max_abs_err": f"{results[mode].error:.3e}",
                             "check": results[mode].text}
                elif provider == "torch":
                    backend = eager_backend(xs[0], module, training=mode != "eval") + (epilogue if fused else "")
                    extra = {}
                else:
                    backend = "inductor"
                    extra = {}
                fields = dict(provider=provider, mode=mode, op=op, dtype=dtype_name, layout=layout,
                              shape=case.shape_str, shape_name=case.name, layers=case.layers, bytes_model=moved,
                              backend=backend, **extra)
                self.time_row(tag, mode, provider, fields, functools.partial(make_fn, mode, module, call, inputs, dys))
            del module, call


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=common.OPS, default=list(common.OPS),
                        help="batch_norm: BatchNorm alone; bn_relu, bn_add_relu: tritonbn's fused op against "
                        "torch's unfused sequence (training modes only); group_norm, gn_silu: GroupNorm and "
                        "GroupNorm + SiLU (training modes only). Default: all")
    parser.add_argument("--modes", nargs="+", choices=common.MODES, default=list(common.MODES))
    parser.add_argument("--dtypes", nargs="+", choices=common.DTYPES, default=list(common.DTYPES))
    parser.add_argument("--layouts", nargs="+", choices=common.LAYOUTS, default=list(common.LAYOUTS))
    parser.add_argument("--providers", nargs="+", choices=common.PROVIDERS, default=None,
                        help="default: all three (on the CPU smoke run too, unless --no-compile)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--smoke-compile-all", action="store_true",
                        help="smoke run: torch.compile in every dtype/layout pass (default: the first only)")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="SUBSTRING",
                        help="only cases whose name contains one of these")
    parser.add_argument("--smoke", action="store_true",
                        help="force the CPU interpreter smoke run, even where a GPU is present")
    parser.add_argument("--no-autotune", action="store_true",
                        help="TRITONBN_AUTOTUNE=0: default kernel configs (faster start, slower kernels)")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up (GPU)")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="do_bench measuring time (GPU)")
    parser.add_argument("--cpu-repeats", type=int, default=3, help="timed calls per measurement (CPU)")
    parser.add_argument("--time-budget", type=float, default=0.0, metavar="SECONDS",
                        help="start no new case after this many seconds (0: no limit)")
    parser.add_argument("--resume", action="store_true",
                        help="append to an existing CSV and skip cases it already holds")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: perf/results/<card-slug>/ on a GPU, perf/out/ on a CPU)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-host-cost", action="store_true", help="skip the host-cost benchmark (perf/host_cost.py)")
    parser.add_argument("--print-out-dir", action="store_true", help="print the default output folder and exit")
    parser.add_argument("--summarize", action="store_true",
                        help="measure nothing: plot and summarise the CSV already in the output folder")
    parser.add_argument("--model-step", action=argparse.BooleanOptionalAction, default=None,
                        help="end with the model-level benchmark (perf/model_step.py: a ResNet-50 training step) "
                        "in the time left, into model_step.csv; default: on with CUDA")
    args = parser.parse_args(argv)
    if args.providers is None:
        args.providers = list(common.PROVIDERS)
    if args.no_compile:
        args.providers = [p for p in args.providers if p != "torch.compile"]
    args.modes = [m for m in common.MODES if m in args.modes]  # eval last: it switches modules to eval
    return args


def finish(csv_path: Path, out_dir: Path, device_name: str | None, plot: bool, issues: list[str],
           notes: list[str] | None = None, appendix: list[str] | None = None) -> int:
    """Plots, summary.txt, the problem list, then the summary table (printed last), appendix after it."""
    if plot:
        try:
            from perf import plot as plotting

            for png in plotting.draw(csv_path, out_dir):
                print(f"wrote {png}")
        except Exception:  # the numbers are written; report the plot failure
            traceback.print_exc()
            issues.append("plotting failed")
    rows = [r for r in common.read_rows(csv_path) if device_name is None or r["device"] == device_name]
    lines = (notes or []) + common.summary_lines(rows) + (appendix or [])
    (out_dir / "summary.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if issues:
        print(f"\n{len(issues)} PROBLEM(S):")
        for issue in issues:
            print(f"  !! {issue}")
    print()
    print("\n".join(lines))
    return 3 if issues else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_out_dir:
        print(args.out or default_out_dir(args.smoke))
        return 0
    if args.summarize:
        out_dir = args.out or default_out_dir(args.smoke)
        from perf import model_step

        return finish(out_dir / "results.csv", out_dir, None, not args.no_plot, [],
                      appendix=model_step.saved_section(out_dir))
    env = prepare(args.smoke, autotune=not args.no_autotune)
    out_dir = args.out or default_out_dir(args.smoke)
    csv_path = out_dir / "results.csv"
    banner = "=" * 100
    if env.smoke:
        print(f"{banner}\n  {common.SMOKE_LABEL}\n"
              f"  (no CUDA device: Triton's interpreter on the CPU, tiny shapes)\n{banner}")
    print(f"device: {env.device_name} | driver {env.driver} | CUDA {env.cuda_version} | torch {env.torch_version} | "
          f"triton {env.triton_version} | {env.date}")
    print(f"providers: {', '.join(args.providers)} | modes: {', '.join(args.modes)} | ops: {', '.join(args.ops)} | "
          f"output: {csv_path}")

    if env.smoke:
        cases = shapes.smoke_suite() + shapes.smoke_fused_suite() + shapes.smoke_group_norm_suite()
    else:
        cases = shapes.gpu_suite() + shapes.gpu_fused_suite() + shapes.gpu_group_norm_suite()
    cases = [c for c in cases if c.op in args.ops]
    if args.shapes:
        cases = [c for c in cases if any(s in c.name for s in args.shapes)]
    done = set()
    if args.resume and csv_path.exists():
        done = {(r["op"], r["provider"], r["mode"], r["dtype"], r["layout"], r["shape_name"])
                for r in common.read_rows(csv_path) if r["device"] == env.device_name and r["ms_p50"]}
    report = Report(env, args, CsvSink(csv_path, args.resume), done)
    report.measure_copy()
    report.run(cases)
    print(f"\nwrote {csv_path} ({report.elapsed():.1f}s)")
    if report.skipped:
        print(f"time budget of {args.time_budget:.0f}s reached: {len(report.skipped)} case(s) not run "
              f"(run again with --resume to add them): {', '.join(report.skipped)}")
    notes = report.first_call_lines()
    if not args.no_host_cost:
        notes += host_cost_lines(out_dir, report.issues)
    # The model-level benchmark, last, in the time left (or a line saying why it did not run).
    from perf import model_step

    model_lines = model_step.report_section(env, args, report.elapsed(), out_dir, report.issues)
    return finish(csv_path, out_dir, env.device_name, not args.no_plot, report.issues, notes, appendix=model_lines)


def host_cost_lines(out_dir: Path, issues: list[str]) -> list[str]:
    """perf/host_cost.py's table (host µs per step beside torch's module, launches per op).

    In a process of its own: on a CPU it runs Triton's compiled launch path against a mock
    driver, which this (interpreted) process cannot; on a GPU it wants a quiet process too.
    """
    out_json = out_dir / "host_cost.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    print("\nhost cost (perf/host_cost.py) ...", flush=True)
    proc = subprocess.run([sys.executable, "-m", "perf.host_cost", "--json", str(out_json)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not out_json.exists():
        issues.append(f"host-cost benchmark failed: {proc.stderr.strip().splitlines()[-1:]}")
        return []
    from perf import host_cost

    result = json.loads(out_json.read_text())
    return ["", f"Host cost per step ({result['environment']}):", host_cost.table(result["rows"]), ""]


if __name__ == "__main__":
    sys.exit(main())
