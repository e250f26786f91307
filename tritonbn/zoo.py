"""Model-zoo norm layers: tritonbn counterparts of what timm and torchvision build.

* timm's ``BatchNormAct2d`` (a BatchNorm2d subclass with ``drop`` and ``act`` children whose
  forward calls ``F.batch_norm`` itself) becomes :class:`tritonbn.BatchNormAct2d` when its
  activation is one the kernel applies, and :class:`BatchNormDropAct2d` (tritonbn's
  BatchNorm2d, then timm's own ``drop`` and ``act`` modules) otherwise. timm's
  ``SyncBatchNormAct`` becomes :class:`SyncBatchNormDropAct`.
* torchvision's ``FrozenBatchNorm2d`` (detection backbones) and timm's
  ``FrozenBatchNormAct2d`` become :class:`FrozenBatchNorm2d`, whose elementwise pass is
  tritonbn's normalise kernel computing exactly torchvision's ``x * scale + shift``.
* timm's ``GroupNorm`` and ``GroupNorm1`` (torch's GroupNorm, with a "fast norm" option that
  only changes precision under autocast) become :class:`tritonbn.GroupNorm`; timm's
  ``GroupNormAct`` and ``GroupNorm1Act`` become :class:`tritonbn.GroupNormAct` when the kernel
  applies their activation, else :class:`GroupNormDropAct` (tritonbn's GroupNorm, then timm's
  own ``drop`` and ``act``).

Neither timm nor torchvision is a dependency: their classes are recognised by the module
that defines them and their name (``type(m).__module__``, ``__qualname__``), never imported.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _launch
from ._compat import bias_kwargs
from .backend import TORCH_NATIVE, backend_for
from .group_norm import GroupNorm
from .modules import BatchNorm2d
from .sync import SyncBatchNorm

__all__ = ["BatchNormDropAct2d", "FrozenBatchNorm2d", "GroupNormDropAct", "SyncBatchNormDropAct"]


def _defined_by(module: nn.Module, package: str, name: str) -> bool:
    """Whether ``module``'s exact class is ``name`` from ``package`` (any of its submodules)."""
    cls = type(module)
    return cls.__qualname__ == name and (cls.__module__ == package or cls.__module__.startswith(package + "."))


def is_timm_batch_norm_act(module: nn.Module) -> bool:
    """timm's ``BatchNormAct2d`` (timm.layers.norm_act; timm.models.layers in timm < 0.9)."""
    return _defined_by(module, "timm", "BatchNormAct2d")


def is_timm_sync_batch_norm_act(module: nn.Module) -> bool:
    return _defined_by(module, "timm", "SyncBatchNormAct")


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """torchvision's ``FrozenBatchNorm2d`` (also what timm uses) or timm's ``FrozenBatchNormAct2d``.

    Both compute ``scale = w * (rv + eps).rsqrt(); shift = b - rm * scale; x * scale + shift``
    (then timm's drop and act), which :class:`FrozenBatchNorm2d` reproduces.
    """
    return _defined_by(module, "torchvision", "FrozenBatchNorm2d") or _defined_by(module, "timm",
                                                                                   "FrozenBatchNormAct2d")


def is_timm_group_norm(module: nn.Module) -> bool:
    """timm's ``GroupNorm`` / ``GroupNorm1`` (timm.layers.norm): F.group_norm, channels first in the constructor."""
    return _defined_by(module, "timm", "GroupNorm") or _defined_by(module, "timm", "GroupNorm1")


def is_timm_group_norm_act(module: nn.Module) -> bool:
    """timm's ``GroupNormAct`` / ``GroupNorm1Act`` (timm.layers.norm_act): group norm, then ``drop``, ``act``."""
    return _defined_by(module, "timm", "GroupNormAct") or _defined_by(module, "timm", "GroupNorm1Act")


class GroupNormDropAct(GroupNorm):
    r"""tritonbn's GroupNorm followed by a ``drop`` and an ``act`` module: ``act(drop(GN(x)))``.

    What timm's ``GroupNormAct`` becomes when its activation is not one the fused kernel
    applies (GELU, hard-swish, ...) or its ``drop`` is not ``nn.Identity``. Same parameters,
    children and state_dict keys as timm's module.

    Args:
        num_groups, num_channels, eps, affine: as in :class:`torch.nn.GroupNorm`.
        drop, act: modules applied after the group norm, in that order; ``nn.Identity()``
            when ``None``.

    Example::

        >>> m = tritonbn.zoo.GroupNormDropAct(8, 64, act=torch.nn.GELU()).cuda()
        >>> y = m(torch.randn(2, 64, 32, 32, device="cuda"))
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None,
                 dtype=None, *, drop: nn.Module | None = None, act: nn.Module | None = None) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))


class BatchNormDropAct2d(BatchNorm2d):
    r"""tritonbn's BatchNorm2d followed by a ``drop`` and an ``act`` module: ``act(drop(BN(x)))``.

    What timm's ``BatchNormAct2d`` becomes when its activation is not one the fused kernel
    applies (hard-swish, GELU, ReLU6, ...) or its ``drop`` is not ``nn.Identity``: the batch
    norm runs in Triton, then timm's own modules (in-place flags and all). Same parameters,
    buffers, children and state_dict keys as timm's module.

    Args:
        num_features, eps, momentum, affine, track_running_stats: as in
            :class:`torch.nn.BatchNorm2d`.
        drop, act: modules applied after the batch norm, in that order; ``nn.Identity()``
            when ``None``.
        bias: with ``affine``, learn an additive bias. Default: ``True``

    Example::

        >>> m = tritonbn.zoo.BatchNormDropAct2d(16, act=torch.nn.Hardswish()).cuda()
        >>> y = m(torch.randn(8, 16, 14, 14, device="cuda"))
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, drop: nn.Module | None = None,
                 act: nn.Module | None = None, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **bias_kwargs(bias))
        if not bias and affine:
            self.register_parameter("bias", None)  # torch < 2.13: see tritonbn._compat
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))


class SyncBatchNormDropAct(SyncBatchNorm):
    r""":class:`tritonbn.SyncBatchNorm`, then an optional residual add, ``drop`` and ``act``.

    ``act(drop(SyncBN(x)) + residual)``: timm's ``SyncBatchNormAct`` (and what ``convert_model(...,
    sync=True)`` makes of a BatchNormAct module, whose activation cannot be fused into the
    synchronised statistics). Same state_dict keys as the module it replaces.

    Args:
        num_features, eps, momentum, affine, track_running_stats, process_group: as in
            :class:`tritonbn.SyncBatchNorm`.
        drop, act: modules applied after the batch norm; ``nn.Identity()`` when ``None``.
        bias: with ``affine``, learn an additive bias. Default: ``True``
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 drop: nn.Module | None = None, act: nn.Module | None = None, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device=device,
                         dtype=dtype, **bias_kwargs(bias))
        if not bias and affine:
            self.register_parameter("bias", None)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        output = self.drop(super().forward(input))
        if residual is not None:
            output = output + residual
        return self.act(output)


class _FrozenAffine(torch.autograd.Function):
    """y = x * scale + shift per channel, by the normalise kernel (mean 0, rstd 1).

    The kernel computes ``(x - mean) * (rstd * weight) + bias``; with mean = 0, rstd = 1,
    weight = scale and bias = shift every step but ``x * scale + shift`` is exact (x - 0 = x,
    1 * scale = scale), so it rounds exactly where torchvision's forward rounds: once for the
    product, once for the sum (compiled without fp fusion: no FMA merges the two).
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        acc = _launch.accumulation_dtype(x.dtype)
        stats = torch.zeros((2, x.shape[1]), dtype=acc, device=x.device)  # rows: mean 0, rstd 1
        stats[1] = 1.0
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, scale)
        # No FMA: compiled kernels would otherwise fuse the product and the sum into one rounding.
        return _launch.normalize(x, scale, shift, stats, fp_fusion=False)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, scale = ctx.saved_tensors
        view = [1, -1] + [1] * (grad.dim() - 2)
        dims = [0, *range(2, grad.dim())]
        # The derivatives torch's own x * scale + shift gives (the same ops, so the same bits).
        grad_x = grad * scale.view(view) if ctx.needs_input_grad[0] else None
        grad_scale = (grad * x).sum(dims).to(scale.dtype) if ctx.needs_input_grad[1] else None
        grad_shift = grad.sum(dims).to(scale.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_scale, grad_shift


class FrozenBatchNorm2d(nn.Module):
    r"""BatchNorm2d with fixed statistics and affine parameters, as torchvision's, in Triton.

    .. math::
        \mathrm{scale} = w / \sqrt{\mathrm{rv} + \epsilon}, \quad
        y = x \cdot \mathrm{scale} + (b - \mathrm{rm} \cdot \mathrm{scale})

    The same buffers (``weight``, ``bias``, ``running_mean``, ``running_var``; no
    ``num_batches_tracked``, which loading drops, as torchvision does), state_dict and
    arithmetic as :class:`torchvision.ops.misc.FrozenBatchNorm2d`: the per-channel scale and
    shift are computed by the same torch operations, and the pass over x is tritonbn's
    normalise kernel computing ``x * scale + shift`` with one rounding per operation.
    The kernel is compiled without fp fusion (no FMA), so a compiled GPU kernel rounds where
    torch's eager ops round too; through Triton's interpreter the output is bit-for-bit
    torchvision's (tested). The same in train and eval mode.
    Optional ``drop`` and ``act`` children (timm's ``FrozenBatchNormAct2d``) run afterwards.

    Args:
        num_features: C of an input ``(N, C, H, W)``.
        eps: added to the running variance. Default: 1e-5
        drop, act: modules applied after the normalisation (``FrozenBatchNormAct2d``);
            none when both are ``None``.

    Shape:
        - Input: ``(N, C, H, W)``
        - Output: same shape; dtype as torch's type promotion of x with the buffers

    Example::

        >>> m = tritonbn.FrozenBatchNorm2d(64).cuda()
        >>> y = m(torch.randn(2, 64, 56, 56, device="cuda"))
    """

    def __init__(self, num_features: int, eps: float = 1e-5, *, drop: nn.Module | None = None,
                 act: nn.Module | None = None, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        if drop is not None or act is not None:
            self.drop = drop if drop is not None else nn.Identity()
            self.act = act if act is not None else nn.Identity()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A BatchNorm2d checkpoint loads (torchvision's behaviour): its counter has no place here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        # torchvision's own first lines, unchanged: the same ops give the same bits.
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        shift = b - rm * scale
        if x.dim() != 4 or backend_for(x) == TORCH_NATIVE or x.shape[1] != scale.shape[1]:
            # Not a batch norm's input (torchvision would broadcast it as it may), or no Triton
            # here: torchvision's arithmetic itself.
            y = x * scale + shift
        else:
            out_dtype = torch.promote_types(x.dtype, scale.dtype)  # half x, float32 buffers: float32, as torch
            y = _FrozenAffine.apply(x.to(out_dtype), scale.reshape(-1), shift.reshape(-1))
        if hasattr(self, "act"):
            y = self.act(self.drop(y))
        return y

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
