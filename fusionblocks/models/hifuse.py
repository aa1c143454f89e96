"""HiFuse (Huo et al., 2024): a :class:`~fusionblocks.models.fusionnet.FusionNet` configuration.

- local branch: ConvNeXt-style stem/downsampling + :class:`~fusionblocks.layers.branches.LocalBlock` stages;
- global branch: :class:`PatchEmbed` (Conv 4x4/4 + LayerNorm eps 1e-5) +
  :class:`~fusionblocks.layers.window.HiFuseGlobalStage` (PatchMerging first at stages 2-4, then window
  attention blocks alternating shift 0/3);
- fusion: :class:`~fusionblocks.layers.fusion.HFF` at every stage, the previous output passed on;
- head: mean pool -> LayerNorm (eps 1e-6) -> Linear (official ``conv_norm``/``conv_head``).

``hifuse_tiny/small/base`` use local and global depths (2,2,2,2) / (2,2,6,2) / (2,2,18,2), dims
96-192-384-768 and heads 3-6-12-24 like the official ``HiFuse_Tiny/Small/Base``. Unlike the official code
(hard-coded 56/28/14/7 reshapes) any input size works; see :mod:`fusionblocks.models.fusionnet`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .._validate import expect_nchw
from ..layers.branches import LocalBlock
from ..layers.fusion import HFF
from ..layers.window import HiFuseGlobalStage
from .convert import KeyRules
from .fusionnet import FusionNet, conv_stages, expect_four, stage_drop_path_rates
from .registry import register_model, variant_kwargs

__all__ = ["HiFuse", "PatchEmbed", "hifuse_tiny", "hifuse_small", "hifuse_base"]



class PatchEmbed(nn.Module):
    """Swin patch embedding: ``Conv2d(in_chans, dim, p, stride p)`` then ``LayerNorm(dim)`` over channels.

    Args:
        in_chans: image channels.
        dim: embedding channels.
        patch_size: patch side ``p`` (official 4).
        norm_eps: LayerNorm epsilon (official 1e-5).

    Shapes: ``(B, in_chans, H, W) -> (B, dim, H/p, W/p)`` (``H, W`` multiples of ``p``; :class:`HiFuse` pads).
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int = 4, *, norm_eps: float = 1e-5):
        super().__init__()
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expect_nchw(type(self).__name__, "x", x, self.in_chans)
        return self.norm(self.proj(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class HiFuse(FusionNet):
    """HiFuse: local CNN branch + Swin-style global branch + HFF fusion.

    Args:
        depths: global blocks per stage.
        conv_depths: local blocks per stage (default: ``depths``).
        num_heads: window-attention heads per stage.
        dims: stage channels.
        window_size: attention window side (7).
        in_chans: image channels.
        num_classes: classifier outputs.
        drop_path_rate: stochastic depth of the global blocks, linear from 0 (official 0.1).
        conv_drop_path_rate: stochastic depth of the local blocks (official 0).
        drop_rate: dropout before the classifier (timm's ``drop_rate``; official 0).
        qkv_bias: bias of the qkv projections.
        backend: window-attention backend (``None`` = auto).
        fusion_kwargs: extra options of every :class:`HFF` (paper variants).

    Official checkpoints: :meth:`load_official_state_dict` loads a ``huoxiangzuo/HiFuse`` ``main_model``
    state_dict strictly. Dropped official keys (modules or buffers the official forward never uses or that
    are recomputed): ``norm.*`` and ``head.*`` (the Swin head; the official forward classifies with
    ``conv_norm``/``conv_head``), ``layers*.blocks.*.norm2.*`` (built, never called),
    ``layers*.blocks.*.attn.relative_position_index`` (a constant, derived by the window-attention op), and in
    ``fu1`` the ``Updim``/``norm1``/``W3`` path and in ``fu2..fu4`` the ``norm2``/``W`` path (each official
    HFF block builds both the first-stage and the later-stage path and uses one).
    """

    official_source = "huoxiangzuo/HiFuse main_model"
    first_convs = ("local_branch.stem.0", "global_branch.stem.proj")
    no_weight_decay_keys = ("relative_position_bias_table",)
    cfg_extra = {
        "origin_url": "https://github.com/huoxiangzuo/HiFuse",
        "paper_name": "HiFuse: Hierarchical multi-scale feature fusion network for medical image classification",
    }

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 2, 2),
        conv_depths: Optional[Sequence[int]] = None,
        num_heads: Sequence[int] = (3, 6, 12, 24),
        dims: Sequence[int] = (96, 192, 384, 768),
        window_size: int = 7,
        *,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_path_rate: float = 0.1,
        conv_drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        qkv_bias: bool = True,
        backend: Optional[str] = None,
        fusion_kwargs: Optional[dict] = None,
    ):
        name = type(self).__name__
        depths = expect_four(name, "depths", depths)
        conv_depths = expect_four(name, "conv_depths", depths if conv_depths is None else conv_depths)
        num_heads = expect_four(name, "num_heads", num_heads)
        dpr = stage_drop_path_rates(name, "drop_path_rate", drop_path_rate, depths)
        cdpr = stage_drop_path_rates(name, "conv_drop_path_rate", conv_drop_path_rate, conv_depths)
        fusion_kwargs = dict(fusion_kwargs or {})

        def local_blocks(i: int, dim: int) -> nn.Module:
            return nn.Sequential(*(LocalBlock(dim, drop_path=p) for p in cdpr[i]))

        def global_stage(i: int, in_dim: int, dim: int) -> nn.Module:
            return HiFuseGlobalStage(
                dim, depths[i], num_heads[i], window_size,
                in_dim=in_dim if i > 0 else None, qkv_bias=qkv_bias, drop_path=dpr[i], backend=backend,
            )

        super().__init__(
            conv_stages(local_blocks),
            global_stage,
            lambda i, dim: HFF(dim, with_prev=i > 0, **fusion_kwargs),
            dims=dims,
            in_chans=in_chans,
            num_classes=num_classes,
            global_stem=lambda c, d: PatchEmbed(c, d, 4),
            drop_rate=drop_rate,
        )
        self.depths, self.conv_depths, self.num_heads, self.window_size = depths, conv_depths, num_heads, window_size

    def official_global_key_rules(self) -> KeyRules:
        """``patch_embed`` and ``layers1..4`` -> ``global_branch``; drops the Swin head and the unused keys."""
        rules = [(r"patch_embed\.(.*)", r"global_branch.stem.\1")]
        rules += [(rf"layers{i + 1}\.(.*)", rf"global_branch.stages.{i}.\1") for i in range(4)]
        drop = [
            r"norm\.(weight|bias)",
            r"head\.(weight|bias)",
            r"layers[1-4]\.blocks\.\d+\.norm2\.(weight|bias)",
            r"layers[1-4]\.blocks\.\d+\.attn\.relative_position_index",
        ]
        return rules, drop

    def official_unused_global_params(self) -> int:
        """The global blocks' ``norm2`` LayerNorms and Swin's final ``norm`` and ``head`` (built, never called)."""
        d, k = self.dims[-1], max(self.num_classes, 0)
        norm2 = sum(2 * sum(self.dims[i] for _ in range(self.depths[i])) for i in range(4))
        head = d * k + k if k > 0 else 0
        return norm2 + 2 * d + head


@register_model
def hifuse_tiny(num_classes: int = 1000, **kwargs) -> HiFuse:
    """HiFuse-Tiny: depths (2, 2, 2, 2) in both branches."""
    return HiFuse(num_classes=num_classes, **variant_kwargs("hifuse_tiny", kwargs, depths=(2, 2, 2, 2)))


@register_model
def hifuse_small(num_classes: int = 1000, **kwargs) -> HiFuse:
    """HiFuse-Small: depths (2, 2, 6, 2) in both branches."""
    return HiFuse(num_classes=num_classes, **variant_kwargs("hifuse_small", kwargs, depths=(2, 2, 6, 2)))


@register_model
def hifuse_base(num_classes: int = 1000, **kwargs) -> HiFuse:
    """HiFuse-Base: depths (2, 2, 18, 2) in both branches."""
    return HiFuse(num_classes=num_classes, **variant_kwargs("hifuse_base", kwargs, depths=(2, 2, 18, 2)))


#: timm-style ``pretrained_cfg`` of each registered model (the data config of the ``hifuse`` recipe)
default_cfgs = {name: dict(HiFuse.data_cfg(), architecture=name) for name in ("hifuse_tiny", "hifuse_small", "hifuse_base")}
