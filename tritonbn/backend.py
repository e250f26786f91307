"""Which implementation runs a batch norm on a given tensor, made visible to users."""

from __future__ import annotations

import torch

from .kernels.configs import INTERPRETER

TRITON = "triton"
TRITON_INTERPRETER = "triton-interpreter"
TORCH_NATIVE = "torch-native"


def backend_for(tensor: torch.Tensor) -> str:
    """Name the implementation tritonbn uses for a tensor on this device.

    Returns:
        ``"triton"`` for CUDA tensors (compiled Triton kernels), ``"triton-interpreter"`` when
        ``TRITON_INTERPRET=1`` was set before tritonbn was imported (the same kernels, run by
        Triton's interpreter on the CPU), and ``"torch-native"`` otherwise (torch's own batch
        norm, so that a model still runs on the CPU).
    """
    if INTERPRETER:
        return TRITON_INTERPRETER
    if tensor.device.type == "cuda":
        return TRITON
    return TORCH_NATIVE
