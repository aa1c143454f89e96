"""CPU benchmark of the compiled ``cpp`` kernels against the plain-PyTorch reference.

Shapes: decay attention (full and decomposed) at 28x28 and 56x56 tokens, B=1, 4 heads, head dim 32;
window attention at HiFuse's stage-1 shape (56x56 tokens, 3 heads, head dim 32, window 7, shift 3,
with the bias table), batch 2. Each is timed for the forward (no grad) and forward + backward.

Memory: every measurement runs in a fresh child process and reports the growth of the process's
peak resident set (``getrusage(...).ru_maxrss``) across one call, after the inputs exist and after a
warm-up call on a tiny shape (thread pools, BLAS buffers). That counts every byte the call touches,
whoever allocates it (torch's allocator, the kernels' own buffers, BLAS), and includes the output
and, for fwd+bwd, the gradients. Time: best of ``--repeat`` calls after one warm-up call.

Run: ``python benchmarks/bench_cpu.py`` (``--json 'benchmarks/results/cpu-{cpu}.json'`` also writes the rows,
``{cpu}`` becoming the CPU model in file-name form; ``--threads N``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

CASES = [
    # (name, op, tokens per side)
    ("decay full 28x28", "decay_full", 28),
    ("decay full 56x56", "decay_full", 56),
    ("decay decomposed 28x28", "decay_decomposed", 28),
    ("decay decomposed 56x56", "decay_decomposed", 56),
    ("window hifuse stage-1 (B=2, 56x56, ws 7, shift 3)", "window", 56),
]
BACKENDS = ("reference", "cpp")
PASSES = ("fwd", "fwd+bwd")


def _inputs(op: str, size: int, requires_grad: bool):
    import torch

    g = torch.Generator().manual_seed(0)
    if op == "window":
        b, heads, d, ws = 2, 3, 32, 7
        q, k, v = (torch.randn(b, heads, size * size, d, generator=g) for _ in range(3))
        extra = torch.randn((2 * ws - 1) ** 2, heads, generator=g) * 0.02
    else:
        b, heads, d = 1, 4, 32
        q, k, v = (torch.randn(b, heads, size * size, d, generator=g) for _ in range(3))
        extra = torch.log(1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float32)))
    return [t.requires_grad_(requires_grad) for t in (q, k, v, extra)]


def _call(op: str, size: int, backend: str, inputs):
    from fusionblocks.ops import decay_attention, window_attention

    if op == "window":
        return window_attention(*inputs, hw=(size, size), window_size=7, shift=3, backend=backend)
    mode = "full" if op == "decay_full" else "decomposed"
    return decay_attention(*inputs, hw=(size, size), mode=mode, backend=backend)


def _run_once(op: str, size: int, backend: str, pass_: str, inputs) -> None:
    import torch

    if pass_ == "fwd":
        with torch.no_grad():
            _call(op, size, backend, inputs)
    else:
        for t in inputs:
            t.grad = None
        _call(op, size, backend, inputs).sum().backward()


def child(op: str, size: int, backend: str, pass_: str, repeat: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    small = 7 if op == "window" else 4
    _run_once(op, small, backend, pass_, _inputs(op, small, pass_ != "fwd"))  # warm-up: pools, BLAS
    inputs = _inputs(op, size, pass_ != "fwd")
    if pass_ != "fwd":  # gradient buffers of the inputs exist before the measured call
        for t in inputs:
            t.grad = torch.zeros_like(t)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _run_once(op, size, backend, pass_, inputs)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024.0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        _run_once(op, size, backend, pass_, inputs)
        times.append(time.perf_counter() - t0)
    return {"peak_extra_mb": round(peak_mb, 1), "time_ms": round(1e3 * min(times), 2)}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--child", nargs=4, metavar=("OP", "SIZE", "BACKEND", "PASS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        op, size, backend, pass_ = args.child
        print(json.dumps(child(op, int(size), backend, pass_, args.repeat, args.threads)))
        return

    import torch

    rows = []
    cpu = cpu_name()
    print(f"{cpu}; torch {torch.__version__}, {args.threads} threads, best of {args.repeat}; memory = peak RSS growth")
    print("| case | pass | reference ms | cpp ms | speed-up | reference MB | cpp MB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, op, size in CASES:
        for pass_ in PASSES:
            res = {}
            for backend in BACKENDS:
                cmd = [sys.executable, __file__, "--repeat", str(args.repeat), "--threads", str(args.threads),
                       "--child", op, str(size), backend, pass_]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                res[backend] = json.loads(out.strip().splitlines()[-1])
            r, c = res["reference"], res["cpp"]
            rows.append({"case": name, "pass": pass_, **{f"{b}_{k}": v for b in BACKENDS for k, v in res[b].items()}})
            print(f"| {name} | {pass_} | {r['time_ms']:.1f} | {c['time_ms']:.1f} | {r['time_ms'] / c['time_ms']:.2f}x "
                  f"| {r['peak_extra_mb']:.1f} | {c['peak_extra_mb']:.1f} |", flush=True)
    if args.json:
        slug = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-")
        with open(args.json.replace("{cpu}", slug), "w") as f:
            json.dump({"cpu": cpu, "torch": torch.__version__, "threads": args.threads, "repeat": args.repeat,
                       "memory": "peak RSS growth over one call (MB)", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
