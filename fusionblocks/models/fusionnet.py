"""``FusionNet``: the dual-branch CNN-Transformer assembly shared by HiFuse and HEMF.

Contract (stable; HiFuse and HEMF are configurations of it)::

    image (B, in_chans, H, W)
      -> zero-pad bottom/right to multiples of ``pad_to`` (32 = the total stride; a no-op at 224)
      -> local_branch:  stem (stride 4) -> stages[0..3]   -> l_1..l_4   (dims[i] channels, strides 4/8/16/32)
      -> global_branch: stem (stride 4) -> stages[0..3]   -> g_1..g_4
      -> f_i = fusion[i](l_i, g_i, f_{i-1})  with f_0 = None            (the four fusion outputs)
      -> head: mean over H, W -> LayerNorm(dims[-1], eps 1e-6) [-> Dropout(drop_rate)] -> Linear(dims[-1], num_classes)

Factories (all return NCHW-in/NCHW-out modules):

- ``stem(in_chans, dim) -> nn.Module``: stride 4. Default :func:`conv_stem` (Conv 4x4/4 + LayerNorm2d).
- ``stage(i, in_dim, dim) -> nn.Module``: stage ``i`` in 0..3; stage 0 gets the stem output
  (``in_dim == dims[0]``) and keeps its size, stages 1..3 map ``dims[i-1] -> dims[i]`` and halve ``H, W``.
  :func:`conv_stages` wraps a ``blocks(i, dim)`` factory into the ConvNeXt-style stage used by both
  official local branches and HEMF's global branch (``LayerNorm2d + Conv 2x2/2`` downsampling, then the
  blocks), as a :class:`Stage` with submodules ``downsample`` and ``blocks``.
- ``fusion(i, dim) -> nn.Module`` called as ``fusion(l, g, f)`` where ``f`` is ``None`` at stage 0 and the
  previous fusion output ``(B, dims[i-1], 2H, 2W)`` after.

Module tree: ``local_branch.{stem, stages.i}``, ``global_branch.{stem, stages.i}``, ``fusion.i``,
``head.{norm, fc}``. Model API: ``forward``, ``forward_features`` (last fusion map, unpooled),
``forward_head(x, pre_logits=False)``, ``forward_intermediates`` (the four fusion maps), ``feature_info``,
``load_official_state_dict``. Official checkpoints: :meth:`FusionNet.official_key_rules` maps what the official
HiFuse and HEMF share (local branch ``downsample_layers``/``stages``, head ``conv_norm``/``conv_head``, fusion
``fu1..fu4``); subclasses implement :meth:`FusionNet.official_global_key_rules` for their global branch.

Input sizes: any ``H, W >= 1``; sizes that are not multiples of ``pad_to`` are zero-padded at the
bottom/right and the network runs on the padded frame. ``forward_intermediates`` crops each fusion map of the
padded frame to the cells that cover the input, ``ceil(H / stride) x ceil(W / stride)``, so cell ``(r, c)`` of
stride ``s`` covers input pixels ``[r*s, (r+1)*s)`` like the maps of any strided conv net (e.g. 100x76 -> fusion
maps 25x19, 13x10, 7x5, 4x3; the padded frame's stride-32 map is never cropped, so classification sees exactly the
padded network). At multiples of 32 (224 included) the network is the official function.

The timm model contract (``pretrained_cfg``, ``get_classifier``, ``reset_classifier``, timm's
``forward_intermediates`` signature, ``prune_intermediate_layers``, ``group_matcher``, ``no_weight_decay``) comes
from :class:`~fusionblocks.models.contract.ModelContract`.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .memory_format import channels_last_weights
from .._validate import expect_rate, expect_nchw, expect_positive_int
from ..layers.norm import LayerNorm2d
from . import checkpointing
from .contract import ModelContract, model_cfg
from .convert import KeyRules, OfficialWeights, join_rules, prefix_rules

__all__ = [
    "FusionNet",
    "Branch",
    "Stage",
    "ClassifierHead",
    "conv_stem",
    "conv_downsample",
    "conv_stages",
    "conv_branch_rules",
    "fusion_rules",
    "expect_four",
    "stage_drop_path_rates",
]

StemFn = Callable[[int, int], nn.Module]
StageFn = Callable[[int, int, int], nn.Module]
FusionFn = Callable[[int, int], nn.Module]


def expect_four(name: str, what: str, values: Sequence) -> tuple:
    """``tuple(values)``; a ``ValueError`` naming ``name`` and ``what`` unless it holds one value per stage."""
    values = tuple(values)
    if len(values) != 4:
        raise ValueError(f"{name}: expected 4 {what}, got {values}")
    return values


def stage_drop_path_rates(name: str, what: str, rate: float, depths: Sequence[int]) -> List[List[float]]:
    """Stochastic-depth rates rising linearly from 0 to ``rate`` over all blocks, split into one list per stage;
    ``rate`` (the model ``name``'s argument ``what``) must lie in ``[0, 1)``."""
    rate = expect_rate(name, what, rate)
    n = sum(depths)
    # computed without a tensor, so that the models also build on the meta device
    rates = [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
    bounds = [sum(depths[:i]) for i in range(len(depths) + 1)]
    return [rates[a:b] for a, b in zip(bounds, bounds[1:])]


def conv_stem(in_chans: int, dim: int) -> nn.Module:
    """ConvNeXt stem of the official code: ``Conv2d(in_chans, dim, 4, stride 4) -> LayerNorm2d(dim, 1e-6)``.

    Keys ``0.weight/bias`` (conv) and ``1.weight/bias`` (norm), as the official ``downsample_layers[0]``.
    """
    return nn.Sequential(nn.Conv2d(in_chans, dim, 4, stride=4), LayerNorm2d(dim, eps=1e-6))


def conv_downsample(in_dim: int, dim: int) -> nn.Module:
    """``LayerNorm2d(in_dim, 1e-6) -> Conv2d(in_dim, dim, 2, stride 2)`` (official ``downsample_layers[1:]``)."""
    return nn.Sequential(LayerNorm2d(in_dim, eps=1e-6), nn.Conv2d(in_dim, dim, 2, stride=2))


class Stage(nn.Module):
    """``downsample`` (``Identity`` at stage 0) then ``blocks``. Shapes: ``(B, in_dim, H, W) -> (B, dim, H', W')``."""

    def __init__(self, downsample: Optional[nn.Module], blocks: nn.Module):
        super().__init__()
        self.downsample = nn.Identity() if downsample is None else downsample
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


def conv_stages(blocks: Callable[[int, int], nn.Module]) -> StageFn:
    """A stage factory: :func:`conv_downsample` (stages 1..3) followed by ``blocks(i, dim)``.

    ``blocks(i, dim)`` returns the NCHW module of stage ``i`` (e.g. ``nn.Sequential`` of ``LocalBlock``).
    """

    def make(i: int, in_dim: int, dim: int) -> nn.Module:
        return Stage(conv_downsample(in_dim, dim) if i > 0 else None, blocks(i, dim))

    return make


class Branch(nn.Module):
    """A stem and four stages; ``forward`` returns the four stage outputs (strides 4, 8, 16, 32)."""

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module]):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = checkpointing.run(stage, x, enabled=self.grad_checkpointing)
            outs.append(x)
        return outs


class ClassifierHead(nn.Module):
    """Global average pool -> ``LayerNorm(dim)`` -> ``Linear(dim, num_classes)`` (official ``conv_norm``/``conv_head``),
    with timm's classifier dropout (``drop_rate``, official 0) before the Linear.

    Shapes: ``(B, C, H, W) -> (B, num_classes)``, or ``(B, C)`` with ``pre_logits=True``.
    """

    def __init__(self, dim: int, num_classes: int, *, norm_eps: float = 1e-6, drop_rate: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.norm(x.mean((-2, -1))))
        return x if pre_logits else self.fc(x)


class FusionNet(ModelContract, OfficialWeights, nn.Module):
    """Dual-branch (local CNN + global Transformer) network with hierarchical fusion; see the module docstring.

    Args:
        local_stage: stage factory ``(i, in_dim, dim) -> module`` of the local branch.
        global_stage: stage factory of the global branch.
        fusion: ``(i, dim) -> module`` called as ``(l, g, f)``.
        dims: channels of the four stages.
        in_chans: image channels.
        num_classes: classifier outputs (``0``: no classifier, ``forward`` returns pooled features).
        local_stem: ``(in_chans, dims[0]) -> module`` of stride 4.
        global_stem: same for the global branch.
        head_norm_eps: epsilon of the head LayerNorm (official: 1e-6).
        pad_to: inputs are zero-padded (bottom/right) to multiples of this (default 32, the total stride).
        drop_rate: dropout before the classifier, in ``[0, 1)`` (timm's ``drop_rate``; official 0).

    Shapes: ``(B, in_chans, H, W) -> (B, num_classes)``.
    """

    classifier_name = "head.fc"
    global_pool_type = "avg"
    #: the ``first_conv`` entries of ``pretrained_cfg`` (timm adapts them to other ``in_chans``)
    first_convs: Tuple[str, ...] = ("local_branch.stem.0", "global_branch.stem.0")
    cfg_extra: Dict[str, object] = {}

    @classmethod
    def data_cfg(cls, num_classes: int = 1000, in_chans: int = 3) -> Dict[str, object]:
        """timm ``pretrained_cfg`` of this network: the data config of the ``hifuse`` recipe (HiFuse and HEMF)."""
        return model_cfg(
            "hifuse", num_classes=num_classes, first_conv=cls.first_convs, classifier=cls.classifier_name,
            input_size=(in_chans, 224, 224), pool_size=(7, 7), **cls.cfg_extra,
        )

    def __init__(
        self,
        local_stage: StageFn,
        global_stage: StageFn,
        fusion: FusionFn,
        *,
        dims: Sequence[int] = (96, 192, 384, 768),
        in_chans: int = 3,
        num_classes: int = 1000,
        local_stem: StemFn = conv_stem,
        global_stem: StemFn = conv_stem,
        head_norm_eps: float = 1e-6,
        pad_to: int = 32,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        name = type(self).__name__
        dims = expect_four(name, "stage dims", dims)
        for d in dims:
            expect_positive_int(name, "dims", d)
        expect_positive_int(name, "in_chans", in_chans)
        expect_positive_int(name, "pad_to", pad_to)
        drop_rate = expect_rate(name, "drop_rate", drop_rate)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"{name}: expected num_classes as an int >= 0, got {num_classes!r}")
        self.dims = dims
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = dims[-1]
        self.pad_to = pad_to
        self.grad_checkpointing = False
        in_dims = (dims[0],) + tuple(dims[:-1])
        self.local_branch = Branch(local_stem(in_chans, dims[0]), [local_stage(i, in_dims[i], dims[i]) for i in range(4)])
        self.global_branch = Branch(global_stem(in_chans, dims[0]), [global_stage(i, in_dims[i], dims[i]) for i in range(4)])
        self.fusion = nn.ModuleList(fusion(i, dims[i]) for i in range(4))
        self.head = ClassifierHead(dims[-1], num_classes, norm_eps=head_norm_eps, drop_rate=drop_rate)
        self.feature_info: List[Dict[str, object]] = [
            {"num_chs": dims[i], "reduction": 4 * 2**i, "module": f"fusion.{i}"} for i in range(4)
        ]
        self._set_pretrained_cfg(type(self).data_cfg(num_classes, in_chans))
        channels_last_weights(self)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        expect_nchw(type(self).__name__, "x", x, self.in_chans)
        ph, pw = (-x.shape[-2]) % self.pad_to, (-x.shape[-1]) % self.pad_to
        return F.pad(x, (0, pw, 0, ph)) if ph or pw else x

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage and fusion block in backward instead of storing its activations."""
        self.grad_checkpointing = enable
        self.local_branch.grad_checkpointing = enable
        self.global_branch.grad_checkpointing = enable

    def _run_levels(self, x: torch.Tensor, stop: int):
        """Fusion outputs of stages ``0..stop``, each cropped to the ``ceil(H / s) x ceil(W / s)`` cells that
        cover the input (stage ``i + 1`` runs on the uncropped padded map)."""
        h, w = x.shape[-2:]
        x = self._pad(x)
        lb, gb = self.local_branch, self.global_branch
        l, g = lb.stem(x), gb.stem(x)
        outs: List[torch.Tensor] = []
        f: Optional[torch.Tensor] = None
        for i in range(stop + 1):
            l = checkpointing.run(lb.stages[i], l, enabled=lb.grad_checkpointing)
            g = checkpointing.run(gb.stages[i], g, enabled=gb.grad_checkpointing)
            f = checkpointing.run(self.fusion[i], l, g, f, enabled=self.grad_checkpointing)
            s = int(self.feature_info[i]["reduction"])  # type: ignore[arg-type]
            outs.append(f[..., : math.ceil(h / s), : math.ceil(w / s)])
        return outs, None

    def _finish_features(self, maps: List[torch.Tensor], state: object) -> torch.Tensor:
        return maps[-1]

    def _prune_levels(self, max_index: int) -> None:
        for branch in (self.local_branch, self.global_branch):
            branch.stages = branch.stages[: max_index + 1]
        self.fusion = self.fusion[: max_index + 1]

    def _prune_head(self, prune_norm: bool) -> None:
        self.head.fc = nn.Identity()
        if prune_norm:
            self.head.norm = nn.Identity()

    def group_matcher(self, coarse: bool = False) -> Dict[str, object]:
        """timm's parameter groups (layer-wise lr decay): both stems, then stage by stage (downsampling, blocks,
        the stage's fusion block), then the head."""
        stage = r"^(?:local|global)_branch\.stages\.(\d+)"
        if coarse:
            blocks = [(stage, None), (r"^fusion\.(\d+)", None), (r"^head\.", (99999,))]
        else:
            blocks = [
                (stage + r"\.downsample", (0,)),
                (stage + r"\.blocks\.(\d+)", None),
                (stage + r"\.", (99997,)),  # blocks that are one module (HEMF's EGF block)
                (r"^fusion\.(\d+)", (99998,)),
                (r"^head\.", (99999,)),
            ]
        return {"stem": r"^(?:local|global)_branch\.stem", "blocks": blocks}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last fusion map ``(B, dims[-1], ceil(H/32), ceil(W/32))``, before pooling."""
        maps, state = self._run_levels(x, len(self.feature_info) - 1)
        return self._finish_features(maps, state)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool + norm (+ classifier unless ``pre_logits``): ``(B, C, h, w) -> (B, num_classes)`` or ``(B, C)``."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def official_global_key_rules(self) -> KeyRules:
        """``(rules, drop)`` of the official global branch (and any other official keys only this network has)."""
        raise NotImplementedError(f"{type(self).__name__} has no official checkpoint mapping")

    def official_unused_params(self) -> int:
        """Parameters the official model builds but its forward never calls — what
        :meth:`load_official_state_dict` drops: the unused path of every fusion block plus
        :meth:`official_unused_global_params`. Official count = ``num_params + official_unused_params()``."""
        return sum(f.official_unused_params() for f in self.fusion) + self.official_unused_global_params()

    def official_unused_global_params(self) -> int:
        """Never-called official parameters outside the fusion blocks (none unless a subclass says so)."""
        return 0

    def official_key_rules(self) -> KeyRules:
        """The official state_dict -> this model: :meth:`official_global_key_rules`, then the renames the
        official HiFuse and HEMF share (local branch, head, fusion). Dropped keys are documented by the subclass;
        a model without a classifier (``num_classes=0``) also drops ``conv_head``, and one whose head norm was
        pruned (``prune_intermediate_layers(prune_norm=True)``, a FusionUNet encoder) ``conv_norm``."""
        head = [(r"conv_norm\.(.*)", r"head.norm.\1"), (r"conv_head\.(.*)", r"head.fc.\1")]
        absent = [rf"{k}\..*" for k, m in (("conv_norm", self.head.norm), ("conv_head", self.head.fc)) if isinstance(m, nn.Identity)]
        return join_rules(
            self.official_global_key_rules(),
            conv_branch_rules("downsample_layers", "stages", "local_branch"),
            (head, absent),
            fusion_rules(self.fusion),
        )


def conv_branch_rules(downsample_key: str, stages_key: str, ours: str) -> KeyRules:
    """Renames of an official ConvNeXt-style branch (``downsample_layers`` + ``stages``) onto a :class:`Branch`
    built with :func:`conv_stem` / :func:`conv_stages`.

    ``{downsample_key}.0.*`` -> ``{ours}.stem.*``; ``{downsample_key}.i.*`` -> ``{ours}.stages.i.downsample.*``;
    ``{stages_key}.i.*`` -> ``{ours}.stages.i.blocks.*``. Nothing is dropped.
    """
    rules = [
        (rf"{downsample_key}\.0\.(.*)", rf"{ours}.stem.\1"),
        (rf"{downsample_key}\.([1-3])\.(.*)", rf"{ours}.stages.\1.downsample.\2"),
        (rf"{stages_key}\.([0-3])\.(.*)", rf"{ours}.stages.\1.blocks.\2"),
    ]
    return rules, []


def fusion_rules(blocks: Sequence[nn.Module], official_fmt: str = "fu{n}") -> KeyRules:
    """Official ``fu1..fu4.*`` -> ``fusion.0..3.*``, applying each fusion block's own
    ``official_key_rules()`` inside (``HFF``/``HEF``; a block without it keeps its key names)."""
    return join_rules(
        *(
            prefix_rules(
                official_fmt.format(n=i + 1) + ".",
                f"fusion.{i}.",
                *(blk.official_key_rules() if hasattr(blk, "official_key_rules") else ((), ())),
                rest=True,
            )
            for i, blk in enumerate(blocks)
        )
    )
