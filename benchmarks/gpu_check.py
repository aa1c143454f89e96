"""The one command for a GPU machine (issue 12): build, GPU tests, kernel and model benchmarks, into one folder.

Run from the repository root (``benchmarks/gpu_check.sh OUTDIR`` calls this)::

    python3 benchmarks/gpu_check.py OUTDIR            # on the GPU machine, ~8 minutes from cold
    python3 benchmarks/gpu_check.py OUTDIR --dry-run  # on a CPU: same stages, tiny shapes, Triton interpreter
    python3 benchmarks/gpu_check.py OUTDIR --quick    # the test's shorter dry run (one model, two of three ops)

Stages, each a child process under its own time cap (coreutils ``timeout``), so a slow or failing
stage still leaves the others' results:

``build``
    ``FUSIONBLOCKS_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace``
    (no pip, nothing fetched), then checks that ``fusionblocks._C`` has its CUDA kernels. Dry run:
    the same command with ``FUSIONBLOCKS_NO_EXT=1`` (builds nothing).
``tests``
    ``python3 -m pytest -v -m gpu tests`` (bf16/fp16/fp32 parity at the papers' shapes, opcheck,
    ``torch.compile`` with inductor), with ``-n 4`` where pytest-xdist is installed (Triton's first
    compiles run on the host's cores). Dry run: one file of the same selection, which skips without a GPU.
``kernels``
    HiFuse-T window attention (batch 32; 56²/3 heads, 28²/6, 14²/12, 7²/24; D 32; window 7; shift 0
    and 3), HEMF decomposed decay (batch 32, 8 heads; 56²/28²/14²/7² with D 12/24/48/96) and full
    decay (56², 28²), bf16 then fp32, fwd and fwd+bwd, every contender side by side (``triton``,
    ``cuda`` for windows, ``reference``, ``sdpa`` with a materialized bias, ``flex`` = compiled
    FlexAttention). Each record carries ``tflops``, ``gbps``, ``hbm_share`` and ``io_mb``; then the
    determinism check: every backward run twice on the same inputs and compared bit for bit, and its
    gradients' largest error against the float64 reference; then the tuning variants (:data:`VARIANTS`:
    the split decay backward where the fused one is the default, the window backward at more programs
    per SM and at 4 warps), fwd+bwd next to the default re-timed, as ``triton[<variant>]`` records.
``models``
    Training-step img/s and peak memory of ``hifuse_tiny`` and ``hemf`` at 224², batch 32, bf16
    autocast, once per backend (``reference``, ``triton``, ``cuda``), via ``fusionblocks.bench.run_model``.

Writes (8 files at most): ``summary.md`` (stages, status, times, tables, the variants against the
defaults, what to try next),
``kernels.json`` and ``models.json`` (``fusionblocks.bench`` records: each names device, torch and
triton), ``determinism.json`` and ``logs/<stage>.log``.

FLOP and byte conventions (stated in the summary): attention FLOPs count the two matmuls of the
forward (``4·B·heads·N·L·D``, ``L`` = keys per query), fwd+bwd counts 3.5× that (the backward's five
matmuls), recomputation not counted; bytes = q, k, v read once + o written once (fwd, 4 tensors) and
the forward's plus q, k, v, o, dO read and dq, dk, dv written (fwd+bwd, 12 tensors); ``hbm_share``
= those bytes over the time as a share of the device's peak HBM bandwidth from :data:`HBM_PEAK_GBPS`
(the vendor's datasheet number; ``None`` for a device not in the table).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the checkout's fusionblocks, built in place
STAGES = ("build", "tests", "kernels", "models")
# seconds per stage on the GPU machine (sum 8.2 min; a cold machine compiles every Triton kernel once) and in a dry run;
# the kernels stage's order (bf16, determinism, tuning variants, fp32, flex) puts what a time-out may cut last
CAPS = {"build": 120, "tests": 80, "kernels": 220, "models": 70}
DRY_CAPS = {"build": 300, "tests": 300, "kernels": 600, "models": 600}  # a shared 2-core CPU can be slow

HBM_PEAK_GBPS = {
    # device-name substring -> datasheet peak HBM/GDDR bandwidth in GB/s (first match wins: specific names first)
    "GH200": 4000.0,  # before "H200", which its name contains
    "H200": 4800.0,
    "H100 NVL": 3900.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,  # SXM5 80GB HBM3
    "B200": 8000.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100": 1555.0,  # 40GB
    "L40S": 864.0,
    "L40": 864.0,
    "L4": 300.0,
    "A10": 600.0,
    "T4": 320.0,
}

# issue 12's performance items that only a GPU can settle, timed by the kernels stage as tuning variants of the
# triton backend (fusionblocks.ops.triton._common.tuned) next to the defaults: op -> [(label, tuning values)]
VARIANTS = {
    "decay_attention_decomposed": [("split backward", dict(decay_fused_backward_max_tokens=0))],
    "decay_attention_full": [("split backward", dict(decay_fused_backward_max_tokens=0))],
    "window_attention": [("8 programs/SM", dict(window_backward_programs_per_sm=8)),
                         ("16 programs/SM", dict(window_backward_programs_per_sm=16)),
                         ("4 warps", dict(window_backward_num_warps=4))],
}
VARIANT_GAIN = 1.05
"""A variant this much faster than the default (fwd+bwd) is flagged in the summary as a candidate default."""

# things the benchmark decides (issue 12's performance items) that are not tuning variants, listed in the summary
TO_TRY = [
    "the decay kernels' 16-bit tiles (128x64 forward, 64x64 backward) and stages against smaller tiles at 7² and 14²",
    "already in (not measured yet): the fused single-tile decay backward for lines of up to 64 tokens (its split "
    "form is timed as a variant), the window bias gathered once per call, H/W (window) and W (decay) as "
    "compile-time constants, 1-D grids, int64 token offsets: compare against the previous commit if a case regressed",
]


# ------------------------------------------------------------------------------------------ targets

FAST_PATHS = ("triton", "cuda")  # a case's fast path is the faster of these that ran it
# issue 12 §3, fwd+bwd in the run's main dtype, side by side: (op, shape fields a case must have, contender,
# contender's time / fast path's time at least)
SPEED_TARGETS = [
    ("decay_attention_full", {"H": 56, "W": 56}, "reference", 10.0),
    ("decay_attention_full", {"H": 56, "W": 56}, "flex", 1.2),
    ("decay_attention_decomposed", {}, "reference", 3.0),
    ("window_attention", {}, "reference", 3.0),
    ("window_attention", {}, "sdpa", 1.5),
    ("window_attention", {}, "flex", 1.5),
]
HBM_TARGET = ("window_attention", 0.5)  # the fast path's share of the datasheet HBM bandwidth, at least
MODEL_TARGET = (("hifuse_tiny", "hemf"), 1.5)  # training step img/s of the fastest backend over the reference's


def target_rows(kernels: List[dict], models: List[dict], dtype: str) -> List[List[str]]:
    """Issue 12's targets against the records: ``[target, case, fast path, measured, needed, met]`` per case
    (``met`` is ``yes``, ``**no**`` or ``not measured``: a missing or failed record is never a pass)."""
    from fusionblocks import bench

    timed = [r for r in kernels if r.get("pass") == "fwd+bwd" and r.get("dtype") == dtype and r.get("ms")]
    cases: Dict[tuple, Dict[str, dict]] = {}
    for r in timed:
        cases.setdefault((r["op"], bench.shape_str(r["shape"])), {})[r["impl"]] = r

    def fast(impls):
        ran = [impls[i] for i in FAST_PATHS if i in impls]
        return min(ran, key=lambda r: r["ms"]) if ran else None

    rows = []
    for op, need, contender, at_least in SPEED_TARGETS:
        matching = [(case, impls) for (o, case), impls in cases.items() if o == op
                    and all(next(iter(impls.values()))["shape"].get(k) == v for k, v in need.items())]
        target = f"{op} fwd+bwd: {at_least:g}x {contender}"
        if not matching:
            rows.append([target, " ".join(f"{k}={v}" for k, v in need.items()) or "any", "", "no record", f"{at_least:g}x",
                         "not measured"])
        for case, impls in sorted(matching):
            f, c = fast(impls), impls.get(contender)
            if f is None or c is None:
                rows.append([target, case, f["impl"] if f else "", "no record", f"{at_least:g}x", "not measured"])
                continue
            ratio = c["ms"] / f["ms"]
            rows.append([target, case, f["impl"], f"{ratio:.2f}x", f"{at_least:g}x", "yes" if ratio >= at_least else "**no**"])
    op, share = HBM_TARGET
    for (o, case), impls in sorted(cases.items()):
        if o != op:
            continue
        f = fast(impls)
        got = f.get("hbm_share") if f else None
        rows.append([f"{op} fwd+bwd: {share:.0%} of HBM bandwidth", case, f["impl"] if f else "",
                     "no record" if got is None else f"{got:.0%}", f"{share:.0%}",
                     "not measured" if got is None else ("yes" if got >= share else "**no**")])
    names, at_least = MODEL_TARGET
    for name in names:
        train = {r["impl"]: r for r in models if r.get("pass") == "train" and r.get("shape", {}).get("model") == name
                 and r.get("img_per_s")}
        f = max((train[i] for i in FAST_PATHS if i in train), key=lambda r: r["img_per_s"], default=None)
        ref = train.get("reference")
        target = f"{name} training step: {at_least:g}x the reference's img/s"
        if f is None or ref is None:
            rows.append([target, name, f["impl"] if f else "", "no record", f"{at_least:g}x", "not measured"])
            continue
        ratio = f["img_per_s"] / ref["img_per_s"]
        rows.append([target, name, f["impl"], f"{ratio:.2f}x", f"{at_least:g}x", "yes" if ratio >= at_least else "**no**"])
    return rows


# ------------------------------------------------------------------------------------------ shapes


def window_shapes(dry: bool) -> List[dict]:
    if dry:
        return [dict(B=1, heads=1, H=8, W=4, D=16, ws=4, shift=2)]
    return [dict(B=32, heads=nh, H=s, W=s, D=32, ws=7, shift=sh) for s, nh in ((56, 3), (28, 6), (14, 12), (7, 24))
            for sh in (0, 3)]


def decomposed_shapes(dry: bool) -> List[dict]:
    if dry:
        return [dict(B=1, heads=1, H=3, W=5, D=12)]
    return [dict(B=32, heads=8, H=s, W=s, D=d) for s, d in ((56, 12), (28, 24), (14, 48), (7, 96))]


def full_shapes(dry: bool) -> List[dict]:
    if dry:
        return [dict(B=1, heads=1, H=3, W=4, D=16)]
    return [dict(B=32, heads=8, H=s, W=s, D=d) for s, d in ((56, 12), (28, 24))]


def _lines(op: str, s: dict) -> List[int]:
    """Tokens per attention line of a decay case (the fused backward takes the short ones)."""
    return [s["H"] * s["W"]] if op == "decay_attention_full" else [s["H"], s["W"]]


def variant_cases(ops: Dict[str, List[dict]], dry: bool) -> List[tuple]:
    """``(op, shape, label, values)`` of every tuning variant worth timing: the window variants on the shifted
    shapes (the backward's structure does not depend on the shift), the split decay backward where a line
    is short enough for the fused one (the default) to apply."""
    from fusionblocks.ops.triton._common import TUNING_DEFAULTS

    fused_max = TUNING_DEFAULTS["decay_fused_backward_max_tokens"]
    cases = []
    for op, shapes in ops.items():
        for shape in shapes:
            if op == "window_attention" and not dry and shape["shift"] == 0:
                continue
            if op.startswith("decay") and min(_lines(op, shape)) > fused_max:
                continue
            cases += [(op, shape, label, values) for label, values in VARIANTS.get(op, [])]
    return cases


def op_shapes(dry: bool) -> Dict[str, List[dict]]:
    return {"window_attention": window_shapes(dry), "decay_attention_decomposed": decomposed_shapes(dry),
            "decay_attention_full": full_shapes(dry)}


# ------------------------------------------------------------------------------------ FLOPs, bytes


def keys_per_query(op: str, s: dict) -> float:
    """``L``: keys each query attends to (decomposed: a row and then a column)."""
    if op == "window_attention":
        return s["ws"] ** 2
    if op == "decay_attention_full":
        return s["H"] * s["W"]
    return s["H"] + s["W"]


def add_throughput(records: List[dict], hbm_gbps: Optional[float]) -> None:
    """``tflops``, ``io_mb``, ``gbps`` and (with a known peak) ``hbm_share`` of every measured record."""
    import torch

    from fusionblocks import bench

    for r in records:
        if r.get("ms") is None or r["pass"] not in ("fwd", "fwd+bwd"):
            continue
        s = r["shape"]
        n = s["H"] * s["W"]
        elem = torch.empty((), dtype=bench.parse_dtype(r["dtype"])).element_size()
        fwd_flops = 4.0 * s["B"] * s["heads"] * n * keys_per_query(r["op"], s) * s["D"]
        flops = fwd_flops * (3.5 if r["pass"] == "fwd+bwd" else 1.0)
        moved = (4 if r["pass"] == "fwd" else 12) * s["B"] * s["heads"] * n * s["D"] * elem
        sec = r["ms"] * 1e-3
        r["tflops"] = flops / sec / 1e12
        r["io_mb"] = moved / 2**20
        r["gbps"] = moved / sec / 1e9
        if hbm_gbps:
            r["hbm_share"] = r["gbps"] / hbm_gbps


def hbm_peak(device_name: str) -> Optional[float]:
    for key, gbps in HBM_PEAK_GBPS.items():
        if key in device_name:
            return gbps
    return None


# ------------------------------------------------------------------------------------ child stages


def _save(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def has_jsonschema() -> bool:
    """The GPU machine's image has no jsonschema (and nothing can be installed there without network)."""
    try:
        import jsonschema  # noqa: F401
    except ImportError:
        return False
    return True


def _write_records(records: List[dict], path: str) -> None:
    """Records checked against the schema where jsonschema is installed; written unchecked (and the summary
    says so) where it is not: a GPU run must not lose its results to a missing checker. Committed records
    are checked by tests/test_results.py."""
    from fusionblocks import bench

    if has_jsonschema():
        bench.validate_records(records)
    _save(path, records)


def stage_kernels(out: str, dry: bool, quick: bool = False) -> int:
    """Every kernel case, records written after each; FlexAttention's compiles (slowest) come last.

    Order: bf16 (dry run: fp32) for every op and contender but ``flex``; the determinism check; the
    tuning variants (:func:`variants`); fp32 (parity; its ``max_abs_err`` column); ``flex`` bf16. A
    time-out keeps what finished.
    """
    import torch

    from fusionblocks import bench

    device = "cuda" if not dry else "cpu"
    dname = bench.device_name(device)
    peak = hbm_peak(dname)
    main = torch.float32 if dry else torch.bfloat16
    budget = 0.05 if dry else 0.3
    path = os.path.join(out, "kernels.json")
    records: List[dict] = []
    skipped: Dict[tuple, str] = {}
    ops = op_shapes(dry)
    if quick:
        ops.pop("decay_attention_decomposed")

    def phase(dtype, impls):
        for op, shapes in ops.items():
            for shape in shapes:
                t0 = time.perf_counter()
                res = bench.run_case(bench.OPS[op], shape, dtype, device, impls=impls, budget_s=budget, smoke=dry,
                                     check=True, device_label=dname, rotate=1 if dry else 3)
                add_throughput(res.records, peak)
                records.extend(res.records)
                for s in res.skipped:
                    skipped.setdefault((s.op, s.impl, bench.dtype_name(dtype)), s.reason)
                _write_records(records, path)
                _save(os.path.join(out, "kernels_skipped.tmp.json"), [list(k) + [v] for k, v in skipped.items()])
                print(f"{op} {bench.shape_str(shape)} {bench.dtype_name(dtype)} {'/'.join(impls)}: "
                      f"{len(res.records)} records, {len(res.skipped)} skipped, {time.perf_counter() - t0:.1f} s", flush=True)

    phase(main, ["triton", "cuda", "reference", "sdpa"])
    determinism(out, dry, ops)
    variants(records, ops, main, device, dname, peak, budget, dry, save=lambda: _write_records(records, path))
    if not dry:
        phase(torch.float32, ["triton", "cuda", "reference", "sdpa"])
    phase(main, ["flex"])
    return 0


def variant_impl(label: str) -> str:
    return f"triton[{label}]"


def variants(records: List[dict], ops: Dict[str, List[dict]], dtype, device: str, dname: str, peak, budget: float,
             dry: bool, save) -> None:
    """fwd+bwd of the triton backend under each tuning variant, the default re-timed first for each shape, as
    records named ``triton[default]`` and ``triton[<label>]`` (with ``max_abs_err``: a variant changes speed only),
    appended to ``records``; ``save()`` after each shape."""
    from fusionblocks import bench
    from fusionblocks.ops.triton._common import tuned

    by_shape: Dict[tuple, List[tuple]] = {}
    for op, shape, label, values in variant_cases(ops, dry):
        by_shape.setdefault((op, bench.shape_str(shape)), []).append((shape, label, values))
    for (op, _), todo in by_shape.items():
        shape = todo[0][0]
        t0 = time.perf_counter()
        for label, values in [("default", {})] + [(lb, v) for _, lb, v in todo]:
            try:
                with tuned(**values):  # the backward runs inside the block too
                    res = bench.run_case(bench.OPS[op], shape, dtype, device, impls=["triton"], passes=("fwd+bwd",),
                                         budget_s=budget, smoke=dry, check=True, device_label=dname,
                                         rotate=1 if dry else 3)
            except Exception as e:  # one variant failing (inputs, OOM) must not cost the stage's later phases
                traceback.print_exc()
                records.append(bench.make_record(op, variant_impl(label), shape, dtype, "fwd+bwd", None, None, dname,
                                                 error=bench.error_text(e)))
                continue
            for r in res.records:
                r["impl"] = variant_impl(label)
            add_throughput(res.records, peak)
            records.extend(res.records)
        save()
        print(f"variants {op} {bench.shape_str(shape)}: {len(todo)} + default, {time.perf_counter() - t0:.1f} s", flush=True)


def variant_rows(kernels: List[dict]) -> List[str]:
    """Markdown rows: each variant's fwd+bwd time against the default's from the same shape."""
    from fusionblocks import bench

    default = {(r["op"], bench.shape_str(r["shape"]), r["dtype"]): r for r in kernels if r["impl"] == variant_impl("default")}
    rows = []
    for r in kernels:
        if not (r["impl"].startswith("triton[") and r["impl"] != variant_impl("default")):
            continue
        base = default.get((r["op"], bench.shape_str(r["shape"]), r["dtype"]))
        if base is None or not base.get("ms") or not r.get("ms"):
            ratio, note = None, r.get("error") or (base or {}).get("error") or "no time"
        else:
            ratio = base["ms"] / r["ms"]
            note = "**faster: candidate default**" if ratio >= VARIANT_GAIN else ""
        cells = [r["op"], bench.shape_str(r["shape"]), r["dtype"], r["impl"][len("triton["):-1],
                 f"{base['ms']:.3f}" if base and base.get("ms") else "n/a", f"{r['ms']:.3f}" if r.get("ms") else "n/a",
                 f"{ratio:.2f}x" if ratio else "n/a", f"{r['max_abs_err']:.2g}" if r.get("max_abs_err") is not None else "n/a", note]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return rows


def _grads(fn, x: dict, keys, go) -> List:
    for k in keys:
        if x.get(k) is not None:
            x[k].grad = None
    out = fn(x)
    out.backward(go)
    return [x[k].grad.detach().clone() for k in keys if x.get(k) is not None]


def determinism(out: str, dry: bool, ops: Dict[str, List[dict]]) -> None:
    """Each backward twice on the same inputs, bit for bit; and its gradients' error against the float64 reference."""
    import torch

    from fusionblocks import bench

    device = "cuda" if not dry else "cpu"
    dtype = torch.float32 if dry else torch.bfloat16
    rows = []
    path = os.path.join(out, "determinism.json")
    for op, shapes in ops.items():
        b = bench.OPS[op]
        # stage 1 (the largest); full decay at 28²: its float64 reference at 56² (B 32) needs ~100 GB
        shape = shapes[-1] if op == "decay_attention_full" else shapes[0]
        x = b.make_inputs(shape, torch.device(device), dtype)
        x64 = {k: (v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
               for k, v in x.items()}
        keys = [k for k in b.grad_keys if isinstance(x.get(k), torch.Tensor)]
        gen = torch.Generator(device="cpu").manual_seed(3)
        for impl in b.impls(shape, x, torch.device(device), smoke=dry):
            if impl.name not in ("triton", "cuda", "reference") or impl.reasons:
                continue
            row = dict(op=op, impl=impl.name, shape=shape, dtype=bench.dtype_name(dtype))
            try:
                with torch.no_grad():
                    o = impl.fn(x)
                go = torch.randn(o.shape, generator=gen).to(device=device, dtype=o.dtype)
                first = _grads(impl.fn, x, keys, go)
                second = _grads(impl.fn, x, keys, go)
                ref_fn = next(i.fn for i in b.impls(shape, x64, torch.device(device), smoke=dry) if i.name == "reference")
                exact = _grads(ref_fn, x64, keys, go.double())
                row["bitwise_identical"] = all(torch.equal(a, c) for a, c in zip(first, second))
                row["max_abs_diff_between_runs"] = max(float((a.float() - c.float()).abs().max()) for a, c in zip(first, second))
                row["max_abs_err_vs_float64"] = {k: float((a.double() - e).abs().max()) for k, a, e in zip(keys, first, exact)}
                row["grad_scale"] = {k: float(e.abs().max()) for k, e in zip(keys, exact)}
            except Exception as e:  # recorded, the other implementations still run
                row["error"] = bench.error_text(e)
            rows.append(row)
            _save(path, rows)
            print(f"determinism {op} {impl.name}: {row.get('bitwise_identical', row.get('error'))}", flush=True)
    _save(path, rows)


def stage_models(out: str, dry: bool, quick: bool = False) -> int:
    from fusionblocks import bench

    path = os.path.join(out, "models.json")
    records: List[dict] = []
    skipped = []
    for name in ("hifuse_tiny",) if quick else ("hifuse_tiny", "hemf"):
        kw = dict(batch_size=2, image_size=32, steps=1, device="cpu") if dry else dict(batch_size=32, image_size=224, steps=8)
        t0 = time.perf_counter()
        try:
            res = bench.run_model(name, backends=["reference", "triton", "cuda"], **kw)
        except Exception as e:  # one model failing leaves the other's records
            traceback.print_exc()
            skipped.append([name, "all", bench.error_text(e)])
            continue
        records += res.records
        skipped += [[s.shape["model"], s.impl, s.reason] for s in res.skipped]
        _write_records(records, path)
        print(f"{name}: {len(res.records)} records, {time.perf_counter() - t0:.1f} s", flush=True)
    _save(os.path.join(out, "models_skipped.tmp.json"), skipped)
    return 0


# ------------------------------------------------------------------------------------ orchestration


def _env(dry: bool) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if dry:
        env["TRITON_INTERPRET"] = "1"
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


TEST_WORKERS = 4
"""pytest-xdist workers for the GPU tests where that python has xdist (the GPU image does): the tests stage
is bound by Triton's first compiles of every kernel configuration, which run on the host's cores."""


def stage_command(stage: str, out: str, dry: bool, py: str, xdist: bool = False) -> List[str]:
    if stage == "build":
        arch = shlex.quote(os.environ.get("TORCH_CUDA_ARCH_LIST") or "9.0")  # H100/H200 unless told otherwise
        flags = "FUSIONBLOCKS_NO_EXT=1" if dry else f"FUSIONBLOCKS_CUDA=1 TORCH_CUDA_ARCH_LIST={arch} MAX_JOBS=16"
        check = ("import fusionblocks.ops.cpp as c; print('fusionblocks._C:', c._C)" if dry else
                 "import fusionblocks.ops.cuda as c; assert c.available(), 'fusionblocks._C has no CUDA kernels'; "
                 "print('fusionblocks._C with CUDA kernels:', c.cpp._C.__file__)")
        script = f"env {flags} {shlex.quote(py)} setup.py build_ext --inplace && {shlex.quote(py)} -c {shlex.quote(check)}"
        return ["bash", "-c", script]
    if stage == "tests":
        target = ["tests/ops/test_window_triton.py"] if dry else ["tests"]  # dry: the selection's code path, quickly
        workers = ["-n", str(TEST_WORKERS)] if xdist and not dry else []
        # -v: each test's name and outcome is in the log as it finishes, so a time-out still says which ran
        return [py, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs", *workers, *target]
    return [py, os.path.abspath(__file__), out, "--stage", stage] + (["--dry-run"] if dry else [])


def run_stage(stage: str, out: str, dry: bool, py: str, cap: int, quick: bool = False) -> dict:
    log = os.path.join(out, "logs", f"{stage}.log")

    def importable(module):
        return subprocess.run([py, "-c", f"import {module}"], capture_output=True).returncode == 0

    if stage == "tests" and not importable("pytest"):
        with open(log, "w") as f:
            f.write("pytest is not installed for this python: GPU tests not run\n")
        return dict(stage=stage, status="skipped: pytest not installed", rc=None, seconds=0.0, cap=cap)
    xdist = stage == "tests" and not dry and importable("xdist")
    cmd = (["timeout", "-k", "15", str(cap)] + stage_command(stage, out, dry, py, xdist)
           + (["--quick"] if quick and stage in ("kernels", "models") else []))
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(shlex.quote(c) for c in cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, env=_env(dry), stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - t0
    if rc in (124, 137):
        status = f"timed out after {cap} s (partial results kept)"
    elif stage == "tests" and rc == 5:
        status = "ok (no GPU tests collected)"
    else:
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    return dict(stage=stage, status=status, rc=rc, seconds=round(seconds, 1), cap=cap)


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _load(path: str, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def write_summary(out: str, stages: List[dict], dry: bool, total: float) -> str:
    from fusionblocks import bench

    kernels = _load(os.path.join(out, "kernels.json"), [])
    models = _load(os.path.join(out, "models.json"), [])
    det = _load(os.path.join(out, "determinism.json"), [])
    k_skip = _load(os.path.join(out, "kernels_skipped.tmp.json"), [])
    m_skip = _load(os.path.join(out, "models_skipped.tmp.json"), [])
    import torch

    meta = next(iter(kernels or models), None)
    device = meta["device"] if meta else ("CPU (dry run)" if dry else "unknown")
    lines = [f"# GPU check{' (dry run on CPU: tiny shapes, Triton interpreter; no timing is meaningful)' if dry else ''}", ""]
    lines += [f"Command: `benchmarks/gpu_check.sh OUTDIR{' --dry-run' if dry else ''}` · device {device} · "
              f"torch {torch.__version__} · triton {bench.triton_version()} · python {sys.version.split()[0]} · "
              f"total {total:.0f} s", ""]
    if not has_jsonschema():
        lines += ["Records written **without the schema check**: jsonschema is not installed for this python. "
                  "Check them before committing (tests/test_results.py does, for every file under "
                  "benchmarks/results/).", ""]
    lines += ["## Stages", "", "| stage | status | seconds | cap |", "|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['cap']} |" for s in stages]
    lines.append("")
    for s in stages:
        if not s["status"].startswith("ok"):
            lines += [f"`logs/{s['stage']}.log`, last lines:", "", "```", _tail(os.path.join(out, "logs", f"{s['stage']}.log")).rstrip(), "```", ""]
    tests = next((s for s in stages if s["stage"] == "tests"), None)
    if tests:
        last = [ln for ln in _tail(os.path.join(out, "logs", "tests.log"), 3).splitlines() if ln.strip()]
        lines += [f"GPU tests: {last[-1] if last else 'no output'}", ""]
    peak = hbm_peak(device)
    rows = target_rows(kernels, models, "float32" if dry else "bfloat16")
    met = sum(r[-1] == "yes" for r in rows)
    lines += ["## Issue 12's targets", "",
              f"{met} of {len(rows)} met ({sum(r[-1] == '**no**' for r in rows)} missed, "
              f"{sum(r[-1] == 'not measured' for r in rows)} not measured). fwd+bwd, "
              f"{'float32 (dry run: tiny shapes, the Triton interpreter; not a measurement)' if dry else 'bfloat16'}; "
              "the fast path is the faster of triton and cuda where both ran; a ratio is the contender's time over it.",
              "", "| target | case | fast path | measured | needed | met |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    lines += ["## Kernels", "",
              "FLOPs: the forward's two matmuls, `4·B·heads·N·L·D` (L = keys per query: 49 for windows, H·W full, "
              "H+W decomposed); fwd+bwd = 3.5x that, recomputation not counted. Bytes: q, k, v read once + o written "
              "once (fwd), plus q, k, v, o, dO read and dq, dk, dv written (fwd+bwd). HBM share = bytes/time over "
              + (f"the datasheet peak of this device, {peak:.0f} GB/s (assumed, not measured)." if peak else
                 "a datasheet peak; this device is not in `HBM_PEAK_GBPS`, so no share is given."), ""]
    tuning_records = [r for r in kernels if r["impl"].startswith("triton[")]
    kernels = [r for r in kernels if not r["impl"].startswith("triton[")]
    if kernels:
        lines.append(bench.format_markdown(kernels, [(op, f"{impl} ({dt})", why) for op, impl, dt, why in k_skip],
                                           extra_columns=[("TFLOP/s", "tflops"), ("GB/s", "gbps"), ("HBM share", "hbm_share"),
                                                          ("max abs err", "max_abs_err")]))
        lines += ["", bench.format_pivot(kernels, "triton")]
    else:
        lines.append("No kernel records (see the kernels stage).")
    lines += ["", "## Determinism (backward twice, same inputs, compared bit for bit)", ""]
    if det:
        lines += ["| op | impl | shape | dtype | identical | max diff between runs | max grad error vs float64 (largest grad) |",
                  "|---|---|---|---|---|---|---|"]
        for r in det:
            if "error" in r:
                lines.append(f"| {r['op']} | {r['impl']} | {bench.shape_str(r['shape'])} | {r['dtype']} | error: {r['error']} | | |")
                continue
            errs = ", ".join(f"{k} {v:.2g} ({r['grad_scale'][k]:.2g})" for k, v in r["max_abs_err_vs_float64"].items())
            lines.append(f"| {r['op']} | {r['impl']} | {bench.shape_str(r['shape'])} | {r['dtype']} | "
                         f"{'yes' if r['bitwise_identical'] else '**no**'} | {r['max_abs_diff_between_runs']:.3g} | {errs} |")
    else:
        lines.append("Not run (see the kernels stage).")
    lines += ["", "## Tuning variants (fwd+bwd of the triton backend; the default re-timed next to each)", "",
              "Each variant is a value of `fusionblocks.ops.triton._common.tuned` (defaults: `TUNING_DEFAULTS`). "
              f"`default / variant` over {VARIANT_GAIN:.2f}x marks a candidate default: change `TUNING_DEFAULTS` "
              "(or the launcher's rule) where it wins on the shapes that matter, and re-run.", ""]
    rows = variant_rows(tuning_records)
    if rows:
        lines += ["| op | shape | dtype | variant | default ms | variant ms | default / variant | max abs err | |",
                  "|---|---|---|---|---|---|---|---|---|"] + rows
    else:
        lines.append("Not run (see the kernels stage).")
    setting = "batch 2, 32², fp32 on CPU" if dry else "batch 32, 224², bf16 autocast"
    lines += ["", f"## Models (training step, {setting}, AdamW)", ""]
    if models:
        lines.append(bench.format_markdown(models, [tuple(x) for x in m_skip], extra_columns=[("img/s", "img_per_s")]))
    else:
        lines.append("No model records (see the models stage).")
    lines += ["", "## To try next (the benchmark decides)", ""] + [f"- {t}" for t in TO_TRY] + [""]
    path = os.path.join(out, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outdir")
    p.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes, Triton interpreter, no CUDA build")
    p.add_argument("--quick", action="store_true",
                   help="a shorter dry run (the test's): every stage and code path, one model and two of the three ops")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--stage", choices=("kernels", "models"), help=argparse.SUPPRESS)  # a child process's job
    p.add_argument("--python", default=sys.executable, help="the python that runs the stages (default: this one)")
    args = p.parse_args(argv)
    out = os.path.abspath(args.outdir)
    args.dry_run = args.dry_run or args.quick
    if args.stage:
        return (stage_kernels if args.stage == "kernels" else stage_models)(out, args.dry_run, args.quick)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    caps = DRY_CAPS if args.dry_run else CAPS
    t0 = time.perf_counter()
    stages = []
    for stage in STAGES:
        if stage not in args.stages:
            continue
        print(f"[gpu_check] {stage} (cap {caps[stage]} s) ...", flush=True)
        stages.append(run_stage(stage, out, args.dry_run, args.python, caps[stage], args.quick))
        print(f"[gpu_check] {stage}: {stages[-1]['status']} in {stages[-1]['seconds']} s", flush=True)
    path = write_summary(out, stages, args.dry_run, time.perf_counter() - t0)
    for name in os.listdir(out):  # the skip lists, and a half-written file of a stage killed at its cap
        if name.endswith((".tmp", ".tmp.json")):
            os.remove(os.path.join(out, name))
    print(f"[gpu_check] wrote {path}")
    return 0 if all(s["status"].startswith("ok") for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
