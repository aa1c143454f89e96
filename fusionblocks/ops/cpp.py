"""C++ CPU backends (``cpp``) of ``decay_attention`` and ``window_attention``, from ``fusionblocks._C``.

The kernels (``csrc/cpu``) stream over key blocks with an online softmax and compute the decay, the
relative-position bias and the shift mask from token indices. The full decay keeps memory O(N * D): its
forward saves one log-sum-exp per query and the backward recomputes the probabilities. The decomposed
decay and window attention have small attention tiles (one line, one window), whose probabilities are
no larger than what the reference saves: when autograd records the call, their training forms
(``decay_dec_fwd_train``, ``window_fwd_train``) save them and the backward reads them back, which spares
the backward one of its five tile products and the exponentials; under ``no_grad`` nothing but the
output is written. ``at::parallel_for``
spreads batch x heads x query blocks (forward) or batch x heads / lines / windows (backward) over the
intra-op threads (``torch.set_num_threads``).

Dtypes: float64 is computed in float64 and float32 in float32; bfloat16 and float16 inputs are
accepted and computed in float32 (more accurate than the reference, which forms scores in the input
dtype), the result is cast back. Gradients flow to q, k, v, ``log_gamma`` and ``bias_table``.

ISA variants: the kernels are compiled once per instruction set (``default``: the compiler's baseline,
4-float vectors, on any CPU including aarch64; ``avx2``: AVX2 + FMA, 8-float vectors; ``avx512``:
AVX-512F, 16-float vectors; the last two with GCC on x86-64 only), each with the register blocking of
its ISA, and the best one this CPU runs is used. :func:`set_isa` (or the :func:`use_isa` context
manager, or the environment variable ``FUSIONBLOCKS_CPU_ISA=auto|avx512|avx2|default``, read at every
call) forces one, so each variant can be tested and benchmarked on the machine at hand;
:func:`current_isa` names the variant the next call uses and :func:`supported_isas` those this machine
runs. Asking for a variant the CPU lacks is an error naming what it lacks, never a silent fallback.
The widest variant is not always the fastest (on an AMD EPYC with AVX-512, the avx2 variant ran HEMF's
decomposed decay up to 1.37x faster, the full decay up to 10 % slower): the automatic backend choice times the
``cpp`` backend in every variant this machine runs (:func:`isa_variants`) and runs each call class in the
fastest (:func:`call_isa`, for that call and its backward; a forced variant wins over it).

The ops are ``torch.ops.fusionblocks_C.{decay_full,decay_dec,window}_{fwd,bwd}`` (and the training
forms ``{decay_dec,window}_fwd_train`` / ``{decay_dec,window}_bwd_probs``) with TORCH_LIBRARY
schemas; their fake (meta) kernels are registered here and their autograd in C++ (``csrc/autograd.cpp``,
one node per call, no Python in the backward), so they trace under ``torch.compile`` and pass
``torch.library.opcheck``. When the extension is not built, the backends
stay registered and ``fusionblocks.ops.explain`` says how to build it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, List, Optional, Tuple

import torch

from . import flops
from . import autotune
from .dispatch import Misconfigured, register_backend

try:
    from .. import _C  # noqa: F401  (loading it registers the TORCH_LIBRARY schemas and kernels)

    LOAD_ERROR: Optional[str] = None
except ImportError as e:
    _C = None
    LOAD_ERROR = f"{type(e).__name__}: {e}"

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace` "
    "(needs torch and a C++ compiler at build time)"
)

# input dtype -> dtype the kernels compute (and store) in
COMPUTE_DTYPES = {
    torch.float64: torch.float64,
    torch.float32: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float16: torch.float32,
}

# every CPU kernel variant, widest first
ISAS = ("avx512", "avx2", "default")
ISA_ENV = "FUSIONBLOCKS_CPU_ISA"

__all__ = [
    "available", "LOAD_ERROR", "BUILD_HINT", "COMPUTE_DTYPES", "ISAS", "ISA_ENV", "supported_isas", "current_isa",
    "set_isa", "use_isa", "call_isa", "isa_variants", "isa_forced", "isa_unsupported_reason", "decay_attention_cpp",
    "window_attention_cpp",
]


def available() -> bool:
    """True when ``fusionblocks._C`` is built and loaded."""
    return _C is not None


def _require_extension() -> None:
    if _C is None:
        raise RuntimeError(extension_reasons()[0])


def supported_isas() -> List[str]:
    """Names of the CPU kernel variants this machine and this build run, best first (``[]`` without the
    extension); ``"default"`` is always among them when the extension is built."""
    return list(_C.cpu_isas()) if _C is not None else []


def isa_unsupported_reason(name: str) -> str:
    """Why this machine cannot run the variant ``name`` (``""`` when it can), e.g. ``"this CPU lacks avx512f"``."""
    _require_extension()
    _check_isa_name(name)
    return _C.cpu_isa_unsupported_reason(name)


def current_isa() -> Optional[str]:
    """The CPU kernel variant the next ``cpp`` call uses (``"avx512"``, ``"avx2"`` or ``"default"``), or
    ``None`` when the extension is not built. Raises ``RuntimeError`` when ``FUSIONBLOCKS_CPU_ISA`` asks
    for a variant this CPU lacks (the message says which feature is missing)."""
    return _C.cpu_isa() if _C is not None else None


# the variant forced through set_isa (None: automatic), mirrored here so use_isa can restore it
_forced_isa: Optional[str] = None


def _check_isa_name(name: str) -> None:
    if not isinstance(name, str) or name.lower() not in ISAS:
        raise ValueError(f"fusionblocks cpp kernels: unknown CPU ISA variant {name!r}; expected one of {list(ISAS)} "
                         "(or None / 'auto' for the automatic choice)")


def set_isa(name: Optional[str]) -> None:
    """Force the CPU kernel variant ``name`` for every later ``cpp`` call in this process (all threads);
    ``None`` or ``"auto"`` returns to the automatic choice (``FUSIONBLOCKS_CPU_ISA``, then the best variant).

    The automatic backend choice forgets what it measured in this process when the setting changes (a choice made
    over every variant does not hold for a forced one, nor the reverse) and measures again.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when this CPU (or this build) cannot run it,
    naming what is missing and the variants it can run.
    """
    global _forced_isa
    _require_extension()
    if name is None or (isinstance(name, str) and name.lower() == "auto"):  # any case, like the variant names
        new = None
    else:
        _check_isa_name(name)
        new = name.lower()
    _C.set_cpu_isa(new)
    if new != _forced_isa:
        _forced_isa = new
        autotune.forget_answers()


@contextlib.contextmanager
def use_isa(name: Optional[str]) -> Iterator[str]:
    """Context manager: :func:`set_isa` ``(name)`` inside the block, the previous setting restored after it;
    yields the variant in use."""
    previous = _forced_isa
    set_isa(name)
    try:
        yield current_isa()
    finally:
        set_isa(previous)


@contextlib.contextmanager
def call_isa(name: Optional[str]) -> Iterator[None]:
    """Context manager: this thread's ``cpp`` calls inside the block (and the backward of each, wherever it runs)
    use variant ``name`` (``None``: the automatic one). It is what the automatic backend choice sets for the
    variant it measured fastest for a call; :func:`set_isa` and ``FUSIONBLOCKS_CPU_ISA`` take precedence over it.
    Other threads are not affected. Raises like :func:`set_isa` for a variant this CPU cannot run."""
    _require_extension()
    if name is not None:
        _check_isa_name(name)
        name = name.lower()
    previous = _C.set_thread_cpu_isa(name)
    try:
        yield
    finally:
        _C.set_thread_cpu_isa(previous)


def isa_variants() -> List[str]:
    """The variants the automatic backend choice times against each other for a call: every variant this machine
    runs, or only the one in use where :func:`set_isa` or ``FUSIONBLOCKS_CPU_ISA`` forces one (``[]`` without
    the extension, or with one built from older sources that cannot set a thread's variant: rebuild it)."""
    if _C is None or not hasattr(_C, "set_thread_cpu_isa"):
        return []
    if isa_forced():
        return [current_isa()]
    return supported_isas()


def isa_forced() -> bool:
    """Whether :func:`set_isa` or ``FUSIONBLOCKS_CPU_ISA`` forces one variant (the automatic choice then times
    only that one)."""
    return _forced_isa is not None or os.environ.get(ISA_ENV, "auto").lower() not in ("", "auto")


def _isa_reasons() -> List[str]:
    if _C is None or not os.environ.get(ISA_ENV):
        return []
    try:
        _C.cpu_isa()
    except (RuntimeError, ValueError) as e:
        return [Misconfigured(str(e))]
    return []


def extension_reasons() -> List[str]:
    if _C is None:
        return [f"the compiled extension fusionblocks._C is not built ({LOAD_ERROR}); {BUILD_HINT}"]
    return []


def _common_reasons(what: str, tensors) -> List[str]:
    reasons = extension_reasons()
    elsewhere = [t for t in tensors if t is not None and not t.is_cpu]
    if elsewhere:
        devices = sorted({str(t.device) for t in elsewhere})
        reasons.append(f"{what} runs on CPU tensors only, got {', '.join(devices)}")
    elif not reasons:  # the variant forced for CPU calls (a setting that cannot run is an error, not a fallback)
        reasons = _isa_reasons()
    q = tensors[0]
    if q.dtype not in COMPUTE_DTYPES:
        reasons.append(f"{what} supports float32/float64 (bfloat16/float16 computed in float32), got {q.dtype}")
    return reasons


def _fake_like(t: torch.Tensor, shape=None) -> torch.Tensor:
    return t.new_empty(tuple(t.shape) if shape is None else tuple(shape))


if _C is not None:
    _ops = torch.ops.fusionblocks_C
    F_, B_ = flops.FORWARD, flops.BACKWARD
    flops.register([(_ops.decay_full_fwd, "full", F_), (_ops.decay_full_bwd, "full", B_),
                    (_ops.decay_dec_fwd, "decomposed", F_), (_ops.decay_dec_fwd_train, "decomposed", F_),
                    (_ops.decay_dec_bwd, "decomposed", B_), (_ops.decay_dec_bwd_probs, "decomposed", B_),
                    (_ops.window_fwd, "window", F_), (_ops.window_fwd_train, "window", F_),
                    (_ops.window_bwd, "window", B_), (_ops.window_bwd_probs, "window", B_)])

    # ---- fake kernels: shapes/dtypes of the results, all contiguous ----
    @torch.library.register_fake("fusionblocks_C::decay_full_fwd")
    def _decay_full_fwd_fake(q, k, v, log_gamma, H, W, scale):
        return _fake_like(q), _fake_like(q, q.shape[:3])

    @torch.library.register_fake("fusionblocks_C::decay_full_bwd")
    def _decay_full_bwd_fake(grad, q, k, v, log_gamma, out, lse, H, W, scale):
        return _fake_like(q), _fake_like(q), _fake_like(q), _fake_like(q, (q.shape[1],))

    @torch.library.register_fake("fusionblocks_C::decay_dec_fwd")
    def _decay_dec_fwd_fake(q, k, v, log_gamma, H, W, scale):
        return _fake_like(q), _fake_like(q), _fake_like(q, q.shape[:3]), _fake_like(q, q.shape[:3])

    @torch.library.register_fake("fusionblocks_C::decay_dec_bwd")
    def _decay_dec_bwd_fake(grad, q, k, v, log_gamma, out, mid, lse_row, lse_col, H, W, scale):
        return _fake_like(q), _fake_like(q), _fake_like(q), _fake_like(q, (q.shape[1],))

    @torch.library.register_fake("fusionblocks_C::window_fwd")
    def _window_fwd_fake(q, k, v, bias_table, H, W, window_size, shift, scale):
        return _fake_like(q)

    @torch.library.register_fake("fusionblocks_C::window_bwd")
    def _window_bwd_fake(grad, q, k, v, bias_table, H, W, window_size, shift, scale):
        table = _fake_like(q, (0,)) if bias_table is None else _fake_like(bias_table)  # the table's dtype
        return _fake_like(q), _fake_like(q), _fake_like(q), table

    @torch.library.register_fake("fusionblocks_C::decay_dec_fwd_train")
    def _decay_dec_fwd_train_fake(q, k, v, log_gamma, H, W, scale):
        b, nh = q.shape[:2]
        return _fake_like(q), _fake_like(q), _fake_like(q, (b, nh, H, W, W)), _fake_like(q, (b, nh, W, H, H))

    @torch.library.register_fake("fusionblocks_C::decay_dec_bwd_probs")
    def _decay_dec_bwd_probs_fake(grad, q, k, v, log_gamma, mid, p_row, p_col, H, W, scale):
        return _fake_like(q), _fake_like(q), _fake_like(q), _fake_like(q, (q.shape[1],))

    @torch.library.register_fake("fusionblocks_C::window_fwd_train")
    def _window_fwd_train_fake(q, k, v, bias_table, H, W, window_size, shift, scale):
        nwin = (H // window_size) * (W // window_size)
        ll = window_size * window_size
        return _fake_like(q), _fake_like(q, (*q.shape[:2], nwin, ll, ll))

    @torch.library.register_fake("fusionblocks_C::window_bwd_probs")
    def _window_bwd_probs_fake(grad, q, k, v, probs, bias_table, H, W, window_size, shift, scale):
        table = _fake_like(q, (0,)) if bias_table is None else _fake_like(bias_table)  # the table's dtype
        return _fake_like(q), _fake_like(q), _fake_like(q), table

    # Autograd of these ops is registered in C++ (csrc/autograd.cpp), at the Autograd key.


def _training(*tensors) -> bool:
    """Whether autograd records this call: then the training forms run, which save the probabilities."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_decay_cpp(q, k, v, log_gamma, *, hw, mode, scale, auto: bool = False) -> List[str]:
    """Reasons the ``cpp`` backend cannot run this (validated) ``decay_attention`` call; empty when it can."""
    return _common_reasons("cpp decay_attention", (q, k, v, log_gamma))


def check_window_cpp(q, k, v, bias_table, *, hw, window_size, shift, scale, auto: bool = False) -> List[str]:
    """Reasons the ``cpp`` backend cannot run this (validated) ``window_attention`` call; empty when it can."""
    return _common_reasons("cpp window_attention", (q, k, v, bias_table))


@register_backend("decay_attention", "cpp", priority=10, check=check_decay_cpp, variants=isa_variants,
                  in_variant=call_isa)
def decay_attention_cpp(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor, *,
    hw: Tuple[int, int], mode: str = "full", scale: float,
) -> torch.Tensor:
    """Decay attention on the C++ CPU kernels; math of :func:`fusionblocks.ops.reference.decay_attention`.

    Args:
        q, k, v: ``(B, heads, H*W, D)`` raster order, any strides, CPU.
        log_gamma: ``(heads,)``.
        hw: ``(H, W)``.
        mode: ``"full"`` or ``"decomposed"``.
        scale: multiplies ``q k^T`` (the public op resolves ``None`` to ``D ** -0.5``).

    Returns:
        ``(B, heads, H*W, D)`` in the dtype of ``q``.
    """
    if _C is None:
        raise RuntimeError(extension_reasons()[0])
    h, w = hw
    ct = COMPUTE_DTYPES[q.dtype]
    args = (q.to(ct), k.to(ct), v.to(ct), log_gamma.to(ct), h, w, scale)
    if mode == "full":
        out = _ops.decay_full_fwd(*args)[0]
    elif _training(q, k, v, log_gamma):
        out = _ops.decay_dec_fwd_train(*args)[0]
    else:
        out = _ops.decay_dec_fwd(*args)[0]
    return out.to(q.dtype)


@register_backend("window_attention", "cpp", priority=10, check=check_window_cpp, variants=isa_variants,
                  in_variant=call_isa)
def window_attention_cpp(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: Optional[torch.Tensor], *,
    hw: Tuple[int, int], window_size: int, shift: int = 0, scale: float,
) -> torch.Tensor:
    """Shifted-window attention on the C++ CPU kernel; math of :func:`fusionblocks.ops.reference.window_attention`.

    Args:
        q, k, v: ``(B, heads, H*W, D)`` raster order of the unshifted grid, any strides, CPU.
        bias_table: ``((2ws-1)**2, heads)`` or ``None``.
        hw: ``(H, W)``, multiples of ``window_size``.
        window_size: window side.
        shift: cyclic shift in ``[0, window_size)``.
        scale: multiplies ``q`` (the public op resolves ``None`` to ``D ** -0.5``).

    Returns:
        ``(B, heads, H*W, D)`` in the dtype of ``q``.
    """
    if _C is None:
        raise RuntimeError(extension_reasons()[0])
    h, w = hw
    ct = COMPUTE_DTYPES[q.dtype]
    table = None if bias_table is None else bias_table.to(ct)
    args = (q.to(ct), k.to(ct), v.to(ct), table, h, w, window_size, shift, scale)
    if _training(q, k, v, bias_table):
        out = _ops.window_fwd_train(*args)[0]
    else:
        out = _ops.window_fwd(*args)
    return out.to(q.dtype)
