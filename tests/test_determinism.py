"""Determinism: the same input gives the same bits on every run and under every launch config.

Elementwise kernels (normalise, dx) compute each element by the same formula from the same
per-channel constants. Reductions keep one accumulator per lane of a tile whose shape is a
heuristic of the problem shape (never tuned) and fold the lanes in a fixed pairwise tree
(kernels/common.py), so a config (warps, channels per program) cannot change their bits
either. Here every config of every family runs for real; on CPU the interpreter ignores the
warps, so the rows reductions (whose configs also change the channel blocks) and the tree's
order test carry the weight there, and on a GPU all of it does. perf/static_checks.py checks
the compiled form: no reduction kernel folds more than two values in one ``tt.reduce``.
"""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE, random_bn_input, randomize_batch_norm, triton_ran
from triton.runtime.autotuner import Autotuner

import tritonbn
from tritonbn import _launch
from tritonbn.kernels import backward as bwd_kernels
from tritonbn.kernels import configs as cfg
from tritonbn.kernels import forward as fwd_kernels
from tritonbn.kernels.common import tree_sum

CASES = [
    ((4, 6, 9, 11), torch.contiguous_format, fwd_kernels._bn_fwd_normalize_ncs, bwd_kernels._bn_bwd_dx_ncs,
     "ncs_elementwise"),
    ((4, 70, 9, 11), torch.channels_last, fwd_kernels._bn_fwd_normalize_rows, bwd_kernels._bn_bwd_dx_rows,
     "rows_elementwise"),
]


def _fresh_launch_plans(monkeypatch) -> None:
    """Forget the launch plans: a plan replays the compiled kernel it recorded first, so
    without this a GPU run would compare the first config with itself."""
    monkeypatch.setattr(_launch, "_forward_plans", {})
    monkeypatch.setattr(_launch, "_backward_plans", {})


@pytest.mark.parametrize("shape,memory_format,normalize,dx,family", CASES, ids=["ncs", "rows"])
def test_elementwise_bits_do_not_depend_on_the_config(monkeypatch, shape, memory_format, normalize, dx, family):
    torch.manual_seed(0)
    x = (torch.randn(shape, device=DEVICE) * 3 + 1).contiguous(memory_format=memory_format)
    dy = torch.randn_like(x)
    running_mean = torch.randn(shape[1], device=DEVICE)
    running_var = torch.rand(shape[1], device=DEVICE) + 0.5
    results = []
    for config in cfg.all_configs(family):
        monkeypatch.setattr(normalize, "configs", [config])
        monkeypatch.setattr(dx, "configs", [config])
        monkeypatch.setattr(normalize, "cache", {})
        monkeypatch.setattr(dx, "cache", {})
        _fresh_launch_plans(monkeypatch)
        bn = tritonbn.BatchNorm2d(shape[1]).to(DEVICE).eval()
        with torch.no_grad():
            bn.running_mean.copy_(running_mean)
            bn.running_var.copy_(running_var)
        xg = x.clone().requires_grad_(True)
        with triton_ran():
            y = bn(xg)
            (grad,) = torch.autograd.grad(y, xg, dy)  # eval dx: the elementwise dx kernel alone
        results.append((y.detach(), grad))
    assert len(results) == len(cfg.all_configs(family)) > 1
    for y, grad in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(grad, results[0][1])


REDUCING_KERNELS = {
    "ncs_reduce": (fwd_kernels._bn_fwd_stats_ncs, fwd_kernels._bn_fwd_one_launch_ncs),
    "ncs_reduce_bwd": (bwd_kernels._bn_bwd_reduce_ncs, bwd_kernels._bn_bwd_one_launch_ncs),
    "rows_reduce": (fwd_kernels._bn_fwd_stats_rows, fwd_kernels._bn_fwd_one_launch_rows,
                    bwd_kernels._bn_bwd_reduce_rows, bwd_kernels._bn_bwd_one_launch_rows),
}
# (shape, memory format, the route the training forward takes on the interpreter's SM count)
REDUCING_CASES = [
    ((4, 6, 9, 11), torch.contiguous_format, "ncs-one-launch"),
    ((4, 2, 96, 96), torch.contiguous_format, "ncs-split"),
    ((4, 70, 9, 11), torch.channels_last, "rows-one-launch"),
    ((64, 3, 24, 24), torch.channels_last, "rows-split"),
]


def test_every_reducing_kernel_is_covered():
    tuned = {obj for module in (fwd_kernels, bwd_kernels) for obj in vars(module).values()
             if isinstance(obj, Autotuner)}
    reducing = {kernel for kernels in REDUCING_KERNELS.values() for kernel in kernels}
    # GroupNorm's family is covered by tests/test_group_norm.py.
    assert reducing <= tuned and set(REDUCING_KERNELS) == cfg.REDUCING_FAMILIES - {"gn_reduce"}
    assert len(tuned - reducing) == 4  # the elementwise ones, tested above


@pytest.mark.parametrize("shape,memory_format,route", REDUCING_CASES, ids=[c[2] for c in REDUCING_CASES])
def test_reduction_bits_do_not_depend_on_the_config(monkeypatch, shape, memory_format, route):
    torch.manual_seed(1)
    x = random_bn_input(shape, memory_format=memory_format)
    dy = torch.randn_like(x)
    if DEVICE == "cpu":
        assert _launch.route(x) == route
    family_configs = {family: cfg.all_configs(family) for family in REDUCING_KERNELS}
    runs = max(len(configs) for configs in family_configs.values())
    results = []
    for index in range(runs):
        for family, kernels in REDUCING_KERNELS.items():
            config = family_configs[family][index % len(family_configs[family])]
            for kernel in kernels:
                monkeypatch.setattr(kernel, "configs", [config])
                monkeypatch.setattr(kernel, "cache", {})
        _fresh_launch_plans(monkeypatch)
        torch.manual_seed(2)
        bn = randomize_batch_norm(tritonbn.BatchNorm2d(shape[1]).to(DEVICE))
        xg = x.clone().requires_grad_(True)
        with triton_ran():
            y = bn(xg)
            grads = torch.autograd.grad(y, (xg, bn.weight, bn.bias), dy)
        results.append((y.detach(), *grads, bn.running_mean.clone(), bn.running_var.clone()))
    assert runs > 1
    for result in results[1:]:
        for got, first in zip(result, results[0]):
            assert torch.equal(got, first)


@triton.jit
def _tree_kernel(X, Sums, ROWS: tl.constexpr, K: tl.constexpr):
    offsets = tl.arange(0, ROWS)[:, None] * K + tl.arange(0, K)[None, :]
    tl.store(Sums + tl.arange(0, K), tree_sum(tl.load(X + offsets), ROWS))


def _numpy_tree_sum(x: np.ndarray) -> np.ndarray:
    while x.shape[0] > 1:
        half = x.shape[0] // 2
        x = (x[:half] + x[half:]).astype(np.float32)
    return x[0]


def test_tree_sum_adds_in_its_documented_order():
    """Bit for bit the float32 tree of row i + row i + R/2 (natively on CUDA too: the compiled
    tree follows that order whatever the layout)."""
    rows, k = 256, 4
    torch.manual_seed(3)
    # Magnitudes over 6 decades: another order of additions would round differently.
    x = (torch.randn(rows, k) * torch.logspace(-3, 3, rows).view(rows, 1)).float()
    sums = torch.full((k,), float("nan"), device=DEVICE)
    _tree_kernel[(1,)](x.to(DEVICE), sums, ROWS=rows, K=k)
    assert torch.equal(sums.cpu(), torch.from_numpy(_numpy_tree_sum(x.numpy())))
    sequential = x[0].clone()
    for row in x[1:]:
        sequential += row
    assert not torch.equal(sums.cpu(), sequential), "the data must tell summation orders apart"
