"""Every launch configuration and launch heuristic of tritonbn's kernels, in one place.

Every launch decision lives here: the autotuned configs, the route (how many programs share a
channel's reduction), tile shapes, grids and chunks. Three kinds of choices:

* autotuned configs (tile size, warps): benchmarked per shape bucket by ``triton.autotune``;
  the first config of each list is the default, used when tuning is off and in Triton's
  interpreter (which cannot benchmark, and with several configs raises "0 active drivers"
  on a machine without a GPU);
* heuristics that decide the shape of work (how many programs share one channel's reduction).
  They are not tuned because they fix the size of the partial-statistics buffers, which are
  allocated before the launch.
* tile shapes (``*_HEURISTICS``, applied by ``triton.heuristics`` after the config) and the
  lanes of a reduction tile (``ncs_reduce_tile``, ``rows_reduce_block_m``): heuristics of
  the shape; the lanes are never tuned, because they fix the order of the additions (kernels/common.py).
  Reduction configs only choose warps, and for channels-last the channels per program, which
  never change a channel's arithmetic: a reduction gives the same bits under every config.

Environment switches:

* ``TRITONBN_AUTOTUNE=0`` disables tuning: every kernel runs its default config.
* ``torch.use_deterministic_algorithms(True)`` fixes the reduction kernels to their default
  config as well, so not even the choice of a compiled variant depends on tuning timings.
* ``TRITONBN_AUTOTUNE_CACHE=0`` keeps tuned configs in memory only (default: on disk, see
  tuning_cache.py, so a later process reuses them; ``TRITONBN_CACHE_DIR`` moves the files).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from .tuning_cache import DiskCachedAutotuner

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("TRITONBN_AUTOTUNE", "1") != "0" and not INTERPRETER
AUTOTUNE_DISK_CACHE = os.environ.get("TRITONBN_AUTOTUNE_CACHE", "1") != "0"

# A program that owns a slice of one channel's reduction should get at least this many
# elements: below it, the launch and the partial-statistics combine cost more than they save.
MIN_ELEMENTS_PER_PROGRAM = 16384
# Aim for this many programs per streaming multiprocessor, so that each SM has several
# programs in flight to hide memory latency.
PROGRAMS_PER_SM = 4
# Spatial split boundaries are multiples of this many elements, so that every split starts
# 128-byte aligned and keeps vectorised loads.
SPATIAL_SPLIT_QUANTUM = 1024
# Channels per program assumed by the split heuristic of the channels-last kernels (the
# tuned BLOCK_C is 16 to 64; the heuristic only needs the order of magnitude).
ROWS_CHANNELS_PER_PROGRAM = 32
# Default SM count when no CUDA device is visible (interpreter runs): an H100 SXM's.
DEFAULT_SM_COUNT = 132


def _config(tile: int, warps: int, **extra: int) -> triton.Config:
    return triton.Config({"TILE": tile, **extra}, num_warps=warps)


def _warps(warps: int, **extra: int) -> triton.Config:
    return triton.Config(dict(extra), num_warps=warps)


# Tiles of one channel's data, [BLOCK_N, BLOCK_S] with BLOCK_N * BLOCK_S = TILE (NCHW-like
# layouts, spatial contiguous). 4 warps x 32 threads x 8 fp32 per thread = 1024 elements,
# so TILE >= 1024 gives every thread at least two 128-bit loads in flight.
# The interpreter runs NumPy per program: its default is a large tile, few programs.
#
# Reductions tune warps only: their tile is ncs_reduce_tile's (below).
_NCS_REDUCE = [
    _warps(4),
    _warps(8),
]
_NCS_REDUCE_BWD = [
    _warps(4),
    _warps(8),
]
_NCS_ELEMENTWISE = [
    _config(2048, 4),
    _config(4096, 8),
    _config(1024, 4),
    _config(8192, 16),
]
# Tiles of [BLOCK_M rows, BLOCK_C channels] for channels-last layouts (and 2D inputs): the
# channel axis is contiguous. MAX_BLOCK_C bounds it so that a wide C still leaves rows to
# coalesce over; 64 fp32 = 256 bytes per row segment.
# Reductions: the channels per program and warps; the rows per tile are rows_reduce_block_m's.
_ROWS_REDUCE = [
    _warps(4, MAX_BLOCK_C=64),
    _warps(8, MAX_BLOCK_C=128),
    _warps(4, MAX_BLOCK_C=32),
    _warps(8, MAX_BLOCK_C=64),
]
_ROWS_ELEMENTWISE = [
    _config(2048, 4, MAX_BLOCK_C=64),
    _config(4096, 8, MAX_BLOCK_C=128),
    _config(1024, 4, MAX_BLOCK_C=32),
    _config(8192, 8, MAX_BLOCK_C=128),
]
_FAMILIES = {
    "ncs_reduce": _NCS_REDUCE,
    "ncs_reduce_bwd": _NCS_REDUCE_BWD,
    "ncs_elementwise": _NCS_ELEMENTWISE,
    "rows_reduce": _ROWS_REDUCE,
    "rows_elementwise": _ROWS_ELEMENTWISE,
}
FAMILIES = tuple(_FAMILIES)  # the config family names, for the static checks and tests
# Families whose kernels reduce (their bits depend on the config; see tuning_cache.py).
REDUCING_FAMILIES = frozenset({"ncs_reduce", "ncs_reduce_bwd", "rows_reduce"})

# Lanes (accumulators) of a reduction tile, for float32 accumulation: 16 per thread at 4
# warps. Float64 accumulators take twice the registers, so half as many lanes.
REDUCE_TILE = 2048
# Lanes of a channels-last reduction tile per channel-block row: BLOCK_M rows of up to 32
# channels. Fewer channels get more rows, so a narrow C still loads whole tiles.
ROWS_REDUCE_LANES = 1024
# The interpreter's cost is per program and per op: bigger tiles (another variant, as the
# interpreter is another machine).
_INTERPRETER_TILE_FACTOR = 2 if INTERPRETER else 1

# Per-channel vectors (combining partial statistics, running-stat update): tiny work.
PER_CHANNEL_BLOCK = 128


def configs(kind: str) -> list[triton.Config]:
    """The autotune configs of one kernel family; one config when tuning is impossible or off."""
    chosen = _FAMILIES[kind]
    if INTERPRETER:
        # Fewer, larger programs: the interpreter's cost is per program and per op.
        kwargs = dict(chosen[0].kwargs)
        if "TILE" in kwargs:
            kwargs["TILE"] *= _INTERPRETER_TILE_FACTOR
        return [triton.Config(kwargs, num_warps=4)]
    return chosen if AUTOTUNE else chosen[:1]


def all_configs(kind: str) -> list[triton.Config]:
    """Every config of a family, whatever the environment (for ahead-of-time compile checks)."""
    return _FAMILIES[kind]


def prune_tiles(configs: list[triton.Config], elements: int) -> list[triton.Config]:
    """Drop tiles far larger than the ``elements`` they would cover: they only add tuning time.

    A new shape then tunes in well under a second per kernel on small problems.
    """
    work = triton.next_power_of_2(max(elements, 1))
    kept = [config for config in configs if config.kwargs.get("TILE", 0) <= max(2 * work, 1024)]
    return kept or configs[:1]


# Each elementwise family prunes by its kernels' own extent; reductions have no tile to prune
# (their lanes follow the shape).
# Triton passes the positional arguments as a dict and the keyword ones as keywords.
_PRUNE = {
    "ncs_elementwise": lambda configs, args, **kw: prune_tiles(configs, {**args, **kw}["N"] * {**args, **kw}["S"]),
    "rows_elementwise": lambda configs, args, **kw: prune_tiles(configs, {**args, **kw}["M"] * {**args, **kw}["C"]),
}


def _reduce_lanes(lanes: int, acc) -> int:
    lanes *= _INTERPRETER_TILE_FACTOR
    return lanes // 2 if acc == tl.float64 else lanes


def ncs_reduce_tile(n_extent: int, s_extent: int, acc) -> int:
    """Lanes of an NCS reduction tile over a program's n_extent x s_extent chunk: REDUCE_TILE,
    or fewer when the chunk is smaller. A function of the shape and dtype only."""
    work = triton.next_power_of_2(n_extent) * triton.next_power_of_2(s_extent)
    return max(min(_reduce_lanes(REDUCE_TILE, acc), work), 64)


def rows_reduce_block_m(m_extent: int, c: int, acc) -> int:
    """Rows of a channels-last reduction tile over m_extent rows; the shape's and dtype's only."""
    rows = _reduce_lanes(ROWS_REDUCE_LANES, acc) // min(triton.next_power_of_2(c), 32)
    return max(min(rows, triton.next_power_of_2(m_extent)), 1)


def ncs_tile_shape(tile: int, s_extent: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_S) of a tile of one channel: as wide along spatial as s_extent allows."""
    block_s = min(triton.next_power_of_2(s_extent), tile)
    return tile // block_s, block_s


def rows_block_c(c: int, max_block_c: int) -> int:
    """Channels of a channels-last tile: the config's MAX_BLOCK_C, or C."""
    return min(triton.next_power_of_2(c), max_block_c)


# Tile shapes as triton.heuristics (applied after the config is chosen), one set per kernel
# signature: split-route reductions see a chunk (n_chunk x s_chunk, m_chunk rows), one-launch
# kernels the whole channel (N x S, M rows), elementwise kernels the whole tensor.
NCS_SPLIT_REDUCE_HEURISTICS = {
    "TILE": lambda a: ncs_reduce_tile(a["n_chunk"], a["s_chunk"], a["ACC"]),
    "BLOCK_N": lambda a: ncs_tile_shape(a["TILE"], a["s_chunk"])[0],
    "BLOCK_S": lambda a: ncs_tile_shape(a["TILE"], a["s_chunk"])[1],
}
NCS_ONE_LAUNCH_HEURISTICS = {
    "TILE": lambda a: ncs_reduce_tile(a["N"], a["S"], a["ACC"]),
    "BLOCK_N": lambda a: ncs_tile_shape(a["TILE"], a["S"])[0],
    "BLOCK_S": lambda a: ncs_tile_shape(a["TILE"], a["S"])[1],
}
NCS_HEURISTICS = {
    "BLOCK_N": lambda a: ncs_tile_shape(a["TILE"], a["S"])[0],
    "BLOCK_S": lambda a: ncs_tile_shape(a["TILE"], a["S"])[1],
}
# BLOCK_C (tuned through MAX_BLOCK_C) groups independent channels; BLOCK_M, the lanes along
# a channel, is the shape's alone.
ROWS_SPLIT_REDUCE_HEURISTICS = {
    "BLOCK_M": lambda a: rows_reduce_block_m(a["m_chunk"], a["C"], a["ACC"]),
    "BLOCK_C": lambda a: rows_block_c(a["C"], a["MAX_BLOCK_C"]),
}
ROWS_ONE_LAUNCH_HEURISTICS = {
    "BLOCK_M": lambda a: rows_reduce_block_m(a["M"], a["C"], a["ACC"]),
    "BLOCK_C": lambda a: rows_block_c(a["C"], a["MAX_BLOCK_C"]),
}
ROWS_HEURISTICS = {
    "BLOCK_C": lambda a: rows_block_c(a["C"], a["MAX_BLOCK_C"]),
    "BLOCK_M": lambda a: max(a["TILE"] // rows_block_c(a["C"], a["MAX_BLOCK_C"]), 1),
}


def autotune(kind: str, key: list[str], in_place_flag: str | None = None):
    """``triton.autotune`` over a family's configs, with tuned results cached on disk.

    A trial run rewrites the same fresh outputs, never the running statistics: a kernel
    that can update them in place names the constexpr that turns the update on
    (``in_place_flag``), and is tuned with it off (tuning_cache.DiskCachedAutotuner).
    """
    prune = {"early_config_prune": _PRUNE[kind]} if kind in _PRUNE else None
    tune = triton.autotune(configs=configs(kind), key=key, prune_configs_by=prune)

    def decorate(fn):
        tuner = tune(fn)
        # Our subclass: a disk cache that survives corrupt files (Triton's cache_results does
        # not), a lock around tuning, and no tuning during a CUDA graph capture.
        tuner.__class__ = DiskCachedAutotuner
        tuner.use_disk = AUTOTUNE_DISK_CACHE
        tuner.reduces = kind in REDUCING_FAMILIES
        tuner.in_place_flag = in_place_flag
        return tuner

    return decorate


def tuning_bucket(tile_size: int, count: int) -> int:
    """Autotune key of a launch: both sizes rounded up to powers of two, packed in one int.

    ``tile_size`` decides the tile's shape (the spatial extent for NCS, C for rows: the
    heuristics take its next power of two); ``count`` is how far the program loops (rows,
    batch). Shapes in the same bucket share a tuned config, so a new batch size within the
    bucket does not tune again. The kernels mark the argument ``do_not_specialize``.
    """
    return _log2_bucket(tile_size) * 64 + _log2_bucket(count)


def _log2_bucket(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1)).bit_length() - 1


def ncs_split(n: int, c: int, s: int, sm_count: int) -> tuple[int, int]:
    """How many programs share one channel's reduction in the NCHW-like kernels.

    Returns ``(split_n, split_s)``: the batch axis is cut into ``split_n`` chunks and the
    spatial axis into ``split_s`` chunks (multiples of ``SPATIAL_SPLIT_QUANTUM``). ``(1, 1)``
    means one program per channel: the one-launch route.
    """
    target = sm_count * PROGRAMS_PER_SM
    per_channel = n * s
    if c >= target or per_channel <= 2 * MIN_ELEMENTS_PER_PROGRAM:
        return 1, 1
    split = min(triton.cdiv(target, c), per_channel // MIN_ELEMENTS_PER_PROGRAM)
    split_n = min(n, split)
    split_n = triton.cdiv(n, triton.cdiv(n, split_n))  # no empty chunk
    split_s = 1
    if split_n < split:
        max_split_s = triton.cdiv(s, SPATIAL_SPLIT_QUANTUM)
        split_s = min(triton.cdiv(split, split_n), max_split_s)
        s_chunk = triton.cdiv(triton.cdiv(s, split_s), SPATIAL_SPLIT_QUANTUM) * SPATIAL_SPLIT_QUANTUM
        split_s = triton.cdiv(s, s_chunk)
    return split_n, split_s


def rows_split(m: int, c: int, sm_count: int) -> int:
    """How many programs share each channel block's rows in the channels-last kernels."""
    target = sm_count * PROGRAMS_PER_SM
    channel_blocks = triton.cdiv(c, ROWS_CHANNELS_PER_PROGRAM)
    per_block = m * min(c, ROWS_CHANNELS_PER_PROGRAM)
    if channel_blocks >= target or per_block <= 2 * MIN_ELEMENTS_PER_PROGRAM:
        return 1
    split = min(triton.cdiv(target, channel_blocks), per_block // MIN_ELEMENTS_PER_PROGRAM)
    split = min(split, m)
    return triton.cdiv(m, triton.cdiv(m, split))  # no empty chunk


# ----------------------------------------------------------------------------------------------
# grids and chunks: what the launchers (tritonbn/_launch.py) ask for, from the shape alone
# ----------------------------------------------------------------------------------------------


def per_channel_grid(c: int) -> tuple[int]:
    """Per-channel vector kernels (combines, the running-statistics update)."""
    return (triton.cdiv(c, PER_CHANNEL_BLOCK),)


def ncs_tiles_grid(n: int, c: int, s: int):
    """Elementwise NCS kernels: one program per [BLOCK_N, BLOCK_S] tile of each channel."""
    return lambda meta: (c * triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(s, meta["BLOCK_S"]),)


def rows_tiles_grid(m: int, c: int):
    """Elementwise channels-last kernels: one program per [BLOCK_M, BLOCK_C] tile."""
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c, meta["BLOCK_C"]),)


def rows_blocks_grid(c: int, splits: int):
    """Channels-last reductions: ``splits`` programs per block of BLOCK_C channels."""
    return lambda meta: (triton.cdiv(c, meta["BLOCK_C"]) * splits,)


def ncs_chunks(n: int, c: int, s: int, sm_count: int) -> tuple[int, int, int, int]:
    """(split_n, split_s, n_chunk, s_chunk): ncs_split's programs and each one's chunk."""
    split_n, split_s = ncs_split(n, c, s, sm_count)
    n_chunk = triton.cdiv(n, split_n)
    s_chunk = triton.cdiv(s, split_s)
    if split_s > 1:
        s_chunk = triton.cdiv(s_chunk, SPATIAL_SPLIT_QUANTUM) * SPATIAL_SPLIT_QUANTUM
    return split_n, split_s, n_chunk, s_chunk


def rows_chunks(m: int, c: int, sm_count: int) -> tuple[int, int]:
    """(split_m, m_chunk): rows_split's programs per channel block and each one's rows."""
    split_m = rows_split(m, c, sm_count)
    return split_m, triton.cdiv(m, split_m)


# ==============================================================================================
# GroupNorm / InstanceNorm (kernels/group_norm.py, tritonbn/_group_launch.py)
# ==============================================================================================
#
# A group is the [D, S] block of one sample's D = C / G channels (InstanceNorm: D = 1) over
# its S spatial positions. Its tile is [BLOCK_C, BLOCK_S] when the spatial axis is contiguous
# (NCHW-like) and [BLOCK_S, BLOCK_C] when the channel axis is (channels_last, (N, C)); the
# contiguous axis gets as many lanes as its extent allows. The reductions' lanes follow the
# shape (their bits never depend on a config); configs choose warps, and the pure elementwise
# normalise pass its tile size.

_GN_REDUCE = [
    _warps(4),
    _warps(8),
]
_GN_ELEMENTWISE = [
    _config(2048, 4),
    _config(4096, 8),
    _config(1024, 4),
]
_FAMILIES["gn_reduce"] = _GN_REDUCE
_FAMILIES["gn_elementwise"] = _GN_ELEMENTWISE
_PRUNE["gn_elementwise"] = lambda configs, args, **kw: prune_tiles(
    configs, {**args, **kw}["D"] * {**args, **kw}["s_chunk"])
FAMILIES = tuple(_FAMILIES)
REDUCING_FAMILIES = REDUCING_FAMILIES | {"gn_reduce"}

# A program that owns a slice of one group should get at least this many elements (the same
# trade-off as MIN_ELEMENTS_PER_PROGRAM). A module attribute, read when a launch plan is built
# and part of the plan's key, so that tests can force the split route on small shapes.
GN_MIN_ELEMENTS_PER_PROGRAM = MIN_ELEMENTS_PER_PROGRAM


def gn_split(pairs: int, d: int, s: int, channels_last: bool, sm_count: int) -> tuple[int, int]:
    """(splits, s_chunk): programs per (sample, group) and the spatial positions each one owns.

    Few long groups (Stable Diffusion's VAE: GroupNorm(32) on (1, 128, 1024, 1024), 32 groups
    of 4M elements) would leave most of the GPU idle with one program per group: the spatial
    axis is then cut into chunks (multiples of SPATIAL_SPLIT_QUANTUM when spatial is the
    contiguous axis, so every chunk starts aligned). ``(1, s)`` is the one-launch route.
    """
    target = sm_count * PROGRAMS_PER_SM
    per_group = d * s
    minimum = max(GN_MIN_ELEMENTS_PER_PROGRAM, 1)
    if pairs >= target or per_group <= 2 * minimum or s <= 1:
        return 1, s
    # Chunks of a contiguous spatial axis: multiples of 16 elements at least (16-byte aligned
    # starts for every dtype), of SPATIAL_SPLIT_QUANTUM once a chunk is long anyway.
    quantum = 1 if channels_last else min(SPATIAL_SPLIT_QUANTUM, max(16, triton.next_power_of_2(minimum // d)))
    split = min(triton.cdiv(target, pairs), per_group // minimum, triton.cdiv(s, quantum))
    s_chunk = triton.cdiv(triton.cdiv(s, max(split, 1)), quantum) * quantum
    splits = triton.cdiv(s, s_chunk)  # no empty chunk
    return splits, s_chunk


def gn_tile_shape(lanes: int, d: int, s_extent: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S) of a group tile of at most ``lanes`` elements: the contiguous axis
    first, as wide as its extent allows, the other axis takes the rest."""
    d2, s2 = triton.next_power_of_2(max(d, 1)), triton.next_power_of_2(max(s_extent, 1))
    if channels_last:
        block_c = min(d2, lanes)
        return block_c, max(min(lanes // block_c, s2), 1)
    block_s = min(s2, lanes)
    return max(min(lanes // block_s, d2), 1), block_s


def gn_reduce_tile(d: int, s_extent: int, channels_last: bool, acc) -> tuple[int, int]:
    """A reduction's (BLOCK_C, BLOCK_S): REDUCE_TILE lanes or fewer, the shape's and dtype's only."""
    return gn_tile_shape(_reduce_lanes(REDUCE_TILE, acc), d, s_extent, channels_last)


def _prune_gn_reduce(configs: list[triton.Config], args: dict, **kwargs) -> list[triton.Config]:
    """Warps that leave each thread at least 8 elements of the reduction tile: fewer would give
    a 16-bit input 64-bit loads (a 1024-lane tile at 8 warps: InstanceNorm on 32 x 32). The
    tile follows the shape, so this changes no bits."""
    named = {**args, **kwargs}
    block_c, block_s = gn_reduce_tile(named["D"], named["s_chunk"], named["CHANNELS_LAST"], named["ACC"])
    kept = [config for config in configs if config.num_warps * 32 * 8 <= block_c * block_s]
    return kept or configs[:1]


_PRUNE["gn_reduce"] = _prune_gn_reduce


def runtime_configs(kind: str, args: dict) -> list[triton.Config]:
    """The configs of ``kind`` that tuning tries for a launch with these named arguments (its
    family's pruning applied): what perf/static_checks.py compiles for that launch."""
    return _PRUNE[kind](all_configs(kind), args) if kind in _PRUNE else all_configs(kind)


GN_REDUCE_HEURISTICS = {
    "BLOCK_C": lambda a: gn_reduce_tile(a["D"], a["s_chunk"], a["CHANNELS_LAST"], a["ACC"])[0],
    "BLOCK_S": lambda a: gn_reduce_tile(a["D"], a["s_chunk"], a["CHANNELS_LAST"], a["ACC"])[1],
}
GN_ELEMENTWISE_HEURISTICS = {
    "BLOCK_C": lambda a: gn_tile_shape(a["TILE"], a["D"], a["s_chunk"], a["CHANNELS_LAST"])[0],
    "BLOCK_S": lambda a: gn_tile_shape(a["TILE"], a["D"], a["s_chunk"], a["CHANNELS_LAST"])[1],
}


def gn_chunks_grid(pairs: int, splits: int) -> tuple[int]:
    """GroupNorm's group kernels: ``splits`` adjacent programs per (sample, group)."""
    return (pairs * splits,)
