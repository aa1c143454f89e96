"""The anchors every fused kernel is compared with: SDPA given a materialized bias, FlexAttention, and
``torch.compile`` of the reference."""
from __future__ import annotations

import functools
import warnings
from typing import List

import torch
import torch.nn.functional as F

from ..ops import reference as _ref


def _flex_reasons(device: torch.device, smoke: bool = False) -> List[str]:
    if device.type != "cuda" and not smoke:
        return ["FlexAttention is benchmarked compiled, which needs CUDA"]
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError as e:
        return [f"FlexAttention is not available in torch {torch.__version__} ({e})"]
    return []


def _allow_recompiles() -> None:
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit"):  # one compile per benchmarked shape
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 256))
            break


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    _allow_recompiles()
    return torch.compile(flex_attention, dynamic=False)


COMPILE_REASON = "the compiled reference is not timed in quick/smoke runs (inductor compiles each shape for minutes on CPU)"


@functools.lru_cache(maxsize=None)
def reference_compiled(op: str):
    """Anchor: ``torch.compile`` (inductor, static shapes) of ``fusionblocks.ops.reference.<op>``."""
    _allow_recompiles()
    return torch.compile(getattr(_ref, op), dynamic=False)


def _eager_flex(*args, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def _flex(compiled: bool):
    return _compiled_flex() if compiled else _eager_flex


def _log_gamma(heads: int, device) -> torch.Tensor:
    """RMT's fixed per-head decay (``initial_value=2``, ``heads_range=4``), float32, no gradient."""
    from ..layers.manhattan import manhattan_log_decay

    return manhattan_log_decay(heads, 2.0, 4.0).to(device)


def decay_sdpa(q, k, v, log_gamma, *, hw, mode, scale=None):
    """Anchor: SDPA with the decay bias materialized ((heads, N, N), or per line when decomposed)."""
    h, w = hw
    b, nh, n, d = q.shape
    if mode == "full":
        bias = log_gamma.to(q.dtype)[:, None, None] * _ref.manhattan_distance(h, w, q.device).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    rows = lambda t: t.reshape(b, nh, h, w, d).permute(0, 2, 1, 3, 4).reshape(b * h, nh, w, d)  # noqa: E731
    cols = lambda t: t.reshape(b, nh, h, w, d).permute(0, 3, 1, 2, 4).reshape(b * w, nh, h, d)  # noqa: E731
    bias_w, bias_h = _ref._decay_1d(log_gamma, w, q.dtype), _ref._decay_1d(log_gamma, h, q.dtype)
    o = F.scaled_dot_product_attention(rows(q), rows(k), rows(v), attn_mask=bias_w, scale=scale)
    o = o.reshape(b, h, nh, w, d).permute(0, 2, 1, 3, 4)
    o = F.scaled_dot_product_attention(cols(q), cols(k), cols(o), attn_mask=bias_h, scale=scale)
    return o.reshape(b, w, nh, h, d).permute(0, 2, 3, 1, 4).reshape(b, nh, n, d)


def decay_flex(q, k, v, log_gamma, *, hw, mode, scale=None, compiled=True):
    """Anchor: FlexAttention with the Manhattan decay as a ``score_mod``."""
    flex = _flex(compiled)
    h, w = hw
    b, nh, n, d = q.shape
    lg = log_gamma.to(torch.promote_types(q.dtype, torch.float32))
    if mode == "full":
        def full_mod(score, bi, hi, qi, ki):
            dist = (qi // w - ki // w).abs() + (qi % w - ki % w).abs()
            return score + lg[hi] * dist

        return flex(q, k, v, score_mod=full_mod, scale=scale)

    def line_mod(score, bi, hi, qi, ki):
        return score + lg[hi] * (qi - ki).abs()

    rows = lambda t: t.reshape(b, nh, h, w, d).permute(0, 2, 1, 3, 4).reshape(b * h, nh, w, d)  # noqa: E731
    cols = lambda t: t.reshape(b, nh, h, w, d).permute(0, 3, 1, 2, 4).reshape(b * w, nh, h, d)  # noqa: E731
    o = flex(rows(q), rows(k), rows(v), score_mod=line_mod, scale=scale)
    o = o.reshape(b, h, nh, w, d).permute(0, 2, 1, 3, 4)
    o = flex(cols(q), cols(k), cols(o), score_mod=line_mod, scale=scale)
    return o.reshape(b, w, nh, h, d).permute(0, 2, 3, 1, 4).reshape(b, nh, n, d)


def window_sdpa(q, k, v, bias_table, *, hw, window_size, shift=0, scale=None):
    """Anchor: SDPA over partitioned windows with a materialized (B·nW, heads, L, L) bias + shift mask."""
    h, w = hw
    b, nh, _, d = q.shape
    ws, L = window_size, window_size * window_size
    qw, kw, vw = (_ref._partition(t, h, w, ws, shift).reshape(-1, nh, L, d) for t in (q, k, v))
    nw = (h // ws) * (w // ws)
    mask = torch.zeros(nw, nh, L, L, device=q.device, dtype=q.dtype)
    if bias_table is not None:
        idx = _ref.relative_position_index(ws, q.device).reshape(-1)
        mask = mask + bias_table[idx].reshape(L, L, nh).permute(2, 0, 1).to(q.dtype)
    if shift:
        mask = mask + _ref.shift_attention_mask(h, w, ws, shift, q.device).to(q.dtype)[:, None]
    mask = mask.unsqueeze(0).expand(b, -1, -1, -1, -1).reshape(b * nw, nh, L, L)
    o = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=mask, scale=scale)
    return _ref._merge(o.reshape(b, nw, nh, L, d), b, nh, h, w, ws, shift)


@functools.lru_cache(maxsize=64)
def _window_block_mask(h: int, w: int, ws: int, device: str):
    """FlexAttention block mask keeping each ``ws x ws`` window of the (rolled) ``h x w`` grid; built once."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_window(bi, hi, qi, ki):
        return ((qi // w) // ws == (ki // w) // ws) & ((qi % w) // ws == (ki % w) // ws)

    return create_block_mask(same_window, None, None, h * w, h * w, device=device)


def window_flex(q, k, v, bias_table, *, hw, window_size, shift=0, scale=None, compiled=True):
    """Anchor: FlexAttention on the rolled grid: a block mask keeps each window, ``score_mod`` adds bias and mask."""
    flex = _flex(compiled)
    h, w = hw
    b, nh, n, d = q.shape
    ws = window_size
    if shift:
        q, k, v = (torch.roll(t.reshape(b, nh, h, w, d), (-shift, -shift), (2, 3)).reshape(b, nh, n, d)
                   for t in (q, k, v))
    region = _ref.shift_region_ids(h, w, ws, shift, q.device).reshape(-1) if shift else None
    table = bias_table

    def bias_mod(score, bi, hi, qi, ki):
        if table is not None:
            dy = (qi // w) % ws - (ki // w) % ws + ws - 1
            dx = (qi % w) % ws - (ki % w) % ws + ws - 1
            score = score + table[dy * (2 * ws - 1) + dx, hi].to(score.dtype)
        if region is not None:
            score = score + torch.where(region[qi] == region[ki], 0.0, -100.0)
        return score

    block_mask = _window_block_mask(h, w, ws, str(q.device))
    o = flex(q, k, v, score_mod=bias_mod, block_mask=block_mask, scale=scale)
    if shift:
        o = torch.roll(o.reshape(b, nh, h, w, d), (shift, shift), (2, 3)).reshape(b, nh, n, d)
    return o
