"""MedMNIST ``.npz`` files as training data, with their official train/val/test splits.

A MedMNIST 2-D file (e.g. ``dermamnist_224.npz``, ``pneumoniamnist_224.npz``; from the MedMNIST project's
Zenodo record, nothing is downloaded here) holds ``train_images``, ``val_images``, ``test_images``: uint8
``(N, H, W)`` (gray) or ``(N, H, W, 3)`` (RGB), and ``train_labels``, ``val_labels``, ``test_labels``:
integer ``(N, 1)``. Images are decoded per item like files on disk (gray replicated to 3 channels, RGB
reduced to luma for ``--in-chans 1``) and then go through the recipe's transforms, which resize to
``--image-size``.

Class names come from ``class_names`` when given, else from ``medmnist.INFO`` when the ``medmnist`` package is
importable (the file's stem, minus a ``_28/_64/_128/_224`` size suffix, names the dataset), else
``class_0 ... class_{K-1}``. Multi-label files (ChestMNIST: labels ``(N, 14)``) are rejected.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .data import DataError, Splits

SPLITS = ("train", "val", "test")
# ITU-R BT.601 luma, the weights Pillow's convert("L") uses
_LUMA = (0.299, 0.587, 0.114)

__all__ = ["is_npz", "NpzImage", "NpzDataset", "load_npz", "load_splits", "eval_samples"]


def is_npz(data: object) -> bool:
    """True when ``--data`` names a ``.npz`` file."""
    return str(data).lower().endswith(".npz")


class NpzImage:
    """One image of an in-memory array; ``load(channels)`` decodes it like :func:`fusionblocks.training.data.load_image`."""

    __slots__ = ("images", "index", "source")

    def __init__(self, images: np.ndarray, index: int, source: str):
        self.images, self.index, self.source = images, index, source

    def load(self, channels: int) -> torch.Tensor:
        """``(channels, H, W)`` float in ``[0, 1]``."""
        a = torch.from_numpy(np.ascontiguousarray(self.images[self.index])).float().div_(255.0)
        if a.dim() == 2:
            a = a[None]
        else:
            a = a.permute(2, 0, 1)
        if a.shape[0] == channels:
            return a
        if channels == 3:
            return a.expand(3, *a.shape[1:]).clone()
        w = torch.tensor(_LUMA)[:, None, None]
        return (a * w).sum(0, keepdim=True)

    def __repr__(self) -> str:
        return f"{self.source}[{self.index}]"

    def __str__(self) -> str:
        return repr(self)


class NpzDataset:
    """The validated content of a MedMNIST file: class names and ``{split: (images, labels)}``."""

    def __init__(self, path: Path, classes: List[str], arrays: Dict[str, Tuple[np.ndarray, np.ndarray]]):
        self.path, self.classes, self.arrays = path, classes, arrays

    def samples(self, split: str) -> List[Tuple[NpzImage, int]]:
        images, labels = self.arrays[split]
        src = f"{self.path.name}:{split}_images"
        return [(NpzImage(images, i, src), int(labels[i])) for i in range(len(labels))]


def _flag(path: Path) -> str:
    return re.sub(r"_(28|64|128|224)$", "", path.stem.lower())


def _info_class_names(path: Path) -> Optional[Tuple[List[str], str]]:
    """(class names, task) from ``medmnist.INFO``, or None when the package or the dataset is unknown."""
    try:
        from medmnist import INFO  # type: ignore
    except Exception:
        return None
    info = INFO.get(_flag(path))
    if not info or "label" not in info:
        return None
    labels = info["label"]
    names = [labels[str(i)] for i in range(len(labels))]
    return names, str(info.get("task", ""))


def load_npz(path: str | Path, class_names: Optional[Sequence[str]] = None) -> NpzDataset:
    """Read and validate a MedMNIST 2-D ``.npz`` file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"MedMNIST file not found: {path}")
    try:
        f = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    with f:
        want = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")]
        missing = [k for k in want if k not in f.files]
        if missing:
            raise DataError(
                f"{path}: not a MedMNIST file: missing {', '.join(missing)} (expected {', '.join(want)}; has {', '.join(f.files)})"
            )
        arrays = {s: (f[f"{s}_images"], f[f"{s}_labels"]) for s in SPLITS}
    info = _info_class_names(path)
    for split, (images, labels) in arrays.items():
        where = f"{path}: {split}_images"
        if images.dtype != np.uint8:
            raise DataError(f"{where}: expected uint8 pixels, got {images.dtype}")
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise DataError(f"{where}: expected (N, H, W) or (N, H, W, 3), got {tuple(images.shape)}")
        lw = f"{path}: {split}_labels"
        if labels.ndim == 2 and labels.shape[1] > 1:
            raise DataError(
                f"{lw}: {labels.shape[1]} labels per image (a multi-label task such as ChestMNIST); "
                "fusionblocks trains single-label classifiers: expected labels (N, 1)"
            )
        if not (labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1)):
            raise DataError(f"{lw}: expected (N, 1), got {tuple(labels.shape)}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{lw}: expected integer labels, got {labels.dtype}")
        if len(labels) != len(images):
            raise DataError(f"{path}: {split} has {len(images)} images but {len(labels)} labels")
        if len(labels) == 0 and split != "test":
            raise DataError(f"{path}: the {split} split is empty")
        arrays[split] = (images, labels.reshape(-1).astype(np.int64))
    shapes = {s: tuple(a[0].shape[1:]) for s, a in arrays.items() if len(a[0])}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{path}: image shapes differ between splits: {shapes}")
    if info is not None and info[1].startswith("multi-label"):
        raise DataError(f"{path}: {_flag(path)} is a multi-label task ({info[1]}); fusionblocks trains single-label classifiers")
    top = max(int(a[1].max()) for a in arrays.values() if len(a[1])) + 1
    low = min(int(a[1].min()) for a in arrays.values() if len(a[1]))
    if low < 0:
        raise DataError(f"{path}: negative label {low}; expected labels 0 .. K-1")
    if class_names is not None:
        classes = [str(c) for c in class_names]
        if len(set(classes)) != len(classes):
            raise DataError(f"--class-names: names repeat: {classes}")
    elif info is not None:
        classes = info[0]
    else:
        classes = [f"class_{i}" for i in range(top)]
    if top > len(classes):
        raise DataError(f"{path}: labels go up to {top - 1}, but there are only {len(classes)} class names {classes}")
    return NpzDataset(path, classes, arrays)


def load_splits(path: str | Path, class_names: Optional[Sequence[str]] = None) -> Splits:
    """The official train/val/test splits of a MedMNIST file as :class:`~fusionblocks.training.data.Splits`."""
    ds = load_npz(path, class_names)
    return Splits(ds.classes, ds.samples("train"), ds.samples("val"), ds.samples("test"))


def eval_samples(path: str | Path, split: str, classes: Sequence[str]) -> List[Tuple[NpzImage, int]]:
    """Samples of ``split`` (``auto``: test; ``all``: every split) for a checkpoint trained on ``classes``."""
    ds = load_npz(path, list(classes))
    split = "test" if split == "auto" else split
    chosen = SPLITS if split == "all" else (split,)
    if split != "all" and split not in SPLITS:
        raise DataError(f"evaluate: expected split auto, train, val, test or all, got {split!r}")
    out = [s for name in chosen for s in ds.samples(name)]
    if not out:
        raise DataError(f"evaluate: the {split} split of {path} is empty")
    return out
