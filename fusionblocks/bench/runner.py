"""Running cases: every implementation of a case side by side on the same inputs, both passes, into records."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .anchors import COMPILE_REASON
from .cases import INTERPRETER_REASON, OpBench, resolve_ops
from .memory import peak_mem_mb
from .records import (PASSES, device_name, device_slug, dtype_name, error_text, make_record, parse_dtype,
                      require_validator)
from .report import format_table, shape_str, write_results
from .timing import _without_frames, time_interleaved_ms, time_ms


@dataclass
class Skipped:
    op: str
    shape: dict
    impl: str
    reason: str


@dataclass
class BenchResult:
    """What a run produced: the records (failed runs included, with ``error``) and the implementations
    that could not run here at all, with the reasons."""

    records: List[dict]
    skipped: List[Skipped]

    def skipped_summary(self) -> List[Tuple[str, str, str]]:
        """One line per (op, impl) that could not run: the first reason seen."""
        seen: Dict[Tuple[str, str], str] = {}
        for s in self.skipped:
            seen.setdefault((s.op, s.impl), s.reason)
        return [(op, impl, why) for (op, impl), why in seen.items()]


def _resident(x: dict) -> list:
    out = [t for t in x.values() if isinstance(t, torch.Tensor)]
    if isinstance(x.get("block"), torch.nn.Module):
        out += list(x["block"].parameters()) + list(x["block"].buffers())
    return out


def _grads_of(bench: OpBench, x: dict) -> List[torch.Tensor]:
    out = [x[k] for k in bench.grad_keys if isinstance(x.get(k), torch.Tensor) and x[k].requires_grad]
    if isinstance(x.get("block"), torch.nn.Module):
        out += [p for p in x["block"].parameters() if p.requires_grad]
    return out


def _runner(fn: Callable[[dict], torch.Tensor], x: Union[dict, Sequence[dict]], pass_: str) -> Callable[[], object]:
    """``run()`` for one pass: ``fwd`` under ``no_grad``; ``fwd+bwd`` backpropagates a fixed random gradient
    of the output. With a list of input sets, successive calls cycle through them."""
    sets = [x] if isinstance(x, dict) else list(x)
    turn = [0]

    def pick() -> dict:
        s = sets[turn[0] % len(sets)]
        turn[0] += 1
        return s

    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return fn(pick())

        return run
    cache: dict = {}

    def run_bwd():
        out = fn(pick())
        if "grad" not in cache:
            cache["grad"] = torch.randn_like(out)
        out.backward(cache["grad"])

    return run_bwd


def _detached(x: dict) -> dict:
    """The inputs without autograd history (same storage): what a ``fwd`` pass sees, so that ops which
    refuse inputs requiring grad on some device (FlexAttention on CPU) still run forward."""
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}


def _reasons_str(reasons: List[str]) -> str:
    return "; ".join(reasons) if reasons else "can run"


def _max_abs_err(bench: OpBench, fn: Callable[[dict], torch.Tensor], x: dict) -> Optional[float]:
    """max |fn(x) - spec(x in float32)| of the forward (``None`` for an op without a spec)."""
    if bench.spec is None:
        return None
    with torch.no_grad():
        got = fn(x)
        x32 = {k: (v.detach().float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
               for k, v in x.items()}
        want = bench.spec(x32)
        return float((got.float() - want).abs().max())


def run_case(bench: OpBench, shape: dict, dtype: torch.dtype, device: Union[torch.device, str], *,
             passes: Sequence[str] = PASSES, impls: Optional[Sequence[str]] = None, budget_s: float = 1.0,
             rotate: int = 1, smoke: bool = False, check: bool = False, quick: bool = False,
             device_label: Optional[str] = None, rounds: int = 7) -> BenchResult:
    """Time every implementation of one (op, shape, dtype) case, both passes; see :func:`run`.

    On CPU the implementations of a pass take turns over ``rounds`` interleaved rounds
    (:func:`time_interleaved_ms`), so that a shared machine's load falls on all of them alike; on CUDA each
    is timed with :func:`time_ms` in turn."""
    dev = torch.device(device)
    dname = device_label or device_name(dev)
    sets = [bench.make_inputs(shape, dev, dtype) for _ in range(max(1, rotate))]
    fwd_sets = [_detached(x) for x in sets]
    by_impl: Dict[str, List[dict]] = {}  # records in the order of the implementations, each pass in turn
    skipped: List[Skipped] = []
    runnable = []  # (impl, extra fields of its records)
    for impl in bench.impls(shape, sets[0], dev, smoke=smoke):
        if impls and impl.name not in impls:
            continue
        if not impl.reasons and impl.name == "triton" and dev.type == "cpu" and not smoke:
            impl.reasons = [INTERPRETER_REASON]
        if not impl.reasons and impl.name == "compiled" and (quick or smoke):
            impl.reasons = [COMPILE_REASON]
        if impl.reasons:
            skipped.append(Skipped(bench.name, shape, impl.name, _reasons_str(impl.reasons)))
            continue
        extra = {}
        try:
            err = _max_abs_err(bench, impl.fn, fwd_sets[0]) if check else None
            if err is not None:
                extra["max_abs_err"] = err
        except Exception as e:  # the forward itself fails: every pass of this implementation failed
            by_impl[impl.name] = [make_record(bench.name, impl.name, shape, dtype, p, None, None, dname,
                                              error=error_text(e)) for p in passes]
            continue
        by_impl[impl.name] = []
        runnable.append((impl, extra))
    for p in passes:
        grads = [t for x in sets for t in _grads_of(bench, x)] if p == "fwd+bwd" else []
        inputs = sets if p == "fwd+bwd" else fwd_sets
        if dev.type == "cpu":
            times = time_interleaved_ms({impl.name: _runner(impl.fn, inputs, p) for impl, _ in runnable},
                                        grads=grads, budget_s=budget_s, rounds=1 if smoke else rounds)
        else:
            times = {}
            for impl, _ in runnable:
                try:
                    times[impl.name] = time_ms(_runner(impl.fn, inputs, p), dev, grads=grads, budget_s=budget_s,
                                               min_reps=1 if smoke else 3)
                except Exception as e:  # one implementation failing must not stop the run; it is recorded
                    times[impl.name] = _without_frames(e)
                finally:
                    for t in grads:
                        t.grad = None
        for impl, extra in runnable:
            ms = times[impl.name]
            try:
                if isinstance(ms, Exception):
                    raise ms
                mem = peak_mem_mb(_runner(impl.fn, inputs[0], p), dev, _resident(inputs[0]))
            except Exception as e:
                by_impl[impl.name].append(make_record(bench.name, impl.name, shape, dtype, p, None, None, dname,
                                                      error=error_text(e)))
                continue
            finally:
                for t in grads:
                    t.grad = None
            if impl.chosen is not None:
                with torch.set_grad_enabled(p == "fwd+bwd"):
                    extra_p = {**extra, "chosen": impl.chosen(inputs[0])}
            else:
                extra_p = extra
            by_impl[impl.name].append(make_record(bench.name, impl.name, shape, dtype, p, ms, mem, dname, **extra_p))
    del sets, fwd_sets
    records = [r for recs in by_impl.values() for r in recs]
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return BenchResult(records, skipped)


def run(ops: Optional[Sequence[str]] = None, *, quick: bool = False, dtypes: Sequence[torch.dtype] = (torch.float32,),
        passes: Sequence[str] = PASSES, impls: Optional[Sequence[str]] = None, device: Optional[str] = None,
        budget_s: Optional[float] = None, progress: Optional[bool] = None,
        shapes: Optional[Mapping[str, Sequence[dict]]] = None, rotate: int = 1, smoke: bool = False,
        check: bool = False) -> BenchResult:
    """Time every op × shape × dtype × implementation × pass that can run here.

    Args:
        ops: op names or aliases (all when ``None``); see :data:`OPS`.
        quick: small shapes (the whole run takes well under a minute on a 2-core CPU).
        dtypes: dtypes to time.
        passes: ``"fwd"`` and/or ``"fwd+bwd"``.
        impls: keep only these implementations (backend and anchor names, ``eager`` for blocks).
        device: ``"cuda"``/``"cpu"``; default CUDA when available.
        budget_s: time budget per measurement (CPU: repeats chosen to fit it; CUDA: scales ``do_bench``'s
            windows); default 1.0, 0.15 with ``quick``.
        progress: show a tqdm bar (default: when stderr is a terminal).
        shapes: op name -> shapes to time instead of the op's own (paper or quick) set.
        rotate: input sets per case; timed calls cycle through them (memory is measured on one).
        smoke: CPU smoke run: the Triton backend runs when its interpreter is on, FlexAttention eagerly.
        check: add ``max_abs_err`` (forward against the op's definition in float32) to each record.

    Returns:
        The records (a run that raised is a record with ``error``) and the implementations that could
        not run here, with their reasons.
    """
    from tqdm.auto import tqdm

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    benches = resolve_ops(ops)
    for p in passes:
        if p not in PASSES:
            raise ValueError(f"unknown pass {p!r}; expected one of {list(PASSES)}")
    if budget_s is None:
        budget_s = 0.15 if quick else 1.0
    dname = device_name(dev)
    shapes = dict(shapes or {})
    plan = [(b, s, dt) for b in benches for s in shapes.get(b.name, b.shapes(quick)) for dt in dtypes]
    result = BenchResult([], [])
    bar = tqdm(total=len(plan), desc="bench", unit="case", disable=(None if progress is None else not progress))
    for bench, shape, dtype in plan:
        bar.set_postfix_str(f"{bench.name} {shape_str(shape)} {dtype_name(dtype)}")
        one = run_case(bench, shape, dtype, dev, passes=passes, impls=impls, budget_s=budget_s, rotate=rotate,
                       smoke=smoke, check=check, quick=quick, device_label=dname)
        result.records += one.records
        result.skipped += one.skipped
        bar.update()
    bar.close()
    return result


# --------------------------------------------------------------------------------------------- scripts


def script_parser(description: str, impls: Sequence[str]) -> argparse.ArgumentParser:
    """The options every per-op script (``benchmarks/bench_*.py``) shares; the script adds its own."""

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny shapes, short timing (a smoke run; works on CPU)")
    p.add_argument("--impls", nargs="+", default=list(impls), choices=list(impls))
    p.add_argument("--dtypes", nargs="+", default=None, choices=("bf16", "fp32", "fp16"),
                   help="default: bf16 fp32 (CPU: fp32)")
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    p.add_argument("--rotate", type=int, default=None, help="input sets per case (default 3; --quick: 1)")
    p.add_argument("--no-check", action="store_true", help="skip the forward error check against the fp32 reference")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per measurement (default 1.0, --quick 0.15); more gives steadier medians")
    p.add_argument("--out-dir", default=None,
                   help="where the JSON and Markdown go (default benchmarks/results; --quick: a new temporary folder)")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    return p


def run_script(args, *, name: str, shapes: Mapping[str, Sequence[dict]], results_dir: str, command: str,
               columns: Sequence[Tuple[str, str]] = (),
               add_fields: Optional[Callable[[List[dict], torch.device], str]] = None,
               device: Optional[str] = None, pivot: str = "triton", suffix: str = "") -> str:
    """Run a per-op script's cases and write ``<out_dir>/<name>-<device><suffix>.json`` and ``.md``.

    Args:
        args: :func:`script_parser`'s options.
        name: file-name stem (``decay_attention``, ``window_attention``, ``cpu``).
        shapes: op name -> shapes.
        results_dir: default output folder (``--quick`` writes to a new temporary folder instead).
        command: the command line, quoted in the Markdown title.
        columns: extra ``(header, record key)`` columns of the tables.
        add_fields: ``fn(records, device) -> note`` adding the script's own fields to measured records;
            the note goes into the Markdown title.
        device: ``None``: a GPU script (CUDA, or only ``--quick`` on CPU); ``"cpu"``: a CPU benchmark.
        pivot: the implementation whose speed-up over every other one the Markdown's second table shows.
        suffix: appended to the file name after the device (e.g. ``-1thread``).

    Returns:
        The JSON path.
    """
    import tempfile

    require_validator()  # the records are checked when written, at the end: fail before the run, not after it
    if args.threads:
        torch.set_num_threads(args.threads)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu" and not args.quick:
            sys.exit("no CUDA device: run on a GPU, or pass --quick for the CPU smoke run")
    device = torch.device(device)
    dtypes = args.dtypes or (["fp32"] if device.type == "cpu" else ["bf16", "fp32"])
    result = run(list(shapes), shapes=shapes, dtypes=[parse_dtype(d) for d in dtypes], passes=args.passes,
                 impls=args.impls, device=str(device), quick=args.quick,
                 rotate=args.rotate or (1 if args.quick else 3), smoke=args.quick, check=not args.no_check,
                 progress=args.progress, budget_s=getattr(args, "budget", None))
    note = add_fields(result.records, device) if add_fields else ""
    print(format_table(result.records, columns))
    for op, impl, why in result.skipped_summary():
        print(f"not run: {op} {impl}: {why}")
    out_dir = args.out_dir or (tempfile.mkdtemp(prefix=f"bench_{name}_") if args.quick else results_dir)
    path = os.path.join(out_dir, f"{name}-{device_slug(device)}{suffix}.json")
    md = write_results(result.records, path, skipped=result.skipped_summary(), extra_columns=columns,
                       title=f"{name}: `{command}`" + (f" · {note}" if note else ""), pivot=pivot)
    print(f"wrote {path} and {md}")
    return path
