"""FusionUNet: segmentation with a dual-branch fusion encoder and a U-Net decoder.

The encoder is any fusionblocks model used through ``forward_intermediates``: for ``hemf`` (default)
and ``hifuse_*`` that is a CNN branch and a transformer branch whose features are fused at every scale
by HEF (resp. HFF) blocks — the fused maps at strides 4/8/16/32 are the U-Net's skips. The decoder
upsamples from stride 32, concatenating each skip, and predicts per-pixel logits at the input size.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._validate import expect_nchw
from .registry import create_model


class _ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UpBlock(nn.Module):
    """Upsample ``x`` to the skip's size, concatenate, two 3x3 conv-BN-ReLU.

    Shapes: ``x (B, C_in, h, w), skip (B, C_skip, H, W) -> (B, C_out, H, W)``.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.convs = nn.Sequential(_ConvBNReLU(in_channels + skip_channels, out_channels), _ConvBNReLU(out_channels, out_channels))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.convs(torch.cat([x, skip], dim=1))


class FusionUNet(nn.Module):
    """U-Net over a fusion encoder.

    Args:
        num_classes: output channels (1 for binary masks with a sigmoid/BCE loss).
        encoder: a registered model name (its ``forward_intermediates`` gives the skips) or a module
            with ``forward_intermediates`` and ``feature_info``.
        decoder_channels: widths of the decoder stages at strides 16, 8, 4 and 1.
        encoder_kwargs: passed to ``create_model`` when ``encoder`` is a name.

    Shapes: ``(B, in_chans, H, W) -> (B, num_classes, H, W)``.
    """

    def __init__(
        self,
        num_classes: int = 1,
        encoder: str | nn.Module = "hemf",
        decoder_channels: Sequence[int] = (256, 128, 64, 32),
        encoder_kwargs: Optional[Dict[str, object]] = None,
    ):
        super().__init__()
        if isinstance(encoder, str):
            encoder = create_model(encoder, num_classes=0, **(encoder_kwargs or {}))
        info = getattr(encoder, "feature_info", None)
        if not hasattr(encoder, "forward_intermediates") or not info or len(info) != 4:
            raise ValueError(
                f"FusionUNet: expected an encoder with forward_intermediates and 4 feature levels, got {type(encoder).__name__}"
            )
        if len(decoder_channels) != 4:
            raise ValueError(f"FusionUNet: expected 4 decoder_channels, got {tuple(decoder_channels)}")
        self.encoder = encoder
        chs = [f["num_chs"] for f in info]
        d16, d8, d4, d1 = decoder_channels
        self.up16 = UpBlock(chs[3], chs[2], d16)
        self.up8 = UpBlock(d16, chs[1], d8)
        self.up4 = UpBlock(d8, chs[0], d4)
        self.refine = _ConvBNReLU(d4, d1)
        self.head = nn.Conv2d(d1, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expect_nchw(type(self).__name__, "x", x)
        f4, f8, f16, f32 = self.encoder.forward_intermediates(x)
        y = self.up4(self.up8(self.up16(f32, f16), f8), f4)
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.refine(y))
