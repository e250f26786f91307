"""The ResNet-18 finding (issue #11): is tritonbn's drift from torch after SGD steps float32 noise or a defect?

torchvision's ResNet-18 (default init, pretrained=False) trains two SGD steps (lr 0.05, momentum
0.9) on (4, 3, 32, 32) batches, then runs eval, in six versions: float64 torch (the reference);
four equally valid torch float32 runs (NCHW; channels_last, which changes the convolutions' and
batch norms' summation orders; and each of those with one ulp of random noise on every
BatchNorm's input, which is what any other summation order does); and tritonbn (convert_model,
channels_last: through Triton's interpreter its NCHW route costs minutes per step).

Part 1, per seed: each run's distance to float64 for the two losses, every parameter gradient
at both steps, every parameter and buffer after them, and the eval output; then the test's
criterion (tests/test_model_zoo.py) applied to tritonbn AND to the fourth torch run (NCHW +
noise): its distance divided by the largest distance of the three other torch runs. If tritonbn
were defective its ratios would stand out from the torch run's; if they are alike, the drift is
float32 noise, amplified by the model.

Part 2: one BatchNorm alone on 4 values per channel (ResNet-18's 1x1 layer4 maps on a batch of
4), torch vs tritonbn vs float64 on the same float32 input: the op's own error.

Usage (needs torchvision):  TRITON_INTERPRET=1 python perf/resnet18_drift.py [seeds]
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.nn.functional as F

import tritonbn

SHAPE = (4, 3, 32, 32)
CL = torch.channels_last
NCHW = torch.contiguous_format


def _ulp_noise(module, args):
    x = args[0]
    generator = torch.Generator().manual_seed(x.numel() + 17)
    sign = torch.randint(-1, 2, x.shape, generator=generator).to(x.dtype)
    return (x * (1 + sign * torch.finfo(x.dtype).eps),)


def _noisy(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_pre_hook(_ulp_noise)
    return model


def runs(seed):
    import torchvision

    torch.manual_seed(seed)
    base = torchvision.models.resnet18()
    c = copy.deepcopy
    return {
        "float64": (c(base).double(), torch.float64, NCHW),
        "torch NCHW": (c(base), torch.float32, NCHW),
        "torch channels_last": (c(base).to(memory_format=CL), torch.float32, CL),
        "torch channels_last + noise": (_noisy(c(base).to(memory_format=CL)), torch.float32, CL),
        "torch NCHW + noise": (_noisy(c(base)), torch.float32, NCHW),
        "tritonbn channels_last": (tritonbn.convert_model(c(base)).to(memory_format=CL), torch.float32, CL),
    }


def quantities(models, seed):
    """{run: {quantity: tensor}} after two SGD steps and an eval pass."""
    gen = torch.Generator().manual_seed(seed + 100)
    opts = {k: torch.optim.SGD(m.train().parameters(), lr=0.05, momentum=0.9) for k, (m, _, _) in models.items()}
    out = {k: {} for k in models}
    for step in range(2):
        x = torch.randn(SHAPE, generator=gen)
        target = torch.randint(0, 1000, (SHAPE[0],), generator=gen)
        for key, (model, dtype, fmt) in models.items():
            loss = F.cross_entropy(model(x.to(dtype).contiguous(memory_format=fmt)), target)
            loss.backward()
            out[key][f"loss {step}"] = loss.detach()
            for name, p in model.named_parameters():
                out[key][f"{name}.grad {step}"] = p.grad.clone()
            opts[key].step()
            opts[key].zero_grad()
    x = torch.randn(SHAPE, generator=gen)
    for key, (model, dtype, fmt) in models.items():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                out[key][f"{name} after"] = t.clone()
        with torch.no_grad():
            out[key]["eval output"] = model.eval()(x.to(dtype).contiguous(memory_format=fmt))
    return out


REFERENCE_RUNS = ["torch NCHW", "torch channels_last", "torch channels_last + noise"]


def _error(value, exact, percentile):
    """Largest |value - exact|, or its 99th percentile (tests/test_model_zoo.py's _error)."""
    diff = (value.double() - exact).abs().reshape(-1)
    if not percentile or diff.numel() < 100:
        return diff.max().item()
    return diff.kthvalue(int(0.99 * diff.numel())).values.item()


def ratios(out, judged, percentile=False):
    """Per quantity: judged's error / the largest error of REFERENCE_RUNS (vs float64), above the floor."""
    result = {}
    for q, exact in out["float64"].items():
        exact = exact.double()
        err = {k: _error(out[k][q], exact, percentile) for k in out if k != "float64"}
        floor = 1e-5 + 1e-5 * exact.abs().max().item()
        reference = max(err[k] for k in REFERENCE_RUNS if k != judged)
        if max(err[judged], reference) > floor:
            result[q] = (err[judged] / max(reference, floor), err[judged], reference)
    return result


def part1(seeds):
    print("| seed | run judged | worst ratio, max error (quantity) | worst ratio, 99th percentile (quantity) "
          "| median ratio | eval output: its error, torch's largest |")
    print("| --- | --- | --- | --- | --- | --- |")
    for seed in seeds:
        out = quantities(runs(seed), seed)
        for judged in ("torch NCHW + noise", "tritonbn channels_last"):
            r, p = ratios(out, judged), ratios(out, judged, percentile=True)
            worst, worst_p = max(r, key=lambda q: r[q][0]), max(p, key=lambda q: p[q][0])
            median = sorted(v[0] for v in r.values())[len(r) // 2]
            ev = r.get("eval output", (0, float("nan"), float("nan")))
            print(f"| {seed} | {judged} | {r[worst][0]:.2f} ({worst}) | {p[worst_p][0]:.2f} ({worst_p}) | {median:.2f} "
                  f"| {ev[1]:.2e}, {ev[2]:.2e} |")
        ev = out["float64"]["eval output"].abs().max().item()
        print(f"| {seed} | (eval output scale: max abs {ev:.3g}) | | | | |")


def part2():
    torch.manual_seed(0)
    shape = (4, 512, 1, 1)
    x64 = torch.randn(shape, dtype=torch.float64) * torch.rand(1, 512, 1, 1) + torch.randn(1, 512, 1, 1) * 3
    x32 = x64.float().contiguous(memory_format=CL)
    w, b, dy = torch.rand(512) + 0.5, torch.randn(512), torch.randn(shape)
    res = {}
    for label, fn, dtype in (("float64", F.batch_norm, torch.float64), ("torch", F.batch_norm, torch.float32),
                             ("tritonbn", tritonbn.functional.batch_norm, torch.float32)):
        # Copies: .to() of a float32 tensor to float32 is the tensor itself, whose .grad would add up.
        xi = x32.to(dtype).clone().requires_grad_()
        wi, bi = w.to(dtype).clone().requires_grad_(), b.to(dtype).clone().requires_grad_()
        y = fn(xi, None, None, wi, bi, True, 0.1, 1e-5)
        y.backward(dy.to(dtype))
        res[label] = [t.detach().double() for t in (y, xi.grad, wi.grad)]
    print("\n| one BatchNorm, (4, 512, 1, 1), training | y max err | dx max err | dweight max err |")
    print("| --- | --- | --- | --- |")
    for label in ("torch", "tritonbn"):
        errs = [(a - r).abs().max().item() for a, r in zip(res[label], res["float64"])]
        print(f"| {label} float32 | " + " | ".join(f"{e:.2e}" for e in errs) + " |")


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        sys.exit("set TRITON_INTERPRET=1 (no GPU here)")
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    part1(range(count))
    part2()
