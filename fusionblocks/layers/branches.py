"""Local (convolutional) branch blocks: HiFuse's ``LocalBlock`` and HEMF's ``ELFBlock``.

Both are one residual block, ``x + DropPath(GELU(pwconv(...)))`` around a 3x3 depthwise conv and a
channels LayerNorm (eps 1e-6); they differ in what precedes the depthwise conv:

- HiFuse ``Local_block``: ``dwconv -> LN -> pwconv -> GELU``.
- HEMF ``ELF_block``:     ``conv3x3 -> LN -> dwconv -> pwconv -> GELU`` (a full 3x3 conv first, and the
  norm moves in front of the depthwise conv).

So :class:`ELFBlock` is :class:`LocalBlock` with ``conv=True, norm_position="before_dwconv"``.
Parameter names follow the official code (``conv``, ``dwconv``, ``norm``, ``pwconv``), so official
state_dicts load without renaming.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._validate import expect_choice, expect_rate, expect_nchw, expect_positive_int
from .norm import LayerNorm2d
from .drop import drop_path

__all__ = ["LocalBlock", "ELFBlock"]

_NORM_POSITIONS = ("after_dwconv", "before_dwconv")


class LocalBlock(nn.Module):
    """HiFuse's local feature block: ``x + DropPath(GELU(pwconv(LN(dwconv3x3(x)))))``.

    Args:
        dim: channels ``C``.
        conv: run a full 3x3 conv (``C -> C``, with bias) first (HEMF's ELF block).
        norm_position: ``"after_dwconv"`` (HiFuse) or ``"before_dwconv"`` (HEMF ELF: right after ``conv``).
        drop_path: stochastic depth rate of the residual branch.
        norm_eps: LayerNorm epsilon (official: 1e-6).

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(
        self,
        dim: int,
        *,
        conv: bool = False,
        norm_position: str = "after_dwconv",
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        name = type(self).__name__
        dim = expect_positive_int(name, "dim", dim)
        expect_choice(name, "norm_position", norm_position, _NORM_POSITIONS)
        self.dim = dim
        self.norm_position = norm_position
        self.conv = nn.Conv2d(dim, dim, 3, padding=1) if conv else None
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = LayerNorm2d(dim, eps=norm_eps)
        self.pwconv = nn.Linear(dim, dim)
        self.drop_path = expect_rate(name, "drop_path", drop_path)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, norm_position={self.norm_position!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expect_nchw(type(self).__name__, "x", x, self.dim, like=self)
        y = x if self.conv is None else self.conv(x)
        if self.norm_position == "before_dwconv":
            y = self.dwconv(self.norm(y)).permute(0, 2, 3, 1)
        else:
            y = self.dwconv(y).permute(0, 2, 3, 1)
            y = F.layer_norm(y, self.norm.normalized_shape, self.norm.weight, self.norm.bias, self.norm.eps)
        y = F.gelu(self.pwconv(y)).permute(0, 3, 1, 2)
        return x + drop_path(y, self.drop_path, self.training)


class ELFBlock(LocalBlock):
    """HEMF's enhanced local feature block: ``x + DropPath(GELU(pwconv(dwconv3x3(LN(conv3x3(x))))))``.

    :class:`LocalBlock` with ``conv=True, norm_position="before_dwconv"``.

    Args:
        dim: channels ``C``.
        drop_path: stochastic depth rate of the residual branch.
        norm_eps: LayerNorm epsilon (official: 1e-6).

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, dim: int, *, drop_path: float = 0.0, norm_eps: float = 1e-6):
        super().__init__(dim, conv=True, norm_position="before_dwconv", drop_path=drop_path, norm_eps=norm_eps)
