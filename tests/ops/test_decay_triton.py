"""Triton decay attention vs the reference (``fusionblocks.ops.reference.decay_attention``).

CPU tests run the kernels in Triton's interpreter, which works only when ``TRITON_INTERPRET=1`` was set
before triton was first imported (``tests/conftest.py`` does that on machines without CUDA); elsewhere
they skip, and the GPU tests run instead. Parity is checked in float64 (the interpreter runs float64
``tl.dot``), float16 with flash-attn's rule (error vs a float32 reference within 2x the reference's
own float16 error). ``tests/ops/test_triton_aot.py`` cross-compiles every kernel configuration for
sm_90 (the GPU compiler's rules and resources, without a GPU).
"""
import pytest
import torch

from fusionblocks.layers.manhattan import RMT_ATTENTION_RULES, ManhattanSelfAttention
from fusionblocks.models.convert import convert_keys
from fusionblocks.ops import BackendUnavailable, decay_attention, explain, select
from golden_utils import block, make_input, official_state_dict, rel_err

triton = pytest.importorskip("triton")

import fusionblocks.ops.triton.decay as triton_decay  # noqa: E402
from fusionblocks.ops.triton._common import TUNING_DEFAULTS, interpreter_defect, triton_built_interpreted, tuned, tuning  # noqa: E402

HEAD_DIMS = (12, 16, 24, 32, 48, 64, 96, 128)
GRIDS = ((5, 7), (9, 4), (13, 11), (1, 1), (1, 9))
MODES = ("full", "decomposed")


@pytest.fixture
def interpret(monkeypatch):
    if not triton_built_interpreted():
        pytest.skip("triton was imported without TRITON_INTERPRET=1: the interpreter cannot run in this process")
    if interpreter_defect() is not None:
        pytest.skip(interpreter_defect())
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(b, nh, hw, d, dtype, *, device="cpu", layout="contiguous", lg=None):
    n = hw[0] * hw[1]
    if layout == "contiguous":
        q, k, v = (torch.randn(b, nh, n, d, dtype=dtype, device=device) for _ in range(3))
    else:  # a fused qkv projection viewed per head: (B, N, 3, heads, D) -> three strided (B, heads, N, D)
        qkv = torch.randn(b, n, 3, nh, d + 3, dtype=dtype, device=device)[..., 1 : d + 1]
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        assert not q.is_contiguous()
    if lg is None:
        lg = torch.linspace(-1.2, 0.15, nh, dtype=dtype, device=device) if nh > 1 else torch.full((1,), -0.4, dtype=dtype, device=device)
    return [t.detach().requires_grad_() for t in (q, k, v, lg.to(device))]


def _run(backend, q, k, v, lg, hw, mode, go, scale=None):
    out = decay_attention(q, k, v, lg, hw=hw, mode=mode, scale=scale, backend=backend)
    wrt = [t for t in (q, k, v, lg) if t.requires_grad]
    return [out] + list(torch.autograd.grad(out, wrt, go))


def _compare_f64(hw, d, mode, *, b=1, nh=2, layout="contiguous", scale=None, lg=None):
    q, k, v, lg = _inputs(b, nh, hw, d, torch.float64, layout=layout, lg=lg)
    go = torch.randn(q.shape, dtype=torch.float64)
    got = _run("triton", q, k, v, lg, hw, mode, go, scale)
    want = _run("reference", q, k, v, lg, hw, mode, go, scale)
    for name, a, e in zip(("out", "dq", "dk", "dv", "dlog_gamma"), got, want):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name} {hw} d={d} {mode}: {m}")


# every head dim and every grid, in both modes (grid cycled against head dim to keep the interpreter quick)
CASES = [(GRIDS[i % len(GRIDS)], d) for i, d in enumerate(HEAD_DIMS)] + [(g, 16) for g in GRIDS[len(HEAD_DIMS) :]]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hw,d", CASES, ids=[f"{h}x{w}-d{d}" for (h, w), d in CASES])
def test_float64_matches_reference(interpret, hw, d, mode):
    _compare_f64(hw, d, mode)


@pytest.mark.parametrize("mode", MODES)
def test_float64_odd_grids_batch_and_scale(interpret, mode):
    _compare_f64((7, 6), 24, mode, b=2, nh=3, scale=0.3)


@pytest.mark.parametrize("hw,d,mode", [((3, 5), 8, "decomposed"), ((3, 5), 80, "full"), ((4, 3), 1, "full")])
def test_unlisted_head_dims(interpret, hw, d, mode):
    """Head dims outside the listed ones (lines longer than one block and unequal query/key blocks: test_float32_through_the_gpu_bfloat16_tiles)."""
    _compare_f64(hw, d, mode)


@pytest.mark.parametrize("mode", MODES)
def test_noncontiguous_inputs(interpret, mode):
    _compare_f64((5, 7), 12, mode, layout="strided")


@pytest.mark.parametrize("mode", MODES)
def test_positive_log_gamma(interpret, mode):
    _compare_f64((9, 4), 16, mode, lg=torch.tensor([0.2, -3.0], dtype=torch.float64))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hw,d", [((5, 7), 32), ((9, 4), 48)])
def test_float16_flash_rule(interpret, hw, d, mode):
    q, k, v, lg = _inputs(1, 2, hw, d, torch.float16)
    lg = lg.detach().float().requires_grad_()
    go = torch.randn(q.shape, dtype=torch.float16)
    up = [t.detach().float().requires_grad_() for t in (q, k, v)]
    exact = _run("reference", *up, lg, hw, mode, go.float())
    low = _run("reference", q, k, v, lg, hw, mode, go)
    fast = _run("triton", q, k, v, lg, hw, mode, go)
    for name, f, lo, ex in zip(("out", "dq", "dk", "dv", "dlog_gamma"), fast, low, exact):
        assert f.dtype == lo.dtype, name
        err = (f.float() - ex).abs().max().item()
        ref_err = (lo.float() - ex).abs().max().item()
        assert err <= 2 * ref_err, f"{name} {hw} d={d} {mode}: fp16 triton error {err:.3g} > 2x reference fp16 error {ref_err:.3g}"


def test_log_gamma_without_grad(interpret):
    q, k, v, lg = _inputs(1, 2, (5, 7), 16, torch.float64)
    lg = lg.detach()
    go = torch.randn(q.shape, dtype=torch.float64)
    for mode in MODES:
        got = _run("triton", q, k, v, lg, (5, 7), mode, go)
        want = _run("reference", q, k, v, lg, (5, 7), mode, go)
        assert len(got) == 4
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


def test_manhattan_self_attention_style_use(interpret):
    """Projection -> per-head strided views -> decay attention -> projection; parameter grads agree."""
    torch.manual_seed(1)
    dim, heads, hw = 24, 2, (5, 6)
    qkv = torch.nn.Linear(dim, 3 * dim).double()
    proj = torch.nn.Linear(dim, dim).double()
    log_gamma = torch.nn.Parameter(torch.tensor([-0.7, -0.2], dtype=torch.float64))
    x = torch.randn(1, hw[0], hw[1], dim, dtype=torch.float64)  # NHWC tokens

    def forward(backend):
        b, h, w, c = x.shape
        t = qkv(x).reshape(b, h * w, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        o = decay_attention(t[0], t[1], t[2], log_gamma, hw=(h, w), mode="full", backend=backend)
        return proj(o.transpose(1, 2).reshape(b, h, w, c))

    params = [qkv.weight, qkv.bias, proj.weight, log_gamma]
    outs = {}
    for backend in ("reference", "triton"):
        y = forward(backend)
        outs[backend] = [y] + list(torch.autograd.grad(y.square().sum(), params))
    for a, e in zip(outs["triton"], outs["reference"]):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


def test_masa_module_triton_matches_reference(interpret):
    """ManhattanSelfAttention (rotary, LePE, learnable decay) gives the same output and grads on either backend."""
    torch.manual_seed(2)
    m = ManhattanSelfAttention(24, 2, "decomposed", learnable_decay=True).double()
    x = torch.randn(1, 24, 5, 7, dtype=torch.float64)
    results = {}
    for backend in ("reference", "triton"):
        m.backend = backend
        y = m(x)
        results[backend] = [y] + list(torch.autograd.grad(y.square().sum(), list(m.parameters())))
    for a, e in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name, mode", [("rmt.masa_full", "full"), ("rmt.masa_decomposed", "decomposed")])
def test_golden_rmt_masa_with_triton(interpret, name, mode):
    record = block(name)
    sd = {k[len("attn."):]: v for k, v in official_state_dict(record).items() if k.startswith("attn.")}
    m = ManhattanSelfAttention(128, 4, mode, initial_value=2, heads_range=4, backend="triton").eval()
    m.load_state_dict({k: v for k, (_, v) in convert_keys(sd, RMT_ATTENTION_RULES).items()}, strict=True)
    with torch.no_grad():
        y = m.forward_channels_last(make_input(record["inputs"][0]))
    assert rel_err(y, record["output"]) <= 1e-5


@pytest.mark.parametrize("op", ["decay_attention_full", "decay_attention_decomposed"])
def test_opcheck(interpret, op):
    q, k, v, lg = _inputs(1, 2, (3, 4), 16, torch.float32)
    torch.library.opcheck(getattr(torch.ops.fusionblocks, op), (q, k, v, lg, 3, 4, 0.25))


def test_torch_compile_fullgraph_cpu(interpret):
    q, k, v, lg = _inputs(1, 2, (3, 5), 16, torch.float32)

    def fn(q, k, v, lg):
        return decay_attention(q, k, v, lg, hw=(3, 5), mode="decomposed", backend="triton")

    go = torch.randn(q.shape)
    want = _run("triton", q, k, v, lg, (3, 5), "decomposed", go)  # eager first: dispatch imports its providers
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, lg)
    got = [out] + list(torch.autograd.grad(out, (q, k, v, lg), go))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize(
    "shapes,hw,lg_len,match",
    [
        (((1, 2, 12, 16), (1, 2, 12, 8), (1, 2, 12, 16)), (3, 4), 2, "one shape"),
        (((1, 2, 12, 16),) * 3, (3, 5), 2, "H\\*W = 3\\*5 = 15 tokens"),
        (((1, 2, 12, 16),) * 3, (3, 4), 3, "log_gamma of shape \\(2,\\)"),
        (((2, 12, 16),) * 3, (3, 4), 2, "q"),
    ],
)
def test_bad_shapes_raise(interpret, shapes, hw, lg_len, match):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=match) as info:
        decay_attention(q, k, v, torch.zeros(lg_len), hw=hw, backend="triton")
    assert "decay_attention" in str(info.value)


def test_backend_reasons(interpret, monkeypatch):
    q, k, v = (torch.randn(1, 2, 12, 16) for _ in range(3))
    lg = torch.zeros(2)
    kw = dict(hw=(3, 4), mode="full", scale=None)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert any("TRITON_INTERPRET" in r for r in explain("decay_attention", q, k, v, lg, **kw)["triton"])
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        decay_attention(q, k, v, lg, hw=(3, 4), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert explain("decay_attention", q, k, v, lg, **kw)["triton"] == []
    assert any("never chosen automatically" in r for r in explain("decay_attention", q, k, v, lg, auto=True, **kw)["triton"])
    bf = [t.bfloat16() for t in (q, k, v)]
    assert any("bfloat16" in r for r in explain("decay_attention", *bf, lg, **kw)["triton"])
    big = torch.randn(1, 2, 12, 160)
    assert any("head dim 160" in r for r in explain("decay_attention", big, big, big, lg, **kw)["triton"])
    # the automatic choice never runs the interpreter, even with it enabled
    monkeypatch.delenv("FUSIONBLOCKS_BACKEND", raising=False)
    assert select("decay_attention", None, q, k, v, lg, **kw).name != "triton"


def test_interpreter_defect_names_the_broken_releases(monkeypatch):
    from fusionblocks.ops.triton import _common

    why = interpreter_defect("3.6.0", "2.4.6")
    assert "Triton 3.6.0" in why and "NumPy 2.4.6" in why and "numpy<2.4 or triton>=3.7" in why
    assert interpreter_defect("3.6.0", "2.5.2") is not None and interpreter_defect("3.5.1", "2.4.0rc1") is not None
    assert interpreter_defect("3.7.0", "2.4.6") is None and interpreter_defect("3.9.0", "2.5.2") is None
    assert interpreter_defect("3.6.0", "2.3.5") is None and interpreter_defect("3.6.0", "1.26.4") is None
    # where it holds, it is a reason the backend cannot run on CPU tensors (before any launch), not a crash
    monkeypatch.setattr(_common, "_INTERPRETER_DEFECT", why)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 2, 12, 16)
    assert why in explain("decay_attention", q, q, q, torch.zeros(2), hw=(3, 4), mode="full", scale=None)["triton"]


# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hw,d", [((14, 14), 32), ((13, 11), 12), ((28, 28), 64), ((7, 7), 96), ((9, 17), 128)])
def test_gpu_matches_reference(monkeypatch, hw, d, mode, dtype):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, lg = _inputs(2, 3, hw, d, dtype, device="cuda", layout="strided")
    lg = lg.detach().float().requires_grad_()
    go = torch.randn(q.shape, dtype=dtype, device="cuda")
    up = [t.detach().double().requires_grad_() for t in (q, k, v)]
    lg64 = lg.detach().double().requires_grad_()
    exact = _run("reference", *up, lg64, hw, mode, go.double())
    low = _run("reference", q, k, v, lg, hw, mode, go)
    fast = _run("triton", q, k, v, lg, hw, mode, go)
    for name, f, lo, ex in zip(("out", "dq", "dk", "dv", "dlog_gamma"), fast, low, exact):
        err = (f.double() - ex).abs().max().item()
        ref_err = (lo.double() - ex).abs().max().item()
        bound = 2 * ref_err if dtype != torch.float32 else 1e-4 * ex.abs().max().item() + 1e-5
        assert err <= bound, f"{name} {hw} d={d} {mode} {dtype}: error {err:.3g} > {bound:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("max_tokens", [64, 0], ids=["fused", "split"])
@pytest.mark.parametrize("hw,d", [((56, 56), 12), ((7, 7), 96)])
def test_gpu_fused_and_split_backward_within_the_flash_rule(monkeypatch, max_tokens, hw, d):
    """HEMF's first and last stage in bfloat16 through both backward kernels (the GPU run times them side by side)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, lg = _inputs(2, 8, hw, d, torch.bfloat16, device="cuda")
    lg = lg.detach().float().requires_grad_()
    go = torch.randn(q.shape, dtype=torch.bfloat16, device="cuda")
    exact = _run("reference", *[t.detach().double().requires_grad_() for t in (q, k, v, lg)], hw, "decomposed", go.double())
    low = _run("reference", q, k, v, lg, hw, "decomposed", go)
    with tuned(decay_fused_backward_max_tokens=max_tokens):
        fast = _run("triton", q, k, v, lg, hw, "decomposed", go)
    for name, f, lo, ex in zip(("out", "dq", "dk", "dv", "dlog_gamma"), fast, low, exact):
        err, ref_err = (f.double() - ex).abs().max().item(), (lo.double() - ex).abs().max().item()
        assert err <= 2 * ref_err, f"{name} {hw} d={d} max_tokens={max_tokens}: error {err:.3g} > 2 x {ref_err:.3g}"


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, lg = _inputs(2, 4, (14, 14), 32, torch.bfloat16, device="cuda")

    def fn(q, k, v, lg):
        return decay_attention(q, k, v, lg, hw=(14, 14), mode="full", backend="triton") * 2

    go = torch.randn(q.shape, dtype=q.dtype, device="cuda")
    want = _run("triton", q, k, v, lg, (14, 14), "full", go)
    out = torch.compile(fn, fullgraph=True)(q, k, v, lg)
    got = [out] + list(torch.autograd.grad(out, (q, k, v, lg), go))
    torch.testing.assert_close(got[0], 2 * want[0])
    for a, e in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, 2 * e, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------- issue 12's kernel defects


def _row_pass_reference(q, k, v, lg, hw):
    """The decomposed op's row pass (attention along W within each row) via the reference on 1 x W images."""
    b, nh, n, d = q.shape
    h, w = hw
    rows = lambda t: t.reshape(b, nh, h, w, -1).permute(0, 2, 1, 3, 4).reshape(b * h, nh, w, t.shape[-1])  # noqa: E731
    o1 = decay_attention(rows(q), rows(k), rows(v), lg, hw=(1, w), mode="full", backend="reference")
    return o1.reshape(b, h, nh, w, d).permute(0, 2, 1, 3, 4).reshape(b, nh, n, d)


def test_decomposed_op_counts_the_row_output_gradient(interpret):
    """``decay_attention_decomposed`` returns ``(out, row_out, ...)``: a loss on ``row_out`` must reach q, k, v, log_gamma."""
    hw = (3, 5)
    q, k, v, lg = _inputs(1, 1, hw, 12, torch.float64)
    g, g1 = torch.randn(q.shape, dtype=torch.float64), torch.randn(q.shape, dtype=torch.float64)
    out, o1, _, _ = torch.ops.fusionblocks.decay_attention_decomposed(q, k, v, lg, hw[0], hw[1], 12 ** -0.5)
    got = torch.autograd.grad((out * g).sum() + (o1 * g1).sum(), (q, k, v, lg))
    want_out = decay_attention(q, k, v, lg, hw=hw, mode="decomposed", backend="reference")
    want_o1 = _row_pass_reference(q, k, v, lg, hw)
    torch.testing.assert_close(o1, want_o1, rtol=1e-9, atol=1e-10)
    want = torch.autograd.grad((want_out * g).sum() + (want_o1 * g1).sum(), (q, k, v, lg))
    for name, a, e in zip(("dq", "dk", "dv", "dlog_gamma"), got, want):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")
    # and only the row output: the column pass contributes nothing
    want1 = torch.autograd.grad((_row_pass_reference(q, k, v, lg, hw) * g1).sum(), (q, k, v))
    got1 = torch.autograd.grad((torch.ops.fusionblocks.decay_attention_decomposed(q, k, v, lg, 3, 5, 12 ** -0.5)[1] * g1).sum(), (q, k, v))
    for a, e in zip(got1, want1):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("mode,hw,d", [("full", (13, 11), 24), ("full", (7, 5), 96), ("decomposed", (13, 11), 24),
                                       ("decomposed", (7, 5), 96)])
def test_float32_through_the_gpu_bfloat16_tiles(interpret, monkeypatch, mode, hw, d):
    """The GPU's 16-bit tile configurations (128x64 forward, 64x64 backward, ...) never run on CPU otherwise:
    run float32 through them under the interpreter, tight against the float64 reference. They include
    query blocks larger (128x64 forward) and smaller (32x64 backward at head dim 96) than key blocks, and
    lines longer than one block (the interpreter's own tiles are square)."""
    real, real_fused = triton_decay._config, triton_decay._fused_config
    seen = []

    def gpu_tiles(n, dd, backward, dtype=None, **kw):
        cfg = real(n, dd, backward, torch.bfloat16, interpreted=False)
        seen.append((backward, cfg["BLOCK_M"], cfg["BLOCK_N"]))
        return cfg

    def gpu_fused_tiles(n, dd, dtype=None, **kw):
        cfg = real_fused(n, dd, torch.bfloat16, interpreted=False)
        if cfg is not None:
            seen.append(("fused", cfg["BLOCK_N"], cfg["BLOCK_D"]))
        return cfg

    monkeypatch.setattr(triton_decay, "_config", gpu_tiles)
    monkeypatch.setattr(triton_decay, "_fused_config", gpu_fused_tiles)
    q, k, v, lg = _inputs(1, 2, hw, d, torch.float32)
    go = torch.randn(q.shape)
    got = _run("triton", q, k, v, lg, hw, mode, go)
    up = [t.detach().double().requires_grad_() for t in (q, k, v, lg)]
    want = _run("reference", *up, hw, mode, go.double())
    if mode == "full" and d <= 64:
        assert (False, 128, 64) in seen  # the 128x64 forward tile ran, over more than one query block
    if d > 64 and mode == "full":
        assert (True, 32, 64) in seen  # backward query blocks smaller than key blocks
    if mode == "decomposed":
        assert any(s[0] == "fused" for s in seen)  # the GPU's fused single-tile backward tiles
    for name, a, e in zip(("out", "dq", "dk", "dv", "dlog_gamma"), got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name} {mode} {hw} d={d}: {m}")


def test_token_offsets_past_2_to_the_31(interpret):
    """q, k, v strided so that token offsets pass 2**31 elements: the kernels address them in int64.

    The storage is 4 GiB of virtual memory of which only the few touched pages become resident."""
    stride = 2**30 + 64
    try:
        store = torch.empty(2 * stride + 64, dtype=torch.float16)
    except RuntimeError as e:  # pragma: no cover - no room for the virtual allocation
        pytest.skip(f"cannot reserve 4 GiB of virtual memory: {e}")
    hw, d = (1, 3), 16
    views = [store.as_strided((1, 1, 3, d), (0, 0, stride, 1), storage_offset=16 * i) for i in range(3)]
    g = torch.Generator().manual_seed(0)
    for t in views:
        t.copy_(torch.randn(1, 1, 3, d, generator=g).half())
    lg = torch.tensor([-0.3], dtype=torch.float32, requires_grad=True)
    assert views[0].storage_offset() + 2 * stride > 2**31
    go = torch.randn(1, 1, 3, d, generator=g).half()
    for mode in MODES:
        leaves = [t.detach().requires_grad_() for t in views]  # same storage, still strided
        got = _run("triton", *leaves, lg, hw, mode, go)
        small = [t.detach().float().contiguous().requires_grad_() for t in views]
        want = _run("reference", *small, lg, hw, mode, go.float())
        for name, a, e in zip(("out", "dq", "dk", "dv", "dlog_gamma"), got, want):
            torch.testing.assert_close(a.float(), e, rtol=2e-3, atol=2e-3, msg=lambda m: f"{name} {mode}: {m}")
    del store


def test_any_batch_runs_on_the_one_dimensional_grid():
    """No batch limit (the old 2-D grid stopped at B*heads*lines = 65535 and fell back to the reference)."""
    q = torch.empty(200, 8, 56 * 56, 12, device="meta")
    reasons = triton_decay._check(q, q, q, torch.zeros(8), hw=(56, 56), mode="decomposed", scale=None)
    assert not any("grid" in r for r in reasons), reasons
    huge = torch.empty(2**16, 8, 64 * 64, 12, device="meta")
    reasons = triton_decay._check(huge, huge, huge, torch.zeros(8), hw=(64, 64), mode="full", scale=None)
    assert any("grid limit" in r for r in reasons), reasons


def test_configs_are_memoized_and_each_caller_gets_its_own_dict():
    # the support check asks _config on every call (four times per decomposed call on CUDA): it is cached, and a
    # caller that changes its dict must not change what the next caller gets
    for dtype in (torch.bfloat16, torch.float32):
        for backward in (False, True):
            a = triton_decay._config(7, 96, backward, dtype, interpreted=False, shared_limit=99 * 1024)
            b = triton_decay._config(7, 96, backward, dtype, interpreted=False, shared_limit=99 * 1024)
            assert a == b and a is not b
            a["BLOCK_M"] = -1
            assert triton_decay._config(7, 96, backward, dtype, interpreted=False, shared_limit=99 * 1024) == b
    assert triton_decay._config(28, 24, True) == triton_decay._config(28, 24, True, interpreted=triton_built_interpreted())
    a = triton_decay._fused_config(7, 96, torch.bfloat16, interpreted=False)
    b = triton_decay._fused_config(7, 96, torch.bfloat16, interpreted=False)
    assert a == b and a is not b
    a["BLOCK_N"] = -1
    assert triton_decay._fused_config(7, 96, torch.bfloat16, interpreted=False) == b
    assert triton_decay._fused_config(97, 96, torch.bfloat16, interpreted=False) is None  # longer than one tile


@pytest.mark.parametrize("limit_kb", [64, 99, 163, 227])
def test_configs_fit_the_shared_memory_of_smaller_gpus(limit_kb):
    """T4 (64 KB), sm_86/89 (99 KB), A100 (163 KB), H100 (227 KB): every chosen config's estimate fits."""
    limit = limit_kb * 1024
    for dtype in (torch.float32, torch.bfloat16):
        for d in (12, 32, 64, 96, 128):
            for n in (7, 56, 3136):
                for backward in (False, True):
                    cfg = triton_decay._config(n, d, backward, dtype, interpreted=False, shared_limit=limit)
                    for kernel in ("dq", "dkdv") if backward else ("fwd",):
                        assert triton_decay.shared_estimate(cfg, dtype, kernel) <= limit, (dtype, d, n, kernel, cfg)
    big = triton_decay._config(3136, 128, True, torch.float32, interpreted=False)
    small = triton_decay._config(3136, 128, True, torch.float32, interpreted=False, shared_limit=64 * 1024)
    assert small != big
    assert triton_decay.shared_estimate(big, torch.float32, "dkdv") > 64 * 1024 >= triton_decay.shared_estimate(small, torch.float32, "dkdv")


# ------------------------------------------------------------- the fused and the split backward


class _CountingKernel:
    """Stands in for a kernel: records each launch under ``name``, then launches the real one."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.append(self.name)
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def launches(monkeypatch):
    log = []
    for name in ("_decay_bwd_fused_kernel", "_decay_bwd_dkdv_kernel", "_decay_bwd_dq_kernel"):
        monkeypatch.setattr(triton_decay, name, _CountingKernel(getattr(triton_decay, name), name, log))
    return log


@pytest.mark.parametrize("max_tokens", [64, 0], ids=["fused", "split"])
@pytest.mark.parametrize("mode,hw,d,b,nh", [("decomposed", (5, 7), 24, 2, 2), ("decomposed", (3, 70), 12, 1, 1),
                                            ("full", (7, 9), 16, 2, 2), ("full", (3, 5), 96, 2, 2)])
def test_fused_and_split_backward_match_the_reference(interpret, launches, max_tokens, mode, hw, d, b, nh):
    """Both backward paths in float64 against the reference, with log_gamma's gradient and the row pass
    accumulating onto the column pass: the fused kernel takes every line of at most 64 tokens (the
    70-token rows of 3x70 stay split while its 3-token columns fuse), the split kernels every line
    when the tuning knob is 0."""
    with tuned(decay_fused_backward_max_tokens=max_tokens):
        _compare_f64(hw, d, mode, b=b, nh=nh)
    lines = (hw[0] * hw[1],) if mode == "full" else hw
    fused = sum(max_tokens and n <= 64 for n in lines)
    assert launches.count("_decay_bwd_fused_kernel") == fused
    assert launches.count("_decay_bwd_dq_kernel") == launches.count("_decay_bwd_dkdv_kernel") == len(lines) - fused


def test_fused_backward_float16_flash_rule(interpret, launches):
    """The fused kernel's 16-bit casts (P and dS as dot operands) keep float16 within the flash rule."""
    hw, d = (6, 7), 32
    q, k, v, lg = _inputs(2, 2, hw, d, torch.float16)
    go = torch.randn(q.shape, dtype=torch.float16)
    fast = _run("triton", q, k, v, lg, hw, "decomposed", go)
    assert launches == ["_decay_bwd_fused_kernel"] * 2
    low = _run("reference", q, k, v, lg, hw, "decomposed", go)
    up = [t.detach().double().requires_grad_() for t in (q, k, v, lg)]
    exact = _run("reference", *up, hw, "decomposed", go.double())
    for name, f, lo, ex in zip(("out", "dq", "dk", "dv", "dlog_gamma"), fast, low, exact):
        err, ref_err = (f.double() - ex).abs().max().item(), (lo.double() - ex).abs().max().item()
        assert err <= 2 * ref_err + 1e-6, f"{name}: {err:.3g} > 2 x {ref_err:.3g}"


def test_fused_config_rules():
    """HEMF's lines take the fused backward; tiles that would spill, lines over 64 tokens and tiles over a
    smaller GPU's shared memory do not (they run split)."""
    cfg = triton_decay._fused_config
    for n, d in ((56, 12), (28, 24), (14, 48), (7, 96)):  # HEMF stages 1-4
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            c = cfg(n, d, dtype, interpreted=False)
            assert c is not None and c["num_stages"] == 1, (n, d, dtype)
            assert triton_decay.shared_estimate(c, dtype, "fused") <= triton_decay.SM90_MAX_SHARED
    assert cfg(65, 12, torch.bfloat16, interpreted=False) is None  # 128-token tile
    assert cfg(65, 12, torch.bfloat16, interpreted=True) is None
    assert cfg(56, 64, torch.bfloat16, interpreted=False) is None  # 64x64: spills on sm_90
    assert cfg(56, 32, torch.bfloat16, interpreted=False) is not None
    assert cfg(56, 32, torch.float32, interpreted=False) is None  # float32 64x32 spills
    assert cfg(30, 64, torch.float32, interpreted=False) is not None
    assert cfg(56, 12, torch.bfloat16, interpreted=False, shared_limit=8 * 1024) is None
    assert triton_decay._config(56, 12, True, torch.bfloat16, interpreted=False, shared_limit=8 * 1024)  # split still fits


def test_tuned_overrides_and_restores():
    assert tuning("decay_fused_backward_max_tokens") == TUNING_DEFAULTS["decay_fused_backward_max_tokens"]
    with tuned(decay_fused_backward_max_tokens=0, window_backward_programs_per_sm=8):
        assert tuning("decay_fused_backward_max_tokens") == 0
        assert tuning("window_backward_programs_per_sm") == 8
    assert tuning("window_backward_programs_per_sm") == TUNING_DEFAULTS["window_backward_programs_per_sm"]
    with pytest.raises(ValueError, match="unknown Triton tuning value.*decay_fused_max"):
        with tuned(decay_fused_max=3):
            pass
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="non-negative integers"):
            with tuned(decay_fused_backward_max_tokens=bad):
                pass
    with pytest.raises(ValueError, match="at least 1"):
        with tuned(window_backward_programs_per_sm=0):
            pass
    with pytest.raises(ValueError, match="power of two"):
        with tuned(window_backward_num_warps=6):
            pass
    assert dict(triton_decay_tuning()) == TUNING_DEFAULTS
    with pytest.raises(RuntimeError):
        with tuned(window_backward_num_warps=4):
            raise RuntimeError("inside")
    assert dict(triton_decay_tuning()) == TUNING_DEFAULTS


def triton_decay_tuning():
    return {k: tuning(k) for k in TUNING_DEFAULTS}
