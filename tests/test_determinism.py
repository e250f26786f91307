"""Determinism: the same input gives the same bits, whatever the elementwise launch config.

Elementwise kernels (normalise, dx) compute each element by the same formula from the same
per-channel constants, so every autotune config must give identical bits; this runs each
config for real. Reductions give the same bits on every run for a given config (fixed-order
combines, no atomics: tests/test_numerics.py), and under torch.use_deterministic_algorithms
they never depend on tuning (tests/test_tuning_cache.py).
"""

import pytest
import torch
from conftest import DEVICE, triton_ran

import tritonbn
from tritonbn.kernels import backward as bwd_kernels
from tritonbn.kernels import configs as cfg
from tritonbn.kernels import forward as fwd_kernels

CASES = [
    ((4, 6, 9, 11), torch.contiguous_format, fwd_kernels._bn_fwd_normalize_ncs, bwd_kernels._bn_bwd_dx_ncs,
     "ncs_elementwise"),
    ((4, 70, 9, 11), torch.channels_last, fwd_kernels._bn_fwd_normalize_rows, bwd_kernels._bn_bwd_dx_rows,
     "rows_elementwise"),
]


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
