"""The dispatch layer: automatic choice, forced backends, reasons, the environment override."""
import contextlib
import os

import pytest
import torch

import fusionblocks.ops as ops
from fusionblocks.ops import cpp, dispatch


def _args():
    q = torch.randn(1, 2, 6, 4)
    return (q, q, q, torch.tensor([-0.5, -1.0])), dict(hw=(2, 3), mode="full", scale=None)


def test_explain_lists_every_backend_with_reasons():
    args, kw = _args()
    reasons = ops.explain("decay_attention", *args, **kw)
    assert list(reasons) == list(dispatch.BACKENDS)
    assert reasons["reference"] == []
    for name, r in reasons.items():
        assert isinstance(r, list) and all(isinstance(s, str) and s for s in r)


def test_auto_choice_can_run():
    args, kw = _args()
    chosen = dispatch.select("decay_attention", None, *args, **kw)
    assert chosen.reasons(*args, auto=True, **kw) == []


def test_unknown_backend_is_value_error():
    args, kw = _args()
    with pytest.raises(ValueError, match=r"decay_attention: unknown backend 'cudnn'"):
        ops.decay_attention(*args, hw=(2, 3), backend="cudnn")


def test_forced_backend_that_cannot_run_lists_candidates():
    q = torch.randn(1, 2, 6, 4)
    lg = torch.tensor([-0.5, -1.0])
    reasons = ops.explain("decay_attention", q, q, q, lg, hw=(2, 3), mode="full", scale=None)
    blocked = [n for n, r in reasons.items() if r]
    if not blocked:
        pytest.skip("every backend can run here")
    with pytest.raises(ops.BackendUnavailable) as e:
        ops.decay_attention(q, q, q, lg, hw=(2, 3), backend=blocked[0])
    msg = str(e.value)
    assert f"backend {blocked[0]!r} cannot run" in msg
    for name in dispatch.BACKENDS:
        assert f"  {name}:" in msg


def test_env_var_forces_backend(monkeypatch):
    args, kw = _args()
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.select("decay_attention", None, *args, **kw).name == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        dispatch.select("decay_attention", None, *args, **kw)


def test_register_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.register_backend("decay_attention", "magic", priority=1)


def test_compile_fullgraph_first_call_in_a_fresh_process():
    """Backends are loaded at import, so the first op call may happen inside torch.compile(fullgraph=True)."""
    import subprocess
    import sys

    code = (
        "import torch, fusionblocks.ops as O\n"
        "lg = torch.tensor([-0.5, -1.0]); q = torch.randn(1, 2, 6, 16); t = torch.randn(9, 2); w = torch.randn(1, 2, 16, 16)\n"
        "f = torch.compile(lambda q: O.decay_attention(q, q, q, lg, hw=(2, 3)), fullgraph=True, backend='aot_eager')\n"
        "g = torch.compile(lambda w: O.window_attention(w, w, w, t, hw=(4, 4), window_size=2, shift=1), fullgraph=True, backend='aot_eager')\n"
        "e1 = (f(q) - O.decay_attention(q, q, q, lg, hw=(2, 3), backend='reference')).abs().max().item()\n"
        "e2 = (g(w) - O.window_attention(w, w, w, t, hw=(4, 4), window_size=2, shift=1, backend='reference')).abs().max().item()\n"
        "assert e1 < 1e-5 and e2 < 1e-5, (e1, e2)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


# ---------------------------------------------------------------- explain / choose validate like the op


def test_explain_resolves_defaults_like_the_op():
    """No scale=/shift=: every backend's check sees the op's defaults (no 'support check failed')."""
    q = torch.randn(1, 2, 16, 8)
    lg = torch.tensor([-0.5, -1.0])
    for op, args, kw in (("decay_attention", (q, q, q, lg), dict(hw=(4, 4))),
                         ("window_attention", (q, q, q, None), dict(hw=(4, 4), window_size=2))):
        reasons = ops.explain(op, *args, **kw)
        assert reasons["reference"] == []
        assert not any("support check failed" in r for rs in reasons.values() for r in rs), reasons


@pytest.mark.parametrize("bad, match", [
    (dict(hw=(3, 3)), r"decay_attention: expected H\*W = 3\*3 = 9 tokens"),
    (dict(hw=(4, 4), mode="diagonal"), r"decay_attention: expected mode one of"),
    (dict(hw=(4, 4), scale="big"), r"decay_attention: expected scale as a float"),
])
def test_explain_and_choose_raise_the_ops_error_on_invalid_input(bad, match):
    q = torch.randn(1, 2, 16, 8)
    lg = torch.tensor([-0.5, -1.0])
    for fn in (ops.explain, ops.choose):
        with pytest.raises((ValueError, TypeError), match=match):
            fn("decay_attention", q, q, q, lg, **bad)
    with pytest.raises(ValueError, match="decay_attention: expected H"):
        ops.explain("decay_attention", q, q, q, lg, hw=(3, 3), auto=True)


def test_explain_unknown_op():
    with pytest.raises(ValueError, match="unknown op 'attention'"):
        ops.explain("attention", torch.zeros(1))


# ---------------------------------------------------------------- the measured, cached automatic choice

from fusionblocks.ops import autotune  # noqa: E402


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty per-machine cache in tmp_path and nothing remembered in this process."""
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(autotune.ENV_TUNE, raising=False)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(autotune, "_memo", {})
    monkeypatch.setattr(autotune, "_disk", None)
    return tmp_path


def _fake_op(name, ref_s, fast_s, calls=None):
    """A registered op with a reference that sleeps ref_s and a 'cpp' fast path that sleeps fast_s."""
    import time

    def backend(delay, label):
        def fn(x, *, n):
            if calls is not None:
                calls.append(label)
            time.sleep(delay)
            return x * n

        return fn

    dispatch.register_backend(name, "reference", priority=0)(backend(ref_s, "reference"))
    dispatch.register_backend(name, "cpp", priority=10)(backend(fast_s, "cpp"))
    return name


def test_a_slow_fast_path_is_never_chosen(fresh_cache):
    op = _fake_op("_tune_slow_fast_path", ref_s=0.001, fast_s=0.006)
    x = torch.ones(4)
    c = dispatch._choice(op, None, (x,), dict(n=2))[1]
    assert (c.backend, c.how) == ("reference", "measured")
    assert c.times_ms["cpp"] > c.times_ms["reference"] and c.rounds >= autotune.MIN_ROUNDS
    assert dispatch.select(op, None, x, n=2).name == "reference"
    assert "no fast path beat the reference" in c.why


def test_a_faster_path_is_chosen_and_the_choice_is_made_once(fresh_cache):
    calls = []
    op = _fake_op("_tune_fast_path", ref_s=0.006, fast_s=0.0, calls=calls)
    x = torch.ones(4)
    assert dispatch.dispatch(op, None, x, n=3).tolist() == [3.0] * 4
    measured = len(calls)
    assert measured >= 2 * (1 + autotune.MIN_ROUNDS) + 1  # warm-up + rounds for both backends, then the call
    c = dispatch._choice(op, None, (x,), dict(n=3))[1]
    assert (c.backend, c.how) == ("cpp", "measured") and "x the reference's speed" in c.why
    for _ in range(3):
        dispatch.dispatch(op, None, x, n=3)
    assert calls[measured:] == ["cpp"] * 3  # the remembered answer: no new measurement
    # a forced backend is obeyed and says so
    assert dispatch._choice(op, "reference", (x,), dict(n=3))[1].how == "named"


def _fake_op_with_variants(name, ref_s, variant_s, calls):
    """A registered op whose 'cpp' backend has variants (like the cpp kernels' ISAs), each sleeping its own time;
    ``calls`` gets the variant each call ran in."""
    import time

    active = [None]

    @contextlib.contextmanager
    def in_variant(v):
        prev, active[0] = active[0], v
        try:
            yield
        finally:
            active[0] = prev

    def fast(x, *, n):
        calls.append(active[0])
        time.sleep(variant_s.get(active[0], 0.0))
        return x * n

    dispatch.register_backend(name, "reference", priority=0)(lambda x, *, n: (time.sleep(ref_s), x * n)[1])
    dispatch.register_backend(name, "cpp", priority=10, variants=lambda: list(variant_s), in_variant=in_variant)(fast)
    return name


def test_a_backend_with_variants_is_measured_in_each_and_runs_in_the_fastest(fresh_cache):
    calls = []
    op = _fake_op_with_variants("_tune_variants", ref_s=0.008, variant_s={"wide": 0.004, "narrow": 0.0}, calls=calls)
    x = torch.ones(4)
    assert dispatch.dispatch(op, None, x, n=2).tolist() == [2.0] * 4
    c = dispatch._choice(op, None, (x,), dict(n=2))[1]
    assert (c.backend, c.variant, c.how, c.label) == ("cpp", "narrow", "measured", "cpp[narrow]")
    assert set(c.times_ms) == {"reference", "cpp[wide]", "cpp[narrow]"} and c.candidates == ["cpp", "reference"]
    assert str(c).startswith(f"{op}: cpp[narrow] (measured; fwd: ")
    assert {"wide", "narrow"} <= set(calls)
    del calls[:]
    dispatch.dispatch(op, None, x, n=2)
    assert calls == ["narrow"]  # the remembered answer runs in its variant
    del calls[:]
    dispatch.dispatch(op, "cpp", x, n=2)
    assert calls == [None]  # a named backend runs its own default
    # the cache keeps the variant; a cached variant the backend no longer offers is measured again
    autotune._memo.clear()
    autotune._disk = None
    cached = dispatch._choice(op, None, (x,), dict(n=2))[1]
    assert (cached.how, cached.variant) == ("cached", "narrow")
    autotune._memo.clear()
    autotune._disk = None
    dispatch.register_backend(op, "cpp", priority=10, variants=lambda: ["wide"],
                              in_variant=lambda v: contextlib.nullcontext())(lambda x, *, n: x * n)
    again = dispatch._choice(op, None, (x,), dict(n=2))[1]
    assert again.how == "measured" and again.variant is None and set(again.times_ms) == {"reference", "cpp"}


def test_register_backend_wants_variants_and_their_scope_together():
    with pytest.raises(ValueError, match="variants and in_variant go together"):
        dispatch.register_backend("_variants_alone", "cpp", priority=1, variants=lambda: ["a"])


def test_call_classes_separate_grad_threads_and_shapes(fresh_cache, one_thread):
    x = torch.ones(2, 3, 4, 5)
    base = autotune.call_class("op", (x,), dict(hw=(4, 5), scale=0.1), grad=False)
    assert "threads=1" in base and "nograd" in base and "scale" not in base
    assert autotune.call_class("op", (x,), dict(hw=(4, 5)), grad=True) != autotune.call_class("op", (x,), dict(hw=(4, 5)), grad=False)
    assert autotune.call_class("op", (torch.ones(3, 3, 4, 5),), {}, False) == autotune.call_class("op", (torch.ones(4, 3, 4, 5),), {}, False)
    assert autotune.call_class("op", (torch.ones(5, 3, 4, 5),), {}, False) != autotune.call_class("op", (torch.ones(4, 3, 4, 5),), {}, False)
    assert "strided" in autotune.call_class("op", (x.transpose(2, 3),), {}, False)
    torch.set_num_threads(2)
    assert autotune.call_class("op", (x,), dict(hw=(4, 5)), grad=False) != base


def test_call_class_text_is_the_cache_files_format(one_thread):
    # the disk cache is keyed by this text: a change of format would orphan every cached answer
    q = torch.ones(3, 2, 49, 16)
    key = autotune.call_class("window_attention", (q, q.transpose(2, 3), q, None),
                              dict(hw=(7, 7), window_size=7, shift=3, scale=0.25), grad=True)
    assert key == ("window_attention 4x2x49x16:float32 4x2x16x49:float32,strided 4x2x49x16:float32 none "
                   "hw=(7, 7) shift=3 window_size=7 device=cpu threads=1 grad")
    lg = torch.ones(2, dtype=torch.float64)
    key = autotune.call_class("decay_attention", (q.double(), q.double(), q.double(), lg),
                              dict(hw=(7, 7), mode="full", scale=0.25), grad=False)
    assert key == ("decay_attention 4x2x49x16:float64 4x2x49x16:float64 4x2x49x16:float64 2:float64 "
                   "hw=(7, 7) mode=full device=cpu threads=1 nograd")


def test_a_choice_made_without_autocast_is_not_taken_under_autocast(fresh_cache, one_thread):
    # under torch.autocast the reference computes its products in bfloat16 (another speed), the fused kernels
    # accumulate in float32: the class of a call says so, and a choice measured outside autocast is measured again
    # inside it
    q = torch.ones(3, 2, 49, 16)
    plain = autotune.call_class("op", (q,), dict(hw=(7, 7)), grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = autotune.call_class("op", (q,), dict(hw=(7, 7)), grad=False)
    assert amp == plain + " autocast=bfloat16"
    op = _fake_op("_tune_autocast", ref_s=0.004, fast_s=0.0)
    x = torch.ones(4)
    first = dispatch._choice(op, None, (x,), dict(n=1))[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = dispatch._choice(op, None, (x,), dict(n=1))[1]
    assert inside.how == "measured" and inside is not first and inside.key == first.key + " autocast=bfloat16"
    assert dispatch._choice(op, None, (x,), dict(n=1))[1] is first


@pytest.mark.skipif(not cpp.available(), reason="needs the compiled extension")
@pytest.mark.parametrize("op", ["decay", "window"])
def test_under_autocast_every_backend_takes_and_returns_the_autocast_dtype(op, one_thread):
    # float32 q, k, v under autocast: the reference's products ran in bfloat16 (a bfloat16 result) while cpp took
    # them as they were (a float32 result); now both start from bfloat16 q, k, v, like torch's own attention, and
    # the gradients come back in the inputs' float32
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8, requires_grad=True) for _ in range(3))
    outs, grads = {}, {}
    for backend in ("reference", "cpp", None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if op == "decay":
                out = ops.decay_attention(q, k, v, torch.full((2,), -0.3), hw=(4, 4), backend=backend)
            else:
                out = ops.window_attention(q, k, v, torch.randn(9, 2, generator=torch.Generator().manual_seed(1)),
                                           hw=(4, 4), window_size=2, shift=1, backend=backend)
        assert out.dtype == torch.bfloat16, backend
        outs[backend] = out.float()
        grads[backend] = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        assert all(g.dtype == torch.float32 for g in grads[backend])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is left as it is, as autocast leaves it
        assert ops.decay_attention(q.double(), k.double(), v.double(), torch.full((2,), -0.3), hw=(4, 4),
                                   backend="cpp").dtype == torch.float64
    for backend in ("cpp", None):  # bfloat16's rounding (eps 7.8e-3) of the reference's intermediate products
        torch.testing.assert_close(outs[backend], outs["reference"], rtol=1.6e-2, atol=2e-2)  # seen: 7.8e-3
        for g, ref in zip(grads[backend], grads["reference"]):  # gradients up to ~7 here; seen: 3.5e-2
            torch.testing.assert_close(g, ref, rtol=1.6e-2, atol=5e-2)


@pytest.mark.skipif(not cpp.available() or len(cpp.supported_isas()) < 2, reason="needs two cpp variants")
def test_set_isa_makes_the_automatic_choice_measure_again(fresh_cache, one_thread):
    # a choice measured over every variant (cpp[avx2], say) was kept after set_isa forced another, whose kernels
    # can be slower than the reference: choose() still said "cpp avx2, measured" and the forced variant ran
    q, tab = torch.randn(2, 4, 196, 32), torch.randn(169, 4)
    args, kw = (q, q, q, tab), dict(hw=(14, 14), window_size=7)
    first = ops.choose("window_attention", *args, **kw)
    assert first.how == "measured" and ops.choose("window_attention", *args, **kw) is first
    other = next(i for i in cpp.supported_isas() if i != (first.variant or cpp.current_isa()))
    try:
        cpp.set_isa(other)
        forced = ops.choose("window_attention", *args, **kw)
        assert forced.how == "measured" and forced is not first
        # timed in the forced variant alone (one cpp time, no variant named), where the first timed every variant
        assert forced.variant is None and set(forced.times_ms) == {"cpp", "reference"}
        assert {f"cpp[{i}]" for i in cpp.supported_isas()} <= set(first.times_ms)
        assert ops.choose("window_attention", *args, **kw) is forced  # the same setting: recalled
        cpp.set_isa(other)  # no change: nothing forgotten
        assert ops.choose("window_attention", *args, **kw) is forced
    finally:
        cpp.set_isa(None)
    assert ops.choose("window_attention", *args, **kw).how in ("measured", "cached")


def test_a_trace_writes_the_eager_call_class_and_symbolic_sizes_as_any(one_thread):
    q = torch.ones(3, 2, 4, 4)
    kw = dict(flag=True, hw=(2, 2), n=3, mode="x", scale=0.5)
    eager = autotune.call_class("op", (q, None), kw, False)
    assert autotune.call_class("op", (q,), dict(hw=(5,)), False).split()[2] == "hw=(5,)"  # as Python prints it
    traced = []

    def f(q):
        traced.append(autotune.call_class("op", (q, None), kw, False))
        return q + 1

    for dynamic in (False, True):
        torch._dynamo.reset()
        torch.compile(f, fullgraph=True, backend="eager", dynamic=dynamic)(q)
    assert traced[0] == eager == "op 4x2x4x4:float32 none flag=True hw=(2, 2) mode=x n=3 device=cpu threads=1 nograd"
    # dynamic=True: every size, and the ints the function closes over, are symbols
    assert traced[1] == "op *x*x*x*:float32 none flag=True hw=(*, *) mode=x n=* device=cpu threads=1 nograd"


def test_a_known_class_asks_only_its_own_backend_again(fresh_cache):
    op = "_tune_known_class"
    asked = []
    gone = []

    def check(name):
        def reasons(x, *, n, auto=False):
            asked.append(name)
            return ["gone"] if name in gone else []
        return reasons

    dispatch.register_backend(op, "reference", priority=0, check=check("reference"))(lambda x, *, n: x * n)
    dispatch.register_backend(op, "cpp", priority=10, check=check("cpp"))(lambda x, *, n: x * n + 0)
    x = torch.ones(4)
    key = autotune.call_class(op, (x,), dict(n=2), grad=False)
    autotune._memo[key] = autotune.Choice(op, "cpp", "measured", "test", key)
    del asked[:]
    assert dispatch.select(op, None, x, n=2).name == "cpp"
    assert asked == ["cpp"]  # the answer known for the class: no other backend is asked
    # a known answer whose backend can no longer run this call: every backend is asked, and one that can runs
    gone.append("cpp")
    del asked[:]
    assert dispatch.select(op, None, x, n=2).name == "reference"
    assert set(asked) == {"reference", "cpp"}


def test_a_rule_answer_on_an_unmeasured_device_is_recalled_and_never_stored(fresh_cache, monkeypatch):
    # as on CUDA, where nothing is measured: the rule's answer follows from the call class, so later calls of the
    # class recall it (asking only its backend) instead of asking every backend and the rule again
    op = "_tune_unmeasured"
    asked = []

    def check(name):
        def reasons(x, *, n, auto=False):
            asked.append(name)
            return []
        return reasons

    dispatch.register_backend(op, "reference", priority=0, check=check("reference"))(lambda x, *, n: x * n)
    dispatch.register_backend(op, "cpp", priority=10, check=check("cpp"))(lambda x, *, n: x * n + 0)
    monkeypatch.setattr(autotune, "MEASURED_DEVICES", ())
    monkeypatch.setattr(autotune, "_measure", lambda *a, **k: pytest.fail("measured on an unmeasured device"))
    monkeypatch.setattr(autotune, "_store", lambda *a, **k: pytest.fail("a rule answer written to disk"))
    x = torch.ones(4)
    first = dispatch._choice(op, None, (x,), dict(n=2))[1]
    assert (first.backend, first.how) == ("cpp", "rule") and "not measured on cpu" in first.why
    del asked[:]
    assert dispatch._choice(op, None, (x,), dict(n=2))[1] is first
    assert asked == ["cpp"]
    assert not os.listdir(fresh_cache)


def test_grad_calls_are_measured_with_the_backward(fresh_cache):
    op = "_tune_grad"
    seen = []

    class Slow(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen.append("bwd")
            import time

            time.sleep(0.004)  # the fast path's forward is free, its backward is not
            return g * 2

    dispatch.register_backend(op, "reference", priority=0)(lambda x: x * 2)
    dispatch.register_backend(op, "cpp", priority=10)(lambda x: Slow.apply(x))
    x = torch.ones(8, requires_grad=True)
    assert dispatch._choice(op, None, (x,), {})[1].backend == "reference"
    assert seen and x.grad is None  # timed on copies: the caller's tensors get no gradient
    with torch.no_grad():
        c = dispatch._choice(op, None, (x,), {})[1]
    assert "nograd" in c.key and c.how == "measured"


def test_cache_round_trip_and_invalidation(fresh_cache, monkeypatch):
    op = _fake_op("_tune_cache", ref_s=0.004, fast_s=0.0)
    x = torch.ones(4)
    first = dispatch._choice(op, None, (x,), dict(n=1))[1]
    path = autotune.cache_path()
    assert path.startswith(str(fresh_cache)) and os.path.exists(path)
    import json

    data = json.load(open(path))
    assert data["machine"] == autotune.machine_key() and data["entries"][first.key]["backend"] == "cpp"
    # a new process: nothing in memory, the answer comes from disk without measuring
    monkeypatch.setattr(autotune, "_memo", {})
    monkeypatch.setattr(autotune, "_disk", None)
    monkeypatch.setattr(autotune, "_measure", lambda *a, **k: pytest.fail("measured although cached"))
    again = dispatch._choice(op, None, (x,), dict(n=1))[1]
    assert (again.backend, again.how, again.times_ms) == ("cpp", "cached", first.times_ms)
    # read from disk once: later calls of the class find it in this process's answers
    assert autotune._memo[first.key] is again
    monkeypatch.setattr(autotune, "load_cache", lambda: pytest.fail("read the disk cache again"))
    assert dispatch._choice(op, None, (x,), dict(n=1))[1] is again
    monkeypatch.undo()
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(fresh_cache))
    # another machine key (e.g. a rebuilt extension or another torch) does not see it
    monkeypatch.setattr(autotune, "_disk", None)
    monkeypatch.setattr(autotune, "_machine", {**autotune.machine_key(), "extension": "rebuilt"})
    assert autotune.load_cache() == {}
    # clearing removes the files and the memory
    monkeypatch.setattr(autotune, "_machine", None)
    assert path in autotune.clear_cache() and not os.path.exists(path)
    assert autotune.load_cache() == {}


@pytest.mark.skipif(not cpp.available(), reason="needs fusionblocks._C")
def test_a_forced_cpu_variant_has_a_cache_file_of_its_own(fresh_cache, monkeypatch):
    # FUSIONBLOCKS_CPU_ISA=<the widest variant> times that variant alone: its answers (cpp without a variant, or the
    # reference) must not become those of a process that times every variant, although the variant in use is the same
    monkeypatch.delenv(cpp.ISA_ENV, raising=False)
    monkeypatch.setattr(autotune, "_machine", None)
    auto_path, auto_isa = autotune.cache_path(), autotune.machine_key()["isa"]
    monkeypatch.setenv(cpp.ISA_ENV, cpp.supported_isas()[0])
    monkeypatch.setattr(autotune, "_machine", None)
    assert autotune.machine_key()["isa"] == auto_isa + " (forced)" and autotune.cache_path() != auto_path


def test_concurrent_writers_keep_the_cache_whole(fresh_cache):
    import threading

    choices = [autotune.Choice("op", "reference", "measured", "t", key=f"k{i}") for i in range(16)]
    threads = [threading.Thread(target=autotune._store, args=(c,)) for c in choices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    import json

    entries = json.load(open(autotune.cache_path()))["entries"]
    assert sorted(entries) == sorted(c.key for c in choices)


def test_a_failed_write_leaves_no_stray_file_and_clearing_removes_old_ones(fresh_cache, monkeypatch):
    # a full disk fails the write half-way: the op goes on, its answer stays in memory, and no temporary file
    # is left in the cache folder at each new call class; one a killed process left behind is cleared
    import errno
    import json

    def full(obj, f, **kw):
        f.write("{")
        raise OSError(errno.ENOSPC, "No space left on device")

    autotune._store(autotune.Choice("op", "reference", "measured", "t", key="k0"))
    monkeypatch.setattr(json, "dump", full)
    autotune._store(autotune.Choice("op", "reference", "measured", "t", key="k1"))
    monkeypatch.undo()
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(fresh_cache))
    cache = autotune.cache_dir()
    assert sorted(n for n in os.listdir(cache) if not n.endswith(".lock")) == [os.path.basename(autotune.cache_path())]
    assert list(json.load(open(autotune.cache_path()))["entries"]) == ["k0"]
    stray = os.path.join(cache, ".dispatch-kp3x9q2a")  # mkstemp's name of a write killed before its replace
    open(stray, "w").write('{"machine": ')
    assert stray in autotune.clear_cache() and os.listdir(cache) == []


def test_the_cache_file_is_as_readable_as_the_umask_allows(fresh_cache):
    # mkstemp made it 0600: other users of a shared FUSIONBLOCKS_CACHE_DIR measured everything again
    autotune._store(autotune.Choice("op", "reference", "measured", "t", key="k0"))
    mode = os.stat(autotune.cache_path()).st_mode & 0o777
    assert mode == 0o666 & ~autotune._umask() and mode & 0o044 == 0o044 & ~autotune._umask()


def test_the_cache_file_keeps_the_most_recently_measured_classes(fresh_cache, monkeypatch):
    # many input sizes (a class each) would grow the file, and the rewrite each new class costs, without bound
    import json

    monkeypatch.setattr(autotune, "MAX_CACHED", 3)
    for k in ("k0", "k1", "k2", "k3", "k4", "k2", "k5"):  # k2 measured again (e.g. by another process)
        autotune._store(autotune.Choice("op", "reference", "measured", "t", key=k))
    assert list(json.load(open(autotune.cache_path()))["entries"]) == ["k4", "k2", "k5"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_process_forked_while_another_thread_measures_can_measure(fresh_cache):
    # e.g. DataLoader workers forked while a thread of the parent measures a new call class: the child's copy of
    # the lock is held by a thread it does not have, and its first new call class would wait forever
    import threading

    held, done = threading.Event(), threading.Event()

    def measuring():
        with autotune._lock:
            held.set()
            done.wait(10)

    t = threading.Thread(target=measuring)
    t.start()
    held.wait(10)
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0 if autotune._lock.acquire(timeout=5) else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        done.set()
        t.join()
    assert os.waitstatus_to_exitcode(status) == 0


def test_env_off_uses_the_rule_and_never_measures(fresh_cache, monkeypatch):
    op = _fake_op("_tune_off", ref_s=0.004, fast_s=0.0)
    monkeypatch.setenv(autotune.ENV_TUNE, "off")
    monkeypatch.setattr(autotune, "_measure", lambda *a, **k: pytest.fail("measured with autotune off"))
    c = dispatch._choice(op, None, (torch.ones(4),), dict(n=1))[1]
    assert (c.backend, c.how) == ("reference", "rule") and "FUSIONBLOCKS_AUTOTUNE=off" in c.why
    assert not os.listdir(fresh_cache)
    monkeypatch.setenv(autotune.ENV_TUNE, "sometimes")
    with pytest.raises(ValueError, match="FUSIONBLOCKS_AUTOTUNE='sometimes'"):
        dispatch._choice(op, None, (torch.ones(4),), dict(n=1))


def test_env_backend_overrides_the_measured_choice(fresh_cache, monkeypatch):
    op = _fake_op("_tune_env", ref_s=0.004, fast_s=0.0)
    x = torch.ones(4)
    assert dispatch.select(op, None, x, n=1).name == "cpp"
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    c = dispatch._choice(op, None, (x,), dict(n=1))[1]
    assert (c.backend, c.how) == ("reference", "environment")


def test_the_calibrated_rule_for_full_decay():
    q = torch.zeros(1, 2, 28 * 28, 8)
    lg = torch.full((2,), -0.1)
    cands = [b for b in dispatch.backends_for("decay_attention").values()
             if b.name in ("reference", "cpp") and not b.reasons(q, q, q, lg, hw=(28, 28), mode="full", scale=1.0, auto=True)]
    if len(cands) < 2:
        pytest.skip("the cpp extension is not built here")
    full = autotune._rule("decay_attention", cands, (q, q, q, lg), dict(hw=(28, 28), mode="full"), q.device, "k", "t")
    dec = autotune._rule("decay_attention", cands, (q, q, q, lg), dict(hw=(28, 28), mode="decomposed"), q.device, "k", "t")
    assert full.backend == "cpp" and "rule:" in full.why
    assert dec.backend == "reference"


def _graph_ops(fn, *args):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend=capture)(*args)
    return out, "\n".join(graphs)


def test_exporting_is_false_under_torch_compile_and_true_under_export():
    # torch 2.11's dynamo traced torch.compiler.is_exporting() as True under any torch.compile
    # (pytorch/pytorch#176347): every compiled program then took the reference
    def f(x):
        return x + (1.0 if autotune.exporting() else 0.0)

    class M(torch.nn.Module):
        def forward(self, x):
            return f(x)

    torch._dynamo.reset()
    assert autotune.exporting() is False
    assert torch.compile(f, backend="eager", fullgraph=True)(torch.zeros(1)).item() == 0.0
    assert torch.export.export(M(), (torch.zeros(1),)).module()(torch.zeros(1)).item() == 1.0


@pytest.mark.skipif(not cpp.available(), reason="needs fusionblocks._C")
def test_jit_trace_records_the_reference_unless_a_backend_is_named(fresh_cache, monkeypatch):
    # torch.jit.trace recorded the automatic choice (here cpp, by the rule for a 28x28 full decay): a TorchScript
    # file that torch.jit.load refused without fusionblocks ("ops.fusionblocks_C.decay_full_fwd"), like an export
    monkeypatch.setenv(autotune.ENV_TUNE, "off")
    q = torch.randn(1, 2, 28 * 28, 8)
    lg = torch.tensor([-0.5, -1.0])

    def traced_ops(backend):
        fn = lambda q, k, v: ops.decay_attention(q, k, v, lg, hw=(28, 28), mode="full", backend=backend)  # noqa: E731
        traced = torch.jit.trace(fn, (q, q, q))
        torch.testing.assert_close(traced(q, q, q), fn(q, q, q))
        return [n.kind() for n in traced.inlined_graph.nodes() if "fusionblocks" in n.kind()]

    assert ops.choose("decay_attention", q, q, q, lg, hw=(28, 28), mode="full").backend == "cpp"
    assert traced_ops(None) == []
    assert traced_ops("cpp") != []


def test_compile_uses_the_known_choice_and_never_measures_in_the_trace(fresh_cache, monkeypatch):
    q = torch.randn(1, 2, 36, 8)
    lg = torch.tensor([-0.5, -1.0])
    args, kw = ops.dispatch.prepare("decay_attention", q, q, q, lg, hw=(6, 6), mode="decomposed")
    names = [n for n, r in ops.explain("decay_attention", q, q, q, lg, hw=(6, 6), mode="decomposed", auto=True).items() if not r]
    if "cpp" not in names:
        pytest.skip("the cpp extension is not built here")
    fn = lambda q: ops.decay_attention(q, q, q, lg, hw=(6, 6), mode="decomposed")  # noqa: E731
    monkeypatch.setattr(autotune, "_measure", lambda *a, **k: pytest.fail("measured inside a trace"))
    with torch.no_grad():
        # nothing known: the trace takes the (deterministic) rule answer and measures nothing
        _, g1 = _graph_ops(fn, q)
        _, g2 = _graph_ops(fn, q)
        assert g1 == g2 and "fusionblocks_C" not in g1 and autotune._memo == {}
        # an eager call measured it (here: set the answer): the trace follows that answer
        key = autotune.call_class("decay_attention", args, kw, grad=False)
        autotune._memo[key] = autotune.Choice("decay_attention", "cpp", "measured", "test", key)
        out, g3 = _graph_ops(fn, q)
        assert "fusionblocks_C.decay_dec_fwd" in g3
        assert (out - ops.decay_attention(q, q, q, lg, hw=(6, 6), mode="decomposed", backend="reference")).abs().max() < 1e-5
        # a known choice with a variant (the cpp kernels' instruction set): the variant is the calling thread's
        # setting, which a graph does not hold, so the trace runs the default one and makes no graph break
        variant = ops.cpp.supported_isas()[-1]
        autotune._memo[key] = autotune.Choice("decay_attention", "cpp", "measured", "test", key, variant=variant)
        torch._dynamo.reset()
        out, g4 = _graph_ops(fn, q)
        assert "fusionblocks_C.decay_dec_fwd" in g4
        assert (out - ops.decay_attention(q, q, q, lg, hw=(6, 6), mode="decomposed", backend="reference")).abs().max() < 1e-5


DYNAMIC_CASES = {
    # op -> (its options, its fourth argument (decay rates, bias table), the cpp kernel a graph shows)
    "decay_attention": (dict(hw=(6, 6), mode="decomposed"), lambda: torch.tensor([-0.5, -1.0]),
                        "fusionblocks_C.decay_dec_fwd"),
    "window_attention": (dict(hw=(6, 6), window_size=3, shift=1), lambda: torch.randn(25, 2),
                         "fusionblocks_C.window_fwd"),
}


@pytest.mark.parametrize("op", sorted(DYNAMIC_CASES))
def test_compile_with_dynamic_sizes_follows_the_answers_known_at_every_size(op, fresh_cache, monkeypatch):
    # torch.compile(dynamic=True), or a recompile after a new batch size: the batch is a symbol in the trace. The
    # call class cannot name it (dynamo failed on str(symbol) here before); the trace takes the answer known for
    # the class at every batch seen, and stays one graph for every batch.
    options, fourth, kernel = DYNAMIC_CASES[op]
    extra = fourth()
    public = getattr(ops, op)
    q = torch.randn(3, 2, 36, 8)
    if ops.explain(op, q, q, q, extra, auto=True, **options)["cpp"]:
        pytest.skip("the cpp extension is not built here")
    monkeypatch.setattr(autotune, "_measure", lambda *a, **k: pytest.fail("measured inside a trace"))

    def compiled_run(answers):
        autotune._memo.clear()
        for batch, backend in answers.items():
            q = torch.randn(batch, 2, 36, 8)
            key = autotune.call_class(op, *dispatch.prepare(op, q, q, q, extra, **options), grad=False)
            autotune._memo[key] = autotune.Choice(op, backend, "measured", "test", key)
        graphs = []

        def capture(gm, example_inputs):
            graphs.append(str(gm.graph))
            return gm.forward

        torch._dynamo.reset()
        compiled = torch.compile(lambda q: public(q, q, q, extra, **options), dynamic=True, fullgraph=True,
                                 backend=capture)
        with torch.no_grad():
            for batch in (3, 5, 7):
                q = torch.randn(batch, 2, 36, 8)
                assert (compiled(q) - public(q, q, q, extra, backend="reference", **options)).abs().max() < 1e-5
        assert len(graphs) == 1  # one graph, dynamic in the batch
        return graphs[0]

    assert kernel not in compiled_run({})  # nothing known: the rule (the reference on CPU)
    assert kernel in compiled_run({3: "cpp", 8: "cpp"})  # known at batches 3 (bucket 4) and 8: cpp
    assert kernel not in compiled_run({3: "cpp", 8: "reference"})  # they differ: the rule


def test_measuring_is_hidden_from_the_callers_modes_and_saved_tensor_hooks(fresh_cache):
    # `fusionblocks summary` counted the contenders' FLOPs and saved tensors while the first call of a class was
    # measured (a HiFuse at 64 px: 4.06 GFLOPs and 75.8 MiB on a first run, 3.45 GFLOPs and 19.9 MiB after)
    from torch.utils.flop_counter import FlopCounterMode

    op = "_tune_apart"
    dispatch.register_backend(op, "reference", priority=0)(lambda x: (x @ x).sin())
    dispatch.register_backend(op, "cpp", priority=10)(lambda x: (x @ x).cos())
    x = torch.randn(16, 16, requires_grad=True)
    packed = []
    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(
            lambda t: packed.append(t.shape) or t, lambda t: t):
        backend, choice = dispatch._choice(op, None, (x,), {})
        assert choice.how == "measured" and choice.rounds >= autotune.MIN_ROUNDS
        backend.fn(x)
    assert counter.get_total_flops() == 2 * 16 ** 3  # the one call's product, none of the measured ones
    calls_own = len(packed)
    packed.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t, lambda t: t):
        backend.fn(x)
    assert calls_own == len(packed) > 0  # the call's own saved tensors, none of the measured ones


def test_env_var_errors_name_the_variable(monkeypatch):
    args, kw = _args()
    monkeypatch.setenv(dispatch.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=f"unknown backend 'nonsense' \\(set by the environment variable {dispatch.ENV_VAR}\\)"):
        ops.decay_attention(*args, **kw)
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")  # no cuda backend of decay_attention
    with pytest.raises(ops.BackendUnavailable, match=f"backend 'cuda' \\(set by the environment variable {dispatch.ENV_VAR}\\)"):
        ops.decay_attention(*args, **kw)


@pytest.mark.parametrize("entry", [
    "cpp",  # not an object
    ["cpp"],
    {"op": "_tune_bad_entry", "backend": "cpp", "how": "measured", "why": "t", "from_a_newer_version": 1},
    {"op": "_tune_bad_entry", "backend": "cpp", "how": "measured"},  # no "why"
    {"op": "_tune_bad_entry", "backend": "cpp", "how": "measured", "why": "t", "times_ms": "fast"},
    {"op": "_tune_bad_entry", "backend": "cpp", "how": "measured", "why": "t", "variant": 3},
], ids=["string", "list", "unknown-field", "missing-field", "bad-times", "bad-variant"])
def test_a_malformed_cache_entry_is_measured_again(fresh_cache, entry):
    # a hand-edited cache, or one another version wrote under the same machine key: never a crash of the op,
    # of choose() or of `fusionblocks info` (which lists the cached choices)
    import json

    op = _fake_op("_tune_bad_entry", ref_s=0.004, fast_s=0.0)
    x = torch.ones(4)
    first = dispatch._choice(op, None, (x,), dict(n=1))[1]
    path = autotune.cache_path()
    data = json.load(open(path))
    data["entries"][first.key] = entry
    json.dump(data, open(path, "w"))
    autotune._memo.clear()
    autotune._disk = None
    assert first.key not in autotune.cached_choices()
    again = dispatch._choice(op, None, (x,), dict(n=1))[1]
    assert (again.backend, again.how) == ("cpp", "measured")
    assert json.load(open(path))["entries"][first.key]["how"] == "measured"  # the bad entry is replaced


@pytest.mark.parametrize("text", ["", '{"machine": ', "[1, 2]", "null", "\udcff", "[" * 100000],
                         ids=["empty", "truncated", "list", "null", "not-utf8", "deeply-nested"])
def test_a_cache_file_that_is_not_a_cache_is_measured_over(fresh_cache, text):
    # whatever the file holds, `import fusionblocks` (which reads it) and the op go on: the class is measured
    op = _fake_op("_tune_bad_file", ref_s=0.004, fast_s=0.0)
    with open(autotune.cache_path(), "w", errors="surrogateescape") as f:
        f.write(text)
    assert autotune.load_cache() == {}
    c = dispatch._choice(op, None, (torch.ones(4),), dict(n=1))[1]
    assert (c.backend, c.how) == ("cpp", "measured")


def test_explain_names_a_backend_argument_it_does_not_take():
    q = torch.randn(1, 1, 6, 4)
    with pytest.raises(TypeError, match=r"^explain: got backend='cpp', but explain takes the op's other arguments"):
        ops.explain("decay_attention", q, q, q, torch.zeros(1), hw=(2, 3), mode="full", backend="cpp")


def _transform_case(op):
    """A call of ``op`` (float64, 4x4 tokens, head dim 12: every backend's kernels take it) as f(q, backend)."""
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, 2, 16, 12, dtype=torch.float64, generator=g) for _ in range(2))
    if op == "window":
        table = torch.randn(9, 2, dtype=torch.float64, generator=g)
        return lambda q, backend: ops.window_attention(q, k, v, table, hw=(4, 4), window_size=2, shift=1,
                                                       backend=backend)
    lg = torch.tensor([-0.3, -1.0], dtype=torch.float64)
    return lambda q, backend: ops.decay_attention(q, k, v, lg, hw=(4, 4), mode=op, backend=backend)


@pytest.mark.parametrize("op", ["full", "decomposed", "window"])
def test_forward_ad_and_torch_func_transforms_run_the_reference(op, fresh_cache):
    # the fused kernels have no jvp and no functorch rules: the automatic choice measured them under the transform
    # and raised ("every backend failed while measuring"), or picked cpp, whose C++ autograd node raised; a named
    # Triton backend returned a zero jvp. Now only the reference runs there, and a named fast backend says why.
    from torch.autograd import forward_ad

    f = _transform_case(op)
    g = torch.Generator().manual_seed(1)
    q, tangent = (torch.randn(1, 2, 16, 12, dtype=torch.float64, generator=g) for _ in range(2))

    def dual_tangent(backend):
        with forward_ad.dual_level():
            return forward_ad.unpack_dual(f(forward_ad.make_dual(q, tangent), backend)).tangent

    runs = {
        "jvp": lambda b: torch.func.jvp(lambda x: f(x, b), (q,), (tangent,))[1],
        "dual": dual_tangent,
        "grad": lambda b: torch.func.grad(lambda x: f(x, b).square().sum())(q),
        "vmap": lambda b: torch.func.vmap(lambda x: f(x, b))(torch.stack([q, 2 * q, -q])),
    }
    for name, run in runs.items():
        want = run("reference")
        assert want.abs().max() > 0, name
        torch.testing.assert_close(run(None), want, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
    def runs_plainly(backend):
        try:
            f(q, backend)
        except ops.BackendUnavailable:
            return False
        return True

    runnable = [b for b in dispatch.BACKENDS if b != "reference" and runs_plainly(b)]
    assert "cpp" in runnable or not cpp.available()
    for backend in runnable:
        with pytest.raises(ops.BackendUnavailable, match=r"forward-mode AD \(dual tensors"):
            dual_tangent(backend)
        for name in ("jvp", "grad", "vmap"):
            with pytest.raises(ops.BackendUnavailable, match=r"torch\.func transforms .* run on the reference only"):
                runs[name](backend)
