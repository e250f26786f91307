"""Property-based tests (hypothesis): tritonbn equals torch on random configurations.

Random dims (1d/2d/3d), shapes, layouts (contiguous, channels_last, transposed and sliced
views), dtypes, momentum (including None), affine and tracking flags, train/eval and input
scales (including |mean| >> std): forward, backward and buffers. Every quantity is held
against a float64 reference on the same input: tritonbn's error may be at most twice torch's
own error (float32 torch on the same rounded input) plus a per-dtype floor, since with
|mean| >> std the problem itself is ill-conditioned in float32 and no fixed tolerance is fair.
The "ci" profile (default) keeps the example count small for 2 cores; set
HYPOTHESIS_PROFILE=nightly for a long run.
"""

import copy
import math
import os

import torch
from conftest import DEVICE, triton_ran
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import tritonbn

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nightly", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

MODULES = {2: (torch.nn.BatchNorm1d, tritonbn.BatchNorm1d), 3: (torch.nn.BatchNorm1d, tritonbn.BatchNorm1d),
           4: (torch.nn.BatchNorm2d, tritonbn.BatchNorm2d), 5: (torch.nn.BatchNorm3d, tritonbn.BatchNorm3d)}
# Relative to the output scale (normalised: O(1)). float16/bfloat16 outputs are compared with
# a float32 torch reference on the same rounded input: allow a few units of output rounding.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@st.composite
def configurations(draw):
    ndim = draw(st.sampled_from([2, 3, 4, 5]))
    n = draw(st.integers(0, 5))
    c = draw(st.integers(1, 7))
    spatial = [draw(st.integers(1, 6)) for _ in range(ndim - 2)]
    layout = draw(st.sampled_from(["contiguous", "channels_last", "transposed", "sliced"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    momentum = draw(st.sampled_from([0.1, 0.7, None]))
    affine = draw(st.booleans())
    track = draw(st.booleans())
    training = draw(st.booleans())
    mean = draw(st.sampled_from([0.0, 3.0, -50.0, 1e3]))
    std = draw(st.sampled_from([1.0, 0.1, 20.0]))
    if dtype != torch.float32:
        # A half-precision input must resolve its own spread: std of at least a few ulps of the
        # mean (bfloat16 has 8 bits: 1000 +- 1 is just 1000), else every value rounds alike.
        assume(std >= abs(mean) * 2.0**-5)
    seed = draw(st.integers(0, 2**31 - 1))
    return ndim, [n, c, *spatial], layout, dtype, momentum, affine, track, training, mean, std, seed


def _make_input(shape, layout, dtype, mean, std):
    if layout == "sliced":
        big = [s * 2 for s in shape]
        base = torch.randn(big, device=DEVICE) * std + mean
        x = base[tuple(slice(1, 1 + 2 * s, 2) if i > 0 else slice(0, s) for i, s in enumerate(shape))]
    else:
        x = torch.randn(shape, device=DEVICE) * std + mean
        if layout == "channels_last" and len(shape) in (4, 5):
            x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
        elif layout == "transposed" and len(shape) >= 4:
            x = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, last two dims swapped in memory
    return x.to(dtype)


@given(configurations())
def test_matches_torch(config):
    ndim, shape, layout, dtype, momentum, affine, track, training, mean, std, seed = config
    torch.manual_seed(seed)  # the data is part of the example: failures must replay
    spatial = math.prod(shape[2:])
    assume(not (training or not track) or shape[0] * spatial != 1)  # torch's one-value rule
    torch_cls, ours_cls = MODULES[ndim]
    ref = torch_cls(shape[1], momentum=momentum, affine=affine, track_running_stats=track).to(DEVICE)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
    ours = ours_cls(shape[1], momentum=momentum, affine=affine, track_running_stats=track).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    if track:
        # Warm running statistics near the data, so eval normalises to O(1) like training.
        with torch.no_grad():
            for module in (ref, ours):
                module.running_mean.fill_(mean)
                module.running_var.fill_(std * std)
    ref.train(training)
    ours.train(training)
    ours.to(dtype if dtype != torch.float32 else torch.float32)
    ref64 = copy.deepcopy(ref).double()

    x = _make_input(shape, layout, dtype, mean, std)
    x_ref = x.float().detach().requires_grad_(True)
    x_64 = x.double().detach().requires_grad_(True)
    x_ours = x.detach().clone().requires_grad_(True)
    y_ref = ref(x_ref)
    y_64 = ref64(x_64)
    with triton_ran(min_launches=0 if x.numel() == 0 else 1):
        y = ours(x_ours)
    assert y.shape == x.shape and y.dtype == dtype
    # float32 holds the mean to half an ulp of |mean|; centring then loses |mean| / std of the
    # output's relative precision, in torch as in tritonbn: part of the floor.
    tol = TOLERANCE[dtype] + 4 * 2.0**-24 * abs(mean) / std
    _no_worse_than_torch(y, y_ref, y_64, tol, "output")
    if x.numel() == 0:
        return
    # The output gradient in the model's dtype, and the references given that same rounded dy:
    # with a few values per channel, dx cancels heavily and would amplify the rounding of dy.
    dy = torch.randn_like(y_ref).to(dtype)
    y_ref.backward(dy.float())
    y_64.backward(dy.double())
    with triton_ran():
        y.backward(dy)
    _no_worse_than_torch(x_ours.grad, x_ref.grad, x_64.grad, tol, "dx")
    if affine:
        m = x.numel() / x.shape[1]
        _no_worse_than_torch(ours.weight.grad, ref.weight.grad, ref64.weight.grad, tol * math.sqrt(m), "dweight")
        _no_worse_than_torch(ours.bias.grad, ref.bias.grad, ref64.bias.grad, tol * math.sqrt(m), "dbias")
    if track:
        _no_worse_than_torch(ours.running_mean, ref.running_mean, ref64.running_mean, tol, "running_mean")
        _no_worse_than_torch(ours.running_var, ref.running_var, ref64.running_var, tol, "running_var")
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)


def _no_worse_than_torch(ours, torch_result, exact, tol, name):
    """Elementwise: |ours - exact| <= 2 |torch - exact| + tol * (1 + |exact|)."""
    ours, torch_result, exact = ours.double(), torch_result.double(), exact.double()
    assert torch.isnan(ours).eq(torch.isnan(exact)).all(), f"{name}: NaN pattern differs"
    bound = 2 * (torch_result - exact).abs() + tol * (1 + exact.abs())
    excess = ((ours - exact).abs() - bound).nan_to_num(0.0)
    assert (excess <= 0).all(), f"{name}: error exceeds twice torch's by {excess.max().item():.3g}"
