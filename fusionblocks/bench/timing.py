"""How long one call takes: ``triton.testing.do_bench`` (or CUDA events) on GPU, ``time.perf_counter`` per call on CPU.

``torch.utils.benchmark.Timer.blocked_autorange`` was considered for CPU and not used: it times blocks of
back-to-back calls, so the input gradients of a ``fwd+bwd`` pass cannot be reset between calls outside the
timed region, and its block means hide the per-call spread that the median here is robust to on a shared
machine. Thread counts are set by the caller (``torch.set_num_threads``; records carry ``threads``), as
``Timer(num_threads=...)`` would.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Mapping, Sequence, Union

import torch


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


def _without_frames(e: BaseException) -> BaseException:
    """``e`` with its traceback dropped, for keeping as a result: the traceback's frames hold the failed call's
    locals (after an out-of-memory error, the part of the work it did allocate), which would stay alive while
    the other contenders are timed."""
    seen, todo = set(), [e]
    while todo:  # the chained exceptions' tracebacks too; their messages stay
        x = todo.pop()
        if x is not None and id(x) not in seen:
            seen.add(id(x))
            x.__traceback__ = None
            todo += [x.__cause__, x.__context__]
    return e


def time_interleaved_ms(fns: Mapping[str, Callable[[], object]], *, grads: Sequence[torch.Tensor] = (),
                        budget_s: float = 1.0, rounds: int = 7) -> Dict[str, object]:
    """CPU: the contenders of one case timed side by side, taking turns.

    Every round times a block of calls of each function in turn (the order rotating from round to round),
    so that load from other processes falls on all of them alike; a function's time is the median over
    the rounds of its block's mean ms per call. Blocks are sized after one warm-up and one timed call so
    that each function gets about ``budget_s`` seconds over all rounds. ``grads`` are reset to ``None``
    before each call. A function that raises is dropped from the rounds and reported by its exception:
    the result maps each name to its ms (float) or to the exception it raised.
    """
    def reset():
        for t in grads:
            t.grad = None

    out: Dict[str, object] = {}
    reps: Dict[str, int] = {}
    for name, fn in fns.items():
        try:
            reset()
            fn()  # warm-up
            reset()
            t0 = time.perf_counter()
            fn()
            first = time.perf_counter() - t0
        except Exception as e:  # recorded by the caller, the others still run
            out[name] = _without_frames(e)
            continue
        reps[name] = max(1, int(budget_s / rounds / max(first, 1e-6)))
    names = list(reps)
    samples: Dict[str, list] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for name in order:
            if name in out:
                continue
            fn = fns[name]
            total = 0.0
            try:
                for _ in range(reps[name]):
                    reset()
                    t0 = time.perf_counter()
                    fn()
                    total += time.perf_counter() - t0
            except Exception as e:
                out[name] = _without_frames(e)
                continue
            samples[name].append(1e3 * total / reps[name])
    for name in names:
        if name not in out:
            out[name] = statistics.median(samples[name])
    reset()
    return out
