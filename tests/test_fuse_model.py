"""tritonbn.fuse_model: the torch.fx pass that turns BatchNorm(+add)+activation into BatchNormAct.

The models are written here the way torchvision writes them (torchvision is not a test
dependency): BasicBlock and Bottleneck with one shared in-place ReLU module, ``out +=
identity`` and a downsample ``Sequential(conv, bn)``. Every comparison is against the same
model unfused, run by torch, with the same initial weights: outputs and running statistics
directly (float32 tolerance), gradients and trained weights through their distance to a
float64 torch run (see ``_as_accurate``).
"""

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, TOLERANCES, no_torch_batch_norm, triton_ran
from torch import fx, nn

import tritonbn
from tritonbn.modules import _BatchNormActMixin

ATOL, RTOL = TOLERANCES[torch.float32]


# ------------------------------------------------------------------------------------------
# torchvision's blocks, as torchvision writes them
# ------------------------------------------------------------------------------------------


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class TinyResNet(nn.Module):
    """torchvision's ResNet with a block type per stage and few channels.

    Stages: 2 BasicBlocks (no downsample), 1 BasicBlock with a downsample, 2 Bottlenecks
    (the first with a downsample). Fusable: stem bn1+relu, 2 per BasicBlock, 3 per
    Bottleneck = 1 + 6 + 6 = 13; the 2 downsample BatchNorms stay plain.
    """

    FUSED = 13
    PLAIN = 2

    def __init__(self, num_classes=5, width=4):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(BasicBlock, width, 2)
        self.layer2 = self._make_layer(BasicBlock, 2 * width, 1, stride=2)
        self.layer3 = self._make_layer(Bottleneck, width, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                # Not torch's (1, 0): the affine parameters must matter in every comparison.
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.5, 0.5)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


class MLP(nn.Module):
    """Linear -> BatchNorm1d -> SiLU module, functional leaky_relu(0.2), and a residual SiLU."""

    FUSED = 3

    def __init__(self, features=6, hidden=8, num_classes=5):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.bn2 = nn.BatchNorm1d(hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.bn3 = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.act(self.bn1(self.fc1(x)))
        x = F.leaky_relu(self.bn2(self.fc2(x)), 0.2)
        x = F.silu(x + self.bn3(self.fc3(x)))  # the residual on the left
        return self.head(x)


class Functional(nn.Module):
    """The functional and method spellings: torch.add, F.relu_, Tensor.relu, F.leaky_relu_."""

    FUSED = 4

    def __init__(self, channels=4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.bn3 = nn.BatchNorm2d(channels)
        self.bn4 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = F.relu_(torch.add(x, self.bn1(self.conv(x))))
        y = self.bn2(self.conv(y)).relu()
        y = F.leaky_relu_(self.bn3(self.conv(y)), 0.1)
        y = torch.relu(self.bn4(self.conv(y)).add_(x))
        return y


class Gated(nn.Module):
    """Data-dependent control flow around a traceable child: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = MLP()

    def forward(self, x):
        if x.sum() > 0:
            return self.body(x)
        return self.body(-x)


def _fused(model):
    return [m for m in model.modules() if isinstance(m, _BatchNormActMixin)]


def _plain(model):
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _BatchNormActMixin)]


def _models(model_cls, seed=0):
    """(torch float32, torch float64, fused float32): the same initial weights, no shared tensors."""
    torch.manual_seed(seed)
    base = model_cls().to(DEVICE)
    return copy.deepcopy(base), copy.deepcopy(base).double(), tritonbn.fuse_model(copy.deepcopy(base))


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def _as_accurate(fused, torch32, torch64, what, factor=4.0):
    """fused is within ``factor`` times torch float32's own error of the float64 result.

    Gradients through a dozen training-mode BatchNorms (and weights after SGD steps on them)
    differ from the float64 result by ~1e-4 in torch float32 itself, so a fixed 1e-5 would
    only test rounding luck; what matters is that fusing costs no accuracy.
    """
    exact = torch64.double()
    fused_error = (fused.double() - exact).abs().max().item()
    torch_error = (torch32.double() - exact).abs().max().item()
    floor = ATOL + RTOL * exact.abs().max().item()
    assert fused_error <= factor * torch_error + floor, (
        f"{what}: fused error {fused_error:.3g}, torch float32 error {torch_error:.3g} (vs float64)")


IMAGE = (2, 3, 32, 32)


# ------------------------------------------------------------------------------------------
# what is fused
# ------------------------------------------------------------------------------------------


def test_resnet_pattern_counts():
    torch.manual_seed(0)
    model = TinyResNet()
    fused = tritonbn.fuse_model(model)
    assert isinstance(fused, fx.GraphModule)
    assert len(_fused(fused)) == TinyResNet.FUSED
    plain = dict((n, m) for n, m in fused.named_modules() if m in _plain(fused))
    assert sorted(plain) == ["layer2.0.downsample.1", "layer3.0.downsample.1"]

    acts = {n: (m.activation, type(m).__name__) for n, m in fused.named_modules() if isinstance(m, _BatchNormActMixin)}
    assert acts["bn1"] == ("relu", "BatchNormAct2d")
    for block in ("layer1.0", "layer1.1", "layer2.0"):
        assert f"{block}.bn1" in acts and f"{block}.bn2" in acts
    for block in ("layer3.0", "layer3.1"):
        assert all(f"{block}.bn{i}" in acts for i in (1, 2, 3))

    # bn3 + identity: the residual is the downsample output in layer3.0, the block input in layer3.1.
    calls = {n.target: n for n in fused.graph.nodes if n.op == "call_module"}
    assert calls["layer3.0.bn3"].args[1] is calls["layer3.0.downsample.1"]
    assert calls["layer3.1.bn3"].args[1] is calls["layer3.0.bn3"]
    assert len(calls["layer3.1.bn1"].args) == 1
    # No activation or add is left in the graph: every ReLU went into a BatchNormAct.
    assert not [n for n in fused.graph.nodes if n.op == "call_module" and "relu" in n.target]
    assert not [n for n in fused.graph.nodes if n.op == "call_function" and "add" in str(n.target)]

    # The original model is untouched and shares every tensor.
    assert len(_fused(model)) == 0 and len(_plain(model)) == TinyResNet.FUSED + TinyResNet.PLAIN
    assert fused.layer3.get_submodule("1").bn3.weight is model.layer3[1].bn3.weight
    assert fused.layer3.get_submodule("1").bn3.running_var is model.layer3[1].bn3.running_var


def test_state_dict_keys_unchanged_and_loadable():
    torch.manual_seed(0)
    model = TinyResNet()
    fused = tritonbn.fuse_model(copy.deepcopy(model))
    assert set(fused.state_dict()) == set(model.state_dict())
    # A torch checkpoint, with modified values, loads strictly and lands in the fused modules.
    checkpoint = {k: v + 1 if v.is_floating_point() else v + 3 for k, v in model.state_dict().items()}
    fused.load_state_dict(checkpoint, strict=True)
    torch.testing.assert_close(fused.get_submodule("layer3.1.bn3").running_mean,
                               checkpoint["layer3.1.bn3.running_mean"])
    assert int(fused.get_submodule("bn1").num_batches_tracked) == 3
    # And back: the fused model's state_dict loads into a plain torch model.
    TinyResNet().load_state_dict(fused.state_dict(), strict=True)


def test_tritonbn_batchnorm_is_fused_too():
    torch.manual_seed(0)
    model = tritonbn.convert_model(TinyResNet())
    fused = tritonbn.fuse_model(model)
    assert len(_fused(fused)) == TinyResNet.FUSED
    assert all(type(m) is tritonbn.BatchNorm2d for m in _plain(fused))


def test_functional_spellings():
    torch.manual_seed(0)
    mlp = tritonbn.fuse_model(MLP())
    assert {(m.activation, m.negative_slope) for m in _fused(mlp)} == {("silu", 0.01), ("leaky_relu", 0.2)}
    assert len(_fused(mlp)) == MLP.FUSED and not _plain(mlp)
    assert type(mlp.bn1) is tritonbn.BatchNormAct1d
    func = tritonbn.fuse_model(Functional())
    assert len(_fused(func)) == Functional.FUSED and not _plain(func)
    assert func.bn3.activation == "leaky_relu" and func.bn3.negative_slope == 0.1


class _NotFusable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn_two_users = nn.BatchNorm2d(4)
        self.bn_shared = nn.BatchNorm2d(4)
        self.bn_sigmoid = nn.BatchNorm2d(4)
        self.bn_no_act = nn.BatchNorm2d(4)
        self.bn_iadd_target = nn.BatchNorm2d(4)
        self.bn_broadcast = nn.BatchNorm2d(4)
        self.bn_written = nn.BatchNorm2d(4)
        self.sync = nn.SyncBatchNorm(4)
        self.scale = nn.Parameter(torch.ones(4, 1, 1))
        self.unused = nn.BatchNorm2d(4)  # never called: its state must survive the GraphModule

    def forward(self, x):
        y = self.bn_two_users(x)
        a = F.relu(y) + y
        b = F.relu(self.bn_shared(x)) + F.relu(self.bn_shared(a))
        c = torch.sigmoid(self.bn_sigmoid(b))
        d = self.bn_no_act(c) + x
        e = x.clone()
        h = F.relu(e.add_(self.bn_iadd_target(d)))  # e is the residual and is written: not fused
        f = F.relu(self.bn_broadcast(e + h) + self.scale)  # a broadcast Parameter: not a residual
        g = self.bn_written(f)
        f.mul_(2)  # writes the BatchNorm's input before the activation would read it
        return F.relu(self.sync(F.relu(g)))


def test_not_fused():
    model = _NotFusable()
    fused = tritonbn.fuse_model(model)
    assert not _fused(fused)  # nothing matched; every BatchNorm converted instead
    assert type(fused) is _NotFusable and fused is not model
    assert all(type(m).__module__.startswith("tritonbn.") for m in _plain(fused))
    assert type(fused.sync) is tritonbn.SyncBatchNorm and type(fused.bn_shared) is tritonbn.BatchNorm2d
    assert all(type(m).__module__.startswith("torch.") for m in _plain(model))  # the caller's model is untouched
    assert fused.bn_shared.weight is model.bn_shared.weight
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    with triton_ran(), no_torch_batch_norm():
        out = fused(x)
    _close(out, model(x), "output")


def test_fused_graph_keeps_unused_state():
    class WithUnused(_NotFusable):
        def forward(self, x):
            return F.relu(self.bn_sigmoid(x)) * self.scale

    model = WithUnused()
    fused = tritonbn.fuse_model(model)
    assert isinstance(fused, fx.GraphModule) and len(_fused(fused)) == 1
    assert set(fused.state_dict()) == set(model.state_dict())
    fused.load_state_dict(model.state_dict(), strict=True)


def test_refusing_twice_changes_nothing():
    torch.manual_seed(0)
    fused = tritonbn.fuse_model(TinyResNet())
    assert tritonbn.fuse_model(fused) is fused


# ------------------------------------------------------------------------------------------
# numbers: eval, train, SGD steps
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_cls, shape", [(TinyResNet, IMAGE), (MLP, (8, 6)), (Functional, (2, 4, 5, 5))],
                         ids=["resnet", "mlp", "functional"])
def test_outputs_match_train_and_eval(model_cls, shape):
    models = _models(model_cls)
    fused = models[2]
    for training in (True, False):
        for model in models:
            model.train(training)
        assert all(m.training == training for m in _fused(fused))
        x = torch.randn(shape, device=DEVICE)
        inputs = [x.clone().requires_grad_(), x.double().requires_grad_(), x.clone().requires_grad_()]
        t32, t64 = models[0](inputs[0]), models[1](inputs[1])
        with triton_ran(len(_fused(fused))), no_torch_batch_norm():  # downsample BatchNorms converted too
            out = fused(inputs[2])
        _close(out, t32, f"output, training={training}")
        grad = torch.randn_like(t32)
        t32.backward(grad)
        t64.backward(grad.double())
        with triton_ran(), no_torch_batch_norm():
            out.backward(grad)
        _as_accurate(inputs[2].grad, inputs[0].grad, inputs[1].grad, f"x.grad, training={training}")
        grads = [{k: p.grad for k, p in m.named_parameters()} for m in models]
        for name in grads[0]:
            _as_accurate(grads[2][name], grads[0][name], grads[1][name], f"{name}.grad, training={training}")
        states = [m.state_dict() for m in models]
        for name in states[0]:  # running statistics and counts: one forward, so float32-close
            _close(states[2][name], states[0][name], f"{name}, training={training}")
        for model in models:
            model.zero_grad()


@pytest.mark.parametrize("model_cls, shape", [(TinyResNet, IMAGE), (MLP, (8, 6))], ids=["resnet", "mlp"])
def test_sgd_steps_match(model_cls, shape):
    models = _models(model_cls, seed=1)
    optimizers = [torch.optim.SGD(m.train().parameters(), lr=0.1, momentum=0.9) for m in models]
    generator = torch.Generator().manual_seed(2)
    for step in range(3):
        x = torch.randn(shape, generator=generator).to(DEVICE)
        target = torch.randint(0, 5, (shape[0],), generator=generator).to(DEVICE)
        losses = []
        for model, opt, dtype in zip(models, optimizers, (torch.float32, torch.float64, torch.float32)):
            opt.zero_grad()
            with triton_ran() if model is models[2] else contextlib.nullcontext():
                loss = F.cross_entropy(model(x.to(dtype)), target)
                loss.backward()
            opt.step()
            losses.append(loss.detach())
        _close(losses[2], losses[0], f"loss at step {step}")
        _as_accurate(losses[2], losses[0], losses[1], f"loss at step {step}")
    states = [m.state_dict() for m in models]
    for name in states[0]:  # parameters, running statistics, num_batches_tracked
        if states[0][name].is_floating_point():
            _as_accurate(states[2][name], states[0][name], states[1][name], f"{name} after 3 steps")
        else:
            assert torch.equal(states[2][name], states[0][name]), name


# ------------------------------------------------------------------------------------------
# untraceable models
# ------------------------------------------------------------------------------------------


def test_untraceable_model_fuses_its_children():
    torch.manual_seed(0)
    model = Gated().to(DEVICE)
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"cannot trace the model \(Gated\).*TraceError") as record:
        fused = tritonbn.fuse_model(model)
    assert record[0].filename == __file__  # points at the caller
    assert type(fused) is Gated and fused is not model
    assert isinstance(fused.body, fx.GraphModule) and len(_fused(fused)) == MLP.FUSED
    assert type(model.body) is MLP and not _fused(model)  # the caller's model is untouched
    assert fused.body.bn1.weight is model.body.bn1.weight

    x = torch.randn(8, 6, device=DEVICE)
    with triton_ran(MLP.FUSED):
        out = fused(x)
    _close(out, reference(x), "output")


def test_untraceable_submodule_warning_names_it():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU())
            self.gate = Gated()

        def forward(self, x):
            return self.gate(self.stem(x))

    model = Outer()
    # The whole model does not trace (its child does not); its own children are fused,
    # and the warning names each untraceable level.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fused = tritonbn.fuse_model(model)
    messages = [str(w.message) for w in record]
    assert any("the model (Outer)" in m for m in messages)
    assert any("submodule 'gate' (Gated)" in m for m in messages)
    assert all(w.filename == __file__ for w in record)
    assert len(_fused(fused)) == 1 + MLP.FUSED


# ------------------------------------------------------------------------------------------
# memory: what autograd saves
# ------------------------------------------------------------------------------------------


def _saved_storages(module, x):
    """Unique storages (data_ptr -> nbytes) autograd saves in module(x), parameters excluded."""
    params = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return saved


@pytest.mark.parametrize("downsample", [False, True], ids=["identity", "downsample"])
def test_fused_block_saves_no_more_than_torch(downsample):
    torch.manual_seed(0)
    inplanes = 8 if downsample else 16
    down = nn.Sequential(conv1x1(inplanes, 16), nn.BatchNorm2d(16)) if downsample else None
    block = Bottleneck(inplanes, 4, downsample=down).train().to(DEVICE)
    fused = tritonbn.fuse_model(copy.deepcopy(block))
    x = torch.randn(2, inplanes, 6, 6, device=DEVICE, requires_grad=True)
    torch_saved = _saved_storages(block, x)
    with triton_ran(3):
        fused_saved = _saved_storages(fused, x)
    big = lambda saved: {p: n for p, n in saved.items() if n >= 2 * 6 * 6 * 4}  # activations, not [C] stats
    # torch: x, bn1..3 inputs, relu1 and relu2 outputs (= conv2/conv3 inputs), relu3's output
    # (aliasing bn3's output), and with a downsample its BatchNorm's input.
    # fused: the same tensors: a fused relu keeps its output (the mask's sign), never the
    # residual, so the downsample branch's output is freed as in torch.
    assert len(big(torch_saved)) == 7 + downsample
    assert len(big(fused_saved)) == 7 + downsample
    assert len(big(fused_saved)) <= len(big(torch_saved))
    assert sum(big(fused_saved).values()) <= sum(big(torch_saved).values())
