"""Backend choice for every op: one mechanism, and it says why.

Each backend of an op registers an implementation and a ``check`` that returns the reasons it cannot
run a given call (an empty list means it can). ``backend=None`` (or the environment variable
``FUSIONBLOCKS_BACKEND`` when set) picks the highest-priority backend that can run; naming a backend
that cannot run raises :class:`BackendUnavailable` listing every candidate's reasons.

Backends live in provider modules, imported once by :func:`load_backends` (``import fusionblocks.ops``
calls it, so nothing is imported while ``torch.compile`` traces a call); a missing Triton or an unbuilt
extension does not fail the import: its import error becomes the reason that backend cannot run.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

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
    op: str
    name: str
    fn: Callable
    check: Callable[..., List[str]]
    priority: int

    def reasons(self, *args, auto: bool = False, **kwargs) -> List[str]:
        return list(self.check(*args, auto=auto, **kwargs))


_REGISTRY: Dict[str, Dict[str, Backend]] = {}
_provider_errors: Dict[str, str] = {}
_providers_loaded = False


def register_backend(op: str, name: str, *, priority: int, check: Optional[Callable[..., List[str]]] = None):
    """Decorator: register ``fn`` as backend ``name`` of ``op``.

    ``check(*args, auto, **kwargs)`` receives the op's arguments (already validated) plus
    ``auto=True`` when the choice is automatic, and returns the reasons it cannot run.
    Higher ``priority`` wins in automatic choice.
    """
    if name not in BACKENDS:
        raise ValueError(f"register_backend: unknown backend {name!r}; expected one of {list(BACKENDS)}")

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[name] = Backend(op, name, fn, check or (lambda *a, **k: []), priority)
        return fn

    return deco


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
    """Every backend name -> the reasons it cannot run this call (empty: it can)."""
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


def select(op: str, backend: Optional[str], *args, **kwargs) -> Backend:
    """The backend that will run this call (see module docstring)."""
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
    registered = backends_for(op)
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {list(BACKENDS)} or None (auto)")
        if backend in registered and not registered[backend].reasons(*args, **kwargs):
            return registered[backend]
        raise BackendUnavailable(
            f"{op}: backend {backend!r} cannot run this call. Candidates:\n{_format(explain(op, *args, **kwargs))}"
        )
    ranked = sorted(registered.values(), key=lambda b: -b.priority)
    for b in ranked:
        if not b.reasons(*args, auto=True, **kwargs):
            return b
    raise BackendUnavailable(
        f"{op}: no backend can run this call. Candidates:\n{_format(explain(op, *args, auto=True, **kwargs))}"
    )


def dispatch(op: str, backend: Optional[str], *args, **kwargs):
    """Run ``op`` on the chosen backend; under ``torch.export`` (also ONNX's) an automatic choice is the reference."""
    if backend is None and not os.environ.get(ENV_VAR):
        import torch

        if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
            backend = "reference"  # an exported program (pt2, ONNX) holds standard ops only, no compiled extension's
    return select(op, backend, *args, **kwargs).fn(*args, **kwargs)
