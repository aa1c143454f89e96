"""The automatic backend choice: measured once per call class, cached per machine, a rule where it cannot measure.

:func:`decide` answers "which of these backends, all able to run this call, should run it?" for
``backend=None``. The reference is the default answer; a fast path replaces it only where it is measurably
faster, so the automatic choice never makes a call slower than the reference:

1. One candidate: it.
2. Known answer: the choice made earlier for the same **call class** in this process, or stored in the
   per-machine cache on disk (read once per class, then held in this process). A call class is the op, its
   tensors' shapes (batch rounded up to a power of two), dtypes and contiguity, its integer/string options
   (``hw``, ``mode``, ``window_size``, ``shift``), the device, the intra-op thread count, the autocast dtype
   where autocast is on for the device, and whether a backward will follow (grad enabled and an input requires grad: a training step pays the backward too, so
   it is timed too). :func:`recall` is this step alone, for the dispatcher's every call: a class met before
   costs one dictionary lookup (its key's text is built once per class).
3. Measured (CPU, eager, not while ``torch.compile`` traces or ``torch.export`` exports): every candidate
   (a backend with variants of its own, the ``cpp`` kernels' instruction sets, once per variant; the call
   then runs in the fastest) runs the same inputs (copies of the call's own), one warm-up call each, then
   interleaved rounds in a rotating order (forward, or forward+backward when a backward will follow) until
   a budget of :data:`BUDGET_MS` ms (at least 2, at most 15 rounds). A fast path wins only if its median
   time is below ``1 - MARGIN`` of the reference's median and its best time below the reference's best;
   otherwise (tie, noise, a failure) the reference stays.
4. Otherwise (tracing, exporting, measuring off, or a device that is not measured): :data:`RULES`,
   conditions calibrated by the benchmark under which a fast path wins, else the reference on CPU; on
   CUDA the highest-priority backend (the fused GPU kernels), kept in this process's answers like a
   measured one (never on disk). Rule answers are deterministic, so a trace
   never depends on timing; an eager call of the same class before compiling puts the measured answer in
   the cache, and the trace then uses it. A trace with dynamic sizes (``torch.compile(dynamic=True)``, or
   the recompile after a new batch size) writes each size it holds symbolic as :data:`ANY_SIZE` in the
   class, without a guard that would pin it, and takes the backend known here for every class it covers
   where they all agree (else the rule).

The cache file lives in ``$FUSIONBLOCKS_CACHE_DIR`` (default ``$XDG_CACHE_HOME/fusionblocks``, else
``~/.cache/fusionblocks``), one JSON file per machine key (CPU model, torch version, fusionblocks version,
build id of ``fusionblocks._C``, the ``cpp`` variant and whether it is forced): another CPU, another torch, a
rebuilt extension or a forced variant (``FUSIONBLOCKS_CPU_ISA``, which times that variant alone) starts a fresh file.
Writes merge under a lock file and replace the file atomically, so concurrent processes are safe. A file keeps
the :data:`MAX_CACHED` most recently measured classes (many input sizes would otherwise grow it, and the cost of
each rewrite, without bound).

Environment: ``FUSIONBLOCKS_AUTOTUNE=on`` (default: measure, cache on disk), ``memory`` (measure, keep the
answers in this process only), ``off`` (never measure, no cache: the rule answers everywhere).
:func:`clear_cache` (``fusionblocks info --clear-cache``) deletes the cache files.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import operator
import os
import re
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.fx.experimental.symbolic_shapes import has_static_value

ENV_TUNE = "FUSIONBLOCKS_AUTOTUNE"
ENV_CACHE_DIR = "FUSIONBLOCKS_CACHE_DIR"
TUNE_MODES = ("on", "memory", "off")
BUDGET_MS = 40.0
MIN_ROUNDS, MAX_ROUNDS = 2, 15
MARGIN = 0.05  # a fast path must be at least 5 % faster than the reference to replace it
CACHE_FORMAT = 2  # 2: a choice names the backend's variant
MEASURED_DEVICES = ("cpu",)
MAX_CACHED = 1024  # call classes a cache file keeps (the most recently measured): every new one rewrites the file

__all__ = ["Choice", "Rule", "RULES", "decide", "recall", "call_class", "clear_cache", "forget_answers", "cache_path",
           "tune_mode", "machine_key"]


@dataclass
class Choice:
    """What the automatic choice picked for one call class, and why.

    ``how``: ``"only candidate"``, ``"measured"`` (this process timed it), ``"cached"`` (an earlier
    measurement on this machine), ``"rule"`` (:data:`RULES` or the device default), or, from
    :func:`fusionblocks.ops.choose`, ``"named"`` / ``"environment"`` when the caller forced a backend.
    ``times_ms``: median ms per candidate when measured (a backend with variants once per variant,
    ``"cpp[avx2]"``); ``why``: one readable sentence; ``variant``: the backend's variant that runs the call
    (the fastest measured; ``None``: the backend's own default, as in a rule or a forced choice).
    """

    op: str
    backend: str
    how: str
    why: str
    key: str = ""
    times_ms: Optional[Dict[str, float]] = None
    rounds: int = 0
    candidates: List[str] = field(default_factory=list)
    variant: Optional[str] = None

    @property
    def label(self) -> str:
        """The backend and, where one was chosen, its variant: ``"cpp[avx2]"``."""
        return f"{self.backend}[{self.variant}]" if self.variant else self.backend

    def __str__(self) -> str:
        return f"{self.op}: {self.label} ({self.how}; {self.why})"


@dataclass(frozen=True)
class Rule:
    """``backend`` wins for ``op`` on ``device`` wherever ``when(args, kwargs)`` holds (``evidence`` says why)."""

    op: str
    backend: str
    device: str
    when: Callable[[tuple, dict], bool]
    evidence: str


def _tokens(args: tuple) -> int:
    return int(args[0].shape[2])


# Calibrated by `fusionblocks bench` / benchmarks/bench_cpu.py records: only where the fast path's lead
# is large on every machine measured (memory-bound full attention, where the reference stores N x N).
RULES: List[Rule] = [
    Rule("decay_attention", "cpp", "cpu",
         lambda a, k: k.get("mode") == "full" and _tokens(a) >= 28 * 28,
         "full decay from 28x28 tokens: the reference materializes (heads, N, N) scores; cpp streams them in O(N) "
         "memory and measured 2.1-9.6x faster forward, 1.3-4.6x forward+backward (1 thread, fp32, 28x28 and 56x56, "
         "the widest variant on two AMD EPYCs, AVX2 and AVX-512; benchmarks/results/cpu_kernels-*)"),
]

_lock = threading.RLock()
_memo: Dict[str, Choice] = {}
_disk: Optional[Dict[str, dict]] = None
_machine: Optional[Dict[str, str]] = None


def _new_lock_after_fork() -> None:
    """A child forked while another thread held the lock (measuring; e.g. DataLoader workers) would wait forever."""
    global _lock
    _lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_after_fork)


def tune_mode() -> str:
    """``FUSIONBLOCKS_AUTOTUNE`` as one of :data:`TUNE_MODES` (unknown values raise)."""
    raw = os.environ.get(ENV_TUNE, "on").strip().lower() or "on"
    aliases = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}
    mode = aliases.get(raw, raw)
    if mode not in TUNE_MODES:
        raise ValueError(f"{ENV_TUNE}={os.environ.get(ENV_TUNE)!r}: expected one of {list(TUNE_MODES)}")
    return mode


def tracing(tensors: Sequence[torch.Tensor] = ()) -> bool:
    """True while torch.compile traces, torch.export / torch.jit exports, or any input is a fake/meta tensor."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None:
        if getattr(compiler, "is_compiling", lambda: False)():
            return True
        if _export_flag():
            return True
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    for t in tensors:
        if t.device.type == "meta" or type(t).__name__ in ("FakeTensor", "FunctionalTensor"):
            return True
    return False


def _export_flag() -> bool:
    """``torch.compiler.is_exporting()``, read from its flag where torch has one.

    Dynamo replaced a traced call of ``is_exporting()`` by a constant ``True`` under any
    ``torch.compile`` (pytorch/pytorch#176347; torch 2.11 does, 2.13 reads the flag): the choice
    would take every compiled program for an export and fall back to the reference. The flag itself
    (set by torch.export for the time it traces) reads right everywhere.
    """
    compiler = getattr(torch, "compiler", None)
    if compiler is None:
        return False
    flag = getattr(compiler, "_is_exporting_flag", None)
    if isinstance(flag, bool):
        return flag
    return bool(getattr(compiler, "is_exporting", lambda: False)())


def exporting() -> bool:
    """True while torch.export, torch.jit.trace or an ONNX exporter (dynamo, or legacy, which runs torch.jit.trace)
    traces the program (not torch.compile): their files are loaded elsewhere, where fusionblocks' ops may be absent."""
    return _export_flag() or bool(torch.onnx.is_in_onnx_export()) or torch.jit.is_tracing()


def _threads() -> int:
    return torch.get_num_threads()


if hasattr(torch, "compiler") and hasattr(torch.compiler, "assume_constant_result"):
    _threads = torch.compiler.assume_constant_result(_threads)  # read at trace time, a constant in the graph


ANY_SIZE = "*"  # a size the trace leaves symbolic (torch.compile with dynamic shapes) in a call class


def _size(n):
    """Inside a trace: ``n`` as a number, or :data:`ANY_SIZE` where a dynamic-shape trace holds it as a symbol
    that can take more than one value. Dynamo shows both as an ``int``; asking which installs no guard, so the
    graph stays dynamic in that size."""
    return operator.index(n) if has_static_value(n) else ANY_SIZE


def _bucket(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _class_of(op: str, args: tuple, kwargs: dict, grad: bool, compiling: bool) -> tuple:
    """The call class as plain values (what :func:`call_class` writes out): cheap to build and to hash.
    ``compiling``: inside a trace, where a size may be symbolic (:func:`_size`)."""
    tensors = []
    dev = None
    for a in args:
        if isinstance(a, torch.Tensor):
            shape = tuple(a.shape)
            if compiling:
                shape = tuple([_size(n) for n in shape])
            if len(shape) >= 3 and shape[0] != ANY_SIZE:
                shape = (_bucket(shape[0]),) + shape[1:]
            if dev is None:
                dev = a.device.type
            tensors.append((shape, a.dtype, a.is_contiguous()))
        elif a is None:
            tensors.append(None)
    size = _size if compiling else (lambda n: n)
    options = []
    for k in sorted(kwargs):
        v = kwargs[k]
        if isinstance(v, (bool, str)):
            options.append((k, v))
        elif isinstance(v, int):
            options.append((k, size(v)))
        elif isinstance(v, tuple) and all([isinstance(x, int) for x in v]):
            options.append((k, tuple([size(x) for x in v])))
    dev = dev or "cpu"
    # autocast changes what the reference computes (its products in the autocast dtype), not what the
    # fused kernels compute: a choice measured with it on is not the answer with it off, and back
    return op, tuple(tensors), tuple(options), dev, _threads(), grad, autocast_dtype(dev)


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)  # one call for "autocast is off everywhere"


def autocast_anywhere() -> bool:
    """Whether ``torch.autocast`` may be on for some device: one cheap call for every op call's usual answer, no
    (0.4 us, against 0.9 us for the per-device question and as much again for a tensor's device type)."""
    return _any_autocast is None or torch.compiler.is_compiling() or _any_autocast()


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` computes in on ``device_type``, ``None`` where it is off."""
    if not autocast_anywhere():
        return None
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _text(v) -> str:
    """An option's value as the cache has always written it (a tuple of ints as Python prints it), with
    :data:`ANY_SIZE` written bare."""
    if isinstance(v, tuple):
        return "(" + ", ".join(map(str, v)) + ("," if len(v) == 1 else "") + ")"
    return str(v)


def _render(cls: tuple) -> str:
    op, tensors, options, dev, threads, grad, amp = cls
    parts = [op]
    for t in tensors:
        if t is None:
            parts.append("none")
            continue
        shape, dtype, contiguous = t
        strided = "" if contiguous else ",strided"
        parts.append(f"{'x'.join(map(str, shape))}:{str(dtype).replace('torch.', '')}{strided}")
    parts.extend(f"{k}={_text(v)}" for k, v in options)
    parts.append(f"device={dev}")
    parts.append(f"threads={threads}")
    parts.append("grad" if grad else "nograd")
    if amp is not None:
        parts.append(f"autocast={str(amp).replace('torch.', '')}")
    return " ".join(parts)


_render_known = functools.lru_cache(maxsize=4096)(_render)  # an eager call's key without formatting it again


def call_class(op: str, args: tuple, kwargs: dict, grad: bool) -> str:
    """The cache key of a call: op, shapes (batch rounded up to a power of two), dtypes, options, device, threads,
    grad, and the autocast dtype where autocast is on."""
    compiling = torch.compiler.is_compiling()
    cls = _class_of(op, args, kwargs, grad, compiling)
    if compiling:  # dynamo traces plain code only (and a traced size may be symbolic)
        return _render(cls)
    try:
        return _render_known(cls)
    except TypeError:  # a symbolic size (an export's fake tensors) cannot be hashed
        return _render(cls)


# ------------------------------------------------------------------------------------------ the disk cache


def _extension_build_id() -> str:
    try:
        from .. import _C
    except ImportError:
        return "none"
    build_id = getattr(_C, "build_id", None)
    if callable(build_id):
        build_id = build_id()
    if build_id:
        return str(build_id)
    path = getattr(_C, "__file__", None)
    try:
        st = os.stat(path)
        return f"{st.st_size}-{int(st.st_mtime)}"
    except (OSError, TypeError):
        return "unknown"


def machine_key() -> Dict[str, str]:
    """What a cached choice is valid for: CPU model, torch, fusionblocks, the extension's build."""
    global _machine
    if _machine is None:
        from .. import __version__
        from .._device import device_name

        isa = "n/a"
        try:
            from . import cpp

            current = getattr(cpp, "current_isa", None)
            isa = str(current()) if callable(current) else "n/a"
            if getattr(cpp, "isa_forced", lambda: False)():  # one variant timed: not what timing them all picks
                isa += " (forced)"
        except Exception:  # a missing or broken extension: the key says n/a
            pass
        _machine = {"cpu": device_name("cpu"), "torch": torch.__version__, "fusionblocks": __version__,
                    "extension": _extension_build_id(), "isa": isa, "format": str(CACHE_FORMAT)}
    return dict(_machine)


def cache_dir() -> str:
    base = os.environ.get(ENV_CACHE_DIR)
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "fusionblocks")
    return base


def cache_path() -> str:
    """The cache file of this machine key."""
    m = machine_key()
    digest = hashlib.sha1(json.dumps(m, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"dispatch-{digest}.json")


def _read(path: str) -> Dict[str, dict]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError):  # unreadable, not JSON, or nested deeper than json reads
        return {}
    if not isinstance(data, dict) or data.get("machine") != machine_key():
        return {}
    entries = data.get("entries")
    if not isinstance(entries, dict):
        return {}
    return {k: e for k, e in entries.items() if _valid_entry(e)}


_CHOICE_FIELDS = frozenset(Choice.__dataclass_fields__)


def _valid_entry(entry: object) -> bool:
    """Whether a cache file's entry is a stored :class:`Choice` this version can read: an entry written by hand, by
    another version of fusionblocks or half-overwritten is skipped (its class is measured again), never a crash."""
    if not isinstance(entry, dict) or not set(entry) <= _CHOICE_FIELDS:
        return False
    if not all(isinstance(entry.get(f), str) for f in ("op", "backend", "how", "why")):
        return False
    if not (entry.get("variant") is None or isinstance(entry["variant"], str)):
        return False
    times = entry.get("times_ms")
    if not (times is None or (isinstance(times, dict) and all(isinstance(t, (int, float)) for t in times.values()))):
        return False
    return isinstance(entry.get("candidates", []), list) and isinstance(entry.get("rounds", 0), int)


@contextlib.contextmanager
def _file_lock(path: str):
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): the atomic replace alone keeps the file whole
        yield
        return
    with open(path + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """This process's umask (read once: reading it means setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _store(choice: Choice) -> None:
    path = cache_path()
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _file_lock(path):
            entries = _read(path)
            entries.pop(choice.key, None)
            entries[choice.key] = asdict(choice)  # the file lists its entries oldest first
            for old in list(entries)[:max(0, len(entries) - MAX_CACHED)]:
                del entries[old]
            fd, tmp = tempfile.mkstemp(prefix=".dispatch-", dir=os.path.dirname(path))
            if hasattr(os, "fchmod"):  # mkstemp's 0600 would hide a shared FUSIONBLOCKS_CACHE_DIR from other users
                os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "w") as f:
                json.dump({"machine": machine_key(), "entries": entries}, f, indent=1)
            os.replace(tmp, path)
            tmp = None
        if _disk is not None:
            _disk[choice.key] = asdict(choice)
    except OSError:  # a read-only home must not break a forward pass; the answer stays in memory
        pass
    finally:
        if tmp is not None:  # a write that failed half-way (a full disk): no stray file left behind
            with contextlib.suppress(OSError):
                os.remove(tmp)


def load_cache() -> Dict[str, dict]:
    """The cached entries of this machine key (read once per process; ``{}`` when the cache is off)."""
    global _disk
    if tune_mode() != "on":
        return {}
    if _disk is None:
        _disk = _read(cache_path())
    return _disk


def forget_answers() -> None:
    """Drop this process's answers and its machine key, not the cache files: what :func:`fusionblocks.ops.cpp.set_isa`
    calls, since a choice measured over every ``cpp`` variant does not hold once one is forced (nor the reverse),
    and the forced variant names another cache file (:func:`machine_key`)."""
    global _disk, _machine
    with _lock:
        _memo.clear()
        _disk = None
        _machine = None


def clear_cache() -> List[str]:
    """Forget every answer: this process's and the cache files (all machine keys). Returns the files removed.

    Raises:
        OSError: naming the cache files that could not be removed (their answers would be recalled again), after
            removing every other one.
    """
    global _disk
    with _lock:
        _memo.clear()
        _disk = None
        removed, failed = [], []
        d = cache_dir()
        if os.path.isdir(d):
            for name in sorted(os.listdir(d)):
                if (name.startswith("dispatch-") and (name.endswith(".json") or name.endswith(".json.lock"))
                        or name.startswith(".dispatch-")):  # a write's temporary file (a process killed mid-write)
                    try:
                        os.remove(os.path.join(d, name))
                        removed.append(os.path.join(d, name))
                    except FileNotFoundError:  # another process removed it first
                        pass
                    except OSError as e:
                        failed.append(f"{name} ({e.strerror or e})")
        if failed:
            raise OSError(f"clear_cache: could not remove {len(failed)} cache file(s) in {d}: {', '.join(failed)}; "
                          f"their answers would be used again (removed {len(removed)})")
        return removed


def cached_choices() -> Dict[str, dict]:
    """Every answer known here: this process's and the disk cache's, by call class."""
    out = {k: dict(v) for k, v in load_cache().items()}
    out.update({k: asdict(c) for k, c in _memo.items()})
    return out


# ------------------------------------------------------------------------------------------ deciding


def _rule(op: str, candidates: list, args: tuple, kwargs: dict, device: torch.device, key: str, why: str) -> Choice:
    names = [b.name for b in candidates]
    for r in RULES:
        if r.op == op and r.device == device.type and r.backend in names and r.when(args, kwargs):
            return Choice(op, r.backend, "rule", f"{why}; rule: {r.evidence}", key, candidates=names)
    if device.type in MEASURED_DEVICES and "reference" in names:
        return Choice(op, "reference", "rule", f"{why}; no rule says a fast path wins this call on {device.type}: "
                      "the reference", key, candidates=names)
    best = max(candidates, key=lambda b: b.priority)
    return Choice(op, best.name, "rule", f"{why}; on {device.type} the fused kernels (highest priority) run",
                  key, candidates=names)


def _clone(a, grad: bool):
    """A copy of one input with no autograd history (the caller's tensors never see the measurement)."""
    if isinstance(a, torch.Tensor):
        with torch.no_grad():
            c = a.detach().clone()
        return c.requires_grad_(grad and a.requires_grad and a.is_floating_point())
    return a


def _timer(backend, variant: Optional[str], args: tuple, kwargs: dict, grad: bool) -> Callable[[], float]:
    inputs = tuple(_clone(a, grad) for a in args)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    cache: dict = {}

    def once() -> float:
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        with backend.scope(variant):
            if grad:
                out = backend.fn(*inputs, **kwargs)
                if "g" not in cache:
                    cache["g"] = torch.ones_like(out)
                out.backward(cache["g"])
            else:
                with torch.no_grad():
                    backend.fn(*inputs, **kwargs)
        return time.perf_counter() - t0

    return once


def _contenders(candidates: list) -> Dict[str, tuple]:
    """``label -> (backend, variant)``: each backend once, or once per variant where it has several."""
    out: Dict[str, tuple] = {}
    for b in candidates:
        variants = b.variants()
        if len(variants) > 1:
            out.update({f"{b.name}[{v}]": (b, v) for v in variants})
        else:
            out[b.name] = (b, None)
    return out


def _same(t):
    return t


@contextlib.contextmanager
def _apart():
    """Measurement runs apart from what observes the caller's calls: no dispatch mode (a ``FlopCounterMode``,
    a logging mode) sees the contenders' ops, and no saved-tensor hooks (``save_on_cpu``, an activation
    counter, non-reentrant checkpointing) take their saved tensors; the innermost hooks are the ones used, so
    identity hooks hide the caller's."""
    from torch.utils._python_dispatch import _disable_current_modes

    # where saved-tensor hooks are disabled (functorch transforms), no caller's hooks can be there to hide
    hide = (torch.autograd.graph.saved_tensors_hooks(_same, _same) if torch._C._autograd._saved_tensors_hooks_is_enabled()
            else contextlib.nullcontext())
    with _disable_current_modes(), hide:
        yield


def _measure(op: str, candidates: list, args: tuple, kwargs: dict, grad: bool, key: str) -> Choice:
    with _apart():
        return _measure_apart(op, candidates, args, kwargs, grad, key)


def _measure_apart(op: str, candidates: list, args: tuple, kwargs: dict, grad: bool, key: str) -> Choice:
    names = [b.name for b in candidates]
    contenders = _contenders(candidates)
    timers, failed = {}, {}
    for label, (b, variant) in contenders.items():
        try:
            t = _timer(b, variant, args, kwargs, grad)
            t()  # warm-up: first-call costs (allocations, lazy init) stay out
            timers[label] = t
        except Exception as e:  # a backend that fails here is not chosen; the reason is kept
            failed[label] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not timers:
        raise RuntimeError(f"{op}: every backend failed while measuring: {failed}")
    samples: Dict[str, List[float]] = {n: [] for n in timers}
    order = list(timers)
    spent, rounds = 0.0, 0
    while rounds < MAX_ROUNDS and (rounds < MIN_ROUNDS or spent < BUDGET_MS / 1e3):
        for n in order[rounds % len(order):] + order[: rounds % len(order)]:
            dt = timers[n]()
            samples[n].append(dt)
            spent += dt
        rounds += 1
    med = {n: statistics.median(s) * 1e3 for n, s in samples.items()}
    best = {n: min(s) * 1e3 for n, s in samples.items()}
    pass_ = "fwd+bwd" if grad else "fwd"
    if "reference" in med:
        winner = "reference"
        for n in sorted(med, key=med.get):
            if n != "reference" and med[n] < (1 - MARGIN) * med["reference"] and best[n] < best["reference"]:
                winner = n
                break
        if winner == "reference":
            why = f"{pass_}: no fast path beat the reference by {MARGIN:.0%} (median of {rounds} rounds)"
        else:
            why = (f"{pass_}: {med['reference'] / med[winner]:.2f}x the reference's speed "
                   f"(median of {rounds} rounds)")
    else:
        winner = min(med, key=med.get)
        why = f"{pass_}: fastest median of {rounds} rounds"
    if failed:
        why += "; failed while measuring: " + "; ".join(f"{n}: {r}" for n, r in failed.items())
    backend, variant = contenders[winner]
    return Choice(op, backend.name, "measured", why, key, {n: round(v, 4) for n, v in med.items()}, rounds, names,
                  variant)


def grad_follows(args: tuple) -> bool:
    """Whether a backward will follow this call (grad enabled and an input tensor requires grad)."""
    return torch.is_grad_enabled() and any([isinstance(a, torch.Tensor) and a.requires_grad for a in args])


def recall(key: str) -> Optional[Choice]:
    """The answer this process already holds for call class ``key`` (:func:`call_class`), or ``None`` (not known
    yet, or exporting, where the reference runs): what :func:`decide` would return, found without asking every
    backend whether it can run the call. The caller still checks that the recalled backend can run it."""
    if exporting():
        return None
    return _memo.get(key)


def _same_at_every_size(key: str, names: tuple) -> Optional[tuple]:
    """For a call class with sizes a dynamic-shape trace holds symbolic (:data:`ANY_SIZE`): ``(backend, variant,
    classes)`` where every answer known here for a class that matches ``key`` at some sizes (``classes`` of them)
    names the same backend, one of ``names`` (``variant``: theirs where they agree on it, else ``None``);
    ``None`` where none is known or the backends differ."""
    parts = key.split(ANY_SIZE)
    pattern = re.compile(r"\d+".join(re.escape(p) for p in parts) + r"\Z")
    known = {k: (e.get("backend"), e.get("variant")) for k, e in (_disk or {}).items() if pattern.match(k)}
    known.update({k: (c.backend, c.variant) for k, c in _memo.items() if pattern.match(k)})
    backends, variants = {b for b, _ in known.values()}, {v for _, v in known.values()}
    if len(backends) != 1 or not backends <= set(names):
        return None
    return backends.pop(), variants.pop() if len(variants) == 1 else None, len(known)


if hasattr(torch, "compiler") and hasattr(torch.compiler, "assume_constant_result"):
    # evaluated once while tracing, its answer a constant of the graph: no guard on the answers known here
    _same_at_every_size = torch.compiler.assume_constant_result(_same_at_every_size)


def decide(op: str, candidates: list, args: tuple, kwargs: dict, key: Optional[str] = None) -> Choice:
    """The automatic choice among ``candidates`` (backends that can run this validated call); see the module doc.
    ``key``: the call's class where the caller has it (inside a trace, taken before the backends' checks)."""
    names = [b.name for b in candidates]
    if "reference" in names and exporting():
        return Choice(op, "reference", "rule", "exporting (torch.export / torch.jit.trace / ONNX): an exported program "
                      "holds standard ops only, no compiled extension's", candidates=names)
    if len(candidates) == 1:
        return Choice(op, names[0], "only candidate", "the only backend that can run this call", candidates=names)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    grad = grad_follows(args)
    key = call_class(op, args, kwargs, grad) if key is None else key
    known = _memo.get(key)
    if known is not None and known.backend in names:
        return known
    device = tensors[0].device if tensors else torch.device("cpu")
    mode = tune_mode()
    traced = tracing(tensors)
    if mode == "on" and (_disk is not None or not traced):  # no file I/O inside a trace
        entry = load_cache().get(key)
        if entry is not None and entry.get("backend") in names and (
                entry.get("variant") is None
                or entry["variant"] in next(b for b in candidates if b.name == entry["backend"]).variants()):
            known = Choice(**{**entry, "how": "cached"})
            known.candidates = names
            if not traced:  # later calls of the class find it in this process's answers
                with _lock:
                    _memo.setdefault(key, known)
            return known
    if mode == "off":
        return _rule(op, candidates, args, kwargs, device, key, f"{ENV_TUNE}=off")
    if traced and ANY_SIZE in key:
        same = _same_at_every_size(key, tuple(names))
        if same is not None:
            return Choice(op, same[0], "cached", f"a trace with dynamic sizes: the answer known here for each of "
                          f"the {same[2]} call classes it covers", key, candidates=names, variant=same[1])
    if traced:
        return _rule(op, candidates, args, kwargs, device, key, "not measured inside a traced graph")
    if device.type not in MEASURED_DEVICES:  # the answer follows from the class: later calls recall it
        known = _rule(op, candidates, args, kwargs, device, key, f"not measured on {device.type}")
        with _lock:
            return _memo.setdefault(key, known)
    with _lock:
        known = _memo.get(key)
        if known is None:
            known = _measure(op, candidates, args, kwargs, grad, key)
            _memo[key] = known
            if mode == "on":
                _store(known)
    return known
