"""Which implementation runs a batch norm on a given tensor, made visible to users."""

from __future__ import annotations

import os

import torch

from .kernels.configs import INTERPRETER

TRITON = "triton"
TRITON_INTERPRETER = "triton-interpreter"
TORCH_NATIVE = "torch-native"

# perf/mock_driver.py: Triton compiles for a pretend GPU and launches nothing, so that the
# host cost of the Triton path can be measured on a CPU-only machine. CPU tensors then take
# the Triton path (their memory is never touched). Not for users.
MOCK_DRIVER = os.environ.get("TRITONBN_MOCK_DRIVER", "0") == "1"


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
    if tensor.device.type == "cuda" or MOCK_DRIVER:
        return TRITON
    return TORCH_NATIVE
