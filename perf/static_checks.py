"""Static (no-GPU) checks of every tritonbn kernel: ahead-of-time compile, resources, vector loads.

Every @triton.jit kernel of ``kernels/`` is compiled ahead of time for CUDA sm_90 (H100) and
sm_80 (A100), and optionally for AMD gfx942, on a machine without a GPU. Autotuned kernels are
compiled once per config of ``all_configs(kind)``; their ``triton.heuristics`` tile shapes are
computed the way the runtime computes them. For each compiled variant we report registers,
spills / local memory, shared memory, an occupancy estimate, and the width of the global loads
and stores that move the activations (the hot loops).

Fidelity to a real launch matters more than anything else here: a kernel compiled without the
``tt.divisibility`` hints a launch gives its pointers and strides keeps scalar loads, and a
report on it would say nothing about what runs. So nothing is typed in by hand:

* the launch arguments come from tritonbn's own launchers (``tritonbn._launch``), run on
  ``meta`` tensors of representative shapes with the kernel call replaced by a recorder;
* signature, constexprs and attributes come from Triton's own binder and ``_pack_args`` (what
  ``JITFunction.run`` calls before compiling), fed with stand-in pointers whose addresses carry
  the alignment a CUDA allocation would have (256-byte base plus the view's storage offset).

Triton's interpreter (``TRITON_INTERPRET=1``, set by the test suite on CPU machines) turns
@triton.jit into Python functions that cannot be compiled, so the sweep must run in a process
where it was never set; ``python perf/static_checks.py`` drops it before importing Triton.

Hot-loop accesses are told apart from per-channel ones by shape: the activation tiles are the
rank-2 ``tt.load``/``tt.store`` ops of the TTGIR; their source lines are matched with the
``!dbg`` lines of the inline-PTX accesses in the LLVM IR, whose text gives the width
(``ld.global.v4.b32`` is the ``LDG.E.128`` of the SASS). Registers and local memory come from
``cuobjdump --dump-resource-usage`` on the cubin (Triton's bundled tool), and a kernel with local
memory is disassembled to count its LDL/STL and how many sit inside loops.

Two negative controls keep the checks honest: a shape with misaligned strides must give scalar
hot loads, and a 32-register cap must spill; if either comes out clean, the analysis is blind.

The full sweep compiles every config in float32 and bfloat16 for sm_90 and sm_80, the default
config in float16 and float64, 64-bit indexing per kernel, one AMD variant per kernel, and the
fused residual + activation epilogue and SyncBatchNorm entry points where the launchers offer
them. ``--quick`` (what tests/test_static_checks.py runs) keeps every config only for float32
plain BatchNorm and the default config elsewhere.

CLI: ``python perf/static_checks.py [--out FILE] [--json FILE] [--quick] [--check] [--no-amd]``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]

CUDA_ARCHS = (90, 80)
AMD_ARCH = "gfx942"

# The shapes the launchers are driven with. Each one's contiguous extents are multiples of 16
# elements, as in the ResNet layers they come from, so a real launch gets tt.divisibility=16 on
# every pointer and stride and the hot loops can use 128-bit accesses. Each one steers the
# launcher onto one route (checked when recording), so that every kernel gets launched.
SCENARIOS = (
    # (route, shape, memory format)
    ("ncs-split", (32, 64, 56, 56), "contiguous"),  # ResNet stem-like: few channels, big planes
    ("ncs-one-launch", (32, 512, 28, 28), "contiguous"),  # many channels: one program per channel
    ("rows-split", (32, 64, 56, 56), "channels_last"),
    ("rows-one-launch", (512, 1024), "contiguous"),  # BatchNorm1d on (N, C)
)
# GroupNorm (kernels/group_norm.py), driven by tritonbn/_group_launch.py: (route, shape, memory
# format, groups). The last one is InstanceNorm's (one channel per group: D = 1 specialises).
GN_SCENARIOS = (
    ("ncs-one-launch", (8, 256, 32, 32), "contiguous", 32),  # UNet-like: many short groups
    ("ncs-split", (1, 128, 256, 256), "contiguous", 32),  # VAE-like: 32 long groups, split
    ("rows-one-launch", (8, 512, 16, 16), "channels_last", 32),
    ("rows-split", (1, 512, 64, 64), "channels_last", 32),
    # Stable Diffusion's UNet at width 640: 20 channels per group, so groups start 80 bytes
    # apart in float32 (40 in bfloat16); the kernels see C / G at compile time for that.
    ("rows-one-launch", (2, 640, 32, 32), "channels_last", 32),
    ("ncs-one-launch", (4, 64, 32, 32), "contiguous", 64),  # InstanceNorm2d(64)
)
# Negative control: a shape whose strides are not multiples of 16. Its launch loses the
# divisibility hints, so its loads must come out scalar; if the report still found 128-bit
# loads, the load analysis (not the kernel) would be broken.
MISALIGNED_SCENARIO = ("ncs-one-launch", (8, 16, 15, 15), "contiguous")

# Occupancy limits per streaming multiprocessor (CUDA occupancy calculator values).
GPU_LIMITS = {
    90: {"gpu": "H100", "regs": 65536, "max_warps": 64, "max_blocks": 32, "smem": 228 * 1024},
    80: {"gpu": "A100", "regs": 65536, "max_warps": 64, "max_blocks": 32, "smem": 164 * 1024},
}
# Registers are allocated per warp in units of 256; the driver reserves 1 KB of shared memory
# per resident block.
REG_ALLOC_UNIT = 256
SMEM_RESERVED_PER_BLOCK = 1024

DTYPES_FULL = ("float32", "bfloat16")
DTYPES_SMOKE = ("float16", "float64")


# ----------------------------------------------------------------------------------------------
# variants: what to compile
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    """One ahead-of-time compile: a kernel, its specialisation, a config and a target."""

    kernel: str
    module: str
    route: str
    dtype: str
    flags: str
    config: str
    tile: str
    target: tuple  # (backend, arch, warp size), as GPUTarget takes them
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    family: str = "per_channel"  # the autotune kind, or per_channel for untuned kernels
    role: str = "sweep"  # "sweep", "int64", "amd", or a "control-*" negative control
    expect_vector: bool = False  # every hot-loop access must be 128-bit
    bulk: bool = False  # the kernel streams activations (NCS / rows tiles)

    @property
    def arch(self) -> str:
        backend, arch, _ = self.target
        return f"sm_{arch}" if backend == "cuda" else str(arch)


class _StandInPointer:
    """What Triton's binder needs of a tensor argument: dtype, address and extent.

    The address is a 256-byte aligned base (what the CUDA caching allocator returns) plus the
    view's storage offset, so views into a shared buffer keep their real alignment.
    """

    BASE = 1 << 30

    def __init__(self, tensor):
        self.dtype = tensor.dtype
        self._address = self.BASE + tensor.storage_offset() * tensor.element_size()
        self._extent = tensor.untyped_storage().nbytes()

    def data_ptr(self) -> int:
        return self._address

    def ptr_range(self) -> int:
        # Read by the AMD backend: buffer loads need the tensor to fit in 2 GiB.
        return self._extent


def _scrub_interpreter_env() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        if "triton" in sys.modules:
            raise RuntimeError(
                "TRITON_INTERPRET is set and Triton is already imported: @triton.jit kernels are "
                "interpreter functions here and cannot be compiled. Run perf/static_checks.py in a "
                "fresh process (run_subprocess() does that)."
            )
        del os.environ["TRITON_INTERPRET"]
    # Only the full config lists are compiled; tuning switches must not shrink what the
    # autotuners hold, since the kind of each kernel is found by identity with those lists.
    os.environ.pop("TRITONBN_AUTOTUNE", None)


class Launch(NamedTuple):
    """One kernel call a launcher made: tensors replaced by stand-in pointers."""

    route: str
    tier: str  # "core": plain BatchNorm; "extra": fused epilogue and SyncBatchNorm entry points
    kernel: object
    args: tuple
    kwargs: dict


def _call(fn, **kwargs):
    """Call a launcher by keyword, passing only the parameters it has.

    The launchers grow optional features; calling by name keeps the recorder working, and a
    new required parameter fails loudly instead of shifting every positional argument.
    """
    params = inspect.signature(fn).parameters
    missing = [name for name, p in params.items() if p.default is inspect.Parameter.empty and name not in kwargs]
    if missing:
        raise RuntimeError(f"{fn.__name__} now requires {missing}: update the scenarios of perf/static_checks.py")
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def _accepts(fn, *names: str) -> bool:
    return fn is not None and all(name in inspect.signature(fn).parameters for name in names)


def _record_launches(dtype_name: str, scenarios=SCENARIOS, extra: bool = True) -> list[Launch]:
    """Run the launchers on meta tensors and return every kernel call they make.

    core: training and eval forward, backward with and without parameter gradients, the
    running-statistics update (momentum and cumulative). extra, where the launchers offer them:
    a fused residual + SiLU epilogue (the most register-hungry activation) forward and backward,
    relu (mask read off the output) and leaky_relu epilogues, and the SyncBatchNorm entry points.
    """
    import torch

    from tritonbn import _launch

    dtype = getattr(torch, dtype_name)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    calls: list[Launch] = []
    state = {"route": "", "tier": "core"}

    def recorder(kernel, grid, *args, **kwargs):
        args = tuple(_StandInPointer(a) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: _StandInPointer(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        calls.append(Launch(state["route"], state["tier"], kernel, args, kwargs))

    def empty(*shape, dtype=param_dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    try:
        from tritonbn.kernels import activation

        silu = activation.SILU
    except (ImportError, AttributeError):
        silu = None
    real_launch = _launch._launch
    _launch._launch = recorder
    try:
        for route, shape, memory_format in scenarios:
            fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
            x = torch.empty(shape, dtype=dtype, device="meta").to(memory_format=fmt)
            actual = _launch.route(x)
            if actual != route:
                raise RuntimeError(f"shape {shape} ({memory_format}) takes route {actual}, expected {route}")
            state.update(route=route, tier="core")
            c = shape[1]
            count = math.prod(shape) // c
            params = {"weight": empty(c), "bias": empty(c), "running_mean": empty(c), "running_var": empty(c)}
            y, stats, _ = _call(_launch.forward, x=x, training=True, eps=1e-5, momentum=0.1, **params)
            mean, var = stats[0], stats[2]
            _call(_launch.forward, x=x, training=False, eps=1e-5, **params)
            # A module's step: the kernel counts the batch (a fixed momentum), or reads the count.
            counter = empty(dtype=torch.int64)
            for momentum in (0.1, None):
                _call(_launch.forward, x=x, training=True, eps=1e-5, momentum=momentum, num_batches_tracked=counter,
                      **params)
            dy = torch.empty_like(y)
            grads = {"dy": dy, "x": x, "weight": params["weight"], "bias": params["bias"], "stats": stats,
                     "param_dtype": param_dtype}
            _call(_launch.backward, training=True, param_grads=True, **grads)
            _call(_launch.backward, training=False, param_grads=False, **grads)
            _call(_launch.backward, training=False, param_grads=True, **grads)
            running = {"running_mean": params["running_mean"], "running_var": params["running_var"], "mean": mean,
                       "var": var, "momentum": 0.1, "count": count}
            _call(_launch.update_running_stats, num_batches_tracked=None, **running)
            _call(_launch.update_running_stats, num_batches_tracked=empty(dtype=torch.int64), **running)
            _call(_launch.update_running_stats, num_batches_tracked=empty(dtype=torch.int64), count_batch=True,
                  **running)
            if not extra:
                continue
            state["tier"] = "extra"
            epilogue = {"residual": torch.empty_like(x), "activation": silu, "slope": 0.01}
            if silu is not None and _accepts(_launch.forward, *epilogue):
                _call(_launch.forward, x=x, training=True, eps=1e-5, momentum=0.1, **params, **epilogue)
                _call(_launch.forward, x=x, training=False, eps=1e-5, **params, **epilogue)
            if silu is not None and _accepts(_launch.backward, *epilogue, "residual_grad"):
                _call(_launch.backward, training=True, param_grads=True, residual_grad=True, **grads, **epilogue)
                _call(_launch.backward, training=False, param_grads=False, residual_grad=True, **grads, **epilogue)
            if silu is not None and _accepts(_launch.backward, "residual_is_output"):
                # relu reads its mask off the output (R_IS_OUTPUT); leaky_relu recomputes z.
                relu = {"residual": torch.empty_like(x), "activation": activation.RELU, "slope": 0.0}
                leaky = {"residual": torch.empty_like(x), "activation": activation.LEAKY_RELU, "slope": 0.01}
                _call(_launch.forward, x=x, training=True, eps=1e-5, momentum=0.1, **params, **relu)
                _call(_launch.forward, x=x, training=True, eps=1e-5, momentum=0.1, **params, **leaky)
                _call(_launch.backward, training=True, param_grads=True, residual_grad=True, residual_is_output=True,
                      **grads, **relu)
                _call(_launch.backward, training=True, param_grads=True, residual_grad=True, **grads, **leaky)
            # SyncBatchNorm: local statistics and sums always take the split route.
            if getattr(_launch, "batch_stats", None):
                _call(_launch.batch_stats, x=x, eps=1e-5)
            if getattr(_launch, "combine_stats", None):
                _call(_launch.combine_stats, counts=empty(2, c), means=empty(2, c), m2s=empty(2, c), eps=1e-5)
            if getattr(_launch, "grad_sums", None):
                _call(_launch.grad_sums, dy=dy, x=x, stats=stats)
            if getattr(_launch, "dx_from_sums", None):
                _call(_launch.dx_from_sums, dy=dy, x=x, weight=params["weight"], stats=stats, mean_dy=empty(c),
                      mean_dy_xhat=empty(c))
            if _accepts(_launch.update_running_stats, "device_count"):
                _call(_launch.update_running_stats, num_batches_tracked=None, device_count=empty(c), **running)
    finally:
        _launch._launch = real_launch
    return calls


def _record_group_launches(dtype_name: str, scenarios=GN_SCENARIOS) -> list[Launch]:
    """GroupNorm's launchers on meta tensors, as _record_launches drives BatchNorm's.

    core: forward and backward (with and without parameter gradients) and InstanceNorm's
    running-statistics update; extra: the fused residual + SiLU epilogue, forward and backward.
    """
    import torch

    from tritonbn import _group_launch, _launch
    from tritonbn.kernels import activation

    dtype = getattr(torch, dtype_name)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    calls: list[Launch] = []
    state = {"route": "", "tier": "core"}

    def recorder(kernel, grid, *args, **kwargs):
        args = tuple(_StandInPointer(a) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: _StandInPointer(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        calls.append(Launch(state["route"], state["tier"], kernel, args, kwargs))

    real_launch = _launch._launch
    _launch._launch = recorder
    try:
        for route, shape, memory_format, groups in scenarios:
            fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
            x = torch.empty(shape, dtype=dtype, device="meta").to(memory_format=fmt)
            actual = _group_launch.route(x, groups)
            if actual != route:
                raise RuntimeError(f"GroupNorm {shape} ({memory_format}, G={groups}) takes route {actual}, "
                                   f"expected {route}")
            state.update(route=f"gn-{route}", tier="core")
            c = shape[1]
            weight, bias = (torch.empty(c, dtype=param_dtype, device="meta") for _ in range(2))
            params = {"x": x, "num_groups": groups, "weight": weight, "bias": bias}
            y, mean, rstd, var = _call(_group_launch.forward, eps=1e-5, **params)
            grads = {"dy": torch.empty_like(y), **params, "mean": mean, "rstd": rstd, "param_dtype": param_dtype}
            _call(_group_launch.backward, param_grads=True, **grads)
            _call(_group_launch.backward, param_grads=False, **grads)
            if groups == c:
                running = torch.empty(c, dtype=param_dtype, device="meta")
                _call(_group_launch.update_instance_running_stats, running_mean=running, running_var=running,
                      mean=mean, var=var, n=shape[0], momentum=0.1, count=math.prod(shape[2:]))
            state["tier"] = "extra"
            epilogue = {"residual": torch.empty_like(x), "activation": activation.SILU, "slope": 0.01}
            _call(_group_launch.forward, eps=1e-5, **params, **epilogue)
            _call(_group_launch.backward, param_grads=True, residual_grad=True, **grads, **epilogue)
    finally:
        _launch._launch = real_launch
    return calls


def _autotune_kind(autotuner) -> str:
    from tritonbn.kernels import configs as cfg

    for kind in cfg.FAMILIES:
        if autotuner.configs is cfg.all_configs(kind):
            return kind
    raise RuntimeError(f"{autotuner.base_fn.__name__}: its autotune configs are none of all_configs(kind)")


def _unwrap(kernel):
    """(JITFunction, heuristics values in application order, autotune kind or None)."""
    import triton

    kind = None
    heuristics = []
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        if isinstance(fn, triton.runtime.autotuner.Autotuner):
            kind = _autotune_kind(fn)
        elif isinstance(fn, triton.runtime.autotuner.Heuristics):
            heuristics.append(fn.values)
        fn = fn.fn
    return fn, heuristics, kind


def _flags_label(kwargs: dict) -> str:
    words = []
    for key, value in kwargs.items():
        if isinstance(value, bool) and key != "INT64_INDEX":
            words.append(key if value else f"!{key}")
        elif isinstance(value, int) and not isinstance(value, bool) and value and key.isupper() \
                and not key.startswith("BLOCK_"):
            words.append(f"{key}={value}")  # e.g. ACTIVATION=2
    if kwargs.get("INT64_INDEX"):
        words.append("INT64_INDEX")
    return " ".join(words) or "-"


def _specialise(jit, args: tuple, kwargs: dict, target: tuple):
    """Signature, constexprs, attrs and options exactly as JITFunction.run builds them."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget(*target))
    # The options JITFunction.run adds before binding (kernels here set no debug of their own).
    kwargs = dict(kwargs, debug=bool(jit.debug or knobs.runtime.debug),
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # Triton >= 3.7 adds this option
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, dict(options.__dict__)


def _tile_label(constexprs: dict, jit) -> str:
    names = jit.arg_names
    values = {names[k[0]]: v for k, v in constexprs.items()}
    for a, b in (("BLOCK_N", "BLOCK_S"), ("BLOCK_M", "BLOCK_C"), ("BLOCK_C", "BLOCK_S")):
        if a in values and b in values:
            return f"{values[a]}x{values[b]}"
    return f"{values['BLOCK_C']}" if "BLOCK_C" in values else "-"


def _config_label(config) -> str:
    label = " ".join([*(f"{k}={v}" for k, v in config.kwargs.items()), f"w{config.num_warps}"])
    return label + (f" maxnreg={config.maxnreg}" if config.maxnreg else "")


def config_labels() -> dict[str, list[str]]:
    """Every autotune family's configs, as the report labels them."""
    from tritonbn.kernels import configs as cfg

    return {kind: [_config_label(c) for c in cfg.all_configs(kind)]
            for kind in cfg.FAMILIES}


def build_variants(quick: bool = False, amd: bool = True) -> list[Variant]:
    """Every compile of the sweep. quick: the subset the test suite runs (see module docstring)."""
    import triton

    variants: list[Variant] = []
    seen: set[str] = set()

    def add(route, kernel, args, kwargs, dtype, target, config=None, role="sweep", expect_vector=None):
        jit, heuristics, kind = _unwrap(kernel)
        # The launcher's own flags (its constexprs), before config and heuristics; its scalars
        # come by keyword too and are no flags.
        constexpr_names = {param.name for param in jit.params if param.is_constexpr}
        flags = _flags_label({k: v for k, v in kwargs.items() if k in constexpr_names})
        kwargs = dict(kwargs)
        config_label = "-"
        if config is not None:
            kwargs.update(config.all_kwargs())
            config_label = _config_label(config)
        named = dict(zip(jit.arg_names, args))
        for values in heuristics:  # outermost first, as Heuristics.run applies them
            for name, rule in values.items():
                kwargs[name] = rule({**named, **kwargs})
        signature, constexprs, attrs, options = _specialise(jit, args, kwargs, target)
        key = json.dumps([jit.__name__, str(signature), str(sorted(constexprs.items())), str(attrs),
                          str(sorted(options.items())), target, role])
        if key in seen:
            return
        seen.add(key)
        bulk = kind is not None
        if expect_vector is None:
            expect_vector = bulk and target[0] == "cuda" and dtype == "float32"
        variants.append(Variant(
            kernel=jit.__name__, module=jit.fn.__module__, route=route, dtype=dtype,
            flags=flags, config=config_label, tile=_tile_label(constexprs, jit),
            target=target, signature=signature, constexprs=constexprs, attrs=attrs, options=options,
            family=kind or "per_channel", role=role, expect_vector=expect_vector, bulk=bulk,
        ))

    from tritonbn.kernels import configs as cfg

    cuda_targets = [("cuda", arch, 32) for arch in CUDA_ARCHS]

    def plan(dtype: str, tier: str) -> tuple[bool, list]:
        """(every config?, targets) for a dtype and tier: the quick sweep is the test suite's."""
        if quick:
            if dtype == "float32":
                return (True, cuda_targets) if tier == "core" else (False, cuda_targets[:1])
            return (False, cuda_targets[:1]) if tier == "core" else (False, [])
        if dtype in DTYPES_FULL:
            return True, cuda_targets
        return False, cuda_targets if tier == "core" else cuda_targets[:1]

    for dtype in DTYPES_FULL + DTYPES_SMOKE:
        calls = _record_launches(dtype) + _record_group_launches(dtype)
        for route, tier, kernel, args, kwargs in calls:
            every, targets = plan(dtype, tier)
            _, _, kind = _unwrap(kernel)
            for target in targets:
                if kind is None:
                    add(route, kernel, args, kwargs, dtype, target)
                    continue
                # The configs tuning tries for this launch (its family's pruning applied).
                named = {**dict(zip(_unwrap(kernel)[0].arg_names, args)), **kwargs}
                tried = cfg.runtime_configs(kind, named)
                for config in tried if every else tried[:1]:
                    add(route, kernel, args, kwargs, dtype, target, config)
        if dtype != "float32":
            continue
        # 64-bit indexing: the launchers pick it for > 2^31 elements, which meta tensors could
        # fake, but the flag alone decides the code; the same sizes keep the rows comparable.
        done = set()
        for route, _, kernel, args, kwargs in calls:
            jit, _, kind = _unwrap(kernel)
            if "INT64_INDEX" in kwargs and jit.__name__ not in done:
                done.add(jit.__name__)
                add(route, kernel, args, {**kwargs, "INT64_INDEX": True}, dtype, cuda_targets[0],
                    cfg.all_configs(kind)[0], role="int64")
        if amd:
            families = set()
            for route, _, kernel, args, kwargs in calls:
                jit, _, kind = _unwrap(kernel)
                family = (kind or "per_channel") if quick else jit.__name__
                if family in families:
                    continue
                families.add(family)
                add(route, kernel, args, kwargs, dtype, ("hip", AMD_ARCH, 64),
                    cfg.all_configs(kind)[0] if kind else None, role="amd", expect_vector=False)
        # Negative controls: each must show the defect its detector looks for.
        for route, _, kernel, args, kwargs in _record_launches(dtype, (MISALIGNED_SCENARIO,), extra=False):
            if _unwrap(kernel)[0].__name__ == "_bn_fwd_one_launch_ncs":
                add(route, kernel, args, kwargs, dtype, cuda_targets[0], cfg.all_configs("ncs_reduce")[0],
                    role="control-misaligned", expect_vector=False)
                break
        for route, _, kernel, args, kwargs in calls:
            if _unwrap(kernel)[0].__name__ == "_bn_bwd_one_launch_rows":
                starved = triton.Config(dict(cfg.all_configs("rows_reduce")[-1].kwargs), num_warps=8, maxnreg=32)
                add(route, kernel, args, kwargs, dtype, cuda_targets[0], starved,
                    role="control-spill", expect_vector=False)
                break
    return variants


def kernel_inventory() -> set[str]:
    """Every kernel entry point of the kernels package: autotuned or heuristic-wrapped kernels,
    and plain @triton.jit functions named ``_bn_*`` or ``_gn_*`` (helpers called from kernels are not)."""
    import importlib
    import pkgutil

    import triton

    import tritonbn.kernels as package

    found = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            wrapped = isinstance(value, (triton.runtime.autotuner.Autotuner, triton.runtime.autotuner.Heuristics))
            if wrapped or (name.startswith(("_bn_", "_gn_")) and isinstance(value, triton.runtime.jit.JITFunction)):
                found.add(name)
    return found


# ----------------------------------------------------------------------------------------------
# compile and analyse (runs in worker processes)
# ----------------------------------------------------------------------------------------------


_LOC_DEF = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$")
_FILE_LINE = re.compile(r'^"([^"]+)":(\d+):\d+')
_REF = re.compile(r"#loc\d*")
_RANK2_ACCESS = re.compile(r"\b(tt\.load|tt\.store)\b.*:\s*tensor<\d+x\d+x!tt\.ptr<[^>]+>.*loc\((#loc\d*)\)")


def _resolve_loc(text: str, defs: dict) -> tuple[str, int] | None:
    """Innermost (file, line) of an MLIR location: callsite(callee at caller) keeps the callee."""
    for _ in range(100):
        text = text.strip()
        match = _FILE_LINE.match(text)
        if match:
            return match.group(1), int(match.group(2))
        if text.startswith("callsite("):
            text = text[len("callsite("):]
        elif text.startswith("fused["):
            text = text[len("fused["):]
        elif text.startswith('"'):  # a named location: "x"(#loc12)
            rest = text[text.index('"', 1) + 1:]
            if not rest.startswith("("):
                return None
            text = rest[1:]
        else:
            ref = _REF.match(text)
            if not (ref and ref.group(0) in defs):
                return None
            text = defs[ref.group(0)]
    return None


def hot_access_lines(ttgir: str) -> dict[tuple[str, int], str]:
    """Source lines of the rank-2 (activation tile) loads and stores: {(file, line): 'ld'|'st'}.

    Per-channel vectors are rank-1 and scalars untyped, so rank 2 singles out the tiles that
    stream the activations, whatever the tensors are called.
    """
    defs = {}
    for line in ttgir.splitlines():
        match = _LOC_DEF.match(line)
        if match:
            defs[match.group(1)] = match.group(2)
    lines = {}
    for line in ttgir.splitlines():
        match = _RANK2_ACCESS.search(line)
        if match:
            where = _resolve_loc(match.group(2), defs)
            if where is not None:
                lines[(os.path.realpath(where[0]), where[1])] = "ld" if match.group(1) == "tt.load" else "st"
    return lines


_LL_ASM_ACCESS = re.compile(r'asm sideeffect "([^"]*)".*!dbg (![0-9]+)')
_LL_PLAIN_ACCESS = re.compile(r"=\s*load (?:volatile )?([^,]+), ptr addrspace\(1\).*!dbg (![0-9]+)|"
                              r"^\s*store (?:volatile )?(\S+(?: x \S+>)?) [^,]+, ptr addrspace\(1\).*!dbg (![0-9]+)")
# Inline asm escapes newline-tab as \0A\09, so "09ld.global" has no word boundary before "ld".
_PTX_GLOBAL = re.compile(r"(?<![A-Za-z_.])(ld|st)\.global(\.[\w:.]+)")
_LL_META = re.compile(r"^(![0-9]+) = (?:distinct )?(.*)$")
_LL_TYPE_BITS = {"float": 32, "i32": 32, "double": 64, "i64": 64, "half": 16, "bfloat": 16, "i16": 16, "i8": 8}


def _access_bits(modifiers: str) -> int:
    """Bits moved by one PTX access: .v4.b32 is 128, .b16 is 16."""
    lanes, bits = 1, 32
    for part in modifiers.strip(".").split("."):
        if re.fullmatch(r"v\d", part):
            lanes = int(part[1:])
        elif re.fullmatch(r"[busf]\d+", part):
            bits = int(part[1:])
    return lanes * bits


def _ll_type_bits(text: str) -> int:
    vector = re.fullmatch(r"<(\d+) x (\w+)>", text.strip())
    if vector:
        return int(vector.group(1)) * _LL_TYPE_BITS.get(vector.group(2), 32)
    return _LL_TYPE_BITS.get(text.strip(), 32)


def _ll_source_line(ref: str, meta: dict) -> tuple[str, int] | None:
    """(file, line) of an LLVM !DILocation: its own line, in the file of its scope chain."""
    location = meta.get(ref, "")
    line = re.search(r"\bline: (\d+)", location)
    scope = re.search(r"\bscope: (![0-9]+)", location)
    if not (line and scope):
        return None
    node = scope.group(1)
    for _ in range(20):
        text = meta.get(node, "")
        file_ref = re.search(r"\bfile: (![0-9]+)", text)
        if file_ref:
            file_text = meta.get(file_ref.group(1), "")
            name = re.search(r'filename: "([^"]*)"', file_text)
            directory = re.search(r'directory: "([^"]*)"', file_text)
            if name:
                path = os.path.join(directory.group(1) if directory else "", name.group(1))
                return os.path.realpath(path), int(line.group(1))
        parent = re.search(r"\bscope: (![0-9]+)", text)
        if not parent:
            return None
        node = parent.group(1)
    return None


def llir_accesses(llir: str, hot_lines: dict) -> dict:
    """Global loads/stores of the LLVM IR by width, split into hot-loop and other.

    Triton lowers every tl.load/tl.store to inline PTX (ld.global.v4.b32 and so on) tagged with
    the op's own source location; llc and ptxas keep those widths (ld.global.v4.b32 becomes
    LDG.E.128). The LLVM IR is read rather than the PTX or SASS because llc's scheduling
    blurs the PTX .loc lines, while the IR's !dbg still names the tl.load.
    """
    meta = {}
    for line in llir.splitlines():
        match = _LL_META.match(line)
        if match:
            meta[match.group(1)] = match.group(2)
    hot = {"ld": collections.Counter(), "st": collections.Counter()}
    other = {"ld": collections.Counter(), "st": collections.Counter()}
    for line in llir.splitlines():
        accesses = []
        match = _LL_ASM_ACCESS.search(line)
        if match:
            where = _ll_source_line(match.group(2), meta)
            accesses = [(kind, _access_bits(mods), where) for kind, mods in _PTX_GLOBAL.findall(match.group(1))]
        else:
            match = _LL_PLAIN_ACCESS.search(line)
            if match and match.group(1):
                accesses = [("ld", _ll_type_bits(match.group(1)), _ll_source_line(match.group(2), meta))]
            elif match:
                accesses = [("st", _ll_type_bits(match.group(3)), _ll_source_line(match.group(4), meta))]
        for kind, bits, where in accesses:
            bucket = hot if hot_lines.get(where) == kind else other
            bucket[kind][bits] += 1
    return {"hot": hot, "other": other}


def _nvidia_tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


_SASS_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def local_accesses(sass: str) -> dict:
    """LDL/STL instructions of a SASS listing, and how many sit inside a loop.

    A loop is the address range a backward branch jumps over; a spill there runs every
    iteration, while one outside the loops runs once per program.
    """
    insns = [(int(addr, 16), op, rest) for addr, op, rest in _SASS_INSN.findall(sass)]
    loops = []
    for addr, op, rest in insns:
        target = re.search(r"0x([0-9a-f]+)", rest)
        if op.startswith("BRA") and target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    local = [addr for addr, op, _ in insns if op.split(".")[0] in ("LDL", "STL")]
    in_loops = [addr for addr in local if any(lo <= addr <= hi for lo, hi in loops)]
    return {"spill_insts": len(local), "spill_insts_in_loops": len(in_loops)}


def _cuda_analysis(compiled, hot_lines: dict, arch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                               check=True, capture_output=True, text=True).stdout
        # Spills land in local memory: LOCAL (bytes per thread) or the stack frame is non-zero
        # exactly when ptxas spilled or the kernel keeps an addressable array there.
        fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
        if "REG" not in fields:
            raise RuntimeError(f"cuobjdump printed no resource usage: {usage[:200]!r}")
        spills = {"spill_insts": 0, "spill_insts_in_loops": 0}
        if int(fields.get("LOCAL", 0)) or int(fields.get("STACK", 0)):
            # Disassembling costs ~0.5 s, so only where there is local memory to place.
            sass = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-sass", str(cubin)],
                                  check=True, capture_output=True, text=True).stdout
            spills = local_accesses(sass)
    regs = int(fields["REG"])
    shared = int(compiled.metadata.shared) + int(fields.get("SHARED", 0))
    accesses = llir_accesses(compiled.asm["llir"], hot_lines)
    warps = compiled.metadata.num_warps
    occ = occupancy(regs, warps, shared, GPU_LIMITS[arch])
    return {
        "regs": regs, "stack": int(fields.get("STACK", 0)), "local": int(fields.get("LOCAL", 0)),
        "spills": spills["spill_insts"], "spills_in_loops": spills["spill_insts_in_loops"],
        "shared": shared, "warps": warps,
        "occupancy": occ["occupancy"], "occupancy_limiter": occ["limiter"], "gpu": GPU_LIMITS[arch]["gpu"],
        "hot": {k: dict(v) for k, v in accesses["hot"].items()},
        "other": {k: dict(v) for k, v in accesses["other"].items()},
    }


_AMD_ACCESS = re.compile(r"^\s*(global|buffer)_(load|store)_(dwordx4|dwordx3|dwordx2|dword|short|ushort|sshort|"
                         r"byte|ubyte|sbyte|b128|b96|b64|b32|b16|u16|d16\w*)\b")
_AMD_BITS = {"dwordx4": 128, "b128": 128, "dwordx3": 96, "b96": 96, "dwordx2": 64, "b64": 64, "dword": 32,
             "b32": 32}


def _amd_analysis(compiled) -> dict:
    asm = compiled.asm["amdgcn"]

    def stat(name):
        match = re.search(rf"^\s*;\s*{name}:\s*(\d+)", asm, re.M)
        return int(match.group(1)) if match else 0

    widths = {"ld": collections.Counter(), "st": collections.Counter()}
    for line in asm.splitlines():
        match = _AMD_ACCESS.match(line)
        if match:
            widths["ld" if match.group(2) == "load" else "st"][_AMD_BITS.get(match.group(3), 16)] += 1
    spills = sum(int(n) for n in re.findall(r"\.[sv]gpr_spill_count:\s*(\d+)", asm))
    waves = stat("Occupancy")
    return {
        "regs": stat("TotalNumVgprs") or stat("NumVgprs"), "stack": 0, "local": stat("ScratchSize"), "spills": spills,
        "spills_in_loops": None,
        "shared": int(compiled.metadata.shared), "warps": compiled.metadata.num_warps,
        # gfx942 runs at most 8 waves per SIMD; the compiler's own estimate.
        "occupancy": waves / 8 if waves else None, "occupancy_limiter": f"{waves}/8 waves per SIMD",
        "gpu": "MI300X",
        # The AMD backend lowers loads to buffer ops that the rank-2 tt.load search does not see,
        # and its ISA line table is scheduled out of order: widths are reported unattributed.
        "hot": {"ld": {}, "st": {}}, "other": {k: dict(v) for k, v in widths.items()},
    }


def occupancy(regs: int, warps: int, shared: int, limits: dict) -> dict:
    """Fraction of the SM's warp slots a kernel can fill, and what limits it."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by = {
        "warps": limits["max_warps"] // warps,
        "regs": (limits["regs"] // regs_per_warp) // warps,
        "blocks": limits["max_blocks"],
        "smem": limits["smem"] // (shared + SMEM_RESERVED_PER_BLOCK),
    }
    limiter = min(by, key=by.get)
    blocks = by[limiter]
    return {"occupancy": blocks * warps / limits["max_warps"], "limiter": limiter, "blocks": blocks}


_REDUCE_OP = re.compile(r'"tt\.reduce"\(.*?<\{axis = (\d+) : i32\}>.*?\}\) : \(tensor<([0-9x]+)x[a-z]+\d*>', re.S)


def widest_reduction(ttir: str) -> int:
    """The most values any ``tt.reduce`` of the kernel folds together along its axis (0: none).

    A reduction over more than two values adds in an order set by the register layout, which
    follows num_warps; the reducing kernels must only fold pairs (kernels/common.py), so that
    their bits do not depend on the tuned config."""
    widest = 0
    for axis, shape in _REDUCE_OP.findall(ttir):
        widest = max(widest, int(shape.split("x")[int(axis)]))
    return widest


def compile_variant(variant: Variant) -> dict:
    """Compile one variant and analyse it; errors are returned, not raised."""
    import importlib
    import warnings

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = {k: v for k, v in dataclasses.asdict(variant).items()
              if k not in ("signature", "constexprs", "attrs", "options")}
    result["arch"] = variant.arch
    start = time.perf_counter()
    try:
        jit, _, _ = _unwrap(getattr(importlib.import_module(variant.module), variant.kernel))
        source = ASTSource(fn=jit, signature=variant.signature, constexprs=variant.constexprs, attrs=variant.attrs)
        compiled = triton.compile(source, target=GPUTarget(*variant.target), options=variant.options)
        result["widest_reduction"] = widest_reduction(compiled.asm["ttir"])
        if variant.target[0] == "cuda":
            result.update(_cuda_analysis(compiled, hot_access_lines(compiled.asm["ttgir"]), variant.target[1]))
        else:
            result.update(_amd_analysis(compiled))
        result["error"] = None
    except Exception as exc:  # noqa: BLE001 - a compile failure is a result of the sweep
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        result["error"] = f"{type(exc).__name__}: {' | '.join(lines[:6])[:600]}"
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _worker_init() -> None:
    _scrub_interpreter_env()


def _cost(variant: Variant) -> float:
    # Longest first, so the two workers finish together: fused kernels have two loops, and
    # compile time grows with the tile.
    tile = 1
    for part in variant.tile.split("x"):
        tile *= int(part) if part.isdigit() else 1
    return (3 if "one_launch" in variant.kernel else 1) * math.log2(tile + 1) + (2 if variant.target[0] == "hip" else 0)


def run_sweep(variants: list[Variant], workers: int = 2, progress: bool = True) -> list[dict]:
    import multiprocessing

    order = sorted(range(len(variants)), key=lambda i: -_cost(variants[i]))
    results: list[dict | None] = [None] * len(variants)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init) as pool:
        futures = {pool.submit(compile_variant, variants[i]): i for i in order}
        for done, future in enumerate(as_completed(futures), 1):
            results[futures[future]] = future.result()
            if progress and (done % 25 == 0 or done == len(variants)):
                print(f"  compiled {done}/{len(variants)}", file=sys.stderr, flush=True)
    return results


# ----------------------------------------------------------------------------------------------
# verdicts and report
# ----------------------------------------------------------------------------------------------


def _widths(counter: dict) -> str:
    if not counter:
        return "-"
    return " ".join(f"{n}x{bits}b" for bits, n in sorted(((int(b), n) for b, n in counter.items()), reverse=True))


def _all_128(counter: dict) -> bool:
    return bool(counter) and all(int(bits) >= 128 for bits in counter)


# A stack frame this small with no spill instruction inside a loop costs one store and one
# load per thread and program: reported, not failed. ptxas parks one value across a loop that
# way even far below the register limit, and which variants get such a frame moves with the
# Triton version and the target.
BENIGN_FRAME_BYTES = 8


def harmful_spill(result: dict) -> bool:
    """Local memory that costs: more than a benign frame, or spill code inside a loop (AMD
    results do not locate their spills, so any counts)."""
    size = result["local"] + result["stack"]
    if not (size or result["spills"]):
        return False
    return size > BENIGN_FRAME_BYTES or result.get("spills_in_loops") != 0


def problems(result: dict) -> list[str]:
    """Why a result fails the checks (empty: it passes). Negative controls fail when clean."""
    role = result["role"]
    if result.get("error"):
        return [f"compile error: {result['error']}"]
    if role == "control-spill":
        spilled = result["local"] > 0 or result["stack"] > 0 or result["spills"] > 0
        return [] if spilled else ["negative control: a 32-register cap must spill, but no spill was seen"]
    spilled = harmful_spill(result)
    hot = result["hot"]
    if role == "control-misaligned":
        if not hot["ld"]:
            return ["negative control: no hot-loop loads found to classify"]
        return ["negative control: misaligned strides still gave 128-bit loads"] if any(
            int(bits) >= 128 for bits in hot["ld"]) else []
    found = []
    if spilled:
        found.append(f"spills / local memory: {_local_text(result)}")
    if result["family"] in _reducing_families() and result["widest_reduction"] > 2:
        found.append(f"a tt.reduce folds {result['widest_reduction']} values: its order would follow the warps")
    if result["expect_vector"]:
        if not _all_128(hot["ld"]):
            found.append(f"hot-loop loads not all 128-bit: {_widths(hot['ld'])}")
        if not _all_128(hot["st"]) and hot["st"]:
            found.append(f"hot-loop stores not all 128-bit: {_widths(hot['st'])}")
    return found


def _reducing_families() -> frozenset:
    from tritonbn.kernels import configs as cfg

    return cfg.REDUCING_FAMILIES


def _local_text(result: dict) -> str:
    """Local memory of a result in words: bytes, and where its spill instructions are."""
    size = result["local"] + result["stack"]
    if not (size or result["spills"]):
        return "0"
    text = f"{size} B, {result['spills']} LDL/STL"
    if result.get("spills_in_loops") is not None:
        text += f", {result['spills_in_loops']} in loops"
    return text


def _note(result: dict) -> str:
    if result.get("error"):
        return "ERROR"
    if result["role"].startswith("control"):
        return "control ok" if not problems(result) else "CONTROL FAILED"
    found = problems(result)
    if found:
        return "FAIL: " + "; ".join(found)
    if result["bulk"] and result["hot"]["ld"] and not _all_128(result["hot"]["ld"]):
        return "not 128-bit"
    return "ok"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _kernel_summary(results: list[dict]) -> list[str]:
    """One line per kernel over its CUDA sweep variants: registers, occupancy, load widths."""
    rows = collections.defaultdict(list)
    for r in results:
        if not r.get("error") and r["role"] in ("sweep", "int64") and r["target"][0] == "cuda":
            rows[r["kernel"]].append(r)
    out = ["| kernel | variants | regs (min-max) | lowest occ. (H100, sm_90) | hot ld widths | "
           "spills / local |", "|---|---|---|---|---|---|"]
    for kernel, group in rows.items():
        regs = [r["regs"] for r in group]
        h100 = [r for r in group if r["arch"] == "sm_90"]
        worst = min(h100, key=lambda r: r["occupancy"]) if h100 else None
        worst_text = (f"{_pct(worst['occupancy'])} ({worst['regs']} regs, {worst['config']}, {worst['dtype']})"
                      if worst else "-")
        widths = sorted({bits for r in group for bits in r["hot"]["ld"]}, key=int, reverse=True)
        width_text = ", ".join(f"{bits}b" for bits in widths) or "-"
        spilled = [r for r in group if r["local"] or r["stack"] or r["spills"]]
        spill_text = "; ".join(sorted({f"{r['arch']} {r['dtype']} {r['config']}: {_local_text(r)}"
                                       for r in spilled})) or "none"
        out.append(f"| {kernel} | {len(group)} | {min(regs)}-{max(regs)} | {worst_text} | {width_text} | "
                   f"{spill_text} |")
    return out


def render_markdown(results: list[dict], header: str) -> str:
    """The report: a summary, then one table row per compiled variant."""
    ok = [r for r in results if not r.get("error")]
    errors = [r for r in results if r.get("error")]
    failing = [r for r in results if problems(r)]
    spills = [r for r in ok if not r["role"].startswith("control")
              and (r["local"] or r["stack"] or r["spills"])]
    scalar = [r for r in ok if r["bulk"] and not r["role"].startswith("control") and r["hot"]["ld"]
              and not _all_128(r["hot"]["ld"])]
    amd = [r for r in results if r["role"] == "amd"]
    out = [header, ""]
    out.append(f"{len(results)} variants compiled ahead of time ({len(errors)} compile errors, "
               f"{len(failing)} failing a check, {len(spills)} with spills or local memory"
               + (f", {len(amd)} for AMD {AMD_ARCH}" if amd else f"; AMD {AMD_ARCH} not compiled") + ").")
    out.append("")
    out.append("How to read it: *regs* per thread; *local* = local memory bytes per thread (spills or stack "
               "frame); *smem* = shared memory per block (Triton's reduction scratch); *occ.* = resident "
               "warps / 64 per SM on the GPU named (H100 for sm_90, A100 for sm_80), and what limits them; "
               "*hot ld* / *hot st* = global loads / stores of the activation tiles (the rank-2 "
               "tl.load/tl.store in the hot loops), as count x width, attributed through the LLVM IR's "
               "debug locations; *other* = every other global access (per-channel vectors and scalars; on "
               "AMD, all accesses, unattributed). Tile = BLOCK_N x BLOCK_S (NCS) or BLOCK_M x BLOCK_C (rows). "
               "Control rows are negative controls that must show the defect their check looks for.")
    out.append("")
    out.append("## Per kernel (CUDA sweep variants)")
    out.append("")
    out.extend(_kernel_summary(results))
    out.append("")
    out.append("## Findings")
    out.append("")
    if scalar:
        by_kernel = collections.defaultdict(set)
        for r in scalar:
            by_kernel[(r["kernel"], r["dtype"], r["arch"])].add(_widths(r["hot"]["ld"]))
        out.append("Hot loops without 128-bit loads (a check failure for float32 on CUDA):")
        out.append("")
        for (kernel, dtype, arch), widths in sorted(by_kernel.items()):
            out.append(f"- {kernel} {dtype} {arch}: {', '.join(sorted(widths))}")
    else:
        out.append("Every hot-loop load and store of every CUDA variant is 128-bit.")
    out.append("")
    for r in failing:
        out.append(f"- **{r['kernel']} {r['dtype']} {r['arch']} {r['config']} {r['flags']} ({r['route']})**: "
                   + "; ".join(problems(r)))
    if not failing:
        out.append("No variant fails a check.")
    out.append("")
    out.append("## Every variant")
    out.append("")
    columns = ["kernel", "route", "flags", "dtype", "arch", "config", "tile", "regs", "local", "smem",
               "occ.", "hot ld", "hot st", "other ld", "role", "verdict"]
    out.append("| " + " | ".join(columns) + " |")
    out.append("|" + "|".join("---" for _ in columns) + "|")
    for r in results:
        if r.get("error"):
            cells = [r["kernel"], r["route"], r["flags"], r["dtype"], r["arch"], r["config"], r["tile"],
                     "", "", "", "", "", "", "", r["role"], "ERROR: " + r["error"].replace("|", "/")[:200]]
        else:
            cells = [r["kernel"], r["route"], r["flags"], r["dtype"], r["arch"], r["config"], r["tile"],
                     str(r["regs"]), _local_text(r), str(r["shared"]),
                     f"{_pct(r['occupancy'])} {r['gpu']} ({r['occupancy_limiter']})",
                     _widths(r["hot"]["ld"]), _widths(r["hot"]["st"]), _widths(r["other"]["ld"]),
                     r["role"], _note(r)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def report_header(date: str | None = None) -> str:
    import triton

    date = date or datetime.date.today().isoformat()
    return (f"# tritonbn static compile report ({date}, triton {triton.__version__}): static (no-GPU) "
            f"ahead-of-time compile for CUDA sm_90/sm_80 and AMD {AMD_ARCH}; nothing here ran on a GPU.")


def run_subprocess(argv: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """Run this CLI in a fresh interpreter without TRITON_INTERPRET (for tests that set it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITONBN_AUTOTUNE")}
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--json", type=Path, help="write every result as JSON here")
    parser.add_argument("--quick", action="store_true",
                        help="the test suite's subset: every config for float32 plain BatchNorm on sm_90 "
                             "and sm_80; the default config for the fused epilogue and SyncBatchNorm "
                             "variants and the other dtypes (sm_90); one AMD variant per config family")
    parser.add_argument("--no-amd", action="store_true", help="skip the AMD gfx942 compiles")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--date", help="date for the report header (default: today)")
    parser.add_argument("--check", action="store_true", help="exit 1 if any variant fails a check")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")
    args = parser.parse_args(argv)

    _scrub_interpreter_env()
    import warnings

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    start = time.perf_counter()
    amd = not args.no_amd
    if amd:
        amd, why = _amd_available()
        if not amd:
            print(f"note: skipping AMD {AMD_ARCH} compiles: {why}", file=sys.stderr)
    variants = build_variants(quick=args.quick, amd=amd)
    inventory = kernel_inventory()
    missing = inventory - {v.kernel for v in variants}
    print(f"{len(variants)} variants of {len(inventory)} kernels; compiling on {args.workers} workers",
          file=sys.stderr, flush=True)
    results = run_sweep(variants, workers=args.workers)
    elapsed = time.perf_counter() - start
    report = render_markdown(results, report_header(args.date))
    if missing:
        report += f"\nKernels never launched by the recorded scenarios (not compiled): {sorted(missing)}\n"
    if not args.quiet:
        print(report)
    print(f"static checks: {len(results)} variants in {elapsed:.0f} s", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "inventory": sorted(inventory),
                                         "missing": sorted(missing), "config_labels": config_labels(),
                                         "triton": _triton_version(),
                                         "seconds": elapsed}, indent=1))
    failed = missing or any(problems(r) for r in results)
    return 1 if (args.check and failed) else 0


def _triton_version() -> str:
    import triton

    return triton.__version__


def _amd_available() -> tuple[bool, str]:
    """Whether the hip backend compiles here: a probe kernel, all the way to a code object."""
    try:
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        @triton.jit
        def _probe(X, BLOCK: tl.constexpr):
            tl.store(X + tl.arange(0, BLOCK), tl.load(X + tl.arange(0, BLOCK)) + 1.0)

        triton.compile(ASTSource(fn=_probe, signature={"X": "*fp32", "BLOCK": "constexpr"}, constexprs={"BLOCK": 64}),
                       target=GPUTarget("hip", AMD_ARCH, 64))
    except Exception as exc:  # noqa: BLE001 - any failure here just means: skip AMD
        first = str(exc).strip().splitlines()[:1]
        return False, f"{type(exc).__name__}: {first[0] if first else ''}"
    return True, ""


if __name__ == "__main__":
    _scrub_interpreter_env()
    sys.exit(main())
