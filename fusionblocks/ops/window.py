"""``window_attention``: Swin W-MSA / SW-MSA with relative-position bias, validated and dispatched."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._validate import expect_hw, expect_rank, expect_scale, is_int, shape_str
from . import reference
from .dispatch import autocast_inputs, dispatch, register_backend, register_op

OP = "window_attention"


def check_window_args(q, k, v, bias_table, hw, window_size, shift, scale):
    """Raise ValueError/TypeError naming ``window_attention`` for any malformed argument; return ``hw``,
    ``window_size``, ``shift`` and ``scale`` as Python numbers (NumPy scalars are accepted)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        expect_rank(OP, name, t, 4, "(B, heads, H*W, D)")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"{OP}: expected q, k, v of one shape (B, heads, H*W, D), got q {shape_str(q)}, k {shape_str(k)}, v {shape_str(v)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise TypeError(f"{OP}: expected q, k, v of one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{OP}: expected q, k, v on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] == 0:
        raise ValueError(f"{OP}: expected a head dim D >= 1 in q, k, v (B, heads, H*W, D), got {shape_str(q)}")
    if not (is_int(window_size) and window_size >= 1):
        raise ValueError(f"{OP}: expected window_size as a positive int, got {window_size!r}")
    window_size = int(window_size)
    if not (is_int(shift) and 0 <= shift < window_size):
        raise ValueError(f"{OP}: expected shift as an int in [0, {window_size}), got {shift!r}")
    shift = int(shift)
    h, w = hw = expect_hw(OP, "hw", hw)
    if h % window_size or w % window_size:
        raise ValueError(
            f"{OP}: expected H and W to be multiples of window_size {window_size} (pad first), got hw=({h}, {w})"
        )
    if h * w != q.shape[2]:
        raise ValueError(f"{OP}: expected H*W = {h}*{w} = {h * w} tokens to match q, got {shape_str(q)}")
    if bias_table is not None:
        want = ((2 * window_size - 1) ** 2, q.shape[1])
        if not isinstance(bias_table, torch.Tensor) or tuple(bias_table.shape) != want:
            got = shape_str(bias_table) if isinstance(bias_table, torch.Tensor) else type(bias_table).__name__
            raise ValueError(f"{OP}: expected bias_table of shape {want} ((2*ws-1)**2, heads), got {got}")
        if bias_table.device != q.device:
            raise ValueError(f"{OP}: expected bias_table on {q.device}, got {bias_table.device}")
        if not bias_table.is_floating_point():
            raise TypeError(f"{OP}: expected a floating bias_table, got {bias_table.dtype}")
    return hw, window_size, shift, expect_scale(OP, "scale", scale)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: Optional[torch.Tensor],
    *,
    hw: Tuple[int, int],
    window_size: int,
    shift: int = 0,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Shifted-window attention; see :func:`fusionblocks.ops.reference.window_attention` for the math.

    Args:
        q, k, v: ``(B, heads, H*W, D)`` in raster order of the unshifted grid; any strides.
        bias_table: ``((2ws-1)**2, heads)`` relative-position bias table, or ``None``.
        hw: ``(H, W)``, multiples of ``window_size`` (blocks pad before calling).
        window_size: window side.
        shift: cyclic shift in ``[0, window_size)``; ``> 0`` also applies the -100 region mask.
        scale: multiplies ``q``; ``None`` means ``D ** -0.5``.
        backend: ``None`` picks the fastest that can run (env ``FUSIONBLOCKS_BACKEND`` overrides),
            or one of ``"reference"``, ``"triton"``, ``"cpp"``, ``"cuda"``.

    Returns:
        ``(B, heads, H*W, D)`` in raster order.
    """
    args, kwargs = prepare_window_args(q, k, v, bias_table, hw=hw, window_size=window_size, shift=shift, scale=scale)
    return dispatch(OP, backend, *args, **kwargs)


def prepare_window_args(q, k, v, bias_table, *, hw, window_size, shift=0, scale=None):
    """The arguments every backend receives: validated (:func:`check_window_args`), ``hw`` a tuple, ``scale`` a float,
    ``q, k, v`` in the autocast dtype under ``torch.autocast`` (:func:`~fusionblocks.ops.dispatch.autocast_inputs`)."""
    hw, window_size, shift, scale = check_window_args(q, k, v, bias_table, hw, window_size, shift, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale  # backends always get a float
    q, k, v = autocast_inputs(q, k, v)
    return (q, k, v, bias_table), dict(hw=hw, window_size=window_size, shift=shift, scale=scale)


register_op(OP, prepare_window_args)


@register_backend(OP, "reference", priority=0)
def _window_reference(q, k, v, bias_table, *, hw, window_size, shift, scale):
    return reference.window_attention(q, k, v, bias_table, hw=hw, window_size=window_size, shift=shift, scale=scale)
