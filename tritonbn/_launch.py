"""Launchers: allocate outputs and statistics, pick the route and grid, call the kernels.

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

from ._layout import CanonicalView, canonical_input, like_layout
from .kernels import backward as bwd_kernels
from .kernels import configs as cfg
from .kernels import forward as fwd_kernels
from .kernels import running_stats as rs_kernels

# Number of Triton kernel launches so far. Tests read it to prove that the kernels ran (and
# not a silent fallback to torch's own batch norm).
launch_count = 0

# When True, every buffer a kernel must write is filled with NaN first, so a test sees any
# element that no program wrote. Tests only: it costs a memset per buffer.
poison_outputs = False

_INT32_LIMIT = 2**31 - 1


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if poison_outputs else out


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if poison_outputs else out


# Triton's interpreter patches triton.language globally for the length of a launch, so two
# threads interpreting at once break each other: interpreted launches take turns. Compiled
# launches need no lock.
_interpreter_lock = threading.RLock() if cfg.INTERPRETER else contextlib.nullcontext()


def _launch(kernel, grid, *args, **kwargs) -> None:
    global launch_count
    # Triton launches on the *current* CUDA device and its stream: make that the tensors' one.
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with _interpreter_lock, on_device:
        launch_count += 1
        kernel[grid](*args, **kwargs)


def _pair(value: float) -> tuple[float, float]:
    """(float32 value, float32 remainder) of a float: see kernels/common.py exact_scalar."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, float(value) - hi


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


def _ncs_split(view: CanonicalView, device: torch.device) -> tuple[int, int, int, int]:
    split_n, split_s = cfg.ncs_split(view.n, view.c, view.s, sm_count(device))
    n_chunk = triton.cdiv(view.n, split_n)
    s_chunk = triton.cdiv(view.s, split_s)
    if split_s > 1:
        s_chunk = triton.cdiv(s_chunk, cfg.SPATIAL_SPLIT_QUANTUM) * cfg.SPATIAL_SPLIT_QUANTUM
    return split_n, split_s, n_chunk, s_chunk


def _rows_split(view: CanonicalView, device: torch.device) -> tuple[int, int]:
    split_m = cfg.rows_split(view.m, view.c, sm_count(device))
    return split_m, triton.cdiv(view.m, split_m)


def _common_meta(x: torch.Tensor, view: CanonicalView) -> dict:
    return {"ACC": _tl_acc(x.dtype), "INT64_INDEX": view.max_offset > _INT32_LIMIT}


def route(x: torch.Tensor) -> str:
    """Which kernel route a training forward on x takes: 'ncs-fused', 'ncs-split', 'rows-fused'
    or 'rows-split' (for tests and the perf report)."""
    _, view = canonical_input(x)
    if view.kind == "ncs":
        split_n, split_s, _, _ = _ncs_split(view, x.device)
        return "ncs-fused" if split_n * split_s == 1 else "ncs-split"
    return "rows-fused" if _rows_split(view, x.device)[0] == 1 else "rows-split"


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = act(BN(x) + residual) and the per-channel (mean, rstd, biased var) used (ACC).

    training: batch statistics; otherwise the running ones. activation is one of
    kernels/activation.py's codes (0: none).
    """
    x, view = canonical_input(x)
    y = _empty_like(x)
    mean, rstd, var = _stat_vectors(x, view.c)
    if view.m == 0 or view.c == 0:
        # Empty batch: an empty output and no statistics (torch leaves running stats alone).
        return y, mean.zero_(), rstd.zero_(), var.zero_()
    w, b, flags = _affine(weight, bias, mean)
    r = like_layout(residual, x) if residual is not None else y
    meta = {**_common_meta(x, view), **flags, "HAS_RESIDUAL": residual is not None, "ACTIVATION": activation}
    if not training:
        _normalize(x, y, r, view, w, b, running_mean.contiguous(), running_var.contiguous(), mean,
                   mean, rstd, var, eps, slope, from_running=True, meta=meta)
    elif not _fused_forward(x, y, r, view, w, b, mean, rstd, var, eps, slope, meta):
        _split_stats(x, view, mean, rstd, var, eps)
        _normalize(x, y, r, view, w, b, mean, var, rstd, mean, rstd, var, eps, slope, from_running=False, meta=meta)
    return y, mean, rstd, var


def batch_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel (mean, rstd, biased var) of x, without normalising (SyncBatchNorm's local part)."""
    x, view = canonical_input(x)
    mean, rstd, var = _stat_vectors(x, view.c)
    if view.m == 0 or view.c == 0:
        return mean.zero_(), rstd.zero_(), var.zero_()
    _split_stats(x, view, mean, rstd, var, eps)
    return mean, rstd, var


def combine_stats(
    counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, rstd, biased var) from [parts, C] partial (count, mean, M2), merged in order."""
    parts, c = means.shape
    mean, rstd, var = _stat_vectors(means, c)
    shift = torch.zeros(c, dtype=means.dtype, device=means.device)
    _launch(fwd_kernels._bn_fwd_combine, (triton.cdiv(c, cfg.PER_CHANNEL_BLOCK),),
            counts.contiguous(), means.contiguous(), m2s.contiguous(), shift, mean, rstd, var, c, parts, *_pair(eps),
            ACC=_tl_acc(means.dtype), BLOCK_C=cfg.PER_CHANNEL_BLOCK)
    return mean, rstd, var


def normalize(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """y = (x - mean) * rstd * weight + bias with given per-channel statistics."""
    x, view = canonical_input(x)
    y = _empty_like(x)
    if view.m == 0 or view.c == 0:
        return y
    w, b, flags = _affine(weight, bias, mean)
    meta = {**_common_meta(x, view), **flags, "HAS_RESIDUAL": False, "ACTIVATION": 0}
    _normalize(x, y, y, view, w, b, mean, mean, rstd, mean, rstd, mean, 0.0, 0.0, from_running=False, meta=meta)
    return y


def _stat_vectors(like: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(like.dtype)
    return _empty(c, acc, like.device), _empty(c, acc, like.device), _empty(c, acc, like.device)


def _affine(weight, bias, dummy):
    """Contiguous weight and bias, a dummy pointer for an absent one, and the HAS_* flags."""
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    flags = {"HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None}
    return (weight if weight is not None else dummy), (bias if bias is not None else dummy), flags


def _fused_forward(x, y, r, view, w, b, mean, rstd, var, eps, slope, meta) -> bool:
    """The one-launch route, when the split heuristic gives one program per channel block."""
    c = view.c
    if view.kind == "ncs":
        split_n, split_s, _, _ = _ncs_split(view, x.device)
        if split_n * split_s > 1:
            return False
        _launch(fwd_kernels._bn_fwd_fused_ncs, (c,), x, y, r, w, b, mean, rstd, var,
                view.n, c, view.s, view.stride_n, view.stride_c, view.stride_n, view.stride_c,
                view.n, view.s, cfg.tuning_bucket(view.s, view.n), *_pair(eps), *_pair(slope), **meta)
        return True
    if _rows_split(view, x.device)[0] > 1:
        return False
    grid = lambda meta_: (triton.cdiv(c, meta_["BLOCK_C"]),)
    _launch(fwd_kernels._bn_fwd_fused_rows, grid, x, y, r, w, b, mean, rstd, var,
            view.m, c, view.stride_m, view.stride_m, view.m, cfg.tuning_bucket(c, view.m), *_pair(eps), *_pair(slope),
            **meta)
    return True


def _split_stats(x, view, mean, rstd, var, eps) -> None:
    """Partial (count, mean, M2) from many programs per channel, then their ordered combine."""
    c = view.c
    acc = accumulation_dtype(x.dtype)
    meta = _common_meta(x, view)
    shift = _empty(c, acc, x.device)
    if view.kind == "ncs":
        split_n, split_s, n_chunk, s_chunk = _ncs_split(view, x.device)
        splits = split_n * split_s
        parts = _empty((3, splits, c), acc, x.device)
        _launch(fwd_kernels._bn_fwd_stats_ncs, (c * splits,), x, parts[0], parts[1], parts[2], shift,
                view.n, c, view.s, view.stride_n, view.stride_c, n_chunk, s_chunk, cfg.tuning_bucket(s_chunk, n_chunk),
                split_n, split_s, **meta)
    else:
        splits, m_chunk = _rows_split(view, x.device)
        parts = _empty((3, splits, c), acc, x.device)
        grid = lambda meta_: (triton.cdiv(c, meta_["BLOCK_C"]) * splits,)
        _launch(fwd_kernels._bn_fwd_stats_rows, grid, x, parts[0], parts[1], parts[2], shift,
                view.m, c, view.stride_m, m_chunk, splits, cfg.tuning_bucket(c, m_chunk), **meta)
    _launch(fwd_kernels._bn_fwd_combine, (triton.cdiv(c, cfg.PER_CHANNEL_BLOCK),),
            parts[0], parts[1], parts[2], shift, mean, rstd, var, c, splits, *_pair(eps),
            ACC=meta["ACC"], BLOCK_C=cfg.PER_CHANNEL_BLOCK)


def _normalize(x, y, r, view, w, b, stat_mean, stat_var, stat_rstd, mean, rstd, var, eps, slope, from_running, meta):
    if view.kind == "ncs":
        grid = lambda m: (view.c * triton.cdiv(view.n, m["BLOCK_N"]) * triton.cdiv(view.s, m["BLOCK_S"]),)
        _launch(fwd_kernels._bn_fwd_normalize_ncs, grid, x, y, r, w, b, stat_mean, stat_var, stat_rstd,
                mean, rstd, var, view.n, view.c, view.s, view.stride_n, view.stride_c, view.stride_n, view.stride_c,
                view.s, cfg.tuning_bucket(view.s, view.n), *_pair(eps), *_pair(slope), FROM_RUNNING=from_running,
                **meta)
    else:
        grid = lambda m: (triton.cdiv(view.m, m["BLOCK_M"]) * triton.cdiv(view.c, m["BLOCK_C"]),)
        _launch(fwd_kernels._bn_fwd_normalize_rows, grid, x, y, r, w, b, stat_mean, stat_var, stat_rstd,
                mean, rstd, var, view.m, view.c, view.stride_m, view.stride_m, cfg.tuning_bucket(view.c, view.m),
                *_pair(eps), *_pair(slope), FROM_RUNNING=from_running, **meta)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    training: bool,
    param_grads: bool,
    param_dtype: torch.dtype,
    residual: torch.Tensor | None = None,
    activation: int = 0,
    slope: float = 0.0,
    residual_grad: bool = False,
    residual_is_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, dresidual); the last three are empty when not asked for.

    bias and residual are needed only to recompute the pre-activation z when an activation
    is fused; with ``residual_is_output`` the ``residual`` argument is the forward's output,
    whose sign gives relu's and leaky_relu's mask.
    """
    x, view = canonical_input(x)
    dy = like_layout(dy, x)
    dx = _empty_like(x)
    c = view.c
    size = c if (param_grads or training) else 0
    dweight = _empty(size, param_dtype, x.device)
    dbias = _empty(size, param_dtype, x.device)
    dresidual = _empty_like(x) if residual_grad else _empty(0, x.dtype, x.device)
    if view.m == 0 or c == 0:
        return dx, dweight.zero_(), dbias.zero_(), dresidual
    w, b, flags = _affine(weight, bias, mean)
    r = like_layout(residual, x) if residual is not None else dx
    meta = {**_common_meta(x, view), **flags, "TRAINING": training, "ACTIVATION": activation,
            "HAS_RESIDUAL": residual is not None, "R_IS_OUTPUT": residual_is_output, "WRITE_DR": residual_grad}
    inv_count = 1.0 / view.m
    dr = dresidual if residual_grad else dx
    if not training and not param_grads:
        _dx(x, dy, dx, r, dr, view, w, b, mean, rstd, mean, rstd, inv_count, slope, {**meta, "DZ_STORED": False})
    elif not _fused_backward(x, dy, dx, r, dr, view, w, b, mean, rstd, dweight, dbias, inv_count, slope, meta):
        # With an activation and a residual to differentiate, the reduce pass writes dz (the
        # residual's gradient) and the dx pass reads x and dz: one tensor read less than
        # recomputing dz from dy and the output (or residual) a second time.
        store_dz = residual_grad and activation != 0
        sums = _split_sums(x, dy, r, view, w, b, mean, rstd, dweight, dbias, slope, meta, dr, store_dz)
        _dx(x, dy, dx, r, dr, view, w, b, mean, rstd, sums[0], sums[1], inv_count, slope,
            {**meta, "DZ_STORED": store_dz, "WRITE_DR": residual_grad and not store_dz})
    return dx, dweight, dbias, dresidual


def _plain_backward_meta(x, view, weight, dummy):
    """Weight pointer and meta of a backward without a fused epilogue (SyncBatchNorm's parts)."""
    w, _, flags = _affine(weight, None, dummy)
    meta = {**_common_meta(x, view), **flags, "TRAINING": True, "ACTIVATION": 0, "HAS_RESIDUAL": False,
            "R_IS_OUTPUT": False, "WRITE_DR": False, "DZ_STORED": False}
    return w, meta


def grad_sums(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """[2, C]: per-channel sum(dy) and sum(dy * xhat) (SyncBatchNorm's local part)."""
    x, view = canonical_input(x)
    dy = like_layout(dy, x)
    acc = accumulation_dtype(x.dtype)
    if view.m == 0 or view.c == 0:
        return torch.zeros((2, view.c), dtype=acc, device=x.device)
    scratch = _empty((2, view.c), acc, x.device)  # the combine kernel's dweight/dbias, unused here
    w, meta = _plain_backward_meta(x, view, None, mean)
    return _split_sums(x, dy, dy, view, w, mean, mean, rstd, scratch[0], scratch[1], 0.0, meta)


def dx_from_sums(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    mean_dy: torch.Tensor,
    mean_dy_xhat: torch.Tensor,
) -> torch.Tensor:
    """Training dx from given per-channel means of dy and dy * xhat (over the global batch)."""
    x, view = canonical_input(x)
    dy = like_layout(dy, x)
    dx = _empty_like(x)
    if view.m == 0 or view.c == 0:
        return dx
    w, meta = _plain_backward_meta(x, view, weight, mean)
    _dx(x, dy, dx, dx, dx, view, w, mean, mean, rstd, mean_dy.contiguous(), mean_dy_xhat.contiguous(), 1.0, 0.0,
        meta)
    return dx


def _fused_backward(x, dy, dx, r, dr, view, w, b, mean, rstd, dweight, dbias, inv_count, slope, meta) -> bool:
    c = view.c
    if view.kind == "ncs":
        split_n, split_s, _, _ = _ncs_split(view, x.device)
        if split_n * split_s > 1:
            return False
        _launch(bwd_kernels._bn_bwd_fused_ncs, (c,), x, dy, dx, r, dr, w, b, mean, rstd, dweight, dbias,
                view.n, c, view.s, view.stride_n, view.stride_c, view.n, view.s, cfg.tuning_bucket(view.s, view.n),
                *_pair(inv_count), *_pair(slope), **meta)
        return True
    if _rows_split(view, x.device)[0] > 1:
        return False
    grid = lambda meta_: (triton.cdiv(c, meta_["BLOCK_C"]),)
    _launch(bwd_kernels._bn_bwd_fused_rows, grid, x, dy, dx, r, dr, w, b, mean, rstd, dweight, dbias,
            view.m, c, view.stride_m, view.m, cfg.tuning_bucket(c, view.m), *_pair(inv_count), *_pair(slope), **meta)
    return True


def _split_sums(x, dy, r, view, w, b, mean, rstd, dweight, dbias, slope, meta, dz=None, store_dz=False):
    """Partial sums from many programs per channel, added in order; returns [2, C] (ACC).

    store_dz: the reduce kernels also write dz into ``dz``.
    """
    c = view.c
    acc = accumulation_dtype(x.dtype)
    reduce_meta = {k: v for k, v in meta.items() if k not in ("TRAINING", "WRITE_DR", "DZ_STORED")}
    reduce_meta["STORE_DZ"] = store_dz
    dz = dz if dz is not None else dy  # a pointer that is never written when not store_dz
    if view.kind == "ncs":
        split_n, split_s, n_chunk, s_chunk = _ncs_split(view, x.device)
        splits = split_n * split_s
        parts = _empty((2, splits, c), acc, x.device)
        _launch(bwd_kernels._bn_bwd_reduce_ncs, (c * splits,), x, dy, r, dz, w, b, mean, rstd, parts[0], parts[1],
                view.n, c, view.s, view.stride_n, view.stride_c, n_chunk, s_chunk, cfg.tuning_bucket(s_chunk, n_chunk),
                split_n, split_s, *_pair(slope),
                **reduce_meta)
    else:
        splits, m_chunk = _rows_split(view, x.device)
        parts = _empty((2, splits, c), acc, x.device)
        grid = lambda meta_: (triton.cdiv(c, meta_["BLOCK_C"]) * splits,)
        _launch(bwd_kernels._bn_bwd_reduce_rows, grid, x, dy, r, dz, w, b, mean, rstd, parts[0], parts[1],
                view.m, c, view.stride_m, m_chunk, splits, cfg.tuning_bucket(c, m_chunk), *_pair(slope), **reduce_meta)
    sums = _empty((2, c), acc, x.device)
    _launch(bwd_kernels._bn_bwd_combine, (triton.cdiv(c, cfg.PER_CHANNEL_BLOCK),),
            parts[0], parts[1], sums[0], sums[1], dweight, dbias, c, splits, BLOCK_C=cfg.PER_CHANNEL_BLOCK)
    return sums


def _dx(x, dy, dx, r, dr, view, w, b, mean, rstd, sum_dy, sum_dy_xhat, inv_count, slope, meta):
    if view.kind == "ncs":
        grid = lambda m: (view.c * triton.cdiv(view.n, m["BLOCK_N"]) * triton.cdiv(view.s, m["BLOCK_S"]),)
        _launch(bwd_kernels._bn_bwd_dx_ncs, grid, x, dy, dx, r, dr, w, b, mean, rstd, sum_dy, sum_dy_xhat,
                view.n, view.c, view.s, view.stride_n, view.stride_c, view.s, cfg.tuning_bucket(view.s, view.n),
                *_pair(inv_count), *_pair(slope), **meta)
    else:
        grid = lambda m: (triton.cdiv(view.m, m["BLOCK_M"]) * triton.cdiv(view.c, m["BLOCK_C"]),)
        _launch(bwd_kernels._bn_bwd_dx_rows, grid, x, dy, dx, r, dr, w, b, mean, rstd, sum_dy, sum_dy_xhat,
                view.m, view.c, view.stride_m, cfg.tuning_bucket(view.c, view.m), *_pair(inv_count), *_pair(slope),
                **meta)


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
) -> None:
    """In place: blend the batch statistics into the running ones (see the kernel's formula).

    ``device_count`` ([C], on the device) replaces the host ``count`` when only the device
    knows it (SyncBatchNorm).
    """
    c = mean.numel()
    if c == 0 or (count == 0 and device_count is None):
        return
    targets = [t if t.is_contiguous() else t.contiguous() for t in (running_mean, running_var)]
    _launch(rs_kernels._bn_update_running_stats, (triton.cdiv(c, cfg.PER_CHANNEL_BLOCK),),
            targets[0], targets[1], mean, var,
            num_batches_tracked if num_batches_tracked is not None else mean,
            device_count if device_count is not None else mean,
            c, *_pair(momentum), *_pair(count / max(count - 1, 1)),
            CUMULATIVE=num_batches_tracked is not None, DEVICE_COUNT=device_count is not None,
            ACC=_tl_acc(mean.dtype), BLOCK_C=cfg.PER_CHANNEL_BLOCK)
    for target, original in zip(targets, (running_mean, running_var)):
        if target is not original:
            original.copy_(target)
