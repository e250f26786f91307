"""Process bodies for the SyncBatchNorm tests (run under torch.multiprocessing.spawn).

Each rank builds the same global batch from a shared seed, takes its own slice, runs
tritonbn's SyncBatchNorm (or a model with it under DistributedDataParallel) and saves what
it saw; the test process compares that with one plain BatchNorm over the whole batch.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import torch.distributed as dist  # noqa: E402

import tritonbn  # noqa: E402

CHANNELS = 3
SPATIAL = (5, 4)


def _init(rank, world, init_file, backend="gloo"):
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)


def global_batch(sizes, step, device):
    generator = torch.Generator().manual_seed(1000 + step)
    total = sum(sizes)
    x = torch.randn((total, CHANNELS, *SPATIAL), generator=generator, dtype=torch.float64) * 2 + 3
    dy = torch.randn((total, CHANNELS, *SPATIAL), generator=generator, dtype=torch.float64)
    return x.float().to(device), dy.float().to(device)


def initial_params(device):
    generator = torch.Generator().manual_seed(7)
    weight = torch.rand(CHANNELS, generator=generator) + 0.5
    bias = torch.randn(CHANNELS, generator=generator)
    return weight.to(device), bias.to(device)


def sync_bn_steps(rank, world, init_file, sizes, out_dir, device, momentum, steps, backend="gloo", has_bias=True):
    _init(rank, world, init_file, backend)
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    bn = tritonbn.SyncBatchNorm(CHANNELS, momentum=momentum, **({} if has_bias else {"bias": False})).to(device)
    weight, bias = initial_params(device)
    with torch.no_grad():
        bn.weight.copy_(weight)
        if has_bias:
            bn.bias.copy_(bias)
    start = sum(sizes[:rank])
    end = start + sizes[rank]
    record = []
    for step in range(steps):
        x, dy = global_batch(sizes, step, device)
        x_local = x[start:end].clone().requires_grad_(True)
        bn.weight.grad = None
        if has_bias:
            bn.bias.grad = None
        y = bn(x_local)
        y.backward(dy[start:end])
        grads = torch.stack([bn.weight.grad, bn.bias.grad if has_bias else torch.zeros_like(bn.weight.grad)])
        dist.all_reduce(grads)  # dgamma/dbeta are local sums: their sum is the whole batch's
        record.append({"y": y.detach().cpu(), "dx": x_local.grad.cpu(), "grads": grads.cpu(),
                       "running_mean": bn.running_mean.cpu().clone(), "running_var": bn.running_var.cpu().clone(),
                       "num_batches_tracked": int(bn.num_batches_tracked)})
    torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def make_model(device):
    torch.manual_seed(11)
    return torch.nn.Sequential(
        torch.nn.Conv2d(CHANNELS, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5),
    ).to(device)


def labels_for(total, step, device):
    return torch.randint(0, 5, (total,), generator=torch.Generator().manual_seed(500 + step)).to(device)


def ddp_steps(rank, world, init_file, sizes, out_dir, device, steps):
    _init(rank, world, init_file)
    model = tritonbn.convert_model(make_model(device), sync=True)
    assert isinstance(model[1], tritonbn.SyncBatchNorm)
    if device == "cpu":
        # DDP refuses any torch SyncBatchNorm subclass on CPU because torch's own kernel is
        # CUDA-only; ours runs on the CPU through the interpreter, so lift that guard here.
        torch.nn.parallel.DistributedDataParallel._passing_sync_batchnorm_handle = lambda self, module: None
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    start = sum(sizes[:rank])
    end = start + sizes[rank]
    total = sum(sizes)
    losses = []
    for step in range(steps):
        x, _ = global_batch(sizes, step, device)
        labels = labels_for(total, step, device)
        optimizer.zero_grad()
        logits = ddp(x[start:end])
        # DDP averages gradients over ranks: scale so the average is the whole batch's mean loss.
        loss = torch.nn.functional.cross_entropy(logits, labels[start:end], reduction="sum") * world / total
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().cpu())
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save({"state": state, "losses": losses}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
