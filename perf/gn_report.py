"""The perf report's GroupNorm part: GroupNorm and GroupNorm + SiLU against torch.

Ops (perf/common.py: GN_OPS), on perf/shapes.py's GroupNorm suites:

* ``group_norm``: ``tritonbn.GroupNorm`` against ``torch.nn.GroupNorm``, eager and under
  torch.compile;
* ``gn_silu``: ``tritonbn.GroupNormAct(activation="silu")`` (one kernel per pass) against
  torch's GroupNorm followed by ``F.silu``, as diffusers' ResNet blocks write it, eager and
  under torch.compile (which fuses the SiLU into its normalise kernel).

Each (shape, dtype, layout) is checked first: y, dx, dweight, dbias of tritonbn against
eager torch (a float64 reference decides what is out of tolerance, as for BatchNorm), then
timed in the three training modes with perf/report.py's timer and written to the same CSV.
GroupNorm has no running statistics, so there is no eval mode.
"""

from __future__ import annotations

import functools
import zlib

import torch
import torch.nn.functional as F

from perf import common, shapes
from perf.report import (
    DTYPES,
    Verdict,
    _compare,
    _verdict,
    input_sets,
    make_fn,
    random_input,
)


class TorchGroupNormSiLU(torch.nn.GroupNorm):
    """torch's unfused sequence: GroupNorm, then SiLU (diffusers: ``nonlinearity(norm(x))``)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(input))


def make_params(channels: int, device: torch.device, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A GroupNorm state_dict in float32, away from the 1/0 defaults."""
    return {"weight": 1.0 + 0.25 * torch.randn(channels, device=device, generator=gen),
            "bias": 0.25 * torch.randn(channels, device=device, generator=gen)}


def build_module(provider: str, case: shapes.Case, params: dict, device: torch.device):
    """(module, callable) of a GroupNorm op: the module, or its torch.compile wrapper."""
    import tritonbn

    channels = case.shape[1]
    if provider == "tritonbn":
        if case.op == common.GROUP_NORM:
            module = tritonbn.GroupNorm(case.groups, channels, device=device)
        else:
            module = tritonbn.GroupNormAct(case.groups, channels, activation="silu", device=device)
    elif case.op == common.GROUP_NORM:
        module = torch.nn.GroupNorm(case.groups, channels, device=device)
    else:
        module = TorchGroupNormSiLU(case.groups, channels, device=device)
    module.load_state_dict(params)
    if provider == "torch.compile":
        return module, torch.compile(module, dynamic=False)
    return module, module


def _outputs(module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.detach().requires_grad_()
    y = module(x)
    dx, dweight, dbias = torch.autograd.grad(y, (x, module.weight, module.bias), dy)
    return {"y": y.detach(), "dx": dx, "dweight": dweight, "dbias": dbias}


def check(case: shapes.Case, params: dict, x: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype,
          device: torch.device) -> dict[str, Verdict]:
    """Per training mode: tritonbn's outputs against eager torch's on the same input and parameters."""
    from tritonbn import _launch

    launches = _launch.launch_count
    ours = _outputs(build_module("tritonbn", case, params, device)[0], x, dy)
    if _launch.launch_count == launches:
        raise RuntimeError("tritonbn launched no kernel: the check would compare torch with itself")
    ref = _outputs(build_module("torch", case, params, device)[0], x, dy)
    parts = _compare(ours, ref, dtype, lambda: _outputs(build_module("torch", case, params, device)[0].double(),
                                                        x.double(), dy.double()))
    return {"forward-train": _verdict(parts, ("y",)), "backward": _verdict(parts, ("dx", "dweight", "dbias")),
            "forward+backward": _verdict(parts, ("y", "dx", "dweight", "dbias"))}


def route(x: torch.Tensor, groups: int) -> str:
    """tritonbn's GroupNorm route for x, when its launcher says (else "")."""
    try:
        from tritonbn import _group_launch

        return _group_launch.route(x, groups)
    except (ImportError, AttributeError):
        return ""


def run_combo(report, case: shapes.Case, dtype_name: str, layout: str, providers: list[str]) -> None:
    """One GroupNorm (shape, dtype, layout): check, then time every provider in every training mode."""
    env = report.env
    modes = report.modes(case)
    dtype = DTYPES[dtype_name]
    tag = f"{case.op} {case.name} {dtype_name} {layout}"
    gen = torch.Generator(device=env.device).manual_seed(zlib.crc32(tag.encode()))
    params = make_params(case.shape[1], env.device, gen)
    sets = input_sets(case, torch.finfo(dtype).bits // 8, env, 2)
    xs = [random_input(case, dtype, layout, env.device, gen).requires_grad_() for _ in range(sets)]
    dys = [random_input(case, dtype, layout, env.device, gen) for _ in range(sets)]
    inputs = [(x,) for x in xs]
    row_route = route(xs[0], case.groups)

    results = check(case, params, xs[0], dys[0], dtype, env.device)
    verdicts = []
    for mode in modes:
        v = results[mode]
        verdicts.append(f"{mode} {v.text} {v.error:.2e}" + (f" ({v.note})" if v.note else ""))
        if not v.ok:
            report.issues.append(f"{tag} {mode}: MISMATCH vs eager torch (and float64) in {','.join(v.bad)}, "
                                 f"max abs error {v.error:.3e}")
    report.log(f"check {tag} ({case.shape_str}, G={case.groups}, route {row_route or '?'}, {sets} input set(s)): "
               + "; ".join(verdicts))

    if "torch.compile" in providers:
        torch._dynamo.reset()
    element_size = torch.finfo(dtype).bits // 8
    for provider in providers:
        module, call = build_module(provider, case, params, env.device)
        for mode in modes:
            moved = common.bytes_model(mode, case.numel, element_size, case.op, provider)
            if provider == "tritonbn":
                import tritonbn

                backend = tritonbn.backend_for(xs[0]) + (" fused" if case.op != common.GROUP_NORM else "")
                extra = {"route": row_route, "max_abs_err": f"{results[mode].error:.3e}",
                         "check": results[mode].text}
            elif provider == "torch":
                backend = "aten group_norm" + (" + silu" if case.op != common.GROUP_NORM else "")
                extra = {}
            else:
                backend = "inductor"
                extra = {}
            fields = dict(provider=provider, mode=mode, op=case.op, dtype=dtype_name, layout=layout,
                          shape=case.shape_str, shape_name=case.name, layers=case.layers, bytes_model=moved,
                          backend=backend, **extra)
            report.time_row(tag, mode, provider, fields, functools.partial(make_fn, mode, module, call, inputs, dys))
        del module, call
