"""Moving a module's state onto its tritonbn replacement (convert_model, fuse_model, SyncBatchNorm)."""

from __future__ import annotations

import torch

# Hook registries shared with the replacement, so a hook (and its RemovableHandle) registered
# on the original keeps working: forward hooks on BatchNorms are a common way to read features.
_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def move_state(module: torch.nn.Module, new: torch.nn.Module) -> torch.nn.Module:
    """Give ``new`` (built on the meta device) ``module``'s parameters, buffers, mode and hooks.

    The same Parameter and buffer objects, so an optimizer built before the conversion still
    updates the model, and device, dtype and requires_grad come along unchanged. ``new`` ends
    with exactly ``module``'s direct parameters and buffers, in its own order, then any that
    only ``module`` has (a ``None`` bias stays ``None``): the state_dict keys are the same.
    Instance attributes ``new`` lacks (``qconfig``, a user's tags) are copied over.
    """
    params, buffers = module._parameters, module._buffers
    new._parameters = {
        **{key: params[key] for key in new._parameters if key in params},
        **{key: value for key, value in params.items() if key not in new._parameters},
    }
    new._buffers = {
        **{key: buffers[key] for key in new._buffers if key in buffers},
        **{key: value for key, value in buffers.items() if key not in new._buffers},
    }
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    new.training = module.training  # not train(): the children moved over keep their own flags
    for key, value in vars(module).items():
        if key.startswith("_") or key in vars(new):
            continue
        setattr(new, key, value)
    for key in _HOOK_DICTS:
        hooks = getattr(module, key, None)
        if hooks:
            setattr(new, key, hooks)
    return new
