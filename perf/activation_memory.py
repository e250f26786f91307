"""Activation memory saved for backward: eager torch (unfused) against tritonbn's fused BatchNormAct.

Usage::

    python -m perf.activation_memory [--batch 256] [--out perf/results/memory.md] [--no-measure]

tritonbn's fused op (``tritonbn/_ops.py``) saves x, the affine parameters and the statistics,
and with relu also its *output* y, whose sign is the mask; with silu or leaky_relu
the residual (when there is one), from which backward recomputes z = BN(x) + residual. It
never stores a mask or the pre-activation. Two networks are modelled: torchvision's ResNet-50
(``nn.ReLU(inplace=True)``) and the same network with ``nn.SiLU()`` (not in place), the
style of EfficientNet-like models. Three things, each labelled with where it comes from:

1. An analytic count, per BatchNorm layer of ResNet-50 (torchvision v1.5; shapes from
   ``perf/shapes.py``) at batch 256, in float32 and bfloat16, of the activation bytes that
   autograd keeps for backward because of that BatchNorm and what follows it:

   * ReLU in place, eager torch: BatchNorm saves its input x; the in-place ReLU saves its
     *result*, which is the BatchNorm output's storage (``out += identity`` and the ReLU write
     into it); the add saves nothing. So a BN+ReLU or BN+add+ReLU group saves x and y; a
     downsample BN saves x. tritonbn fused: x and y, the same two storages. The residual is
     not held, so a downsample output is freed after the add in both.
   * SiLU, not in place, eager torch: BatchNorm saves x, SiLU saves its input z (the
     BatchNorm output, after the in-place add in bn3) and writes a new y. tritonbn fused: x,
     and with a residual a reference to it; z never exists.

   Two columns each: "own" (the storages the group's own autograd nodes save) and "kept"
   (the storages the group reads or writes that stay alive until backward, whoever saves
   them: y is also the input of the next conv or maxpool, which saves it, except after the
   last block, whose avgpool is a mean and saves nothing; with SiLU a downsample output is
   freed after the add in torch but kept as the fused bn3's residual). Per-channel vectors
   (mean, 1/std: C floats) are left out: 0.01 % of the total.

2. A measurement of the same thing with ``torch.autograd.graph.saved_tensors_hooks``: the
   pack hook records each saved tensor's storage (data_ptr, nbytes), and unique storages
   are counted, parameters and buffers excluded. On a CPU the tritonbn kernels run in
   Triton's interpreter, so the shapes are small: single blocks, each against its expected
   count, and ResNet-50's full architecture at 1/16 width and 32x32 images (ReLU and SiLU),
   where the measured total is compared with the analytic model applied to the same shapes.
   On a GPU the full-size ResNet-50 is measured too.

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

BN_ACT, BN_ADD_ACT, DOWNSAMPLE = "bn+act", "bn+add+act", "downsample bn"
# The two networks: torchvision's (ReLU in place) and the same with SiLU (not in place).
ACTIVATIONS = ("relu", "silu")
ACT_NAMES = {"relu": "ReLU (in place)", "silu": "SiLU"}
MODEL_KEYS = ("torch_own", "fused_own", "torch_kept", "fused_kept")


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
    role: str  # BN_ACT, BN_ADD_ACT or DOWNSAMPLE
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
    layers.append(BnLayer("bn1", (batch, width, res, res), BN_ACT))
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
            layers.append(BnLayer(f"{prefix}.bn1", (batch, planes, res, res), BN_ACT))
            layers.append(BnLayer(f"{prefix}.bn2", (batch, planes, out_res, out_res), BN_ACT))
            layers.append(BnLayer(f"{prefix}.bn3", (batch, out_channels, out_res, out_res), BN_ADD_ACT, downsample))
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


def saved_elements(layer: BnLayer, activation: str = "relu") -> dict[str, int]:
    """Elements saved for backward by one layer's group: torch / tritonbn fused, "own" / "kept".

    own: what the group's autograd nodes save. kept: the storages the group produces (or
    reads: its input x) that stay alive until backward, whoever saves them; summed over the
    network (plus the few tensors outside any group) it is the network's total.
    """
    e = layer.numel
    if activation == "relu":
        # ReLU in place. torch: BatchNorm saves x; the ReLU saves its result y, the BatchNorm
        # output's storage (the in-place add and ReLU wrote into it). Fused: x and y (y's sign is
        # the mask): the same two storages. The residual is held by neither, so a downsample
        # output is freed after the add in both. y is also the next layer's saved input.
        if layer.role == DOWNSAMPLE:
            return {"torch_own": e, "fused_own": e, "torch_kept": e, "fused_kept": e}
        return {"torch_own": 2 * e, "fused_own": 2 * e, "torch_kept": 2 * e, "fused_kept": 2 * e}
    if activation != "silu":
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    # SiLU, not in place. y (a new storage) is kept by the next conv or maxpool, not by the
    # final avgpool.
    y = e if layer.next_saves_output else 0
    if layer.role == DOWNSAMPLE:
        # A plain BatchNorm in both: saves x. Its output is the residual: freed after the add in
        # torch; in tritonbn held by the fused bn3 (silu recomputes z from it), so kept alive.
        return {"torch_own": e, "fused_own": e, "torch_kept": e, "fused_kept": 2 * e}
    # torch: x by BatchNorm, z (the BatchNorm output, after the in-place add in bn3) by SiLU.
    torch_own = 2 * e
    torch_kept = 2 * e + y
    # fused: x; z never exists. bn3 also holds a reference to the residual, a storage kept
    # anyway (the block input is conv1's input) or counted on the downsample row.
    fused_own = e if layer.role == BN_ACT else 2 * e
    return {"torch_own": torch_own, "fused_own": fused_own, "torch_kept": torch_kept, "fused_kept": e + y}


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
             width: int = 64, activation: str = "relu") -> tuple[list[dict], dict]:
    """Per-layer rows (bytes) and totals for ResNet-50 with this activation."""
    size = torch.empty(0, dtype=dtype).element_size()
    rows = []
    totals = dict.fromkeys(MODEL_KEYS, 0)
    for layer in resnet50_layers(batch, image, width):
        elements = saved_elements(layer, activation)
        row = {"name": layer.name, "shape": layer.shape, "role": layer.role,
               **{k: v * size for k, v in elements.items()}}
        rows.append(row)
        for k in totals:
            totals[k] += row[k]
    return rows, totals


def network_total(batch: int, image: int, width: int, dtype: torch.dtype, fused: bool,
                  activation: str = "relu") -> int:
    """Analytic unique saved bytes of the whole network (what the hook measurement counts)."""
    _, totals = analytic(batch, dtype, image, width, activation)
    return totals["fused_kept" if fused else "torch_kept"] + other_saved_bytes(batch, image, width, dtype)


# ------------------------------------------------------------------------------------------
# torchvision's ResNet-50 (torchvision is not a dependency), with its ReLU or with SiLU
# ------------------------------------------------------------------------------------------


def make_activation(activation: str) -> nn.Module:
    """torchvision's ``nn.ReLU(inplace=True)``, or ``nn.SiLU()`` (not in place)."""
    return nn.ReLU(inplace=True) if activation == "relu" else nn.SiLU()


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 activation: str = "relu") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = make_activation(activation)  # torchvision's name, whichever activation
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
    def __init__(self, width: int = 64, num_classes: int = 1000, activation: str = "relu") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = make_activation(activation)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = width
        stages = []
        for blocks, stage_width, stride in shapes.RESNET50_STAGES:
            planes = stage_width * width // 64
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
            layer = [Bottleneck(inplanes, planes, stride, downsample, activation)]
            inplanes = planes * 4
            layer += [Bottleneck(inplanes, planes, activation=activation) for _ in range(1, blocks)]
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
    """Saved storages of single blocks per variant, against the storages the policy predicts.

    Bottleneck with torchvision's in-place ReLU (identity; downsample), the downsample one with
    SiLU, and conv-BN-SiLU-conv. Expected, in activation-sized storages (c: a conv output,
    the BatchNorm's input; z: a BatchNorm output that SiLU saves; y: an activation output):
    """
    planes = channels // 4
    hw = res * res

    def sizes(n_in: int, n_planes: int, n_out: int) -> list[int]:
        return [batch * n_in * hw] + [batch * planes * hw] * n_planes + [batch * channels * hw] * n_out

    blocks = []
    for downsample, activation in ((False, "relu"), (True, "relu"), (True, "silu")):
        inplanes = channels // 2 if downsample else channels
        ds = None
        if downsample:
            ds = nn.Sequential(nn.Conv2d(inplanes, channels, 1, bias=False), nn.BatchNorm2d(channels))
        if activation == "relu":
            # torch and fused alike: x; c1, y1, c2, y2; c3, y3 (relu3's result, or the fused bn3's
            # output), and with a downsample its conv's output. The downsample BatchNorm's output is
            # held by neither: freed after the add.
            expected = {False: sizes(inplanes, 4, 3 if downsample else 2)}
            expected[True] = expected[False]
        else:
            # torch: x; c1, z1, y1, c2, z2, y2; c3, the downsample conv's output, z3 (y3 is saved by
            # nothing inside the block). Fused: no z, but bn3 holds its residual, the downsample
            # BatchNorm's output: x; c1, y1, c2, y2; c3, downsample conv output, residual.
            expected = {False: sizes(inplanes, 6, 3), True: sizes(inplanes, 4, 3)}
        name = f"Bottleneck {inplanes}->{channels}, {'downsample' if downsample else 'identity'}, {activation}"
        blocks.append((name, inplanes, expected, lambda inplanes=inplanes, ds=ds, activation=activation:
                       Bottleneck(inplanes, planes, downsample=ds, activation=activation)))
    # SiLU is not in place and saves its input, the BatchNorm output: here fusing frees a tensor.
    # torch: x, c, z, y; fused: x, c, y.
    blocks.append(("conv-BN-SiLU-conv", channels, {False: sizes(channels, 0, 3), True: sizes(channels, 0, 2)},
                   lambda: nn.Sequential(
                       nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.SiLU(),
                       nn.Conv2d(channels, channels, 3, padding=1, bias=False))))
    rows = []
    for what, inplanes, expected, build in blocks:
        torch.manual_seed(0)
        block = build().to(device).train()
        x = torch.randn(batch, inplanes, res, res, device=device, requires_grad=True)
        for variant, module in variants(block).items():
            saved = saved_storages(module, x)
            want = expected[variant == "tritonbn fused"]
            rows.append({"what": f"{what}, x {batch}x{inplanes}x{res}x{res}", "variant": variant,
                         "storages": len(saved), "bytes": sum(saved.values()), "expected_storages": len(want),
                         "expected_bytes": 4 * sum(want)})
    return rows


def measure_network(device: torch.device, batch: int, image: int, width: int, dtype: torch.dtype,
                    activation: str = "relu") -> list[dict]:
    """Saved storages of the whole ResNet-50 (one forward in training mode), against the analytic model."""
    torch.manual_seed(0)
    model = ResNet50(width, activation=activation).to(device=device, dtype=dtype).train()
    x = torch.randn(batch, 3, image, image, device=device, dtype=dtype)
    rows = []
    for variant, module in variants(model).items():
        saved = saved_storages(module, x)
        expected = network_total(batch, image, width, dtype, variant == "tritonbn fused", activation)
        rows.append({"what": f"ResNet-50 {ACT_NAMES[activation]}, width {width}, {batch}x3x{image}x{image}, "
                             f"{str(dtype)[6:]}",
                     "variant": variant, "storages": len(saved), "bytes": sum(saved.values()), "analytic": expected})
        del saved
    return rows


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=False)
    loss = nn.functional.cross_entropy(model(x).float(), target)
    loss.backward()
    opt.step()


def cuda_step_peak(batch: int, dtype: torch.dtype, image: int = 224, channels_last: bool = False,
                   activation: str = "relu") -> list[dict]:
    """Peak memory of one SGD step of ResNet-50 per variant, above what is allocated before it."""
    rows = []
    torch.manual_seed(0)
    base = ResNet50(activation=activation).to(device="cuda", dtype=dtype)
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
        rows.append({"variant": variant, "activation": ACT_NAMES[activation], "dtype": str(dtype)[6:], "batch": batch,
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


def findings(totals: dict[tuple[str, torch.dtype], dict], blocks: list[dict] | None, nets: list[dict] | None) -> str:
    """The findings, from the analytic totals and (when measured) the block and network rows."""
    r32, r16 = totals[("relu", torch.float32)], totals[("relu", torch.bfloat16)]
    s32, s16 = totals[("silu", torch.float32)], totals[("silu", torch.bfloat16)]
    down = sum(layer.numel for layer in resnet50_layers() if layer.role == DOWNSAMPLE) * 4
    last = resnet50_layers()[-1].numel * 4

    def gib(n: float) -> str:
        return f"{n / GIB:.2f}"

    lines = [
        "## Findings\n",
        f"* torchvision's ResNet-50 (ReLU in place): tritonbn fused keeps exactly what torch keeps, "
        f"{gib(r32['fused_kept'])} GiB in float32 ({gib(r16['fused_kept'])} in bfloat16) at batch 256, and its "
        f"BatchNorm groups' own nodes save the same {gib(r32['fused_own'])} GiB. The fused op saves x and its "
        "output y, whose sign is relu's mask: y is the storage torch's in-place ReLU saves, and the next conv "
        "saves it as its input anyway. It holds no residual, so the 4 downsample outputs are freed after the add, "
        "as in torch. In this network fusing can save time (one kernel, fewer bytes moved: perf/notes.md), not memory.",
        f"* The earlier policy (the fused op held the residual, to recompute z, instead of y) kept "
        f"{gib(r32['fused_kept'] + down - last)} GiB in float32 (+{gib(down - last)}: the downsample outputs, "
        f"+{gib(down)}, less the last block's y, -{gib(last)}, which no later layer saves).",
        f"* With SiLU (not in place, as in EfficientNet-style models) the fused op saves memory: torch keeps "
        f"{gib(s32['torch_kept'])} GiB in float32 and tritonbn fused {gib(s32['fused_kept'])} "
        f"({(s32['fused_kept'] - s32['torch_kept']) / GIB:+.2f} GiB, "
        f"{100 * (s32['fused_kept'] - s32['torch_kept']) / s32['torch_kept']:+.0f} %; bfloat16 "
        f"{gib(s16['torch_kept'])} -> {gib(s16['fused_kept'])}). torch's SiLU saves its input, the BatchNorm "
        "output z, a tensor of its own beside x and the SiLU output y; the fused op never materialises z and "
        f"recomputes it in backward from x (and the residual). The net figure already counts the +{gib(down)} GiB "
        "of downsample outputs that the fused bn3 holds as its residual for the recomputation.",
    ]
    if blocks:
        def count(what: str, variant: str) -> int:
            return next(r["storages"] for r in blocks if r["what"].startswith(what) and r["variant"] == variant)

        ok = all(r["storages"] == r["expected_storages"] and r["bytes"] == r["expected_bytes"] for r in blocks)
        lines.append(
            "* The block measurement " + ("matches the expected storages in every row" if ok else
                                          "DIFFERS from the expected storages (see the table)")
            + ": a ReLU Bottleneck saves "
            f"{count('Bottleneck 16->16, identity, relu', 'torch')} storages in torch and "
            f"{count('Bottleneck 16->16, identity, relu', 'tritonbn fused')} fused (identity), "
            f"{count('Bottleneck 8->16, downsample, relu', 'torch')} and "
            f"{count('Bottleneck 8->16, downsample, relu', 'tritonbn fused')} with a downsample; SiLU: "
            f"{count('Bottleneck 8->16, downsample, silu', 'torch')} -> "
            f"{count('Bottleneck 8->16, downsample, silu', 'tritonbn fused')} for the downsample Bottleneck "
            f"(three z out, the residual in), {count('conv-BN-SiLU-conv', 'torch')} -> "
            f"{count('conv-BN-SiLU-conv', 'tritonbn fused')} for conv-BN-SiLU-conv.")
    if nets:
        ok = all(r["bytes"] == r["analytic"] for r in nets)
        lines.append("* The whole-network hook measurement " + ("equals the analytic total for every network and "
                                                                 "variant" if ok else
                                                                 "DIFFERS from the analytic total (see the table)")
                     + ": the model above is what autograd keeps.")
    lines.append("")
    return "\n".join(lines)


def _analytic_section(batch: int) -> tuple[list[str], dict[tuple[str, torch.dtype], dict]]:
    out = [f"## 1. Analytic, per BatchNorm layer of ResNet-50, batch {batch} (computed, no device)\n"]
    out.append(
        "**ReLU (in place)**, torchvision's layout. Eager torch: BatchNorm saves its input x; "
        "`nn.ReLU(inplace=True)` saves its result, which *is* the BatchNorm output's storage (`out += identity` "
        "and the in-place ReLU write into it); the add saves nothing. tritonbn fused (`fuse_model`): "
        "BatchNormAct saves x and its output y (the sign of y is the mask): the same two storages; it holds no "
        "residual, so a downsample output is freed after the add in both. "
        "**SiLU (not in place)**, the same network with `nn.SiLU()`. Eager torch: BatchNorm saves x; SiLU saves "
        "its input z, the BatchNorm output (after the in-place add in bn3), and writes a new y. tritonbn fused: "
        "x and, with a residual, a reference to it (backward recomputes z); no z. "
        "**own**: storages the group's own autograd nodes save. **kept**: storages the group reads or writes "
        "that stay alive until backward, whoever saves them: y is also saved by the next conv or maxpool as its "
        "input (not by the final avgpool, a mean); a block input used as residual is conv1's input anyway; "
        "with SiLU a downsample output is freed after the add in torch but kept as the fused bn3's residual "
        "(on the downsample row). Summed, plus the image, maxpool output and indices and fc input, 'kept' is "
        "the network's total, which section 2 measures. Per-channel statistics (C floats) are left out. MiB, "
        "float32 (bfloat16: exactly half).\n")
    totals = {}
    per_layer = {}
    for activation in ACTIVATIONS:
        for dtype in (torch.float32, torch.bfloat16):
            rows, totals[(activation, dtype)] = analytic(batch, dtype, activation=activation)
            if dtype == torch.float32:
                per_layer[activation] = rows
    headers = ["layer", "shape", "group"] + [f"{name} {k.replace('_', ' ')}" for name in ("ReLU", "SiLU")
                                             for k in MODEL_KEYS]
    table = []
    for relu, silu in zip(per_layer["relu"], per_layer["silu"]):
        table.append([relu["name"], "x".join(map(str, relu["shape"])), relu["role"],
                      *(_mib(relu[k]) for k in MODEL_KEYS), *(_mib(silu[k]) for k in MODEL_KEYS)])
    table.append(["**total**", "", "", *(f"**{_mib(totals[(a, torch.float32)][k])}**" for a in ACTIVATIONS
                                         for k in MODEL_KEYS)])
    out.append(_table(headers, table))
    out.append("\nTotals (GiB):\n")
    out.append(_table(
        ["activation", "dtype", "torch own", "tritonbn fused own", "torch kept", "tritonbn fused kept",
         "fused - torch (kept)"],
        [[ACT_NAMES[a], str(d)[6:], *(f"{totals[(a, d)][k] / GIB:.2f}" for k in MODEL_KEYS),
          f"{(totals[(a, d)]['fused_kept'] - totals[(a, d)]['torch_kept']) / GIB:+.2f}"]
         for a in ACTIVATIONS for d in (torch.float32, torch.bfloat16)]))
    out.append("")
    return out, totals


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
           f"Machine: {where}; torch {torch.__version__}, triton {triton.__version__}.\n",
           "Policy measured (tritonbn/_ops.py): the fused BatchNorm + activation saves x, the parameters and the "
           "statistics, plus its output y for relu (the sign of y is the mask) or the "
           "residual for silu and leaky_relu (z is recomputed); never a mask or the pre-activation.\n"]
    section, totals = _analytic_section(batch)
    out += section

    blocks = nets = None
    if measure:
        out.append(f"## 2. Measured with saved_tensors_hooks ({'CUDA' if device.type == 'cuda' else 'CPU'})\n")
        out.append("Unique storages of the tensors autograd saves in one training-mode forward, parameters, "
                   "buffers and 1-D tensors (per-channel statistics) excluded; 'expected' is what the policy "
                   "predicts (`measure_blocks`: torch and tritonbn unfused alike, tritonbn fused its own).\n")
        blocks = measure_blocks(device)
        out.append(_table(["block", "variant", "saved storages", "bytes", "expected storages", "expected bytes",
                           "match"],
                          [[r["what"], r["variant"], r["storages"], f"{r['bytes']:,}", r["expected_storages"],
                            f"{r['expected_bytes']:,}",
                            "yes" if (r["storages"], r["bytes"]) == (r["expected_storages"], r["expected_bytes"])
                            else "NO"] for r in blocks]))
        nets = []
        for activation in ACTIVATIONS:
            nets += measure_network(device, 2, 32, 4, torch.float32, activation)
        if device.type == "cuda":
            for activation in ACTIVATIONS:
                for dtype in (torch.float32, torch.bfloat16):
                    nets += measure_network(device, batch, 224, 64, dtype, activation)
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
            for activation in ACTIVATIONS:
                for dtype in (torch.float32, torch.bfloat16):
                    peaks += cuda_step_peak(batch, dtype, activation=activation)
            out.append("`torch.cuda.max_memory_allocated` during one SGD step (forward, backward, update) of "
                       "ResNet-50, after a warm-up step; 'step' is the peak above what was allocated before it "
                       "(weights, gradients, momentum).\n")
            out.append(_table(["variant", "activation", "dtype", "batch", "allocated before (MiB)", "peak (MiB)",
                               "step (MiB)"],
                              [[r["variant"], r["activation"], r["dtype"], r["batch"], _mib(r["before"]),
                                _mib(r["peak"]), _mib(r["step"])] for r in peaks]))
        else:
            out.append(f"No GPU in this run ({DATE}): `torch.cuda.max_memory_allocated` was not measured. "
                       "`python -m perf.activation_memory` on a CUDA machine adds it, and the full-size hook "
                       "measurement.")
        out.append("")
    out.append(findings(totals, blocks, nets))
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
