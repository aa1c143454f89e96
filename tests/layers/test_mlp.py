"""IRMLP / SIRMLP: official parity and structure, depthwise variant, gradcheck, layouts, errors."""
import re

import pytest
import torch
import torch.nn.functional as F

import golden_utils as gu
from fusionblocks import IRMLP, SIRMLP
from fusionblocks.models.convert import load_official


def _randomize_bn(m):
    g = torch.Generator().manual_seed(5)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            with torch.no_grad():
                mod.running_mean.copy_(0.1 * torch.randn(mod.num_features, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(mod.num_features, generator=g))
                mod.weight.copy_(1 + 0.1 * torch.randn(mod.num_features, generator=g))
                mod.bias.copy_(0.1 * torch.randn(mod.num_features, generator=g))
    return m.eval()


def test_sirmlp_matches_official_hemf():
    record = gu.block("hemf.sirmlp")
    m = SIRMLP(288, 96, 96).eval()
    load_official(m, gu.official_state_dict(record), *SIRMLP.official_key_rules(), source="hemf.sirmlp")
    (x,) = [gu.make_input(s) for s in record["inputs"]]
    with torch.no_grad():
        assert gu.rel_err(m(x), record["output"]) <= 1e-5


def test_irmlp_loads_the_official_full_3x3_conv():
    record = gu.block("hifuse.hff_first")
    sd = {k[len("residual."):]: v for k, v in gu.official_state_dict(record).items() if k.startswith("residual.")}
    assert tuple(sd["conv1.conv.weight"].shape) == (288, 288, 3, 3)
    m = IRMLP(288, 96)
    load_official(m, sd, *IRMLP.official_key_rules(), source="HiFuse IRMLP")
    torch.testing.assert_close(m.spatial.weight, sd["conv1.conv.weight"], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"conv1\.conv\.weight.*expected shape \(288, 1, 3, 3\)"):
        load_official(IRMLP(288, 96, depthwise=True), sd, *IRMLP.official_key_rules(), source="HiFuse IRMLP")


def test_irmlp_formula():
    torch.manual_seed(0)
    m = _randomize_bn(IRMLP(6, 5).double())
    x = torch.randn(2, 6, 4, 7, dtype=torch.float64)

    def bn(t, b):
        return F.batch_norm(t, b.running_mean, b.running_var, b.weight, b.bias, False, 0.0, b.eps)

    y = bn(F.gelu(F.conv2d(x, m.spatial.weight, padding=1)) + x, m.norm)
    want = bn(F.conv2d(F.gelu(F.conv2d(y, m.expand.weight)), m.project.conv.weight), m.project.bn)
    torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)
    assert m.expand.weight.shape == (24, 6, 1, 1)


def test_depthwise_is_the_full_conv_with_a_diagonal_kernel():
    torch.manual_seed(1)
    dw = _randomize_bn(IRMLP(8, 4, depthwise=True))
    full = IRMLP(8, 4)
    sd = dw.state_dict()
    diag = torch.zeros(8, 8, 3, 3)
    diag[torch.arange(8), torch.arange(8)] = sd["spatial.weight"][:, 0]
    sd["spatial.weight"] = diag
    full.load_state_dict(sd)
    full.eval()
    x = torch.randn(2, 8, 5, 6)
    torch.testing.assert_close(full(x), dw(x), rtol=1e-5, atol=1e-6)
    n_full = sum(p.numel() for p in full.parameters())
    n_dw = sum(p.numel() for p in dw.parameters())
    assert n_full - n_dw == 8 * 8 * 9 - 8 * 9


def test_sirmlp_is_squeeze_then_irmlp():
    torch.manual_seed(2)
    s = _randomize_bn(SIRMLP(12, 4, 6))
    body = IRMLP(4, 6)
    body.load_state_dict({k: v for k, v in s.state_dict().items() if not k.startswith("squeeze.")})
    body.eval()
    x = torch.randn(1, 12, 5, 3)
    torch.testing.assert_close(s(x), body(s.squeeze(x)), rtol=0, atol=0)
    assert s.squeeze.conv.bias is not None and s.spatial.bias is None


def test_official_rules_cover_every_key():
    for cls, args, official in [
        (IRMLP, (8, 4), ["conv1.conv.weight", "conv2.conv.weight", "conv3.conv.weight", "conv3.bn.weight", "bn1.weight"]),
        (SIRMLP, (12, 4, 4), ["conv_s.conv.weight", "conv_s.conv.bias", "conv_s.bn.running_var", "conv1.conv.weight"]),
    ]:
        ours = set(cls(*args).state_dict())
        for key in official:
            new = next(re.sub(p, r, key) for p, r in cls.official_key_rules()[0] if re.fullmatch(p, key))
            assert new in ours, (key, new)


@pytest.mark.parametrize("make", [lambda: IRMLP(4, 3), lambda: IRMLP(4, 3, depthwise=True), lambda: SIRMLP(6, 4, 2)])
def test_mlp_gradcheck(make):
    torch.manual_seed(3)
    m = _randomize_bn(make().double())
    x = torch.randn(1, m.in_dim, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


@pytest.mark.parametrize("make", [lambda: IRMLP(12, 8), lambda: SIRMLP(12, 4, 8, depthwise=True)])
def test_mlp_odd_sizes_batch1_noncontiguous(make):
    m = _randomize_bn(make())
    x = torch.randn(1, 13, 7, 12).permute(0, 3, 2, 1)  # (1, 12, 7, 13)
    assert not x.is_contiguous()
    out = m(x)
    assert out.shape == (1, 8, 7, 13)
    torch.testing.assert_close(out, m(x.contiguous()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mlp_low_precision(dtype):
    torch.manual_seed(4)
    m = _randomize_bn(SIRMLP(24, 8, 8))
    x = torch.randn(2, 24, 7, 9)
    want = m(x)
    got = m.to(dtype)(x.to(dtype))
    assert got.dtype == dtype and got.shape == want.shape
    assert gu.rel_err(got.float(), want) <= (1e-2 if dtype == torch.float16 else 5e-2)


def test_mlp_errors():
    with pytest.raises(ValueError, match=r"IRMLP: expected x with 8 channels, got \(2, 6, 4, 4\)"):
        IRMLP(8, 4)(torch.randn(2, 6, 4, 4))
    with pytest.raises(ValueError, match=r"SIRMLP: expected x with 12 channels, got \(1, 4, 4, 4\)"):
        SIRMLP(12, 4, 4)(torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"IRMLP: expected x as a 4-D \(B, C, H, W\) tensor, got \(8, 4, 4\)"):
        IRMLP(8, 4)(torch.randn(8, 4, 4))
    with pytest.raises(ValueError, match="IRMLP: expected out_dim to be a positive int, got 0"):
        IRMLP(8, 0)
    with pytest.raises(ValueError, match="SIRMLP: expected hidden_dim to be a positive int, got -1"):
        SIRMLP(8, -1, 4)
