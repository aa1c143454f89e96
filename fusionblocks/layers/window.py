"""Swin window attention and HiFuse's global branch: ``WindowAttention``, ``PatchMerging``,
``HiFuseGlobalBlock`` and ``HiFuseGlobalStage``.

All modules take and return NCHW ``(B, C, H, W)`` maps. Internally they work channels-last (a permuted
view, no copy); ``WindowAttention.forward_channels_last`` exposes that path for callers that already hold
``(B, H, W, C)`` tensors.

Windows pad like timm's Swin: ``H`` and ``W`` are padded with zeros (bottom/right, after the norm, before
the qkv projection) up to multiples of the window, attention runs on the padded grid, and the result is
cropped back. With ``shift > 0`` the cyclic shift and the -100 region mask are applied on the padded grid,
exactly as the official HiFuse code does, including grids of a single window (HiFuse's stage 4 at 7x7
still shifts by 3). Any ``H, W >= 1`` works.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._validate import (expect_choice, expect_divisible, expect_rate, expect_int, expect_nchw,
                         expect_positive_int, expect_input_like, expect_nonempty, expect_rank, shape_str)
from ..ops import BACKENDS, window_attention
from .drop import drop_path

__all__ = ["WindowAttention", "PatchMerging", "HiFuseGlobalBlock", "HiFuseGlobalStage"]


def _expect_window_args(name: str, dim: object, num_heads: object, window_size: object, shift: object,
                        backend: Optional[str]) -> Tuple[int, int, int, int]:
    """The attention arguments of ``name``'s constructor, checked there (so that errors name the block the user
    built): ``(dim, num_heads, window_size, shift)`` as Python ints."""
    dim = expect_positive_int(name, "dim", dim)
    num_heads = expect_positive_int(name, "num_heads", num_heads)
    window_size = expect_positive_int(name, "window_size", window_size)
    expect_divisible(name, "dim", dim, num_heads, "num_heads")
    shift = expect_int(name, "shift", shift, lo=0, hi=window_size)
    expect_choice(name, "backend", backend, (None,) + BACKENDS)
    return dim, num_heads, window_size, shift


class WindowAttention(nn.Module):
    """Swin W-MSA / SW-MSA with a relative-position bias table.

    ``qkv`` projects every token, ``q, k, v`` go to :func:`fusionblocks.ops.window_attention` as strided
    views ``(B, heads, H*W, D)`` of the projection (no window partition copies here: the op's backend
    does the shift, partition, bias gather, mask and merge), and ``proj`` mixes the heads.

    Args:
        dim: channels ``C``.
        num_heads: attention heads; must divide ``dim``.
        window_size: window side ``ws``.
        shift: cyclic shift in ``[0, ws)``; ``> 0`` is SW-MSA (with the -100 region mask).
        qkv_bias: bias in the qkv projection.
        backend: op backend (``None`` = auto; ``"reference"``, ``"triton"``, ``"cpp"``, ``"cuda"``).

    Parameters: ``qkv`` (Linear C -> 3C), ``proj`` (Linear C -> C), ``relative_position_bias_table``
    ``((2ws-1)**2, heads)``. The official ``relative_position_index`` buffer is not kept: the op derives it.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``; ``forward_channels_last``: ``(B, H, W, C) -> (B, H, W, C)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shift: int = 0,
        *,
        qkv_bias: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__()
        dim, num_heads, window_size, shift = _expect_window_args(
            type(self).__name__, dim, num_heads, window_size, shift, backend)
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift = shift
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, shift={self.shift}"

    def forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-last path: ``(B, H, W, C) -> (B, H, W, C)``."""
        name = type(self).__name__
        expect_input_like(name, "x", expect_rank(name, "x", x, 4, "(B, H, W, C)"), self)
        if x.shape[-1] != self.dim:
            raise ValueError(f"{name}: expected x (B, H, W, C) with {self.dim} channels, got {shape_str(x)}")
        expect_nonempty(name, "x", x, "(B, H, W, C)")
        b, h, w, c = x.shape
        ws = self.window_size
        pad_h, pad_w = (-h) % ws, (-w) % ws
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        heads, d = self.num_heads, c // self.num_heads
        qkv = self.qkv(x).view(b, hp * wp, 3, heads, d).permute(2, 0, 3, 1, 4)
        out = window_attention(
            qkv[0], qkv[1], qkv[2], self.relative_position_bias_table,
            hw=(hp, wp), window_size=ws, shift=self.shift, backend=self.backend,
        )
        out = self.proj(out.transpose(1, 2).reshape(b, hp, wp, c))
        if pad_h or pad_w:
            out = out[:, :h, :w]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        expect_nchw(type(self).__name__, "x", x, self.dim, like=self)
        return self.forward_channels_last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PatchMerging(nn.Module):
    """Swin patch merging as in HiFuse: 2x2 neighbours -> ``LayerNorm(4C)`` -> ``Linear(4C -> out, no bias)``.

    The four neighbours are concatenated in the order ``(0,0), (1,0), (0,1), (1,1)`` (row, column offset).
    Odd ``H`` or ``W`` are padded with a zero row/column (bottom/right) first, like Swin.

    Args:
        dim: input channels ``C``.
        out_dim: output channels; ``None`` means ``2 * dim``.
        norm_eps: LayerNorm epsilon (official: 1e-5).

    Shapes: ``(B, C, H, W) -> (B, out_dim, ceil(H/2), ceil(W/2))``.
    """

    def __init__(self, dim: int, out_dim: Optional[int] = None, *, norm_eps: float = 1e-5):
        super().__init__()
        dim = expect_positive_int(type(self).__name__, "dim", dim)
        self.dim = dim
        self.out_dim = 2 * dim if out_dim is None else expect_positive_int(type(self).__name__, "out_dim", out_dim)
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps)
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expect_nchw(type(self).__name__, "x", x, self.dim, like=self)
        x = x.permute(0, 2, 3, 1)
        h, w = x.shape[1:3]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x)).permute(0, 3, 1, 2)


class HiFuseGlobalBlock(nn.Module):
    """HiFuse's global (Swin-style) block: ``x + DropPath(GELU(fc1(WindowAttention(LN(x)))))``.

    Unlike a Swin block there is no MLP and no second residual: one linear layer and a GELU follow the
    attention (whose ``proj`` is applied first). The official block also builds a ``norm2`` and its forward
    never calls it; it is not created here (:meth:`HiFuse.load_official_state_dict` drops those keys).

    Args:
        dim: channels ``C``.
        num_heads: attention heads; must divide ``dim``.
        window_size: window side.
        shift: cyclic shift of the windows (official: 0 for even blocks, ``window_size // 2`` for odd).
        qkv_bias: bias in the qkv projection.
        norm_eps: LayerNorm epsilon (official: 1e-5).
        drop_path: stochastic depth rate of the residual branch.
        backend: window-attention backend (see :class:`WindowAttention`).

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``, any ``H, W`` (windows pad).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shift: int = 0,
        *,
        qkv_bias: bool = True,
        norm_eps: float = 1e-5,
        drop_path: float = 0.0,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        dim, num_heads, window_size, shift = _expect_window_args(name, dim, num_heads, window_size, shift, backend)
        self.dim = dim
        self.drop_path = expect_rate(name, "drop_path", drop_path)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = WindowAttention(dim, num_heads, window_size, shift, qkv_bias=qkv_bias, backend=backend)
        self.fc1 = nn.Linear(dim, dim)

    def _forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.fc1(self.attn.forward_channels_last(self.norm1(x))))
        return x + drop_path(y, self.drop_path, self.training)

    def forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-last path: ``(B, H, W, C) -> (B, H, W, C)``."""
        name = type(self).__name__
        expect_input_like(name, "x", expect_rank(name, "x", x, 4, "(B, H, W, C)"), self)
        if x.shape[-1] != self.dim:
            raise ValueError(f"{name}: expected x (B, H, W, C) with {self.dim} channels, got {shape_str(x)}")
        expect_nonempty(name, "x", x, "(B, H, W, C)")
        return self._forward_channels_last(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expect_nchw(type(self).__name__, "x", x, self.dim, like=self)
        return self._forward_channels_last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class HiFuseGlobalStage(nn.Module):
    """One stage of HiFuse's global branch (the official ``BasicLayer``).

    An optional :class:`PatchMerging` runs FIRST (``in_dim -> dim``, halving ``H, W``), then ``depth``
    :class:`HiFuseGlobalBlock` s whose shift alternates ``0, shift, 0, shift, ...`` at every stage (also
    where the grid is a single window: the official stage 4 at 7x7 still shifts).

    Args:
        dim: channels of the blocks (the stage's output).
        depth: number of blocks.
        num_heads: attention heads of every block.
        window_size: window side.
        in_dim: if given, a ``PatchMerging(in_dim, dim)`` runs first (official: ``in_dim = dim // 2``).
        shift: shift of the odd blocks; ``None`` means ``window_size // 2``.
        qkv_bias, norm_eps, backend: passed to the blocks.
        drop_path: one rate for all blocks or one per block.

    Submodules: ``downsample`` (``PatchMerging`` or ``Identity``) and ``blocks`` (``ModuleList``), the
    official ``BasicLayer`` names.

    Shapes: ``(B, in_dim or dim, H, W) -> (B, dim, H', W')`` with ``H' = ceil(H / 2)`` after merging.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int = 7,
        *,
        in_dim: Optional[int] = None,
        shift: Optional[int] = None,
        qkv_bias: bool = True,
        norm_eps: float = 1e-5,
        drop_path: float | list = 0.0,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        depth = expect_positive_int(name, "depth", depth)
        window_size = expect_positive_int(name, "window_size", window_size)
        shift = window_size // 2 if shift is None else shift
        dim, num_heads, window_size, shift = _expect_window_args(name, dim, num_heads, window_size, shift, backend)
        in_dim = None if in_dim is None else expect_positive_int(name, "in_dim", in_dim)
        if isinstance(drop_path, (list, tuple)):
            if len(drop_path) != depth:
                raise ValueError(f"{name}: expected drop_path as one rate or a list of depth ({depth}) rates, "
                                 f"got {list(drop_path)!r}")
            rates = [expect_rate(name, f"drop_path[{j}]", p) for j, p in enumerate(drop_path)]
        else:
            rates = [expect_rate(name, "drop_path", drop_path)] * depth
        self.in_dim = dim if in_dim is None else in_dim
        self.downsample = nn.Identity() if in_dim is None else PatchMerging(in_dim, dim, norm_eps=norm_eps)
        self.blocks = nn.ModuleList(
            HiFuseGlobalBlock(
                dim, num_heads, window_size, 0 if j % 2 == 0 else shift,
                qkv_bias=qkv_bias, norm_eps=norm_eps, drop_path=rates[j], backend=backend,
            )
            for j in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expect_nchw(type(self).__name__, "x", x, self.in_dim, like=self)
        x = self.downsample(x).permute(0, 2, 3, 1)
        for blk in self.blocks:
            x = blk._forward_channels_last(x)
        return x.permute(0, 3, 1, 2)
