"""The few image transforms the papers' recipes use, on float tensors ``(C, H, W)`` in ``[0, 1]``.

Written on plain torch ops (no torchvision): every random transform draws from the
``torch.Generator`` it is given, so a seed reproduces an epoch's augmentation exactly.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


class Transform:
    """Base: ``__call__(img, g) -> img`` with ``img`` a ``(C, H, W)`` float tensor."""

    def __call__(self, img: torch.Tensor, g: Optional[torch.Generator] = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _uniform(g: Optional[torch.Generator], lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


class Compose(Transform):
    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, img, g=None):
        for t in self.transforms:
            img = t(img, g)
        return img


class Resize(Transform):
    """Resize to ``size`` (int: square) with bilinear, antialiased interpolation."""

    def __init__(self, size: int | Tuple[int, int]):
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, img, g=None):
        if tuple(img.shape[-2:]) == self.size:
            return img
        return F.interpolate(img[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]


class CenterCrop(Transform):
    def __init__(self, size: int):
        self.size = size

    def __call__(self, img, g=None):
        h, w = img.shape[-2:]
        top, left = max((h - self.size) // 2, 0), max((w - self.size) // 2, 0)
        return img[:, top : top + self.size, left : left + self.size]


class RandomResizedCrop(Transform):
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio`` (log-uniform), resize to ``size``."""

    def __init__(self, size: int, scale: Tuple[float, float] = (0.08, 1.0), ratio: Tuple[float, float] = (3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def __call__(self, img, g=None):
        h, w = img.shape[-2:]
        area = h * w
        for _ in range(10):
            target = area * _uniform(g, *self.scale)
            ar = math.exp(_uniform(g, math.log(self.ratio[0]), math.log(self.ratio[1])))
            cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (), generator=g))
                left = int(torch.randint(0, w - cw + 1, (), generator=g))
                return Resize(self.size)(img[:, top : top + ch, left : left + cw])
        side = min(h, w)  # fallback: central square crop
        return Resize(self.size)(CenterCrop(side)(img))


class RandomHorizontalFlip(Transform):
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img, g=None):
        return img.flip(-1) if torch.rand((), generator=g).item() < self.p else img


class RandomVerticalFlip(Transform):
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img, g=None):
        return img.flip(-2) if torch.rand((), generator=g).item() < self.p else img


def rotate(img: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate ``(C, H, W)`` by ``degrees`` about the centre (bilinear, zero fill)."""
    a = math.radians(degrees)
    h, w = img.shape[-2:]
    # a rotation in pixel units, written in normalized coordinates so it holds for non-square images
    theta = torch.tensor(
        [[math.cos(a), -math.sin(a) * h / w, 0.0], [math.sin(a) * w / h, math.cos(a), 0.0]], dtype=img.dtype
    )
    grid = F.affine_grid(theta[None], [1, *img.shape], align_corners=False)
    return F.grid_sample(img[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


class RandomRotation(Transform):
    """Rotate by a uniform angle in ``[-degrees, degrees]`` about the centre, zero fill."""

    def __init__(self, degrees: float):
        self.degrees = degrees

    def __call__(self, img, g=None):
        return rotate(img, _uniform(g, -self.degrees, self.degrees))


class RandomBrightness(Transform):
    """Multiply by a uniform factor in ``[1 - delta, 1 + delta]``, clamp to ``[0, 1]``."""

    def __init__(self, delta: float):
        self.delta = delta

    def __call__(self, img, g=None):
        return (img * _uniform(g, 1 - self.delta, 1 + self.delta)).clamp_(0, 1)


class Normalize(Transform):
    """``(img - mean) / std`` per channel; a single value applies to every channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, img, g=None):
        c = img.shape[0]
        mean = torch.tensor(self.mean * c if len(self.mean) == 1 else self.mean, dtype=img.dtype)[:c, None, None]
        std = torch.tensor(self.std * c if len(self.std) == 1 else self.std, dtype=img.dtype)[:c, None, None]
        return (img - mean) / std


def build(train: bool, recipe_aug: dict, image_size: int, mean: List[float], std: List[float]) -> Compose:
    """Train or eval pipeline for a recipe's augmentation spec (see :mod:`fusionblocks.training.recipes`)."""
    if not train:
        return Compose([Resize(image_size), Normalize(mean, std)])
    ts: List[Transform] = []
    if recipe_aug.get("random_resized_crop"):
        ts.append(RandomResizedCrop(image_size, scale=tuple(recipe_aug.get("crop_scale", (0.08, 1.0)))))
    else:
        ts.append(Resize(image_size))
    if recipe_aug.get("hflip"):
        ts.append(RandomHorizontalFlip())
    if recipe_aug.get("vflip"):
        ts.append(RandomVerticalFlip())
    if recipe_aug.get("rotation"):
        ts.append(RandomRotation(recipe_aug["rotation"]))
    if recipe_aug.get("brightness"):
        ts.append(RandomBrightness(recipe_aug["brightness"]))
    ts.append(Normalize(mean, std))
    return Compose(ts)
