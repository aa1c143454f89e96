import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fusionblocks.layers.tokens import OverlapTokenizer, TokenWeighting


# ---------------------------------------------------------------- OverlapTokenizer


@pytest.mark.parametrize(
    "hw,k,s,p",
    [((14, 14), 2, 1, 0), ((7, 7), 2, 1, 0), ((13, 9), 2, 1, 0), ((10, 11), 3, 2, 1), ((5, 8), (2, 3), (1, 2), (0, 1))],
)
def test_tokenizer_count_formula_and_values(hw, k, s, p):
    H, W = hw
    tok = OverlapTokenizer(6, 10, k, s, p)
    x = torch.randn(2, 6, H, W)
    t, (h, w) = tok(x, return_hw=True)
    kh, kw = (k, k) if isinstance(k, int) else k
    sh, sw = (s, s) if isinstance(s, int) else s
    ph, pw = (p, p) if isinstance(p, int) else p
    assert (h, w) == ((H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1)
    assert (h, w) == tok.output_size(H, W)
    assert t.shape == (2, h * w, 10)
    ref = F.conv2d(x, tok.proj.weight, tok.proj.bias, stride=(sh, sw), padding=(ph, pw))
    assert ref.shape[-2:] == (h, w)
    torch.testing.assert_close(t, ref.flatten(2).transpose(1, 2))
    # raster order: token r * w + c is the patch whose top-left corner is (r * sh - ph, c * sw - pw)
    r, c = h - 1, w // 2
    torch.testing.assert_close(t[:, r * w + c], ref[:, :, r, c])


def test_tokenizer_paper_sizes():
    tok = OverlapTokenizer(256, 512)
    assert tok.output_size(14, 14) == (13, 13)  # (H - 1)(W - 1) = 169 tokens
    assert tok.output_size(7, 7) == (6, 6)
    t = tok(torch.randn(1, 256, 14, 14))
    assert t.shape == (1, 169, 512)


def test_tokenizer_overlap_patches_share_pixels():
    tok = OverlapTokenizer(1, 1)
    with torch.no_grad():
        tok.proj.weight.fill_(1.0)
        tok.proj.bias.zero_()
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = 1.0
    t, (h, w) = tok(x, return_hw=True)
    # the single hot pixel is inside the 4 overlapping 2x2 patches at (0,0), (0,1), (1,0), (1,1)
    grid = t[0, :, 0].reshape(h, w)
    expected = torch.zeros(3, 3)
    expected[:2, :2] = 1.0
    torch.testing.assert_close(grid, expected)


def test_tokenizer_norm_noncontiguous_batch1():
    tok = OverlapTokenizer(5, 8, norm_layer=nn.LayerNorm)
    x = torch.randn(1, 9, 7, 5).permute(0, 3, 2, 1)  # (1, 5, 7, 9), non-contiguous
    assert not x.is_contiguous()
    t = tok(x)
    assert t.shape == (1, 6 * 8, 8)
    torch.testing.assert_close(t.mean(-1), torch.zeros(1, 48), atol=1e-5, rtol=0)
    torch.testing.assert_close(t, tok(x.contiguous()))


def test_tokenizer_errors():
    tok = OverlapTokenizer(4, 8)
    with pytest.raises(ValueError, match=r"OverlapTokenizer: expected x with 4 channels, got \(2, 3, 5, 5\)"):
        tok(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"OverlapTokenizer: expected x with a spatial size of at least \(2, 2\).*\(1, 4, 1, 6\)"):
        tok(torch.randn(1, 4, 1, 6))
    with pytest.raises(ValueError, match="OverlapTokenizer: expected x as a 4-D"):
        tok(torch.randn(4, 5, 5))
    with pytest.raises(ValueError, match="OverlapTokenizer: expected kernel_size"):
        OverlapTokenizer(4, 8, kernel_size=0)
    with pytest.raises(ValueError, match="OverlapTokenizer: expected embed_dim"):
        OverlapTokenizer(4, 0)


# ---------------------------------------------------------------- TokenWeighting


def _reference_weights(tw: TokenWeighting, tokens: torch.Tensor, hw) -> torch.Tensor:
    """The documented formula written out with plain ops (CBAM order, per-token spatial weight)."""
    b, n, d = tokens.shape
    g = tokens.transpose(1, 2).reshape(b, d, *hw)
    fc1, fc2 = tw.channel.fc1.weight.flatten(1), tw.channel.fc2.weight.flatten(1)

    def mlp(v):  # (B, D)
        return F.relu(v @ fc1.t()) @ fc2.t()

    ca = torch.sigmoid(mlp(g.amax(dim=(2, 3))) + mlp(g.mean(dim=(2, 3))))
    g = g * ca[:, :, None, None]
    s = torch.cat([g.mean(1, keepdim=True), g.amax(1, keepdim=True)], dim=1)
    k = tw.spatial.conv.weight.shape[-1]
    return torch.sigmoid(F.conv2d(s, tw.spatial.conv.weight, padding=k // 2)).flatten(1)


@pytest.mark.parametrize("hw", [(6, 6), (13, 13), (5, 9), (1, 1)])
def test_weighting_matches_formula(hw):
    tw = TokenWeighting(32, reduction=4)
    tokens = torch.randn(3, hw[0] * hw[1], 32)
    out, w = tw(tokens, hw, return_weights=True)
    ref_w = _reference_weights(tw, tokens, hw)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(out, tokens * ref_w.unsqueeze(-1))
    torch.testing.assert_close(tw(tokens, hw), out)
    assert out.shape == tokens.shape and w.shape == (3, hw[0] * hw[1])


def test_weighting_weights_in_unit_interval_and_structured():
    torch.manual_seed(1)
    h, w, d = 8, 10, 16
    tw = TokenWeighting(d, reduction=4)
    grid = 0.05 * torch.randn(2, d, h, w)
    grid[:, :, 2:5, 3:7] += 3.0  # a bright "lesion" region
    tokens = grid.flatten(2).transpose(1, 2)
    _, a = tw(tokens, (h, w), return_weights=True)
    assert torch.all(a > 0) and torch.all(a < 1)
    assert a.amax() - a.amin() > 1e-2
    # with a positive (response-summing) spatial kernel, the high-response region is highlighted
    with torch.no_grad():
        tw.spatial.conv.weight.fill_(1.0 / tw.spatial.conv.weight[0].numel())
    _, a = tw(tokens, (h, w), return_weights=True)
    assert torch.all(a > 0) and torch.all(a < 1)
    a = a.reshape(2, h, w)
    inside = a[:, 2:5, 3:7]
    outside = torch.cat([a[:, :1].flatten(), a[:, 7:].flatten()])
    assert inside.amin() > outside.amax() + 0.02


def test_weighting_scales_each_token_by_a_scalar():
    tw = TokenWeighting(8, reduction=2)
    tokens = torch.randn(2, 12, 8)
    out, a = tw(tokens, (3, 4), return_weights=True)
    ratio = out / tokens
    torch.testing.assert_close(ratio, a.unsqueeze(-1).expand_as(ratio))


def test_weighting_noncontiguous_and_raster_order():
    tw = TokenWeighting(8, reduction=2)
    base = torch.randn(2, 8, 20)
    tokens = base.transpose(1, 2)  # (2, 20, 8) non-contiguous
    assert not tokens.is_contiguous()
    torch.testing.assert_close(tw(tokens, (4, 5)), tw(tokens.contiguous(), (4, 5)))
    with torch.no_grad():  # a transpose-symmetric spatial kernel, so transposing the grid transposes the weights
        k = tw.spatial.conv.weight
        k.copy_(0.5 * (k + k.transpose(-1, -2)))
    # a transposed grid must be fed with the transposed hw: the weights then transpose too
    g = tokens.transpose(1, 2).reshape(2, 8, 4, 5)
    gt = g.transpose(2, 3).flatten(2).transpose(1, 2)
    _, a = tw(tokens, (4, 5), return_weights=True)
    _, at = tw(gt, (5, 4), return_weights=True)
    torch.testing.assert_close(at.reshape(2, 5, 4), a.reshape(2, 4, 5).transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_weighting_gradcheck_float64():
    torch.manual_seed(0)
    tw = TokenWeighting(4, reduction=2, kernel_size=3).double()
    tokens = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    params = tuple(tw.parameters())

    def f(t, *ps):
        return tw(t, (2, 3))

    assert torch.autograd.gradcheck(f, (tokens,) + params, eps=1e-6, atol=1e-5)


def test_weighting_errors():
    tw = TokenWeighting(16)
    with pytest.raises(ValueError, match=r"TokenWeighting: expected tokens with embedding dim 16, got \(2, 12, 8\)"):
        tw(torch.randn(2, 12, 8), (3, 4))
    with pytest.raises(ValueError, match=r"TokenWeighting: expected hw with h \* w == N tokens \(12\), got hw=\(3, 5\)"):
        tw(torch.randn(2, 12, 16), (3, 5))
    with pytest.raises(ValueError, match=r"TokenWeighting: expected hw as a pair of positive ints \(H, W\), got 12"):
        tw(torch.randn(2, 12, 16), 12)
    with pytest.raises(ValueError, match=r"TokenWeighting: expected hw as a pair of positive ints \(H, W\), got \(3.9, 4.2\)"):
        tw(torch.randn(2, 12, 16), (3.9, 4.2))
    with pytest.raises(ValueError, match="TokenWeighting: expected tokens as a 3-D"):
        tw(torch.randn(2, 16, 3, 4), (3, 4))


def test_tokenizer_then_weighting_pipeline():
    tok = OverlapTokenizer(8, 16)
    tw = TokenWeighting(16, reduction=4)
    x = torch.randn(2, 8, 7, 9)
    t, hw = tok(x, return_hw=True)
    out, a = tw(t, hw, return_weights=True)
    assert hw == (6, 8) and out.shape == (2, 48, 16) and a.shape == (2, 48)
    out.sum().backward()
    for n, p in list(tok.named_parameters()) + list(tw.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, n
