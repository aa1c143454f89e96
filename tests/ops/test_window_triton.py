"""The Triton window-attention kernel against the reference, on CPU under the Triton interpreter.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports triton when there is no GPU;
the exact comparisons run in float64 there (the interpreter's ``tl.dot`` handles it; on a GPU they run in
float32 with IEEE dots against the float64 reference), plus float16 (and bfloat16 on GPU) runs judged by
flash-attn's rule.
"""

import pytest
import torch

pytest.importorskip("triton")

import fusionblocks.ops as ops  # noqa: E402
from fusionblocks.ops import reference  # noqa: E402
from fusionblocks.ops.triton import window as tw  # noqa: E402
from fusionblocks.ops.triton._common import interpreter_defect  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() and not tw._interpreting() else "cpu"
if DEV == "cpu" and not tw._interpreting():
    pytest.skip("no GPU and triton was imported without TRITON_INTERPRET=1", allow_module_level=True)
if DEV == "cpu" and interpreter_defect() is not None:
    pytest.skip(interpreter_defect(), allow_module_level=True)


# dtype of the exact comparisons and their tolerance against the float64 reference
EXACT, TOL = (torch.float64, 1e-10) if DEV == "cpu" else (torch.float32, 2e-5)


def _inputs(b, nh, h, w, ws, d, dtype, bias=True):
    q, k, v = (torch.randn(b, nh, h * w, d, dtype=dtype, device=DEV) for _ in range(3))
    table = torch.randn((2 * ws - 1) ** 2, nh, dtype=dtype, device=DEV) if bias else None
    return q, k, v, table


def _run(fn, q, k, v, table, grad, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    tab = table.detach().clone().requires_grad_(True) if table is not None else None
    out = fn(*leaves, tab, **kw)
    wrt = leaves + ([tab] if tab is not None else [])
    grads = torch.autograd.grad(out, wrt, grad)
    return (out,) + grads


def _triton(q, k, v, table, **kw):
    return ops.window_attention(q, k, v, table, backend="triton", **kw)


def _ref(q, k, v, table, **kw):
    return reference.window_attention(q, k, v, table, **kw)


NAMES = ("out", "dq", "dk", "dv", "dtable")


def _ref64(q, k, v, table, grad, **kw):
    up = [None if t is None else t.double() for t in (q, k, v, table)]
    return _run(_ref, *up, grad.double(), **kw)


def _assert_exact(got, want):
    assert len(got) == len(want)
    for name, g, r in zip(NAMES, got, want):
        assert g.shape == r.shape and g.dtype == EXACT, name
        torch.testing.assert_close(g.double(), r, rtol=TOL, atol=TOL, msg=lambda m: f"{name}: {m}")

# float32 on a GPU runs windows up to 8 and head dims up to 64 only (registers; tw.gpu_reasons): such cases are
# the interpreter's
GPU_REFUSES_FLOAT32 = pytest.mark.skipif(DEV == "cuda", reason="the GPU kernels refuse float32 at this window/head dim")

CASES = [
    # (B, heads, H, W, ws, shift, D, bias)
    pytest.param(2, 2, 8, 12, 4, 0, 12, True, id="8x12-ws4-unshifted-d12"),
    pytest.param(2, 2, 8, 12, 4, 2, 12, True, id="8x12-ws4-shift2-d12"),
    pytest.param(1, 2, 10, 15, 5, 2, 24, True, id="10x15-ws5-shift2-d24-b1"),
    pytest.param(1, 3, 10, 15, 5, 0, 24, False, id="10x15-ws5-nobias"),
    pytest.param(1, 2, 14, 21, 7, 3, 16, True, id="14x21-ws7-shift3"),
    pytest.param(2, 2, 14, 14, 7, 0, 32, True, id="14x14-ws7-unshifted-d32"),
    pytest.param(2, 3, 7, 7, 7, 3, 24, True, id="hifuse-7x7-ws7-shift3"),
    pytest.param(1, 1, 4, 6, 2, 1, 12, True, id="ws2-shift1"),
    pytest.param(1, 1, 12, 24, 12, 5, 20, True, id="ws12-shift5-d20", marks=GPU_REFUSES_FLOAT32),
]


def test_exact_cases_that_the_gpu_refuses_skip_there():
    """The exact cases run in float32 on a GPU: each one the GPU kernels refuse must skip there, not fail."""
    for case in CASES:
        b, nh, h, w, ws, shift, d, bias = case.values
        if tw.gpu_reasons(torch.float32, d, ws):
            assert GPU_REFUSES_FLOAT32 in case.marks, case.id


@pytest.mark.parametrize("b,nh,h,w,ws,shift,d,bias", CASES)
def test_matches_reference(b, nh, h, w, ws, shift, d, bias):
    q, k, v, table = _inputs(b, nh, h, w, ws, d, EXACT, bias)
    grad = torch.randn_like(q)
    kw = dict(hw=(h, w), window_size=ws, shift=shift, scale=None)
    got = _run(_triton, q, k, v, table, grad, **kw)
    assert len(got) == (5 if bias else 4)
    _assert_exact(got, _ref64(q, k, v, table, grad, **kw))


def test_strided_views_from_qkv_projection_and_custom_scale():
    b, nh, h, w, ws, d = 2, 3, 10, 10, 5, 12
    n = h * w
    qkv = torch.randn(b, n, 3, nh, d, dtype=EXACT, device=DEV)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, D) views, token stride 3*heads*D
    assert not q.is_contiguous()
    table = torch.randn(nh, (2 * ws - 1) ** 2, dtype=EXACT, device=DEV).t()  # transposed table
    grad = torch.randn(b, nh, d, n, dtype=EXACT, device=DEV).transpose(-1, -2)  # strided grad_out
    kw = dict(hw=(h, w), window_size=ws, shift=2, scale=0.3)
    _assert_exact(_run(_triton, q, k, v, table, grad, **kw), _ref64(q, k, v, table, grad, **kw))


def test_fp32_parity():
    q, k, v, table = _inputs(2, 2, 8, 8, 4, 16, torch.float32)
    grad = torch.randn_like(q)
    kw = dict(hw=(8, 8), window_size=4, shift=2, scale=None)
    got = _run(_triton, q, k, v, table, grad, **kw)
    want = _run(_ref, *(t.double() for t in (q, k, v, table)), grad.double(), **kw)
    for name, g, r in zip(NAMES, got, want):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("shift", [0, 3])
def test_half_within_twice_the_reference_half_error(shift, dtype):
    """flash-attn's rule: |fast16 - ref32| <= 2 * |ref16 - ref32| for the output and every gradient."""
    b, nh, h, w, ws, d = 2, 2, 14, 7, 7, 24
    q, k, v, table = _inputs(b, nh, h, w, ws, d, dtype)
    grad = torch.randn_like(q)
    kw = dict(hw=(h, w), window_size=ws, shift=shift, scale=None)
    fast = _run(_triton, q, k, v, table, grad, **kw)
    ref16 = _run(_ref, q, k, v, table, grad, **kw)
    ref32 = _run(_ref, *(t.float() for t in (q, k, v, table)), grad.float(), **kw)
    for name, f, r16, r32 in zip(NAMES, fast, ref16, ref32):
        assert f.dtype == dtype, name
        err = (f.float() - r32).abs().max().item()
        base = (r16.float() - r32).abs().max().item()
        assert err <= 2 * base, f"{name}: {dtype} triton error {err:.3g} > 2 x reference {dtype} error {base:.3g}"


def test_dispatch_reasons():
    q, k, v, table = _inputs(1, 2, 4, 4, 2, 16, torch.float32)
    kw = dict(hw=(4, 4), window_size=2, shift=1, scale=None)
    assert ops.explain("window_attention", q, k, v, table, **kw)["triton"] == []
    if DEV == "cpu":
        auto = ops.explain("window_attention", q, k, v, table, auto=True, **kw)["triton"]
        assert any("never chosen automatically" in r for r in auto)
        assert ops.dispatch.select("window_attention", None, q, k, v, table, **kw).name != "triton"
        bf = [t.bfloat16() for t in (q, k, v, table)]
        assert any("no bfloat16 tl.dot" in r for r in ops.explain("window_attention", *bf, **kw)["triton"])
    small = torch.randn(1, 2, 16, 8, device=DEV)
    assert any("head dim 8" in r for r in ops.explain("window_attention", small, small, small, None, **kw)["triton"])
    big = torch.randn(1, 1, 13 * 13, 16, device=DEV)
    reasons = ops.explain("window_attention", big, big, big, None, hw=(13, 13), window_size=13, shift=0, scale=None)
    assert any("window_size 13" in r for r in reasons["triton"])
    with pytest.raises(ops.BackendUnavailable, match="head dim 8"):
        ops.window_attention(small, small, small, None, backend="triton", **kw)


def test_opcheck():
    q, k, v, table = _inputs(1, 2, 4, 4, 2, 12, EXACT)
    args = [t.requires_grad_(True) for t in (q, k, v, table)] + [4, 4, 2, 1, 0.25]
    torch.library.opcheck(torch.ops.fusionblocks.window_attention_fwd.default, args)
    args_nobias = [q, k, v, None, 4, 4, 2, 0, 0.25]
    torch.library.opcheck(torch.ops.fusionblocks.window_attention_fwd.default, args_nobias)
    plain = [t.detach() for t in (q, k, v, table)] + [4, 4, 2, 1, 0.25]
    torch.library.opcheck(torch.ops.fusionblocks.window_attention_infer.default, plain)


def test_no_grad_path_matches():
    q, k, v, table = _inputs(2, 2, 8, 12, 4, 12, EXACT)
    kw = dict(hw=(8, 12), window_size=4, shift=2, scale=None)
    with torch.no_grad():
        got = _triton(q, k, v, table, **kw)
    want = _ref(*(t.double() for t in (q, k, v, table)), **kw)
    assert got.dtype == EXACT
    torch.testing.assert_close(got.double(), want, rtol=TOL, atol=TOL)


def test_torch_compile_fullgraph():
    q, k, v, table = _inputs(1, 2, 8, 8, 4, 16, EXACT)
    grad = torch.randn_like(q)
    kw = dict(hw=(8, 8), window_size=4, shift=2, scale=None)

    def f(q, k, v, table):
        return _triton(q, k, v, table, **kw) * 2.0

    ops.dispatch.backends_for("window_attention")  # provider imports cannot be traced: load them eagerly first
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    want = _run(lambda *a: _ref(*a, **kw) * 2.0, q.double(), k.double(), v.double(), table.double(), grad.double())
    _assert_exact(_run(compiled, q, k, v, table, grad), want)


@pytest.mark.parametrize("wpp", [1, 3, 100])
def test_bias_grad_reduction_independent_of_windows_per_program(wpp):
    b, nh, h, w, ws, d = 2, 2, 8, 12, 4, 12
    q, k, v, table = _inputs(b, nh, h, w, ws, d, EXACT)
    scale = d ** -0.5
    out, lse = tw._fwd_launch(q, k, v, table, h, w, ws, 2, scale)
    grad = torch.randn_like(q)
    dq, dk, dv, dtab = tw._bwd_launch(grad, q, k, v, out, lse, table, h, w, ws, 2, scale, wpp=wpp)
    want = _ref64(q, k, v, table, grad, hw=(h, w), window_size=ws, shift=2, scale=None)
    _assert_exact((out, dq, dk, dv, dtab), want)


@pytest.mark.parametrize("values", [dict(window_backward_programs_per_sm=1), dict(window_backward_programs_per_sm=16),
                                    dict(window_backward_num_warps=4)], ids=str)
def test_backward_tuning_values_change_no_result(values):
    """gpu_check times the backward under other tuning values (``_common.tuned``); each must give the reference's gradients."""
    from fusionblocks.ops.triton._common import tuned

    b, nh, h, w, ws, d = 2, 2, 8, 12, 4, 12
    with tuned(**values):
        if "window_backward_programs_per_sm" in values:  # CPU: the value is the whole program target
            per = max(1, values["window_backward_programs_per_sm"] // nh)
            assert tw._windows_per_program(b * 6, nh, torch.device("cpu")) == -(-b * 6 // per)
        q, k, v, table = _inputs(b, nh, h, w, ws, d, EXACT)
        scale = d ** -0.5
        out, lse = tw._fwd_launch(q, k, v, table, h, w, ws, 2, scale)
        grad = torch.randn_like(q)
        got = (out,) + tuple(tw._bwd_launch(grad, q, k, v, out, lse, table, h, w, ws, 2, scale))
    _assert_exact(got, _ref64(q, k, v, table, grad, hw=(h, w), window_size=ws, shift=2, scale=None))


@pytest.mark.parametrize("name", ["hifuse.global_layer", "hifuse.global_layer_merge", "hifuse.global_layer_7x7"])
def test_hifuse_golden_global_layers_through_the_module(name):
    """The official HiFuse BasicLayer fixtures (W-MSA + SW-MSA, incl. the shifted 7x7 stage 4) with this backend."""
    window_layers = pytest.importorskip("fusionblocks.layers.window")
    from golden_utils import block, make_input, official_state_dict, rel_err

    cfg = {
        "hifuse.global_layer": dict(dim=96, depth=2, num_heads=3),
        "hifuse.global_layer_merge": dict(dim=192, depth=2, num_heads=6, in_dim=96),
        "hifuse.global_layer_7x7": dict(dim=768, depth=2, num_heads=24),
    }[name]
    rec = block(name)
    stage = window_layers.HiFuseGlobalStage(**cfg, backend="triton").eval().to(DEV)
    dropped = ("norm2.", "relative_position_index")
    sd = {k: v for k, v in official_state_dict(rec).items() if not any(s in k for s in dropped)}
    stage.load_state_dict(sd, strict=True)
    x, h, w = (make_input(s) for s in rec["inputs"])
    with torch.no_grad():
        out = stage(x.view(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2).to(DEV))
    out = out.flatten(2).transpose(1, 2).cpu()
    assert out.shape == rec["output"].shape
    assert rel_err(out, rec["output"]) <= 1e-5


# ------------------------------------------------------------------------- issue 12's kernel defects


@pytest.mark.parametrize("ws", [2, 5, 7, 12])
def test_bias_table_gradient_segment_sum_matches_index_add(ws):
    """The deterministic reduction (padded segment sum, no ``index_add_``) of the per-pair bias gradients."""
    nh, big_l = 3, ws * ws
    pair = torch.randn(nh, big_l * big_l, dtype=torch.float64)
    want = torch.zeros((2 * ws - 1) ** 2, nh, dtype=torch.float64)
    want.index_add_(0, reference.relative_position_index(ws).reshape(-1), pair.t())
    got = tw._table_grad(pair, ws)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    seg = tw._table_segments(ws, torch.device("cpu"))
    counts = (seg < big_l * big_l).sum(1)  # row (dy, dx) is read by (ws - |dy|) * (ws - |dx|) pairs
    assert int(counts.max()) == big_l and int(counts.sum()) == big_l * big_l


def test_bias_gradient_is_bitwise_reproducible():
    b, nh, h, w, ws, d = 1, 1, 8, 8, 4, 12
    q, k, v, table = _inputs(b, nh, h, w, ws, d, torch.float32)
    grad = torch.randn_like(q)
    kw = dict(hw=(h, w), window_size=ws, shift=2, scale=None)
    first, second = (_run(_triton, q, k, v, table, grad, **kw) for _ in range(2))
    for name, a, c in zip(NAMES, first, second):
        assert torch.equal(a, c), name


def test_dense_bias_is_the_table_gathered_once():
    ws, nh = 3, 2
    table = torch.randn((2 * ws - 1) ** 2, nh, dtype=torch.float64)
    dense = tw._dense_bias(table, ws, torch.float64)
    idx = reference.relative_position_index(ws)
    assert dense.shape == (nh, ws * ws, ws * ws) and dense.is_contiguous()
    torch.testing.assert_close(dense, table[idx.reshape(-1)].t().reshape(nh, ws * ws, ws * ws), rtol=0, atol=0)


def test_any_batch_runs_on_the_one_dimensional_grid():
    """B*heads above 65535 (CUDA's grid y limit, the old forward grid) is served; only 2**31 programs are not."""
    q = torch.empty(70000, 1, 49, 32, device="meta")
    reasons = tw.check_window_triton(q, q, q, None, hw=(7, 7), window_size=7, shift=0, scale=None)
    assert not any("grid" in r for r in reasons), reasons
    huge = torch.empty(2**25, 1, 56 * 56, 32, device="meta")
    reasons = tw.check_window_triton(huge, huge, huge, None, hw=(56, 56), window_size=7, shift=0, scale=None)
    assert any("grid limit" in r for r in reasons), reasons


@pytest.mark.parametrize("limit_kb,dtype,ws,d,fits", [
    (64, torch.bfloat16, 7, 32, True),     # T4: HiFuse's windows fit
    (64, torch.float32, 7, 64, False),     # T4: float32 at head dim 64 does not, with a reason
    (99, torch.bfloat16, 11, 128, False),  # sm_86/89: 128-token tiles at head dim 128 do not
    (227, torch.bfloat16, 11, 128, True),  # sm_90: they do
    (227, torch.bfloat16, 12, 32, False),  # window 12 (256-token tiles) fits nowhere
])
def test_gpu_reasons_follow_the_devices_shared_memory(limit_kb, dtype, ws, d, fits):
    reasons = tw.gpu_reasons(dtype, d, ws, limit_kb * 1024)
    assert (not reasons) == fits, reasons
    if not fits:
        assert "KB" in reasons[0] or "float32" in reasons[0]


def test_gpu_reasons_hands_out_a_fresh_list():
    # memoized (the support check asks on every call): a caller that extends its list changes no later answer
    first = tw.gpu_reasons(torch.float32, 128, 7, 227 * 1024)
    assert len(first) == 1 and "float32" in first[0]
    first.append("changed by a caller")
    assert tw.gpu_reasons(torch.float32, 128, 7, 227 * 1024) == first[:1]


@pytest.mark.parametrize("shape", [(0, 2, 16, 16), (2, 0, 16, 16)], ids=["no-batch", "no-heads"])
def test_empty_batch_forward_and_backward(shape):
    q, k, v = (torch.randn(shape, device=DEV, requires_grad=True) for _ in range(3))
    table = torch.randn(9, shape[1], device=DEV, requires_grad=True)
    out = ops.window_attention(q, k, v, table, hw=(4, 4), window_size=2, shift=1, backend="triton")
    assert out.shape == shape
    out.sum().backward()
    assert q.grad.shape == shape
    torch.testing.assert_close(table.grad, torch.zeros_like(table))
