"""Activation memory saved for backward: eager torch (unfused) against tritonbn's fused BatchNormAct.

Usage::

    python -m perf.activation_memory [--batch 256] [--out perf/results/memory.md] [--no-measure]

Three things, each labelled with where it comes from:

1. An analytic count, per BatchNorm layer of ResNet-50 (torchvision v1.5; shapes from
   ``perf/shapes.py``) at batch 256, in float32 and bfloat16, of the activation bytes that
   autograd keeps for backward because of that BatchNorm and what follows it:

   * eager torch, torchvision's layout (``self.relu = nn.ReLU(inplace=True)``, ``out +=
     identity``): BatchNorm saves its input x; the in-place ReLU saves its *result*, which is
     the BatchNorm output's storage (the in-place add and ReLU write into it); the add saves
     nothing. So a BN+ReLU or BN+add+ReLU group saves x and y; a downsample BN saves x.
   * tritonbn fused (``tritonbn.fuse_model``): BatchNormAct saves x and, when it has a
     residual, a reference to the residual (to recompute the pre-activation); never y.

   Two columns each: "own" (the storages the group's own autograd nodes save) and "kept"
   (the storages the group reads or writes that stay alive until backward, whoever saves
   them: y is also the input of the next conv or maxpool, which saves it, so fusing does not
   free it, except after the last block, whose avgpool is a mean and saves nothing; a
   downsample output is freed after the add in torch but kept as the fused bn3's residual).
   Per-channel vectors (mean, 1/std: C floats) are left out: 0.01 % of the total.

2. A measurement of the same thing with ``torch.autograd.graph.saved_tensors_hooks``: the
   pack hook records each saved tensor's storage (data_ptr, nbytes), and unique storages
   are counted, parameters and buffers excluded. On a CPU the tritonbn kernels run in
   Triton's interpreter, so the shapes are small: single blocks, and ResNet-50's full
   architecture at 1/16 width and 32x32 images, where the measured total is compared with
   the analytic model applied to the same shapes. On a GPU the full-size ResNet-50 is
   measured too.

3. On a GPU only: ``torch.cuda.max_memory_allocated`` over one SGD training step of
   ResNet-50, torch against tritonbn unfused and fused.

Prints tables and writes markdown to ``perf/results/memory.md``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from perf import shapes

DATE = "2026-11-25"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "memory.md"
MIB = 2**20
GIB = 2**30

BN_RELU, BN_ADD_RELU, DOWNSAMPLE = "bn+relu", "bn+add+relu", "downsample bn"


def prepare() -> None:
    """Run tritonbn's kernels in Triton's interpreter when there is no GPU; call before importing tritonbn."""
    if not torch.cuda.is_available():
        # Read when @triton.jit runs, i.e. when tritonbn's kernels are imported.
        os.environ["TRITON_INTERPRET"] = "1"
    if "tritonbn" in sys.modules:
        import tritonbn

        expected = "triton" if torch.cuda.is_available() else "triton-interpreter"
        probe = torch.empty(0, device="cuda" if torch.cuda.is_available() else "cpu")
        if tritonbn.backend_for(probe) != expected:
            raise RuntimeError("tritonbn was imported before TRITON_INTERPRET was set: its kernels cannot run here")


# ------------------------------------------------------------------------------------------
# ResNet-50's BatchNorm layers and the analytic model
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BnLayer:
    name: str
    shape: tuple[int, ...]
    role: str  # BN_RELU, BN_ADD_RELU or DOWNSAMPLE
    residual_is_downsample: bool = False  # bn3 of a block whose identity is downsample(x)
    # Whether the layer after the group saves its input (the group's output y). Convs and the
    # maxpool do; the avgpool after the last block does not: AdaptiveAvgPool2d((1, 1)) runs as a
    # mean, whose backward needs only the shape.
    next_saves_output: bool = True

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def resnet50_layers(batch: int = 256, image: int = 224, width: int = 64) -> list[BnLayer]:
    """Every BatchNorm of ResNet-50 with its role; ``width`` 64 is torchvision's, smaller scales it down."""
    layers = []
    res = image // 2
    layers.append(BnLayer("bn1", (batch, width, res, res), BN_RELU))
    res = (res + 1) // 2  # maxpool 3x3, stride 2, padding 1
    in_channels = width
    for stage, (blocks, stage_width, stage_stride) in enumerate(shapes.RESNET50_STAGES, start=1):
        planes = stage_width * width // 64
        out_channels = planes * shapes.EXPANSION
        for block in range(blocks):
            stride = stage_stride if block == 0 else 1
            out_res = (res + stride - 1) // stride  # 3x3, padding 1
            prefix = f"layer{stage}.{block}"
            downsample = stride != 1 or in_channels != out_channels
            layers.append(BnLayer(f"{prefix}.bn1", (batch, planes, res, res), BN_RELU))
            layers.append(BnLayer(f"{prefix}.bn2", (batch, planes, out_res, out_res), BN_RELU))
            layers.append(BnLayer(f"{prefix}.bn3", (batch, out_channels, out_res, out_res), BN_ADD_RELU, downsample))
            if downsample:
                layers.append(BnLayer(f"{prefix}.downsample.1", (batch, out_channels, out_res, out_res), DOWNSAMPLE))
            in_channels = out_channels
            res = out_res
    last = layers[-1]
    layers[-1] = BnLayer(last.name, last.shape, last.role, last.residual_is_downsample, next_saves_output=False)
    return layers


def _check_against_perf_shapes() -> None:
    # The one place ResNet-50's shapes are written down is perf/shapes.py: agree with it.
    ours = [(layer.name, layer.shape) for layer in resnet50_layers(256)]
    if ours != shapes.resnet50_bn_layers(256):
        raise AssertionError("resnet50_layers disagrees with perf/shapes.py")


def saved_elements(layer: BnLayer) -> dict[str, int]:
    """Elements saved for backward by one layer's group: torch / tritonbn fused, "own" / "kept".

    own: what the group's autograd nodes save. kept: the storages the group produces (or
    reads: its input x) that stay alive until backward, whoever saves them; summed over the
    network (plus the few tensors outside any group) it is the network's total.
    """
    e = layer.numel
    if layer.role == DOWNSAMPLE:
        # A plain BatchNorm in both: saves x. Its output is the residual: freed after the add
        # in torch; in tritonbn referenced by the fused bn3, so kept alive.
        return {"torch_own": e, "torch_kept": e, "fused_own": e, "fused_kept": 2 * e}
    # torch: x by BatchNorm, y (the in-place add and ReLU write into the BatchNorm output) by
    # ReLU; y is also the next conv's or maxpool's saved input.
    torch_own = torch_kept = 2 * e
    # fused: x by BatchNormAct; y is still kept, by the next layer, as its input (except
    # after the last block, where the avgpool does not save it).
    fused_kept = e + (e if layer.next_saves_output else 0)
    if layer.role == BN_RELU:
        return {"torch_own": torch_own, "torch_kept": torch_kept, "fused_own": e, "fused_kept": fused_kept}
    # bn3: x and a reference to the residual, a storage kept anyway (the block input is conv1's
    # input) or counted on the downsample row.
    return {"torch_own": torch_own, "torch_kept": torch_kept, "fused_own": 2 * e, "fused_kept": fused_kept}


def other_saved_bytes(batch: int, image: int, width: int, dtype: torch.dtype) -> int:
    """Saved activations outside every BatchNorm group, the same in torch and tritonbn.

    The image (conv1's input), the maxpool output (input of layer1.0's conv1 and downsample
    conv), the maxpool indices (int64) and the avgpool output (fc's input).
    """
    size = torch.empty(0, dtype=dtype).element_size()
    res = (image // 2 + 1) // 2
    pooled = batch * width * res * res
    return (batch * 3 * image * image + pooled + batch * width * 32) * size + pooled * 8


def analytic(batch: int = 256, dtype: torch.dtype = torch.float32, image: int = 224,
             width: int = 64) -> tuple[list[dict], dict]:
    """Per-layer rows (bytes) and totals for ResNet-50."""
    size = torch.empty(0, dtype=dtype).element_size()
    rows = []
    totals = {"torch_own": 0, "torch_kept": 0, "fused_own": 0, "fused_kept": 0}
    for layer in resnet50_layers(batch, image, width):
        elements = saved_elements(layer)
        row = {"name": layer.name, "shape": layer.shape, "role": layer.role,
               **{k: v * size for k, v in elements.items()}}
        rows.append(row)
        for k in totals:
            totals[k] += row[k]
    return rows, totals


def network_total(batch: int, image: int, width: int, dtype: torch.dtype, fused: bool) -> int:
    """Analytic unique saved bytes of the whole network (what the hook measurement counts)."""
    _, totals = analytic(batch, dtype, image, width)
    return totals["fused_kept" if fused else "torch_kept"] + other_saved_bytes(batch, image, width, dtype)


# ------------------------------------------------------------------------------------------
# torchvision's ResNet-50 (torchvision is not a dependency)
# ------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet50(nn.Module):
    def __init__(self, width: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = width
        stages = []
        for blocks, stage_width, stride in shapes.RESNET50_STAGES:
            planes = stage_width * width // 64
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
            layer = [Bottleneck(inplanes, planes, stride, downsample)]
            inplanes = planes * 4
            layer += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def variants(model: nn.Module) -> dict[str, nn.Module]:
    """torch unfused, tritonbn unfused (convert_model), tritonbn fused (convert + fuse_model)."""
    import tritonbn

    return {
        "torch": model,
        "tritonbn unfused": tritonbn.convert_model(copy.deepcopy(model)),
        "tritonbn fused": tritonbn.fuse_model(tritonbn.convert_model(copy.deepcopy(model))),
    }


# ------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------


def saved_storages(module: nn.Module, *inputs: torch.Tensor) -> dict[int, int]:
    """Unique storages (data_ptr -> nbytes) that autograd saves in ``module(*inputs)``.

    Parameters and buffers are left out, and so are 1-D tensors (per-channel statistics):
    what remains is activations. The forward's output is dropped before returning, so only
    the numbers are kept, not the graph.
    """
    own = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own and t.dim() >= 2:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return saved


def measure_blocks(device: torch.device, batch: int = 2, channels: int = 16, res: int = 8) -> list[dict]:
    """Saved storages of one Bottleneck (identity; downsample) and of conv-BN-SiLU-conv, per variant."""
    blocks = []
    for downsample in (False, True):
        inplanes = channels // 2 if downsample else channels
        ds = None
        if downsample:
            ds = nn.Sequential(nn.Conv2d(inplanes, channels, 1, bias=False), nn.BatchNorm2d(channels))
        blocks.append((f"Bottleneck {inplanes}->{channels}, {'downsample' if downsample else 'identity'}",
                       inplanes, lambda inplanes=inplanes, ds=ds: Bottleneck(inplanes, channels // 4, downsample=ds)))
    # SiLU is not in place and saves its input, the BatchNorm output: here fusing frees a tensor.
    blocks.append(("conv-BN-SiLU-conv", channels, lambda: nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.SiLU(),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False))))
    rows = []
    for what, inplanes, build in blocks:
        torch.manual_seed(0)
        block = build().to(device).train()
        x = torch.randn(batch, inplanes, res, res, device=device, requires_grad=True)
        for variant, module in variants(block).items():
            saved = saved_storages(module, x)
            rows.append({"what": f"{what}, x {batch}x{inplanes}x{res}x{res}", "variant": variant,
                         "storages": len(saved), "bytes": sum(saved.values())})
    return rows


def measure_network(device: torch.device, batch: int, image: int, width: int, dtype: torch.dtype) -> list[dict]:
    """Saved storages of the whole ResNet-50 (one forward in training mode), against the analytic model."""
    torch.manual_seed(0)
    model = ResNet50(width).to(device=device, dtype=dtype).train()
    x = torch.randn(batch, 3, image, image, device=device, dtype=dtype)
    rows = []
    for variant, module in variants(model).items():
        saved = saved_storages(module, x)
        expected = network_total(batch, image, width, dtype, fused=variant == "tritonbn fused")
        rows.append({"what": f"ResNet-50 width {width}, {batch}x3x{image}x{image}, {str(dtype)[6:]}",
                     "variant": variant, "storages": len(saved), "bytes": sum(saved.values()), "analytic": expected})
        del saved
    return rows


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=False)
    loss = nn.functional.cross_entropy(model(x).float(), target)
    loss.backward()
    opt.step()


def cuda_step_peak(batch: int, dtype: torch.dtype, image: int = 224, channels_last: bool = False) -> list[dict]:
    """Peak memory of one SGD step of ResNet-50 per variant, above what is allocated before it."""
    rows = []
    torch.manual_seed(0)
    base = ResNet50().to(device="cuda", dtype=dtype)
    for variant, model in variants(base).items():
        model = model.train()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(batch, 3, image, image, device="cuda", dtype=dtype).to(memory_format=fmt)
        target = torch.randint(0, 1000, (batch,), device="cuda")
        _train_step(model, opt, x, target)  # warm-up: cuDNN and autotuning choices, gradient and momentum buffers
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _train_step(model, opt, x, target)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        rows.append({"variant": variant, "dtype": str(dtype)[6:], "batch": batch,
                     "before": before, "peak": peak, "step": peak - before})
        del model, opt, x, target
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mib(n: float) -> str:
    return f"{n / MIB:,.1f}"


def findings(t32: dict, t16: dict) -> str:
    down = sum(layer.numel for layer in resnet50_layers() if layer.role == DOWNSAMPLE) * 4
    last = resnet50_layers()[-1].numel * 4
    return "\n".join([
        "## Findings\n",
        f"* What the BatchNorm groups' own autograd nodes save drops from {t32['torch_own'] / GIB:.2f} to "
        f"{t32['fused_own'] / GIB:.2f} GiB (float32; bfloat16 {t16['torch_own'] / GIB:.2f} -> "
        f"{t16['fused_own'] / GIB:.2f}): the fused module never saves y.",
        "* But with torchvision's in-place ReLU that does not free memory: y is the next conv's (or the "
        "maxpool's) input, and the conv saves it anyway. What stays alive for backward goes from "
        f"{t32['torch_kept'] / GIB:.2f} to {t32['fused_kept'] / GIB:.2f} GiB in float32 "
        f"({(t32['fused_kept'] - t32['torch_kept']) / GIB:+.2f} GiB; bfloat16 "
        f"{(t16['fused_kept'] - t16['torch_kept']) / GIB:+.2f}): the fused bn3 keeps its residual for "
        f"backward, and in the 4 downsample blocks that residual is the downsample BatchNorm's output, which "
        f"torch frees after the add (+{down / GIB:.2f} GiB); only after the last block, whose avgpool saves "
        f"nothing, does fusing free y (-{last / GIB:.2f} GiB).",
        "* The block measurement shows the same: 7 -> 6 storages for an identity Bottleneck (its output is "
        "saved by the next block instead), 8 -> 8 with a downsample (relu3's output out, the residual in).",
        "* Where the activation is not in place and saves its input (SiLU, LeakyReLU without inplace), "
        "fusing frees one activation per layer: see the conv-BN-SiLU-conv row.",
        "* Possible improvement (tritonbn/_ops.py, not done here): for relu and leaky_relu (slope > 0) the "
        "backward needs only the sign of the pre-activation, which the output y has. Saving y (kept by the "
        "next conv anyway) instead of the residual would drop the downsample outputs again: the fused "
        f"network would keep {t32['torch_kept'] / GIB:.2f} GiB (float32), exactly torch's, instead of "
        f"{t32['fused_kept'] / GIB:.2f}.",
        "",
    ])


def report(batch: int, measure: bool) -> str:
    """The whole report as markdown (also printed)."""
    _check_against_perf_shapes()
    prepare()
    import triton

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = (f"CPU ({platform.machine()}, {os.cpu_count()} cores), tritonbn's kernels in Triton's interpreter "
                 "(TRITON_INTERPRET=1)")
    out = ["# Activation memory saved for backward: torch vs tritonbn fused\n",
           f"Date: {DATE}. Generated by `python -m perf.activation_memory --batch {batch}`.\n",
           f"Machine: {where}; torch {torch.__version__}, triton {triton.__version__}.\n"]

    rows32, t32 = analytic(batch, torch.float32)
    _, t16 = analytic(batch, torch.bfloat16)
    out.append(f"## 1. Analytic, per BatchNorm layer of ResNet-50, batch {batch} (computed, no device)\n")
    out.append(
        "Eager torch in torchvision's layout: BatchNorm saves its input x; `nn.ReLU(inplace=True)` saves its "
        "result, which *is* the BatchNorm output's storage (`out += identity` and the in-place ReLU write into "
        "it); the add saves nothing. tritonbn fused (`fuse_model`): BatchNormAct saves x and, with a residual, "
        "a reference to it; no activation. **own**: storages the group's own autograd nodes save. **kept**: "
        "storages the group reads or writes that stay alive until backward, whoever saves them: y is also "
        "saved by the next conv or maxpool as its input, fused or not (not by the final avgpool, a mean: "
        "there fusing frees y); a block input used as "
        "residual is conv1's input anyway; a downsample output is freed after the add in torch but kept as "
        "the fused bn3's residual (on the downsample row). Summed, plus the image, maxpool output and "
        "indices and fc input, 'kept' is the network's total, which section 2 measures. Per-channel "
        "statistics (C floats) are left out. MiB, float32 (bfloat16: exactly half).\n")
    table = []
    for r in rows32:
        table.append([r["name"], "x".join(map(str, r["shape"])), r["role"], _mib(r["torch_own"]),
                      _mib(r["fused_own"]), _mib(r["torch_kept"]), _mib(r["fused_kept"])])
    table.append(["**total**", "", "", *(f"**{_mib(t32[k])}**" for k in ("torch_own", "fused_own", "torch_kept",
                                                                          "fused_kept"))])
    out.append(_table(["layer", "shape", "group", "torch own", "fused own", "torch kept", "fused kept"], table))
    out.append("\nTotals (GiB):\n")
    out.append(_table(
        ["dtype", "torch own", "tritonbn fused own", "torch kept", "tritonbn fused kept", "fused - torch (kept)"],
        [[name, *(f"{t[k] / GIB:.2f}" for k in ("torch_own", "fused_own", "torch_kept", "fused_kept")),
          f"{(t['fused_kept'] - t['torch_kept']) / GIB:+.2f}"] for name, t in (("float32", t32), ("bfloat16", t16))]))
    out.append("")

    if measure:
        out.append(f"## 2. Measured with saved_tensors_hooks ({'CUDA' if device.type == 'cuda' else 'CPU'})\n")
        out.append("Unique storages of the tensors autograd saves in one training-mode forward, parameters, "
                   "buffers and 1-D tensors (per-channel statistics) excluded.\n")
        blocks = measure_blocks(device)
        out.append(_table(["block", "variant", "saved storages", "bytes"],
                          [[r["what"], r["variant"], r["storages"], f"{r['bytes']:,}"] for r in blocks]))
        nets = measure_network(device, 2, 32, 4, torch.float32)
        if device.type == "cuda":
            for dtype in (torch.float32, torch.bfloat16):
                nets += measure_network(device, batch, 224, 64, dtype)
                torch.cuda.empty_cache()
        out.append("\nWhole network, against the analytic total (the BatchNorm groups' 'kept' bytes plus the "
                   "image, the maxpool output and indices, and the fc input) for the same shapes:\n")
        out.append(_table(["network", "variant", "saved storages", "measured", "analytic", "match"],
                          [[r["what"], r["variant"], r["storages"], f"{r['bytes']:,}", f"{r['analytic']:,}",
                            "yes" if r["bytes"] == r["analytic"] else "NO"] for r in nets]))
        out.append("")
        out.append(f"## 3. Peak memory of one training step ({'measured' if device.type == 'cuda' else 'not run'})\n")
        if device.type == "cuda":
            peaks = []
            for dtype in (torch.float32, torch.bfloat16):
                peaks += cuda_step_peak(batch, dtype)
            out.append("`torch.cuda.max_memory_allocated` during one SGD step (forward, backward, update) of "
                       "ResNet-50, after a warm-up step; 'step' is the peak above what was allocated before it "
                       "(weights, gradients, momentum).\n")
            out.append(_table(["variant", "dtype", "batch", "allocated before (MiB)", "peak (MiB)", "step (MiB)"],
                              [[r["variant"], r["dtype"], r["batch"], _mib(r["before"]), _mib(r["peak"]),
                                _mib(r["step"])] for r in peaks]))
        else:
            out.append("No GPU in this run: `torch.cuda.max_memory_allocated` was not measured. "
                       "`python -m perf.activation_memory` on a CUDA machine adds it, and the full-size hook "
                       "measurement.")
        out.append("")
    out.append(findings(t32, t16))
    text = "\n".join(out)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-measure", action="store_true", help="the analytic tables only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    text = report(args.batch, not args.no_measure)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
