"""Triton Manhattan-decay attention (RMT's MaSA): full 2-D and decomposed, forward and backward.

Flash-style kernels: scores are never stored. The decay ``log_gamma[h] * (|dy| + |dx|)`` is computed
inside the kernel from token indices (row ``n // W``, column ``n % W``); the forward keeps only the
log-sum-exp of every query row and the backward recomputes the probabilities from it.

One set of kernels serves both modes. A *line* is a run of ``N_CTX`` tokens at token offsets
``line * LINE_OFF + i * TOK_STEP``; attention runs within each line:

- full: one line of ``H*W`` tokens, distance ``|i//W - j//W| + |i%W - j%W|``;
- decomposed, row pass: ``H`` lines of ``W`` tokens (step 1), distance ``|i - j|``;
- decomposed, column pass: ``W`` lines of ``H`` tokens (step ``W``), distance ``|i - j|``, over the
  row pass's output.

Lines are addressed through strides, so the column pass needs no transpose and inputs of any
layout are read in place. The backward of a line that fits one tile (up to 64 tokens: every
decomposed line of HEMF, and full attention on maps up to 8x8) is one fused kernel that computes
the probabilities once for dQ, dK and dV; longer lines use a dK/dV kernel and a dQ kernel.
Registered as ``torch.ops.fusionblocks.decay_attention_full`` and
``torch.ops.fusionblocks.decay_attention_decomposed`` (``torch.library.custom_op`` with fake and
autograd registrations), and as the ``"triton"`` backend of ``fusionblocks.ops.decay_attention``.
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import flops
from ..dispatch import register_backend
from ._common import (SM90_MAX_SHARED, acc_dtype_of, compile_spec, device_reasons, lazy_jit, max_shared_bytes, memoized, next_pow2,
                      triton_built_interpreted, triton_ptr_type, tuning)

__all__ = ["decay_attention_triton", "SUPPORTED_MAX_HEAD_DIM"]

SUPPORTED_MAX_HEAD_DIM = 128
MAX_PROGRAMS = 2**31 - 1
"""Programs of a 1-D launch grid (CUDA's grid x limit); every kernel here launches at most one per token."""


# --------------------------------------------------------------------------------------------
# kernels


@lazy_jit
def _decay_fwd_kernel(
    Q, K, V, LG, SCALE, O, LSE,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    NH, NLINES, N_CTX, N_TOT, LINE_OFF, TOK_STEP, NUM_M,
    W: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    # 1-D grid: (batch, head, line) major, query block minor (any batch: grid y/z stop at 65535)
    pid = tl.program_id(0) // NUM_M
    start_m = tl.program_id(0) % NUM_M
    bh = pid // NLINES
    line = pid % NLINES
    b = (bh // NH).to(tl.int64)
    h = (bh % NH).to(tl.int64)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    O += b * sob + h * soh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_CTX
    mask_d = offs_d < D
    line64 = line.to(tl.int64) * LINE_OFF  # token offsets in int64: tokens x strides can pass 2**31
    tok_m = line64 + offs_m.to(tl.int64) * TOK_STEP
    ym = offs_m // W
    xm = offs_m % W

    q = tl.load(Q + tok_m[:, None] * sqn + offs_d[None, :] * sqd, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    lg = tl.load(LG + h).to(ACC)
    scale = tl.load(SCALE).to(ACC)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, N_CTX, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_CTX
        tok_n = line64 + offs_n.to(tl.int64) * TOK_STEP
        kt = tl.load(K + tok_n[None, :] * skn + offs_d[:, None] * skd, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PREC, out_dtype=ACC) * scale
        yn = offs_n // W
        xn = offs_n % W
        dist = tl.abs(ym[:, None] - yn[None, :]) + tl.abs(xm[:, None] - xn[None, :])
        s = s + lg * dist.to(ACC)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + tok_n[:, None] * svn + offs_d[None, :] * svd, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty), v, input_precision=PREC, out_dtype=ACC)
        m_i = m_new

    o = acc / l_i[:, None]
    tl.store(O + tok_m[:, None] * son + offs_d[None, :] * sod, o.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + bh.to(tl.int64) * N_TOT + tok_m, m_i + tl.log(l_i), mask=mask_m)


@lazy_jit
def _decay_delta_kernel(
    O, DO, DELTA,
    sob, soh, son, sod,
    sdb, sdh, sdn, sdd,
    NH, N_TOT, NUM_M,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    bh = tl.program_id(0) // NUM_M
    start_m = tl.program_id(0) % NUM_M
    b = (bh // NH).to(tl.int64)
    h = (bh % NH).to(tl.int64)
    offs_m = (start_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N_TOT)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, mask=mask, other=0.0).to(ACC)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd, mask=mask, other=0.0).to(ACC)
    tl.store(DELTA + bh.to(tl.int64) * N_TOT + offs_m, tl.sum(o * do, 1), mask=offs_m < N_TOT)


@lazy_jit
def _decay_bwd_dkdv_kernel(
    Q, K, V, LG, SCALE, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod,
    sdkb, sdkh, sdkn, sdkd,
    sdvb, sdvh, sdvn, sdvd,
    NH, NLINES, N_CTX, N_TOT, LINE_OFF, TOK_STEP, NUM_N,
    W: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, ACCUM_DK: tl.constexpr,
):
    pid = tl.program_id(0) // NUM_N
    start_n = tl.program_id(0) % NUM_N
    bh = pid // NLINES
    line = pid % NLINES
    b = (bh // NH).to(tl.int64)
    h = (bh % NH).to(tl.int64)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sdob + h * sdoh
    DK += b * sdkb + h * sdkh
    DV += b * sdvb + h * sdvh
    LSE += bh.to(tl.int64) * N_TOT
    DELTA += bh.to(tl.int64) * N_TOT

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N_CTX
    mask_d = offs_d < D
    mask_nd = mask_n[:, None] & mask_d[None, :]
    line64 = line.to(tl.int64) * LINE_OFF  # token offsets in int64: tokens x strides can pass 2**31
    tok_n = line64 + offs_n.to(tl.int64) * TOK_STEP
    yn = offs_n // W
    xn = offs_n % W

    k = tl.load(K + tok_n[:, None] * skn + offs_d[None, :] * skd, mask=mask_nd, other=0.0)
    v = tl.load(V + tok_n[:, None] * svn + offs_d[None, :] * svd, mask=mask_nd, other=0.0)
    lg = tl.load(LG + h).to(ACC)
    scale = tl.load(SCALE).to(ACC)

    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for start_m in range(0, N_CTX, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N_CTX
        tok_m = line64 + offs_m.to(tl.int64) * TOK_STEP
        qt = tl.load(Q + tok_m[None, :] * sqn + offs_d[:, None] * sqd, mask=mask_d[:, None] & mask_m[None, :], other=0.0)
        do = tl.load(DO + tok_m[:, None] * sdon + offs_d[None, :] * sdod, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        lse = tl.load(LSE + tok_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + tok_m, mask=mask_m, other=0.0)
        st = tl.dot(k, qt, input_precision=PREC, out_dtype=ACC) * scale
        ym = offs_m // W
        xm = offs_m % W
        dist = tl.abs(yn[:, None] - ym[None, :]) + tl.abs(xn[:, None] - xm[None, :])
        st = st + lg * dist.to(ACC)
        pt = tl.exp(st - lse[None, :])
        pt = tl.where(mask_m[None, :], pt, 0.0)
        dv += tl.dot(pt.to(DO.dtype.element_ty), do, input_precision=PREC, out_dtype=ACC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC, out_dtype=ACC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(Q.dtype.element_ty), tl.trans(qt), input_precision=PREC, out_dtype=ACC)

    dk = dk * scale
    dk_ptrs = DK + tok_n[:, None] * sdkn + offs_d[None, :] * sdkd
    if ACCUM_DK:
        dk += tl.load(dk_ptrs, mask=mask_nd, other=0.0).to(ACC)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + tok_n[:, None] * sdvn + offs_d[None, :] * sdvd, dv.to(DV.dtype.element_ty), mask=mask_nd)


@lazy_jit
def _decay_bwd_dq_kernel(
    Q, K, V, LG, SCALE, DO, LSE, DELTA, DQ, DLG,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod,
    sdqb, sdqh, sdqn, sdqd,
    NH, NLINES, N_CTX, N_TOT, LINE_OFF, TOK_STEP, NUM_M,
    W: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, ACCUM_DQ: tl.constexpr, WITH_DLG: tl.constexpr,
):
    pid = tl.program_id(0) // NUM_M
    start_m = tl.program_id(0) % NUM_M
    bh = pid // NLINES
    line = pid % NLINES
    b = (bh // NH).to(tl.int64)
    h = (bh % NH).to(tl.int64)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sdob + h * sdoh
    DQ += b * sdqb + h * sdqh
    LSE += bh.to(tl.int64) * N_TOT
    DELTA += bh.to(tl.int64) * N_TOT

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_CTX
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    line64 = line.to(tl.int64) * LINE_OFF  # token offsets in int64: tokens x strides can pass 2**31
    tok_m = line64 + offs_m.to(tl.int64) * TOK_STEP
    ym = offs_m // W
    xm = offs_m % W

    q = tl.load(Q + tok_m[:, None] * sqn + offs_d[None, :] * sqd, mask=mask_md, other=0.0)
    do = tl.load(DO + tok_m[:, None] * sdon + offs_d[None, :] * sdod, mask=mask_md, other=0.0)
    lse = tl.load(LSE + tok_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + tok_m, mask=mask_m, other=0.0)
    lg = tl.load(LG + h).to(ACC)
    scale = tl.load(SCALE).to(ACC)

    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    pd_dp = tl.zeros([BLOCK_M], ACC)
    pd_sum = tl.zeros([BLOCK_M], ACC)
    p_dp = tl.zeros([BLOCK_M], ACC)
    for start_n in range(0, N_CTX, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_CTX
        tok_n = line64 + offs_n.to(tl.int64) * TOK_STEP
        kt = tl.load(K + tok_n[None, :] * skn + offs_d[:, None] * skd, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        vt = tl.load(V + tok_n[None, :] * svn + offs_d[:, None] * svd, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PREC, out_dtype=ACC) * scale
        yn = offs_n // W
        xn = offs_n % W
        dist = (tl.abs(ym[:, None] - yn[None, :]) + tl.abs(xm[:, None] - xn[None, :])).to(ACC)
        s = s + lg * dist
        p = tl.exp(s - lse[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(K.dtype.element_ty), tl.trans(kt), input_precision=PREC, out_dtype=ACC)
        if WITH_DLG:
            pd = p * dist
            pd_dp += tl.sum(pd * dp, 1)
            pd_sum += tl.sum(pd, 1)
            p_dp += tl.sum(p * dp, 1)

    dq = dq * scale
    dq_ptrs = DQ + tok_m[:, None] * sdqn + offs_d[None, :] * sdqd
    if ACCUM_DQ:
        dq += tl.load(dq_ptrs, mask=mask_md, other=0.0).to(ACC)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask_md)
    if WITH_DLG:
        # sum_j dS_ij dist_ij with row i's delta recomputed as sum_j P_ij dP_ij, so that the rows of
        # dS sum to zero exactly; DELTA (from the rounded output) would leak its rounding times the
        # mean distance into this sum.
        tl.store(DLG + pid.to(tl.int64) * NUM_M + start_m, tl.sum(pd_dp - p_dp * pd_sum, 0))


@lazy_jit
def _decay_bwd_fused_kernel(
    Q, K, V, LG, SCALE, DO, LSE, DELTA, DQ, DK, DV, DLG,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod,
    sdqb, sdqh, sdqn, sdqd,
    sdkb, sdkh, sdkn, sdkd,
    sdvb, sdvh, sdvn, sdvd,
    NH, NLINES, N_CTX, N_TOT, LINE_OFF, TOK_STEP,
    W: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, ACCUM: tl.constexpr, WITH_DLG: tl.constexpr,
):
    # one program per (batch, head, line), the whole line in one tile: the scores, probabilities and dP
    # are computed once for dQ, dK and dV (the split kernels compute them twice) and q, k, v, dO read once
    pid = tl.program_id(0)
    bh = pid // NLINES
    line = pid % NLINES
    b = (bh // NH).to(tl.int64)
    h = (bh % NH).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs < N_CTX
    mask_nd = mask[:, None] & (offs_d < D)[None, :]
    tok = line.to(tl.int64) * LINE_OFF + offs.to(tl.int64) * TOK_STEP  # int64: tokens x strides can pass 2**31
    y = offs // W
    x = offs % W

    q = tl.load(Q + b * sqb + h * sqh + tok[:, None] * sqn + offs_d[None, :] * sqd, mask=mask_nd, other=0.0)
    k = tl.load(K + b * skb + h * skh + tok[:, None] * skn + offs_d[None, :] * skd, mask=mask_nd, other=0.0)
    v = tl.load(V + b * svb + h * svh + tok[:, None] * svn + offs_d[None, :] * svd, mask=mask_nd, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + tok[:, None] * sdon + offs_d[None, :] * sdod, mask=mask_nd, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * N_TOT + tok, mask=mask, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * N_TOT + tok, mask=mask, other=0.0)
    lg = tl.load(LG + h).to(ACC)
    scale = tl.load(SCALE).to(ACC)

    s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale
    dist = (tl.abs(y[:, None] - y[None, :]) + tl.abs(x[:, None] - x[None, :])).to(ACC)
    s = s + lg * dist
    p = tl.exp(s - lse[:, None])
    p = tl.where(mask[:, None] & mask[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
    ds = p * (dp - delta[:, None])
    dv = tl.dot(tl.trans(p.to(DO.dtype.element_ty)), do, input_precision=PREC, out_dtype=ACC)
    ds16 = ds.to(Q.dtype.element_ty)
    dk = tl.dot(tl.trans(ds16), q, input_precision=PREC, out_dtype=ACC) * scale
    dq = tl.dot(ds16, k, input_precision=PREC, out_dtype=ACC) * scale

    dq_ptrs = DQ + b * sdqb + h * sdqh + tok[:, None] * sdqn + offs_d[None, :] * sdqd
    dk_ptrs = DK + b * sdkb + h * sdkh + tok[:, None] * sdkn + offs_d[None, :] * sdkd
    if ACCUM:
        dq += tl.load(dq_ptrs, mask=mask_nd, other=0.0).to(ACC)
        dk += tl.load(dk_ptrs, mask=mask_nd, other=0.0).to(ACC)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask_nd)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + b * sdvb + h * sdvh + tok[:, None] * sdvn + offs_d[None, :] * sdvd, dv.to(DV.dtype.element_ty),
             mask=mask_nd)
    if WITH_DLG:
        # sum_ij dS_ij dist_ij with each row's delta recomputed from P and dP (see _decay_bwd_dq_kernel)
        pd = p * dist
        row = tl.sum(pd * dp, 1) - tl.sum(p * dp, 1) * tl.sum(pd, 1)
        tl.store(DLG + pid.to(tl.int64), tl.sum(row, 0))


# --------------------------------------------------------------------------------------------
# launchers


def _strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


def _lines(h: int, w: int, kind: str) -> Tuple[int, int, int, int, int]:
    """``(NLINES, N_CTX, W, LINE_OFF, TOK_STEP)`` of one attention pass over an ``h x w`` grid."""
    if kind == "full":
        return 1, h * w, w, 0, 1
    if kind == "rows":
        return h, w, w, w, 1
    return w, h, h, 1, w  # columns


def shared_estimate(cfg: dict, dtype: torch.dtype, kernel: str = "fwd") -> int:
    """Upper bound on the shared memory (bytes per block) of decay kernel ``kernel`` (``fwd``, ``dq``, ``dkdv``,
    ``fused``) with ``cfg``.

    The tiles each kernel keeps for its whole loop (fwd: Q; dq: Q, dO; dkdv: K, V), the tiles its
    loop loads, buffered ``num_stages - 1`` times (fwd, dq: K, V; dkdv: Q, dO, plus Q's transpose),
    the probability tile as a dot operand and one float32 tile of layout-conversion scratch; the
    fused backward (one tile, no loop) keeps Q, K, V, dO, P and dS.
    Calibrated as an upper bound on cross-compiles for sm_80 and sm_90;
    ``tests/ops/test_triton_aot.py`` checks it against every configuration it compiles.
    """
    e = torch.empty((), dtype=dtype).element_size()
    bn, bd = cfg["BLOCK_N"], cfg["BLOCK_D"]
    bm = cfg.get("BLOCK_M", bn)
    buffers = max(cfg.get("num_stages", 3) - 1, 1)
    if kernel == "fused":  # q, k, v, dO and the dS operand; no loop, nothing buffered
        tiles = 4 * bn * bd + bn * bn
    elif kernel == "fwd":
        tiles = bm * bd + buffers * 2 * bn * bd
    elif kernel == "dq":
        tiles = 2 * bm * bd + buffers * 2 * bn * bd
    elif kernel == "dkdv":
        tiles = 2 * bn * bd + buffers * 2 * bm * bd + bm * bd
    else:
        raise ValueError(f"unknown decay kernel {kernel!r}; expected 'fwd', 'dq', 'dkdv' or 'fused'")
    return e * (tiles + bm * bn) + 4 * bm * bn


def _kernels_of(backward: bool) -> Tuple[str, ...]:
    return ("dq", "dkdv") if backward else ("fwd",)


def _fit_shared(cfg: dict, dtype: torch.dtype, backward: bool, limit: int) -> dict:
    """``cfg`` with fewer stages, then smaller query/key blocks, until :func:`shared_estimate` fits ``limit``."""
    cfg = dict(cfg)

    def need():
        return max(shared_estimate(cfg, dtype, k) for k in _kernels_of(backward))

    while need() > limit:
        if cfg.get("num_stages", 3) > 1:
            cfg["num_stages"] = cfg.get("num_stages", 3) - 1
        elif cfg["BLOCK_M"] > 16 and cfg["BLOCK_M"] >= cfg["BLOCK_N"]:
            cfg["BLOCK_M"] //= 2
        elif cfg["BLOCK_N"] > 16:
            cfg["BLOCK_N"] //= 2
        elif cfg["BLOCK_M"] > 16:
            cfg["BLOCK_M"] //= 2
        else:
            raise ValueError(f"no decay-attention tile fits {limit // 1024} KB of shared memory per block "
                             f"(head dim padded to {cfg['BLOCK_D']}, {str(dtype).replace('torch.', '')}): "
                             f"the smallest needs about {need() // 1024} KB")
    return cfg


def _shared_limit(device: torch.device) -> Optional[int]:
    return max_shared_bytes(device) if device.type == "cuda" else None


@memoized
def _config(n_ctx: int, d: int, backward: bool, dtype: torch.dtype = torch.bfloat16,
            interpreted: Optional[bool] = None, shared_limit: Optional[int] = None) -> dict:
    """Block sizes and launch options for lines of ``n_ctx`` tokens, head dim ``d`` and ``dtype`` inputs.

    A pure function of its arguments (``interpreted`` defaults to how this process's triton was
    built); the launchers and :func:`compile_specs` both use it. ``shared_limit`` (bytes per block,
    the device's opt-in limit; ``None``: sm_90's) shrinks the stages and tiles until
    :func:`shared_estimate` fits it (sm_86/89, T4).

    Memoized (:func:`memoized`): the support check and the launchers ask it on every call.
    """
    block_d = next_pow2(d)
    cap = next_pow2(n_ctx)
    if triton_built_interpreted() if interpreted is None else interpreted:  # fewest programs and loop trips: the interpreter pays per operation
        return dict(BLOCK_M=min(64, cap), BLOCK_N=min(64, cap), BLOCK_D=block_d)
    # warps from sm_90 cross-compiles (benchmarks/results/triton-sm90-resources.md)
    if dtype in (torch.float32, torch.float64):  # IEEE dots run on FMA units: smaller tiles
        bm = min(32 if backward or block_d > 64 else 64, cap)
        bn = min(32, cap)
        warps = 8 if block_d >= 32 else 4  # at 4 warps: 24-224 spills for d 17-64
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=2)
        return _fit_shared(cfg, dtype, backward, SM90_MAX_SHARED if shared_limit is None else shared_limit)
    if backward:
        bm = min(32 if block_d > 64 else 64, cap)
        bn = min(64, cap)
        warps = 8 if block_d >= 64 else 4  # d 33-64 at 4 warps: 86 (dk/dv) and 42 (dq) spills
    else:
        bm = min(128 if block_d <= 64 else 64, cap)
        bn = min(64, cap)
        warps = 8 if bm * block_d >= 128 * 32 else 4
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=2 if block_d > 64 else 3)
    return _fit_shared(cfg, dtype, backward, SM90_MAX_SHARED if shared_limit is None else shared_limit)


FUSED_MAX_TOKENS = 64
"""Longest line (tokens, padded to a power of two) the fused single-tile backward takes; longer lines
use the split dK/dV and dQ kernels."""


@memoized
def _fused_config(n_ctx: int, d: int, dtype: torch.dtype = torch.bfloat16, interpreted: Optional[bool] = None,
                  shared_limit: Optional[int] = None) -> Optional[dict]:
    """Tile and launch options of the fused backward for lines of ``n_ctx`` tokens, or ``None`` where it does not apply.

    One program holds a whole line: the line (padded to a power of two) must be at most
    :data:`FUSED_MAX_TOKENS` tokens, its tiles must stay in registers and fit ``shared_limit`` (bytes
    per block; ``None``: sm_90's). A pure function of its arguments, like :func:`_config`.

    Register limits from sm_90 cross-compiles (Triton 3.9, flags on): 16-bit tiles of up to 2048
    tokens x head-dim elements compile without spills at 8 warps (64x32: 212 registers; 64x64: 26
    spills, 32x128: 14); float32 (IEEE dots) the same except 64x32 (14 spills): at 64 tokens only
    head dims up to 16. HEMF's four stages (56/28/14/7-token lines, head dims 12/24/48/96: tiles
    64x16, 32x32, 16x64, 16x128) all qualify. Memoized like :func:`_config`.
    """
    bn, bd = next_pow2(n_ctx), next_pow2(d)
    if bn > FUSED_MAX_TOKENS:
        return None
    if triton_built_interpreted() if interpreted is None else interpreted:
        return dict(BLOCK_N=bn, BLOCK_D=bd)
    wide = dtype in (torch.float32, torch.float64)
    if bn * bd > (1024 if wide and bn >= 64 else 2048):
        return None
    cfg = dict(BLOCK_N=bn, BLOCK_D=bd, num_warps=8 if bn * bd >= (512 if wide else 1024) else 4, num_stages=1)
    if shared_estimate(cfg, dtype, "fused") > (SM90_MAX_SHARED if shared_limit is None else shared_limit):
        return None
    return cfg


def _precision(dtype: torch.dtype) -> str:
    """IEEE dots for float32/float64 (no TF32); 16-bit operands ignore the setting."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _acc_torch(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scalars(q: torch.Tensor, log_gamma: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    acc = _acc_torch(q.dtype)
    return log_gamma.detach().to(acc).contiguous(), torch.full((1,), scale, dtype=acc, device=q.device)


def _fwd_pass(q, k, v, lg, sc, o, lse, h, w, kind) -> None:
    b, nh, _, d = q.shape
    nlines, n_ctx, wd, line_off, step = _lines(h, w, kind)
    cfg = _config(n_ctx, d, backward=False, dtype=q.dtype, shared_limit=_shared_limit(q.device))
    num_m = triton.cdiv(n_ctx, cfg["BLOCK_M"])
    _decay_fwd_kernel[(b * nh * nlines * num_m,)](
        q, k, v, lg, sc, o, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        nh, nlines, n_ctx, h * w, line_off, step, num_m,
        W=wd, D=d, ACC=acc_dtype_of(q.dtype), PREC=_precision(q.dtype), **cfg,
    )


def _delta_config(n: int, d: int) -> dict:
    """Block sizes of the ``delta = rowsum(o * do)`` kernel over ``n`` tokens of head dim ``d``."""
    return dict(BLOCK_M=min(64, next_pow2(n)), BLOCK_D=next_pow2(d))


def _delta(o, do, h, w) -> torch.Tensor:
    b, nh, n, d = o.shape
    delta = torch.empty((b, nh, n), dtype=_acc_torch(o.dtype), device=o.device)
    cfg = _delta_config(n, d)
    num_m = triton.cdiv(n, cfg["BLOCK_M"])
    _decay_delta_kernel[(b * nh * num_m,)](
        o, do, delta, *_strides(o), *_strides(do), nh, n, num_m,
        D=d, ACC=acc_dtype_of(o.dtype), **cfg,
    )
    return delta


def _bwd_pass(q, k, v, lg, sc, do, lse, delta, dq, dk, dv, h, w, kind, *, accumulate, with_dlg):
    """One pass's gradients: writes ``dv``, writes or adds ``dq``/``dk``; returns the ``log_gamma`` partials.

    Lines that fit one tile (:func:`_fused_config`, at most ``tuning("decay_fused_backward_max_tokens")``
    tokens) take the fused kernel, one launch; longer ones the dK/dV kernel and then the dQ kernel."""
    b, nh, _, d = q.shape
    nlines, n_ctx, wd, line_off, step = _lines(h, w, kind)
    acc, prec = acc_dtype_of(q.dtype), _precision(q.dtype)
    common = (nh, nlines, n_ctx, h * w, line_off, step)
    limit = _shared_limit(q.device)
    fused = None
    if n_ctx <= tuning("decay_fused_backward_max_tokens"):
        fused = _fused_config(n_ctx, d, q.dtype, shared_limit=limit)
    if fused is not None:
        dlg = torch.empty((b, nh, nlines) if with_dlg else (1,), dtype=_acc_torch(q.dtype), device=q.device)
        _decay_bwd_fused_kernel[(b * nh * nlines,)](
            q, k, v, lg, sc, do, lse, delta, dq, dk, dv, dlg,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq), *_strides(dk), *_strides(dv),
            *common, W=wd, D=d, ACC=acc, PREC=prec, ACCUM=accumulate, WITH_DLG=with_dlg, **fused,
        )
        return dlg.sum(dim=(0, 2)) if with_dlg else None
    cfg = _config(n_ctx, d, backward=True, dtype=q.dtype, shared_limit=limit)
    num_n = triton.cdiv(n_ctx, cfg["BLOCK_N"])
    _decay_bwd_dkdv_kernel[(b * nh * nlines * num_n,)](
        q, k, v, lg, sc, do, lse, delta, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        *common, num_n, W=wd, D=d, ACC=acc, PREC=prec, ACCUM_DK=accumulate, **cfg,
    )
    num_m = triton.cdiv(n_ctx, cfg["BLOCK_M"])
    dlg = torch.empty((b, nh, nlines * num_m) if with_dlg else (1,), dtype=_acc_torch(q.dtype), device=q.device)
    _decay_bwd_dq_kernel[(b * nh * nlines * num_m,)](
        q, k, v, lg, sc, do, lse, delta, dq, dlg,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        *common, num_m, W=wd, D=d, ACC=acc, PREC=prec, ACCUM_DQ=accumulate, WITH_DLG=with_dlg, **cfg,
    )
    return dlg.sum(dim=(0, 2)) if with_dlg else None


_IO_ARGS = frozenset({"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"})
_F32_PTRS = frozenset({"LG", "SCALE", "LSE", "DELTA", "DLG"})
_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# line lengths whose next power of two spans every block-size cap of _config (16 .. 128 and beyond)
_N_CTX_REPS = (16, 32, 64, 128, 4096)


def _signature(kernel: str, dtype: torch.dtype) -> dict:
    code = globals()[kernel].fn.__code__
    io = triton_ptr_type(dtype)
    return {a: io if a in _IO_ARGS else "*fp32" if a in _F32_PTRS else "i32" for a in code.co_varnames[: code.co_argcount]}


def compile_specs(all_flags: bool = False, shared_limit: Optional[int] = None) -> List[dict]:
    """The distinct kernel configurations the launchers choose on a GPU, for ``_common.cross_compile``.

    Runs every dtype (float32, float16, bfloat16), head dim 1..128 and line length (full mode: ``H*W``;
    decomposed: ``H`` or ``W``; only its power-of-two cap matters) through :func:`_config` and
    :func:`_delta_config` and keeps one spec per distinct configuration and kernel; ``D`` changes only
    masks within a ``BLOCK_D`` tile, so each spec compiles the largest ``d`` of its group. Backward
    flags: ``ACCUM_DK``/``ACCUM_DQ``/``ACCUM`` (off in full mode and the column pass, on in the row
    pass) and ``WITH_DLG`` both on and both off (``all_flags``: every combination). The split backward
    kernels are listed for every line length (``tuned(decay_fused_backward_max_tokens=0)`` runs them on
    short lines too), the fused one where :func:`_fused_config` takes the line. ``shared_limit``: the
    configurations chosen for a GPU with that much shared memory per block (default sm_90's).
    """
    flag_sets = [(True, True), (False, False)] + ([(True, False), (False, True)] if all_flags else [])
    groups: dict = {}

    def add(kernel, dtype, d, n_ctx, cfg, flags):
        key = (kernel, dtype, tuple(sorted(flags.items())), tuple(sorted(cfg.items())))
        g = groups.setdefault(key, dict(d=[], n=[], cfg=cfg, flags=flags))
        g["d"].append(d)
        g["n"].append(n_ctx)

    for dtype in _GPU_DTYPES:
        for d in range(1, SUPPORTED_MAX_HEAD_DIM + 1):
            for n_ctx in _N_CTX_REPS:
                add("_decay_fwd_kernel", dtype, d, n_ctx,
                    _config(n_ctx, d, False, dtype, interpreted=False, shared_limit=shared_limit), {})
                bwd = _config(n_ctx, d, True, dtype, interpreted=False, shared_limit=shared_limit)
                fused = _fused_config(n_ctx, d, dtype, interpreted=False, shared_limit=shared_limit)
                for accum, dlg in flag_sets:
                    add("_decay_bwd_dkdv_kernel", dtype, d, n_ctx, bwd, dict(ACCUM_DK=accum))
                    add("_decay_bwd_dq_kernel", dtype, d, n_ctx, bwd, dict(ACCUM_DQ=accum, WITH_DLG=dlg))
                    if fused is not None:
                        add("_decay_bwd_fused_kernel", dtype, d, n_ctx, fused, dict(ACCUM=accum, WITH_DLG=dlg))
                add("_decay_delta_kernel", dtype, d, n_ctx, _delta_config(n_ctx, d), {})
    specs = []
    for (kernel, dtype, _, _), g in groups.items():
        cfg = dict(g["cfg"])
        opts = dict(num_warps=cfg.pop("num_warps", 4), num_stages=cfg.pop("num_stages", 3))
        d = max(g["d"])
        consts = dict(D=d, ACC=acc_dtype_of(dtype), **cfg, **g["flags"])
        if kernel != "_decay_delta_kernel":
            consts["PREC"] = _precision(dtype)
            consts["W"] = 56  # a constexpr (one compile per grid width); HEMF's stage-1 width stands for all
        lo, hi = min(g["n"]), max(g["n"])
        lines = f"n<={hi}" if lo == min(_N_CTX_REPS) else f"n>{lo // 2}" if hi == max(_N_CTX_REPS) else f"n {lo // 2 + 1}-{hi}"
        flags = " ".join(f"{k}={int(v)}" for k, v in g["flags"].items())
        label = f"d {min(g['d'])}-{d} {lines} {flags}".strip()
        name = kernel.replace("_decay_", "").replace("_kernel", "")
        specs.append(compile_spec(__name__, kernel, label, dtype, _signature(kernel, dtype), consts,
                                  group=f"decay {name}", **opts))
    return specs


# --------------------------------------------------------------------------------------------
# torch.library ops


def _lse_like(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape[:3], dtype=_acc_torch(q.dtype))


@torch.library.custom_op("fusionblocks::decay_attention_full", mutates_args=())
def decay_attention_full(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor, h: int, w: int, scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Full 2-D decay attention. Returns ``(out (B, heads, N, D), lse (B, heads, N))``."""
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = _lse_like(q)
    if q.numel():
        lg, sc = _scalars(q, log_gamma, scale)
        _fwd_pass(q, k, v, lg, sc, o, lse, h, w, "full")
    return o, lse


@decay_attention_full.register_fake
def _(q, k, v, log_gamma, h, w, scale):
    return q.new_empty(q.shape), _lse_like(q)


@torch.library.custom_op("fusionblocks::decay_attention_full_backward", mutates_args=())
def decay_attention_full_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
    o: torch.Tensor, lse: torch.Tensor, h: int, w: int, scale: float, with_dlg: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv, dlog_gamma)`` of :func:`decay_attention_full` (``dlog_gamma`` is zeros unless ``with_dlg``)."""
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    dlg = torch.zeros(log_gamma.shape, dtype=log_gamma.dtype, device=log_gamma.device)
    if q.numel():
        lg, sc = _scalars(q, log_gamma, scale)
        delta = _delta(o, do, h, w)
        g = _bwd_pass(q, k, v, lg, sc, do, lse, delta, dq, dk, dv, h, w, "full", accumulate=False, with_dlg=with_dlg)
        if g is not None:
            dlg = g.to(log_gamma.dtype)
    return dq, dk, dv, dlg


@decay_attention_full_backward.register_fake
def _(do, q, k, v, log_gamma, o, lse, h, w, scale, with_dlg):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), log_gamma.new_empty(log_gamma.shape)


def _full_setup(ctx, inputs, output):
    q, k, v, log_gamma, h, w, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, log_gamma, o, lse)
    ctx.args = (h, w, scale)
    ctx.mark_non_differentiable(lse)  # the softmax statistic saved for the backward, not a result


def _full_grad(ctx, do, dlse):
    q, k, v, log_gamma, o, lse = ctx.saved_tensors
    h, w, scale = ctx.args
    with_dlg = bool(ctx.needs_input_grad[3])
    dq, dk, dv, dlg = torch.ops.fusionblocks.decay_attention_full_backward(
        do, q, k, v, log_gamma, o, lse, h, w, scale, with_dlg
    )
    return dq, dk, dv, (dlg if with_dlg else None), None, None, None


decay_attention_full.register_autograd(_full_grad, setup_context=_full_setup)


@torch.library.custom_op("fusionblocks::decay_attention_decomposed", mutates_args=())
def decay_attention_decomposed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor, h: int, w: int, scale: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decomposed decay attention (rows, then columns). Returns ``(out, row_out, row_lse, col_lse)``."""
    o1 = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse1, lse2 = _lse_like(q), _lse_like(q)
    if q.numel():
        lg, sc = _scalars(q, log_gamma, scale)
        _fwd_pass(q, k, v, lg, sc, o1, lse1, h, w, "rows")
        _fwd_pass(q, k, o1, lg, sc, o, lse2, h, w, "cols")
    return o, o1, lse1, lse2


@decay_attention_decomposed.register_fake
def _(q, k, v, log_gamma, h, w, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), _lse_like(q), _lse_like(q)


@torch.library.custom_op("fusionblocks::decay_attention_decomposed_backward", mutates_args=())
def decay_attention_decomposed_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
    o: torch.Tensor, o1: torch.Tensor, lse1: torch.Tensor, lse2: torch.Tensor,
    h: int, w: int, scale: float, with_dlg: bool, grad_o1: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv, dlog_gamma)`` of :func:`decay_attention_decomposed`.

    ``do`` is the gradient of the output; ``grad_o1``, when given, that of the row pass's output
    ``o1`` (the op's second output), added to what flows into ``o1`` from the column pass.
    """
    dq, dk, dv, do1 = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(4))
    dlg = torch.zeros(log_gamma.shape, dtype=log_gamma.dtype, device=log_gamma.device)
    if q.numel():
        lg, sc = _scalars(q, log_gamma, scale)
        g2 = _bwd_pass(q, k, o1, lg, sc, do, lse2, _delta(o, do, h, w), dq, dk, do1, h, w, "cols",
                       accumulate=False, with_dlg=with_dlg)
        if grad_o1 is not None:
            do1 = do1 + grad_o1.to(do1.dtype)
        g1 = _bwd_pass(q, k, v, lg, sc, do1, lse1, _delta(o1, do1, h, w), dq, dk, dv, h, w, "rows",
                       accumulate=True, with_dlg=with_dlg)
        if with_dlg:
            dlg = (g1 + g2).to(log_gamma.dtype)
    return dq, dk, dv, dlg


@decay_attention_decomposed_backward.register_fake
def _(do, q, k, v, log_gamma, o, o1, lse1, lse2, h, w, scale, with_dlg, grad_o1=None):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), log_gamma.new_empty(log_gamma.shape)


def _decomposed_setup(ctx, inputs, output):
    q, k, v, log_gamma, h, w, scale = inputs
    o, o1, lse1, lse2 = output
    ctx.save_for_backward(q, k, v, log_gamma, o, o1, lse1, lse2)
    ctx.args = (h, w, scale)
    ctx.mark_non_differentiable(lse1, lse2)  # softmax statistics saved for the backward, not results


def _decomposed_grad(ctx, do, do1, dlse1, dlse2):
    """Backward of ``(out, row_out, row_lse, col_lse)``: gradients of ``out`` and of ``row_out`` (``do1``) both count."""
    q, k, v, log_gamma, o, o1, lse1, lse2 = ctx.saved_tensors
    h, w, scale = ctx.args
    with_dlg = bool(ctx.needs_input_grad[3])
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv, dlg = torch.ops.fusionblocks.decay_attention_decomposed_backward(
        do, q, k, v, log_gamma, o, o1, lse1, lse2, h, w, scale, with_dlg, do1
    )
    return dq, dk, dv, (dlg if with_dlg else None), None, None, None


decay_attention_decomposed.register_autograd(_decomposed_grad, setup_context=_decomposed_setup)
flops.register([(flops.op_packet("fusionblocks::decay_attention_full"), "full", flops.FORWARD),
                (flops.op_packet("fusionblocks::decay_attention_full_backward"), "full", flops.BACKWARD),
                (flops.op_packet("fusionblocks::decay_attention_decomposed"), "decomposed", flops.FORWARD),
                (flops.op_packet("fusionblocks::decay_attention_decomposed_backward"), "decomposed", flops.BACKWARD)])


# --------------------------------------------------------------------------------------------
# backend


def _check(q, k, v, log_gamma, *, hw, mode, scale, auto: bool = False) -> List[str]:
    reasons = device_reasons(q, auto=auto, what="triton decay_attention")
    d = q.shape[-1]
    if d > SUPPORTED_MAX_HEAD_DIM:
        reasons.append(f"head dim {d} > {SUPPORTED_MAX_HEAD_DIM} is not supported")
    h, w = hw
    if q.shape[0] * q.shape[1] * h * w > MAX_PROGRAMS:
        reasons.append(f"B*heads*H*W = {q.shape[0] * q.shape[1] * h * w} exceeds the launch grid limit {MAX_PROGRAMS}")
    if q.device.type == "cuda" and not reasons:
        for n_ctx in ((h * w,) if mode == "full" else (w, h)):
            for backward in (False, True):
                try:
                    _config(n_ctx, d, backward, q.dtype, shared_limit=max_shared_bytes(q.device))
                except ValueError as e:
                    reasons.append(str(e))
                    return reasons
    return reasons


@register_backend("decay_attention", "triton", priority=20, check=_check)
def decay_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    *,
    hw: Tuple[int, int],
    mode: str = "full",
    scale: float,
) -> torch.Tensor:
    """Triton decay attention; same contract as :func:`fusionblocks.ops.reference.decay_attention`.

    Args:
        q, k, v: ``(B, heads, H*W, D)`` in raster order, any strides, ``D <= 128``.
        log_gamma: ``(heads,)``; receives a gradient when it requires one.
        hw: ``(H, W)``.
        mode: ``"full"`` or ``"decomposed"``.
        scale: multiplies ``q k^T`` (the public op resolves ``None`` to ``D ** -0.5``).

    Returns:
        ``(B, heads, H*W, D)`` contiguous, in the dtype of ``q``.
    """
    h, w = hw
    if mode == "full":
        return torch.ops.fusionblocks.decay_attention_full(q, k, v, log_gamma, h, w, scale)[0]
    return torch.ops.fusionblocks.decay_attention_decomposed(q, k, v, log_gamma, h, w, scale)[0]
