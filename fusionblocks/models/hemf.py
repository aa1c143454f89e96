"""HEMF (hierarchical enhanced multi-scale fusion): a :class:`~fusionblocks.models.fusionnet.FusionNet` configuration.

- local branch: ConvNeXt-style stem/downsampling + :class:`~fusionblocks.layers.branches.ELFBlock` stages
  (4 blocks per stage in ``hemf``);
- global branch: the same stem/downsampling + one :class:`~fusionblocks.layers.manhattan.EGFBlock` per
  stage (3 post-norm decomposed-MaSA layers, 8 heads, decay ``initial_value=1, heads_range=3``);
- fusion: :class:`~fusionblocks.layers.fusion.HEF` at every stage, the previous output passed on;
- head: mean pool -> LayerNorm (eps 1e-6) -> Linear (official ``conv_norm``/``conv_head``).

This is the official ``Esgjgd/HEMF`` ``HEMF(num_classes)`` = ``main_model(EGF_depths=(3,3,3,3),
ELF_depths=(4,4,4,4))``. Unlike the official code (its MHEA asserts square maps) any input size works; sizes
that are not multiples of 32 are zero-padded bottom/right (see :mod:`fusionblocks.models.fusionnet`).

Parameters: ``hemf(num_classes=7)`` holds 66,678,263 parameters; the official model holds 68,269,367 (the
paper reports 66.64 M). The difference to the official count, 1,591,104, is exactly the fusion paths the
official forward never calls: every official ``HEF_block`` builds both the first-stage path (``norm2``, ``W``)
and the later-stage path (``Updim``, ``norm1``, ``W3``) and each stage uses one (``fu1`` has no previous
output, ``fu2..fu4`` always have one): ``fu1.{Updim,norm1,W3}`` 33,408 and ``fu2..fu4.{norm2,W}`` 1,557,696.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..layers.branches import ELFBlock
from ..layers.fusion import HEF
from ..layers.manhattan import EGFBlock
from .convert import KeyRules, join_rules, prefix_rules
from .fusionnet import FusionNet, conv_branch_rules, conv_stages, expect_four, stage_drop_path_rates
from .registry import register_model, variant_kwargs

__all__ = ["HEMF", "hemf"]


class HEMF(FusionNet):
    """HEMF: ELF local branch + EGF (Manhattan self-attention) global branch + HEF fusion.

    Args:
        local_depths: ELF blocks per stage (official ``ELF_depths``).
        global_depths: MaSA layers of the EGF block of each stage (official ``EGF_depths``).
        dims: stage channels.
        num_heads: MaSA heads in every stage (official 8).
        initial_value: decay ``initial_value`` of every EGF block (official 1).
        heads_range: decay ``heads_range`` of every EGF block (official 3).
        mode: MaSA mode of the global branch, ``"decomposed"`` (official) or ``"full"`` (RMT's 2-D variant).
        in_chans: image channels.
        num_classes: classifier outputs (``0``: pooled features).
        drop_path_rate: stochastic depth of the ELF blocks, linear from 0 (official ``ELF_drop_path_rate`` 0).
        fusion_drop_path: stochastic depth of the HEF blocks (official ``HEF_drop_rate`` 0).
        drop_rate: dropout before the classifier (timm's ``drop_rate``; official 0).
        learnable_decay: learn each MaSA layer's log-decay (official: fixed).
        backend: ``decay_attention`` backend (``None`` = auto).
        fusion_kwargs: extra options of every :class:`HEF` (paper variants, e.g. ``depthwise=True``).

    Shapes: ``(B, in_chans, H, W) -> (B, num_classes)``; ``forward_intermediates`` gives the four HEF outputs
    ``(B, dims[i], ceil(H / s), ceil(W / s))`` at strides ``s = 4 * 2**i`` (the cells that cover the input).

    Official checkpoints: :meth:`load_official_state_dict` loads an ``Esgjgd/HEMF`` ``main_model`` state_dict
    strictly. Dropped official keys: ``stages2.*.RetNetRelPos2d.{angle,decay}`` (constants of the config,
    recomputed here; they are checked against the config and a mismatch raises), in ``fu1`` the
    ``Updim``/``norm1``/``W3`` path and in ``fu2..fu4`` the ``norm2``/``W`` path (built, never called).
    """

    official_source = "Esgjgd/HEMF main_model"
    cfg_extra = {"origin_url": "https://github.com/Esgjgd/HEMF"}
    no_weight_decay_keys = ("log_gamma",)  # the learnable decays (learnable_decay=True); a buffer otherwise

    def __init__(
        self,
        local_depths: Sequence[int] = (4, 4, 4, 4),
        global_depths: Sequence[int] = (3, 3, 3, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        num_heads: int = 8,
        *,
        initial_value: float = 1.0,
        heads_range: float = 3.0,
        mode: str = "decomposed",
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_path_rate: float = 0.0,
        fusion_drop_path: float = 0.0,
        drop_rate: float = 0.0,
        learnable_decay: bool = False,
        backend: Optional[str] = None,
        fusion_kwargs: Optional[dict] = None,
    ):
        name = type(self).__name__
        local_depths = expect_four(name, "local_depths", local_depths)
        global_depths = expect_four(name, "global_depths", global_depths)
        dpr = stage_drop_path_rates(name, "drop_path_rate", drop_path_rate, local_depths)
        fusion_kwargs = dict(fusion_kwargs or {})

        def local_blocks(i: int, dim: int) -> nn.Module:
            return nn.Sequential(*(ELFBlock(dim, drop_path=p) for p in dpr[i]))

        def global_blocks(i: int, dim: int) -> nn.Module:
            return EGFBlock(
                dim, num_heads, global_depths[i], initial_value=initial_value, heads_range=heads_range,
                mode=mode, backend=backend, learnable_decay=learnable_decay,
            )

        super().__init__(
            conv_stages(local_blocks),
            conv_stages(global_blocks),
            lambda i, dim: HEF(dim, with_prev=i > 0, drop_path=fusion_drop_path, **fusion_kwargs),
            dims=dims,
            in_chans=in_chans,
            num_classes=num_classes,
            drop_rate=drop_rate,
        )
        self.local_depths, self.global_depths, self.num_heads = local_depths, global_depths, num_heads

    def global_blocks(self) -> List[EGFBlock]:
        """The EGF block of each global stage."""
        return [stage.blocks for stage in self.global_branch.stages]

    def official_global_key_rules(self) -> KeyRules:
        """``downsample_layers2``/``stages2`` -> ``global_branch``, each EGF block's renames inside its stage."""
        egf = [
            prefix_rules(f"stages2.{i}.", f"global_branch.stages.{i}.blocks.", *blk.official_key_rules())
            for i, blk in enumerate(self.global_blocks())
        ]
        return join_rules(*egf, conv_branch_rules("downsample_layers2", "stages2", "global_branch"))

    def load_official_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """Load an official ``Esgjgd/HEMF`` state_dict strictly (dropped keys: see the class docstring).

        Raises:
            KeyError: a missing or unexpected key (named).
            ValueError: a shape mismatch, or ``RetNetRelPos2d`` buffers that do not match this config.
        """
        sd = dict(state_dict)
        for i, blk in enumerate(self.global_blocks()):
            sd = blk.prepare_official(sd, f"stages2.{i}.")
        super().load_official_state_dict(sd)


@register_model
def hemf(num_classes: int = 1000, **kwargs) -> HEMF:
    """The official HEMF: ELF depths (4,4,4,4), EGF depths (3,3,3,3), dims 96-192-384-768, 8 heads."""
    return HEMF(num_classes=num_classes, **variant_kwargs("hemf", kwargs, local_depths=(4, 4, 4, 4), global_depths=(3, 3, 3, 3)))


#: timm-style ``pretrained_cfg`` of the registered model (the data config of the ``hifuse`` recipe)
default_cfgs = {"hemf": dict(HEMF.data_cfg(), architecture="hemf")}
