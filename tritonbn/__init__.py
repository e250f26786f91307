"""tritonbn: Batch Normalization in Triton, a drop-in for torch's BatchNorm.

Public API: ``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d``, ``SyncBatchNorm`` (subclasses of torch's),
``FrozenBatchNorm2d`` (torchvision's, in Triton),
``GroupNorm``, ``GroupNormAct``, ``InstanceNorm1d/2d/3d`` (torch's, in Triton),
``functional.batch_norm`` (torch's signature),
``convert_model`` / ``unconverted_batch_norms``, ``fuse_model``, ``backend_for`` (which
implementation runs on a tensor), ``zoo`` (timm's BatchNormAct counterparts) and ``kernels``
(the Triton kernels).
"""

from . import functional, kernels, zoo
from .backend import backend_for
from .convert import convert_model, unconverted_batch_norms
from .fuse import fuse_model
from .group_norm import GroupNorm, GroupNormAct, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .sync import SyncBatchNorm
from .zoo import FrozenBatchNorm2d

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "FrozenBatchNorm2d",
    "GroupNorm",
    "GroupNormAct",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "SyncBatchNorm",
    "backend_for",
    "convert_model",
    "functional",
    "fuse_model",
    "kernels",
    "unconverted_batch_norms",
    "zoo",
]
