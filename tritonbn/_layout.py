"""The canonical views the kernels read: NCS ([N, C, S], S contiguous) or rows ([M, C]).

Contiguous NCHW-like inputs are NCS; channels_last / channels_last_3d inputs and 2D (N, C)
inputs are rows. Both are read through their strides, without a copy. Any other strided
input is copied once into a dense tensor first. Dimensions of size 1 carry no stride
information (channels_last with N = 1 or C = 1 is ambiguous), so they are ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CanonicalView:
    kind: str  # "ncs" or "rows"
    n: int
    c: int
    s: int  # spatial elements per (sample, channel)
    stride_n: int  # ncs: between samples
    stride_c: int  # ncs: between channels
    stride_m: int  # rows: between rows (a row holds the C channels of one (sample, position))
    max_offset: int  # largest element offset + 1: decides 32- or 64-bit indexing

    @property
    def m(self) -> int:
        return self.n * self.s


def _merged_stride(sizes: tuple[int, ...], strides: tuple[int, ...]) -> int | None:
    """Stride of the innermost element if these dims flatten into one evenly strided axis."""
    inner = None
    expected = None
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size == 1:
            continue
        if inner is None:
            inner, expected = stride, stride * size
        elif stride != expected:
            return None
        else:
            expected = stride * size
    return 1 if inner is None else inner


def _view_of(x: torch.Tensor) -> CanonicalView | None:
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    if x.numel() == 0:
        # Nothing to read (N, C or a spatial size is 0): the launchers return before any kernel.
        return CanonicalView("ncs", n, c, s, 0, 0, 0, 1)
    stride_n, stride_c = x.stride(0), x.stride(1)
    max_offset = 1 + sum((size - 1) * stride for size, stride in zip(x.shape, x.stride()) if size > 0)
    spatial_stride = _merged_stride(tuple(x.shape[2:]), tuple(x.stride()[2:]))
    if s > 1 and spatial_stride == 1:
        return CanonicalView("ncs", n, c, s, stride_n, stride_c, 0, max_offset)
    if c == 1 or stride_c == 1:
        if s == 1:
            return CanonicalView("rows", n, c, s, 0, 0, stride_n, max_offset)
        if spatial_stride is not None and (n == 1 or stride_n == s * spatial_stride):
            return CanonicalView("rows", n, c, s, 0, 0, spatial_stride, max_offset)
    if s == 1:
        # (N, C) with channels strided: NCS with a spatial extent of one.
        return CanonicalView("ncs", n, c, s, stride_n, stride_c, 0, max_offset)
    return None


def _non_overlapping_and_dense(x: torch.Tensor) -> bool:
    """Every element of the storage span is used exactly once (a permutation of contiguous)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and equal strides on every dimension of size > 1."""
    return a.shape == b.shape and all(
        size == 1 or sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride())
    )


def canonical_input(x: torch.Tensor) -> tuple[torch.Tensor, CanonicalView]:
    """The tensor the kernels read (x itself, or one dense copy) and its canonical view.

    The output is allocated with ``torch.empty_like`` of the returned tensor, so it keeps
    the input's memory format, like torch; the kernels then use one set of strides for both.
    """
    if _non_overlapping_and_dense(x):
        view = _view_of(x)
        if view is not None:
            return x, view
    dense = x.contiguous()
    view = _view_of(dense)
    assert view is not None, "a contiguous tensor always has a canonical view"
    return dense, view


def like_layout(t: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """t with reference's strides (a copy only when they differ)."""
    if same_layout(t, reference):
        return t
    return torch.empty_like(reference).copy_(t)
