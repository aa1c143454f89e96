"""CPU benchmark of the compiled ``cpp`` kernels against the reference (issue 7), in the bench suite of issue 6.

A thin wrapper over :mod:`fusionblocks.bench` (the engine of ``fusionblocks bench``): the implementations,
the timing, the peak memory and the record format are the engine's; see ``benchmarks/results/README.md``
for the definitions. This script picks the engine's ``cpu`` shape preset (``bench.PRESETS["cpu"]``):

- decay attention, full and decomposed, at 28×28 and 56×56 tokens, B=1, 4 heads, D=32 (RMT's fixed decay);
- window attention at HiFuse's stage-1 shape (56×56 tokens, 3 heads, D=32, window 7, shift 0 and 3, with
  the relative-position bias table) at batch 2;

each for ``fwd`` and ``fwd+bwd``, fp32, on CPU, with ``max_abs_err`` against the fp32 reference. Default
implementations: ``reference`` and ``cpp`` (``--impls ... sdpa`` adds the SDPA anchor). Issue 7's target:
at 56², full decay ``fwd`` with ``cpp`` needs < 60 MB above its inputs (``peak_mem_mb`` minus ``io_mb``)
and is no slower than ``reference``.

Run (writes ``benchmarks/results/cpu_kernels-<device>-<N>thread(s).json`` and ``.md``)::

    python benchmarks/bench_cpu.py --threads 1 --budget 3
    python benchmarks/bench_cpu.py --threads 2 --budget 3

Smoke run (tiny shapes; writes to a temporary folder unless ``--out-dir`` is given)::

    python benchmarks/bench_cpu.py --quick
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Dict, List, Optional

import torch

from fusionblocks import bench

NAME = "cpu_kernels"
PRESET = "cpu"
IMPLS = ("reference", "cpp", "sdpa")
DEFAULT_IMPLS = ("reference", "cpp")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
QUICK_SHAPES = {
    "decay_attention_full": [dict(B=1, heads=2, H=5, W=7, D=16)],
    "decay_attention_decomposed": [dict(B=1, heads=2, H=5, W=7, D=16)],
    "window_attention": [dict(B=1, heads=2, H=9, W=6, D=16, ws=3, shift=1)],
}
COLUMNS = [("io MB", "io_mb"), ("max abs err", "max_abs_err")]


def shapes(quick: bool) -> Dict[str, List[dict]]:
    """The ``cpu`` preset's shapes (op name -> shapes), or the tiny smoke shapes."""
    return {op: [dict(s) for s in ss] for op, ss in QUICK_SHAPES.items()} if quick else bench.preset(PRESET)


def load_average() -> Optional[float]:
    """The machine's 1-minute load average (``None`` where the OS has none): other work on the cores skews
    CPU timings, so the Markdown title records it before and after the run."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def add_fields(records: List[dict], device: torch.device, load_before: Optional[float] = None) -> str:
    """``io_mb``: q, k, v, o (+ their gradients for ``fwd+bwd``), the floor of a fused kernel's ``peak_mem_mb``."""
    for r in records:
        if r["ms"] is None:
            continue
        s = r["shape"]
        elem = torch.empty((), dtype=bench.parse_dtype(r["dtype"])).element_size()
        tensor_mb = s["B"] * s["heads"] * s["H"] * s["W"] * s["D"] * elem / 2**20
        r["io_mb"] = tensor_mb * (8 if r["pass"] == "fwd+bwd" else 4)
    note = f"{torch.get_num_threads()} thread(s) on {os.cpu_count()} cores"
    load_after = load_average()
    if load_before is not None and load_after is not None:
        note += f" · 1-min load average {load_before:.1f} before, {load_after:.1f} after the run"
    return note


def main(argv: Optional[List[str]] = None) -> int:
    p = bench.script_parser(__doc__.split("\n\n")[0], IMPLS)
    p.set_defaults(impls=list(DEFAULT_IMPLS))
    args = p.parse_args(argv)
    if args.dtypes is None:
        args.dtypes = ["fp32"]
    if args.rotate is None:
        args.rotate = 1
    threads = args.threads or torch.get_num_threads()
    bench.run_script(
        args, name=NAME, shapes=shapes(args.quick), results_dir=RESULTS_DIR,
        command=" ".join(["python benchmarks/bench_cpu.py", *(sys.argv[1:] if argv is None else argv)]),
        columns=COLUMNS, add_fields=functools.partial(add_fields, load_before=load_average()), device="cpu",
        pivot="cpp",
        suffix=f"-{threads}thread" + ("s" if threads != 1 else ""),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
