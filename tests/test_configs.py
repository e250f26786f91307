"""Launch configs and heuristics (kernels/configs.py): pure Python, no kernel runs."""

import itertools

import pytest
import triton
from conftest import DEVICE

from tritonbn.kernels import configs as cfg


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter-only rule")
def test_interpreter_uses_one_config():
    for kind in cfg.FAMILIES:
        assert len(cfg.configs(kind)) == 1
        assert len(cfg.all_configs(kind)) > 1


def test_every_config_has_a_tile_that_fits_the_heuristics():
    for kind in set(cfg.FAMILIES) - cfg.REDUCING_FAMILIES:
        for config in cfg.all_configs(kind):
            tile = config.kwargs["TILE"]
            assert tile & (tile - 1) == 0 and tile >= 32 * config.num_warps


def test_reduction_configs_leave_the_lanes_to_the_shape():
    """A reduction's lanes fix the order of its additions (kernels/common.py): no config of a
    reducing family may set them, only warps and the channels per program."""
    for kind in cfg.REDUCING_FAMILIES:
        for config in cfg.all_configs(kind):
            assert set(config.kwargs) <= {"MAX_BLOCK_C"}, (kind, config)


@pytest.mark.parametrize("acc", ["fp32", "fp64"])
def test_reduction_lanes_are_a_function_of_the_shape(acc):
    import triton.language as tl

    dtype = tl.float64 if acc == "fp64" else tl.float32
    scale = (2 if cfg.INTERPRETER else 1) / (2 if acc == "fp64" else 1)
    full = int(cfg.REDUCE_TILE * scale)
    full_rows = int(cfg.ROWS_REDUCE_LANES * scale)
    heuristics = (cfg.NCS_SPLIT_REDUCE_HEURISTICS["TILE"], cfg.NCS_ONE_LAUNCH_HEURISTICS["TILE"])
    for n_chunk, s_chunk, expected in [(256, 3136, full), (3, 49, 4 * 64), (1, 1, 64), (2, 7, 64)]:
        tiles = {tile({"n_chunk": n_chunk, "s_chunk": s_chunk, "N": n_chunk, "S": s_chunk, "ACC": dtype,
                       **config.kwargs})
                 for config in cfg.all_configs("ncs_reduce") for tile in heuristics}
        assert tiles == {expected}
    heuristics = (cfg.ROWS_SPLIT_REDUCE_HEURISTICS["BLOCK_M"], cfg.ROWS_ONE_LAUNCH_HEURISTICS["BLOCK_M"])
    for m_chunk, c, expected_rows in [(100000, 256, full_rows // 32), (100000, 3, full_rows // 4), (5, 256, 8)]:
        rows = {block_m({"m_chunk": m_chunk, "M": m_chunk, "C": c, "ACC": dtype, **config.kwargs})
                for config in cfg.all_configs("rows_reduce") for block_m in heuristics}
        assert rows == {expected_rows}


@pytest.mark.parametrize("n,c,s", [(256, 64, 112 * 112), (1, 1, 2**26), (2, 3, 150 * 150), (7, 5, 10007),
                                   (256, 2048, 49), (3, 1, 33), (64, 64, 512 * 512)])
def test_ncs_split_covers_every_element_once(n, c, s):
    split_n, split_s = cfg.ncs_split(n, c, s, sm_count=132)
    assert split_n >= 1 and split_s >= 1
    n_chunk = triton.cdiv(n, split_n)
    s_chunk = triton.cdiv(s, split_s)
    if split_s > 1:
        s_chunk = triton.cdiv(s_chunk, cfg.SPATIAL_SPLIT_QUANTUM) * cfg.SPATIAL_SPLIT_QUANTUM
        assert s_chunk % cfg.SPATIAL_SPLIT_QUANTUM == 0  # aligned chunk starts
    covered = 0
    for pn, ps in itertools.product(range(split_n), range(split_s)):
        rows = max(0, min(n, (pn + 1) * n_chunk) - pn * n_chunk)
        cols = max(0, min(s, (ps + 1) * s_chunk) - ps * s_chunk)
        assert rows > 0 and cols > 0, "no program may get an empty chunk"
        covered += rows * cols
    assert covered == n * s
    if n * s >= 2**20 and c < 64:
        assert split_n * split_s * c >= 132, "a few long channels must still fill the GPU"


@pytest.mark.parametrize("m,c", [(40000, 3), (256 * 3136, 64), (12544, 2048), (10, 1000), (65536, 256)])
def test_rows_split_has_no_empty_chunk(m, c):
    split = cfg.rows_split(m, c, sm_count=132)
    chunk = triton.cdiv(m, split)
    assert (split - 1) * chunk < m


def test_pruning_drops_tiles_larger_than_the_work():
    small = cfg.prune_tiles(cfg.all_configs("ncs_elementwise"), 2 * 49)
    assert [c.kwargs["TILE"] for c in small] == [1024]
    large = cfg.prune_tiles(cfg.all_configs("rows_elementwise"), 100000 * 256)
    assert len(large) == len(cfg.all_configs("rows_elementwise"))
    # Reductions are never pruned: their lanes follow the shape, configs only pick warps.
    from tritonbn.kernels import forward

    assert forward._bn_fwd_stats_ncs.early_config_prune is None
    assert forward._bn_fwd_normalize_ncs.early_config_prune is not None


def test_tuned_kernels_touch_running_statistics_only_behind_their_in_place_flag():
    """The autotuner reruns a kernel once per config. A tuned kernel that takes the running
    statistics must name the constexpr that turns their update on (its in_place_flag): the
    tuner benchmarks with it off (tuning_cache.DiskCachedAutotuner; the running test is
    test_launch_plans.py's). No other tuned kernel takes them."""
    from triton.runtime.autotuner import Autotuner

    from tritonbn.kernels import backward, forward, running_stats

    tuned = [obj for module in (forward, backward) for obj in vars(module).values() if isinstance(obj, Autotuner)]
    assert len(tuned) == 12
    in_place = {"RunningMean", "RunningVar", "NumBatchesTracked"}
    updating = set()
    for tuner in tuned:
        if in_place & set(tuner.arg_names):
            assert tuner.in_place_flag == "UPDATE_RUNNING", tuner.base_fn.__name__
            assert tuner.in_place_flag in tuner.arg_names
            updating.add(tuner.base_fn.__name__)
        else:
            assert tuner.in_place_flag is None, tuner.base_fn.__name__
    assert updating == {"_bn_fwd_one_launch_ncs", "_bn_fwd_one_launch_rows"}
    assert not isinstance(running_stats._bn_update_running_stats, Autotuner)
    assert not isinstance(forward._bn_fwd_combine, Autotuner)


@pytest.mark.parametrize("d, s_chunk, channels_last, eight_warps", [
    (1, 1024, False, False),  # InstanceNorm on 32 x 32: a 1024-lane tile
    (1, 64, False, False),  # a tile smaller than one warp's 8-element share: the first config stays
    (4, 4096, False, True),
    (16, 4096, True, True),
    (32, 1 << 20, False, True),  # a VAE group: every config
])
def test_group_norm_reductions_keep_8_elements_per_thread(d, s_chunk, channels_last, eight_warps):
    """Tuning only tries warps that leave each thread 8 elements of the (shape-given)
    reduction tile, so a 16-bit input keeps 128-bit loads; the static sweep compiles the same
    set (configs.runtime_configs)."""
    import triton.language as tl

    args = {"D": d, "s_chunk": s_chunk, "CHANNELS_LAST": channels_last, "ACC": tl.float32}
    block_c, block_s = cfg.gn_reduce_tile(d, s_chunk, channels_last, tl.float32)
    kept = cfg.runtime_configs("gn_reduce", args)
    allowed = [c for c in cfg.all_configs("gn_reduce") if c.num_warps * 32 * 8 <= block_c * block_s]
    assert kept == (allowed or cfg.all_configs("gn_reduce")[:1])
    assert (8 in {c.num_warps for c in kept}) == eight_warps
