"""BatchNorm forward kernels: batch statistics, normalisation, eval.

For each channel c, over the M = N * spatial elements of that channel:

    mean_c = (1/M) sum x
    var_c  = (1/M) sum (x - mean_c)^2                 (biased: it normalises)
    rstd_c = 1 / sqrt(var_c + eps)
    y      = (x - mean_c) * rstd_c * w_c + b_c
    y      = act(y + residual)                       (optional, see activation.py)

In eval mode mean_c and var_c are the running statistics and only the last lines run.

The input is seen in one of two canonical layouts, both read through their strides:

* NCS: [N, C, S] with the spatial axis S contiguous (NCHW, NCDHW, (N, C, L)). A program
  works on one channel; tiles are [BLOCK_N, BLOCK_S].
* rows: [M, C] with the channel axis contiguous (channels_last, channels_last_3d, (N, C)).
  A program works on BLOCK_C channels; tiles are [BLOCK_M, BLOCK_C].

Training forward takes one of two routes, chosen by the launcher from the split heuristic
(kernels/configs.py):

* one-launch: one program per channel (block) reduces the whole channel, updates its running
  statistics, then normalises it. One launch; the second read of x mostly hits L2 because
  each program's slice is small.
* split: partial statistics from many programs per channel -> a combine kernel that writes
  mean, rstd and var (and updates the running statistics) -> an elementwise normalise
  kernel. Used when there are too few
  channels to fill the GPU (ResNet stem: C = 64, M = 256 * 112 * 112).

Statistics are accumulated and stored in ACC (float32, or float64 for float64 input).
"""

import triton
import triton.language as tl

from .activation import activate
from .common import (
    CALLER_NORMALIZE,
    CALLER_PER_CHANNEL,
    CALLER_RUNNING,
    chan_combine,
    exact_scalar,
    ncs_program_chunk,
    ncs_tile_offsets,
    rows_tile_offsets,
    rsqrt_rn,
    shifted_moments,
    tile_total,
    tree_sum,
)
from .configs import (
    NCS_HEURISTICS,
    NCS_ONE_LAUNCH_HEURISTICS,
    NCS_SPLIT_REDUCE_HEURISTICS,
    PER_CHANNEL_BLOCK,
    ROWS_HEURISTICS,
    ROWS_ONE_LAUNCH_HEURISTICS,
    ROWS_SPLIT_REDUCE_HEURISTICS,
    autotune,
)
from .running_stats import blend_running_stats


@triton.jit
def _partial_rows(Parts, C, splits):
    """The split route's partial statistics, one allocation of [3 * splits + 1, C] (ACC):
    rows [0, splits) counts, [splits, 2 splits) means relative to the pivot, [2 splits,
    3 splits) M2, row 3 splits each channel's pivot k (x[0, c, 0], or x[0, c] for rows)."""
    return Parts, Parts + splits * C, Parts + 2 * splits * C, Parts + 3 * splits * C


# ----------------------------------------------------------------------------------------------
# NCS layout: [N, C, S], S contiguous
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ncs_channel_stats(X, c, n_begin, n_end, s_begin, s_end, stride_n, stride_c, k,
                       ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """(count, mean - k, M2) of channel c over n in [n_begin, n_end), s in [s_begin, s_end).

    Per-lane sums of d = x - k_tile over the [BLOCK_N, BLOCK_S] tile, k_tile the mean of the
    first tile, folded by tree_sum: the order of every operation is the shape's (common.py).
    """
    offset, mask = ncs_tile_offsets(c, n_begin, s_begin, n_end, s_end, stride_n, stride_c,
                                    INT64_INDEX, BLOCK_N, BLOCK_S)
    x = tl.load(X + offset, mask=mask, other=0.0).to(ACC)
    first_count = (tl.minimum(n_end - n_begin, BLOCK_N) * tl.minimum(s_end - s_begin, BLOCK_S)).to(ACC)
    k_tile = k + tile_total(tl.where(mask, x - k, 0.0), BLOCK_N, BLOCK_S) / first_count
    sum_d = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    sum_d2 = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    for n0 in range(n_begin, n_end, BLOCK_N):
        for s0 in range(s_begin, s_end, BLOCK_S):
            offset, mask = ncs_tile_offsets(c, n0, s0, n_end, s_end, stride_n, stride_c, INT64_INDEX, BLOCK_N, BLOCK_S)
            x = tl.load(X + offset, mask=mask, other=0.0).to(ACC)
            d = tl.where(mask, x - k_tile, 0.0)
            sum_d += d
            sum_d2 += d * d
    count = ((n_end - n_begin) * (s_end - s_begin)).to(ACC)
    mean, m2 = shifted_moments(count, k_tile, k, tile_total(sum_d, BLOCK_N, BLOCK_S),
                               tile_total(sum_d2, BLOCK_N, BLOCK_S))
    return count, mean, m2


@triton.jit
def _ncs_normalize_tile(X, Y, R, c, n0, s0, N, S, stride_n, stride_c, y_stride_n, y_stride_c,
                        mean, scale, shift, slope,
                        HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
                        ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """y = act((x - mean) * scale + shift + r) on one [BLOCK_N, BLOCK_S] tile of channel c."""
    n = n0 + tl.arange(0, BLOCK_N)
    if INT64_INDEX:
        n = n.to(tl.int64)
    s = s0 + tl.arange(0, BLOCK_S)
    mask = (n < N)[:, None] & (s < S)[None, :]
    c64 = c.to(tl.int64)
    x = tl.load(X + c64 * stride_c + n[:, None] * stride_n + s[None, :], mask=mask, other=0.0).to(ACC)
    y = (x - mean) * scale + shift
    y_offset = c64 * y_stride_c + n[:, None] * y_stride_n + s[None, :]
    if HAS_RESIDUAL:
        # The residual has the output's strides (the launcher makes sure).
        y += tl.load(R + y_offset, mask=mask, other=0.0).to(ACC)
    y = activate(y, slope, ACTIVATION)
    tl.store(Y + y_offset, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _scale_shift(W, B, c, rstd, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """Per-channel (scale, shift) with y = (x - mean) * scale + shift."""
    scale = rstd
    if HAS_WEIGHT:
        scale = scale * tl.load(W + c).to(ACC)
    shift = tl.zeros_like(scale)
    if HAS_BIAS:
        shift = tl.load(B + c).to(ACC)
    return scale, shift


@autotune("ncs_reduce", key=["bucket", "ACC"])
@triton.heuristics(NCS_SPLIT_REDUCE_HEURISTICS)
@triton.jit(do_not_specialize=["bucket"])
def _bn_fwd_stats_ncs(
    X,  # [N, C, S] input
    Parts,  # [3 * splits + 1, C] out (ACC, splits = split_n * split_s): see _partial_rows
    N, C, S, stride_n, stride_c,
    n_chunk, s_chunk,  # batch rows and spatial elements per program
    bucket,  # autotune key only (configs.tuning_bucket)
    split_n, split_s,
    ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # grid: C * split_n * split_s programs; a channel's programs are adjacent.
    c, part, n_begin, n_end, s_begin, s_end = ncs_program_chunk(tl.program_id(0), N, S, n_chunk, s_chunk,
                                                                split_n, split_s)
    k = tl.load(X + c.to(tl.int64) * stride_c).to(ACC)
    count, mean, m2 = _ncs_channel_stats(X, c, n_begin, n_end, s_begin, s_end, stride_n, stride_c, k,
                                         ACC, INT64_INDEX, BLOCK_N, BLOCK_S)
    part_count, part_mean, part_m2, pivot = _partial_rows(Parts, C, split_n * split_s)
    if part == 0:
        tl.store(pivot + c, k)
    offset = part * C + c
    tl.store(part_count + offset, count)
    tl.store(part_mean + offset, mean)
    tl.store(part_m2 + offset, m2)


@autotune("ncs_reduce", key=["bucket", "ACC", "ACTIVATION"], in_place_flag="UPDATE_RUNNING")
@triton.heuristics(NCS_ONE_LAUNCH_HEURISTICS)
@triton.jit(do_not_specialize=["bucket"], do_not_specialize_on_alignment=CALLER_PER_CHANNEL)
def _bn_fwd_one_launch_ncs(
    X, Y,  # [N, C, S] input and output (each through its own strides)
    R,  # [N, C, S] residual with the output's strides, when HAS_RESIDUAL
    W, B,  # [C] weight and bias, when HAS_WEIGHT / HAS_BIAS
    Stats,  # [3, C] batch statistics out (ACC): mean, rstd, biased var (backward, running stats)
    RunningMean, RunningVar, NumBatchesTracked,  # [C], [C], []: UPDATE_RUNNING (the counter: COUNT_BATCH)
    N, C, S, stride_n, stride_c, y_stride_n, y_stride_c,
    bucket,  # autotune key only (configs.tuning_bucket)
    eps, eps_lo, slope, slope_lo,  # float pairs (common.exact_scalar); slope: leaky_relu's negative slope
    momentum, momentum_lo, bessel, bessel_lo,  # float pairs: the running-statistics blend, M / (M - 1)
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, COUNT_BATCH: tl.constexpr,
    ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # grid: one program per channel, which reads its channel twice (the second time from L2).
    c = tl.program_id(0)
    k = tl.load(X + c.to(tl.int64) * stride_c).to(ACC)
    count, mean, m2 = _ncs_channel_stats(X, c, 0, N, 0, S, stride_n, stride_c, k,
                                         ACC, INT64_INDEX, BLOCK_N, BLOCK_S)
    mean += k
    eps = exact_scalar(eps, eps_lo, ACC)  # here, not at entry: nothing extra lives across the loop
    var = m2 / count
    rstd = rsqrt_rn(var + eps, ACC)
    tl.store(Stats + c, mean)
    tl.store(Stats + C + c, rstd)
    tl.store(Stats + 2 * C + c, var)
    if UPDATE_RUNNING:
        blend_running_stats(RunningMean, RunningVar, NumBatchesTracked, c, c < C, mean, var, momentum, momentum_lo,
                            exact_scalar(bessel, bessel_lo, ACC), CUMULATIVE, ACC, COUNT_BATCH, c == 0)
    slope = exact_scalar(slope, slope_lo, ACC)
    scale, shift = _scale_shift(W, B, c, rstd, HAS_WEIGHT, HAS_BIAS, ACC)
    for n0 in range(0, N, BLOCK_N):
        for s0 in range(0, S, BLOCK_S):
            _ncs_normalize_tile(X, Y, R, c, n0, s0, N, S, stride_n, stride_c, y_stride_n, y_stride_c,
                                mean, scale, shift, slope, HAS_RESIDUAL, ACTIVATION,
                                ACC, INT64_INDEX, BLOCK_N, BLOCK_S)


@autotune("ncs_elementwise", key=["bucket", "ACC", "ACTIVATION"])
@triton.heuristics(NCS_HEURISTICS)
@triton.jit(do_not_specialize=["bucket"], do_not_specialize_on_alignment=CALLER_NORMALIZE)
def _bn_fwd_normalize_ncs(
    X, Y,  # [N, C, S] input and output
    R,  # [N, C, S] residual with the output's strides, when HAS_RESIDUAL
    W, B,  # [C] weight and bias, when HAS_WEIGHT / HAS_BIAS
    EvalMean, EvalVar,  # [C] what eval normalises with (the running statistics, read only), when FROM_RUNNING
    Stats,  # [3, C] (ACC): batch mean and rstd in; FROM_RUNNING: mean, rstd, var out (what backward needs)
    N, C, S, stride_n, stride_c, y_stride_n, y_stride_c,
    bucket,  # autotune key only (configs.tuning_bucket)
    eps, eps_lo, slope, slope_lo,  # float pairs (common.exact_scalar); slope: leaky_relu's negative slope
    FROM_RUNNING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    eps = exact_scalar(eps, eps_lo, ACC)
    slope = exact_scalar(slope, slope_lo, ACC)
    # grid: C * cdiv(N, BLOCK_N) * cdiv(S, BLOCK_S) programs, one tile each.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_s = tl.cdiv(S, BLOCK_S)
    c = pid // (tiles_n * tiles_s)
    tile = pid % (tiles_n * tiles_s)
    tile_n = tile // tiles_s
    tile_s = tile % tiles_s
    if FROM_RUNNING:
        mean = tl.load(EvalMean + c).to(ACC)
        var = tl.load(EvalVar + c).to(ACC)
        rstd = rsqrt_rn(var + eps, ACC)
        if tile == 0:
            tl.store(Stats + c, mean)
            tl.store(Stats + C + c, rstd)
            tl.store(Stats + 2 * C + c, var)
    else:
        mean = tl.load(Stats + c).to(ACC)
        rstd = tl.load(Stats + C + c).to(ACC)
    scale, shift = _scale_shift(W, B, c, rstd, HAS_WEIGHT, HAS_BIAS, ACC)
    _ncs_normalize_tile(X, Y, R, c, tile_n * BLOCK_N, tile_s * BLOCK_S, N, S, stride_n, stride_c,
                        y_stride_n, y_stride_c, mean, scale, shift, slope, HAS_RESIDUAL, ACTIVATION,
                        ACC, INT64_INDEX, BLOCK_N, BLOCK_S)


# ----------------------------------------------------------------------------------------------
# rows layout: [M, C], C contiguous
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rows_channel_stats(X, c, c_mask, m_begin, m_end, stride_m, k,
                        ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """(count, mean - k, M2) per channel of the block c over rows [m_begin, m_end): per-lane
    (row of the tile) sums of x - k_tile, k_tile the first tile's mean, as in the NCS layout."""
    offset, mask = rows_tile_offsets(c, c_mask, m_begin, m_end, stride_m, INT64_INDEX, BLOCK_M)
    x = tl.load(X + offset, mask=mask, other=0.0).to(ACC)
    first_count = tl.minimum(m_end - m_begin, BLOCK_M).to(ACC)
    k_tile = k + tree_sum(tl.where(mask, x - k[None, :], 0.0), BLOCK_M) / first_count
    sum_d = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    sum_d2 = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offset, mask = rows_tile_offsets(c, c_mask, m0, m_end, stride_m, INT64_INDEX, BLOCK_M)
        x = tl.load(X + offset, mask=mask, other=0.0).to(ACC)
        d = tl.where(mask, x - k_tile[None, :], 0.0)
        sum_d += d
        sum_d2 += d * d
    count = tl.zeros([BLOCK_C], ACC) + (m_end - m_begin).to(ACC)
    mean, m2 = shifted_moments(count, k_tile, k, tree_sum(sum_d, BLOCK_M), tree_sum(sum_d2, BLOCK_M))
    return count, mean, m2


@triton.jit
def _rows_normalize_tile(X, Y, R, c, c_mask, m0, M, stride_m, y_stride_m, mean, scale, shift, slope,
                         HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
                         ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = act((x - mean) * scale + shift + r) on one [BLOCK_M, BLOCK_C] tile."""
    m = m0 + tl.arange(0, BLOCK_M)
    if INT64_INDEX:
        m = m.to(tl.int64)
    mask = (m < M)[:, None] & c_mask[None, :]
    x = tl.load(X + m[:, None] * stride_m + c[None, :], mask=mask, other=0.0).to(ACC)
    y = (x - mean[None, :]) * scale[None, :] + shift[None, :]
    y_offset = m[:, None] * y_stride_m + c[None, :]
    if HAS_RESIDUAL:
        y += tl.load(R + y_offset, mask=mask, other=0.0).to(ACC)
    y = activate(y, slope, ACTIVATION)
    tl.store(Y + y_offset, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rows_scale_shift(W, B, c, c_mask, rstd, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    scale = rstd
    if HAS_WEIGHT:
        scale = scale * tl.load(W + c, mask=c_mask, other=1.0).to(ACC)
    shift = tl.zeros_like(scale)
    if HAS_BIAS:
        shift = tl.load(B + c, mask=c_mask, other=0.0).to(ACC)
    return scale, shift


@autotune("rows_reduce", key=["bucket", "ACC"])
@triton.heuristics(ROWS_SPLIT_REDUCE_HEURISTICS)
@triton.jit(do_not_specialize=["bucket"])
def _bn_fwd_stats_rows(
    X,  # [M, C] input, rows stride_m apart
    Parts,  # [3 * split_m + 1, C] out (ACC): see _partial_rows
    M, C, stride_m,
    m_chunk, split_m,  # rows per program, programs per channel block
    bucket,  # autotune key only (configs.tuning_bucket)
    ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    MAX_BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid: cdiv(C, BLOCK_C) * split_m programs.
    pid = tl.program_id(0)
    c_block = pid // split_m
    part = pid % split_m
    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    m_begin = part * m_chunk
    m_end = tl.minimum(m_begin + m_chunk, M)
    k = tl.load(X + c, mask=c_mask, other=0.0).to(ACC)
    count, mean, m2 = _rows_channel_stats(X, c, c_mask, m_begin, m_end, stride_m, k,
                                          ACC, INT64_INDEX, BLOCK_M, BLOCK_C)
    part_count, part_mean, part_m2, pivot = _partial_rows(Parts, C, split_m)
    if part == 0:
        tl.store(pivot + c, k, mask=c_mask)
    offset = part * C + c
    tl.store(part_count + offset, count, mask=c_mask)
    tl.store(part_mean + offset, mean, mask=c_mask)
    tl.store(part_m2 + offset, m2, mask=c_mask)


@autotune("rows_reduce", key=["bucket", "ACC", "ACTIVATION"], in_place_flag="UPDATE_RUNNING")
@triton.heuristics(ROWS_ONE_LAUNCH_HEURISTICS)
@triton.jit(do_not_specialize=["bucket"], do_not_specialize_on_alignment=CALLER_PER_CHANNEL)
def _bn_fwd_one_launch_rows(
    X, Y,  # [M, C] input and output
    R,  # [M, C] residual with the output's strides, when HAS_RESIDUAL
    W, B,  # [C] weight and bias, when HAS_WEIGHT / HAS_BIAS
    Stats,  # [3, C] batch statistics out (ACC): mean, rstd, biased var (backward, running stats)
    RunningMean, RunningVar, NumBatchesTracked,  # [C], [C], []: UPDATE_RUNNING (the counter: COUNT_BATCH)
    M, C, stride_m, y_stride_m,
    bucket,  # autotune key only (configs.tuning_bucket)
    eps, eps_lo, slope, slope_lo,  # float pairs (common.exact_scalar); slope: leaky_relu's negative slope
    momentum, momentum_lo, bessel, bessel_lo,  # float pairs: the running-statistics blend, M / (M - 1)
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, COUNT_BATCH: tl.constexpr,
    ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    MAX_BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid: one program per block of BLOCK_C channels, over all M rows, twice.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    k = tl.load(X + c, mask=c_mask, other=0.0).to(ACC)
    count, mean, m2 = _rows_channel_stats(X, c, c_mask, 0, M, stride_m, k, ACC, INT64_INDEX, BLOCK_M, BLOCK_C)
    mean += k
    eps = exact_scalar(eps, eps_lo, ACC)  # here, not at entry: nothing extra lives across the loop
    var = m2 / tl.maximum(count, 1.0)  # count is 0 only in the block's padding channels
    rstd = rsqrt_rn(var + eps, ACC)
    tl.store(Stats + c, mean, mask=c_mask)
    tl.store(Stats + C + c, rstd, mask=c_mask)
    tl.store(Stats + 2 * C + c, var, mask=c_mask)
    if UPDATE_RUNNING:
        blend_running_stats(RunningMean, RunningVar, NumBatchesTracked, c, c_mask, mean, var, momentum, momentum_lo,
                            exact_scalar(bessel, bessel_lo, ACC), CUMULATIVE, ACC, COUNT_BATCH,
                            tl.program_id(0) == 0)
    slope = exact_scalar(slope, slope_lo, ACC)
    scale, shift = _rows_scale_shift(W, B, c, c_mask, rstd, HAS_WEIGHT, HAS_BIAS, ACC)
    for m0 in range(0, M, BLOCK_M):
        _rows_normalize_tile(X, Y, R, c, c_mask, m0, M, stride_m, y_stride_m, mean, scale, shift, slope,
                             HAS_RESIDUAL, ACTIVATION, ACC, INT64_INDEX, BLOCK_M, BLOCK_C)


@autotune("rows_elementwise", key=["bucket", "ACC", "ACTIVATION"])
@triton.heuristics(ROWS_HEURISTICS)
@triton.jit(do_not_specialize=["bucket"], do_not_specialize_on_alignment=CALLER_NORMALIZE)
def _bn_fwd_normalize_rows(
    X, Y,  # [M, C] input and output
    R,  # [M, C] residual with the output's strides, when HAS_RESIDUAL
    W, B,  # [C] weight and bias, when HAS_WEIGHT / HAS_BIAS
    EvalMean, EvalVar,  # [C] what eval normalises with (the running statistics, read only), when FROM_RUNNING
    Stats,  # [3, C] (ACC): batch mean and rstd in; FROM_RUNNING: mean, rstd, var out (what backward needs)
    M, C, stride_m, y_stride_m,
    bucket,  # autotune key only (configs.tuning_bucket)
    eps, eps_lo, slope, slope_lo,  # float pairs (common.exact_scalar); slope: leaky_relu's negative slope
    FROM_RUNNING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    TILE: tl.constexpr, MAX_BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    eps = exact_scalar(eps, eps_lo, ACC)
    slope = exact_scalar(slope, slope_lo, ACC)
    # grid: cdiv(M, BLOCK_M) * cdiv(C, BLOCK_C) programs; neighbours share rows.
    pid = tl.program_id(0)
    tiles_c = tl.cdiv(C, BLOCK_C)
    tile_m = pid // tiles_c
    c = (pid % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    if FROM_RUNNING:
        mean = tl.load(EvalMean + c, mask=c_mask, other=0.0).to(ACC)
        var = tl.load(EvalVar + c, mask=c_mask, other=1.0).to(ACC)
        rstd = rsqrt_rn(var + eps, ACC)
        if tile_m == 0:
            tl.store(Stats + c, mean, mask=c_mask)
            tl.store(Stats + C + c, rstd, mask=c_mask)
            tl.store(Stats + 2 * C + c, var, mask=c_mask)
    else:
        mean = tl.load(Stats + c, mask=c_mask, other=0.0).to(ACC)
        rstd = tl.load(Stats + C + c, mask=c_mask, other=1.0).to(ACC)
    scale, shift = _rows_scale_shift(W, B, c, c_mask, rstd, HAS_WEIGHT, HAS_BIAS, ACC)
    _rows_normalize_tile(X, Y, R, c, c_mask, tile_m * BLOCK_M, M, stride_m, y_stride_m, mean, scale, shift,
                         slope, HAS_RESIDUAL, ACTIVATION, ACC, INT64_INDEX, BLOCK_M, BLOCK_C)


# ----------------------------------------------------------------------------------------------
# combine partials (both layouts)
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize_on_alignment=CALLER_RUNNING)
def _bn_fwd_combine(
    Parts,  # [3 * splits + 1, C] the statistics kernel's partial rows (ACC): see _partial_rows
    Stats,  # [3, C] out (ACC): mean, rstd, biased var
    RunningMean, RunningVar, NumBatchesTracked,  # [C], [C], []: UPDATE_RUNNING (the counter: COUNT_BATCH)
    C, splits, eps, eps_lo,  # eps as a float pair (common.exact_scalar)
    momentum, momentum_lo, bessel, bessel_lo,  # float pairs: the running-statistics blend, M / (M - 1)
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, COUNT_BATCH: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    eps = exact_scalar(eps, eps_lo, ACC)
    # grid: cdiv(C, BLOCK_C). Partials are merged in a fixed order: the same bits every run.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    count = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    part_count, part_mean, part_m2, pivot = _partial_rows(Parts, C, splits)
    for part in range(0, splits):
        offset = part * C + c
        count, mean, m2 = chan_combine(
            count, mean, m2,
            tl.load(part_count + offset, mask=c_mask, other=0.0),
            tl.load(part_mean + offset, mask=c_mask, other=0.0),
            tl.load(part_m2 + offset, mask=c_mask, other=0.0),
        )
    var = m2 / tl.maximum(count, 1.0)
    mean += tl.load(pivot + c, mask=c_mask, other=0.0)
    tl.store(Stats + c, mean, mask=c_mask)
    tl.store(Stats + C + c, rsqrt_rn(var + eps, ACC), mask=c_mask)
    tl.store(Stats + 2 * C + c, var, mask=c_mask)
    if UPDATE_RUNNING:
        blend_running_stats(RunningMean, RunningVar, NumBatchesTracked, c, c_mask, mean, var, momentum, momentum_lo,
                            exact_scalar(bessel, bessel_lo, ACC), CUMULATIVE, ACC, COUNT_BATCH,
                            tl.program_id(0) == 0)


COMBINE_BLOCK_C = PER_CHANNEL_BLOCK
