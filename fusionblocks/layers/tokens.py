"""HATR's bridge from a CNN feature map to ViT tokens (Zhang, HATR, §2.3.2).

Two token blocks:

* :class:`OverlapTokenizer` — "multi-scale overlapping embedding": a convolution whose stride is smaller than its
  kernel partitions the feature map into overlapping patches, flattened to a token sequence.
  ``(B, C, H, W) -> (B, N, D)``. One window size: §2.3.2 calls the embedding multi-scale but describes a single
  window (kernel 2, stride 1) per backbone and no second scale, so "multi-scale" is not read as several kernels.
* :class:`TokenWeighting` — "Token adaptive weighting": channel attention and spatial attention over the token grid
  give every token one weight in (0, 1) that scales it. ``(B, N, D) -> (B, N, D)``.

How the grid size travels: tokens are a plain ``(B, N, D)`` tensor in raster order (row-major over the grid). The
tokenizer tells the grid with ``forward(x, return_hw=True) -> (tokens, (h, w))`` or, without running it,
``output_size(H, W) -> (h, w)``; :class:`TokenWeighting` takes it as an explicit argument,
``forward(tokens, hw)``. Nothing is hidden in the tensor, so tokens can pass through any other module in between.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn as nn

from .._validate import expect_hw, expect_nchw, expect_positive_int, expect_tokens, is_int
from .gates import ChannelAttn, SpatialAttn

_Pair = Union[int, Tuple[int, int]]


def _pair(block: str, name: str, v: _Pair, *, allow_zero: bool = False) -> Tuple[int, int]:
    vals = (v, v) if is_int(v) else tuple(v) if isinstance(v, (tuple, list)) else ()
    ok = len(vals) == 2 and all(is_int(a) and ((a >= 0) if allow_zero else (a > 0)) for a in vals)
    if not ok:
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{block}: expected {name} to be a {kind} int or a pair of them, got {v!r}")
    return int(vals[0]), int(vals[1])


class OverlapTokenizer(nn.Module):
    """Overlapping convolutional tokenization: ``(B, C, H, W) -> (B, N, D)``.

    A ``kernel_size``-by-``kernel_size`` convolution with ``stride < kernel_size`` (HATR: kernel 2, stride 1) embeds
    overlapping patches of the feature map; the output grid ``(h, w)`` is flattened in raster order.

    Token count (per spatial axis, the usual convolution arithmetic)::

        h = (H + 2 * padding - kernel_size) // stride + 1
        w = (W + 2 * padding - kernel_size) // stride + 1
        N = h * w            # kernel 2, stride 1, padding 0:  N = (H - 1) * (W - 1)

    e.g. a 14x14 Conv2D map gives 13x13 = 169 tokens, a 7x7 ResNet-50 map 6x6 = 36 tokens.

    Args:
        in_channels: ``C`` of the feature map.
        embed_dim: ``D`` of the tokens.
        kernel_size: patch size (int or pair).
        stride: patch stride (int or pair); smaller than ``kernel_size`` for overlapping patches.
        padding: zero padding of the feature map (int or pair).
        norm_layer: optional token norm built as ``norm_layer(embed_dim)`` (e.g. ``nn.LayerNorm``); none in HATR.

    Shapes:
        ``forward(x)``: ``(B, C, H, W) -> (B, h*w, D)``;
        ``forward(x, return_hw=True)``: ``-> ((B, h*w, D), (h, w))``.
    """

    def __init__(
        self,
        in_channels: int,
        embed_dim: int,
        kernel_size: _Pair = 2,
        stride: _Pair = 1,
        padding: _Pair = 0,
        *,
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
    ):
        super().__init__()
        name = type(self).__name__
        in_channels = expect_positive_int(name, "in_channels", in_channels)
        embed_dim = expect_positive_int(name, "embed_dim", embed_dim)
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        self.kernel_size = _pair(name, "kernel_size", kernel_size)
        self.stride = _pair(name, "stride", stride)
        self.padding = _pair(name, "padding", padding, allow_zero=True)
        self.proj = nn.Conv2d(in_channels, embed_dim, self.kernel_size, self.stride, self.padding)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else nn.Identity()

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """Token grid ``(h, w)`` for an ``height x width`` feature map (may be ``<= 0`` when it is too small)."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1

    def forward(
        self, x: torch.Tensor, return_hw: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, Tuple[int, int]]]:
        """Tokenize.

        Args:
            x: ``(B, C, H, W)`` feature map.
            return_hw: also return the token grid ``(h, w)``.

        Returns:
            ``(B, h*w, D)`` tokens in raster order, and ``(h, w)`` when ``return_hw``.
        """
        name = type(self).__name__
        expect_nchw(name, "x", x, self.in_channels, like=self)
        h, w = self.output_size(x.shape[-2], x.shape[-1])
        if h < 1 or w < 1:
            (kh, kw), (ph, pw) = self.kernel_size, self.padding
            raise ValueError(
                f"{name}: expected x with a spatial size of at least {(max(kh - 2 * ph, 1), max(kw - 2 * pw, 1))} "
                f"for kernel_size {self.kernel_size} and padding {self.padding}, got {tuple(x.shape)}"
            )
        tokens = self.norm(self.proj(x).flatten(2).transpose(1, 2))
        return (tokens, (h, w)) if return_hw else tokens

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.embed_dim}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}"
        )


class TokenWeighting(nn.Module):
    """Adaptive token weighting from channel + spatial attention: ``(B, N, D) -> (B, N, D)``.

    HATR §2.3.2: a lightweight module "combines channel attention and spatial attention mechanisms to identify the
    importance of different patches. Each Patch is assigned a weight coefficient"; high-response tokens are
    highlighted, low-response ones compressed. The paper gives no formula; this implementation (documented choices):

    1. the tokens are laid back on their ``(h, w)`` grid as a ``(B, D, h, w)`` map ``t``;
    2. channel attention (:class:`~fusionblocks.layers.gates.ChannelAttn`, shared MLP on the max- and avg-pooled
       token descriptors) re-weights the embedding channels: ``t' = t * ChannelAttn.gate(t)``;
    3. spatial attention (:class:`~fusionblocks.layers.gates.SpatialAttn`, a ``k x k`` conv over the channel-wise
       mean and max of ``t'``) gives one sigmoid weight per grid position: ``a = SpatialAttn.gate(t')``, ``(B, 1, h, w)``
       — the CBAM order (channel, then spatial), and CBAM's equations (``[avg; max]``, no BatchNorm before the
       sigmoid: ``SpatialAttn``'s default);
    4. every token is scaled by its own weight: ``out[b, n] = tokens[b, n] * a[b, n]``.

    The channel re-weighting shapes *which* tokens respond (step 3), but only the per-token scalar is applied to the
    output (step 4) — "each patch is assigned a weight coefficient" — so the token's direction in embedding space is
    kept and the weight is a single, inspectable number per token.

    Args:
        dim: token embedding dim ``D``.
        reduction: channel-attention MLP reduction (hidden width ``max(D // reduction, 1)``).
        kernel_size: odd kernel of the spatial-attention conv (zero-padded, so any grid size works).

    Shapes:
        ``forward(tokens, hw)``: ``(B, h*w, D) -> (B, h*w, D)``;
        ``forward(tokens, hw, return_weights=True)``: ``-> ((B, h*w, D), (B, h*w))`` with weights in (0, 1).
    """

    def __init__(self, dim: int, *, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        dim = expect_positive_int(type(self).__name__, "dim", dim)
        self.dim = dim
        self.channel = ChannelAttn(dim, reduction)
        self.spatial = SpatialAttn(kernel_size)

    def weights(self, tokens: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """Per-token weights ``(B, h*w)`` in (0, 1) for ``(B, h*w, D)`` tokens on an ``hw`` grid."""
        name = type(self).__name__
        expect_tokens(name, "tokens", tokens, self.dim, like=self)
        h, w = expect_hw(name, "hw", hw)
        if h * w != tokens.shape[1]:
            raise ValueError(
                f"{name}: expected hw with h * w == N tokens ({tokens.shape[1]}), got hw={(h, w)} "
                f"for tokens {tuple(tokens.shape)}"
            )
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], self.dim, h, w)
        grid = grid * self.channel.gate(grid)
        return self.spatial.gate(grid).flatten(1)

    def forward(
        self, tokens: torch.Tensor, hw: Tuple[int, int], return_weights: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Weight the tokens.

        Args:
            tokens: ``(B, N, D)`` in raster order over the grid.
            hw: the token grid ``(h, w)``, ``h * w == N`` (from :meth:`OverlapTokenizer.forward` with
                ``return_hw=True`` or :meth:`OverlapTokenizer.output_size`).
            return_weights: also return the ``(B, N)`` weights.

        Returns:
            ``(B, N, D)`` weighted tokens, and the ``(B, N)`` weights when ``return_weights``.
        """
        a = self.weights(tokens, hw)
        out = tokens * a.unsqueeze(-1)
        return (out, a) if return_weights else out

    def extra_repr(self) -> str:
        return f"{self.dim}"
