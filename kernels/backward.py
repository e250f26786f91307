"""BatchNorm backward kernels: dgamma, dbeta and dx.

With xhat = (x - mean_c) * rstd_c, over the M elements of channel c:

    dbeta_c  = sum dy
    dgamma_c = sum dy * xhat
    dx       = w_c * rstd_c * (dy - dbeta_c / M - xhat * dgamma_c / M)     (training)
    dx       = w_c * rstd_c * dy                                            (eval: running stats
                                                                             are constants)

mean and rstd are the forward's saved statistics: the batch's in training, the running
ones in eval. Layouts (NCS and rows) and routes (fused or split) mirror kernels/forward.py:
the split route writes per-program partial sums that a combine kernel adds in a fixed order,
so gradients are deterministic without atomics.
"""

import triton
import triton.language as tl

from .common import NCS_HEURISTICS, ROWS_HEURISTICS
from .configs import autotune

# ----------------------------------------------------------------------------------------------
# NCS layout: [N, C, S], S contiguous
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ncs_channel_sums(X, DY, c, n_begin, n_end, s_begin, s_end, stride_n, stride_c, mean, rstd,
                      ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """(sum dy, sum dy * xhat) of channel c over n in [n_begin, n_end), s in [s_begin, s_end)."""
    sum_dy = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    sum_dy_xhat = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    offset_c = c.to(tl.int64) * stride_c
    for n0 in range(n_begin, n_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        if INT64_INDEX:
            n = n.to(tl.int64)
        for s0 in range(s_begin, s_end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = (n < n_end)[:, None] & (s < s_end)[None, :]
            offset = offset_c + n[:, None] * stride_n + s[None, :]
            x = tl.load(X + offset, mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + offset, mask=mask, other=0.0).to(ACC)
            # Masked lanes have dy = 0, so they add nothing to either sum.
            sum_dy += dy
            sum_dy_xhat += dy * (x - mean)
    return tl.sum(sum_dy), tl.sum(sum_dy_xhat) * rstd


@triton.jit
def _ncs_dx_tile(X, DY, DX, c, n0, s0, N, S, stride_n, stride_c, mean, rstd, dy_scale, xhat_scale, dy_shift,
                 TRAINING: tl.constexpr, ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """dx = dy_scale * dy - xhat_scale * xhat - dy_shift (training) or dy_scale * dy (eval)."""
    n = n0 + tl.arange(0, BLOCK_N)
    if INT64_INDEX:
        n = n.to(tl.int64)
    s = s0 + tl.arange(0, BLOCK_S)
    mask = (n < N)[:, None] & (s < S)[None, :]
    offset = c.to(tl.int64) * stride_c + n[:, None] * stride_n + s[None, :]
    dy = tl.load(DY + offset, mask=mask, other=0.0).to(ACC)
    dx = dy * dy_scale
    if TRAINING:
        x = tl.load(X + offset, mask=mask, other=0.0).to(ACC)
        dx = dx - ((x - mean) * rstd) * xhat_scale - dy_shift
    tl.store(DX + offset, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _dx_constants(W, c, rstd, sum_dy, sum_dy_xhat, inv_count, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """Per-channel constants of dx = a * dy - b * xhat - d, with a = w * rstd."""
    dy_scale = rstd
    if HAS_WEIGHT:
        dy_scale = dy_scale * tl.load(W + c).to(ACC)
    return dy_scale, dy_scale * sum_dy_xhat * inv_count, dy_scale * sum_dy * inv_count


@autotune("ncs_reduce", key=["s_chunk", "n_chunk", "ACC"])
@triton.heuristics(NCS_HEURISTICS)
@triton.jit
def _bn_bwd_reduce_ncs(
    X, DY,  # [N, C, S] input and output gradient, same strides
    Mean, Rstd,  # [C] saved statistics (ACC)
    PartSumDy, PartSumDyXhat,  # [split_n * split_s, C] partial sums (ACC)
    N, C, S, stride_n, stride_c,
    n_chunk, s_chunk, split_n, split_s,
    ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # grid: C * split_n * split_s programs, as in the forward statistics kernel.
    pid = tl.program_id(0)
    splits = split_n * split_s
    c = pid // splits
    part = pid % splits
    n_begin = (part // split_s) * n_chunk
    s_begin = (part % split_s) * s_chunk
    n_end = tl.minimum(n_begin + n_chunk, N)
    s_end = tl.minimum(s_begin + s_chunk, S)
    mean = tl.load(Mean + c)
    rstd = tl.load(Rstd + c)
    sum_dy, sum_dy_xhat = _ncs_channel_sums(X, DY, c, n_begin, n_end, s_begin, s_end, stride_n, stride_c,
                                            mean, rstd, ACC, INT64_INDEX, BLOCK_N, BLOCK_S)
    tl.store(PartSumDy + part * C + c, sum_dy)
    tl.store(PartSumDyXhat + part * C + c, sum_dy_xhat)


@autotune("ncs_reduce", key=["s_chunk", "n_chunk", "ACC"])
@triton.heuristics(NCS_HEURISTICS)
@triton.jit
def _bn_bwd_fused_ncs(
    X, DY, DX,  # [N, C, S], same strides
    W, Mean, Rstd,  # [C] weight (when HAS_WEIGHT) and saved statistics (ACC)
    DW, DB,  # [C] parameter gradients out, in the parameters' dtype
    N, C, S, stride_n, stride_c,
    n_chunk, s_chunk,  # = N, S (named as in the reduce kernel for tuning)
    inv_count,  # 1 / (N * S)
    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # grid: one program per channel: sums over the channel, then dx over it.
    c = tl.program_id(0)
    mean = tl.load(Mean + c)
    rstd = tl.load(Rstd + c)
    sum_dy, sum_dy_xhat = _ncs_channel_sums(X, DY, c, 0, N, 0, S, stride_n, stride_c, mean, rstd,
                                            ACC, INT64_INDEX, BLOCK_N, BLOCK_S)
    tl.store(DW + c, sum_dy_xhat.to(DW.dtype.element_ty))
    tl.store(DB + c, sum_dy.to(DB.dtype.element_ty))
    dy_scale, xhat_scale, dy_shift = _dx_constants(W, c, rstd, sum_dy, sum_dy_xhat, inv_count, HAS_WEIGHT, ACC)
    for n0 in range(0, N, BLOCK_N):
        for s0 in range(0, S, BLOCK_S):
            _ncs_dx_tile(X, DY, DX, c, n0, s0, N, S, stride_n, stride_c, mean, rstd, dy_scale, xhat_scale,
                         dy_shift, TRAINING, ACC, INT64_INDEX, BLOCK_N, BLOCK_S)


@autotune("ncs_elementwise", key=["s_chunk", "n_bucket", "ACC"])
@triton.heuristics(NCS_HEURISTICS)
@triton.jit
def _bn_bwd_dx_ncs(
    X, DY, DX,  # [N, C, S], same strides
    W, Mean, Rstd,  # [C] weight (when HAS_WEIGHT) and saved statistics (ACC)
    SumDy, SumDyXhat,  # [C] combined sums (ACC), read when TRAINING
    N, C, S, stride_n, stride_c,
    s_chunk, n_bucket,  # s_chunk = S; n_bucket: autotune key only
    inv_count,
    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # grid: C * cdiv(N, BLOCK_N) * cdiv(S, BLOCK_S) programs, one tile each.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_s = tl.cdiv(S, BLOCK_S)
    c = pid // (tiles_n * tiles_s)
    tile = pid % (tiles_n * tiles_s)
    mean = tl.load(Mean + c)
    rstd = tl.load(Rstd + c)
    sum_dy = tl.zeros_like(rstd)
    sum_dy_xhat = tl.zeros_like(rstd)
    if TRAINING:
        sum_dy = tl.load(SumDy + c)
        sum_dy_xhat = tl.load(SumDyXhat + c)
    dy_scale, xhat_scale, dy_shift = _dx_constants(W, c, rstd, sum_dy, sum_dy_xhat, inv_count, HAS_WEIGHT, ACC)
    _ncs_dx_tile(X, DY, DX, c, (tile // tiles_s) * BLOCK_N, (tile % tiles_s) * BLOCK_S, N, S, stride_n, stride_c,
                 mean, rstd, dy_scale, xhat_scale, dy_shift, TRAINING, ACC, INT64_INDEX, BLOCK_N, BLOCK_S)


# ----------------------------------------------------------------------------------------------
# rows layout: [M, C], C contiguous
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rows_channel_sums(X, DY, c, c_mask, m_begin, m_end, stride_m, mean, rstd,
                       ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    sum_dy = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    sum_dy_xhat = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for m0 in range(m_begin, m_end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        if INT64_INDEX:
            m = m.to(tl.int64)
        mask = (m < m_end)[:, None] & c_mask[None, :]
        offset = m[:, None] * stride_m + c[None, :]
        x = tl.load(X + offset, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + offset, mask=mask, other=0.0).to(ACC)
        sum_dy += dy
        sum_dy_xhat += dy * (x - mean[None, :])
    return tl.sum(sum_dy, axis=0), tl.sum(sum_dy_xhat, axis=0) * rstd


@triton.jit
def _rows_dx_tile(X, DY, DX, c, c_mask, m0, M, stride_m, mean, rstd, dy_scale, xhat_scale, dy_shift,
                  TRAINING: tl.constexpr, ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    m = m0 + tl.arange(0, BLOCK_M)
    if INT64_INDEX:
        m = m.to(tl.int64)
    mask = (m < M)[:, None] & c_mask[None, :]
    offset = m[:, None] * stride_m + c[None, :]
    dy = tl.load(DY + offset, mask=mask, other=0.0).to(ACC)
    dx = dy * dy_scale[None, :]
    if TRAINING:
        x = tl.load(X + offset, mask=mask, other=0.0).to(ACC)
        dx = dx - ((x - mean[None, :]) * rstd[None, :]) * xhat_scale[None, :] - dy_shift[None, :]
    tl.store(DX + offset, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _rows_dx_constants(W, c, c_mask, rstd, sum_dy, sum_dy_xhat, inv_count, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    dy_scale = rstd
    if HAS_WEIGHT:
        dy_scale = dy_scale * tl.load(W + c, mask=c_mask, other=1.0).to(ACC)
    return dy_scale, dy_scale * sum_dy_xhat * inv_count, dy_scale * sum_dy * inv_count


@autotune("rows_reduce", key=["m_chunk", "c_bucket", "ACC"])
@triton.heuristics(ROWS_HEURISTICS)
@triton.jit
def _bn_bwd_reduce_rows(
    X, DY,  # [M, C], same strides
    Mean, Rstd,  # [C] saved statistics (ACC)
    PartSumDy, PartSumDyXhat,  # [split_m, C] partial sums (ACC)
    M, C, stride_m,
    m_chunk, split_m, c_bucket,
    ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    TILE: tl.constexpr, MAX_BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid: cdiv(C, BLOCK_C) * split_m programs.
    pid = tl.program_id(0)
    part = pid % split_m
    c = (pid // split_m) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    m_begin = part * m_chunk
    m_end = tl.minimum(m_begin + m_chunk, M)
    mean = tl.load(Mean + c, mask=c_mask, other=0.0)
    rstd = tl.load(Rstd + c, mask=c_mask, other=0.0)
    sum_dy, sum_dy_xhat = _rows_channel_sums(X, DY, c, c_mask, m_begin, m_end, stride_m, mean, rstd,
                                             ACC, INT64_INDEX, BLOCK_M, BLOCK_C)
    tl.store(PartSumDy + part * C + c, sum_dy, mask=c_mask)
    tl.store(PartSumDyXhat + part * C + c, sum_dy_xhat, mask=c_mask)


@autotune("rows_reduce", key=["m_chunk", "c_bucket", "ACC"])
@triton.heuristics(ROWS_HEURISTICS)
@triton.jit
def _bn_bwd_fused_rows(
    X, DY, DX,  # [M, C], same strides
    W, Mean, Rstd,  # [C]
    DW, DB,  # [C] parameter gradients out, in the parameters' dtype
    M, C, stride_m,
    m_chunk, c_bucket,  # m_chunk = M
    inv_count,
    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    TILE: tl.constexpr, MAX_BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid: one program per block of BLOCK_C channels.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(Mean + c, mask=c_mask, other=0.0)
    rstd = tl.load(Rstd + c, mask=c_mask, other=0.0)
    sum_dy, sum_dy_xhat = _rows_channel_sums(X, DY, c, c_mask, 0, M, stride_m, mean, rstd,
                                             ACC, INT64_INDEX, BLOCK_M, BLOCK_C)
    tl.store(DW + c, sum_dy_xhat.to(DW.dtype.element_ty), mask=c_mask)
    tl.store(DB + c, sum_dy.to(DB.dtype.element_ty), mask=c_mask)
    dy_scale, xhat_scale, dy_shift = _rows_dx_constants(W, c, c_mask, rstd, sum_dy, sum_dy_xhat, inv_count,
                                                        HAS_WEIGHT, ACC)
    for m0 in range(0, M, BLOCK_M):
        _rows_dx_tile(X, DY, DX, c, c_mask, m0, M, stride_m, mean, rstd, dy_scale, xhat_scale, dy_shift,
                      TRAINING, ACC, INT64_INDEX, BLOCK_M, BLOCK_C)


@autotune("rows_elementwise", key=["m_bucket", "c_bucket", "ACC"])
@triton.heuristics(ROWS_HEURISTICS)
@triton.jit
def _bn_bwd_dx_rows(
    X, DY, DX,  # [M, C], same strides
    W, Mean, Rstd,  # [C]
    SumDy, SumDyXhat,  # [C] combined sums (ACC), read when TRAINING
    M, C, stride_m,
    m_bucket, c_bucket,  # autotune keys only
    inv_count,
    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    TILE: tl.constexpr, MAX_BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid: cdiv(M, BLOCK_M) * cdiv(C, BLOCK_C) programs.
    pid = tl.program_id(0)
    tiles_c = tl.cdiv(C, BLOCK_C)
    c = (pid % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(Mean + c, mask=c_mask, other=0.0)
    rstd = tl.load(Rstd + c, mask=c_mask, other=0.0)
    sum_dy = tl.zeros_like(rstd)
    sum_dy_xhat = tl.zeros_like(rstd)
    if TRAINING:
        sum_dy = tl.load(SumDy + c, mask=c_mask, other=0.0)
        sum_dy_xhat = tl.load(SumDyXhat + c, mask=c_mask, other=0.0)
    dy_scale, xhat_scale, dy_shift = _rows_dx_constants(W, c, c_mask, rstd, sum_dy, sum_dy_xhat, inv_count,
                                                        HAS_WEIGHT, ACC)
    _rows_dx_tile(X, DY, DX, c, c_mask, (pid // tiles_c) * BLOCK_M, M, stride_m, mean, rstd, dy_scale, xhat_scale,
                  dy_shift, TRAINING, ACC, INT64_INDEX, BLOCK_M, BLOCK_C)


# ----------------------------------------------------------------------------------------------
# combine partial sums (both layouts)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bn_bwd_combine(
    PartSumDy, PartSumDyXhat,  # [splits, C] partial sums (ACC)
    SumDy, SumDyXhat,  # [C] out (ACC), for the dx kernel
    DW, DB,  # [C] out, in the parameters' dtype
    C, splits,
    BLOCK_C: tl.constexpr,
):
    # grid: cdiv(C, BLOCK_C). Partials are added in a fixed order: the same bits every run.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    sum_dy = tl.load(PartSumDy + c, mask=c_mask, other=0.0)
    sum_dy_xhat = tl.load(PartSumDyXhat + c, mask=c_mask, other=0.0)
    for part in range(1, splits):
        sum_dy += tl.load(PartSumDy + part * C + c, mask=c_mask, other=0.0)
        sum_dy_xhat += tl.load(PartSumDyXhat + part * C + c, mask=c_mask, other=0.0)
    tl.store(SumDy + c, sum_dy, mask=c_mask)
    tl.store(SumDyXhat + c, sum_dy_xhat, mask=c_mask)
    tl.store(DW + c, sum_dy_xhat.to(DW.dtype.element_ty), mask=c_mask)
    tl.store(DB + c, sum_dy.to(DB.dtype.element_ty), mask=c_mask)
