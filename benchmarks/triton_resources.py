"""Registers, spills and shared memory of every Triton kernel configuration, cross-compiled for sm_90.

No GPU is needed: Triton's bundled ``ptxas`` compiles each configuration the launchers can choose
(``fusionblocks.ops.triton.{window,decay}.compile_specs``) for an H100/H200 and ``cuobjdump`` reads the
cubin's resource usage. Prints a Markdown report::

    env -u TRITON_INTERPRET python benchmarks/triton_resources.py > benchmarks/results/triton-sm90-resources.md

Options: ``--arch 90``, ``--workers N`` (default: all cores), ``--all-flags`` (every constexpr flag
combination instead of all-on/all-off), ``--quick`` (the set ``tests/ops/test_triton_aot.py`` compiles).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _row(r: dict, limit: int) -> str:
    if not r["ok"]:
        return f"| {r['group']} | {r['dtype']} | {r['label']} | {_launch(r)} | FAILED: {r['error'].splitlines()[0][:120]} | | |"
    flag = f" **(> {limit // 1024} KB)**" if r["shared"] > limit else ""
    return (f"| {r['group']} | {r['dtype']} | {r['label']} | {_launch(r)} | {r['regs']} | {r['spills']} | "
            f"{r['shared']}{flag} |")


def _launch(r: dict) -> str:
    c = r["constexprs"]
    tiles = "x".join(str(c[k]) for k in ("BLOCK_L", "BLOCK_M", "BLOCK_N", "BLOCK_D") if k in c)
    return f"{tiles} w{r['num_warps']} s{r['num_stages']}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--all-flags", action="store_true")
    ap.add_argument("--quick", action="store_true", help="the test's set: flags all on, bfloat16 standing for float16")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: cross-compiling needs triton's GPU compiler")
    import torch
    import triton

    from fusionblocks.ops.triton import _common

    specs = _common.all_compile_specs(quick=args.quick, all_flags=args.all_flags, arch=args.arch)
    limit = _common.shared_bytes_of_capability(args.arch)
    start = time.perf_counter()
    results = _common.cross_compile_all(specs, arch=args.arch, workers=args.workers)
    took = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    print(f"# Triton kernel resources, cross-compiled for sm_{args.arch}\n")
    print(f"triton {triton.__version__}, torch {torch.__version__}. **Cross-compile only: no GPU ran.** "
          f"Each row is one configuration the launchers can choose, compiled to a cubin with Triton's bundled "
          f"ptxas; `regs` (per thread) and `spills` (Triton's `n_spills`: per-thread local memory bytes / 4) "
          f"come from `cuobjdump -res-usage`, `shared` (bytes per block) from the compile metadata; the sm_{args.arch} "
          f"limit is {limit // 1024} KB ({limit} bytes; the launchers fit their choices to it). Pointers are assumed 16-byte aligned, integer arguments unspecialized. "
          f"`launch`: tile sizes (BLOCK_L or BLOCK_M x BLOCK_N, then BLOCK_D), warps, stages. "
          f"Command: `env -u TRITON_INTERPRET python benchmarks/triton_resources.py`.\n")
    print(f"Set: {'quick (flags all on; bfloat16 stands for float16)' if args.quick else 'every tile configuration, flags all on and all off'}. "
          f"{len(results)} configurations, {len(ok)} compiled, "
          f"{sum(1 for r in ok if r['spills'])} spill, {sum(1 for r in ok if r['shared'] > limit)} over {limit // 1024} KB "
          f"shared; compile wall time {took:.0f} s.\n")
    print("| kernel | dtype | config | launch | regs | spills | shared bytes |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(_row(r, limit))
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
