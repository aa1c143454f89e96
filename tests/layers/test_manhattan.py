"""ManhattanSelfAttention (RMT MaSA) and EGFBlock (HEMF global branch): parity, gradients, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fusionblocks.layers.manhattan as manhattan
from fusionblocks.layers.manhattan import (
    RMT_ATTENTION_RULES,
    EGFBlock,
    ManhattanSelfAttention,
    manhattan_log_decay,
    rotary_angle,
    rotary_tables,
)
from fusionblocks.models.convert import convert_keys, load_official
from fusionblocks.ops import reference
from golden_utils import block, load, make_input, max_ulp, official_state_dict, rel_err

# Recomputed buffers against the official code's, stored by another machine: float32 ``log`` (the decay) within
# 2 ULP (each implementation within 1 ULP of exact); the rotary angles ``10000 ** -linspace(0, 1, n)`` within
# 8 ULP (pow amplifies a 1-ULP difference of its exponent e by |e * ln 10000| <= 9.3 in relative terms; measured
# 0 on the AMD EPYC / torch 2.13 development machine).
DECAY_ULP = 2
ANGLE_ULP = 8


def _rmt_attention(name: str, mode: str) -> ManhattanSelfAttention:
    record = block(name)
    sd = {k[len("attn."):]: v for k, v in official_state_dict(record).items() if k.startswith("attn.")}
    m = ManhattanSelfAttention(128, 4, mode, initial_value=2, heads_range=4).eval()
    m.load_state_dict({k: v for k, (_, v) in convert_keys(sd, RMT_ATTENTION_RULES).items()}, strict=True)
    return m


def _egf_block(name: str, **kw) -> EGFBlock:
    record = block(name)
    depth = sum(k.endswith("q_proj.weight") for k, _, _ in record["keys"])
    m = EGFBlock(96, 8, depth, **kw).eval()
    sd = m.prepare_official(official_state_dict(record))
    load_official(m, sd, *m.official_key_rules(), source="HEMF EGF_block")
    return m


@pytest.mark.parametrize("name, mode", [("rmt.masa_full", "full"), ("rmt.masa_decomposed", "decomposed")])
def test_rmt_masa_parity(name, mode, dispatch_backend):
    record = block(name)
    m = _rmt_attention(name, mode)
    x = make_input(record["inputs"][0])  # (B, H, W, C) as RMT
    with torch.no_grad():
        y = m(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y_cl = m.forward_channels_last(x)
    assert y.shape == record["output"].shape
    assert rel_err(y, record["output"]) <= 1e-5
    assert rel_err(y_cl, record["output"]) <= 1e-5


@pytest.mark.parametrize("name", ["rmt.masa_full", "rmt.masa_decomposed"])
def test_rmt_relpos_buffers_recomputed(name):
    buffers = block(name)["buffers"]
    assert max_ulp(rotary_angle(128 // 4), buffers["relpos.angle"]) <= ANGLE_ULP
    assert max_ulp(manhattan_log_decay(4, 2, 4), buffers["relpos.decay"]) <= DECAY_ULP
    m = ManhattanSelfAttention(128, 4, initial_value=2, heads_range=4)
    assert max_ulp(m.log_gamma, buffers["relpos.decay"]) <= DECAY_ULP
    assert torch.equal(m.log_gamma, manhattan_log_decay(4, 2, 4))  # the same function on the same machine
    assert "log_gamma" not in m.state_dict()


def test_hemf_relpos_buffers_recomputed():
    buffers = load("hemf")["buffers"]
    for i, dim in enumerate((96, 192, 384, 768)):
        assert max_ulp(rotary_angle(dim // 8), buffers[f"stages2.{i}.RetNetRelPos2d.angle"]) <= ANGLE_ULP
        assert max_ulp(manhattan_log_decay(8, 1, 3), buffers[f"stages2.{i}.RetNetRelPos2d.decay"]) <= DECAY_ULP


@pytest.mark.parametrize("name", ["hemf.egf_block", "hemf.egf_block_rect"])
def test_egf_block_parity(name, dispatch_backend):
    record = block(name)
    m = _egf_block(name)
    x = make_input(record["inputs"][0])
    with torch.no_grad():
        y = m(x)
    assert y.shape == record["output"].shape
    assert rel_err(y, record["output"]) <= 1e-5


def test_egf_block_official_keys_strict():
    record = block("hemf.egf_block")
    m = EGFBlock(96, 8, 3)
    sd = m.prepare_official(official_state_dict(record))
    assert not any("RetNetRelPos2d" in k for k in sd)
    del sd["FC.2.bias"]
    with pytest.raises(KeyError, match=r"missing official keys \(1\): \['FC\.2\.bias'\]"):
        load_official(m, sd, *m.official_key_rules(), source="HEMF")


def test_egf_prepare_official_rejects_other_config():
    sd = official_state_dict(block("hemf.egf_block"))
    with pytest.raises(ValueError, match="RetNetRelPos2d.decay"):
        EGFBlock(96, 8, 3, initial_value=2, heads_range=4).prepare_official(sd)
    with pytest.raises(ValueError, match="RetNetRelPos2d.angle"):
        EGFBlock(96, 4, 3).prepare_official(sd)


def test_egf_learnable_decay_loads_official_decay():
    record = block("hemf.egf_block_rect")
    fixed = _egf_block("hemf.egf_block_rect")
    m = _egf_block("hemf.egf_block_rect", learnable_decay=True)
    for i in range(2):
        assert isinstance(m.attn[i].log_gamma, torch.nn.Parameter)
        assert torch.equal(m.attn[i].log_gamma.detach(), record["buffers"]["RetNetRelPos2d.decay"])
        assert f"attn.{i}.log_gamma" in m.state_dict()
    x = make_input(record["inputs"][0])
    with torch.no_grad():
        assert torch.equal(m(x), fixed(x))
    m(x).square().mean().backward()
    assert all(a.log_gamma.grad is not None and a.log_gamma.grad.abs().sum() > 0 for a in m.attn)


@pytest.mark.parametrize("mode", ["full", "decomposed"])
def test_masa_calls_decay_attention(monkeypatch, mode):
    calls = []

    def spy(q, k, v, log_gamma, *, hw, mode, scale, backend):
        calls.append(dict(shape=tuple(q.shape), hw=hw, mode=mode, scale=scale, backend=backend))
        return reference.decay_attention(q, k, v, log_gamma, hw=hw, mode=mode, scale=scale)

    monkeypatch.setattr(manhattan, "decay_attention", spy)
    m = ManhattanSelfAttention(16, 2, mode, backend="reference")
    y = m(torch.randn(1, 16, 5, 7))
    assert y.shape == (1, 16, 5, 7)
    assert calls == [dict(shape=(1, 2, 35, 8), hw=(5, 7), mode=mode, scale=1.0, backend="reference")]


def _naive_masa(m: ManhattanSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """An independent loop-free restatement on NCHW input: the full 2-D decay or rows then columns."""
    b, c, h, w = x.shape
    nh, d = m.num_heads, m.head_dim
    t = x.flatten(2).transpose(1, 2)  # (B, N, C)
    q, k, v = m.q_proj(t), m.k_proj(t) * d ** -0.5, m.v_proj(t)
    idx = torch.arange(h * w, dtype=x.dtype)
    freq = 10000.0 ** -(torch.arange(d // 2, dtype=torch.float32) / max(d // 2 - 1, 1))
    phase = (idx.float()[:, None] * freq[None, :]).to(x.dtype)  # float32 phases, as the official tables
    def rope(z):
        z = z.reshape(b, h * w, nh, d // 2, 2)
        re_, im = z[..., 0], z[..., 1]
        c_, s_ = phase.cos()[:, None], phase.sin()[:, None]
        return torch.stack((re_ * c_ - im * s_, re_ * s_ + im * c_), -1).reshape(b, h * w, nh, d).transpose(1, 2)
    q, k = rope(q), rope(k)
    v = v.reshape(b, h * w, nh, d).transpose(1, 2)
    lg = m.log_gamma.to(x.dtype)
    ys, xs = idx.long() // w, idx.long() % w
    if m.mode == "full":
        dist = (ys[:, None] - ys[None]).abs() + (xs[:, None] - xs[None]).abs()
        o = torch.softmax(q @ k.transpose(-1, -2) + lg[:, None, None] * dist, -1) @ v
    else:
        same_row = ys[:, None] == ys[None]
        same_col = xs[:, None] == xs[None]
        s = q @ k.transpose(-1, -2)
        row = torch.softmax((s + lg[:, None, None] * (xs[:, None] - xs[None]).abs()).masked_fill(~same_row, float("-inf")), -1)
        col = torch.softmax((s + lg[:, None, None] * (ys[:, None] - ys[None]).abs()).masked_fill(~same_col, float("-inf")), -1)
        o = col @ (row @ v)
    o = o.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
    o = o + m.lepe(m.v_proj(t).transpose(1, 2).reshape(b, c, h, w))
    return m.out_proj(o.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("mode", ["full", "decomposed"])
@pytest.mark.parametrize("hw", [(5, 7), (1, 9), (13, 4)])
def test_masa_matches_independent_formula(mode, hw):
    torch.manual_seed(0)
    m = ManhattanSelfAttention(24, 3, mode, initial_value=1, heads_range=3).double()
    x = torch.randn(2, 24, *hw, dtype=torch.float64)
    with torch.no_grad():
        # the rotary phases are float32 in both (1-ulp differences in the frequencies remain)
        assert rel_err(m(x), _naive_masa(m, x)) <= 1e-7


@pytest.mark.parametrize("mode", ["full", "decomposed"])
def test_masa_gradcheck(mode):
    torch.manual_seed(0)
    m = ManhattanSelfAttention(8, 2, mode, learnable_decay=True).double()
    x = torch.randn(1, 8, 5, 7, dtype=torch.float64, requires_grad=True)
    lg = m.log_gamma.detach().clone().requires_grad_(True)
    w = m.q_proj.weight.detach().clone().requires_grad_(True)

    def f(x, lg, w):
        return torch.func.functional_call(m, {"log_gamma": lg, "q_proj.weight": w}, (x,))

    assert torch.autograd.gradcheck(f, (x, lg, w), eps=1e-6, atol=1e-5, fast_mode=True)


def test_masa_learnable_decay_gradient_and_state():
    m = ManhattanSelfAttention(16, 4, "decomposed", learnable_decay=True)
    assert isinstance(m.log_gamma, torch.nn.Parameter)
    assert "log_gamma" in m.state_dict()
    assert any(p is m.log_gamma for p in m.parameters())
    m(torch.randn(2, 16, 6, 5)).sum().backward()
    assert m.log_gamma.grad is not None and torch.isfinite(m.log_gamma.grad).all()
    assert m.log_gamma.grad.abs().min() > 0


@pytest.mark.parametrize("mode", ["full", "decomposed"])
def test_masa_shapes_batch1_noncontiguous(mode):
    torch.manual_seed(0)
    m = ManhattanSelfAttention(16, 2, mode).eval()
    base = torch.randn(1, 7, 13, 16)
    x_nc = base.permute(0, 3, 1, 2)  # (1, 16, 7, 13), channels-last strides
    assert not x_nc.is_contiguous()
    with torch.no_grad():
        y = m(x_nc)
        y_c = m(x_nc.contiguous())
    assert y.shape == (1, 16, 7, 13)
    assert torch.allclose(y, y_c, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        y_sl = m(torch.randn(3, 16, 17, 4)[:, :, ::2])
    assert y_sl.shape == (3, 16, 9, 4) and torch.isfinite(y_sl).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masa_low_precision(dtype):
    torch.manual_seed(0)
    m = ManhattanSelfAttention(16, 2, "decomposed").eval()
    x = torch.randn(2, 16, 6, 9)
    with torch.no_grad():
        ref = m(x)
        low = m.to(dtype)(x.to(dtype))
    assert low.dtype == dtype
    assert rel_err(low.float(), ref) <= 5e-2


def test_masa_rotary_tables_shape_and_phase():
    sin, cos = rotary_tables(3, 5, 8)
    assert sin.shape == cos.shape == (15, 8)
    assert sin.dtype == torch.float32
    assert torch.allclose(sin[:, 0], torch.sin(torch.arange(15.0)))
    assert torch.equal(sin[:, 0::2], sin[:, 1::2])


def test_egf_block_any_size_and_full_mode():
    torch.manual_seed(0)
    for mode in ("decomposed", "full"):
        m = EGFBlock(16, 2, 2, mode=mode).eval()
        with torch.no_grad():
            y = m(torch.randn(1, 16, 7, 3))
        assert y.shape == (1, 16, 7, 3) and torch.isfinite(y).all()
    assert list(m.state_dict()) == [
        "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
        *[f"attn.{i}.{p}" for i in range(2) for p in (
            "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
            "lepe.weight", "lepe.bias", "out_proj.weight", "out_proj.bias")],
        "fc.0.weight", "fc.0.bias", "fc.1.weight", "fc.1.bias",
    ]


def test_masa_errors():
    with pytest.raises(ValueError, match=r"ManhattanSelfAttention: expected dim \(30\) to be divisible by num_heads \(4\)"):
        ManhattanSelfAttention(30, 4)
    with pytest.raises(ValueError, match="ManhattanSelfAttention: expected an even head dim"):
        ManhattanSelfAttention(12, 4)
    with pytest.raises(ValueError, match="ManhattanSelfAttention: expected mode to be one of"):
        ManhattanSelfAttention(16, 2, "chunk")
    m = ManhattanSelfAttention(16, 2)
    with pytest.raises(ValueError, match=r"ManhattanSelfAttention: expected x with 16 channels, got \(2, 8, 5, 5\)"):
        m(torch.randn(2, 8, 5, 5))
    with pytest.raises(ValueError, match=r"ManhattanSelfAttention: expected x as a 4-D \(B, C, H, W\) tensor, got \(2, 25, 16\)"):
        m(torch.randn(2, 25, 16))
    with pytest.raises(ValueError, match=r"ManhattanSelfAttention: expected x with 16 channels in the last axis"):
        m.forward_channels_last(torch.randn(2, 16, 5, 5))
    with pytest.raises(TypeError, match="ManhattanSelfAttention: expected x to be a torch.Tensor"):
        m([1.0])
    e = EGFBlock(16, 2, 1)
    with pytest.raises(ValueError, match=r"EGFBlock: expected x with 16 channels, got \(1, 32, 4, 4\)"):
        e(torch.randn(1, 32, 4, 4))
    with pytest.raises(ValueError, match=r"EGFBlock: expected dim \(100\) to be divisible by num_heads \(8\)"):
        EGFBlock(100, 8)
    with pytest.raises(ValueError, match="EGFBlock: expected depth to be a positive int"):
        EGFBlock(16, 2, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", ["full", "decomposed", "egf"])
def test_float32_input_under_autocast(cls, dtype):
    torch.manual_seed(0)
    m = EGFBlock(16, 2, 2) if cls == "egf" else ManhattanSelfAttention(16, 2, cls)
    x = torch.randn(2, 16, 5, 7)
    want = m(x)
    with torch.autocast("cpu", dtype=dtype):
        got = m(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want, rtol=0, atol=0.05)


def test_masa_rotary_and_backend_errors_name_the_block():
    m = ManhattanSelfAttention(16, 2)
    with pytest.raises(ValueError, match=r"^ManhattanSelfAttention: expected rotary sin of shape \(H\*W, head_dim\) = "
                                         r"\(25, 8\) for x \(2, 5, 5, 16\), got \(16, 8\)$"):
        m.forward_channels_last(torch.randn(2, 5, 5, 16), rotary_tables(4, 4, 8))
    with pytest.raises(ValueError, match=r"^ManhattanSelfAttention: expected backend to be one of \[None, 'reference', "):
        ManhattanSelfAttention(16, 2, backend="cpu")
    with pytest.raises(ValueError, match=r"^EGFBlock: expected backend to be one of"):
        EGFBlock(16, 2, 1, backend="cpu")
    with pytest.raises(ValueError, match=r"^EGFBlock: expected an even head dim .* got 12 / 4 = 3$"):
        EGFBlock(12, 4, 1)


@pytest.mark.parametrize("cls", [ManhattanSelfAttention, EGFBlock])
@pytest.mark.parametrize("kw, got", [(dict(initial_value="a"), "str 'a'"), (dict(initial_value=None), "NoneType None"),
                                     (dict(heads_range=True), "bool True")])
def test_decay_config_must_be_real_numbers(cls, kw, got):
    # was a TypeError from 'bad operand type for unary -' inside manhattan_log_decay ('a', None), or True taken as 1
    what = next(iter(kw))
    with pytest.raises(TypeError, match=rf"^{cls.__name__}: expected {what} as a float, got {got}$"):
        cls(8, 2, **kw)
    block = cls(8, 2, initial_value=np.float32(1.5), heads_range=3)
    masa = block if cls is ManhattanSelfAttention else block.attn[0]
    assert (masa.initial_value, masa.heads_range) == (1.5, 3.0) and type(masa.initial_value) is float


def test_the_fixed_decay_is_filled_in_after_a_meta_device_build():
    # built on the meta device (timm, FSDP and accelerate build large models so), moved with to_empty and loaded:
    # the fixed decay, a buffer outside the state_dict, held uninitialized memory (HEMF's outputs off by 0.1)
    import fusionblocks as fb

    torch.manual_seed(0)
    small = dict(dims=(16, 32, 64, 128), num_heads=2)
    model = fb.create_model("hemf", num_classes=3, **small).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    with torch.device("meta"):
        empty = fb.create_model("hemf", num_classes=3, **small)
    loaded = empty.to_empty(device="cpu")
    for m in loaded.modules():
        if isinstance(m, ManhattanSelfAttention):
            m.log_gamma.fill_(float("nan"))  # what to_empty may leave there
    loaded.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), want, rtol=0, atol=0)
    with torch.device("meta"):
        attn = ManhattanSelfAttention(16, 2)
    attn = attn.to_empty(device="cpu")
    attn.log_gamma.fill_(float("nan"))
    attn.reset_parameters()  # the other route: initialise instead of loading
    torch.testing.assert_close(attn.log_gamma, manhattan_log_decay(2, attn.initial_value, attn.heads_range), rtol=0, atol=0)
