"""SyncBatchNorm across 2 and 3 processes (gloo; through the interpreter on CPU).

Every rank's output, dx, summed dgamma/dbeta and running statistics must equal one plain
BatchNorm over the whole batch, with unequal batch sizes and a rank with an empty batch;
a few DistributedDataParallel steps keep every rank identical and equal to a
single-process run on the whole batch.
"""

import os

import _dist_worker as worker
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import DEVICE, triton_ran

import tritonbn
from tritonbn._compat import BATCH_NORM_BIAS_ARGUMENT

# gloo's all_gather takes CPU tensors only, and one GPU cannot host several NCCL ranks: the
# multi-process tests run on CPU tensors through the interpreter, on a GPU machine too (the
# NCCL test below covers CUDA). The references are torch's own CPU BatchNorm.
GLOO_DEVICE = "cpu"


def _spawn(fn, world, tmp_path, *args, interpret=True):
    init_file = tmp_path / "init"
    previous = os.environ.get("TRITON_INTERPRET")
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # read by the spawned processes' first import
    try:
        mp.spawn(fn, args=(world, str(init_file), *args), nprocs=world, join=True)
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]


def _reference_steps(sizes, momentum, steps, device=GLOO_DEVICE, has_bias=True):
    bn = torch.nn.BatchNorm2d(worker.CHANNELS, momentum=momentum, **({} if has_bias else {"bias": False})).to(device)
    weight, bias = worker.initial_params(device)
    with torch.no_grad():
        bn.weight.copy_(weight)
        if has_bias:
            bn.bias.copy_(bias)
    record = []
    for step in range(steps):
        x, dy = worker.global_batch(sizes, step, device)
        x = x.clone().requires_grad_(True)
        bn.weight.grad = None
        if has_bias:
            bn.bias.grad = None
        y = bn(x)
        y.backward(dy)
        grads = torch.stack([bn.weight.grad, bn.bias.grad if has_bias else torch.zeros_like(bn.weight.grad)]).cpu()
        record.append({"y": y.detach().cpu(), "dx": x.grad.cpu(), "grads": grads,
                       "running_mean": bn.running_mean.cpu().clone(), "running_var": bn.running_var.cpu().clone()})
    return record


# (world, per-rank batch sizes, momentum, comment)
CASES = [
    (2, [3, 3], 0.1, "two ranks, equal batches"),
    (3, [4, 1, 2], None, "three ranks, unequal batches, cumulative momentum"),
    (3, [3, 0, 2], 0.3, "a rank with an empty batch"),
]


@pytest.mark.parametrize("world,sizes,momentum,comment", CASES, ids=[c[3] for c in CASES])
def test_sync_batch_norm_equals_whole_batch(tmp_path, world, sizes, momentum, comment):
    steps = 2
    results = _spawn(worker.sync_bn_steps, world, tmp_path, sizes, str(tmp_path), GLOO_DEVICE, momentum, steps)
    _assert_steps_match(results, _reference_steps(sizes, momentum, steps), sizes, steps)


def _assert_steps_match(results, expected, sizes, steps) -> None:
    """Each rank's slice of the whole-batch reference, step by step."""
    for rank, record in enumerate(results):
        start, end = sum(sizes[:rank]), sum(sizes[: rank + 1])
        for step in range(steps):
            got, want = record[step], expected[step]
            torch.testing.assert_close(got["y"], want["y"][start:end], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got["dx"], want["dx"][start:end], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got["grads"], want["grads"], atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(got["running_mean"], want["running_mean"], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(got["running_var"], want["running_var"], atol=1e-6, rtol=1e-5)
            assert got["num_batches_tracked"] == step + 1


@pytest.mark.skipif(not BATCH_NORM_BIAS_ARGUMENT, reason="torch < 2.13 has no bias=False")
def test_sync_batch_norm_without_bias(tmp_path):
    """torch 2.13's bias=False through the synchronised forward and backward."""
    sizes, steps = [3, 2], 2
    results = _spawn(worker.sync_bn_steps, 2, tmp_path, sizes, str(tmp_path), GLOO_DEVICE, 0.1, steps, "gloo", False)
    _assert_steps_match(results, _reference_steps(sizes, 0.1, steps, has_bias=False), sizes, steps)


def test_ddp_steps_match_single_process(tmp_path):
    sizes, steps = [4, 2], 3
    results = _spawn(worker.ddp_steps, 2, tmp_path, sizes, str(tmp_path), GLOO_DEVICE, steps)
    # Single process, plain torch BatchNorm, the whole batch, the same initial weights.
    model = worker.make_model(GLOO_DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    total = sum(sizes)
    for step in range(steps):
        x, _ = worker.global_batch(sizes, step, GLOO_DEVICE)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), worker.labels_for(total, step, GLOO_DEVICE))
        loss.backward()
        optimizer.step()
    reference = model.state_dict()
    for key, value in results[0]["state"].items():
        assert torch.equal(value, results[1]["state"][key]), f"ranks differ in {key}"
        torch.testing.assert_close(value, reference[key].cpu(), atol=2e-5, rtol=1e-4, msg=key)


def test_without_process_group_behaves_as_batch_norm():
    assert not (dist.is_available() and dist.is_initialized())
    x = torch.randn(4, 3, 5, 5, device=DEVICE) * 2 + 1
    ours, ref = tritonbn.SyncBatchNorm(3).to(DEVICE), torch.nn.BatchNorm2d(3).to(DEVICE)
    with triton_ran():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        ours(torch.randn(3, device=DEVICE))



@pytest.mark.parametrize("training", [True, False])
def test_zero_channels_are_torchs_error_and_change_nothing(training):
    # torch's SyncBatchNorm checks the rank, then the channel count, before anything else.
    ours, ref = tritonbn.SyncBatchNorm(0).to(DEVICE).train(training), torch.nn.SyncBatchNorm(0).to(DEVICE)
    ref.train(training)
    x = torch.randn(4, 0, 3, device=DEVICE)
    with pytest.raises(ValueError) as theirs:
        ref(x)
    with pytest.raises(ValueError, match=f"^{theirs.value}$"):
        ours(x)
    assert ours.num_batches_tracked.item() == 0
    with pytest.raises(ValueError, match="expected at least 2D input"):
        ours(torch.randn(0, device=DEVICE))

def test_convert_sync_batchnorm_and_state_dict():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4),
                                torch.nn.Sequential(torch.nn.SyncBatchNorm(4), tritonbn.BatchNorm2d(4)))
    model[1].weight.requires_grad_(False)
    model[2].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = tritonbn.SyncBatchNorm.convert_sync_batchnorm(model)
    sync_layers = [m for m in converted.modules() if isinstance(m, tritonbn.SyncBatchNorm)]
    assert len(sync_layers) == 3
    assert not converted[1].weight.requires_grad and not converted[2][0].training
    for key, value in converted.state_dict().items():
        assert torch.equal(value, state[key])
    torch.nn.SyncBatchNorm(4).load_state_dict(converted[1].state_dict())


@pytest.mark.skipif(DEVICE != "cuda" or os.environ.get("TRITON_INTERPRET") == "1", reason="NCCL needs CUDA")
def test_nccl_world_size_one_or_more(tmp_path):
    world = max(torch.cuda.device_count(), 1)
    backend = "nccl"
    sizes = [3] * world
    results = _spawn(worker.sync_bn_steps, world, tmp_path, sizes, str(tmp_path), "cuda", 0.1, 1, backend,
                     interpret=False)
    expected = _reference_steps(sizes, 0.1, 1, device="cuda")
    for rank, record in enumerate(results):
        torch.testing.assert_close(record[0]["y"], expected[0]["y"][3 * rank: 3 * rank + 3], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(record[0]["running_var"], expected[0]["running_var"], atol=1e-6, rtol=1e-5)
