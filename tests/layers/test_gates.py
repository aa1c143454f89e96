"""ChannelAttn / SpatialAttn: official parity, formulas, gradcheck, layouts, errors."""
import pytest
import torch

import golden_utils as gu
from fusionblocks import ChannelAttn, SpatialAttn
from fusionblocks.models.convert import load_official

SPATIAL_RULES = [(r"conv1\.(.*)", r"conv.\1")]


def _gate_parity(name, module, rules):
    record = gu.block(name)
    module.eval()
    load_official(module, gu.official_state_dict(record), rules, source=name)
    (x,) = [gu.make_input(s) for s in record["inputs"]]
    with torch.no_grad():
        return gu.rel_err(module.gate(x), record["output"])


def test_channel_attention_matches_official_hemf():
    assert _gate_parity("hemf.channel_attention", ChannelAttn(96, 16), []) <= 1e-5


def test_spatial_attention_matches_official_hemf():
    assert _gate_parity("hemf.spatial_attention", SpatialAttn(7), SPATIAL_RULES) <= 1e-5


def test_channel_gate_formula():
    torch.manual_seed(1)
    m = ChannelAttn(8, 4).double()
    x = torch.randn(2, 8, 5, 3, dtype=torch.float64)

    def mlp(v):
        return torch.relu(v @ m.fc1.weight[:, :, 0, 0].T) @ m.fc2.weight[:, :, 0, 0].T

    want = torch.sigmoid(mlp(x.amax((2, 3))) + mlp(x.mean((2, 3))))
    torch.testing.assert_close(m.gate(x)[:, :, 0, 0], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m(x), x * want[:, :, None, None], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", ["avg_max", "max_avg"])
def test_spatial_gate_order_and_norm(order):
    torch.manual_seed(2)
    m = SpatialAttn(3, order=order, norm=True).double().eval()
    with torch.no_grad():
        m.bn.running_mean.fill_(0.3)
        m.bn.running_var.fill_(2.0)
    x = torch.randn(1, 5, 4, 6, dtype=torch.float64)
    pooled = [x.mean(1, keepdim=True), x.amax(1, keepdim=True)]
    if order == "max_avg":
        pooled.reverse()
    s = torch.nn.functional.conv2d(torch.cat(pooled, 1), m.conv.weight, padding=1)
    s = (s - 0.3) / (2.0 + m.bn.eps) ** 0.5 * m.bn.weight + m.bn.bias
    torch.testing.assert_close(m.gate(x), torch.sigmoid(s), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "make",
    [lambda: ChannelAttn(6, 2), lambda: SpatialAttn(3), lambda: SpatialAttn(3, order="max_avg", norm=True)],
)
def test_gates_gradcheck(make):
    torch.manual_seed(3)
    m = make().double().eval()
    x = torch.randn(1, 6, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


@pytest.mark.parametrize("make", [lambda: ChannelAttn(12), lambda: SpatialAttn(7, order="max_avg", norm=True)])
def test_gates_odd_sizes_batch1_noncontiguous(make):
    m = make().eval()
    base = torch.randn(1, 12, 13, 7)
    x = base.transpose(2, 3)  # (1, 12, 7, 13), non-contiguous
    assert not x.is_contiguous()
    out = m(x)
    assert out.shape == (1, 12, 7, 13)
    torch.testing.assert_close(out, m(x.contiguous()), rtol=1e-6, atol=1e-6)
    cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(m(cl), out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gates_low_precision(dtype):
    torch.manual_seed(4)
    for m in (ChannelAttn(16), SpatialAttn(7, order="max_avg", norm=True).eval()):
        x = torch.randn(2, 16, 7, 9)
        want = m(x)
        got = m.to(dtype)(x.to(dtype))
        assert got.dtype == dtype
        tol = 1e-2 if dtype == torch.float16 else 4e-2
        assert gu.rel_err(got.float(), want) <= tol


def test_gate_errors():
    with pytest.raises(ValueError, match=r"ChannelAttn: expected x with 8 channels, got \(2, 4, 3, 3\)"):
        ChannelAttn(8)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"ChannelAttn: expected x as a 4-D"):
        ChannelAttn(8)(torch.randn(2, 8, 3))
    with pytest.raises(ValueError, match=r"SpatialAttn: expected x as a 4-D .* got \(8, 3\)"):
        SpatialAttn()(torch.randn(8, 3))
    with pytest.raises(ValueError, match="SpatialAttn: expected an odd kernel_size, got 4"):
        SpatialAttn(4)
    with pytest.raises(ValueError, match="SpatialAttn: expected order"):
        SpatialAttn(7, order="mean_max")
    with pytest.raises(ValueError, match="ChannelAttn: expected reduction to be a positive int, got 0"):
        ChannelAttn(8, 0)
