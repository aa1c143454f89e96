"""``create_model`` / ``list_models``: the model registry."""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
import typing
from typing import Callable, Dict, List, Optional, Tuple

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


def _model_class(name: str) -> Optional[type]:
    """The class registered factory ``name`` builds, from its return annotation (``None`` where it names none,
    or one that does not resolve, as a user's own registered factory may): read without building."""
    try:
        cls = typing.get_type_hints(_MODELS[name]).get("return")
    except (NameError, TypeError):
        return None
    return cls if isinstance(cls, type) else None


def has_official_code(name: str) -> bool:
    """Whether ``name``'s model loads checkpoints of official code (``create_model(name, pretrained_official=PATH)``):
    HiFuse and HEMF do; HATR has no official code. Read from the factory's return annotation, without building."""
    _load()
    if name not in _MODELS:
        raise ValueError(f"has_official_code: unknown model {name!r}; available: {', '.join(sorted(_MODELS))}")
    return hasattr(_model_class(name), "load_official_state_dict")


def variant_kwargs(name: str, kwargs: Dict[str, object], **fixed) -> Dict[str, object]:
    """A registered variant's constructor arguments: what it fixes (``fixed``: HiFuse-T's depths, HATR's backbone)
    and the caller's ``kwargs``, which may not set those (``create_model("hemf", local_depths=...)`` failed with
    "got multiple values for argument"); the error says to build the class for other values."""
    clash = sorted(set(fixed) & set(kwargs))
    if clash:
        cls = _model_class(name) if name in _MODELS else None
        what = ", ".join(f"{k}={fixed[k]!r}" for k in clash)
        build = f"; for other values build {cls.__module__}.{cls.__name__}(...)" if cls is not None else ""
        raise ValueError(f"create_model: {name} is the variant with {what}, got {', '.join(f'{k}={kwargs[k]!r}' for k in clash)}"
                         f"{build}")
    return {**fixed, **kwargs}


def _constructor_kwargs(name: str, kwargs: Dict[str, object]) -> Tuple[Dict[str, object], Optional[Tuple[int, int]]]:
    """``kwargs`` less timm's generic arguments that ``name``'s constructor does not take (checked: see
    :func:`create_model`), and the ``img_size`` to state in its ``pretrained_cfg`` (``None``: the model's own).
    A name the constructor does not take is refused here, before anything is built. A factory whose arguments
    cannot be known (``**kwargs`` and no class as its return annotation, as a user's own registered model may
    be) gets ``kwargs`` as they are."""
    from .._validate import expect_size

    def named(fn) -> Tuple[set, bool]:  # the names fn takes, and whether it takes any other (**kwargs)
        params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        return ({p.name for p in params if p.kind not in variadic},
                any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params))

    # timm's generic arguments: None means not given (timm.create_model drops them so)
    kwargs = {k: v for k, v in kwargs.items() if not (k in ("global_pool", "drop_block_rate", "img_size") and v is None)}
    cls = _model_class(name)
    takes, passes_on = named(_MODELS[name])
    if passes_on:  # the factory hands the rest to its class
        if cls is None:
            return kwargs, None
        more, passes_on = named(cls.__init__)
        if passes_on:
            return kwargs, None
        takes |= more
    img_size = None
    if "global_pool" not in takes and "global_pool" in kwargs:
        own = getattr(cls, "global_pool_type", None)
        if kwargs["global_pool"] != own:
            raise ValueError(f"create_model: {name} pools its features with {own!r}; expected global_pool None or "
                             f"{own!r}, got {kwargs['global_pool']!r}")
        del kwargs["global_pool"]
    if "drop_block_rate" not in takes and "drop_block_rate" in kwargs:
        if kwargs["drop_block_rate"] != 0:
            raise ValueError(f"create_model: {name} has no DropBlock layers; expected drop_block_rate None or 0, "
                             f"got {kwargs['drop_block_rate']!r} (drop_path_rate sets its stochastic depth)")
        del kwargs["drop_block_rate"]
    if "img_size" not in takes and "img_size" in kwargs:
        img_size = expect_size(name, "img_size", kwargs.pop("img_size"))
    unknown = sorted(set(kwargs) - takes)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(takes), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"create_model: {name} takes no argument {unknown[0]!r}{hint}; it takes "
                         f"{', '.join(sorted(takes))}")
    return kwargs, img_size


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
        **kwargs: passed to the model's constructor. timm's generic model arguments are taken for every model,
            as ``timm.create_model`` (and its ``train.py``) pass them: ``global_pool`` (``None`` or the model's
            own pooling, ``"avg"``), ``drop_block_rate`` (``None`` or 0: no model has DropBlock) and, for a model
            whose size is not a constructor argument (HiFuse, HEMF run at any size), ``img_size``: the
            ``input_size`` its ``pretrained_cfg`` states. Any other name the constructor does not take is a
            ``ValueError`` listing those it does.
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
    kwargs, img_size = _constructor_kwargs(name, kwargs)
    model = _MODELS[name](**kwargs)
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        if img_size is not None:
            from .contract import adapt_cfg

            model._set_pretrained_cfg(adapt_cfg(model.pretrained_cfg, model.pretrained_cfg["input_size"][0], img_size))
        model.pretrained_cfg["architecture"] = name
    if pretrained_official is not None:
        import torch

        from .convert import nested_state_dict

        model.load_official_state_dict(nested_state_dict(torch.load(pretrained_official, map_location="cpu",
                                                                    weights_only=True)))
    return model
