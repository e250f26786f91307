"""convert_model's rules without timm or torchvision: what converts, what is left alone and said.

timm's ``BatchNormAct2d`` and torchvision's ``FrozenBatchNorm2d`` are recognised by the module
and name of their class; here they are stood in for by copies of their code whose class
``__module__`` is timm's / torchvision's (tests/test_model_zoo.py runs the real ones).

FrozenBatchNorm2d: through the interpreter (and for float32/float64), the output must be
bit-identical to torchvision's arithmetic, as must the input gradient; on CUDA a compiled kernel
may fuse the multiply-add (one rounding instead of two), so there the bound is 2 ulp of the
output. float16 rounds once in tritonbn and twice in torch: 1 ulp of float16 (2^-10 relative).
Everything else compares with the module being replaced within ``TOLERANCES[float32]``.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, TOLERANCES, no_torch_batch_norm, random_bn_input, randomize_batch_norm, triton_ran
from torch import nn

import tritonbn
from tritonbn.zoo import BatchNormDropAct2d, SyncBatchNormDropAct

ATOL, RTOL = TOLERANCES[torch.float32]
INTERPRETED = DEVICE == "cpu"


# ----------------------------------------------------------------------------------------------
# stand-ins, as timm and torchvision write them
# ----------------------------------------------------------------------------------------------


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d's forward (its constructor, simplified)."""

    def __init__(self, num_features, act=None, drop=None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.ReLU(inplace=True)

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, factor, self.eps)
        return self.act(self.drop(x))


BatchNormAct2d.__module__ = "timm.layers.norm_act"


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


FrozenBatchNorm2d.__module__ = "torchvision.ops.misc"


class NoOverride(nn.BatchNorm2d):
    def __init__(self, num_features):
        super().__init__(num_features, eps=1e-3)  # a different default is not a different computation
        self.tag = "mine"


class OwnForward(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


class DetectronFrozenBatchNorm(nn.Module):
    """A BatchNorm-like class tritonbn does not know (its arithmetic is its own)."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return x / self.running_var.view(1, -1, 1, 1).sqrt()


def _randomize_frozen(module):
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 2.0)
    return module


def _converted(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left alone here
        return tritonbn.convert_model(model)


# ----------------------------------------------------------------------------------------------
# timm's BatchNormAct2d
# ----------------------------------------------------------------------------------------------

# (act, drop, expected class, expected fused activation)
TIMM_CASES = [
    (nn.ReLU(inplace=True), None, tritonbn.BatchNormAct2d, "relu"),
    (nn.SiLU(inplace=True), None, tritonbn.BatchNormAct2d, "silu"),
    (nn.LeakyReLU(0.2), None, tritonbn.BatchNormAct2d, "leaky_relu"),
    (nn.Identity(), None, tritonbn.BatchNormAct2d, None),
    (nn.Hardswish(inplace=True), None, BatchNormDropAct2d, None),
    (nn.GELU(), None, BatchNormDropAct2d, None),
    (nn.ReLU(), nn.Dropout(0.0), BatchNormDropAct2d, None),
]


@pytest.mark.parametrize("act,drop,cls,activation", TIMM_CASES,
                         ids=["relu", "silu", "leaky0.2", "identity", "hardswish", "gelu", "dropout"])
def test_timm_batch_norm_act(act, drop, cls, activation):
    torch.manual_seed(0)
    timm_bn = randomize_batch_norm(BatchNormAct2d(4, act=act, drop=drop)).to(DEVICE)
    reference = copy.deepcopy(timm_bn)
    model = nn.Sequential(timm_bn)
    ours = _converted(model)[0]
    assert type(ours) is cls
    if cls is tritonbn.BatchNormAct2d:
        assert ours.activation == activation and ours.negative_slope == getattr(act, "negative_slope", 0.01)
    else:
        assert ours.act is timm_bn.act and ours.drop is timm_bn.drop  # timm's own modules, in-place flags and all
    assert ours.weight is timm_bn.weight and ours.running_var is timm_bn.running_var
    assert list(ours.state_dict()) == list(reference.state_dict())
    for training in (True, False):
        ours.train(training)
        reference.train(training)
        x = random_bn_input((2, 4, 3, 3))
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        with triton_ran(), no_torch_batch_norm():
            out = ours(xs[0])
        expected = reference(xs[1])
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
        dy = torch.randn_like(out)
        with triton_ran(), no_torch_batch_norm():
            out.backward(dy)
        expected.backward(dy)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=4e-5, rtol=4e-5)
        torch.testing.assert_close(ours.running_mean, reference.running_mean, atol=ATOL, rtol=RTOL)
        assert torch.equal(ours.num_batches_tracked, reference.num_batches_tracked)


def test_timm_batch_norm_act_with_sync_keeps_its_activation():
    torch.manual_seed(0)
    model = nn.Sequential(randomize_batch_norm(BatchNormAct2d(4, act=nn.SiLU())), tritonbn.BatchNormAct2d(4))
    model = model.to(DEVICE)
    reference = copy.deepcopy(model)
    converted = tritonbn.convert_model(model, sync=True)
    assert [type(m) for m in converted] == [SyncBatchNormDropAct, SyncBatchNormDropAct]
    assert type(converted[0].act) is nn.SiLU and type(converted[1].act) is nn.ReLU
    x = random_bn_input((2, 4, 3, 3))
    with triton_ran(2), no_torch_batch_norm():  # no process group: the plain kernels
        out = converted(x)
    torch.testing.assert_close(out, reference(x), atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------------
# frozen BatchNorm
# ----------------------------------------------------------------------------------------------


def _assert_frozen_output(out, expected):
    assert out.dtype == expected.dtype and out.shape == expected.shape
    if INTERPRETED and out.dtype in (torch.float32, torch.float64):
        assert torch.equal(out, expected), (out - expected).abs().max()
    else:
        ulp = torch.finfo(out.dtype).eps * expected.abs().clamp(min=torch.finfo(out.dtype).tiny)
        assert ((out.double() - expected.double()).abs() <= 2 * ulp.double()).all()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_frozen_batch_norm_is_torchvisions_arithmetic(dtype, memory_format):
    torch.manual_seed(0)
    frozen = _randomize_frozen(FrozenBatchNorm2d(5)).to(DEVICE)
    if dtype == torch.float64:
        frozen.double()
    ours = _converted(nn.Sequential(copy.deepcopy(frozen)))[0]
    assert type(ours) is tritonbn.FrozenBatchNorm2d
    assert list(ours.state_dict()) == list(frozen.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert repr(ours) == "FrozenBatchNorm2d(5, eps=1e-05)"
    x = random_bn_input((3, 5, 4, 6), dtype=dtype, memory_format=memory_format)
    for training in (True, False):  # frozen: the same in both modes
        ours.train(training)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        with triton_ran():
            out = ours(xs[0])
        expected = frozen(xs[1])  # half x and float32 buffers: a float32 result, as in torch
        _assert_frozen_output(out, expected)
        assert out.is_contiguous(memory_format=memory_format)
        dy = torch.randn_like(expected)
        out.backward(dy)
        expected.backward(dy)
        assert torch.equal(xs[0].grad, xs[1].grad)  # the same torch operation in both


def test_frozen_batch_norm_loads_a_batch_norm_checkpoint_and_matches_eval():
    bn = randomize_batch_norm(nn.BatchNorm2d(4)).to(DEVICE).eval()
    ours = tritonbn.FrozenBatchNorm2d(4).to(DEVICE)
    ours.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped, as torchvision does
    x = random_bn_input((2, 4, 3, 3))
    with triton_ran():
        torch.testing.assert_close(ours(x), bn(x), atol=ATOL, rtol=RTOL)


def test_frozen_batch_norm_with_buffers_that_require_grad():
    frozen = _randomize_frozen(tritonbn.FrozenBatchNorm2d(3)).to(DEVICE)
    reference = _randomize_frozen(FrozenBatchNorm2d(3)).to(DEVICE)
    reference.load_state_dict(frozen.state_dict())
    for module in (frozen, reference):
        module.weight.requires_grad_(True)
        module.bias.requires_grad_(True)
    x = random_bn_input((2, 3, 4, 4))
    dy = torch.randn(2, 3, 4, 4, device=DEVICE)
    with triton_ran():
        frozen(x).backward(dy)
    reference(x).backward(dy)
    for name in ("weight", "bias"):
        got, want = getattr(frozen, name).grad, getattr(reference, name).grad
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# plain subclasses, SyncBatchNorm, lazy modules, what is left alone
# ----------------------------------------------------------------------------------------------


def test_subclass_that_overrides_nothing_is_converted():
    module = randomize_batch_norm(NoOverride(4)).to(DEVICE)
    reference = copy.deepcopy(module)
    new = _converted(module)
    assert type(new) is tritonbn.BatchNorm2d and new.eps == 1e-3 and new.tag == "mine"
    x = random_bn_input((2, 4, 3, 3))
    with triton_ran(), no_torch_batch_norm():
        out = new(x)
    torch.testing.assert_close(out, reference(x), atol=ATOL, rtol=RTOL)


def test_sync_batch_norm_outside_a_process_group_is_converted():
    group = object()  # a stand-in: carried over, and unused while torch.distributed is not initialised
    model = nn.Sequential(nn.SyncBatchNorm(4, process_group=group)).to(DEVICE)
    randomize_batch_norm(model[0])
    reference = copy.deepcopy(model)
    converted = _converted(model)
    assert type(converted[0]) is tritonbn.SyncBatchNorm and converted[0].process_group is group
    x = random_bn_input((2, 4, 3, 3))
    with triton_ran(), no_torch_batch_norm():
        out = converted(x)
    torch.testing.assert_close(out, reference(x), atol=ATOL, rtol=RTOL)


def test_lazy_batch_norm_raises_before_anything_changes_then_converts_once_materialised():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d()).to(DEVICE)
    with pytest.raises(ValueError, match=r"lazy norm layer '2' not materialised yet.*forward pass first"):
        tritonbn.convert_model(model)
    assert type(model[0]) is nn.BatchNorm2d  # nothing converted
    assert [entry.reason for entry in tritonbn.unconverted_batch_norms(model)] == ["lazy, not materialised yet"]
    x = random_bn_input((2, 3, 4, 4))
    model.eval()
    with torch.no_grad():
        model(x)  # materialises: the module is a BatchNorm2d from now on
    model.train()
    reference = copy.deepcopy(model)
    converted = _converted(model)
    assert type(converted[2]) is tritonbn.BatchNorm2d and converted[2].num_features == 4
    with triton_ran(2), no_torch_batch_norm():
        out = converted(x)
    torch.testing.assert_close(out, reference(x), atol=ATOL, rtol=RTOL)


def test_what_is_left_alone_is_said():
    model = nn.Sequential(OwnForward(4), nn.BatchNorm2d(4), nn.Sequential(OwnForward(4), DetectronFrozenBatchNorm(4)))
    with pytest.warns(UserWarning) as record:
        converted = tritonbn.convert_model(model)
    assert len(record) == 1 and record[0].filename == __file__
    message = str(record[0].message)
    assert "3 norm layer(s) left on their own code" in message
    assert "2 x OwnForward (overrides forward)" in message
    assert "1 x DetectronFrozenBatchNorm (not a torch BatchNorm subclass" in message
    assert "'0', '2.0', '2.1'" in message
    assert type(converted[1]) is tritonbn.BatchNorm2d and type(converted[0]) is OwnForward
    assert [(e.name, e.cls) for e in tritonbn.unconverted_batch_norms(converted)] == [
        ("0", "OwnForward"), ("2.0", "OwnForward"), ("2.1", "DetectronFrozenBatchNorm")]


def test_shared_module_hooks_and_attributes_survive():
    bn = nn.BatchNorm2d(4).to(DEVICE)
    bn.qconfig = "kept"
    seen = []
    handle = bn.register_forward_hook(lambda module, args, out: seen.append(type(module)))
    model = nn.Sequential(bn, nn.ReLU(), bn)  # the same module at two places
    converted = _converted(model)
    assert converted[0] is converted[2] and type(converted[0]) is tritonbn.BatchNorm2d
    assert converted[0].qconfig == "kept"
    with triton_ran(2):
        converted(random_bn_input((2, 4, 3, 3)))
    assert seen == [tritonbn.BatchNorm2d] * 2
    handle.remove()  # the handle made on the torch module removes the hook from the converted one
    converted(random_bn_input((2, 4, 3, 3)))
    assert len(seen) == 2


def test_fuse_model_fuses_timm_modules_and_converts_frozen_ones():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), randomize_batch_norm(BatchNormAct2d(4, act=nn.SiLU())),
        nn.Conv2d(4, 4, 1), _randomize_frozen(FrozenBatchNorm2d(4)), nn.ReLU(),
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Identity(), nn.ReLU(),  # looked through
    ).to(DEVICE)
    fused = tritonbn.fuse_model(model)
    kinds = {name: type(m) for name, m in fused.named_modules() if name in ("1", "3", "6")}
    assert kinds == {"1": tritonbn.BatchNormAct2d, "3": tritonbn.FrozenBatchNorm2d, "6": tritonbn.BatchNormAct2d}
    assert fused.get_submodule("1").activation == "silu"
    assert type(model[1]) is BatchNormAct2d and type(model[3]) is FrozenBatchNorm2d  # the caller's model
    x = random_bn_input((2, 3, 4, 4))
    with triton_ran(3), no_torch_batch_norm():
        out = fused(x)
    torch.testing.assert_close(out, model(x), atol=ATOL, rtol=RTOL)


def test_the_guard_catches_torch_batch_norm_forward_and_backward():
    """no_torch_batch_norm can fail: torch's module, functional and aten entry points all trip it."""
    bn = nn.BatchNorm2d(3).to(DEVICE)
    x = random_bn_input((2, 3, 4, 4)).requires_grad_()
    for call in (lambda: bn(x), lambda: torch.batch_norm(x, None, None, None, None, True, 0.1, 1e-5, False),
                 lambda: torch.ops.aten.native_batch_norm(x, None, None, None, None, True, 0.1, 1e-5)):
        with pytest.raises(AssertionError, match="torch's own batch norm ran"), no_torch_batch_norm():
            call()
    y = bn(x)  # outside: fine; its backward inside is torch's batch norm backward
    with pytest.raises(AssertionError, match="torch's own batch norm ran"), no_torch_batch_norm():
        y.sum().backward()
    assert F.batch_norm is not None and torch.batch_norm.__name__ != "refuse"  # restored afterwards
