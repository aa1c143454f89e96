"""``features_only`` views of fusionblocks models, and their registration in timm when timm is importable.

Every fusionblocks model offers ``forward_intermediates(x)`` (a list of NCHW maps, strides 4/8/16/32)
and ``feature_info`` (``[{"num_chs", "reduction", "module"}, ...]``). :class:`FeatureExtractor` turns
one into an encoder whose ``forward`` returns the selected maps, as timm's ``features_only=True`` does.

With timm installed, ``import fusionblocks`` registers every model in timm's registry, so
``timm.create_model("hifuse_tiny", features_only=True, out_indices=(1, 2, 3))`` works.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
from typing import Dict, List, Sequence

import torch
import torch.nn as nn

__all__: List[str] = ["FeatureExtractor", "register_with_timm"]


def _feature_info_object(info: List[dict], out_indices: Sequence[int]):
    try:
        from timm.models._features import FeatureInfo
    except ImportError:
        return [dict(info[i]) for i in out_indices]
    return FeatureInfo(info, tuple(out_indices))


class FeatureExtractor(nn.Module):
    """Wrap a model so ``forward(x)`` returns ``[intermediates[i] for i in out_indices]``.

    The model runs up to the deepest level asked for, no further. Its later levels, final norm and classifier
    stay in it (the model is still whole) but get no gradient; ``prune=True`` removes them, as timm's
    ``features_only=True`` does, so that every parameter of the encoder trains (``DistributedDataParallel``
    refuses parameters without a gradient unless ``find_unused_parameters=True``).

    Args:
        model: a fusionblocks model (``forward_intermediates`` + ``feature_info``).
        out_indices: which of the model's feature levels to return (negative indices count from the end).
        prune: remove, in place, what the selected levels do not use (``model.prune_intermediate_layers``): the
            model then serves only as this encoder.

    ``feature_info`` is timm's ``FeatureInfo`` when timm is importable (``.channels()``,
    ``.reduction()``), else a list of dicts for the selected levels.
    """

    def __init__(self, model: nn.Module, out_indices: Sequence[int] = (0, 1, 2, 3), *, prune: bool = False):
        super().__init__()
        name = type(model).__name__
        if not hasattr(model, "forward_intermediates") or not getattr(model, "feature_info", None):
            raise TypeError(f"FeatureExtractor: expected a model with forward_intermediates and feature_info, got {name}")
        n = len(model.feature_info)
        idx = []
        for i in out_indices:
            if not -n <= i < n:
                raise ValueError(f"FeatureExtractor: {name} has {n} feature levels, got out_indices {tuple(out_indices)}")
            idx.append(i % n)
        info = list(model.feature_info)
        if prune:
            if not hasattr(model, "prune_intermediate_layers"):
                raise TypeError(f"FeatureExtractor: prune=True needs a model with prune_intermediate_layers, got {name}")
            model.prune_intermediate_layers(sorted(set(idx)), prune_norm=True, prune_head=True)
        self.model = model
        self.out_indices = tuple(idx)
        self.feature_info = _feature_info_object(info, self.out_indices)
        # timm's signature (every fusionblocks model) runs only up to the deepest level asked for
        self._levels = sorted(set(idx)) if "indices" in inspect.signature(model.forward_intermediates).parameters else None

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self._levels is None:
            feats = self.model.forward_intermediates(x)
        else:  # the levels asked for, in order
            feats = dict(zip(self._levels, self.model.forward_intermediates(x, indices=self._levels)))
        return [feats[i] for i in self.out_indices]


def _no_weights_message(name: str) -> str:
    """What ``timm.create_model(name, pretrained=True)`` without a weights file says: no timm weights, and where
    weights can come from."""
    from .registry import has_official_code

    own = (f"weights you trained load with timm.create_model({name!r}, checkpoint_path=PATH), or with pretrained=True, "
           "pretrained_cfg_overlay=dict(file=PATH) (timm's train.py --pretrained-path: every weight but the classifier)")
    if has_official_code(name):
        where = f"load an official checkpoint with fusionblocks.create_model({name!r}, pretrained_official=PATH); {own}"
    else:
        where = f"{name} has no official code or checkpoint (the paper is the spec); {own}"
        if name == "hatr_resnet50":
            where += "; torchvision's ResNet-50 weights load into its backbone with model.load_backbone_state_dict(sd)"
    return f"{name}: fusionblocks publishes no timm weights; {where} (with smp: encoder_weights=None)"


def _names_weights(name: str, kwargs: Dict[str, object]) -> bool:
    """Whether the caller's ``pretrained_cfg`` / ``pretrained_cfg_overlay`` name weights for timm to load (``file``,
    ``url``, ``hf_hub_id`` or ``state_dict``: timm's train.py ``--pretrained-path`` sets ``file``)."""
    from timm.models import resolve_pretrained_cfg

    cfg = resolve_pretrained_cfg(name, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"))
    return bool(cfg.has_weights or cfg.state_dict)


def _checkpoint_filter(state_dict: Dict[str, torch.Tensor], model: nn.Module, strict: bool = True) -> Dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn`` (``pretrained=True`` with a weights file): refuse (``strict``; timm's
    ``pretrained_strict=False`` turns it off) a file that lacks any of the model's weights but the classifier. timm
    itself loads what matches and leaves the rest at random init, saying so only in a log (every weight, with an
    official HiFuse/HEMF checkpoint, whose names differ).

    An RGB file's first convs are adapted to the model's ``in_chans`` as timm adapts its own models' (``in_chans=1``
    sums the RGB filters): timm reads the file's channels from ``pretrained_cfg["input_size"]``, which states the
    model's channels here (its data config), and refused the file."""
    from timm.models import adapt_input_conv

    convs = model.pretrained_cfg.get("first_conv") or ()
    for conv in (convs,) if isinstance(convs, str) else convs:
        key, chans = conv + ".weight", model.get_submodule(conv).in_channels
        if key in state_dict and state_dict[key].dim() == 4 and state_dict[key].shape[1] == 3 != chans:
            state_dict[key] = adapt_input_conv(chans, state_dict[key])
    if not strict:
        return state_dict
    ours = model.state_dict()
    head = model.classifier_name + "."
    missing = [k for k in ours if k not in state_dict and not k.startswith(head) and not k.endswith("num_batches_tracked")]
    if missing:
        name = model._model_name
        hint = (f" (a checkpoint of the official code loads with fusionblocks.create_model({name!r}, "
                "pretrained_official=PATH))" if hasattr(model, "load_official_state_dict") else "")
        raise ValueError(f"{name}: expected a weights file with every weight of the model but the classifier, got one "
                         f"without {len(missing)} of them: {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}"
                         f"{hint}")
    return state_dict


def _timm_entrypoint(name: str):
    from .registry import create_model, default_cfg

    def build(**kwargs) -> nn.Module:
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        stride = kwargs.pop("output_stride", None)
        if stride not in (None, 32):
            raise ValueError(f"{name}: expected output_stride 32 (no dilated variant exists), got {stride}")
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = create_model(name, **kwargs)
        return model if dtype is None else model.to(dtype=dtype)

    def entry(pretrained: bool = False, **kwargs):
        from timm.models import build_model_with_cfg

        from .contract import adapt_cfg

        if kwargs.get("pretrained_cfg") is None:  # this model's cfg for the channels/size asked for
            kwargs["pretrained_cfg"] = adapt_cfg(default_cfg(name), kwargs.get("in_chans", 3), kwargs.get("img_size"))
        if pretrained and not _names_weights(name, kwargs):  # weights the caller names are loaded by timm
            raise ValueError(_no_weights_message(name))
        # features_only: timm's FeatureGetterNet prunes the model to the levels asked for (all by default)
        # and returns forward_intermediates(x, indices=..., intermediates_only=True)
        check = functools.partial(_checkpoint_filter, strict=kwargs.get("pretrained_strict", True))
        return build_model_with_cfg(build, name, pretrained, pretrained_filter_fn=check,
                                    feature_cfg={"feature_cls": "getter", "out_indices": None}, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"fusionblocks {name} (see fusionblocks.create_model)."
    return entry


#: read by timm's ``register_model`` (it looks up ``default_cfgs`` in the entry point's module), so that
#: ``timm.models.get_pretrained_cfg(name)`` gives each model's data config
default_cfgs: Dict[str, Dict[str, object]] = {}


def register_with_timm() -> List[str]:
    """Register every fusionblocks model with timm (if timm is installed); returns the names registered."""
    if importlib.util.find_spec("timm") is None:
        return []
    from timm.models import is_model, register_model

    from .registry import default_cfg, list_models

    done = []
    for name in list_models():
        if not is_model(name):
            default_cfgs[name] = default_cfg(name)
            register_model(_timm_entrypoint(name))
            done.append(name)
    return done
