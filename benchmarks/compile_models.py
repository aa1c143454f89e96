"""``torch.compile(model)`` for every registered model: does it compile and compute what eager does, how long
does compiling take, and how fast is the compiled model next to eager (issue 11, item 5).

For each model (its registered depth, stochastic depth and dropout off so that eager and compiled compute the
same function), one process, one input batch:

1. **Inference** (``eval()``, ``no_grad``): eager, then the compiled model's first call (its compile time);
   outputs compared.
2. **Training step**: the compiled model's first forward + cross-entropy + backward (its compile time), then
   the same step eager from the same parameters; loss and every parameter's gradient compared.
3. **Speed**, steady state: after a warm-up and a sizing call of each, eager and compiled in interleaved rounds
   (``fusionblocks.bench.time_interleaved_ms``: one call of each per round, the order rotating, so load on the
   machine hits both alike), median per call: inference, and a
   training step (forward, loss, backward, AdamW step, as ``fusionblocks bench --model`` times it).

The eager side is the library's default (``backend=None``: the automatic kernel choice), or the backend forced
with ``FUSIONBLOCKS_BACKEND`` (``reference``: the plain-PyTorch ops, which inductor compiles with the model);
the compiled side is ``torch.compile(model)`` with the same kernels (chosen outside the traced graph). Inductor compiles with
``compile_threads=1`` (no worker pool) in a fresh cache directory, so the compile time is a cold one.

Writes the records (``fusionblocks.bench`` format: ``op`` ``model``, ``impl`` ``auto`` for eager and
``compiled``, ``pass`` ``fwd``/``train``; compile time in ``compile_s``, parity in ``max_abs_err`` and
``grad_rel_err``) to ``--out`` with ``.json`` and the table with ``.md``. ``--append`` merges the records of
an earlier run (another torch version, another model) into the same files. Exits 1 when a model fails to
compile or does not match eager.

    python benchmarks/compile_models.py --threads 1 --batch 2 --out 'benchmarks/results/compile-models-{device}-1thread'
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # read when inductor is imported: a cold compile every run
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fusionblocks-compile-models-")

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the checkout's fusionblocks, built in place

from fusionblocks import bench  # noqa: E402
from fusionblocks.bench.models import model_steps  # noqa: E402
from fusionblocks.models import create_model, list_models  # noqa: E402
from fusionblocks.training.recipes import step_options  # noqa: E402

#: parity (float32): outputs and loss within ``OUT_RTOL·max|eager| + OUT_ATOL``. Gradients, anchored on a float64
#: eager step (the form of flash-attn's rule and of the accuracy check of PyTorch's compiler benchmarks: the
#: compiled error against float64 at most a multiple of eager's, plus a small tolerance): each compiled
#: gradient's max distance from float64 at most ``GRAD_FACTOR`` times eager float32's, plus ``GRAD_SLACK·size``
#: (size: the gradient's max, at least ``GRAD_FLOOR`` times the model's largest gradient). The slack covers a
#: reduction summed in another order: a bias gradient summed over the 6272 tokens of a 56² stage (batch 2)
#: lands a few 1e-5 of its size from float64 with inductor's order and under 1e-5 with eager's.
OUT_RTOL, OUT_ATOL = 1e-4, 1e-5
GRAD_FACTOR, GRAD_SLACK, GRAD_FLOOR = 2.0, 1e-4, 1e-2

#: constructor options that make each model deterministic in training mode (no stochastic depth)
DETERMINISTIC = {"hemf": {"drop_path_rate": 0.0}, "hifuse": {"drop_path_rate": 0.0, "conv_drop_path_rate": 0.0}}


def build(name: str, num_classes: int = 3) -> nn.Module:
    """The registered model ``name`` at its registered depth, with nothing random in its training forward."""
    family = next((f for f in DETERMINISTIC if name.startswith(f)), None)
    model = create_model(name, num_classes=num_classes, **DETERMINISTIC.get(family, {}))
    random_layers = [n or type(model).__name__ for n, m in model.named_modules()
                     if (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)
                     or any("drop" in k and isinstance(v, float) and v > 0 for k, v in vars(m).items())]
    if random_layers:
        raise ValueError(f"compile_models: {name} has stochastic layers in training mode ({random_layers[:3]}...); "
                         f"eager and compiled steps would not compute the same function")
    return model


def native_size(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def _worst(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float):
    """``max|got - want|`` and whether it is within ``rtol·max|want| + atol``."""
    err = (got.detach().double() - want.detach().double()).abs().max().item()
    return err, err <= rtol * want.detach().abs().max().item() + atol


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def check_model(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, backend: str = "inductor",
                rounds: int = 5) -> Dict[str, object]:
    """Compile ``model``, compare it with eager (inference and a training step), then time both.

    Returns a dict: ``ok``, ``error`` (first failures or ``None``), ``compile_fwd_s``, ``compile_train_s``,
    ``out_err``, ``loss_err``, ``grad_rel_err`` (worst gradient's compiled-vs-eager difference relative to its
    size, see :data:`GRAD_FLOOR`), ``worst_grad`` (its name), ``grad_err_ratio`` (worst gradient's distance from
    float64 over what the rule allows, see :data:`GRAD_FACTOR`; at most 1 passes), ``ms`` ``{("fwd"|"train", "eager"|"compiled"): median ms}``.
    """
    res: Dict[str, object] = {"ok": False, "error": None, "ms": {}}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    params = [p for p in model.parameters() if p.requires_grad]

    def fwd(m):
        return model_steps(model, x, y, net=m)[0]

    def grads_step(m):
        model.zero_grad(set_to_none=True)
        loss = model_steps(model, x, y, net=m)[1]()  # no optimizer: backward only
        return loss, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    try:
        # inference (eager first: the automatic kernel choice measures on its first call, outside any trace)
        want = fwd(model)()
        t0 = time.perf_counter()
        got = fwd(compiled)()
        res["compile_fwd_s"] = time.perf_counter() - t0
        res["out_err"], ok_out = _worst(got, want, OUT_RTOL, OUT_ATOL)
        # training step, eager first (as for inference: the trace then uses the measured kernel choice, so both
        # sides run the same kernels). A training forward normalizes with the batch's statistics, so the
        # running-stat updates of the first step do not change the second's function.
        loss_e, grads_e = grads_step(model)
        t0 = time.perf_counter()
        loss_c, grads_c = grads_step(compiled)
        res["compile_train_s"] = time.perf_counter() - t0
        res["loss_err"], ok_loss = _worst(loss_c, loss_e, OUT_RTOL, OUT_ATOL)
        failures = []
        if not ok_out:
            failures.append(f"output differs from eager by {res['out_err']:.3g}")
        if not ok_loss:
            failures.append(f"loss differs from eager by {res['loss_err']:.3g}")
        if grads_c.keys() != grads_e.keys():
            failures.append(f"gradients for different parameters: compiled only {sorted(grads_c.keys() - grads_e.keys())}, "
                            f"eager only {sorted(grads_e.keys() - grads_c.keys())}")
        # what float32 rounding alone does to these gradients: eager's own distance from a float64 step
        m64 = copy.deepcopy(model).double()
        m64.train()
        F.cross_entropy(m64(x.double()), y).backward()
        grads_64 = {n: p.grad.detach() for n, p in m64.named_parameters() if p.grad is not None}
        del m64
        # a gradient that all but vanishes (a conv bias before a BatchNorm: zero up to rounding) is measured at
        # the scale of the largest gradient of the model, not at its own
        scale = max((g.abs().max().item() for g in grads_64.values()), default=0.0)
        worst = ratio = 0.0
        worst_name = None
        for n in sorted(grads_e.keys() & grads_c.keys() & grads_64.keys()):
            ref = grads_64[n]
            size = max(ref.abs().max().item(), GRAD_FLOOR * scale, 1e-30)
            err = (grads_c[n].double() - grads_e[n].double()).abs().max().item()
            err_c = (grads_c[n].double() - ref).abs().max().item()
            err_e = (grads_e[n].double() - ref).abs().max().item()
            r = err_c / (GRAD_FACTOR * err_e + GRAD_SLACK * size)
            if err / size >= worst:
                worst, worst_name = err / size, n
            ratio = max(ratio, r)
            if r > 1:
                failures.append(f"gradient of {n} (size {size:.3g}) is {err_c:.3g} from float64, eager float32 "
                                f"{err_e:.3g}")
        res["grad_err_ratio"] = ratio
        res["grad_rel_err"], res["worst_grad"] = worst, worst_name
        if len(grads_e) != len(params):
            failures.append(f"{len(params) - len(grads_e)} trainable parameters got no gradient")
        grad_only = bool(failures) and all(f.startswith("gradient of ") for f in failures)
        if failures:
            res["error"] = "; ".join(failures[:3]) + (f" (+{len(failures) - 3} more)" if len(failures) > 3 else "")
            if not grad_only:  # a different output, loss or set of gradients: nothing worth timing
                return res
        # gradients beyond the rule but the same outputs and loss: still timed, reported as failing the rule

        # steady-state speed, interleaved rounds
        opt = torch.optim.AdamW(params, lr=1e-4, **step_options(params))

        def train(m):
            return model_steps(model, x, y, opt, net=m)[1]

        for pass_, make in (("fwd", fwd), ("train", train)):
            calls = {"eager": make(model), "compiled": make(compiled)}
            # one call per round (budget 0), the order rotating from round to round; median over the rounds
            for impl, ms in bench.time_interleaved_ms(calls, budget_s=0.0, rounds=rounds).items():
                if isinstance(ms, Exception):
                    raise ms
                res["ms"][(pass_, impl)] = ms  # type: ignore[index]
        res["ok"] = not failures
    except Exception as e:  # a crash in dynamo/inductor is the finding: record it, go on with the next model
        res["error"] = bench.error_text(e)
    return res


def records_of(name: str, res: Dict[str, object], *, batch: int, image_size: int, depth: str) -> List[dict]:
    """The result of :func:`check_model` as ``fusionblocks.bench`` records (one per pass and implementation)."""
    shape = {"model": name, "B": batch, "image_size": image_size, "depth": depth, "kernels": kernels()}
    dev = bench.device_name("cpu")
    out = []
    for pass_ in ("fwd", "train"):
        for impl in ("auto", "compiled"):
            ms = res["ms"].get((pass_, "eager" if impl == "auto" else impl))  # type: ignore[union-attr]
            extra: Dict[str, object] = {}
            if impl == "compiled":
                if res.get(f"compile_{pass_}_s") is not None:
                    extra["compile_s"] = round(float(res[f"compile_{pass_}_s"]), 2)  # type: ignore[arg-type]
                err = res.get("out_err" if pass_ == "fwd" else "loss_err")
                if err is not None:
                    extra["max_abs_err"] = float(err)  # type: ignore[arg-type]
                for key in ("grad_rel_err", "grad_err_ratio"):
                    if pass_ == "train" and res.get(key) is not None:
                        extra[key] = float(res[key])  # type: ignore[arg-type]
            if ms is None:
                error = res["error"] if impl == "compiled" else "not timed: the compiled model failed"
                out.append(bench.make_record("model", impl, shape, torch.float32, pass_, None, None, dev,
                                             error=str(error or "not timed"), **extra))
            else:
                out.append(bench.make_record("model", impl, shape, torch.float32, pass_, ms, None, dev,
                                             img_per_s=batch / (ms / 1e3), **extra))
    return out


def kernels() -> str:
    """The kernel choice both sides run: the backend forced with ``FUSIONBLOCKS_BACKEND``, else ``auto``."""
    from fusionblocks.ops.dispatch import ENV_VAR

    return os.environ.get(ENV_VAR) or "auto"


def _fmt(v: Optional[float], spec: str) -> str:
    return "–" if v is None else format(v, spec)


def format_markdown(records: List[dict], note: str = "") -> str:
    """One row per (model, torch): status, compile times, eager vs compiled ms and the speed-up, parity."""
    rows: Dict[tuple, Dict[tuple, dict]] = {}
    for r in records:
        key = (r["shape"]["model"], r["torch"], r["shape"]["depth"], r["shape"].get("kernels", "auto"), r["shape"]["B"],
               r["shape"]["image_size"])
        rows.setdefault(key, {})[(r["pass"], r["impl"])] = r
    devices = sorted({r["device"] for r in records})
    threads = sorted({r.get("threads") for r in records if r.get("threads")})
    out = [
        "# torch.compile(model) (inductor) vs eager, every registered model",
        "",
        f"Device: {', '.join(devices)} · threads: {', '.join(map(str, threads))} · float32 · "
        f"produced by `python benchmarks/compile_models.py` (one process per torch version).",
        "",
    ]
    if note:
        out += [note, ""]
    out += [
        "Eager runs the kernels named in the kernels column (`auto`: the library's default, the automatic "
        "choice; otherwise forced with `FUSIONBLOCKS_BACKEND`); compiled is `torch.compile(model)` with the "
        "same kernels, inductor, `compile_threads=1`, cold cache. Compile s = the compiled model's first call "
        "(inference; training step forward + backward). ms = median per call over interleaved rounds after "
        "warm-up; a training step is forward, cross-entropy, backward and AdamW. Parity: output (inference) and "
        f"loss within {OUT_RTOL:g}·max + {OUT_ATOL:g}. Gradients are anchored on a float64 eager step: every "
        f"compiled gradient is at most {GRAD_FACTOR:g}× as far from float64 as eager float32's (+ {GRAD_SLACK:g} of "
        f"its size; size = its max, at least {GRAD_FLOOR:g}× the model's largest gradient); grad err ratio = the "
        "worst gradient's distance over that allowance (≤ 1 passes); grad rel err = the worst compiled-vs-eager "
        "difference over the gradient's size.",
        "",
        "| model | depth | kernels | B | image | torch | status | compile s fwd / train | fwd ms eager | fwd ms compiled "
        "| fwd speed-up | train ms eager | train ms compiled | train speed-up | out err | loss err | grad rel err "
        "| grad err ratio |",
        "|" + "---|" * 18,
    ]
    for (model, tv, depth, kern, b, size), cell in sorted(rows.items()):
        c_fwd, c_train = cell.get(("fwd", "compiled"), {}), cell.get(("train", "compiled"), {})
        e_fwd, e_train = cell.get(("fwd", "auto"), {}), cell.get(("train", "auto"), {})
        if not (c_fwd.get("ms") and c_train.get("ms")):
            status = "FAIL: " + (c_fwd.get("error") or c_train.get("error") or "?").replace("|", "\\|")
        elif c_train.get("grad_err_ratio", 0.0) > 1:
            status = "FAIL (gradients beyond the rule, outputs and loss match; timed)"
        else:
            status = "pass"

        def speed(e, c):
            return f"{e['ms'] / c['ms']:.2f}×" if e.get("ms") and c.get("ms") else "–"

        out.append("| " + " | ".join([
            model, depth, kern, str(b), f"{size}²", tv, status,
            f"{_fmt(c_fwd.get('compile_s'), '.0f')} / {_fmt(c_train.get('compile_s'), '.0f')}",
            _fmt(e_fwd.get("ms"), ".1f"), _fmt(c_fwd.get("ms"), ".1f"), speed(e_fwd, c_fwd),
            _fmt(e_train.get("ms"), ".1f"), _fmt(c_train.get("ms"), ".1f"), speed(e_train, c_train),
            _fmt(c_fwd.get("max_abs_err"), ".1e"), _fmt(c_train.get("max_abs_err"), ".1e"),
            _fmt(c_train.get("grad_rel_err"), ".1e"), _fmt(c_train.get("grad_err_ratio"), ".2f"),
        ]) + " |")
    return "\n".join(out) + "\n"


def depth_of(model: nn.Module) -> str:
    """The model's blocks per stage, as its constructor took them."""
    for attrs in (("local_depths", "global_depths"), ("conv_depths", "depths")):
        if all(hasattr(model, a) for a in attrs):
            return " + ".join("-".join(map(str, getattr(model, a))) for a in attrs)
    if hasattr(model, "blocks"):
        return f"ViT {len(model.blocks)}"
    return "registered"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, metavar="NAME",
                   help=f"registered models (default: all of {', '.join(list_models())})")
    p.add_argument("--image-size", type=int, default=None, help="input side (default: each model's native size)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (torch.set_num_threads)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per pass (each: one eager and one compiled call)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager for a quick smoke run)")
    p.add_argument("--out", default=None,
                   help="output path without extension ({device} is filled in); writes .json and .md "
                        "(default: print the table only)")
    p.add_argument("--append", action="store_true",
                   help="merge into the records already in OUT.json (a record of the same model, depth, kernels, "
                        "batch, image size and torch version is replaced)")
    p.add_argument("--note", action="append", default=[],
                   help="a paragraph for the Markdown (e.g. what else the machine was doing); repeatable")
    p.add_argument("--render", action="store_true",
                   help="run nothing: rewrite OUT.md from the records in OUT.json (with the --note paragraphs)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    known = list_models()
    unknown = [m for m in args.models or () if m not in known]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(known)}")
    for flag in ("image_size", "batch", "threads", "rounds"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            p.error(f"--{flag.replace('_', '-')} must be a positive integer, got {v}")
    for flag in ("append", "render"):
        if getattr(args, flag) and not args.out:
            p.error(f"--{flag} needs --out")
    args.models = args.models or known
    return args


def _merge(old: List[dict], new: List[dict]) -> List[dict]:
    def key(r):
        s = r["shape"]
        return (s["model"], s.get("depth"), s.get("kernels", "auto"), s["B"], s["image_size"], r["torch"])

    fresh = {key(r) for r in new}
    return [r for r in old if key(r) not in fresh] + new


def _out_path(out: str) -> str:
    path = out.replace("{device}", bench.device_slug(torch.device("cpu")))
    return path[:-5] if path.endswith(".json") else path[:-3] if path.endswith(".md") else path


def main(argv: Optional[Sequence[str]] = None, build_model: Callable[[str], nn.Module] = build) -> int:
    args = parse_args(argv)
    note = "\n\n".join(args.note)
    if args.render:
        path = _out_path(args.out)
        with open(path + ".json") as f:
            records = json.load(f)
        bench.validate_records(records)
        with open(path + ".md", "w") as f:
            f.write(format_markdown(records, note))
        print(f"wrote {path}.md from {len(records)} records", file=sys.stderr)
        return 0
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1
    torch.set_num_threads(args.threads)
    records: List[dict] = []
    failed = []
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(name)
        size = args.image_size or native_size(model)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, int(getattr(model, "in_chans", 3)), size, size, generator=g)
        y = torch.randint(0, 3, (args.batch,), generator=g)
        print(f"{name}: compiling ({args.backend}, torch {torch.__version__}, {size}², batch {args.batch}) ...",
              file=sys.stderr, flush=True)
        res = check_model(name, model, x, y, backend=args.backend, rounds=args.rounds)
        if not res["ok"]:
            failed.append(name)
        print(f"{name}: {'pass' if res['ok'] else 'FAIL: ' + str(res['error'])}; compile "
              f"{_fmt(res.get('compile_fwd_s'), '.0f')} s / {_fmt(res.get('compile_train_s'), '.0f')} s; "
              + ", ".join(f"{p} {i} {ms:.1f} ms" for (p, i), ms in res["ms"].items()),  # type: ignore[union-attr]
              file=sys.stderr, flush=True)
        records += records_of(name, res, batch=args.batch, image_size=size, depth=depth_of(model))
    if args.out:
        path = _out_path(args.out)
        if args.append and os.path.exists(path + ".json"):
            with open(path + ".json") as f:
                records = _merge(json.load(f), records)
        bench.write_json(records, path + ".json")
        with open(path + ".md", "w") as f:
            f.write(format_markdown(records, note))
        print(f"wrote {path}.json and {path}.md", file=sys.stderr)
    else:
        bench.validate_records(records)
    print(format_markdown(records, note))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
