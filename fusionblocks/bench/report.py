"""Reports of bench records: text and Markdown tables, the pivot of speed-ups, the bar chart, the result files."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .records import PASSES, triton_version, write_json


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


def _case(r: dict) -> tuple:
    """(op, shape with the thread count of CPU records, dtype): the implementations of one case sit together."""
    threads = f" threads={r['threads']}" if "threads" in r else ""
    return (r["op"], shape_str(r["shape"]) + threads, r["dtype"])


def _key(r: dict) -> tuple:
    return _case(r) + (r["pass"],)


def speedups(records: List[dict], baseline: str = "reference") -> Dict[int, Optional[float]]:
    """``id(record) -> baseline ms / record ms`` within each (op, shape, dtype, pass) group (``None``: no pair)."""
    base = {_key(r): r["ms"] for r in records if r["impl"] == baseline and r["ms"]}
    return {id(r): (base[_key(r)] / r["ms"] if _key(r) in base and r["ms"] else None) for r in records}


def side_by_side(records: List[dict]) -> List[dict]:
    """Records reordered so the implementations of one (op, shape, dtype) case and pass sit together."""
    first: Dict[tuple, int] = {}
    for i, r in enumerate(records):
        first.setdefault(_case(r), i)
    passes = (*PASSES, "train")
    return sorted(records, key=lambda r: (first[_case(r)], passes.index(r["pass"])))


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
            _case(r)[1],
            r["dtype"],
            r["pass"],
            r["impl"] + (f" -> {r['chosen']}" if "chosen" in r else ""),
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
    heights = [len({_case(r) for r in recs}) * len({r["impl"] for r in recs}) for _, recs, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 1.0 + sum(0.25 * h + 0.9 for h in heights)),
                             gridspec_kw={"height_ratios": [h + 3 for h in heights]}, squeeze=False)
    for ax, (title, recs, is_speedup) in zip(axes[:, 0], panels):
        groups = list(dict.fromkeys(_case(r) for r in recs))
        impls = order({r["impl"] for r in recs})
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            ys = [groups.index(_case(r)) + j * width for r in recs if r["impl"] == impl]
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
