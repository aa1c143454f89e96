"""Manhattan self-attention (RMT's MaSA) and HEMF's enhanced global feature block.

:class:`ManhattanSelfAttention` is RMT's ``VisionRetentionAll`` (``mode="full"``) and
``VisionRetentionChunk`` (``mode="decomposed"``) together with the ``RetNetRelPos2d`` that feeds them:
q/k/v projections, interleaved rotary embedding on the raster index ``i*W + j``, Manhattan-decay
attention through :func:`fusionblocks.ops.decay_attention`, LePE (5x5 depthwise conv on V) and the
output projection. :class:`EGFBlock` is HEMF's ``EGF_block``: a stack of decomposed MaSA layers, each
followed by a Linear, with post-norm LayerNorms shared by all layers of the block.

Official buffers. ``RetNetRelPos2d.angle`` and ``RetNetRelPos2d.decay`` are functions of the config
(head dim, heads, ``initial_value``, ``heads_range``). Here the rotary angles are recomputed at every
forward in float32 (so ``.half()`` never degrades them) and the log-decay is a non-persistent buffer
``log_gamma`` (an ``nn.Parameter`` in the state_dict with ``learnable_decay=True``). The official loaders
drop both buffers after checking that they equal the recomputed values (:meth:`EGFBlock.prepare_official`).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .._validate import (expect_choice, expect_divisible, expect_nchw, expect_positive_int, expect_input_like,
                         expect_nonempty, expect_rank, is_real)
from ..models.convert import KeyRules, Rule, join_rules, prefix_rules
from ..ops import BACKENDS, decay_attention

__all__ = [
    "ManhattanSelfAttention",
    "EGFBlock",
    "manhattan_log_decay",
    "rotary_angle",
    "rotary_tables",
    "apply_rotary",
    "RMT_ATTENTION_RULES",
]

MODES = ("full", "decomposed")

RMT_ATTENTION_RULES: List[Rule] = [(r"lepe\.conv\.(weight|bias)", r"lepe.\1")]
"""The rules of :meth:`ManhattanSelfAttention.official_key_rules` (only the LePE conv moves)."""


def manhattan_log_decay(num_heads: int, initial_value: float, heads_range: float) -> torch.Tensor:
    """RMT's per-head log-decay ``log(1 - 2**(-initial_value - heads_range * h / num_heads))``.

    Computed in float32 exactly as ``RetNetRelPos2d.decay``.

    Returns:
        ``(num_heads,)`` float32, all ``< 0``.
    """
    h = torch.arange(num_heads, dtype=torch.float32)
    return torch.log(1 - 2 ** (-initial_value - heads_range * h / num_heads))


def rotary_angle(head_dim: int) -> torch.Tensor:
    """Rotary frequencies ``10000**-linspace(0, 1, head_dim/2)``, each repeated twice (interleaved pairs).

    Computed in float32 exactly as ``RetNetRelPos2d.angle``.

    Returns:
        ``(head_dim,)`` float32.
    """
    angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 2))
    return angle.repeat_interleave(2)


def rotary_tables(h: int, w: int, head_dim: int, device: torch.device | str = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """``sin`` and ``cos`` of ``n * angle`` for every raster index ``n = i*W + j`` of an ``h x w`` grid.

    Returns:
        ``(sin, cos)``, each ``(h*w, head_dim)`` float32 on ``device``.
    """
    angle = rotary_angle(head_dim).to(device)
    index = torch.arange(h * w, device=device, dtype=torch.float32)
    phase = index[:, None] * angle[None, :]
    return torch.sin(phase), torch.cos(phase)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)`` along the last axis."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((-odd, even), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Interleaved rotary embedding ``x * cos + rotate_pairs(x) * sin`` (RMT's ``theta_shift``).

    Args:
        x: ``(..., N, D)``.
        sin, cos: ``(N, D)``, broadcast over the leading axes.
    """
    return x * cos + _rotate_pairs(x) * sin


def _expect_decay_args(name: str, initial_value: object, heads_range: object) -> Tuple[float, float]:
    """The decay arguments of ``name``'s constructor as Python floats (any real number, not a ``bool``)."""
    for what, value in (("initial_value", initial_value), ("heads_range", heads_range)):
        if not is_real(value):
            raise TypeError(f"{name}: expected {what} as a float, got {type(value).__name__} {value!r}")
    return float(initial_value), float(heads_range)


def _expect_attention_args(name: str, dim: int, num_heads: int, mode: str, backend: Optional[str]) -> Tuple[int, int]:
    """The attention arguments of ``name``'s constructor, checked there (so that errors name the block the user
    built): ``(dim, num_heads)``, positive ints with an even head dim for the rotary pairs."""
    dim = expect_positive_int(name, "dim", dim)
    num_heads = expect_positive_int(name, "num_heads", num_heads)
    expect_divisible(name, "dim", dim, num_heads, "num_heads")
    if (dim // num_heads) % 2:
        raise ValueError(f"{name}: expected an even head dim (dim / num_heads) for the rotary pairs, got "
                         f"{dim} / {num_heads} = {dim // num_heads}")
    expect_choice(name, "mode", mode, MODES)
    expect_choice(name, "backend", backend, (None,) + BACKENDS)
    return dim, num_heads


class ManhattanSelfAttention(nn.Module):
    """RMT's Manhattan self-attention (MaSA): retention with a spatial decay prior.

    ``out = out_proj(Attn(rot(q), rot(k * d**-0.5), v) + LePE(v))`` where ``rot`` is the interleaved
    rotary embedding of the raster index ``i*W + j`` and ``Attn`` is
    :func:`fusionblocks.ops.decay_attention`: ``softmax(q k^T + log_gamma[h] * (|dy| + |dx|)) v`` over
    the whole grid (``mode="full"``, RMT ``VisionRetentionAll``) or along each row and then each column
    with the 1-D decay (``mode="decomposed"``, RMT ``VisionRetentionChunk``, HEMF). The per-head decay
    is ``gamma_h = 1 - 2**(-initial_value - heads_range * h / num_heads)``.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)`` with ``C = dim``; any ``H``, ``W`` (non-square, odd).
    :meth:`forward_channels_last` takes and returns RMT's ``(B, H, W, C)`` layout.

    Args:
        dim: channels ``C``.
        num_heads: attention heads; ``dim / num_heads`` must be even (rotary pairs).
        mode: ``"full"`` or ``"decomposed"``.
        initial_value: RMT ``init_value`` of the decay (RMT default 2; HEMF uses 1).
        heads_range: RMT ``heads_range`` of the decay (RMT default 4; HEMF uses 3).
        backend: kernel for :func:`~fusionblocks.ops.decay_attention` (``None`` picks the fastest that can run).
        learnable_decay: make ``log_gamma`` an ``nn.Parameter`` (the official code keeps it fixed).
        qkv_bias: bias of the q/k/v projections (official: True).
        lepe_kernel_size: kernel of the depthwise LePE conv (official: 5).

    Attributes:
        log_gamma: ``(num_heads,)`` log-decay; a non-persistent buffer, or a parameter with ``learnable_decay``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mode: str = "full",
        initial_value: float = 2.0,
        heads_range: float = 4.0,
        *,
        backend: Optional[str] = None,
        learnable_decay: bool = False,
        qkv_bias: bool = True,
        lepe_kernel_size: int = 5,
    ):
        super().__init__()
        name = type(self).__name__
        dim, num_heads = _expect_attention_args(name, dim, num_heads, mode, backend)
        initial_value, heads_range = _expect_decay_args(name, initial_value, heads_range)
        head_dim = dim // num_heads
        lepe_kernel_size = expect_positive_int(name, "lepe_kernel_size", lepe_kernel_size)
        if lepe_kernel_size % 2 == 0:
            raise ValueError(f"{name}: expected an odd lepe_kernel_size, got {lepe_kernel_size}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.mode = mode
        self.initial_value = initial_value
        self.heads_range = heads_range
        self.backend = backend
        self.scaling = head_dim ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, lepe_kernel_size, padding=lepe_kernel_size // 2, groups=dim)
        self.out_proj = nn.Linear(dim, dim)
        log_gamma = manhattan_log_decay(num_heads, initial_value, heads_range)
        if learnable_decay:
            self.log_gamma = nn.Parameter(log_gamma)
        else:
            self.register_buffer("log_gamma", log_gamma, persistent=False)
        self.reset_parameters()

    @property
    def learnable_decay(self) -> bool:
        return isinstance(self.log_gamma, nn.Parameter)

    @classmethod
    def official_key_rules(cls) -> KeyRules:
        """Official ``VisionRetentionAll``/``VisionRetentionChunk`` keys -> this module (only the LePE conv
        moves; every other key keeps its name)."""
        return list(RMT_ATTENTION_RULES), []

    def reset_parameters(self) -> None:
        """RMT's init: Xavier-normal q/k/v (gain 2**-2.5) and out_proj, zero out_proj bias; a fixed decay (not
        learnable) is filled in again too."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_normal_(proj.weight, gain=2 ** -2.5)
        nn.init.xavier_normal_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)
        self._fill_fixed_decay()

    @torch.no_grad()
    def _fill_fixed_decay(self) -> None:
        """The fixed decay is a buffer left out of the ``state_dict`` (a function of ``num_heads``,
        ``initial_value`` and ``heads_range``): a module built on the meta device and moved with ``to_empty``
        holds uninitialized memory there until this fills it (HEMF's outputs were off by 0.1)."""
        if not self.learnable_decay and not self.log_gamma.is_meta:
            self.log_gamma.copy_(manhattan_log_decay(self.num_heads, self.initial_value, self.heads_range))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._fill_fixed_decay()  # meta device -> to_empty -> load_state_dict, as timm and FSDP build large models

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, mode={self.mode!r}, initial_value={self.initial_value}, "
            f"heads_range={self.heads_range}, learnable_decay={self.learnable_decay}, backend={self.backend!r}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        expect_nchw(type(self).__name__, "x", x, self.dim, like=self)
        return self.forward_channels_last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_channels_last(
        self, x: torch.Tensor, rotary: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    ) -> torch.Tensor:
        """RMT's layout: ``(B, H, W, C) -> (B, H, W, C)``.

        Args:
            x: ``(B, H, W, C)``.
            rotary: precomputed :func:`rotary_tables` ``(sin, cos)`` for this grid (shared by stacked layers).
        """
        name = type(self).__name__
        expect_input_like(name, "x", expect_rank(name, "x", x, 4, "(B, H, W, C)"), self)
        if x.shape[-1] != self.dim:
            raise ValueError(f"{name}: expected x with {self.dim} channels in the last axis (B, H, W, C), got {tuple(x.shape)}")
        expect_nonempty(name, "x", x, "(B, H, W, C)")
        b, h, w, c = x.shape
        n, nh, d = h * w, self.num_heads, self.head_dim
        if rotary is not None:
            for part, t in zip(("sin", "cos"), rotary):
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n, d):
                    got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"{name}: expected rotary {part} of shape (H*W, head_dim) = {(n, d)} for x "
                                     f"{tuple(x.shape)}, got {got}")
        q = self.q_proj(x)
        k = self.k_proj(x) * self.scaling
        v = self.v_proj(x)
        lepe = self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        sin, cos = rotary if rotary is not None else rotary_tables(h, w, d, x.device)
        # under autocast the projections run in the autocast dtype, which may differ from x's
        sin, cos = sin.to(q.dtype), cos.to(q.dtype)
        q = apply_rotary(q.reshape(b, n, nh, d).transpose(1, 2), sin, cos)
        k = apply_rotary(k.reshape(b, n, nh, d).transpose(1, 2), sin, cos)
        v = v.reshape(b, n, nh, d).transpose(1, 2)
        o = decay_attention(q, k, v, self.log_gamma, hw=(h, w), mode=self.mode, scale=1.0, backend=self.backend)
        o = o.transpose(1, 2).reshape(b, h, w, c) + lepe
        return self.out_proj(o)


class EGFBlock(nn.Module):
    """HEMF's enhanced global feature block (``EGF_block``): post-norm decomposed MaSA layers.

    For each of the ``depth`` layers: ``x = norm1(x + MaSA_i(x)); x = norm2(x + fc_i(x))`` where
    ``MaSA_i`` is a :class:`ManhattanSelfAttention` and ``fc_i`` a Linear. As in the official code the
    two LayerNorms (eps 1e-6) are shared by all layers of the block; the rotary tables are computed once
    per forward and the decay of every layer comes from the same ``initial_value``/``heads_range``.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``, any ``H``, ``W``.

    Args:
        dim: channels ``C``.
        num_heads: attention heads (official: 8).
        depth: MaSA + Linear layers (HEMF uses 3 in every stage; the official class defaults to 1).
        initial_value: decay ``initial_value`` (official: 1).
        heads_range: decay ``heads_range`` (official: 3).
        mode: MaSA mode (official: ``"decomposed"``; ``"full"`` is RMT's 2-D variant).
        backend: kernel for :func:`~fusionblocks.ops.decay_attention`.
        learnable_decay: per-layer learnable ``log_gamma`` (official: fixed).
        eps: LayerNorm epsilon (official: 1e-6).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        depth: int = 3,
        *,
        initial_value: float = 1.0,
        heads_range: float = 3.0,
        mode: str = "decomposed",
        backend: Optional[str] = None,
        learnable_decay: bool = False,
        eps: float = 1e-6,
    ):
        super().__init__()
        name = type(self).__name__
        dim, num_heads = _expect_attention_args(name, dim, num_heads, mode, backend)
        initial_value, heads_range = _expect_decay_args(name, initial_value, heads_range)
        depth = expect_positive_int(name, "depth", depth)
        self.dim = dim
        self.num_heads = num_heads
        self.depth = depth
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.attn = nn.ModuleList(
            ManhattanSelfAttention(
                dim, num_heads, mode, initial_value, heads_range, backend=backend, learnable_decay=learnable_decay
            )
            for _ in range(depth)
        )
        self.fc = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        expect_nchw(type(self).__name__, "x", x, self.dim, like=self)
        x = x.permute(0, 2, 3, 1)
        h, w = x.shape[1:3]
        sin, cos = rotary_tables(h, w, self.attn[0].head_dim, x.device)
        for attn, fc in zip(self.attn, self.fc):
            x = self.norm1(x + attn.forward_channels_last(x, (sin, cos)))
            x = self.norm2(x + fc(x))
        return x.permute(0, 3, 1, 2)

    def official_key_rules(self) -> KeyRules:
        """Official ``EGF_block`` keys -> this block: ``VRC.i`` -> ``attn.i`` (with the MaSA renames), ``FC.i`` ->
        ``fc.i``; ``norm1``/``norm2`` keep their names. Use after :meth:`prepare_official`, which removes the
        rel-pos buffers."""
        layers = [
            prefix_rules(f"VRC.{i}.", f"attn.{i}.", *attn.official_key_rules(), rest=True)
            for i, attn in enumerate(self.attn)
        ]
        return join_rules(*layers, ([(r"FC\.(\d+)\.(.+)", r"fc.\1.\2")], []))

    def prepare_official(self, state_dict: Mapping[str, torch.Tensor], official_prefix: str = "") -> Dict[str, torch.Tensor]:
        """Check and remove the official ``RetNetRelPos2d.{angle,decay}`` buffers of this block.

        Both are recomputed here; a checkpoint whose buffers differ from this block's config (another
        head count, ``initial_value`` or ``heads_range``) raises. With ``learnable_decay`` the official
        decay becomes every layer's ``log_gamma`` (as ``{official_prefix}VRC.{i}.log_gamma``).

        Returns:
            A new dict without the two buffers (missing buffers are not an error: they carry no weights).

        Raises:
            ValueError: a buffer differs from the recomputed value (named, with both values).
        """
        sd = dict(state_dict)
        name = type(self).__name__
        angle = sd.pop(f"{official_prefix}RetNetRelPos2d.angle", None)
        decay = sd.pop(f"{official_prefix}RetNetRelPos2d.decay", None)
        ours_angle = rotary_angle(self.attn[0].head_dim)
        ours_decay = manhattan_log_decay(self.num_heads, self.attn[0].initial_value, self.attn[0].heads_range)
        for key, got, want in (("angle", angle, ours_angle), ("decay", decay, ours_decay)):
            if got is None:
                continue
            if tuple(got.shape) != tuple(want.shape) or not torch.allclose(got.float().cpu(), want, rtol=1e-5, atol=1e-6):
                raise ValueError(
                    f"{name}: official {official_prefix}RetNetRelPos2d.{key} does not match this block's config "
                    f"(num_heads={self.num_heads}, initial_value={self.attn[0].initial_value}, "
                    f"heads_range={self.attn[0].heads_range}): expected {want.tolist()}, got {got.tolist()}"
                )
        if self.attn[0].learnable_decay:
            value = decay.float() if decay is not None else ours_decay
            for i in range(self.depth):
                sd[f"{official_prefix}VRC.{i}.log_gamma"] = value.clone()
        return sd
