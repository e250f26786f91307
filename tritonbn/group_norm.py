"""GroupNorm and InstanceNorm on tritonbn's kernels: the functional API and drop-in modules.

``group_norm``, ``group_norm_act`` and ``instance_norm`` (re-exported by tritonbn.functional)
have torch's signatures (``group_norm_act`` adds the fused epilogue); ``GroupNorm``,
``GroupNormAct`` and ``InstanceNorm1d/2d/3d`` subclass torch's modules: same constructor,
parameters, buffers and state_dict, only ``forward`` differs. Every argument is checked
before anything runs or any state changes, with torch's exception types and messages.

InstanceNorm is GroupNorm with one channel per group; with running statistics in use
(``use_input_stats=False``: eval with ``track_running_stats``) it is BatchNorm's eval, and
runs tritonbn's BatchNorm kernels.
"""

from __future__ import annotations

import inspect
import math
import warnings

import torch
from torch import Tensor

from . import _group_launch
from ._checks import ACTIVATIONS, _dtype_name, check_fusion_args, check_param_device_and_dtype
from ._group_ops import apply_group_norm, update_instance_running_stats
from .functional import _ALWAYS_TRITON, _batch_norm, _unfused_epilogue, residual_fuses

__all__ = ["GroupNorm", "GroupNormAct", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "group_norm",
           "group_norm_act", "instance_norm"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_TYPES = (torch.float16, torch.bfloat16)
# Keyword-only ``bias`` in torch's GroupNorm constructor (torch >= 2.13).
_GROUP_NORM_BIAS_ARGUMENT = "bias" in inspect.signature(torch.nn.GroupNorm.__init__).parameters


# ----------------------------------------------------------------------------------------------
# checks: torch's order, types and messages
# ----------------------------------------------------------------------------------------------


def _check_dtype(input: Tensor, op: str) -> None:
    if input.dtype not in _SUPPORTED_DTYPES:
        raise NotImplementedError(f"\"{op}\" not implemented for '{_dtype_name(input.dtype)}'")


def _group_norm_well_formed(input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None) -> bool:
    """True when check_group_norm_args would not raise: it runs on every call, host cost matters."""
    dtype = input.dtype
    if input.dim() < 2 or dtype not in _SUPPORTED_DTYPES or num_groups <= 0:
        return False
    channels = input.shape[1]
    if channels % num_groups or input.numel() == num_groups:  # one value per group
        return False
    device = input.device
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        return False
    for tensor in (weight, bias):
        if tensor is not None and (tensor.dim() != 1 or tensor.numel() != channels or tensor.device != device
                                   or (tensor.dtype != dtype and not (dtype in _HALF_TYPES
                                                                      and tensor.dtype == torch.float32))):
            return False
    return True


def check_group_norm_args(input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None) -> None:
    """Raise what ``F.group_norm`` raises for these arguments (before anything runs)."""
    if _group_norm_well_formed(input, num_groups, weight, bias):
        return
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    # F.group_norm's _verify_batch_size (a ZeroDivisionError for num_groups=0, as in torch).
    size = [input.size(0) * input.size(1) // num_groups, num_groups] + list(input.size()[2:])
    if size[0] * math.prod(size[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
    channels = input.shape[1]
    if num_groups < 0:
        raise RuntimeError(f"Expected num groups to be greater than 0, got {num_groups}")
    if num_groups == 0 or channels % num_groups != 0:
        raise RuntimeError("Expected number of channels in input to be divisible by num_groups, but got input of "
                           f"shape {list(input.shape)} and num_groups={num_groups}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and (tensor.dim() != 1 or tensor.numel() != channels):
            raise RuntimeError(f"Expected {name} to be a vector of size equal to the number of channels in input, "
                               f"but got {name} of shape {list(tensor.shape)} and input of shape {list(input.shape)}")
    _check_dtype(input, "GroupNormKernelImpl")
    check_param_device_and_dtype("weight", weight, input)
    check_param_device_and_dtype("bias", bias, input)
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        # A half input takes float32 parameters, but both of one dtype (torch's mixed-dtype rule).
        raise RuntimeError(f"mixed dtype: expect parameter to have scalar type of {_dtype_name(weight.dtype)}")


def check_instance_norm_args(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                             weight: Tensor | None, bias: Tensor | None, use_input_stats: bool) -> None:
    """Raise what ``F.instance_norm`` raises for these arguments (before anything runs)."""
    if use_input_stats and math.prod(input.shape[2:]) == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {input.size()}")
    if not use_input_stats and (running_mean is None or running_var is None):
        raise RuntimeError("Expected running_mean and running_var to be defined when use_input_stats is false")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if input.dim() < 2:
        raise ValueError(f"expected 2D or higher input (got {input.dim()}D input)")
    _check_dtype(input, "batch_norm")
    n, channels = input.shape[0], input.shape[1]
    # torch.instance_norm repeats the per-channel tensors over the batch, then batch_norm checks them.
    for name, tensor in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                         ("bias", bias)):
        if tensor is not None and tensor.numel() != channels:
            raise RuntimeError(f"{name} should contain {n * channels} elements not {n * tensor.numel()}")
        check_param_device_and_dtype(name, tensor, input)


# ----------------------------------------------------------------------------------------------
# functional
# ----------------------------------------------------------------------------------------------


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""Apply Group Normalization over groups of channels of each sample.

    A drop-in for :func:`torch.nn.functional.group_norm`, computed by Triton kernels:

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    with the mean and (biased) variance over each sample's ``C / num_groups`` channels of a
    group and every spatial position; :math:`\gamma` and :math:`\beta` are per channel.

    Args:
        input: ``(N, C, *)``; float16, bfloat16, float32 or float64; any memory format
            (channels_last is read in place and gives a channels_last output).
        num_groups: groups to divide the channels into; must divide C.
        weight, bias: ``(C,)`` affine parameters, or ``None``.
        eps: added to the variance for numerical stability.

    Returns:
        A tensor of the input's shape, dtype and memory format.

    Example::

        >>> x = torch.randn(2, 320, 64, 64, device="cuda")
        >>> y = tritonbn.functional.group_norm(x, 32)
    """
    return _group_norm(input, num_groups, weight, bias, eps)


def group_norm_act(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = "silu",
    residual: Tensor | None = None,
    negative_slope: float = 0.01,
) -> Tensor:
    r"""Group Normalization, then an optional residual add and activation, in one kernel.

    .. math::
        y = \mathrm{act}\left(\mathrm{GroupNorm}(x) + \mathrm{residual}\right)

    The same numbers as :func:`group_norm` followed by ``+ residual`` and the activation in
    torch, with one read of x (and the residual) and one write of y; backward recomputes the
    pre-activation, so no activation is stored.

    Args:
        input, num_groups, weight, bias, eps: as in :func:`group_norm`.
        activation: ``None``, ``"relu"``, ``"silu"`` or ``"leaky_relu"``.
        residual: a tensor of the input's shape, dtype and device added before the
            activation, or ``None``.
        negative_slope: the slope of ``"leaky_relu"`` for negative inputs.

    Example::

        >>> h = tritonbn.functional.group_norm_act(h, 32, norm.weight, norm.bias)  # SiLU(GroupNorm(h))
    """
    return _group_norm(input, num_groups, weight, bias, eps, residual, activation, negative_slope)


def _cuda_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cuda")
    except TypeError:  # torch < 2.4: the CUDA flag has no device argument
        return torch.is_autocast_enabled()


def _group_norm(input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
                residual: Tensor | None = None, activation: str | None = None, negative_slope: float = 0.01,
                running: tuple | None = None, checked: bool = False) -> Tensor:
    """group_norm with the fused epilogue and InstanceNorm's running statistics
    (``running`` = (running_mean, running_var, momentum), updated in place)."""
    if running is None and not checked and input.is_cuda and _cuda_autocast():
        # CUDA autocast runs group_norm in float32 (torch's autocast list; InstanceNorm is not
        # on it): the same casts, so the same dtype and numbers as torch's.
        input, weight, bias, residual = (t.float() if isinstance(t, Tensor) else t
                                         for t in (input, weight, bias, residual))
    if not checked:
        check_group_norm_args(input, num_groups, weight, bias)
        if residual is not None or activation is not None:
            check_fusion_args(input, residual, activation)
    if not (input.is_cuda or _ALWAYS_TRITON):
        return _torch_group_norm(input, num_groups, weight, bias, eps, residual, activation, negative_slope, running)
    code = ACTIVATIONS[activation]
    slope = float(negative_slope)
    if torch.compiler.is_compiling():
        y, mean, _, var = torch.ops.tritonbn.group_norm_fwd(input, num_groups, weight, bias, eps, residual, code,
                                                            slope)
        if running is not None:
            update_instance_running_stats(input, running, mean, var)
        return y
    if torch.is_grad_enabled() and (
        input.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
        or (residual is not None and residual.requires_grad)
    ):
        return apply_group_norm(input, num_groups, weight, bias, residual, (eps, code, slope, running))
    y, mean, _, var = _group_launch.forward(input, num_groups, weight, bias, eps, residual, code, slope,
                                            keep_var=running is not None)
    if running is not None:
        update_instance_running_stats(input, running, mean, var)
    return y


def _torch_group_norm(input, num_groups, weight, bias, eps, residual, activation, slope, running) -> Tensor:
    """torch's own ops, for CPU tensors without Triton's interpreter."""
    if running is None:
        output = torch.nn.functional.group_norm(input, num_groups, weight, bias, eps)
    else:
        running_mean, running_var, momentum = running
        output = torch.nn.functional.instance_norm(input, running_mean, running_var, weight, bias, True, momentum,
                                                   eps)
    return _unfused_epilogue(output, residual, activation, slope)


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Apply Instance Normalization to each channel of each sample.

    A drop-in for :func:`torch.nn.functional.instance_norm`, computed by Triton kernels:

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    With ``use_input_stats`` the mean and (biased) variance are each (sample, channel)'s over
    the spatial positions (GroupNorm with one channel per group), and ``running_mean`` /
    ``running_var``, when given, are updated in place as torch does: each sample's statistics
    blended with ``momentum`` (the unbiased variance), averaged over the batch. Otherwise the
    running statistics normalise every sample.

    Args:
        input: ``(N, C, *)`` with more than one spatial position when ``use_input_stats``.
        running_mean, running_var: ``(C,)`` buffers, or ``None``.
        weight, bias: ``(C,)`` affine parameters, or ``None``.
        use_input_stats: normalise with each instance's statistics.
        momentum: the running-statistics blend factor.
        eps: added to the variance for numerical stability.

    Example::

        >>> y = tritonbn.functional.instance_norm(torch.randn(4, 64, 128, 128, device="cuda"))
    """
    check_instance_norm_args(input, running_mean, running_var, weight, bias, use_input_stats)
    if not use_input_stats:
        # Every sample normalised by the running statistics: BatchNorm's eval.
        return _batch_norm(input, running_mean, running_var, weight, bias, False, None, momentum, eps)
    running = (running_mean, running_var, float(momentum)) if running_mean is not None else None
    return _group_norm(input, input.shape[1], weight, bias, eps, running=running, checked=True)


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------


class GroupNorm(torch.nn.GroupNorm):
    r"""Group Normalization over a mini-batch, computed by Triton kernels.

    A drop-in for :class:`torch.nn.GroupNorm` (same arguments, defaults, parameters and
    state_dict):

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    Args:
        num_groups: groups to separate the channels into.
        num_channels: C, the channels expected in the input.
        eps: added to the denominator for numerical stability. Default: 1e-5
        affine: learnable per-channel ``weight`` and ``bias``. Default: ``True``

    Shape:
        - Input: ``(N, C, *)``
        - Output: same shape, dtype and memory format as the input

    Example::

        >>> m = tritonbn.GroupNorm(32, 320).cuda()
        >>> y = m(torch.randn(2, 320, 64, 64, device="cuda"))
    """

    def forward(self, input: Tensor) -> Tensor:
        return _group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class GroupNormAct(GroupNorm):
    r"""GroupNorm followed by an optional residual add and an activation, fused.

    ``y = act(GroupNorm(x) + residual)``: one read of x (and the residual), one write of y,
    forward and backward. The GroupNorm -> SiLU of every diffusion UNet and VAE ResNet block.
    Same state_dict as :class:`torch.nn.GroupNorm`.

    Args:
        num_groups, num_channels, eps, affine: as in :class:`GroupNorm`.
        activation: ``None``, ``"relu"``, ``"silu"`` or ``"leaky_relu"``. Default: ``"silu"``
        negative_slope: the leaky_relu slope. Default: 0.01
        bias: with ``affine``, learn an additive bias (torch 2.13's argument; also on older
            torch). Default: ``True``

    Shape:
        - Input, residual (optional): ``(N, C, *)``
        - Output: same as the input

    Example::

        >>> m = tritonbn.GroupNormAct(32, 512).cuda()
        >>> h = m(torch.randn(1, 512, 64, 64, device="cuda"))
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 activation: str | None = "silu", negative_slope: float = 0.01, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(str(a) for a in ACTIVATIONS)}, got {activation!r}")
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype,
                         **({} if bias or not _GROUP_NORM_BIAS_ARGUMENT else {"bias": False}))
        if not bias and affine and self.bias is not None:
            self.register_parameter("bias", None)  # torch < 2.13 has no bias argument: the same module
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        if residual is not None and not residual_fuses(input, residual):
            # What fuse_model may have fused: ``silu(norm(h) + emb[:, :, None, None])`` (a
            # broadcast embedding, FiLM's shift). torch's own add and activation, as unfused.
            return _unfused_epilogue(_group_norm(input, self.num_groups, self.weight, self.bias, self.eps), residual,
                                     self.activation, self.negative_slope)
        return _group_norm(input, self.num_groups, self.weight, self.bias, self.eps, residual, self.activation,
                           self.negative_slope)

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return f"{super().extra_repr()}, activation={self.activation!r}{slope}"


class _InstanceNormMixin:
    """torch's _InstanceNorm.forward (input checks, unbatched input, which statistics), with
    tritonbn's instance_norm."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        feature_dim = input.dim() - self._get_no_batch_dim()
        if input.size(feature_dim) != self.num_features:
            if self.affine:
                raise ValueError(f"expected input's size at dim={feature_dim} to match num_features"
                                 f" ({self.num_features}), but got: {input.size(feature_dim)}.")
            warnings.warn(f"input's size at dim={feature_dim} does not match num_features. You can silence this "
                          "warning by not passing in num_features, which is not used because affine=False",
                          stacklevel=2)
        unbatched = input.dim() == self._get_no_batch_dim()
        if unbatched:
            input = input.unsqueeze(0)
        output = instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                               self.training or not self.track_running_stats,
                               self.momentum if self.momentum is not None else 0.0, self.eps)
        return output.squeeze(0) if unbatched else output


class InstanceNorm1d(_InstanceNormMixin, torch.nn.InstanceNorm1d):
    r"""Instance Normalization over a 2D (unbatched) or 3D input, computed by Triton kernels.

    A drop-in for :class:`torch.nn.InstanceNorm1d` (same arguments, defaults, buffers and
    state_dict): each (sample, channel) normalised by its own mean and variance over the
    length, or by the running statistics in eval with ``track_running_stats``.

    Args:
        num_features: C from an input of size ``(N, C, L)`` or ``(C, L)``.
        eps: added to the denominator for numerical stability. Default: 1e-5
        momentum: running-statistics factor (``None``: no update, as torch). Default: 0.1
        affine: learnable per-channel ``weight`` and ``bias``. Default: ``False``
        track_running_stats: keep running statistics, used in eval. Default: ``False``

    Example::

        >>> m = tritonbn.InstanceNorm1d(64).cuda()
        >>> y = m(torch.randn(8, 64, 1000, device="cuda"))
    """


class InstanceNorm2d(_InstanceNormMixin, torch.nn.InstanceNorm2d):
    r"""Instance Normalization over a 3D (unbatched) or 4D input, computed by Triton kernels.

    A drop-in for :class:`torch.nn.InstanceNorm2d`; see :class:`InstanceNorm1d`.

    Example::

        >>> m = tritonbn.InstanceNorm2d(64, affine=True).cuda()
        >>> y = m(torch.randn(4, 64, 128, 128, device="cuda"))
    """


class InstanceNorm3d(_InstanceNormMixin, torch.nn.InstanceNorm3d):
    r"""Instance Normalization over a 4D (unbatched) or 5D input, computed by Triton kernels.

    A drop-in for :class:`torch.nn.InstanceNorm3d`; see :class:`InstanceNorm1d`.
    """
