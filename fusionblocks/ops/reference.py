"""The spec: plain-PyTorch versions of every op.

These run on any device and dtype, backpropagate through autograd (also into ``log_gamma`` and
``bias_table``), and are what every fast backend is tested against. They materialize the full score
tensors, so they are the slow path; ``fusionblocks.ops`` picks a faster backend where one can run.

Token layout for both attention ops: ``(B, heads, H*W, D)`` in raster order (token ``n`` sits at row
``n // W``, column ``n % W``). Scores are computed in the input dtype and the softmax in at least float32.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

__all__ = [
    "decay_attention",
    "window_attention",
    "manhattan_distance",
    "relative_position_index",
    "shift_region_ids",
    "shift_attention_mask",
]


@functools.lru_cache(maxsize=64)
def _grid_coords(h: int, w: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    n = torch.arange(h * w, device=device)
    return n // w, n % w


def _cached(fn):
    """``fn`` itself, or its uncached body while tracing (``torch.compile``, ``torch.export``, ``torch.jit.trace``):
    there the tensors a call makes belong to the trace (fake tensors) and must never be kept for later eager calls,
    dynamo, which ignores ``lru_cache`` wrappers anyway, would warn about each one it meets, and ``torch.jit.trace``
    would record the first call's computation and a later call's cached constant, failing its check that two
    traces give the same graph."""
    tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
    return fn.__wrapped__ if tracing else fn


def manhattan_distance(h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``|dy| + |dx|`` between every pair of tokens of an ``h x w`` raster grid: ``(h*w, h*w)`` int64."""
    ys, xs = _cached(_grid_coords)(h, w, torch.device(device))
    return (ys[:, None] - ys[None, :]).abs() + (xs[:, None] - xs[None, :]).abs()


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis, accumulated in at least float32."""
    acc = torch.promote_types(scores.dtype, torch.float32)
    return torch.softmax(scores, dim=-1, dtype=acc).to(scores.dtype)


def _decay_1d(log_gamma: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``log_gamma[h] * |i - j|`` over a line of ``n`` tokens: ``(heads, n, n)``."""
    i = torch.arange(n, device=log_gamma.device)
    dist = (i[:, None] - i[None, :]).abs().to(dtype)
    return log_gamma.to(dtype)[:, None, None] * dist


def decay_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    *,
    hw: Tuple[int, int],
    mode: str = "full",
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Manhattan-decay attention (RMT's MaSA) over an ``H x W`` token grid.

    ``full``: ``softmax(scale * q k^T + log_gamma[h] * (|dy| + |dx|)) v`` over all ``H*W`` tokens
    (RMT ``VisionRetentionAll``). ``decomposed``: attention along W within each row with the decay
    ``log_gamma[h] * |dx|``, then along H within each column with ``log_gamma[h] * |dy|``, the second
    pass attending over the first pass's output with the same q and k (RMT ``VisionRetentionChunk``,
    HEMF's global branch).

    Args:
        q, k, v: ``(B, heads, H*W, D)`` in raster order.
        log_gamma: ``(heads,)``, the log of each head's decay (``<= 0`` for a decay).
        hw: ``(H, W)`` of the token grid.
        mode: ``"full"`` or ``"decomposed"``.
        scale: multiplies ``q k^T``; ``None`` means ``D ** -0.5``.

    Returns:
        ``(B, heads, H*W, D)`` in the dtype of ``q``.
    """
    h, w = hw
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    if mode == "full":
        dist = manhattan_distance(h, w, q.device).to(q.dtype)
        bias = log_gamma.to(q.dtype)[:, None, None] * dist
        scores = scale * (q @ k.transpose(-1, -2)) + bias
        return _softmax(scores) @ v
    if mode != "decomposed":
        raise ValueError(f"decay_attention: expected mode 'full' or 'decomposed', got {mode!r}")
    b, nh = q.shape[:2]
    # rank 4 with batch and heads folded: inductor's attention pattern matcher rewrites rank-4 attention
    # correctly but crashes on rank 5 (torch 2.14 `_sfdp_replacement_21`)
    q4 = q.reshape(b * nh, h, w, d)
    k4 = k.reshape(b * nh, h, w, d)
    v4 = v.reshape(b * nh, h, w, v.shape[-1])
    # along W within each row: (B*heads, H, W, W)
    decay_w = _decay_1d(log_gamma, w, q.dtype).repeat(b, 1, 1)[:, None]
    o = _softmax(scale * (q4 @ k4.transpose(-1, -2)) + decay_w) @ v4
    # along H within each column: (B*heads, W, H, H)
    qt, kt, ot = q4.transpose(1, 2), k4.transpose(1, 2), o.transpose(1, 2)
    decay_h = _decay_1d(log_gamma, h, q.dtype).repeat(b, 1, 1)[:, None]
    o = (_softmax(scale * (qt @ kt.transpose(-1, -2)) + decay_h) @ ot).transpose(1, 2)
    return o.reshape(b, nh, h * w, v.shape[-1])


@functools.lru_cache(maxsize=32)
def _relative_position_index(window_size: int) -> torch.Tensor:
    c = torch.arange(window_size)
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window_size - 1
    dx = xs[:, None] - xs[None, :] + window_size - 1
    return dy * (2 * window_size - 1) + dx


def relative_position_index(window_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Swin's index into the ``((2ws-1)**2, heads)`` bias table: ``(ws*ws, ws*ws)`` int64."""
    return _cached(_relative_position_index)(window_size).to(device)


def shift_region_ids(h: int, w: int, window_size: int, shift: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Region label of every position of the cyclically shifted ``h x w`` grid (Swin's ``img_mask``).

    Positions are in the shifted frame (after ``roll(-shift)``); along each axis the regions are
    ``[0, n - ws)``, ``[n - ws, n - shift)`` and ``[n - shift, n)``. Returns ``(h, w)`` int64.
    """

    def axis(n: int) -> torch.Tensor:
        i = torch.arange(n, device=device)
        return (i >= n - window_size).long() + (i >= n - shift).long()

    return axis(h)[:, None] * 3 + axis(w)[None, :]


def shift_attention_mask(h: int, w: int, window_size: int, shift: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Swin's SW-MSA mask: ``(nW, ws*ws, ws*ws)`` with 0 within a region and -100 across regions."""
    ids = shift_region_ids(h, w, window_size, shift, device)
    ws = window_size
    ids = ids.view(h // ws, ws, w // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
    diff = ids[:, :, None] != ids[:, None, :]
    return torch.zeros(diff.shape, device=device).masked_fill(diff, -100.0)


def _partition(x: torch.Tensor, h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    b, nh, _, d = x.shape
    x = x.reshape(b, nh, h, w, d)
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(2, 3))
    x = x.reshape(b, nh, h // ws, ws, w // ws, ws, d).permute(0, 2, 4, 1, 3, 5, 6)
    return x.reshape(b, (h // ws) * (w // ws), nh, ws * ws, d)


def _merge(x: torch.Tensor, b: int, nh: int, h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    d = x.shape[-1]
    x = x.reshape(b, h // ws, w // ws, nh, ws, ws, d).permute(0, 3, 1, 4, 2, 5, 6).reshape(b, nh, h, w, d)
    if shift:
        x = torch.roll(x, shifts=(shift, shift), dims=(2, 3))
    return x.reshape(b, nh, h * w, d)


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
) -> torch.Tensor:
    """Swin W-MSA / SW-MSA with relative-position bias, exactly as the official Swin/HiFuse code.

    The grid is cyclically shifted by ``-shift`` on both axes, cut into ``ws x ws`` windows, attention
    runs inside each window with ``softmax(scale * q k^T + table[rel_index] + mask)`` where the mask is
    -100 between tokens of different shift regions (only when ``shift > 0``), and the result is put
    back in the original raster order.

    Args:
        q, k, v: ``(B, heads, H*W, D)`` in raster order of the unshifted grid.
        bias_table: ``((2ws-1)**2, heads)`` or ``None`` for no relative-position bias.
        hw: ``(H, W)``, both multiples of ``window_size``.
        window_size: window side ``ws``.
        shift: cyclic shift in ``[0, ws)``.
        scale: multiplies ``q`` before ``q k^T``; ``None`` means ``D ** -0.5``.

    Returns:
        ``(B, heads, H*W, D)`` in raster order.
    """
    h, w = hw
    ws = window_size
    b, nh, _, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    qw, kw, vw = (_partition(t, h, w, ws, shift) for t in (q, k, v))
    attn = (qw * scale) @ kw.transpose(-1, -2)  # (B, nW, heads, L, L)
    if bias_table is not None:
        idx = relative_position_index(ws, q.device).reshape(-1)
        bias = bias_table[idx].reshape(ws * ws, ws * ws, nh).permute(2, 0, 1)
        attn = attn + bias.to(attn.dtype)
    if shift:
        attn = attn + shift_attention_mask(h, w, ws, shift, q.device).to(attn.dtype)[None, :, None]
    out = _softmax(attn) @ vw
    return _merge(out, b, nh, h, w, ws, shift)
