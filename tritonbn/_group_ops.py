"""GroupNorm / InstanceNorm: the torch.library ops (what torch.compile traces) and the eager
autograd function, both over tritonbn/_group_launch.py's launchers.

* ``tritonbn::group_norm_fwd`` (functional, differentiable): y = act(GN(x) + residual) and
  the per-(sample, group) mean, rstd and biased variance;
* ``tritonbn::group_norm_bwd`` (functional): dx, dweight, dbias, dresidual;
* ``tritonbn::instance_norm_running_stats_`` (mutates the running buffers, not
  differentiable): InstanceNorm's running-statistics update, a separate op because
  ``custom_op`` refuses ``register_autograd`` on an op that mutates an input, and so that it
  can never be applied twice.

Eager calls take ``GroupNormFunction`` (no custom-op dispatch: less host time).
Backward saves x, the parameters, the statistics, and with a fused activation the residual
(z is recomputed from them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _group_launch
from ._launch import accumulation_dtype
from ._layout import canonical_input
from ._ops import c_apply, differentiable_grads, direct_backward, torch_activation, transforms_active, unwrap_if_dead


@torch.library.custom_op("tritonbn::group_norm_fwd", mutates_args=())
def group_norm_fwd(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual: Tensor | None,
    activation: int,
    slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _group_launch.forward(input, num_groups, weight, bias, eps, residual, activation, slope)


@group_norm_fwd.register_fake
def _group_norm_fwd_fake(input, num_groups, weight, bias, eps, residual, activation, slope):
    dense, _ = canonical_input(input)
    stats = input.new_empty(input.shape[0] * num_groups, dtype=accumulation_dtype(input.dtype))
    return torch.empty_like(dense), stats, torch.empty_like(stats), torch.empty_like(stats)


@torch.library.custom_op("tritonbn::group_norm_bwd", mutates_args=())
def group_norm_bwd(
    grad_output: Tensor,
    input: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    param_grads: bool,
    param_dtype: torch.dtype,
    residual: Tensor | None,
    activation: int,
    slope: float,
    residual_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _group_launch.backward(grad_output, input, num_groups, weight, bias, mean, rstd, param_grads, param_dtype,
                                   residual, activation, slope, residual_grad)
    # The schema returns a Tensor: an empty one when no residual gradient is wanted.
    return grads if residual_grad else (*grads[:3], input.new_empty(0))


@group_norm_bwd.register_fake
def _group_norm_bwd_fake(grad_output, input, num_groups, weight, bias, mean, rstd, param_grads, param_dtype, residual,
                         activation, slope, residual_grad):
    dense, _ = canonical_input(input)
    grads = input.new_empty(input.shape[1] if param_grads else 0, dtype=param_dtype)
    dresidual = torch.empty_like(dense) if residual_grad else input.new_empty(0)
    return torch.empty_like(dense), grads, torch.empty_like(grads), dresidual


@torch.library.custom_op("tritonbn::instance_norm_running_stats_", mutates_args=("running_mean", "running_var"))
def instance_norm_running_stats_(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    n: int,
    momentum: float,
    count: int,
) -> None:
    _group_launch.update_instance_running_stats(running_mean, running_var, mean, var, n, momentum, count)


@instance_norm_running_stats_.register_fake
def _instance_norm_running_stats_fake(running_mean, running_var, mean, var, n, momentum, count):
    return None


def _setup_context(ctx, inputs, output) -> None:
    input, num_groups, weight, bias, eps, residual, activation, slope = inputs
    _, mean, rstd, var = output
    ctx.mark_non_differentiable(mean, rstd, var)
    _save_for_backward(ctx, input, num_groups, weight, bias, residual, mean.detach(), rstd.detach(), eps, activation,
                       slope)


def _save_for_backward(ctx, input, num_groups, weight, bias, residual, mean, rstd, eps, activation, slope) -> None:
    # The residual is needed only to recompute z for act'(z).
    ctx.save_for_backward(input, weight, bias, residual if activation else None)
    ctx.stats = (mean, rstd)  # intermediates: kept on ctx directly
    ctx.num_groups = num_groups
    ctx.eps = eps
    ctx.activation = activation
    ctx.slope = slope
    ctx.has_residual = residual is not None
    param = weight if weight is not None else bias
    ctx.param_dtype = param.dtype if param is not None else accumulation_dtype(input.dtype)


def _grads(ctx, grad_output, launch_backward, residual_index: int) -> tuple:
    """(grad input, grad weight, grad bias, grad residual), None where not wanted."""
    if torch.is_grad_enabled():
        # create_graph=True: a gradient of this gradient is wanted.
        return _differentiable_backward(ctx, grad_output, residual_index)
    input, weight, bias, residual = ctx.saved_tensors
    mean, rstd = ctx.stats
    needs = ctx.needs_input_grad
    needs_weight, needs_bias = needs[2], needs[3]
    residual_wanted = bool(needs[residual_index] and ctx.has_residual)
    if grad_output is None:
        grad_output = torch.zeros_like(input)
    dx, dweight, dbias, dresidual = launch_backward(
        grad_output, input, ctx.num_groups, weight, bias, mean, rstd, needs_weight or needs_bias, ctx.param_dtype,
        residual, ctx.activation, ctx.slope, residual_wanted)
    return (dx if needs[0] else None, dweight if needs_weight else None, dbias if needs_bias else None,
            dresidual if residual_wanted else None)


def _differentiable_backward(ctx, grad_output, residual_index: int) -> tuple:
    """The backward as torch operations (F.group_norm recomputed, then differentiated with
    create_graph), for a second derivative. Slower than the kernels; only taken then."""
    input, weight, bias, residual = ctx.saved_tensors
    z = F.group_norm(input, ctx.num_groups, weight, bias, ctx.eps)
    needs = ctx.needs_input_grad
    if ctx.has_residual:
        if residual is None:  # not saved without an activation: z's derivative does not need its value
            residual = torch.zeros_like(input).requires_grad_(needs[residual_index])
        z = z + residual
    y = torch_activation(z, ctx.activation, ctx.slope)
    return differentiable_grads(y, grad_output, [(input, needs[0]), (weight, needs[2]), (bias, needs[3]),
                                                 (residual, needs[residual_index])])


def _backward(ctx, grad_output, _grad_mean, _grad_rstd, _grad_var):
    # inputs: input 0, num_groups 1, weight 2, bias 3, eps 4, residual 5, activation 6, slope 7
    dx, dweight, dbias, dresidual = _grads(ctx, grad_output, torch.ops.tritonbn.group_norm_bwd, 5)
    return dx, None, dweight, dbias, None, dresidual, None, None


group_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


class GroupNormFunction(torch.autograd.Function):
    """The eager path: group_norm_fwd's launcher without the custom-op dispatch.

    ``apply(input, num_groups, weight, bias, residual, spec)``, spec = (eps, activation,
    slope, running), running = (running_mean, running_var, momentum) for InstanceNorm's
    tracked statistics, else None: updated once, after the forward kernels.
    """

    @staticmethod
    def forward(ctx, input, num_groups, weight, bias, residual, spec):
        eps, activation, slope, running = spec
        y, mean, rstd, var = _group_launch.forward(input, num_groups, weight, bias, eps, residual, activation, slope,
                                                   keep_var=running is not None)
        if running is not None:
            update_instance_running_stats(input, running, mean, var)
        _save_for_backward(ctx, input, num_groups, weight, bias, residual, mean, rstd, eps, activation, slope)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        # inputs: input 0, num_groups 1, weight 2, bias 3, residual 4, spec 5
        dx, dweight, dbias, dresidual = _grads(ctx, grad_output, _group_launch.backward, 4)
        return dx, None, dweight, dbias, dresidual, None


_function_apply = c_apply(GroupNormFunction)
direct_backward(GroupNormFunction)


def apply_group_norm(input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
                     residual: Tensor | None, spec: tuple) -> Tensor:
    """``GroupNormFunction.apply`` without its Python wrapper (as tritonbn/functional.py's
    _batch_norm calls BatchNormFunction): dead functorch wrappers unwrapped, transforms take
    the wrapper."""
    if transforms_active():
        return GroupNormFunction.apply(input, num_groups, weight, bias, residual, spec)
    return _function_apply(
        unwrap_if_dead(input), num_groups,
        None if weight is None else unwrap_if_dead(weight),
        None if bias is None else unwrap_if_dead(bias),
        None if residual is None else unwrap_if_dead(residual),
        spec,
    )


def update_instance_running_stats(input: Tensor, running: tuple, mean: Tensor, var: Tensor) -> None:
    """InstanceNorm's running-statistics update from the forward's [N * C] statistics."""
    running_mean, running_var, momentum = running
    count = input.numel() // max(input.shape[0] * input.shape[1], 1)
    if torch.compiler.is_compiling():
        torch.ops.tritonbn.instance_norm_running_stats_(running_mean, running_var, mean, var, input.shape[0],
                                                         momentum, count)
    else:
        _group_launch.update_instance_running_stats(running_mean, running_var, mean, var, input.shape[0], momentum,
                                                    count)
