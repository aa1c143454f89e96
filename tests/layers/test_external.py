"""MultiHeadExternalAttention: official parity, the double normalization, non-square maps, gradcheck, errors."""
import re

import pytest
import torch

import golden_utils as gu
from fusionblocks import MultiHeadExternalAttention
from fusionblocks.models.convert import load_official


def _mhea(channels, heads, slots, seed=0, dtype=torch.float32):
    m = MultiHeadExternalAttention(channels, heads, slots).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.mk.weight.copy_(torch.randn(m.mk.weight.shape, generator=g))
        m.mv.weight.copy_(torch.randn(m.mv.weight.shape, generator=g) / slots**0.5)
    return m


def _brute(m, x):
    """Per head, per token: scores against the memory, softmax over tokens, then normalize over slots."""
    b, c, h, w = x.shape
    d = c // m.num_heads
    out = torch.empty_like(x)
    for head in range(m.num_heads):
        tokens = x[:, head * d : (head + 1) * d].flatten(2).transpose(1, 2)  # (B, N, d)
        scores = tokens @ m.mk.weight.T  # (B, N, S)
        a = scores.exp() / scores.exp().sum(1, keepdim=True)
        a = a / a.sum(2, keepdim=True)
        out[:, head * d : (head + 1) * d] = (a @ m.mv.weight.T).transpose(1, 2).reshape(b, d, h, w)
    return out


def test_mhea_matches_official_hemf():
    record = gu.block("hemf.mhea")
    m = MultiHeadExternalAttention(96).eval()
    load_official(m, gu.official_state_dict(record), *MultiHeadExternalAttention.official_key_rules(), source="mhea")
    (x,) = [gu.make_input(s) for s in record["inputs"]]
    with torch.no_grad():
        assert gu.rel_err(m(x), record["output"]) <= 1e-5


@pytest.mark.parametrize("hw", [(3, 5), (7, 13), (1, 4)])
def test_mhea_matches_brute_force_on_any_grid(hw):
    m = _mhea(12, 3, 5, dtype=torch.float64)
    x = torch.randn(2, 12, *hw, dtype=torch.float64)
    torch.testing.assert_close(m(x), _brute(m, x), rtol=1e-12, atol=1e-12)


def test_mhea_non_square_is_the_square_map_reshaped():
    m = _mhea(16, 4, 8)
    x = torch.randn(2, 16, 6, 6)
    rect = x.reshape(2, 16, 4, 9)
    torch.testing.assert_close(m(rect), m(x).reshape(2, 16, 4, 9), rtol=1e-6, atol=1e-6)


def test_mhea_shortcut_and_shared_memory():
    m = _mhea(8, 2, 4)
    x = torch.randn(1, 8, 3, 4)
    m_sc = MultiHeadExternalAttention(8, 2, 4, shortcut=True)
    m_sc.load_state_dict(m.state_dict())
    torch.testing.assert_close(m_sc(x), m(x) + x)
    assert m.mk.weight.shape == (4, 4) and m.mv.weight.shape == (4, 4) and m.mk.bias is None


def test_mhea_gradcheck():
    m = _mhea(6, 2, 3, dtype=torch.float64)
    x = torch.randn(1, 6, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


def test_mhea_batch1_noncontiguous():
    m = _mhea(16, 8, 8)
    x = torch.randn(1, 13, 16, 7).permute(0, 2, 3, 1)  # (1, 16, 7, 13)
    assert not x.is_contiguous()
    out = m(x)
    assert out.shape == (1, 16, 7, 13)
    torch.testing.assert_close(out, m(x.contiguous()))
    torch.testing.assert_close(m(x.contiguous(memory_format=torch.channels_last)), out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mhea_low_precision(dtype):
    m = _mhea(16, 4, 8)
    x = torch.randn(2, 16, 7, 9)
    want = m(x)
    got = m.to(dtype)(x.to(dtype))
    assert got.dtype == dtype
    assert gu.rel_err(got.float(), want) <= (1e-2 if dtype == torch.float16 else 5e-2)


def test_mhea_errors():
    with pytest.raises(ValueError, match=r"MultiHeadExternalAttention: expected channels \(100\) to be divisible by num_heads \(8\)"):
        MultiHeadExternalAttention(100)
    with pytest.raises(ValueError, match="MultiHeadExternalAttention: expected memory_size to be a positive int, got 0"):
        MultiHeadExternalAttention(8, 2, 0)
    m = MultiHeadExternalAttention(16, 4)
    with pytest.raises(ValueError, match=r"MultiHeadExternalAttention: expected x with 16 channels, got \(2, 8, 4, 4\)"):
        m(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match=r"MultiHeadExternalAttention: expected x as a 4-D \(B, C, H, W\) tensor, got \(2, 16, 16\)"):
        m(torch.randn(2, 16, 16))
    with pytest.raises(TypeError, match="MultiHeadExternalAttention: expected x to be a torch.Tensor, got list"):
        m([1.0])


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.1", True])
def test_mhea_dropout_is_a_rate(bad):
    # a negative rate was dropped silently (no dropout at all), 1.5 failed in nn.Dropout without the block's name
    with pytest.raises(ValueError, match=rf"^MultiHeadExternalAttention: expected dropout in \[0, 1\), got {re.escape(repr(bad))}$"):
        MultiHeadExternalAttention(8, 2, dropout=bad)
    assert MultiHeadExternalAttention(8, 2, dropout=0.25).drop.p == 0.25
