"""Helpers shared by the forward and backward kernels: the statistics combine, tile shapes.

Chan et al.'s parallel update merges two partial statistics (count, mean, M2) where
M2 = sum((x - mean)^2):

    n     = n_a + n_b
    delta = mean_b - mean_a
    mean  = mean_a + delta * n_b / n
    M2    = M2_a + M2_b + delta^2 * n_a * n_b / n

Each tile's own (mean, M2) is computed two-pass in registers, so no E[x^2] - E[x]^2 is ever
formed. The data is also shifted by one sample of its channel (K = x[0, c, 0]) before any
sum: with mean 1e4 and std 0.5, float32 sums of raw values would carry errors of ~1e-2 in
the tile means, and the between-tile term of M2 would inherit them; sums of x - K are O(std).
"""

import triton
import triton.language as tl


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


def ncs_tile_shape(args: dict) -> dict:
    """[BLOCK_N, BLOCK_S] for a TILE of one channel: as wide along spatial as the chunk allows."""
    block_s = min(triton.next_power_of_2(args["s_chunk"]), args["TILE"])
    return {"BLOCK_S": block_s, "BLOCK_N": args["TILE"] // block_s}


def rows_tile_shape(args: dict) -> dict:
    """[BLOCK_M, BLOCK_C] for a TILE of channels-last rows: as many channels as allowed."""
    block_c = min(triton.next_power_of_2(args["C"]), args["MAX_BLOCK_C"])
    return {"BLOCK_C": block_c, "BLOCK_M": max(args["TILE"] // block_c, 1)}


NCS_HEURISTICS = {
    "BLOCK_N": lambda args: ncs_tile_shape(args)["BLOCK_N"],
    "BLOCK_S": lambda args: ncs_tile_shape(args)["BLOCK_S"],
}
ROWS_HEURISTICS = {
    "BLOCK_M": lambda args: rows_tile_shape(args)["BLOCK_M"],
    "BLOCK_C": lambda args: rows_tile_shape(args)["BLOCK_C"],
}
