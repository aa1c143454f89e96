"""Manhattan-decay attention on GPU: the Triton kernels against the reference, SDPA and FlexAttention.

In one process, for every shape below, times the forward and forward + backward (bf16 and fp32) of

- ``triton``: ``fusionblocks.ops.decay_attention(..., backend="triton")``;
- ``reference``: ``fusionblocks.ops.reference.decay_attention`` (materializes scores and the mask);
- ``sdpa``: ``F.scaled_dot_product_attention`` with a materialized ``(heads, N, N)`` decay bias
  (decomposed: a ``(heads, L, L)`` bias per pass, with the permutes the layout needs);
- ``flex``: ``flex_attention`` with a Manhattan ``score_mod``, ``torch.compile``-d (warm-up excluded).

Shapes (issue 3): full 2-D at B=32, 4 heads, 56x56 and 28x28, d 16/32/64, and B=2, 8 heads, 96x96,
d 32; decomposed at HEMF's four stages, B=32, 8 heads (56x56/d12, 28x28/d24, 14x14/d48, 7x7/d96).
``log_gamma`` requires grad, as with a learnable decay. Times are ``triton.testing.do_bench`` medians
over calls that rotate through 3 input sets; ``peak_mem_mb`` is the CUDA peak during one call with
one input set allocated (inputs included); ``io_mb`` is the size of q, k, v, o (and their gradients
for fwd+bwd), the floor of a fused kernel.

Run on a GPU::

    python benchmarks/bench_decay_attention.py            # all shapes -> benchmarks/results/decay_attention-<gpu>.{json,md}
    python benchmarks/bench_decay_attention.py --impls triton flex --dtypes bf16

Smoke run anywhere (tiny shapes; on CPU the Triton kernels run in the interpreter, fp32 only,
FlexAttention uncompiled; results go to a temporary folder unless ``--out-dir`` is given)::

    python benchmarks/bench_decay_attention.py --quick
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import traceback
import warnings
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, peak_memory_mb, time_ms, write_results  # noqa: E402

IMPLS = ("triton", "reference", "sdpa", "flex")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
PASSES = ("fwd", "fwd+bwd")
ROTATE = 3

FULL_SHAPES = [dict(B=32, heads=4, H=s, W=s, d=d) for s in (56, 28) for d in (16, 32, 64)] + [
    dict(B=2, heads=8, H=96, W=96, d=32)
]
DECOMPOSED_SHAPES = [dict(B=32, heads=8, H=s, W=s, d=d) for s, d in ((56, 12), (28, 24), (14, 48), (7, 96))]
QUICK_FULL = [dict(B=1, heads=2, H=5, W=7, d=16)]
QUICK_DECOMPOSED = [dict(B=1, heads=2, H=5, W=7, d=12)]

# dense (no sparsity) bf16 tensor-core peak, TFLOP/s
DENSE_BF16_PEAK = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l40s": 362.0, "a10": 125.0}


def _peak_tflops(device_name: str) -> Optional[float]:
    low = device_name.lower()
    for key, peak in DENSE_BF16_PEAK.items():
        if key in low:
            return peak
    return None


def _log_gamma(heads: int, device, dtype) -> torch.Tensor:
    h = torch.arange(heads, dtype=torch.float64)
    return torch.log1p(-(2.0 ** (-2.0 - 4.0 * h / heads))).to(device=device, dtype=dtype)


def _manhattan(h: int, w: int, device) -> torch.Tensor:
    n = torch.arange(h * w, device=device)
    y, x = n // w, n % w
    return ((y[:, None] - y[None, :]).abs() + (x[:, None] - x[None, :]).abs()).float()


def _line_distance(n: int, device) -> torch.Tensor:
    i = torch.arange(n, device=device)
    return (i[:, None] - i[None, :]).abs().float()


# ------------------------------------------------------------------------------------------ impls


def make_impl(impl: str, mode: str, shape: dict, device: torch.device, quick: bool) -> Callable:
    """``fn(q, k, v, log_gamma) -> out`` for one implementation."""
    h, w, d = shape["H"], shape["W"], shape["d"]
    scale = d ** -0.5
    if impl == "triton":
        from fusionblocks.ops import decay_attention

        return lambda q, k, v, lg: decay_attention(q, k, v, lg, hw=(h, w), mode=mode, scale=scale, backend="triton")
    if impl == "reference":
        from fusionblocks.ops import reference

        return lambda q, k, v, lg: reference.decay_attention(q, k, v, lg, hw=(h, w), mode=mode, scale=scale)
    if impl == "sdpa":
        if mode == "full":
            dist = _manhattan(h, w, device)

            def sdpa_full(q, k, v, lg):
                bias = (lg[:, None, None] * dist).to(q.dtype)  # (heads, N, N)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None], scale=scale)

            return sdpa_full
        dist_w, dist_h = _line_distance(w, device), _line_distance(h, device)

        def sdpa_decomposed(q, k, v, lg):
            b, nh = q.shape[:2]
            q5, k5, v5 = (t.reshape(b, nh, h, w, d) for t in (q, k, v))
            bias_w = (lg[:, None, None] * dist_w).to(q.dtype)[:, None]  # (heads, 1, W, W)
            o = F.scaled_dot_product_attention(q5, k5, v5, attn_mask=bias_w, scale=scale)
            qt, kt, ot = (t.transpose(2, 3) for t in (q5, k5, o))
            bias_h = (lg[:, None, None] * dist_h).to(q.dtype)[:, None]
            o = F.scaled_dot_product_attention(qt, kt, ot, attn_mask=bias_h, scale=scale).transpose(2, 3)
            return o.reshape(b, nh, h * w, d)

        return sdpa_decomposed
    if impl == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        flex = flex_attention if (quick and device.type != "cuda") else torch.compile(flex_attention, dynamic=False)
        if mode == "full":

            def flex_full(q, k, v, lg):
                def score_mod(score, b, hh, qi, ki):
                    dist = (qi // w - ki // w).abs() + (qi % w - ki % w).abs()
                    return score + lg[hh] * dist

                return flex(q, k, v, score_mod=score_mod, scale=scale)

            return flex_full

        def flex_decomposed(q, k, v, lg):
            b, nh = q.shape[:2]

            def score_mod(score, bb, hh, qi, ki):
                return score + lg[hh] * (qi - ki).abs()

            def rows(t):  # (B, heads, H, W, D) -> (B*H, heads, W, D)
                return t.permute(0, 2, 1, 3, 4).reshape(b * h, nh, w, d)

            def cols(t):  # (B, heads, H, W, D) -> (B*W, heads, H, D)
                return t.permute(0, 3, 1, 2, 4).reshape(b * w, nh, h, d)

            q5, k5, v5 = (t.reshape(b, nh, h, w, d) for t in (q, k, v))
            o = flex(rows(q5), rows(k5), rows(v5), score_mod=score_mod, scale=scale)
            o5 = o.reshape(b, h, nh, w, d).permute(0, 2, 1, 3, 4)
            o = flex(cols(q5), cols(k5), cols(o5), score_mod=score_mod, scale=scale)
            return o.reshape(b, w, nh, h, d).permute(0, 2, 3, 1, 4).reshape(b, nh, h * w, d)

        return flex_decomposed
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")


# ------------------------------------------------------------------------------------------ runs


def _inputs(shape: dict, dtype, device, grad: bool):
    b, nh, n, d = shape["B"], shape["heads"], shape["H"] * shape["W"], shape["d"]
    q, k, v = (torch.randn(b, nh, n, d, device=device, dtype=dtype) for _ in range(3))
    lg = _log_gamma(nh, device, torch.float32)
    return [t.requires_grad_(grad) for t in (q, k, v, lg)]


def _flops(mode: str, shape: dict, pas: str) -> float:
    """Matmul FLOPs: 4*B*heads*N*L*d forward (L keys per query), 2.5x that for the backward."""
    b, nh, h, w, d = shape["B"], shape["heads"], shape["H"], shape["W"], shape["d"]
    n = h * w
    per_query = n if mode == "full" else h + w
    fwd = 4.0 * b * nh * n * per_query * d
    return fwd * (3.5 if pas == "fwd+bwd" else 1.0)


def measure(impl: str, mode: str, shape: dict, dtype, pas: str, device, quick: bool, check: bool = False) -> Dict[str, object]:
    fn = make_impl(impl, mode, shape, device, quick)
    grad = pas == "fwd+bwd"
    sets = [_inputs(shape, dtype, device, grad) for _ in range(1 if quick else ROTATE)]
    go = torch.randn_like(sets[0][0])

    def run(i: int):
        q, k, v, lg = sets[i % len(sets)]
        if not grad:
            with torch.no_grad():
                return fn(q, k, v, lg)
        out = fn(q, k, v, lg)
        return torch.autograd.grad(out, (q, k, v, lg), go)

    warm = run(0)  # warm-up: compiles Triton kernels and FlexAttention before any timing
    extra: Dict[str, object] = {}
    if check and not grad and impl != "reference":
        from fusionblocks.ops import reference

        q, k, v, lg = (t.float() for t in sets[0])
        want = reference.decay_attention(q, k, v, lg, hw=(shape["H"], shape["W"]), mode=mode, scale=shape["d"] ** -0.5)
        extra["max_abs_err_vs_fp32_reference"] = (warm.float() - want).abs().max().item()
        del q, k, v, lg, want
    del warm
    ms = time_ms(run, device, quick=quick)
    del sets[1:]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    peak = peak_memory_mb(lambda: run(0), device)
    tensor_mb = sets[0][0].numel() * sets[0][0].element_size() / 2**20
    return {"ms": ms, "peak_mem_mb": peak, "io_mb": tensor_mb * (8 if grad else 4), **extra}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (a smoke run; works on CPU)")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES))
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    p.add_argument("--modes", nargs="+", default=["full", "decomposed"], choices=["full", "decomposed"])
    p.add_argument("--no-check", action="store_true", help="skip the forward error check against an fp32 reference")
    p.add_argument("--out-dir", default=None, help="where the JSON/Markdown go (default benchmarks/results; --quick: a temp dir)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        if not args.quick:
            p.error("no CUDA device: only --quick runs on CPU")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the decay backend reads it at launch time
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    dtypes = args.dtypes or (["fp32"] if device.type == "cpu" else ["bf16", "fp32"])
    env = environment(device)
    peak_tf = _peak_tflops(env["device"])
    shapes = {"full": QUICK_FULL if args.quick else FULL_SHAPES, "decomposed": QUICK_DECOMPOSED if args.quick else DECOMPOSED_SHAPES}

    records: List[dict] = []
    for mode in args.modes:
        for shape in shapes[mode]:
            for dt in dtypes:
                for pas in args.passes:
                    for impl in args.impls:
                        rec = {"op": f"decay_attention_{mode}", "impl": impl, "shape": dict(shape), "dtype": dt, "pass": pas}
                        try:
                            rec.update(measure(impl, mode, shape, DTYPES[dt], pas, device, args.quick, check=not args.no_check))
                            tflops = _flops(mode, shape, pas) / (rec["ms"] * 1e-3) / 1e12
                            rec["tflops"] = tflops
                            if mode == "full" and peak_tf and dt == "bf16":
                                rec["pct_of_dense_bf16_peak"] = 100.0 * tflops / peak_tf
                        except Exception as e:  # OOM, unsupported head dim, ...: recorded, never fatal
                            rec.update({"ms": None, "peak_mem_mb": None, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
                            if os.environ.get("BENCH_DEBUG"):
                                traceback.print_exc()
                        finally:
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                        rec.update(env)
                        records.append(rec)
                        ms = f"{rec['ms']:.3f} ms" if rec["ms"] is not None else rec["error"]
                        print(f"{rec['op']:28s} {impl:9s} {dt:4s} {pas:7s} {shape} {ms}", flush=True)

    for r in records:  # speed-up against the reference of the same case
        if r["ms"] is None:
            continue
        ref = next((x for x in records if x["impl"] == "reference" and x["ms"] and all(x[k] == r[k] for k in ("op", "shape", "dtype", "pass"))), None)
        if ref:
            r["speedup_vs_reference"] = ref["ms"] / r["ms"]
    out_dir = args.out_dir or (tempfile.mkdtemp(prefix="bench_decay_") if args.quick else None)
    columns = ["op", "B", "heads", "H", "W", "d", "dtype", "pass", "impl", "ms", "speedup_vs_reference", "tflops",
               "pct_of_dense_bf16_peak", "peak_mem_mb", "io_mb", "max_abs_err_vs_fp32_reference", "error"]
    header = (f"# decay_attention on {env['device']} (torch {env['torch']}, triton {env['triton']})\n\n"
              f"Command: `python benchmarks/bench_decay_attention.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n")
    kw = {"out_dir": out_dir} if out_dir else {}
    path = write_results(records, "decay_attention", device, columns, header=header, **kw)
    print(f"wrote {path} and {os.path.splitext(path)[0]}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
