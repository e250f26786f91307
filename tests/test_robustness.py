"""Robustness: no access outside the tensors, concurrent use, CUDA graphs, 64-bit indexing.

* Poisoned padding: inputs are views in the middle of NaN-filled storage (a read outside
  them would poison the result), and every buffer the launchers allocate is a view in the
  middle of sentinel-filled storage that must be intact afterwards (no write outside).
* Two threads (and on a GPU two streams) using the same module class concurrently.
* A CUDA graph captures a whole training step and replays it with new data (GPU only).
* A tensor of more than 2^31 elements takes the 64-bit indexing variant (GPU only).
"""

import threading

import pytest
import torch
from conftest import DEVICE, triton_ran

import tritonbn
from tritonbn import _launch

SENTINEL = 12345.0
PAD = 37  # elements of padding on each side: odd, so alignment changes too


def _padded_view(shape, fill, dtype=torch.float32, memory_format=torch.contiguous_format):
    """A tensor of `shape` living in the middle of a larger storage filled with `fill`."""
    dense = torch.empty(shape, dtype=dtype, device=DEVICE).contiguous(memory_format=memory_format)
    storage = torch.full((dense.numel() + 2 * PAD,), fill, dtype=dtype, device=DEVICE)
    view = storage.as_strided(dense.shape, dense.stride(), storage_offset=PAD)
    return view, storage


@pytest.fixture
def guarded_allocations(monkeypatch):
    """Every kernel output lives between two bands of SENTINEL; returns the storages."""
    storages = []

    def empty_like(t):
        view, storage = _padded_view(t.shape, SENTINEL, t.dtype,
                                     torch.channels_last if _is_channels_last(t) else torch.contiguous_format)
        assert view.stride() == torch.empty_like(t).stride() or t.numel() == 0
        storages.append((storage, view.numel()))
        return view.fill_(float("nan"))

    def empty(shape, dtype, device):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        view, storage = _padded_view(shape, SENTINEL, dtype)
        storages.append((storage, view.numel()))
        return view.fill_(float("nan"))

    monkeypatch.setattr(_launch, "_empty_like", empty_like)
    monkeypatch.setattr(_launch, "_empty", empty)
    return storages


def _is_channels_last(t):
    return t.dim() in (4, 5) and t.is_contiguous(
        memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d) and not t.is_contiguous()


def _assert_padding_intact(storages):
    assert storages, "no allocation was guarded"
    for storage, numel in storages:
        assert torch.all(storage[:PAD] == SENTINEL) and torch.all(storage[PAD + numel:] == SENTINEL), \
            "a kernel wrote outside its output"


# (shape, memory format, comment): every route.
ROUTES = [
    ((4, 6, 5, 7), torch.contiguous_format, "ncs-one-launch"),
    ((4, 6, 5, 7), torch.channels_last, "rows-one-launch"),
    ((2, 3, 150, 150), torch.contiguous_format, "ncs-split"),
    ((9, 4, 60, 70), torch.channels_last, "rows-split"),
]


@pytest.mark.parametrize("shape,memory_format,route", ROUTES, ids=[r[2] for r in ROUTES])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_no_access_outside_the_tensors(guarded_allocations, shape, memory_format, route, activation):
    torch.manual_seed(0)
    x, _ = _padded_view(shape, float("nan"), memory_format=memory_format)
    r, _ = _padded_view(shape, float("nan"), memory_format=memory_format)
    dy, _ = _padded_view(shape, float("nan"), memory_format=memory_format)
    with torch.no_grad():
        x.copy_(torch.randn(shape) * 2 + 1)
        r.copy_(torch.randn(shape))
        dy.copy_(torch.randn(shape))
    assert _launch.route(x) == route
    for training in (True, False):
        bn = tritonbn.BatchNormAct2d(shape[1], activation=activation).to(DEVICE).train(training)
        ref = torch.nn.BatchNorm2d(shape[1]).to(DEVICE).train(training)
        xg = x.detach().requires_grad_(True)
        rg = r.detach().requires_grad_(True)
        with triton_ran():
            y = bn(xg, rg)
            y.backward(dy)
        z = ref(x) + r
        expected = z if activation is None else torch.nn.functional.silu(z)
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)  # no NaN read from padding
        assert torch.isfinite(xg.grad).all() and torch.isfinite(rg.grad).all() and torch.isfinite(bn.weight.grad).all()
    _assert_padding_intact(guarded_allocations)


def test_two_threads_share_the_library():
    torch.manual_seed(1)
    inputs = [torch.randn(4, 3, 6, 5, device=DEVICE) * (i + 1) + i for i in range(2)]
    results, errors = [None, None], []

    def work(i):
        try:
            bn = tritonbn.BatchNorm2d(3).to(DEVICE)
            x = inputs[i].clone().requires_grad_(True)
            for _ in range(3):
                y = bn(x)
                y.backward(torch.ones_like(y))
            results[i] = (y.detach(), x.grad, bn.running_var.clone())
        except Exception as error:  # noqa: BLE001 - reported to the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i in range(2):
        ref = torch.nn.BatchNorm2d(3).to(DEVICE)
        x = inputs[i].clone().requires_grad_(True)
        for _ in range(3):
            y = ref(x)
            y.backward(torch.ones_like(y))
        torch.testing.assert_close(results[i][0], y.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(results[i][1], x.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(results[i][2], ref.running_var)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA streams")
def test_two_streams():
    torch.manual_seed(2)
    xs = [torch.randn(8, 16, 32, 32, device="cuda") * (i + 1) for i in range(2)]
    modules = [tritonbn.BatchNorm2d(16).cuda() for _ in range(2)]
    for m, x in zip(modules, xs):
        m(x)  # tune outside the streams
    streams = [torch.cuda.Stream() for _ in range(2)]
    outputs = [None, None]
    torch.cuda.synchronize()
    for i, (stream, m, x) in enumerate(zip(streams, modules, xs)):
        with torch.cuda.stream(stream):
            outputs[i] = m(x)
    torch.cuda.synchronize()
    for i in range(2):
        ref = torch.nn.BatchNorm2d(16).cuda()
        ref(xs[i])
        torch.testing.assert_close(outputs[i], ref(xs[i]), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_training_step_replays_like_eager():
    torch.manual_seed(3)

    def make():
        torch.manual_seed(4)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), tritonbn.BatchNorm2d(8, momentum=None),
                                   torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 16 * 16, 4)).cuda()

    eager, graphed = make(), make()
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.05)  # plain SGD keeps no step counter: capturable
    static_x = torch.randn(6, 3, 16, 16, device="cuda")
    static_t = torch.randint(0, 4, (6,), device="cuda")

    def step(model, opt, x, t):
        opt.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(model(x), t)
        loss.backward()
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up: autotuning and allocator pools happen outside capture
            step(graphed, opt_g, static_x, static_t)
            step(eager, opt_e, static_x, static_t)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(graphed, opt_g, static_x, static_t)
    # Capture records the step without running it: both models have taken the 3 warm-up steps.
    for _ in range(3):
        x = torch.randn(6, 3, 16, 16, device="cuda")
        t = torch.randint(0, 4, (6,), device="cuda")
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        loss = step(eager, opt_e, x, t)
        torch.testing.assert_close(static_loss, loss, atol=1e-4, rtol=1e-4)
    for (name, a), (_, b) in zip(graphed.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU with about 20 GiB free")
def test_more_than_2_31_elements():
    free, _ = torch.cuda.mem_get_info()
    shape = (129, 64, 512, 512)  # 2^31 + 2^24 elements
    if free < 5 * 2 * 129 * 64 * 512 * 512:
        pytest.skip("not enough GPU memory")
    x = torch.randn(shape, device="cuda", dtype=torch.float16)
    assert _launch.canonical_input(x)[1].max_offset > 2**31
    bn = tritonbn.BatchNorm2d(64).cuda().half()
    y = bn(x)
    for c in (0, 63):  # check two channels, the last one near the end of the storage
        xc = x[:, c].double()
        expected = (xc - xc.mean()) / torch.sqrt(xc.var(unbiased=False) + 1e-5)
        torch.testing.assert_close(y[:, c].double(), expected, atol=4e-3, rtol=4e-3)
        torch.testing.assert_close(bn.running_mean[c].double(), 0.1 * xc.mean(), atol=1e-3, rtol=1e-3)
