"""convert_model: swap torch's BatchNorm modules for tritonbn's, in place."""

from __future__ import annotations

import torch

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["convert_model"]

_REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def _converted(module: torch.nn.Module) -> torch.nn.Module:
    replacement = _REPLACEMENTS.get(type(module))
    if replacement is None:
        return module
    new = replacement(
        module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
        device="meta",
    )
    return move_state(module, new)


def move_state(module: torch.nn.Module, new: torch.nn.Module) -> torch.nn.Module:
    """Give ``new`` (built on the meta device) ``module``'s parameters, buffers and mode."""
    # The same Parameter and buffer objects, so an optimizer built before the conversion
    # still updates the model, and device, dtype and requires_grad come along unchanged.
    if module.affine:
        new.weight = module.weight
        new.bias = module.bias
    new.running_mean = module.running_mean
    new.running_var = module.running_var
    new.num_batches_tracked = module.num_batches_tracked
    new.train(module.training)
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def convert_model(module: torch.nn.Module, sync: bool = False, process_group=None) -> torch.nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` by tritonbn's, in place.

    With ``sync=True``, every torch BatchNorm*d or SyncBatchNorm becomes a
    :class:`tritonbn.SyncBatchNorm` over ``process_group`` instead.

    Parameters and buffers (running statistics, ``num_batches_tracked``) are moved over as
    the same objects, keeping values, ``requires_grad``, device and dtype; the training flag
    is kept. Subclasses of torch's BatchNorm (including tritonbn's own and SyncBatchNorm)
    are left alone.

    Args:
        module: a model, at any depth of nesting; may itself be a BatchNorm.
        sync: convert to :class:`tritonbn.SyncBatchNorm`.
        process_group: with ``sync``, the group to synchronise over (default group if None).

    Returns:
        ``module`` converted in place, or the new module when ``module`` itself is a
        torch BatchNorm.

    Example::

        >>> model = torchvision.models.resnet50().cuda()
        >>> model = tritonbn.convert_model(model)
    """
    if sync:
        from .sync import SyncBatchNorm

        return SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    converted = _converted(module)
    if converted is not module:
        return converted
    for name, child in module.named_children():
        new_child = convert_model(child)
        if new_child is not child:
            module.add_module(name, new_child)
    return module
