"""Datasets for training and evaluation: an ImageFolder tree read with Pillow, and a synthetic set.

Layouts accepted by :func:`load_splits`:

* ``root/{train,val,test}/<class>/*.png|jpg|...`` — splits as given (``test`` optional; without ``val``,
  a seeded fraction of ``train`` becomes ``val``);
* ``root/<class>/*`` — one folder, split into train/val/test with a seed (stratified per class);
* ``root = "synthetic"`` — a built-in synthetic dataset, so every command runs with no data at all;
* ``root = "PATH.npz"`` — a MedMNIST file with its official splits (:mod:`fusionblocks.training.medmnist`).

Bad data fails early with the file or folder named: an empty class folder, an unreadable image,
class lists that differ between splits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A problem with the data on disk; the message names the file or folder."""


def _list_class_dir(folder: Path) -> List[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"empty class folder: {folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def scan_folder(root: Path) -> Tuple[List[str], List[Tuple[Path, int]]]:
    """``root/<class>/*`` -> (sorted class names, [(path, label)])."""
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {root} (expected {root}/<class>/<image files>)")
    samples = [(f, i) for i, c in enumerate(classes) for f in _list_class_dir(root / c)]
    return classes, samples


def load_image(path: Path, channels: int) -> torch.Tensor:
    """Decode with Pillow into a ``(channels, H, W)`` float tensor in ``[0, 1]``; gray images are replicated."""
    if hasattr(path, "load"):  # an in-memory image, e.g. a MedMNIST .npz entry (training/medmnist.py)
        return path.load(channels)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            t = data.view(im.size[1], im.size[0], channels).permute(2, 0, 1)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"unreadable image: {path} ({e})") from e
    return t.float().div_(255.0)


class ImageFolderDataset(Dataset):
    """Samples ``(path, label)`` decoded on access and passed through ``transform(img, generator)``.

    Each item's augmentation uses a generator seeded from ``(seed, epoch, index)``, so a run is
    reproducible and a resumed run sees the same augmentations. Call :meth:`set_epoch` each epoch.
    """

    def __init__(
        self,
        samples: Sequence[Tuple[Path, int]],
        classes: Sequence[str],
        transform: Optional[Callable] = None,
        channels: int = 3,
        seed: int = 0,
    ):
        self.samples, self.classes = list(samples), list(classes)
        self.transform, self.channels, self.seed, self.epoch = transform, channels, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = load_image(path, self.channels)
        if self.transform is not None:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFFFFFF)
            img = self.transform(img, g)
        return img, label


class SyntheticDataset(Dataset):
    """A learnable toy problem: class ``c`` draws a bright disc in quadrant ``c % 4`` with ``c // 4 + 1`` rings
    on a noisy background. Deterministic per index and seed; decoded at ``size`` then transformed."""

    def __init__(self, num_samples: int, num_classes: int = 2, size: int = 64, channels: int = 3,
                 transform: Optional[Callable] = None, seed: int = 0):
        self.num_samples, self.num_classes, self.size, self.channels = num_samples, num_classes, size, channels
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.classes = [f"class_{i}" for i in range(num_classes)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = i % self.num_classes
        s = self.size
        yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        q = label % 4
        cy = (0.25 + 0.5 * (q // 2)) * s + torch.randn((), generator=g).item() * s * 0.03
        cx = (0.25 + 0.5 * (q % 2)) * s + torch.randn((), generator=g).item() * s * 0.03
        r = torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / (0.2 * s)
        rings = label // 4 + 1
        pattern = (r < 1).float() * (0.6 + 0.4 * torch.cos(math.pi * rings * r).abs())
        img = (0.2 + 0.6 * pattern + 0.1 * torch.randn(s, s, generator=g)).clamp(0, 1)
        img = img[None].expand(self.channels, s, s).clone()
        if self.transform is not None:
            tg = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFFFFFF)
            img = self.transform(img, tg)
        return img, label


@dataclass
class Splits:
    classes: List[str]
    train: List[Tuple[Path, int]]
    val: List[Tuple[Path, int]]
    test: List[Tuple[Path, int]]


def _stratified_split(samples, fractions: Sequence[float], seed: int):
    by_class: Dict[int, list] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    parts = [[] for _ in fractions]
    g = torch.Generator().manual_seed(seed)
    for label in sorted(by_class):
        items = by_class[label]
        order = torch.randperm(len(items), generator=g).tolist()
        n = len(items)
        bounds, acc = [], 0.0
        for f in fractions[:-1]:
            acc += f
            bounds.append(int(round(acc * n)))
        bounds.append(n)
        start = 0
        for p, end in zip(parts, bounds):
            p.extend(items[j] for j in order[start:end])
            start = end
    return parts


def load_splits(root: str | Path, *, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0,
                class_names: Optional[Sequence[str]] = None) -> Splits:
    """Find train/val/test samples under ``root`` (see the module docstring for the layouts; a MedMNIST
    ``.npz`` file brings its official splits, see :mod:`fusionblocks.training.medmnist`)."""
    from . import medmnist

    if medmnist.is_npz(root):
        return medmnist.load_splits(root, class_names)
    if class_names is not None:
        raise DataError(f"--class-names applies to a .npz file; the classes of {root} are its folder names")
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    present = [s for s in SPLITS if (root / s).is_dir()]
    if not present:
        classes, samples = scan_folder(root)
        train, val, test = _stratified_split(samples, (1 - val_fraction - test_fraction, val_fraction, test_fraction), seed)
        return Splits(classes, train, val, test)
    if "train" not in present:
        raise DataError(f"{root} has {present} but no train/ split")
    scanned = {s: scan_folder(root / s) for s in present}
    classes = scanned["train"][0]
    for s in present:
        if scanned[s][0] != classes:
            raise DataError(
                f"class lists differ between splits: {root / 'train'} has {classes}, {root / s} has {scanned[s][0]}"
            )
    train = scanned["train"][1]
    if "val" in scanned:
        val = scanned["val"][1]
    else:
        train, val = _stratified_split(train, (1 - val_fraction, val_fraction), seed)
    test = scanned["test"][1] if "test" in scanned else []
    return Splits(classes, train, val, test)


def class_counts(samples: Sequence[Tuple[object, int]], num_classes: int) -> List[int]:
    counts = [0] * num_classes
    for _, y in samples:
        counts[y] += 1
    return counts
