"""Benchmark of shifted-window attention (Swin W-MSA / SW-MSA with relative-position bias) on one GPU.

Implementations, measured side by side in one process on the same inputs ``q, k, v (B, heads, H*W, D)``
(raster order) and a ``((2ws-1)**2, heads)`` bias table that takes gradients:

- ``triton``: ``fusionblocks.ops.window_attention(..., backend="triton")`` (one fused kernel per pass);
- ``reference``: the official-style roll / window partition / matmul / softmax / matmul / merge / roll
  (``fusionblocks.ops.reference.window_attention``);
- ``sdpa``: roll + partition, a materialized ``(B*nW, heads, L, L)`` bias + shift mask, and
  ``F.scaled_dot_product_attention``, then merge + roll;
- ``flex``: roll + partition into ``(B, heads, nW*L, D)``, compiled ``flex_attention`` with a block mask
  (``mask_mod``: same window) and a ``score_mod`` adding the gathered bias and the -100 region mask, then
  merge + roll. The block mask is built once per shape (outside the timing); compilation is warm-up.

Shapes: HiFuse's four global stages at batch 32 (56x56 / 3 heads, 28x28 / 6, 14x14 / 12, 7x7 / 24; head
dim 32, window 7), shift 0 and 3; dtypes bf16 and fp32; passes ``fwd`` and ``fwd+bwd`` (gradients of q, k,
v and the table, via ``torch.autograd.grad`` with a fixed upstream gradient).

Time: ``triton.testing.do_bench`` median (ms), inputs rotated over enough copies to exceed the L2 cache.
Memory: ``peak_mem_mb`` is the peak CUDA allocation during one call above what was allocated before it
(so the inputs are excluded; outputs and gradients count). Bandwidth: bytes = q, k, v read once + o
written once for ``fwd`` (12 such tensors for ``fwd+bwd``: q, k, v, o, do read, dq, dk, dv written, plus
the forward's 4), as a share of the device's copy bandwidth measured here (``dst.copy_(src)`` on 1 GiB).

Records (``benchmarks/results/window_attention-<gpu>.json``): a list of ``{"op": "window_attention",
"impl", "shape", "dtype", "pass", "ms", "peak_mem_mb", "device", "torch", "triton"}`` plus ``gbps``,
``hbm_share``, ``max_err`` (vs the reference in fp32) and ``error`` when an impl could not run; a
Markdown table goes next to it.

Run on a GPU::

    python benchmarks/bench_window_attention.py            # all stages, writes benchmarks/results/

CPU smoke test (tiny shapes, Triton interpreter, wall-clock timing, writes nothing unless ``--out``)::

    python benchmarks/bench_window_attention.py --quick
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

IMPLS = ("triton", "reference", "sdpa", "flex")
PASSES = ("fwd", "fwd+bwd")
STAGES = [
    # (name, B, H=W, heads, D)
    ("stage1", 32, 56, 3, 32),
    ("stage2", 32, 28, 6, 32),
    ("stage3", 32, 14, 12, 32),
    ("stage4", 32, 7, 24, 32),
]
QUICK_STAGES = [("quick-14", 2, 14, 2, 32), ("quick-7", 1, 7, 3, 16)]
WINDOW = 7


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes, Triton interpreter")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--dtypes", nargs="+", default=None, help="bf16 fp32 (quick: fp32)")
    p.add_argument("--shifts", nargs="+", type=int, default=[0, 3])
    p.add_argument("--stages", nargs="+", default=None, help="subset of stage1..stage4")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/window_attention-<gpu>.json)")
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.quick:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fusionblocks.ops import reference, window_attention  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------
# implementations: f(q, k, v, table) -> (B, heads, H*W, D)
# ------------------------------------------------------------------------------------------------


def _partition(x: torch.Tensor, h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """(B, heads, H*W, D) -> (B, heads, nW*L, D) in window order of the shifted grid."""
    b, nh, _, d = x.shape
    x = x.reshape(b, nh, h, w, d)
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(2, 3))
    x = x.reshape(b, nh, h // ws, ws, w // ws, ws, d).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, nh, h * w, d)


def _merge(x: torch.Tensor, h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    b, nh, _, d = x.shape
    x = x.reshape(b, nh, h // ws, w // ws, ws, ws, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, nh, h, w, d)
    if shift:
        x = torch.roll(x, shifts=(shift, shift), dims=(2, 3))
    return x.reshape(b, nh, h * w, d)


def make_impl(name: str, h: int, w: int, ws: int, shift: int, heads: int, device: torch.device, compile_flex: bool):
    """The callable for implementation ``name`` at this shape (static parts built here, once)."""
    L = ws * ws
    nw = (h // ws) * (w // ws)
    rel = reference.relative_position_index(ws, device).reshape(-1)
    mask = reference.shift_attention_mask(h, w, ws, shift, device) if shift else None  # (nW, L, L)

    if name == "triton":
        return lambda q, k, v, t: window_attention(q, k, v, t, hw=(h, w), window_size=ws, shift=shift, backend="triton")
    if name == "reference":
        return lambda q, k, v, t: reference.window_attention(q, k, v, t, hw=(h, w), window_size=ws, shift=shift)
    if name == "sdpa":

        def sdpa(q, k, v, t):
            b, nh, _, d = q.shape
            qw, kw, vw = (_partition(x, h, w, ws, shift).reshape(b, nh, nw, L, d).transpose(1, 2).reshape(b * nw, nh, L, d)
                          for x in (q, k, v))
            bias = t[rel].reshape(L, L, nh).permute(2, 0, 1).to(q.dtype)  # (heads, L, L)
            full = bias.unsqueeze(0).unsqueeze(0)
            if mask is not None:
                full = full + mask.to(q.dtype)[None, :, None]
            full = full.expand(b, nw, nh, L, L).reshape(b * nw, nh, L, L)  # materialized
            o = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=full)
            o = o.reshape(b, nw, nh, L, d).transpose(1, 2).reshape(b, nh, nw * L, d)
            return _merge(o, h, w, ws, shift)

        return sdpa
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        n = h * w
        region = (reference.shift_region_ids(h, w, ws, shift, device) if shift
                  else torch.zeros(h, w, dtype=torch.long, device=device))
        region = region.view(h // ws, ws, w // ws, ws).permute(0, 2, 1, 3).reshape(-1)  # window order

        def same_window(b, hh, qi, ki):
            return (qi // L) == (ki // L)

        block_mask = create_block_mask(same_window, None, None, n, n, device=str(device))
        fa = torch.compile(flex_attention, dynamic=False) if compile_flex else flex_attention

        def flex(q, k, v, t):
            bias = t[rel].reshape(L, L, heads).permute(2, 0, 1).to(torch.float32)  # (heads, L, L)

            def score_mod(score, b, hh, qi, ki):
                s = score + bias[hh, qi % L, ki % L]
                return torch.where(region[qi] != region[ki], s - 100.0, s)

            qw, kw, vw = (_partition(x, h, w, ws, shift) for x in (q, k, v))
            o = fa(qw, kw, vw, score_mod=score_mod, block_mask=block_mask)
            return _merge(o, h, w, ws, shift)

        return flex
    raise ValueError(name)


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------


def _inputs(b, heads, n, d, ws, dtype, device, copies, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    sets = []
    for _ in range(copies):
        q, k, v = (torch.randn(b, heads, n, d, generator=g).to(device, dtype) for _ in range(3))
        t = (0.02 * torch.randn((2 * ws - 1) ** 2, heads, generator=g)).to(device, dtype)
        do = torch.randn(b, heads, n, d, generator=g).to(device, dtype)
        sets.append([x.requires_grad_(True) for x in (q, k, v, t)] + [do])
    return sets


def _step(fn: Callable, pass_: str, inputs):
    q, k, v, t, do = inputs
    if pass_ == "fwd":
        with torch.no_grad():
            return fn(q, k, v, t)
    out = fn(q, k, v, t)
    return torch.autograd.grad(out, (q, k, v, t), do)


def _bench(call: Callable[[], object], device: torch.device, quick: bool) -> float:
    if device.type == "cuda":
        import triton.testing

        call()
        call()  # compilation (flex, triton) stays out of the timing
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median"))
    call()
    times = []
    for _ in range(3 if quick else 10):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_mb(call: Callable[[], object], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    res = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del res
    return (peak - base) / 2**20


def copy_bandwidth_gbps(device: torch.device) -> Optional[float]:
    """Device copy bandwidth (read + write) in GB/s from ``dst.copy_(src)`` on 1 GiB."""
    if device.type != "cuda":
        return None
    import triton.testing

    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    del src, dst
    return 2 * 2**30 / (ms * 1e-3) / 1e9


def _max_err(fn, inputs, ref_out) -> float:
    with torch.no_grad():
        out = fn(*inputs[:4])
    return (out.float() - ref_out).abs().max().item()


def _gpu_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def run(args: argparse.Namespace) -> List[Dict]:
    import triton

    quick = args.quick
    device = torch.device("cpu" if quick or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not quick:
        sys.exit("no CUDA device: run on a GPU, or pass --quick for the CPU smoke test")
    dtypes = args.dtypes or (["fp32"] if quick else ["bf16", "fp32"])
    stages = QUICK_STAGES if quick else [s for s in STAGES if args.stages is None or s[0] in args.stages]
    # one compiled flex_attention per (shape, dtype, shift, pass): more than dynamo's default recompile limit
    torch._dynamo.config.cache_size_limit = 256
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = 1024
    bw = copy_bandwidth_gbps(device)
    if bw:
        print(f"device copy bandwidth: {bw:.0f} GB/s")
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, triton=triton.__version__)
    records: List[Dict] = []
    for stage, b, hw, heads, d in stages:
        n = hw * hw
        for dname in dtypes:
            dtype = DTYPES[dname]
            elem = torch.tensor([], dtype=dtype).element_size()
            tensor_bytes = b * heads * n * d * elem
            copies = 1 if quick else max(2, min(8, int(3 * 50 * 2**20 // (4 * tensor_bytes)) + 1))
            sets = _inputs(b, heads, n, d, WINDOW, dtype, device, copies)
            for shift in args.shifts:
                shape = dict(stage=stage, B=b, H=hw, W=hw, heads=heads, D=d, window=WINDOW, shift=shift)
                q32, k32, v32, t32 = (x.detach().float() for x in sets[0][:4])
                ref_out = reference.window_attention(q32, k32, v32, t32, hw=(hw, hw), window_size=WINDOW, shift=shift)
                for impl in args.impls:
                    rec_base = dict(op="window_attention", impl=impl, shape=shape, dtype=dname, **meta)
                    try:
                        fn = make_impl(impl, hw, hw, WINDOW, shift, heads, device, compile_flex=not quick)
                        err = _max_err(fn, sets[0], ref_out)
                    except Exception as e:  # an impl that cannot run this shape/dtype is reported, not fatal
                        for pass_ in PASSES:
                            records.append(dict(rec_base, **{"pass": pass_}, ms=None, peak_mem_mb=None,
                                                error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
                        print(f"{stage} {dname} shift {shift} {impl}: cannot run ({type(e).__name__})")
                        continue
                    for pass_ in PASSES:
                        it = [0]

                        def call():
                            it[0] = (it[0] + 1) % len(sets)
                            return _step(fn, pass_, sets[it[0]])

                        try:
                            ms = _bench(call, device, quick)
                            peak = _peak_mb(call, device)
                        except Exception as e:
                            records.append(dict(rec_base, **{"pass": pass_}, ms=None, peak_mem_mb=None,
                                                error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
                            continue
                        moved = (4 if pass_ == "fwd" else 12) * tensor_bytes
                        gbps = moved / (ms * 1e-3) / 1e9
                        rec = dict(rec_base, **{"pass": pass_}, ms=round(ms, 5),
                                   peak_mem_mb=None if peak is None else round(peak, 2),
                                   gbps=round(gbps, 1), hbm_share=None if not bw else round(gbps / bw, 4),
                                   max_err=err)
                        records.append(rec)
                        share = f"{100 * rec['hbm_share']:.0f}%" if rec["hbm_share"] is not None else "-"
                        print(f"{stage} {dname} shift {shift} {pass_:7s} {impl:9s} {ms:9.3f} ms  "
                              f"peak {rec['peak_mem_mb']} MB  {gbps:7.1f} GB/s ({share})  err {err:.2e}")
            del sets
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return records


def markdown(records: List[Dict]) -> str:
    """One row per (stage, dtype, shift, pass): ms of every impl and triton's speed-up over each."""
    rows: Dict[tuple, Dict[str, Dict]] = {}
    for r in records:
        s = r["shape"]
        rows.setdefault((s["stage"], r["dtype"], s["shift"], r["pass"]), {})[r["impl"]] = r
    impls = [i for i in IMPLS if any(i in v for v in rows.values())]
    head = ["stage", "dtype", "shift", "pass"] + [f"{i} ms" for i in impls] + \
        [f"x vs {i}" for i in impls if i != "triton"] + ["triton peak MB", "triton HBM share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (stage, dt, shift, pass_), by in rows.items():
        ms = {i: (by[i]["ms"] if i in by else None) for i in impls}
        cells = [stage, dt, str(shift), pass_] + [f"{ms[i]:.3f}" if ms[i] else "n/a" for i in impls]
        t = ms.get("triton")
        cells += [f"{ms[i] / t:.2f}" if t and ms[i] else "n/a" for i in impls if i != "triton"]
        tr = by.get("triton", {})
        cells += [f"{tr['peak_mem_mb']:.1f}" if tr.get("peak_mem_mb") is not None else "n/a",
                  f"{100 * tr['hbm_share']:.0f}%" if tr.get("hbm_share") is not None else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    records = run(args)
    table = markdown(records)
    print(table)
    out = args.out
    if out is None and not args.quick:
        dev = torch.device("cuda")
        out = Path(__file__).parent / "results" / f"window_attention-{_gpu_tag(dev)}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(records, indent=1))
        out.with_suffix(".md").write_text(table)
        print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main(ARGS)
