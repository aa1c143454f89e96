"""The ``fusionblocks`` command: ``info``, ``summary``, ``bench`` (and subcommands added by other modules).

Each subcommand is one ``add_<name>(subparsers)`` function that builds its parser and sets
``func`` to a handler ``(args) -> int``. Built-in ones are listed in :data:`COMMANDS`; a module named in
:data:`COMMAND_MODULES` that exists adds its own through ``add_cli_commands(subparsers)`` (e.g.
``fusionblocks/training/cli.py`` for ``train``/``evaluate``), so new subcommands need no edit here beyond
that name.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

COMMAND_MODULES = ("fusionblocks.training.cli", "fusionblocks.export", "fusionblocks.training.predict")


class CLIError(Exception):
    """A user error: printed as ``fusionblocks <cmd>: error: ...`` with exit status 2."""


# ----------------------------------------------------------------------------------------------- info


def _example_calls(device):
    """Small example arguments for every op variant: name -> (op, args, kwargs)."""
    import torch

    def qkv(n, d=32, heads=4):
        g = torch.Generator().manual_seed(0)
        return [torch.randn(1, heads, n, d, generator=g).to(device) for _ in range(3)]

    lg = torch.full((4,), -0.1, device=device)
    table = torch.zeros((2 * 7 - 1) ** 2, 4, device=device)
    return {
        "decay_attention (full)": ("decay_attention", (*qkv(56), lg), dict(hw=(7, 8), mode="full", scale=None)),
        "decay_attention (decomposed)": (
            "decay_attention", (*qkv(56), lg), dict(hw=(7, 8), mode="decomposed", scale=None)),
        "window_attention": (
            "window_attention", (*qkv(196), table), dict(hw=(14, 14), window_size=7, shift=3, scale=None)),
    }


def collect_info(device: Optional[str] = None) -> dict:
    """Versions, the compiled extension and, for each op, which backends can run here and why not."""
    import torch

    import fusionblocks

    from ._device import device_name, triton_version
    from .ops import autotune, dispatch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        importlib.import_module("fusionblocks._C")
        ext = {"built": True, "error": None}
    except ImportError as e:
        ext = {"built": False, "error": f"{type(e).__name__}: {e}"}
    try:
        models = fusionblocks.list_models()
    except Exception as e:  # a broken model module must not hide the rest of the report
        models = [f"<cannot list models: {type(e).__name__}: {e}>"]
    ops = {}
    for label, (op, args, kw) in _example_calls(dev).items():
        reasons = dispatch.explain(op, *args, **kw)
        try:
            choice = dispatch.choose(op, *args, **kw)
            auto, why = choice.backend, {"how": choice.how, "why": choice.why, "times_ms": choice.times_ms,
                                         "variant": choice.variant}
        except dispatch.BackendUnavailable as e:
            auto, why = None, {"how": "none", "why": str(e).splitlines()[0], "times_ms": None, "variant": None}
        ops[label] = {
            "example": {"shape": list(args[0].shape), "dtype": str(args[0].dtype).replace("torch.", ""),
                        **{k: v for k, v in kw.items() if v is not None}},
            "auto": auto,
            "choice": why,
            "backends": {n: {"available": not r, "reasons": r} for n, r in reasons.items()},
        }
    return {
        "fusionblocks": fusionblocks.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": device_name(dev),
        "env_backend": os.environ.get(dispatch.ENV_VAR),
        "autotune": {"mode": autotune.tune_mode(), "cache": autotune.cache_path() if autotune.tune_mode() == "on" else None,
                     "known_choices": len(autotune.cached_choices())},
        "extension": ext,
        "models": models,
        "ops": ops,
    }


def format_info(info: dict) -> str:
    lines = [
        f"fusionblocks {info['fusionblocks']}",
        f"  python   {info['python']} ({info['platform']})",
        f"  torch    {info['torch']}",
        f"  triton   {info['triton'] or 'not installed'}",
        f"  CUDA     {info['cuda'] or 'none'} (available: {info['cuda_available']})",
        f"  device   {info['device']}",
        f"  _C       {'built' if info['extension']['built'] else 'not built (' + info['extension']['error'] + ')'}",
    ]
    lines.append(f"  models   {', '.join(info['models'])}")
    if info["env_backend"]:
        lines.append(f"  FUSIONBLOCKS_BACKEND={info['env_backend']}")
    tune = info["autotune"]
    lines.append(f"  autotune {tune['mode']} (FUSIONBLOCKS_AUTOTUNE); cache {tune['cache'] or 'none'}; "
                 f"{tune['known_choices']} choice(s) known")
    for label, op in info["ops"].items():
        ex = op["example"]
        lines.append("")
        c = op["choice"]
        picked = f"{op['auto']}[{c['variant']}]" if op["auto"] and c["variant"] else op["auto"] or "nothing"
        lines.append(f"{label}: example {tuple(ex['shape'])} {ex['dtype']}; auto picks {picked}")
        times = ", ".join(f"{n} {t:.3f} ms" for n, t in (c["times_ms"] or {}).items())
        lines.append(f"  why: {c['how']}: {c['why']}" + (f" [{times}]" if times else ""))
        for name, b in op["backends"].items():
            state = "can run" if b["available"] else "cannot run: " + "; ".join(b["reasons"])
            lines.append(f"  {name:<10} {state}")
    return "\n".join(lines)


def add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, device, and which backends of each op can run here (and why not)",
                       description="Show versions, the device, whether fusionblocks._C is built, and for each op "
                                   "which backends can run here on small example tensors, with the reasons of those "
                                   "that cannot.")
    p.add_argument("--device", default=None, help="device of the example tensors (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--clear-cache", action="store_true",
                   help="forget every measured backend choice (delete the per-machine cache files) first")
    p.set_defaults(func=cmd_info)


def _check_device(device: Optional[str]) -> None:
    """A command's ``--device`` checked against this machine before anything runs (:class:`CLIError` with
    :func:`fusionblocks._device.resolve_device`'s message, the check every command's ``--device`` shares)."""
    from ._device import resolve_device

    try:
        resolve_device(device)
    except ValueError as e:
        raise CLIError(str(e)) from None


def check_out_file(out: str, what: str, example: str) -> None:
    """Raise :class:`CLIError` for an ``--out`` a command could not write ``what`` to (a folder, or a path under a
    file), checked before any work: the work's result would be lost at the end."""
    path = Path(out)
    if path.is_dir():
        raise CLIError(f"--out {out} is a folder; expected {what} to write, e.g. {path / example}")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise CLIError(f"--out {out}: {parent} is a file, not a folder; expected {what} to write")


def _check_info_setup(device: Optional[str]) -> None:
    """Raise :class:`CLIError` for what ``info`` cannot report on: an invalid ``--device`` or one this torch lacks,
    an invalid ``FUSIONBLOCKS_BACKEND``, ``FUSIONBLOCKS_AUTOTUNE`` or ``FUSIONBLOCKS_CPU_ISA``."""
    from .ops import autotune, cpp, dispatch

    _check_device(device)
    backend = os.environ.get(dispatch.ENV_VAR)
    if backend and backend not in dispatch.BACKENDS:
        raise CLIError(f"{dispatch.ENV_VAR}={backend!r}: expected one of {list(dispatch.BACKENDS)} (or unset: auto)")
    try:
        autotune.tune_mode()
        if os.environ.get(cpp.ISA_ENV) and cpp.available():
            cpp.current_isa()  # FUSIONBLOCKS_CPU_ISA: a variant name this CPU runs
    except (RuntimeError, ValueError) as e:
        raise CLIError(str(e)) from None


def cmd_info(args) -> int:
    _check_info_setup(args.device)
    if args.clear_cache:
        from .ops import autotune

        try:
            removed = autotune.clear_cache()
        except OSError as e:
            raise CLIError(str(e)) from None
        print(f"cleared {len(removed)} cache file(s) in {autotune.cache_dir()}", file=sys.stderr)
    info = collect_info(args.device)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


# ----------------------------------------------------------------------------------------------- summary


def _check_model(name: str) -> None:
    import difflib

    from .models.registry import list_models

    names = list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CLIError(f"unknown model {name!r}{hint} Available: {', '.join(names) or 'none'}")


def add_summary(sub) -> None:
    p = sub.add_parser("summary", help="parameters, FLOPs and activation memory of a model, per stage",
                       description="Parameters (total, trainable, in never-called official modules), FLOPs/MACs "
                                   "(torch.utils.flop_counter) and activation memory saved for backward in one "
                                   "training step, per stage.")
    p.add_argument("model", help="a registered model name (see fusionblocks.list_models())")
    p.add_argument("--image-size", type=_positive_int, default=224, metavar="N")
    p.add_argument("--batch-size", type=_positive_int, default=1, metavar="B")
    p.add_argument("--num-classes", type=_positive_int, default=7,
                   help="classifier outputs (default 7, ISIC2018, as the official parameter counts)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_summary)


def cmd_summary(args) -> int:
    from .summary import summarize

    _check_model(args.model)
    _check_device(args.device)
    try:
        s = summarize(args.model, args.image_size, args.batch_size, num_classes=args.num_classes, device=args.device)
    except ValueError as e:  # the model's own input checks; BatchNorm in the training step at one value per channel
        hint = ("; the training step's BatchNorm needs more than one value per channel: use --batch-size 2 or a "
                "larger --image-size") if "more than 1 value per channel" in str(e) else ""
        raise CLIError(f"summary {args.model} at {args.image_size}x{args.image_size}, batch {args.batch_size}: "
                       f"{e}{hint}") from None
    print(s.to_json() if args.json else s.format())
    return 0


# ----------------------------------------------------------------------------------------------- bench


def _arg_type(parse: Callable[[str], object], ok: Callable[[object], bool], what: str) -> Callable[[str], object]:
    """An argparse ``type``: ``parse`` the text, then refuse a value that is not ``ok`` with "expected <what>"."""
    def convert(s: str):
        try:
            v = parse(s)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v

    convert.__name__ = what
    return convert


_positive_int = _arg_type(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _arg_type(int, lambda v: v >= 0, "a non-negative integer")
_fraction = _arg_type(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")


def _split(values: Optional[Sequence[str]]) -> List[str]:
    return [x for v in values or () for x in v.split(",") if x]


def add_bench(sub) -> None:
    from .bench import OPS, PASSES, PRESETS

    p = sub.add_parser(
        "bench", help="time every op (or a whole network) for every backend that can run, side by side",
        description="Time decay attention (full, decomposed), window attention and the HFF/HEF blocks, fwd and "
                    "fwd+bwd, for every backend that can run here plus the anchors (SDPA with a materialized bias; "
                    "FlexAttention compiled, CUDA only). With --model: training-step throughput of a network per "
                    "backend. Prints a table; --out writes JSON records (and a Markdown table next to it).")
    p.add_argument("--quick", action="store_true",
                   help="small shapes (under a minute on a 2-core CPU); with --model: B<=2, N<=64, 2 steps")
    p.add_argument("--ops", nargs="+", metavar="OP", help=f"ops to time (default all): {', '.join(OPS)}")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="a named shape set instead of the papers' shapes, e.g. cpu: the shapes the models call on "
                        "CPU at batch 2; cpu-targets: issue 11's CPU target shapes (its ops only, unless --ops)")
    p.add_argument("--dtype", nargs="+", metavar="DTYPE",
                   help="fp32, bf16, fp16 (default: bf16 and fp32 on CUDA, fp32 on CPU)")
    p.add_argument("--backends", nargs="+", metavar="IMPL",
                   help="keep only these implementations (reference, triton, cpp, cuda, auto, sdpa, flex, compiled, "
                        "eager); --model: reference, cpp, ..., auto (default: all that run here) and compiled "
                        "(torch.compile of the model, only when named)")
    p.add_argument("--pass", dest="passes", nargs="+", choices=(*PASSES, "train"), default=None,
                   help="ops: fwd, fwd+bwd (default both); --model: fwd (inference), train (default both)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", metavar="FILE.json",
                   help="write the records as JSON and FILE.md with a Markdown table; '{device}' in the path "
                        "becomes the device name, e.g. benchmarks/results/ops-{device}.json")
    p.add_argument("--plot", metavar="FILE.png", help="write a bar chart (needs matplotlib); '{device}' as in --out")
    p.add_argument("--threads", type=_positive_int, nargs="+", metavar="N",
                   help="CPU threads (torch.set_num_threads); several values run once each, e.g. --threads 1 2")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("whole network (--model)")
    g.add_argument("--model", metavar="NAME", help="time training steps of this registered model instead of ops")
    g.add_argument("--batch-size", type=_positive_int, default=32, metavar="B", help="default 32 (the papers')")
    g.add_argument("--image-size", type=_positive_int, default=224, metavar="N", help="default 224")
    g.add_argument("--steps", type=_positive_int, default=10, help="timed steps (after one warm-up step)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    import torch

    from . import bench

    _check_device(args.device)
    progress = False if args.no_progress else None
    threads = args.threads or [None]
    if args.out:
        try:
            bench.require_validator()  # --out is checked when written, at the end: fail before the run
        except RuntimeError as e:
            raise CLIError(str(e)) from None
    try:
        if args.model:
            _check_model(args.model)
            if args.quick:
                args.batch_size, args.image_size = min(args.batch_size, 2), min(args.image_size, 64)
                args.steps = min(args.steps, 2)
            passes = args.passes or ["fwd", "train"]
            if "fwd+bwd" in passes:
                raise CLIError("--model: passes are fwd (inference) and train (a training step), not fwd+bwd")
            result = bench.run_model(args.model, batch_size=args.batch_size, image_size=args.image_size,
                                     steps=args.steps, backends=_split(args.backends) or None, device=args.device,
                                     passes=passes, threads=args.threads, progress=progress)
        else:
            passes = args.passes or list(bench.PASSES)
            if "train" in passes:
                raise CLIError("--pass train needs --model")
            dtypes = [bench.parse_dtype(d) for d in _split(args.dtype)]
            if not dtypes:
                on_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
                dtypes = [torch.bfloat16, torch.float32] if on_cuda else [torch.float32]
            ops = _split(args.ops)
            bench.resolve_ops(ops)
            shapes = bench.preset(args.preset) if args.preset else None
            if shapes and not ops:
                ops = list(shapes)
            result = bench.BenchResult([], [])
            before = torch.get_num_threads()
            try:
                for n in threads:
                    if n:
                        torch.set_num_threads(n)
                    one = bench.run(ops or None, quick=args.quick, dtypes=dtypes, passes=passes,
                                    impls=_split(args.backends) or None, device=args.device, progress=progress,
                                    shapes=shapes, check=bool(args.preset))
                    result.records += one.records
                    result.skipped += one.skipped
            finally:
                torch.set_num_threads(before)
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(bench.format_table(result.records))
    if result.skipped:
        print("\nnot run here:")
        for op, impl, why in result.skipped_summary():
            print(f"  {op} {impl}: {why}")
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    slug = bench.device_slug(bench.device_name(dev))
    if args.out:
        out = args.out.replace("{device}", slug)
        bench.write_json(result.records, out)
        md = out[:-5] + ".md" if out.endswith(".json") else out + ".md"
        with open(md, "w") as f:
            f.write(bench.format_markdown(result.records, result.skipped_summary()))
        print(f"\nwrote {out} and {md}")
    if args.plot:
        png = args.plot.replace("{device}", slug)
        try:
            bench.plot(result.records, png)
        except RuntimeError as e:
            raise CLIError(str(e)) from None
        print(f"wrote {png}")
    return 0


# ----------------------------------------------------------------------------------------------- main

COMMANDS: List[Callable] = [add_info, add_summary, add_bench]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fusionblocks",
        description="CNN-Transformer fusion blocks for medical imaging: inspect the install, summarize models, "
                    "benchmark the kernels.")
    parser.add_argument("--version", action="version", version=f"fusionblocks {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    for module in COMMAND_MODULES:
        if importlib.util.find_spec(module) is not None:
            mod = importlib.import_module(module)
            if hasattr(mod, "add_cli_commands"):
                mod.add_cli_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fusionblocks`` console script and ``python -m fusionblocks``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as e:  # a message from the library may name the command already ("predict: ...")
        message = str(e).removeprefix(f"{args.command}: ")
        parser.exit(2, f"fusionblocks {args.command}: error: {message}\n")
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
