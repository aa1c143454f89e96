"""What the automatic backend choice (``backend=None``) costs per call, next to naming a backend.

Times small calls of both attention ops, where Python's share of a call is largest (a 7x7 grid at batch 1:
HEMF's and HiFuse's last stage at inference), through the public op with ``backend="cpp"``, ``backend=None``
and ``backend="reference"``, in one process and interleaved rounds, after the automatic choice has measured
the call once. ``cpp`` named runs in the instruction-set variant that the automatic choice picked (named, it
would run the widest), so where auto picked ``cpp``, ``auto - cpp`` is the choice's own cost per call.

    python benchmarks/bench_dispatch.py --threads 1
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

CASES = {
    # name -> (op, q shape (B, heads, N, D), options)
    "decay_attention decomposed 7x7": ("decay_attention", (1, 8, 49, 96), dict(hw=(7, 7), mode="decomposed")),
    "decay_attention full 7x7": ("decay_attention", (1, 8, 49, 96), dict(hw=(7, 7), mode="full")),
    "window_attention 7x7 ws 7": ("window_attention", (1, 24, 49, 32), dict(hw=(7, 7), window_size=7)),
    "window_attention 14x14 ws 7 shift 3": ("window_attention", (1, 12, 196, 32), dict(hw=(14, 14), window_size=7,
                                                                                         shift=3)),
}
BACKENDS = ("cpp", None, "reference")


def _inputs(op: str, shape, options) -> tuple:
    """The op's positional arguments for one case: q = k = v, and the decay rates or the bias table."""
    q = torch.randn(*shape)
    heads = shape[1]
    if op == "decay_attention":
        return q, q, q, torch.linspace(-1.0, -0.1, heads)
    return q, q, q, torch.randn((2 * options["window_size"] - 1) ** 2, heads)


def _per_call_us(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def run(calls: int, rounds: int) -> List[Dict[str, object]]:
    """One row per case: the median µs per call of each backend, auto's choice, and auto - cpp (``None`` for
    ``cpp`` where the extension is not built)."""
    from fusionblocks import ops
    from fusionblocks.ops import cpp

    rows = []
    with torch.no_grad():
        for name, (op, shape, options) in CASES.items():
            args = _inputs(op, shape, options)
            fn = getattr(ops, op)
            choice = ops.choose(op, *args, **options)  # measures the call class now, as a first call would
            # cpp named runs in auto's variant, so that auto - cpp is the choice's own cost, not another kernel's
            variant = choice.variant if choice.backend == "cpp" else None
            backends = BACKENDS if cpp.available() else tuple(b for b in BACKENDS if b != "cpp")
            samples: Dict[str, List[float]] = {str(b or "auto"): [] for b in backends}

            def timed(b):
                with cpp.call_isa(variant) if b == "cpp" and variant else contextlib.nullcontext():
                    return _per_call_us(lambda: fn(*args, backend=b, **options), calls)

            for b in backends:
                fn(*args, backend=b, **options)  # warm-up
            for r in range(rounds):
                for b in backends[r % len(backends):] + backends[: r % len(backends)]:
                    samples[str(b or "auto")].append(timed(b))
            med = {k: round(statistics.median(v), 1) for k, v in samples.items()}
            rows.append(dict(case=name, chosen=choice.label, cpp_us=med.get("cpp"), auto_us=med["auto"],
                             reference_us=med["reference"],
                             auto_minus_cpp_us=round(med["auto"] - med["cpp"], 1) if "cpp" in med else None))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads; default 1)")
    p.add_argument("--calls", type=int, default=300, help="calls per timing (default 300)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the median is reported (default 7)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fusionblocks._device import device_name
    from fusionblocks.ops import cpp

    print(f"# {device_name(torch.device('cpu'))}, torch {torch.__version__}, {args.threads} thread(s), "
          f"cpp variants {cpp.isa_variants() if cpp.available() else 'not built'}; "
          f"FUSIONBLOCKS_AUTOTUNE={os.environ.get('FUSIONBLOCKS_AUTOTUNE', 'on')}")
    print("| case | auto's choice | cpp µs (auto's variant) | auto µs | reference µs | auto - cpp µs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in run(args.calls, args.rounds):
        print(f"| {r['case']} | {r['chosen']} | {r['cpp_us']} | {r['auto_us']} | {r['reference_us']} | "
              f"{r['auto_minus_cpp_us']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
