"""fuse_model: rewrite BatchNorm / GroupNorm -> (add ->) activation into BatchNormAct / GroupNormAct modules.

GroupNorm follows the same rules as BatchNorm below: a ``torch.nn.GroupNorm`` (or tritonbn's)
whose output only feeds an activation (or an add that only feeds one) becomes a
:class:`tritonbn.GroupNormAct` under its own name, as diffusion models write it
(``h = self.nonlinearity(self.norm1(h))`` or ``F.silu(self.norm(h))``).

A ``torch.fx`` pass. It traces the model, finds each BatchNorm call whose only consumer is an
activation (ReLU, SiLU or LeakyReLU, as a module, a function or a tensor method, in place or
not), or a residual add whose only consumer is such an activation, and replaces the group by
one call of a :class:`tritonbn.BatchNormAct1d/2d/3d` stored under the BatchNorm's own name and
holding the BatchNorm's own Parameters and buffers. So the state_dict keys are unchanged and a
checkpoint of the unfused (torch) model loads into the fused one.

torchvision's ResNet is the model this is written for::

    out = self.bn1(self.conv1(x)); out = self.relu(out)      # -> bn1(out), activation "relu"
    ...
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
        identity = self.downsample(x)                          # its BatchNorm stays plain:
    out += identity                                            # it feeds the add, no activation
    out = self.relu(out)                                       # -> bn3(out, identity)

Models (or parts) that ``torch.fx`` cannot trace, typically because of data-dependent control
flow, are handled one level down: their children are fused one by one, with a warning naming
the untraceable module.
"""

from __future__ import annotations

import builtins
import copy
import operator
import warnings
from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F
from torch import fx
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ._compat import bias_kwargs
from .convert import convert_tree, move_state
from .group_norm import GroupNorm, GroupNormAct
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .zoo import FrozenBatchNorm2d, is_frozen_batch_norm

__all__ = ["fuse_model"]

# Exact types only: a user's subclass of BatchNorm may have its own forward, and SyncBatchNorm
# (torch's or tritonbn's) reduces over processes, which BatchNormAct does not.
_FUSED_CLASS = {
    torch.nn.BatchNorm1d: BatchNormAct1d,
    torch.nn.BatchNorm2d: BatchNormAct2d,
    torch.nn.BatchNorm3d: BatchNormAct3d,
    BatchNorm1d: BatchNormAct1d,
    BatchNorm2d: BatchNormAct2d,
    BatchNorm3d: BatchNormAct3d,
    # GroupNorm -> activation (every diffusion ResNet block): GroupNormAct.
    torch.nn.GroupNorm: GroupNormAct,
    GroupNorm: GroupNormAct,
}

_ACTIVATION_MODULES = {torch.nn.ReLU: "relu", torch.nn.SiLU: "silu", torch.nn.LeakyReLU: "leaky_relu"}

# function -> (activation, names of its parameters after the input). F.relu_ is torch.relu_.
_ACTIVATION_FUNCTIONS = {
    F.relu: ("relu", ("inplace",)),
    torch.relu: ("relu", ()),
    torch.relu_: ("relu", ()),
    F.silu: ("silu", ("inplace",)),
    F.leaky_relu: ("leaky_relu", ("negative_slope", "inplace")),
    F.leaky_relu_: ("leaky_relu", ("negative_slope",)),
}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu"}
_DEFAULT_SLOPE = 0.01

_ADD_FUNCTIONS = {operator.add: False, operator.iadd: True, torch.add: False}  # -> mutates its first operand
_ADD_METHODS = {"add": False, "add_": True}

# Nodes that never give a tensor, so they cannot be the residual of a BatchNormAct.
_NON_TENSOR_METHODS = {"size", "dim", "numel", "nelement", "item", "tolist", "stride", "element_size", "ndimension"}
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with every BatchNorm (frozen ones too), GroupNorm and InstanceNorm a leaf.

    tritonbn's BatchNorms check the input's rank in Python, which a traced value cannot
    answer; keeping all of them as call_module nodes is also what the pattern needs, and what
    lets the conversion afterwards replace a frozen BatchNorm (traced through, its arithmetic
    would be inlined into the graph and stay torch's).
    """

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return (isinstance(m, (_BatchNorm, FrozenBatchNorm2d, torch.nn.GroupNorm, _InstanceNorm))
                or is_frozen_batch_norm(m) or super().is_leaf_module(m, module_qualified_name))


@dataclass
class _Match:
    bn: fx.Node
    add: fx.Node | None
    act: fx.Node
    residual: fx.Node | None
    activation: str
    slope: float


def fuse_model(model: torch.nn.Module) -> torch.nn.Module:
    """Fuse every BatchNorm -> activation and BatchNorm -> residual add -> activation of ``model``.

    Each such BatchNorm (``torch.nn.BatchNorm1d/2d/3d`` or tritonbn's, exactly those types;
    not SyncBatchNorm) becomes a :class:`tritonbn.BatchNormAct1d/2d/3d` computing
    ``act(bn(x) + residual)`` in one kernel, under the BatchNorm's qualified name, with the
    same Parameter and buffer objects and training flag; each such ``torch.nn.GroupNorm`` (or
    :class:`tritonbn.GroupNorm`) a :class:`tritonbn.GroupNormAct`. Patterns:

    * activation: ``nn.ReLU``, ``nn.SiLU``, ``nn.LeakyReLU`` modules (shared modules are fine),
      ``F.relu``, ``torch.relu``, ``F.relu_``, ``Tensor.relu(_)``, ``F.silu``,
      ``F.leaky_relu`` / ``F.leaky_relu_`` with a constant slope, in place or not;
    * ``nn.Identity`` modules in between (placeholders such as timm's ``drop_block``) are
      looked through;
    * residual add: ``a + b``, ``a += b``, ``torch.add`` / ``Tensor.add`` (alpha 1), with the
      BatchNorm on either side (``Tensor.add_`` / ``+=`` only with the BatchNorm output as
      the mutated operand: fusing ``identity += bn(x)`` would drop the update of ``identity``).

    A BatchNorm is left alone when its output has any other use, when its module is called
    more than once or has hooks, or when an in-place operation between the BatchNorm and the
    activation writes to its input or to the residual (the fused call reads both at the
    activation's place in the graph). Aliasing through views is not tracked, as in torch.fx's
    own passes. The residual must have the BatchNorm output's shape and dtype (as in ResNet);
    an add whose other operand turns out at run time to broadcast or promote (a time
    embedding added after a GroupNorm) is fused too, and the fused module then adds it with
    torch's own add and activation after its normalisation: the same numbers as unfused.

    Then every BatchNorm (and GroupNorm, InstanceNorm) that was not fused is converted as
    :func:`tritonbn.convert_model` converts it (a downsample's BatchNorm, a SyncBatchNorm,
    timm's ``BatchNormAct2d`` (fused with its own activation when the kernel has it),
    torchvision's ``FrozenBatchNorm2d``,
    ...), so the fused model runs no torch batch norm; what cannot be converted is named in a
    warning. torchvision's ``Conv2dNormActivation`` blocks are Sequentials of conv, norm and
    activation: their BatchNorm -> ReLU/SiLU is fused like any other.

    Not in place: ``model`` is left as it was (its BatchNorms still run unfused), but the
    result shares every Parameter, buffer and unreplaced module with it, so training one
    trains the other. Use it torchvision-style, ``model = tritonbn.fuse_model(model)``, and
    build the optimizer before or after, either works.

    Args:
        model: any module. Parts that ``torch.fx.symbolic_trace`` cannot trace (data-dependent
            control flow, for one) are handled by fusing their children one by one, with a
            ``UserWarning`` naming the untraceable module and why.

    Returns:
        A ``torch.fx.GraphModule`` when ``model`` traces and something was fused; ``model``
        itself when nothing was fused or converted; otherwise a shallow copy of ``model`` whose children
        are the fused ones. Its state_dict has the same keys and tensors as ``model``'s, and
        it follows ``train()`` / ``eval()`` like any module.

    Example::

        >>> model = torchvision.models.resnet50().cuda()
        >>> model = tritonbn.fuse_model(model)   # bn1+relu, bn2+relu, bn3+add+relu per block
    """
    fused = _fuse(model, "", 0)
    # Then every BatchNorm not fused (a downsample's, a SyncBatchNorm, timm's BatchNormAct2d, a
    # frozen one) is converted, so the fused model runs no torch batch norm; modules shared
    # with ``model`` are copied, not changed, so ``model`` keeps running as it did.
    return convert_tree(fused, protected=frozenset(id(m) for m in model.modules()), caller="fuse_model")


def _fuse(module: torch.nn.Module, name: str, depth: int) -> torch.nn.Module:
    if isinstance(module, (_BatchNorm, torch.nn.GroupNorm)) or not any(type(m) in _FUSED_CLASS
                                                                        for m in module.modules()):
        return module
    if type(module).forward is not torch.nn.Module.forward:  # containers (ModuleList, ModuleDict) have none
        try:
            graph = _Tracer().trace(module)
        except Exception as error:  # any Python in a forward may refuse a traced value, in any way
            where = f"submodule '{name}'" if name else "the model"
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            warnings.warn(
                f"tritonbn.fuse_model: torch.fx cannot trace {where} ({type(module).__name__}): "
                f"{type(error).__name__}: {reason}. Its own forward stays unfused; its children are fused one by one.",
                stacklevel=3 + 2 * depth,  # the caller of fuse_model: two frames per level of recursion
            )
        else:
            gm = fx.GraphModule(module, graph, type(module).__name__)
            if _fuse_graph(gm) == 0:
                return module
            _restore_unused_state(module, gm)
            return gm
    return _fuse_children(module, name, depth)


def _fuse_children(module: torch.nn.Module, name: str, depth: int) -> torch.nn.Module:
    fused = {}
    for child_name, child in module.named_children():
        fused[child_name] = _fuse(child, f"{name}.{child_name}" if name else child_name, depth + 1)
    if all(fused[key] is child for key, child in module.named_children()):
        return module
    # A shallow copy with its own registries, so the caller's model keeps its unfused children.
    new = copy.copy(module)
    new._modules = dict(module._modules)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    for child_name, child in fused.items():
        new._modules[child_name] = child
    return new


def _fuse_graph(gm: fx.GraphModule) -> int:
    """Rewrite gm's graph in place; returns the number of BatchNorms fused."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    _drop_identities(gm, modules)
    calls: dict[int, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[id(modules[node.target])] = calls.get(id(modules[node.target]), 0) + 1

    fused = 0
    activation_targets = set()
    for node in list(gm.graph.nodes):
        match = _match(node, modules, calls)
        if match is None:
            continue
        bn = modules[node.target]
        if isinstance(bn, torch.nn.GroupNorm):
            new = GroupNormAct(bn.num_groups, bn.num_channels, bn.eps, bn.affine, device="meta",
                               activation=match.activation, negative_slope=match.slope)
        else:
            new = _FUSED_CLASS[type(bn)](
                bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta",
                activation=match.activation, negative_slope=match.slope,
                **bias_kwargs(not bn.affine or bn.bias is not None),
            )
        move_state(bn, new)  # a None bias comes along
        gm.add_submodule(node.target, new)

        # At the activation's place: the residual may be computed after the BatchNorm
        # (torchvision computes downsample(x) after bn3).
        args = (node.args[0],) if match.residual is None else (node.args[0], match.residual)
        with gm.graph.inserting_before(match.act):
            fused_node = gm.graph.call_module(node.target, args)
        fused_node.meta = dict(match.act.meta)
        match.act.replace_all_uses_with(fused_node)
        if match.act.op == "call_module":
            activation_targets.add(match.act.target)
        for dead in (match.act, match.add, node):
            if dead is not None:
                gm.graph.erase_node(dead)
        fused += 1

    if fused:
        used = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        for target in activation_targets - used:
            gm.delete_submodule(target)  # stateless, and no longer called
        gm.graph.lint()
        gm.recompile()
    return fused


def _drop_identities(gm: fx.GraphModule, modules: dict) -> None:
    """Take ``nn.Identity`` calls out of the graph: they return their input object itself.

    Models keep optional layers as Identity placeholders between a BatchNorm and its
    activation (timm's ResNet: ``bn1 -> drop_block -> act1``); without them the pattern shows.
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules[node.target]) is not torch.nn.Identity:
            continue
        if len(node.args) == 1 and not node.kwargs and not _has_hooks(modules[node.target]):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _match(node: fx.Node, modules: dict, calls: dict) -> _Match | None:
    if node.op != "call_module":
        return None
    bn = modules[node.target]
    if type(bn) not in _FUSED_CLASS or calls[id(bn)] != 1 or _has_hooks(bn):
        return None
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node) or len(node.users) != 1:
        return None
    (user,) = node.users
    activation = _activation(user, node, modules)
    add, residual = None, None
    if activation is None:
        residual = _residual(user, node)
        if residual is None or len(user.users) != 1:
            return None
        add = user
        (user,) = add.users
        activation = _activation(user, add, modules)
        if activation is None:
            return None
    if _written_between(node, user, {node.args[0], residual} - {None}, modules):
        return None
    return _Match(node, add, user, residual, *activation)


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _activation(node: fx.Node, source: fx.Node, modules: dict) -> tuple[str, float] | None:
    """(activation, slope) when ``node`` applies a fusable activation to ``source`` alone."""
    if not node.args or node.args[0] is not source:
        return None
    if node.op == "call_module":
        module = modules[node.target]
        name = _ACTIVATION_MODULES.get(type(module))
        if name is None or len(node.args) != 1 or node.kwargs or _has_hooks(module):
            return None
        return name, float(getattr(module, "negative_slope", _DEFAULT_SLOPE))
    if node.op == "call_method":
        name = _ACTIVATION_METHODS.get(node.target)
        if name is None or len(node.args) != 1 or node.kwargs:
            return None
        return name, _DEFAULT_SLOPE
    if node.op != "call_function" or node.target not in _ACTIVATION_FUNCTIONS:
        return None
    name, params = _ACTIVATION_FUNCTIONS[node.target]
    extra = node.args[1:]
    if len(extra) > len(params):
        return None
    values = dict(zip(params, extra))
    for key, value in node.kwargs.items():
        if key not in params or key in values:
            return None
        values[key] = value
    if any(isinstance(v, fx.Node) for v in values.values()):
        return None
    slope = values.get("negative_slope", _DEFAULT_SLOPE)
    if isinstance(slope, bool) or not isinstance(slope, Real):
        return None
    return name, float(slope)


def _residual(add: fx.Node, source: fx.Node) -> fx.Node | None:
    """The other operand when ``add`` is ``source + residual`` (either order), else None."""
    if add.op == "call_function" and add.target in _ADD_FUNCTIONS:
        mutates_first = _ADD_FUNCTIONS[add.target]
    elif add.op == "call_method" and add.target in _ADD_METHODS:
        mutates_first = _ADD_METHODS[add.target]
    else:
        return None
    if len(add.args) != 2 or any(key != "alpha" for key in add.kwargs) or add.kwargs.get("alpha", 1) != 1:
        return None
    first, second = add.args
    if first is source and second is not source:
        residual = second
    elif second is source and first is not source and not mutates_first:
        residual = first
    else:
        return None
    return residual if _may_be_tensor(residual) else None


def _may_be_tensor(node) -> bool:
    if not isinstance(node, fx.Node) or node.op == "get_attr":
        # get_attr: a Parameter or buffer, in practice a broadcast bias, never a same-shape residual.
        return False
    if node.op == "placeholder":
        return not node.args or node.args[0] is None or isinstance(node.args[0], torch.Tensor)
    if node.op == "call_method":
        return node.target not in _NON_TENSOR_METHODS
    if node.op == "call_function":
        if node.target is builtins.getattr or node.target is builtins.len:
            return False
        if node.target is operator.getitem:
            return _may_be_tensor(node.args[0])
    return True


def _written_between(start: fx.Node, end: fx.Node, tensors: set, modules: dict) -> bool:
    """Whether a node strictly between ``start`` and ``end`` may write one of ``tensors`` in place."""
    node = start.next
    while node is not end:
        if node.args and any(node.args[0] is t for t in tensors) and _mutates_first_arg(node, modules):
            return True
        node = node.next
    return False


def _mutates_first_arg(node: fx.Node, modules: dict) -> bool:
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.endswith("__"))
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    return False


def _restore_unused_state(original: torch.nn.Module, gm: fx.GraphModule) -> None:
    """Put back the modules and tensors that forward never touches, which GraphModule drops.

    Without them a checkpoint of ``original`` would not load strictly into the fused model.
    """
    for name, module in original.named_modules():
        if not name:
            continue
        try:
            present = gm.get_submodule(name)
        except AttributeError:
            if module.state_dict():  # stateless ones (a fused-away ReLU) stay out
                gm.add_submodule(name, module)  # the original object, with everything below it
            continue
        if present is not module:
            _adopt_direct_state(present, module)
    _adopt_direct_state(gm, original)


def _adopt_direct_state(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """Register on target the parameters and buffers of source (not its children's) it lacks."""
    for key, param in source._parameters.items():
        if key not in target._parameters and param is not None:
            target.register_parameter(key, param)
    for key, buffer in source._buffers.items():
        if key not in target._buffers and buffer is not None:
            target.register_buffer(key, buffer, persistent=key not in source._non_persistent_buffers_set)
