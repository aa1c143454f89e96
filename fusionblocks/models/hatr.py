"""HATR: Hierarchical Adaptive Token Refinement (Zhang, "The CNN and ViT Fusion Model Based on Hierarchical Adaptive
Token Refinement Method in Pneumonia X-ray Image Classification"). There is no official code; the paper (§2.3) is the
spec, and every choice it leaves open is stated here.

Pipeline::

    image -> CNN backbone -> [1x1 reduce] -> OverlapTokenizer (k=2, s=1) -> TokenWeighting -> ViT (CLS) -> head

* ``hatr_resnet50``: ResNet-50 ``(B, 2048, 7, 7)`` -> 1x1 conv + BN + ReLU to 512 -> tokenizer 512 -> 512
  (6x6 = 36 tokens at 224x224).
* ``hatr_conv2d``: the 3-layer Conv2D net ``(B, 256, 14, 14)`` -> tokenizer 256 -> 512 (13x13 = 169 tokens).

ViT defaults (the paper only says "a shallow ViT structure" to stay lightweight, and fixes the token width at 512):
``embed_dim=512``, ``vit_depth=4``, ``vit_heads=8`` (head dim 64 as in ViT-B), ``mlp_ratio=4``, pre-norm blocks,
learned position embeddings, a CLS token read out by a final LayerNorm and a linear head. Depth 4 is a third of
ViT-B's 12 — shallow, ~12.6 M parameters — and can be changed with ``vit_depth``/``vit_heads``.

Other readings of what §2.3 leaves open:

* the ResNet-50 reduction: §2.3.2 names a 1x1 convolution (§2.3.1: "dimensionality reduction and convolution") and
  no norm or activation; the BatchNorm + ReLU after it are this library's choice (a conv-BN-ReLU unit, as in the
  backbone). ``reduce_dim=None`` drops the whole reduction, not just the BN + ReLU.
* "multi-scale" (§2.3, §2.3.2: "multi-scale overlapping embedding"): the text gives one window per backbone
  (kernel 2, stride 1, on the last backbone map) and no second scale, so there is one tokenizer; other windows via
  ``tokenizer_kernel`` / ``tokenizer_stride``.
* the paper mentions no position embeddings; they are added after :class:`TokenWeighting`, so the token weights
  scale the feature content and not the position code.
* TokenWeighting's ``reduction=16`` and ``kernel_size=7`` are CBAM's defaults; the paper gives no values.
* backbone weights: §2.2 motivates the 3-channel input and the ImageNet statistics with pretrained models (the
  standardization "helps the model adapt to the input distribution of the pretrained model"), which suggests an
  ImageNet-pretrained ResNet-50, but the paper names no weights and never says which parts were pretrained (the
  Conv2D net is its own). Nothing is downloaded here: both backbones start from random init, in ``fusionblocks
  train`` too, unless given torchvision's ImageNet ResNet-50 weights (``load_backbone_state_dict`` in Python,
  ``fusionblocks train --init resnet50.pth``).

Position embeddings are learned for the token grid at ``img_size``; for another input size the grid part is
resized by bicubic interpolation (the CLS entry is kept), so any input size at least the minimum works
(33x33 for ResNet-50, 31x31 for Conv2D: the backbone map must be at least 2x2).

Size at 224x224, 2 classes (``torch.utils.flop_counter``, attention matmuls included, 1 FLOP = 1 multiply or add):
``hatr_resnet50`` 38,270,628 parameters (23,508,032 in the backbone), 9.30 GFLOPs; ``hatr_conv2d`` 13,628,068
parameters (371,264 in the backbone), 5.66 GFLOPs.

``forward_intermediates`` returns the backbone's maps: four for ResNet-50, three for Conv2D (no stride-32 stage), so
``FeatureExtractor(hatr_conv2d_model, out_indices=(0, 1, 2))`` is its full set.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .memory_format import channels_last_weights
from .._validate import expect_nchw, expect_positive_int, expect_rate, expect_size
from ..layers.drop import drop_path
from ..layers.tokens import OverlapTokenizer, TokenWeighting
from .backbones import Conv2DBackbone, ResNet50
from . import checkpointing
from .contract import ModelContract, model_cfg
from .fusionnet import stage_drop_path_rates
from .registry import register_model, variant_kwargs

__all__ = ["HATR", "PAPER_RESULTS", "hatr_resnet50", "hatr_conv2d"]

#: Test-set results reported in the HATR paper (Table 2, Kaggle chest X-ray, 2 classes). The paper's
#: training recipe is ``fusionblocks.training.recipes.RECIPES["hatr"]`` (``fusionblocks train --recipe hatr``).
#: The paper does not say how precision, recall and F1 are taken (for the pneumonia class, or averaged over both);
#: ``fusionblocks evaluate`` reports the macro averages (``precision_macro``, ...) and each class's in ``per_class``.
PAPER_RESULTS: Dict[str, Dict[str, float]] = {
    "hatr_resnet50": {"accuracy": 0.914, "precision": 0.908, "recall": 0.921, "f1": 0.914, "auc": 0.960},
    "hatr_conv2d": {"accuracy": 0.882, "precision": 0.875, "recall": 0.890, "f1": 0.882, "auc": 0.950},
}


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ViTBlock(nn.Module):
    """Pre-norm transformer block (ViT): ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``. ``(B, N, D) -> (B, N, D)``.

    Args:
        dim: token width ``D``.
        num_heads: attention heads (``D`` divisible by it).
        mlp_ratio: MLP hidden width / ``D``.
        qkv_bias: bias on the qkv projection.
        drop: dropout after the attention projection and in the MLP.
        attn_drop: attention-probability dropout.
        drop_path: stochastic depth of both residual branches.
    """

    def __init__(
        self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
        attn_drop: float = 0.0, drop_path: float = 0.0,
    ):
        super().__init__()
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


_MIN_SIDE = {"resnet50": 33, "conv2d": 31}
_FIRST_CONV = {"resnet50": "backbone.conv1", "conv2d": "backbone.layer1.conv"}


class HATR(ModelContract, nn.Module):
    """CNN backbone + HATR bridge (overlapping tokenization, token weighting) + shallow ViT with a CLS head.

    Args:
        backbone: ``"resnet50"`` or ``"conv2d"``.
        num_classes: classifier outputs (0: no head, ``forward`` returns the pre-logits).
        in_chans: image channels (3: the paper's replicated gray; 1 also works).
        img_size: ``int`` or ``(H, W)`` the position embeddings are learned for; other sizes interpolate them.
        embed_dim: token width (paper: 512).
        reduce_dim: width of a 1x1 conv + BN + ReLU reduction of the backbone map before the tokenizer, or ``None``
            for none. ``"auto"`` follows the paper: 512 for ResNet-50 (2048 -> 512), none for Conv2D (its 256-channel
            map is tokenized to 512 directly).
        vit_depth: transformer blocks.
        vit_heads: attention heads.
        mlp_ratio: MLP width / ``embed_dim``.
        tokenizer_kernel: tokenizer kernel (paper: 2).
        tokenizer_stride: tokenizer stride (paper: 1).
        weighting_reduction: channel-attention reduction of :class:`TokenWeighting`.
        weighting_kernel: spatial-attention kernel of :class:`TokenWeighting`.
        drop_rate: dropout in the ViT blocks and before the head, in ``[0, 1)``.
        attn_drop_rate: attention dropout, in ``[0, 1)``.
        drop_path_rate: stochastic depth of the ViT blocks, linear from 0 to this over the blocks, in ``[0, 1)``
            (timm's ``drop_path_rate``; the paper uses none).

    Shapes:
        ``forward``: ``(B, in_chans, H, W) -> (B, num_classes)``;
        ``forward_features``: ``-> (B, 1 + h*w, embed_dim)`` (CLS first, final norm applied);
        ``forward_head(x, pre_logits=True)``: ``-> (B, embed_dim)``;
        ``forward_intermediates``: backbone maps (ResNet-50: 4 at strides 4/8/16/32; Conv2D: 3 at strides 4/8/16);
        ``token_weights``: ``-> (B, h, w)``, the TokenWeighting weights on the token grid.

    timm contract (:class:`~fusionblocks.models.contract.ModelContract`): the feature levels are the backbone's
    maps; ``prune_intermediate_layers`` with ``prune_head`` (what timm's ``features_only`` does) removes everything
    after the backbone (1x1 reduction, tokenizer, token weighting, ViT, head), which only feeds the CLS classifier.
    """

    classifier_name = "head"
    global_pool_type = "token"
    no_weight_decay_keys = ("cls_token", "pos_embed")

    @classmethod
    def data_cfg(
        cls, backbone: str, num_classes: int = 2, in_chans: int = 3, img_size: Tuple[int, int] = (224, 224),
        min_side: Optional[int] = None,
    ) -> Dict[str, object]:
        """timm ``pretrained_cfg``: the data config of the ``hatr`` recipe, the smallest input that runs
        (``min_side``: a model's own, which its tokenizer sets; ``None``: the registered models')."""
        lo = _MIN_SIDE[backbone] if min_side is None else min_side
        return model_cfg(
            "hatr", num_classes=num_classes, first_conv=_FIRST_CONV[backbone], classifier=cls.classifier_name,
            input_size=(in_chans, *img_size), min_input_size=(in_chans, lo, lo),
        )

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = 2,
        *,
        in_chans: int = 3,
        img_size: Union[int, Tuple[int, int]] = 224,
        embed_dim: int = 512,
        reduce_dim: Union[int, None, str] = "auto",
        vit_depth: int = 4,
        vit_heads: int = 8,
        mlp_ratio: float = 4.0,
        tokenizer_kernel: int = 2,
        tokenizer_stride: int = 1,
        weighting_reduction: int = 16,
        weighting_kernel: int = 7,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.model_name = f"hatr_{backbone}"
        expect_positive_int(self.model_name, "embed_dim", embed_dim)
        expect_positive_int(self.model_name, "vit_depth", vit_depth)
        expect_positive_int(self.model_name, "vit_heads", vit_heads)
        if embed_dim % vit_heads:
            raise ValueError(
                f"{self.model_name}: expected embed_dim ({embed_dim}) to be divisible by vit_heads ({vit_heads})"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"{self.model_name}: expected num_classes to be a non-negative int, got {num_classes!r}")
        drop_rate = expect_rate(self.model_name, "drop_rate", drop_rate)
        attn_drop_rate = expect_rate(self.model_name, "attn_drop_rate", attn_drop_rate)
        dpr = stage_drop_path_rates(self.model_name, "drop_path_rate", drop_path_rate, [vit_depth])[0]
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.img_size = expect_size(self.model_name, "img_size", img_size)

        if backbone == "resnet50":
            self.backbone: nn.Module = ResNet50(in_chans)
        elif backbone == "conv2d":
            self.backbone = Conv2DBackbone(in_chans)
        else:
            raise ValueError(f"HATR: expected backbone to be one of ['resnet50', 'conv2d'], got {backbone!r}")
        feat_dim = self.backbone.num_features
        if reduce_dim == "auto":
            reduce_dim = 512 if backbone == "resnet50" else None
        if reduce_dim is not None:
            expect_positive_int(self.model_name, "reduce_dim", reduce_dim)
            self.reduce = nn.Sequential(
                nn.Conv2d(feat_dim, reduce_dim, 1, bias=False), nn.BatchNorm2d(reduce_dim), nn.ReLU(inplace=True)
            )
            feat_dim = reduce_dim
        else:
            self.reduce = nn.Identity()
        self.tokenizer = OverlapTokenizer(feat_dim, embed_dim, tokenizer_kernel, tokenizer_stride)
        self.weighting = TokenWeighting(embed_dim, reduction=weighting_reduction, kernel_size=weighting_kernel)

        self.grid_size = self._token_grid(*self.img_size)
        if min(self.grid_size) < 1:
            lo = self._min_side()
            raise ValueError(
                f"{self.model_name}: expected img_size of at least {lo}x{lo} (the backbone map must cover the "
                f"tokenizer's {self.tokenizer.kernel_size} kernel), got {img_size!r}"
            )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size[0] * self.grid_size[1], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.Sequential(
            *[
                ViTBlock(embed_dim, vit_heads, mlp_ratio=mlp_ratio, drop=drop_rate, attn_drop=attn_drop_rate, drop_path=p)
                for p in dpr
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.grad_checkpointing = False
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info: List[Dict[str, object]] = [
            {**f, "module": f"backbone.{f['module']}"} for f in self.backbone.feature_info
        ]
        self.backbone_only = False
        self._init_weights()
        self._set_pretrained_cfg(type(self).data_cfg(backbone, num_classes, in_chans, self.img_size, self._min_side()))
        channels_last_weights(self)

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in list(self.blocks.modules()) + [self.head]:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _token_grid(self, height: int, width: int) -> Tuple[int, int]:
        fh, fw = self.backbone.output_size(height, width)
        return self.tokenizer.output_size(fh, fw)

    def _min_side(self) -> int:
        """The smallest square input side whose token grid is not empty."""
        lo = 1
        while min(self._token_grid(lo, lo)) < 1:
            lo += 1
        return lo

    def _check_input(self, x: torch.Tensor) -> None:
        expect_nchw(self.model_name, "x", x, self.in_chans)
        if self.backbone_only:
            return
        h, w = x.shape[-2:]
        th, tw = self._token_grid(h, w)
        if th < 1 or tw < 1:
            lo = self._min_side()
            raise ValueError(
                f"{self.model_name}: expected an image of at least {lo}x{lo} (the backbone map must cover the "
                f"tokenizer's {self.tokenizer.kernel_size} kernel), got {tuple(x.shape)}"
            )

    def _pos_embed(self, hw: Tuple[int, int]) -> torch.Tensor:
        if tuple(hw) == self.grid_size:
            return self.pos_embed
        gh, gw = self.grid_size
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = grid.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=tuple(hw), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid.flatten(2).transpose(1, 2)], dim=1)

    def forward_tokens(
        self, x: torch.Tensor, return_weights: bool = False
    ) -> Union[Tuple[torch.Tensor, Tuple[int, int]], Tuple[torch.Tensor, Tuple[int, int], torch.Tensor]]:
        """Image to weighted tokens (before the CLS token and the ViT).

        Returns:
            ``(tokens (B, h*w, D), (h, w))``, plus the ``(B, h*w)`` weights when ``return_weights``.
        """
        self._check_input(x)
        self._expect_full("forward_tokens")
        return self._tokens(self.backbone(x), return_weights)

    def _tokens(self, f: torch.Tensor, return_weights: bool = False):
        tokens, hw = self.tokenizer(self.reduce(f), return_hw=True)
        tokens, weights = self.weighting(tokens, hw, return_weights=True)
        return (tokens, hw, weights) if return_weights else (tokens, hw)

    def _expect_full(self, what: str) -> None:
        if self.backbone_only:
            raise RuntimeError(
                f"{self.model_name}: {what} needs the token path and ViT, which prune_intermediate_layers removed; "
                f"this model now only runs forward_intermediates"
            )

    def token_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The TokenWeighting weights for images ``x`` on the token grid, ``(B, h, w)``, in (0, 1)."""
        _, (h, w), weights = self.forward_tokens(x, return_weights=True)
        return weights.reshape(-1, h, w)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W) -> (B, 1 + h*w, D)``: CLS token first, after the final LayerNorm."""
        maps, state = self._run_levels(x, len(self.feature_info) - 1)
        return self._finish_features(maps, state)

    def _run_levels(self, x: torch.Tensor, stop: int):
        self._check_input(x)
        return self.backbone.forward_intermediates(x, stop), None

    def _finish_features(self, maps: List[torch.Tensor], state: object) -> torch.Tensor:
        self._expect_full("forward_features")
        tokens, hw = self._tokens(maps[-1])
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = self.pos_drop(torch.cat([cls, tokens], dim=1) + self._pos_embed(hw))
        for block in self.blocks:
            x = checkpointing.run(block, x, enabled=self.grad_checkpointing)
        return self.norm(x)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each ViT block in backward instead of storing its activations."""
        self.grad_checkpointing = enable

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """CLS readout: ``(B, 1 + N, D) -> (B, num_classes)`` (or ``(B, D)`` with ``pre_logits``)."""
        x = self.head_drop(x[:, 0])
        return x if pre_logits else self.head(x)

    def _prune_levels(self, max_index: int) -> None:
        self.backbone.prune(max_index)

    def _prune_head(self, prune_norm: bool) -> None:
        for name in ("reduce", "tokenizer", "weighting", "pos_drop", "blocks", "norm", "head_drop", "head"):
            setattr(self, name, nn.Identity())
        del self.cls_token, self.pos_embed
        self.cls_token = self.pos_embed = None
        self.backbone_only = True

    def group_matcher(self, coarse: bool = False) -> Dict[str, object]:
        """timm's parameter groups: backbone stem, backbone layers, the token bridge, the ViT blocks (+ norm)."""
        return {
            "stem": r"^backbone\.(?:conv1|bn1)\.",
            "backbone": r"^backbone\.layer(\d+)\.",
            "bridge": r"^(?:reduce|tokenizer|weighting|cls_token|pos_embed)",
            "blocks": [(r"^blocks\.(\d+)\.", None), (r"^norm\.", (99999,))],  # one block per group either way
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def load_backbone_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """Load torchvision ``resnet50`` weights into ``self.backbone`` (strict, ``fc.*`` dropped)."""
        if not isinstance(self.backbone, ResNet50):
            raise ValueError(f"{self.model_name}: only the ResNet-50 backbone loads torchvision weights")
        self.backbone.load_torchvision_state_dict(state_dict)


@register_model
def hatr_resnet50(num_classes: int = 2, **kwargs) -> HATR:
    """HATR-ResNet: ResNet-50 -> 1x1 to 512 -> overlap tokens (k2 s1) -> token weighting -> ViT. Table 2: 91.4 %."""
    return HATR(num_classes=num_classes, **variant_kwargs("hatr_resnet50", kwargs, backbone="resnet50"))


@register_model
def hatr_conv2d(num_classes: int = 2, **kwargs) -> HATR:
    """HATR-Conv2D: 3-layer Conv2D -> overlap tokens 256 -> 512 (k2 s1) -> token weighting -> ViT. Table 2: 88.2 %."""
    return HATR(num_classes=num_classes, **variant_kwargs("hatr_conv2d", kwargs, backbone="conv2d"))


#: timm-style ``pretrained_cfg`` of each registered model (the data config of the ``hatr`` recipe)
default_cfgs = {f"hatr_{b}": dict(HATR.data_cfg(b), architecture=f"hatr_{b}") for b in ("resnet50", "conv2d")}
