"""Manhattan-decay attention on GPU (issue 3): the Triton kernels against the reference, SDPA and FlexAttention.

A thin wrapper over :mod:`fusionblocks.bench` (the engine of ``fusionblocks bench``): the implementations
(``triton``, ``reference`` and the ``sdpa``/``flex`` anchors), the timing, the peak memory and the record
format are the engine's; see ``benchmarks/results/README.md`` for the definitions. This script picks
issue 3's shapes and adds its own fields:

- ``tflops``: the attention's matmul FLOPs (``4·B·heads·N·L·D`` forward with ``L`` keys per query: ``N``
  for the full form, ``H + W`` for the decomposed one; 3.5× that for fwd+bwd) over the time; the same
  count for every implementation;
- ``pct_of_dense_bf16_peak``: that as a share of the card's dense bf16 tensor-core peak (full form, bf16,
  known cards only);
- ``io_mb``: the size of q, k, v, o (and their gradients for fwd+bwd), the floor of a fused kernel's
  ``peak_mem_mb`` (issue 3's memory target is ``peak_mem_mb <= 1.2 * io_mb``);
- ``max_abs_err``: max |forward − the reference in float32| on the same inputs.

Shapes (issue 3): full 2-D at B=32, 4 heads, 56×56 and 28×28, D 16/32/64, and B=2, 8 heads, 96×96, D 32;
decomposed at HEMF's four stages, B=32, 8 heads (56×56/D12, 28×28/D24, 14×14/D48, 7×7/D96). ``log_gamma``
is RMT's fixed decay, as in the official models. Timed calls rotate through 3 input sets
(``--rotate``).

Run on a GPU (writes ``benchmarks/results/decay_attention-<gpu>.json`` and ``.md``)::

    python benchmarks/bench_decay_attention.py
    python benchmarks/bench_decay_attention.py --impls triton flex --dtypes bf16

Smoke run on CPU (tiny shapes; the Triton kernels run in the interpreter, FlexAttention eagerly, fp32;
writes to a temporary folder unless ``--out-dir`` is given)::

    python benchmarks/bench_decay_attention.py --quick
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

NAME = "decay_attention"
MODES = ("full", "decomposed")
IMPLS = ("triton", "reference", "sdpa", "flex")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
QUICK_SHAPES = {
    "full": [dict(B=1, heads=2, H=5, W=7, D=16)],
    "decomposed": [dict(B=1, heads=2, H=3, W=5, D=12)],
}
# dense (no sparsity) bf16 tensor-core peak, TFLOP/s
DENSE_BF16_PEAK = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l40s": 362.0, "a10": 125.0}
COLUMNS = [("TFLOP/s", "tflops"), ("% bf16 peak", "pct_of_dense_bf16_peak"), ("io MB", "io_mb"),
           ("max abs err", "max_abs_err")]


def op_name(mode: str) -> str:
    return f"{NAME}_{mode}"


def shapes(mode: str, quick: bool) -> List[dict]:
    """Issue 3's shapes of ``mode`` (the engine's paper shapes), or the tiny smoke shapes."""
    return [dict(s) for s in (QUICK_SHAPES[mode] if quick else bench.OPS[op_name(mode)].shapes(False))]


def dense_bf16_peak(device: str) -> Optional[float]:
    low = device.lower()
    return next((peak for key, peak in DENSE_BF16_PEAK.items() if key in low), None)


def flops(mode: str, shape: dict, pass_: str) -> float:
    """Matmul FLOPs: ``4·B·heads·N·L·D`` forward (``L`` keys per query), 3.5× that for fwd+bwd."""
    n = shape["H"] * shape["W"]
    keys = n if mode == "full" else shape["H"] + shape["W"]
    fwd = 4.0 * shape["B"] * shape["heads"] * n * keys * shape["D"]
    return fwd * (3.5 if pass_ == "fwd+bwd" else 1.0)


def add_fields(records: List[dict], device: torch.device) -> str:
    """``tflops``, ``pct_of_dense_bf16_peak`` and ``io_mb`` of each measured record."""
    for r in records:
        if r["ms"] is None:
            continue
        mode = r["op"][len(NAME) + 1:]
        s = r["shape"]
        tflops = flops(mode, s, r["pass"]) / (r["ms"] * 1e-3) / 1e12
        r["tflops"] = tflops
        peak = dense_bf16_peak(r["device"])
        if mode == "full" and r["dtype"] == "bfloat16" and peak:
            r["pct_of_dense_bf16_peak"] = 100.0 * tflops / peak
        elem = torch.empty((), dtype=bench.parse_dtype(r["dtype"])).element_size()
        tensor_mb = s["B"] * s["heads"] * s["H"] * s["W"] * s["D"] * elem / 2**20
        r["io_mb"] = tensor_mb * (8 if r["pass"] == "fwd+bwd" else 4)
    peak = dense_bf16_peak(bench.device_name(device))
    return f"dense bf16 peak {peak:.0f} TFLOP/s" if peak else ""


def main(argv: Optional[List[str]] = None) -> int:
    p = bench.script_parser(__doc__.split("\n\n")[0], IMPLS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = p.parse_args(argv)
    bench.run_script(
        args, name=NAME, shapes={op_name(m): shapes(m, args.quick) for m in args.modes}, results_dir=RESULTS_DIR,
        command=" ".join(["python benchmarks/bench_decay_attention.py", *(sys.argv[1:] if argv is None else argv)]),
        columns=COLUMNS, add_fields=add_fields,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
