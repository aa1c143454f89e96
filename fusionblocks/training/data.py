"""Datasets for training and evaluation: an ImageFolder tree read with Pillow, and a synthetic set.

Layouts accepted by :func:`load_splits`:

* ``root/{train,val,test}/<class>/*.png|jpg|...`` — splits as given (``test`` optional; without ``val``,
  a seeded fraction of ``train`` becomes ``val``);
* ``root/<class>/*`` — one folder, split into train/val/test with a seed (stratified per class);
* ``root = "synthetic"`` — a built-in synthetic dataset, so every command runs with no data at all;
* ``root = "PATH.npz"`` — a MedMNIST file with its official splits (:mod:`fusionblocks.training.medmnist`).

Images are decoded at their stored bit depth (8- and 16-bit gray; 8-bit RGB, RGBA, palette, CMYK; 16-bit
RGB, RGBA and gray+alpha PNG, through :mod:`.png16` since Pillow reads those at 8 bits; DICOM when pydicom
is importable) and scaled to ``[0, 1]`` by their dtype's range (see :func:`decode_image`). Other 16-bit
colour files that Pillow can only read at 8 bits per channel (16-bit RGB TIFF) are refused, never truncated.

Bad data fails early with the file or folder named: an empty class folder, class lists that differ between
splits, and (:func:`check_images`, run before the first training step) every unreadable image of every split,
all listed in one error.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from . import png16

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm")
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A problem with the data on disk; the message names the file or folder."""


def hidden_name(name: str) -> bool:
    """Dot-files and dot-folders: .DS_Store, macOS AppleDouble ``._name.png`` files, .ipynb_checkpoints (not
    images; training and ``predict`` leave them out alike)."""
    return name.startswith(".")


def _hidden(p: Path) -> bool:
    return hidden_name(p.name)


def _is_image_file(p: Path) -> bool:
    return not _hidden(p) and p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def _list_class_dir(folder: Path, skipped: Optional[List[Path]] = None) -> List[Path]:
    files, nested = [], []
    for p in sorted(folder.iterdir()):
        if _hidden(p):
            continue
        if p.is_dir():
            if any(_is_image_file(f) for f in p.rglob("*")):
                nested.append(p.name)
        elif _is_image_file(p):
            files.append(p)
        elif skipped is not None:  # another file type (.gif, .txt), or a broken link
            skipped.append(p)
    if nested:
        raise DataError(f"{folder} holds sub-folders with images ({', '.join(nested)}), which would be left out: "
                        f"put the images directly in the class folder ({folder}/<image>), or make each sub-folder a "
                        f"class of its own")
    if not files:
        raise DataError(f"empty class folder: {folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def scan_folder(root: Path, skipped: Optional[List[Path]] = None) -> Tuple[List[str], List[Tuple[Path, int]]]:
    """``root/<class>/*`` -> (sorted class names, [(path, label)]).

    Hidden files and folders are ignored; images in sub-folders of a class folder are an error, not left out
    unsaid; the other files left out (not of a type in ``IMAGE_EXTENSIONS``) are added to ``skipped``."""
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not _hidden(p))
    if not classes:
        raise DataError(f"no class folders in {root} (expected {root}/<class>/<image files>)")
    samples = [(f, i) for i, c in enumerate(classes) for f in _list_class_dir(root / c, skipped)]
    return classes, samples


# ------------------------------------------------------------------------------------- decoding images

# Pillow modes read at their stored bit depth -> (numpy dtype the pixels are read as, the value that means "white")
_INT_MODES = {"L": 255, "LA": 255, "RGB": 255, "RGBA": 255, "I;16": 65535, "I;16L": 65535, "I;16B": 65535,
              "I;16N": 65535}
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, what Pillow's convert("L") uses


def _truncating_rawmode(im) -> Optional[str]:
    """The raw mode of a Pillow image whose 16-bit colour samples Pillow would decode to 8 bits, else ``None``."""
    if im.mode not in ("RGB", "RGBA", "LA", "RGBX"):
        return None
    for tile in getattr(im, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None
        raw = args[0] if isinstance(args, tuple) and args else args
        if isinstance(raw, str) and ";16" in raw:
            return raw
    return None


def _decode_pillow(path: Path):
    """-> ``(H, W, C)`` numpy array and the full-scale value of its dtype (``None`` for float images)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        raw16 = _truncating_rawmode(im)
        if raw16:
            raise ValueError(f"{im.format or 'this'} image with 16 bits per colour channel ({raw16}): Pillow reads "
                             f"it at 8 bits per channel, which would silently drop the low byte; save it as a "
                             f"16-bit PNG (read at full depth) or convert it to 8 bit")
        im.load()  # decodes the whole file: truncated data fails here, not mid-epoch
        mode = im.mode
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif mode == "PA":
            im = im.convert("RGBA")
        elif mode == "1":
            im = im.convert("L")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"):
            im = im.convert("RGB")
        elif mode == "I":
            # 32-bit integer storage: Pillow's way of holding 16-bit PNG/TIFF data on some versions
            bits = int(im.info.get("bits", 0)) or (16 if getattr(im, "format", "") in ("PNG", "TIFF") else 32)
            arr = np.asarray(im, dtype=np.int64)
            return arr[..., None].clip(0, None), float(2**bits - 1)
        mode = im.mode
        if mode == "F":
            return np.asarray(im, dtype=np.float32)[..., None], None
        if mode not in _INT_MODES:
            raise ValueError(f"unsupported Pillow image mode {mode!r}")
        arr = np.asarray(im)
    if arr.ndim == 2:
        arr = arr[..., None]
    if mode.startswith("I;16") and arr.dtype != np.uint16:
        arr = arr.astype(np.uint16)
    return arr, float(_INT_MODES[mode])


def _decode_dicom(path: Path):
    try:
        import pydicom
    except ImportError:
        raise ValueError("DICOM files need pydicom (pip install pydicom)") from None
    import numpy as np

    ds = pydicom.dcmread(str(path))
    arr = np.asarray(ds.pixel_array)
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        raise ValueError(f"multi-frame DICOM ({arr.shape[0]} frames) is not a 2-D image")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.dtype.kind == "f":
        return arr.astype(np.float32), None
    bits = int(getattr(ds, "BitsStored", arr.dtype.itemsize * 8))
    signed = int(getattr(ds, "PixelRepresentation", 0)) == 1
    if signed:  # shift signed storage into [0, 2**bits - 1]
        arr = arr.astype(np.int64) + 2 ** (bits - 1)
    full = float(2**bits - 1)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":  # white is 0
        arr = full - arr.astype(np.float64)
    return arr, full


def decode_image(path: str | Path):
    """Decode an image file at its stored bit depth.

    Returns ``(array, full_scale)``: an ``(H, W, C)`` numpy array (C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA)
    and the value of its dtype's white (255 for 8-bit, 65535 for 16-bit, ``2**BitsStored - 1`` for DICOM;
    ``None`` for float images, which are taken as they are). Palette images become RGB(A), CMYK and other
    colour spaces RGB, 1-bit images 8-bit gray. 16-bit RGB, RGBA and gray+alpha PNGs, which Pillow reads at
    8 bits per channel, are decoded at 16 bits by :mod:`.png16`; other files with 16-bit colour samples
    that Pillow would truncate (16-bit RGB TIFF) are refused with a ``ValueError`` that says so. Raises
    ``ValueError``/``OSError`` on a bad file.
    """
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return _decode_dicom(path)
    if png16.wants_png16(path):  # Pillow would read these at 8 bits per channel
        return png16.decode_png16(path)
    return _decode_pillow(path)


def image_to_tensor(arr, full_scale: Optional[float], channels: int) -> torch.Tensor:
    """``(H, W, C)`` array -> ``(channels, H, W)`` float32 in ``[0, 1]`` (scaled by ``full_scale``).

    Alpha is dropped; colour becomes gray by ITU-R 601 luma for ``channels=1``; gray is replicated for 3.
    """
    import numpy as np

    a = np.asarray(arr)
    c = a.shape[-1]
    if c in (2, 4):  # drop alpha
        a, c = a[..., : c - 1], c - 1
    t = torch.from_numpy(np.ascontiguousarray(a).astype(np.float32, copy=False)).permute(2, 0, 1)
    if full_scale is not None:
        t = t / full_scale
    t = t.clamp(0.0, 1.0) if full_scale is not None else t
    if channels == 1 and c == 3:
        t = (t * torch.tensor(_LUMA, dtype=t.dtype)[:, None, None]).sum(0, keepdim=True)
    elif channels == 3 and c == 1:
        t = t.expand(3, -1, -1)
    elif channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return t.contiguous()


def load_image(path: Path, channels: int) -> torch.Tensor:
    """Decode into a ``(channels, H, W)`` float32 tensor in ``[0, 1]`` at the file's real bit depth."""
    if hasattr(path, "load"):  # an in-memory image, e.g. a MedMNIST .npz entry (training/medmnist.py)
        return path.load(channels)
    try:
        arr, full = decode_image(path)
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"unreadable image: {path} ({e})") from e
    return image_to_tensor(arr, full, channels)


def _check_one(path: Path) -> Optional[str]:
    if hasattr(path, "load"):  # in memory: decoded already
        return None
    try:
        if path.stat().st_size == 0:
            return "empty file"
        arr, _ = decode_image(path)
        if arr.shape[0] < 1 or arr.shape[1] < 1:
            return f"zero-size image {arr.shape[:2]}"
    except Exception as e:  # any decoder failure is a bad file, listed with its reason
        return f"{type(e).__name__}: {e}"
    return None


def image_problems(splits: Dict[str, Sequence[Tuple[Path, int]]], *, part: Tuple[int, int] = (0, 1),
                   progress: bool = False, workers: int = 0) -> Tuple[int, List[Tuple[int, str]]]:
    """Decode the images of ``part`` ``(k, n)``, every n-th image from the k-th (``(0, 1)``: all of them), as
    :func:`check_images` does; under torchrun each process checks its own part and the problems are gathered.

    Returns:
        ``(images in all splits, [(index, "  split: path: problem")])``; the index orders the gathered lines.
    """
    from concurrent.futures import ThreadPoolExecutor

    k, n = part
    items = [(s, p) for s, samples in splits.items() for p, _ in samples]
    mine = list(range(k, len(items), n))
    workers = workers or min(8, os.cpu_count() or 1)
    bar = None
    if progress and len(mine) >= 500:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc="checking images", leave=False, dynamic_ncols=True)
    bad: List[Tuple[int, str]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, problem in zip(mine, pool.map(_check_one, (items[i][1] for i in mine))):
            if problem is not None:
                bad.append((i, f"  {items[i][0]}: {items[i][1]}: {problem}"))
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return len(items), bad


def unreadable_images(total: int, bad: Sequence[Tuple[int, str]]) -> DataError:
    """The one error that lists every problem :func:`image_problems` found, in the order of the images."""
    return DataError(f"{len(bad)} of {total} images cannot be read (fix or remove them):\n"
                     + "\n".join(line for _, line in sorted(bad)))


def check_images(splits: Dict[str, Sequence[Tuple[Path, int]]], *, progress: bool = False, workers: int = 0) -> int:
    """Decode every image of every split before training starts; list every bad file in one :class:`DataError`.

    Args:
        splits: split name -> ``[(path, label)]``.
        progress: show a progress bar (only drawn for sets of 500 images or more).
        workers: decoding threads (0: up to 8, by CPU count; Pillow decodes without holding the GIL).

    Returns:
        the number of images checked.
    """
    total, bad = image_problems(splits, progress=progress, workers=workers)
    if bad:
        raise unreadable_images(total, bad)
    return total


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
    skipped: List[Path] = field(default_factory=list)  # files in class folders that are not images of a known type


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


# folder names that mean a split but are not spelled as one (any case): valid/ next to train/ would be left out,
# Train/Val/Test without train/ would be taken for three classes
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test"}


def check_split_names(root: Path, present: Sequence[str]) -> None:
    """Refuse folders of ``root`` named like a split but not spelled ``train``/``val``/``test`` (``valid/``,
    ``Train/``, ...): they would be left out of a split layout, or taken for classes without one."""
    odd = sorted(p.name for p in root.iterdir()
                 if p.is_dir() and p.name not in SPLITS and p.name.lower() in _SPLIT_ALIASES)
    if odd:
        renames = ", ".join(f"{n}/ -> {_SPLIT_ALIASES[n.lower()]}/" for n in odd)
        now = (f"next to {', '.join(s + '/' for s in present)} they would be left out" if present
               else "they would be taken for classes")
        raise DataError(f"{root}: split folders must be named train/, val/, test/; found {', '.join(n + '/' for n in odd)} "
                        f"({now}): rename {renames}")


def _at_least_two(root: Path, classes: Sequence[str]) -> None:
    if len(classes) < 2:
        raise DataError(f"{root} has 1 class folder ({classes[0]!r}); a classifier needs 2 or more "
                        f"({root}/<class>/<image files>, one folder per class)")


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
    check_split_names(root, present)
    if not present:
        if val_fraction + test_fraction >= 1:
            raise DataError(f"--val-fraction {val_fraction:g} and --test-fraction {test_fraction:g} leave no training "
                            f"images in {root}: their sum must be below 1")
        skipped: List[Path] = []
        classes, samples = scan_folder(root, skipped)
        _at_least_two(root, classes)
        train, val, test = _stratified_split(samples, (1 - val_fraction - test_fraction, val_fraction, test_fraction), seed)
        return Splits(classes, train, val, test, skipped)
    if "train" not in present:
        raise DataError(f"{root} has {present} but no train/ split")
    skipped = []
    scanned = {s: scan_folder(root / s, skipped) for s in present}
    classes = scanned["train"][0]
    _at_least_two(root / "train", classes)
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
    return Splits(classes, train, val, test, skipped)


def class_counts(samples: Sequence[Tuple[object, int]], num_classes: int) -> List[int]:
    counts = [0] * num_classes
    for _, y in samples:
        counts[y] += 1
    return counts
