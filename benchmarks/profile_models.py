"""Where a network's CPU time goes: ``torch.profiler`` over a forward pass and a training step, by op family.

Prints, per model and pass, the share of self CPU time of each op family (convolutions, matrix products,
attention kernels, softmax, normalization, element-wise, copies/layout, the rest) and the top aten ops,
with the backend choice given by ``--backend`` (``auto``: the automatic choice). For the README's
performance section; the numbers depend on the CPU, so each run names it.

    python benchmarks/profile_models.py --models hemf hifuse_tiny --image-size 224 --threads 1
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict

import torch

FAMILIES = [
    ("attention kernels (fusionblocks_C)", r"fusionblocks"),
    ("convolution", r"conv|mkldnn_convolution|_convolution"),
    ("matrix products", r"addmm|\bmm\b|bmm|matmul|linear|baddbmm"),
    ("softmax", r"softmax"),
    ("normalization", r"norm"),
    ("copies / layout", r"copy_|clone|contiguous|cat|roll|index|gather|scatter|permute|transpose|reshape|view|expand|_to_copy|repeat|pad|constant_pad"),
    ("element-wise / activation", r"add|mul|div|sub|gelu|relu|sigmoid|silu|hardswish|exp|pow|sqrt|neg|where|fill|zero|abs|mean|sum|max|min|clamp|threshold"),
    ("optimizer", r"_foreach|adam|lerp"),
]


def family(name: str) -> str:
    for label, pattern in FAMILIES:
        if re.search(pattern, name):
            return label
    return "other"


def profile(model, x, y, pass_: str, opt):
    from torch.profiler import ProfilerActivity, profile as prof

    from fusionblocks.bench.models import model_steps

    fwd, train = model_steps(model, x, y, opt)  # the passes `fusionblocks bench --model` times
    step = fwd if pass_ == "fwd" else train
    step()  # warm-up (and the automatic choice's one-time measurements)
    with prof(activities=[ProfilerActivity.CPU]) as p:
        step()
    events = [e for e in p.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    by_family = defaultdict(float)
    for e in events:
        by_family[family(e.key)] += e.self_cpu_time_total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    return total / 1e3, by_family, top, total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["hemf", "hifuse_tiny"])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--passes", nargs="+", default=["fwd", "train"], choices=["fwd", "train"])
    ap.add_argument("--backend", default="auto", help="reference, cpp, ... or auto (default)")
    args = ap.parse_args(argv)
    if args.backend != "auto":
        os.environ["FUSIONBLOCKS_BACKEND"] = args.backend
    torch.set_num_threads(args.threads)
    import fusionblocks
    from fusionblocks._device import device_name
    from fusionblocks.training.recipes import step_options

    print(f"# {device_name('cpu')} · torch {torch.__version__} · {args.threads} thread(s) · "
          f"B={args.batch_size} · {args.image_size}² · backend {args.backend}")
    for name in args.models:
        model = fusionblocks.create_model(name, num_classes=7)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **step_options(model.parameters()))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
        y = torch.randint(0, 7, (args.batch_size,), generator=g)
        for pass_ in args.passes:
            ms, by_family, top, total = profile(model, x, y, pass_, opt)
            print(f"\n## {name} {pass_}: {ms:.1f} ms of self CPU time in ops")
            for label, t in sorted(by_family.items(), key=lambda kv: -kv[1]):
                print(f"  {label:<38} {100 * t / total:5.1f} %")
            print("  top ops: " + ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.1f} %" for e in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
