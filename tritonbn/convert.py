"""convert_model: swap every BatchNorm a model holds for tritonbn's, in place.

What converts to what (exact classes; "plain subclass" = a subclass of one of torch's classes
that defines no method but ``__init__``, so it computes exactly what its base computes):

==========================================================  =========================================
torch ``BatchNorm1d/2d/3d`` and plain subclasses;            ``tritonbn.BatchNorm1d/2d/3d``
``LazyBatchNorm*d`` once materialised (it is then one)
torch ``SyncBatchNorm`` and plain subclasses                 ``tritonbn.SyncBatchNorm`` (same group)
timm ``BatchNormAct2d``, act ReLU/SiLU/LeakyReLU/Identity,   ``tritonbn.BatchNormAct2d`` (fused)
drop Identity
timm ``BatchNormAct2d``, any other act or drop               ``tritonbn.zoo.BatchNormDropAct2d``
timm ``SyncBatchNormAct``                                    ``tritonbn.zoo.SyncBatchNormDropAct``
torchvision ``FrozenBatchNorm2d``, timm ``FrozenBatchNormAct2d``  ``tritonbn.FrozenBatchNorm2d``
torch ``GroupNorm`` and plain subclasses; timm ``GroupNorm``,  ``tritonbn.GroupNorm``
``GroupNorm1``
timm ``GroupNormAct`` / ``GroupNorm1Act``, act ReLU/SiLU/      ``tritonbn.GroupNormAct`` (fused)
LeakyReLU/Identity, drop Identity
timm ``GroupNormAct`` / ``GroupNorm1Act``, any other act       ``tritonbn.zoo.GroupNormDropAct``
torch ``InstanceNorm1d/2d/3d`` and plain subclasses;         ``tritonbn.InstanceNorm1d/2d/3d``
``LazyInstanceNorm*d`` once materialised
==========================================================  =========================================

Left alone, and named in a warning: subclasses of torch's BatchNorm, GroupNorm or
InstanceNorm that override a method (their forward may compute anything: timm's
``SplitBatchNorm2d``), and norm classes tritonbn does not know (a class named
``*BatchNorm*``, ``*GroupNorm*`` or ``*InstanceNorm*`` that is not torch's, e.g. detectron2's
FrozenBatchNorm2d, whose arithmetic differs from torchvision's). An unmaterialised
``LazyBatchNorm*d`` / ``LazyInstanceNorm*d`` raises before anything is converted.
"""

from __future__ import annotations

import collections
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.lazy import LazyModuleMixin

from ._compat import bias_kwargs
from ._state import move_state
from .group_norm import GroupNorm, GroupNormAct, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct2d, _BatchNormActMixin, _TritonBatchNormMixin
from .sync import SyncBatchNorm
from .zoo import (
    BatchNormDropAct2d,
    FrozenBatchNorm2d,
    GroupNormDropAct,
    SyncBatchNormDropAct,
    is_frozen_batch_norm,
    is_timm_batch_norm_act,
    is_timm_group_norm,
    is_timm_group_norm_act,
    is_timm_sync_batch_norm_act,
)

__all__ = ["LeftAlone", "convert_model", "move_state", "unconverted_batch_norms"]

_PLAIN = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
_TORCH_BASES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCE = {nn.InstanceNorm1d: InstanceNorm1d, nn.InstanceNorm2d: InstanceNorm2d, nn.InstanceNorm3d: InstanceNorm3d}
# tritonbn's own group and instance norms: already converted.
_TRITON_GROUP_NORMS = (GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d)

# timm activation modules the fused kernel applies: exact torch classes -> kernel activation.
_FUSABLE_ACTS = {nn.ReLU: "relu", nn.SiLU: "silu", nn.LeakyReLU: "leaky_relu", nn.Identity: None}

# Class attributes that are not behaviour.
_NOT_OVERRIDES = {"__init__", "__module__", "__qualname__", "__doc__", "__annotations__", "__dict__", "__weakref__",
                  "__firstlineno__", "__static_attributes__", "__orig_bases__", "__parameters__"}


@dataclass(frozen=True)
class LeftAlone:
    """A BatchNorm that :func:`convert_model` leaves on its own (torch's) code, and why."""

    name: str  #: qualified name in the model ("" for the model itself)
    cls: str  #: class name
    reason: str


def _torch_base(cls: type) -> type | None:
    return next((base for base in cls.__mro__ if base in _TORCH_BASES), None)


def _overridden(cls: type, base: type) -> list[str]:
    """Methods (or properties) that ``cls`` or a class before ``base`` in its MRO defines."""
    names = []
    for klass in cls.__mro__:
        if klass is base:
            break
        for name, value in vars(klass).items():
            if name in _NOT_OVERRIDES or name in names:
                continue
            if callable(value) or isinstance(value, (property, classmethod, staticmethod)):
                names.append(name)
    return names


def _fusable_activation(module: nn.Module) -> tuple[str | None, float] | None:
    """(activation, slope) of timm's BatchNormAct2d or GroupNormAct when the fused kernel can
    apply its drop + act."""
    if type(module.drop) is not nn.Identity or type(module.act) not in _FUSABLE_ACTS:
        return None
    act = module.act
    if act._forward_hooks or act._forward_pre_hooks or module.drop._forward_hooks or module.drop._forward_pre_hooks:
        return None  # a hook on the activation must still see it run
    return _FUSABLE_ACTS[type(act)], float(getattr(act, "negative_slope", 0.01))


def _activation_module(activation: str | None, slope: float) -> nn.Module:
    """The torch module of a BatchNormAct's activation (its synchronised form applies it apart)."""
    if activation == "relu":
        return nn.ReLU()
    if activation == "silu":
        return nn.SiLU()
    if activation == "leaky_relu":
        return nn.LeakyReLU(slope)
    return nn.Identity()


def _decide(module: nn.Module, sync: bool) -> str | None:
    """"convert", "lazy", a reason for leaving ``module`` alone, or None (not a BatchNorm, or done)."""
    if isinstance(module, (FrozenBatchNorm2d, SyncBatchNorm)):
        return None
    if isinstance(module, _TritonBatchNormMixin):
        return "convert" if sync else None
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy"
    group_norm = _decide_group_norm(module)
    if group_norm != "not one":
        return group_norm
    if is_timm_batch_norm_act(module) or is_timm_sync_batch_norm_act(module) or is_frozen_batch_norm(module):
        return "convert"
    if isinstance(module, _BatchNorm):
        base = _torch_base(type(module))
        if base is None:
            return "a torch _BatchNorm not derived from BatchNorm1d/2d/3d or SyncBatchNorm"
        overrides = _overridden(type(module), base)
        if overrides:
            return f"overrides {', '.join(overrides)}"
        return "convert"
    if "BatchNorm" in type(module).__name__:
        return "not a torch BatchNorm subclass, and tritonbn does not know its arithmetic"
    return None


def _decide_group_norm(module: nn.Module) -> str | None:
    """_decide for group and instance norms; "not one" for any other module."""
    if isinstance(module, _TRITON_GROUP_NORMS):
        return None
    if is_timm_group_norm(module) or is_timm_group_norm_act(module):
        return "convert"
    if isinstance(module, nn.GroupNorm):
        overrides = _overridden(type(module), nn.GroupNorm)
        return f"overrides {', '.join(overrides)}" if overrides else "convert"
    if isinstance(module, _InstanceNorm):
        base = next((b for b in type(module).__mro__ if b in _INSTANCE), None)
        if base is None:
            return "a torch _InstanceNorm not derived from InstanceNorm1d/2d/3d"
        overrides = _overridden(type(module), base)
        return f"overrides {', '.join(overrides)}" if overrides else "convert"
    name = type(module).__name__
    if "GroupNorm" in name or "InstanceNorm" in name:
        return "not a torch GroupNorm/InstanceNorm subclass, and tritonbn does not know its arithmetic"
    return "not one"


def _group_norm_replacement(module: nn.Module) -> nn.Module:
    """tritonbn's module for a group or instance norm ``_decide_group_norm`` converts."""
    if isinstance(module, _InstanceNorm):
        base = next(b for b in type(module).__mro__ if b in _INSTANCE)
        new = _INSTANCE[base](module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, device="meta")
        return move_state(module, new)
    args = (module.num_groups, module.num_channels, module.eps, module.affine)
    if is_timm_group_norm_act(module):
        fused = _fusable_activation(module)
        if fused is not None:
            new = GroupNormAct(*args, device="meta", activation=fused[0], negative_slope=fused[1])
        else:
            new = GroupNormDropAct(*args, device="meta", drop=module.drop, act=module.act)
    else:
        new = GroupNorm(*args, device="meta")
    return move_state(module, new)  # a bias=False module's None bias comes along


def _drop_act(module: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The (drop, act) modules ``module`` applies after its batch norm, if any."""
    if isinstance(module, _BatchNormActMixin):
        return nn.Identity(), _activation_module(module.activation, module.negative_slope)
    if hasattr(module, "act") and (is_timm_batch_norm_act(module) or is_timm_sync_batch_norm_act(module)
                                   or isinstance(module, (BatchNormDropAct2d, SyncBatchNormDropAct))):
        return getattr(module, "drop", nn.Identity()), module.act
    return None


def _replacement(module: nn.Module, sync: bool, process_group) -> nn.Module:
    if isinstance(module, (nn.GroupNorm, _InstanceNorm)):
        return _group_norm_replacement(module)
    if is_frozen_batch_norm(module):
        drop, act = getattr(module, "drop", None), getattr(module, "act", None)
        new = FrozenBatchNorm2d(module.weight.shape[0], module.eps, drop=drop, act=act, device="meta")
        return move_state(module, new)
    args = (module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
    bias = bias_kwargs(not module.affine or module.bias is not None)
    drop_act = _drop_act(module)
    if sync or isinstance(module, nn.SyncBatchNorm):
        group = process_group if sync else module.process_group
        if drop_act is None:
            new = SyncBatchNorm(*args, group, device="meta", **bias)
        else:
            new = SyncBatchNormDropAct(*args, group, device="meta", drop=drop_act[0], act=drop_act[1], **bias)
    elif is_timm_batch_norm_act(module):
        fused = _fusable_activation(module)
        if fused is not None:
            new = BatchNormAct2d(*args, device="meta", activation=fused[0], negative_slope=fused[1], **bias)
        else:
            new = BatchNormDropAct2d(*args, device="meta", drop=module.drop, act=module.act, **bias)
    else:
        new = _PLAIN[_torch_base(type(module))](*args, device="meta", **bias)
    return move_state(module, new)


def _scan(module: nn.Module, sync: bool) -> tuple[list[str], list[LeftAlone]]:
    """(names of unmaterialised lazy BatchNorms, what is left alone), without changing anything."""
    lazy, left = [], []
    for name, child in module.named_modules():
        decision = _decide(child, sync)
        if decision == "lazy":
            lazy.append(name)
        elif decision not in (None, "convert"):
            left.append(LeftAlone(name, type(child).__name__, decision))
    return lazy, left


def unconverted_batch_norms(module: nn.Module, sync: bool = False) -> list[LeftAlone]:
    """The BatchNorms of ``module`` that :func:`convert_model` leaves on their own code, and why.

    After ``convert_model(model)`` these are the only BatchNorm-like layers that do not run
    tritonbn's kernels. An unmaterialised ``LazyBatchNorm*d`` is listed too (convert_model
    raises for it).

    Example::

        >>> model = tritonbn.convert_model(timm.create_model("efficientnet_b0"))
        >>> tritonbn.unconverted_batch_norms(model)
        []
    """
    lazy, left = _scan(module, sync)
    lazy_entries = [LeftAlone(name, type(module.get_submodule(name)).__name__, "lazy, not materialised yet")
                    for name in lazy]
    return lazy_entries + left


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object of the same class and state, with its own registries of children."""
    new = type(module).__new__(type(module))
    new.__dict__.update(module.__dict__)
    new._modules = dict(module._modules)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    return new


def convert_tree(module: nn.Module, sync: bool = False, process_group=None, protected: frozenset[int] = frozenset(),
                 caller: str = "convert_model", stacklevel: int = 3) -> nn.Module:
    """convert_model's walk; modules whose id is in ``protected`` are copied, never changed.

    fuse_model passes its input's modules as ``protected``: its result shares them with the
    caller's model, which must keep running unchanged.
    """
    lazy, left = _scan(module, sync)
    if lazy:
        names = ", ".join(repr(name) for name in lazy)
        raise ValueError(
            f"tritonbn.{caller}: lazy norm layer {names} not materialised yet (the number of features is unknown "
            "until a first forward). Run one forward pass first (in eval mode, so no statistics change), then convert."
        )
    memo: dict[int, nn.Module] = {}

    def walk(current: nn.Module) -> nn.Module:
        if id(current) in memo:  # a module held twice stays one module
            return memo[id(current)]
        if _decide(current, sync) == "convert":
            memo[id(current)] = _replacement(current, sync, process_group)
            return memo[id(current)]
        changed = {}
        for name, child in current._modules.items():
            if child is not None:
                new_child = walk(child)
                if new_child is not child:
                    changed[name] = new_child
        result = current
        if changed:
            result = _shallow_copy(current) if id(current) in protected else current
            result._modules.update(changed)
        memo[id(current)] = result
        return result

    result = walk(module)
    if left:
        counts = collections.Counter((entry.cls, entry.reason) for entry in left)
        listing = "; ".join(f"{n} x {cls} ({reason})" for (cls, reason), n in sorted(counts.items()))
        names = ", ".join(repr(entry.name) for entry in left[:5]) + (", ..." if len(left) > 5 else "")
        warnings.warn(
            f"tritonbn.{caller}: {len(left)} norm layer(s) left on their own code, not tritonbn's: {listing}. "
            f"Where: {names}. See tritonbn.unconverted_batch_norms().",
            UserWarning, stacklevel=stacklevel,
        )
    return result


def convert_model(module: torch.nn.Module, sync: bool = False, process_group=None) -> torch.nn.Module:
    """Replace every BatchNorm, GroupNorm and InstanceNorm in ``module`` by tritonbn's, in place.

    Converted (see this module's docstring for the full table): torch's ``BatchNorm1d/2d/3d``
    and ``SyncBatchNorm`` and their subclasses that override no method; materialised
    ``LazyBatchNorm*d``; timm's ``BatchNormAct2d`` (to the fused
    :class:`tritonbn.BatchNormAct2d` when its activation is ReLU, SiLU, LeakyReLU or
    Identity and its drop is Identity, else to tritonbn's BatchNorm followed by timm's own
    drop and act) and ``SyncBatchNormAct``; torchvision's ``FrozenBatchNorm2d`` and timm's
    ``FrozenBatchNormAct2d`` (to :class:`tritonbn.FrozenBatchNorm2d`); torch's ``GroupNorm``
    and ``InstanceNorm1d/2d/3d`` and their plain subclasses, timm's ``GroupNorm(1)`` and
    ``GroupNorm(1)Act`` (to :class:`tritonbn.GroupNorm`, :class:`tritonbn.GroupNormAct`,
    :class:`tritonbn.InstanceNorm2d` etc.). With ``sync=True``,
    every BatchNorm (torch's or tritonbn's, frozen ones excepted) becomes a
    :class:`tritonbn.SyncBatchNorm` over ``process_group`` (followed by its drop and
    activation modules, if it had any); group and instance norms, whose statistics are per
    sample, need no synchronisation and convert as without it.

    Parameters and buffers are moved over as the same objects, keeping values,
    ``requires_grad``, device and dtype (and a ``bias=False`` module's missing bias); the
    training flag, hooks and the module's own attributes are kept. So the state_dict has
    the same keys and a checkpoint of the original model loads. A module held at two places
    becomes one converted module. BatchNorms that cannot be converted (a subclass that
    overrides a method, an unknown BatchNorm-like class) are left alone, and a
    ``UserWarning`` lists them with the reason; :func:`unconverted_batch_norms` returns the
    same list.

    Args:
        module: a model, at any depth of nesting; may itself be a BatchNorm.
        sync: convert to :class:`tritonbn.SyncBatchNorm`.
        process_group: with ``sync``, the group to synchronise over (default group if None).

    Returns:
        ``module`` converted in place, or the new module when ``module`` itself is a
        BatchNorm.

    Raises:
        ValueError: ``module`` holds a ``LazyBatchNorm*d`` that has not run yet (raised
            before anything is converted).

    Example::

        >>> model = torchvision.models.resnet50().cuda()
        >>> model = tritonbn.convert_model(model)
    """
    return convert_tree(module, sync, process_group)
