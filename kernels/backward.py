"""BatchNorm backward kernels: dgamma, dbeta, dx (and the residual's gradient when fused).

With xhat = (x - mean_c) * rstd_c over the M elements of channel c, and dz the gradient
reaching the BatchNorm output (dz = dy, or dy * act'(z) with z = xhat * w + b + residual
when an activation is fused; z is recomputed here, never stored):

    dbeta_c     = sum dz
    dgamma_c    = sum dz * xhat
    dx          = w_c * rstd_c * (dz - dbeta_c / M - xhat * dgamma_c / M)   (training)
    dx          = w_c * rstd_c * dz                                          (eval: running stats
                                                                              are constants)
    dresidual   = dz

mean and rstd are the forward's saved statistics: the batch's in training, the running
ones in eval. Layouts (NCS and rows) and routes (one-launch or split) mirror kernels/forward.py:
the split route writes per-program partial sums that a combine kernel adds in a fixed order,
so gradients are deterministic without atomics. Within a program, each lane of the tile keeps
its own sums, folded by common.tree_sum: the bits do not depend on the launch config.
"""

import triton
import triton.language as tl

from .activation import activation_grad
from .common import (
    CALLER_PARAMS,
    exact_scalar,
    ncs_program_chunk,
    ncs_tile_offsets,
    rows_tile_offsets,
    tile_total,
    tree_sum,
)
from .configs import (
    NCS_HEURISTICS,
    NCS_ONE_LAUNCH_HEURISTICS,
    NCS_SPLIT_REDUCE_HEURISTICS,
    ROWS_HEURISTICS,
    ROWS_ONE_LAUNCH_HEURISTICS,
    ROWS_SPLIT_REDUCE_HEURISTICS,
    autotune,
)


@triton.jit
def _load_x_and_dz(X, DY, R, offset, mask, mean, rstd, w, b, slope,
                   HAS_RESIDUAL: tl.constexpr, R_IS_OUTPUT: tl.constexpr, ACTIVATION: tl.constexpr,
                   ACC: tl.constexpr):
    """x and dz at offset. Masked lanes give dy = 0, hence dz = 0: they add to no sum.

    R_IS_OUTPUT: R holds the forward's output y. For relu the sign of y is the sign of z,
    which is all act' needs, and y is usually kept alive anyway (the next layer saves it),
    whereas holding the residual could keep an extra tensor alive. (Also right for leaky_relu
    with a positive slope; tritonbn/_ops.py decides when to use it.)
    """
    x = tl.load(X + offset, mask=mask, other=0.0).to(ACC)
    dz = tl.load(DY + offset, mask=mask, other=0.0).to(ACC)
    if ACTIVATION != 0:
        if R_IS_OUTPUT:
            z = tl.load(R + offset, mask=mask, other=0.0).to(ACC)
        else:
            # The forward's own operation order, so the recomputed z has the forward's bits and
            # act'(z) agrees with the output the forward wrote, even at z = 0.
            z = (x - mean) * (rstd * w) + b
            if HAS_RESIDUAL:
                z += tl.load(R + offset, mask=mask, other=0.0).to(ACC)
        dz = activation_grad(z, dz, slope, ACTIVATION)
    return x, dz


@triton.jit
def _channel_affine(W, B, c, c_mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """(w_c, b_c), 1 and 0 when absent; c is a scalar (NCS) or a block of channels (rows)."""
    b = (c * 0).to(ACC)
    w = b + 1.0
    if HAS_WEIGHT:
        w = tl.load(W + c, mask=c_mask, other=1.0).to(ACC)
    if HAS_BIAS:
        b = tl.load(B + c, mask=c_mask, other=0.0).to(ACC)
    return w, b


@triton.jit
def _dx_and_dresidual(DX, DR, offset, mask, x, dz, mean, rstd, dz_scale, xhat_scale, dz_shift,
                      TRAINING: tl.constexpr, WRITE_DR: tl.constexpr):
    """dx = dz_scale * dz - xhat_scale * xhat - dz_shift (training) or dz_scale * dz (eval)."""
    dx = dz * dz_scale
    if TRAINING:
        dx = dx - ((x - mean) * rstd) * xhat_scale - dz_shift
    tl.store(DX + offset, dx.to(DX.dtype.element_ty), mask=mask)
    if WRITE_DR:
        tl.store(DR + offset, dz.to(DR.dtype.element_ty), mask=mask)


@triton.jit
def _dx_constants(w, rstd, sum_dz, sum_dz_xhat, inv_count):
    """Per-channel constants of dx = a * dz - b * xhat - d, with a = w * rstd."""
    dz_scale = w * rstd
    return dz_scale, dz_scale * sum_dz_xhat * inv_count, dz_scale * sum_dz * inv_count


# ----------------------------------------------------------------------------------------------
# NCS layout: [N, C, S], S contiguous
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ncs_channel_sums(X, DY, R, DZ, c, n_begin, n_end, s_begin, s_end, stride_n, stride_c, mean, rstd, w, b, slope,
                      HAS_RESIDUAL: tl.constexpr, R_IS_OUTPUT: tl.constexpr, ACTIVATION: tl.constexpr,
                      STORE_DZ: tl.constexpr, ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """(sum dz, sum dz * xhat) of channel c over n in [n_begin, n_end), s in [s_begin, s_end).

    STORE_DZ: also write dz (which is the residual's gradient) to DZ, so that the dx pass reads
    x and dz instead of x, dy and the output or residual: one tensor less to read.
    """
    # One accumulator per lane of the tile, summed by tree_sum at the end: the order of the
    # additions is the shape's, whatever the warps (common.py).
    sum_dz = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    sum_dz_xmu = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    for n0 in range(n_begin, n_end, BLOCK_N):
        for s0 in range(s_begin, s_end, BLOCK_S):
            offset, mask = ncs_tile_offsets(c, n0, s0, n_end, s_end, stride_n, stride_c, INT64_INDEX, BLOCK_N, BLOCK_S)
            x, dz = _load_x_and_dz(X, DY, R, offset, mask, mean, rstd, w, b, slope,
                                   HAS_RESIDUAL, R_IS_OUTPUT, ACTIVATION, ACC)
            if STORE_DZ:
                tl.store(DZ + offset, dz.to(DZ.dtype.element_ty), mask=mask)
            sum_dz += dz
            sum_dz_xmu += dz * (x - mean)
    # Not yet multiplied by rstd: callers reload rstd after the loop, so that (without a fused
    # activation) nothing but the accumulators lives across it (ptxas spilled rstd on sm_80).
    return tile_total(sum_dz, BLOCK_N, BLOCK_S), tile_total(sum_dz_xmu, BLOCK_N, BLOCK_S)


@autotune("ncs_reduce_bwd", key=["bucket", "ACC", "ACTIVATION"])
@triton.heuristics(NCS_SPLIT_REDUCE_HEURISTICS)
@triton.jit(do_not_specialize=["bucket"], do_not_specialize_on_alignment=CALLER_PARAMS)
def _bn_bwd_reduce_ncs(
    X, DY, R,  # [N, C, S] input, output gradient and residual (when HAS_RESIDUAL), same strides
    DZ,  # [N, C, S] out when STORE_DZ: the gradient before the activation (= the residual's)
    W, B,  # [C] affine parameters, when HAS_WEIGHT / HAS_BIAS
    Stats,  # [2+, C] the forward's statistics (ACC): mean, rstd rows
    Parts,  # [2 * splits, C] out (ACC, splits = split_n * split_s): partial sum dz, then sum dz * xhat
    N, C, S, stride_n, stride_c,
    n_chunk, s_chunk, bucket, split_n, split_s,  # bucket: autotune key only (configs.tuning_bucket)
    slope, slope_lo,  # a float pair (common.exact_scalar)
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, R_IS_OUTPUT: tl.constexpr,
    ACTIVATION: tl.constexpr, STORE_DZ: tl.constexpr, ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    Mean, Rstd = Stats, Stats + C
    slope = exact_scalar(slope, slope_lo, ACC)
    # grid: C * split_n * split_s programs, as in the forward statistics kernel.
    c, part, n_begin, n_end, s_begin, s_end = ncs_program_chunk(tl.program_id(0), N, S, n_chunk, s_chunk,
                                                                split_n, split_s)
    w, b = _channel_affine(W, B, c, c >= 0, HAS_WEIGHT, HAS_BIAS, ACC)
    sum_dz, sum_dz_xmu = _ncs_channel_sums(X, DY, R, DZ, c, n_begin, n_end, s_begin, s_end, stride_n, stride_c,
                                           tl.load(Mean + c), tl.load(Rstd + c), w, b, slope, HAS_RESIDUAL,
                                           R_IS_OUTPUT, ACTIVATION, STORE_DZ, ACC, INT64_INDEX, BLOCK_N, BLOCK_S)
    tl.store(Parts + part * C + c, sum_dz)
    tl.store(Parts + (split_n * split_s + part) * C + c, sum_dz_xmu * tl.load(Rstd + c))


@autotune("ncs_reduce_bwd", key=["bucket", "ACC", "ACTIVATION"])
@triton.heuristics(NCS_ONE_LAUNCH_HEURISTICS)
@triton.jit(do_not_specialize=["bucket"], do_not_specialize_on_alignment=CALLER_PARAMS)
def _bn_bwd_one_launch_ncs(
    X, DY, DX, R, DR,  # [N, C, S] input, output grad, input grad, residual and its grad; same strides
    W, B,  # [C] affine parameters, when HAS_WEIGHT / HAS_BIAS
    Stats,  # [2+, C] the forward's statistics (ACC): mean, rstd rows
    DW, DB,  # [C] parameter gradients out, in the parameters' dtype
    N, C, S, stride_n, stride_c,
    bucket,  # autotune key only (configs.tuning_bucket)
    inv_count, inv_count_lo,  # 1 / (N * S), a float pair (common.exact_scalar)
    slope, slope_lo,
    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    R_IS_OUTPUT: tl.constexpr, WRITE_DR: tl.constexpr, ACTIVATION: tl.constexpr,
    ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    Mean, Rstd = Stats, Stats + C
    slope = exact_scalar(slope, slope_lo, ACC)
    # grid: one program per channel: sums over the channel, then dx over it.
    c = tl.program_id(0)
    mean = tl.load(Mean + c)
    # Unless z must be recomputed, the sums need x, dy and mean only: rstd, w and b are loaded
    # after the loop, so that nothing else lives across it (ptxas put one of them on the stack).
    rstd, w, b = mean, mean, mean
    if ACTIVATION != 0 and not R_IS_OUTPUT:
        rstd = tl.load(Rstd + c)
        w, b = _channel_affine(W, B, c, c >= 0, HAS_WEIGHT, HAS_BIAS, ACC)
    sum_dz, sum_dz_xmu = _ncs_channel_sums(X, DY, R, DR, c, 0, N, 0, S, stride_n, stride_c, mean, rstd, w, b,
                                           slope, HAS_RESIDUAL, R_IS_OUTPUT, ACTIVATION, False, ACC, INT64_INDEX,
                                           BLOCK_N, BLOCK_S)
    rstd = tl.load(Rstd + c)
    w, b = _channel_affine(W, B, c, c >= 0, HAS_WEIGHT, HAS_BIAS, ACC)
    sum_dz_xhat = sum_dz_xmu * rstd
    tl.store(DW + c, sum_dz_xhat.to(DW.dtype.element_ty))
    tl.store(DB + c, sum_dz.to(DB.dtype.element_ty))
    inv_count = exact_scalar(inv_count, inv_count_lo, ACC)  # after the loop: see the forward
    dz_scale, xhat_scale, dz_shift = _dx_constants(w, rstd, sum_dz, sum_dz_xhat, inv_count)
    for n0 in range(0, N, BLOCK_N):
        for s0 in range(0, S, BLOCK_S):
            offset, mask = ncs_tile_offsets(c, n0, s0, N, S, stride_n, stride_c, INT64_INDEX, BLOCK_N, BLOCK_S)
            x, dz = _load_x_and_dz(X, DY, R, offset, mask, mean, rstd, w, b, slope,
                                   HAS_RESIDUAL, R_IS_OUTPUT, ACTIVATION, ACC)
            _dx_and_dresidual(DX, DR, offset, mask, x, dz, mean, rstd, dz_scale, xhat_scale, dz_shift,
                              TRAINING, WRITE_DR)


@autotune("ncs_elementwise", key=["bucket", "ACC", "ACTIVATION"])
@triton.heuristics(NCS_HEURISTICS)
@triton.jit(do_not_specialize=["bucket"], do_not_specialize_on_alignment=CALLER_PARAMS)
def _bn_bwd_dx_ncs(
    X, DY, DX, R, DR,  # [N, C, S], same strides
    W, B,  # [C] affine parameters, when HAS_WEIGHT / HAS_BIAS
    Stats,  # [2+, C] the forward's statistics (ACC): mean, rstd rows
    Sums,  # [2, C] combined sums of dz and dz * xhat (ACC), read when TRAINING
    N, C, S, stride_n, stride_c,
    bucket,  # autotune key only (configs.tuning_bucket)
    inv_count, inv_count_lo, slope, slope_lo,  # float pairs (common.exact_scalar)
    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    R_IS_OUTPUT: tl.constexpr, WRITE_DR: tl.constexpr, ACTIVATION: tl.constexpr,
    DZ_STORED: tl.constexpr,  # DR already holds dz (the reduce pass wrote it): read it, skip dy
    ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    Mean, Rstd = Stats, Stats + C
    inv_count = exact_scalar(inv_count, inv_count_lo, ACC)
    slope = exact_scalar(slope, slope_lo, ACC)
    # grid: C * cdiv(N, BLOCK_N) * cdiv(S, BLOCK_S) programs, one tile each.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_s = tl.cdiv(S, BLOCK_S)
    c = pid // (tiles_n * tiles_s)
    tile = pid % (tiles_n * tiles_s)
    mean = tl.load(Mean + c)
    rstd = tl.load(Rstd + c)
    w, b = _channel_affine(W, B, c, c >= 0, HAS_WEIGHT, HAS_BIAS, ACC)
    sum_dz = tl.zeros_like(rstd)
    sum_dz_xhat = tl.zeros_like(rstd)
    if TRAINING:
        sum_dz = tl.load(Sums + c)
        sum_dz_xhat = tl.load(Sums + C + c)
    dz_scale, xhat_scale, dz_shift = _dx_constants(w, rstd, sum_dz, sum_dz_xhat, inv_count)
    offset, mask = ncs_tile_offsets(c, (tile // tiles_s) * BLOCK_N, (tile % tiles_s) * BLOCK_S, N, S,
                                    stride_n, stride_c, INT64_INDEX, BLOCK_N, BLOCK_S)
    if DZ_STORED:
        x = tl.load(X + offset, mask=mask, other=0.0).to(ACC)
        dz = tl.load(DR + offset, mask=mask, other=0.0).to(ACC)
    else:
        x, dz = _load_x_and_dz(X, DY, R, offset, mask, mean, rstd, w, b, slope,
                               HAS_RESIDUAL, R_IS_OUTPUT, ACTIVATION, ACC)
    _dx_and_dresidual(DX, DR, offset, mask, x, dz, mean, rstd, dz_scale, xhat_scale, dz_shift, TRAINING, WRITE_DR)


# ----------------------------------------------------------------------------------------------
# rows layout: [M, C], C contiguous
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rows_channel_sums(X, DY, R, DZ, c, c_mask, m_begin, m_end, stride_m, mean, rstd, w, b, slope,
                       HAS_RESIDUAL: tl.constexpr, R_IS_OUTPUT: tl.constexpr, ACTIVATION: tl.constexpr,
                       STORE_DZ: tl.constexpr, ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # Per-lane accumulators and tree sums, as in the NCS layout.
    sum_dz = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    sum_dz_xmu = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offset, mask = rows_tile_offsets(c, c_mask, m0, m_end, stride_m, INT64_INDEX, BLOCK_M)
        x, dz = _load_x_and_dz(X, DY, R, offset, mask, mean[None, :], rstd[None, :], w[None, :], b[None, :], slope,
                               HAS_RESIDUAL, R_IS_OUTPUT, ACTIVATION, ACC)
        if STORE_DZ:
            tl.store(DZ + offset, dz.to(DZ.dtype.element_ty), mask=mask)
        sum_dz += dz
        sum_dz_xmu += dz * (x - mean[None, :])
    return tree_sum(sum_dz, BLOCK_M), tree_sum(sum_dz_xmu, BLOCK_M) * rstd


@autotune("rows_reduce", key=["bucket", "ACC", "ACTIVATION"])
@triton.heuristics(ROWS_SPLIT_REDUCE_HEURISTICS)
@triton.jit(do_not_specialize=["bucket"], do_not_specialize_on_alignment=CALLER_PARAMS)
def _bn_bwd_reduce_rows(
    X, DY, R,  # [M, C], same strides
    DZ,  # [M, C] out when STORE_DZ: the gradient before the activation (= the residual's)
    W, B,  # [C] affine parameters, when HAS_WEIGHT / HAS_BIAS
    Stats,  # [2+, C] the forward's statistics (ACC): mean, rstd rows
    Parts,  # [2 * split_m, C] out (ACC): partial sum dz, then sum dz * xhat
    M, C, stride_m,
    m_chunk, split_m, bucket,  # bucket: autotune key only (configs.tuning_bucket)
    slope, slope_lo,  # a float pair (common.exact_scalar)
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, R_IS_OUTPUT: tl.constexpr,
    ACTIVATION: tl.constexpr, STORE_DZ: tl.constexpr, ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    MAX_BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    Mean, Rstd = Stats, Stats + C
    slope = exact_scalar(slope, slope_lo, ACC)
    # grid: cdiv(C, BLOCK_C) * split_m programs.
    pid = tl.program_id(0)
    part = pid % split_m
    c = (pid // split_m) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    m_begin = part * m_chunk
    m_end = tl.minimum(m_begin + m_chunk, M)
    mean = tl.load(Mean + c, mask=c_mask, other=0.0)
    rstd = tl.load(Rstd + c, mask=c_mask, other=0.0)
    w, b = _channel_affine(W, B, c, c_mask, HAS_WEIGHT, HAS_BIAS, ACC)
    sum_dz, sum_dz_xhat = _rows_channel_sums(X, DY, R, DZ, c, c_mask, m_begin, m_end, stride_m, mean, rstd, w, b,
                                             slope, HAS_RESIDUAL, R_IS_OUTPUT, ACTIVATION, STORE_DZ, ACC,
                                             INT64_INDEX, BLOCK_M, BLOCK_C)
    tl.store(Parts + part * C + c, sum_dz, mask=c_mask)
    tl.store(Parts + (split_m + part) * C + c, sum_dz_xhat, mask=c_mask)


@autotune("rows_reduce", key=["bucket", "ACC", "ACTIVATION"])
@triton.heuristics(ROWS_ONE_LAUNCH_HEURISTICS)
@triton.jit(do_not_specialize=["bucket"], do_not_specialize_on_alignment=CALLER_PARAMS)
def _bn_bwd_one_launch_rows(
    X, DY, DX, R, DR,  # [M, C], same strides
    W, B,  # [C] affine parameters, when HAS_WEIGHT / HAS_BIAS
    Stats,  # [2+, C] the forward's statistics (ACC): mean, rstd rows
    DW, DB,  # [C] parameter gradients out, in the parameters' dtype
    M, C, stride_m,
    bucket,  # autotune key only (configs.tuning_bucket)
    inv_count, inv_count_lo, slope, slope_lo,  # float pairs (common.exact_scalar)
    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    R_IS_OUTPUT: tl.constexpr, WRITE_DR: tl.constexpr, ACTIVATION: tl.constexpr,
    ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    MAX_BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    Mean, Rstd = Stats, Stats + C
    slope = exact_scalar(slope, slope_lo, ACC)
    # grid: one program per block of BLOCK_C channels.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(Mean + c, mask=c_mask, other=0.0)
    rstd = tl.load(Rstd + c, mask=c_mask, other=0.0)
    w, b = _channel_affine(W, B, c, c_mask, HAS_WEIGHT, HAS_BIAS, ACC)
    sum_dz, sum_dz_xhat = _rows_channel_sums(X, DY, R, DR, c, c_mask, 0, M, stride_m, mean, rstd, w, b, slope,
                                             HAS_RESIDUAL, R_IS_OUTPUT, ACTIVATION, False, ACC, INT64_INDEX,
                                             BLOCK_M, BLOCK_C)
    tl.store(DW + c, sum_dz_xhat.to(DW.dtype.element_ty), mask=c_mask)
    tl.store(DB + c, sum_dz.to(DB.dtype.element_ty), mask=c_mask)
    inv_count = exact_scalar(inv_count, inv_count_lo, ACC)  # after the loop: see the forward
    dz_scale, xhat_scale, dz_shift = _dx_constants(w, rstd, sum_dz, sum_dz_xhat, inv_count)
    for m0 in range(0, M, BLOCK_M):
        offset, mask = rows_tile_offsets(c, c_mask, m0, M, stride_m, INT64_INDEX, BLOCK_M)
        x, dz = _load_x_and_dz(X, DY, R, offset, mask, mean[None, :], rstd[None, :], w[None, :], b[None, :], slope,
                               HAS_RESIDUAL, R_IS_OUTPUT, ACTIVATION, ACC)
        _dx_and_dresidual(DX, DR, offset, mask, x, dz, mean[None, :], rstd[None, :], dz_scale[None, :],
                          xhat_scale[None, :], dz_shift[None, :], TRAINING, WRITE_DR)


@autotune("rows_elementwise", key=["bucket", "ACC", "ACTIVATION"])
@triton.heuristics(ROWS_HEURISTICS)
@triton.jit(do_not_specialize=["bucket"], do_not_specialize_on_alignment=CALLER_PARAMS)
def _bn_bwd_dx_rows(
    X, DY, DX, R, DR,  # [M, C], same strides
    W, B,  # [C] affine parameters, when HAS_WEIGHT / HAS_BIAS
    Stats,  # [2+, C] the forward's statistics (ACC): mean, rstd rows
    Sums,  # [2, C] combined sums of dz and dz * xhat (ACC), read when TRAINING
    M, C, stride_m,
    bucket,  # autotune key only (configs.tuning_bucket)
    inv_count, inv_count_lo, slope, slope_lo,  # float pairs (common.exact_scalar)
    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    R_IS_OUTPUT: tl.constexpr, WRITE_DR: tl.constexpr, ACTIVATION: tl.constexpr,
    DZ_STORED: tl.constexpr,  # DR already holds dz (the reduce pass wrote it): read it, skip dy
    ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    TILE: tl.constexpr, MAX_BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    Mean, Rstd = Stats, Stats + C
    inv_count = exact_scalar(inv_count, inv_count_lo, ACC)
    slope = exact_scalar(slope, slope_lo, ACC)
    # grid: cdiv(M, BLOCK_M) * cdiv(C, BLOCK_C) programs.
    pid = tl.program_id(0)
    tiles_c = tl.cdiv(C, BLOCK_C)
    c = (pid % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(Mean + c, mask=c_mask, other=0.0)
    rstd = tl.load(Rstd + c, mask=c_mask, other=0.0)
    w, b = _channel_affine(W, B, c, c_mask, HAS_WEIGHT, HAS_BIAS, ACC)
    sum_dz = tl.zeros_like(rstd)
    sum_dz_xhat = tl.zeros_like(rstd)
    if TRAINING:
        sum_dz = tl.load(Sums + c, mask=c_mask, other=0.0)
        sum_dz_xhat = tl.load(Sums + C + c, mask=c_mask, other=0.0)
    dz_scale, xhat_scale, dz_shift = _dx_constants(w, rstd, sum_dz, sum_dz_xhat, inv_count)
    offset, mask = rows_tile_offsets(c, c_mask, (pid // tiles_c) * BLOCK_M, M, stride_m, INT64_INDEX, BLOCK_M)
    if DZ_STORED:
        x = tl.load(X + offset, mask=mask, other=0.0).to(ACC)
        dz = tl.load(DR + offset, mask=mask, other=0.0).to(ACC)
    else:
        x, dz = _load_x_and_dz(X, DY, R, offset, mask, mean[None, :], rstd[None, :], w[None, :], b[None, :], slope,
                               HAS_RESIDUAL, R_IS_OUTPUT, ACTIVATION, ACC)
    _dx_and_dresidual(DX, DR, offset, mask, x, dz, mean[None, :], rstd[None, :], dz_scale[None, :],
                      xhat_scale[None, :], dz_shift[None, :], TRAINING, WRITE_DR)


# ----------------------------------------------------------------------------------------------
# combine partial sums (both layouts)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bn_bwd_combine(
    Parts,  # [2 * splits, C] partial sums (ACC): sum dz rows, then sum dz * xhat rows
    Sums,  # [2, C] out (ACC), for the dx kernel: sum dz, sum dz * xhat
    DW, DB,  # [C] out, in the parameters' dtype
    C, splits,
    BLOCK_C: tl.constexpr,
):
    # grid: cdiv(C, BLOCK_C). Partials are added in a fixed order: the same bits every run.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    part_dy_xhat = Parts + splits * C
    sum_dy = tl.load(Parts + c, mask=c_mask, other=0.0)
    sum_dy_xhat = tl.load(part_dy_xhat + c, mask=c_mask, other=0.0)
    for part in range(1, splits):
        sum_dy += tl.load(Parts + part * C + c, mask=c_mask, other=0.0)
        sum_dy_xhat += tl.load(part_dy_xhat + part * C + c, mask=c_mask, other=0.0)
    tl.store(Sums + c, sum_dy, mask=c_mask)
    tl.store(Sums + C + c, sum_dy_xhat, mask=c_mask)
    tl.store(DW + c, sum_dy_xhat.to(DW.dtype.element_ty), mask=c_mask)
    tl.store(DB + c, sum_dy.to(DB.dtype.element_ty), mask=c_mask)
