"""CNN backbones of HATR: a torchvision-layout ResNet-50 and the paper's 3-layer Conv2D net.

Both take ``(B, in_chans, H, W)`` and return their stage feature maps (``forward_intermediates``) or the last one
(``forward``); ``feature_info`` lists ``{"num_chs", "reduction", "module"}`` per stage, timm style, and
``output_size(H, W)`` gives the last map's spatial size without running the net.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .._validate import expect_nchw, expect_positive_int


def _conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


def _run_layers(net: nn.Module, x: torch.Tensor, stop: Optional[int]) -> List[torch.Tensor]:
    n = len(net.feature_info)
    feats = []
    for i in range(n if stop is None else min(stop + 1, n)):
        x = getattr(net, f"layer{i + 1}")(x)
        feats.append(x)
    return feats


def _prune_layers(net: nn.Module, max_index: int) -> None:
    for i in range(max_index + 1, len(net.feature_info)):
        delattr(net, f"layer{i + 1}")
    net.feature_info = net.feature_info[: max_index + 1]
    net.num_features = net.feature_info[-1]["num_chs"]


def _init_convs(module: nn.Module) -> None:
    """torchvision's ResNet init: Kaiming-normal (fan out, ReLU) for every conv weight."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (torchvision's): ``1x1 -> 3x3 (stride here) -> 1x1 (x4)`` with a residual.

    Args:
        inplanes: input channels.
        planes: width of the 1x1/3x3 convs; the output has ``planes * 4`` channels.
        stride: stride of the 3x3 conv (v1.5) and of the projection shortcut.
        downsample: projection shortcut (``Sequential(conv1x1, BatchNorm2d)``) or ``None`` for identity.

    Shapes: ``(B, inplanes, H, W) -> (B, 4 * planes, ceil(H / stride), ceil(W / stride))``.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 feature extractor with torchvision's module names and shapes, without ``avgpool``/``fc``.

    ``conv1, bn1, relu, maxpool, layer1..layer4`` (3, 4, 6, 3 v1.5 bottlenecks; projection shortcuts named
    ``downsample.0`` / ``downsample.1``), so ``torchvision.models.resnet50().state_dict()`` minus ``fc.*`` loads with
    ``strict=True``; 23,508,032 parameters for ``in_chans=3``. BatchNorm uses torchvision's defaults (eps 1e-5).
    Zero-init of the last BN in each block is not applied (torchvision's default ``zero_init_residual=False``).

    Args:
        in_chans: input channels (3, or 1 for grayscale X-rays; see :meth:`load_torchvision_state_dict`).

    Shapes:
        ``forward``: ``(B, in_chans, H, W) -> (B, 2048, ceil(H/32), ceil(W/32))`` (7x7 at 224x224);
        ``forward_intermediates``: layer1..layer4 at strides 4/8/16/32 with 256/512/1024/2048 channels.
    """

    layers_cfg = (3, 4, 6, 3)

    def __init__(self, in_chans: int = 3):
        super().__init__()
        expect_positive_int(type(self).__name__, "in_chans", in_chans)
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), self.layers_cfg)):
            stride = 1 if i == 0 else 2
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
            mods = [Bottleneck(inplanes, planes, stride, downsample)]
            inplanes = planes * 4
            mods += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*mods))
        self.num_features = 2048
        self.feature_info: List[Dict[str, object]] = [
            {"num_chs": c, "reduction": r, "module": f"layer{i + 1}"}
            for i, (c, r) in enumerate(zip((256, 512, 1024, 2048), (4, 8, 16, 32)))
        ]
        _init_convs(self)

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """Spatial size of the ``layer4`` map for an ``height x width`` input."""

        def one(n: int) -> int:
            n = _conv_out(_conv_out(n, 7, 2, 3), 3, 2, 1)
            for _ in range(3):
                n = _conv_out(n, 3, 2, 1)
            return n

        return one(height), one(width)

    def forward_intermediates(self, x: torch.Tensor, stop: Optional[int] = None) -> List[torch.Tensor]:
        """``layer1..layer4`` outputs (up to ``layer{stop + 1}``), NCHW, strides 4/8/16/32."""
        expect_nchw(type(self).__name__, "x", x, self.in_chans)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return _run_layers(self, x, stop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_intermediates(x)[-1]

    def prune(self, max_index: int) -> None:
        """Remove the layers after ``layer{max_index + 1}`` (and their ``feature_info``)."""
        _prune_layers(self, max_index)

    def load_torchvision_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a torchvision ``resnet50`` state_dict strictly, dropping ``fc.*``.

        For ``in_chans == 1`` a 3-channel ``conv1.weight`` is summed over its RGB axis (a gray image replicated to
        RGB then gives the same conv1 output); for other channel mismatches a ``ValueError`` names the shapes.
        """
        sd = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        w = sd.get("conv1.weight")
        if w is not None and w.shape[1] != self.in_chans:
            if self.in_chans == 1 and w.shape[1] == 3:
                sd["conv1.weight"] = w.sum(dim=1, keepdim=True)
            else:
                raise ValueError(
                    f"{type(self).__name__}: expected conv1.weight with {self.in_chans} input channels "
                    f"(or 3 to sum into 1), got {tuple(w.shape)}"
                )
        self.load_state_dict(sd, strict=True)


class Conv2DBackbone(nn.Module):
    """HATR's lightweight "Conv2D" net: three conv layers with 64, 128 and 256 channels (paper §2.3.1).

    The paper fixes only the widths and the output, ``(B, 256, 14, 14)`` at 224x224 — a total stride of 16. Chosen
    here: each layer is ``conv3x3 -> BatchNorm -> ReLU -> MaxPool2d(2)``; the first conv has stride 2, the others
    stride 1. Per layer (``⌈·⌉`` from the stride-2 conv with padding 1, ``⌊·⌋`` from the pool)::

        layer1: H -> floor(ceil(H / 2) / 2)   stride 4,  64 ch   (56x56 at 224)
        layer2: -> floor(. / 2)               stride 8,  128 ch  (28x28)
        layer3: -> floor(. / 2)               stride 16, 256 ch  (14x14)

    Each layer is an ``nn.Sequential`` named ``layer1..layer3`` with children ``conv``, ``bn``, ``relu``, ``pool``.

    Args:
        in_chans: input channels.
        channels: the three widths (paper: 64, 128, 256).

    Shapes:
        ``forward``: ``(B, in_chans, H, W) -> (B, 256, h, w)`` (14x14 at 224x224);
        ``forward_intermediates``: the three layer outputs at strides 4/8/16.
    """

    def __init__(self, in_chans: int = 3, channels: Tuple[int, int, int] = (64, 128, 256)):
        super().__init__()
        name = type(self).__name__
        expect_positive_int(name, "in_chans", in_chans)
        if len(channels) != 3:
            raise ValueError(f"{name}: expected three channel widths, got {tuple(channels)}")
        for c in channels:
            expect_positive_int(name, "channels", c)
        self.in_chans = in_chans
        prev = in_chans
        for i, c in enumerate(channels):
            layer = nn.Sequential()
            layer.add_module("conv", nn.Conv2d(prev, c, 3, 2 if i == 0 else 1, padding=1, bias=False))
            layer.add_module("bn", nn.BatchNorm2d(c))
            layer.add_module("relu", nn.ReLU(inplace=True))
            layer.add_module("pool", nn.MaxPool2d(2))
            setattr(self, f"layer{i + 1}", layer)
            prev = c
        self.num_features = channels[-1]
        self.feature_info: List[Dict[str, object]] = [
            {"num_chs": c, "reduction": r, "module": f"layer{i + 1}"}
            for i, (c, r) in enumerate(zip(channels, (4, 8, 16)))
        ]
        _init_convs(self)

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """Spatial size of the ``layer3`` map for an ``height x width`` input."""

        def one(n: int) -> int:
            n = _conv_out(n, 3, 2, 1) // 2
            return n // 2 // 2

        return one(height), one(width)

    def forward_intermediates(self, x: torch.Tensor, stop: Optional[int] = None) -> List[torch.Tensor]:
        """``layer1..layer3`` outputs (up to ``layer{stop + 1}``), NCHW, strides 4/8/16."""
        expect_nchw(type(self).__name__, "x", x, self.in_chans)
        return _run_layers(self, x, stop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_intermediates(x)[-1]

    def prune(self, max_index: int) -> None:
        """Remove the layers after ``layer{max_index + 1}`` (and their ``feature_info``)."""
        _prune_layers(self, max_index)
