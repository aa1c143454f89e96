"""CPU benchmark of the compiled ``cpp`` kernels against the reference, side by side, per ISA variant (issue 11).

Every case times ``reference`` and ``cpp`` (the kernel variant forced with
:func:`fusionblocks.ops.cpp.use_isa`) in one process on the same inputs, **interleaved**: ``--rounds``
rounds, each timing a block of calls of every implementation in turn (the order rotating between rounds),
so that load from other processes falls on all of them alike. A record's ``ms`` is the median over the
rounds of the per-call mean of its block; the records are the engine's (:func:`fusionblocks.bench.make_record`,
:func:`fusionblocks.bench.write_results`): ``device`` names the CPU model, and the shape carries
``isa``, the cpp kernel variant the case ran (the reference's records of the case carry the same value,
so the pairs line up). ``io_mb`` (q, k, v, o and, for ``fwd+bwd``, their gradients) and ``max_abs_err``
(forward, against the fp32 reference) as in ``benchmarks/results/README.md``; ``peak_mem_mb`` by the engine's
:func:`fusionblocks.bench.peak_mem_mb` (one extra, untimed call).

Shapes (``--set``):

- ``models`` (default): every attention call of the models, batch ``--batch`` (2): HEMF's decomposed decay
  (8 heads, 56²/D12, 28²/D24, 14²/D48, 7²/D96), HiFuse-T's window attention (window 7, D 32, 56²/3 heads,
  28²/6, 14²/12, 7²/24; shift 0 and 3), and the full decay at issue 7's shapes (B=1, 4 heads, D 32, 28², 56²);
- ``targets``: the subset with issue 11's speed targets (window 56²/3 heads and 14²/12 heads, shift 0 and 3;
  decomposed 28²/D24 and 56²/D12; full decay 56²).

Run (writes ``benchmarks/results/cpu_kernels-<device>-<isa>-<N>thread(s).json`` and ``.md``)::

    python benchmarks/bench_cpu.py --isa avx2 --threads 1
    python benchmarks/bench_cpu.py --isa avx2 --threads 2

``--isa`` takes several variants (default: every one this machine runs), one file each; they are timed in the
same interleaved rounds (the reference once, then ``cpp`` under each variant), so the variants compare side by
side with each other as well as with the reference. ``--impls reference cpp auto`` adds the automatic choice
(``backend=None``, as users get it: the variant it measured fastest, not a forced one) to the same rounds; its
records carry ``chosen``, e.g. ``cpp[avx2]``. Smoke run (tiny shapes; writes to a temporary folder unless
``--out-dir`` is given)::

    python benchmarks/bench_cpu.py --quick
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fusionblocks import bench
from fusionblocks.ops import choose as choose_backend
from fusionblocks.ops import cpp, decay_attention, window_attention

NAME = "cpu_kernels"
IMPLS = ("reference", "cpp")
AUTO = "auto"  # backend=None: what users get (--impls ... auto); the record's ``chosen`` names its pick
PASSES = ("fwd", "fwd+bwd")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

HEMF = [(56, 12), (28, 24), (14, 48), (7, 96)]  # decomposed decay, 8 heads: (side, D)
HIFUSE = [(56, 3), (28, 6), (14, 12), (7, 24)]  # window 7, D 32: (side, heads)


def model_shapes(batch: int = 2) -> Dict[str, List[dict]]:
    """Every attention call of HEMF and HiFuse-T, and the full decay at issue 7's shapes (op -> shapes)."""
    return {
        "decay_attention_decomposed": [dict(B=batch, heads=8, H=s, W=s, D=d) for s, d in HEMF],
        "window_attention": [dict(B=batch, heads=h, H=s, W=s, D=32, ws=7, shift=sh) for s, h in HIFUSE for sh in (0, 3)],
        "decay_attention_full": [dict(B=1, heads=4, H=s, W=s, D=32) for s in (28, 56)],
    }


def target_shapes(batch: int = 2) -> Dict[str, List[dict]]:
    """The shapes of issue 11's speed targets."""
    return {
        "decay_attention_decomposed": [dict(B=batch, heads=8, H=s, W=s, D=d) for s, d in HEMF[:2]],
        "window_attention": [dict(B=batch, heads=h, H=s, W=s, D=32, ws=7, shift=sh)
                             for s, h in (HIFUSE[0], HIFUSE[2]) for sh in (0, 3)],
        "decay_attention_full": [dict(B=1, heads=4, H=56, W=56, D=32)],
    }


QUICK_SHAPES = {
    "decay_attention_full": [dict(B=1, heads=2, H=5, W=7, D=16)],
    "decay_attention_decomposed": [dict(B=1, heads=2, H=5, W=7, D=12)],
    "window_attention": [dict(B=1, heads=2, H=9, W=6, D=20, ws=3, shift=1)],
}
SETS = {"models": model_shapes, "targets": target_shapes}
COLUMNS = [("io MB", "io_mb"), ("max abs err", "max_abs_err")]


def shapes(quick: bool, which: str = "models", batch: int = 2) -> Dict[str, List[dict]]:
    """The shapes of a run (op name -> shapes): the named set, or the tiny smoke shapes."""
    if quick:
        return {op: [dict(s) for s in ss] for op, ss in QUICK_SHAPES.items()}
    return SETS[which](batch)


def make_inputs(op: str, shape: dict, seed: int = 0) -> dict:
    """fp32 CPU inputs of one case; q, k, v (and the bias parameters) require grad."""
    g = torch.Generator().manual_seed(seed)
    n = shape["H"] * shape["W"]
    qkv = [torch.randn(shape["B"], shape["heads"], n, shape["D"], generator=g).requires_grad_() for _ in range(3)]
    x = dict(zip("qkv", qkv))
    if op.startswith("decay"):
        x["p"] = torch.log(1 - 2.0 ** (-5 - torch.arange(shape["heads"], dtype=torch.float32))).requires_grad_()
    else:
        x["p"] = (0.02 * torch.randn((2 * shape["ws"] - 1) ** 2, shape["heads"], generator=g)).requires_grad_()
    return x


def op_call(op: str, shape: dict, x: dict):
    """``(public op, args, kwargs)`` of this case on inputs ``x``."""
    hw = (shape["H"], shape["W"])
    args = (x["q"], x["k"], x["v"], x["p"])
    if op.startswith("decay"):
        return "decay_attention", args, dict(hw=hw, mode="full" if op.endswith("full") else "decomposed")
    return "window_attention", args, dict(hw=hw, window_size=shape["ws"], shift=shape["shift"])


PUBLIC_OPS = {"decay_attention": decay_attention, "window_attention": window_attention}


def call(op: str, shape: dict, backend: str) -> Callable[[dict], torch.Tensor]:
    """The op at this shape on one backend (``auto``: ``backend=None``), as a function of the inputs."""
    backend = None if backend == AUTO else backend

    def fn(x: dict) -> torch.Tensor:
        name, args, kwargs = op_call(op, shape, x)
        return PUBLIC_OPS[name](*args, **kwargs, backend=backend)
    return fn


def choose(op: str, shape: dict, x: dict):
    """The automatic choice for this case in the current grad mode (:func:`fusionblocks.ops.choose`)."""
    name, args, kwargs = op_call(op, shape, x)
    return choose_backend(name, *args, **kwargs)


def runner(fn: Callable[[dict], torch.Tensor], x: dict, pass_: str) -> Callable[[], object]:
    """One call of a pass: ``fwd`` under ``no_grad``; ``fwd+bwd`` backpropagates a fixed random gradient
    into freshly reset input gradients."""
    if pass_ == "fwd":
        def fwd():
            with torch.no_grad():
                return fn(x)
        return fwd
    grads = [t for t in x.values() if t.requires_grad]
    with torch.no_grad():
        g = torch.randn_like(fn(x))

    def fwd_bwd():
        for t in grads:
            t.grad = None
        fn(x).backward(g)
    return fwd_bwd


def interleaved_ms(fns: Dict[str, Callable[[], object]], rounds: int, budget_s: float) -> Dict[str, float]:
    """Median over ``rounds`` of the mean ms per call of each function, the functions taking turns in every
    round (the engine's :func:`fusionblocks.bench.time_interleaved_ms`); a failure is raised."""
    got = bench.time_interleaved_ms(fns, budget_s=budget_s, rounds=rounds)
    for name, ms in got.items():
        if isinstance(ms, Exception):
            raise RuntimeError(f"bench_cpu: {name} failed: {ms}") from ms
    return got


def io_mb(shape: dict, pass_: str) -> float:
    tensor_mb = shape["B"] * shape["heads"] * shape["H"] * shape["W"] * shape["D"] * 4 / 2**20
    return tensor_mb * (8 if pass_ == "fwd+bwd" else 4)


def run_isas(isas: Sequence[str], cases: Dict[str, List[dict]], *, passes: Sequence[str], impls: Sequence[str],
             rounds: int, budget_s: float, device: str, log=print) -> Dict[str, List[dict]]:
    """The records of every case, by cpp variant: the reference and ``cpp`` under each variant in ``isas`` take
    turns in the same interleaved rounds, so each variant's times and the reference's come from the same
    rounds (every variant's records carry the one reference time, with ``isa`` naming the variant)."""
    out: Dict[str, List[dict]] = {isa: [] for isa in isas}

    def label(impl: str, isa: str) -> str:
        return f"cpp@{isa}" if impl == "cpp" else impl

    def forced(impl: str, isa: str):
        """cpp forced to ``isa`` (its backward included); the other implementations as they are."""
        return cpp.use_isa(isa) if impl == "cpp" else contextlib.nullcontext()

    def timed(impl: str, isa: str, fn: Callable[[], object]) -> Callable[[], object]:
        def call_forced():
            with forced(impl, isa):
                return fn()
        return call_forced

    for op, op_shapes in cases.items():
        for shape in op_shapes:
            x = make_inputs(op, shape)
            fns = {impl: call(op, shape, impl) for impl in impls}
            variants = {label(impl, isa): (impl, isa) for isa in isas for impl in impls}
            with torch.no_grad():
                want = call(op, shape, "reference")(x)
                err = {}
                for name, (impl, isa) in variants.items():
                    with forced(impl, isa):
                        err[name] = float((fns[impl](x) - want).abs().max())
            for p in passes:
                chosen = {}
                if AUTO in impls:  # the automatic choice for this pass's call class (measured now if not known)
                    with (contextlib.nullcontext() if p == "fwd+bwd" else torch.no_grad()):
                        chosen = {"chosen": choose(op, shape, x).label}
                ms = interleaved_ms({name: timed(impl, isa, runner(fns[impl], x, p)) for name, (impl, isa) in variants.items()},
                                    rounds, budget_s)
                for isa in isas:
                    for impl in impls:
                        with forced(impl, isa):
                            mem = bench.peak_mem_mb(runner(fns[impl], x, p), "cpu", list(x.values()))
                        name = label(impl, isa)
                        out[isa].append(bench.make_record(op, impl, dict(shape, isa=isa), torch.float32, p, ms[name],
                                                          mem, device, io_mb=io_mb(shape, p), max_abs_err=err[name],
                                                          **(chosen if impl == AUTO else {})))
                if "reference" in ms:
                    log(f"{op:27s} {bench.shape_str(shape):42s} {p:8s} reference {ms['reference']:9.3f} ms  " + "  ".join(
                        f"{isa} {ms[f'cpp@{isa}']:9.3f} ms x{ms['reference'] / ms[f'cpp@{isa}']:.2f}"
                        for isa in isas if f"cpp@{isa}" in ms)
                        + (f"  auto -> {chosen['chosen']} {ms[AUTO]:9.3f} ms x{ms['reference'] / ms[AUTO]:.2f}" if chosen else ""))
    return out


def load_average() -> Optional[float]:
    """The machine's 1-minute load average (``None`` where the OS has none), recorded in the Markdown title."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--isa", nargs="+", default=None,
                   help=f"cpp kernel variants to time, one output file each (of {list(cpp.ISAS)}; "
                        "default: every one this machine runs)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--set", dest="which", choices=sorted(SETS), default="models", help="shape set (default models)")
    p.add_argument("--ops", nargs="+", default=None, choices=sorted(model_shapes()),
                   help="only these ops (default: every op of the set)")
    p.add_argument("--batch", type=int, default=2, help="batch of the model shapes (default 2)")
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS + (AUTO,),
                   help="implementations to time (default reference cpp; auto = the automatic choice, backend=None, "
                        "timed as users get it, not forced to a variant)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per case (default 15; --quick 2)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per implementation and case, over all rounds (default 3; --quick 0.05)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, short timing (a smoke run)")
    p.add_argument("--out-dir", default=None,
                   help="where the JSON and Markdown go (default benchmarks/results; --quick: a new temporary folder)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    if not cpp.available():
        sys.exit(f"bench_cpu: the cpp kernels are not built: {cpp.LOAD_ERROR}; {cpp.BUILD_HINT}")
    isas = args.isa or cpp.supported_isas()
    for isa in isas:
        if isa not in cpp.ISAS:
            sys.exit(f"bench_cpu: unknown --isa {isa!r}; expected some of {list(cpp.ISAS)}")
        why = cpp.isa_unsupported_reason(isa)
        if why:
            sys.exit(f"bench_cpu: cannot time the {isa} variant here: {why}; this machine runs {cpp.supported_isas()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    rounds = args.rounds or (2 if args.quick else 15)
    budget = args.budget or (0.05 if args.quick else 3.0)
    cases = shapes(args.quick, args.which, args.batch)
    if args.ops:
        cases = {op: ss for op, ss in cases.items() if op in args.ops}
    device = bench.device_name(torch.device("cpu"))
    out_dir = args.out_dir or (tempfile.mkdtemp(prefix=f"bench_{NAME}_") if args.quick else RESULTS_DIR)
    command = " ".join(["python benchmarks/bench_cpu.py", *(sys.argv[1:] if argv is None else argv)])
    load_before = load_average()
    by_isa = run_isas(isas, cases, passes=args.passes, impls=args.impls, rounds=rounds, budget_s=budget, device=device)
    load_after = load_average()
    for isa in isas:
        note = f"cpp variant {isa} · {threads} thread(s) on {os.cpu_count()} cores · {rounds} interleaved rounds"
        if len(isas) > 1:
            note += f" (in the same rounds as the {', '.join(i for i in isas if i != isa)} variant(s))"
        if load_before is not None and load_after is not None:
            note += f" · 1-min load average {load_before:.1f} before, {load_after:.1f} after"
        suffix = f"-{isa}-{threads}thread" + ("s" if threads != 1 else "")
        path = os.path.join(out_dir, f"{NAME}-{bench.device_slug(device)}{suffix}.json")
        md = bench.write_results(by_isa[isa], path, extra_columns=COLUMNS, title=f"{NAME}: `{command}` · {note}",
                                 pivot="cpp" if "cpp" in args.impls and "reference" in args.impls else None)
        print(f"wrote {path} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
