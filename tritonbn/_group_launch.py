"""GroupNorm / InstanceNorm launchers: launch plans per call signature, like tritonbn/_launch.py.

A call is described by its signature (shape, strides, dtype, device, groups, parameters'
presence and dtypes, epilogue, float arguments, alignment); the first call with a signature
builds a plan (route, chunks, every kernel's scalars and constexprs, from kernels/configs.py),
later calls look it up, allocate the outputs and replay the launches (``_launch._Launch``).

Nothing is read back from the device, so a step stays CUDA-graph capturable. The group of a
canonical view (tritonbn/_layout.py) is addressed as n * stride_n + g * stride_g, with
stride_x the stride of the tile's strided axis (kernels/group_norm.py):

* NCS view: stride_g = D * stride_c, stride_x = stride_c (spatial contiguous);
* rows view (channels_last, (N, C)): stride_n = S * stride_m, stride_g = D, stride_x = stride_m.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._launch import (
    _INT32_LIMIT,
    NO_RUNNING_UPDATE,
    _aligned,
    _empty,
    _empty_like,
    _Launch,
    _pairs,
    _tl_acc,
    accumulation_dtype,
    sm_count,
)
from ._layout import canonical_input, same_layout
from .kernels import configs as cfg
from .kernels import forward as fwd_kernels
from .kernels import group_norm as gn_kernels


@dataclass(frozen=True)
class GroupView:
    """A canonical view seen as N * G groups of D channels by S positions."""

    n: int
    g: int
    d: int
    s: int
    stride_n: int
    stride_g: int
    stride_x: int
    channels_last: bool
    int64: bool

    @property
    def pairs(self) -> int:
        return self.n * self.g

    @property
    def empty(self) -> bool:
        return self.n * self.g * self.d * self.s == 0

    def geometry(self) -> dict:
        return dict(G=self.g, D=self.d, S=self.s, stride_n=self.stride_n, stride_g=self.stride_g,
                    stride_x=self.stride_x)


def group_view(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, GroupView]:
    """The tensor the kernels read (x, or one dense copy) and its group geometry."""
    dense, view = canonical_input(x)
    d = view.c // num_groups if num_groups else 0
    int64 = view.max_offset > _INT32_LIMIT
    if view.kind == "ncs":
        return dense, GroupView(view.n, num_groups, d, view.s, view.stride_n, d * view.stride_c, view.stride_c,
                                False, int64)
    return dense, GroupView(view.n, num_groups, d, view.s, view.s * view.stride_m, d, view.stride_m, True, int64)


def _split(gv: GroupView, device: torch.device) -> tuple[int, int]:
    return cfg.gn_split(gv.pairs, gv.d, gv.s, gv.channels_last, sm_count(device))


def route(x: torch.Tensor, num_groups: int) -> str:
    """'ncs-one-launch', 'ncs-split', 'rows-one-launch' or 'rows-split': the route a GroupNorm
    with num_groups groups takes on x (for tests and the perf report)."""
    _, gv = group_view(x, num_groups)
    splits, _ = _split(gv, x.device)
    return f"{'rows' if gv.channels_last else 'ncs'}-{'split' if splits > 1 else 'one-launch'}"


def _meta(x: torch.Tensor, gv: GroupView) -> dict:
    return {"ACC": _tl_acc(x.dtype), "INT64_INDEX": gv.int64, "CHANNELS_LAST": gv.channels_last}


def _chunked(gv: GroupView, splits: int, s_chunk: int) -> dict:
    return dict(**gv.geometry(), s_chunk=s_chunk, splits=splits, bucket=cfg.tuning_bucket(s_chunk, gv.d))


def _plan_key(x, num_groups, weight, bias, residual, *rest) -> tuple:
    return (x.shape, x.stride(), x.dtype, x.device, num_groups, None if weight is None else weight.dtype,
            None if bias is None else bias.dtype, None if residual is None else (residual.stride(), residual.dtype),
            *rest, cfg.GN_MIN_ELEMENTS_PER_PROGRAM, torch._C._get_deterministic_algorithms())


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


class _ForwardPlan:
    def __init__(self, x, num_groups, weight, bias, residual, activation, eps, slope, replayable):
        dense, gv = group_view(x, num_groups)
        self.gv = gv
        self.dense_copy = dense is not x
        self.residual_copy = residual is not None and not same_layout(residual, dense)
        self.acc = accumulation_dtype(x.dtype)
        self.launches: list[_Launch] = []
        self._scratch = None
        if gv.empty:
            return
        meta = {**_meta(x, gv), "HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None,
                "HAS_RESIDUAL": residual is not None, "ACTIVATION": activation}
        self.splits, s_chunk = _split(gv, x.device)
        grid = cfg.gn_chunks_grid(gv.pairs, self.splits)
        if self.splits == 1:
            self.launches.append(_Launch(gn_kernels._gn_fwd_one_launch, grid,
                                         {**_chunked(gv, 1, gv.s), **_pairs(eps=eps, slope=slope)}, meta, replayable))
            return
        stats_meta = {k: v for k, v in _meta(x, gv).items()}
        self.launches += [
            _Launch(gn_kernels._gn_fwd_stats, grid, {**_chunked(gv, self.splits, s_chunk), "pairs": gv.pairs},
                    stats_meta, replayable),
            # forward.py's Chan merge, with one "channel" per (sample, group); no running statistics.
            _Launch(fwd_kernels._bn_fwd_combine, cfg.per_channel_grid(gv.pairs),
                    dict(C=gv.pairs, splits=self.splits, **_pairs(eps=eps, momentum=0.0, bessel=1.0)),
                    {**NO_RUNNING_UPDATE, "ACC": meta["ACC"], "BLOCK_C": cfg.PER_CHANNEL_BLOCK},
                    replayable),
            _Launch(gn_kernels._gn_fwd_normalize, grid, {**_chunked(gv, self.splits, s_chunk), **_pairs(slope=slope)},
                    meta, replayable),
        ]

    def scratch(self, device: torch.device) -> torch.Tensor:
        """[N * G] ACC values that kernels write and nothing reads (the variance when not kept)."""
        if self._scratch is None:
            self._scratch = torch.empty(self.gv.pairs, dtype=self.acc, device=device)
        return self._scratch


_forward_plans: dict = {}
_backward_plans: dict = {}


def forward(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    activation: int = 0,
    slope: float = 0.0,
    keep_var: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """y = act(GroupNorm(x) + residual) and the per-(sample, group) (mean, rstd, biased var),
    [N * G] in ACC. The arguments are assumed checked (tritonbn/group_norm.py does).

    keep_var=False: the variance is not returned (the kernels write a scratch buffer).
    """
    key = _plan_key(x, num_groups, weight, bias, residual, activation, eps, slope,
                    _aligned(x, weight, bias, residual))
    plan = _forward_plans.get(key)
    if plan is None:
        plan = _forward_plans[key] = _ForwardPlan(x, num_groups, weight, bias, residual, activation, eps, slope,
                                                  replayable=key[-3])
    if plan.dense_copy:
        x = x.contiguous()
    gv, acc, device = plan.gv, plan.acc, x.device
    y = _empty_like(x)
    if gv.empty:
        return y, *(_empty(gv.pairs, acc, device).zero_() for _ in range(3))
    if residual is not None and plan.residual_copy:
        residual = torch.empty_like(x).copy_(residual)
    r = residual if residual is not None else y
    # Stand-ins for absent optional tensors: never read (their HAS_* flag is off).
    w = weight.contiguous() if weight is not None else y
    b = bias.contiguous() if bias is not None else y
    launches = plan.launches
    if plan.splits == 1:
        mean = _empty(gv.pairs, acc, device)
        rstd = _empty(gv.pairs, acc, device)
        var = _empty(gv.pairs, acc, device) if keep_var else plan.scratch(device)
        launches[0].enqueue(x, y, r, w, b, mean, rstd, var)
    else:
        stats = _empty((3, gv.pairs), acc, device)  # forward.py's combine writes rows mean, rstd, var
        mean, rstd, var = stats
        parts = _empty((3 * plan.splits + 1, gv.pairs), acc, device)  # counts, means, M2s, pivots
        launches[0].enqueue(x, parts)
        launches[1].enqueue(parts, stats, stats, stats, stats)
        launches[2].enqueue(x, y, r, w, b, mean, rstd)
    return y, mean, rstd, var if keep_var else None


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------


class _BackwardPlan:
    def __init__(self, x, dy, num_groups, weight, bias, residual, activation, slope, param_grads, residual_grad,
                 replayable):
        dense, gv = group_view(x, num_groups)
        self.gv = gv
        self.c = gv.g * gv.d
        self.dense_copy = dense is not x
        self.dy_copy = not same_layout(dy, dense)
        self.residual_copy = residual is not None and not same_layout(residual, dense)
        self.acc = accumulation_dtype(x.dtype)
        self.param_grads = param_grads
        self.launches: list[_Launch] = []
        if gv.empty:
            return
        meta = {**_meta(x, gv), "HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None,
                "HAS_RESIDUAL": residual is not None, "ACTIVATION": activation}
        dx_meta = {**meta, "WRITE_DR": residual_grad}
        inv_count = 1.0 / (gv.d * gv.s)
        self.splits, s_chunk = _split(gv, x.device)
        grid = cfg.gn_chunks_grid(gv.pairs, self.splits)
        combine = _Launch(gn_kernels._gn_bwd_combine, cfg.per_channel_grid(self.c),
                          dict(N=gv.n, C=self.c, splits=self.splits),
                          {"WRITE_SUMS": self.splits > 1, "PARAM_GRADS": param_grads,
                           "BLOCK_C": cfg.PER_CHANNEL_BLOCK}, replayable)
        if self.splits == 1:
            self.launches.append(_Launch(gn_kernels._gn_bwd_one_launch, grid,
                                         {**_chunked(gv, 1, gv.s), **_pairs(inv_count=inv_count, slope=slope)},
                                         dx_meta, replayable))
            if param_grads:
                self.launches.append(combine)
            return
        self.launches += [
            _Launch(gn_kernels._gn_bwd_reduce, grid, {**_chunked(gv, self.splits, s_chunk), **_pairs(slope=slope)},
                    meta, replayable),
            combine,
            _Launch(gn_kernels._gn_bwd_dx, grid,
                    {**_chunked(gv, self.splits, s_chunk), **_pairs(inv_count=inv_count, slope=slope)},
                    dx_meta, replayable),
        ]


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    param_grads: bool,
    param_dtype: torch.dtype,
    residual: torch.Tensor | None = None,
    activation: int = 0,
    slope: float = 0.0,
    residual_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dx, dweight, dbias, dresidual): dweight and dbias are [C] in param_dtype (empty when
    not asked for), dresidual None unless residual_grad. bias and residual are read only to
    recompute the pre-activation z when an activation is fused."""
    key = _plan_key(x, num_groups, weight, bias, residual, dy.stride(), dy.dtype, activation, slope, param_grads,
                    param_dtype, residual_grad, _aligned(dy, x, weight, bias, residual))
    plan = _backward_plans.get(key)
    if plan is None:
        plan = _backward_plans[key] = _BackwardPlan(x, dy, num_groups, weight, bias, residual, activation, slope,
                                                    param_grads, residual_grad, replayable=key[-3])
    if plan.dense_copy:
        x = x.contiguous()
    if plan.dy_copy:
        dy = torch.empty_like(x).copy_(dy)
    if residual is not None and plan.residual_copy:
        residual = torch.empty_like(x).copy_(residual)
    gv, acc, device = plan.gv, plan.acc, x.device
    dx = _empty_like(x)
    grads_size = plan.c if param_grads else 0
    dweight = _empty(grads_size, param_dtype, device)
    dbias = _empty(grads_size, param_dtype, device)
    dresidual = _empty_like(x) if residual_grad else None
    if gv.empty:
        return dx, dweight.zero_(), dbias.zero_(), dresidual
    w = weight.contiguous() if weight is not None else mean
    b = bias.contiguous() if bias is not None else mean
    r = residual if residual is not None else dx
    dr = dresidual if residual_grad else dx
    nc = gv.n * plan.c
    launches = plan.launches
    if plan.splits == 1:
        sums = _empty((2, nc), acc, device)  # per-(sample, channel) sum dz, sum dz * xhat
        launches[0].enqueue(x, dy, r, dx, dr, w, b, mean, rstd, sums)
        if param_grads:
            launches[1].enqueue(sums, sums, dweight, dbias)
    else:
        parts = _empty((2 * plan.splits, nc), acc, device)
        sums = _empty((2, nc), acc, device)
        launches[0].enqueue(x, dy, r, w, b, mean, rstd, parts)
        launches[1].enqueue(parts, sums, dweight if param_grads else sums, dbias if param_grads else sums)
        launches[2].enqueue(x, dy, r, dx, dr, w, b, mean, rstd, sums)
    return dx, dweight, dbias, dresidual


# ----------------------------------------------------------------------------------------------
# InstanceNorm's running statistics
# ----------------------------------------------------------------------------------------------


_update_launches: dict = {}


def update_instance_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    n: int,
    momentum: float,
    count: int,
) -> None:
    """In place, as torch.instance_norm: blend the [N * C] per-(sample, channel) mean and
    biased variance over ``count`` positions, averaged over the N samples, into the running
    statistics (unbiased variance, factor ``momentum``)."""
    c = running_mean.numel()
    if c == 0 or n == 0 or count == 0:
        return  # no values (an empty batch or no positions): torch leaves the statistics alone
    targets = [t if t.is_contiguous() else t.contiguous() for t in (running_mean, running_var)]
    key = (c, n, momentum, count, mean.dtype, targets[0].dtype, targets[1].dtype, mean.device,
           _aligned(targets[0], targets[1], mean, var))
    update = _update_launches.get(key)
    if update is None:  # one launch per signature, replayed like a plan's (no Triton path per step)
        update = _update_launches[key] = _Launch(
            gn_kernels._gn_fwd_running_stats, cfg.per_channel_grid(c),
            dict(N=n, C=c, **_pairs(momentum=momentum, bessel=count / max(count - 1, 1))),
            dict(ACC=_tl_acc(mean.dtype), BLOCK_C=cfg.PER_CHANNEL_BLOCK), replayable=key[-1])
    update(targets[0], targets[1], mean, var)
    for target, original in zip(targets, (running_mean, running_var)):
        if target is not original:
            original.copy_(target)
