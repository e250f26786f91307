"""Helpers shared by the forward and backward kernels: the statistics combine, tile shapes.

Chan et al.'s parallel update merges two partial statistics (count, mean, M2) where
M2 = sum((x - mean)^2):

    n     = n_a + n_b
    delta = mean_b - mean_a
    mean  = mean_a + delta * n_b / n
    M2    = M2_a + M2_b + delta^2 * n_a * n_b / n

Each tile's own (mean, M2) is computed two-pass in registers, so no E[x^2] - E[x]^2 is ever
formed: a channel with mean 1e4 and std 0.5 keeps its variance in float32.
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


def ncs_tile_shape(args: dict) -> dict:
    """[BLOCK_N, BLOCK_S] for a TILE of one channel: as wide along spatial as the chunk allows."""
    block_s = min(triton.next_power_of_2(args["s_chunk"]), args["TILE"])
    return {"BLOCK_S": block_s, "BLOCK_N": args["TILE"] // block_s}


def rows_tile_shape(args: dict) -> dict:
    """[BLOCK_M, BLOCK_C] for a TILE of channels-last rows: as many channels as allowed."""
    block_c = min(triton.next_power_of_2(args["C"]), args["MAX_BLOCK_C"])
    return {"BLOCK_C": block_c, "BLOCK_M": max(args["TILE"] // block_c, 1)}


NCS_HEURISTICS = {"BLOCK_N": lambda a: ncs_tile_shape(a)["BLOCK_N"], "BLOCK_S": lambda a: ncs_tile_shape(a)["BLOCK_S"]}
ROWS_HEURISTICS = {"BLOCK_M": lambda a: rows_tile_shape(a)["BLOCK_M"], "BLOCK_C": lambda a: rows_tile_shape(a)["BLOCK_C"]}
