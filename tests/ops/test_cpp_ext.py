"""The compiled extension ``fusionblocks._C`` (``cpp`` backend): parity of outputs and of every gradient
with the reference (for every CPU kernel variant this machine runs), the ISA switch, dispatch reasons,
opcheck / torch.compile, and the golden blocks on the cpp kernels."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

import fusionblocks.ops.cpp as cpp
from fusionblocks.ops import decay_attention, explain, reference, select, window_attention

needs_ext = pytest.mark.skipif(not cpp.available(), reason=f"fusionblocks._C not built: {cpp.LOAD_ERROR}")


def test_extension_is_built_where_a_compiler_is():
    if os.environ.get("FUSIONBLOCKS_NO_EXT") or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler here, or the extension was switched off")
    assert cpp.available(), f"fusionblocks._C failed to load: {cpp.LOAD_ERROR}; {cpp.BUILD_HINT}"


def _qkv(b, heads, n, d, dtype=torch.float64, noncontig=False):
    if noncontig:  # views of a packed (B, N, 3, heads, D) projection, as attention layers produce them
        qkv = torch.randn(b, n, 3, heads, d, dtype=dtype).permute(2, 0, 3, 1, 4)
        return [t.requires_grad_() for t in (qkv[0].detach(), qkv[1].detach(), qkv[2].detach())]
    return [torch.randn(b, heads, n, d, dtype=dtype, requires_grad=True) for _ in range(3)]


def _grads(out, inputs, g):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, g)


def _assert_parity(ref_fn, cpp_fn, inputs, atol, rtol):
    out_ref, out_cpp = ref_fn(*inputs), cpp_fn(*inputs)
    torch.testing.assert_close(out_cpp, out_ref, atol=atol, rtol=rtol)
    g = torch.randn_like(out_ref)
    for got, want in zip(_grads(out_cpp, inputs, g), _grads(out_ref, inputs, g)):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def _decay_case(mode, hw, b, heads, d, dtype=torch.float64, noncontig=False, lg_grad=True):
    q, k, v = _qkv(b, heads, hw[0] * hw[1], d, dtype, noncontig)
    assert not noncontig or not q.is_contiguous()
    log_gamma = torch.log(1 - 2.0 ** (-5 - torch.arange(heads, dtype=dtype))).requires_grad_(lg_grad)
    return q, k, v, log_gamma


# ---------------------------------------------------------------- decay attention


@needs_ext
@pytest.mark.parametrize("mode", ["full", "decomposed"])
@pytest.mark.parametrize("hw, b, noncontig", [((5, 7), 2, False), ((13, 11), 1, True), ((1, 1), 1, False), ((1, 9), 1, True)])
def test_decay_float64_parity(mode, hw, b, noncontig):
    inputs = _decay_case(mode, hw, b, 3, 16, noncontig=noncontig)
    _assert_parity(
        lambda *a: reference.decay_attention(*a, hw=hw, mode=mode),
        lambda *a: decay_attention(*a, hw=hw, mode=mode, backend="cpp"),
        inputs, atol=1e-10, rtol=1e-9,
    )


@needs_ext
@pytest.mark.parametrize("mode", ["full", "decomposed"])
@pytest.mark.parametrize("d", [12, 16, 24, 32, 48, 64, 96])
def test_decay_head_dims(mode, d):
    hw = (4, 6)
    inputs = _decay_case(mode, hw, 1, 2, d)
    _assert_parity(
        lambda *a: reference.decay_attention(*a, hw=hw, mode=mode, scale=0.3),
        lambda *a: decay_attention(*a, hw=hw, mode=mode, scale=0.3, backend="cpp"),
        inputs, atol=1e-10, rtol=1e-9,
    )


@needs_ext
@pytest.mark.parametrize("mode, hw, heads", [("full", (23, 29), 2), ("full", (23, 29), 1), ("decomposed", (3, 150), 2),
                                             ("decomposed", (131, 2), 2)])
def test_decay_several_query_and_key_blocks(mode, hw, heads):
    """More tokens than one query block (64) and, for full, than one key block (512): the online softmax;
    with one head on two threads the full backward also splits the keys across threads."""
    inputs = _decay_case(mode, hw, 1, heads, 8)
    with torch.no_grad():
        inputs[0].mul_(3)  # sharper rows: the running maximum changes between key blocks
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        _assert_parity(
            lambda *a: reference.decay_attention(*a, hw=hw, mode=mode),
            lambda *a: decay_attention(*a, hw=hw, mode=mode, backend="cpp"),
            inputs, atol=1e-10, rtol=1e-9,
        )
    finally:
        torch.set_num_threads(threads)


@needs_ext
@pytest.mark.parametrize("mode", ["full", "decomposed"])
def test_decay_gradcheck(mode):
    q, k, v, lg = _decay_case(mode, (3, 4), 1, 2, 4)
    assert torch.autograd.gradcheck(
        lambda *a: decay_attention(*a, hw=(3, 4), mode=mode, backend="cpp"), (q, k, v, lg), atol=1e-8
    )


@needs_ext
def test_double_backward_raises_clearly():
    q, k, v, lg = _decay_case("full", (2, 3), 1, 1, 4)
    (dq,) = torch.autograd.grad(decay_attention(q, k, v, lg, hw=(2, 3), backend="cpp").sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        dq.sum().backward()


def _low_precision_rule(ref_fn, cpp_fn, inputs64, dtype):
    """flash-attn's rule: |cpp(low) - ref(fp64)| <= 2 |ref(low) - ref(fp64)| + floor, outputs and gradients."""
    low = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in inputs64]
    out64, out_ref, out_cpp = ref_fn(*inputs64), ref_fn(*low), cpp_fn(*low)
    assert out_cpp.dtype == dtype
    g = torch.randn_like(out64)
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    pairs = [(out_cpp, out_ref, out64)] + list(
        zip(_grads(out_cpp, low, g.to(dtype)), _grads(out_ref, low, g.to(dtype)), _grads(out64, inputs64, g))
    )
    for got, ref_low, want in pairs:
        err_cpp = (got.double() - want).abs().max().item()
        err_ref = (ref_low.double() - want).abs().max().item()
        assert err_cpp <= 2 * err_ref + floor * want.abs().max().item(), (err_cpp, err_ref)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["full", "decomposed"])
def test_decay_low_precision(mode, dtype):
    hw = (9, 7)
    inputs = _decay_case(mode, hw, 2, 4, 32)
    _low_precision_rule(
        lambda *a: reference.decay_attention(*a, hw=hw, mode=mode),
        lambda *a: decay_attention(*a, hw=hw, mode=mode, backend="cpp"),
        inputs, dtype,
    )


@needs_ext
def test_decay_log_gamma_float32_with_float64_qkv():
    q, k, v, lg = _decay_case("full", (3, 5), 1, 2, 8)
    lg32 = lg.detach().float().requires_grad_()
    out = decay_attention(q, k, v, lg32, hw=(3, 5), backend="cpp")
    out.sum().backward()
    assert out.dtype == torch.float64 and lg32.grad.dtype == torch.float32
    ref = reference.decay_attention(q, k, v, lg32.detach().double().requires_grad_(), hw=(3, 5))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)


# ---------------------------------------------------------------- window attention


def _window_case(ws, hw, b, heads, d, bias, dtype=torch.float64, noncontig=False):
    q, k, v = _qkv(b, heads, hw[0] * hw[1], d, dtype, noncontig)
    table = torch.randn((2 * ws - 1) ** 2, heads, dtype=dtype, requires_grad=True) if bias else None
    return q, k, v, table


@needs_ext
@pytest.mark.parametrize("ws, shift", [(4, 0), (4, 2), (5, 0), (5, 2), (7, 0), (7, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_window_float64_parity(ws, shift, bias):
    hw = (2 * ws, 3 * ws)
    inputs = _window_case(ws, hw, 1, 3, 16, bias, noncontig=True)
    _assert_parity(
        lambda *a: reference.window_attention(*a, hw=hw, window_size=ws, shift=shift),
        lambda *a: window_attention(*a, hw=hw, window_size=ws, shift=shift, backend="cpp"),
        inputs, atol=1e-10, rtol=1e-9,
    )


@needs_ext
def test_window_hifuse_7x7_grid_shift_3():
    """HiFuse keeps shift 3 on its last 7x7 stage, where the whole grid is one window."""
    inputs = _window_case(7, (7, 7), 2, 4, 24, True)
    _assert_parity(
        lambda *a: reference.window_attention(*a, hw=(7, 7), window_size=7, shift=3),
        lambda *a: window_attention(*a, hw=(7, 7), window_size=7, shift=3, backend="cpp"),
        inputs, atol=1e-10, rtol=1e-9,
    )


@needs_ext
@pytest.mark.parametrize("d", [12, 16, 24, 32, 48, 64, 96])
def test_window_head_dims(d):
    inputs = _window_case(4, (8, 4), 1, 2, d, True)
    _assert_parity(
        lambda *a: reference.window_attention(*a, hw=(8, 4), window_size=4, shift=1, scale=0.2),
        lambda *a: window_attention(*a, hw=(8, 4), window_size=4, shift=1, scale=0.2, backend="cpp"),
        inputs, atol=1e-10, rtol=1e-9,
    )


@needs_ext
def test_window_gradcheck():
    q, k, v, table = _window_case(3, (3, 6), 1, 2, 4, True)
    assert torch.autograd.gradcheck(
        lambda *a: window_attention(*a, hw=(3, 6), window_size=3, shift=1, backend="cpp"), (q, k, v, table), atol=1e-8
    )


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_low_precision(dtype):
    inputs = _window_case(7, (14, 14), 2, 3, 32, True)
    _low_precision_rule(
        lambda *a: reference.window_attention(*a, hw=(14, 14), window_size=7, shift=3),
        lambda *a: window_attention(*a, hw=(14, 14), window_size=7, shift=3, backend="cpp"),
        inputs, dtype,
    )


# ---------------------------------------------------------------- every ISA variant


@pytest.fixture(params=cpp.ISAS)
def isa(request):
    """Runs the test with the cpp kernels forced to one ISA variant; skips (with the reason) where this
    machine or build cannot run it."""
    if not cpp.available():
        pytest.skip(f"fusionblocks._C not built: {cpp.LOAD_ERROR}")
    why = cpp.isa_unsupported_reason(request.param)
    if why:
        pytest.skip(f"the {request.param} kernels cannot run here: {why}")
    with cpp.use_isa(request.param) as name:
        assert name == request.param
        yield name


def _isa_parity(ref_fn, cpp_fn, inputs, dtype):
    """cpp in ``dtype`` against the reference in float64 on the same values: outputs and every gradient.
    float64 must agree to rounding; float32 to a few float32 ulps of the largest entry of each tensor."""
    inputs = [t.detach().to(dtype).requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    ref_inputs = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    out, want = cpp_fn(*inputs), ref_fn(*ref_inputs)
    assert out.dtype == dtype
    g = torch.randn_like(want)
    diff = [t for t in inputs if t is not None and t.requires_grad]
    got_g = torch.autograd.grad(out, diff, g.to(dtype))
    want_g = torch.autograd.grad(want, [t for t in ref_inputs if t is not None and t.requires_grad], g)
    names = ["out"] + [f"grad {i}" for i in range(len(diff))]
    for name, got, ref in zip(names, (out, *got_g), (want, *want_g)):
        if dtype == torch.float64:
            torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-9, msg=lambda m: f"{name}: {m}")
        else:
            err = (got.double() - ref).abs().max().item()
            assert err <= 5e-6 * max(1.0, ref.abs().max().item()), (name, err, ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode", ["full", "decomposed"])
@pytest.mark.parametrize("hw, b, d, noncontig", [
    ((7, 13), 1, 12, True),   # non-square, odd sides, batch 1, packed-projection views
    ((13, 7), 2, 20, False),  # head dim not a multiple of 8 or 16
    ((57, 3), 1, 24, True),   # a line longer than one vector chunk of every ISA
    ((5, 6), 1, 96, False),   # the widest model head dim (HEMF 7x7 stage)
])
def test_isa_decay_parity(isa, dtype, mode, hw, b, d, noncontig):
    inputs = _decay_case(mode, hw, b, 2, d, noncontig=noncontig)
    with torch.no_grad():
        inputs[3].mul_(40)  # a strong decay (log_gamma ~ -1): rows far from uniform
    _isa_parity(
        lambda *a: reference.decay_attention(*a, hw=hw, mode=mode),
        lambda *a: decay_attention(*a, hw=hw, mode=mode, backend="cpp"),
        inputs, dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("ws, shift, hw, b, d, bias, noncontig", [
    (7, 0, (14, 21), 1, 32, True, True),   # HiFuse's window and head dim, non-square grid
    (7, 3, (14, 7), 2, 12, True, False),   # shifted, head dim 12
    (7, 3, (7, 7), 1, 24, True, True),     # one window covering the grid, shifted
    (5, 2, (10, 15), 1, 20, False, False),  # odd window (25 tokens), no bias table
    (3, 1, (9, 6), 1, 96, True, False),    # tiny windows, wide heads
])
def test_isa_window_parity(isa, dtype, ws, shift, hw, b, d, bias, noncontig):
    inputs = _window_case(ws, hw, b, 3, d, bias, noncontig=noncontig)
    _isa_parity(
        lambda *a: reference.window_attention(*a, hw=hw, window_size=ws, shift=shift),
        lambda *a: window_attention(*a, hw=hw, window_size=ws, shift=shift, backend="cpp"),
        inputs, dtype,
    )


# The training forms save the probabilities and the backward reads them; the plain forward ops keep a
# backward that recomputes them (what a direct call of torch.ops.fusionblocks_C.*_fwd differentiates).
# Both routes, on every variant, against the reference.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("route", ["saved", "recomputed"])
@pytest.mark.parametrize("hw, d", [((7, 13), 12), ((57, 3), 24)])
def test_isa_decomposed_backward_routes(isa, dtype, route, hw, d):
    inputs = _decay_case("decomposed", hw, 2, 2, d)
    with torch.no_grad():
        inputs[3].mul_(40)
    ops = torch.ops.fusionblocks_C
    op = ops.decay_dec_fwd_train if route == "saved" else ops.decay_dec_fwd
    scale = d ** -0.5
    _isa_parity(
        lambda *a: reference.decay_attention(*a, hw=hw, mode="decomposed", scale=scale),
        lambda *a: op(*a, hw[0], hw[1], scale)[0],
        inputs, dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("route", ["saved", "recomputed"])
@pytest.mark.parametrize("ws, shift, hw, d, bias", [(7, 3, (14, 21), 32, True), (5, 2, (10, 15), 20, False)])
def test_isa_window_backward_routes(isa, dtype, route, ws, shift, hw, d, bias):
    inputs = _window_case(ws, hw, 2, 3, d, bias)
    ops = torch.ops.fusionblocks_C
    scale = d ** -0.5

    def fast(q, k, v, table):
        if route == "saved":
            return ops.window_fwd_train(q, k, v, table, hw[0], hw[1], ws, shift, scale)[0]
        return ops.window_fwd(q, k, v, table, hw[0], hw[1], ws, shift, scale)

    _isa_parity(lambda *a: reference.window_attention(*a, hw=hw, window_size=ws, shift=shift, scale=scale), fast,
                inputs, dtype)


@needs_ext
def test_training_forms_run_only_when_autograd_records(monkeypatch):
    """Under no_grad (or with no input requiring grad) the plain forward runs and no probabilities are
    written; when autograd records the call, the training form runs and its probabilities are what the
    backward reads."""
    called = []

    class Recorder:
        def __getattr__(self, name):
            called.append(name)
            return getattr(torch.ops.fusionblocks_C, name)

    monkeypatch.setattr(cpp, "_ops", Recorder())
    q, k, v, lg = _decay_case("decomposed", (5, 6), 1, 2, 8, torch.float32)
    _, _, _, table = _window_case(2, (4, 6), 1, 2, 8, True, torch.float32)
    qw, kw, vw = (t[:, :, :24].detach().clone().requires_grad_() for t in (q, k, v))
    with torch.no_grad():
        decay_attention(q, k, v, lg, hw=(5, 6), mode="decomposed", backend="cpp")
        window_attention(qw, kw, vw, table, hw=(4, 6), window_size=2, shift=1, backend="cpp")
    decay_attention(*(t.detach() for t in (q, k, v, lg)), hw=(5, 6), mode="decomposed", backend="cpp")
    assert called == ["decay_dec_fwd", "window_fwd", "decay_dec_fwd"]
    called.clear()
    out = decay_attention(q, k, v, lg, hw=(5, 6), mode="decomposed", backend="cpp")
    assert "decay_dec_fwd_train" in out.grad_fn.name()
    out = window_attention(qw, kw, vw, table, hw=(4, 6), window_size=2, shift=1, backend="cpp")
    assert "window_fwd_train" in out.grad_fn.name()
    assert called == ["decay_dec_fwd_train", "window_fwd_train"]


@needs_ext
def test_saved_outputs_are_not_differentiable():
    """Only the attention output carries gradients: the log-sum-exps, the decomposed intermediate and the
    probabilities are saved state (their backward ignores them), so autograd must not offer them as
    differentiable results."""
    ops = torch.ops.fusionblocks_C
    q, k, v, lg = _decay_case("decomposed", (3, 4), 1, 2, 8)
    for op in (ops.decay_full_fwd, ops.decay_dec_fwd, ops.decay_dec_fwd_train):
        out, *saved = op(q, k, v, lg, 3, 4, 0.5)
        assert out.requires_grad and not any(t.requires_grad for t in saved), op
    _, _, _, table = _window_case(2, (4, 2), 1, 2, 8, True)
    out, probs = ops.window_fwd_train(q[:, :, :8], k[:, :, :8], v[:, :, :8], table, 4, 2, 2, 1, 0.5)
    assert out.requires_grad and not probs.requires_grad


@needs_ext
def test_saved_probabilities_are_the_softmax():
    """What the training forms save: each window's / line's normalized softmax probabilities, rows summing
    to one, and the same tensor the reference forms (checked through the window layout)."""
    ops = torch.ops.fusionblocks_C
    q, k, v, table = (t.detach() for t in _window_case(3, (6, 9), 2, 2, 8, True))
    out, probs = ops.window_fwd_train(q, k, v, table, 6, 9, 3, 1, 0.5)
    assert probs.shape == (2, 2, 6, 9, 9)
    torch.testing.assert_close(out, ops.window_fwd(q, k, v, table, 6, 9, 3, 1, 0.5), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 6, 9, dtype=probs.dtype))
    # window 0 of an unshifted grid holds tokens (y, x) with y, x < 3: its probabilities by hand
    _, probs0 = ops.window_fwd_train(q, k, v, table, 6, 9, 3, 0, 0.5)
    tok = torch.tensor([y * 9 + x for y in range(3) for x in range(3)])
    rel = torch.tensor([[(i // 3 - j // 3 + 2) * 5 + (i % 3 - j % 3 + 2) for j in range(9)] for i in range(9)])
    s = 0.5 * q[:, :, tok] @ k[:, :, tok].transpose(-1, -2) + table[rel].permute(2, 0, 1)
    torch.testing.assert_close(probs0[:, :, 0], s.softmax(-1), rtol=1e-12, atol=1e-12)
    q, k, v, lg = (t.detach() for t in _decay_case("decomposed", (4, 7), 1, 2, 8))
    out, mid, p_row, p_col = ops.decay_dec_fwd_train(q, k, v, lg, 4, 7, 0.5)
    assert p_row.shape == (1, 2, 4, 7, 7) and p_col.shape == (1, 2, 7, 4, 4)
    torch.testing.assert_close(out, ops.decay_dec_fwd(q, k, v, lg, 4, 7, 0.5)[0], rtol=1e-12, atol=1e-12)
    dist = (torch.arange(7)[:, None] - torch.arange(7)[None]).abs().double()
    row0 = 0.5 * q[:, :, :7] @ k[:, :, :7].transpose(-1, -2) + lg[:, None, None] * dist
    torch.testing.assert_close(p_row[:, :, 0], row0.softmax(-1), rtol=1e-12, atol=1e-12)


@needs_ext
def test_isa_switch():
    names = cpp.supported_isas()
    assert names and names[-1] == "default" and set(names) <= set(cpp.ISAS)
    assert cpp.current_isa() == names[0]  # automatic: the best variant
    for name in names:
        with cpp.use_isa(name) as got:
            assert got == cpp.current_isa() == name
            with cpp.use_isa("default"):
                assert cpp.current_isa() == "default"
            assert cpp.current_isa() == name  # nested blocks restore the outer choice
    assert cpp.current_isa() == names[0]
    with pytest.raises(ValueError, match="unknown CPU ISA variant 'sse4'.*avx512"):
        cpp.set_isa("sse4")
    for name in cpp.ISAS:
        why = cpp.isa_unsupported_reason(name)
        assert (why == "") == (name in names)
        if why:
            with pytest.raises(RuntimeError, match=f"cannot use the {name} variant: {why}"):
                cpp.set_isa(name)
            assert cpp.current_isa() == names[0]  # a refused request changes nothing


@needs_ext
def test_isa_environment_variable(monkeypatch):
    q, k, v, lg = _decay_case("full", (3, 3), 1, 2, 8, torch.float32)
    for name in cpp.supported_isas():
        monkeypatch.setenv(cpp.ISA_ENV, name.upper())
        assert cpp.current_isa() == name
        with cpp.use_isa("default"):  # set_isa wins over the environment
            assert cpp.current_isa() == "default"
        assert cpp.current_isa() == name
    for auto in ("auto", "AUTO", "Auto"):  # any case, like the variant names and set_isa
        monkeypatch.setenv(cpp.ISA_ENV, auto)
        assert cpp.current_isa() == cpp.supported_isas()[0]
        assert cpp.isa_variants() == cpp.supported_isas()
        torch.ops.fusionblocks_C.decay_full_fwd(q, k, v, lg, 3, 3, 0.5)
    monkeypatch.setenv(cpp.ISA_ENV, "neon9")
    with pytest.raises(ValueError, match="FUSIONBLOCKS_CPU_ISA=neon9 is not a CPU ISA variant; expected one of auto"):
        cpp.current_isa()
    with pytest.raises(ValueError, match="FUSIONBLOCKS_CPU_ISA=neon9 is not a CPU ISA variant"):
        torch.ops.fusionblocks_C.decay_full_fwd(q, k, v, lg, 3, 3, 0.5)
    reasons = explain("decay_attention", q, k, v, lg, hw=(3, 3), mode="full", scale=None)["cpp"]
    assert len(reasons) == 1 and "FUSIONBLOCKS_CPU_ISA=neon9 is not a CPU ISA variant" in reasons[0]
    # the automatic choice raises it too: passing cpp over would run the reference, silently slow
    with pytest.raises(ValueError, match=r"^decay_attention: the cpp backend cannot run as configured: .*"
                                         r"FUSIONBLOCKS_CPU_ISA=neon9 is not a CPU ISA variant"):
        decay_attention(q, k, v, lg, hw=(3, 3))
    with pytest.raises(ValueError, match=r"^window_attention: the cpp backend cannot run as configured"):
        window_attention(*(torch.randn(1, 2, 16, 16) for _ in range(3)), None, hw=(4, 4), window_size=2)
    missing = [n for n in cpp.ISAS if cpp.isa_unsupported_reason(n)]
    if missing:
        monkeypatch.setenv(cpp.ISA_ENV, missing[0])
        with pytest.raises(RuntimeError, match=f"FUSIONBLOCKS_CPU_ISA={missing[0]} asks for"):
            decay_attention(q, k, v, lg, hw=(3, 3), backend="cpp")
        with pytest.raises(ValueError, match=f"cannot run as configured: .*FUSIONBLOCKS_CPU_ISA={missing[0]} asks for"):
            decay_attention(q, k, v, lg, hw=(3, 3))


@needs_ext
def test_call_isa_is_per_thread_and_below_the_forced_variant(monkeypatch):
    import threading

    monkeypatch.delenv(cpp.ISA_ENV, raising=False)
    best = cpp.supported_isas()[0]
    assert cpp.isa_variants() == cpp.supported_isas()
    seen = []
    with cpp.call_isa("default"):
        assert cpp.current_isa() == "default"
        other = threading.Thread(target=lambda: seen.append(cpp.current_isa()))
        other.start()
        other.join()
        with cpp.call_isa(None):
            assert cpp.current_isa() == best
        assert cpp.current_isa() == "default"  # nested blocks restore the outer one
        with cpp.use_isa(best):  # a forced variant wins over the thread's
            assert cpp.current_isa() == best and cpp.isa_variants() == [best]
        monkeypatch.setenv(cpp.ISA_ENV, best)  # so does the environment variable
        assert cpp.current_isa() == best and cpp.isa_variants() == [best]
        monkeypatch.delenv(cpp.ISA_ENV)
    assert seen == [best]  # another thread keeps the automatic variant
    assert cpp.current_isa() == best
    with pytest.raises(ValueError, match="unknown CPU ISA variant 'sse4'"):
        with cpp.call_isa("sse4"):
            pass
    for name in cpp.ISAS:
        why = cpp.isa_unsupported_reason(name)
        if why:
            with pytest.raises(RuntimeError, match=f"cannot use the {name} variant: {why}"):
                with cpp.call_isa(name):
                    pass
    assert cpp.current_isa() == best


def _variant_grads(fn, inputs, g, fwd_isa, bwd_isa):
    """Gradients of ``fn`` with its forward run in variant ``fwd_isa`` and ``backward`` called in ``bwd_isa``."""
    xs = [t.detach().requires_grad_() for t in inputs]
    with cpp.call_isa(fwd_isa):
        out = fn(*xs)
    with cpp.call_isa(bwd_isa):
        return torch.autograd.grad(out, xs, g)


@needs_ext
@pytest.mark.parametrize("op", ["decay_full", "decay_decomposed", "window"])
def test_the_backward_runs_in_the_variant_of_its_forward(op, monkeypatch):
    """The automatic choice sets a variant for the forward's call only; the backward, called later and outside
    it, must run in the same variant (the one that was measured), which the gradients show bit for bit."""
    monkeypatch.delenv(cpp.ISA_ENV, raising=False)
    names = cpp.supported_isas()
    if len(names) < 2:
        pytest.skip(f"this machine runs one cpp variant only ({names})")
    wide, narrow = names[0], "default"
    if op == "window":
        q, k, v = _qkv(2, 3, 14 * 21, 20, torch.float32)
        t = 0.1 * torch.randn(13 * 13, 3)
        inputs, fn = (q, k, v, t), lambda *a: window_attention(*a, hw=(14, 21), window_size=7, shift=3, backend="cpp")
    else:
        mode = "full" if op == "decay_full" else "decomposed"
        inputs = _decay_case(mode, (9, 13), 2, 3, 20, torch.float32)
        fn = lambda *a: decay_attention(*a, hw=(9, 13), mode=mode, backend="cpp")  # noqa: E731
    with torch.no_grad():
        g = torch.randn_like(fn(*inputs))
    in_narrow = _variant_grads(fn, inputs, g, narrow, narrow)
    in_wide = _variant_grads(fn, inputs, g, wide, wide)
    if all(torch.equal(a, b) for a, b in zip(in_narrow, in_wide)):
        pytest.skip(f"the {wide} and {narrow} variants give bitwise equal gradients here: nothing to tell apart")
    for a, b in zip(_variant_grads(fn, inputs, g, narrow, wide), in_narrow):
        assert torch.equal(a, b)
    for a, b in zip(_variant_grads(fn, inputs, g, wide, narrow), in_wide):
        assert torch.equal(a, b)


@needs_ext
def test_the_automatic_choice_measures_every_variant(monkeypatch, tmp_path):
    from fusionblocks.ops import autotune, choose

    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setenv(autotune.ENV_TUNE, "memory")
    monkeypatch.delenv(cpp.ISA_ENV, raising=False)
    monkeypatch.setattr(autotune, "_memo", {})
    q, k, v, lg = _decay_case("decomposed", (12, 10), 2, 4, 16, torch.float32, lg_grad=False)
    with torch.no_grad():
        c = choose("decay_attention", q, k, v, lg, hw=(12, 10), mode="decomposed")
    names = cpp.supported_isas()
    want = {"reference"} | ({f"cpp[{n}]" for n in names} if len(names) > 1 else {"cpp"})
    assert c.how == "measured" and set(c.times_ms) == want
    if c.backend == "cpp" and len(names) > 1:
        assert c.variant in names and str(c).startswith(f"decay_attention: cpp[{c.variant}] (measured")
        assert c.times_ms[c.label] == min(c.times_ms[f"cpp[{n}]"] for n in names)
    monkeypatch.setattr(autotune, "_memo", {})
    with cpp.use_isa("default"), torch.no_grad():  # a forced variant: the cpp backend is timed in it alone
        c = choose("decay_attention", q, k, v, lg, hw=(12, 10), mode="decomposed")
    assert set(c.times_ms) == {"reference", "cpp"} and c.variant is None
    # an extension built from older sources (no per-thread variant): cpp is timed once, in its default variant
    monkeypatch.setattr(autotune, "_memo", {})
    monkeypatch.delattr(cpp._C, "set_thread_cpu_isa")
    assert cpp.isa_variants() == []
    with torch.no_grad():
        c = choose("decay_attention", q, k, v, lg, hw=(12, 10), mode="decomposed")
    assert set(c.times_ms) == {"reference", "cpp"} and c.variant is None and "failed" not in c.why


# ---------------------------------------------------------------- dispatch, opcheck, compile


@needs_ext
def test_cpp_runs_when_named_on_cpu():
    """``cpp`` can run a CPU call and is what a named choice gets; which backend ``backend=None`` picks is
    measured (tests/ops/test_dispatch.py), so no priority order is asserted here."""
    q, k, v, lg = _decay_case("full", (3, 3), 1, 2, 8, torch.float32)
    assert explain("decay_attention", q, k, v, lg, hw=(3, 3), mode="full", scale=None)["cpp"] == []
    named = select("decay_attention", "cpp", q, k, v, lg, hw=(3, 3), mode="full", scale=None)
    assert named.name == "cpp" and named.priority > 0


def test_reasons_name_device_dtype_and_build(monkeypatch):
    q = torch.empty(1, 2, 9, 8, device="meta")
    lg = torch.empty(2, device="meta")
    reasons = cpp.check_decay_cpp(q, q, q, lg, hw=(3, 3), mode="full", scale=None)
    assert any("CPU tensors only" in r and "meta" in r for r in reasons)
    qi = torch.empty(1, 2, 9, 8, dtype=torch.complex64)
    reasons = cpp.check_window_cpp(qi, qi, qi, None, hw=(3, 3), window_size=3, shift=0, scale=None)
    assert any("complex64" in r for r in reasons)
    monkeypatch.setattr(cpp, "_C", None)
    monkeypatch.setattr(cpp, "LOAD_ERROR", "ImportError: no _C")
    reasons = cpp.check_window_cpp(torch.zeros(1, 1, 9, 4), *[torch.zeros(1, 1, 9, 4)] * 2, None,
                                   hw=(3, 3), window_size=3, shift=0, scale=None)
    assert len(reasons) == 1 and "not built" in reasons[0] and "build_ext --inplace" in reasons[0]


@needs_ext
def test_opcheck():
    ops = torch.ops.fusionblocks_C
    q, k, v, lg = _decay_case("full", (3, 4), 1, 2, 8)
    torch.library.opcheck(ops.decay_full_fwd, (q, k, v, lg, 3, 4, 0.5))
    torch.library.opcheck(ops.decay_dec_fwd, (q, k, v, lg, 3, 4, 0.5))
    q, k, v, table = _window_case(2, (4, 2), 1, 2, 8, True)
    torch.library.opcheck(ops.window_fwd, (q, k, v, table, 4, 2, 2, 1, 0.5))
    torch.library.opcheck(ops.window_fwd, (q, k, v, None, 4, 2, 2, 0, 0.5))
    q, k, v, lg, table = (t.detach() for t in (q, k, v, lg[:2], table))
    out, lse = ops.decay_full_fwd(q, k, v, lg, 4, 2, 0.5)
    torch.library.opcheck(ops.decay_full_bwd, (torch.randn_like(out), q, k, v, lg, out, lse, 4, 2, 0.5))
    out, mid, lse_r, lse_c = ops.decay_dec_fwd(q, k, v, lg, 4, 2, 0.5)
    torch.library.opcheck(ops.decay_dec_bwd, (torch.randn_like(out), q, k, v, lg, out, mid, lse_r, lse_c, 4, 2, 0.5))
    torch.library.opcheck(ops.window_bwd, (torch.randn_like(out), q, k, v, table, 4, 2, 2, 1, 0.5))
    torch.library.opcheck(ops.window_bwd, (torch.randn_like(out), q, k, v, None, 4, 2, 2, 0, 0.5))
    torch.library.opcheck(ops.decay_dec_fwd_train, (q, k, v, lg, 4, 2, 0.5))
    out, mid, p_row, p_col = ops.decay_dec_fwd_train(q, k, v, lg, 4, 2, 0.5)
    torch.library.opcheck(ops.decay_dec_bwd_probs, (torch.randn_like(out), q, k, v, lg, mid, p_row, p_col, 4, 2, 0.5))
    qg, kg, vg, tg = (t.detach().requires_grad_() for t in (q, k, v, table))
    torch.library.opcheck(ops.window_fwd_train, (qg, kg, vg, tg, 4, 2, 2, 1, 0.5))
    out, probs = ops.window_fwd_train(q, k, v, table, 4, 2, 2, 1, 0.5)
    torch.library.opcheck(ops.window_bwd_probs, (torch.randn_like(out), q, k, v, probs, table, 4, 2, 2, 1, 0.5))
    torch.library.opcheck(ops.window_bwd_probs, (torch.randn_like(out), q, k, v, probs, None, 4, 2, 2, 1, 0.5))
    with pytest.raises(RuntimeError, match=r"expected probs of shape \(B, heads, windows, ws\*ws, ws\*ws\)"):
        ops.window_bwd_probs(torch.randn_like(out), q, k, v, probs[:, :, :1], table, 4, 2, 2, 1, 0.5)
    # a table of another dtype than q, k, v (a float32 table beside bfloat16 activations on CUDA): its gradient comes
    # in the table's own dtype, as the fake kernels say, from every variant
    assert q.dtype == torch.float64
    t32 = table.float()
    for isa in cpp.supported_isas():
        with cpp.use_isa(isa):
            torch.library.opcheck(ops.window_bwd, (torch.randn_like(out), q, k, v, t32, 4, 2, 2, 1, 0.5))
            torch.library.opcheck(ops.window_bwd_probs, (torch.randn_like(out), q, k, v, probs, t32, 4, 2, 2, 1, 0.5))
            assert ops.window_bwd(torch.randn_like(out), q, k, v, t32, 4, 2, 2, 1, 0.5)[3].dtype == torch.float32
    with pytest.raises(RuntimeError, match="expected p_col of shape"):
        ops.decay_dec_bwd_probs(torch.randn_like(out), q, k, v, lg, mid, p_row, p_row, 4, 2, 0.5)


@needs_ext
def test_torch_compile_fullgraph_forward_and_backward():
    hw = (4, 5)
    q, k, v, lg = _decay_case("full", hw, 1, 2, 8, torch.float32)
    table = torch.randn(9, 2, requires_grad=True)

    def f(q, k, v, lg, table):
        a = decay_attention(q, k, v, lg, hw=hw, mode="full", backend="cpp")
        b = decay_attention(q, k, v, lg, hw=hw, mode="decomposed", backend="cpp")
        c = window_attention(q[:, :, :16], k[:, :, :16], v[:, :, :16], table, hw=(4, 4), window_size=2, shift=1,
                             backend="cpp")
        return a.sum() + b.sum() + (c * c).sum()

    inputs = (q, k, v, lg, table)
    eager = torch.autograd.grad(f(*inputs), inputs)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*inputs), inputs)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- golden blocks on the cpp kernels


@needs_ext
@pytest.mark.parametrize("name, mode", [("rmt.masa_full", "full"), ("rmt.masa_decomposed", "decomposed")])
def test_golden_rmt_masa_with_cpp(monkeypatch, name, mode):
    from fusionblocks.layers.manhattan import RMT_ATTENTION_RULES, ManhattanSelfAttention
    from fusionblocks.models.convert import convert_keys
    from golden_utils import block, make_input, official_state_dict, rel_err

    monkeypatch.setenv("FUSIONBLOCKS_BACKEND", "cpp")
    record = block(name)
    sd = {k[len("attn."):]: t for k, t in official_state_dict(record).items() if k.startswith("attn.")}
    m = ManhattanSelfAttention(128, 4, mode, initial_value=2, heads_range=4).eval()
    m.load_state_dict({k: t for k, (_, t) in convert_keys(sd, RMT_ATTENTION_RULES).items()}, strict=True)
    x = make_input(record["inputs"][0])
    with torch.no_grad():
        y = m(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert rel_err(y, record["output"]) <= 1e-5


@needs_ext
def test_golden_egf_block_with_cpp(monkeypatch):
    from fusionblocks.layers.manhattan import EGFBlock
    from fusionblocks.models.convert import load_official
    from golden_utils import block, make_input, official_state_dict, rel_err

    monkeypatch.setenv("FUSIONBLOCKS_BACKEND", "cpp")
    record = block("hemf.egf_block_rect")
    depth = sum(k.endswith("q_proj.weight") for k, _, _ in record["keys"])
    m = EGFBlock(96, 8, depth).eval()
    load_official(m, m.prepare_official(official_state_dict(record)), *m.official_key_rules(), source="HEMF EGF_block")
    with torch.no_grad():
        y = m(make_input(record["inputs"][0]))
    assert rel_err(y, record["output"]) <= 1e-5


@needs_ext
@pytest.mark.parametrize("name, kw", [
    ("hifuse.global_layer", dict(dim=96, depth=2, num_heads=3)),
    ("hifuse.global_layer_7x7", dict(dim=768, depth=2, num_heads=24)),
])
def test_golden_hifuse_global_stage_with_cpp(monkeypatch, name, kw):
    from fusionblocks.layers.window import HiFuseGlobalStage
    from golden_utils import block, make_input, official_state_dict, rel_err

    monkeypatch.setenv("FUSIONBLOCKS_BACKEND", "cpp")
    rec = block(name)
    stage = HiFuseGlobalStage(**kw).eval()
    dropped = ("norm2.", "relative_position_index")
    stage.load_state_dict({k: t for k, t in official_state_dict(rec).items() if not any(d in k for d in dropped)})
    x, h, w = (make_input(s) for s in rec["inputs"])
    with torch.no_grad():
        out = stage(x.view(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2))
    assert rel_err(out.flatten(2).transpose(1, 2), rec["output"]) <= 1e-5


# ---------------------------------------------------------------- CUDA kernel (needs a GPU and FUSIONBLOCKS_CUDA=1)


def _needs_cuda_kernel():
    import fusionblocks.ops.cuda as cuda_backend

    if not cuda_backend.available():
        pytest.fail(f"fusionblocks._C has no CUDA kernels; {cuda_backend.CUDA_BUILD_HINT}")


CUDA_F64_WINDOWS = [(7, 0, True, (14, 21)), (7, 3, True, (7, 7)), (4, 2, False, (8, 12)), (8, 4, True, (16, 8))]
CUDA_F64_HEAD_DIMS = (16, 32, 96)
# float64 window 8 at head dim 96 needs 256 KB of shared memory per block, over sm_90's 227 KB: the backend refuses
# it (test_cuda_window_float64_over_shared_memory_is_refused), so the parity cases stop at head dim 64 there
CUDA_F64_CASES = [(*case, d) for case in CUDA_F64_WINDOWS for d in CUDA_F64_HEAD_DIMS if not (case[0] == 8 and d > 64)]
CUDA_F64_CASES.append((8, 4, True, (16, 8), 64))


def test_cuda_float64_parity_cases_fit_sm90_shared_memory():
    """Every case the GPU parity test runs must be one the cuda backend accepts on an H100/H200, else it fails there."""
    import fusionblocks.ops.cuda as cuda_backend
    from fusionblocks.ops._gpu import SHARED_BYTES_BY_CAPABILITY

    for ws, _, _, _, d in CUDA_F64_CASES:
        need = cuda_backend.shared_bytes(torch.float64, ws, d, backward=True)
        assert need <= SHARED_BYTES_BY_CAPABILITY[(9, 0)], f"window_size {ws} head dim {d}: {need} bytes"


def test_cuda_window_refuses_an_empty_batch_or_no_heads():
    """A launch with grid z (batch) or y (heads) 0 is an invalid configuration for CUDA: such calls go to the
    reference, whatever this machine has (the check's other reasons, e.g. a CPU tensor, are beside the point)."""
    import fusionblocks.ops.cuda as cuda_backend

    for b, nh in ((0, 3), (2, 0)):
        q = torch.randn(b, nh, 49, 8)
        reasons = cuda_backend.check_window_cuda(q, q, q, None, hw=(7, 7), window_size=7, shift=0, scale=0.35)
        assert any("CUDA refuses at 0" in r and f"batch {b}, heads {nh}" in r for r in reasons), reasons
    q = torch.randn(1, 3, 49, 8)
    assert not any("refuses at 0" in r for r in cuda_backend.check_window_cuda(q, q, q, None, hw=(7, 7), window_size=7,
                                                                                shift=0, scale=0.35))


@pytest.mark.gpu
@pytest.mark.parametrize("ws, shift, bias, hw, d", CUDA_F64_CASES)
def test_cuda_window_float64_parity(ws, shift, bias, hw, d):
    _needs_cuda_kernel()
    q, k, v, table = _window_case(ws, hw, 2, 3, d, bias)
    q, k, v = (t.detach().cuda().requires_grad_() for t in (q, k, v))
    table = table.detach().cuda().requires_grad_() if bias else None
    _assert_parity(
        lambda *a: reference.window_attention(*a, hw=hw, window_size=ws, shift=shift),
        lambda *a: window_attention(*a, hw=hw, window_size=ws, shift=shift, backend="cuda"),
        (q, k, v, table), atol=1e-10, rtol=1e-9,
    )


@pytest.mark.gpu
def test_cuda_window_float64_over_shared_memory_is_refused():
    _needs_cuda_kernel()
    q, k, v, table = (t.detach().cuda() for t in _window_case(8, (16, 8), 1, 2, 96, True))
    reasons = explain("window_attention", q, k, v, table, hw=(16, 8), window_size=8, shift=4, scale=None)["cuda"]
    assert any("shared memory" in r for r in reasons), reasons


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_window_low_precision(dtype):
    _needs_cuda_kernel()
    q, k, v, table = (t.detach().cuda().requires_grad_() for t in _window_case(7, (14, 14), 2, 3, 32, True))
    _low_precision_rule(
        lambda *a: reference.window_attention(*a, hw=(14, 14), window_size=7, shift=3),
        lambda *a: window_attention(*a, hw=(14, 14), window_size=7, shift=3, backend="cuda"),
        (q, k, v, table), dtype,
    )


@pytest.mark.gpu
def test_cuda_window_float32_table_beside_bfloat16_keeps_its_gradient_in_float32():
    """HiFuse under bf16 autocast: the table is a float32 parameter beside bfloat16 q, k, v. Its gradient comes back
    in float32, as close to the float64 one as the reference's in the same mix (it was rounded to bfloat16)."""
    _needs_cuda_kernel()
    q, k, v, table = (t.detach().cuda() for t in _window_case(7, (14, 14), 2, 3, 32, True))
    g = torch.randn_like(q)
    grads = {}
    for name, dtype, backend in (("want", torch.float64, "reference"), ("reference", torch.bfloat16, "reference"),
                                 ("cuda", torch.bfloat16, "cuda")):
        t = (table if dtype == torch.float64 else table.float()).requires_grad_()
        out = window_attention(q.to(dtype), k.to(dtype), v.to(dtype), t, hw=(14, 14), window_size=7, shift=3,
                               backend=backend)
        (out.double() * g).sum().backward()
        grads[name] = t.grad
    assert grads["cuda"].dtype == torch.float32
    err = {n: (grads[n].double() - grads["want"]).abs().max().item() for n in ("reference", "cuda")}
    assert err["cuda"] <= 2 * err["reference"] + 1e-3 * grads["want"].abs().max().item(), err


@pytest.mark.gpu
def test_cuda_window_opcheck_and_speed_vs_triton():
    """opcheck on CUDA, then prints fwd / fwd+bwd times of cuda vs triton vs reference (HiFuse stage-1, B=32)."""
    _needs_cuda_kernel()
    q, k, v, table = (t.detach().cuda() for t in _window_case(2, (4, 2), 1, 2, 8, True))
    torch.library.opcheck(torch.ops.fusionblocks_C.window_fwd, (q, k, v, table, 4, 2, 2, 1, 0.5))
    b, heads, d, side = 32, 3, 32, 56
    x = [torch.randn(b, heads, side * side, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    table = torch.randn(169, heads, device="cuda", requires_grad=True)
    avail = {n: r for n, r in explain("window_attention", *x, table, hw=(side, side), window_size=7, shift=3, scale=None).items()}
    for name in ("cuda", "triton", "reference"):
        if avail[name]:
            print(f"{name}: cannot run ({'; '.join(avail[name])})")
            continue
        for passes in ("fwd", "fwd+bwd"):
            def run():
                out = window_attention(*x, table, hw=(side, side), window_size=7, shift=3, backend=name)
                if passes == "fwd+bwd":
                    out.float().sum().backward()
            run()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                run()
            end.record()
            torch.cuda.synchronize()
            print(f"window_attention {name} {passes}: {start.elapsed_time(end) / 20:.3f} ms")


@needs_ext
@pytest.mark.parametrize("mode", ["full", "decomposed"])
@pytest.mark.parametrize("shape", [(0, 2, 12, 8), (2, 0, 12, 8)], ids=["no-batch", "no-heads"])
def test_decay_empty_batch_forward_and_backward(mode, shape):
    # an empty last batch or a zero-head slice: the same empty result and zero gradients as the reference
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    lg = torch.full((shape[1],), -0.5, requires_grad=True)
    out = decay_attention(q, k, v, lg, hw=(3, 4), mode=mode, backend="cpp")
    assert out.shape == shape
    out.sum().backward()
    assert q.grad.shape == shape and k.grad.shape == shape and v.grad.shape == shape
    torch.testing.assert_close(lg.grad, torch.zeros_like(lg))


@needs_ext
@pytest.mark.parametrize("n_side", [3, 25], ids=["one-key-block", "split-key-blocks"])
@pytest.mark.parametrize("shape", [(0, 2), (2, 0)], ids=["no-batch", "no-heads"])
def test_decay_full_backward_kernel_on_an_empty_batch(shape, n_side):
    # the compiled backward itself (no Python detour), every variant: an empty batch gives empty gradients and a
    # zero log_gamma gradient; 625 keys split into key blocks when there are fewer (batch, head) pairs than threads
    n, d = n_side * n_side, 8
    q, k, v, grad = (torch.randn(*shape, n, d) for _ in range(4))
    lg = torch.full((shape[1],), -0.5)
    for isa in cpp.supported_isas():
        with cpp.use_isa(isa):
            out, lse = torch.ops.fusionblocks_C.decay_full_fwd(q, k, v, lg, n_side, n_side, 0.5)
            dq, dk, dv, dlg = torch.ops.fusionblocks_C.decay_full_bwd(grad, q, k, v, lg, out, lse, n_side, n_side, 0.5)
        assert out.shape == dq.shape == dk.shape == dv.shape == q.shape, isa
        assert dlg.shape == lg.shape and not dlg.any(), isa


@needs_ext
def test_set_isa_auto_in_any_case():
    for auto in ("auto", "AUTO", "Auto"):
        cpp.set_isa("default")
        cpp.set_isa(auto)
        assert cpp.current_isa() == cpp.supported_isas()[0]
