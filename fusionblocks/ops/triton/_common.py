"""Helpers shared by the Triton backends: interpreter-aware kernels and the common support checks.

Triton builds ``triton.language``'s own jitted helpers (``tl.zeros``, ``tl.max``, ``tl.sum``, ...) when it
is imported, for the GPU or, with ``TRITON_INTERPRET=1`` set at that moment, for its CPU interpreter;
kernels of the other kind cannot call them. :func:`triton_built_interpreted` says which kind this
process has; :class:`LazyKernel` builds a kernel of that same kind on first launch, so a kernel
module may be imported before or after triton; and :func:`device_reasons` reports the cases no
kernel can serve (the interpreter requested after triton was imported without it, or the other way
round) as reasons the backend cannot run, before a launch fails.

:func:`cross_compile` compiles one kernel configuration for a GPU architecture without a GPU
(Triton's bundled ``ptxas``) and reads its registers, spills and shared memory; the backends' own
``compile_specs()`` list the configurations their launchers can choose.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Dict, Iterator, List, Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from .._gpu import SHARED_BYTES_BY_CAPABILITY, max_shared_bytes, shared_bytes_of_capability  # noqa: F401 (re-exported)

__all__ = ["LazyKernel", "lazy_jit", "memoized", "interpreting", "triton_built_interpreted", "next_pow2", "device_reasons", "acc_dtype_of",
           "TUNING_DEFAULTS", "tuning", "tuned"]


def memoized(fn: Callable) -> Callable:
    """``fn``, a pure function of hashable arguments that the support checks and launchers ask on every call,
    computed once per set of arguments. Each caller gets a shallow copy of the answer (a dict of launch options,
    a list of reasons; or ``None``), so a caller that changes it changes no later answer."""
    cached = functools.lru_cache(maxsize=1024)(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        answer = cached(*args, **kwargs)
        return None if answer is None else answer.copy()

    return call


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
    :meth:`kernel` returns the underlying one. The kind follows how *triton* was imported, not the
    current value of ``TRITON_INTERPRET``: setting the variable after triton's import cannot make
    the interpreter usable (nor unsetting it make a GPU compile possible) in that process, which
    :func:`device_reasons` reports instead of launching.
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
    """Decorator form of :class:`LazyKernel`: the kernel works whether its module is imported before or after triton.

    A plain ``@triton.jit`` kernel is built when its module is imported and, if that kind differs
    from triton's own helpers', fails at launch with "Cannot call @triton.jit'd outside of the scope
    of a kernel"; a lazy one is built on first launch to match them.
    """
    return LazyKernel(fn)


TUNING_DEFAULTS: Dict[str, int] = {
    # decay backward: lines of up to this many tokens (padded) take the fused single-tile kernel (0: never)
    "decay_fused_backward_max_tokens": 64,
    # window backward: programs per streaming multiprocessor (sets the windows each program walks)
    "window_backward_programs_per_sm": 4,
    # window backward: warps per program (0: the launcher's choice, window._num_warps)
    "window_backward_num_warps": 0,
}
"""The launchers' tuning values that only a GPU benchmark can settle (issue 12's performance items).

The defaults are what every launch uses; :func:`tuned` overrides them for a block of code so that
``benchmarks/gpu_check.py`` can time the alternatives side by side in one process. They change
speed, never results beyond rounding: every value runs the same arithmetic (the fused and split
decay backward are both tested against the reference)."""

_tuning: Dict[str, int] = dict(TUNING_DEFAULTS)


def tuning(name: str) -> int:
    """The current value of tuning knob ``name`` (see :data:`TUNING_DEFAULTS`)."""
    return _tuning[name]


@contextlib.contextmanager
def tuned(**values: int) -> Iterator[None]:
    """Run the Triton launchers inside the block with other tuning values, e.g.
    ``with tuned(decay_fused_backward_max_tokens=0):`` (the split decay backward everywhere).

    For benchmarks: the values hold for every launch in the block, backward passes included, so the
    block must contain the backward too. Unknown names and values that are not non-negative integers
    raise ``ValueError`` before anything changes.
    """
    unknown = sorted(set(values) - set(TUNING_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown Triton tuning value(s) {', '.join(unknown)}; known: {', '.join(TUNING_DEFAULTS)}")
    bad = {k: v for k, v in values.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
    if bad:
        raise ValueError(f"Triton tuning values must be non-negative integers, got {bad}")
    if values.get("window_backward_programs_per_sm") == 0:
        raise ValueError("window_backward_programs_per_sm must be at least 1")
    if values.get("window_backward_num_warps", 0) not in (0, 1, 2, 4, 8, 16):
        raise ValueError(f"window_backward_num_warps must be 0 (the launcher's choice) or a power of two up to 16, "
                         f"got {values['window_backward_num_warps']}")
    saved = dict(_tuning)
    _tuning.update(values)
    try:
        yield
    finally:
        _tuning.clear()
        _tuning.update(saved)


def next_pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two ``>= max(n, minimum)``."""
    return max(minimum, triton.next_power_of_2(int(n)))


def acc_dtype_of(dtype: torch.dtype):
    """Triton accumulator dtype for inputs of ``dtype``: float64 for float64, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERP_DTYPES = (torch.float16, torch.float32, torch.float64)


def _release(version: str) -> tuple:
    """``"3.6.0"`` -> ``(3, 6)`` (major, minor; anything unparsable counts as new)."""
    try:
        return tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return (99, 0)


def interpreter_defect(triton_version: Optional[str] = None, numpy_version: Optional[str] = None) -> Optional[str]:
    """Why this Triton's interpreter cannot run the kernels with this NumPy, or ``None``.

    Triton before 3.7 turns a runtime integer used as a loop bound (``range(0, N, BLOCK)``) into a
    Python int with ``int()`` of a one-element array, which NumPy 2.4 refuses ("only 0-dimensional
    arrays can be converted to Python scalars"; triton-lang/triton#9171, fixed in Triton 3.7.0).
    Compiled GPU kernels are not affected.
    """
    import numpy

    tv = triton_version or triton.__version__
    nv = numpy_version or numpy.__version__
    if _release(tv) < (3, 7) and _release(nv) >= (2, 4):
        return (f"the interpreter of Triton {tv} cannot run these kernels with NumPy {nv} (triton-lang/triton#9171, "
                "fixed in Triton 3.7): install numpy<2.4 or triton>=3.7")
    return None


_INTERPRETER_DEFECT = interpreter_defect()  # once: device_reasons stays plain Python for torch.compile's tracing


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
        if _INTERPRETER_DEFECT is not None:
            reasons.append(_INTERPRETER_DEFECT)
        if auto:
            reasons.append("the Triton interpreter is never chosen automatically (name backend='triton' to use it)")
        if t.dtype == torch.bfloat16:
            reasons.append("the Triton interpreter has no bfloat16 tl.dot")
        elif t.dtype not in _INTERP_DTYPES:
            reasons.append(f"{what} under the interpreter supports float16, float32 and float64, got {t.dtype}")
        return reasons
    reasons.append(f"Triton kernels run on CUDA (or CPU under the interpreter), got device {t.device}")
    return reasons



# --------------------------------------------------------------------------------------------------
# ahead-of-time compilation (no GPU needed)
# --------------------------------------------------------------------------------------------------

_TL_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}

SM90_MAX_SHARED = SHARED_BYTES_BY_CAPABILITY[(9, 0)]
"""Shared memory one block may use on sm_90 (H100/H200), in bytes."""


def compile_spec(
    module: str, kernel: str, label: str, io_dtype: torch.dtype, signature: Dict[str, str],
    constexprs: Dict[str, object], num_warps: int, num_stages: int, group: str,
) -> Dict[str, object]:
    """One kernel configuration to cross-compile, as plain (picklable) data.

    Args:
        module, kernel: where the kernel lives (``fusionblocks.ops.triton.window``, ``_window_fwd_kernel``).
        label: the calls that launch this configuration, for reports.
        io_dtype: dtype of the kernel's input/output tensors.
        signature: Triton type of every runtime argument (``"*bf16"``, ``"i32"``, ``"fp32"``).
        constexprs: value of every ``tl.constexpr`` argument (``tl.dtype`` values as their name).
        num_warps, num_stages: launch options.
        group: rows of a report that belong together (kernel and dtype).
    """
    consts = {k: (f"tl.{_TL_NAMES[v.name]}" if isinstance(v, tl.dtype) else v) for k, v in constexprs.items()}
    return dict(module=module, kernel=kernel, label=label, dtype=str(io_dtype).replace("torch.", ""), signature=dict(signature),
                constexprs=consts, num_warps=int(num_warps), num_stages=int(num_stages), group=group)


def spec_key(spec: Dict[str, object]) -> tuple:
    """What makes two specs the same compile."""
    return (spec["module"], spec["kernel"], tuple(sorted(spec["signature"].items())),
            tuple(sorted((k, repr(v)) for k, v in spec["constexprs"].items())), spec["num_warps"], spec["num_stages"])


_TL_TYPES = {"*fp16": torch.float16, "*bf16": torch.bfloat16, "*fp32": torch.float32, "*fp64": torch.float64}


def triton_ptr_type(dtype: torch.dtype) -> str:
    """Triton signature type of a pointer to ``dtype`` elements."""
    for k, v in _TL_TYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"no Triton pointer type for {dtype}")


def _resource_usage(cubin: bytes) -> Dict[str, int]:
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    return usage


def cross_compile(spec: Dict[str, object], arch: int = 90) -> Dict[str, object]:
    """Compile ``spec`` (from :func:`compile_spec`) to a cubin for ``sm_{arch}`` and report its resources.

    Needs a process whose triton was imported without ``TRITON_INTERPRET``; no GPU is used. Pointer
    arguments are taken as 16-byte aligned (as every torch allocation is), integers as unspecialized.

    Returns:
        ``spec`` plus ``ok`` and either ``error`` or ``regs`` (registers per thread), ``local_bytes``
        (per-thread stack/local memory: spilled registers), ``spills`` (Triton's ``n_spills``,
        ``local_bytes // 4``), ``shared`` (bytes of shared memory the launch needs), ``seconds``.
    """
    import importlib
    import time

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if triton_built_interpreted():
        raise RuntimeError("cross_compile needs triton imported without TRITON_INTERPRET=1")
    out = dict(spec)
    obj = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    fn = obj.kernel() if isinstance(obj, LazyKernel) else obj
    consts = {k: (getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v) for k, v in spec["constexprs"].items()}
    sig = {a: ("constexpr" if a in consts else spec["signature"][a]) for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*")}
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", arch, 32),
            options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]),
        )
        usage = _resource_usage(compiled.asm["cubin"])
    except Exception as e:  # reported per configuration; the caller decides what fails
        out.update(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
        return out
    local = usage.get("STACK", 0) + usage.get("LOCAL", 0)
    out.update(ok=True, regs=usage.get("REG", 0), local_bytes=local, spills=local // 4,
               shared=int(compiled.metadata.shared), seconds=round(time.perf_counter() - start, 2))
    return out


def all_compile_specs(quick: bool = False, all_flags: bool = False, arch: int = 90) -> List[Dict[str, object]]:
    """Every distinct kernel configuration the Triton backends' launchers can choose on an ``sm_{arch}`` GPU.

    ``quick``: only the all-flags-on variants, and bfloat16 standing for float16 too (same tiles and
    code, the other 16-bit type), about a third of the compiles. ``all_flags``: every combination of
    the constexpr flags instead of all on and all off. ``arch`` sets the shared-memory limit the
    launchers fit (:func:`shared_bytes_of_capability`).
    """
    from . import decay, window

    limit = shared_bytes_of_capability(arch)
    seen, specs = set(), []
    for spec in window.compile_specs(all_flags, limit) + decay.compile_specs(all_flags, limit):
        flags = [v for k, v in spec["constexprs"].items() if k in ("HAS_BIAS", "ACCUM_DK", "ACCUM_DQ", "ACCUM", "WITH_DLG")]
        if quick and (spec["dtype"] == "float16" or not all(flags) or spec["constexprs"].get("SHIFT", 1) == 0):
            continue
        key = spec_key(spec)
        if key not in seen:
            seen.add(key)
            specs.append(spec)
    return specs


def cross_compile_all(specs: Optional[List[Dict[str, object]]] = None, arch: int = 90, workers: Optional[int] = None):
    """:func:`cross_compile` every spec (default :func:`all_compile_specs`) in ``workers`` processes; results in spec order."""
    import concurrent.futures as cf
    import multiprocessing as mp

    specs = all_compile_specs() if specs is None else specs
    workers = workers or os.cpu_count() or 1
    if workers <= 1:
        return [cross_compile(s, arch) for s in specs]
    order = sorted(range(len(specs)), key=lambda i: -_cost_hint(specs[i]))  # long compiles first
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {i: pool.submit(cross_compile, specs[i], arch) for i in order}
        return [futures[i].result() for i in range(len(specs))]


def _cost_hint(spec: Dict[str, object]) -> int:
    c = spec["constexprs"]
    tile = 1
    for k in ("BLOCK_L", "BLOCK_M", "BLOCK_N", "BLOCK_D"):
        if k in c:
            tile *= int(c[k])
    return tile * (2 if spec["dtype"] == "float32" else 1)
