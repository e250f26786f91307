"""torch 2.13+'s BatchNorm semantics on every torch version: the eps check and ``bias=False``.

eps: ``F.batch_norm`` raises ``ValueError("batch_norm eps must be positive during training,
but got 0.0")`` for eps <= 0 in training and "must be non-negative" for eps < 0 in eval. tritonbn
raises the same, before any state changes (torch's module bumps ``num_batches_tracked`` first),
whatever torch is installed; where the installed torch has the check, the messages are
compared with torch's own.

``bias=False`` (torch 2.13: a weight without a bias): through the modules, BatchNormAct,
SyncBatchNorm, convert_model, fuse_model and state_dict. Outputs are compared with torch within
``TOLERANCES[float32]``, input gradients within 4e-5 and parameter gradients (sums over the
batch) within 1e-4, as in test_modules_and_compile.py.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, TOLERANCES, no_torch_batch_norm, random_bn_input, randomize_batch_norm, triton_ran

import tritonbn
from tritonbn import _launch
from tritonbn._compat import BATCH_NORM_BIAS_ARGUMENT

ATOL, RTOL = TOLERANCES[torch.float32]
PAIRS = {
    1: (torch.nn.BatchNorm1d, tritonbn.BatchNorm1d),
    2: (torch.nn.BatchNorm2d, tritonbn.BatchNorm2d),
    3: (torch.nn.BatchNorm3d, tritonbn.BatchNorm3d),
}
SHAPES = {1: (6, 3, 5), 2: (3, 3, 4, 5), 3: (2, 3, 3, 2, 4)}

needs_bias_argument = pytest.mark.skipif(not BATCH_NORM_BIAS_ARGUMENT, reason="torch < 2.13 has no bias=False")


def _state(module):
    return [t.detach().clone() for t in [*module.parameters(), *module.buffers()]]


def _assert_same_state(module, before):
    for tensor, old in zip([*module.parameters(), *module.buffers()], before):
        assert torch.equal(tensor, old), "a rejected call changed the module's state"


def _torch_message(training, eps):
    """torch's own message where the installed torch checks eps, else None."""
    x = torch.randn(4, 3)
    try:
        F.batch_norm(x, torch.zeros(3), torch.ones(3), training=training, eps=eps)
    except ValueError as error:
        return str(error)
    return None


# (training, eps, message): torch 2.13's text.
BAD_EPS = [
    (True, 0.0, "batch_norm eps must be positive during training, but got 0.0"),
    (True, -1.0, "batch_norm eps must be positive during training, but got -1.0"),
    (True, 0, "batch_norm eps must be positive during training, but got 0"),  # an int: printed as torch does
    (False, -1e-5, "batch_norm eps must be non-negative, but got -1e-05"),
]
EPS_IDS = [f"{'train' if t else 'eval'}-eps={e!r}" for t, e, _ in BAD_EPS]


# ----------------------------------------------------------------------------------------------
# eps
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training,eps,message", BAD_EPS, ids=EPS_IDS)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_bad_eps_is_refused_before_any_state_change(dims, training, eps, message):
    module = randomize_batch_norm(PAIRS[dims][1](3, eps=eps)).to(DEVICE).train(training)
    x = random_bn_input(SHAPES[dims])
    before, launches = _state(module), _launch.launch_count
    with pytest.raises(ValueError) as info:
        module(x)
    assert str(info.value) == message
    expected = _torch_message(training, eps)
    if expected is not None:
        assert str(info.value) == expected
    assert _launch.launch_count == launches, "a rejected call must not launch a kernel"
    _assert_same_state(module, before)  # torch's own module has bumped num_batches_tracked by now


@pytest.mark.parametrize("training,eps,message", BAD_EPS, ids=EPS_IDS)
def test_bad_eps_everywhere_else(training, eps, message):
    x = random_bn_input((4, 3, 2, 2))
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    calls = {
        "functional": lambda: tritonbn.functional.batch_norm(x, rm, rv, training=training, eps=eps),
        "functional act": lambda: tritonbn.functional.batch_norm_act(x, rm, rv, training=training, eps=eps),
        "BatchNormAct2d": lambda: tritonbn.BatchNormAct2d(3, eps=eps).to(DEVICE).train(training)(x),
        "SyncBatchNorm": lambda: tritonbn.SyncBatchNorm(3, eps=eps).to(DEVICE).train(training)(x),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == message, name
    assert torch.equal(rm, torch.zeros(3, device=DEVICE)) and torch.equal(rv, torch.ones(3, device=DEVICE))


def test_one_value_per_channel_is_reported_before_eps_like_torch():
    module = tritonbn.BatchNorm1d(3, eps=0.0).to(DEVICE)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        module(torch.randn(1, 3, device=DEVICE))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_eps_zero_is_fine_in_eval_like_torch(dims):
    torch_cls, ours_cls = PAIRS[dims]
    ref = randomize_batch_norm(torch_cls(3, eps=0.0)).to(DEVICE).eval()  # running_var in [0.5, 2]: no 1/0
    ours = ours_cls(3, eps=0.0).to(DEVICE).eval()
    ours.load_state_dict(ref.state_dict())
    x = random_bn_input(SHAPES[dims])
    with triton_ran():
        out = ours(x)
    torch.testing.assert_close(out, ref(x), atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------------
# bias=False
# ----------------------------------------------------------------------------------------------


def _compare_train_step(ref, ours, shape, residual=False, act=None):
    """One training forward/backward of ref (torch) and ours; outputs, grads, running stats."""
    x = random_bn_input(shape)
    r = torch.randn(shape, device=DEVICE) if residual else None
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    y_ref = ref(xs[0])
    if r is not None:
        y_ref = y_ref + r
    y_ref = act(y_ref) if act is not None else y_ref
    with triton_ran(), no_torch_batch_norm():
        y = ours(xs[1], r) if r is not None else ours(xs[1])
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=RTOL)
    dy = torch.randn_like(y)
    y_ref.backward(dy)
    with triton_ran(), no_torch_batch_norm():
        y.backward(dy)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, atol=4e-5, rtol=4e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), atol=ATOL, rtol=RTOL)


@needs_bias_argument
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_bias_false_modules_match_torch(dims):
    torch_cls, ours_cls = PAIRS[dims]
    ref = randomize_batch_norm(torch_cls(3, bias=False)).to(DEVICE)
    ours = ours_cls(3, bias=False).to(DEVICE)
    assert ours.bias is None and repr(ours) == repr(ref)
    assert list(ours.state_dict()) == list(ref.state_dict()) and "bias" not in ours.state_dict()
    ours.load_state_dict(ref.state_dict())
    _compare_train_step(ref, ours, SHAPES[dims])
    ref.eval()
    ours.eval()
    x = random_bn_input(SHAPES[dims])
    with triton_ran():
        torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("activation,act", [("relu", F.relu), ("silu", F.silu)], ids=["relu", "silu"])
def test_bias_false_batch_norm_act(activation, act):
    """BatchNormAct2d(bias=False) on every torch: torch 2.13's argument, emulated before it."""
    ours = tritonbn.BatchNormAct2d(3, activation=activation, bias=False).to(DEVICE)
    assert ours.bias is None and "bias" not in ours.state_dict() and ours.weight is not None
    ref = torch.nn.BatchNorm2d(3).to(DEVICE)
    with torch.no_grad():
        ref.bias.zero_()  # the reference's bias is 0 and not trained: the same function
    ref.bias.requires_grad_(False)
    randomize_batch_norm(ours)
    with torch.no_grad():
        ref.weight.copy_(ours.weight)
        ref.running_mean.copy_(ours.running_mean)
        ref.running_var.copy_(ours.running_var)
        ref.num_batches_tracked.copy_(ours.num_batches_tracked)
        ref.bias.zero_()
    _compare_train_step(ref, ours, (3, 3, 4, 5), residual=True, act=act)


@needs_bias_argument
def test_bias_false_through_convert_fuse_and_state_dict():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4, bias=False), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4, bias=False),
    ).to(DEVICE)
    for index in (1, 4):
        randomize_batch_norm(model[index])
    x = random_bn_input((2, 3, 5, 5))
    expected = copy.deepcopy(model)(x)

    fused = tritonbn.fuse_model(copy.deepcopy(model))
    assert type(fused.get_submodule("1")) is tritonbn.BatchNormAct2d
    assert type(fused.get_submodule("4")) is tritonbn.BatchNorm2d
    converted = tritonbn.convert_model(copy.deepcopy(model))
    assert type(converted.get_submodule("1")) is tritonbn.BatchNorm2d
    for result in (fused, converted):
        bns = [result.get_submodule(name) for name in ("1", "4")]
        assert all(bn.bias is None and "bias=False" in repr(bn) for bn in bns)
        assert list(result.state_dict()) == list(model.state_dict())
        result.load_state_dict(model.state_dict())  # a torch checkpoint loads strictly, and back
        copy.deepcopy(model).load_state_dict(result.state_dict())
        with triton_ran(2), no_torch_batch_norm():
            out = result(x)
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)


@needs_bias_argument
def test_bias_false_sync_batch_norm_without_a_process_group():
    ref = randomize_batch_norm(torch.nn.BatchNorm2d(3, bias=False)).to(DEVICE)
    ours = tritonbn.SyncBatchNorm(3, bias=False).to(DEVICE)
    assert ours.bias is None and list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    _compare_train_step(ref, ours, (3, 3, 4, 5))
    converted = tritonbn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(3, bias=False)))
    assert type(converted[0]) is tritonbn.SyncBatchNorm and converted[0].bias is None
    assert "bias=False" in repr(converted[0])


def test_a_tensor_that_outlived_a_functorch_transform_works_as_in_torch():
    """The eager path calls autograd.Function's C++ apply directly (tritonbn/_ops.py): it must
    still unwrap a dead functorch wrapper, as Function.apply does, or reading its data fails."""
    x = torch.randn(4, 3, 5, device=DEVICE, dtype=torch.float64)
    leaked = []

    def capture(t):
        leaked.append(t)
        return t.sum()

    torch.func.grad(capture)(x)
    dead = leaked[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(dead)
    weight = torch.randn(3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    dy = torch.randn_like(x)
    with triton_ran():
        ours = tritonbn.functional.batch_norm(dead, None, None, weight, bias, training=True)
    ours_grads = torch.autograd.grad(ours, (weight, bias), dy)
    ref = F.batch_norm(x, None, None, weight, bias, training=True)
    ref_grads = torch.autograd.grad(ref, (weight, bias), dy)
    atol, rtol = TOLERANCES[torch.float64]
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol)
    for got, want in zip(ours_grads, ref_grads):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
