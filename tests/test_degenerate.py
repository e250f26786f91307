"""Degenerate and extreme shapes against torch: the smallest legal batches, size-1 dims,
ambiguous channels_last strides, very wide BatchNorm1d and one very long channel."""

import pytest
import torch
from conftest import DEVICE, triton_ran

import tritonbn
from tritonbn import _launch

MODULES = {2: (torch.nn.BatchNorm1d, tritonbn.BatchNorm1d), 3: (torch.nn.BatchNorm1d, tritonbn.BatchNorm1d),
           4: (torch.nn.BatchNorm2d, tritonbn.BatchNorm2d), 5: (torch.nn.BatchNorm3d, tritonbn.BatchNorm3d)}


def _compare(shape, memory_format=None, atol=1e-5, steps=2):
    torch_cls, ours_cls = MODULES[len(shape)]
    ref = torch_cls(shape[1]).to(DEVICE)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    ours = ours_cls(shape[1]).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    for step in range(steps + 1):
        training = step < steps
        ref.train(training)
        ours.train(training)
        x = torch.randn(shape, device=DEVICE) * 3 + 1
        if memory_format is not None:
            x = x.contiguous(memory_format=memory_format)
        xr = x.clone().requires_grad_(True)
        xo = x.clone().requires_grad_(True)
        y_ref = ref(xr)
        with triton_ran():
            y = ours(xo)
        dy = torch.randn_like(y_ref)
        y_ref.backward(dy)
        with triton_ran():
            y.backward(dy)
        torch.testing.assert_close(y, y_ref, atol=atol, rtol=1e-5)
        torch.testing.assert_close(xo.grad, xr.grad, atol=4 * atol, rtol=1e-5)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=atol * x.numel() ** 0.5, rtol=1e-5)
        torch.testing.assert_close(ours.running_var, ref.running_var, atol=atol, rtol=1e-5)
        ours.weight.grad = ref.weight.grad = None


# (shape, memory format, comment)
CASES = [
    ((2, 5), None, "N * spatial = 2: the smallest legal training batch, (N, C)"),
    ((1, 4, 2), None, "N * spatial = 2 with N = 1"),
    ((1, 3, 1, 2), None, "N = 1, H = 1, W = 2"),
    ((6, 4, 1, 1), None, "BatchNorm2d on (N, C, 1, 1)"),
    ((6, 4, 1, 1), torch.channels_last, "(N, C, 1, 1) channels_last: strides say nothing"),
    ((5, 1, 4, 3), None, "C = 1"),
    ((5, 1, 4, 3), torch.channels_last, "C = 1 channels_last: same strides as NCHW"),
    ((1, 6, 4, 3), torch.channels_last, "N = 1 channels_last"),
    ((7, 1), None, "BatchNorm1d with C = 1"),
    ((2, 1, 3, 1, 2), torch.channels_last_3d, "C = 1, size-1 depth, channels_last_3d"),
]


@pytest.mark.parametrize("shape,memory_format,comment", CASES, ids=[c[2] for c in CASES])
def test_degenerate_shapes_match_torch(shape, memory_format, comment):
    torch.manual_seed(0)
    _compare(shape, memory_format)


def test_wide_batchnorm1d():
    # Many channels, tiny batch: one program per block of channels (the rows-one-launch route).
    torch.manual_seed(1)
    channels = 65536 if DEVICE == "cuda" else 4099
    x = torch.randn(3, channels, device=DEVICE)
    assert _launch.route(x) == "rows-one-launch"
    _compare((3, channels), steps=1)


def test_one_very_long_channel():
    # C = 1: all parallelism comes from splitting the one channel (ncs-split, over N and S).
    torch.manual_seed(2)
    shape = (4, 1, 4096, 4096) if DEVICE == "cuda" else (4, 1, 512, 512)
    x = torch.randn(shape, device=DEVICE)
    view = _launch.canonical_input(x)[1]
    split_n, split_s, _, _ = _launch._split(view, x.device)
    assert split_n * split_s >= min(_launch.sm_count(x.device), view.m // 16384)
    _compare(shape, steps=1, atol=2e-5)
