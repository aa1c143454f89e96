"""``create_model`` / ``list_models``: the model registry."""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import typing
from typing import Callable, Dict, List, Optional

import torch.nn as nn

_MODELS: Dict[str, Callable[..., nn.Module]] = {}
_MODEL_MODULES = ("hifuse", "hemf", "hatr")
_loaded = False


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a model factory under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def _load() -> None:
    global _loaded
    if _loaded:
        return
    for name in _MODEL_MODULES:
        importlib.import_module(f"{__package__}.{name}")
    _loaded = True


def default_cfg(name: str) -> Dict[str, object]:
    """The timm-style ``pretrained_cfg`` registered for ``name`` (its module's ``default_cfgs``, as in timm)."""
    _load()
    if name not in _MODELS:
        raise ValueError(f"default_cfg: unknown model {name!r}; available: {', '.join(sorted(_MODELS))}")
    return dict(importlib.import_module(_MODELS[name].__module__).default_cfgs[name])


def has_official_code(name: str) -> bool:
    """Whether ``name``'s model loads checkpoints of official code (``create_model(name, pretrained_official=PATH)``):
    HiFuse and HEMF do; HATR has no official code. Read from the factory's return annotation, without building."""
    _load()
    if name not in _MODELS:
        raise ValueError(f"has_official_code: unknown model {name!r}; available: {', '.join(sorted(_MODELS))}")
    return hasattr(typing.get_type_hints(_MODELS[name]).get("return"), "load_official_state_dict")


def list_models(pattern: Optional[str] = None) -> List[str]:
    """Sorted registered model names, optionally filtered by a glob ``pattern`` (e.g. ``"hifuse*"``)."""
    _load()
    names = sorted(_MODELS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def create_model(
    name: str, num_classes: Optional[int] = None, pretrained_official: Optional[str] = None, **kwargs
) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`list_models`.
        num_classes: classifier outputs; ``None`` (the default): the model's own default, the ``num_classes`` of
            its ``pretrained_cfg`` (1000 for HiFuse and HEMF, 2 for HATR), as ``timm.create_model`` and the
            model's factory give.
        pretrained_official: path to a checkpoint of the official repository; its state_dict is
            loaded strictly through ``model.load_official_state_dict``.
        **kwargs: passed to the model's constructor.
    """
    _load()
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"create_model: unknown model {name!r}{hint} Available: {', '.join(sorted(_MODELS))}")
    if pretrained_official is not None and not has_official_code(name):  # refused before the model is built
        raise ValueError(
            f"create_model: expected pretrained_official only for a model with official code (HiFuse, HEMF: "
            f"load_official_state_dict); {name} has none, got pretrained_official={pretrained_official!r}"
        )
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = _MODELS[name](**kwargs)
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        model.pretrained_cfg["architecture"] = name
    if pretrained_official is not None:
        import torch

        sd = torch.load(pretrained_official, map_location="cpu", weights_only=True)
        for key in ("model", "state_dict"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
        model.load_official_state_dict(sd)
    return model
