"""GroupNorm kernels (InstanceNorm is GroupNorm with one channel per group): statistics per
(sample, group), the per-channel affine with the fused epilogue, and the backward.

For sample n and group g, over the K = D * S elements of its D = C / G channels and S spatial
positions:

    mean_ng = (1/K) sum x
    var_ng  = (1/K) sum (x - mean_ng)^2             (biased: it normalises)
    rstd_ng = 1 / sqrt(var_ng + eps)
    xhat    = (x - mean_ng) * rstd_ng
    z       = xhat * w_c + b_c (+ residual)          (per-channel affine, c in group g)
    y       = act(z)                                 (kernels/activation.py)

Backward, with dz = dy * act'(z) (z recomputed from x, never stored):

    dbeta_c  = sum over n, s of dz                   (per channel, over samples and space)
    dgamma_c = sum over n, s of dz * xhat
    dx       = rstd_ng * (w_c dz - (sum_g w dz) / K - xhat (sum_g w dz xhat) / K)
    dresidual = dz

where sum_g runs over the group's K elements; it is computed from the per-(n, c) sums of dz
and dz * xhat (sum_g w dz = sum over c of w_c * sum_s dz), which are also what dgamma and
dbeta add up over the samples.

The statistics are BatchNorm's (kernels/common.py): sums of d = x - k_tile per lane of a tile,
k_tile the first tile's mean, folded by tree_sum; partial results are merged by Chan's
formula relative to the group's pivot (its first element). Every sum has the shape's order,
never a config's: the same bits under every config.

Layouts, read through strides, for both of which a group is a [D, S] block of one sample:

* NCS (NCHW-like, spatial contiguous): tiles [BLOCK_C, BLOCK_S]; a group of a contiguous
  tensor is one run of D * S elements.
* channels_last (and (N, C) inputs): tiles [BLOCK_S, BLOCK_C], the channel axis contiguous
  (CHANNELS_LAST); a group is a strided [S, D] block.

The launcher (tritonbn/_group_launch.py) passes the group's element offset as
n * stride_n + g * stride_g, and stride_x, the stride of the tile's strided axis (between
channels for NCS, between spatial positions for channels_last).

Grid: ``splits`` adjacent programs per (sample, group) pair (configs.gn_split), each owning a
chunk of the spatial axis, [part * s_chunk, (part + 1) * s_chunk):

* one-launch (splits = 1): one program per group reads it, stores (mean, rstd, var), then
  normalises it (the second read mostly from L2). Backward: one program per group computes
  its per-channel sums, then dx; a small combine adds the per-channel sums over samples.
* split: partial statistics per chunk -> forward.py's combine (the same Chan merge, one
  "channel" per group) -> normalise per chunk. Backward: per-channel partial sums per chunk ->
  combine (dgamma, dbeta, and the per-(n, c) sums) -> dx per chunk.

Statistics are accumulated and stored in ACC (float32, or float64 for float64 input).
"""

import triton
import triton.language as tl

from .activation import activate, activation_grad
from .common import exact_scalar, rsqrt_rn, shifted_moments, tile_total, tree_sum
from .configs import GN_ELEMENTWISE_HEURISTICS, GN_REDUCE_HEURISTICS, autotune
from .forward import _partial_rows
from .running_stats import blend_running_stats

# ----------------------------------------------------------------------------------------------
# tiles of a group
# ----------------------------------------------------------------------------------------------


@triton.jit
def _program_group(pid, G, D: tl.constexpr, S, stride_n, stride_g, s_chunk, splits, CHANNELS_LAST: tl.constexpr):
    """(pair index n * G + g, g, the group's element offset, spatial chunk [s_begin, s_end)).

    channels_last: a group starts D channels after the previous one (stride_g == D). D is a
    compile-time constant, so the compiler knows how a group's start is aligned (the runtime
    stride would hide it): a diffusion UNet's C / G = 40 then gets 128-bit accesses.
    """
    ng = pid // splits
    part = pid % splits
    if CHANNELS_LAST:
        base = (ng // G).to(tl.int64) * stride_n + (ng % G).to(tl.int64) * D
    else:
        base = (ng // G).to(tl.int64) * stride_n + (ng % G).to(tl.int64) * stride_g
    s_begin = part * s_chunk
    return ng, ng % G, part, base, s_begin, tl.minimum(s_begin + s_chunk, S)


@triton.jit
def _group_tile(c0, s0, D, s_end, stride_x, CHANNELS_LAST: tl.constexpr, INT64_INDEX: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets (from the group's first element) and mask of the tile at channel c0, position s0."""
    c = c0 + tl.arange(0, BLOCK_C)
    s = s0 + tl.arange(0, BLOCK_S)
    if INT64_INDEX:
        c = c.to(tl.int64)
        s = s.to(tl.int64)
    if CHANNELS_LAST:  # [BLOCK_S, BLOCK_C], channels contiguous
        offset = s[:, None] * stride_x + c[None, :]
        mask = (s < s_end)[:, None] & (c < D)[None, :]
    else:  # [BLOCK_C, BLOCK_S], spatial contiguous
        offset = c[:, None] * stride_x + s[None, :]
        mask = (c < D)[:, None] & (s < s_end)[None, :]
    return offset, mask


@triton.jit
def _tile_zeros(ACC: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    if CHANNELS_LAST:
        zeros = tl.zeros([BLOCK_S, BLOCK_C], ACC)
    else:
        zeros = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    return zeros


@triton.jit
def _per_channel(v, CHANNELS_LAST: tl.constexpr):
    """A [BLOCK_C] vector, shaped to broadcast over a tile."""
    if CHANNELS_LAST:
        out = v[None, :]
    else:
        out = v[:, None]
    return out


@triton.jit
def _tree_sum_cols(x, COLS: tl.constexpr):
    """Sum over the second axis of a [K, COLS] tensor: column j + column j + COLS/2 at each
    level (tree_sum's order, along the other axis)."""
    for _ in tl.static_range(COLS.bit_length() - 1):
        x = tl.sum(tl.reshape(x, [x.shape[0], 2, x.shape[1] // 2]), axis=1)
    return tl.reshape(x, [x.shape[0]])


@triton.jit
def _channel_sums(t, CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr):
    """[BLOCK_C] per-channel sums of a tile, over its spatial lanes in tree order."""
    if CHANNELS_LAST:
        out = tree_sum(t, BLOCK_S)
    else:
        out = _tree_sum_cols(t, BLOCK_S)
    return out


@triton.jit
def _vector_total(v, BLOCK_C: tl.constexpr):
    """The sum of a [BLOCK_C] vector in tree order, as a [1] tensor."""
    return tree_sum(tl.reshape(v, [BLOCK_C, 1]), BLOCK_C)


@triton.jit
def _affine(W, B, channel, c_mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
            BLOCK_C: tl.constexpr):
    """(w, b) of a block of channels, 1 and 0 when absent."""
    b = tl.zeros([BLOCK_C], ACC)
    w = b + 1.0
    if HAS_WEIGHT:
        w = tl.load(W + channel, mask=c_mask, other=1.0).to(ACC)
    if HAS_BIAS:
        b = tl.load(B + channel, mask=c_mask, other=0.0).to(ACC)
    return w, b


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _group_stats(X, base, k, D, s_begin, s_end, stride_x,
                 ACC: tl.constexpr, CHANNELS_LAST: tl.constexpr, INT64_INDEX: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """(count, mean - k, M2) of the group at X + base over its D channels and the spatial
    positions [s_begin, s_end): per-lane sums of x - k_tile, k_tile the first tile's mean."""
    offset, mask = _group_tile(0, s_begin, D, s_end, stride_x, CHANNELS_LAST, INT64_INDEX, BLOCK_C, BLOCK_S)
    x = tl.load(X + base + offset, mask=mask, other=0.0).to(ACC)
    first_count = (tl.zeros([], ACC) + tl.minimum(D, BLOCK_C)) * tl.minimum(s_end - s_begin, BLOCK_S)
    k_tile = k + tile_total(tl.where(mask, x - k, 0.0), BLOCK_C, BLOCK_S) / first_count
    sum_d = _tile_zeros(ACC, CHANNELS_LAST, BLOCK_C, BLOCK_S)
    sum_d2 = _tile_zeros(ACC, CHANNELS_LAST, BLOCK_C, BLOCK_S)
    for c0 in range(0, D, BLOCK_C):
        for s0 in range(s_begin, s_end, BLOCK_S):
            offset, mask = _group_tile(c0, s0, D, s_end, stride_x, CHANNELS_LAST, INT64_INDEX, BLOCK_C, BLOCK_S)
            x = tl.load(X + base + offset, mask=mask, other=0.0).to(ACC)
            d = tl.where(mask, x - k_tile, 0.0)
            sum_d += d
            sum_d2 += d * d
    count = (tl.zeros([], ACC) + D) * (s_end - s_begin)
    mean, m2 = shifted_moments(count, k_tile, k, tile_total(sum_d, BLOCK_C, BLOCK_S),
                               tile_total(sum_d2, BLOCK_C, BLOCK_S))
    return count, mean, m2


@triton.jit
def _normalize_chunk(X, Y, R, W, B, base, g, D, s_begin, s_end, stride_x, mean, rstd, slope,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     ACTIVATION: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                     INT64_INDEX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """y = act((x - mean) * scale + shift + r), scale = rstd * w_c, shift = b_c, on the group's
    positions [s_begin, s_end). The residual and the output have the input's strides."""
    for c0 in range(0, D, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        w, b = _affine(W, B, g * D + c, c < D, HAS_WEIGHT, HAS_BIAS, ACC, BLOCK_C)
        scale = _per_channel(rstd * w, CHANNELS_LAST)
        shift = _per_channel(b, CHANNELS_LAST)
        for s0 in range(s_begin, s_end, BLOCK_S):
            offset, mask = _group_tile(c0, s0, D, s_end, stride_x, CHANNELS_LAST, INT64_INDEX, BLOCK_C, BLOCK_S)
            x = tl.load(X + base + offset, mask=mask, other=0.0).to(ACC)
            y = (x - mean) * scale + shift
            if HAS_RESIDUAL:
                y += tl.load(R + base + offset, mask=mask, other=0.0).to(ACC)
            y = activate(y, slope, ACTIVATION)
            tl.store(Y + base + offset, y.to(Y.dtype.element_ty), mask=mask)


@autotune("gn_reduce", key=["bucket", "ACC", "ACTIVATION", "CHANNELS_LAST"])
@triton.heuristics(GN_REDUCE_HEURISTICS)
@triton.jit(do_not_specialize=["bucket"])
def _gn_fwd_one_launch(
    X, Y,  # [N, C, *] input and output (the same strides)
    R,  # residual with the input's strides, when HAS_RESIDUAL
    W, B,  # [C] weight and bias, when HAS_WEIGHT / HAS_BIAS
    Mean, Rstd, Var,  # [N * G] out (ACC): per (sample, group), Var biased
    G, D: tl.constexpr, S, stride_n, stride_g, stride_x,  # D: the group's channels, compile-time
    s_chunk, splits,  # S and 1 here (the tile heuristics read s_chunk)
    bucket,  # autotune key only (configs.tuning_bucket)
    eps, eps_lo, slope, slope_lo,  # float pairs (common.exact_scalar); slope: leaky_relu's negative slope
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # grid: one program per (sample, group), which reads its group twice.
    ng, g, _, base, s_begin, s_end = _program_group(
        tl.program_id(0), G, D, S, stride_n, stride_g, s_chunk, splits, CHANNELS_LAST)
    k = tl.load(X + base).to(ACC)
    count, mean, m2 = _group_stats(X, base, k, D, s_begin, s_end, stride_x, ACC, CHANNELS_LAST, INT64_INDEX,
                                   BLOCK_C, BLOCK_S)
    mean += k
    var = m2 / count
    rstd = rsqrt_rn(var + exact_scalar(eps, eps_lo, ACC), ACC)
    tl.store(Mean + ng, mean)
    tl.store(Rstd + ng, rstd)
    tl.store(Var + ng, var)
    _normalize_chunk(X, Y, R, W, B, base, g, D, s_begin, s_end, stride_x, mean, rstd,
                     exact_scalar(slope, slope_lo, ACC), HAS_WEIGHT, HAS_BIAS, HAS_RESIDUAL, ACTIVATION,
                     CHANNELS_LAST, ACC, INT64_INDEX, BLOCK_C, BLOCK_S)


@autotune("gn_reduce", key=["bucket", "ACC", "CHANNELS_LAST"])
@triton.heuristics(GN_REDUCE_HEURISTICS)
@triton.jit(do_not_specialize=["bucket"])
def _gn_fwd_stats(
    X,  # [N, C, *] input
    Parts,  # [3 * splits + 1, N * G] out (ACC): forward.py's _partial_rows, one column per group
    G, D: tl.constexpr, S, stride_n, stride_g, stride_x,  # D: the group's channels, compile-time
    s_chunk, splits,  # spatial positions per program, programs per group
    pairs,  # N * G
    bucket,  # autotune key only (configs.tuning_bucket)
    CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # grid: N * G * splits programs; a group's programs are adjacent. forward.py's
    # _bn_fwd_combine merges the partial rows, with a "channel" per group.
    ng, _, part, base, s_begin, s_end = _program_group(
        tl.program_id(0), G, D, S, stride_n, stride_g, s_chunk, splits, CHANNELS_LAST)
    k = tl.load(X + base).to(ACC)
    count, mean, m2 = _group_stats(X, base, k, D, s_begin, s_end, stride_x, ACC, CHANNELS_LAST, INT64_INDEX,
                                   BLOCK_C, BLOCK_S)
    part_count, part_mean, part_m2, pivot = _partial_rows(Parts, pairs, splits)
    if part == 0:
        tl.store(pivot + ng, k)
    offset = part * pairs + ng
    tl.store(part_count + offset, count)
    tl.store(part_mean + offset, mean)
    tl.store(part_m2 + offset, m2)


@autotune("gn_elementwise", key=["bucket", "ACC", "ACTIVATION", "CHANNELS_LAST"])
@triton.heuristics(GN_ELEMENTWISE_HEURISTICS)
@triton.jit(do_not_specialize=["bucket"])
def _gn_fwd_normalize(
    X, Y,  # [N, C, *] input and output (the same strides)
    R,  # residual with the input's strides, when HAS_RESIDUAL
    W, B,  # [C] weight and bias, when HAS_WEIGHT / HAS_BIAS
    Mean, Rstd,  # [N * G] statistics in (ACC)
    G, D: tl.constexpr, S, stride_n, stride_g, stride_x,  # D: the group's channels, compile-time
    s_chunk, splits,
    bucket,  # autotune key only (configs.tuning_bucket)
    slope, slope_lo,  # float pair (common.exact_scalar): leaky_relu's negative slope
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    TILE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # grid: N * G * splits programs, each normalising its chunk of a group.
    ng, g, _, base, s_begin, s_end = _program_group(
        tl.program_id(0), G, D, S, stride_n, stride_g, s_chunk, splits, CHANNELS_LAST)
    _normalize_chunk(X, Y, R, W, B, base, g, D, s_begin, s_end, stride_x, tl.load(Mean + ng), tl.load(Rstd + ng),
                     exact_scalar(slope, slope_lo, ACC), HAS_WEIGHT, HAS_BIAS, HAS_RESIDUAL, ACTIVATION,
                     CHANNELS_LAST, ACC, INT64_INDEX, BLOCK_C, BLOCK_S)


@triton.jit
def _gn_fwd_running_stats(
    RunningMean, RunningVar,  # [C] updated in place, in their own dtype
    Mean, Var,  # [N * C] per-(sample, channel) mean and biased variance (ACC)
    N, C, momentum, momentum_lo, bessel, bessel_lo,  # float pairs (common.exact_scalar); bessel = S / (S - 1)
    ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """InstanceNorm's running statistics, as torch.instance_norm updates them: each sample's
    statistics blended into the running ones, averaged over the samples,

        running_mean = (1 - momentum) * running_mean + momentum * mean_n(mean_nc)
        running_var  = (1 - momentum) * running_var  + momentum * mean_n(var_nc * S / (S - 1))
    """
    # grid: cdiv(C, BLOCK_C). Samples are added in order: the same bits every run.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.zeros([BLOCK_C], ACC)
    var = tl.zeros([BLOCK_C], ACC)
    for n in range(0, N):
        mean += tl.load(Mean + n * C + c, mask=c_mask, other=0.0)
        var += tl.load(Var + n * C + c, mask=c_mask, other=0.0)
    blend_running_stats(RunningMean, RunningVar, RunningMean, c, c_mask, mean / N, var / N, momentum, momentum_lo,
                        exact_scalar(bessel, bessel_lo, ACC), False, ACC)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_x_and_dz(X, DY, R, base, offset, mask, mean, scale, shift, slope,
                   HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, ACC: tl.constexpr):
    """x and dz of a tile. Masked lanes give dy = 0, hence dz = 0: they add to no sum."""
    x = tl.load(X + base + offset, mask=mask, other=0.0).to(ACC)
    dz = tl.load(DY + base + offset, mask=mask, other=0.0).to(ACC)
    if ACTIVATION != 0:
        # The forward's own operation order: act'(z) agrees with the output it wrote.
        z = (x - mean) * scale + shift
        if HAS_RESIDUAL:
            z += tl.load(R + base + offset, mask=mask, other=0.0).to(ACC)
        dz = activation_grad(z, dz, slope, ACTIVATION)
    return x, dz


@triton.jit
def _group_grad_sums(X, DY, R, W, B, PartDz, PartDzXhat, base, g, D, s_begin, s_end, stride_x, mean, rstd, slope,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     ACTIVATION: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                     INT64_INDEX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per channel of the group, sum dz and sum dz * xhat over [s_begin, s_end), stored at
    PartDz + c and PartDzXhat + c (c the channel within the group); returns the chunk's
    (sum w dz, sum w dz xhat) over the group, channel blocks added in order."""
    sum_w_dz = tl.zeros([1], ACC)
    sum_w_dz_xhat = tl.zeros([1], ACC)
    for c0 in range(0, D, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < D
        w, b = _affine(W, B, g * D + c, c_mask, HAS_WEIGHT, HAS_BIAS, ACC, BLOCK_C)
        scale = _per_channel(rstd * w, CHANNELS_LAST)
        shift = _per_channel(b, CHANNELS_LAST)
        acc_dz = _tile_zeros(ACC, CHANNELS_LAST, BLOCK_C, BLOCK_S)
        acc_dz_xmu = _tile_zeros(ACC, CHANNELS_LAST, BLOCK_C, BLOCK_S)
        for s0 in range(s_begin, s_end, BLOCK_S):
            offset, mask = _group_tile(c0, s0, D, s_end, stride_x, CHANNELS_LAST, INT64_INDEX, BLOCK_C, BLOCK_S)
            x, dz = _load_x_and_dz(X, DY, R, base, offset, mask, mean, scale, shift, slope, HAS_RESIDUAL,
                                   ACTIVATION, ACC)
            acc_dz += dz
            acc_dz_xmu += dz * (x - mean)
        sum_dz = _channel_sums(acc_dz, CHANNELS_LAST, BLOCK_S)
        sum_dz_xhat = _channel_sums(acc_dz_xmu, CHANNELS_LAST, BLOCK_S) * rstd
        tl.store(PartDz + c, sum_dz, mask=c_mask)
        tl.store(PartDzXhat + c, sum_dz_xhat, mask=c_mask)
        sum_w_dz += _vector_total(w * sum_dz, BLOCK_C)
        sum_w_dz_xhat += _vector_total(w * sum_dz_xhat, BLOCK_C)
    return tl.sum(sum_w_dz, axis=0), tl.sum(sum_w_dz_xhat, axis=0)  # [1] -> scalars


@triton.jit
def _dx_chunk(X, DY, R, DX, DR, W, B, base, g, D, s_begin, s_end, stride_x, mean, rstd, slope,
              sum_w_dz, sum_w_dz_xhat, inv_count,
              HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
              ACTIVATION: tl.constexpr, WRITE_DR: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
              INT64_INDEX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """dx = (rstd w_c) dz - xhat (rstd sum_g w dz xhat / K) - rstd sum_g w dz / K on the chunk;
    dresidual = dz when WRITE_DR."""
    xhat_scale = rstd * sum_w_dz_xhat * inv_count
    dz_shift = rstd * sum_w_dz * inv_count
    for c0 in range(0, D, BLOCK_C):
        for s0 in range(s_begin, s_end, BLOCK_S):
            _dx_tile(X, DY, R, DX, DR, W, B, base, g, D, c0, s0, s_end, stride_x, mean, rstd, slope, xhat_scale,
                     dz_shift, HAS_WEIGHT, HAS_BIAS, HAS_RESIDUAL, ACTIVATION, WRITE_DR, CHANNELS_LAST, ACC,
                     INT64_INDEX, BLOCK_C, BLOCK_S)


@triton.jit
def _dx_tile(X, DY, R, DX, DR, W, B, base, g, D, c0, s0, s_end, stride_x, mean, rstd, slope, xhat_scale, dz_shift,
             HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
             ACTIVATION: tl.constexpr, WRITE_DR: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
             INT64_INDEX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """dx (and dresidual) of the [BLOCK_C, BLOCK_S] tile at channel block c0, position s0."""
    c = c0 + tl.arange(0, BLOCK_C)
    w, b = _affine(W, B, g * D + c, c < D, HAS_WEIGHT, HAS_BIAS, ACC, BLOCK_C)
    scale = _per_channel(rstd * w, CHANNELS_LAST)  # also dx's factor of dz
    shift = _per_channel(b, CHANNELS_LAST)
    offset, mask = _group_tile(c0, s0, D, s_end, stride_x, CHANNELS_LAST, INT64_INDEX, BLOCK_C, BLOCK_S)
    x, dz = _load_x_and_dz(X, DY, R, base, offset, mask, mean, scale, shift, slope, HAS_RESIDUAL, ACTIVATION, ACC)
    dx = dz * scale - ((x - mean) * rstd) * xhat_scale - dz_shift
    tl.store(DX + base + offset, dx.to(DX.dtype.element_ty), mask=mask)
    if WRITE_DR:
        tl.store(DR + base + offset, dz.to(DR.dtype.element_ty), mask=mask)


@autotune("gn_reduce", key=["bucket", "ACC", "ACTIVATION", "CHANNELS_LAST"])
@triton.heuristics(GN_REDUCE_HEURISTICS)
@triton.jit(do_not_specialize=["bucket"])
def _gn_bwd_one_launch(
    X, DY, R,  # [N, C, *] input, output gradient, residual (when HAS_RESIDUAL): the input's strides
    DX, DR,  # out: input gradient, residual gradient (when WRITE_DR)
    W, B, Mean, Rstd,  # [C] affine parameters (when HAS_*), [N * G] saved statistics (ACC)
    Parts,  # [2, N * C] out (ACC): per-(sample, channel) sum dz, then sum dz * xhat
    G, D: tl.constexpr, S, stride_n, stride_g, stride_x,  # D: the group's channels, compile-time
    s_chunk, splits,  # S and 1 here (the tile heuristics read s_chunk)
    bucket,  # autotune key only (configs.tuning_bucket)
    inv_count, inv_count_lo, slope, slope_lo,  # float pairs (common.exact_scalar): 1 / (D * S), leaky slope
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    WRITE_DR: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # grid: one program per (sample, group): its sums, then its dx. _gn_bwd_combine adds the
    # per-channel sums over the samples (dgamma, dbeta).
    ng, g, _, base, s_begin, s_end = _program_group(
        tl.program_id(0), G, D, S, stride_n, stride_g, s_chunk, splits, CHANNELS_LAST)
    mean = tl.load(Mean + ng)
    rstd = tl.load(Rstd + ng)
    slope = exact_scalar(slope, slope_lo, ACC)
    nc = tl.num_programs(0) * D  # N * C
    sum_w_dz, sum_w_dz_xhat = _group_grad_sums(
        X, DY, R, W, B, Parts + ng * D, Parts + nc + ng * D, base, g, D, s_begin, s_end, stride_x, mean, rstd, slope,
        HAS_WEIGHT, HAS_BIAS, HAS_RESIDUAL, ACTIVATION, CHANNELS_LAST, ACC, INT64_INDEX, BLOCK_C, BLOCK_S)
    _dx_chunk(X, DY, R, DX, DR, W, B, base, g, D, s_begin, s_end, stride_x, mean, rstd, slope, sum_w_dz,
              sum_w_dz_xhat, exact_scalar(inv_count, inv_count_lo, ACC), HAS_WEIGHT, HAS_BIAS, HAS_RESIDUAL,
              ACTIVATION, WRITE_DR, CHANNELS_LAST, ACC, INT64_INDEX, BLOCK_C, BLOCK_S)


@autotune("gn_reduce", key=["bucket", "ACC", "ACTIVATION", "CHANNELS_LAST"])
@triton.heuristics(GN_REDUCE_HEURISTICS)
@triton.jit(do_not_specialize=["bucket"])
def _gn_bwd_reduce(
    X, DY, R,  # [N, C, *] input, output gradient, residual (when HAS_RESIDUAL): the input's strides
    W, B, Mean, Rstd,  # [C] affine parameters (when HAS_*), [N * G] saved statistics (ACC)
    Parts,  # [2 * splits, N * C] out (ACC): per chunk and (sample, channel), sum dz then sum dz * xhat
    G, D: tl.constexpr, S, stride_n, stride_g, stride_x,  # D: the group's channels, compile-time
    s_chunk, splits,
    bucket,  # autotune key only (configs.tuning_bucket)
    slope, slope_lo,  # float pair (common.exact_scalar): leaky_relu's negative slope
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # grid: N * G * splits programs; each writes its chunk's per-channel sums.
    ng, g, part, base, s_begin, s_end = _program_group(
        tl.program_id(0), G, D, S, stride_n, stride_g, s_chunk, splits, CHANNELS_LAST)
    mean = tl.load(Mean + ng)
    rstd = tl.load(Rstd + ng)
    nc = (tl.num_programs(0) // splits) * D  # N * C
    _group_grad_sums(X, DY, R, W, B, Parts + part * nc + ng * D, Parts + (splits + part) * nc + ng * D, base, g, D,
                     s_begin, s_end, stride_x, mean, rstd, exact_scalar(slope, slope_lo, ACC), HAS_WEIGHT, HAS_BIAS,
                     HAS_RESIDUAL, ACTIVATION, CHANNELS_LAST, ACC, INT64_INDEX, BLOCK_C, BLOCK_S)


@triton.jit
def _gn_bwd_combine(
    Parts,  # [2 * splits, N * C] partial sums (ACC): sum dz rows, then sum dz * xhat rows
    Sums,  # [2, N * C] out when WRITE_SUMS (ACC): per-(sample, channel) sum dz, sum dz * xhat
    DW, DB,  # [C] out when PARAM_GRADS, in the parameters' dtype: dgamma, dbeta
    N, C, splits,
    WRITE_SUMS: tl.constexpr, PARAM_GRADS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid: cdiv(C, BLOCK_C). Chunks, then samples, are added in order: the same bits every run.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    nc = N * C
    dw = tl.zeros([BLOCK_C], Parts.dtype.element_ty)
    db = tl.zeros([BLOCK_C], Parts.dtype.element_ty)
    for n in range(0, N):
        sum_dz = tl.zeros([BLOCK_C], Parts.dtype.element_ty)
        sum_dz_xhat = tl.zeros([BLOCK_C], Parts.dtype.element_ty)
        for part in range(0, splits):
            sum_dz += tl.load(Parts + part * nc + n * C + c, mask=c_mask, other=0.0)
            sum_dz_xhat += tl.load(Parts + (splits + part) * nc + n * C + c, mask=c_mask, other=0.0)
        if WRITE_SUMS:
            tl.store(Sums + n * C + c, sum_dz, mask=c_mask)
            tl.store(Sums + nc + n * C + c, sum_dz_xhat, mask=c_mask)
        db += sum_dz
        dw += sum_dz_xhat
    if PARAM_GRADS:
        tl.store(DW + c, dw.to(DW.dtype.element_ty), mask=c_mask)
        tl.store(DB + c, db.to(DB.dtype.element_ty), mask=c_mask)


@autotune("gn_reduce", key=["bucket", "ACC", "ACTIVATION", "CHANNELS_LAST"])
@triton.heuristics(GN_REDUCE_HEURISTICS)
@triton.jit(do_not_specialize=["bucket"])
def _gn_bwd_dx(
    X, DY, R,  # [N, C, *] input, output gradient, residual (when HAS_RESIDUAL): the input's strides
    DX, DR,  # out: input gradient, residual gradient (when WRITE_DR)
    W, B, Mean, Rstd,  # [C] affine parameters (when HAS_*), [N * G] saved statistics (ACC)
    Sums,  # [2, N * C] the combine's per-(sample, channel) sum dz, sum dz * xhat (ACC)
    G, D: tl.constexpr, S, stride_n, stride_g, stride_x,  # D: the group's channels, compile-time
    s_chunk, splits,
    bucket,  # autotune key only (configs.tuning_bucket)
    inv_count, inv_count_lo, slope, slope_lo,  # float pairs (common.exact_scalar): 1 / (D * S), leaky slope
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    WRITE_DR: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, INT64_INDEX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # grid: N * G * splits programs. Each folds its group's per-channel sums (in the one-launch
    # kernel's order: channel blocks in order, each in tree order), then writes its chunk's dx.
    ng, g, part, base, s_begin, s_end = _program_group(
        tl.program_id(0), G, D, S, stride_n, stride_g, s_chunk, splits, CHANNELS_LAST)
    mean = tl.load(Mean + ng)
    rstd = tl.load(Rstd + ng)
    nc = (tl.num_programs(0) // splits) * D  # N * C
    sum_w_dz = tl.zeros([1], ACC)
    sum_w_dz_xhat = tl.zeros([1], ACC)
    for c0 in range(0, D, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < D
        w, b = _affine(W, B, g * D + c, c_mask, HAS_WEIGHT, False, ACC, BLOCK_C)
        sum_w_dz += _vector_total(w * tl.load(Sums + ng * D + c, mask=c_mask, other=0.0), BLOCK_C)
        sum_w_dz_xhat += _vector_total(w * tl.load(Sums + nc + ng * D + c, mask=c_mask, other=0.0), BLOCK_C)
    _dx_chunk(X, DY, R, DX, DR, W, B, base, g, D, s_begin, s_end, stride_x, mean, rstd,
              exact_scalar(slope, slope_lo, ACC), tl.sum(sum_w_dz, axis=0), tl.sum(sum_w_dz_xhat, axis=0),
              exact_scalar(inv_count, inv_count_lo, ACC), HAS_WEIGHT, HAS_BIAS, HAS_RESIDUAL, ACTIVATION, WRITE_DR,
              CHANNELS_LAST, ACC, INT64_INDEX, BLOCK_C, BLOCK_S)
