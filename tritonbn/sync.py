"""SyncBatchNorm: batch statistics across processes, on torch.distributed.

Forward, per step and layer:

1. Triton computes this process's per-channel (count, mean, M2) (``_launch.batch_stats``).
2. ONE collective: ``all_gather`` of the packed [2C + 1] partials (mean, M2, count) into
   [world, 2C + 1], the same volume as torch's SyncBatchNorm (mean, invstd, count).
   Not an ``all_reduce`` of sums: summed (count, sum x, sum x^2) would bring back the
   E[x^2] - E[x]^2 cancellation that the kernels avoid, while gathered (count, mean, M2)
   are merged by Chan's formula, stable for any mean. Each process receives
   world * (2C + 1) float32 values: 16 KB per layer for C = 256 on 8 processes.
3. A Triton kernel merges the partials in rank order (deterministic), then the normalise
   kernel writes y. Processes may hold different batch sizes, including zero.
4. Running statistics use the global count, which only the device knows: no host sync.

Backward: local sum(dy) and sum(dy * xhat) by Triton, ONE ``all_reduce`` of the [2, C]
sums, then the Triton dx kernel with the global means. dgamma and dbeta are the local
sums, exactly as in torch (DistributedDataParallel averages them).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from . import _launch
from ._checks import check_batch_norm_args, check_eps
from ._ops import direct_backward
from .backend import TORCH_NATIVE, backend_for
from .modules import batch_norm_state, module_batch_norm

__all__ = ["SyncBatchNorm"]

# Fixed by how torch was built: read once, not on every call of every layer.
_DISTRIBUTED = dist.is_available()


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum, num_batches_tracked,
                process_group, world_size):
        count = input.shape[0] * math.prod(input.shape[2:])
        mean, _, var = _launch.batch_stats(input, eps)  # the [3, C] rows
        channels = mean.numel()
        local = torch.cat([mean, var * count, mean.new_full((1,), count)])
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=process_group)
        parts = torch.stack(gathered)  # [world, 2C + 1]
        counts = parts[:, 2 * channels:].expand(world_size, channels)
        stats = _launch.combine_stats(counts, parts[:, :channels], parts[:, channels:2 * channels], eps)
        global_count = counts.sum(dim=0)
        output = _launch.normalize(input, weight, bias, stats)
        if running_mean is not None:
            _launch.update_running_stats(running_mean, running_var, stats[0], stats[2], num_batches_tracked,
                                         0.0 if momentum is None else momentum, count, device_count=global_count,
                                         count_batch=num_batches_tracked is not None and momentum is not None)
        elif num_batches_tracked is not None and momentum is not None:
            num_batches_tracked.add_(1)  # no running statistics to update, yet a batch to count
        ctx.save_for_backward(input, weight, stats, global_count)
        ctx.process_group = process_group
        ctx.has_bias = bias is not None
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, stats, global_count = ctx.saved_tensors
        sums = _launch.grad_sums(grad_output, input, stats)  # [2, C]: sum dy, sum dy * xhat
        grad_weight = sums[1].to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sums[0].to(weight.dtype if weight is not None else sums.dtype) if ctx.has_bias else None
        global_sums = sums.clone()
        dist.all_reduce(global_sums, group=ctx.process_group)
        global_means = global_sums / global_count.clamp(min=1.0)
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = _launch.dx_from_sums(grad_output, input, weight, stats, global_means[0], global_means[1])
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


direct_backward(_SyncBatchNormFunction)


class SyncBatchNorm(torch.nn.SyncBatchNorm):
    r"""Batch Normalization with statistics synchronised across processes, in Triton.

    A drop-in for :class:`torch.nn.SyncBatchNorm` (same arguments and state_dict). In
    training, with an initialised process group of more than one process, mean and variance
    are over the whole distributed batch; otherwise (no process group, world size 1, eval)
    it behaves as :class:`tritonbn.BatchNorm2d` (torch's rule). One ``all_gather`` of
    [2C + 1] per-process statistics crosses the network in forward, one ``all_reduce`` of
    [2, C] sums in backward: the same volume as torch's SyncBatchNorm.

    Args:
        num_features: C from an input of size ``(N, C, +)``.
        eps, momentum, affine, track_running_stats: as in :class:`torch.nn.BatchNorm2d`.
        process_group: the group to synchronise over; the default group when ``None``.

    Shape:
        - Input: ``(N, C, +)``
        - Output: same shape, dtype and memory format as the input

    Example::

        >>> # under torchrun, after dist.init_process_group("nccl")
        >>> model = tritonbn.SyncBatchNorm.convert_sync_batchnorm(model)
    """

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if input.shape[1] == 0:  # torch's _check_non_zero_input_channels (its size(1) costs more)
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        # torch's rule: no initialised default group, no synchronisation (a module built with a
        # group and then used without torch.distributed behaves as a plain BatchNorm); nor in eval.
        if not (self.training and _DISTRIBUTED and dist.is_initialized()):
            return module_batch_norm(self, input)  # which checks every argument before anything changes
        process_group = self.process_group or dist.group.WORLD
        world_size = dist.get_world_size(process_group)
        if world_size == 1:
            return module_batch_norm(self, input)
        running_mean, running_var, weight, bias, bn_training, num_batches_tracked = batch_norm_state(self)
        need_sync = backend_for(input) != TORCH_NATIVE
        # Synchronised statistics have no one-value rule: other processes add values.
        check_batch_norm_args(input, running_mean, running_var, weight, bias, bn_training and not need_sync)
        check_eps(self.eps, bn_training)  # torch's rule applies to synchronised statistics too
        if not need_sync:
            # CPU without the interpreter: torch's own SyncBatchNorm does the work (and counts).
            return super().forward(input)
        if num_batches_tracked is not None and self.momentum is None:
            num_batches_tracked.add_(1)  # a cumulative average reads the count: the host counts first
        return _SyncBatchNormFunction.apply(input, weight, bias, running_mean, running_var, self.eps,
                                            self.momentum, num_batches_tracked, process_group, world_size)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Replace every BatchNorm (torch's, timm's or tritonbn's) in ``module`` by a tritonbn SyncBatchNorm.

        ``tritonbn.convert_model(module, sync=True, process_group=process_group)``: parameters
        and buffers move over as the same objects; requires_grad, device, dtype, a missing
        bias (``bias=False``) and the training flag are kept, as in
        :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`. Unlike torch's, a module's
        activation is kept (timm's BatchNormAct2d, tritonbn's BatchNormAct*d become
        :class:`tritonbn.zoo.SyncBatchNormDropAct`), and a subclass that overrides a method
        is left alone with a warning instead of losing its forward.

        Args:
            module: the model (any depth; may itself be a BatchNorm).
            process_group: the group to synchronise over; the default group when ``None``.

        Returns:
            ``module`` converted in place, or the new module when ``module`` is a BatchNorm.
        """
        from .convert import convert_tree

        return convert_tree(module, sync=True, process_group=process_group, caller="convert_sync_batchnorm")
