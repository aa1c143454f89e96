"""Every Triton kernel configuration the launchers can choose, cross-compiled for sm_90 (H100/H200) without a GPU.

The Triton interpreter accepts what the GPU compiler may reject (``tl.dot`` shape rules, unsupported
ops) and says nothing about registers or shared memory. Here Triton's bundled ``ptxas`` compiles each
configuration of ``fusionblocks.ops.triton.{window,decay}.compile_specs()`` (derived from the
launchers' own ``_config`` functions) to a cubin in a child process with ``TRITON_INTERPRET`` unset
(a triton imported in interpreter mode cannot compile for a GPU), and the test asserts what must hold
on a real sm_90: every configuration compiles, fits the 227 KB of shared memory per block, its
shared memory is within the launchers' estimate (which picks configurations for GPUs with less:
sm_86/89, the T4), and the common ones (decay head dims 16-64, the window-size-7 forward) do not
spill registers; the window-size-7 backward and the float32 window with head dims 33-64 still
spill (a strict xfail tracks them; a fix needs the kernel restructured, not other launch options).

Register and spill counts depend on the Triton version's code generation: they are asserted only
with the Triton release they were calibrated with (:data:`SPILLS_CALIBRATED_WITH`) and reported
(as a skip with the numbers) under any other. Compiling, fitting the shared memory and staying
within the estimate are requirements on every version: a configuration over the device's limit
fails at launch. To stay fast the test
compiles the ``quick`` set (constexpr flags all on, bfloat16 standing for float16: same tiles and
code); Triton's compile cache makes reruns faster still. ``benchmarks/triton_resources.py`` compiles
and tabulates the full set (flags on and off, all three dtypes).

The other tests check the backends' reasons when triton and ``TRITON_INTERPRET`` disagree.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

from fusionblocks.ops.triton import _common, decay, window  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SPILLS_CALIBRATED_WITH = "3.9"
"""Triton release (major.minor) whose sm_90 spill counts the spill tests were calibrated with
(``benchmarks/results/triton-sm90-resources.md``)."""
TRITON_RELEASE = ".".join(triton.__version__.split(".")[:2])
CALIBRATED = TRITON_RELEASE == SPILLS_CALIBRATED_WITH


DECAY_ROLES = {"_decay_fwd_kernel": "fwd", "_decay_bwd_dq_kernel": "dq", "_decay_bwd_dkdv_kernel": "dkdv",
               "_decay_bwd_fused_kernel": "fused"}
"""Each decay kernel (but the delta kernel) and its ``kernel`` name in ``decay.shared_estimate``."""


def _spills_only_where_calibrated(report):
    """Skip, with ``report``, unless this Triton is the release the spill counts were calibrated with."""
    if not CALIBRATED:
        pytest.skip(f"spill counts calibrated with Triton {SPILLS_CALIBRATED_WITH}, this is {triton.__version__}; "
                    f"report only: {report}")


def _child_env(interpret=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    return env


def _python(code, env, timeout=900):
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"child failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    """Cross-compile results of every spec, keyed by ``_common.spec_key``."""
    out = tmp_path_factory.mktemp("aot") / "results.json"
    _python(
        f"""
        import json
        from fusionblocks.ops.triton import _common
        json.dump(_common.cross_compile_all(_common.all_compile_specs(quick=True), arch=90), open({str(out)!r}, "w"))
        """,
        _child_env(),
    )
    return {_common.spec_key(r): r for r in json.load(open(out))}


def _specs(quick=False):
    return _common.all_compile_specs(quick=quick)


def _name(r):
    return f"{r['group']} {r['dtype']} {r['label']} warps={r['num_warps']} stages={r['num_stages']}"


def test_specs_cover_every_kernel_dtype_and_flag():
    specs = _specs()
    assert len({_common.spec_key(s) for s in specs}) == len(specs)
    kernels = {(s["kernel"], s["dtype"]) for s in specs}
    names = ("_window_fwd_kernel", "_window_bwd_kernel", "_decay_fwd_kernel", "_decay_delta_kernel",
             "_decay_bwd_dkdv_kernel", "_decay_bwd_dq_kernel", "_decay_bwd_fused_kernel")
    assert kernels == {(k, d) for k in names for d in ("float32", "float16", "bfloat16")}
    wfwd = [s["constexprs"] for s in specs if s["kernel"] == "_window_fwd_kernel"]
    assert {(c["HAS_BIAS"], c["SHIFT"] > 0, c["STORE_LSE"]) for c in wfwd} >= {(True, True, True), (False, False, False), (True, True, False)}
    assert {c["BLOCK_L"] for c in wfwd} == {16, 32, 64, 128}
    assert {c["BLOCK_D"] for c in wfwd} == {16, 32, 64, 128}
    dq = [s["constexprs"] for s in specs if s["kernel"] == "_decay_bwd_dq_kernel"]
    assert {(c["ACCUM_DQ"], c["WITH_DLG"]) for c in dq} >= {(True, True), (False, False)}
    fused = [s["constexprs"] for s in specs if s["kernel"] == "_decay_bwd_fused_kernel"]
    assert {(c["ACCUM"], c["WITH_DLG"]) for c in fused} >= {(True, True), (False, False)}
    assert {c["BLOCK_N"] for c in fused} == {16, 32, 64}


def test_every_launch_config_is_a_spec():
    """What the launchers choose for any supported shape is among the compiled specs (up to D/WS/shift values)."""
    import torch

    def tiles(s):
        c = s["constexprs"]
        return (s["kernel"], s["dtype"], s["num_warps"], s["num_stages"],
                tuple(c.get(k) for k in ("BLOCK_L", "BLOCK_M", "BLOCK_N", "BLOCK_D", "PREC")))

    have = {tiles(s) for s in _specs()}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        for d in (12, 13, 31, 32, 33, 80, 128):
            for ws in range(window.MIN_WINDOW, window.MAX_WINDOW + 1):
                if window.gpu_reasons(dtype, d, ws):
                    continue
                for kernel, bwd in (("_window_fwd_kernel", False), ("_window_bwd_kernel", True)):
                    cfg = window._config(dtype, d, ws, bwd)
                    fake = dict(kernel=kernel, dtype=name, num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3), constexprs=cfg)
                    assert tiles(fake) in have, (kernel, dtype, d, ws)
            for n in (1, 7, 17, 49, 56, 196, 3136):
                for kernel, bwd in (("_decay_fwd_kernel", False), ("_decay_bwd_dq_kernel", True), ("_decay_bwd_dkdv_kernel", True),
                                    ("_decay_bwd_fused_kernel", True)):
                    if kernel == "_decay_bwd_fused_kernel":
                        cfg = decay._fused_config(n, d, dtype, interpreted=False)
                        if cfg is None:
                            continue
                    else:
                        cfg = decay._config(n, d, bwd, dtype, interpreted=False)
                    fake = dict(kernel=kernel, dtype=name, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                                constexprs=dict(cfg, PREC=decay._precision(dtype)))
                    assert tiles(fake) in have, (kernel, dtype, d, n)


def test_every_config_compiles_for_sm90(sm90):
    failed = [f"{_name(r)}: {r['error'][:300]}" for r in sm90.values() if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert len(sm90) == len(_specs(quick=True))


def test_shared_memory_fits_sm90(sm90):
    over = [f"{_name(r)}: {r['shared']} bytes" for r in sm90.values() if r["ok"] and r["shared"] > _common.SM90_MAX_SHARED]
    assert not over, f"over the {_common.SM90_MAX_SHARED}-byte sm_90 limit:\n" + "\n".join(over)


def test_shared_memory_within_the_launchers_estimate(sm90):
    """The estimate that picks configurations for smaller GPUs bounds what each compiled one uses."""
    import torch

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    under, checked = [], 0
    for r in sm90.values():
        if not r["ok"] or r["kernel"] == "_decay_delta_kernel":
            continue
        c, dtype = r["constexprs"], dtypes[r["dtype"]]
        if r["kernel"].startswith("_window"):
            est = window.shared_estimate(dtype, c["D"], c["WS"], r["kernel"] == "_window_bwd_kernel")
        else:
            est = decay.shared_estimate(dict(c, num_stages=r["num_stages"]), dtype, DECAY_ROLES[r["kernel"]])
        checked += 1
        if r["shared"] > est:
            under.append(f"{_name(r)}: {r['shared']} bytes > estimate {est}")
    assert checked >= 50 and not under, "\n".join(under)


@pytest.mark.parametrize("arch", [75, 80, 86, 89])
def test_configs_chosen_for_smaller_gpus_fit_their_shared_memory(arch):
    """The launchers' choices under a smaller opt-in limit (table by capability) fit it by the estimate."""
    import torch

    limit = _common.shared_bytes_of_capability(arch)
    assert limit < _common.SM90_MAX_SHARED
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    specs = _common.all_compile_specs(arch=arch)
    assert specs
    for s in specs:
        c, dtype = s["constexprs"], dtypes[s["dtype"]]
        if s["kernel"] in DECAY_ROLES:
            assert decay.shared_estimate(dict(c, num_stages=s["num_stages"]), dtype, DECAY_ROLES[s["kernel"]]) <= limit, _name(s)
        elif s["kernel"].startswith("_window"):
            assert window.shared_estimate(dtype, c["D"], c["WS"], s["kernel"] == "_window_bwd_kernel") <= limit, _name(s)
    # what does not fit is refused with a reason naming the limit, not launched
    reasons = window.gpu_reasons(torch.bfloat16, 128, 11, limit)
    assert reasons and f"{limit // 1024} KB" in reasons[0]


def _covers(label, key, value):
    words = label.split()
    lo, hi = (int(x) for x in words[words.index(key) + 1].split("-"))
    return lo <= value <= hi


def _window_ws7(r):
    return r["ok"] and r["group"].startswith("window") and _covers(r["label"], "ws", 7)


def _ws7_known_spills(r):
    """Window size 7 configurations that still spill (see the module docstring); the xfail test below tracks them."""
    return r["group"] == "window bwd" or (r["dtype"] == "float32" and not _covers(r["label"], "d", 32))


def test_common_configs_do_not_spill(sm90):
    """Decay head dims 16-64 (RMT) and the window-size-7 forward (Swin, HiFuse) keep everything in registers."""
    decay = [r for r in sm90.values() if r["ok"] and r["group"].startswith("decay")
             and any(_covers(r["label"], "d", d) for d in (16, 32, 64))]
    window = [r for r in sm90.values() if _window_ws7(r) and not _ws7_known_spills(r)]
    assert len(decay) >= 40 and len(window) >= 6
    spilling = [f"{_name(r)}: {r['regs']} regs, {r['spills']} spills" for r in decay + window if r["spills"]]
    _spills_only_where_calibrated(f"{len(spilling)} of {len(decay + window)} spill: " + "; ".join(spilling))
    assert not spilling, "\n".join(spilling)


@pytest.mark.xfail(CALIBRATED, strict=True, reason="known: the window backward at ws 6-8 (one program holds five 64x64 tiles "
                   "and the bias-gradient sum) and the float32 window at ws 6-8 with head dim 33-64 spill on sm_90")
def test_window_ws7_backward_and_float32_d64_do_not_spill(sm90):
    known = [r for r in sm90.values() if _window_ws7(r) and _ws7_known_spills(r)]
    assert len(known) >= 4
    spilling = [f"{_name(r)}: {r['regs']} regs, {r['spills']} spills" for r in known if r["spills"]]
    _spills_only_where_calibrated(f"{len(spilling)} of {len(known)} spill: " + "; ".join(spilling))
    assert not spilling, "\n".join(spilling)


# ------------------------------------------------------------------------------------------------
# triton imported in one mode, TRITON_INTERPRET set to the other


_MISMATCH = """
    import os, torch
    {prelude}
    import fusionblocks.ops as ops
    from fusionblocks.ops import BackendUnavailable
    os.environ["TRITON_INTERPRET"] = "1"
    q = torch.randn(1, 2, 16, 16)
    lg = torch.tensor([-0.5, -0.2])
    w = ops.explain("window_attention", q, q, q, None, hw=(4, 4), window_size=2, shift=1, scale=None)["triton"]
    d = ops.explain("decay_attention", q, q, q, lg, hw=(4, 4), mode="full", scale=None)["triton"]
    print("WINDOW", w)
    print("DECAY", d)
    for call in (lambda: ops.window_attention(q, q, q, None, hw=(4, 4), window_size=2, backend="triton"),
                 lambda: ops.decay_attention(q, q, q, lg, hw=(4, 4), backend="triton")):
        try:
            call()
            print("RAN")
        except BackendUnavailable as e:
            print("UNAVAILABLE", str(e).count("TRITON_INTERPRET"))
"""


def test_interpreter_requested_after_triton_was_imported_for_gpu():
    """Setting TRITON_INTERPRET=1 after triton's import is a reason, not a crash."""
    out = _python(_MISMATCH.format(prelude="import triton"), _child_env())
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines() if line.startswith(("WINDOW", "DECAY")))
    for name in ("WINDOW", "DECAY"):
        reasons = eval(lines[name])
        assert sum("imported before TRITON_INTERPRET=1" in r for r in reasons) == 1, reasons
    assert out.count("UNAVAILABLE") == 2 and "RAN" not in out, out


def test_kernel_module_imported_while_interpreter_unset():
    """The kernels follow triton's own build, not TRITON_INTERPRET at their module's import."""
    code = """
        import os, torch
        import triton
        os.environ.pop("TRITON_INTERPRET")
        import fusionblocks.ops as ops
        import fusionblocks.ops.triton.window as tw
        import fusionblocks.ops.triton.decay as td
        os.environ["TRITON_INTERPRET"] = "1"
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 2, 16, 16, dtype=torch.float64) for _ in range(3))
        table = torch.randn(9, 2, dtype=torch.float64)
        kw = dict(hw=(4, 4), window_size=2, shift=1, scale=None)
        assert ops.explain("window_attention", q, k, v, table, **kw)["triton"] == []
        got = ops.window_attention(q, k, v, table, backend="triton", **kw)
        want = ops.window_attention(q, k, v, table, backend="reference", **kw)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        lg = torch.tensor([-0.5, -0.2], dtype=torch.float64)
        got = ops.decay_attention(q, k, v, lg, hw=(4, 4), backend="triton")
        torch.testing.assert_close(got, ops.decay_attention(q, k, v, lg, hw=(4, 4), backend="reference"), rtol=1e-10, atol=1e-10)
        print("OK", type(tw._window_fwd_kernel.kernel()).__name__)
    """
    out = _python(code, _child_env(interpret="1"))
    assert "OK InterpretedFunction" in out, out
