"""Checkpoint files of a training run: what they hold, how they are written, how they are read back.

Two files, two purposes:

* ``best.pt`` — what inference needs: ``{"kind": "inference", "version", "model" (state_dict), "config",
  "classes", "preprocessing", "epoch", "val"}``. Read it with :func:`load_inference`, which rebuilds the model.
* ``last.pt`` — what ``--resume`` needs: the same entries plus ``"optimizer"``, ``"scheduler"``, ``"scaler"``,
  ``"history"``, ``"best_metric"``, ``"best_epoch"``, ``"best_val_predictions"`` and ``"rng"`` (torch, CUDA,
  NumPy and Python random states), with ``"kind": "resume"``.

Every write is atomic (a temporary ``.NAME.tmpPID`` beside the file, then a rename), so a kill leaves either the
old or the new file, never half of one; temporaries of dead processes are removed by :func:`remove_stale_temporaries`.
A damaged, truncated or empty file gives a :class:`CheckpointError` naming the path and what to use instead.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

CHECKPOINT_VERSION = 2
_TMP = re.compile(r"^\..+\.tmp(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the alternative."""


class SimulatedCrash(BaseException):
    """Raised by :func:`crash_point` (tests only); a BaseException so that nothing on the way catches it."""


CRASH_ENV = "FUSIONBLOCKS_TEST_CRASH_AT"


def crash_point(name: str, epoch: Optional[int] = None) -> None:
    """Test hook: die at the named point of the end-of-epoch sequence.

    ``FUSIONBLOCKS_TEST_CRASH_AT="POINT"`` or ``"POINT@EPOCH"`` (1-based) selects the point; with
    ``FUSIONBLOCKS_TEST_CRASH_MODE=exit`` the process ends at once with ``os._exit(86)`` (like a kill: nothing is
    cleaned up), otherwise :class:`SimulatedCrash` is raised. Unset, this does nothing.
    """
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, at = spec.partition("@")
    if point != name or (at and epoch is not None and int(at) != epoch):
        return
    if os.environ.get("FUSIONBLOCKS_TEST_CRASH_MODE") == "exit":
        os._exit(86)
    raise SimulatedCrash(f"simulated crash at {spec}")


def atomic_write(path: Path, write: Callable[[Path], None], epoch: Optional[int] = None) -> None:
    """``write(tmp)`` into ``.NAME.tmpPID`` beside ``path``, then rename it over ``path`` (the temporary is
    removed if ``write`` fails)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        crash_point(f"{path.name}:written", epoch)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path: Path, payload: Dict[str, object], epoch: Optional[int] = None) -> int:
    """Write ``payload`` atomically with ``torch.save``; returns the file size in bytes."""
    atomic_write(path, lambda tmp: torch.save(payload, tmp), epoch)
    return Path(path).stat().st_size


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def remove_stale_temporaries(folder: Path) -> List[Path]:
    """Delete ``.NAME.tmpPID`` files left in ``folder`` by processes that no longer run; returns them."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        if m and p.is_file() and not _pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _alternative(path: Path) -> str:
    if path.name == "best.pt":
        return f"use {path.with_name('last.pt')} (the same run's latest epoch) or train again"
    if path.name == "last.pt":
        return (f"evaluate {path.with_name('best.pt')} instead, or start the run fresh with "
                f"`fusionblocks train ... --out {path.parent} --overwrite`")
    return "use another checkpoint of the run (best.pt or last.pt) or train again"


def foreign_file(path: Path) -> Optional[str]:
    """What ``path`` is when its name says it is not a checkpoint (an exported model, an image), else None."""
    from .data import IMAGE_EXTENSIONS

    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return (f"{path}: an ONNX model (from `fusionblocks export`), not a training checkpoint; run it with "
                f"`fusionblocks predict --onnx {path}`, or give the run's best.pt or last.pt")
    if suffix == ".pt2":
        return (f"{path}: a torch.export program (from `fusionblocks export --format pt2`), not a training "
                "checkpoint; load it with torch.export.load, or give the run's best.pt or last.pt")
    if suffix in IMAGE_EXTENSIONS:
        return f"{path}: an image, not a training checkpoint; images go to --input, the checkpoint is the run's best.pt or last.pt"
    return None


def load_checkpoint(path: str | Path, *, require: tuple = ("model", "config", "classes")) -> Dict[str, object]:
    """Read a fusionblocks checkpoint on the CPU (``weights_only``), with readable errors.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: empty, truncated or damaged file, or not a fusionblocks checkpoint (an exported model or
            an image by its suffix, or lacks ``require``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    foreign = foreign_file(path)
    if foreign is not None:
        raise CheckpointError(foreign)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty checkpoint file (0 bytes); {_alternative(path)}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch/zip/pickle raise many types for a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: damaged or truncated checkpoint ({size} bytes; {type(e).__name__}: {first[:200]}); "
            f"{_alternative(path)}"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a fusionblocks checkpoint (holds a {type(ckpt).__name__}); {_alternative(path)}")
    missing = [k for k in require if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path}: not a fusionblocks checkpoint of this kind (no {', '.join(repr(k) for k in missing)} entry); "
            f"{_alternative(path)}"
        )
    return ckpt


def _model_kwargs(cfg: Dict[str, object]) -> Dict[str, object]:
    kw = dict(cfg.get("model_kwargs") or {})
    if cfg.get("in_chans", 3) != 3:
        kw.setdefault("in_chans", cfg["in_chans"])
    return kw


def weights_mismatch(model: nn.Module, state_dict: Dict[str, torch.Tensor], error: RuntimeError) -> str:
    """What ``model.load_state_dict(state_dict)`` refused (``error``), in one line: the number of missing and
    unexpected keys and of shape mismatches, each with its first few names (torch's message lists every key,
    tens of kilobytes for another model's weights)."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state_dict]
    unexpected = [k for k in state_dict if k not in ours]
    shapes = [f"{k} {tuple(state_dict[k].shape)} in the weights, {tuple(ours[k].shape)} in the model" for k in ours
              if k in state_dict and tuple(state_dict[k].shape) != tuple(ours[k].shape)]
    parts = [f"{what} ({len(names)}): {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
             for what, names in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("shape mismatches", shapes)) if names]
    if not parts:  # refused by a module's own loading rules: torch's first lines say why
        lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
        parts = [" ".join(lines[:3])[:500]]
    return "; ".join(parts)


def model_from_checkpoint(ckpt: Dict[str, object], path: Optional[Path] = None) -> nn.Module:
    """Build the model named in a checkpoint's config and load its weights (strict)."""
    from ..models.registry import create_model

    cfg = ckpt["config"]
    model = create_model(cfg["model"], num_classes=len(ckpt["classes"]), **_model_kwargs(cfg))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        where = f"{path}: " if path else ""
        raise CheckpointError(f"{where}weights do not fit model {cfg['model']!r}: "
                              f"{weights_mismatch(model, ckpt['model'], e)}") from None
    return model


def preprocessing_of(config: Dict[str, object], mean, std) -> Dict[str, object]:
    """The preprocessing an inference checkpoint records: enough to turn an image file into a model input."""
    return {
        "image_size": int(config["image_size"]), "in_chans": int(config["in_chans"]),
        "mean": list(mean), "std": list(std),
        "resize": "bilinear, antialiased, to image_size x image_size",
        "scaling": "pixel / full scale of the file's dtype (255, 65535, 2**BitsStored - 1) -> [0, 1]",
    }


def recorded_preprocessing(ckpt: Dict[str, object]) -> Dict[str, object]:
    """The checkpoint's ``preprocessing`` entry; for checkpoints written before it was recorded, the one their
    recipe gives (``hifuse`` when the config names none). Evaluate, predict and export all read it here."""
    pre = ckpt.get("preprocessing")
    if pre is None:
        from .recipes import get_recipe

        cfg = ckpt["config"]
        r = get_recipe(cfg.get("recipe") or "hifuse")
        pre = preprocessing_of({"image_size": cfg.get("image_size", 224), "in_chans": cfg.get("in_chans", 3)},
                               r.mean, r.std)
    return dict(pre)


def recorded_epoch(ckpt: Dict[str, object]) -> int:
    """The 1-based epoch a checkpoint was written after: version-2 checkpoints store it as such, older ones the
    0-based one. Evaluate, predict and export all read it here."""
    return int(ckpt.get("epoch", -1)) + (1 if int(ckpt.get("version", 1)) < 2 else 0)


@dataclass
class InferenceCheckpoint:
    """What :func:`load_inference` returns.

    Attributes:
        model: the model in eval mode on the CPU, weights loaded.
        config: the training configuration (``TrainConfig`` fields, resolved: recipe, epochs, batch size, lr...).
        classes: class names; output ``i`` of the model is ``classes[i]``.
        preprocessing: ``image_size``, ``in_chans``, ``mean``, ``std`` (plus descriptions of resize and scaling).
        epoch: the (1-based) epoch the weights come from.
        path: the file read.
    """

    model: nn.Module
    config: Dict[str, object]
    classes: List[str]
    preprocessing: Dict[str, object]
    epoch: int
    path: Path

    def transform(self):
        """The evaluation pipeline ``(C, H, W) in [0, 1] -> normalized (C, image_size, image_size)``."""
        from .transforms import Compose, Normalize, Resize

        p = self.preprocessing
        return Compose([Resize(p["image_size"]), Normalize(p["mean"], p["std"])])

    def load_image(self, path: str | Path) -> torch.Tensor:
        """Decode an image file and preprocess it: ``-> (in_chans, image_size, image_size)`` model input."""
        from .data import load_image

        return self.transform()(load_image(Path(path), self.preprocessing["in_chans"]))


def load_inference(path: str | Path) -> InferenceCheckpoint:
    """Load ``best.pt`` (or ``last.pt``) of a run for inference: model + config + classes + preprocessing.

    Checkpoints written before preprocessing was recorded get it from their recipe.
    """
    path = Path(path)
    ckpt = load_checkpoint(path)
    cfg = dict(ckpt["config"])
    pre = recorded_preprocessing(ckpt)
    model = model_from_checkpoint(ckpt, path).eval()
    return InferenceCheckpoint(model, cfg, list(ckpt["classes"]), dict(pre), recorded_epoch(ckpt), path)


def file_size_str(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
