"""tritonbn's modules are torch's modules: state_dict, constructor, repr, convert_model, training
side by side with torch, torch.compile(fullgraph=True), momentum=None, track_running_stats=False
and affine=False.

Tolerances: a single batch norm is compared with ``TOLERANCES[float32]`` (1e-5), its input
gradient with 4e-5 and parameter gradients (sums over the batch) with 1e-4. A whole CNN trained
for 3 SGD steps is compared with atol = rtol = 1e-4: the convolutions and the linear layers are
torch's in both models, so only tritonbn's rounding differs, amplified a little by each step.
"""

import contextlib
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, TOLERANCES, random_bn_input, randomize_batch_norm, triton_ran

import tritonbn

PAIRS = {
    1: (torch.nn.BatchNorm1d, tritonbn.BatchNorm1d),
    2: (torch.nn.BatchNorm2d, tritonbn.BatchNorm2d),
    3: (torch.nn.BatchNorm3d, tritonbn.BatchNorm3d),
}
SHAPES = {1: (6, 3, 5), 2: (3, 3, 4, 5), 3: (2, 3, 3, 2, 4)}
FLAGS = [(True, True), (True, False), (False, True), (False, False)]
FLAG_IDS = [f"affine={a}-track={t}" for a, t in FLAGS]


@pytest.fixture(autouse=True)
def _no_tf32():
    """On CUDA, convolutions default to TF32, whose rounding would swamp the float32 comparisons."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


_random_input = random_bn_input


_randomize = randomize_batch_norm


def _pair(dims, num_features=3, **kwargs):
    torch_cls, ours_cls = PAIRS[dims]
    ref = _randomize(torch_cls(num_features, device=DEVICE, **kwargs))
    ours = ours_cls(num_features, device=DEVICE, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _assert_close(actual, expected, atol=None, rtol=None, **kwargs):
    default_atol, default_rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(actual, expected, atol=atol or default_atol, rtol=rtol or default_rtol, **kwargs)


def _assert_same_state(a, b, exact=False):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert list(state_a) == list(state_b)
    for key in state_a:
        if exact:
            assert torch.equal(state_a[key], state_b[key]), key
            assert state_a[key].dtype == state_b[key].dtype
        else:
            _assert_close(state_a[key], state_b[key], msg=key)


def _step(ref, ours, x):
    """Forward and backward through both modules; compare outputs, input grads and buffers."""
    x_ref = x.detach().clone().requires_grad_(True)
    x_ours = x.detach().clone().requires_grad_(True)
    y_ref = ref(x_ref)
    with triton_ran():
        y_ours = ours(x_ours)
    _assert_close(y_ours, y_ref, msg="output")
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    with triton_ran():
        y_ours.backward(dy)
    _assert_close(x_ours.grad, x_ref.grad, atol=4e-5, msg="dx")
    if ref.affine:
        _assert_close(ours.weight.grad, ref.weight.grad, atol=1e-4, msg="dweight")
        _assert_close(ours.bias.grad, ref.bias.grad, atol=1e-4, msg="dbias")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        ours_buffer, ref_buffer = getattr(ours, name), getattr(ref, name)
        assert (ours_buffer is None) == (ref_buffer is None), name
        if ref_buffer is not None:
            _assert_close(ours_buffer, ref_buffer, msg=name)
    return y_ours


# ----------------------------------------------------------------------------------------------
# the module is torch's module
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine,track", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_state_dict_round_trips_both_ways(dims, affine, track):
    torch_cls, ours_cls = PAIRS[dims]
    # torch -> ours
    ref = _randomize(torch_cls(4, affine=affine, track_running_stats=track, device=DEVICE), batches=7)
    ours = ours_cls(4, affine=affine, track_running_stats=track, device=DEVICE)
    assert list(ours.state_dict()) == list(ref.state_dict())
    if track:
        assert "num_batches_tracked" in ours.state_dict()
    ours.load_state_dict(ref.state_dict(), strict=True)
    _assert_same_state(ours, ref, exact=True)

    # ours, after a training step of its own, -> a fresh torch module
    with triton_ran():
        ours(_random_input(SHAPES[dims][:1] + (4,) + SHAPES[dims][2:]))
    back = torch_cls(4, affine=affine, track_running_stats=track, device=DEVICE)
    back.load_state_dict(ours.state_dict(), strict=True)
    _assert_same_state(back, ours, exact=True)
    if track:
        assert int(back.num_batches_tracked) == 8
        assert not torch.equal(back.running_mean, ref.running_mean), "the training step updated the statistics"

    # and both compute the same thing from that state
    back.eval()
    ours.eval()
    x = _random_input(SHAPES[dims][:1] + (4,) + SHAPES[dims][2:])
    with triton_ran():
        y = ours(x)
    _assert_close(y, back(x))


CONSTRUCTIONS = [
    {},
    {"eps": 1e-3, "momentum": 0.3},
    {"momentum": None},
    {"affine": False},
    {"track_running_stats": False},
    {"affine": False, "track_running_stats": False, "eps": 0.5},
    {"dtype": torch.float64},
]


@pytest.mark.parametrize("kwargs", CONSTRUCTIONS, ids=[str(k) for k in CONSTRUCTIONS])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_constructor_defaults_and_repr_are_torchs(dims, kwargs):
    torch_cls, ours_cls = PAIRS[dims]
    assert inspect.signature(ours_cls.__init__) == inspect.signature(torch_cls.__init__)
    ref = torch_cls(5, device=DEVICE, **kwargs)
    ours = ours_cls(5, device=DEVICE, **kwargs)
    assert isinstance(ours, torch_cls) and isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)
    assert ours_cls.__name__ == torch_cls.__name__
    assert repr(ours) == repr(ref)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert [(n, p.shape, p.dtype, p.device, p.requires_grad) for n, p in ours.named_parameters()] == [
        (n, p.shape, p.dtype, p.device, p.requires_grad) for n, p in ref.named_parameters()
    ]
    assert [(n, b.shape, b.dtype, b.device) for n, b in ours.named_buffers()] == [
        (n, b.shape, b.dtype, b.device) for n, b in ref.named_buffers()
    ]
    _assert_same_state(ours, ref, exact=True)  # ones, zeros, zeros, ones, 0
    for name in ("running_mean", "running_var", "num_batches_tracked", "weight", "bias"):
        assert (getattr(ours, name) is None) == (getattr(ref, name) is None), name


def test_isinstance_of_torch_classes():
    assert isinstance(tritonbn.BatchNorm1d(3), torch.nn.BatchNorm1d)
    assert isinstance(tritonbn.BatchNorm2d(3), torch.nn.BatchNorm2d)
    assert isinstance(tritonbn.BatchNorm3d(3), torch.nn.BatchNorm3d)
    assert not isinstance(tritonbn.BatchNorm2d(3), torch.nn.BatchNorm1d)


# ----------------------------------------------------------------------------------------------
# convert_model, then train side by side with torch
# ----------------------------------------------------------------------------------------------


class _Head(torch.nn.Module):
    def __init__(self, features, hidden, classes):
        super().__init__()
        self.fc1 = torch.nn.Linear(features, hidden)
        self.bn = torch.nn.BatchNorm1d(hidden)
        self.fc2 = torch.nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1),
            torch.nn.BatchNorm2d(4),
            torch.nn.ReLU(),
            torch.nn.Conv2d(4, 6, 3, padding=1),
            torch.nn.BatchNorm2d(6, momentum=0.3),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
        )
        self.head = _Head(6 * 3 * 3, 10, 5)

    def forward(self, x):
        return self.head(self.features(x))


BN_NAMES = ["features.1", "features.4", "head.bn"]


def test_convert_model_then_train_side_by_side_with_torch():
    torch.manual_seed(0)
    ref = _Net().to(DEVICE)
    for name in BN_NAMES:
        _randomize(ref.get_submodule(name))
    ref.features[4].weight.requires_grad_(False)  # a frozen parameter
    ref.head.eval()  # a submodule in eval: its BatchNorm1d uses the running statistics

    model = copy.deepcopy(ref)
    before = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # made BEFORE the conversion
    converted = tritonbn.convert_model(model)
    assert converted is model

    # every BatchNorm replaced, nothing else touched
    for name, module in converted.named_modules():
        assert type(module) not in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d), name
    assert [type(converted.get_submodule(n)) for n in BN_NAMES] == [
        tritonbn.BatchNorm2d, tritonbn.BatchNorm2d, tritonbn.BatchNorm1d]
    assert [n for n, _ in converted.named_modules()] == [n for n, _ in ref.named_modules()]
    for name in BN_NAMES:
        new, old = converted.get_submodule(name), ref.get_submodule(name)
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
            assert getattr(new, attr) == getattr(old, attr), (name, attr)
    # the same Parameter and buffer objects, with their values and requires_grad
    after = {**dict(converted.named_parameters()), **dict(converted.named_buffers())}
    assert list(after) == list(before)
    for key, tensor in after.items():
        assert tensor is before[key], key
    _assert_same_state(converted, ref, exact=True)
    assert [p.requires_grad for p in converted.parameters()] == [p.requires_grad for p in ref.parameters()]
    assert not converted.features[4].weight.requires_grad
    assert [m.training for m in converted.modules()] == [m.training for m in ref.modules()]
    assert converted.training and not converted.head.training and not converted.head.bn.training

    ref_optimizer = torch.optim.SGD(ref.parameters(), lr=0.1)
    initial = copy.deepcopy(ref.state_dict())
    for step in range(3):
        x = _random_input((8, 3, 6, 6))
        target = torch.randint(0, 5, (8,), device=DEVICE)
        losses = []
        for net, opt in ((ref, ref_optimizer), (converted, optimizer)):
            opt.zero_grad()
            if net is converted:
                with triton_ran(min_launches=3):
                    loss = F.cross_entropy(net(x), target)
                    loss.backward()
            else:
                loss = F.cross_entropy(net(x), target)
                loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5), f"step {step}"
    state, ref_state = converted.state_dict(), ref.state_dict()
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], atol=1e-4, rtol=1e-4, msg=key)
    # the optimizer made before the conversion trained the converted model
    assert not torch.equal(state["features.1.weight"], initial["features.1.weight"])
    assert not torch.equal(state["head.bn.bias"], initial["head.bn.bias"])
    assert torch.equal(state["features.4.weight"], initial["features.4.weight"]), "frozen"
    # the training-mode BatchNorm2d layers counted 3 batches; head.bn, in eval, none
    assert int(state["features.1.num_batches_tracked"]) == 8
    assert int(state["head.bn.num_batches_tracked"]) == 5
    assert torch.equal(state["head.bn.running_mean"], initial["head.bn.running_mean"])


def test_convert_model_leaves_subclasses_and_returns_a_converted_bare_module():
    bare = torch.nn.BatchNorm3d(4, eps=1e-3, momentum=None, device=DEVICE)
    _randomize(bare)
    bare.eval()
    new = tritonbn.convert_model(bare)
    assert type(new) is tritonbn.BatchNorm3d and not new.training
    assert new.running_mean is bare.running_mean and new.weight is bare.weight
    assert new.momentum is None and new.eps == 1e-3
    ours = tritonbn.BatchNorm2d(3)
    assert tritonbn.convert_model(ours) is ours


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------


class _Small(torch.nn.Module):
    def __init__(self, bn_cls, momentum):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = bn_cls(4, momentum=momentum)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) * 2.0)


def _small_models(momentum):
    torch.manual_seed(1)
    ref = _Small(torch.nn.BatchNorm2d, momentum).to(DEVICE)
    _randomize(ref.bn)
    eager = _Small(tritonbn.BatchNorm2d, momentum).to(DEVICE)
    eager.load_state_dict(ref.state_dict())
    compiled_model = _Small(tritonbn.BatchNorm2d, momentum).to(DEVICE)
    compiled_model.load_state_dict(ref.state_dict())
    return ref, eager, compiled_model


def _compare_models(models, x, dy, msg):
    """Forward + backward of each model; everything compared with the first (torch's)."""
    results = []
    for i, model in enumerate(models):
        x_ = x.detach().clone().requires_grad_(True)
        for p in model.parameters():
            p.grad = None
        with triton_ran(min_launches=2) if i > 0 else contextlib.nullcontext():  # models[1:] are tritonbn's
            y = model(x_)
            y.backward(dy)
        grads = [x_.grad] + [p.grad for p in model.parameters()]
        results.append((y.detach(), grads, [b.clone() for b in model.buffers()]))
    y0, grads0, buffers0 = results[0]
    for y, grads, buffers in results[1:]:
        _assert_close(y, y0, msg=f"{msg}: output")
        for g, g0 in zip(grads, grads0):
            _assert_close(g, g0, atol=1e-4, msg=f"{msg}: grad")
        for b, b0 in zip(buffers, buffers0):
            _assert_close(b, b0, msg=f"{msg}: buffer")


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum=0.1", "momentum=None"])
def test_torch_compile_fullgraph_matches_eager_and_torch(momentum):
    """torch.compile with inductor and fullgraph=True: a graph break would raise. momentum=None
    reads num_batches_tracked on the device inside the graph."""
    torch._dynamo.reset()
    ref, eager, compiled_model = _small_models(momentum)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for step in range(2):
        x = _random_input((3, 3, 5, 4))
        dy = torch.randn(3, 4, 5, 4, device=DEVICE)
        _compare_models([ref, eager, compiled], x, dy, f"train step {step}")
    assert int(compiled_model.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked) == 7
    for model in (ref, eager, compiled_model):
        model.eval()
    x = _random_input((2, 3, 5, 4))
    dy = torch.randn(2, 4, 5, 4, device=DEVICE)
    _compare_models([ref, eager, compiled], x, dy, "eval")
    with torch.no_grad(), triton_ran():
        _assert_close(compiled(x), ref(x))
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# momentum=None, track_running_stats=False, affine=False
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2])
def test_momentum_none_is_a_cumulative_average(dims):
    ref, ours = _pair(dims, momentum=None)
    with torch.no_grad():  # start from a fresh count, as torch's cumulative average expects
        ref.num_batches_tracked.zero_()
        ours.num_batches_tracked.zero_()
    shape = SHAPES[dims]
    means, variances = [], []
    for step in range(4):
        # batch sizes and statistics vary from step to step, so the average is not trivial
        x = _random_input((shape[0] + step,) + shape[1:]) + step
        _step(ref, ours, x)  # compares the running statistics after every step
        assert int(ours.num_batches_tracked) == step + 1
        per_channel = x.double().transpose(0, 1).reshape(shape[1], -1)
        means.append(per_channel.mean(1))
        variances.append(per_channel.var(1, unbiased=True))
    # the running statistics are the plain average of the 4 batches' statistics
    _assert_close(ours.running_mean.double(), torch.stack(means).mean(0), atol=1e-5, rtol=1e-5)
    _assert_close(ours.running_var.double(), torch.stack(variances).mean(0), atol=1e-5, rtol=1e-5)
    ref.eval()
    ours.eval()
    _step(ref, ours, _random_input(shape))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_track_running_stats_false_uses_batch_statistics(dims, training):
    ref, ours = _pair(dims, track_running_stats=False)
    ref.train(training)
    ours.train(training)
    assert ours.running_mean is None and ours.running_var is None and ours.num_batches_tracked is None
    x = _random_input(SHAPES[dims])
    y = _step(ref, ours, x)
    # batch statistics in eval too: each channel of (y - bias) / weight has mean 0 and variance 1
    dims_but_c = [0] + list(range(2, x.dim()))
    normalized = (y.detach() - ours.bias.view([1, -1] + [1] * (x.dim() - 2))) / ours.weight.view(
        [1, -1] + [1] * (x.dim() - 2))
    _assert_close(normalized.mean(dims_but_c), torch.zeros(3, device=DEVICE), atol=1e-5)
    _assert_close(normalized.var(dims_but_c, unbiased=False), torch.ones(3, device=DEVICE), atol=1e-3, rtol=1e-3)
    assert ours.running_mean is None and ours.num_batches_tracked is None


@pytest.mark.parametrize("memory_format", [None, torch.channels_last], ids=["NCHW", "channels_last"])
def test_affine_false(memory_format):
    ref, ours = _pair(2, affine=False)
    assert ours.weight is None and ours.bias is None
    for _ in range(2):
        _step(ref, ours, _random_input((3, 3, 4, 5), memory_format=memory_format))
    ref.eval()
    ours.eval()
    _step(ref, ours, _random_input((3, 3, 4, 5), memory_format=memory_format))
