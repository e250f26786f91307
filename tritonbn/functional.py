"""Functional interface: ``tritonbn.functional.batch_norm``, torch's signature and semantics."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Parameter

from . import _launch
from ._checks import ACTIVATIONS, check_batch_norm_args, check_fusion_args, check_momentum
from ._ops import (  # importing _ops registers the torch.ops.tritonbn ops
    BatchNormFunction,
    BatchNormResidualFunction,
    batch_norm_function_apply,
    residual_function_apply,
    transforms_active,
    unwrap_if_dead,
)
from .backend import MOCK_DRIVER
from .kernels.configs import INTERPRETER

# CPU tensors take the Triton path too (backend.backend_for says which implementation runs).
_ALWAYS_TRITON = INTERPRETER or MOCK_DRIVER
DEFAULT_SLOPE = 0.01  # leaky_relu's negative slope when none is given
# torch.compile folds this very function to True while it traces (dynamo knows it by identity).
is_compiling = torch.compiler.is_compiling

__all__ = ["batch_norm", "batch_norm_act"]


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Apply Batch Normalization for each channel across a batch of data.

    A drop-in for :func:`torch.nn.functional.batch_norm`, computed by Triton kernels:

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    In training, mean and (biased) variance are the batch's, over every dimension but the
    channel dimension 1, and ``running_mean`` / ``running_var`` (when given) are updated in
    place with ``momentum`` and the unbiased variance. Otherwise the running statistics are
    used.

    Args:
        input: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``; float16,
            bfloat16, float32 or float64; any memory format (channels_last is read in place).
        running_mean, running_var: ``(C,)`` buffers, or ``None``.
        weight, bias: ``(C,)`` affine parameters, or ``None``.
        training: use batch statistics (and update the running ones).
        momentum: the running-statistics blend factor.
        eps: added to the variance for numerical stability.

    Returns:
        A tensor of the input's shape, dtype and memory format.

    Example::

        >>> x = torch.randn(8, 16, 32, 32, device="cuda")
        >>> rm, rv = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")
        >>> y = tritonbn.functional.batch_norm(x, rm, rv, training=True)
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, None, momentum, eps)


def _batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
    residual: Tensor | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> Tensor:
    """batch_norm plus the module's batch counter and a fused residual/activation.

    ``num_batches_tracked``: a training module's counter, which this call counts (+ 1, on the
    device: see _launch.forward); with ``momentum=None`` the blend factor is then
    ``1 / num_batches_tracked``, read on the device.

    Every argument is checked before anything changes: on the eager Triton path by the launch
    plan's build (_launch.forward_plan keys its plans by everything the checks read, so a
    call that finds a plan is valid), explicitly on the others.
    """
    if not (input.is_cuda or _ALWAYS_TRITON) or is_compiling():
        check_batch_norm_args(input, running_mean, running_var, weight, bias, training, eps)
        check_fusion_args(input, residual, activation)
        check_momentum(momentum, num_batches_tracked, training, running_mean)
        if is_compiling():
            return _compiled_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                        num_batches_tracked, residual, ACTIVATIONS[activation],
                                        float(negative_slope))
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / float(num_batches_tracked)  # CPU only: no device to synchronise
        output = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum or 0.0, eps)
        return _unfused_epilogue(output, residual, activation, negative_slope)

    activation_code = ACTIVATIONS.get(activation)
    if activation_code is None or residual is not None:
        check_fusion_args(input, residual, activation)
    slope = float(negative_slope)
    if torch.is_grad_enabled() and (
        input.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
        or (residual is not None and residual.requires_grad)
    ):
        if transforms_active():
            # The plan is looked up inside, on what Function.apply's functorch handling hands forward.
            spec = ((training, eps, activation_code, slope, momentum), running_mean, running_var, num_batches_tracked)
            if residual is None:
                return BatchNormFunction.apply(input, weight, bias, spec)
            return BatchNormResidualFunction.apply(input, weight, bias, residual, spec)
        # Function.apply's C++ core; what its Python wrapper would do here (_ops.c_apply) is
        # to unwrap tensors that outlived a functorch transform, which a module's Parameter
        # never is (transforms wrap into plain Tensors).
        input = unwrap_if_dead(input)
        if type(weight) is not Parameter and weight is not None:
            weight = unwrap_if_dead(weight)
        if type(bias) is not Parameter and bias is not None:
            bias = unwrap_if_dead(bias)
        if residual is not None:
            residual = unwrap_if_dead(residual)
        plan = _launch.forward_plan(input, weight, bias, running_mean, running_var, training, eps, residual,
                                    activation_code, slope, momentum, num_batches_tracked)
        spec = (plan, running_mean, running_var, num_batches_tracked)
        if residual is None:
            return batch_norm_function_apply(input, weight, bias, spec)
        return residual_function_apply(input, weight, bias, residual, spec)
    plan = _launch.forward_plan(input, weight, bias, running_mean, running_var, training, eps, residual,
                                activation_code, slope, momentum, num_batches_tracked)
    return _launch.run_forward(plan, input, weight, bias, running_mean, running_var, residual, num_batches_tracked)[0]


def _compiled_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked,
                         residual, activation_code, slope) -> Tensor:
    """Under torch.compile: the torch.library ops, which the compiler traces (tritonbn/_ops.py)."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)  # a buffer mutation the compiler sees, as in torch's module
        if momentum is not None:
            num_batches_tracked = None  # not a cumulative average: the update op does not read it
    if training:
        output, stats = torch.ops.tritonbn.batch_norm_fwd(
            input, weight, bias, None, None, True, eps, residual, activation_code, slope
        )
        count = input.shape[0] * math.prod(input.shape[2:])
        if running_mean is not None and count > 0:
            torch.ops.tritonbn.update_running_stats_(
                running_mean, running_var, stats[0], stats[2], num_batches_tracked,
                0.0 if momentum is None else momentum, count,
            )
        return output
    output, _ = torch.ops.tritonbn.batch_norm_fwd(
        input, weight, bias, running_mean, running_var, False, eps, residual, activation_code, slope
    )
    return output


def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str | None = "relu",
    residual: Tensor | None = None,
    negative_slope: float = 0.01,
) -> Tensor:
    r"""Batch Normalization, then an optional residual add and activation, in one kernel.

    .. math::
        y = \mathrm{act}\left(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma
            + \beta + \mathrm{residual}\right)

    The same numbers as :func:`batch_norm` followed by ``+ residual`` and the activation in
    torch, with one read of x (and the residual) and one write of y. Backward recomputes the
    pre-activation from x and the saved statistics, so no activation is stored.

    Args:
        input, running_mean, running_var, weight, bias, training, momentum, eps: as in
            :func:`batch_norm`.
        activation: ``None``, ``"relu"``, ``"silu"`` or ``"leaky_relu"``.
        residual: a tensor of the input's shape, dtype and device added before the
            activation (ResNet's identity path), or ``None``.
        negative_slope: the slope of ``"leaky_relu"`` for negative inputs.

    Example::

        >>> out = tritonbn.functional.batch_norm_act(x, rm, rv, w, b, training=True, residual=identity)
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, None, momentum, eps, residual,
                       activation, negative_slope)


def residual_fuses(input: Tensor, residual) -> bool:
    """Whether ``act(norm(input) + residual)`` can take the fused kernel: a residual tensor of
    the input's shape, dtype and device. Anything else (a broadcast embedding, a float32
    residual beside a half input) is added by torch, with its broadcasting and promotion."""
    return (isinstance(residual, Tensor) and residual.shape == input.shape and residual.dtype == input.dtype
            and residual.device == input.device)


def _unfused_epilogue(output: Tensor, residual: Tensor | None, activation: str | None, slope: float) -> Tensor:
    """torch's own residual add and activation, for the torch-native backend."""
    if residual is not None:
        output = output + residual
    if activation == "relu":
        return F.relu(output)
    if activation == "silu":
        return F.silu(output)
    if activation == "leaky_relu":
        return F.leaky_relu(output, slope)
    return output


# GroupNorm and InstanceNorm (tritonbn/group_norm.py), imported last: that module uses the names above.
from .group_norm import group_norm, group_norm_act, instance_norm  # noqa: E402

__all__ += ["group_norm", "group_norm_act", "instance_norm"]
