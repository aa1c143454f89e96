"""Rebuild the official weights and inputs of ``tests/golden`` by the fill rule of its README."""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Dict

import torch

GOLDEN = Path(__file__).parent / "golden"


@functools.lru_cache(maxsize=None)
def load(name: str) -> Dict[str, Any]:
    """A model record (``hifuse_tiny``, ``hemf``, ...) or ``blocks`` (the dict of block records)."""
    return torch.load(GOLDEN / f"{name}.pt", weights_only=True)


def block(name: str) -> Dict[str, Any]:
    return load("blocks")[name]


def official_state_dict(record: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The official state_dict that produced ``record``'s outputs."""
    sd: Dict[str, torch.Tensor] = {}
    buffers = record.get("buffers", {})
    for i, (key, shape, dtype) in enumerate(record["keys"]):
        shape = tuple(shape)
        g = torch.Generator().manual_seed(record["fill_seed"] + i)
        if "float" not in dtype or key.endswith((".angle", ".decay")):
            if key in buffers:
                sd[key] = buffers[key].clone()
            else:  # num_batches_tracked: the module's own value
                sd[key] = torch.zeros(shape, dtype=getattr(torch, dtype.split(".")[-1]))
        elif key.endswith("running_var"):
            sd[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("running_mean"):
            sd[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            sd[key] = (1.0 if key.endswith("weight") else 0.0) + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return sd


def make_input(spec: Any) -> Any:
    """A stored input: ``{"seed", "shape"}`` -> the tensor; anything else as it is."""
    if isinstance(spec, dict) and "seed" in spec:
        return torch.randn(*spec["shape"], generator=torch.Generator().manual_seed(spec["seed"]))
    return spec


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|``: the parity measure (must be <= 1e-5)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def max_ulp(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between ``a`` and ``b`` in float32 units in the last place (0: bit-identical).

    For values computed here against fixtures computed on another machine: two implementations of
    ``log``/``pow`` that are each within 1 ULP of the exact result can be 2 ULP apart (glibc, SLEEF and
    torch's vectorized kernels differ between CPUs, e.g. AVX-512 Intel vs AVX2 AMD, and between versions).
    """
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().view(torch.int32).long()
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)  # monotone in the float's value; +0 == -0

    return int((ordered(a) - ordered(b)).abs().max().item()) if a.numel() else 0
