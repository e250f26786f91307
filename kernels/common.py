"""Helpers shared by the forward and backward kernels: the statistics combine, tile shapes.

Chan et al.'s parallel update merges two partial statistics (count, mean, M2) where
M2 = sum((x - mean)^2):

    n     = n_a + n_b
    delta = mean_b - mean_a
    mean  = mean_a + delta * n_b / n
    M2    = M2_a + M2_b + delta^2 * n_a * n_b / n

Within a program, each lane of a tile accumulates sum(d) and sum(d^2) of d = x - k_tile,
where k_tile is the mean of the program's first tile: d is O(std) even when the mean is 1e4
and the std 0.5, so M2 = sum(d^2) - sum(d)^2 / n does not cancel (shifted_moments). Programs
are merged by Chan's formula. Partial means are stored relative to the channel's pivot, one
sample of it (k = x[0, c, 0]), so the between-part term of M2 also sees O(std) differences,
not differences of two rounded numbers near 1e4.

Reductions are config-invariant: their bits depend on the shape only, never on the warps or
channel block an autotune config picks. ``tl.sum`` over more than two elements adds in an
order set by the register layout (which threads hold which elements), and the layout follows
num_warps. So the reducing kernels keep one accumulator per *lane*, a fixed position of a tile
whose shape is a heuristic of the problem shape (configs.py), update it elementwise in a
fixed loop order, and finish with tree_sum, whose every step adds exactly two given values
(a + b == b + a in IEEE arithmetic, so who adds them does not matter).
"""

import triton
import triton.language as tl

# Per-channel tensors the caller owns (a module's parameters and buffers). Kernels are not
# specialised on their 16-byte alignment (triton.jit's do_not_specialize_on_alignment): they
# are read a few values per program, where vector loads buy nothing, and a launch plan then
# need not check their addresses on every call (tritonbn/_launch.py forward, host cost).
CALLER_PARAMS = ["W", "B"]
CALLER_RUNNING = ["RunningMean", "RunningVar", "NumBatchesTracked"]
CALLER_PER_CHANNEL = CALLER_PARAMS + CALLER_RUNNING
CALLER_NORMALIZE = CALLER_PARAMS + ["EvalMean", "EvalVar"]  # eval reads the running statistics


@triton.jit
def chan_combine(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    count = count_a + count_b
    # count is 0 only when both sides are empty; the ratio is then 0 and nothing moves.
    ratio_b = count_b / tl.maximum(count, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * ratio_b
    m2 = m2_a + m2_b + delta * delta * count_a * ratio_b
    return count, mean, m2


@triton.jit
def tree_sum(x, ROWS: tl.constexpr):
    """Sum over the first axis of a [ROWS, K] tensor: row i + row i + R/2 at each level, until
    one row is left. Each step sums an axis of two elements, a single addition."""
    for _ in tl.static_range(ROWS.bit_length() - 1):
        x = tl.sum(tl.reshape(x, [2, x.shape[0] // 2, x.shape[1]]), axis=0)
    return tl.reshape(x, [x.shape[1]])


@triton.jit
def tile_total(x, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """The sum of a [BLOCK_N, BLOCK_S] tile in tree_sum's order, as a scalar."""
    return tl.sum(tree_sum(tl.reshape(x, [BLOCK_N * BLOCK_S, 1]), BLOCK_N * BLOCK_S))  # [1] -> scalar


@triton.jit
def shifted_moments(count, k_tile, k, sum_d, sum_d2):
    """(mean - k, M2) from the sums of d = x - k_tile over count values.

    M2 = sum d^2 - (sum d)^2 / count cancels only as much as |mean - k_tile| exceeds the
    standard deviation; callers take k_tile from the data (a tile's mean), so it rarely
    does. Rounding can still push M2 a hair below 0: clamped. k is the channel's pivot, the
    value partial means are stored relative to.
    """
    mean_d = sum_d / count
    m2 = sum_d2 - sum_d * mean_d
    return (k_tile - k) + mean_d, tl.where(m2 < 0.0, 0.0, m2)  # NaN stays NaN


@triton.jit
def rsqrt_rn(v, ACC: tl.constexpr):
    """1 / sqrt(v), square root and division correctly rounded (a plain `/` compiles to an
    approximate float32 divide; tl.sqrt_rn and tl.div_rn are float32-only)."""
    if ACC == tl.float64:
        return 1.0 / tl.sqrt(v)
    else:
        return tl.div_rn(1.0, tl.sqrt_rn(v))


@triton.jit
def exact_scalar(hi, lo, ACC: tl.constexpr):
    """A Python float passed as (float32 value, float32 remainder): Triton types every float
    argument as float32, which would round eps, momentum or 1/M for a float64 input. The
    pair carries about 48 bits; the launcher splits it (tritonbn/_launch.py: _pair)."""
    return tl.zeros([], ACC) + hi + lo


@triton.jit
def ncs_program_chunk(pid, N, S, n_chunk, s_chunk, split_n, split_s):
    """The channel and the [n_begin, n_end) x [s_begin, s_end) chunk of a split-route program.

    Grid: C * split_n * split_s programs; a channel's programs are adjacent, ``part`` indexes
    the partial-result row.
    """
    splits = split_n * split_s
    c = pid // splits
    part = pid % splits
    n_begin = (part // split_s) * n_chunk
    s_begin = (part % split_s) * s_chunk
    return c, part, n_begin, tl.minimum(n_begin + n_chunk, N), s_begin, tl.minimum(s_begin + s_chunk, S)


@triton.jit
def ncs_tile_offsets(c, n0, s0, n_end, s_end, stride_n, stride_c,
                     INT64_INDEX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """Element offsets and mask of the [BLOCK_N, BLOCK_S] tile of channel c at (n0, s0)."""
    n = n0 + tl.arange(0, BLOCK_N)
    if INT64_INDEX:
        n = n.to(tl.int64)
    s = s0 + tl.arange(0, BLOCK_S)
    mask = (n < n_end)[:, None] & (s < s_end)[None, :]
    return c.to(tl.int64) * stride_c + n[:, None] * stride_n + s[None, :], mask


@triton.jit
def rows_tile_offsets(c, c_mask, m0, m_end, stride_m, INT64_INDEX: tl.constexpr, BLOCK_M: tl.constexpr):
    """Element offsets and mask of the [BLOCK_M, BLOCK_C] tile of channels c at row m0."""
    m = m0 + tl.arange(0, BLOCK_M)
    if INT64_INDEX:
        m = m.to(tl.int64)
    return m[:, None] * stride_m + c[None, :], (m < m_end)[:, None] & c_mask[None, :]
