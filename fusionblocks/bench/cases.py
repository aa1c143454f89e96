"""The benchmarked cases: each op's shapes (paper, quick, presets), its inputs and its implementations
(the dispatcher's backends, ``auto``, and the anchors)."""
from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..ops import dispatch as _dispatch
from ..ops import reference as _ref
from .anchors import _flex_reasons, _log_gamma, decay_flex, decay_sdpa, reference_compiled, window_flex, window_sdpa
from .records import ANCHORS, AUTO


INTERPRETER_REASON = ("Triton needs a CUDA device to be timed (on CPU it runs only in its interpreter, "
                      "TRITON_INTERPRET=1, a correctness tool; the scripts' --quick smoke runs use it)")


@dataclass
class Impl:
    """One implementation of a case: ``fn(inputs) -> Tensor`` and why it cannot run here (empty: it can)."""

    name: str
    fn: Callable[[dict], torch.Tensor]
    reasons: List[str] = field(default_factory=list)
    chosen: Optional[Callable[[dict], str]] = None  # ``auto``: the backend it picks for these inputs (grad mode as now)


@dataclass
class OpBench:
    """A benchmarked op: its shapes (paper and quick), how to build inputs and its implementations.

    ``impls(shape, inputs, device, smoke=False)``: with ``smoke`` the anchors that need CUDA run eagerly
    on CPU (FlexAttention uncompiled) so a CPU smoke run exercises their code. ``spec(inputs) -> Tensor``
    computes the op's definition (``ops/reference.py``) for the error check, ``None`` for the blocks.
    """

    name: str
    aliases: Tuple[str, ...]
    shapes: Callable[[bool], List[dict]]
    make_inputs: Callable[[dict, torch.device, torch.dtype], dict]
    impls: Callable[..., List[Impl]]
    grad_keys: Tuple[str, ...] = ("q", "k", "v")
    impl_names: Tuple[str, ...] = _dispatch.BACKENDS + (AUTO,) + ANCHORS
    spec: Optional[Callable[[dict], torch.Tensor]] = None


OPS: Dict[str, OpBench] = {}


def register_op(bench: OpBench) -> OpBench:
    OPS[bench.name] = bench
    return bench


def resolve_ops(names: Optional[Sequence[str]]) -> List[OpBench]:
    """Op benches by name or alias (all when ``names`` is empty); unknown names raise with close matches."""
    if not names:
        return list(OPS.values())
    lookup = {}
    for b in OPS.values():
        lookup[b.name] = b
        for a in b.aliases:
            lookup[a] = b
    out = []
    for n in names:
        if n not in lookup:
            close = difflib.get_close_matches(n, list(lookup), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"unknown op {n!r}{hint} Available: {', '.join(OPS)} (aliases: "
                             f"{', '.join(a for b in OPS.values() for a in b.aliases)})")
        if lookup[n] not in out:
            out.append(lookup[n])
    return out


def _qkv(shape: dict, device, dtype) -> dict:
    b, nh, n, d = shape["B"], shape["heads"], shape["H"] * shape["W"], shape["D"]
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, nh, n, d, generator=g).to(device=device, dtype=dtype).requires_grad_() for _ in range(3))
    return {"q": q, "k": k, "v": v}


def _backend_impls(op: str, call: Callable[[dict, Optional[str]], torch.Tensor], args: Callable[[dict], tuple],
                   kwargs: Callable[[dict], dict]) -> Callable[[dict], List[Impl]]:
    """Every registered backend of ``op`` (forced by name), then ``auto`` (``backend=None``, what users get)."""
    def build(inputs: dict) -> List[Impl]:
        reasons = _dispatch.explain(op, *args(inputs), **kwargs(inputs))

        def chosen(x: dict) -> str:
            c = _dispatch.choose(op, *args(x), **kwargs(x))
            return f"{c.label} ({c.how})"

        impls = [Impl(name, functools.partial(call, backend=name), r) for name, r in reasons.items()]
        return impls + [Impl(AUTO, functools.partial(call, backend=None), chosen=chosen)]

    return build


def _decay_bench(mode: str) -> OpBench:
    from ..ops import decay_attention

    if mode == "full":
        # RMT/HEMF full-attention stages at batch 32, plus a large-map case (issue 3)
        paper = [dict(B=32, heads=4, H=s, W=s, D=d) for s in (56, 28) for d in (16, 32, 64)]
        paper.append(dict(B=2, heads=8, H=96, W=96, D=32))
        quick = [dict(B=2, heads=4, H=14, W=14, D=32)]
    else:
        # HEMF's four stages at batch 32: 56²/d12 … 7²/d96, 8 heads
        paper = [dict(B=32, heads=8, H=s, W=s, D=d) for s, d in ((56, 12), (28, 24), (14, 48), (7, 96))]
        quick = [dict(B=2, heads=8, H=14, W=14, D=24)]

    def make(shape, device, dtype):
        x = _qkv(shape, device, dtype)
        x["log_gamma"] = _log_gamma(shape["heads"], device)
        x["hw"] = (shape["H"], shape["W"])
        return x

    def call(x, backend):
        return decay_attention(x["q"], x["k"], x["v"], x["log_gamma"], hw=x["hw"], mode=mode, backend=backend)

    backends = _backend_impls(
        "decay_attention", call, lambda x: (x["q"], x["k"], x["v"], x["log_gamma"]),
        lambda x: dict(hw=x["hw"], mode=mode, scale=None),
    )

    def impls(shape, x, device, smoke=False):
        compiled = device.type == "cuda"
        return backends(x) + [
            Impl("sdpa", lambda x: decay_sdpa(x["q"], x["k"], x["v"], x["log_gamma"], hw=x["hw"], mode=mode)),
            Impl("flex", lambda x: decay_flex(x["q"], x["k"], x["v"], x["log_gamma"], hw=x["hw"], mode=mode,
                                              compiled=compiled), _flex_reasons(device, smoke)),
            Impl("compiled", lambda x: reference_compiled("decay_attention")(
                x["q"], x["k"], x["v"], x["log_gamma"], hw=x["hw"], mode=mode)),
        ]

    def spec(x):
        return _ref.decay_attention(x["q"], x["k"], x["v"], x["log_gamma"], hw=x["hw"], mode=mode)

    return OpBench(
        f"decay_attention_{mode}",
        ("decay_full", "decay") if mode == "full" else ("decay_decomposed",),
        lambda quick_: quick if quick_ else paper,
        make,
        impls,
        spec=spec,
    )


def _window_bench() -> OpBench:
    from ..ops import window_attention

    # HiFuse stages at batch 32 (56²/3 heads … 7²/24 heads, d=32, ws=7), unshifted and shifted (issue 4)
    paper = [dict(B=32, heads=nh, H=s, W=s, D=32, ws=7, shift=sh)
             for s, nh in ((56, 3), (28, 6), (14, 12), (7, 24)) for sh in (0, 3)]
    quick = [dict(B=2, heads=3, H=14, W=14, D=32, ws=7, shift=3)]

    def make(shape, device, dtype):
        x = _qkv(shape, device, dtype)
        ws = shape["ws"]
        g = torch.Generator(device="cpu").manual_seed(1)
        table = 0.02 * torch.randn((2 * ws - 1) ** 2, shape["heads"], generator=g)
        x["bias_table"] = table.to(device, dtype).requires_grad_()
        x["hw"] = (shape["H"], shape["W"])
        x["ws"], x["shift"] = ws, shape["shift"]
        return x

    kw = lambda x, shape: dict(hw=x["hw"], window_size=shape["ws"], shift=shape["shift"])  # noqa: E731

    def impls(shape, x, device, smoke=False):
        compiled = device.type == "cuda"

        def call(x, backend):
            return window_attention(x["q"], x["k"], x["v"], x["bias_table"], backend=backend, **kw(x, shape))

        backends = _backend_impls(
            "window_attention", call, lambda x: (x["q"], x["k"], x["v"], x["bias_table"]),
            lambda x: dict(scale=None, **kw(x, shape)),
        )
        return backends(x) + [
            Impl("sdpa", lambda x: window_sdpa(x["q"], x["k"], x["v"], x["bias_table"], **kw(x, shape))),
            Impl("flex", lambda x: window_flex(x["q"], x["k"], x["v"], x["bias_table"], compiled=compiled,
                                               **kw(x, shape)), _flex_reasons(device, smoke)),
            Impl("compiled", lambda x: reference_compiled("window_attention")(
                x["q"], x["k"], x["v"], x["bias_table"], **kw(x, shape))),
        ]

    def spec(x):
        return _ref.window_attention(x["q"], x["k"], x["v"], x["bias_table"], hw=x["hw"], window_size=x["ws"],
                                     shift=x["shift"])

    return OpBench("window_attention", ("window",), lambda q_: quick if q_ else paper, make, impls,
                   grad_keys=("q", "k", "v", "bias_table"), spec=spec)


def _block_bench(name: str, stages: Sequence[Tuple[int, int]]) -> OpBench:
    """HFF/HEF at the papers' stages (batch 32, 224² input); ``f`` from the previous stage except at stage 1."""
    paper = [dict(B=32, C=c, H=s, W=s, f=i > 0) for i, (c, s) in enumerate(stages)]
    quick = [dict(B=2, C=32, H=14, W=14, f=True)]

    def make(shape, device, dtype):
        import fusionblocks

        cls = getattr(fusionblocks, name.upper(), None)
        if cls is None:
            return {"missing": f"fusionblocks.{name.upper()} is not available in this install"}
        b, c, h, w = shape["B"], shape["C"], shape["H"], shape["W"]
        g = torch.Generator(device="cpu").manual_seed(0)
        block = cls(c).to(device=device, dtype=dtype).train()
        rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
        x = {"block": block, "l": rnd(b, c, h, w), "g": rnd(b, c, h, w)}
        x["f"] = rnd(b, c // 2, 2 * h, 2 * w) if shape["f"] else None
        return x

    def impls(shape, x, device, smoke=False):
        if "missing" in x:
            return [Impl("eager", lambda x: None, [x["missing"]])]
        return [Impl("eager", lambda x: x["block"](x["l"], x["g"], x["f"]))]

    return OpBench(name, (name.upper(),), lambda q_: quick if q_ else paper, make, impls, grad_keys=("l", "g", "f"),
                   impl_names=("eager",))


register_op(_decay_bench("full"))
register_op(_decay_bench("decomposed"))
register_op(_window_bench())
register_op(_block_bench("hff", [(96, 56), (192, 28), (384, 14), (768, 7)]))
register_op(_block_bench("hef", [(96, 56), (192, 28), (384, 14), (768, 7)]))

# Named shape sets (op name -> shapes) that a script times instead of the ops' paper shapes.
# the shapes the models call (224² input): HEMF's decomposed decay (8 heads) and HiFuse-T's window attention
# (ws 7, D 32) at each stage
HEMF_STAGES = ((56, 12), (28, 24), (14, 48), (7, 96))  # (side, head dim)
HIFUSE_T_STAGES = ((56, 3), (28, 6), (14, 12), (7, 24))  # (side, heads)

# Named shape sets (op name -> shapes) that a script times instead of the ops' paper shapes.
PRESETS: Dict[str, Dict[str, List[dict]]] = {
    # the CPU benchmark (issues 7 and 11): the model shapes at batch 2 (HEMF decomposed decay, HiFuse-T
    # window attention, shift 0 and 3) and full decay at 56² and 28² (8 heads, D 12 / 24, HEMF's stages)
    "cpu": {
        "decay_attention_full": [dict(B=2, heads=8, H=s, W=s, D=d) for s, d in HEMF_STAGES[:2]],
        "decay_attention_decomposed": [dict(B=2, heads=8, H=s, W=s, D=d) for s, d in HEMF_STAGES],
        "window_attention": [dict(B=2, heads=nh, H=s, W=s, D=32, ws=7, shift=sh)
                             for s, nh in HIFUSE_T_STAGES for sh in (0, 3)],
    },
    # issue 11's CPU speed targets, with every anchor (SDPA with a materialized bias, the compiled reference):
    # decomposed decay 28²/D24 and 56²/D12, window attention 56²/3 heads and 14²/12 heads (shift 0 and 3)
    "cpu-targets": {
        "decay_attention_decomposed": [dict(B=2, heads=8, H=s, W=s, D=d) for s, d in HEMF_STAGES[:2]],
        "window_attention": [dict(B=2, heads=nh, H=s, W=s, D=32, ws=7, shift=sh)
                             for s, nh in (HIFUSE_T_STAGES[0], HIFUSE_T_STAGES[2]) for sh in (0, 3)],
    },
}


def preset(name: str) -> Dict[str, List[dict]]:
    """A copy of the named shape set of :data:`PRESETS`; unknown names raise ``KeyError`` listing the known ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown bench preset {name!r}; known: {sorted(PRESETS)}")
    return {op: [dict(s) for s in shapes] for op, shapes in PRESETS[name].items()}
