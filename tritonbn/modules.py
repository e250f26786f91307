"""Drop-in modules: subclasses of torch's BatchNorm1d/2d/3d whose forward runs tritonbn.

Same constructor, parameters, buffers and state_dict as torch's; only ``forward`` differs.
The policy (which statistics, num_batches_tracked, momentum=None) is torch's, from
``torch.nn.modules.batchnorm._BatchNorm.forward``; the arithmetic is ``tritonbn.functional``.
Unlike torch, every argument is checked before ``num_batches_tracked`` is counted, so a
rejected call changes no state; the count is made by the kernel that updates the running
statistics (torch's module launches a separate ``add_``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _launch
from ._checks import ACTIVATIONS
from ._compat import bias_kwargs
from ._ops import batch_norm_function_apply, transforms_active, unwrap_if_dead
from .functional import _ALWAYS_TRITON, DEFAULT_SLOPE, _batch_norm, _unfused_epilogue, is_compiling, residual_fuses

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
]


def batch_norm_state(module: torch.nn.Module) -> tuple:
    """(running_mean, running_var, weight, bias, bn_training, batch_counter) of a BatchNorm
    module for one call, as torch's _BatchNorm.forward decides them.

    Runs on every call of every BatchNorm layer: parameters and buffers are read from their
    dicts (nn.Module.__getattr__ is slow), each once. The running buffers are used when they
    exist and the module is in eval, or when it tracks them in training. batch_counter: the
    ``num_batches_tracked`` this call counts a batch in (a training module that tracks running
    statistics), or None; the kernels count it (tritonbn/_launch.py forward).
    """
    buffers, parameters = module._buffers, module._parameters
    running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
    counter = None
    if module.training:
        if module.track_running_stats:
            counter = buffers.get("num_batches_tracked")
        else:
            running_mean = running_var = None
        bn_training = True
    else:
        bn_training = running_mean is None and running_var is None
    return running_mean, running_var, parameters.get("weight"), parameters.get("bias"), bn_training, counter


def module_batch_norm(module: torch.nn.Module, input: Tensor) -> Tensor:
    """A BatchNorm module's forward on ``input`` (whose rank the module has checked).

    batch_norm_state's policy, then ``_batch_norm``; the usual training call (a CUDA input,
    gradients wanted, not under torch.compile or a functorch transform) goes straight to its
    launch plan, which checks every argument, and the autograd function: _batch_norm's own
    path for it, without the layers in between (this runs on every call of every layer).
    """
    running_mean, running_var, weight, bias, training, counter = batch_norm_state(module)
    # is_compiling first: torch.compile must not trace the calls after it.
    if ((input.is_cuda or _ALWAYS_TRITON) and not is_compiling() and torch.is_grad_enabled()
            and not transforms_active()
            and (input.requires_grad or (weight is not None and weight.requires_grad)
                 or (bias is not None and bias.requires_grad))):
        # A module's parameters are Parameters, never functorch wrappers; the input may be a
        # dead one (see functional._batch_norm).
        input = unwrap_if_dead(input)
        plan = _launch.forward_plan(input, weight, bias, running_mean, running_var, training, module.eps, None, 0,
                                    DEFAULT_SLOPE, module.momentum, counter)
        return batch_norm_function_apply(input, weight, bias, (plan, running_mean, running_var, counter))
    return _batch_norm(input, running_mean, running_var, weight, bias, training, counter, module.momentum, module.eps)


class _TritonBatchNormMixin:
    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # Every argument is checked before anything changes.
        return module_batch_norm(self, input)

    def _forward(self, input: Tensor, residual: Tensor | None = None, activation: str | None = None,
                 negative_slope: float = 0.01) -> Tensor:
        """forward with a fused residual add and activation (BatchNormAct*d)."""
        self._check_input_dim(input)
        return _batch_norm(input, *batch_norm_state(self), self.momentum, self.eps, residual, activation,
                           negative_slope)


class BatchNorm1d(_TritonBatchNormMixin, torch.nn.BatchNorm1d):
    r"""Batch Normalization over a 2D or 3D input, computed by Triton kernels.

    A drop-in for :class:`torch.nn.BatchNorm1d` (same arguments, defaults, parameters,
    buffers and state_dict):

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    Args:
        num_features: C from an input of size ``(N, C)`` or ``(N, C, L)``.
        eps: added to the denominator for numerical stability. Default: 1e-5
        momentum: running-statistics factor; ``None`` for a cumulative average. Default: 0.1
        affine: learnable ``weight`` and ``bias``. Default: ``True``
        track_running_stats: keep running statistics (else batch statistics in eval too).
            Default: ``True``
        bias: (keyword, torch >= 2.13) with ``affine``, learn an additive bias; ``False``
            gives a weight without a bias, as in torch. Default: ``True``

    Shape:
        - Input: ``(N, C)`` or ``(N, C, L)``
        - Output: same shape, dtype and memory format as the input

    Example::

        >>> m = tritonbn.BatchNorm1d(100).cuda()
        >>> y = m(torch.randn(20, 100, device="cuda"))
    """


class BatchNorm2d(_TritonBatchNormMixin, torch.nn.BatchNorm2d):
    r"""Batch Normalization over a 4D input ``(N, C, H, W)``, computed by Triton kernels.

    A drop-in for :class:`torch.nn.BatchNorm2d` (same arguments, defaults, parameters,
    buffers and state_dict); see :class:`BatchNorm1d` for the formula and arguments.
    channels_last inputs are read in place and give a channels_last output.

    Shape:
        - Input: ``(N, C, H, W)``
        - Output: same shape, dtype and memory format as the input

    Example::

        >>> m = tritonbn.BatchNorm2d(64).cuda()
        >>> y = m(torch.randn(8, 64, 56, 56, device="cuda"))
    """


class BatchNorm3d(_TritonBatchNormMixin, torch.nn.BatchNorm3d):
    r"""Batch Normalization over a 5D input ``(N, C, D, H, W)``, computed by Triton kernels.

    A drop-in for :class:`torch.nn.BatchNorm3d` (same arguments, defaults, parameters,
    buffers and state_dict); see :class:`BatchNorm1d` for the formula and arguments.

    Shape:
        - Input: ``(N, C, D, H, W)``
        - Output: same shape, dtype and memory format as the input

    Example::

        >>> m = tritonbn.BatchNorm3d(32).cuda()
        >>> y = m(torch.randn(2, 32, 16, 64, 64, device="cuda"))
    """


class _BatchNormActMixin:
    """BatchNorm -> (+ residual) -> activation in one kernel; a BatchNorm's state_dict."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, activation: str | None = "relu",
                 negative_slope: float = 0.01, *, bias: bool = True) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(str(a) for a in ACTIVATIONS)}, got {activation!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **bias_kwargs(bias))
        if not bias and affine:
            # torch < 2.13 has no bias argument: the same module as torch 2.13's bias=False.
            self.register_parameter("bias", None)
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        if residual is not None and not residual_fuses(input, residual):
            # What fuse_model may have fused: ``act(bn(x) + emb)`` with a broadcast or
            # promoting operand. torch's own add and activation, as the unfused model ran.
            return _unfused_epilogue(self._forward(input), residual, self.activation, self.negative_slope)
        return self._forward(input, residual, self.activation, self.negative_slope)

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return f"{super().extra_repr()}, activation={self.activation!r}{slope}"


class BatchNormAct1d(_BatchNormActMixin, BatchNorm1d):
    r"""BatchNorm1d followed by an optional residual add and an activation, fused.

    ``y = act(BatchNorm1d(x) + residual)``, with ``act`` one of ``None``, ``"relu"``,
    ``"silu"``, ``"leaky_relu"`` (slope ``negative_slope``). Same state_dict as
    :class:`torch.nn.BatchNorm1d`: a torch checkpoint loads into it.

    Example::

        >>> m = tritonbn.BatchNormAct1d(128, activation="silu").cuda()
        >>> y = m(torch.randn(32, 128, device="cuda"))
    """


class BatchNormAct2d(_BatchNormActMixin, BatchNorm2d):
    r"""BatchNorm2d followed by an optional residual add and an activation, fused.

    ``y = act(BatchNorm2d(x) + residual)``: one read of x (and the residual), one write of y,
    forward and backward; no activation is stored for backward. Same state_dict as
    :class:`torch.nn.BatchNorm2d`.

    Args:
        num_features, eps, momentum, affine, track_running_stats: as in BatchNorm2d.
        activation: ``None``, ``"relu"``, ``"silu"`` or ``"leaky_relu"``. Default: ``"relu"``
        negative_slope: the leaky_relu slope. Default: 0.01
        bias: with ``affine``, learn an additive bias (``False``: a weight only, as torch
            2.13's ``bias=False``; also on older torch). Default: ``True``

    Shape:
        - Input, residual (optional): ``(N, C, H, W)``
        - Output: same as the input

    Example::

        >>> m = tritonbn.BatchNormAct2d(256).cuda()
        >>> out = m(conv3_out, residual=identity)   # ResNet: relu(bn3(out) + identity)
    """


class BatchNormAct3d(_BatchNormActMixin, BatchNorm3d):
    r"""BatchNorm3d followed by an optional residual add and an activation, fused.

    See :class:`BatchNormAct2d`; input ``(N, C, D, H, W)``.
    """
