"""Multi-head external attention (Guo et al., "Beyond self-attention"), as HEMF uses it.

Each head attends from its tokens to ``memory_size`` learned memory slots instead of to the other tokens::

    a = x_h @ Mk.T                 # (B, heads, N, S): one score per token and memory slot
    a = softmax(a, dim=N)          # over the TOKENS, not over the slots
    a = a / a.sum(dim=S)           # the "double normalization"
    out_h = a @ Mv.T               # (B, heads, N, C / heads)

``Mk`` (``S x C/heads``) and ``Mv`` (``C/heads x S``) are shared by all heads and have no bias, as in the
official HEMF ``MHEA.py``. The cost is linear in ``N = H * W``. Unlike the official module (which asserts
``H == W``), any ``H x W`` works, including non-square maps.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .._validate import expect_divisible, expect_nchw, expect_positive_int, expect_rate
from ..models.convert import KeyRules


class MultiHeadExternalAttention(nn.Module):
    """Multi-head external attention over the positions of an NCHW map.

    Channel ``c`` belongs to head ``c // (channels // num_heads)`` (the official split of the token vector).

    Args:
        channels: ``C``; must be divisible by ``num_heads``.
        num_heads: number of heads (8 officially).
        memory_size: ``S``, the number of memory slots (64 officially).
        shortcut: add the input to the output. The official class defaults to ``True`` but HEMF always builds it
            with ``shortcut=False``, which is this default.
        dropout: dropout on the output (0 officially).

    Parameters: ``mk.weight (S, C/heads)``, ``mv.weight (C/heads, S)`` — the official names.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 8,
        memory_size: int = 64,
        *,
        shortcut: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        name = "MultiHeadExternalAttention"
        channels = expect_positive_int(name, "channels", channels)
        num_heads = expect_positive_int(name, "num_heads", num_heads)
        memory_size = expect_positive_int(name, "memory_size", memory_size)
        expect_divisible(name, "channels", channels, num_heads, "num_heads")
        dropout = expect_rate(name, "dropout", dropout)
        self.channels = channels
        self.num_heads = num_heads
        self.memory_size = memory_size
        self.shortcut = bool(shortcut)
        head_dim = channels // num_heads
        self.mk = nn.Linear(head_dim, memory_size, bias=False)
        self.mv = nn.Linear(memory_size, head_dim, bias=False)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.normal_(self.mk.weight, std=1e-3)
        nn.init.normal_(self.mv.weight, std=1e-3)

    @classmethod
    def official_key_rules(cls) -> KeyRules:
        """Official ``MHEA`` keys -> this module: the names are the same."""
        return [], []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expect_nchw(type(self).__name__, "x", x, self.channels, like=self)
        b, c, h, w = x.shape
        q = x.reshape(b, self.num_heads, c // self.num_heads, h * w).transpose(-1, -2)
        attn = torch.softmax(self.mk(q), dim=-2)
        attn = attn / attn.sum(dim=-1, keepdim=True)
        out = self.mv(attn).transpose(-1, -2).reshape(b, c, h, w)
        out = self.drop(out)
        return out + x if self.shortcut else out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_heads={self.num_heads}, memory_size={self.memory_size}, shortcut={self.shortcut}"
