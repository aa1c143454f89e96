"""Attention gates: channel attention and spatial attention (CBAM-style).

Both expose ``gate(x)`` (the sigmoid weights) and ``forward(x) = x * gate(x)``.
The official variants differ; the options select them:

* HiFuse HFF: channel MLP on max- and avg-pooled features (ratio 16); spatial conv over
  ``[max, avg]`` followed by BatchNorm (``SpatialAttn(order="max_avg", norm=True)``).
* HEMF HEF / CBAM: channel MLP ratio 16; spatial conv over ``[avg, max]``, no norm (the defaults).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .._validate import expect_choice, expect_nchw, expect_positive_int


class ChannelAttn(nn.Module):
    """Channel attention: ``sigmoid(mlp(maxpool(x)) + mlp(avgpool(x)))`` with a shared 1x1-conv MLP.

    Args:
        channels: ``C``.
        reduction: hidden width is ``C // reduction`` (at least 1).

    Shapes: ``forward: (B, C, H, W) -> (B, C, H, W)``; ``gate: (B, C, H, W) -> (B, C, 1, 1)``.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        channels = expect_positive_int("ChannelAttn", "channels", channels)
        reduction = expect_positive_int("ChannelAttn", "reduction", reduction)
        self.channels = channels
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        expect_nchw(type(self).__name__, "x", x, self.channels, like=self)
        mx = torch.amax(x, dim=(2, 3), keepdim=True)
        avg = torch.mean(x, dim=(2, 3), keepdim=True)
        return torch.sigmoid(self._mlp(mx) + self._mlp(avg))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class SpatialAttn(nn.Module):
    """Spatial attention: ``sigmoid([bn](conv_kxk(cat(pool_c(x)))))`` over channel-pooled maps.

    Args:
        kernel_size: odd conv kernel (7 in every official model).
        order: ``"avg_max"`` (HEMF, CBAM) or ``"max_avg"`` (HiFuse) — the order of the two pooled maps.
        norm: BatchNorm after the conv (HiFuse: True).
        bias: conv bias (False in every official model).

    Shapes: ``forward: (B, C, H, W) -> (B, C, H, W)``; ``gate: (B, C, H, W) -> (B, 1, H, W)``.

    The default (``order="avg_max"``, ``norm=False``: conv straight into the sigmoid) is HEMF's official gate.
    It is not the usual CBAM spatial gate: timm's ``timm.layers.SpatialAttn`` pools ``[avg, max]`` and puts a
    BatchNorm after the conv, and the widely used CBAM code of the paper's authors (``Jongchan/attention-module``) pools
    ``[max, avg]`` with a BatchNorm after the conv (that is HiFuse's gate, ``order="max_avg", norm=True``).
    For timm's gate use ``SpatialAttn(7, order="avg_max", norm=True)``.
    """

    def __init__(self, kernel_size: int = 7, *, order: str = "avg_max", norm: bool = False, bias: bool = False):
        super().__init__()
        kernel_size = expect_positive_int("SpatialAttn", "kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"SpatialAttn: expected an odd kernel_size, got {kernel_size}")
        expect_choice("SpatialAttn", "order", order, ("avg_max", "max_avg"))
        self.order = order
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=bias)
        self.bn = nn.BatchNorm2d(1) if norm else None

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        expect_nchw(type(self).__name__, "x", x, like=self)
        mx = torch.amax(x, dim=1, keepdim=True)
        avg = torch.mean(x, dim=1, keepdim=True)
        s = self.conv(torch.cat([avg, mx] if self.order == "avg_max" else [mx, avg], dim=1))
        if self.bn is not None:
            s = self.bn(s)
        return torch.sigmoid(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)
