"""convert_model and fuse_model on group and instance norms: a small UNet-style model.

The model is written here the way diffusers writes its ResNet blocks (GroupNorm -> SiLU as a
module in one place, ``F.silu(norm(h))`` in another, the residual added after the second
convolution), plus an InstanceNorm2d branch (style transfer) and a GroupNorm -> add -> ReLU
tail. After conversion every norm layer must be tritonbn's, the state_dict keys and tensors
the same objects, and a training step (outputs, every gradient, running statistics) must match
torch's model within float64 tolerance. timm's group norms are recognised by module and name:
stand-in classes defined under a ``timm.layers`` module name check that without timm.
"""

from __future__ import annotations

import copy
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, triton_ran
from torch import nn

import tritonbn
from tritonbn.zoo import GroupNormDropAct

DTYPE = torch.float64  # references in float64: the comparison tests conversion, not rounding
ATOL = RTOL = 1e-9


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D, reduced: norm -> SiLU -> conv, twice, plus the skip path."""

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nonlinearity = nn.SiLU()
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.nonlinearity(self.norm1(x))
        h = self.conv1(h)
        h = F.silu(self.norm2(h))  # the functional form, as in many UNets
        h = self.conv2(h)
        return self.skip(x) + h


class TinyUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.down = ResnetBlock(8, 12, groups=4)
        self.downsample = nn.Conv2d(12, 12, 3, stride=2, padding=1)
        self.mid = ResnetBlock(12, 12, groups=3)  # 4 channels per group
        self.style = nn.InstanceNorm2d(12, affine=True, track_running_stats=True)
        self.up = nn.Upsample(scale_factor=2)
        self.norm_out = nn.GroupNorm(12, 12)  # one channel per group
        self.conv_out = nn.Conv2d(12, 3, 3, padding=1)
        self.tail_norm = nn.GroupNorm(1, 3, bias=False) if _GROUP_NORM_HAS_BIAS else nn.GroupNorm(1, 3)

    def forward(self, x):
        h = self.down(self.conv_in(x))
        h = self.mid(self.downsample(h))
        h = self.style(h)
        h = F.silu(self.norm_out(self.up(h)))
        out = self.conv_out(h)
        return F.relu(self.tail_norm(out) + x)  # GroupNorm -> add -> ReLU


_GROUP_NORM_HAS_BIAS = "bias" in torch.nn.GroupNorm.__init__.__code__.co_varnames


def _model() -> TinyUNet:
    torch.manual_seed(0)
    model = TinyUNet().to(device=DEVICE, dtype=DTYPE)
    with torch.no_grad():  # parameters and running statistics away from their defaults
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if "norm" in name or "style" in name:
                if name.endswith("running_var"):
                    tensor.uniform_(0.5, 1.5)
                elif tensor.is_floating_point():
                    tensor.add_(torch.randn_like(tensor) * 0.3)
    return model


def _norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm))]


def _step(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    x = x.detach().clone().requires_grad_()
    y = model(x)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(y, (x, *params.values()), dy)
    out = {"y": y.detach(), "dx": grads[0]}
    out.update({f"d{name}": g for name, g in zip(params, grads[1:])})
    out.update({name: b.detach().clone() for name, b in model.named_buffers()})
    model.eval()
    with torch.no_grad():
        out["eval_y"] = model(x)
    return out


def _assert_same_step(ours: dict, ref: dict) -> None:
    assert ours.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")


def _inputs():
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(2, 3, 8, 8, device=DEVICE, dtype=DTYPE, generator=gen)
    return x, torch.randn(2, 3, 8, 8, device=DEVICE, dtype=DTYPE, generator=gen)


def test_convert_model_reaches_every_group_and_instance_norm():
    ref_model, model = _model(), _model()
    keys = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left behind, so no warning
        converted = tritonbn.convert_model(model)
    norms = _norm_layers(converted)
    assert len(norms) == 7
    assert all(type(m).__module__.startswith("tritonbn") for m in norms), [type(m) for m in norms]
    assert isinstance(converted.style, tritonbn.InstanceNorm2d)
    assert tritonbn.unconverted_batch_norms(converted) == []
    after = converted.state_dict(keep_vars=True)
    assert list(after) == list(keys) and all(after[k] is keys[k] for k in keys)  # the same objects
    x, dy = _inputs()
    with triton_ran(7):
        ours = _step(converted, x, dy)
    _assert_same_step(ours, _step(ref_model, x, dy))


def test_fuse_model_fuses_group_norm_then_activation():
    ref_model, model = _model(), _model()
    fused = tritonbn.fuse_model(model)
    acts = {name: m for name, m in fused.named_modules() if isinstance(m, tritonbn.GroupNormAct)}
    # norm1 (module SiLU), norm2 (F.silu) of both blocks, norm_out (F.silu), tail_norm (add + relu).
    assert sorted(acts) == ["down.norm1", "down.norm2", "mid.norm1", "mid.norm2", "norm_out", "tail_norm"]
    assert {m.activation for m in acts.values()} == {"silu", "relu"}
    assert acts["tail_norm"].activation == "relu"
    norms = _norm_layers(fused)
    assert all(type(m).__module__.startswith("tritonbn") for m in norms)  # the InstanceNorm converted too
    assert fused.state_dict().keys() == ref_model.state_dict().keys()
    # fuse_model leaves its input as it was.
    assert type(model.down.norm1) is nn.GroupNorm and type(model.style) is nn.InstanceNorm2d
    x, dy = _inputs()
    with triton_ran(7):
        ours = _step(fused, x, dy)
    _assert_same_step(ours, _step(ref_model, x, dy))


class _OverridingGroupNorm(nn.GroupNorm):
    def forward(self, x):
        return super().forward(x) * 2


class GroupNormLike(nn.Module):  # a name tritonbn must not take for torch's
    def forward(self, x):
        return x


def test_what_is_left_alone_is_named():
    model = nn.Sequential(_OverridingGroupNorm(2, 4), GroupNormLike(), nn.GroupNorm(2, 4))
    with pytest.warns(UserWarning, match=r"2 norm layer\(s\) left.*_OverridingGroupNorm \(overrides forward\)"):
        tritonbn.convert_model(model)
    assert type(model[0]) is _OverridingGroupNorm and type(model[1]) is GroupNormLike
    assert isinstance(model[2], tritonbn.GroupNorm)
    left = {entry.cls: entry.reason for entry in tritonbn.unconverted_batch_norms(model)}
    assert left.keys() == {"_OverridingGroupNorm", "GroupNormLike"}


def test_lazy_instance_norm_must_run_first():
    model = nn.Sequential(nn.LazyInstanceNorm2d())
    with pytest.raises(ValueError, match="lazy norm layer '0' not materialised yet"):
        tritonbn.convert_model(model)
    model(torch.randn(2, 3, 4, 4, device=DEVICE))
    tritonbn.convert_model(model)
    assert isinstance(model[0], tritonbn.InstanceNorm2d)


@pytest.fixture
def fake_timm(monkeypatch):
    """Classes named and placed as timm's (timm.layers.norm / norm_act), without timm."""
    norm = types.ModuleType("timm.layers.norm")
    norm_act = types.ModuleType("timm.layers.norm_act")

    class GroupNorm(nn.GroupNorm):
        def __init__(self, num_channels, num_groups=32, eps=1e-5, affine=True):
            super().__init__(num_groups, num_channels, eps=eps, affine=affine)

        def forward(self, x):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    class GroupNormAct(nn.GroupNorm):
        def __init__(self, num_channels, num_groups=32, act=None, drop=None):
            super().__init__(num_groups, num_channels)
            self.drop = drop or nn.Identity()
            self.act = act or nn.ReLU(inplace=True)

        def forward(self, x):
            return self.act(self.drop(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)))

    for cls, module in ((GroupNorm, norm), (GroupNormAct, norm_act)):
        cls.__module__ = module.__name__
        cls.__qualname__ = cls.__name__
        setattr(module, cls.__name__, cls)
    for module in (norm, norm_act):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return types.SimpleNamespace(GroupNorm=GroupNorm, GroupNormAct=GroupNormAct)


def test_timm_group_norms(fake_timm):
    model = nn.Sequential(fake_timm.GroupNorm(8, num_groups=4), fake_timm.GroupNormAct(8, num_groups=2),
                          fake_timm.GroupNormAct(8, num_groups=8, act=nn.GELU()),
                          fake_timm.GroupNormAct(8, num_groups=1, act=nn.SiLU()))
    model = model.to(device=DEVICE, dtype=DTYPE)
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tritonbn.convert_model(model)
    assert type(model[0]) is tritonbn.GroupNorm
    assert type(model[1]) is tritonbn.GroupNormAct and model[1].activation == "relu"
    assert type(model[2]) is GroupNormDropAct and isinstance(model[2].act, nn.GELU)
    assert type(model[3]) is tritonbn.GroupNormAct and model[3].activation == "silu"
    x = torch.randn(2, 8, 5, 5, device=DEVICE, dtype=DTYPE)
    with triton_ran(4):
        y = model(x)
    torch.testing.assert_close(y, ref(x), atol=ATOL, rtol=RTOL)


class _TimeEmbeddingBlock(nn.Module):
    """A norm followed by a broadcast add of a per-sample embedding, then the activation
    (diffusers' scale-shift blocks, FiLM): fuse_model fuses the add, which must then run as
    torch's broadcasting add."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)
        self.bn = nn.BatchNorm2d(4)
        self.proj = nn.Linear(3, 4)

    def forward(self, x, emb):
        shift = self.proj(emb)[:, :, None, None]
        h = F.silu(self.norm(x) + shift)
        return F.relu(self.bn(h) + shift)


def test_fused_broadcast_add_runs_as_torch_does():
    torch.manual_seed(3)
    ref = _TimeEmbeddingBlock().to(device=DEVICE, dtype=DTYPE)
    fused = tritonbn.fuse_model(copy.deepcopy(ref))
    assert isinstance(fused.norm, tritonbn.GroupNormAct) and isinstance(fused.bn, tritonbn.BatchNormAct2d)
    x = torch.randn(2, 4, 3, 3, device=DEVICE, dtype=DTYPE, requires_grad=True)
    emb = torch.randn(2, 3, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn(2, 4, 3, 3, device=DEVICE, dtype=DTYPE)
    outs = []
    for model in (fused, ref):
        params = dict(sorted(model.named_parameters()))  # fuse_model may reorder them
        y = model(x, emb)
        outs.append((y, *torch.autograd.grad(y, (x, emb, *params.values()), dy)))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(fused.bn.running_mean, ref.bn.running_mean, atol=ATOL, rtol=RTOL)
