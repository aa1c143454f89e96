"""The model API every fusionblocks model shares: timm's model contract, written once as a mixin.

:class:`ModelContract` gives a model timm's interface, so it works wherever timm models do (timm's
``features_only``, ``timm.data.resolve_data_config``, ``timm.optim``, segmentation-models-pytorch's ``tu-``
encoders) and without timm alike:

- ``pretrained_cfg`` / ``default_cfg``: the input size, mean/std, interpolation and crop of the model's training
  recipe (:mod:`fusionblocks.training.recipes`), the first conv and the classifier, as timm's ``PretrainedCfg``
  fields (:func:`model_cfg`);
- ``get_classifier()``, ``reset_classifier(num_classes, global_pool=None)``;
- ``forward_intermediates(x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
  intermediates_only=True)`` and ``prune_intermediate_layers(indices=1, prune_norm=False, prune_head=True)``;
- ``group_matcher(coarse=False)`` and ``no_weight_decay()``.

A model supplies what differs between models: ``feature_info`` (one dict per level), ``classifier_name`` (the
dotted path of the final Linear), ``global_pool_type``, ``no_weight_decay_keys``, ``_run_levels`` /
``_finish_features`` (its forward split at the feature levels), ``_prune_levels`` / ``_prune_head`` and
``group_matcher``.

Feature maps cover the input: level ``i`` of stride ``s`` has ``ceil(H / s) x ceil(W / s)`` cells and cell
``(r, c)`` covers input pixels ``[r*s, (r+1)*s) x [c*s, (c+1)*s)`` (models that pad the input crop their maps of
the padded frame to this), as a strided conv net's maps do. One exception: HATR's Conv2D backbone (a 2x2 max-pool ends
each layer, see :class:`~fusionblocks.models.backbones.Conv2DBackbone`) drops a last odd row or column, so its maps have
``floor(H / s) x floor(W / s)`` cells (17x22, 8x11, 4x5 at 70x90); decoders that resize to the skips cope.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = ["ModelContract", "model_cfg", "adapt_cfg", "take_indices"]

Indices = Optional[Union[int, Sequence[int]]]


def model_cfg(
    recipe: str,
    *,
    num_classes: int,
    first_conv: str,
    classifier: str,
    input_size: Tuple[int, int, int] = (3, 224, 224),
    **extra,
) -> Dict[str, object]:
    """A timm ``pretrained_cfg`` dict whose data fields are those of the training recipe ``recipe``.

    The recipes' evaluation transform resizes the whole image to the input size (no crop, aspect not kept)
    with bilinear, antialiased interpolation: timm's ``crop_pct=1.0, crop_mode="squash",
    interpolation="bilinear"``. The recipes give one mean/std for every channel; it is repeated per channel.
    """
    from ..training.recipes import get_recipe

    r = get_recipe(recipe)
    c = input_size[0]
    return {
        "url": "",
        "num_classes": num_classes,
        "input_size": tuple(input_size),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "squash",
        "mean": tuple(float(r.mean[0]) for _ in range(c)) if len(r.mean) == 1 else tuple(r.mean),
        "std": tuple(float(r.std[0]) for _ in range(c)) if len(r.std) == 1 else tuple(r.std),
        "first_conv": first_conv,
        "classifier": classifier,
        "license": "apache-2.0",
        "notes": (f"data config of fusionblocks' {recipe!r} training recipe; no timm weights are published",),
        **extra,
    }


def adapt_cfg(cfg: Dict[str, object], in_chans: int, img_size: Optional[Sequence[int]] = None) -> Dict[str, object]:
    """``cfg`` for a model built with ``in_chans`` channels (and learned at ``img_size``): ``input_size`` and the
    per-channel mean/std follow (the recipes use one value for every channel)."""
    cfg = dict(cfg)
    c, h, w = cfg["input_size"]  # type: ignore[misc]
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    cfg["input_size"] = (in_chans, h, w)
    for key in ("mean", "std"):
        vals = tuple(cfg[key])  # type: ignore[arg-type]
        if len(vals) != in_chans:
            if len(set(vals)) != 1:
                raise ValueError(f"a per-channel {key} {vals} cannot be adapted to {in_chans} channels")
            cfg[key] = tuple(vals[0] for _ in range(in_chans))
    return cfg


def take_indices(name: str, num_levels: int, indices: Indices, strides: Sequence[int] = ()) -> Tuple[List[int], int]:
    """timm's index rule: ``None`` all levels, an int ``n`` the last ``n``, a sequence those (negative from the
    end). Returns ``(sorted absolute indices as given, max index)``; a ``ValueError`` names the model otherwise."""
    if indices is None:
        indices = num_levels
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 0 < indices <= num_levels:
            raise ValueError(f"{name}: expected the last n of {num_levels} feature levels with 1 <= n <= {num_levels}, got {indices}")
        take = list(range(num_levels - indices, num_levels))
    else:
        take = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not -num_levels <= i < num_levels:
                at = f" (strides {', '.join(str(s) for s in strides)})" if strides else ""
                raise ValueError(f"{name}: has {num_levels} feature levels{at}, got indices {tuple(indices)}")
            take.append(i % num_levels)
        if not take:
            raise ValueError(f"{name}: expected at least one feature index, got {tuple(indices)}")
    return take, max(take)


class ModelContract:
    """timm's model contract for an ``nn.Module`` (see the module docstring)."""

    classifier_name: str = "head"
    global_pool_type: str = "avg"
    no_weight_decay_keys: Tuple[str, ...] = ()
    feature_info: List[Dict[str, object]]
    num_classes: int
    num_features: int

    # -- what each model supplies ------------------------------------------------------------------------------
    def _run_levels(self, x: torch.Tensor, stop: int) -> Tuple[List[torch.Tensor], object]:
        """Feature maps of levels ``0..stop`` (covering the input, see the module docstring) and whatever
        :meth:`_finish_features` needs to continue from the last level."""
        raise NotImplementedError

    def _finish_features(self, maps: List[torch.Tensor], state: object) -> torch.Tensor:
        """``forward_features`` from the output of ``_run_levels(x, last)``."""
        raise NotImplementedError

    def _prune_levels(self, max_index: int) -> None:
        raise NotImplementedError

    def _prune_head(self, prune_norm: bool) -> None:
        raise NotImplementedError

    # -- the contract -----------------------------------------------------------------------------------------
    @property
    def _model_name(self) -> str:
        cfg = getattr(self, "pretrained_cfg", None) or {}
        return str(cfg.get("architecture") or type(self).__name__)

    def _strides(self) -> List[int]:
        return [int(f["reduction"]) for f in self.feature_info]  # type: ignore[arg-type]

    def _set_pretrained_cfg(self, cfg: Dict[str, object]) -> None:
        self.pretrained_cfg = dict(cfg)
        self.default_cfg = self.pretrained_cfg  # timm's older name for the same dict

    def get_classifier(self) -> nn.Module:
        """The final Linear (``nn.Identity`` when ``num_classes == 0``)."""
        return self.get_submodule(self.classifier_name)  # type: ignore[attr-defined]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the final Linear by a fresh one with ``num_classes`` outputs (``0``: ``nn.Identity``).

        ``global_pool``: ``None`` keeps the pooling; the model's own pooling (``global_pool_type``: ``"avg"``
        for HiFuse/HEMF, ``"token"`` for HATR's CLS readout) is accepted; other poolings raise ``ValueError``.
        """
        name = self._model_name
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"{name}: expected num_classes as an int >= 0, got {num_classes!r}")
        if global_pool not in (None, self.global_pool_type):
            raise ValueError(
                f"{name}: reset_classifier supports global_pool=None or {self.global_pool_type!r} (the model's "
                f"pooling), got {global_pool!r}"
            )
        old = self.get_classifier()
        ref = next(iter(old.parameters()), None) if isinstance(old, nn.Linear) else None
        if ref is None:
            ref = next(iter(self.parameters()), None)  # type: ignore[attr-defined]
        kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        new = nn.Linear(self.num_features, num_classes, **kw) if num_classes > 0 else nn.Identity()
        parent, _, leaf = self.classifier_name.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, leaf, new)  # type: ignore[attr-defined]
        self.num_classes = num_classes
        if getattr(self, "pretrained_cfg", None) is not None:
            self.pretrained_cfg["num_classes"] = num_classes

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Indices = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = True,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Feature maps of the levels in ``feature_info``, timm's signature.

        Args:
            x: ``(B, in_chans, H, W)``.
            indices: ``None`` all levels, an int ``n`` the last ``n``, or a sequence of levels (negative from the end).
            norm: accepted for timm; these models have no norm that applies to feature maps (their final norm
                acts after pooling), so the maps are the same either way.
            stop_early: with ``intermediates_only=False``, stop after the last level asked for and return its map
                as the final features (as timm does).
            output_fmt: ``"NCHW"`` or ``"NHWC"``.
            intermediates_only: ``True`` (the default here, and fusionblocks' form ``forward_intermediates(x)``):
                return the list of maps. ``False`` (timm's default): return ``(forward_features(x), maps)``.

        Returns:
            ``[(B, C_i, ceil(H / s_i), ceil(W / s_i))]`` (``floor`` for HATR's Conv2D backbone, see the module
            docstring) for the levels asked for, in order (NHWC when asked), or
            ``(final, maps)``.
        """
        name = self._model_name
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"{name}: expected output_fmt 'NCHW' or 'NHWC', got {output_fmt!r}")
        last = len(self.feature_info) - 1
        take, max_index = take_indices(name, last + 1, indices, self._strides())
        stop = max_index if (intermediates_only or stop_early) else last
        maps, state = self._run_levels(x, stop)
        out = [maps[i] for i in take]
        if output_fmt == "NHWC":
            out = [m.permute(0, 2, 3, 1) for m in out]
        if intermediates_only:
            return out
        final = self._finish_features(maps, state) if stop == last else maps[stop]
        return final, out

    def prune_intermediate_layers(
        self, indices: Indices = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Remove the levels after the last of ``indices`` and (``prune_head``, or when levels were removed) the
        classification head, as timm's ``features_only`` does before wrapping a model. Returns the absolute
        indices kept (negative indices are invalid afterwards)."""
        last = len(self.feature_info) - 1
        take, max_index = take_indices(self._model_name, last + 1, indices, self._strides())
        if max_index < last:
            self._prune_levels(max_index)
            self.feature_info = self.feature_info[: max_index + 1]
            self.num_features = int(self.feature_info[max_index]["num_chs"])  # type: ignore[arg-type]
        if prune_head or max_index < last:
            self._prune_head(prune_norm or max_index < last)
            self.num_classes = 0
        return take

    def no_weight_decay(self) -> set:
        """Names of the parameters timm's optimizer factory keeps out of weight decay (beside all 1-D ones)."""
        return {
            n for n, _ in self.named_parameters()  # type: ignore[attr-defined]
            if any(k in n.split(".") or n.endswith(k) for k in self.no_weight_decay_keys)
        }
