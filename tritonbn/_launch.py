"""Launchers: launch plans per call signature, and their straight-line replay.

A call of ``forward`` or ``backward`` is described by its signature: the input's shape,
strides, dtype and device, the parameters' presence and dtypes, the flags and the float
arguments. The first call with a new signature builds a *plan*: the route, the splits and
chunks, every kernel's scalar arguments and constexprs (kernels/configs.py decides them), and
which inputs must be copied into a canonical layout. Later calls look the plan up in a dict,
allocate the outputs and run its launches.

Each launch of a plan (``_Launch``) goes through Triton's normal path the first time (the
autotuner picks and caches a config, the kernel compiles), which hands back the compiled
kernel and the full argument list; from then on the launch calls the compiled kernel
directly, with the new tensors and the recorded scalars, and skips the autotuner, the
heuristics, argument binding and specialisation. That replay is only used where it gives the
same launch as Triton's path: same device, every tensor 16-byte aligned as when recorded (the
plan key says so), no launch hooks (profilers), not in Triton's interpreter.

Everything here is plain tensor bookkeeping: no value is read back from the device, so a
training step stays CUDA-graph capturable. Sizes come from shapes, which the host knows.
"""

from __future__ import annotations

import contextlib
import functools
import struct
import threading

import torch
import triton
import triton.language as tl
from triton import knobs

from ._checks import check_batch_norm_args, check_fusion_args, check_momentum
from ._layout import CanonicalView, canonical_input, like_layout, same_layout
from .kernels import backward as bwd_kernels
from .kernels import configs as cfg
from .kernels import forward as fwd_kernels
from .kernels import running_stats as rs_kernels
from .kernels.activation import RELU

# Number of Triton kernel launches so far. Tests read it to prove that the kernels ran (and
# not a silent fallback to torch's own batch norm); the host-cost report counts with it.
launch_count = 0

# When True, every buffer a kernel must write is filled with NaN first, so a test sees any
# element that no program wrote. Tests only: it costs a memset per buffer.
poison_outputs = False

_INT32_LIMIT = 2**31 - 1
ALIGNMENT = 16  # bytes: Triton specialises pointers on it (vectorised loads)


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if poison_outputs else out


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if poison_outputs else out


def poisoned(*tensors: torch.Tensor | None) -> tuple:
    """poison_outputs (tests) on buffers the hot paths allocate themselves: each replaced by
    _empty_like's (NaN-filled; a test may also guard it, tests/test_robustness.py)."""
    return tuple(None if t is None else _empty_like(t) for t in tensors)


# Inductor's allocation entry points (the code torch.compile generates calls them): a tensor
# from (size, stride, dtype) without empty_strided's argument parsing and dispatch, about half
# the host time of torch.empty_like here, for the five allocations of every training step.
# They allocate on the *current* device of their type (torch.cuda.current_device() for
# CUDA), as a device-less empty_strided does: a plan uses them while that is its device.
_INDUCTOR_GUARDS = getattr(getattr(torch._C, "_dynamo", None), "guards", None)
current_cuda_device = getattr(torch._C, "_cuda_getDevice", None)


def _empty_strided_on(device: torch.device, size: tuple, stride: tuple, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_strided(size, stride, dtype=dtype, device=device)


class _Allocators:
    """How a plan allocates its buffers on ``device``: ``fast(size, stride, dtype)`` (size and
    stride plain tuples) allocates on the current device of ``device``'s type, which is
    ``device`` while ``current_cuda_device()`` is ``device_index`` (-1: always, as for a CPU
    device); ``on_device`` allocates on ``device`` itself, always. Both give the tensor
    ``torch.empty_strided(size, stride, dtype=dtype, device=device)`` would."""

    def __init__(self, device: torch.device) -> None:
        self.on_device = functools.partial(_empty_strided_on, device)
        fast = getattr(_INDUCTOR_GUARDS, f"_empty_strided_{device.type}", None)
        if fast is None or device.type not in ("cuda", "cpu"):
            self.fast, self.device_index = self.on_device, -1
        else:
            self.fast, self.device_index = fast, device.index if device.type == "cuda" else -1

    def current(self):
        """The allocator for a call now: ``fast`` unless another CUDA device is current."""
        if self.device_index < 0 or current_cuda_device() == self.device_index:
            return self.fast
        return self.on_device


def fast_allocator(device: torch.device) -> _Allocators:
    """A plan's allocators on ``device`` (tests wrap this)."""
    return _Allocators(device)


def _rows_layout(rows: int, c: int, dtype: torch.dtype) -> tuple:
    """(size, stride, dtype) of a contiguous [rows, c] buffer (torch's strides when c is 0 too)."""
    return (rows, c), (max(c, 1), 1), dtype


# Triton's interpreter patches triton.language globally for the length of a launch, so two
# threads interpreting at once break each other: interpreted launches take turns. Compiled
# launches need no lock.
_interpreter_lock = threading.RLock() if cfg.INTERPRETER else contextlib.nullcontext()


def _launch(kernel, grid, *args, **kwargs):
    """Triton's own launch path (autotuner, heuristics, binding); returns what Triton returns
    (the compiled kernel, when compiled). perf/static_checks.py records launches here."""
    # Triton launches on the *current* CUDA device and its stream: make that the tensors' one.
    global launch_count
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with _interpreter_lock, on_device:
        launch_count += 1
        return kernel[grid](*args, **kwargs)


class _Launch:
    """One kernel launch of a plan: the kernel, its scalar arguments and constexprs by name,
    its grid.

    Called with the tensor arguments, in signature order (a kernel's pointer parameters come
    first in its signature, the scalars after them). The first call takes Triton's path, which
    binds the scalars by name, and records the compiled kernel, the grid and the bound
    argument values; later calls replay them.
    """

    __slots__ = ("kernel", "grid", "scalars", "meta", "replayable", "compiled", "run", "function", "packed_metadata",
                 "fixed", "grid3", "device", "stream")

    def __init__(self, kernel, grid, scalars: dict, meta: dict, replayable: bool) -> None:
        self.kernel = kernel
        self.grid = grid  # a tuple, or a function of the bound arguments (tile sizes)
        self.scalars = scalars
        # Fused multiply-adds stated, not left to Triton's default: Triton 3.9 warns on every
        # compile that leaves it unset, and 3.10 turns the default off (other numbers, slower).
        self.meta = meta if "enable_fp_fusion" in meta else {**meta, "enable_fp_fusion": True}
        self.replayable = replayable and not cfg.INTERPRETER
        self.compiled = None
        self.run = None  # the compiled kernel's launcher, once recorded

    def __call__(self, *tensors: torch.Tensor) -> None:
        global launch_count
        run = self.run
        if (run is not None and not _ENTER_HOOKS.calls and not _EXIT_HOOKS.calls
                and (self.device < 0 or torch._C._cuda_getDevice() == self.device)):
            launch_count += 1
            run(*self.grid3, self.stream(self.device), self.function, self.packed_metadata, None, None, None,
                *tensors, *self.fixed)
            return
        self._run_and_record(tensors)

    # What the hot paths call: a method call costs the interpreter less than calling the object.
    enqueue = __call__

    def _run_and_record(self, tensors: tuple) -> None:
        recorded = {}
        grid = self.grid

        def recording_grid(bound_args):
            # Triton calls this with every argument bound, in signature order, config and
            # heuristics values included; the last call is the launch itself.
            recorded["args"] = bound_args
            recorded["grid"] = grid(bound_args) if callable(grid) else grid
            return recorded["grid"]

        compiled = _launch(self.kernel, recording_grid, *tensors, **self.scalars, **self.meta)
        if (self.replayable and "args" in recorded and hasattr(compiled, "packed_metadata")
                and not _capturing_cuda_graph()):
            # A graph capture runs the default config untuned: such a launch is not kept.
            values = list(recorded["args"].values())
            grid3 = tuple(recorded["grid"]) + (1,) * (3 - len(recorded["grid"]))
            self.fixed = tuple(values[len(tensors):])
            self.grid3 = grid3
            driver = triton.runtime.driver.active
            self.stream = driver.get_current_stream
            # The compiled kernel was loaded on this device: replay only while it is current (-1:
            # perf/mock_driver.py's CPU tensors, on its one device).
            self.device = tensors[0].get_device() if tensors[0].is_cuda else -1
            # What Triton's own launch reads from the compiled kernel (run: a property, which loads
            # the module on first use), read once.
            self.run, self.function, self.packed_metadata = compiled.run, compiled.function, compiled.packed_metadata
            self.compiled = compiled


# Launch hooks (profilers such as proton add theirs to these chains): a replay calls none, so
# it is only taken while both are empty. Triton 3.6 to 3.9 keep one chain object each.
_ENTER_HOOKS = knobs.runtime.launch_enter_hook
_EXIT_HOOKS = knobs.runtime.launch_exit_hook


def _capturing_cuda_graph() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _pair(value: float) -> tuple[float, float]:
    """(float32 value, float32 remainder) of a float: see kernels/common.py exact_scalar."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, float(value) - hi


def _pairs(**values: float) -> dict[str, float]:
    """Keyword arguments for float pairs: name=value gives name and name_lo."""
    out = {}
    for name, value in values.items():
        out[name], out[f"{name}_lo"] = _pair(value)
    return out


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and sums are float32, or float64 for a float64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return cfg.DEFAULT_SM_COUNT


def _aligned(x: torch.Tensor, *optional: torch.Tensor | None) -> bool:
    """Every tensor's address is a multiple of 16 bytes (Triton specialises pointers on it)."""
    bits = x.data_ptr()
    for t in optional:
        if t is not None:
            bits |= t.data_ptr()
    return bits % ALIGNMENT == 0


def _split(view: CanonicalView, device: torch.device) -> tuple[int, int, int, int]:
    """(split_n, split_s, n_chunk, s_chunk) for NCS, (split_m, 1, m_chunk, 0) for rows."""
    if view.kind == "ncs":
        return cfg.ncs_chunks(view.n, view.c, view.s, sm_count(device))
    split_m, m_chunk = cfg.rows_chunks(view.m, view.c, sm_count(device))
    return split_m, 1, m_chunk, 0


def route(x: torch.Tensor) -> str:
    """Which kernel route a training forward on x takes: 'ncs-one-launch', 'ncs-split',
    'rows-one-launch' or 'rows-split' (for tests and the perf report)."""
    _, view = canonical_input(x)
    split_a, split_b, _, _ = _split(view, x.device)
    return f"{view.kind}-{'one-launch' if split_a * split_b == 1 else 'split'}"


def _common_meta(x: torch.Tensor, view: CanonicalView) -> dict:
    return {"ACC": _tl_acc(x.dtype), "INT64_INDEX": view.max_offset > _INT32_LIMIT}


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


class _ForwardPlan:
    """Everything a forward with one call signature launches, decided once."""

    def __init__(self, x, view, dense_copy, residual_copy, training, update, cumulative, count_batch, count, eps,
                 momentum, slope, flags, replayable):
        c = view.c
        self.c = c
        self.acc = accumulation_dtype(x.dtype)
        self.dense_copy = dense_copy  # x is read through a dense copy (neither NCS nor rows)
        self.residual_copy = residual_copy  # the residual is copied into x's layout
        self.empty = view.m == 0 or c == 0
        self.split = False
        self.launches: list[_Launch] = []
        # Buffers, allocated on every call (so by the cheapest call there is): y as x, the dense
        # tensor the kernels read (torch.empty_like(x) would have its strides too), the [3, C]
        # statistics, the split route's partial rows.
        self.allocators = fast_allocator(x.device)
        # read by tritonbn/_ops.py's usual path without the extra attribute (it runs every call)
        self.allocate, self.device_index = self.allocators.fast, self.allocators.device_index
        self.y_layout = (tuple(x.shape), x.stride(), x.dtype)
        self.stats_layout = _rows_layout(3, c, self.acc)
        # (_BackwardPlan, every computed gradient wanted) by tritonbn/_ops.py BatchNormFunction's
        # short key (the gradients wanted, dy's layout): this plan's key holds the rest.
        self.backward_plans: dict = {}
        if self.empty:
            return
        meta = {**_common_meta(x, view), **flags}
        running = {"UPDATE_RUNNING": update, "CUMULATIVE": cumulative, "COUNT_BATCH": count_batch}
        blend = _pairs(momentum=momentum, bessel=count / max(count - 1, 1))
        if not training:
            self.launches.append(_normalize_launch(view, eps, slope, meta, True, replayable))
            return
        split_a, split_b, chunk_a, chunk_b = _split(view, x.device)
        self.split = split_a * split_b > 1
        if not self.split:
            if view.kind == "ncs":
                kernel, grid = fwd_kernels._bn_fwd_one_launch_ncs, (c,)
                scalars = dict(N=view.n, C=c, S=view.s, stride_n=view.stride_n, stride_c=view.stride_c,
                               y_stride_n=view.stride_n, y_stride_c=view.stride_c,
                               bucket=cfg.tuning_bucket(view.s, view.n))
            else:
                kernel, grid = fwd_kernels._bn_fwd_one_launch_rows, cfg.rows_blocks_grid(c, 1)
                scalars = dict(M=view.m, C=c, stride_m=view.stride_m, y_stride_m=view.stride_m,
                               bucket=cfg.tuning_bucket(c, view.m))
            self.launches.append(_Launch(kernel, grid, {**scalars, **_pairs(eps=eps, slope=slope), **blend},
                                         {**meta, **running}, replayable))
            return
        stats, self.splits = _stats_launch(x, view, replayable)
        self.parts_layout = _rows_layout(3 * self.splits + 1, c, self.acc)  # counts, means, M2s, pivots
        combine = _combine_launch(c, self.splits, eps, blend, running, meta["ACC"], replayable)
        self.launches += [stats, combine, _normalize_launch(view, eps, slope, meta, False, replayable)]



def _stats_launch(x, view, replayable) -> tuple[_Launch, int]:
    """The split route's partial statistics, and how many partial rows per channel it writes."""
    split_a, split_b, chunk_a, chunk_b = _split(view, x.device)
    splits = split_a * split_b
    if view.kind == "ncs":
        return _Launch(fwd_kernels._bn_fwd_stats_ncs, (view.c * splits,),
                       dict(N=view.n, C=view.c, S=view.s, stride_n=view.stride_n, stride_c=view.stride_c,
                            n_chunk=chunk_a, s_chunk=chunk_b, bucket=cfg.tuning_bucket(chunk_b, chunk_a),
                            split_n=split_a, split_s=split_b), _common_meta(x, view), replayable), splits
    return _Launch(fwd_kernels._bn_fwd_stats_rows, cfg.rows_blocks_grid(view.c, splits),
                   dict(M=view.m, C=view.c, stride_m=view.stride_m, m_chunk=chunk_a, split_m=splits,
                        bucket=cfg.tuning_bucket(view.c, chunk_a)), _common_meta(x, view), replayable), splits


NO_RUNNING_UPDATE = {"UPDATE_RUNNING": False, "CUMULATIVE": False, "COUNT_BATCH": False}


def _combine_launch(c, splits, eps, blend, running, acc, replayable) -> _Launch:
    return _Launch(fwd_kernels._bn_fwd_combine, cfg.per_channel_grid(c), dict(C=c, splits=splits, **_pairs(eps=eps),
                                                                              **blend),
                   {**running, "ACC": acc, "BLOCK_C": cfg.PER_CHANNEL_BLOCK}, replayable)


def _normalize_launch(view, eps, slope, meta, from_running, replayable) -> _Launch:
    if view.kind == "ncs":
        kernel, grid = fwd_kernels._bn_fwd_normalize_ncs, cfg.ncs_tiles_grid(view.n, view.c, view.s)
        scalars = dict(N=view.n, C=view.c, S=view.s, stride_n=view.stride_n, stride_c=view.stride_c,
                       y_stride_n=view.stride_n, y_stride_c=view.stride_c, bucket=cfg.tuning_bucket(view.s, view.n))
    else:
        kernel, grid = fwd_kernels._bn_fwd_normalize_rows, cfg.rows_tiles_grid(view.m, view.c)
        scalars = dict(M=view.m, C=view.c, stride_m=view.stride_m, y_stride_m=view.stride_m,
                       bucket=cfg.tuning_bucket(view.c, view.m))
    return _Launch(kernel, grid, {**scalars, **_pairs(eps=eps, slope=slope)}, {**meta, "FROM_RUNNING": from_running},
                   replayable)


class BackwardInfo:
    """What a backward needs to know of its forward call besides the saved tensors (eager
    calls find it in their forward plan: _ForwardPlan.backward_info)."""

    __slots__ = ("training", "eps", "activation", "slope", "has_residual", "mask_from_output", "param_dtype")

    def __init__(self, input, weight, bias, residual, training, eps, activation, slope) -> None:
        self.training, self.eps, self.activation, self.slope = training, eps, activation, slope
        self.has_residual = residual is not None
        self.mask_from_output = activation == RELU  # relu: the saved tensor is y (tritonbn/_ops.py)
        param = weight if weight is not None else bias
        self.param_dtype = param.dtype if param is not None else accumulation_dtype(input.dtype)


_forward_plans: dict = {}
_deterministic_algorithms = torch._C._get_deterministic_algorithms
_backward_plans: dict = {}


def forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    eps: float,
    residual: torch.Tensor | None = None,
    activation: int = 0,
    slope: float = 0.0,
    momentum: float | None = None,
    num_batches_tracked: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, _ForwardPlan]:
    """(y, stats, plan): y = act(BN(x) + residual), stats the [3, C] per-channel (mean, rstd,
    biased var) used (ACC), and the launch plan.

    training: batch statistics, and the running ones updated in place when given (blend
    factor ``momentum``, or with ``momentum=None`` 1 / ``num_batches_tracked`` read on the
    device); otherwise the running statistics normalise. ``num_batches_tracked`` (a training
    module's counter) is counted: + 1 by the kernel that updates the running statistics, or
    by the host before the launches when the kernel cannot (a cumulative average, no folded
    update). activation is one of kernels/activation.py's codes (0: none). The statistics
    are one buffer (one allocation per call): the kernels address its rows.

    ``forward_plan`` then ``run_forward``: the eager autograd path calls the two apart.
    """
    plan = forward_plan(x, weight, bias, running_mean, running_var, training, eps, residual, activation, slope,
                        momentum, num_batches_tracked)
    y, stats = run_forward(plan, x, weight, bias, running_mean, running_var, residual, num_batches_tracked)
    return y, stats, plan


def forward_plan(x, weight, bias, running_mean, running_var, training, eps, residual=None, activation=0, slope=0.0,
                 momentum=None, num_batches_tracked=None) -> _ForwardPlan:
    """The plan of ``forward``'s call signature (built, after the argument checks, on first use)."""
    # Everything the argument checks read is in the key (and a plan is only built for arguments
    # that pass them): a call that finds its plan is valid without checking again. x's and the
    # residual's addresses modulo 16: Triton specialises on their alignment, so a replay needs
    # the same (not on the per-channel tensors': kernels/common.py CALLER_PER_CHANNEL).
    # One flat tuple (an absent tensor gives None in each of its places): nested tuples cost
    # an allocation and a hash each, on every call of every layer.
    key = (x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % ALIGNMENT, training,
           None if weight is None else weight.dtype, None if weight is None else weight.numel(),
           None if weight is None else weight.device,
           None if bias is None else bias.dtype, None if bias is None else bias.numel(),
           None if bias is None else bias.device,
           None if running_mean is None else running_mean.dtype,
           None if running_mean is None else running_mean.numel(),
           None if running_mean is None else running_mean.device,
           None if running_mean is None else running_mean.is_contiguous(),
           None if running_var is None else running_var.dtype, None if running_var is None else running_var.numel(),
           None if running_var is None else running_var.device,
           None if running_var is None else running_var.is_contiguous(),
           None if num_batches_tracked is None else num_batches_tracked.device,
           None if residual is None else (residual.stride(), residual.shape, residual.dtype, residual.device,
                                          residual.data_ptr() % ALIGNMENT),
           activation, eps, slope, momentum, _deterministic_algorithms())
    plan = _forward_plans.get(key)
    if plan is None:
        plan = _forward_plans[key] = _build_forward_plan(x, weight, bias, running_mean, running_var, training,
                                                        eps, residual, activation, slope, momentum,
                                                        num_batches_tracked)
    return plan


def run_forward(plan, x, weight, bias, running_mean, running_var, residual, num_batches_tracked
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, stats) of ``forward``, by its plan (``forward_plan`` of the same arguments).

    The eager autograd function runs the usual training call (``plan.direct``) itself.
    """
    if num_batches_tracked is not None and not plan.count_in_kernel:
        num_batches_tracked.add_(1)
    if plan.dense_copy:
        x = x.contiguous()
    allocate = plan.allocators.current()
    y = allocate(*plan.y_layout)
    stats = allocate(*plan.stats_layout)  # mean, rstd, biased var
    if poison_outputs:
        y, stats = poisoned(y, stats)
    if plan.empty:
        # Empty batch: an empty output and no statistics (torch leaves running stats alone).
        return y, stats.zero_()
    if residual is not None and plan.residual_copy:
        residual = allocate(*plan.y_layout).copy_(residual)
    r = residual if residual is not None else y
    # Stand-ins for absent optional tensors: never read (their HAS_* / UPDATE_* flag is off).
    w = weight.contiguous() if weight is not None else stats
    b = bias.contiguous() if bias is not None else stats
    launches = plan.launches
    if not plan.training:
        launches[0].enqueue(x, y, r, w, b, running_mean.contiguous(), running_var.contiguous(), stats)
        return y, stats
    if plan.update:
        rm, rv = running_mean, running_var
        nbt = num_batches_tracked if num_batches_tracked is not None else stats
    else:
        rm = rv = nbt = stats
    if not plan.split:
        launches[0].enqueue(x, y, r, w, b, stats, rm, rv, nbt)
    else:
        # counts, means, M2s, pivots (kernels/forward.py)
        parts = allocate(*plan.parts_layout)
        if poison_outputs:
            parts, = poisoned(parts)
        launches[0].enqueue(x, parts)
        launches[1].enqueue(parts, stats, rm, rv, nbt)
        launches[2].enqueue(x, y, r, w, b, stats, stats, stats)
    if plan.separate_update:  # the batch is counted above
        momentum = plan.momentum
        update_running_stats(running_mean, running_var, stats[0], stats[2],
                             num_batches_tracked if momentum is None else None, 0.0 if momentum is None else momentum,
                             plan.count)
    return y, stats


def _build_forward_plan(x, weight, bias, running_mean, running_var, training, eps, residual, activation,
                        slope, momentum, num_batches_tracked) -> _ForwardPlan:
    check_batch_norm_args(x, running_mean, running_var, weight, bias, training, eps)
    check_momentum(momentum, num_batches_tracked, training, running_mean)
    if residual is not None:
        check_fusion_args(x, residual, None)
    if num_batches_tracked is not None and num_batches_tracked.device != x.device:
        raise RuntimeError(f"num_batches_tracked is on {num_batches_tracked.device}, the input on {x.device}: "
                           "move the module to the input's device")
    update = training and running_mean is not None
    dense, view = canonical_input(x)
    residual_copy = residual is not None and not same_layout(residual, dense)
    flags = {"HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None, "HAS_RESIDUAL": residual is not None,
             "ACTIVATION": activation}
    count = view.m
    # Running buffers that are not contiguous are updated by the standalone kernel (which
    # copies back); the folded update writes them in place through unit strides.
    separate_update = update and not (running_mean.is_contiguous() and running_var.is_contiguous())
    folded_update = update and not separate_update
    counted = training and num_batches_tracked is not None
    cumulative = counted and momentum is None
    count_in_kernel = counted and folded_update and not cumulative and count > 0 and dense.shape[1] > 0
    # every specialised pointer aligned as it will be on every call with this key
    replayable = _aligned(x, residual)
    plan = _ForwardPlan(dense, view, dense is not x, residual_copy, training, folded_update, cumulative,
                        count_in_kernel, count, eps, 0.0 if momentum is None else momentum, slope, flags, replayable)
    plan.backward_info = BackwardInfo(x, weight, bias, residual, training, eps, activation, slope)
    plan.training, plan.momentum, plan.activation = training, momentum, activation
    plan.update = folded_update  # folded into the last kernel
    plan.separate_update = separate_update
    plan.count_in_kernel = count_in_kernel
    plan.count = count
    # The usual training call, which the eager autograd function runs itself (tritonbn/_ops.py):
    # one launch, nothing copied, the running statistics updated and the batch (when there is a
    # counter) counted by it.
    direct = (training and not plan.empty and not plan.split and not plan.dense_copy and not residual_copy
              and folded_update and (num_batches_tracked is None or count_in_kernel))
    plan.direct = plan.launches[0] if direct else None
    return plan


def batch_stats(x: torch.Tensor, eps: float) -> torch.Tensor:
    """[3, C] per-channel (mean, rstd, biased var) of x (ACC), without normalising
    (SyncBatchNorm's local part)."""
    x, view = canonical_input(x)
    c = view.c
    acc = accumulation_dtype(x.dtype)
    stats = _empty((3, c), acc, x.device)
    if view.m == 0 or c == 0:
        return stats.zero_()
    partial_stats, splits = _stats_launch(x, view, replayable=False)
    parts = _empty((3 * splits + 1, c), acc, x.device)
    partial_stats(x, parts)
    _combine(parts, splits, stats, eps)
    return stats


def _combine(parts, splits, stats, eps) -> None:
    """Merge [3 * splits + 1, C] partial rows (kernels/forward.py's layout) in order into [3, C] stats."""
    combine = _combine_launch(parts.shape[1], splits, eps, _pairs(momentum=0.0, bessel=1.0), NO_RUNNING_UPDATE,
                              _tl_acc(parts.dtype), replayable=False)
    combine(parts, stats, stats, stats, stats)


def combine_stats(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor, eps: float) -> torch.Tensor:
    """[3, C] (mean, rstd, biased var) from [parts, C] partial (count, mean, M2), merged in order."""
    c = means.shape[1]
    stats = _empty((3, c), means.dtype, means.device)
    pivots = torch.zeros((1, c), dtype=means.dtype, device=means.device)  # the means are absolute
    _combine(torch.cat([counts, means, m2s, pivots]), means.shape[0], stats, eps)
    return stats


def normalize(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, stats: torch.Tensor,
    fp_fusion: bool = True,
) -> torch.Tensor:
    """y = (x - mean) * rstd * weight + bias with given per-channel statistics: stats is
    [2+, C] with rows mean and rstd (ACC).

    fp_fusion=False compiles the kernel without fused multiply-adds, so that a product and a
    sum round separately, as two torch ops do (FrozenBatchNorm2d's bit-for-bit promise).
    """
    x, view = canonical_input(x)
    y = _empty_like(x)
    if view.m == 0 or view.c == 0:
        return y
    meta = {**_common_meta(x, view), "HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None,
            "HAS_RESIDUAL": False, "ACTIVATION": 0}
    if not fp_fusion:
        meta["enable_fp_fusion"] = False
    w = weight.contiguous() if weight is not None else stats
    b = bias.contiguous() if bias is not None else stats
    _normalize_launch(view, 0.0, 0.0, meta, False, False)(x, y, y, w, b, stats, stats, stats)
    return y


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------


class _BackwardPlan:
    """Everything a backward with one call signature launches, decided once.

    Routes: dx only (eval without parameter gradients: one elementwise launch); one-launch
    (sums and dx by one program per channel); split (partial sums, their ordered combine,
    then dx). With an activation and a residual to differentiate, the split route's reduce
    pass writes dz (the residual's gradient) and the dx pass reads x and dz: one tensor read
    less than recomputing dz from dy and the output (or residual) a second time.
    """

    def __init__(self, x, view, dense_copy, dy_copy, residual_copy, training, param_grads, param_dtype,
                 residual_grad, flags, slope, replayable):
        c = view.c
        self.c = c
        self.acc = accumulation_dtype(x.dtype)
        self.dense_copy, self.dy_copy, self.residual_copy = dense_copy, dy_copy, residual_copy
        self.empty = view.m == 0 or c == 0
        self.grads_size = c if (param_grads or training) else 0
        # Buffers, allocated on every call (so by the cheapest call there is): dx (and the
        # residual's gradient) as x, the dense tensor the kernels read; dweight and dbias; the
        # split route's partial and combined sums.
        self.allocators = fast_allocator(x.device)
        # read by tritonbn/_ops.py's usual path without the extra attribute (it runs every call)
        self.allocate, self.device_index = self.allocators.fast, self.allocators.device_index
        self.dx_layout = (tuple(x.shape), x.stride(), x.dtype)
        self.grads_layout = ((self.grads_size,), (1,), param_dtype)
        self.residual_grad = residual_grad
        self.route = "dx"
        self.launches: list[_Launch] = []
        # The usual call, which the eager autograd function runs itself (tritonbn/_ops.py): the
        # one-launch route, nothing copied, no residual gradient.
        self.direct = None
        if self.empty:
            return
        meta = {**_common_meta(x, view), **flags, "TRAINING": training, "WRITE_DR": residual_grad}
        if not training and not param_grads:
            self.launches.append(_dx_launch(view, 1.0 / view.m, slope, {**meta, "DZ_STORED": False}, replayable))
            return
        split_a, split_b, _, _ = _split(view, x.device)
        if split_a * split_b == 1:
            self.route = "one-launch"
            if view.kind == "ncs":
                kernel, grid = bwd_kernels._bn_bwd_one_launch_ncs, (c,)
                scalars = dict(N=view.n, C=c, S=view.s, stride_n=view.stride_n, stride_c=view.stride_c,
                               bucket=cfg.tuning_bucket(view.s, view.n))
            else:
                kernel, grid = bwd_kernels._bn_bwd_one_launch_rows, cfg.rows_blocks_grid(c, 1)
                scalars = dict(M=view.m, C=c, stride_m=view.stride_m, bucket=cfg.tuning_bucket(c, view.m))
            self.launches.append(_Launch(kernel, grid, {**scalars, **_pairs(inv_count=1.0 / view.m, slope=slope)},
                                         meta, replayable))
            if not (dense_copy or dy_copy or residual_copy or residual_grad):
                self.direct = self.launches[0]
            return
        self.route = "split"
        self.store_dz = residual_grad and flags["ACTIVATION"] != 0
        reduce_meta = {k: v for k, v in meta.items() if k not in ("TRAINING", "WRITE_DR")}
        reduce, self.splits = _reduce_launch(x, view, slope, {**reduce_meta, "STORE_DZ": self.store_dz}, replayable)
        dx_meta = {**meta, "DZ_STORED": self.store_dz, "WRITE_DR": residual_grad and not self.store_dz}
        self.launches += [reduce, _bwd_combine_launch(c, self.splits, replayable),
                          _dx_launch(view, 1.0 / view.m, slope, dx_meta, replayable)]


def _reduce_launch(x, view, slope, meta, replayable) -> tuple[_Launch, int]:
    """The split route's partial sums, and how many partial rows per channel it writes."""
    split_a, split_b, chunk_a, chunk_b = _split(view, x.device)
    splits = split_a * split_b
    if view.kind == "ncs":
        scalars = dict(N=view.n, C=view.c, S=view.s, stride_n=view.stride_n, stride_c=view.stride_c,
                       n_chunk=chunk_a, s_chunk=chunk_b, bucket=cfg.tuning_bucket(chunk_b, chunk_a),
                       split_n=split_a, split_s=split_b)
        kernel, grid = bwd_kernels._bn_bwd_reduce_ncs, (view.c * splits,)
    else:
        scalars = dict(M=view.m, C=view.c, stride_m=view.stride_m, m_chunk=chunk_a, split_m=splits,
                       bucket=cfg.tuning_bucket(view.c, chunk_a))
        kernel, grid = bwd_kernels._bn_bwd_reduce_rows, cfg.rows_blocks_grid(view.c, splits)
    return _Launch(kernel, grid, {**scalars, **_pairs(slope=slope)}, meta, replayable), splits


def _bwd_combine_launch(c, splits, replayable) -> _Launch:
    return _Launch(bwd_kernels._bn_bwd_combine, cfg.per_channel_grid(c), dict(C=c, splits=splits),
                   {"BLOCK_C": cfg.PER_CHANNEL_BLOCK}, replayable)


def _dx_launch(view, inv_count, slope, meta, replayable) -> _Launch:
    if view.kind == "ncs":
        kernel, grid = bwd_kernels._bn_bwd_dx_ncs, cfg.ncs_tiles_grid(view.n, view.c, view.s)
        scalars = dict(N=view.n, C=view.c, S=view.s, stride_n=view.stride_n, stride_c=view.stride_c,
                       bucket=cfg.tuning_bucket(view.s, view.n))
    else:
        kernel, grid = bwd_kernels._bn_bwd_dx_rows, cfg.rows_tiles_grid(view.m, view.c)
        scalars = dict(M=view.m, C=view.c, stride_m=view.stride_m, bucket=cfg.tuning_bucket(view.c, view.m))
    return _Launch(kernel, grid, {**scalars, **_pairs(inv_count=inv_count, slope=slope)}, meta, replayable)


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: torch.Tensor,
    training: bool,
    param_grads: bool,
    param_dtype: torch.dtype,
    residual: torch.Tensor | None = None,
    activation: int = 0,
    slope: float = 0.0,
    residual_grad: bool = False,
    residual_is_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, dresidual); dweight and dbias are empty when not asked for,
    dresidual is None. stats: the forward's [2+, C] mean and rstd rows (ACC).

    bias and residual are needed only to recompute the pre-activation z when an activation
    is fused; with ``residual_is_output`` the ``residual`` argument is the forward's output,
    whose sign gives relu's and leaky_relu's mask. (The eager autograd function finds its
    backward plan through its forward plan instead: tritonbn/_ops.py.)
    """
    plan = backward_plan(dy, x, weight, bias, training, param_grads, param_dtype, residual, activation, slope,
                         residual_grad, residual_is_output, torch._C._get_deterministic_algorithms())
    return run_backward(plan, dy, x, weight, bias, stats, residual)


def run_backward(plan, dy, x, weight, bias, stats, residual) -> tuple:
    """(dx, dweight, dbias, dresidual) of ``backward``, by its plan.

    The eager autograd function runs the usual call (``plan.direct``) itself.
    """
    if plan.dense_copy:
        x = x.contiguous()
    allocate = plan.allocators.current()
    if plan.dy_copy:
        dy = allocate(*plan.dx_layout).copy_(dy)
    if residual is not None and plan.residual_copy:
        residual = allocate(*plan.dx_layout).copy_(residual)
    residual_grad = plan.residual_grad
    dx = allocate(*plan.dx_layout)
    dweight = allocate(*plan.grads_layout)
    dbias = allocate(*plan.grads_layout)
    dresidual = allocate(*plan.dx_layout) if residual_grad else None
    if poison_outputs:
        dx, dweight, dbias, dresidual = poisoned(dx, dweight, dbias, dresidual)
    if plan.empty:
        return dx, dweight.zero_(), dbias.zero_(), dresidual
    w = weight.contiguous() if weight is not None else stats
    b = bias.contiguous() if bias is not None else stats
    r = residual if residual is not None else dx
    dr = dresidual if residual_grad else dx
    launches = plan.launches
    if plan.route == "dx":
        launches[0].enqueue(x, dy, dx, r, dr, w, b, stats, stats)  # eval: no sums are read
    elif plan.route == "one-launch":
        launches[0].enqueue(x, dy, dx, r, dr, w, b, stats, dweight, dbias)
    else:
        splits, c = plan.splits, plan.c
        parts = allocate(*_rows_layout(2 * splits, c, plan.acc))  # partial sums of dz, then of dz * xhat
        sums = allocate(*_rows_layout(2, c, plan.acc))
        if poison_outputs:
            parts, sums = poisoned(parts, sums)
        dz = dr if plan.store_dz else dy  # a pointer that is never written when not store_dz
        launches[0].enqueue(x, dy, r, dz, w, b, stats, parts)
        launches[1].enqueue(parts, sums, dweight, dbias)
        launches[2].enqueue(x, dy, dx, r, dr, w, b, stats, sums)
    return dx, dweight, dbias, dresidual


def backward_plan(dy, x, weight, bias, training, param_grads, param_dtype, residual, activation, slope, residual_grad,
                   residual_is_output, deterministic) -> _BackwardPlan:
    key = (x.shape, x.stride(), x.dtype, x.device, dy.stride(), dy.dtype, training, param_grads, param_dtype,
           None if weight is None else weight.dtype, None if bias is None else bias.dtype,
           None if residual is None else (residual.stride(), residual.dtype), activation, slope, residual_grad,
           residual_is_output, _aligned(dy, x, residual), deterministic)
    plan = _backward_plans.get(key)
    if plan is None:
        plan = _backward_plans[key] = _build_backward_plan(key, dy, x, weight, bias, training, param_grads,
                                                          param_dtype, residual, activation, slope, residual_grad,
                                                          residual_is_output)
    return plan


def _build_backward_plan(key, dy, x, weight, bias, training, param_grads, param_dtype, residual, activation, slope,
                         residual_grad, residual_is_output) -> _BackwardPlan:
    dense, view = canonical_input(x)
    flags = {"HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None, "HAS_RESIDUAL": residual is not None,
             "ACTIVATION": activation, "R_IS_OUTPUT": residual_is_output}
    return _BackwardPlan(dense, view, dense is not x, not same_layout(dy, dense),
                         residual is not None and not same_layout(residual, dense), training, param_grads,
                         param_dtype, residual_grad, flags, slope, replayable=key[-2])


def _plain_backward_meta(x, view, weight):
    meta = {**_common_meta(x, view), "HAS_WEIGHT": weight is not None, "HAS_BIAS": False, "ACTIVATION": 0,
            "HAS_RESIDUAL": False, "R_IS_OUTPUT": False}
    return meta


def grad_sums(dy: torch.Tensor, x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """[2, C]: per-channel sum(dy) and sum(dy * xhat) (SyncBatchNorm's local part); stats: the
    forward's [2+, C] mean and rstd rows."""
    x, view = canonical_input(x)
    dy = like_layout(dy, x)
    c = view.c
    acc = accumulation_dtype(x.dtype)
    if view.m == 0 or c == 0:
        return torch.zeros((2, c), dtype=acc, device=x.device)
    reduce, splits = _reduce_launch(x, view, 0.0, {**_plain_backward_meta(x, view, None), "STORE_DZ": False},
                                    replayable=False)
    parts = _empty((2 * splits, c), acc, x.device)
    reduce(x, dy, dy, dy, stats, stats, stats, parts)
    sums = _empty((2, c), acc, x.device)
    scratch = _empty((2, c), acc, x.device)  # the combine kernel's dweight/dbias, unused here
    _bwd_combine_launch(c, splits, replayable=False)(parts, sums, scratch[0], scratch[1])
    return sums


def dx_from_sums(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    mean_dy: torch.Tensor,
    mean_dy_xhat: torch.Tensor,
) -> torch.Tensor:
    """Training dx from given per-channel means of dy and dy * xhat (over the global batch);
    stats: the forward's [2+, C] mean and rstd rows."""
    x, view = canonical_input(x)
    dy = like_layout(dy, x)
    dx = _empty_like(x)
    if view.m == 0 or view.c == 0:
        return dx
    meta = {**_plain_backward_meta(x, view, weight), "TRAINING": True, "WRITE_DR": False, "DZ_STORED": False}
    w = weight.contiguous() if weight is not None else stats
    sums = torch.stack([mean_dy, mean_dy_xhat])  # the dx kernel reads [2, C]
    _dx_launch(view, 1.0, 0.0, meta, False)(x, dy, dx, dx, dx, w, stats, stats, sums)
    return dx


# ----------------------------------------------------------------------------------------------
# running statistics
# ----------------------------------------------------------------------------------------------


def update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    num_batches_tracked: torch.Tensor | None,
    momentum: float,
    count: int,
    device_count: torch.Tensor | None = None,
    count_batch: bool = False,
) -> None:
    """In place: blend the batch statistics into the running ones (see the kernel's formula).

    The standalone kernel: a training forward folds the same update into its last kernel;
    this serves torch.compile's separate op, SyncBatchNorm (``device_count``, [C] on the
    device, replaces the host ``count`` when only the device knows it) and running buffers
    that are not contiguous. ``num_batches_tracked`` given: the blend factor is 1 / its value
    (a cumulative average), unless ``count_batch``, where the kernel adds 1 to it instead
    (a fixed ``momentum``).
    """
    c = mean.numel()
    if c == 0 or (count == 0 and device_count is None):
        if count_batch:
            num_batches_tracked.add_(1)
        return
    targets = [t if t.is_contiguous() else t.contiguous() for t in (running_mean, running_var)]
    update = _Launch(rs_kernels._bn_update_running_stats, cfg.per_channel_grid(c),
                     dict(C=c, **_pairs(momentum=momentum, bessel=count / max(count - 1, 1))),
                     dict(CUMULATIVE=num_batches_tracked is not None and not count_batch, COUNT_BATCH=count_batch,
                          DEVICE_COUNT=device_count is not None,
                          ACC=_tl_acc(mean.dtype), BLOCK_C=cfg.PER_CHANNEL_BLOCK), replayable=False)
    update(targets[0], targets[1], mean, var, num_batches_tracked if num_batches_tracked is not None else mean,
           device_count if device_count is not None else mean)
    for target, original in zip(targets, (running_mean, running_var)):
        if target is not original:
            original.copy_(target)

