"""torch.autograd.gradcheck of tritonbn.functional.batch_norm in float64, and a float64 comparison
with a pure-torch formula reference.

gradcheck compares the analytical backward (tritonbn's backward kernels) with finite differences of
tritonbn's forward, with respect to input, weight and bias, in training (batch statistics) and in
eval (running statistics), for the three layouts the kernels read: NCS (N, C, H, W), channels_last
rows and (N, C) rows. Shapes are tiny: gradcheck runs the forward twice per input element, through
Triton's interpreter on a machine without a GPU. gradcheck's own defaults are the tolerances
(eps = 1e-6, atol = 1e-5, rtol = 1e-3).

The formula reference is torch code in float64 (mean, biased variance, 1 / sqrt(var + eps), its
autograd for the gradients, the unbiased variance for the running statistics); tritonbn must agree
to ``TOLERANCES[float64]`` (1e-10), scaled for gradients by the reduction size.
"""

import math

import pytest
import torch
from conftest import DEVICE, TOLERANCES, triton_ran

import tritonbn
from tritonbn import _launch, _layout

F64 = torch.float64

# (shape, memory format, the canonical view the kernels must read it through)
LAYOUTS = [
    ((3, 2, 3, 2), None, "ncs"),
    ((3, 2, 3, 2), torch.channels_last, "rows"),
    ((5, 3), None, "rows"),
]
LAYOUT_IDS = ["NCHW", "channels_last", "NC"]


def _random_input(shape, memory_format=None, requires_grad=False):
    """Per-channel means and scales far from 0 and 1."""
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    offsets = torch.randn(c, dtype=F64) * 3.0
    scales = torch.rand(c, dtype=F64) * 2.0 + 0.5
    x = (torch.randn(shape, dtype=F64) * scales.view(view) + offsets.view(view)).to(DEVICE)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    return x.requires_grad_(requires_grad)


def _params(c, requires_grad=False):
    weight = (torch.rand(c, dtype=F64) + 0.5).to(DEVICE).requires_grad_(requires_grad)
    bias = torch.randn(c, dtype=F64).to(DEVICE).requires_grad_(requires_grad)
    running_mean = torch.randn(c, dtype=F64).to(DEVICE)
    running_var = (torch.rand(c, dtype=F64) + 0.5).to(DEVICE)
    return weight, bias, running_mean, running_var


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,memory_format,kind", LAYOUTS, ids=LAYOUT_IDS)
def test_gradcheck_input_weight_bias(shape, memory_format, kind, training):
    torch.manual_seed(0)
    x = _random_input(shape, memory_format, requires_grad=True)
    weight, bias, running_mean, running_var = _params(shape[1], requires_grad=True)
    assert _layout.canonical_input(x)[1].kind == kind

    def fn(x, weight, bias):
        # gradcheck perturbs x in place: it must keep the layout under test
        assert memory_format is None or x.is_contiguous(memory_format=memory_format)
        # in training the running statistics are updated on every call and never read
        return tritonbn.functional.batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5)

    with triton_ran():
        assert torch.autograd.gradcheck(fn, (x, weight, bias), check_batched_grad=False)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_without_affine_parameters(training):
    torch.manual_seed(1)
    x = _random_input((3, 2, 4), requires_grad=True)
    _, _, running_mean, running_var = _params(2)
    stats = (None, None) if training else (running_mean, running_var)

    def fn(x):
        return tritonbn.functional.batch_norm(x, *stats, training=training)

    with triton_ran():
        assert torch.autograd.gradcheck(fn, (x,), check_batched_grad=False)


def test_gradcheck_with_respect_to_weight_and_bias_only():
    """Parameter gradients alone (the input does not require grad)."""
    torch.manual_seed(2)
    x = _random_input((3, 2, 3, 2), torch.channels_last)
    weight, bias, _, _ = _params(2, requires_grad=True)

    def fn(weight, bias):
        return tritonbn.functional.batch_norm(x, None, None, weight, bias, training=True)

    with triton_ran():
        assert torch.autograd.gradcheck(fn, (weight, bias), check_batched_grad=False)


# ----------------------------------------------------------------------------------------------
# float64 formula reference
# ----------------------------------------------------------------------------------------------


def _reference(x, weight, bias, running_mean, running_var, training, momentum, eps):
    """y, and the running statistics after the call, from torch's definition, in float64."""
    dims = [0] + list(range(2, x.dim()))
    view = [1, -1] + [1] * (x.dim() - 2)
    if training:
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        unbiased = x.detach().var(dims, unbiased=True)
        new_mean = (1 - momentum) * running_mean + momentum * mean.detach()
        new_var = (1 - momentum) * running_var + momentum * unbiased
    else:
        mean, var = running_mean, running_var
        new_mean, new_var = running_mean, running_var
    y = (x - mean.view(view)) / torch.sqrt(var.view(view) + eps)
    if weight is not None:
        y = y * weight.view(view)
    if bias is not None:
        y = y + bias.view(view)
    return y, new_mean, new_var


REFERENCE_LAYOUTS = [
    ((4, 3, 5, 6), None, "NCHW"),
    ((4, 3, 5, 6), torch.channels_last, "channels_last"),
    ((7, 5), None, "NC"),
    ((3, 4, 7), None, "NCL"),
    ((2, 3, 2, 3, 4), None, "NCDHW"),
    ((2, 3, 2, 3, 4), torch.channels_last_3d, "channels_last_3d"),
]
# The split routes (partial statistics) differ from the fused ones only in training.
SPLIT_LAYOUTS = [
    ((3, 2, 110, 110), None, "NCHW-split"),  # long channels, uneven chunks of the batch
    ((20000, 3), None, "NC-split"),  # tall (N, C)
]
REFERENCE_CASES = [
    pytest.param(shape, memory_format, training, affine,
                 id=f"{name}-{'train' if training else 'eval'}-{'affine' if affine else 'no-affine'}")
    for shape, memory_format, name in REFERENCE_LAYOUTS
    for training in (True, False)
    for affine in (True, False)
] + [pytest.param(shape, memory_format, True, True, id=f"{name}-train-affine")
     for shape, memory_format, name in SPLIT_LAYOUTS]


@pytest.mark.parametrize("shape,memory_format,training,affine", REFERENCE_CASES)
def test_float64_matches_formula_reference(shape, memory_format, training, affine):
    torch.manual_seed(3)
    x = _random_input(shape, memory_format, requires_grad=True)
    weight, bias, running_mean, running_var = _params(shape[1], requires_grad=True)
    if not affine:
        weight = bias = None
    ours_mean, ours_var = running_mean.clone(), running_var.clone()
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref, b_ref = (None, None) if not affine else (weight.detach().clone().requires_grad_(True),
                                                    bias.detach().clone().requires_grad_(True))
    momentum, eps = 0.2, 1e-4

    with triton_ran():
        y = tritonbn.functional.batch_norm(x, ours_mean, ours_var, weight, bias, training, momentum, eps)
    y_ref, mean_ref, var_ref = _reference(x_ref, w_ref, b_ref, running_mean, running_var, training, momentum, eps)
    atol, rtol = TOLERANCES[F64]
    assert y.dtype == F64 and y.stride() == y_ref.stride()
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(ours_mean, mean_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(ours_var, var_ref, atol=atol, rtol=rtol)

    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    with triton_ran():
        y.backward(dy)
    count = x.numel() // x.shape[1]
    torch.testing.assert_close(x.grad, x_ref.grad, atol=atol * 10, rtol=rtol * 10)
    if affine:
        # sums over count elements of O(1) terms
        torch.testing.assert_close(weight.grad, w_ref.grad, atol=atol * math.sqrt(count) * 10, rtol=rtol * 10)
        torch.testing.assert_close(bias.grad, b_ref.grad, atol=atol * math.sqrt(count) * 10, rtol=rtol * 10)


def test_reference_cases_cover_every_route():
    routes = {_launch.route(_random_input(shape, memory_format))
              for shape, memory_format, _ in REFERENCE_LAYOUTS + SPLIT_LAYOUTS}
    assert routes == {"ncs-one-launch", "ncs-split", "rows-one-launch", "rows-split"}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", [None, "relu", "silu"])
def test_gradgradcheck_float64(training, activation):
    """Second derivatives (gradient penalties, MAML), as torch's BatchNorm supports them."""
    torch.manual_seed(5)
    x = (torch.randn(3, 2, 3, 2, device=DEVICE, dtype=torch.float64) + 0.3).requires_grad_(True)
    r = torch.randn_like(x).requires_grad_(True)
    w = (torch.rand(2, device=DEVICE, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(2, device=DEVICE, dtype=torch.float64).requires_grad_(True)
    rm = torch.randn(2, device=DEVICE, dtype=torch.float64)
    rv = torch.rand(2, device=DEVICE, dtype=torch.float64) + 0.5

    def fn(x, r, w, b):
        if activation is None:
            return tritonbn.functional.batch_norm(x, None if training else rm, None if training else rv, w, b,
                                                  training=training) + r
        return tritonbn.functional.batch_norm_act(x, None if training else rm, None if training else rv, w, b,
                                                  training=training, activation=activation, residual=r)

    with triton_ran():
        assert torch.autograd.gradgradcheck(fn, (x, r, w, b), eps=1e-6, atol=1e-5, fast_mode=True)
