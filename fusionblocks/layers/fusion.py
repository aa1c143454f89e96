"""Hierarchical fusion blocks: HiFuse's HFF and HEMF's HEF, built from one shared skeleton.

Both fuse a local (CNN) map ``l``, a global (transformer) map ``g`` of the same size and, from the second stage
on, the previous fusion output ``f`` (``dim / 2`` channels at twice the size)::

    p     = AvgPool2(ReLU(BN(conv1x1(f))))                          # only when f is given
    x_f   = GELU(BN(conv1x1(LN(cat[p, W_l(l), W_g(g)]))))           # cat[W_l(l), W_g(g)] without f
    out   = MLP(LN(cat[attn_g(g), attn_l(l), x_f]))  + p            # + 0 without f

with ``W_l``/``W_g`` 1x1 conv + BN and LN the channels-first LayerNorm (eps 1e-6). The blocks differ only in
the branch attentions and the MLP:

* :class:`HFF` (HiFuse): ``attn_l`` = spatial attention (``[max, avg]`` pooling, 7x7 conv, BatchNorm),
  ``attn_g`` = channel attention (ratio 16), MLP = :class:`IRMLP`.
* :class:`HEF` (HEMF): ``attn_l`` and ``attn_g`` = :class:`MixedAttention` each, MLP = :class:`SIRMLP`.

Submodule names (stable, shared by both blocks)::

    proj_l, proj_g        1x1 ConvBN of l and g                     official W_l, W_g
    prev_proj, prev_pool  1x1 ConvBN+ReLU of f, 2x2 average pool    official Updim, Avg
    fuse3_norm, fuse3_proj  LN + 1x1 ConvBN over cat[p, l', g']     official norm1, W3   (f given)
    fuse2_norm, fuse2_proj  LN + 1x1 ConvBN over cat[l', g']        official norm2, W    (no f)
    attn_l, attn_g        branch attentions
    norm                  LN over cat[g, l, x_f]                    official norm3
    mlp                   IRMLP / SIRMLP                            official residual

``official_key_rules()`` maps the official block-level keys onto these names (the convention of
:mod:`fusionblocks.models.convert`). The official block always holds both the ``f`` and the no-``f`` path; a block
built with ``with_prev=True``/``False`` holds one of them, and its drop list names the official keys it does not
have (the official forward of that stage never uses them).
"""
from __future__ import annotations

import re
from typing import ClassVar, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._validate import (expect_divisible, expect_rate, expect_nchw, expect_positive_int,
                         expect_same_batch, expect_same_spatial, shape_str)
from ..models.convert import KeyRules, OfficialWeights, Rule, join_rules, prefix_rules
from .conv import ConvBN
from .drop import drop_path
from .external import MultiHeadExternalAttention
from .gates import ChannelAttn, SpatialAttn
from .mlp import IRMLP, SIRMLP
from .norm import LayerNorm2d


class MixedAttention(nn.Module):
    """HEMF's Mixed Attention: external attention, spatial gate and channel gate with multiplicative skips.

    ``t = LN(x); t = LN(MHEA(t) * t); t = t * SA(t); out = t * CA(t)`` — one LayerNorm module applied twice
    (official ``HEF_block``), SA with ``[avg, max]`` pooling, no BatchNorm, CA with ratio 16.

    Args:
        dim: channels ``C``.
        num_heads: MHEA heads (must divide ``dim``).
        memory_size: MHEA memory slots ``S``.
        kernel_size: spatial-gate kernel.
        reduction: channel-gate reduction ratio.
        eps: LayerNorm eps (1e-6 officially).
        shared_norm: ``True`` (official) reuses ``norm`` after the MHEA product; ``False`` gives that second
            LayerNorm its own parameters (``norm2``).

    Submodules: ``norm`` (:class:`LayerNorm2d`), ``mhea`` (:class:`MultiHeadExternalAttention`),
    ``spatial`` (:class:`SpatialAttn`), ``channel`` (:class:`ChannelAttn`)[, ``norm2``].

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        memory_size: int = 64,
        kernel_size: int = 7,
        reduction: int = 16,
        eps: float = 1e-6,
        shared_norm: bool = True,
    ):
        super().__init__()
        dim = expect_positive_int("MixedAttention", "dim", dim)
        expect_divisible("MixedAttention", "dim", dim, num_heads, "num_heads")
        self.dim = dim
        self.norm = LayerNorm2d(dim, eps=eps)
        self.mhea = MultiHeadExternalAttention(dim, num_heads, memory_size)
        self.spatial = SpatialAttn(kernel_size, order="avg_max", norm=False)
        self.channel = ChannelAttn(dim, reduction)
        self.norm2 = None if shared_norm else LayerNorm2d(dim, eps=eps)

    @classmethod
    def official_key_rules(cls, suffix: str) -> KeyRules:
        """The flat official HEF keys of one branch (``suffix`` ``"_l"`` or ``"_g"``) -> this module."""
        s = re.escape(suffix)
        rules = [
            (rf"norm{s}\.(.*)", r"norm.\1"),
            (rf"mea{s}\.(.*)", r"mhea.\1"),
            (rf"sa{s}\.conv1\.(.*)", r"spatial.conv.\1"),
            (rf"ca{s}\.(.*)", r"channel.\1"),
        ]
        return rules, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expect_nchw("MixedAttention", "x", x, self.dim, like=self)
        t = self.norm(x)
        t = (self.norm if self.norm2 is None else self.norm2)(self.mhea(t) * t)
        t = self.spatial(t)
        return self.channel(t)


def _expect_gate_args(name: str, reduction: object, spatial_kernel: object, **positive: object) -> None:
    """The gate options of a fusion block, checked under its own name (the gates would name themselves)."""
    for what, value in (("reduction", reduction), ("spatial_kernel", spatial_kernel), *positive.items()):
        expect_positive_int(name, what, value)
    if spatial_kernel % 2 == 0:
        raise ValueError(f"{name}: expected an odd spatial_kernel, got {spatial_kernel}")


class _HierarchicalFusion(OfficialWeights, nn.Module):
    """The skeleton shared by :class:`HFF` and :class:`HEF` (see the module docstring).

    Subclasses build ``attn_l``, ``attn_g`` and ``mlp`` and list the official keys of those in
    :meth:`_official_branch_key_rules`.
    """

    COMMON_KEY_RULES: ClassVar[List[Rule]] = [
        (r"W_l\.(.*)", r"proj_l.\1"),
        (r"W_g\.(.*)", r"proj_g.\1"),
        (r"Updim\.(.*)", r"prev_proj.\1"),
        (r"norm1\.(.*)", r"fuse3_norm.\1"),
        (r"W3\.(.*)", r"fuse3_proj.\1"),
        (r"norm2\.(.*)", r"fuse2_norm.\1"),
        (r"W\.(.*)", r"fuse2_proj.\1"),
        (r"norm3\.(.*)", r"norm.\1"),
    ]
    OFFICIAL_UNUSED: ClassVar[Dict[Optional[bool], Tuple[str, ...]]] = {
        None: (),
        True: (r"norm2\..*", r"W\..*"),
        False: (r"Updim\..*", r"norm1\..*", r"W3\..*"),
    }

    def __init__(
        self,
        dim: int,
        *,
        l_dim: Optional[int],
        g_dim: Optional[int],
        with_prev: Optional[bool],
        fuse_kernel: int,
        drop_path: float,
    ):
        super().__init__()
        name = type(self).__name__
        dim = expect_positive_int(name, "dim", dim)
        l_dim = dim if l_dim is None else expect_positive_int(name, "l_dim", l_dim)
        g_dim = dim if g_dim is None else expect_positive_int(name, "g_dim", g_dim)
        if not (with_prev is None or isinstance(with_prev, bool)):  # 1 == True would pass a choice check
            raise ValueError(f"{name}: expected with_prev to be one of [None, True, False], got {with_prev!r}")
        fuse_kernel = expect_positive_int(name, "fuse_kernel", fuse_kernel)
        if fuse_kernel % 2 == 0:
            raise ValueError(f"{name}: expected an odd fuse_kernel, got {fuse_kernel}")
        if with_prev is not False and dim % 2:
            raise ValueError(f"{name}: expected an even dim (f has dim / 2 channels), got {dim}")
        self.dim, self.l_dim, self.g_dim, self.with_prev = dim, l_dim, g_dim, with_prev
        self.drop_path = expect_rate(name, "drop_path", drop_path)

        self.fuse_kernel = fuse_kernel
        self.proj_l = ConvBN(l_dim, dim, 1, bn=True)
        self.proj_g = ConvBN(g_dim, dim, 1, bn=True)
        built = [p for p, wanted in ((True, with_prev is not False), (False, with_prev is not True)) if wanted]
        for path in built:
            for attr, module in self._path(path).items():
                setattr(self, attr, module)
        self.act = nn.GELU()
        self.norm = LayerNorm2d(self.cat_dim)
        self.attn_l: nn.Module
        self.attn_g: nn.Module
        self.mlp: nn.Module

    def _path(self, with_prev: bool) -> Dict[str, nn.Module]:
        """The modules of the path with ``f`` (``with_prev=True``) or without it."""
        dim, k = self.dim, self.fuse_kernel
        if with_prev:
            return {
                "prev_proj": ConvBN(dim // 2, dim, 1, bn=True, relu=True),
                "prev_pool": nn.AvgPool2d(2, stride=2),
                "fuse3_norm": LayerNorm2d(3 * dim),
                "fuse3_proj": ConvBN(3 * dim, dim, k, bn=True),
            }
        return {"fuse2_norm": LayerNorm2d(2 * dim), "fuse2_proj": ConvBN(2 * dim, dim, k, bn=True)}

    def official_unused_params(self) -> int:
        """Parameters of the path the official block builds but this stage's forward never calls
        (0 when built with both paths). Counted on the meta device: nothing is allocated."""
        if self.with_prev is None:
            return 0
        with torch.device("meta"):
            return sum(p.numel() for m in self._path(not self.with_prev).values() for p in m.parameters())

    @property
    def cat_dim(self) -> int:
        """Channels of ``cat[attn_g(g), attn_l(l), x_f]``: the MLP's input."""
        return self.l_dim + self.g_dim + self.dim

    def _official_branch_key_rules(self) -> KeyRules:
        raise NotImplementedError

    def official_key_rules(self) -> KeyRules:
        """Official block-level keys (no model prefix) -> this block; the drop list names the official keys of
        the path this block does not build (see ``with_prev``)."""
        own = (self.COMMON_KEY_RULES, list(self.OFFICIAL_UNUSED[self.with_prev]))
        return join_rules(own, self._official_branch_key_rules())

    def _check(self, l: torch.Tensor, g: torch.Tensor, f: Optional[torch.Tensor]) -> None:
        name = type(self).__name__
        expect_nchw(name, "l", l, self.l_dim, like=self)
        expect_nchw(name, "g", g, self.g_dim, like=self)
        expect_same_spatial(name, ("l", "g"), (l, g))
        expect_same_batch(name, ("l", "g"), (l, g))
        if f is None:
            if self.with_prev is True:
                raise ValueError(f"{name}: built with with_prev=True, expected the previous fusion output f, got None")
            return
        if self.with_prev is False:
            raise ValueError(f"{name}: built with with_prev=False (first stage), expected f=None, got {shape_str(f)}")
        expect_nchw(name, "f", f, self.dim // 2, like=self)
        expect_same_batch(name, ("l", "f"), (l, f))
        h, w = l.shape[-2:]
        fh, fw = f.shape[-2:]
        if not (2 * h - 1 <= fh <= 2 * h + 1 and 2 * w - 1 <= fw <= 2 * w + 1):
            raise ValueError(
                f"{name}: expected f at twice the spatial size of l ({2 * h}, {2 * w}) (one pixel more or less "
                f"allowed), got {shape_str(f)}"
            )

    def _pool_prev(self, p: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if p.shape[-2] == 2 * h and p.shape[-1] == 2 * w:
            return self.prev_pool(p)
        p = p[..., : 2 * h, : 2 * w]
        return F.avg_pool2d(p, 2, stride=2, ceil_mode=True)

    def forward(self, l: torch.Tensor, g: torch.Tensor, f: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fuse one stage.

        Args:
            l: local features ``(B, l_dim, H, W)``.
            g: global features ``(B, g_dim, H, W)``.
            f: previous fusion output ``(B, dim / 2, 2H, 2W)`` or ``None`` at the first stage. An odd previous
                size (``2H - 1`` or ``2H + 1``) is accepted: the 2x2 pooling then rounds up resp. down.

        Returns:
            ``(B, dim, H, W)``.
        """
        self._check(l, g, f)
        wl, wg = self.proj_l(l), self.proj_g(g)
        if f is not None:
            shortcut = self._pool_prev(self.prev_proj(f), l.shape[-2], l.shape[-1])
            x_f = self.act(self.fuse3_proj(self.fuse3_norm(torch.cat([shortcut, wl, wg], 1))))
        else:
            shortcut = None
            x_f = self.act(self.fuse2_proj(self.fuse2_norm(torch.cat([wl, wg], 1))))
        fused = torch.cat([self.attn_g(g), self.attn_l(l), x_f], 1)
        out = drop_path(self.mlp(self.norm(fused)), self.drop_path, self.training)
        return out if shortcut is None else shortcut + out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, l_dim={self.l_dim}, g_dim={self.g_dim}, with_prev={self.with_prev}, drop_path={self.drop_path}"


class HFF(_HierarchicalFusion):
    """HiFuse's Hierarchical Feature Fusion block (official ``HFF_block(dim, dim, 16, dim, dim)``).

    ``attn_l`` = :class:`SpatialAttn` on ``l``, ``attn_g`` = :class:`ChannelAttn` on ``g``, ``mlp`` =
    :class:`IRMLP` ``(l_dim + g_dim + dim -> dim)``; the rest is described in the module docstring. Defaults
    compute what the official code computes (its channel gate has one sigmoid, checked against the official
    outputs); the paper's variants are options.

    Args:
        dim: fusion channels (output channels; ``f`` has ``dim // 2``).
        l_dim: channels of ``l`` (default ``dim``).
        g_dim: channels of ``g`` (default ``dim``).
        with_prev: ``None`` builds both the first-stage and the later-stage path (like the official block);
            ``False`` only the first-stage path (``f`` must be ``None``); ``True`` only the path with ``f``.
        reduction: channel-gate ratio (16).
        spatial_kernel: spatial-gate kernel (7).
        spatial_order: ``"max_avg"`` (official) or ``"avg_max"`` (paper eq. 4).
        spatial_norm: BatchNorm after the spatial-gate conv (official ``True``; the paper has none).
        depthwise: IRMLP's 3x3 conv depthwise (paper) instead of full (official).
        fuse_kernel: kernel of the ``fuse*_proj`` convs (official 1; the paper's eq. 5 says 3).
        drop_path: stochastic-depth rate on the MLP output (the official HiFuse passes 0).

    Forward: ``(l, g, f=None) -> (B, dim, H, W)`` with ``l (B, l_dim, H, W)``, ``g (B, g_dim, H, W)``,
    ``f (B, dim // 2, 2H, 2W)``.
    """

    official_source = "HiFuse HFF_block"

    def __init__(
        self,
        dim: int,
        *,
        l_dim: Optional[int] = None,
        g_dim: Optional[int] = None,
        with_prev: Optional[bool] = None,
        reduction: int = 16,
        spatial_kernel: int = 7,
        spatial_order: str = "max_avg",
        spatial_norm: bool = True,
        depthwise: bool = False,
        fuse_kernel: int = 1,
        drop_path: float = 0.0,
    ):
        _expect_gate_args(type(self).__name__, reduction, spatial_kernel)
        super().__init__(
            dim, l_dim=l_dim, g_dim=g_dim, with_prev=with_prev, fuse_kernel=fuse_kernel, drop_path=drop_path
        )
        self.attn_l = SpatialAttn(spatial_kernel, order=spatial_order, norm=spatial_norm)
        self.attn_g = ChannelAttn(self.g_dim, reduction)
        self.mlp = IRMLP(self.cat_dim, self.dim, depthwise)

    def _official_branch_key_rules(self) -> KeyRules:
        gates = [
            (r"spatial\.(.*)", r"attn_l.\1"),
            (r"se\.0\.(.*)", r"attn_g.fc1.\1"),
            (r"se\.2\.(.*)", r"attn_g.fc2.\1"),
        ]
        return join_rules((gates, []), prefix_rules("residual.", "mlp.", *IRMLP.official_key_rules()))


class HEF(_HierarchicalFusion):
    """HEMF's Hierarchical Enhanced Feature fusion block (official ``HEF_block(dim, dim, dim, dim)``).

    ``attn_l`` and ``attn_g`` = :class:`MixedAttention` (each with its own parameters), ``mlp`` =
    :class:`SIRMLP` ``(l_dim + g_dim + dim -> dim -> dim)``; the rest is described in the module docstring.

    Args:
        dim: fusion channels (output channels; ``f`` has ``dim // 2``).
        l_dim: channels of ``l`` (default ``dim``).
        g_dim: channels of ``g`` (default ``dim``).
        with_prev: ``None`` builds both paths (like the official block); ``False``/``True`` only the path
            without/with ``f``.
        num_heads: MHEA heads (8); must divide ``l_dim`` and ``g_dim``.
        memory_size: MHEA memory slots (64).
        reduction: channel-gate ratio (16).
        spatial_kernel: spatial-gate kernel (7).
        shared_norm: Mixed Attention reuses one LayerNorm twice (official ``True``).
        depthwise: SIRMLP's 3x3 conv depthwise (paper) instead of full (official).
        fuse_kernel: kernel of the ``fuse*_proj`` convs (1).
        drop_path: stochastic-depth rate on the MLP output (the official HEMF default is 0).

    Forward: ``(l, g, f=None) -> (B, dim, H, W)`` with ``l (B, l_dim, H, W)``, ``g (B, g_dim, H, W)``,
    ``f (B, dim // 2, 2H, 2W)``.
    """

    official_source = "HEMF HEF_block"

    def __init__(
        self,
        dim: int,
        *,
        l_dim: Optional[int] = None,
        g_dim: Optional[int] = None,
        with_prev: Optional[bool] = None,
        num_heads: int = 8,
        memory_size: int = 64,
        reduction: int = 16,
        spatial_kernel: int = 7,
        shared_norm: bool = True,
        depthwise: bool = False,
        fuse_kernel: int = 1,
        drop_path: float = 0.0,
    ):
        _expect_gate_args(type(self).__name__, reduction, spatial_kernel, num_heads=num_heads, memory_size=memory_size)
        super().__init__(
            dim, l_dim=l_dim, g_dim=g_dim, with_prev=with_prev, fuse_kernel=fuse_kernel, drop_path=drop_path
        )
        opts = dict(
            num_heads=num_heads,
            memory_size=memory_size,
            reduction=reduction,
            kernel_size=spatial_kernel,
            shared_norm=shared_norm,
        )
        for name, channels in (("l_dim", self.l_dim), ("g_dim", self.g_dim)):
            expect_divisible("HEF", name, channels, num_heads, "num_heads")
        self.attn_l = MixedAttention(self.l_dim, **opts)
        self.attn_g = MixedAttention(self.g_dim, **opts)
        self.mlp = SIRMLP(self.cat_dim, self.dim, self.dim, depthwise=depthwise)

    def _official_branch_key_rules(self) -> KeyRules:
        return join_rules(
            prefix_rules("", "attn_l.", *MixedAttention.official_key_rules("_l")),
            prefix_rules("", "attn_g.", *MixedAttention.official_key_rules("_g")),
            prefix_rules("residual.", "mlp.", *SIRMLP.official_key_rules()),
        )
