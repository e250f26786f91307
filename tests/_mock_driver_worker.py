"""Run in a subprocess by tests/test_launch_plans.py: tritonbn on perf/mock_driver.py.

The test process interprets kernels (TRITON_INTERPRET=1), where nothing is compiled and so
nothing is replayed. Here kernels compile for sm_90 and the launcher records its arguments
instead of launching, so the test can hold every replayed launch against the launch Triton's
own path makes for the same call: same kernel, grid, scalars, constexprs and metadata, and
the call's own tensors in the same places. Call 0 of each case compiles and tunes, call 1
takes Triton's launch path (a launch hook turns replay off), call 2 replays.

Prints one JSON object on its last line.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITONBN_CACHE_DIR"] = tempfile.mkdtemp(prefix="tritonbn-mock-tuning-")

from perf import mock_driver  # noqa: E402

launches = []


class RecordingLauncher:
    def __init__(self, src, metadata):
        self.name = metadata.name

    def __call__(self, grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata, enter_hook,
                 exit_hook, *args):
        launches.append((self.name, (grid_0, grid_1, grid_2), packed_metadata, args))


driver = mock_driver.install()
driver.launcher_cls = RecordingLauncher

import torch  # noqa: E402
from triton import knobs  # noqa: E402

import tritonbn  # noqa: E402
from tritonbn import _launch  # noqa: E402


def _no_op_hook(metadata) -> None:
    pass


def _describe(value, names: dict) -> object:
    """A tensor as the name of the role it plays in this call, anything else as itself."""
    if isinstance(value, torch.Tensor):
        for name, tensor in names.items():
            if tensor is value:
                return name
        return f"tensor{tuple(value.shape)}"  # an allocation of the launcher's own
    return repr(value)


def _record(step, names: dict) -> list:
    start = len(launches)
    step()
    return [(name, grid, repr(meta), [_describe(a, names) for a in args])
            for name, grid, meta, args in launches[start:]]


def _three_calls(module, shape, memory_format, with_residual: bool) -> tuple[list, torch.Tensor]:
    """A training step three times on fresh tensors: call 0 compiles and tunes; call 1 takes
    Triton's own launch path (a launch hook is installed, which turns replay off); call 2
    replays. Returns each call's launches and launch count, and the last input."""
    calls = []
    for call in range(3):
        x = torch.randn(shape)
        if memory_format is not None:
            x = x.contiguous(memory_format=memory_format)
        x.requires_grad_(True)
        residual = torch.randn_like(x) if with_residual else None
        dy = torch.randn_like(x)
        names = {"x": x, "dy": dy, "residual": residual, "weight": module.weight, "bias": module.bias,
                 "running_mean": getattr(module, "running_mean", None),
                 "running_var": getattr(module, "running_var", None)}

        def step():
            y = module(x) if residual is None else module(x, residual)
            names["y"] = y
            y.backward(dy)

        before = _launch.launch_count
        if call == 1:
            knobs.runtime.launch_enter_hook.add(_no_op_hook)
        try:
            calls.append({"launches": _record(step, names), "counted": _launch.launch_count - before})
        finally:
            knobs.runtime.launch_enter_hook.remove(_no_op_hook)
    return calls, x


def main() -> None:
    torch.manual_seed(0)
    results = {}
    cases = {
        "one-launch": ((2, 8, 4, 4), None),
        "one-launch-channels-last": ((2, 8, 4, 4), torch.channels_last),
        "split": ((4, 4, 128, 128), None),
        "split-channels-last": ((4, 4, 128, 128), torch.channels_last),
    }
    for case, (shape, memory_format) in cases.items():
        for module_type in ("bn", "bn-add-relu"):
            if module_type == "bn":
                module = tritonbn.BatchNorm2d(shape[1])
            else:
                module = tritonbn.BatchNormAct2d(shape[1], activation="relu")
            calls, x = _three_calls(module, shape, memory_format, module_type != "bn")
            results[f"{case}/{module_type}"] = {"route": _launch.route(x), "calls": calls}
    results.update(_group_norm_cases())
    results["misaligned"] = _misaligned()
    results["frozen_ptx"] = _frozen_ptx()
    print(json.dumps(results))


def _group_norm_cases() -> dict:
    """GroupNorm, GroupNorm + residual + SiLU and a tracking InstanceNorm, both routes and
    layouts: calls 0-2 as for BatchNorm above."""
    from tritonbn import _group_launch

    results = {}
    shapes = {"one-launch": (2, 8, 4, 4), "split": (1, 4, 256, 256)}  # split: 2 groups of 131072 elements
    for route, shape in shapes.items():
        for layout in ("contiguous", "channels-last"):
            for module_type in ("gn", "gn-add-silu", "instance-norm"):
                if module_type == "gn":
                    module = tritonbn.GroupNorm(2, shape[1])
                elif module_type == "gn-add-silu":
                    module = tritonbn.GroupNormAct(2, shape[1], activation="silu")
                else:
                    module = tritonbn.InstanceNorm2d(shape[1], affine=True, track_running_stats=True)
                memory_format = torch.channels_last if layout == "channels-last" else None
                calls, x = _three_calls(module, shape, memory_format, module_type == "gn-add-silu")
                groups = shape[1] if module_type == "instance-norm" else 2
                results[f"gn/{route}-{layout}/{module_type}"] = {"route": _group_launch.route(x, groups),
                                                                  "calls": calls}
    return results


def _frozen_ptx() -> dict:
    """fma and separate add instructions in the PTX of the normalise kernel as the frozen
    BatchNorm compiles it (no fp fusion: torch's two roundings) and as a plain eval
    BatchNorm does (fusion allowed)."""
    compiled = []
    real = _launch._launch

    def recording(kernel, grid, *args, **kwargs):
        result = real(kernel, grid, *args, **kwargs)
        compiled.append(result)
        return result

    _launch._launch = recording
    try:
        x = torch.randn(2, 8, 4, 4)
        tritonbn.FrozenBatchNorm2d(8)(x)
        frozen = compiled[-1].asm["ptx"]
        _launch._forward_plans.clear()  # the eval plan below must take Triton's path once
        tritonbn.BatchNorm2d(8).eval()(x)
        plain = compiled[-1].asm["ptx"]
    finally:
        _launch._launch = real
    return {name: {"fma": ptx.count("fma.rn.f32"), "add": ptx.count("add.rn.f32") + ptx.count("add.f32")}
            for name, ptx in (("frozen", frozen), ("plain", plain))}


def _misaligned() -> dict:
    """An input 4 bytes off a 16-byte boundary: its plan must never replay (the compiled
    kernel of an aligned call assumes aligned pointers), while an aligned call of the same
    shape does."""
    _launch._forward_plans.clear()  # only this check's plans from here on
    module = tritonbn.BatchNorm2d(8)
    storage = torch.randn(2 * 8 * 4 * 4 + 1)
    shape = (2, 8, 4, 4)
    counts = {}
    for name, x in (("aligned", storage[:-1].view(shape)), ("misaligned", storage[1:].view(shape))):
        assert (x.data_ptr() % 16 == 0) == (name == "aligned")
        before = _launch.launch_count
        plans_before = set(_launch._forward_plans)
        for _ in range(3):
            module(x)
        plans = [plan for key, plan in _launch._forward_plans.items() if key not in plans_before]
        counts[name] = {"launches": _launch.launch_count - before,
                        "replayable": [launch.compiled is not None for plan in plans for launch in plan.launches]}
    return counts


if __name__ == "__main__":
    main()
