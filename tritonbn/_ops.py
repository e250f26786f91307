"""The torch.library ops (what torch.compile traces) and the eager autograd function.

Eager calls take ``BatchNormFunction``, a ``torch.autograd.Function`` over the launchers
(tritonbn/_launch.py), with the running-statistics update folded into the forward's last
kernel: the custom-op dispatch costs more host time than most BatchNorm layers take on the
GPU. Under ``torch.compile`` (tritonbn/functional.py decides) three ops:

* ``tritonbn::batch_norm_fwd`` (functional, differentiable): y = act(BN(x) + residual) and
  the statistics used ([3, C]: mean, rstd, biased variance);
* ``tritonbn::batch_norm_bwd`` (functional): dx, dweight, dbias, dresidual;
* ``tritonbn::update_running_stats_`` (mutates the running buffers, not differentiable).

The running-stat update is a separate op because ``custom_op`` refuses ``register_autograd``
on an op that mutates an input; keeping the differentiable op pure also means autotuning
and recomputation can never apply the update twice. Each op has a fake implementation, so
``torch.compile(fullgraph=True)`` traces through without a graph break.

Backward saves x, the parameters and the statistics; with a fused activation also the output
(relu: its sign is the mask) or the residual (silu, leaky_relu: z is recomputed). No mask or
pre-activation tensor is ever stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _launch
from ._checks import ACTIVATIONS
from ._layout import canonical_input


@torch.library.custom_op("tritonbn::batch_norm_fwd", mutates_args=())
def batch_norm_fwd(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
    residual: Tensor | None,
    activation: int,
    slope: float,
) -> tuple[Tensor, Tensor]:
    y, stats, _ = _launch.forward(input, weight, bias, running_mean, running_var, training, eps, residual, activation,
                                  slope)
    return y, stats


@batch_norm_fwd.register_fake
def _batch_norm_fwd_fake(input, weight, bias, running_mean, running_var, training, eps, residual, activation, slope):
    dense, _ = canonical_input(input)
    return torch.empty_like(dense), input.new_empty((3, input.shape[1]), dtype=_launch.accumulation_dtype(input.dtype))


@torch.library.custom_op("tritonbn::batch_norm_bwd", mutates_args=())
def batch_norm_bwd(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    stats: Tensor,
    training: bool,
    param_grads: bool,
    param_dtype: torch.dtype,
    residual: Tensor | None,
    activation: int,
    slope: float,
    residual_grad: bool,
    residual_is_output: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _launch.backward(grad_output, input, weight, bias, stats, training, param_grads, param_dtype, residual,
                             activation, slope, residual_grad, residual_is_output)
    # The schema returns a Tensor: an empty one when no residual gradient is wanted.
    return grads if residual_grad else (*grads[:3], input.new_empty(0))


@batch_norm_bwd.register_fake
def _batch_norm_bwd_fake(grad_output, input, weight, bias, stats, training, param_grads, param_dtype, residual,
                         activation, slope, residual_grad, residual_is_output):
    dense, _ = canonical_input(input)
    size = input.shape[1] if (param_grads or training) else 0
    grads = input.new_empty(size, dtype=param_dtype)
    dresidual = torch.empty_like(dense) if residual_grad else input.new_empty(0)
    return torch.empty_like(dense), grads, torch.empty_like(grads), dresidual


@torch.library.custom_op("tritonbn::update_running_stats_", mutates_args=("running_mean", "running_var"))
def update_running_stats_(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    num_batches_tracked: Tensor | None,
    momentum: float,
    count: int,
) -> None:
    _launch.update_running_stats(running_mean, running_var, mean, var, num_batches_tracked, momentum, count)


@update_running_stats_.register_fake
def _update_running_stats_fake(running_mean, running_var, mean, var, num_batches_tracked, momentum, count):
    return None


def _setup_context(ctx, inputs, output) -> None:
    input, weight, bias, _, _, training, eps, residual, activation, slope = inputs
    y, stats = output
    ctx.mark_non_differentiable(stats)  # nothing differentiates them
    # The op's outputs, detached: on ctx directly they would hold the graph node that holds ctx.
    _save_for_backward(ctx, input, weight, bias, residual, y, stats.detach(), activation)
    ctx.info = _launch.BackwardInfo(input, weight, bias, residual, training, eps, activation, slope)


def _save_for_backward(ctx, input, weight, bias, residual, y, stats, activation) -> None:
    # relu's act'(z) needs only z's sign, which its output has: torch's relu saves its output
    # too, so the same tensors stay alive and an in-place change of y fails backward in both.
    # Holding the residual instead could keep a tensor alive that torch frees (a downsample
    # branch's output). silu and leaky_relu save their input in torch (y may be changed in
    # place afterwards): z is recomputed here from x and the residual.
    kept = y if activation == ACTIVATIONS["relu"] else (residual if activation else None)
    # The kernels read the bias only to recompute a pre-activation (torch's batch_norm does not
    # save it); the second-derivative path differentiates through it (ctx.bias: an input of
    # the op, so holding it makes no reference cycle).
    ctx.save_for_backward(input, weight, bias if activation else None, kept)
    ctx.bias = bias
    # Intermediates (neither inputs nor outputs of the op's graph node): kept on ctx directly.
    ctx.stats = stats


def _grads(ctx, info: _launch.BackwardInfo, grad_output, launch_backward, residual_index: int,
           *launch_options) -> tuple:
    """(grad input, grad weight, grad bias, grad residual), None where not wanted.

    Inputs: input 0, weight 1, bias 2, the residual at residual_index. launch_options go to
    launch_backward.
    """
    if torch.is_grad_enabled():
        # create_graph=True: a gradient of this gradient is wanted (gradient penalties, MAML).
        return _differentiable_backward(ctx, info, grad_output, residual_index)
    input, weight, bias, kept = ctx.saved_tensors
    needs = ctx.needs_input_grad
    needs_input, needs_weight, needs_bias, needs_residual = needs[0], needs[1], needs[2], needs[residual_index]
    if grad_output is None:
        grad_output = torch.zeros_like(input)
    grad_residual_wanted = bool(needs_residual and info.has_residual)
    grad_input, grad_weight, grad_bias, grad_residual = launch_backward(
        grad_output, input, weight, bias, ctx.stats, info.training, needs_weight or needs_bias, info.param_dtype,
        kept, info.activation, info.slope, grad_residual_wanted, info.mask_from_output, *launch_options,
    )
    return (
        grad_input if needs_input else None,
        grad_weight if needs_weight else None,
        grad_bias if needs_bias else None,
        grad_residual if grad_residual_wanted else None,
    )


def _backward(ctx, grad_output, _grad_stats):
    grad_input, grad_weight, grad_bias, grad_residual = _grads(ctx, ctx.info, grad_output,
                                                               torch.ops.tritonbn.batch_norm_bwd, 7)
    return grad_input, grad_weight, grad_bias, None, None, None, None, grad_residual, None, None


class BatchNormFunction(torch.autograd.Function):
    """The eager path: the same launchers and kernels as the ops above, without the custom-op
    dispatch (which costs more host time than the kernels take on the GPU for most layers).

    ``apply(input, weight, bias, spec)``, spec = (plan, running_mean, running_var,
    num_batches_tracked); with a residual, ``BatchNormResidualFunction``. Few arguments and
    saved tensors, because Function.apply's own cost grows with them. The launch plan
    (``_launch.forward_plan``) is looked up by the caller, which has checked every argument
    through it; under functorch transforms spec's first item is the plan's other arguments
    instead, (training, eps, activation, slope, momentum), and the plan is looked up here, on
    what forward receives. Forward runs the plan with the running-statistics update folded
    into its last kernel; only y is an output, so no graph is built for the statistics.
    torch.compile takes the ops instead (functional.py decides).
    """

    @staticmethod
    def forward(ctx, input, weight, bias, spec, residual=None):
        plan, running_mean, running_var, num_batches_tracked = spec
        if type(plan) is tuple:
            plan = _launch.forward_plan(input, weight, bias, running_mean, running_var, *plan,
                                        num_batches_tracked=num_batches_tracked)
        launch = plan.direct
        if launch is not None and (plan.device_index < 0 or current_cuda_device() == plan.device_index):
            # The usual training call (one launch, which also updates the running statistics and
            # counts the batch), here rather than in run_forward: it runs on every step of every
            # layer. Its outputs come from the plan's fast allocator, on the input's device.
            allocate = plan.allocate
            y = allocate(*plan.y_layout)
            stats = allocate(*plan.stats_layout)  # mean, rstd, biased var
            if _launch.poison_outputs:
                y, stats = _launch.poisoned(y, stats)
            ctx.stats = stats
            launch.enqueue(input, y, y if residual is None else residual,
                           stats if weight is None else weight.contiguous(),
                           stats if bias is None else bias.contiguous(), stats, running_mean, running_var,
                           stats if num_batches_tracked is None else num_batches_tracked)
        else:
            y, ctx.stats = _launch.run_forward(plan, input, weight, bias, running_mean, running_var, residual,
                                               num_batches_tracked)
        if plan.activation:
            _save_for_backward(ctx, input, weight, bias, residual, y, ctx.stats, plan.activation)
        else:
            # _save_for_backward without an epilogue: x and the weight only (saved_inputs pads
            # them); the bias on ctx, for the second-derivative path.
            ctx.save_for_backward(input, weight)
            ctx.bias = bias
        ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, grad_output):
        """(grad input, grad weight, grad bias, grad residual): the last, None without a
        residual, stands for spec's None here and is the residual's for BatchNormResidualFunction."""
        plan = ctx.plan
        if torch.is_grad_enabled():
            # create_graph=True: a gradient of this gradient is wanted.
            return _differentiable_backward(ctx, plan.backward_info, grad_output, 3)
        saved = ctx.saved_tensors
        if len(saved) == 2:
            (input, weight), bias, kept = saved, None, None
        else:
            input, weight, bias, kept = saved
        # Which gradients are wanted and dy's layout pick the backward plan: looked up in the
        # forward plan's own dict (the forward plan's key holds everything else about them).
        needs = ctx.needs_input_grad
        key = (needs, grad_output.stride(), grad_output.dtype, grad_output.data_ptr() % _launch.ALIGNMENT,
               deterministic_algorithms())
        found = plan.backward_plans.get(key)
        if found is None:
            found = plan.backward_plans[key] = _eager_backward_plan(plan, needs, grad_output, input, weight, bias,
                                                                   kept)
        backward_plan, all_wanted = found
        launch = backward_plan.direct
        if launch is not None and all_wanted and (backward_plan.device_index < 0
                                                  or current_cuda_device() == backward_plan.device_index):
            # The usual call (one launch, nothing copied), here rather than in run_backward: it runs
            # on every step of every layer. Gradients from the plan's fast allocator.
            stats = ctx.stats
            allocate = backward_plan.allocate
            dx = allocate(*backward_plan.dx_layout)
            dweight = allocate(*backward_plan.grads_layout)
            dbias = allocate(*backward_plan.grads_layout)
            if _launch.poison_outputs:
                dx, dweight, dbias = _launch.poisoned(dx, dweight, dbias)
            launch.enqueue(input, grad_output, dx, dx if kept is None else kept, dx,
                           stats if weight is None else weight.contiguous(),
                           stats if bias is None else bias.contiguous(), stats, dweight, dbias)
            return dx, dweight, dbias, None
        grads = _launch.run_backward(backward_plan, grad_output, input, weight, bias, ctx.stats, kept)
        if all_wanted:
            return grads
        return tuple(grad if wanted else None for grad, wanted in zip(grads, needs[:4]))


class BatchNormResidualFunction(torch.autograd.Function):
    """BatchNormFunction with a residual added before the activation:
    ``apply(input, weight, bias, residual, spec)``."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, spec):
        return BatchNormFunction.forward(ctx, input, weight, bias, spec, residual)

    @staticmethod
    def backward(ctx, grad_output):
        return (*BatchNormFunction.backward(ctx, grad_output), None)


deterministic_algorithms = torch._C._get_deterministic_algorithms
current_cuda_device = _launch.current_cuda_device


def _eager_backward_plan(plan, needs, grad_output, input, weight, bias, kept) -> tuple:
    """(backward plan, whether every gradient it computes is wanted) for BatchNormFunction.
    needs[3] is the residual's (BatchNormResidualFunction) or spec's (never wanted)."""
    info = plan.backward_info
    residual_grad = bool(needs[3] and info.has_residual)
    backward_plan = _launch.backward_plan(
        grad_output, input, weight, bias, info.training, needs[1] or needs[2], info.param_dtype, kept,
        info.activation, info.slope, residual_grad, info.mask_from_output, deterministic_algorithms())
    computed = (True, True, True, residual_grad)  # run_backward's dweight and dbias: empty when not wanted
    return backward_plan, all(wanted or not done for wanted, done in zip(needs[:4], computed))


def c_apply(function: type) -> object:
    """``function``'s torch._C._FunctionBase.apply: Function.apply without its Python wrapper
    (torch < 2.14), which binds arguments for setup_context (tritonbn's Functions define none)
    and routes functorch transforms; torch 2.14 made Function.apply this very method."""
    return torch._C._FunctionBase.__dict__["apply"].__get__(None, function)


def direct_backward(function: type) -> None:
    """Have the autograd engine call ``function.backward`` itself.

    The engine calls a node's ``apply``; torch's (BackwardCFunction.apply) first looks, in
    Python, for a ``vjp`` and a boxed-gradients flag, which tritonbn's Functions do not define,
    and then calls ``backward``: the same call, one frame and three lookups later."""
    assert function.vjp is torch.autograd.Function.vjp and not getattr(function, "boxed_grads_call", False)
    function._backward_cls.apply = function.backward


batch_norm_function_apply = c_apply(BatchNormFunction)
residual_function_apply = c_apply(BatchNormResidualFunction)
direct_backward(BatchNormFunction)
direct_backward(BatchNormResidualFunction)
transforms_active = torch._C._are_functorch_transforms_active
unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def _differentiable_backward(ctx, info: _launch.BackwardInfo, grad_output, residual_index: int):
    """The backward as torch operations that autograd can differentiate again.

    The forward is recomputed with torch's own ops (batch statistics through
    F.batch_norm, which supports double backward; eval with the saved statistics as
    constants), then differentiated with create_graph. Slower than the kernels; only taken
    when a second derivative is asked for.
    """
    saved = ctx.saved_tensors
    input, weight, _, kept = saved if len(saved) == 4 else (*saved, None, None)  # BatchNormFunction saves 2
    bias = ctx.bias
    # The saved tensors themselves (not detached copies): the gradients returned must stay
    # connected to the original inputs for the second derivative to reach them.
    x, w, b = input, weight, bias
    # The statistics and the output are outputs of the forward op: detached, or autograd would
    # walk back into this op's backward through them.
    mean, rstd = ctx.stats[0].detach(), ctx.stats[1].detach()
    view = [1, -1] + [1] * (input.dim() - 2)
    if info.training:
        z = F.batch_norm(x, None, None, w, b, True, 0.0, info.eps)
    else:
        z = (x - mean.view(view)) * rstd.view(view)
        z = z * w.view(view) if w is not None else z
        z = (z + b.view(view) if b is not None else z).to(input.dtype)
    residual = None
    if info.has_residual:
        # relu kept its output, not the residual: relu's mask does not depend on the residual's
        # value to first order, so a zero stand-in gives the right derivatives.
        if info.activation and not info.mask_from_output:
            residual = kept
        else:
            residual = torch.zeros_like(input).requires_grad_(ctx.needs_input_grad[residual_index])
        z = z + residual
    if info.activation == ACTIVATIONS["relu"] and info.mask_from_output:
        y = z * (kept.detach() > 0)
    else:
        y = torch_activation(z, info.activation, info.slope)
    needs = ctx.needs_input_grad
    return differentiable_grads(y, grad_output, [(x, needs[0]), (w, needs[1]), (b, needs[2]),
                                                 (residual, needs[residual_index])])


def torch_activation(z: Tensor, activation: int, slope: float) -> Tensor:
    """act(z) by torch's own ops, for an activation code (the second-derivative paths)."""
    if activation == ACTIVATIONS["relu"]:
        return F.relu(z)
    if activation == ACTIVATIONS["silu"]:
        return F.silu(z)
    if activation == ACTIVATIONS["leaky_relu"]:
        return F.leaky_relu(z, slope)
    return z


def differentiable_grads(y: Tensor, grad_output: Tensor, candidates: list) -> tuple:
    """Gradients of y with create_graph, one per (tensor, wanted) candidate, None where not
    wanted or not differentiable."""
    wanted = [t for t, needed in candidates if needed and t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(y, wanted, grad_output, create_graph=True, allow_unused=True))
    return tuple(next(grads) if needed and t is not None and t.requires_grad else None for t, needed in candidates)


batch_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
