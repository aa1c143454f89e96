"""Input checks shared by every op and block.

Every message names the block, what it expected and what it received, e.g.
``HEF: expected l with 96 channels, got (2, 64, 28, 28)``. Checks run before any kernel.

Numbers: wherever a size or a scale is taken, any integral number (``int``, NumPy integers) counts as an int
and any real number (``float``, NumPy floats) as a float; ``bool`` is neither. The checks return plain Python
values. Tensors: a block's input must be floating, on its parameters' device and of their dtype (any of
float16/bfloat16/float32 under autocast) — pass ``like=self`` to :func:`expect_nchw` / :func:`expect_tokens`.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

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


_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def expect_input_like(block: str, name: str, x: torch.Tensor, like: Optional[torch.nn.Module] = None) -> torch.Tensor:
    """A block input: floating, and (given the block ``like``) on its parameters' device and of their dtype.

    Under autocast on ``x``'s device any of float16/bfloat16/float32 is accepted (autocast casts per op).
    """
    if not x.is_floating_point():
        raise TypeError(f"{block}: expected {name} as a floating tensor, got {x.dtype} {shape_str(x)} "
                        f"(convert it first, e.g. x.float())")
    if like is None:
        return x
    param = next(like.parameters(), None)
    if param is None:
        return x
    if x.device != param.device:
        raise ValueError(f"{block}: expected {name} on {param.device} (where the block's parameters are), "
                         f"got {name} on {x.device} {shape_str(x)}")
    if x.dtype != param.dtype and not (torch.is_autocast_enabled(x.device.type) and x.dtype in _AUTOCAST_DTYPES):
        raise TypeError(f"{block}: expected {name} as {param.dtype} (the block's parameters), got {x.dtype} "
                        f"{shape_str(x)}; cast the input (x.to({param.dtype})) or the block (.to({x.dtype}))")
    return x


def expect_nchw(block: str, name: str, x: object, channels: Optional[int] = None, *,
                like: Optional[torch.nn.Module] = None) -> torch.Tensor:
    """Check a (B, C, H, W) feature map, optionally with a given channel count; dtype/device as
    :func:`expect_input_like`."""
    x = expect_rank(block, name, x, 4, "(B, C, H, W)")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{block}: expected {name} with {channels} channels, got {shape_str(x)}")
    expect_nonempty(block, name, x, "(B, C, H, W)")
    return expect_input_like(block, name, x, like)


def expect_nonempty(block: str, name: str, x: torch.Tensor, layout: str) -> torch.Tensor:
    """Every size of ``x`` but the batch (the first) at least 1: a map with no rows, columns or channels is
    refused here rather than deep inside a convolution or an op."""
    if any(n == 0 for n in x.shape[1:]):
        raise ValueError(f"{block}: expected {name} {layout} with every size but B at least 1, got {shape_str(x)}")
    return x


def expect_tokens(block: str, name: str, x: object, dim: Optional[int] = None, *,
                  like: Optional[torch.nn.Module] = None) -> torch.Tensor:
    """Check a (B, N, D) token tensor, optionally with a given embedding dim; dtype/device as
    :func:`expect_input_like`."""
    x = expect_rank(block, name, x, 3, "(B, N, D)")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(f"{block}: expected {name} with embedding dim {dim}, got {shape_str(x)}")
    return expect_input_like(block, name, x, like)


def expect_same_spatial(block: str, names: Sequence[str], xs: Sequence[torch.Tensor]) -> None:
    ref = tuple(xs[0].shape[-2:])
    for n, x in zip(names[1:], xs[1:]):
        if tuple(x.shape[-2:]) != ref:
            raise ValueError(
                f"{block}: expected {n} with the spatial size {ref} of {names[0]}, got {shape_str(x)}"
            )


def expect_same_batch(block: str, names: Sequence[str], xs: Sequence[torch.Tensor]) -> None:
    ref = xs[0].shape[0]
    for n, x in zip(names[1:], xs[1:]):
        if x.shape[0] != ref:
            raise ValueError(f"{block}: expected {n} with the batch size {ref} of {names[0]}, got {shape_str(x)}")


def expect_divisible(block: str, what: str, value: int, divisor: int, divisor_name: str) -> None:
    if divisor <= 0 or value % divisor != 0:
        raise ValueError(f"{block}: expected {what} ({value}) to be divisible by {divisor_name} ({divisor})")


def is_int(value: object) -> bool:
    """An integral number (``int``, NumPy integer), not a ``bool``."""
    if isinstance(value, torch.Tensor) and torch.jit.is_tracing():  # torch.jit.trace reads sizes as 0-dim tensors
        return value.dim() == 0 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A real number (``int``, ``float``, NumPy scalar), not a ``bool``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def expect_int(block: str, name: str, value: object, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """An integral number in ``[lo, hi)`` (either bound optional), returned as a Python ``int``."""
    ok = is_int(value) and (lo is None or value >= lo) and (hi is None or value < hi)
    if not ok:
        if lo is not None and hi is not None:
            want = f"an int in [{lo}, {hi})"
        elif lo == 1:
            want = "a positive int"
        elif lo == 0:
            want = "a non-negative int"
        else:
            want = "an int" + (f" >= {lo}" if lo is not None else "") + (f" < {hi}" if hi is not None else "")
        raise ValueError(f"{block}: expected {name} to be {want}, got {value!r}")
    return int(value)


def expect_positive_int(block: str, name: str, value: object) -> int:
    return expect_int(block, name, value, lo=1)


def expect_hw(block: str, name: str, value: object) -> Tuple[int, int]:
    """A pair of positive integral numbers ``(H, W)`` (tuple or list), returned as Python ints."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(is_int(v) and v > 0 for v in value)):
        raise ValueError(f"{block}: expected {name} as a pair of positive ints (H, W), got {value!r}")
    return int(value[0]), int(value[1])


def expect_size(block: str, name: str, value: object) -> Tuple[int, int]:
    """An image size: a positive integral number (square) or a pair ``(H, W)`` of them, returned as Python ints."""
    if is_int(value) and value > 0:
        return int(value), int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(is_int(v) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"{block}: expected {name} as a positive int or a pair (H, W) of them, got {value!r}")


def expect_scale(block: str, name: str, value: object) -> Optional[float]:
    """``None`` or a finite real number, returned as a Python ``float`` (NaN or infinity would make every output
    NaN)."""
    if value is None:
        return None
    if not is_real(value):
        raise TypeError(f"{block}: expected {name} as a float or None, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{block}: expected {name} as a finite float or None, got {float(value)!r}")
    return float(value)


def expect_rate(block: str, name: str, value: object) -> float:
    """A drop rate (stochastic depth, dropout): a real number (or a one-element tensor) in ``[0, 1)``, returned
    as a Python ``float``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    if not (is_real(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{block}: expected {name} in [0, 1), got {value!r}")
    return float(value)


def expect_choice(block: str, name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{block}: expected {name} to be one of {list(choices)}, got {value!r}")
