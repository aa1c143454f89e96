"""Peak memory of one call: CUDA allocator statistics, or ``torch.profiler`` allocation events on CPU."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterable, Optional, Union

import torch

from .timing import _sync


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
