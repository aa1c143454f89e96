"""Input checks shared by every op and block.

Every message names the block, what it expected and what it received, e.g.
``HEF: expected l with 96 channels, got (2, 64, 28, 28)``. Checks run before any kernel.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def shape_str(x: torch.Tensor) -> str:
    return str(tuple(x.shape))


def expect_tensor(block: str, name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{block}: expected {name} to be a torch.Tensor, got {type(x).__name__}")
    return x


def expect_rank(block: str, name: str, x: object, rank: int, layout: str) -> torch.Tensor:
    x = expect_tensor(block, name, x)
    if x.dim() != rank:
        raise ValueError(f"{block}: expected {name} as a {rank}-D {layout} tensor, got {shape_str(x)}")
    return x


def expect_nchw(block: str, name: str, x: object, channels: Optional[int] = None) -> torch.Tensor:
    """Check a (B, C, H, W) feature map, optionally with a given channel count."""
    x = expect_rank(block, name, x, 4, "(B, C, H, W)")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{block}: expected {name} with {channels} channels, got {shape_str(x)}")
    return x


def expect_tokens(block: str, name: str, x: object, dim: Optional[int] = None) -> torch.Tensor:
    """Check a (B, N, D) token tensor, optionally with a given embedding dim."""
    x = expect_rank(block, name, x, 3, "(B, N, D)")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(f"{block}: expected {name} with embedding dim {dim}, got {shape_str(x)}")
    return x


def expect_same_spatial(block: str, names: Sequence[str], xs: Sequence[torch.Tensor]) -> None:
    ref = tuple(xs[0].shape[-2:])
    for n, x in zip(names[1:], xs[1:]):
        if tuple(x.shape[-2:]) != ref:
            raise ValueError(
                f"{block}: expected {n} with the spatial size {ref} of {names[0]}, got {shape_str(x)}"
            )


def expect_divisible(block: str, what: str, value: int, divisor: int, divisor_name: str) -> None:
    if divisor <= 0 or value % divisor != 0:
        raise ValueError(f"{block}: expected {what} ({value}) to be divisible by {divisor_name} ({divisor})")


def expect_positive_int(block: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{block}: expected {name} to be a positive int, got {value!r}")
    return value


def expect_choice(block: str, name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{block}: expected {name} to be one of {list(choices)}, got {value!r}")
