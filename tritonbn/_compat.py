"""What the installed torch's BatchNorm offers, looked up once (never by version string).

torch 2.13 added ``bias=False`` (a weight without a bias) to ``_NormBase``; the GPU image's
torch 2.11 does not have it. Everything that builds a BatchNorm from another one asks here.
"""

from __future__ import annotations

import inspect

import torch

# Keyword-only ``bias`` in torch's BatchNorm constructors (torch >= 2.13).
BATCH_NORM_BIAS_ARGUMENT = "bias" in inspect.signature(torch.nn.modules.batchnorm._NormBase.__init__).parameters


def bias_kwargs(has_bias: bool) -> dict:
    """Constructor keywords for a BatchNorm with or without a bias.

    Without the argument (torch < 2.13) the module is built with a bias and the caller sets
    it to None afterwards (``move_state`` does, by moving the original's ``None``).
    """
    return {} if has_bias or not BATCH_NORM_BIAS_ARGUMENT else {"bias": False}
