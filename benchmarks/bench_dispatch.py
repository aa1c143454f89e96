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
import functools
import os
import sys
from typing import Dict, List, Optional

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


def run(budget_s: float, rounds: int) -> List[Dict[str, object]]:
    """One row per case: the µs per call of each backend (:func:`fusionblocks.bench.time_interleaved_ms`), auto's
    choice, and auto - cpp (``None`` for ``cpp`` where the extension is not built)."""
    from fusionblocks import bench, ops
    from fusionblocks.ops import cpp

    rows = []
    with torch.no_grad():
        for name, (op, shape, options) in CASES.items():
            args = _inputs(op, shape, options)
            fn = getattr(ops, op)
            choice = ops.choose(op, *args, **options)  # measures the call class now, as a first call would
            backends = BACKENDS if cpp.available() else tuple(b for b in BACKENDS if b != "cpp")
            fns = {str(b or "auto"): functools.partial(fn, *args, backend=b, **options) for b in backends}
            # the thread's variant is auto's for the whole timing: cpp named runs in it (named, it would run the
            # widest), so that auto - cpp is the choice's own cost, not another kernel's; auto sets the same one
            variant = choice.variant if choice.backend == "cpp" else None
            with cpp.call_isa(variant) if variant else contextlib.nullcontext():
                ms = bench.time_interleaved_ms(fns, budget_s=budget_s, rounds=rounds)
            failed = {k: v for k, v in ms.items() if isinstance(v, Exception)}
            if failed:
                raise RuntimeError(f"bench_dispatch: {name}: " + "; ".join(f"{k} raised {v!r}" for k, v in failed.items()))
            us = {k: round(v * 1e3, 1) for k, v in ms.items()}
            rows.append(dict(case=name, chosen=choice.label, cpp_us=us.get("cpp"), auto_us=us["auto"],
                             reference_us=us["reference"],
                             auto_minus_cpp_us=round(us["auto"] - us["cpp"], 1) if "cpp" in us else None))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads; default 1)")
    p.add_argument("--budget", type=float, default=2.0,
                   help="seconds per backend and case, over all rounds (default 2)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds; the median is reported (default 15)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fusionblocks._device import device_name
    from fusionblocks.ops import cpp

    print(f"# {device_name(torch.device('cpu'))}, torch {torch.__version__}, {args.threads} thread(s), "
          f"cpp variants {cpp.isa_variants() if cpp.available() else 'not built'}; "
          f"FUSIONBLOCKS_AUTOTUNE={os.environ.get('FUSIONBLOCKS_AUTOTUNE', 'on')}")
    print("| case | auto's choice | cpp µs (auto's variant) | auto µs | reference µs | auto - cpp µs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in run(args.budget, args.rounds):
        print(f"| {r['case']} | {r['chosen']} | {r['cpp_us']} | {r['auto_us']} | {r['reference_us']} | "
              f"{r['auto_minus_cpp_us']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
