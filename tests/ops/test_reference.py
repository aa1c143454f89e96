"""The reference ops: gradcheck, semantics against independent brute-force formulas, errors."""

import pytest
import torch

import fusionblocks.ops as ops
from fusionblocks.ops import reference as ref


def _qkv(b, nh, n, d, dtype=torch.float64, grad=True):
    return [torch.randn(b, nh, n, d, dtype=dtype, requires_grad=grad) for _ in range(3)]


def _brute_decay_full(q, k, v, lg, h, w, scale):
    b, nh, n, d = q.shape
    out = torch.empty_like(v)
    for i in range(n):
        yi, xi = divmod(i, w)
        s = torch.empty(b, nh, n, dtype=q.dtype)
        for j in range(n):
            yj, xj = divmod(j, w)
            s[..., j] = scale * (q[:, :, i] * k[:, :, j]).sum(-1) + lg * (abs(yi - yj) + abs(xi - xj))
        out[:, :, i] = (torch.softmax(s, -1)[..., None] * v).sum(2)
    return out


@pytest.mark.parametrize("hw", [(3, 4), (1, 5), (4, 1)])
def test_decay_full_matches_brute_force(hw):
    h, w = hw
    q, k, v = _qkv(2, 3, h * w, 5, grad=False)
    lg = torch.tensor([-0.1, -0.7, -2.0], dtype=torch.float64)
    got = ops.decay_attention(q, k, v, lg, hw=hw, backend="reference")
    want = _brute_decay_full(q, k, v, lg[None, :], h, w, 5 ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_decay_decomposed_is_row_then_column():
    h, w, d = 3, 4, 6
    q, k, v = _qkv(1, 2, h * w, d, grad=False)
    lg = torch.tensor([-0.3, -1.1], dtype=torch.float64)
    got = ops.decay_attention(q, k, v, lg, hw=(h, w), mode="decomposed", scale=0.5, backend="reference")
    q4, k4, v4 = (t.view(1, 2, h, w, d) for t in (q, k, v))
    rows = torch.empty_like(v4)
    for y in range(h):
        rows[:, :, y] = ref.decay_attention(
            q4[:, :, y], k4[:, :, y], v4[:, :, y], lg, hw=(1, w), scale=0.5
        )
    out = torch.empty_like(v4)
    for x in range(w):
        out[:, :, :, x] = ref.decay_attention(
            q4[:, :, :, x], k4[:, :, :, x], rows[:, :, :, x], lg, hw=(h, 1), scale=0.5
        )
    torch.testing.assert_close(got, out.reshape(1, 2, h * w, d), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["full", "decomposed"])
def test_decay_gradcheck(mode):
    q, k, v = _qkv(1, 2, 15, 4)
    lg = torch.tensor([-0.2, -0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, lg: ops.decay_attention(q, k, v, lg, hw=(3, 5), mode=mode, backend="reference"), (q, k, v, lg)
    )


def _brute_window(q, k, v, table, h, w, ws, shift, scale):
    """Independent formulation: per output token, find the tokens of its (shifted) window directly."""
    b, nh, n, d = q.shape
    out = torch.empty_like(v)
    idx = ref.relative_position_index(ws)
    region = ref.shift_region_ids(h, w, ws, shift) if shift else torch.zeros(h, w, dtype=torch.long)
    for p in range(n):
        y, x = divmod(p, w)
        ys, xs = (y - shift) % h, (x - shift) % w  # position in the shifted frame
        wy, wx = ys // ws, xs // ws
        keys, logits = [], []
        for ty in range(ws):
            for tx in range(ws):
                sy, sx = wy * ws + ty, wx * ws + tx
                oy, ox = (sy + shift) % h, (sx + shift) % w
                j = oy * w + ox
                s = scale * (q[:, :, p] * k[:, :, j]).sum(-1)
                if table is not None:
                    s = s + table[idx[(ys % ws) * ws + xs % ws, ty * ws + tx]][None, :]
                if shift and region[ys, xs] != region[sy, sx]:
                    s = s - 100.0
                keys.append(j)
                logits.append(s)
        pr = torch.softmax(torch.stack(logits, -1), -1)
        out[:, :, p] = (pr[..., None] * v[:, :, keys]).sum(2)
    return out


@pytest.mark.parametrize("hw,ws,shift", [((4, 6), 2, 1), ((6, 3), 3, 2), ((7, 7), 7, 3), ((8, 4), 4, 0)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_window_matches_brute_force(hw, ws, shift, with_bias):
    h, w = hw
    q, k, v = _qkv(2, 2, h * w, 3, grad=False)
    table = torch.randn((2 * ws - 1) ** 2, 2, dtype=torch.float64) if with_bias else None
    got = ops.window_attention(q, k, v, table, hw=hw, window_size=ws, shift=shift, backend="reference")
    want = _brute_window(q, k, v, table, h, w, ws, shift, 3 ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_window_gradcheck_with_table():
    q, k, v = _qkv(1, 2, 8 * 4, 3)
    t = torch.randn(49, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, t: ops.window_attention(q, k, v, t, hw=(8, 4), window_size=4, shift=2, backend="reference"),
        (q, k, v, t),
    )


def test_shift_mask_values():
    m = ref.shift_attention_mask(14, 14, 7, 3)
    assert m.shape == (4, 49, 49)
    assert set(m.unique().tolist()) == {0.0, -100.0}
    assert (m[0] == 0).all()  # top-left window lies in one region
    assert (m[3] == -100).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_runs_and_stays_close(dtype):
    q, k, v = _qkv(1, 2, 35, 8, dtype=torch.float32, grad=False)
    lg = torch.tensor([-0.5, -1.0])
    full = ops.decay_attention(q, k, v, lg, hw=(5, 7))
    low = ops.decay_attention(q.to(dtype), k.to(dtype), v.to(dtype), lg, hw=(5, 7))
    assert low.dtype == dtype
    assert (low.float() - full).abs().max() < 5e-2


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_non_contiguous_inputs(backend):
    """Strided views give the result of contiguous copies. Each backend is named: the automatic choice
    measures the two layouts as two call classes and may pick different backends or cpp variants for them.
    The cpp kernels copy strided inputs to contiguous ones, so their bits are the same; the reference's
    matmuls read the strides and may round the last bit of a float64 differently."""
    qkv = torch.randn(2, 20, 3, 2, 8, dtype=torch.float64)  # (B, N, 3, heads, D) like a qkv projection
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    lg = torch.tensor([-0.4, -0.6], dtype=torch.float64)
    why = ops.explain("decay_attention", q, k, v, lg, hw=(4, 5))[backend]
    if why:
        pytest.skip(f"{backend} cannot run here: {'; '.join(why)}")
    got = ops.decay_attention(q, k, v, lg, hw=(4, 5), backend=backend)
    want = ops.decay_attention(q.contiguous(), k.contiguous(), v.contiguous(), lg, hw=(4, 5), backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0 if backend == "cpp" else 1e-13)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(hw=(4, 4)), r"decay_attention: expected H\*W = 4\*4 = 16 tokens to match q, got \(1, 2, 12, 4\)"),
        (dict(hw=(3, 4), mode="diag"), r"expected mode one of \['full', 'decomposed'\], got 'diag'"),
        (dict(hw=(3, 4), lg=torch.zeros(3)), r"expected log_gamma of shape \(2,\) \(one per head\), got \(3,\)"),
        (dict(hw=(3, 4), kshape=(1, 2, 12, 5)), r"expected q, k, v of one shape"),
        (dict(hw=(3, 4), rank3=True), r"expected q as a 4-D \(B, heads, H\*W, D\) tensor, got \(2, 12, 4\)"),
    ],
)
def test_decay_errors(kwargs, match):
    q = torch.randn(1, 2, 12, 4)
    k = torch.randn(*kwargs.pop("kshape", (1, 2, 12, 4)))
    v = torch.randn(1, 2, 12, 4)
    lg = kwargs.pop("lg", torch.zeros(2))
    if kwargs.pop("rank3", False):
        q = q[0]
    with pytest.raises(ValueError, match=match):
        ops.decay_attention(q, k, v, lg, **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(hw=(6, 8), window_size=4), r"multiples of window_size 4 \(pad first\), got hw=\(6, 8\)"),
        (dict(hw=(8, 6), window_size=2, shift=2), r"expected shift as an int in \[0, 2\), got 2"),
        (dict(hw=(8, 6), window_size=2, table=torch.zeros(9, 3)), r"expected bias_table of shape \(9, 2\)"),
    ],
)
def test_window_errors(kwargs, match):
    q = torch.randn(1, 2, 48, 4)
    table = kwargs.pop("table", None)
    with pytest.raises(ValueError, match=match):
        ops.window_attention(q, q, q, table, **kwargs)
