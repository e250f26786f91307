"""Argument checks, run before any state changes, raising the errors torch users know."""

from __future__ import annotations

import math

import torch

from .kernels import activation as _activation_codes

# Activation names of the fused API -> the kernels' ACTIVATION constexpr.
ACTIVATIONS = {
    None: _activation_codes.NONE,
    "relu": _activation_codes.RELU,
    "silu": _activation_codes.SILU,
    "leaky_relu": _activation_codes.LEAKY_RELU,
}

_HALF_TYPES = (torch.float16, torch.bfloat16)


_TORCH_DTYPE_NAMES = {
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex32: "ComplexHalf", torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble", torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
    torch.bfloat16: "BFloat16",
}


def _dtype_name(dtype: torch.dtype) -> str:
    """torch's own spelling, as in "not implemented for 'Long'"."""
    return _TORCH_DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def verify_batch_size(size: torch.Size) -> None:
    """torch's rule: training needs more than one value per channel."""
    values_per_channel = size[0] * math.prod(size[2:])
    if values_per_channel == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def check_batch_norm_args(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    eps: float | None = None,
) -> None:
    """Raise for any argument torch's batch_norm would reject (and a few it would mishandle).

    ``eps`` (when given) is checked last, as in torch, by :func:`check_eps`.
    """
    if (eps is None or eps > 0.0) and _all_well_formed(input, running_mean, running_var, weight, bias, training):
        return  # the usual case, checked cheaply; otherwise the checks below find the complaint
    if input.dim() < 2:
        raise ValueError(f"expected 2D or higher input (got {input.dim()}D input)")
    if not input.is_floating_point():
        raise NotImplementedError(f"\"batch_norm\" not implemented for '{_dtype_name(input.dtype)}'")
    if input.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise NotImplementedError(f"\"batch_norm\" not implemented for '{_dtype_name(input.dtype)}'")
    channels = input.shape[1]
    # torch's order, so that the first complaint is the same as torch's.
    for name, tensor in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                         ("bias", bias)):
        if tensor is None:
            continue
        if tensor.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {tensor.numel()}")
        check_param_device_and_dtype(name, tensor, input)
    if not training:
        for name, tensor in (("running_mean", running_mean), ("running_var", running_var)):
            if tensor is None:
                raise RuntimeError(f"{name} must be defined in evaluation mode")
    elif (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if training:
        verify_batch_size(input.shape)
    if eps is not None:
        check_eps(eps, training)


def check_momentum(momentum: float | None, num_batches_tracked: torch.Tensor | None, training: bool,
                   running_mean: torch.Tensor | None) -> None:
    """momentum=None (a cumulative average) needs a module's counter to average over."""
    if momentum is None and num_batches_tracked is None and training and running_mean is not None:
        raise TypeError("batch_norm(): momentum must be a float (None needs the module's num_batches_tracked)")


def check_eps(eps: float, training: bool) -> None:
    """torch 2.13+'s rule (``F.batch_norm``), applied on every torch version tritonbn supports.

    Training divides by sqrt(var + eps) with a batch variance that can be 0 (a constant
    channel), so eps must be positive there; eval uses the running variance and only rejects
    a negative eps. A NaN eps passes, as in torch (both comparisons are False).
    """
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


_SUPPORTED_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


def _all_well_formed(input, running_mean, running_var, weight, bias, training) -> bool:
    """True when nothing below would raise: host cost matters, this runs on every call."""
    dtype = input.dtype
    if input.dim() < 2 or dtype not in _SUPPORTED_DTYPES:
        return False
    channels = input.shape[1]
    device = input.device
    half = dtype in _HALF_TYPES
    for tensor in (running_mean, running_var, weight, bias):
        if tensor is not None and (
            tensor.numel() != channels
            or tensor.device != device
            or (tensor.dtype != dtype and not (half and tensor.dtype == torch.float32))
        ):
            return False
    if training:
        if (running_mean is None) != (running_var is None):
            return False
        return input.numel() != channels  # more than one value per channel (or none at all)
    return running_mean is not None and running_var is not None


def check_param_device_and_dtype(name: str, tensor: torch.Tensor | None, input: torch.Tensor) -> None:
    """torch's errors for a per-channel tensor on another device, or of another dtype than the
    input's (float32 is allowed beside a half input)."""
    if tensor is None:
        return
    if tensor.device != input.device:
        raise RuntimeError(f"Tensor on device {tensor.device} is not on the expected device {input.device}!")
    if tensor.dtype != input.dtype and not (input.dtype in _HALF_TYPES and tensor.dtype == torch.float32):
        raise RuntimeError(
            f"mixed dtype: expected {name} to have scalar type {input.dtype}"
            f"{' or torch.float32' if input.dtype in _HALF_TYPES else ''}, got {tensor.dtype}"
        )


def check_fusion_args(input: torch.Tensor, residual: torch.Tensor | None, activation: str | None) -> None:
    """Raise for an unknown activation or a residual that does not match the input."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(str(a) for a in ACTIVATIONS)}, got {activation!r}")
    if residual is None:
        return
    if residual.shape != input.shape:
        raise ValueError(f"residual must have the input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
    if residual.dtype != input.dtype:
        raise TypeError(f"residual must have the input's dtype {input.dtype}, got {residual.dtype}")
    if residual.device != input.device:
        raise RuntimeError(f"Tensor on device {residual.device} is not on the expected device {input.device}!")
