"""Shared helpers of the GPU kernel benchmarks: timing, peak memory, and the result records.

A record is one measurement::

    {"op", "impl", "shape": {...}, "dtype", "pass": "fwd"|"fwd+bwd", "ms", "peak_mem_mb",
     "device", "torch", "triton", ...extra fields}

:func:`write_results` stores a list of records as ``benchmarks/results/<name>-<gpu>.json`` and the
Markdown table next to it (``.md``).
"""
from __future__ import annotations

import json
import os
import re
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def device_slug(device: torch.device) -> str:
    """File-name form of the device: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def environment(device: torch.device) -> Dict[str, str]:
    """The ``device``, ``torch`` and ``triton`` fields of every record."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version}


def time_ms(fn: Callable[[int], object], device: torch.device, *, quick: bool = False) -> float:
    """Median milliseconds of ``fn(i)``; ``i`` counts calls so ``fn`` can rotate through input sets.

    CUDA: ``triton.testing.do_bench`` (median, its own warm-up and L2 flush). CPU: median of a few
    ``perf_counter`` timings after one warm-up call.
    """
    counter = [0]

    def call():
        fn(counter[0])
        counter[0] += 1

    if device.type == "cuda":
        import triton.testing

        warmup, rep = (5, 20) if quick else (25, 100)
        return float(triton.testing.do_bench(call, warmup=warmup, rep=rep, return_mode="median"))
    call()
    times = []
    for _ in range(3 if quick else 10):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak CUDA memory allocated (MB) while ``fn()`` runs, counting what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def markdown_table(records: Sequence[dict], columns: Sequence[str]) -> str:
    """Records as a Markdown table; a column is a record key or ``shape``-key; missing cells are blank."""

    def cell(r: dict, c: str) -> str:
        v = r.get(c, r.get("shape", {}).get(c, ""))
        if isinstance(v, float):
            if v != 0 and abs(v) < 1e-2:
                return f"{v:.2e}"
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        if isinstance(v, dict):
            return " ".join(f"{k}={x}" for k, x in v.items())
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in records]
    return "\n".join(lines) + "\n"


def write_results(
    records: List[dict], name: str, device: torch.device, columns: Sequence[str], *, out_dir: str = RESULTS_DIR, header: str = ""
) -> str:
    """Write ``<out_dir>/<name>-<gpu>.json`` (the records) and ``.md`` (a table); returns the JSON path."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{name}-{device_slug(device)}")
    with open(stem + ".json", "w") as f:
        json.dump(records, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(header + markdown_table(records, columns))
    return stem + ".json"
