"""InstanceNorm1d/2d/3d and functional.instance_norm against torch: per-instance statistics,
running statistics with track_running_stats (averaged over the batch, as torch does), eval with
the running statistics, momentum=None, unbatched input, layouts, torch.compile, and errors that
leave the running statistics untouched."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, TOLERANCES, random_bn_input, triton_ran

import tritonbn

MODULES = {3: (torch.nn.InstanceNorm1d, tritonbn.InstanceNorm1d), 4: (torch.nn.InstanceNorm2d, tritonbn.InstanceNorm2d),
           5: (torch.nn.InstanceNorm3d, tritonbn.InstanceNorm3d)}


def _assert_close(actual, expected, dtype=torch.float32, scale=1.0, msg=""):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol, msg=msg)


def _pair(cls_dim, c, dtype=torch.float32, **kwargs):
    torch_cls, ours_cls = MODULES[cls_dim]
    ref = torch_cls(c, **kwargs).to(DEVICE, dtype)
    with torch.no_grad():
        if ref.affine:
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
        if ref.track_running_stats:
            ref.running_mean.normal_()
            ref.running_var.uniform_(0.5, 2.0)
    ours = ours_cls(c, **kwargs).to(DEVICE, dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _step(ref, ours, x, dtype=torch.float32):
    """Forward + backward through both; compare output, grads and buffers."""
    xr = x.detach().clone().requires_grad_(True)
    xo = x.detach().clone().requires_grad_(True)
    y_ref = ref(xr)
    with triton_ran():
        y = ours(xo)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    _assert_close(y, y_ref, dtype, msg="output")
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    with triton_ran():
        y.backward(dy)
    _assert_close(xo.grad, xr.grad, dtype, scale=4, msg="dx")
    if ref.affine:
        spatial = x.numel() / x.shape[1]
        _assert_close(ours.weight.grad, ref.weight.grad, dtype, scale=spatial**0.5, msg="dweight")
        _assert_close(ours.bias.grad, ref.bias.grad, dtype, scale=spatial**0.5, msg="dbias")
    for (name, b), b_ref in zip(ours.named_buffers(), ref.buffers()):
        _assert_close(b, b_ref, dtype, msg=name)


# (shape, memory format, module kwargs, what)
CASES = [
    ((3, 5, 7), None, dict(), "1d, defaults (no affine, no tracking)"),
    ((2, 6, 4, 5), None, dict(affine=True, track_running_stats=True), "2d, affine, tracking"),
    ((2, 6, 4, 5), torch.channels_last, dict(affine=True, track_running_stats=True), "channels_last"),
    ((2, 3, 2, 3, 4), None, dict(track_running_stats=True, momentum=0.3), "3d, momentum 0.3"),
    ((2, 4, 3, 3), None, dict(track_running_stats=True, momentum=None), "momentum=None: no update"),
]


@pytest.mark.parametrize("shape,memory_format,kwargs,what", CASES, ids=[c[3] for c in CASES])
def test_train_and_eval_match_torch(shape, memory_format, kwargs, what):
    torch.manual_seed(0)
    ref, ours = _pair(len(shape), shape[1], **kwargs)
    for _ in range(2):  # two training steps: the running statistics compound
        _step(ref, ours, random_bn_input(shape, memory_format=memory_format))
    if ours.track_running_stats:
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 0  # torch never counts
    ref.eval()
    ours.eval()
    _step(ref, ours, random_bn_input(shape, memory_format=memory_format))  # running stats, or instance stats


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    torch.manual_seed(1)
    ref, ours = _pair(4, 4, dtype=torch.float64 if dtype == torch.float64 else torch.float32, affine=True,
                      track_running_stats=True)
    x = random_bn_input((2, 4, 5, 5), dtype)
    xo = x.clone().requires_grad_(True)
    with triton_ran():
        y = ours(xo)
    x64 = x.double().requires_grad_(True)
    ref64 = copy.deepcopy(ref).double()
    y64 = ref64(x64)
    _assert_close(y, y64, dtype)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64.backward(dy.double())
    _assert_close(xo.grad, x64.grad, dtype, scale=4)
    _assert_close(ours.running_var, ref64.running_var, dtype)


def test_unbatched_input():
    torch.manual_seed(2)
    ref, ours = _pair(4, 3, affine=True, track_running_stats=True)
    _step(ref, ours, random_bn_input((3, 5, 6)))  # (C, H, W) to InstanceNorm2d


def test_functional_matches_torch():
    torch.manual_seed(3)
    x = random_bn_input((3, 4, 6))
    rm, rv = torch.randn(4, device=DEVICE), torch.rand(4, device=DEVICE) + 0.5
    w, b = torch.rand(4, device=DEVICE) + 0.5, torch.randn(4, device=DEVICE)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    with triton_ran():
        y = tritonbn.functional.instance_norm(x, rm, rv, w, b, use_input_stats=True, momentum=0.2)
    y_ref = F.instance_norm(x, rm_ref, rv_ref, w, b, use_input_stats=True, momentum=0.2)
    _assert_close(y, y_ref)
    _assert_close(rm, rm_ref)
    _assert_close(rv, rv_ref)
    with triton_ran():
        y = tritonbn.functional.instance_norm(x, rm, rv, w, b, use_input_stats=False)
    _assert_close(y, F.instance_norm(x, rm_ref, rv_ref, w, b, use_input_stats=False))
    with triton_ran():
        y = tritonbn.functional.instance_norm(x)
    _assert_close(y, F.instance_norm(x))


def test_torch_compile_fullgraph_updates_running_stats_once():
    torch._dynamo.reset()
    torch.manual_seed(4)
    ref, ours = _pair(4, 4, affine=True, track_running_stats=True)
    compiled = torch.compile(ours, fullgraph=True)
    x = random_bn_input((2, 4, 5, 3))
    xr, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ref = ref(xr)
    with triton_ran():
        y = compiled(xo)
    _assert_close(y, y_ref)
    dy = torch.randn_like(y)
    y_ref.backward(dy)
    y.backward(dy)
    _assert_close(xo.grad, xr.grad, scale=4)
    _assert_close(ours.weight.grad, ref.weight.grad, scale=4)
    _assert_close(ours.running_mean, ref.running_mean)
    _assert_close(ours.running_var, ref.running_var)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# errors: torch's, raised before any state changes
# ----------------------------------------------------------------------------------------------


BAD_MODULE_CALLS = [
    ("wrong rank", 4, (2, 3, 4, 5, 6)),
    ("wrong channels with affine", 4, (2, 5, 4, 4)),
    ("one spatial element", 3, (2, 3, 1)),
]


@pytest.mark.parametrize("what,dim,shape", BAD_MODULE_CALLS, ids=[c[0] for c in BAD_MODULE_CALLS])
def test_bad_input_raises_torchs_error_and_leaves_state(what, dim, shape):
    torch.manual_seed(5)
    ref, ours = _pair(dim, 3, affine=True, track_running_stats=True)
    x = torch.randn(shape, device=DEVICE)
    with pytest.raises(Exception) as expected:
        ref(x)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    before = tritonbn._launch.launch_count
    with pytest.raises(type(expected.value), match=str(expected.value).replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        ours(x)
    assert tritonbn._launch.launch_count == before
    for k, v in ours.state_dict().items():
        assert torch.equal(v, state[k]), k


BAD_FUNCTIONAL_CALLS = [
    ("running stats missing in eval", dict(use_input_stats=False)),
    ("one running stat", dict(running_mean=True)),
    ("running_mean size", dict(running_mean=5, running_var=5)),
    ("weight size", dict(weight=5)),
]


@pytest.mark.parametrize("what,spec", BAD_FUNCTIONAL_CALLS, ids=[c[0] for c in BAD_FUNCTIONAL_CALLS])
def test_functional_errors_are_torchs(what, spec):
    x = torch.randn(2, 3, 4, device=DEVICE)
    kwargs = {}
    for name, value in spec.items():
        if value is True:
            kwargs[name] = torch.zeros(3, device=DEVICE)
        elif isinstance(value, int) and not isinstance(value, bool):
            kwargs[name] = torch.ones(value, device=DEVICE)
        else:
            kwargs[name] = value
    with pytest.raises(Exception) as expected:
        F.instance_norm(x, **kwargs)
    saved = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(type(expected.value)) as ours:
        tritonbn.functional.instance_norm(x, **kwargs)
    assert str(ours.value) == str(expected.value)
    for k, v in saved.items():
        assert torch.equal(kwargs[k], v)


def test_channel_mismatch_without_affine_warns_like_torch():
    m = tritonbn.InstanceNorm2d(3).to(DEVICE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with triton_ran():
            y = m(torch.randn(2, 4, 3, 3, device=DEVICE))
    assert y.shape == (2, 4, 3, 3)
    assert any("does not match num_features" in str(w.message) for w in caught)


def test_running_stats_update_is_one_launch_after_the_forward():
    m = tritonbn.InstanceNorm2d(3, track_running_stats=True).to(DEVICE)
    x = random_bn_input((2, 3, 4, 4))
    m(x)
    before = tritonbn._launch.launch_count
    m(x)
    assert tritonbn._launch.launch_count - before == 2  # the one-launch forward, then the update
    m.eval()
    before = tritonbn._launch.launch_count
    m(x)
    assert tritonbn._launch.launch_count - before == 1  # BatchNorm's eval kernel, no update


def test_no_positions_leave_running_stats_alone():
    """(N, C, 0): no value to average; torch leaves the running statistics as they were."""
    running_mean = torch.randn(4, device=DEVICE).abs_() + 0.5
    running_var = torch.rand(4, device=DEVICE) + 0.5
    before = running_mean.clone(), running_var.clone()
    x = torch.randn(2, 4, 0, device=DEVICE)
    y = tritonbn.functional.instance_norm(x, running_mean, running_var, use_input_stats=True, momentum=0.5)
    ref = F.instance_norm(x, before[0].clone(), before[1].clone(), use_input_stats=True, momentum=0.5)
    assert y.shape == ref.shape == x.shape
    torch.testing.assert_close(running_mean, before[0], atol=0, rtol=0)
    torch.testing.assert_close(running_var, before[1], atol=0, rtol=0)


def test_channels_last_output_stays_channels_last():
    """A deliberate difference: torch.instance_norm returns a contiguous tensor for any input
    (it reshapes through input.contiguous()); tritonbn keeps a channels_last input's format,
    as it does for BatchNorm and GroupNorm, and computes the same values."""
    x = torch.randn(2, 6, 5, 3, device=DEVICE).contiguous(memory_format=torch.channels_last)
    m = tritonbn.InstanceNorm2d(6, affine=True)
    with triton_ran():
        y = m(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    ref = F.instance_norm(x, weight=m.weight, bias=m.bias)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(y, ref, atol=atol, rtol=rtol)
