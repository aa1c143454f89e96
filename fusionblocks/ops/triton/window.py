"""Triton shifted-window attention (Swin W-MSA / SW-MSA with relative-position bias), forward and backward.

One program handles one ``ws x ws`` window of one (batch, head), on a 1-D grid (any batch: CUDA's
grid y/z stop at 65535): the cyclic shift, the window partition and its reverse are address
arithmetic on the loads and the store, the relative-position bias is gathered from the
``((2ws-1)**2, heads)`` table once per call into a dense ``(heads, L, L)`` float32 tensor that every
program reads without index math, and the -100 shift mask is computed from token coordinates. The
map size ``H, W`` is a compile-time constant (one compile per stage), so the shift's modulo and the
window decomposition are divisions by constants. Nothing of size ``(nW, L, L)`` (``L = ws*ws``) is ever stored; the
forward saves only the per-row log-sum-exp ``(B, heads, H*W)`` in float32 for the backward.

The backward recomputes the scores. Each backward program walks a run of windows of one head and
sums ``dS`` over them in registers; the per-program ``(L, L)`` sums (a few hundred programs, not one
per window) are summed on the host and reduced into ``d(bias_table)`` by a padded segment sum over
the relative position index (a gather and a sum in a fixed order, no ``index_add_``), so the bias
gradient is deterministic and free of atomics.

The ops are registered with ``torch.library`` as ``fusionblocks::window_attention_fwd`` /
``fusionblocks::window_attention_bwd`` (custom ops with fake kernels and autograd; calls that need no
gradient use ``fusionblocks::window_attention_infer``, which skips the log-sum-exp), so they work
under ``torch.compile(fullgraph=True)``. On CPU they run under the Triton interpreter, which is how
the tests exercise them; ``TRITON_INTERPRET=1`` must be set before triton is imported, because the
kernels call ``triton.language``'s own jitted helpers (``tl.max``, ``tl.sum``), which triton builds at
import. The kernels are ``_common.lazy_jit``: built on first launch as the same kind as those helpers,
whether this module is imported before or after triton; the check reports the other cases.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import flops
from ..dispatch import register_backend
from ..reference import relative_position_index
from ._common import (SM90_MAX_SHARED, acc_dtype_of, compile_spec, device_reasons, lazy_jit, max_shared_bytes, memoized, next_pow2,
                      triton_built_interpreted, triton_ptr_type, tuning)

__all__ = ["window_attention_triton", "check_window_triton", "MIN_WINDOW", "MAX_WINDOW", "MIN_HEAD_DIM", "MAX_HEAD_DIM"]

MIN_WINDOW, MAX_WINDOW = 2, 12
MIN_HEAD_DIM, MAX_HEAD_DIM = 12, 128


def _interpreting() -> bool:
    """Whether these kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` when triton was imported)."""
    return triton_built_interpreted()


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------


@lazy_jit
def _window_fwd_kernel(
    Q, K, V, BIAS, O, LSE,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    NH, scale,
    H: tl.constexpr, W: tl.constexpr, D: tl.constexpr, WS: tl.constexpr, SHIFT: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, STORE_LSE: tl.constexpr,
):
    # one program per (batch, head, window) on a 1-D grid (2**31 - 1 programs; grid y/z stop at 65535)
    NWX: tl.constexpr = W // WS
    NWIN: tl.constexpr = (H // WS) * NWX
    L: tl.constexpr = WS * WS
    pid = tl.program_id(0)
    pid_bh = pid // NWIN
    pid_w = pid % NWIN
    b = pid_bh // NH
    hd = pid_bh % NH
    wy = pid_w // NWX
    wx = pid_w % NWX

    i = tl.arange(0, BLOCK_L)
    r = i // WS
    c = i % WS
    valid = i < L
    y = (wy * WS + r + SHIFT) % H
    x = (wx * WS + c + SHIFT) % W
    tok = (y * W + x).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    m2 = valid[:, None] & dmask[None, :]
    b64 = b.to(tl.int64)
    h64 = hd.to(tl.int64)

    q = tl.load(Q + b64 * sqb + h64 * sqh + tok[:, None] * sqn + d[None, :] * sqd, mask=m2, other=0.0)
    k = tl.load(K + b64 * skb + h64 * skh + tok[:, None] * skn + d[None, :] * skd, mask=m2, other=0.0)
    v = tl.load(V + b64 * svb + h64 * svh + tok[:, None] * svn + d[None, :] * svd, mask=m2, other=0.0)

    s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale
    if HAS_BIAS:  # (heads, L, L), gathered from the table once per call
        pair = valid[:, None] & valid[None, :]
        bias = tl.load(BIAS + (h64 * L + i[:, None]) * L + i[None, :], mask=pair, other=0.0)
        s = s + bias.to(ACC)
    if SHIFT > 0:
        ys = wy * WS + r
        xs = wx * WS + c
        reg = ((ys >= H - WS).to(tl.int32) + (ys >= H - SHIFT).to(tl.int32)) * 3 \
            + (xs >= W - WS).to(tl.int32) + (xs >= W - SHIFT).to(tl.int32)
        s = tl.where(reg[:, None] != reg[None, :], s - 100.0, s)
    s = tl.where(valid[None, :], s, float("-inf"))

    m = tl.max(s, axis=1)
    p = tl.exp(s - m[:, None])
    den = tl.sum(p, axis=1)
    p = p / den[:, None]
    o = tl.dot(p.to(v.dtype), v, input_precision=PREC, out_dtype=ACC)
    tl.store(O + b64 * sob + h64 * soh + tok[:, None] * son + d[None, :] * sod, o.to(O.dtype.element_ty), mask=m2)
    if STORE_LSE:
        lse = m + tl.log(den)
        tl.store(LSE + pid_bh.to(tl.int64) * (H * W) + tok, lse.to(LSE.dtype.element_ty), mask=valid)


@lazy_jit
def _window_bwd_kernel(
    Q, K, V, O, DO, LSE, BIAS, DQ, DK, DV, DB,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    sdb, sdh, sdn, sdd,
    NH, NWIN, WPP, scale,
    H: tl.constexpr, W: tl.constexpr, D: tl.constexpr, WS: tl.constexpr, SHIFT: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    hd = tl.program_id(0)
    pid_c = tl.program_id(1)
    L: tl.constexpr = WS * WS
    NWX: tl.constexpr = W // WS
    NWIN_B: tl.constexpr = (H // WS) * NWX

    i = tl.arange(0, BLOCK_L)
    r = i // WS
    c = i % WS
    valid = i < L
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    m2 = valid[:, None] & dmask[None, :]
    h64 = hd.to(tl.int64)
    pair = valid[:, None] & valid[None, :]
    if HAS_BIAS:
        bias = tl.load(BIAS + (h64 * L + i[:, None]) * L + i[None, :], mask=pair, other=0.0).to(ACC)
    dbias = tl.zeros([BLOCK_L, BLOCK_L], dtype=ACC)

    start = pid_c * WPP
    end = tl.minimum(start + WPP, NWIN)
    for t in range(start, end):
        b = t // NWIN_B
        wid = t % NWIN_B
        wy = wid // NWX
        wx = wid % NWX
        y = (wy * WS + r + SHIFT) % H
        x = (wx * WS + c + SHIFT) % W
        tok = (y * W + x).to(tl.int64)
        b64 = b.to(tl.int64)

        q = tl.load(Q + b64 * sqb + h64 * sqh + tok[:, None] * sqn + d[None, :] * sqd, mask=m2, other=0.0)
        k = tl.load(K + b64 * skb + h64 * skh + tok[:, None] * skn + d[None, :] * skd, mask=m2, other=0.0)
        v = tl.load(V + b64 * svb + h64 * svh + tok[:, None] * svn + d[None, :] * svd, mask=m2, other=0.0)
        o = tl.load(O + b64 * sob + h64 * soh + tok[:, None] * son + d[None, :] * sod, mask=m2, other=0.0)
        do = tl.load(DO + b64 * sdb + h64 * sdh + tok[:, None] * sdn + d[None, :] * sdd, mask=m2, other=0.0)
        lse = tl.load(LSE + (b64 * NH + h64) * (H * W) + tok, mask=valid, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale
        if HAS_BIAS:
            s = s + bias
        if SHIFT > 0:
            ys = wy * WS + r
            xs = wx * WS + c
            reg = ((ys >= H - WS).to(tl.int32) + (ys >= H - SHIFT).to(tl.int32)) * 3 \
                + (xs >= W - WS).to(tl.int32) + (xs >= W - SHIFT).to(tl.int32)
            s = tl.where(reg[:, None] != reg[None, :], s - 100.0, s)
        p = tl.exp(s - lse[:, None].to(ACC))
        p = tl.where(pair, p, 0.0)

        dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC, out_dtype=ACC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        delta = tl.sum(do.to(ACC) * o.to(ACC), axis=1)
        ds = p * (dp - delta[:, None])
        if HAS_BIAS:
            dbias += ds
        dsq = ds.to(q.dtype)
        dq = tl.dot(dsq, k, input_precision=PREC, out_dtype=ACC) * scale
        dk = tl.dot(tl.trans(dsq), q, input_precision=PREC, out_dtype=ACC) * scale
        base = (b64 * NH + h64) * (H * W * D)
        optr = base + tok[:, None] * D + d[None, :]
        tl.store(DQ + optr, dq.to(DQ.dtype.element_ty), mask=m2)
        tl.store(DK + optr, dk.to(DK.dtype.element_ty), mask=m2)
        tl.store(DV + optr, dv.to(DV.dtype.element_ty), mask=m2)

    if HAS_BIAS:
        off = ((pid_c.to(tl.int64) * NH + h64) * L + i[:, None]) * L + i[None, :]
        tl.store(DB + off, dbias, mask=pair)


@functools.lru_cache(maxsize=32)
def _rel_index(ws: int, device: torch.device) -> torch.Tensor:
    return relative_position_index(ws, device).reshape(-1)


@functools.lru_cache(maxsize=32)
def _table_segments(ws: int, device: torch.device) -> torch.Tensor:
    """``((2ws-1)**2, ws*ws)`` int64: for every bias-table row, the flat ``(i, j)`` pairs of a window that read it.

    A row ``(dy, dx)`` is read by ``(ws - |dy|) * (ws - |dx|)`` pairs; shorter lists are padded with
    ``L*L`` (a zero row appended to the pair sums). Summing the gathered rows along dim 1 reduces the
    pair gradients into the table in a fixed order: deterministic, unlike ``index_add_`` (atomics on CUDA).
    """
    idx = relative_position_index(ws, "cpu").reshape(-1)
    n_rows, n_pairs = (2 * ws - 1) ** 2, ws * ws * ws * ws
    order = torch.argsort(idx, stable=True)
    counts = torch.bincount(idx, minlength=n_rows)
    starts = torch.cumsum(counts, 0) - counts
    seg = torch.full((n_rows, ws * ws), n_pairs, dtype=torch.int64)
    rank = torch.arange(n_pairs) - starts[idx[order]]
    seg[idx[order], rank] = order
    return seg.to(device)


def _dense_bias(table: torch.Tensor, ws: int, acc: torch.dtype) -> torch.Tensor:
    """The table gathered once per call into ``(heads, L, L)`` contiguous ``acc``: the kernels load it without index math."""
    big_l = ws * ws
    return table.detach().to(acc)[_rel_index(ws, table.device)].t().reshape(table.shape[1], big_l, big_l).contiguous()


def _table_grad(pair: torch.Tensor, ws: int) -> torch.Tensor:
    """``(heads, L*L)`` per-pair bias gradients -> ``((2ws-1)**2, heads)`` table gradient, deterministically."""
    rows = torch.cat([pair.t(), pair.new_zeros((1, pair.shape[0]))])  # (L*L + 1, heads); the last row pads
    return rows[_table_segments(ws, pair.device)].sum(1)


def _config(dtype: torch.dtype, d: int, ws: int, backward: bool) -> dict:
    """Constexprs and launch options of a kernel for head dim ``d``, window ``ws`` and ``dtype`` inputs.

    A pure function of its arguments: the launchers and :func:`compile_specs` both use it.
    """
    block_l, block_d = next_pow2(ws * ws), next_pow2(d)
    prec = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
    # the backward's loop over windows is not worth software pipelining: one stage saves registers
    # (float32 ws 7 d32: 42 spills at 3 stages, none at 1)
    return dict(BLOCK_L=block_l, BLOCK_D=block_d, PREC=prec, ACC=acc_dtype_of(dtype),
                num_warps=_num_warps(block_l, block_d, dtype, backward), num_stages=1 if backward else 3)


def _num_warps(block_l: int, block_d: int, dtype: torch.dtype, backward: bool) -> int:
    # sm_90 cross-compiles (benchmarks/results/triton-sm90-resources.md): at 4 warps the 64-token tiles
    # (ws 6-8) spill, e.g. float32 forward d32 486 spills, bfloat16 backward d32 48 spills; 16 warps is worse.
    return 4 if block_l <= 32 else 8


def shared_estimate(dtype: torch.dtype, d: int, ws: int, backward: bool) -> int:
    """Upper bound on the shared memory (bytes per block) of the kernel for ``dtype``, head dim ``d``, window ``ws``.

    One float32 ``L x L`` score tile for layout conversions plus three (forward) or five (backward)
    ``L x D`` operand tiles (``L``, ``D`` padded to powers of two). Calibrated as an upper bound on
    cross-compiles for sm_80 and sm_90; ``tests/ops/test_triton_aot.py`` checks it against every
    compiled configuration.
    """
    cfg = _config(dtype, d, ws, backward)
    big_l, block_d = cfg["BLOCK_L"], cfg["BLOCK_D"]
    e = torch.empty((), dtype=dtype).element_size()
    return 4 * big_l * big_l + (5 if backward else 3) * e * big_l * block_d


@memoized
def gpu_reasons(dtype: torch.dtype, d: int, ws: int, shared_limit: Optional[int] = None) -> List[str]:
    """Reasons the kernels cannot run ``dtype`` windows of ``ws`` with head dim ``d`` on a GPU.

    One program holds a whole ``ws*ws`` window (padded to a power of two) in registers and shared
    memory, so a window whose :func:`shared_estimate` (forward or backward) exceeds ``shared_limit``
    (bytes per block, the device's opt-in limit; ``None``: sm_90's 227 KB) cannot run: on sm_90,
    window 12 (256-token tiles); on sm_86/89 (99 KB) and the T4 (64 KB) also smaller windows and
    head dims. float32 (IEEE dots on FMA units) is limited to window 8 and head dim 64: sm_90
    cross-compiles of the backward at ws 6-8 with head dim 65-128 needed 337 KB and spilled 2848
    registers (at 3 stages), and at ws 9-11 even the forward spills. Memoized (:func:`memoized`): the support
    check asks on every call.
    """
    if dtype == torch.float32 and (ws * ws > 64 or d > 64):
        return [f"float32 window_attention on GPU supports window_size <= 8 and head dim <= 64 (registers), "
                f"got window_size {ws}, head dim {d}; use float16/bfloat16"]
    limit = SM90_MAX_SHARED if shared_limit is None else shared_limit
    need = max(shared_estimate(dtype, d, ws, False), shared_estimate(dtype, d, ws, True))
    if need > limit:
        return [f"window_size {ws} with head dim {d} in {str(dtype).replace('torch.', '')} needs about {need // 1024} KB "
                f"of shared memory per block (forward and backward), over this GPU's {limit // 1024} KB"]
    return []


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------


MAX_PROGRAMS = 2**31 - 1
"""Programs of a 1-D launch grid (CUDA's grid x limit)."""


def _acc_torch(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_launch(q, k, v, table, h, w, ws, shift, scale, store_lse: bool = True):
    b, nh, n, d = q.shape
    out = torch.empty((b, nh, n, d), device=q.device, dtype=q.dtype)
    acc = _acc_torch(q.dtype)
    lse = torch.empty((b, nh, n) if store_lse else (0,), device=q.device, dtype=acc)
    cfg = _config(q.dtype, d, ws, backward=False)
    has_bias = table is not None
    bias = _dense_bias(table, ws, acc) if has_bias else lse
    grid = (b * nh * (h // ws) * (w // ws),)
    _window_fwd_kernel[grid](
        q, k, v, bias, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        nh, float(scale),
        H=h, W=w, D=d, WS=ws, SHIFT=shift, HAS_BIAS=has_bias, STORE_LSE=store_lse, **cfg,
    )
    return out, lse


def _windows_per_program(n_windows: int, heads: int, device: torch.device) -> int:
    """Windows each backward program walks: about ``tuning("window_backward_programs_per_sm")`` programs per SM
    (fewer windows per program: more programs in flight, more bias-gradient partials to sum)."""
    per_sm = tuning("window_backward_programs_per_sm")
    if device.type == "cuda":
        target = per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = per_sm
    chunks = max(1, target // max(1, heads))  # heads = 0: an empty launch
    return max(1, triton.cdiv(n_windows, chunks))


def _bwd_launch(do, q, k, v, out, lse, table, h, w, ws, shift, scale, wpp: Optional[int] = None):
    b, nh, n, d = q.shape
    dq = torch.empty((b, nh, n, d), device=q.device, dtype=q.dtype)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    cfg = _config(q.dtype, d, ws, backward=True)
    if tuning("window_backward_num_warps"):
        cfg["num_warps"] = tuning("window_backward_num_warps")
    n_windows = b * (h // ws) * (w // ws)
    wpp = wpp or _windows_per_program(n_windows, nh, q.device)
    chunks = triton.cdiv(n_windows, wpp)
    has_bias = table is not None
    acc = _acc_torch(q.dtype)
    big_l = ws * ws
    part = torch.empty((chunks, nh, big_l, big_l) if has_bias else (1,), device=q.device, dtype=acc)
    bias = _dense_bias(table, ws, acc) if has_bias else part
    _window_bwd_kernel[(nh, chunks)](
        q, k, v, out, do, lse, bias, dq, dk, dv, part,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *do.stride(),
        nh, n_windows, wpp, float(scale),
        H=h, W=w, D=d, WS=ws, SHIFT=shift, HAS_BIAS=has_bias, **cfg,
    )
    if not has_bias:
        return dq, dk, dv, q.new_empty((0,))
    dtable = _table_grad(part.sum(0).reshape(nh, big_l * big_l), ws)
    return dq, dk, dv, dtable.to(table.dtype)


_IO_ARGS = frozenset({"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"})
_F32_PTRS = frozenset({"LSE", "DB", "BIAS"})
_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _signature(kernel: str, dtype: torch.dtype) -> dict:
    code = (_window_fwd_kernel if kernel == "_window_fwd_kernel" else _window_bwd_kernel).fn.__code__
    args = code.co_varnames[: code.co_argcount]
    io = triton_ptr_type(dtype)
    return {a: io if a in _IO_ARGS else "*fp32" if a in _F32_PTRS else "fp32" if a == "scale" else "i32"
            for a in args}


def compile_specs(all_flags: bool = False, shared_limit: Optional[int] = None) -> List[dict]:
    """The distinct kernel configurations :func:`_config` chooses on a GPU, for ``_common.cross_compile``.

    Runs every dtype (float32, float16, bfloat16), window size, shift and head dim the backend accepts
    on a GPU (:func:`gpu_reasons` empty) through :func:`_config` and keeps one spec per distinct tile
    configuration, kernel and constexpr
    flag set; ``D``, ``WS`` and the shift amount change only masks and constants within a tile, so
    each spec compiles the largest ``ws`` and ``d`` of its group (its label lists the group). Flags:
    ``HAS_BIAS`` and ``SHIFT > 0`` both on and both off (``all_flags``: every combination), with and
    without the log-sum-exp store for the forward (training vs ``_infer``).
    """
    flag_sets = [(True, True), (False, False)] + ([(True, False), (False, True)] if all_flags else [])
    groups: dict = {}
    for dtype in _GPU_DTYPES:
        for ws in range(MIN_WINDOW, MAX_WINDOW + 1):
            for d in range(MIN_HEAD_DIM, MAX_HEAD_DIM + 1):
                if gpu_reasons(dtype, d, ws, shared_limit):
                    continue
                for kernel, backward, lse in (("_window_fwd_kernel", False, True), ("_window_fwd_kernel", False, False),
                                              ("_window_bwd_kernel", True, None)):
                    cfg = _config(dtype, d, ws, backward)
                    for bias, shifted in flag_sets:
                        key = (kernel, lse, dtype, bias, shifted, tuple(sorted((k, str(v)) for k, v in cfg.items())))
                        g = groups.setdefault(key, dict(ws=[], d=[], cfg=cfg))
                        g["ws"].append(ws)
                        g["d"].append(d)
    specs = []
    for (kernel, lse, dtype, bias, shifted, _), g in groups.items():
        ws, d, cfg = max(g["ws"]), max(g["d"]), dict(g["cfg"])
        opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages", 3))
        # H and W are constexprs (compiled once per map size); 8 windows a side stands for them here
        consts = dict(H=8 * ws, W=8 * ws, D=d, WS=ws, SHIFT=ws // 2 if shifted else 0, HAS_BIAS=bias, **cfg)
        name = "fwd" if lse is None or lse else "infer"
        if kernel == "_window_bwd_kernel":
            name = "bwd"
        else:
            consts["STORE_LSE"] = lse
        label = (f"ws {min(g['ws'])}-{ws} d {min(g['d'])}-{d} "
                 f"{'bias' if bias else 'no-bias'} {'shift' if shifted else 'no-shift'}")
        specs.append(compile_spec(__name__, kernel, label, dtype, _signature(kernel, dtype), consts,
                                  group=f"window {name}", **opts))
    return specs


# --------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("fusionblocks::window_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: Optional[torch.Tensor],
    h: int, w: int, window_size: int, shift: int, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _fwd_launch(q, k, v, bias_table, h, w, window_size, shift, scale)


@_fwd_op.register_fake
def _(q, k, v, bias_table, h, w, window_size, shift, scale):
    b, nh, n, d = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((b, nh, n, d)), q.new_empty((b, nh, n), dtype=lse_dtype)


@torch.library.custom_op("fusionblocks::window_attention_infer", mutates_args=())
def _infer_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: Optional[torch.Tensor],
    h: int, w: int, window_size: int, shift: int, scale: float,
) -> torch.Tensor:
    return _fwd_launch(q, k, v, bias_table, h, w, window_size, shift, scale, store_lse=False)[0]


@_infer_op.register_fake
def _(q, k, v, bias_table, h, w, window_size, shift, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("fusionblocks::window_attention_bwd", mutates_args=())
def _bwd_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, bias_table: Optional[torch.Tensor],
    h: int, w: int, window_size: int, shift: int, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_launch(grad_out, q, k, v, out, lse, bias_table, h, w, window_size, shift, scale)


@_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, bias_table, h, w, window_size, shift, scale):
    b, nh, n, d = q.shape
    g = q.new_empty((b, nh, n, d))
    dt = bias_table.new_empty(bias_table.shape) if bias_table is not None else q.new_empty((0,))
    return g, q.new_empty((b, nh, n, d)), q.new_empty((b, nh, n, d)), dt


def _setup_context(ctx, inputs, output):
    q, k, v, bias_table, h, w, window_size, shift, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias_table)
    ctx.cfg = (h, w, window_size, shift, scale)
    ctx.has_bias = bias_table is not None
    ctx.mark_non_differentiable(lse)  # the softmax statistic saved for the backward, not a result


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, bias_table = ctx.saved_tensors
    if not ctx.has_bias:
        bias_table = None
    dq, dk, dv, dtable = _bwd_op(grad_out, q, k, v, out, lse, bias_table, *ctx.cfg)
    return dq, dk, dv, (dtable if ctx.has_bias else None), None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
flops.register([(flops.op_packet("fusionblocks::window_attention_fwd"), "window", flops.FORWARD),
                (flops.op_packet("fusionblocks::window_attention_infer"), "window", flops.FORWARD),
                (flops.op_packet("fusionblocks::window_attention_bwd"), "window", flops.BACKWARD)])


# --------------------------------------------------------------------------------------------------
# backend
# --------------------------------------------------------------------------------------------------


def check_window_triton(q, k, v, bias_table, *, hw, window_size, shift, scale, auto: bool = False) -> List[str]:
    """Reasons the Triton backend cannot run this (validated) call; empty when it can."""
    reasons = device_reasons(q, auto=auto, what="triton window_attention")
    if q.device.type == "cuda" and not reasons:
        reasons += gpu_reasons(q.dtype, q.shape[-1], window_size, max_shared_bytes(q.device))
    programs = q.shape[0] * q.shape[1] * (hw[0] // window_size) * (hw[1] // window_size)
    if programs > MAX_PROGRAMS:
        reasons.append(f"B*heads*windows = {programs} exceeds the launch grid limit {MAX_PROGRAMS}")
    if not MIN_WINDOW <= window_size <= MAX_WINDOW:
        reasons.append(f"window_size {window_size} outside the supported {MIN_WINDOW}..{MAX_WINDOW}")
    d = q.shape[-1]
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        reasons.append(f"head dim {d} outside the supported {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    return reasons


@register_backend("window_attention", "triton", priority=20, check=check_window_triton)
def window_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: Optional[torch.Tensor], *,
    hw: Tuple[int, int], window_size: int, shift: int = 0, scale: float,
) -> torch.Tensor:
    """Fused shifted-window attention; same math and layout as :func:`fusionblocks.ops.reference.window_attention`.

    Args:
        q, k, v: ``(B, heads, H*W, D)`` raster order, any strides.
        bias_table: ``((2ws-1)**2, heads)`` or ``None``.
        hw: ``(H, W)``, multiples of ``window_size``.
        window_size: window side, 2..12.
        shift: cyclic shift in ``[0, window_size)``.
        scale: multiplies ``q k^T`` (the public op resolves ``None`` to ``D ** -0.5``).

    Returns:
        ``(B, heads, H*W, D)`` contiguous, raster order, dtype of ``q``.
    """
    h, w = hw
    tensors = (q, k, v) if bias_table is None else (q, k, v, bias_table)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return _infer_op(q, k, v, bias_table, h, w, window_size, shift, scale)
    out, _ = _fwd_op(q, k, v, bias_table, h, w, window_size, shift, scale)
    return out
