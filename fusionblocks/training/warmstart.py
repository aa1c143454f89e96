"""``train --init PATH``: the weights a run starts from instead of random initialisation (fine-tuning).

Three kinds of file are taken, told apart by what they hold:

* **a fusionblocks run's** ``best.pt`` / ``last.pt`` of the same model (same ``--model``, ``--in-chans`` and model
  arguments): every weight, the classifier included when that run's classes are this run's, in the same order;
* **an official HiFuse or HEMF checkpoint** (what ``create_model(name, pretrained_official=PATH)`` loads, also
  wrapped in ``{"model": ...}`` / ``{"state_dict": ...}`` or saved under DataParallel): every weight but the
  classifier, whose classes are unknown here (for ``--in-chans 1`` the first convolutions' RGB filters are summed,
  as ``load_backbone_state_dict`` does for ResNet-50);
* **torchvision ResNet-50 weights** for ``hatr_resnet50`` (e.g. ImageNet's ``resnet50-0676ba61.pth``, downloaded by
  the user): the backbone, through ``HATR.load_backbone_state_dict``.

The parts not taken keep the model's own initialisation (the classifier, HATR's reduction, tokenizer and ViT).
Anything else is refused with what the file holds, before a single image is decoded. The file's path and SHA-256
are part of the run's configuration, so ``--resume`` with other starting weights is refused.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..models.convert import nested_state_dict
from .checkpoint import CheckpointError, _model_kwargs, load_checkpoint, weights_mismatch

__all__ = ["read_init", "apply_init", "describe_record"]

RUN, OFFICIAL, TORCHVISION = "fusionblocks run", "official checkpoint", "torchvision ResNet-50 weights"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_init(path: str | Path, config: Mapping[str, object]) -> Tuple[Dict[str, object], Dict[str, object]]:
    """Read ``--init PATH`` for the run ``config`` describes (its ``model``, ``model_kwargs``, ``in_chans``).

    Returns:
        ``(record, content)``: the record kept in the run's configuration (``path``, ``sha256``, ``kind``) and the
        file's content, for :func:`apply_init`.

    Raises:
        FileNotFoundError / CheckpointError: no file, a damaged one, or one that cannot start that model.
    """
    from ..models.registry import has_official_code

    model_name = config["model"]
    path = Path(path).expanduser().resolve()
    ckpt = load_checkpoint(path, require=())
    if all(k in ckpt for k in ("model", "config", "classes")):
        kind = RUN
        saved = ckpt["config"].get("model")
        if saved != model_name:
            raise CheckpointError(f"train --init: {path} is a fusionblocks run of {saved}; expected one of {model_name} "
                                  f"(the model this run trains)")
        if _model_kwargs(ckpt["config"]) != _model_kwargs(config):
            raise CheckpointError(f"train --init: {path} is a run of {model_name} with model arguments "
                                  f"{_model_kwargs(ckpt['config'])}; this run's are {_model_kwargs(config)}")
    elif has_official_code(model_name):
        kind = OFFICIAL
    elif model_name == "hatr_resnet50":
        kind = TORCHVISION
    else:
        raise CheckpointError(f"train --init: {path} is not a fusionblocks run (no 'model', 'config' and 'classes' "
                              f"entries), and {model_name} starts only from one ({model_name} has no official code "
                              f"and no backbone weights to load)")
    if kind != RUN and not all(isinstance(v, torch.Tensor) for v in nested_state_dict(ckpt).values()):
        raise CheckpointError(f"train --init: {path} holds no state_dict (entries {sorted(map(str, ckpt))[:6]}); "
                              f"expected a fusionblocks run, or the {kind} for {model_name}")
    return {"path": str(path), "sha256": _sha256(path), "kind": kind}, ckpt


def describe_record(record: Optional[Mapping[str, object]]) -> Optional[str]:
    """One line for a run's ``init`` record (``None``: random initialisation)."""
    if not record:
        return None
    return f"{record['kind']} {record['path']} (sha256 {str(record['sha256'])[:12]})"


def _said(e: BaseException) -> str:
    return " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())[:400]


def _load_all_but_classifier(model: nn.Module, state: Mapping[str, torch.Tensor], keep_classifier: bool,
                             where: str) -> None:
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    if not keep_classifier and classifier is None:
        raise CheckpointError(f"train --init: {where}: the classes differ, and {type(model).__name__} does not name its "
                              f"classifier (pretrained_cfg['classifier']) to start it anew")
    if not keep_classifier:  # the model's own, freshly initialised classifier
        own = model.state_dict()
        state = {**{k: v for k, v in state.items() if not k.startswith(f"{classifier}.")},
                 **{k: v for k, v in own.items() if k.startswith(f"{classifier}.")}}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"train --init: {where}: weights do not fit: {weights_mismatch(model, state, e)}") from None


def apply_init(model: nn.Module, record: Mapping[str, object], content: Mapping[str, object],
               config: Mapping[str, object], classes: Sequence[str]) -> str:
    """Load the weights :func:`read_init` read into a freshly built ``model`` of the run ``config`` describes.

    Returns:
        a sentence saying what was taken.
    """
    from ..models.registry import create_model

    where, kind = record["path"], record["kind"]
    name = config["model"]
    if kind == RUN:
        same = list(content["classes"]) == list(classes)
        _load_all_but_classifier(model, content["model"], same, where)
        return (f"started from {where} ({kind}, epoch {content.get('epoch', '?')}): every weight"
                + ("" if same else f" but the classifier (that run's classes {list(content['classes'])} are not "
                                   f"this run's)"))
    if kind == OFFICIAL:
        # built as the official code builds it, RGB, and without a classifier (the official one's is dropped)
        donor = create_model(name, num_classes=0, **{**_model_kwargs(config), "in_chans": 3})
        try:
            donor.load_official_state_dict(nested_state_dict(content))
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"train --init: {where}: {_said(e)}") from None
        state, gray = donor.state_dict(), config.get("in_chans", 3) == 1
        if gray:  # a gray image replicated to RGB gives the same first-conv outputs as the summed filters
            firsts = model.pretrained_cfg["first_conv"]
            for conv in (firsts,) if isinstance(firsts, str) else firsts:
                state[f"{conv}.weight"] = state[f"{conv}.weight"].sum(1, keepdim=True)
        _load_all_but_classifier(model, state, False, where)
        return (f"started from {where} ({kind}): every weight but the classifier (the official classes are unknown)"
                + ("; the first convolutions' RGB filters summed for 1-channel input" if gray else ""))
    try:
        model.load_backbone_state_dict(dict(nested_state_dict(content)))
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"train --init: {where} as {kind}: {_said(e)}") from None
    return f"started from {where} ({kind}) in the backbone; the rest starts from random initialisation"
