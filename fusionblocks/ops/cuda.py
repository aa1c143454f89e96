"""CUDA backend (``cuda``) of ``window_attention``, from ``fusionblocks._C`` built with ``FUSIONBLOCKS_CUDA=1``.

One thread block per (window, head, batch element) holds the window's q, k, v and its score matrix in
shared memory; the shift, partition, bias gather and shift mask are index arithmetic inside the kernel
(``csrc/cuda/window_attention.cu``). float32/float64 math; float16/bfloat16 stored as such, computed in
float32. Supports window_size <= 8 and head dim <= 128. Autograd and fake kernels are shared with the
``cpp`` backend (same ``torch.ops.fusionblocks_C.window_fwd`` op, CUDA dispatch key).

Build: ``FUSIONBLOCKS_CUDA=1 pip install --no-build-isolation -e .`` with a CUDA build of torch and nvcc.
Benchmark against Triton on a GPU: ``python -m pytest -q tests/ops/test_cpp_ext.py -m gpu -s``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .._build import why_no_cuda
from . import cpp
from ._gpu import max_shared_bytes
from .dispatch import register_backend

MAX_WINDOW = 8
MAX_HEAD_DIM = 128
MAX_GRID_YZ = 65535
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CUDA_BUILD_HINT = (
    "rebuild it with CUDA: `FUSIONBLOCKS_CUDA=1 pip install --no-build-isolation -e .` (needs a CUDA build of torch and nvcc)"
)

__all__ = ["available", "check_window_cuda", "window_attention_cuda"]

_BUILD_REASON = why_no_cuda()  # read once at import: checks also run inside torch.compile traces


def available() -> bool:
    """True when ``fusionblocks._C`` is loaded and was built with the CUDA kernels."""
    return cpp._C is not None and bool(getattr(cpp._C, "with_cuda", 0))


def check_window_cuda(q, k, v, bias_table, *, hw, window_size, shift, scale, auto: bool = False) -> List[str]:
    """Reasons the ``cuda`` backend cannot run this (validated) ``window_attention`` call; empty when it can."""
    reasons = cpp.extension_reasons()
    if not reasons and not available():
        reasons.append(f"fusionblocks._C was built without CUDA kernels{_BUILD_REASON}; {CUDA_BUILD_HINT}")
    if q.device.type != "cuda":
        reasons.append(f"cuda window_attention runs on CUDA tensors only, got {q.device}")
    if q.dtype not in DTYPES:
        reasons.append(f"cuda window_attention supports float32/float64/float16/bfloat16, got {q.dtype}")
    if window_size > MAX_WINDOW:
        reasons.append(f"window_size {window_size} above the supported {MAX_WINDOW}")
    if q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} above the supported {MAX_HEAD_DIM}")
    if q.shape[0] == 0 or q.shape[1] == 0:  # CUDA refuses a launch with a zero grid dimension
        reasons.append(f"cuda window_attention launches batch x heads as grid z x y, which CUDA refuses at 0; got "
                       f"batch {q.shape[0]}, heads {q.shape[1]} (the reference returns the empty result)")
    if q.shape[0] > MAX_GRID_YZ or q.shape[1] > MAX_GRID_YZ:
        reasons.append(f"cuda window_attention launches batch x heads as grid z x y (at most {MAX_GRID_YZ} each), "
                       f"got batch {q.shape[0]}, heads {q.shape[1]}")
    if q.device.type == "cuda" and not reasons:
        need, limit = shared_bytes(q.dtype, window_size, q.shape[-1], backward=True), max_shared_bytes(q.device)
        if need > limit:
            reasons.append(f"cuda window_attention needs {need // 1024} KB of shared memory per block for window_size "
                           f"{window_size}, head dim {q.shape[-1]} ({q.dtype}), over this GPU's {limit // 1024} KB")
    return reasons


def shared_bytes(dtype: torch.dtype, window_size: int, head_dim: int, backward: bool) -> int:
    """Dynamic shared memory of one block (``window_smem_bytes`` in ``csrc/cuda/window_attention.cu``):
    q, k, v (and dO) plus the score matrix (and dS), in float32 (float64 for float64 inputs)."""
    big_l = window_size * window_size
    words = 4 * big_l * head_dim + 2 * big_l * big_l if backward else 3 * big_l * head_dim + big_l * big_l
    return words * (8 if dtype == torch.float64 else 4)


@register_backend("window_attention", "cuda", priority=30, check=check_window_cuda)
def window_attention_cuda(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: Optional[torch.Tensor], *,
    hw: Tuple[int, int], window_size: int, shift: int = 0, scale: float,
) -> torch.Tensor:
    """Shifted-window attention on the CUDA kernel; math of :func:`fusionblocks.ops.reference.window_attention`.

    Args:
        q, k, v: ``(B, heads, H*W, D)`` raster order of the unshifted grid, any strides, one CUDA device.
        bias_table: ``((2ws-1)**2, heads)`` or ``None``.
        hw: ``(H, W)``, multiples of ``window_size``.
        window_size: window side, at most 8.
        shift: cyclic shift in ``[0, window_size)``.
        scale: multiplies ``q`` (the public op resolves ``None`` to ``D ** -0.5``).

    Returns:
        ``(B, heads, H*W, D)`` in the dtype of ``q``.
    """
    h, w = hw
    return torch.ops.fusionblocks_C.window_fwd(q, k, v, bias_table, h, w, window_size, shift, scale)
