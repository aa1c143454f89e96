"""Normalization layers."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._validate import expect_nchw, expect_positive_int


class LayerNorm2d(nn.LayerNorm):
    """Channels-first LayerNorm: normalizes a ``(B, C, H, W)`` map over ``C`` at every position.

    The official HiFuse/HEMF ``LayerNorm(data_format="channels_first")`` (eps 1e-6 there, the default
    here). Parameters ``weight``/``bias`` of shape ``(C,)``.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, elementwise_affine: bool = True):
        num_channels = expect_positive_int(type(self).__name__, "num_channels", num_channels)
        super().__init__(num_channels, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expect_nchw(type(self).__name__, "x", x, self.normalized_shape[0], like=self)
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)
