"""Convolution + optional BatchNorm + optional ReLU: the official HiFuse/HEMF ``Conv`` unit."""
from __future__ import annotations

import torch
import torch.nn as nn

from .._validate import expect_divisible, expect_nchw, expect_positive_int


class ConvBN(nn.Module):
    """``conv -> [bn] -> [relu]`` with "same" padding for odd kernels.

    Submodule names (``conv``, ``bn``) match the official ``Conv`` wrapper, so official weights map 1:1.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size.
        stride: convolution stride.
        bn: append ``BatchNorm2d(out_channels)``.
        relu: append ``ReLU``.
        bias: conv bias.
        groups: conv groups.

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, H', W')``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        *,
        bn: bool = False,
        relu: bool = False,
        bias: bool = True,
        groups: int = 1,
    ):
        super().__init__()
        name = type(self).__name__
        in_channels = expect_positive_int(name, "in_channels", in_channels)
        out_channels = expect_positive_int(name, "out_channels", out_channels)
        kernel_size = expect_positive_int(name, "kernel_size", kernel_size)
        stride = expect_positive_int(name, "stride", stride)
        groups = expect_positive_int(name, "groups", groups)
        expect_divisible(name, "in_channels", in_channels, groups, "groups")
        expect_divisible(name, "out_channels", out_channels, groups, "groups")
        self.in_channels = in_channels
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=(kernel_size - 1) // 2, bias=bias, groups=groups
        )
        self.bn = nn.BatchNorm2d(out_channels) if bn else None
        self.relu = nn.ReLU(inplace=True) if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expect_nchw(type(self).__name__, "x", x, self.in_channels, like=self)
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu is not None:
            x = self.relu(x)
        return x
