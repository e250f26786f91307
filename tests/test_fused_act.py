"""Fused BatchNorm + residual + activation against the unfused torch sequence.

y = act(BN(x) + residual) must equal torch's BatchNorm, ``+ residual`` and the activation,
forward and backward (x, residual, weight, bias), with the same running statistics, for
every activation, both layouts and routes, low precision, and in float64 under gradcheck.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, TOLERANCES, triton_ran

import tritonbn

SLOPE = 0.2
REFERENCE_ACTIVATIONS = {
    None: lambda t: t,
    "relu": F.relu,
    "silu": F.silu,
    "leaky_relu": lambda t: F.leaky_relu(t, SLOPE),
}

# (shape, memory format, comment)
LAYOUTS = [
    ((4, 6, 5, 7), None, "ncs-one-launch"),
    ((4, 6, 5, 7), torch.channels_last, "rows-one-launch"),
    ((2, 3, 150, 150), None, "ncs-split"),
    ((9, 4, 60, 70), torch.channels_last, "rows-split"),
]


def _modules(channels, activation, dtype=torch.float32):
    ref = torch.nn.BatchNorm2d(channels).to(DEVICE, dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
        ref.running_mean.normal_()
        ref.running_var.uniform_(0.5, 2.0)
    ours = tritonbn.BatchNormAct2d(channels, activation=activation, negative_slope=SLOPE).to(DEVICE, dtype)
    ours.load_state_dict(ref.state_dict())  # a BatchNorm checkpoint loads into the fused module
    return ref, ours


def _away_from_kink(ref, x, residual, activation):
    """x with no pre-activation within 1e-3 of 0, where relu's mask is decided by rounding.

    Any implementation that recomputes z = BN(x) + residual (as tritonbn's backward does, and
    torch's own kernels round differently) may flip the mask of an element whose z is a few
    ulps from 0; such elements would compare two equally valid gradients.
    """
    if activation not in ("relu", "leaky_relu"):
        return x
    with torch.no_grad():
        z = torch.nn.functional.batch_norm(x, None, None, ref.weight, ref.bias, True) if ref.training else ref(x)
        if residual is not None:
            z = z + residual
        near = z.abs() < 1e-3
        return torch.where(near, x + 0.01 * torch.sign(ref.weight.view(1, -1, 1, 1)), x)


def _run_pair(ref, ours, activation, x, residual, dtype):
    x = _away_from_kink(ref, x, residual, activation)
    inputs_ref = [x.detach().clone().requires_grad_(True)]
    inputs_ours = [x.detach().clone().requires_grad_(True)]
    if residual is not None:
        inputs_ref.append(residual.detach().clone().requires_grad_(True))
        inputs_ours.append(residual.detach().clone().requires_grad_(True))
    z = ref(inputs_ref[0])
    if residual is not None:
        z = z + inputs_ref[1]
    y_ref = REFERENCE_ACTIVATIONS[activation](z)
    with triton_ran():
        y = ours(*inputs_ours)
    dy = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, inputs_ref + [ref.weight, ref.bias], dy)
    with triton_ran():
        grads = torch.autograd.grad(y, inputs_ours + [ours.weight, ours.bias], dy)
    return y, y_ref, grads, grads_ref


# Every activation with and without a residual on the fused routes; the split routes (larger
# inputs, slow in the interpreter) with the two ResNet/EfficientNet cases.
CASES = [(act, res, layout) for act in (None, "relu", "silu", "leaky_relu") for res in (False, True)
         for layout in LAYOUTS[:2]]
CASES += [("relu", True, layout) for layout in LAYOUTS[2:]] + [("silu", False, layout) for layout in LAYOUTS[2:]]


@pytest.mark.parametrize("activation,with_residual,layout", CASES,
                         ids=[f"{lay[2]}-{act}-{'residual' if res else 'plain'}" for act, res, lay in CASES])
def test_matches_unfused_torch(activation, with_residual, layout):
    shape, memory_format, _ = layout
    torch.manual_seed(0)
    fmt = memory_format or torch.contiguous_format
    for training in (True, False):
        ref, ours = _modules(shape[1], activation)
        ref.train(training)
        ours.train(training)
        x = (torch.randn(shape, device=DEVICE) * 2 + 1).contiguous(memory_format=fmt)
        residual = torch.randn(shape, device=DEVICE).contiguous(memory_format=fmt) if with_residual else None
        y, y_ref, grads, grads_ref = _run_pair(ref, ours, activation, x, residual, torch.float32)
        assert y.stride() == y_ref.stride()
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        names = ["dx"] + (["dresidual"] if with_residual else []) + ["dweight", "dbias"]
        m = x.numel() / x.shape[1]
        for name, got, want in zip(names, grads, grads_ref):
            # dweight/dbias sum M terms: absolute error grows like sqrt(M).
            atol = 1e-5 * (m**0.5 if name in ("dweight", "dbias") else 4)
            torch.testing.assert_close(got, want, atol=atol, rtol=1e-5,
                                       msg=lambda m: f"{name} (training={training}): {m}")
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_low_precision_against_float64(dtype, activation):
    """The fused output may differ from float64 by at most about torch's own error in dtype."""
    torch.manual_seed(1)
    shape = (4, 6, 9, 7)
    ref, ours = _modules(shape[1], activation)
    ours = ours.to(dtype)
    ref64 = ref.double()
    x = (torch.randn(shape, device=DEVICE) * 2 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(shape, device=DEVICE).to(dtype)
    with triton_ran():
        y = ours(x, residual)
    y64 = REFERENCE_ACTIVATIONS[activation](ref64(x.double()) + residual.double())
    torch_y = REFERENCE_ACTIVATIONS[activation](F.batch_norm(
        x, None, None, ref.weight.to(dtype), ref.bias.to(dtype), True) + residual)
    err = (y.double() - y64).abs().max().item()
    torch_err = (torch_y.double() - y64).abs().max().item()
    assert err <= 2 * torch_err + TOLERANCES[dtype][0], (err, torch_err)


def test_functional_batch_norm_act_and_errors():
    torch.manual_seed(2)
    x = torch.randn(5, 4, 3, 3, device=DEVICE) * 3
    r = torch.randn_like(x)
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    rm2, rv2 = rm.clone(), rv.clone()
    with triton_ran():
        y = tritonbn.functional.batch_norm_act(x, rm, rv, training=True, activation="silu", residual=r)
    y_ref = F.silu(F.batch_norm(x, rm2, rv2, training=True) + r)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)
    with pytest.raises(ValueError, match="activation"):
        tritonbn.functional.batch_norm_act(x, rm, rv, training=True, activation="gelu")
    with pytest.raises(ValueError, match="shape"):
        tritonbn.functional.batch_norm_act(x, rm, rv, training=True, residual=r[:, :2])
    with pytest.raises(TypeError, match="dtype"):
        tritonbn.functional.batch_norm_act(x, rm, rv, training=True, residual=r.double())
    torch.testing.assert_close(rm, rm2)  # rejected calls changed nothing
    with pytest.raises(ValueError, match="activation"):
        tritonbn.BatchNormAct2d(4, activation="tanh")
    assert "activation='leaky_relu', negative_slope=0.2" in repr(tritonbn.BatchNormAct2d(4, activation="leaky_relu",
                                                                                          negative_slope=0.2))


@pytest.mark.parametrize("activation", ["relu", "silu", "leaky_relu"])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(activation, training):
    torch.manual_seed(3)
    x = (torch.randn(3, 2, 3, 2, device=DEVICE, dtype=torch.float64) + 0.3).requires_grad_(True)
    r = torch.randn_like(x).requires_grad_(True)
    w = (torch.rand(2, device=DEVICE, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(2, device=DEVICE, dtype=torch.float64).requires_grad_(True)
    rm = torch.randn(2, device=DEVICE, dtype=torch.float64)
    rv = torch.rand(2, device=DEVICE, dtype=torch.float64) + 0.5

    def fn(x, r, w, b):
        return tritonbn.functional.batch_norm_act(x, None if training else rm, None if training else rv, w, b,
                                                  training=training, activation=activation, residual=r,
                                                  negative_slope=SLOPE)

    with triton_ran():
        assert torch.autograd.gradcheck(fn, (x, r, w, b), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "silu", "leaky_relu"])
def test_no_new_tensor_saved_for_backward(activation):
    """Backward keeps x and the output (relu) or the residual (silu, leaky_relu): tensors that
    exist anyway. Never a mask or a pre-activation of its own."""
    x = torch.randn(4, 3, 5, 5, device=DEVICE, requires_grad=True)
    r = torch.randn(4, 3, 5, 5, device=DEVICE, requires_grad=True)
    bn = tritonbn.BatchNormAct2d(3, activation=activation).to(DEVICE)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), triton_ran():
        y = bn(x, r)
    large = {t.data_ptr() for t in saved if t.numel() == x.numel()}
    expected = {x.data_ptr(), y.data_ptr() if activation == "relu" else r.data_ptr()}
    assert large == expected


def test_output_may_change_in_place_after_leaky_relu_like_torch():
    # torch's leaky_relu saves its input, so y += 1 before backward is legal; it must stay so.
    x = torch.randn(4, 3, 5, 5, device=DEVICE, requires_grad=True)
    bn = tritonbn.BatchNormAct2d(3, activation="leaky_relu").to(DEVICE)
    with triton_ran():
        y = bn(x)
        y += 1
        y.sum().backward()
    assert torch.isfinite(x.grad).all()
