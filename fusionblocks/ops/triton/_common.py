"""Helpers shared by the Triton backends: interpreter-aware kernels and the common support checks.

Triton builds ``triton.language``'s own jitted helpers (``tl.zeros``, ``tl.max``, ``tl.sum``, ...) when it
is imported, for the GPU or, with ``TRITON_INTERPRET=1`` set at that moment, for its CPU interpreter;
kernels of the other kind cannot call them. :func:`triton_built_interpreted` says which kind this
process has, :class:`LazyKernel` builds a kernel of that same kind on first launch (whatever the
import order of the modules), and :func:`device_reasons` reports any mismatch as a reason the
backend cannot run, before a launch fails.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

__all__ = ["LazyKernel", "lazy_jit", "interpreting", "triton_built_interpreted", "next_pow2", "device_reasons", "acc_dtype_of"]


def interpreting() -> bool:
    """Whether Triton currently runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).

    Reads the environment as Triton's knob does (setting the knob also sets the variable), in plain
    Python so that ``torch.compile`` can trace the backend checks.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


_BUILT_INTERPRETED = isinstance(tl.standard.max, InterpretedFunction)


def triton_built_interpreted() -> bool:
    """Whether triton was imported with ``TRITON_INTERPRET=1``: its jitted helpers then run only in the interpreter."""
    return _BUILT_INTERPRETED


class LazyKernel:
    """A Triton kernel built on first launch, of the kind triton's own helpers were built as.

    Compiled (``JITFunction``) normally; interpreted (``InterpretedFunction``) when triton was
    imported with ``TRITON_INTERPRET=1``. Use like a jitted kernel: ``kernel[grid](*args, **meta)``;
    :meth:`kernel` returns the underlying one.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self._built: Dict[bool, object] = {}
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def kernel(self):
        mode = triton_built_interpreted()
        k = self._built.get(mode)
        if k is None:
            k = InterpretedFunction(self.fn) if mode else JITFunction(self.fn)
            self._built[mode] = k
        return k

    def __getitem__(self, grid):
        return self.kernel()[grid]


def lazy_jit(fn: Callable) -> LazyKernel:
    """Decorator form of :class:`LazyKernel`."""
    return LazyKernel(fn)


def next_pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two ``>= max(n, minimum)``."""
    return max(minimum, triton.next_power_of_2(int(n)))


def acc_dtype_of(dtype: torch.dtype):
    """Triton accumulator dtype for inputs of ``dtype``: float64 for float64, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERP_DTYPES = (torch.float16, torch.float32, torch.float64)


def device_reasons(t: torch.Tensor, *, auto: bool, what: str = "this backend") -> List[str]:
    """Reasons a Triton kernel cannot run on ``t``'s device and dtype (empty: it can).

    CUDA tensors run compiled kernels in float16/bfloat16/float32. CPU tensors run only under the
    Triton interpreter, which must be enabled (``TRITON_INTERPRET=1``) and is never chosen
    automatically; it has no bfloat16 ``tl.dot`` but does float64.
    """
    reasons: List[str] = []
    dev = t.device.type
    if dev == "cuda":
        if interpreting():
            reasons.append("TRITON_INTERPRET=1 is set, which runs kernels on CPU tensors only")
        elif triton_built_interpreted():
            reasons.append("triton was imported with TRITON_INTERPRET=1, so this process cannot compile GPU kernels")
        elif t.dtype not in _GPU_DTYPES:
            reasons.append(f"{what} supports float16, bfloat16 and float32 on CUDA, got {t.dtype}")
        return reasons
    if dev == "cpu":
        if not interpreting():
            reasons.append("CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)")
        elif not triton_built_interpreted():
            reasons.append("triton was imported before TRITON_INTERPRET=1 was set; set it before the first import of triton")
        if auto:
            reasons.append("the Triton interpreter is never chosen automatically (name backend='triton' to use it)")
        if t.dtype == torch.bfloat16:
            reasons.append("the Triton interpreter has no bfloat16 tl.dot")
        elif t.dtype not in _INTERP_DTYPES:
            reasons.append(f"{what} under the interpreter supports float16, float32 and float64, got {t.dtype}")
        return reasons
    reasons.append(f"Triton kernels run on CUDA (or CPU under the interpreter), got device {t.device}")
    return reasons

