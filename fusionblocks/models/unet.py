"""FusionUNet: segmentation with a dual-branch fusion encoder and a U-Net decoder.

The encoder is any fusionblocks model used through ``forward_intermediates``: for ``hemf`` (default)
and ``hifuse_*`` that is a CNN branch and a transformer branch whose features are fused at every scale
by HEF (resp. HFF) blocks — the fused maps at strides 4/8/16/32 are the U-Net's skips. The decoder
upsamples from stride 32, concatenating each skip, and predicts per-pixel logits at the input size.

Alignment at any input size: the encoder's maps cover the input from its top-left corner (cell ``(r, c)`` of
stride ``s`` covers pixels ``[r*s, (r+1)*s)``, ``ceil(H / s)`` cells; see :mod:`fusionblocks.models.contract`).
Every upsampling is by the exact ratio of the strides (bilinear, ``align_corners=False``, which keeps cell centres
on cell centres) followed by a crop of the cells past the input's extent — never a resize to the target size,
which would stretch the grid whenever ``H`` or ``W`` is not a multiple of 32.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .memory_format import channels_last_weights
from .._validate import expect_nchw, expect_positive_int, is_int
from .registry import create_model


class _ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def upsample_to_grid(x: torch.Tensor, factor: int, size: Sequence[int]) -> torch.Tensor:
    """Upsample a top-left-aligned grid by the integer ``factor`` and fit it to ``size`` cells.

    Bilinear with ``align_corners=False`` maps the centre of fine cell ``j`` to ``(j + 0.5) / factor`` coarse cells,
    exactly the centre it has in the input; the cells past ``size`` (they cover only padding) are cropped, and a
    grid that ends short of ``size`` (a floor-rounding encoder) is extended by repeating its last row/column.

    Shapes: ``(B, C, h, w) -> (B, C, size[0], size[1])``.
    """
    y = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False) if factor > 1 else x
    h, w = size
    y = y[..., :h, :w]
    ph, pw = h - y.shape[-2], w - y.shape[-1]
    return F.pad(y, (0, pw, 0, ph), mode="replicate") if ph > 0 or pw > 0 else y


class UpBlock(nn.Module):
    """Upsample ``x`` by ``scale`` onto the skip's grid, concatenate, two 3x3 conv-BN-ReLU.

    Args:
        in_channels: channels of ``x``.
        skip_channels: channels of ``skip``.
        out_channels: output channels.
        scale: stride of ``x`` / stride of ``skip`` (2 in a U-Net).

    Shapes: ``x (B, C_in, h, w), skip (B, C_skip, H, W) -> (B, C_out, H, W)``.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, scale: int = 2):
        super().__init__()
        self.scale = scale
        self.convs = nn.Sequential(_ConvBNReLU(in_channels + skip_channels, out_channels), _ConvBNReLU(out_channels, out_channels))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = upsample_to_grid(x, self.scale, skip.shape[-2:])
        return self.convs(torch.cat([x, skip], dim=1))


class FusionUNet(nn.Module):
    """U-Net over a fusion encoder.

    Args:
        num_classes: output channels, a positive int (1 for binary masks with a sigmoid/BCE loss).
        encoder: a registered model name (its ``forward_intermediates`` gives the skips; what the skips never
            use, the classifier's norm and HATR's token bridge and ViT, is pruned away, so that every parameter
            gets a gradient) or a module with ``feature_info`` of 4 levels (used as given): a model with
            ``forward_intermediates``, or a features_only module whose ``forward`` returns the maps
            (:class:`~fusionblocks.FeatureExtractor`, ``timm.create_model(..., features_only=True)``).
        decoder_channels: widths of the decoder stages at strides 16, 8, 4 and 1 (4 positive ints).
        encoder_kwargs: passed to ``create_model`` when ``encoder`` is a name (without ``num_classes``: the encoder
            has no classifier); refused with an encoder module, which is used as built.

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
        name = type(self).__name__
        num_classes = expect_positive_int(name, "num_classes", num_classes)
        if not isinstance(decoder_channels, (tuple, list)) or len(decoder_channels) != 4:
            got = tuple(decoder_channels) if isinstance(decoder_channels, (tuple, list)) else repr(decoder_channels)
            raise ValueError(f"{name}: expected 4 decoder_channels, got {got}")
        if not all(is_int(c) and c > 0 for c in decoder_channels):
            raise ValueError(f"{name}: expected 4 decoder_channels as positive ints, got {tuple(decoder_channels)}")
        if encoder_kwargs and not isinstance(encoder, str):
            raise ValueError(
                f"{name}: encoder_kwargs are passed to create_model for an encoder given by name; got a "
                f"{type(encoder).__name__} instance with encoder_kwargs {dict(encoder_kwargs)!r} (build the encoder "
                "with them instead)"
            )
        if encoder_kwargs and "num_classes" in encoder_kwargs:
            raise ValueError(
                f"{name}: expected encoder_kwargs without num_classes (the encoder is built without a classifier; "
                f"num_classes sets the mask channels), got num_classes={encoder_kwargs['num_classes']!r}"
            )
        self._pruned_keys: Tuple[str, ...] = ()
        if isinstance(encoder, str):
            encoder = create_model(encoder, num_classes=0, **(encoder_kwargs or {}))
            if len(getattr(encoder, "feature_info", ())) == 4 and hasattr(encoder, "prune_intermediate_layers"):
                # drop what the skips never use (the head's norm; HATR's token bridge and ViT), as timm's
                # features_only does: every parameter gets a gradient (DDP needs no find_unused_parameters)
                before = set(encoder.state_dict())
                encoder.prune_intermediate_layers(4, prune_norm=True, prune_head=True)
                self._pruned_keys = tuple(sorted(f"encoder.{k}" for k in before - set(encoder.state_dict())))
                self._register_load_state_dict_pre_hook(self._skip_pruned_keys)
        info = getattr(encoder, "feature_info", None)
        if hasattr(info, "get_dicts"):  # timm's FeatureInfo: the levels a features_only module returns
            info = info.get_dicts()
        # a features_only module (FeatureExtractor, timm's features_only=True) returns its maps from forward
        self._features_only = not hasattr(encoder, "forward_intermediates")
        if not isinstance(encoder, nn.Module) or not info or len(info) != 4:
            got = type(encoder).__name__
            if info:
                got += f" with {len(info)} (strides {', '.join(str(f['reduction']) for f in info)})"
            raise ValueError(
                "FusionUNet: expected an encoder with 4 feature levels (forward_intermediates and feature_info, or a "
                f"features_only module: FeatureExtractor, timm's features_only=True), got {got}"
            )
        self.encoder = encoder
        chs = [f["num_chs"] for f in info]
        red = [int(f["reduction"]) for f in info]
        if any(b % a for a, b in zip(red, red[1:])) or red[0] < 1:
            raise ValueError(f"FusionUNet: expected each encoder stride to divide the next, got strides {red}")
        d16, d8, d4, d1 = decoder_channels
        self.up16 = UpBlock(chs[3], chs[2], d16, red[3] // red[2])
        self.up8 = UpBlock(d16, chs[1], d8, red[2] // red[1])
        self.up4 = UpBlock(d8, chs[0], d4, red[1] // red[0])
        self.out_scale = red[0]
        self.refine = _ConvBNReLU(d4, d1)
        self.head = nn.Conv2d(d1, num_classes, 1)
        # the decoder's weights only: an encoder passed in keeps the memory format its owner chose
        for part in (self.up16, self.up8, self.up4, self.refine, self.head):
            channels_last_weights(part)

    def _skip_pruned_keys(self, state_dict, prefix, *args) -> None:
        """A state_dict saved while a by-name encoder was not yet pruned (earlier fusionblocks) still loads
        strictly: the keys of the pruned modules, which the forward never used, are dropped."""
        for k in self._pruned_keys:
            state_dict.pop(prefix + k, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expect_nchw(type(self).__name__, "x", x, like=self)
        f4, f8, f16, f32 = self.encoder(x) if self._features_only else self.encoder.forward_intermediates(x)
        y = self.up4(self.up8(self.up16(f32, f16), f8), f4)
        y = upsample_to_grid(y, self.out_scale, x.shape[-2:])
        return self.head(self.refine(y))
