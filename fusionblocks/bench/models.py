"""Whole networks: throughput and peak memory of inference and training steps, once per backend choice."""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..ops import dispatch as _dispatch
from .cases import INTERPRETER_REASON
from .memory import peak_mem_mb
from .records import AUTO, device_name, make_record
from .runner import BenchResult, Skipped
from .timing import _sync


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
    """Collect ``(op, backend)`` for every dispatched op call (the backend with its variant, ``cpp[avx2]``)."""
    original = _dispatch._choice

    def choice(op, backend, args, kwargs):
        chosen, c = original(op, backend, args, kwargs)
        seen.add((op, c.label))
        return chosen, c

    _dispatch._choice = choice
    try:
        yield
    finally:
        _dispatch._choice = original


def _first_reason(e: Exception, backend: str) -> str:
    """The dispatcher's headline plus this backend's own line of its candidate list."""
    lines = str(e).splitlines() or [""]
    mine = [ln.strip() for ln in lines[1:] if ln.strip().startswith(f"{backend}:")]
    head = lines[0]
    if head.endswith("Candidates:"):
        head = head[: -len("Candidates:")].rstrip(" .")
    return f"{type(e).__name__}: {head}" + (f" ({mine[0]})" if mine else "")


MODEL_PASSES = ("fwd", "train")


def _model_impls(backends: Optional[Sequence[str]], dev: torch.device, skipped: list, shape: dict) -> list:
    """The backend choices to time: the registered backends that can run on ``dev`` and ``auto`` (default)."""
    if backends:
        todo = list(backends)
    else:
        todo = [b for b in _dispatch.BACKENDS if b != "cuda" or dev.type == "cuda"] + [AUTO]
    unknown = [b for b in todo if b not in (*_dispatch.BACKENDS, AUTO, "compiled")]
    if unknown:
        raise ValueError(f"unknown backend choice(s) {unknown}; expected {list(_dispatch.BACKENDS)}, "
                         f"{AUTO!r} or 'compiled'")
    if dev.type == "cpu" and "triton" in todo:
        todo.remove("triton")
        skipped.append(Skipped("model", shape, "triton", INTERPRETER_REASON))
    return todo


def model_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opt: Optional[torch.optim.Optimizer] = None,
                *, net=None, amp: bool = False):
    """The two passes every model benchmark times: ``(fwd, train)``, each a function of no arguments.

    ``fwd`` is inference (``model.eval()``, ``no_grad``); ``train`` one training step (``model.train()``,
    cross-entropy against ``y``, ``opt.zero_grad``, backward, ``opt.step``; without ``opt``, backward only).
    ``net`` runs in place of ``model`` (e.g. ``torch.compile(model)``; modes are set on ``model``); ``amp``
    runs both under bf16 autocast on ``x``'s device, the loss taken in float32.
    """
    run = model if net is None else net
    dev_type = x.device.type

    def fwd():
        model.eval()
        with torch.no_grad(), torch.autocast(dev_type, dtype=torch.bfloat16, enabled=amp):
            return run(x)

    def train():
        model.train()
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(run(x).float(), y)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if opt is not None:
            opt.step()
        return loss.detach()

    return fwd, train


def run_model(name: str, *, batch_size: int = 32, image_size: int = 224, steps: int = 10, warmup: int = 1,
              backends: Optional[Sequence[str]] = None, device: Optional[str] = None,
              passes: Sequence[str] = ("train",), threads: Optional[Sequence[int]] = None,
              num_classes: int = 7, progress: Optional[bool] = None) -> BenchResult:
    """Throughput and peak memory of a whole network per backend choice, side by side.

    Backend choices: a backend name is forced through ``FUSIONBLOCKS_BACKEND`` (the modules dispatch with
    ``backend=None``); ``auto`` leaves the automatic choice to run (its one-time measurements happen in the
    warm-up steps; the record's ``chosen`` lists the backend each op ran on); ``compiled`` is
    ``torch.compile(model)`` (inductor) with the automatic choice, compiled in the warm-up. One that cannot
    run some call of the network is reported as skipped with the dispatcher's reasons. A network whose
    forward dispatches no op is timed once, as ``eager``.

    Passes: ``fwd`` (inference: ``eval()``, ``no_grad``) and ``train`` (AdamW step, cross-entropy on random
    labels). bf16 autocast on CUDA, fp32 on CPU. The choices are timed in interleaved rounds (one step of
    each per round), so a busy machine slows them alike; the record holds the median step.

    Args:
        threads: CPU intra-op thread counts to run at, each a separate set of records (default: as now).
    """
    from tqdm.auto import tqdm

    from ..models.registry import create_model
    from ..training.recipes import step_options

    for p in passes:
        if p not in MODEL_PASSES:
            raise ValueError(f"unknown model pass {p!r}; expected one of {list(MODEL_PASSES)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = create_model(name, num_classes=num_classes).to(dev)
    in_chans = int(getattr(model, "in_chans", 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **step_options(model.parameters()))
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch_size, in_chans, image_size, image_size, generator=g).to(dev)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(dev)
    amp = dev.type == "cuda"
    dtype = torch.bfloat16 if amp else torch.float32
    dname = device_name(dev)
    shape = {"model": name, "B": batch_size, "image_size": image_size}
    compiled_model = []

    def net(impl):
        if impl != "compiled":
            return model
        if not compiled_model:
            compiled_model.append(torch.compile(model))
        return compiled_model[0]

    def step_fn(impl: str, pass_: str):
        fwd, train = model_steps(model, x, y, opt, net=net(impl), amp=amp)
        return fwd if pass_ == "fwd" else train

    records, skipped = [], []
    todo = _model_impls(backends, dev, skipped, shape)
    thread_counts = list(threads) if threads and dev.type == "cpu" else [None]
    before = torch.get_num_threads()
    bar = tqdm(total=len(thread_counts) * len(passes) * len(todo) * (warmup + steps), desc=f"bench {name}",
               unit="step", disable=(None if progress is None else not progress))
    ran_any_op = True
    try:
        for nt in thread_counts:
            if nt is not None:
                torch.set_num_threads(nt)
            for pass_ in passes:
                ready, seen = [], {}
                for impl in todo:
                    seen[impl] = set()
                    forced = None if impl in (AUTO, "compiled") else impl
                    try:
                        # no spying on the dispatcher inside torch.compile: it would be traced into the graph
                        spy = contextlib.nullcontext() if impl == "compiled" else _record_dispatch(seen[impl])
                        with _forced_backend(forced), spy:
                            for _ in range(max(1, warmup)):
                                step_fn(impl, pass_)()
                                bar.update()
                    except Exception as e:  # noqa: BLE001 - Triton's CompilationError, OutOfResources: no RuntimeError
                        # a backend choice that cannot run (or fails) is reported; the others' records stay
                        skipped.append(Skipped("model", shape, impl, _first_reason(e, forced or impl)))
                        bar.update(steps)
                        continue
                    ready.append(impl)
                ran_any_op = any(seen.values()) or "compiled" in ready
                if not ran_any_op:  # backends do not matter to this network: time it once
                    ready, skipped = ready[:1], []
                times = {impl: [] for impl in ready}
                _sync(dev)
                for step in range(steps):
                    # the choices take turns, the order rotating from step to step
                    for impl in ready[step % len(ready):] + ready[:step % len(ready)]:
                        with _forced_backend(None if impl in (AUTO, "compiled") else impl):
                            run = step_fn(impl, pass_)
                            t0 = time.perf_counter()
                            run()
                            _sync(dev)
                            times[impl].append(time.perf_counter() - t0)
                        bar.update()
                for impl in ready:
                    ms = 1e3 * statistics.median(times[impl])
                    with _forced_backend(None if impl in (AUTO, "compiled") else impl):
                        opt.zero_grad(set_to_none=True)
                        state = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
                        mem = peak_mem_mb(step_fn(impl, pass_), dev,
                                          list(model.parameters()) + list(model.buffers()) + state + [x, y])
                    extra = {}
                    if impl == AUTO and seen[impl]:
                        extra["chosen"] = ", ".join(f"{op}: {b}" for op, b in sorted(seen[impl]))
                    records.append(make_record("model", impl if ran_any_op else "eager", shape, dtype, pass_, ms,
                                               mem, dname, img_per_s=batch_size / (ms / 1e3), **extra))
    finally:
        torch.set_num_threads(before)
        bar.close()
    return BenchResult(records, skipped)
