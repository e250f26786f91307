"""GroupNorm and GroupNormAct against torch: forward, dx, dgamma, dbeta, every layout, dtype and
route, odd sizes, determinism, gradcheck, torch.compile, errors, the fused epilogue, stability.

References are torch's GroupNorm in float64 on the same (rounded) input, so that torch's own
half-precision CPU kernels are not the yardstick; outputs are compared with
conftest.TOLERANCES. Every call that must run tritonbn's kernels runs inside ``triton_ran``,
and every kernel output is poisoned with NaN first (conftest), so an unwritten element shows.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, TOLERANCES, random_bn_input, triton_ran

import tritonbn
from tritonbn import _group_launch, _layout
from tritonbn.kernels import configs as cfg
from tritonbn.kernels import group_norm as gn_kernels

CL = torch.channels_last
CL3 = torch.channels_last_3d


def _assert_close(actual, expected, dtype, scale=1.0, msg=""):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol, msg=msg)


def _params(c, dtype=torch.float32):
    torch.manual_seed(11)
    weight = (torch.rand(c, dtype=torch.float64) + 0.5).to(DEVICE, dtype)
    bias = torch.randn(c, dtype=torch.float64).to(DEVICE, dtype)
    return weight, bias


def _reference(x, groups, weight, bias, dy, residual=None, activation=None, slope=0.01, eps=1e-5):
    """torch in float64 (unfused): output and gradients of x, weight, bias, residual."""
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, weight, bias, residual)]
    xd, wd, bd, rd = leaves
    z = F.group_norm(xd, groups, wd, bd, eps)
    if rd is not None:
        z = z + rd
    y = {None: lambda t: t, "relu": F.relu, "silu": F.silu, "leaky_relu": lambda t: F.leaky_relu(t, slope)}[
        activation](z)
    y.backward(dy.double())
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def _ours(x, groups, weight, bias, dy, residual=None, activation=None, slope=0.01, eps=1e-5):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, weight, bias, residual)]
    xo, wo, bo, ro = leaves
    with triton_ran():
        if activation is None and residual is None:
            y = tritonbn.functional.group_norm(xo, groups, wo, bo, eps)
        else:
            y = tritonbn.functional.group_norm_act(xo, groups, wo, bo, eps, activation, ro, slope)
        y.backward(dy)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def _check(x, groups, dtype, residual=None, activation=None, affine=True, slope=0.01):
    c = x.shape[1]
    weight, bias = _params(c, dtype) if affine else (None, None)
    dy = torch.randn(x.shape, dtype=torch.float64).to(DEVICE, dtype)
    y, grads = _ours(x, groups, weight, bias, dy, residual, activation, slope)
    y_ref, grads_ref = _reference(x, groups, weight, bias, dy, residual, activation, slope)
    assert y.dtype == x.dtype and y.shape == x.shape
    # The output keeps a contiguous or channels_last input's memory format on every device
    # (torch's CPU kernel does too; torch's CUDA kernel returned channels_last inputs
    # contiguous before its NHWC kernel); other dense layouts read in place keep their
    # strides, and the rest are copied once and come out contiguous.
    if x.is_contiguous():
        assert y.is_contiguous(), y.stride()
    elif x.is_contiguous(memory_format=CL) or x.is_contiguous(memory_format=CL3):
        assert y.is_contiguous(memory_format=CL if x.dim() == 4 else CL3), (y.stride(), x.stride())
    else:
        assert _layout.same_layout(y, x) or y.is_contiguous(), (y.stride(), x.stride())
    _assert_close(y, y_ref, dtype, msg="output")
    # dx is ill-conditioned when a group's variance is below eps (tiny groups): allow twice
    # the error torch itself makes in the same dtype, where that is larger.
    torch_dx = _torch_dx(x, groups, weight, bias, dy, residual, activation, slope)
    torch_err = (torch_dx.double() - grads_ref[0].cpu()).abs().max().item() if torch_dx is not None else 0.0
    _assert_close(grads[0], grads_ref[0], dtype, scale=max(4, 2 * torch_err / TOLERANCES[dtype][0]), msg="dx")
    per_channel = x.numel() / max(c, 1)
    for name, got, expected in (("dweight", grads[1], grads_ref[1]), ("dbias", grads[2], grads_ref[2])):
        if expected is not None:
            assert got.dtype == dtype
            _assert_close(got, expected, dtype, scale=math.sqrt(per_channel), msg=name)
    if residual is not None:
        _assert_close(grads[3], grads_ref[3], dtype, scale=4, msg="dresidual")


def _torch_dx(x, groups, weight, bias, dy, residual, activation, slope):
    """torch's own dx in x's dtype, on the CPU (None where torch's CPU kernels lack the dtype)."""
    try:
        y, grads = _reference_in(x.cpu(), groups, *(t.cpu() if t is not None else None for t in (weight, bias)),
                                 dy.cpu(), residual.cpu() if residual is not None else None, activation, slope)
    except RuntimeError:
        return None
    return grads[0]


def _reference_in(x, groups, weight, bias, dy, residual, activation, slope, eps=1e-5):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, weight, bias, residual)]
    xd, wd, bd, rd = leaves
    z = F.group_norm(xd, groups, wd, bd, eps)
    if rd is not None:
        z = z + rd
    y = {None: lambda t: t, "relu": F.relu, "silu": F.silu, "leaky_relu": lambda t: F.leaky_relu(t, slope)}[
        activation](z)
    y.backward(dy)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def _input(shape, dtype=torch.float32, memory_format=None):
    return random_bn_input(shape, dtype, memory_format=memory_format)


# (shape, groups, memory format, what the case covers)
CASES = [
    ((2, 6, 5, 7), 3, None, "NCHW, C not a power of two"),
    ((2, 8, 4, 5), 2, CL, "channels_last"),
    ((2, 4, 2, 3, 3), 2, CL3, "channels_last_3d"),
    ((3, 10), 5, None, "(N, C) input"),
    ((2, 12, 3), 12, None, "groups of one channel (InstanceNorm-like), 1d"),
    ((2, 6, 3, 3), 1, None, "one group (LayerNorm-like)"),
    ((2, 3, 1, 2), 3, None, "tiny spatial"),
    ((1, 40, 3, 3), 4, CL, "channels_last, 10 channels per group"),
]


@pytest.mark.parametrize("shape,groups,memory_format,what", CASES, ids=[c[3] for c in CASES])
def test_matches_torch_float32(shape, groups, memory_format, what):
    torch.manual_seed(0)
    _check(_input(shape, memory_format=memory_format), groups, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,groups,memory_format", [((2, 6, 5, 7), 3, None), ((2, 8, 4, 5), 2, CL)],
                         ids=["ncs", "channels_last"])
def test_matches_torch_other_dtypes(dtype, shape, groups, memory_format):
    torch.manual_seed(1)
    _check(_input(shape, dtype, memory_format), groups, dtype)


def test_half_input_with_float32_parameters():
    torch.manual_seed(2)
    x = _input((2, 6, 4, 4), torch.bfloat16)
    weight, bias = _params(6, torch.float32)
    dy = torch.randn(x.shape, device=DEVICE, dtype=torch.bfloat16)
    y, grads = _ours(x, 3, weight, bias, dy)
    y_ref, grads_ref = _reference(x, 3, weight, bias, dy)
    assert y.dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    _assert_close(y, y_ref, torch.bfloat16)
    _assert_close(grads[1], grads_ref[1], torch.bfloat16, scale=4)


def test_without_affine_and_non_contiguous_views():
    torch.manual_seed(3)
    base = _input((4, 8, 9, 10))
    _check(base[1:3, :, ::2, 1:], 4, torch.float32, affine=False)  # storage offset, non-dense: one copy
    _check(base.permute(0, 1, 3, 2), 2, torch.float32)  # dense, neither NCHW nor channels_last
    _check(base.transpose(0, 1).contiguous().transpose(0, 1), 4, torch.float32)  # NCS, samples innermost


def test_grad_output_in_another_layout():
    torch.manual_seed(4)
    x = _input((2, 4, 5, 6))
    weight, bias = _params(4)
    dy = torch.randn(x.shape, device=DEVICE).contiguous(memory_format=CL)
    _, grads = _ours(x, 2, weight, bias, dy)
    _, grads_ref = _reference(x, 2, weight, bias, dy)
    _assert_close(grads[0], grads_ref[0], torch.float32, scale=4)


def test_empty_inputs():
    for shape in ((0, 6, 3), (2, 6, 0)):
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        m = tritonbn.GroupNorm(3, 6).to(DEVICE)
        y = m(x)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.equal(m.weight.grad, torch.zeros(6, device=DEVICE))


# ----------------------------------------------------------------------------------------------
# routes: one launch per group, or each group split across programs
# ----------------------------------------------------------------------------------------------


def test_vae_shapes_split_their_groups():
    """Stable Diffusion's VAE decoder: 32 groups of millions of elements get many programs each,
    and the chunks cover every spatial position exactly once (pure Python: no kernel runs)."""
    for n, c, s, channels_last in ((1, 128, 1024 * 1024, False), (1, 512, 512 * 512, True),
                                   (1, 512, 512 * 512, False)):
        splits, s_chunk = cfg.gn_split(n * 32, c // 32, s, channels_last, sm_count=132)
        assert splits >= 8, (c, s, splits)
        assert (splits - 1) * s_chunk < s <= splits * s_chunk
        if not channels_last:
            assert s_chunk % cfg.SPATIAL_SPLIT_QUANTUM == 0
    # Many short groups: one program each.
    assert cfg.gn_split(2 * 32, 40, 16 * 16, False, sm_count=132) == (1, 256)


@pytest.fixture
def small_split(monkeypatch):
    """Groups of a few hundred elements take the split route (the threshold is in the plan key)."""
    monkeypatch.setattr(cfg, "GN_MIN_ELEMENTS_PER_PROGRAM", 64)


SPLIT_CASES = [((2, 4, 16, 16), CL, None), ((1, 6, 9, 40), None, None), ((2, 4, 8, 10), CL, "silu"),
               ((1, 4, 8, 16), None, "leaky_relu")]


@pytest.mark.parametrize("shape,memory_format,activation", SPLIT_CASES,
                         ids=["rows", "ncs", "rows-silu-residual", "ncs-leaky-residual"])
def test_split_route_matches_torch(small_split, shape, memory_format, activation):
    torch.manual_seed(5)
    x = _input(shape, memory_format=memory_format)
    groups = 2
    assert _group_launch.route(x, groups).endswith("-split")
    residual = torch.randn_like(x) if activation else None
    _check(x, groups, torch.float32, residual=residual, activation=activation)


def test_routes_by_default():
    x = _input((2, 8, 4, 5))
    assert _group_launch.route(x, 2) == "ncs-one-launch"
    assert _group_launch.route(x.contiguous(memory_format=CL), 2) == "rows-one-launch"


# ----------------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------------


def _step(x, groups, dy, residual=None, activation=None):
    weight, bias = _params(x.shape[1])
    y, grads = _ours(x, groups, weight, bias, dy, residual, activation)
    return [y, *[g for g in grads if g is not None]]


GN_KERNELS = {
    "gn_reduce": (gn_kernels._gn_fwd_one_launch, gn_kernels._gn_fwd_stats, gn_kernels._gn_bwd_one_launch,
                  gn_kernels._gn_bwd_reduce, gn_kernels._gn_bwd_dx),
    "gn_elementwise": (gn_kernels._gn_fwd_normalize,),
}


def test_every_autotuned_kernel_is_covered():
    tuned = {v for v in vars(gn_kernels).values() if isinstance(v, triton_autotuner())}
    assert tuned == {k for kernels in GN_KERNELS.values() for k in kernels}
    assert {"gn_reduce", "gn_elementwise"} <= set(cfg.FAMILIES) and "gn_reduce" in cfg.REDUCING_FAMILIES


def triton_autotuner():
    from triton.runtime.autotuner import Autotuner

    return Autotuner


@pytest.mark.parametrize("shape,memory_format,split", [((2, 6, 5, 7), None, False), ((2, 4, 8, 10), CL, True),
                                                       ((1, 4, 8, 16), None, True)],
                         ids=["ncs-one-launch", "rows-split", "ncs-split"])
def test_same_bits_twice_and_under_every_config(monkeypatch, shape, memory_format, split):
    if split:
        monkeypatch.setattr(cfg, "GN_MIN_ELEMENTS_PER_PROGRAM", 64)
    torch.manual_seed(6)
    x = _input(shape, memory_format=memory_format)
    dy = torch.randn_like(x)
    residual = torch.randn_like(x)
    assert _group_launch.route(x, 2).endswith("split" if split else "one-launch")
    results = [_step(x, 2, dy, residual, "silu"), _step(x, 2, dy, residual, "silu")]
    runs = max(len(cfg.all_configs(family)) for family in GN_KERNELS)
    for index in range(runs):
        for family, kernels in GN_KERNELS.items():
            configs = cfg.all_configs(family)
            for kernel in kernels:
                monkeypatch.setattr(kernel, "configs", [configs[index % len(configs)]])
                monkeypatch.setattr(kernel, "cache", {})
        # A plan replays the compiled kernel it recorded first: without fresh plans a GPU run
        # would compare the first config with itself.
        monkeypatch.setattr(_group_launch, "_forward_plans", {})
        monkeypatch.setattr(_group_launch, "_backward_plans", {})
        results.append(_step(x, 2, dy, residual, "silu"))
    for result in results[1:]:
        for got, first in zip(result, results[0]):
            assert torch.equal(got, first)


# ----------------------------------------------------------------------------------------------
# gradcheck, torch.compile
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True], ids=["one-launch", "split"])
def test_gradcheck_float64(monkeypatch, split):
    if split:
        monkeypatch.setattr(cfg, "GN_MIN_ELEMENTS_PER_PROGRAM", 4)
    torch.manual_seed(7)
    shape = (1, 4, 24) if split else (2, 4, 3)
    x = _input(shape, torch.float64).requires_grad_(True)
    assert _group_launch.route(x, 2).endswith("split" if split else "one-launch")
    weight, bias = (t.requires_grad_(True) for t in _params(4, torch.float64))
    residual = torch.randn_like(x).requires_grad_(True)

    def fn(x, weight, bias, residual):
        return tritonbn.functional.group_norm_act(x, 2, weight, bias, 1e-5, "silu", residual)

    with triton_ran():
        # fast_mode: one random direction per input (the interpreter makes every call costly).
        assert torch.autograd.gradcheck(fn, (x, weight, bias, residual), eps=1e-6, atol=1e-7, fast_mode=True)


def test_double_backward_matches_torch():
    torch.manual_seed(8)
    x = _input((2, 4, 3), torch.float64).requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    weight, bias = (t.requires_grad_(True) for t in _params(4, torch.float64))
    (gx,) = torch.autograd.grad(tritonbn.functional.group_norm(x, 2, weight, bias).pow(2).sum(), x, create_graph=True)
    (gxr,) = torch.autograd.grad(F.group_norm(xr, 2, weight, bias).pow(2).sum(), xr, create_graph=True)
    torch.testing.assert_close(torch.autograd.grad(gx.sum(), x)[0], torch.autograd.grad(gxr.sum(), xr)[0])


class _Block(torch.nn.Module):
    """A diffusion ResNet block's norm path: GroupNorm -> SiLU, twice, with a residual."""

    def __init__(self, norm, act_norm):
        super().__init__()
        self.norm1 = act_norm(2, 6)
        self.conv = torch.nn.Conv2d(6, 6, 3, padding=1)
        self.norm2 = norm(3, 6)

    def forward(self, x):
        return self.norm2(self.conv(self.norm1(x))) + x


def test_torch_compile_fullgraph_matches_eager_and_torch():
    torch._dynamo.reset()
    torch.manual_seed(9)
    ref = _Block(torch.nn.GroupNorm, lambda g, c: torch.nn.Sequential(torch.nn.GroupNorm(g, c), torch.nn.SiLU()))
    ref = ref.to(DEVICE)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    models = [ref]
    for _ in range(2):
        model = _Block(tritonbn.GroupNorm, tritonbn.GroupNormAct).to(DEVICE)
        state = {k.replace("norm1.0.", "norm1."): v for k, v in ref.state_dict().items()}
        model.load_state_dict(state)
        models.append(model)
    models[2] = torch.compile(models[2], fullgraph=True)
    x = _input((2, 6, 5, 4))
    dy = torch.randn_like(x)
    results = []
    for i, model in enumerate(models):
        xg = x.clone().requires_grad_(True)
        if i:
            with triton_ran(min_launches=2):
                y = model(xg)
                y.backward(dy)
        else:
            y = model(xg)
            y.backward(dy)
        results.append([y.detach(), xg.grad, *[p.grad for p in model.parameters()]])
    for result in results[1:]:
        for got, expected in zip(result, results[0]):
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# the fused epilogue
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation,residual,memory_format", [
    ("silu", False, None), ("silu", True, CL), ("relu", True, None), ("leaky_relu", False, CL), (None, True, None),
])
def test_fused_epilogue_matches_unfused_torch(activation, residual, memory_format):
    torch.manual_seed(10)
    x = _input((2, 6, 5, 4), memory_format=memory_format)
    r = torch.randn_like(x) if residual else None
    _check(x, 3, torch.float32, residual=r, activation=activation, slope=0.2)


def test_fused_module_and_residual_in_another_layout():
    torch.manual_seed(12)
    m = tritonbn.GroupNormAct(2, 4, activation="silu").to(DEVICE)
    assert "activation='silu'" in repr(m)
    assert set(m.state_dict()) == set(torch.nn.GroupNorm(2, 4).state_dict())
    x = _input((2, 4, 3, 5), memory_format=CL)
    r = torch.randn(x.shape, device=DEVICE)  # contiguous while x is channels_last: copied
    with torch.no_grad(), triton_ran():
        y = m(x, r)
    expected = F.silu(F.group_norm(x.double(), 2, m.weight.double(), m.bias.double()) + r.double())
    _assert_close(y, expected, torch.float32)
    with pytest.raises(ValueError, match="activation must be one of"):
        tritonbn.GroupNormAct(2, 4, activation="gelu")


# ----------------------------------------------------------------------------------------------
# numerics: stable variance
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("memory_format", [None, CL], ids=["ncs", "channels_last"])
def test_large_mean_small_std(small_split, memory_format):
    """mean 1e4, std 0.5: E[x^2] - E[x]^2 in float32 would lose the variance entirely; both
    routes (one-launch on 2 x 2 groups, split with the small threshold on 1 x 1)."""
    torch.manual_seed(13)
    for shape, groups in (((2, 4, 6, 6), 2), ((1, 2, 16, 16), 1)):
        x = (torch.randn(shape, dtype=torch.float64) * 0.5 + 1e4).float().to(DEVICE)
        x = x.contiguous(memory_format=memory_format or torch.contiguous_format)
        with triton_ran():
            y = tritonbn.functional.group_norm(x, groups)
        torch.testing.assert_close(y.double(), F.group_norm(x.double(), groups), atol=2e-3, rtol=0)


# ----------------------------------------------------------------------------------------------
# torch's errors, the module API
# ----------------------------------------------------------------------------------------------


BAD_CALLS = [
    ("channels not divisible", lambda: ((torch.randn(2, 6, 4), 4), {})),
    ("weight size", lambda: ((torch.randn(2, 6, 4), 3, torch.ones(5)), {})),
    ("bias size", lambda: ((torch.randn(2, 6, 4), 3, torch.ones(6), torch.ones(5)), {})),
    ("rank", lambda: ((torch.randn(6), 3), {})),
    ("one value per group", lambda: ((torch.randn(1, 6), 6), {})),
    ("integer input", lambda: ((torch.ones(2, 6, 4, dtype=torch.int64), 3), {})),
    ("zero groups", lambda: ((torch.randn(2, 6, 4), 0), {})),
    ("negative groups", lambda: ((torch.randn(2, 6, 4), -3), {})),
    # A half input takes float32 parameters, but not a float32 weight beside a half bias.
    ("mixed parameter dtypes", lambda: ((torch.randn(2, 6, 4).half(), 3, torch.ones(6), torch.zeros(6).half()), {})),
]


@pytest.mark.parametrize("what,make", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_errors_are_torchs(what, make):
    if what == "mixed parameter dtypes" and DEVICE == "cuda":
        pytest.skip("the mixed-dtype rule is torch's CPU kernel's; its CUDA kernel has its own dtype checks")
    args, kwargs = make()
    args = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
    with pytest.raises(Exception) as expected:
        F.group_norm(*args, **kwargs)
    before = tritonbn._launch.launch_count
    with pytest.raises(type(expected.value)) as ours:
        tritonbn.functional.group_norm(*args, **kwargs)
    assert tritonbn._launch.launch_count == before, "nothing may run before the checks"
    if what == "integer input":  # the kernel's name in the message differs between CPU and CUDA
        assert "not implemented for 'Long'" in str(ours.value)
    elif what == "bias size":  # torch's bias message prints the weight's shape: the same up to the shapes
        assert str(ours.value).split(" but got")[0] == str(expected.value).split(" but got")[0]
    elif what == "mixed parameter dtypes":  # torch's message names its CPU kernel
        assert "mixed dtype" in str(ours.value) and "mixed dtype" in str(expected.value)
    else:
        assert str(ours.value) == str(expected.value)


def test_module_is_a_drop_in():
    m = tritonbn.GroupNorm(4, 12, eps=1e-3, affine=False).to(DEVICE)
    ref = torch.nn.GroupNorm(4, 12, eps=1e-3, affine=False)
    assert isinstance(m, torch.nn.GroupNorm) and repr(m) == repr(ref)
    with pytest.raises(ValueError, match="must be divisible by num_groups"):
        tritonbn.GroupNorm(5, 12)
    m = tritonbn.GroupNorm(4, 12).to(DEVICE)
    m.load_state_dict(torch.nn.GroupNorm(4, 12).state_dict())
    x = _input((2, 16, 3))
    with pytest.raises(RuntimeError, match="Expected weight to be a vector of size equal"):
        m(x)
    with pytest.raises(RuntimeError, match="mixed dtype"):
        tritonbn.functional.group_norm(_input((2, 4, 3)), 2, torch.ones(4, dtype=torch.float64, device=DEVICE))


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_capture():
    torch.manual_seed(14)
    m = tritonbn.GroupNormAct(2, 8).cuda()
    x = _input((2, 8, 16, 16))
    y = m(x)  # warm-up: compile, tune, record the plan
    graph = torch.cuda.CUDAGraph()
    static_x = x.clone()
    with torch.cuda.graph(graph):
        static_y = m(static_x)
    static_x.copy_(_input((2, 8, 16, 16)))
    graph.replay()
    torch.testing.assert_close(static_y, m(static_x))
    assert not torch.equal(static_y, y)


# ----------------------------------------------------------------------------------------------
# dispatch: launches, no host synchronisation, the CPU fallback
# ----------------------------------------------------------------------------------------------


def test_launches_per_step_and_no_host_sync(small_split):
    from test_backend import _HostSyncDetector

    m = tritonbn.GroupNormAct(2, 4).to(DEVICE)
    for shape, forward_launches, backward_launches in (((2, 4, 3, 5), 1, 2), ((1, 4, 8, 16), 3, 3)):
        x = _input(shape).requires_grad_(True)
        m(x).sum().backward()  # the first call of a shape builds its plans
        detector = _HostSyncDetector()
        with detector:
            before = tritonbn._launch.launch_count
            y = m(x)
            assert tritonbn._launch.launch_count - before == forward_launches
            before = tritonbn._launch.launch_count
            y.backward(torch.randn_like(y))
            assert tritonbn._launch.launch_count - before == backward_launches
        assert detector.seen == []


def test_cpu_without_interpreter_falls_back_to_torch():
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch, tritonbn
        x = torch.randn(2, 6, 5, 5)
        rm, rv = torch.zeros(6), torch.ones(6)
        torch.testing.assert_close(tritonbn.GroupNorm(3, 6)(x), torch.nn.GroupNorm(3, 6)(x))
        torch.testing.assert_close(tritonbn.GroupNormAct(3, 6)(x, x), torch.nn.functional.silu(
            torch.nn.GroupNorm(3, 6)(x) + x))
        ours, ref = tritonbn.InstanceNorm2d(6, track_running_stats=True), torch.nn.InstanceNorm2d(6,
            track_running_stats=True)
        torch.testing.assert_close(ours(x), ref(x))
        torch.testing.assert_close(ours.running_var, ref.running_var)
        from tritonbn import _launch
        assert _launch.launch_count == 0
        print("fallback ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA autocast (CPU autocast leaves group_norm in the input dtype)")
def test_cuda_autocast_runs_group_norm_in_float32_like_torch():
    x = torch.randn(2, 8, 5, 5, device=DEVICE, dtype=torch.float16)
    ours, ref = tritonbn.GroupNorm(4, 8).to(DEVICE), torch.nn.GroupNorm(4, 8).to(DEVICE)
    with torch.autocast("cuda", dtype=torch.float16):
        y, y_ref = ours(x), ref(x)
        z, z_ref = tritonbn.functional.group_norm_act(x, 4), F.silu(F.group_norm(x, 4))
    assert y.dtype == y_ref.dtype == torch.float32 and z.dtype == z_ref.dtype
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)


# Groups wider than one tile: the kernels' loop over channel blocks runs more than once
# (every other case has BLOCK_C >= C / G).
@pytest.mark.parametrize("shape,groups,memory_format,min_elements", [
    ((2, 24, 700), 2, None, None),  # 12 channels of 700: 1024-wide spatial tiles, several channel blocks
    ((2, 4100), 1, None, None),  # (N, C) with 4100 channels in one group: rows tiles, several channel blocks
    ((1, 4200, 2, 3), 1, CL, 64),  # channels_last, 4200 channels per group, split route
])
def test_groups_wider_than_a_tile(monkeypatch, shape, groups, memory_format, min_elements):
    import triton.language as tl

    d = shape[1] // groups
    spatial = math.prod(shape[2:])
    block_c, _ = cfg.gn_reduce_tile(d, spatial, memory_format is not None or len(shape) == 2, tl.float64)
    assert block_c < d  # more than one channel block per group
    if min_elements is not None:
        monkeypatch.setattr(cfg, "GN_MIN_ELEMENTS_PER_PROGRAM", min_elements)
        assert _group_launch.route(_input(shape, memory_format=memory_format), groups).endswith("split")
    torch.manual_seed(12)
    x = _input(shape, dtype=torch.float64, memory_format=memory_format)
    with triton_ran():
        _check(x, groups, torch.float64, residual=torch.randn_like(x), activation="silu")


@pytest.mark.parametrize("memory_format,split", [(None, False), (None, True), (CL, False), (CL, True)],
                         ids=["ncs-one-launch", "ncs-split", "rows-one-launch", "rows-split"])
def test_64_bit_indexing_on_every_route(monkeypatch, memory_format, split):
    """INT64_INDEX, which only tensors past 2^31 elements take, forced on a small tensor."""
    monkeypatch.setattr(_group_launch, "_INT32_LIMIT", 10)
    monkeypatch.setattr(_group_launch, "_forward_plans", {})  # plans are keyed by shape, not by the limit
    monkeypatch.setattr(_group_launch, "_backward_plans", {})
    if split:
        monkeypatch.setattr(cfg, "GN_MIN_ELEMENTS_PER_PROGRAM", 16)
    torch.manual_seed(13)
    x = _input((2, 4, 6, 10), dtype=torch.float64, memory_format=memory_format)
    assert _group_launch.group_view(x, 2)[1].int64
    assert _group_launch.route(x, 2).endswith("split" if split else "one-launch")
    with triton_ran():
        _check(x, 2, torch.float64, residual=torch.randn_like(x), activation="leaky_relu", slope=0.2)
