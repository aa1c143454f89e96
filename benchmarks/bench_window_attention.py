"""Shifted-window attention on GPU (issue 4): the fused Triton kernel against the reference, SDPA and FlexAttention.

A thin wrapper over :mod:`fusionblocks.bench` (the engine of ``fusionblocks bench``): the implementations
(``triton``, ``reference`` = the official-style roll/partition/matmul, and the anchors ``sdpa`` with a
materialized ``(B·nW, heads, L, L)`` bias + shift mask and ``flex`` = compiled FlexAttention with a window
block mask and a bias/region ``score_mod``), the timing, the peak memory and the record format are the
engine's; see ``benchmarks/results/README.md`` for the definitions. This script picks issue 4's shapes and
adds its own fields:

- ``gbps``: bytes moved over the time, bytes = q, k, v read once + o written once for ``fwd`` (4 tensors;
  12 for ``fwd+bwd``: the forward's 4, then q, k, v, o, do read and dq, dk, dv written);
- ``hbm_share``: ``gbps`` as a share of the device's copy bandwidth measured in the same process
  (``dst.copy_(src)`` on 1 GiB, read + write; CUDA only);
- ``max_abs_err``: max |forward − the reference in float32| on the same inputs.

Shapes (issue 4): HiFuse's four global stages at batch 32 (56×56 / 3 heads, 28×28 / 6, 14×14 / 12,
7×7 / 24; D=32, window 7), shift 0 and 3, with a ``((2ws-1)², heads)`` bias table that takes gradients.
Timed calls rotate through 3 input sets (``--rotate``).

Run on a GPU (writes ``benchmarks/results/window_attention-<gpu>.json`` and ``.md``)::

    python benchmarks/bench_window_attention.py
    python benchmarks/bench_window_attention.py --stages 1 --dtypes bf16 --passes fwd+bwd

Smoke run on CPU (tiny shapes; the Triton kernel runs in the interpreter, FlexAttention eagerly, fp32;
writes to a temporary folder unless ``--out-dir`` is given)::

    python benchmarks/bench_window_attention.py --quick
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

if __name__ == "__main__" and "--quick" in sys.argv[1:]:
    import torch

    if not torch.cuda.is_available():  # Triton reads it when first imported (by fusionblocks)
        os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from fusionblocks import bench  # noqa: E402

NAME = "window_attention"
IMPLS = ("triton", "reference", "sdpa", "flex")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STAGE_SIZES = {1: 56, 2: 28, 3: 14, 4: 7}  # HiFuse's global stages at 224² input
QUICK_SHAPES = [dict(B=1, heads=2, H=7, W=14, D=16, ws=7, shift=3), dict(B=1, heads=3, H=7, W=7, D=16, ws=7, shift=0)]
COLUMNS = [("GB/s", "gbps"), ("HBM share", "hbm_share"), ("max abs err", "max_abs_err")]


def shapes(quick: bool, stages=None, shifts=None) -> List[dict]:
    """Issue 4's shapes (the engine's paper shapes), optionally only some stages/shifts, or the smoke shapes."""
    if quick:
        return [dict(s) for s in QUICK_SHAPES]
    sizes = {STAGE_SIZES[s] for s in stages} if stages else set(STAGE_SIZES.values())
    return [dict(s) for s in bench.OPS[NAME].shapes(False)
            if s["H"] in sizes and (shifts is None or s["shift"] in shifts)]


def copy_bandwidth_gbps(device: torch.device) -> Optional[float]:
    """Device copy bandwidth (read + write) in GB/s from ``dst.copy_(src)`` on 1 GiB; ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    src = torch.randint(0, 256, (2**30,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench.time_ms(lambda: dst.copy_(src), device)
    return 2 * 2**30 / (ms * 1e-3) / 1e9


def add_fields(records: List[dict], device: torch.device) -> str:
    """``gbps`` and ``hbm_share`` of each measured record (the copy bandwidth is measured here)."""
    bandwidth = copy_bandwidth_gbps(device)
    for r in records:
        if r["ms"] is None:
            continue
        s = r["shape"]
        elem = torch.empty((), dtype=bench.parse_dtype(r["dtype"])).element_size()
        moved = (4 if r["pass"] == "fwd" else 12) * s["B"] * s["heads"] * s["H"] * s["W"] * s["D"] * elem
        r["gbps"] = moved / (r["ms"] * 1e-3) / 1e9
        if bandwidth:
            r["hbm_share"] = r["gbps"] / bandwidth
    return f"device copy bandwidth {bandwidth:.0f} GB/s" if bandwidth else ""


def main(argv: Optional[List[str]] = None) -> int:
    p = bench.script_parser(__doc__.split("\n\n")[0], IMPLS)
    p.add_argument("--stages", nargs="+", type=int, default=None, choices=sorted(STAGE_SIZES))
    p.add_argument("--shifts", nargs="+", type=int, default=None, choices=(0, 3))
    args = p.parse_args(argv)
    bench.run_script(
        args, name=NAME, shapes={NAME: shapes(args.quick, args.stages, args.shifts)}, results_dir=RESULTS_DIR,
        command=" ".join(["python benchmarks/bench_window_attention.py", *(sys.argv[1:] if argv is None else argv)]),
        columns=COLUMNS, add_fields=add_fields,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
