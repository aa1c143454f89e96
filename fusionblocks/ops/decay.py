"""``decay_attention``: Manhattan-decay attention (RMT's MaSA), validated and dispatched."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._validate import expect_hw, expect_rank, expect_scale, shape_str
from . import reference
from .dispatch import autocast_inputs, dispatch, register_backend, register_op

OP = "decay_attention"
MODES = ("full", "decomposed")


def check_decay_args(q, k, v, log_gamma, hw, mode, scale) -> Tuple[Tuple[int, int], Optional[float]]:
    """Raise ValueError/TypeError naming ``decay_attention`` for any malformed argument; return ``hw`` and
    ``scale`` as Python numbers (NumPy scalars are accepted)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        expect_rank(OP, name, t, 4, "(B, heads, H*W, D)")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"{OP}: expected q, k, v of one shape (B, heads, H*W, D), got q {shape_str(q)}, k {shape_str(k)}, v {shape_str(v)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise TypeError(f"{OP}: expected q, k, v of one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == getattr(log_gamma, "device", q.device)):
        raise ValueError(f"{OP}: expected q, k, v, log_gamma on one device, got {q.device}, {k.device}, {v.device}, {log_gamma.device}")
    if q.shape[-1] == 0:
        raise ValueError(f"{OP}: expected a head dim D >= 1 in q, k, v (B, heads, H*W, D), got {shape_str(q)}")
    hw = expect_hw(OP, "hw", hw)
    if hw[0] * hw[1] != q.shape[2]:
        raise ValueError(f"{OP}: expected H*W = {hw[0]}*{hw[1]} = {hw[0] * hw[1]} tokens to match q, got {shape_str(q)}")
    if not isinstance(log_gamma, torch.Tensor) or log_gamma.dim() != 1 or log_gamma.shape[0] != q.shape[1]:
        got = shape_str(log_gamma) if isinstance(log_gamma, torch.Tensor) else type(log_gamma).__name__
        raise ValueError(f"{OP}: expected log_gamma of shape ({q.shape[1]},) (one per head), got {got}")
    if not log_gamma.is_floating_point():
        raise TypeError(f"{OP}: expected a floating log_gamma, got {log_gamma.dtype}")
    if mode not in MODES:
        raise ValueError(f"{OP}: expected mode one of {list(MODES)}, got {mode!r}")
    return hw, expect_scale(OP, "scale", scale)


def decay_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    *,
    hw: Tuple[int, int],
    mode: str = "full",
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Manhattan-decay attention; see :func:`fusionblocks.ops.reference.decay_attention` for the math.

    Args:
        q, k, v: ``(B, heads, H*W, D)`` in raster order; any strides.
        log_gamma: ``(heads,)`` log-decay per head.
        hw: ``(H, W)``.
        mode: ``"full"`` (2-D decay over all tokens) or ``"decomposed"`` (rows, then columns).
        scale: multiplies ``q k^T``; ``None`` means ``D ** -0.5``.
        backend: ``None`` picks the fastest that can run (env ``FUSIONBLOCKS_BACKEND`` overrides),
            or one of ``"reference"``, ``"triton"``, ``"cpp"``.

    Returns:
        ``(B, heads, H*W, D)``.
    """
    args, kwargs = prepare_decay_args(q, k, v, log_gamma, hw=hw, mode=mode, scale=scale)
    return dispatch(OP, backend, *args, **kwargs)


def prepare_decay_args(q, k, v, log_gamma, *, hw, mode="full", scale=None):
    """The arguments every backend receives: validated (:func:`check_decay_args`), ``hw`` a tuple, ``scale`` a float,
    ``q, k, v`` in the autocast dtype under ``torch.autocast`` (:func:`~fusionblocks.ops.dispatch.autocast_inputs`)."""
    hw, scale = check_decay_args(q, k, v, log_gamma, hw, mode, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale  # backends always get a float
    q, k, v = autocast_inputs(q, k, v)
    return (q, k, v, log_gamma), dict(hw=hw, mode=mode, scale=scale)


register_op(OP, prepare_decay_args)


@register_backend(OP, "reference", priority=0)
def _decay_reference(q, k, v, log_gamma, *, hw, mode, scale):
    return reference.decay_attention(q, k, v, log_gamma, hw=hw, mode=mode, scale=scale)
