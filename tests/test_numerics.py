"""Numerics against torch and float64 references: forward, dx, dgamma, dbeta, running stats.

Covers both canonical layouts (NCS and channels-last rows), both routes (fused and split
with partial statistics), every dtype, 1d/2d/3d inputs, odd sizes, strided views, the
large-mean case and a long reduction. Every comparison runs inside ``triton_ran`` so a
fallback to torch's own batch norm cannot pass.
"""

import copy
import math

import pytest
import torch
from conftest import DEVICE, TOLERANCES, randomize_batch_norm, triton_ran

import tritonbn
from tritonbn import _launch, _layout

MODULES = {2: (torch.nn.BatchNorm1d, tritonbn.BatchNorm1d), 3: (torch.nn.BatchNorm1d, tritonbn.BatchNorm1d),
           4: (torch.nn.BatchNorm2d, tritonbn.BatchNorm2d), 5: (torch.nn.BatchNorm3d, tritonbn.BatchNorm3d)}


def _random_input(shape, dtype=torch.float32, mean=0.5, scale=2.0, memory_format=None):
    # Per-channel offsets so that every channel has its own mean and variance.
    c = shape[1]
    offsets = torch.randn(c, dtype=torch.float64) * mean
    scales = torch.rand(c, dtype=torch.float64) * scale + 0.25
    view = [1, c] + [1] * (len(shape) - 2)
    x = torch.randn(shape, dtype=torch.float64) * scales.view(view) + offsets.view(view)
    x = x.to(device=DEVICE, dtype=dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    return x


def _pair(shape, dtype=torch.float32, param_dtype=None, **kwargs):
    """A torch module and a tritonbn module with equal random parameters and buffers."""
    torch_cls, ours_cls = MODULES[len(shape)]
    param_dtype = param_dtype or dtype
    ref = randomize_batch_norm(torch_cls(shape[1], **kwargs).to(device=DEVICE, dtype=param_dtype), batches=0)
    ours = ours_cls(shape[1], **kwargs).to(device=DEVICE, dtype=param_dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _assert_close(actual, expected, dtype, scale=1.0, msg=""):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float() if dtype != torch.float64 else actual,
                               expected.float() if dtype != torch.float64 else expected,
                               atol=atol * scale, rtol=rtol, msg=msg)


def _check_step(ref, ours, x, dtype, grad_scale=1.0):
    """One forward + backward through both modules; compare outputs, grads and buffers."""
    x_ref = x.detach().clone().requires_grad_(True)
    x_ours = x.detach().clone().requires_grad_(True)
    y_ref = ref(x_ref)
    with triton_ran():
        y_ours = ours(x_ours)
    assert y_ours.dtype == y_ref.dtype and y_ours.shape == y_ref.shape
    assert _layout.same_layout(y_ours, y_ref), (y_ours.stride(), y_ref.stride())
    _assert_close(y_ours, y_ref, dtype, msg="output")
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    with triton_ran():
        y_ours.backward(dy)
    # dx scales with w * rstd and sums over the channel: allow a larger absolute error.
    _assert_close(x_ours.grad, x_ref.grad, dtype, scale=4 * grad_scale, msg="dx")
    if ref.affine:
        n = x.numel() / x.shape[1]
        _assert_close(ours.weight.grad, ref.weight.grad, dtype, scale=math.sqrt(n) * grad_scale, msg="dweight")
        _assert_close(ours.bias.grad, ref.bias.grad, dtype, scale=math.sqrt(n) * grad_scale, msg="dbias")
    if ref.track_running_stats:
        _assert_close(ours.running_mean, ref.running_mean, dtype)
        _assert_close(ours.running_var, ref.running_var, dtype)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)


# (shape, memory format, comment): every route and layout, odd sizes on purpose.
SHAPES = [
    ((4, 3, 5, 7), None, "NCHW, C and spatial not powers of two: ncs-one-launch"),
    ((4, 6, 5, 7), torch.channels_last, "channels_last: rows-one-launch"),
    ((2, 5, 3, 4, 6), None, "NCDHW: ncs-one-launch"),
    ((2, 5, 3, 4, 6), torch.channels_last_3d, "channels_last_3d: rows-one-launch"),
    ((13, 10), None, "BatchNorm1d (N, C): rows-one-launch"),
    ((5, 7, 33), None, "BatchNorm1d (N, C, L): ncs-one-launch"),
    ((2, 3, 150, 150), None, "long channel, few of them: ncs-split over N and S"),
    ((9, 4, 60, 70), torch.channels_last, "channels_last long channel: rows-split"),
    ((40000, 3), None, "BatchNorm1d tall: rows-split"),
    ((1, 3, 7, 5), None, "batch of one with spatial > 1 is legal in training"),
]


@pytest.mark.parametrize("shape,memory_format,comment", SHAPES, ids=[s[2].split(":")[0] for s in SHAPES])
def test_train_steps_then_eval_match_torch(shape, memory_format, comment):
    torch.manual_seed(0)
    ref, ours = _pair(shape)
    for _ in range(2):
        _check_step(ref, ours, _random_input(shape, memory_format=memory_format), torch.float32)
    ref.eval()
    ours.eval()
    _check_step(ref, ours, _random_input(shape, memory_format=memory_format), torch.float32)


def test_routes_cover_fused_and_split():
    # The shapes above must exercise every route; a change in the heuristic must not hide one.
    routes = {_launch.route(_random_input(s, memory_format=f)) for s, f, _ in SHAPES}
    assert routes == {"ncs-one-launch", "ncs-split", "rows-one-launch", "rows-split"}


def test_long_reduction_splits_spatial_axis():
    # One sample, one long channel: the split must cut the spatial axis (split_s > 1).
    torch.manual_seed(1)
    shape = (1, 2, 512, 520)
    split_n, split_s, _, _ = _launch._split(_layout.canonical_input(_random_input(shape))[1], torch.device(DEVICE))
    assert split_n == 1 and split_s > 4
    ref, ours = _pair(shape)
    _check_step(ref, ours, _random_input(shape), torch.float32)


# (dtype, param dtype): torch's mixed precision allows half/bfloat16 input with float32
# parameters and buffers.
DTYPES = [
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float64, torch.float64),
]


@pytest.mark.parametrize("dtype,param_dtype", DTYPES, ids=[f"{d}-{p}".replace("torch.", "") for d, p in DTYPES])
@pytest.mark.parametrize("shape,memory_format", [((4, 6, 5, 7), None), ((4, 6, 5, 7), torch.channels_last),
                                                 ((2, 3, 150, 150), None)], ids=["ncs", "rows", "split"])
def test_dtypes_against_float64_reference(dtype, param_dtype, shape, memory_format):
    """Low precision is held against float64 math, with at most about torch's own error."""
    torch.manual_seed(2)
    x = _random_input(shape, dtype=dtype, memory_format=memory_format)
    ref, ours = _pair(shape, dtype=dtype, param_dtype=param_dtype)
    ref64 = copy.deepcopy(ref).double()
    x64 = x.double().requires_grad_(True)
    xo = x.detach().clone().requires_grad_(True)
    y64 = ref64(x64)
    with triton_ran():
        y = ours(xo)
    assert y.dtype == dtype
    dy = torch.randn_like(y64)
    y64.backward(dy)
    with triton_ran():
        y.backward(dy.to(dtype))
    # Errors of tritonbn and of torch itself in this dtype, both against float64.
    torch_y = ref(x) if dtype != torch.float64 else y64
    err = (y.double() - y64).abs().max().item()
    torch_err = (torch_y.double() - y64).abs().max().item()
    atol, _ = TOLERANCES[dtype]
    assert err <= 2 * torch_err + atol, (err, torch_err)
    _assert_close(xo.grad.double(), x64.grad, dtype, scale=4)
    n = x.numel() / x.shape[1]
    _assert_close(ours.weight.grad.double(), ref64.weight.grad, dtype, scale=math.sqrt(n))
    _assert_close(ours.running_var.double(), ref64.running_var, dtype)


def test_large_mean_small_std_variance_is_exact():
    # mean 1e4, std 0.5: E[x^2] - E[x]^2 in float32 would lose the variance entirely.
    torch.manual_seed(3)
    for shape, fmt in (((8, 3, 20, 20), None), ((8, 3, 20, 20), torch.channels_last), ((2, 3, 150, 150), None)):
        x64 = (torch.randn(shape, dtype=torch.float64) * 0.5 + 1e4).to(DEVICE)
        x = x64.float().contiguous(memory_format=fmt or torch.contiguous_format)
        rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
        with triton_ran():
            y = tritonbn.functional.batch_norm(x, rm, rv, training=True, momentum=1.0)
        xd = x.double()
        var = xd.var(dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(rv.double(), xd.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4, atol=0)
        expected = (xd - xd.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(var.view(1, 3, 1, 1) + 1e-5)
        torch.testing.assert_close(y.double(), expected, atol=2e-3, rtol=0)


def test_strided_view_input_with_storage_offset():
    torch.manual_seed(4)
    base = _random_input((6, 8, 9, 10))
    x = base[1:5, 2:7, ::2, 1:]  # storage offset, non-dense strides: copied once
    ref, ours = _pair(tuple(x.shape))
    _check_step(ref, ours, x, torch.float32)
    x = base.permute(0, 1, 3, 2)  # dense but neither NCS nor channels-last
    ref, ours = _pair(tuple(x.shape))
    _check_step(ref, ours, x, torch.float32)


def test_grad_output_in_another_layout():
    # dy arrives channels_last while x is contiguous (and expanded, from .sum()).
    torch.manual_seed(5)
    x = _random_input((3, 4, 6, 5)).requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    bn, ref = tritonbn.BatchNorm2d(4).to(DEVICE), torch.nn.BatchNorm2d(4).to(DEVICE)
    with triton_ran():
        bn(x).sum().backward()
    ref(xr).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
    dy = torch.randn(3, 4, 6, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    x.grad = xr.grad = None
    with triton_ran():
        bn(x).backward(dy)
    ref(xr).backward(dy)
    torch.testing.assert_close(x.grad, xr.grad, atol=4e-5, rtol=1e-5)


@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_affine_and_tracking_flags(affine, track):
    torch.manual_seed(6)
    shape = (4, 5, 6, 3)
    ref, ours = _pair(shape, affine=affine, track_running_stats=track)
    _check_step(ref, ours, _random_input(shape), torch.float32)
    ref.eval()
    ours.eval()
    _check_step(ref, ours, _random_input(shape), torch.float32)


def test_momentum_none_cumulative_average():
    torch.manual_seed(7)
    shape = (4, 3, 5, 5)
    ref, ours = _pair(shape, momentum=None)
    for _ in range(4):
        _check_step(ref, ours, _random_input(shape), torch.float32)


def test_functional_matches_torch_functional():
    torch.manual_seed(8)
    x = _random_input((5, 4, 3, 3))
    w, b = torch.rand(4, device=DEVICE) + 0.5, torch.randn(4, device=DEVICE)
    rm, rv = torch.randn(4, device=DEVICE), torch.rand(4, device=DEVICE) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    for training in (True, False):
        with triton_ran():
            y = tritonbn.functional.batch_norm(x, rm, rv, w, b, training, 0.3, 1e-3)
        y_ref = torch.nn.functional.batch_norm(x, rm2, rv2, w, b, training, 0.3, 1e-3)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rm, rm2)
        torch.testing.assert_close(rv, rv2)
    with triton_ran():
        y = tritonbn.functional.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-5, rtol=1e-5)


def test_same_input_same_bits():
    # Deterministic partial-statistics combine: no atomics, fixed order.
    torch.manual_seed(9)
    x = _random_input((2, 3, 150, 150)).requires_grad_(True)
    dy = torch.randn_like(x)
    results = []
    for _ in range(2):
        bn = tritonbn.BatchNorm2d(3).to(DEVICE)
        x.grad = None
        y = bn(x)
        y.backward(dy)
        results.append((y.detach().clone(), x.grad.clone(), bn.weight.grad.clone(), bn.running_var.clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_float64_exact_when_float_arguments_are_float32(monkeypatch):
    """Compiled Triton types every Python float argument as float32 (the interpreter keeps
    float64): eps, momentum and 1/M must still reach a float64 kernel exactly. Emulate the
    compiler's rounding here so that the CPU suite checks what a GPU would compute."""
    import struct

    real_launch = _launch._launch

    def float32_arguments(kernel, grid, *args, **kwargs):
        rounded = [struct.unpack("f", struct.pack("f", a))[0] if isinstance(a, float) else a for a in args]
        return real_launch(kernel, grid, *rounded, **kwargs)

    monkeypatch.setattr(_launch, "_launch", float32_arguments)
    torch.manual_seed(10)
    shape = (4, 3, 5, 7)
    for memory_format in (None, torch.channels_last):
        ref, ours = _pair(shape, dtype=torch.float64, momentum=0.3, eps=1e-3)
        for _ in range(2):
            _check_step(ref, ours, _random_input(shape, dtype=torch.float64, memory_format=memory_format),
                        torch.float64)
    x = _random_input((2, 3, 150, 150), dtype=torch.float64)  # the split route's kernels too
    ref, ours = _pair(tuple(x.shape), dtype=torch.float64, momentum=None, eps=1e-3)
    _check_step(ref, ours, x, torch.float64)
