"""The shape suites of the perf report.

The GPU suite is what a BatchNorm user actually runs: every BatchNorm layer of ResNet-50
(torchvision's v1.5, stride on the 3x3 conv) at batch 256, grouped into distinct shapes with
the number of layers that share each one, so that a per-shape speedup can be weighted into
a whole-network number. Around it: one very large activation, BatchNorm1d on 2D inputs, a
3D UNet-style volume, and small batches where launch overhead and too few programs matter.

The ResNet-50 shapes are derived from the architecture description rather than typed in, so
a miscount (it is easy to forget that bn1 of a stage's first block runs at the *input*
resolution) cannot slip in; ``resnet50_bn_layers`` asserts the known total of 53.

The fused ops (BN+ReLU, BN+add+ReLU) run on the ResNet-50 shapes where the network has
them, with the number of layers of each op per shape: bn1 and every block's bn1 and bn2 are
followed by a ReLU (33 layers), every block's bn3 by the residual add and a ReLU (16); the 4
downsample BatchNorms stay plain.

The smoke suite is tiny: it runs through Triton's interpreter on a CPU to prove the report
works end to end, and says nothing about performance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from perf.common import BATCH_NORM, GN_OPS, RESNET50_BN_LAYERS, RESNET50_FUSED_LAYERS


@dataclass(frozen=True)
class Case:
    """One input shape of the suite.

    name: short label for tables and plot axes; layers: how many layers of the source
    network have this shape (and op; 1 for synthetic cases); group: which family it belongs
    to; op: what is measured on it (perf/common.py: OPS); groups: GroupNorm's num_groups
    (0 for the BatchNorm ops).
    """

    name: str
    shape: tuple[int, ...]
    layers: int = 1
    group: str = "other"
    op: str = BATCH_NORM
    groups: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def shape_str(self) -> str:
        return "x".join(str(d) for d in self.shape)


# torchvision resnet50: (blocks, width, stride of the stage's first block). Bottleneck
# channels are width -> width -> width * EXPANSION; the stride sits on conv2 (v1.5).
RESNET50_STAGES = ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2))
EXPANSION = 4


def resnet50_bn_layers(batch: int = 256, image: int = 224) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(module name, input shape) of every BatchNorm2d of torchvision's ResNet-50, in order."""
    layers = []
    res = image // 2  # conv1: 7x7, stride 2
    layers.append(("bn1", (batch, 64, res, res)))
    res //= 2  # maxpool: stride 2
    in_channels = 64
    for stage, (blocks, width, stage_stride) in enumerate(RESNET50_STAGES, start=1):
        out_channels = width * EXPANSION
        for block in range(blocks):
            stride = stage_stride if block == 0 else 1
            out_res = res // stride
            prefix = f"layer{stage}.{block}"
            # conv1 (1x1, stride 1) keeps the block's input resolution; conv2 (3x3) strides.
            layers.append((f"{prefix}.bn1", (batch, width, res, res)))
            layers.append((f"{prefix}.bn2", (batch, width, out_res, out_res)))
            layers.append((f"{prefix}.bn3", (batch, out_channels, out_res, out_res)))
            if stride != 1 or in_channels != out_channels:
                layers.append((f"{prefix}.downsample.1", (batch, out_channels, out_res, out_res)))
            in_channels = out_channels
            res = out_res
    assert len(layers) == RESNET50_BN_LAYERS, f"ResNet-50 has 53 BatchNorm layers, built {len(layers)}"
    return layers


def resnet50_cases(batch: int = 256) -> list[Case]:
    """The distinct ResNet-50 BatchNorm shapes, in network order, with their layer counts."""
    counts: dict[tuple[int, ...], int] = {}
    for _, shape in resnet50_bn_layers(batch):
        counts[shape] = counts.get(shape, 0) + 1
    return [Case(f"rn50-{shape[1]}x{shape[2]}", shape, layers, "resnet50") for shape, layers in counts.items()]


def resnet50_fused_op(layer_name: str) -> str | None:
    """Which fused op a ResNet-50 BatchNorm layer forms with what follows it (None: plain)."""
    if "downsample" in layer_name:
        return None
    return "bn_add_relu" if layer_name.endswith(".bn3") else "bn_relu"


def resnet50_fused_cases(batch: int = 256) -> list[Case]:
    """Per fused op, the distinct ResNet-50 shapes it runs on, in network order, with layer counts."""
    counts: dict[tuple[str, tuple[int, ...]], int] = {}
    for name, shape in resnet50_bn_layers(batch):
        op = resnet50_fused_op(name)
        if op is not None:
            counts[(op, shape)] = counts.get((op, shape), 0) + 1
    for op, expected in RESNET50_FUSED_LAYERS.items():
        got = sum(n for (o, _), n in counts.items() if o == op)
        assert got == expected, f"ResNet-50 has {expected} {op} layers, counted {got}"
    return [Case(f"rn50-{shape[1]}x{shape[2]}", shape, layers, "resnet50", op)
            for op in RESNET50_FUSED_LAYERS for (o, shape), layers in counts.items() if o == op]


def gpu_suite() -> list[Case]:
    """The full suite for a GPU report."""
    return [
        *resnet50_cases(256),
        # One activation of 2^30 elements (4 GiB in float32): far past any cache, and the
        # size where a kernel's 32-bit index arithmetic is closest to overflowing.
        Case("big-64x64x512x512", (64, 64, 512, 512), 1, "large"),
        Case("bn1d-4096x1024", (4096, 1024), 1, "bn1d"),
        Case("bn1d-65536x256", (65536, 256), 1, "bn1d"),
        Case("unet3d-32x64x128x128", (2, 32, 64, 128, 128), 1, "unet3d"),
        # ResNet-50's most common shape (layer3 bn2, 11 of 53 layers) at tiny batches: few
        # elements per channel, so launch overhead and occupancy dominate.
        Case("small-n2-256x14", (2, 256, 14, 14), 1, "small-batch"),
        Case("small-n8-256x14", (8, 256, 14, 14), 1, "small-batch"),
    ]


# GroupNorm where it is hot (issue #12), GroupNorm(32) everywhere:
# * Stable Diffusion's UNet at 64x64 latents, batch 2 (classifier-free guidance): the ResNet
#   blocks' widths 320/640/1280 at 64/32/16;
# * a VAE decoder at 1024x1024 output (SDXL): 32 groups of millions of elements, where a group
#   must be split across many programs;
# * a detection head (FCOS / RetinaNet-GN): 256 channels on the stride-8 level of an 800x1216
#   image, batch 2 per GPU.
GN_GPU_SHAPES = (
    ("unet-320x64", (2, 320, 64, 64), "unet"),
    ("unet-640x32", (2, 640, 32, 32), "unet"),
    ("unet-1280x16", (2, 1280, 16, 16), "unet"),
    ("vae-512x512", (1, 512, 512, 512), "vae"),
    ("vae-128x1024", (1, 128, 1024, 1024), "vae"),
    ("det-head-256x100x152", (2, 256, 100, 152), "detection"),
)


def gpu_group_norm_suite(groups: int = 32) -> list[Case]:
    """GroupNorm and GN+SiLU on the diffusion and detection shapes."""
    return [Case(name, shape, 1, group, op, groups) for op in GN_OPS for name, shape, group in GN_GPU_SHAPES]


def smoke_group_norm_suite() -> list[Case]:
    """Tiny GroupNorm shapes for the interpreter: a short one, and groups long enough to split."""
    cases = []
    for op in GN_OPS:
        cases.append(Case("smoke-gn-2x8x6x6", (2, 8, 6, 6), 1, "smoke", op, 4))
        # Groups of 2 x 16640 elements: just over twice GN_MIN_ELEMENTS_PER_PROGRAM, the split route.
        cases.append(Case("smoke-gn-split-1x4x128x130", (1, 4, 128, 130), 1, "smoke", op, 2))
    return cases


def smoke_suite() -> list[Case]:
    """Tiny shapes for the CPU interpreter run: every rank, and both kernel routes."""
    return [
        Case("smoke-4x8x6x6", (4, 8, 6, 6), 1, "smoke"),
        Case("smoke-16x12", (16, 12), 1, "smoke"),
        Case("smoke-2x4x3x4x4", (2, 4, 3, 4, 4), 1, "smoke"),
        # Just over 2 * 16384 elements per channel with 2 channels: the split route (partial
        # statistics + combine) on both layouts, which the tiny shapes never take.
        Case("smoke-split-1x2x128x260", (1, 2, 128, 260), 1, "smoke"),
    ]


def gpu_fused_suite() -> list[Case]:
    """The fused ops on the GPU: ResNet-50's shapes, where the target is judged."""
    return resnet50_fused_cases(256)


def smoke_fused_suite() -> list[Case]:
    """The fused ops on the CPU smoke run: both on a one-launch (fused route) shape, and
    BN+add+ReLU, which also writes dresidual, on the split route. (The split shape costs
    seconds per call in the interpreter: BN+ReLU there would add about 25 s to the run.)"""
    return [
        Case("smoke-4x8x6x6", (4, 8, 6, 6), 1, "smoke", "bn_relu"),
        Case("smoke-4x8x6x6", (4, 8, 6, 6), 1, "smoke", "bn_add_relu"),
        Case("smoke-split-1x2x128x260", (1, 2, 128, 260), 1, "smoke", "bn_add_relu"),
    ]
