"""FLOP formulas of the fused kernels' ops, for ``torch.utils.flop_counter.FlopCounterMode``.

A fused kernel is one opaque op to the counter, which would count it as 0 FLOPs: a model's count would then
depend on which backend the automatic choice picked. Each op registered here counts what the reference
(:mod:`fusionblocks.ops.reference`, the spec) counts for the same call, so a count is a property of the model:

- forward: the two matrix products, ``QKᵀ`` and ``PV``: ``4 · B · heads · D`` per query and key it attends to;
  keys per query: ``H·W`` (full decay), ``H + W`` (decomposed: its row pass, then its column pass), ``ws²``
  over the grid padded to whole windows (window attention; the padded queries are computed too);
- backward: the four products of autograd's backward of those two (``dV``, ``dP``, ``dQ``, ``dK``): twice the
  forward; a kernel's recomputation of the forward is not counted (as in torch's count of its unfused SDPA; its
  formulas for the fused CUDA kernels add the recomputation).

Registered (``register_flop_formula``) by the modules that define the ops, when they are loaded. One op that is
torch's own is registered here: its CPU flash attention, which torch's counter does not count.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

FORWARD, BACKWARD = "forward", "backward"


def _keys_and_queries(mode: str, h: int, w: int, window_size: int = 0) -> tuple:
    """``(queries computed, keys per query)`` on an ``h x w`` grid."""
    if mode == "full":
        return h * w, h * w
    if mode == "decomposed":
        return h * w, h + w
    ph, pw = -(-h // window_size) * window_size, -(-w // window_size) * window_size
    return ph * pw, window_size * window_size


def attention_flops(mode: str, q_shape, h: int, w: int, window_size: int = 0, kind: str = FORWARD) -> int:
    """FLOPs of one attention call of ``mode`` (``"full"``, ``"decomposed"`` or ``"window"``) whose ``q`` has
    ``q_shape`` (any layout holding ``h*w`` tokens: ``B · heads · D`` is the rest) on an ``h x w`` grid."""
    per_token = math.prod(q_shape) // (h * w)  # B * heads * D
    queries, keys = _keys_and_queries(mode, h, w, window_size)
    fwd = 4 * per_token * queries * keys
    return fwd if kind == FORWARD else 2 * fwd


def register(ops: Iterable[tuple]) -> None:
    """Register ``(op packet, mode, kind)`` triples; the op's arguments are read by their schema names (``q``,
    ``H``/``h``, ``W``/``w``, ``window_size``). An op registered already (a module loaded twice) is left."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    for packet, mode, kind in ops:
        if packet in flop_registry:
            continue
        names = [a.name.lower() for a in packet.default._schema.arguments]

        def formula(*args, out_shape=None, _names=names, _mode=mode, _kind=kind, **kwargs) -> int:
            a = dict(zip(_names, args))
            a.update({k.lower(): v for k, v in kwargs.items()})
            return attention_flops(_mode, a["q"], int(a["h"]), int(a["w"]), int(a.get("window_size", 0)), _kind)

        register_flop_formula(packet)(formula)


def _register_torch_cpu_sdpa() -> None:
    """Count torch's CPU flash attention, what ``F.scaled_dot_product_attention`` runs on CPU (HATR's ViT), as
    torch counts its unfused (math) path: the two products forward, the four of their backward. torch's counter has
    formulas for its CUDA kernels only, so on CPU that attention counted 0 FLOPs and a model's count depended on its
    device. Left alone where torch registers the ops itself."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return 2 * sdpa_flop_count(query, key, value)

    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", forward),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", backward)):
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None and packet not in flop_registry:
            register_flop_formula(packet)(formula)


_register_torch_cpu_sdpa()


def op_packet(qualified: str) -> torch._ops.OpOverloadPacket:
    """``"namespace::name"`` as its ``torch.ops`` packet."""
    ns, name = qualified.split("::")
    return getattr(getattr(torch.ops, ns), name)
