"""Output shapes and memory layouts shared by the op families' references and fakes.

    >>> conv_out_shape(x, (3, 3), cout=64, stride=[2, 2], padding=[1, 1], dilation=[1, 1])
    [1, 64, 112, 112]
    >>> out_format(x)          # channels_last when x is strictly channels-last, else contiguous
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["conv_out_shape", "strictly_channels_last", "out_format", "to_format"]


def conv_out_shape(x: torch.Tensor, kernel: Sequence[int], cout: int, stride, padding,
                   dilation) -> list[int]:
    """``[N, cout, *spatial]`` of a convolution of ``x`` (``[N, C, *spatial]``)."""
    out = [x.shape[0], cout]
    for size, k, s, p, d in zip(x.shape[2:], kernel, stride, padding, dilation):
        out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return out


def strictly_channels_last(x: torch.Tensor) -> bool:
    """4-D, channels-last and not also contiguous (a 1x1 image is both: it counts as NCHW)."""
    return x.dim() == 4 and not x.is_contiguous() and \
        x.is_contiguous(memory_format=torch.channels_last)


def out_format(x: torch.Tensor) -> torch.memory_format:
    """The layout contract of the conv ops: channels-last out for a strictly channels-last
    input, contiguous otherwise."""
    return torch.channels_last if strictly_channels_last(x) else torch.contiguous_format


def to_format(y: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return y if y.is_contiguous(memory_format=fmt) else y.contiguous(memory_format=fmt)
