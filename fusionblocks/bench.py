"""The benchmark engine behind ``fusionblocks bench``, ``benchmarks/`` and the per-op GPU scripts.

One run times every implementation of every op side by side, in one process, on the same inputs:

* the registered backends of the op (``reference``, ``triton``, ``cpp``, ``cuda``) that can run here,
  asked through :func:`fusionblocks.ops.explain` (those that cannot are listed with the reasons);
* the anchors: ``sdpa`` (``F.scaled_dot_product_attention`` with the bias and masks materialized,
  built from the parameters inside the timed call as a module would) and ``flex`` (FlexAttention with
  a ``score_mod``/``mask_mod``, compiled, CUDA only; eager on CPU in ``smoke`` runs).

``benchmarks/bench_decay_attention.py`` and ``benchmarks/bench_window_attention.py`` (issues 3 and 4) are
thin wrappers over :func:`run` that add their own derived fields (TFLOP/s, HBM bandwidth share);
``benchmarks/bench_cpu.py`` (issue 7) times the ``cpu`` shape preset (:data:`PRESETS`) on CPU.

Definitions, the same everywhere (``benchmarks/results/README.md`` repeats them):

* **Time** (``ms``, :func:`time_ms`): CUDA: :func:`triton.testing.do_bench` median after one explicit
  warm-up call (compilation stays out); input gradients reset between calls. CPU: ``time.perf_counter``
  around each call after a warm-up call, median over as many repeats as fit the budget. With
  ``rotate > 1`` the timed calls cycle through that many input sets.
* **Peak memory** (``peak_mem_mb``, :func:`peak_mem_mb`): the bytes of the call's own inputs (and module
  parameters and buffers) plus the most memory the call allocates above what was allocated before it
  (outputs, saved activations, gradients), in MiB. Whatever else the process holds (other input sets,
  caches) is not counted. CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus
  ``memory_allocated`` before; CPU: one extra untimed call under ``torch.profiler`` with
  ``profile_memory=True`` (peak of the running sum of its allocation and free events); ``null`` when
  the profiler cannot report it. The profiler sees every allocation through PyTorch's CPU allocator,
  which is where the compiled ``cpp`` kernels put their outputs, softmax statistics and gradient
  workspaces (``at::empty``/``at::zeros``); it does not see their per-thread tile scratch
  (``std::vector``, under 1 MiB per thread at the benchmarked shapes) nor other non-PyTorch memory
  (BLAS buffers). Cross-check on a 2-core Xeon, 1 thread, issue 7's shapes: the profiler's figure minus
  the inputs agrees with the peak-RSS growth of a fresh process over the same call within 0.6 MiB for
  reference and cpp, fwd and fwd+bwd (e.g. decay full 56²: 489.3 vs 490.1 MiB reference, 1.6 vs 1.8
  MiB cpp). RSS is not used: in one process the allocator reuses freed pages, so it needs a fresh process
  per measurement and still misses memory freed and reused within the call.
* **Records** (:data:`RECORD_SCHEMA`): issue 3's ``{"op", "impl", "shape": {...}, "dtype", "pass", "ms",
  "peak_mem_mb", "device", "torch", "triton"}``. ``triton`` is ``null`` when Triton is not installed;
  ``device`` is :func:`device_name`; the head dimension is ``D`` in every shape. An implementation that
  was run and raised is a record too, with ``"error"`` and ``"ms": null, "peak_mem_mb": null``; one that
  cannot run here at all (the dispatcher's reasons) is not timed and is listed in
  :attr:`BenchResult.skipped` instead. Optional fields: ``max_abs_err``, ``tflops``,
  ``pct_of_dense_bf16_peak``, ``io_mb``, ``gbps``, ``hbm_share`` (the scripts) and ``img_per_s``
  (``--model``).
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .ops import dispatch as _dispatch
from .ops import reference as _ref

# --------------------------------------------------------------------------------------------- records

PASSES = ("fwd", "fwd+bwd")
ANCHORS = ("sdpa", "flex")
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

_OPTIONAL_NUMBER = {"type": ["number", "null"], "minimum": 0}

RECORD_SCHEMA = {
    "type": "object",
    "required": ["op", "impl", "shape", "dtype", "pass", "ms", "peak_mem_mb", "device", "torch", "triton"],
    "properties": {
        "op": {"type": "string"},
        "impl": {"type": "string"},
        "shape": {"type": "object"},
        "dtype": {"type": "string", "enum": ["float32", "bfloat16", "float16"]},
        "pass": {"type": "string", "enum": ["fwd", "fwd+bwd", "train"]},
        "ms": {"type": ["number", "null"], "exclusiveMinimum": 0},
        "peak_mem_mb": {"type": ["number", "null"], "minimum": 0},
        "device": {"type": "string"},
        "torch": {"type": "string"},
        "triton": {"type": ["string", "null"]},
        "error": {"type": "string", "minLength": 1},
        "img_per_s": {"type": "number", "exclusiveMinimum": 0},
        "max_abs_err": _OPTIONAL_NUMBER,
        "tflops": _OPTIONAL_NUMBER,
        "pct_of_dense_bf16_peak": _OPTIONAL_NUMBER,
        "io_mb": _OPTIONAL_NUMBER,
        "gbps": _OPTIONAL_NUMBER,
        "hbm_share": _OPTIONAL_NUMBER,
    },
    "additionalProperties": False,
    # a failed run carries its error and no measurement; a measured one has a time and no error
    "if": {"required": ["error"]},
    "then": {"properties": {"ms": {"type": "null"}, "peak_mem_mb": {"type": "null"}}},
    "else": {"properties": {"ms": {"type": "number"}}},
}
RECORDS_SCHEMA = {"type": "array", "items": RECORD_SCHEMA}


def triton_version() -> Optional[str]:
    """Triton's version, ``None`` when it is not installed."""
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def device_name(device: Union[torch.device, str]) -> str:
    """``"NVIDIA H100 80GB HBM3"``-style name of a CUDA device; ``"CPU <model name> (<n> cores)"`` otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name} ({os.cpu_count()} cores)"


def device_slug(name: Union[str, torch.device]) -> str:
    """File-name form of a device name (or of a device's :func:`device_name`):
    ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    if isinstance(name, torch.device):
        name = device_name(name)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def make_record(op: str, impl: str, shape: Mapping, dtype: Union[torch.dtype, str], pass_: str, ms: Optional[float],
                peak_mem_mb: Optional[float], device: Union[str, torch.device], *, error: Optional[str] = None,
                **extra) -> dict:
    """One record in issue 3's format. With ``error`` (the run raised) ``ms`` and ``peak_mem_mb`` are ``None``."""
    rec = {
        "op": op,
        "impl": impl,
        "shape": dict(shape),
        "dtype": dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype,
        "pass": pass_,
        "ms": None if ms is None else float(ms),
        "peak_mem_mb": None if peak_mem_mb is None else round(float(peak_mem_mb), 3),
        "device": device if isinstance(device, str) else device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
    }
    if error is not None:
        rec.update(ms=None, peak_mem_mb=None, error=error)
    rec.update(extra)
    return rec


def error_text(e: BaseException) -> str:
    """``"Type: first line of the message"`` (at most 300 characters), as stored in a record's ``error``."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:300]


def _is_type(v: object, t: str) -> bool:
    if t == "null":
        return v is None
    if t == "string":
        return isinstance(v, str)
    if t == "object":
        return isinstance(v, dict)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    raise AssertionError(t)


def validate_records(records: object) -> None:
    """Raise ``ValueError`` naming the first record (and field) that breaks :data:`RECORD_SCHEMA`.

    The same rules as ``jsonschema.validate(records, RECORDS_SCHEMA)``, without needing jsonschema.
    """
    if not isinstance(records, list):
        raise ValueError(f"bench records: expected a list, got {type(records).__name__}")
    props = RECORD_SCHEMA["properties"]
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"bench record {i}: expected an object, got {type(r).__name__}")
        for key in RECORD_SCHEMA["required"]:
            if key not in r:
                raise ValueError(f"bench record {i}: missing {key!r}")
        unknown = sorted(set(r) - set(props))
        if unknown:
            raise ValueError(f"bench record {i}: unknown field(s) {unknown}; known: {sorted(props)}")
        for key, v in r.items():
            spec = props[key]
            types = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
            if not any(_is_type(v, t) for t in types):
                raise ValueError(f"bench record {i}: {key}={v!r} is not of type {spec['type']}")
            if "enum" in spec and v not in spec["enum"]:
                raise ValueError(f"bench record {i}: {key}={v!r} not one of {spec['enum']}")
            if isinstance(v, str) and len(v) < spec.get("minLength", 0):
                raise ValueError(f"bench record {i}: {key} must not be empty")
            if _is_type(v, "number"):
                if "exclusiveMinimum" in spec and not v > spec["exclusiveMinimum"]:
                    raise ValueError(f"bench record {i}: {key}={v!r} must be > {spec['exclusiveMinimum']}")
                if "minimum" in spec and not v >= spec["minimum"]:
                    raise ValueError(f"bench record {i}: {key}={v!r} must be >= {spec['minimum']}")
        if "error" in r:
            if r["ms"] is not None or r["peak_mem_mb"] is not None:
                raise ValueError(f"bench record {i}: a record with an error must have ms and peak_mem_mb null")
        elif r["ms"] is None:
            raise ValueError(f"bench record {i}: ms is null but there is no error")


def write_json(records: List[dict], path: str) -> None:
    """The one record writer: validate, then write ``path`` (folders created)."""
    validate_records(records)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")


def write_results(records: List[dict], path: str, *, skipped: Sequence[Tuple[str, str, str]] = (),
                  extra_columns: Sequence[Tuple[str, str]] = (), title: str = "", pivot: Optional[str] = None) -> str:
    """Write ``path`` (JSON records, :func:`write_json`) and the Markdown table next to it (``.md``).

    Returns:
        The Markdown path.
    """
    write_json(records, path)
    md = (path[:-5] if path.endswith(".json") else path) + ".md"
    text = f"# {title}\n\n" if title else ""
    text += format_markdown(records, skipped, extra_columns=extra_columns)
    if pivot:
        text += "\n" + format_pivot(records, pivot)
    with open(md, "w") as f:
        f.write(text)
    return md


def shape_str(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _key(r: dict) -> tuple:
    return (r["op"], shape_str(r["shape"]), r["dtype"], r["pass"])


def speedups(records: List[dict], baseline: str = "reference") -> Dict[int, Optional[float]]:
    """``id(record) -> baseline ms / record ms`` within each (op, shape, dtype, pass) group (``None``: no pair)."""
    base = {_key(r): r["ms"] for r in records if r["impl"] == baseline and r["ms"]}
    return {id(r): (base[_key(r)] / r["ms"] if _key(r) in base and r["ms"] else None) for r in records}


def side_by_side(records: List[dict]) -> List[dict]:
    """Records reordered so the implementations of one (op, shape, dtype) case and pass sit together."""
    first: Dict[tuple, int] = {}
    for i, r in enumerate(records):
        first.setdefault(_key(r)[:3], i)
    passes = (*PASSES, "train")
    return sorted(records, key=lambda r: (first[_key(r)[:3]], passes.index(r["pass"])))


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-2:
            return f"{v:.2e}"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def table_rows(records: List[dict], extra_columns: Sequence[Tuple[str, str]] = ()) -> Tuple[List[str], List[List[str]]]:
    """Header and cells: op, shape, dtype, pass, impl, ms, speed-up over ``reference``, peak MB, then
    ``extra_columns`` (``(header, record key)``), then ``error`` when any record failed."""
    records = side_by_side(records)
    sp = speedups(records)
    errors = any("error" in r for r in records)
    head = ["op", "shape", "dtype", "pass", "impl", "ms", "vs reference", "peak MB"] + [h for h, _ in extra_columns]
    head += ["error"] if errors else []
    rows = []
    for r in records:
        s = sp[id(r)]
        extra = f" ({r['img_per_s']:.1f} img/s)" if "img_per_s" in r else ""
        row = [
            r["op"],
            shape_str(r["shape"]),
            r["dtype"],
            r["pass"],
            r["impl"],
            "n/a" if r["ms"] is None else f"{r['ms']:.3f}{extra}",
            "" if s is None else f"{s:.2f}x",
            "" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}",
        ]
        row += [_fmt(r.get(key)) for _, key in extra_columns]
        row += [r.get("error", "")] if errors else []
        rows.append(row)
    return head, rows


def format_table(records: List[dict], extra_columns: Sequence[Tuple[str, str]] = ()) -> str:
    """Fixed-width text table with speed-ups against ``reference`` and peak memory."""
    head, rows = table_rows(records, extra_columns)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_markdown(records: List[dict], skipped: Sequence[Tuple[str, str, str]] = (),
                    extra_columns: Sequence[Tuple[str, str]] = ()) -> str:
    """GitHub Markdown table of the records, device named, plus the implementations that could not run."""
    head, rows = table_rows(records, extra_columns)
    devices = sorted({r["device"] for r in records})
    out = [f"Device: {', '.join(devices) or 'n/a'} · torch {torch.__version__} · triton {triton_version()}", ""]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join("---" for _ in head) + "|")
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    if skipped:
        out += ["", "Not run here:", ""]
        out += [f"- `{op}` {impl}: {why}" for op, impl, why in skipped]
    return "\n".join(out) + "\n"


def format_pivot(records: List[dict], focus: str = "triton") -> str:
    """Markdown, one row per (op, shape, dtype, pass): ms of every implementation and how many times
    faster ``focus`` is than each other one (the issues' targets are stated this way)."""
    rows: Dict[tuple, Dict[str, dict]] = {}
    for r in side_by_side(records):
        rows.setdefault(_key(r), {})[r["impl"]] = r
    impls = list(dict.fromkeys(r["impl"] for r in side_by_side(records)))
    impls.sort(key=lambda i: (i != focus, i != "reference"))
    others = [i for i in impls if i != focus]
    head = ["op", "shape", "dtype", "pass"] + [f"{i} ms" for i in impls] + [f"{focus} vs {i}" for i in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (op, shape, dt, p), by in rows.items():
        ms = {i: by[i]["ms"] if i in by else None for i in impls}
        cells = [op, shape, dt, p] + [f"{ms[i]:.3f}" if ms[i] else "n/a" for i in impls]
        f = ms.get(focus)
        cells += [f"{ms[i] / f:.2f}x" if f and ms[i] else "n/a" for i in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(records: List[dict], path: str) -> None:
    """Bar chart, one panel per pass: speed-up of each implementation over ``reference`` per case
    (time in ms for cases without a reference, e.g. the blocks or a network without fused ops).
    Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(
            "--plot needs matplotlib: pip install 'fusionblocks[bench]' (or pip install matplotlib)"
        ) from None
    records = side_by_side([r for r in records if r["ms"] is not None])
    sp = speedups(records)
    panels = []
    for p in (*PASSES, "train"):
        recs = [r for r in records if r["pass"] == p]
        with_ref = [r for r in recs if sp[id(r)] is not None]
        without = [r for r in recs if sp[id(r)] is None]
        if with_ref:
            panels.append((f"{p}: speed-up over reference (higher is better)", with_ref, True))
        if without:
            panels.append((f"{p}: time in ms (lower is better)", without, False))
    if not panels:
        raise RuntimeError("--plot: no records to plot")
    from matplotlib.ticker import FuncFormatter

    order = lambda names: sorted(names, key=lambda i: (i != "reference", i))  # noqa: E731
    colors = {impl: f"C{i}" for i, impl in enumerate(order({r["impl"] for r in records}))}
    heights = [len({_key(r)[:3] for r in recs}) * len({r["impl"] for r in recs}) for _, recs, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 1.0 + sum(0.25 * h + 0.9 for h in heights)),
                             gridspec_kw={"height_ratios": [h + 3 for h in heights]}, squeeze=False)
    for ax, (title, recs, is_speedup) in zip(axes[:, 0], panels):
        groups = list(dict.fromkeys(_key(r)[:3] for r in recs))
        impls = order({r["impl"] for r in recs})
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            ys = [groups.index(_key(r)[:3]) + j * width for r in recs if r["impl"] == impl]
            xs = [sp[id(r)] if is_speedup else r["ms"] for r in recs if r["impl"] == impl]
            if xs:
                ax.barh(ys, xs, height=width, label=impl, color=colors[impl])
        ax.set_yticks([i + 0.4 - width / 2 for i in range(len(groups))])
        ax.set_yticklabels([f"{op}\n{shape} {dt}" for op, shape, dt in groups], fontsize=7)
        ax.invert_yaxis()
        if is_speedup:
            ax.axvline(1.0, color="black", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_title(title, fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="best")
    devices = ", ".join(sorted({r["device"] for r in records}))
    fig.suptitle(f"fusionblocks bench · {devices} · torch {torch.__version__}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# --------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: Union[torch.device, str], *, grads: Sequence[torch.Tensor] = (),
            budget_s: float = 1.0, min_reps: int = 3, max_reps: int = 100) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call; ``grads`` are reset to ``None`` before each call.

    CUDA: :func:`triton.testing.do_bench` (``return_mode="median"``, warm-up/repeat windows of
    ``25 * budget_s`` / ``100 * budget_s`` ms, at least 5 / 20) or, without Triton, CUDA events over 20
    calls. CPU: ``time.perf_counter`` per call, as many calls as fit ``budget_s`` (``min_reps`` to ``max_reps``).
    """
    device = torch.device(device)

    def reset():
        for t in grads:
            t.grad = None

    if device.type == "cuda":
        reset()
        fn()  # compilation and autotuning stay out of the measurement
        _sync(device)
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return float(do_bench(fn, warmup=max(5, int(25 * budget_s)), rep=max(20, int(100 * budget_s)),
                                  grad_to_none=list(grads) or None, return_mode="median"))
        times = []
        for _ in range(max(min_reps, 20)):
            reset()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    reset()
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    reps = int(max(min_reps, min(max_reps, budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        reset()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _tensor_bytes(objs: Iterable[object]) -> int:
    seen, total = set(), 0
    for t in objs:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C++ logging included) for the duration."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (e.g. captured by pytest)
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _cpu_alloc_peak_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Peak of the running sum of allocations minus frees during ``fn()``, from ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto prints profiler_start/stop lines on fd 2
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        cur = peak = 0
        for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events):
            cur += nbytes
            peak = max(peak, cur)
        return peak
    except Exception:  # the profiler's event API is not stable across versions
        return None


def peak_mem_mb(fn: Callable[[], object], device: Union[torch.device, str],
                resident: Iterable[object] = ()) -> Optional[float]:
    """Peak memory of one ``fn()`` call in MiB: the bytes of ``resident`` (the call's inputs, parameters,
    buffers; shared storages counted once) plus the most the call allocates above what was allocated before it.

    ``None`` on CPU when ``torch.profiler`` cannot report the allocations.
    """
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
    else:
        peak = _cpu_alloc_peak_bytes(fn)
        if peak is None:
            return None
    return (max(peak, 0) + _tensor_bytes(resident)) / 2**20


# --------------------------------------------------------------------------------------------- cases

INTERPRETER_REASON = ("Triton needs a CUDA device to be timed (on CPU it runs only in its interpreter, "
                      "TRITON_INTERPRET=1, a correctness tool; the scripts' --quick smoke runs use it)")


@dataclass
class Impl:
    """One implementation of a case: ``fn(inputs) -> Tensor`` and why it cannot run here (empty: it can)."""

    name: str
    fn: Callable[[dict], torch.Tensor]
    reasons: List[str] = field(default_factory=list)


@dataclass
class OpBench:
    """A benchmarked op: its shapes (paper and quick), how to build inputs and its implementations.

    ``impls(shape, inputs, device, smoke=False)``: with ``smoke`` the anchors that need CUDA run eagerly
    on CPU (FlexAttention uncompiled) so a CPU smoke run exercises their code. ``spec(inputs) -> Tensor``
    computes the op's definition (``ops/reference.py``) for the error check, ``None`` for the blocks.
    """

    name: str
    aliases: Tuple[str, ...]
    shapes: Callable[[bool], List[dict]]
    make_inputs: Callable[[dict, torch.device, torch.dtype], dict]
    impls: Callable[..., List[Impl]]
    grad_keys: Tuple[str, ...] = ("q", "k", "v")
    impl_names: Tuple[str, ...] = _dispatch.BACKENDS + ANCHORS
    spec: Optional[Callable[[dict], torch.Tensor]] = None


OPS: Dict[str, OpBench] = {}


def register_op(bench: OpBench) -> OpBench:
    OPS[bench.name] = bench
    return bench


def resolve_ops(names: Optional[Sequence[str]]) -> List[OpBench]:
    """Op benches by name or alias (all when ``names`` is empty); unknown names raise with close matches."""
    if not names:
        return list(OPS.values())
    lookup = {}
    for b in OPS.values():
        lookup[b.name] = b
        for a in b.aliases:
            lookup[a] = b
    out = []
    for n in names:
        if n not in lookup:
            close = difflib.get_close_matches(n, list(lookup), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"unknown op {n!r}{hint} Available: {', '.join(OPS)} (aliases: "
                             f"{', '.join(a for b in OPS.values() for a in b.aliases)})")
        if lookup[n] not in out:
            out.append(lookup[n])
    return out


def _qkv(shape: dict, device, dtype) -> dict:
    b, nh, n, d = shape["B"], shape["heads"], shape["H"] * shape["W"], shape["D"]
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, nh, n, d, generator=g).to(device=device, dtype=dtype).requires_grad_() for _ in range(3))
    return {"q": q, "k": k, "v": v}


def _backend_impls(op: str, call: Callable[[dict, Optional[str]], torch.Tensor], args: Callable[[dict], tuple],
                   kwargs: Callable[[dict], dict]) -> Callable[[dict], List[Impl]]:
    def build(inputs: dict) -> List[Impl]:
        reasons = _dispatch.explain(op, *args(inputs), **kwargs(inputs))
        return [Impl(name, functools.partial(call, backend=name), r) for name, r in reasons.items()]

    return build


def _flex_reasons(device: torch.device, smoke: bool = False) -> List[str]:
    if device.type != "cuda" and not smoke:
        return ["FlexAttention is benchmarked compiled, which needs CUDA"]
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError as e:
        return [f"FlexAttention is not available in torch {torch.__version__} ({e})"]
    return []


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit"):  # one compile per benchmarked shape and score_mod
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 256))
            break
    return torch.compile(flex_attention, dynamic=False)


def _eager_flex(*args, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def _flex(compiled: bool):
    return _compiled_flex() if compiled else _eager_flex


# ---- decay attention

def _log_gamma(heads: int, device) -> torch.Tensor:
    """RMT's fixed per-head decay (``initial_value=2``, ``heads_range=4``), float32, no gradient."""
    from .layers.manhattan import manhattan_log_decay

    return manhattan_log_decay(heads, 2.0, 4.0).to(device)


def decay_sdpa(q, k, v, log_gamma, *, hw, mode, scale=None):
    """Anchor: SDPA with the decay bias materialized ((heads, N, N), or per line when decomposed)."""
    h, w = hw
    b, nh, n, d = q.shape
    if mode == "full":
        bias = log_gamma.to(q.dtype)[:, None, None] * _ref.manhattan_distance(h, w, q.device).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    rows = lambda t: t.reshape(b, nh, h, w, d).permute(0, 2, 1, 3, 4).reshape(b * h, nh, w, d)  # noqa: E731
    cols = lambda t: t.reshape(b, nh, h, w, d).permute(0, 3, 1, 2, 4).reshape(b * w, nh, h, d)  # noqa: E731
    bias_w, bias_h = _ref._decay_1d(log_gamma, w, q.dtype), _ref._decay_1d(log_gamma, h, q.dtype)
    o = F.scaled_dot_product_attention(rows(q), rows(k), rows(v), attn_mask=bias_w, scale=scale)
    o = o.reshape(b, h, nh, w, d).permute(0, 2, 1, 3, 4)
    o = F.scaled_dot_product_attention(cols(q), cols(k), cols(o), attn_mask=bias_h, scale=scale)
    return o.reshape(b, w, nh, h, d).permute(0, 2, 3, 1, 4).reshape(b, nh, n, d)


def decay_flex(q, k, v, log_gamma, *, hw, mode, scale=None, compiled=True):
    """Anchor: FlexAttention with the Manhattan decay as a ``score_mod``."""
    flex = _flex(compiled)
    h, w = hw
    b, nh, n, d = q.shape
    lg = log_gamma.to(torch.promote_types(q.dtype, torch.float32))
    if mode == "full":
        def full_mod(score, bi, hi, qi, ki):
            dist = (qi // w - ki // w).abs() + (qi % w - ki % w).abs()
            return score + lg[hi] * dist

        return flex(q, k, v, score_mod=full_mod, scale=scale)

    def line_mod(score, bi, hi, qi, ki):
        return score + lg[hi] * (qi - ki).abs()

    rows = lambda t: t.reshape(b, nh, h, w, d).permute(0, 2, 1, 3, 4).reshape(b * h, nh, w, d)  # noqa: E731
    cols = lambda t: t.reshape(b, nh, h, w, d).permute(0, 3, 1, 2, 4).reshape(b * w, nh, h, d)  # noqa: E731
    o = flex(rows(q), rows(k), rows(v), score_mod=line_mod, scale=scale)
    o = o.reshape(b, h, nh, w, d).permute(0, 2, 1, 3, 4)
    o = flex(cols(q), cols(k), cols(o), score_mod=line_mod, scale=scale)
    return o.reshape(b, w, nh, h, d).permute(0, 2, 3, 1, 4).reshape(b, nh, n, d)


def _decay_bench(mode: str) -> OpBench:
    from .ops import decay_attention

    if mode == "full":
        # RMT/HEMF full-attention stages at batch 32, plus a large-map case (issue 3)
        paper = [dict(B=32, heads=4, H=s, W=s, D=d) for s in (56, 28) for d in (16, 32, 64)]
        paper.append(dict(B=2, heads=8, H=96, W=96, D=32))
        quick = [dict(B=2, heads=4, H=14, W=14, D=32)]
    else:
        # HEMF's four stages at batch 32: 56²/d12 … 7²/d96, 8 heads
        paper = [dict(B=32, heads=8, H=s, W=s, D=d) for s, d in ((56, 12), (28, 24), (14, 48), (7, 96))]
        quick = [dict(B=2, heads=8, H=14, W=14, D=24)]

    def make(shape, device, dtype):
        x = _qkv(shape, device, dtype)
        x["log_gamma"] = _log_gamma(shape["heads"], device)
        x["hw"] = (shape["H"], shape["W"])
        return x

    def call(x, backend):
        return decay_attention(x["q"], x["k"], x["v"], x["log_gamma"], hw=x["hw"], mode=mode, backend=backend)

    backends = _backend_impls(
        "decay_attention", call, lambda x: (x["q"], x["k"], x["v"], x["log_gamma"]),
        lambda x: dict(hw=x["hw"], mode=mode, scale=None),
    )

    def impls(shape, x, device, smoke=False):
        compiled = device.type == "cuda"
        return backends(x) + [
            Impl("sdpa", lambda x: decay_sdpa(x["q"], x["k"], x["v"], x["log_gamma"], hw=x["hw"], mode=mode)),
            Impl("flex", lambda x: decay_flex(x["q"], x["k"], x["v"], x["log_gamma"], hw=x["hw"], mode=mode,
                                              compiled=compiled), _flex_reasons(device, smoke)),
        ]

    def spec(x):
        return _ref.decay_attention(x["q"], x["k"], x["v"], x["log_gamma"], hw=x["hw"], mode=mode)

    return OpBench(
        f"decay_attention_{mode}",
        ("decay_full", "decay") if mode == "full" else ("decay_decomposed",),
        lambda quick_: quick if quick_ else paper,
        make,
        impls,
        spec=spec,
    )


# ---- window attention

def window_sdpa(q, k, v, bias_table, *, hw, window_size, shift=0, scale=None):
    """Anchor: SDPA over partitioned windows with a materialized (B·nW, heads, L, L) bias + shift mask."""
    h, w = hw
    b, nh, _, d = q.shape
    ws, L = window_size, window_size * window_size
    qw, kw, vw = (_ref._partition(t, h, w, ws, shift).reshape(-1, nh, L, d) for t in (q, k, v))
    nw = (h // ws) * (w // ws)
    mask = torch.zeros(nw, nh, L, L, device=q.device, dtype=q.dtype)
    if bias_table is not None:
        idx = _ref.relative_position_index(ws, q.device).reshape(-1)
        mask = mask + bias_table[idx].reshape(L, L, nh).permute(2, 0, 1).to(q.dtype)
    if shift:
        mask = mask + _ref.shift_attention_mask(h, w, ws, shift, q.device).to(q.dtype)[:, None]
    mask = mask.unsqueeze(0).expand(b, -1, -1, -1, -1).reshape(b * nw, nh, L, L)
    o = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=mask, scale=scale)
    return _ref._merge(o.reshape(b, nw, nh, L, d), b, nh, h, w, ws, shift)


@functools.lru_cache(maxsize=64)
def _window_block_mask(h: int, w: int, ws: int, device: str):
    """FlexAttention block mask keeping each ``ws x ws`` window of the (rolled) ``h x w`` grid; built once."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_window(bi, hi, qi, ki):
        return ((qi // w) // ws == (ki // w) // ws) & ((qi % w) // ws == (ki % w) // ws)

    return create_block_mask(same_window, None, None, h * w, h * w, device=device)


def window_flex(q, k, v, bias_table, *, hw, window_size, shift=0, scale=None, compiled=True):
    """Anchor: FlexAttention on the rolled grid: a block mask keeps each window, ``score_mod`` adds bias and mask."""
    flex = _flex(compiled)
    h, w = hw
    b, nh, n, d = q.shape
    ws = window_size
    if shift:
        q, k, v = (torch.roll(t.reshape(b, nh, h, w, d), (-shift, -shift), (2, 3)).reshape(b, nh, n, d)
                   for t in (q, k, v))
    region = _ref.shift_region_ids(h, w, ws, shift, q.device).reshape(-1) if shift else None
    table = bias_table

    def bias_mod(score, bi, hi, qi, ki):
        if table is not None:
            dy = (qi // w) % ws - (ki // w) % ws + ws - 1
            dx = (qi % w) % ws - (ki % w) % ws + ws - 1
            score = score + table[dy * (2 * ws - 1) + dx, hi].to(score.dtype)
        if region is not None:
            score = score + torch.where(region[qi] == region[ki], 0.0, -100.0)
        return score

    block_mask = _window_block_mask(h, w, ws, str(q.device))
    o = flex(q, k, v, score_mod=bias_mod, block_mask=block_mask, scale=scale)
    if shift:
        o = torch.roll(o.reshape(b, nh, h, w, d), (shift, shift), (2, 3)).reshape(b, nh, n, d)
    return o


def _window_bench() -> OpBench:
    from .ops import window_attention

    # HiFuse stages at batch 32 (56²/3 heads … 7²/24 heads, d=32, ws=7), unshifted and shifted (issue 4)
    paper = [dict(B=32, heads=nh, H=s, W=s, D=32, ws=7, shift=sh)
             for s, nh in ((56, 3), (28, 6), (14, 12), (7, 24)) for sh in (0, 3)]
    quick = [dict(B=2, heads=3, H=14, W=14, D=32, ws=7, shift=3)]

    def make(shape, device, dtype):
        x = _qkv(shape, device, dtype)
        ws = shape["ws"]
        g = torch.Generator(device="cpu").manual_seed(1)
        table = 0.02 * torch.randn((2 * ws - 1) ** 2, shape["heads"], generator=g)
        x["bias_table"] = table.to(device, dtype).requires_grad_()
        x["hw"] = (shape["H"], shape["W"])
        x["ws"], x["shift"] = ws, shape["shift"]
        return x

    kw = lambda x, shape: dict(hw=x["hw"], window_size=shape["ws"], shift=shape["shift"])  # noqa: E731

    def impls(shape, x, device, smoke=False):
        compiled = device.type == "cuda"

        def call(x, backend):
            return window_attention(x["q"], x["k"], x["v"], x["bias_table"], backend=backend, **kw(x, shape))

        backends = _backend_impls(
            "window_attention", call, lambda x: (x["q"], x["k"], x["v"], x["bias_table"]),
            lambda x: dict(scale=None, **kw(x, shape)),
        )
        return backends(x) + [
            Impl("sdpa", lambda x: window_sdpa(x["q"], x["k"], x["v"], x["bias_table"], **kw(x, shape))),
            Impl("flex", lambda x: window_flex(x["q"], x["k"], x["v"], x["bias_table"], compiled=compiled,
                                               **kw(x, shape)), _flex_reasons(device, smoke)),
        ]

    def spec(x):
        return _ref.window_attention(x["q"], x["k"], x["v"], x["bias_table"], hw=x["hw"], window_size=x["ws"],
                                     shift=x["shift"])

    return OpBench("window_attention", ("window",), lambda q_: quick if q_ else paper, make, impls,
                   grad_keys=("q", "k", "v", "bias_table"), spec=spec)


# ---- fusion blocks

def _block_bench(name: str, stages: Sequence[Tuple[int, int]]) -> OpBench:
    """HFF/HEF at the papers' stages (batch 32, 224² input); ``f`` from the previous stage except at stage 1."""
    paper = [dict(B=32, C=c, H=s, W=s, f=i > 0) for i, (c, s) in enumerate(stages)]
    quick = [dict(B=2, C=32, H=14, W=14, f=True)]

    def make(shape, device, dtype):
        import fusionblocks

        cls = getattr(fusionblocks, name.upper(), None)
        if cls is None:
            return {"missing": f"fusionblocks.{name.upper()} is not available in this install"}
        b, c, h, w = shape["B"], shape["C"], shape["H"], shape["W"]
        g = torch.Generator(device="cpu").manual_seed(0)
        block = cls(c).to(device=device, dtype=dtype).train()
        rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
        x = {"block": block, "l": rnd(b, c, h, w), "g": rnd(b, c, h, w)}
        x["f"] = rnd(b, c // 2, 2 * h, 2 * w) if shape["f"] else None
        return x

    def impls(shape, x, device, smoke=False):
        if "missing" in x:
            return [Impl("eager", lambda x: None, [x["missing"]])]
        return [Impl("eager", lambda x: x["block"](x["l"], x["g"], x["f"]))]

    return OpBench(name, (name.upper(),), lambda q_: quick if q_ else paper, make, impls, grad_keys=("l", "g", "f"),
                   impl_names=("eager",))


register_op(_decay_bench("full"))
register_op(_decay_bench("decomposed"))
register_op(_window_bench())
register_op(_block_bench("hff", [(96, 56), (192, 28), (384, 14), (768, 7)]))
register_op(_block_bench("hef", [(96, 56), (192, 28), (384, 14), (768, 7)]))

# Named shape sets (op name -> shapes) that a script times instead of the ops' paper shapes.
PRESETS: Dict[str, Dict[str, List[dict]]] = {
    # issue 7's CPU benchmark: decay attention at 28² and 56² tokens (B=1, 4 heads, D=32), and window
    # attention at HiFuse's stage-1 shape (56², 3 heads, D=32, window 7) with a smaller batch (2)
    "cpu": {
        "decay_attention_full": [dict(B=1, heads=4, H=s, W=s, D=32) for s in (28, 56)],
        "decay_attention_decomposed": [dict(B=1, heads=4, H=s, W=s, D=32) for s in (28, 56)],
        "window_attention": [dict(B=2, heads=3, H=56, W=56, D=32, ws=7, shift=sh) for sh in (0, 3)],
    },
}


def preset(name: str) -> Dict[str, List[dict]]:
    """A copy of the named shape set of :data:`PRESETS`; unknown names raise ``KeyError`` listing the known ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown bench preset {name!r}; known: {sorted(PRESETS)}")
    return {op: [dict(s) for s in shapes] for op, shapes in PRESETS[name].items()}


# --------------------------------------------------------------------------------------------- runner


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
             rotate: int = 1, smoke: bool = False, check: bool = False,
             device_label: Optional[str] = None) -> BenchResult:
    """Time every implementation of one (op, shape, dtype) case, both passes; see :func:`run`."""
    dev = torch.device(device)
    dname = device_label or device_name(dev)
    sets = [bench.make_inputs(shape, dev, dtype) for _ in range(max(1, rotate))]
    fwd_sets = [_detached(x) for x in sets]
    records: List[dict] = []
    skipped: List[Skipped] = []
    for impl in bench.impls(shape, sets[0], dev, smoke=smoke):
        if impls and impl.name not in impls:
            continue
        if not impl.reasons and impl.name == "triton" and dev.type == "cpu" and not smoke:
            impl.reasons = [INTERPRETER_REASON]
        if impl.reasons:
            skipped.append(Skipped(bench.name, shape, impl.name, _reasons_str(impl.reasons)))
            continue
        extra = {}
        try:
            err = _max_abs_err(bench, impl.fn, fwd_sets[0]) if check else None
            if err is not None:
                extra["max_abs_err"] = err
        except Exception as e:  # the forward itself fails: every pass of this implementation failed
            records += [make_record(bench.name, impl.name, shape, dtype, p, None, None, dname, error=error_text(e))
                        for p in passes]
            continue
        for p in passes:
            grads = [t for x in sets for t in _grads_of(bench, x)] if p == "fwd+bwd" else []
            inputs = sets if p == "fwd+bwd" else fwd_sets
            try:
                ms = time_ms(_runner(impl.fn, inputs, p), dev, grads=grads, budget_s=budget_s,
                             min_reps=1 if smoke else 3)
                for t in grads:
                    t.grad = None
                mem = peak_mem_mb(_runner(impl.fn, inputs[0], p), dev, _resident(inputs[0]))
            except Exception as e:  # one implementation failing must not stop the run; it is recorded
                records.append(make_record(bench.name, impl.name, shape, dtype, p, None, None, dname,
                                           error=error_text(e)))
                continue
            finally:
                for t in grads:
                    t.grad = None
            records.append(make_record(bench.name, impl.name, shape, dtype, p, ms, mem, dname, **extra))
    del sets, fwd_sets
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
                       smoke=smoke, check=check, device_label=dname)
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


# --------------------------------------------------------------------------------------------- models


@contextlib.contextmanager
def _forced_backend(name: Optional[str]):
    old = os.environ.get(_dispatch.ENV_VAR)
    if name is None:
        os.environ.pop(_dispatch.ENV_VAR, None)
    else:
        os.environ[_dispatch.ENV_VAR] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_dispatch.ENV_VAR, None)
        else:
            os.environ[_dispatch.ENV_VAR] = old


@contextlib.contextmanager
def _record_dispatch(seen: set):
    """Collect ``(op, backend)`` for every dispatched op call."""
    original = _dispatch.select

    def select(op, backend, *args, **kwargs):
        chosen = original(op, backend, *args, **kwargs)
        seen.add((op, chosen.name))
        return chosen

    _dispatch.select = select
    try:
        yield
    finally:
        _dispatch.select = original


def _first_reason(e: Exception, backend: str) -> str:
    """The dispatcher's headline plus this backend's own line of its candidate list."""
    lines = str(e).splitlines() or [""]
    mine = [ln.strip() for ln in lines[1:] if ln.strip().startswith(f"{backend}:")]
    head = lines[0]
    if head.endswith("Candidates:"):
        head = head[: -len("Candidates:")].rstrip(" .")
    return f"{type(e).__name__}: {head}" + (f" ({mine[0]})" if mine else "")


def run_model(name: str, *, batch_size: int = 32, image_size: int = 224, steps: int = 10, warmup: int = 1,
              backends: Optional[Sequence[str]] = None, device: Optional[str] = None,
              num_classes: int = 7, progress: Optional[bool] = None) -> BenchResult:
    """Training-step throughput and peak memory of a whole network, once per backend.

    Each backend is forced through ``FUSIONBLOCKS_BACKEND`` (the modules dispatch with ``backend=None``);
    one that cannot run some call of the network is reported as skipped with the dispatcher's reasons.
    A network whose forward dispatches no op is timed once, as ``eager``. AdamW step, cross-entropy on
    random labels, bf16 autocast on CUDA (fp32 on CPU).
    """
    from tqdm.auto import tqdm

    from .models.registry import create_model

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = create_model(name, num_classes=num_classes).to(dev).train()
    in_chans = int(getattr(model, "in_chans", 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch_size, in_chans, image_size, image_size, generator=g).to(dev)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(dev)
    amp = dev.type == "cuda"
    dtype = torch.bfloat16 if amp else torch.float32
    dname = device_name(dev)
    shape = {"model": name, "B": batch_size, "image_size": image_size}

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    records, skipped = [], []
    todo = list(backends) if backends else list(_dispatch.BACKENDS)
    if dev.type == "cpu" and "triton" in todo:
        todo.remove("triton")
        skipped.append(Skipped("train_step", shape, "triton", INTERPRETER_REASON))
    bar = tqdm(total=len(todo) * (warmup + steps), desc=f"bench {name}", unit="step",
               disable=(None if progress is None else not progress))
    ran_any_op = True
    for backend in todo:
        seen: set = set()
        with _forced_backend(backend):
            try:
                with _record_dispatch(seen):
                    for _ in range(max(1, warmup)):
                        step()
                        bar.update()
            except (_dispatch.BackendUnavailable, NotImplementedError, RuntimeError) as e:
                skipped.append(Skipped("train_step", shape, backend, _first_reason(e, backend)))
                bar.update(steps)
                continue
            ran_any_op = bool(seen)
            _sync(dev)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                _sync(dev)
                times.append(time.perf_counter() - t0)
                bar.update()
            ms = 1e3 * statistics.median(times)
            opt.zero_grad(set_to_none=True)
            state = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
            mem = peak_mem_mb(step, dev, list(model.parameters()) + list(model.buffers()) + state + [x, y])
        impl = backend if ran_any_op else "eager"
        records.append(make_record("train_step", impl, shape, dtype, "train", ms, mem, dname,
                                   img_per_s=batch_size / (ms / 1e3)))
        if not ran_any_op:  # backends do not matter to this network
            skipped = []
            break
    bar.close()
    return BenchResult(records, skipped)
