"""Bad input gets torch's kind of error and changes nothing; NaN and empty batches behave like torch.

Every rejected call is checked three ways: the exception has torch's exact type (and torch's
exact message where torch's message does not depend on the device), no tritonbn kernel was
launched, and running_mean, running_var, num_batches_tracked, weight and bias are bit-identical
afterwards. torch itself bumps ``num_batches_tracked`` before it validates the input; tritonbn
promises not to, and these tests hold it to that.

torch's reference errors are always produced on the CPU (its messages there are the canonical
ones); tritonbn runs on ``DEVICE``. A device mismatch is a ``meta`` tensor on the CPU and a CPU
tensor on CUDA.

Tolerances: float32 outputs and running statistics against torch within ``TOLERANCES`` (1e-5);
float16 within its ``TOLERANCES`` entry.
"""

import contextlib
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, TOLERANCES, random_bn_input, randomize_batch_norm, triton_ran

import tritonbn
from tritonbn import _launch

OTHER_DEVICE = "meta" if DEVICE == "cpu" else "cpu"

PAIRS = {
    1: (torch.nn.BatchNorm1d, tritonbn.BatchNorm1d),
    2: (torch.nn.BatchNorm2d, tritonbn.BatchNorm2d),
    3: (torch.nn.BatchNorm3d, tritonbn.BatchNorm3d),
}
# A valid input shape for each module kind, with 3 channels.
VALID_SHAPE = {1: (4, 3, 5), 2: (3, 3, 4, 5), 3: (2, 3, 3, 4, 2)}


_random_input = random_bn_input


_randomize = randomize_batch_norm


def _pair(dims, num_features=3, **kwargs):
    """torch's module on the CPU and tritonbn's on DEVICE, with the same random state."""
    torch_cls, ours_cls = PAIRS[dims]
    ref = _randomize(torch_cls(num_features, **kwargs))
    ours = ours_cls(num_features, **kwargs).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _snapshot(*items):
    """Clones of every parameter and buffer of the modules / of the tensors given (not meta ones)."""
    tensors = []
    for item in items:
        if isinstance(item, torch.nn.Module):
            tensors += [t for _, t in item.named_parameters()] + [t for _, t in item.named_buffers()]
        elif item is not None:
            tensors.append(item)
    return [(t, t.detach().clone()) for t in tensors if t.device.type != "meta"]


def _assert_unchanged(snapshot):
    for tensor, before in snapshot:
        assert tensor.dtype == before.dtype and tensor.shape == before.shape
        # bit-identical, not merely equal: compare the bytes
        assert torch.equal(tensor.detach().reshape(-1).view(torch.uint8), before.reshape(-1).view(torch.uint8)), (
            f"state changed by a rejected call: {before} -> {tensor}"
        )


def _torch_error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info.value


def _assert_rejected_like_torch(ours_fn, torch_fn, state, exact_message=True):
    """ours_fn raises torch_fn's exception type (and message), launches nothing and changes no state."""
    expected = _torch_error(torch_fn)
    snapshot = _snapshot(*state)
    launches = _launch.launch_count
    with pytest.raises(Exception) as info:
        ours_fn()
    assert type(info.value) is type(expected), f"{type(info.value).__name__}: {info.value}; torch: {expected!r}"
    if exact_message:
        assert str(info.value) == str(expected)
    assert _launch.launch_count == launches, "a rejected call must not launch a kernel"
    _assert_unchanged(snapshot)
    return info.value


def _assert_close(actual, expected, dtype=torch.float32, **kwargs):
    atol, rtol = TOLERANCES[dtype]
    kwargs = {"atol": atol, "rtol": rtol, **kwargs}
    torch.testing.assert_close(actual.cpu(), expected.cpu(), **kwargs)


# ----------------------------------------------------------------------------------------------
# input rank
# ----------------------------------------------------------------------------------------------

BAD_RANKS = [(1, (3,)), (1, (2, 3, 4, 4)), (2, (2, 3)), (2, (2, 3, 4)), (2, (2, 3, 2, 2, 2)),
             (3, (2, 3, 4, 4)), (3, (2, 3, 2, 2, 2, 2))]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dims,shape", BAD_RANKS, ids=[f"BatchNorm{d}d-{len(s)}D" for d, s in BAD_RANKS])
def test_wrong_rank_is_a_value_error_with_torchs_message(dims, shape, training):
    ref, ours = _pair(dims)
    ref.train(training)
    ours.train(training)
    x = _random_input(shape, device="cpu") if len(shape) > 1 else torch.randn(shape)
    error = _assert_rejected_like_torch(lambda: ours(x.to(DEVICE)), lambda: ref(x), [ours])
    assert isinstance(error, ValueError)
    assert str(error).startswith("expected ") and f"(got {len(shape)}D input)" in str(error)


# ----------------------------------------------------------------------------------------------
# one value per channel
# ----------------------------------------------------------------------------------------------

ONE_VALUE = [(1, (1, 3)), (1, (1, 3, 1)), (2, (1, 3, 1, 1)), (3, (1, 3, 1, 1, 1))]


@pytest.mark.parametrize("dims,shape", ONE_VALUE, ids=[str(s) for _, s in ONE_VALUE])
def test_training_with_one_value_per_channel_is_rejected(dims, shape):
    ref, ours = _pair(dims)
    x = _random_input(shape, device="cpu")
    error = _assert_rejected_like_torch(lambda: ours(x.to(DEVICE)), lambda: ref(x), [ours])
    assert str(error) == f"Expected more than 1 value per channel when training, got input size {torch.Size(shape)}"
    # torch counted the rejected batch; tritonbn did not
    assert int(ref.num_batches_tracked) == 6 and int(ours.num_batches_tracked) == 5
    # the functional form is rejected the same way
    _assert_rejected_like_torch(
        lambda: tritonbn.functional.batch_norm(x.to(DEVICE), ours.running_mean, ours.running_var, training=True),
        lambda: F.batch_norm(x, ref.running_mean.clone(), ref.running_var.clone(), training=True),
        [ours],
    )


@pytest.mark.parametrize("dims,shape", ONE_VALUE, ids=[str(s) for _, s in ONE_VALUE])
def test_one_value_per_channel_is_fine_in_eval(dims, shape):
    ref, ours = _pair(dims)
    ref.eval()
    ours.eval()
    x = _random_input(shape, device="cpu")
    with triton_ran():
        y = ours(x.to(DEVICE))
    _assert_close(y, ref(x))


# ----------------------------------------------------------------------------------------------
# channel count
# ----------------------------------------------------------------------------------------------

FLAGS = [(True, True), (True, False), (False, True)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine,track", FLAGS, ids=[f"affine={a}-track={t}" for a, t in FLAGS])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_wrong_channel_count_is_a_runtime_error_and_counts_nothing(dims, affine, track, training):
    ref, ours = _pair(dims, affine=affine, track_running_stats=track)
    ref.train(training)
    ours.train(training)
    shape = list(VALID_SHAPE[dims])
    shape[1] = 4
    x = _random_input(tuple(shape), device="cpu")
    # torch's message names the first mismatching tensor; the order is tested separately below.
    error = _assert_rejected_like_torch(lambda: ours(x.to(DEVICE)), lambda: ref(x), [ours], exact_message=False)
    assert "should contain 4 elements not 3" in str(error)
    if training and track:
        assert int(ref.num_batches_tracked) == 6, "torch bumps num_batches_tracked before it checks"
    assert ours.num_batches_tracked is None or int(ours.num_batches_tracked) == 5


def test_wrong_channel_count_message_names_running_mean_like_torch():
    """BUG (tritonbn/_checks.py, check_batch_norm_args): the sizes are checked in the order
    weight, bias, running_mean, running_var; torch checks running_mean, running_var, weight,
    bias. A module fed the wrong channel count therefore says "weight should contain 4
    elements not 3" where torch says "running_mean should contain 4 elements not 3".
    Fix: iterate over (running_mean, running_var, weight, bias)."""
    ref, ours = _pair(2)
    x = _random_input((2, 4, 3, 3), device="cpu")
    _assert_rejected_like_torch(lambda: ours(x.to(DEVICE)), lambda: ref(x), [ours])


# ----------------------------------------------------------------------------------------------
# dtype
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool], ids=str)
def test_integer_input_is_not_implemented(dtype, training):
    ref, ours = _pair(2)
    ref.train(training)
    ours.train(training)
    x = torch.randint(0, 5, (2, 3, 3, 4)).to(dtype)
    error = _assert_rejected_like_torch(lambda: ours(x.to(DEVICE)), lambda: ref(x), [ours])
    assert isinstance(error, NotImplementedError)
    rm, rv = ours.running_mean, ours.running_var
    _assert_rejected_like_torch(
        lambda: tritonbn.functional.batch_norm(x.to(DEVICE), rm, rv, ours.weight, ours.bias, training),
        lambda: F.batch_norm(x, ref.running_mean.clone(), ref.running_var.clone(), ref.weight, ref.bias, training),
        [ours],
    )


def test_complex_input_message_spells_the_dtype_like_torch():
    """BUG (tritonbn/_checks.py, _dtype_name): complex inputs are named 'complex64' where torch
    says '"batch_norm" not implemented for 'ComplexFloat''. Fix: add ComplexHalf / ComplexFloat /
    ComplexDouble (and any other non-float dtypes) to the spelling table."""
    x = torch.randn(2, 3, 3, 3, dtype=torch.complex64)
    _assert_rejected_like_torch(lambda: tritonbn.functional.batch_norm(x.to(DEVICE), None, None, training=True),
                                lambda: F.batch_norm(x, None, None, training=True), [])


# (input dtype, the dtype given to one parameter or buffer): combinations torch refuses.
MIXED = [
    (torch.float32, torch.float16, "weight"),
    (torch.float32, torch.float16, "bias"),
    (torch.float32, torch.float16, "running_mean"),
    (torch.float32, torch.float64, "weight"),
    (torch.float32, torch.float64, "running_var"),
    (torch.float64, torch.float32, "weight"),
    (torch.float16, torch.float64, "running_mean"),
    (torch.bfloat16, torch.float16, "weight"),
]


def _functional_args(c, dtype, device):
    return {
        "running_mean": torch.randn(c, dtype=dtype, device=device),
        "running_var": torch.rand(c, dtype=dtype, device=device) + 0.5,
        "weight": torch.rand(c, dtype=dtype, device=device) + 0.5,
        "bias": torch.randn(c, dtype=dtype, device=device),
    }


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype,param_dtype,name", MIXED, ids=[f"{d}-{n}:{p}" for d, p, n in MIXED])
def test_mixed_dtype_parameters_torch_refuses_are_refused(dtype, param_dtype, name, training):
    x = _random_input((3, 3, 2, 4), dtype=dtype, device="cpu")
    args = _functional_args(3, dtype if dtype == torch.float64 else torch.float32, "cpu")
    args[name] = args[name].to(param_dtype)
    ours_args = {k: v.to(DEVICE) for k, v in args.items()}
    _assert_rejected_like_torch(
        lambda: tritonbn.functional.batch_norm(x.to(DEVICE), training=training, **ours_args),
        lambda: F.batch_norm(x, training=training, **{k: v.clone() for k, v in args.items()}),
        list(ours_args.values()),
        exact_message=False,  # torch's wording is device-specific ("mixed dtype (CPU): ...")
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_input_with_float32_parameters_is_allowed_like_torch(dtype):
    x = _random_input((4, 3, 3, 5), dtype=dtype, device="cpu")
    args = _functional_args(3, torch.float32, "cpu")
    ours_args = {k: v.to(DEVICE) for k, v in args.items()}
    expected = F.batch_norm(x.float(), training=True, **args)  # torch's float32 math, our output rounds once
    with triton_ran():
        y = tritonbn.functional.batch_norm(x.to(DEVICE), training=True, **ours_args)
    assert y.dtype == dtype
    _assert_close(y.float(), expected, dtype)
    _assert_close(ours_args["running_mean"], args["running_mean"])
    _assert_close(ours_args["running_var"], args["running_var"])


# ----------------------------------------------------------------------------------------------
# device
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_tensor_on_another_device_is_refused(name, training):
    x = _random_input((3, 3, 2, 4), device="cpu")
    args = _functional_args(3, torch.float32, "cpu")
    ref_args = dict(args, **{name: args[name].to("meta")})
    ours_args = {k: v.to(OTHER_DEVICE if k == name else DEVICE) for k, v in args.items()}
    _assert_rejected_like_torch(
        lambda: tritonbn.functional.batch_norm(x.to(DEVICE), training=training, **ours_args),
        lambda: F.batch_norm(x, training=training, **ref_args),
        list(ours_args.values()),
        exact_message=DEVICE == "cpu",
    )


@pytest.mark.parametrize("name", ["running_var", "bias"])
def test_module_with_a_buffer_on_another_device_counts_nothing(name):
    ref, ours = _pair(2)
    for module, device in ((ref, "meta"), (ours, OTHER_DEVICE)):
        moved = getattr(module, name).detach().to(device)
        setattr(module, name, torch.nn.Parameter(moved) if name == "bias" else moved)
    x = _random_input((2, 3, 3, 4), device="cpu")
    _assert_rejected_like_torch(lambda: ours(x.to(DEVICE)), lambda: ref(x), [ours], exact_message=DEVICE == "cpu")
    assert int(ref.num_batches_tracked) == 6 and int(ours.num_batches_tracked) == 5


# ----------------------------------------------------------------------------------------------
# functional: sizes and missing statistics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("shape", [(3, 3, 2, 4), (5, 3)], ids=["NCHW", "NC"])
def test_wrong_buffer_size_via_functional(shape, name, size, training):
    x = _random_input(shape, device="cpu")
    args = _functional_args(3, torch.float32, "cpu")
    args[name] = torch.rand(size) + 0.5
    ours_args = {k: v.to(DEVICE) for k, v in args.items()}
    error = _assert_rejected_like_torch(
        lambda: tritonbn.functional.batch_norm(x.to(DEVICE), training=training, **ours_args),
        lambda: F.batch_norm(x, training=training, **{k: v.clone() for k, v in args.items()}),
        list(ours_args.values()),
    )
    assert str(error) == f"{name} should contain 3 elements not {size}"


def test_eval_without_running_stats_via_functional():
    x = _random_input((3, 3, 2, 4), device="cpu")
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    ours_w, ours_b = w.to(DEVICE), b.to(DEVICE)
    error = _assert_rejected_like_torch(
        lambda: tritonbn.functional.batch_norm(x.to(DEVICE), None, None, ours_w, ours_b, training=False),
        lambda: F.batch_norm(x, None, None, w, b, training=False),
        [ours_w, ours_b],
    )
    assert isinstance(error, RuntimeError) and str(error) == "running_mean must be defined in evaluation mode"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("missing", ["running_mean", "running_var"])
def test_only_one_running_statistic_is_refused_like_torch(missing, training):
    """BUG (tritonbn/_checks.py, check_batch_norm_args): with exactly one of running_mean /
    running_var given, torch raises ValueError("running_mean and running_var must either both be
    None or neither be None") in training and RuntimeError("running_var must be defined in
    evaluation mode") (or running_mean) in eval; tritonbn raises RuntimeError("running_mean and
    running_var must be given together") in both. Fix: in training raise ValueError with torch's
    message; in eval raise RuntimeError(f"{missing} must be defined in evaluation mode")."""
    x = _random_input((3, 3, 2, 4), device="cpu")
    args = _functional_args(3, torch.float32, "cpu")
    args[missing] = None
    ours_args = {k: (v.to(DEVICE) if v is not None else None) for k, v in args.items()}
    _assert_rejected_like_torch(
        lambda: tritonbn.functional.batch_norm(x.to(DEVICE), training=training, **ours_args),
        lambda: F.batch_norm(x, training=training, **{k: (v.clone() if v is not None else None)
                                                      for k, v in args.items()}),
        [v for v in ours_args.values() if v is not None],
    )


# ----------------------------------------------------------------------------------------------
# NaN stays in its channel
# ----------------------------------------------------------------------------------------------

NAN_CASES = [((4, 5, 3, 4), None), ((4, 5, 3, 4), torch.channels_last), ((9, 5), None), ((3, 5, 2, 3, 2), None)]


@pytest.mark.parametrize("shape,memory_format", NAN_CASES, ids=["NCHW", "channels_last", "NC", "NCDHW"])
def test_nan_in_one_channel_stays_in_that_channel(shape, memory_format):
    dims = {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]
    ref, ours = _pair(dims, num_features=shape[1])
    x = _random_input(shape, device="cpu", memory_format=memory_format)
    bad = 2
    index = (1, bad) + (0,) * (len(shape) - 2)
    x[index] = float("nan")
    others = [c for c in range(shape[1]) if c != bad]
    x_ref = x.clone().requires_grad_(True)
    x_ours = x.to(DEVICE).requires_grad_(True)
    y_ref = ref(x_ref)
    with triton_ran():
        y_ours = ours(x_ours)
    assert torch.isnan(y_ours[:, bad]).all() and torch.isnan(y_ref[:, bad]).all()
    assert torch.isfinite(y_ours[:, others]).all()
    _assert_close(y_ours[:, others], y_ref[:, others])
    for name in ("running_mean", "running_var"):
        ours_stat, ref_stat = getattr(ours, name), getattr(ref, name)
        assert torch.isnan(ours_stat[bad]) and torch.isnan(ref_stat[bad])
        assert torch.isfinite(ours_stat[others]).all()
        _assert_close(ours_stat[others], ref_stat[others])
    dy = torch.randn(shape)
    y_ref.backward(dy)
    with triton_ran():
        y_ours.backward(dy.to(DEVICE))
    assert torch.isfinite(x_ours.grad[:, others]).all()
    _assert_close(x_ours.grad[:, others], x_ref.grad[:, others], atol=4e-5)
    for name in ("weight", "bias"):
        grad = getattr(ours, name).grad
        assert torch.isfinite(grad[others]).all()
        _assert_close(grad[others], getattr(ref, name).grad[others], atol=1e-4)
    # eval is elementwise: with finite running statistics, exactly the NaN element is NaN
    ours.load_state_dict(_randomize(ref).state_dict())
    ref.eval()
    ours.eval()
    with triton_ran():
        y_eval = ours(x.to(DEVICE))
    assert torch.equal(torch.isnan(y_eval).cpu(), torch.isnan(x))
    _assert_close(y_eval, ref(x), equal_nan=True)


# ----------------------------------------------------------------------------------------------
# empty batch
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _through_tritonbn(monkeypatch):
    """Empty inputs launch no kernel, so triton_ran cannot prove the path: instead torch's native
    batch norm is made to fail and tritonbn's launcher must be reached."""
    calls = []

    def _forbidden(*args, **kwargs):
        raise AssertionError("torch's native batch norm ran")

    def _spy(original):
        def spy(*args, **kwargs):
            calls.append(original.__name__)
            return original(*args, **kwargs)
        return spy

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "batch_norm", _forbidden)
        patch.setattr(torch, "batch_norm", _forbidden)
        patch.setattr(_launch, "run_forward", _spy(_launch.run_forward))
        patch.setattr(_launch, "run_backward", _spy(_launch.run_backward))
        yield calls


EMPTY = [(1, (0, 3), None), (1, (0, 3, 5), None), (2, (0, 3, 4, 4), None), (2, (0, 3, 4, 4), torch.channels_last),
         (3, (0, 3, 2, 3, 2), None)]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum=0.1", "momentum=None"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dims,shape,memory_format", EMPTY, ids=["NC", "NCL", "NCHW", "channels_last", "NCDHW"])
def test_empty_batch_like_torch(dims, shape, memory_format, training, momentum, monkeypatch):
    ref, ours = _pair(dims, momentum=momentum)
    ref.train(training)
    ours.train(training)
    x = torch.randn(shape)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    x_ref = x.clone().requires_grad_(True)
    y_ref = ref(x_ref)
    y_ref.sum().backward()
    stats = _snapshot(ours.running_mean, ours.running_var)

    x_ours = x.to(DEVICE).requires_grad_(True)
    with _through_tritonbn(monkeypatch) as calls:
        y = ours(x_ours)
        y.sum().backward()
    assert calls == ["run_forward", "run_backward"], "tritonbn's launchers (not torch) handled the empty batch"
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert y.stride() == y_ref.stride()
    # torch leaves the running statistics alone on an empty batch and still counts it
    _assert_unchanged(stats)
    assert torch.equal(ref.running_mean, ours.running_mean.cpu()) and torch.equal(ref.running_var,
                                                                                 ours.running_var.cpu())
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == (6 if training else 5)
    assert x_ours.grad.shape == shape
    for name in ("weight", "bias"):
        grad = getattr(ours, name).grad
        assert torch.equal(grad.cpu(), torch.zeros(3)) and torch.equal(getattr(ref, name).grad, torch.zeros(3))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_via_functional(training, monkeypatch):
    x = torch.randn(0, 3, 2, 2, device=DEVICE)
    args = _functional_args(3, torch.float32, DEVICE)
    snapshot = _snapshot(*args.values())
    with _through_tritonbn(monkeypatch) as calls:
        y = tritonbn.functional.batch_norm(x, training=training, **args)
    assert calls == ["run_forward"]
    assert y.shape == (0, 3, 2, 2)
    _assert_unchanged(snapshot)


ZERO_SPATIAL = [(1, (2, 3, 0)), (2, (2, 3, 0, 4)), (2, (2, 3, 4, 0))]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dims,shape", ZERO_SPATIAL, ids=[str(s) for _, s in ZERO_SPATIAL])
def test_zero_spatial_extent_is_an_empty_batch(dims, shape, training):
    """BUG (tritonbn/_layout.py, _view_of / canonical_input): a contiguous input with N > 0 and an
    empty spatial dimension, e.g. (2, 3, 0), has no canonical view (s == 0 is neither the NCS
    case, s > 1, nor the rows or s == 1 cases), so canonical_input fails its assertion "a
    contiguous tensor always has a canonical view". torch returns an empty output, leaves the
    running statistics alone and counts the batch. Fix: return a trivial view (or have
    _launch.forward / backward and the fake ops return early) whenever x.numel() == 0."""
    ref, ours = _pair(dims)
    ref.train(training)
    ours.train(training)
    x = torch.randn(shape)
    x_ref = x.clone().requires_grad_(True)
    y_ref = ref(x_ref)
    y_ref.sum().backward()
    x_ours = x.to(DEVICE).requires_grad_(True)
    y = ours(x_ours)
    y.sum().backward()
    assert y.shape == shape
    _assert_close(ours.running_mean, ref.running_mean, rtol=0, atol=0)
    _assert_close(ours.running_var, ref.running_var, rtol=0, atol=0)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
    assert torch.equal(ours.weight.grad.cpu(), torch.zeros(3))


# The batch counter: counted by the kernel that updates the running statistics (fixed
# momentum), by the host first where the kernel cannot (momentum=None reads the count; running
# buffers that are not contiguous take the standalone update; no running buffers at all).
ROUTE_CASES = {
    "ncs-one-launch": ((3, 3, 4, 5), None),
    "rows-one-launch": ((3, 3, 4, 5), torch.channels_last),
    "ncs-split": ((2, 3, 150, 150), None),
    "rows-split": ((64, 3, 24, 24), torch.channels_last),
}
COUNTED = [(route, path) for route in ROUTE_CASES for path in ("autograd", "no_grad", "fused")] + [
    (route, path) for route in ("ncs-one-launch", "ncs-split") for path in ("strided_buffers", "no_buffers", "sync")]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum=0.1", "momentum=None"])
@pytest.mark.parametrize("route,path", COUNTED, ids=[f"{r}-{p}" for r, p in COUNTED])
def test_batches_are_counted_like_torch(route, path, momentum):
    """num_batches_tracked after three training steps and one eval step equals torch's on every
    route and path, and so do the outputs and running statistics (momentum=None blends by it).
    torch's module runs in float64 (its float32 CPU kernels are the less accurate side at
    these batch sizes: about 1e-5 off on the rows-split case, tritonbn 7e-7)."""
    ref, ours = _pair(2, momentum=momentum)
    if path in ("fused", "sync"):
        cls = tritonbn.SyncBatchNorm if path == "sync" else tritonbn.BatchNormAct2d
        ours = cls(3, momentum=momentum).to(DEVICE)
        ours.load_state_dict(ref.state_dict())
    if path == "strided_buffers":
        for module in (ref, ours):  # every other element of a longer buffer
            for name in ("running_mean", "running_var"):
                module._buffers[name] = module._buffers[name].repeat_interleave(2)[::2]
    elif path == "no_buffers":  # a module that tracks, with its running buffers taken away
        for module in (ref, ours):
            module.running_mean = module.running_var = None
    ref.double()
    shape, memory_format = ROUTE_CASES[route]
    atol, rtol = TOLERANCES[torch.float32]
    x = _random_input(shape, memory_format=memory_format)
    assert _launch.route(x) == route
    for step in range(4):
        training = step < 3
        ref.train(training)
        ours.train(training)
        with torch.set_grad_enabled(path != "no_grad"):
            x_ours = x.clone().requires_grad_(path != "no_grad")
            y_ref = ref(x.cpu().double())
            with triton_ran():
                y = ours(x_ours)
        if path == "fused":
            y_ref = torch.relu(y_ref)
        if path != "no_grad":
            y.sum().backward()
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 5 + min(step + 1, 3)
        torch.testing.assert_close(y.cpu().double(), y_ref.detach(), atol=atol, rtol=rtol)
        if ref.running_mean is not None:
            torch.testing.assert_close(ours.running_mean.cpu().double(), ref.running_mean, atol=atol, rtol=rtol)
            torch.testing.assert_close(ours.running_var.cpu().double(), ref.running_var, atol=atol, rtol=rtol)


def _swap_buffer(module, name, value):
    def swap():
        module._buffers[name] = value
    return swap


def _swap_parameter(module, name, value):
    def swap():
        module._parameters[name] = value
    return swap


def _set(module, name, value):
    return lambda: setattr(module, name, value)


INVALID_AFTER_VALID = {  # what makes the valid module invalid
    "weight on another device": lambda m: _swap_parameter(m, "weight", torch.nn.Parameter(
        torch.ones(3, device=OTHER_DEVICE))),
    "weight of another size": lambda m: _swap_parameter(m, "weight", torch.nn.Parameter(torch.ones(4, device=DEVICE))),
    "bias of another dtype": lambda m: _swap_parameter(m, "bias", torch.nn.Parameter(
        torch.zeros(3, dtype=torch.float64, device=DEVICE))),
    "running_var on another device": lambda m: _swap_buffer(m, "running_var", torch.ones(3, device=OTHER_DEVICE)),
    "running_mean of another size": lambda m: _swap_buffer(m, "running_mean", torch.zeros(5, device=DEVICE)),
    "running_var missing": lambda m: _swap_buffer(m, "running_var", None),
    "eps of 0": lambda m: _set(m, "eps", 0.0),
}


@pytest.mark.parametrize("case", INVALID_AFTER_VALID)
def test_a_built_launch_plan_never_admits_an_invalid_call(case):
    """Eager calls are checked when their launch plan is built, and a plan is found by a key of
    everything the checks read: after a valid call, the same call made invalid in one respect
    must still be refused like torch, launch nothing and change nothing."""
    ref, ours = _pair(2)
    x = _random_input(VALID_SHAPE[2], device="cpu")
    with triton_ran():
        ours(x.to(DEVICE).requires_grad_(True)).sum().backward()  # the valid call's plans exist now
    ref(x)
    for module in (ref, ours):
        INVALID_AFTER_VALID[case](module)()
    _assert_rejected_like_torch(lambda: ours(x.to(DEVICE).requires_grad_(True)), lambda: ref(x), [ours],
                                exact_message=False)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "channels_last"])
def test_usual_training_step_takes_the_direct_launch_and_matches_torch(memory_format, monkeypatch):
    """The eager autograd function runs the usual one-launch training call itself, forward and
    backward (tritonbn/_ops.py, plan.direct); a call it cannot serve that way (momentum=None:
    the host counts the batch first) goes through run_forward. Both match torch, state included."""
    general = []
    for name in ("run_forward", "run_backward"):
        original = getattr(_launch, name)
        monkeypatch.setattr(_launch, name, lambda *args, _f=original, _n=name: general.append(_n) or _f(*args))
    for momentum, expected in ((0.1, []), (None, ["run_forward"])):
        general.clear()
        _training_step_against_torch(memory_format, momentum)
        assert general == expected

def _training_step_against_torch(memory_format, momentum=0.1):
    """One training step of tritonbn's BatchNorm2d and torch's, checked against each other
    (output and its strides, gradients, running statistics, counter): (ours, x, y)."""
    ref, ours = _pair(2, num_features=5, momentum=momentum)
    x = random_bn_input((3, 5, 4, 6), memory_format=memory_format)
    dy = torch.randn_like(x)
    x_ref, x_ours = x.clone().requires_grad_(True), x.to(DEVICE).requires_grad_(True)
    with triton_ran(2):
        y = ours(x_ours)
        y.backward(dy.to(DEVICE))
    y_ref = ref(x_ref)
    y_ref.backward(dy)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(y.cpu(), y_ref, atol=atol, rtol=rtol)
    assert y.stride() == y_ref.stride()
    for got, want in ((x_ours.grad, x_ref.grad), (ours.weight.grad, ref.weight.grad),
                      (ours.bias.grad, ref.bias.grad), (ours.running_mean, ref.running_mean),
                      (ours.running_var, ref.running_var)):
        torch.testing.assert_close(got.cpu(), want, atol=atol, rtol=rtol)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
    return ours, x_ours, y


def _direct_step(memory_format, monkeypatch):
    """_training_step_against_torch with fresh launch plans (built by the allocators in force)."""
    monkeypatch.setattr(_launch, "_forward_plans", {})
    monkeypatch.setattr(_launch, "_backward_plans", {})
    return _training_step_against_torch(memory_format)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "channels_last"])
@pytest.mark.parametrize("allocator", ["inductor", "empty_strided"])
def test_direct_launch_allocates_what_torch_would(memory_format, allocator, monkeypatch):
    """The usual call's five buffers come from the plan's fast allocator (inductor's, or
    torch.empty_strided where a torch lacks it): each is the tensor torch.empty_like(x) or a
    [C] / [3, C] new_empty would give (shape, strides, dtype, device, no grad), poisoned here
    in place (not replaced, as poison_outputs does), and the step matches torch."""
    if allocator == "empty_strided":
        monkeypatch.setattr(_launch, "_INDUCTOR_GUARDS", None)
    made = []
    real = _launch.fast_allocator

    def spying_allocator(device):
        allocators = real(device)
        fast = allocators.fast
        assert (allocator == "inductor") == (not isinstance(fast, functools.partial))

        def spy(size, stride, dtype):
            assert type(size) is tuple and type(stride) is tuple
            t = fast(size, stride, dtype)
            made.append((t.shape, t.stride(), t.dtype, t.device, t.requires_grad))  # y is made an output later
            return t.fill_(float("nan"))
        allocators.fast = spy
        return allocators
    monkeypatch.setattr(_launch, "fast_allocator", spying_allocator)
    monkeypatch.setattr(_launch, "poison_outputs", False)
    ours, x, y = _direct_step(memory_format, monkeypatch)
    c = x.shape[1]
    like_x = torch.empty_like(x, requires_grad=False)
    expected = [like_x, x.new_empty((3, c), dtype=torch.float32), like_x, ours.weight.new_empty(c),
                ours.weight.new_empty(c)]  # y, stats; dx, dweight, dbias
    assert len(made) == len(expected)
    for got, want in zip(made, expected):
        assert got == (want.shape, want.stride(), want.dtype, want.device, False)
    assert x.grad.stride() == x.stride()


def test_direct_launch_on_another_current_device_takes_the_general_path(monkeypatch):
    """The fast allocator allocates on the current CUDA device: while that is not the input's,
    the call takes run_forward / run_backward, which allocate on the input's device."""
    general = []
    for name in ("run_forward", "run_backward"):
        original = getattr(_launch, name)
        monkeypatch.setattr(_launch, name, lambda *args, _f=original, _n=name: general.append(_n) or _f(*args))
    real, on_device = _launch.fast_allocator, []

    def elsewhere(device):  # plans whose fast allocator would allocate on "cuda:7", not current
        allocators = real(device)
        allocators.device_index = 7
        allocators.fast = None  # must not be called
        allocators.on_device = lambda *args, _f=allocators.on_device: on_device.append(args) or _f(*args)
        return allocators

    monkeypatch.setattr(_launch, "fast_allocator", elsewhere)
    monkeypatch.setattr(_launch, "current_cuda_device", lambda: 0)
    monkeypatch.setattr(tritonbn._ops, "current_cuda_device", lambda: 0)
    _direct_step(torch.contiguous_format, monkeypatch)
    assert general == ["run_forward", "run_backward"]
    assert len(on_device) == 5  # y, stats; dx, dweight, dbias: on the input's device


# (shape, memory format, slice the input (a dense copy), training, momentum): the general
# paths (run_forward / run_backward), whose buffers come from the plan's allocators too.
GENERAL_PATHS = {
    "split-NCHW": ((2, 3, 150, 150), torch.contiguous_format, False, True, 0.1),
    "split-channels_last": ((9, 4, 60, 70), torch.channels_last, False, True, 0.1),
    "eval": ((4, 6, 5, 7), torch.channels_last, False, False, 0.1),
    "sliced-copy": ((4, 6, 10, 7), torch.contiguous_format, True, True, 0.1),
    "cumulative": ((4, 6, 5, 7), torch.contiguous_format, False, True, None),
}


@pytest.mark.parametrize("case", GENERAL_PATHS)
def test_general_paths_give_torchs_tensors(case):
    """Output, input gradient and parameter gradients have torch's shape, strides and dtype
    (and values) on every path that allocates through run_forward / run_backward."""
    shape, memory_format, sliced, training, momentum = GENERAL_PATHS[case]
    ref, ours = _pair(2, num_features=shape[1], momentum=momentum)
    ref.train(training), ours.train(training)
    x = random_bn_input(shape, memory_format=memory_format)
    if sliced:
        x = x[:, :, ::2]
    dy = torch.randn_like(x)
    x_ref, x_ours = x.clone().requires_grad_(True), x.to(DEVICE).requires_grad_(True)
    with triton_ran():
        y = ours(x_ours)
        grads = torch.autograd.grad(y, (x_ours, ours.weight, ours.bias), dy.to(DEVICE))
    # torch's float32 tensors for the layouts; float64 for the values (float32 sums over 4e4
    # elements differ from each other by more than the tolerance).
    ref64 = copy.deepcopy(ref).double()
    x64 = x.double().requires_grad_(True)
    y_ref = ref(x_ref)
    grads_ref = torch.autograd.grad(y_ref, (x_ref, ref.weight, ref.bias), dy)
    y64 = ref64(x64)
    grads64 = torch.autograd.grad(y64, (x64, ref64.weight, ref64.bias), dy.double())
    atol, rtol = TOLERANCES[torch.float32]
    for got, want, want64 in ((y, y_ref, y64), *zip(grads, grads_ref, grads64)):
        assert (got.shape, got.stride(), got.dtype) == (want.shape, want.stride(), want.dtype)
        torch.testing.assert_close(got.cpu().double(), want64, atol=atol, rtol=rtol)
