"""tritonbn: Batch Normalization in Triton, a drop-in for torch's BatchNorm.

Public API: ``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d``, ``SyncBatchNorm`` (subclasses of torch's),
``functional.batch_norm`` (torch's signature), ``convert_model``, ``backend_for`` (which
implementation runs on a tensor) and ``kernels`` (the Triton kernels).
"""

from . import functional, kernels
from .backend import backend_for
from .convert import convert_model
from .fuse import fuse_model
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .sync import SyncBatchNorm

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "SyncBatchNorm",
    "backend_for",
    "convert_model",
    "functional",
    "fuse_model",
    "kernels",
]
