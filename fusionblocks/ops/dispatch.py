"""Backend choice for every op: one mechanism, and it says why.

Each op registers a ``prepare`` function (its own argument checks and defaults, :func:`register_op`) and
each backend of an op an implementation and a ``check`` that returns the reasons it cannot run a given
call (an empty list means it can). A named backend (or the environment variable ``FUSIONBLOCKS_BACKEND``)
runs if it can and raises :class:`BackendUnavailable` listing every candidate's reasons if it cannot.
``backend=None`` picks among the backends that can run with :func:`fusionblocks.ops.autotune.decide`:
the reference unless a fast path is measured (once per call class, cached per machine) or known by a
benchmark-calibrated rule to be faster; :func:`choose` says what was picked and why. A backend with
variants of its own (the ``cpp`` kernels' instruction sets) is measured in each, and the call runs in the
fastest.

Backends live in provider modules, imported once by :func:`load_backends` (``import fusionblocks.ops``
calls it, so nothing is imported while ``torch.compile`` traces a call); a missing Triton or an unbuilt
extension does not fail the import: its import error becomes the reason that backend cannot run.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, List, Optional, Tuple

import torch
from torch.autograd import forward_ad

from . import autotune
from .autotune import Choice

BACKENDS = ("reference", "triton", "cpp", "cuda")
ENV_VAR = "FUSIONBLOCKS_BACKEND"

# provider module of each non-reference backend
_PROVIDERS = {
    "triton": "fusionblocks.ops.triton",
    "cpp": "fusionblocks.ops.cpp",
    "cuda": "fusionblocks.ops.cuda",
}


class BackendUnavailable(RuntimeError):
    """The named backend cannot run this call; the message lists every candidate's reasons."""


@dataclass(frozen=True)
class Backend:
    """One backend of one op. ``variants()`` names the backend's own variants that the automatic choice times
    against each other (e.g. the ``cpp`` kernels' instruction sets; ``[]``: none), and ``in_variant(name)`` is
    the context in which a call (and its backward) runs variant ``name``."""

    op: str
    name: str
    fn: Callable
    check: Callable[..., List[str]]
    priority: int
    variants: Callable[[], List[str]] = lambda: []
    in_variant: Optional[Callable[[str], ContextManager]] = None

    def reasons(self, *args, auto: bool = False, **kwargs) -> List[str]:
        reasons = list(self.check(*args, auto=auto, **kwargs))
        if self.name != "reference":
            reasons += autodiff_reasons(args)
        return reasons

    def scope(self, variant: Optional[str]) -> ContextManager:
        """The context that runs ``variant`` (nothing to set for ``None``)."""
        if variant is None or self.in_variant is None:
            return contextlib.nullcontext()
        return self.in_variant(variant)


def autodiff_reasons(args: tuple) -> List[str]:
    """Why no fused kernel can run a call made under a ``torch.func`` transform or with forward-mode AD dual
    tensors (empty: neither): only the reference, plain PyTorch ops, has the rules for them. The fused kernels have
    no jvp and no functorch rules: the C++ ones raised, and Triton's custom ops dropped the tangent silently
    (``torch.func.jvp`` returned zeros, ``forward_ad.unpack_dual`` no tangent)."""
    if torch.compiler.is_compiling():  # not asked in a trace (dynamo would put the calls in the graph): a compiled
        return []                      # transform keeps the trace's choice
    if torch._C._are_functorch_transforms_active():
        return ["torch.func transforms (grad, vmap, jvp, jacrev, ...) run on the reference only: "
                "the fused kernels have no functorch rules"]
    if forward_ad._current_level >= 0 and any(  # dual tensors exist only inside a dual level (cheap gate)
            isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args):
        return ["forward-mode AD (dual tensors, torch.autograd.forward_ad) runs on the reference only: "
                "the fused kernels have no jvp"]
    return []


_REGISTRY: Dict[str, Dict[str, Backend]] = {}
_PREPARE: Dict[str, Callable[..., Tuple[tuple, dict]]] = {}
_provider_errors: Dict[str, str] = {}
_providers_loaded = False


def register_backend(op: str, name: str, *, priority: int, check: Optional[Callable[..., List[str]]] = None,
                     variants: Optional[Callable[[], List[str]]] = None,
                     in_variant: Optional[Callable[[str], ContextManager]] = None):
    """Decorator: register ``fn`` as backend ``name`` of ``op``.

    ``check(*args, auto, **kwargs)`` receives the op's arguments (already validated) plus
    ``auto=True`` when the choice is automatic, and returns the reasons it cannot run.
    Higher ``priority`` wins in automatic choice. ``variants()`` and ``in_variant(name)`` (both or neither):
    the backend's variants, which the automatic choice measures each on its own (see :class:`Backend`).
    """
    if name not in BACKENDS:
        raise ValueError(f"register_backend: unknown backend {name!r}; expected one of {list(BACKENDS)}")
    if (variants is None) != (in_variant is None):
        raise ValueError(f"register_backend: {op} {name}: variants and in_variant go together")

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[name] = Backend(op, name, fn, check or (lambda *a, **k: []), priority,
                                                     variants or (lambda: []), in_variant)
        return fn

    return deco


def register_op(op: str, prepare: Callable[..., Tuple[tuple, dict]]) -> None:
    """Register the op's ``prepare(*args, **kwargs) -> (args, kwargs)``: the public op's own argument checks
    (raising its clear errors) and defaults, so :func:`explain` and :func:`choose` see exactly what the op's
    backends would receive."""
    _PREPARE[op] = prepare


def autocast_inputs(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """``q, k, v`` as an attention op computes from them: under ``torch.autocast`` on their device, floating
    tensors other than float64 in the autocast dtype, as autocast treats torch's own attention
    (``scaled_dot_product_attention``). Every backend then starts from, and returns, the same dtype: the reference's
    products ran in the autocast dtype (a bfloat16 result) while a fused kernel took the float32 inputs as they
    were (a float32 result), so the output's dtype depended on the backend chosen."""
    if not autotune.autocast_anywhere():
        return tensors
    dtype = autotune.autocast_dtype(tensors[0].device.type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype not in (dtype, torch.float64) else t
                 for t in tensors)


def prepare(op: str, *args, **kwargs) -> Tuple[tuple, dict]:
    """Validate ``op``'s arguments and resolve its defaults like the public op (identity for an unregistered op)."""
    fn = _PREPARE.get(op)
    if fn is None:
        if op not in _REGISTRY:
            raise ValueError(f"unknown op {op!r}; expected one of {sorted(_REGISTRY)}")
        return args, kwargs
    return fn(*args, **kwargs)


def load_backends() -> None:
    """Import every provider module once (idempotent); failures are kept as reasons."""
    global _providers_loaded
    if _providers_loaded:
        return
    _providers_loaded = True
    for name, module in _PROVIDERS.items():
        try:
            importlib.import_module(module)
        except ImportError as e:  # a provider that is absent or cannot import on this machine
            _provider_errors[name] = f"{type(e).__name__}: {e}"


def backends_for(op: str) -> Dict[str, Backend]:
    load_backends()
    return dict(_REGISTRY.get(op, {}))


def explain(op: str, *args, auto: bool = False, **kwargs) -> Dict[str, List[str]]:
    """Every backend name -> the reasons it cannot run this call (empty: it can).

    The arguments are those of the public op (``backend`` excluded) and are validated and completed
    exactly as the op does (invalid input raises the op's own error). ``auto=True`` asks as the automatic
    choice does (some backends, e.g. Triton's interpreter, run only when named); :func:`choose` says which
    backend the automatic choice picks and why.
    """
    if "backend" in kwargs:
        raise TypeError(f"explain: got backend={kwargs['backend']!r}, but explain takes the op's other arguments "
                        "and answers for every backend; choose() says which one the automatic choice picks")
    args, kwargs = prepare(op, *args, **kwargs)
    return _reasons(op, args, kwargs, auto)


def _reasons(op: str, args: tuple, kwargs: dict, auto: bool) -> Dict[str, List[str]]:
    registered = backends_for(op)
    out: Dict[str, List[str]] = {}
    for name in BACKENDS:
        if name in registered:
            try:
                out[name] = registered[name].reasons(*args, auto=auto, **kwargs)
            except Exception as e:  # a check must never hide the others
                out[name] = [f"its support check failed: {type(e).__name__}: {e}"]
        elif name in _provider_errors:
            out[name] = [f"not importable ({_provider_errors[name]})"]
        else:
            out[name] = [f"no {name} implementation of {op}"]
    return out


def _format(reasons: Dict[str, List[str]]) -> str:
    return "\n".join(f"  {n}: {'; '.join(r) if r else 'can run'}" for n, r in reasons.items())


class Misconfigured(str):
    """A reason a backend cannot run that is the user's setting, not the call (e.g. ``FUSIONBLOCKS_CPU_ISA``
    naming a variant this CPU lacks): the automatic choice raises it instead of passing the backend over, which
    would run the reference, silently slow; :func:`explain` lists it like any reason."""


def _choice(op: str, backend: Optional[str], args: tuple, kwargs: dict) -> Tuple[Backend, Choice]:
    how = "named"
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        how = "environment"
    registered = backends_for(op)
    if backend is not None:
        source = f" (set by the environment variable {ENV_VAR})" if how == "environment" else ""
        if backend not in BACKENDS:
            raise ValueError(f"{op}: unknown backend {backend!r}{source}; expected one of {list(BACKENDS)} or None (auto)")
        if backend in registered and not registered[backend].reasons(*args, **kwargs):
            why = f"{ENV_VAR}={backend}" if how == "environment" else f"backend={backend!r}"
            return registered[backend], Choice(op, backend, how, why, candidates=[backend])
        raise BackendUnavailable(
            f"{op}: backend {backend!r}{source} cannot run this call. Candidates:\n"
            f"{_format(_reasons(op, args, kwargs, False))}"
        )
    key = autotune.call_class(op, args, kwargs, autotune.grad_follows(args))
    known = autotune.recall(key)  # a class met before: only its backend is asked again
    if known is not None and known.backend in registered:
        chosen = registered[known.backend]
        if not chosen.reasons(*args, auto=True, **kwargs):
            return chosen, known
    ranked = sorted(registered.values(), key=lambda b: -b.priority)
    candidates = []
    for b in ranked:
        reasons = b.reasons(*args, auto=True, **kwargs)
        wrong = [r for r in reasons if isinstance(r, Misconfigured)]
        if wrong:
            raise ValueError(f"{op}: the {b.name} backend cannot run as configured: {'; '.join(wrong)}")
        if not reasons:
            candidates.append(b)
    if not candidates:
        raise BackendUnavailable(
            f"{op}: no backend can run this call. Candidates:\n{_format(_reasons(op, args, kwargs, True))}"
        )
    choice = autotune.decide(op, candidates, args, kwargs, key=key)
    return registered[choice.backend], choice


def select(op: str, backend: Optional[str], *args, **kwargs) -> Backend:
    """The backend that will run this (already validated) call; see the module docstring."""
    return _choice(op, backend, args, kwargs)[0]


def choose(op: str, *args, backend: Optional[str] = None, **kwargs) -> Choice:
    """Which backend runs this call of the public op ``op`` and why (measured times, cache, rule, or forced).

    Takes the op's own arguments (validated and completed as the op does). Like the op itself, an
    automatic choice not yet known for this call class is measured now (outside any trace) and cached.
    """
    args, kwargs = prepare(op, *args, **kwargs)
    return _choice(op, backend, args, kwargs)[1]


def dispatch(op: str, backend: Optional[str], *args, **kwargs):
    """Run ``op`` on the chosen backend, in the variant the automatic choice measured fastest where it has
    variants (under ``torch.export`` / ONNX export an automatic choice is the reference). A call that
    ``torch.compile`` traces runs the backend's default variant: the variant is a setting of the calling
    thread, which a compiled graph does not hold."""
    chosen, choice = _choice(op, backend, args, kwargs)
    variant = None if torch.compiler.is_compiling() else choice.variant  # dynamo cannot trace the setting
    with chosen.scope(variant):
        return chosen.fn(*args, **kwargs)
