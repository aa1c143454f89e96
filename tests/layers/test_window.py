"""WindowAttention, PatchMerging and HiFuse's global block/stage: parity with the official code, padding,
odd sizes, gradients and errors."""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fusionblocks.layers.window import HiFuseGlobalBlock, HiFuseGlobalStage, PatchMerging, WindowAttention
from golden_utils import block, make_input, official_state_dict, rel_err

GLOBAL_LAYERS = {
    "hifuse.global_layer": dict(dim=96, depth=2, num_heads=3),
    "hifuse.global_layer_merge": dict(dim=192, depth=2, num_heads=6, in_dim=96),
    "hifuse.global_layer_7x7": dict(dim=768, depth=2, num_heads=24),
}
DROPPED = ("norm2.", "relative_position_index")


def _tokens_to_nchw(x, h, w):
    return x.view(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2)


@pytest.mark.parametrize("name", list(GLOBAL_LAYERS))
def test_global_stage_matches_official_basic_layer(name, dispatch_backend):
    rec = block(name)
    stage = HiFuseGlobalStage(**GLOBAL_LAYERS[name]).eval()
    sd = {k: v for k, v in official_state_dict(rec).items() if not any(d in k for d in DROPPED)}
    stage.load_state_dict(sd, strict=True)
    x, h, w = (make_input(s) for s in rec["inputs"])
    with torch.no_grad():
        out = stage(_tokens_to_nchw(x, h, w))
    out = out.flatten(2).transpose(1, 2)
    assert out.shape == rec["output"].shape
    assert rel_err(out, rec["output"]) <= 1e-5


def test_official_relative_position_index_is_what_the_op_derives():
    from fusionblocks.ops.reference import relative_position_index

    rec = block("hifuse.global_layer")
    official = rec["buffers"]["blocks.0.attn.relative_position_index"]
    assert torch.equal(official, relative_position_index(7))


def _naive_single_window(attn: WindowAttention, t: torch.Tensor) -> torch.Tensor:
    """Plain attention over one padded window of channels-last tokens ``t (B, ws, ws, C)``, no shift."""
    b, ws, _, c = t.shape
    heads, d = attn.num_heads, c // attn.num_heads
    qkv = attn.qkv(t.reshape(b, ws * ws, c)).view(b, ws * ws, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    idx = (ys[:, None] - ys[None, :] + ws - 1) * (2 * ws - 1) + (xs[:, None] - xs[None, :] + ws - 1)
    bias = attn.relative_position_bias_table[idx].permute(2, 0, 1)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
    return attn.proj((p @ v).transpose(1, 2).reshape(b, ws, ws, c))


def test_window_attention_pads_before_qkv_and_crops():
    torch.manual_seed(1)
    attn = WindowAttention(12, 3, window_size=7).double()
    x = torch.randn(2, 12, 5, 6, dtype=torch.float64)
    out = attn(x)
    assert out.shape == x.shape
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, 1, 0, 2))  # zero tokens: their k, v are the qkv bias
    want = _naive_single_window(attn, padded)[:, :5, :6].permute(0, 3, 1, 2)
    assert rel_err(out, want) <= 1e-12


def test_shift_changes_a_single_window_grid():
    torch.manual_seed(2)
    a0 = WindowAttention(8, 2, window_size=4, shift=0)
    a2 = WindowAttention(8, 2, window_size=4, shift=2)
    a2.load_state_dict(a0.state_dict())
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        assert rel_err(a2(x), a0(x)) > 1e-3


def test_window_attention_gradcheck_shifted_odd_head_dim():
    torch.manual_seed(3)
    attn = WindowAttention(6, 2, window_size=4, shift=2, backend="reference").double()  # head dim 3
    x = torch.randn(1, 6, 3, 7, dtype=torch.float64, requires_grad=True)  # pads to 4x8: 2 windows
    table = attn.relative_position_bias_table.detach().clone().requires_grad_(True)

    def fn(x, table):
        return functional_call(attn, {"relative_position_bias_table": table}, (x,))

    assert torch.autograd.gradcheck(fn, (x, table), eps=1e-6, atol=1e-5)


def test_global_block_gradcheck():
    torch.manual_seed(4)
    blk = HiFuseGlobalBlock(6, 3, window_size=3, shift=1).double()
    x = torch.randn(1, 6, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(blk, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("hw", [(7, 7), (13, 13), (57, 9), (1, 3)])
def test_stage_odd_sizes_batch1_noncontiguous(hw):
    torch.manual_seed(5)
    h, w = hw
    stage = HiFuseGlobalStage(16, 2, 2, window_size=7, in_dim=8).eval()
    x = torch.randn(1, 8, h, 2 * w)[..., ::2]
    assert not x.is_contiguous()
    with torch.no_grad():
        out = stage(x)
        ref = stage(x.contiguous())
    assert out.shape == (1, 16, math.ceil(h / 2), math.ceil(w / 2))
    assert torch.equal(out, ref)


def test_padding_is_invisible_to_the_unpadded_tokens_of_a_full_grid():
    """A 14x14 grid needs no padding; its output must not depend on how the input was laid out in memory."""
    torch.manual_seed(6)
    blk = HiFuseGlobalBlock(12, 3, window_size=7, shift=3).eval()
    x = torch.randn(2, 12, 14, 14)
    with torch.no_grad():
        a = blk(x)
        b = blk(x.to(memory_format=torch.channels_last))
    assert rel_err(a, b) <= 1e-6


def test_patch_merging_order_and_odd_sizes():
    torch.manual_seed(7)
    pm = PatchMerging(4).eval()
    x = torch.randn(2, 4, 5, 7)
    with torch.no_grad():
        out = pm(x)
        xp = F.pad(x, (0, 1, 0, 1)).permute(0, 2, 3, 1)
        cat = torch.cat([xp[:, 0::2, 0::2], xp[:, 1::2, 0::2], xp[:, 0::2, 1::2], xp[:, 1::2, 1::2]], -1)
        want = F.linear(F.layer_norm(cat, (16,), pm.norm.weight, pm.norm.bias, 1e-5), pm.reduction.weight)
    assert out.shape == (2, 8, 3, 4)
    assert rel_err(out, want.permute(0, 3, 1, 2)) <= 1e-6
    assert pm.reduction.bias is None and pm.norm.eps == 1e-5


def test_state_dict_keys_follow_official_names():
    stage = HiFuseGlobalStage(16, 2, 2, in_dim=8)
    keys = set(stage.state_dict())
    assert {"downsample.reduction.weight", "downsample.norm.weight", "blocks.1.attn.qkv.weight",
            "blocks.1.attn.relative_position_bias_table", "blocks.1.fc1.bias", "blocks.0.norm1.weight"} <= keys
    assert not any("norm2" in k or "relative_position_index" in k for k in keys)
    assert [b.attn.shift for b in stage.blocks] == [0, 3]


def test_errors_name_block_expected_and_received():
    with pytest.raises(ValueError, match=r"WindowAttention: expected dim \(10\) to be divisible by num_heads \(3\)"):
        WindowAttention(10, 3)
    with pytest.raises(ValueError, match=r"WindowAttention: expected shift to be an int in \[0, 7\), got 7"):
        WindowAttention(12, 3, shift=7)
    attn = WindowAttention(12, 3)
    with pytest.raises(ValueError, match=r"WindowAttention: expected x with 12 channels, got \(2, 8, 7, 7\)"):
        attn(torch.randn(2, 8, 7, 7))
    with pytest.raises(ValueError, match=r"WindowAttention: expected x as a 4-D"):
        attn(torch.randn(2, 49, 12))
    with pytest.raises(ValueError, match=r"HiFuseGlobalStage: expected x with 8 channels, got \(1, 16, 4, 4\)"):
        HiFuseGlobalStage(16, 2, 2, in_dim=8)(torch.randn(1, 16, 4, 4))
    with pytest.raises(ValueError, match=r"PatchMerging: expected x with 4 channels"):
        PatchMerging(4)(torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_fp32(dtype):
    torch.manual_seed(8)
    stage = HiFuseGlobalStage(24, 2, 3, window_size=7, in_dim=12).eval()
    x = torch.randn(2, 12, 22, 18)
    with torch.no_grad():
        ref = stage(x)
        low = stage.to(dtype)(x.to(dtype))
    assert low.dtype == dtype and low.shape == ref.shape
    assert rel_err(low.float(), ref) <= 4 * torch.finfo(dtype).eps


@pytest.mark.parametrize("ctor", [lambda p: HiFuseGlobalBlock(8, 2, 4, drop_path=p),
                                  lambda p: HiFuseGlobalStage(8, 2, 2, 4, drop_path=p)])
@pytest.mark.parametrize("rate", [1.0, 1.5, -0.1])
def test_drop_path_outside_0_1_is_an_error_not_nan(ctor, rate):
    with pytest.raises(ValueError, match=r"^HiFuse\w+: expected drop_path in \[0, 1\), got "):
        ctor(rate)


@pytest.mark.parametrize("rates", [[0.1], [0.1, 0.2, 0.3]])
def test_stage_drop_path_list_must_have_one_rate_per_block(rates):
    with pytest.raises(ValueError, match=r"^HiFuseGlobalStage: expected drop_path as one rate or a list of depth "
                                         r"\(2\) rates, got \["):
        HiFuseGlobalStage(8, 2, 2, 4, drop_path=rates)
    assert [b.drop_path for b in HiFuseGlobalStage(8, 2, 2, 4, drop_path=[0.0, 0.3]).blocks] == [0.0, 0.3]


def test_global_block_channels_last_and_constructor_errors_name_the_block():
    blk = HiFuseGlobalBlock(8, 2, 4)
    with pytest.raises(ValueError, match=r"^HiFuseGlobalBlock: expected x \(B, H, W, C\) with 8 channels, got \(2, 5, 5, 4\)$"):
        blk.forward_channels_last(torch.randn(2, 5, 5, 4))
    with pytest.raises(ValueError, match=r"^HiFuseGlobalBlock: expected x as a 4-D"):
        blk.forward_channels_last(torch.randn(2, 25, 8))
    x = torch.randn(1, 5, 6, 8)
    torch.testing.assert_close(blk.forward_channels_last(x), blk(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"^HiFuseGlobalBlock: expected dim to be a positive int, got 0"):
        HiFuseGlobalBlock(0, 2, 4)
    with pytest.raises(ValueError, match=r"^PatchMerging: expected out_dim to be a positive int, got 0"):
        PatchMerging(8, 0)
    with pytest.raises(ValueError, match=r"^WindowAttention: expected backend to be one of \[None, 'reference', "):
        WindowAttention(8, 2, 4, backend="cpu")


@pytest.mark.parametrize("make, match", [
    (lambda: HiFuseGlobalStage(8, 2, 2, None), "HiFuseGlobalStage: expected window_size to be a positive int, got None"),
    (lambda: HiFuseGlobalStage(8, 2, 2, "7"), "HiFuseGlobalStage: expected window_size to be a positive int, got '7'"),
    (lambda: HiFuseGlobalStage(8, 2, 3), "HiFuseGlobalStage: expected dim (8) to be divisible by num_heads (3)"),
    (lambda: HiFuseGlobalStage(8, 2, 2, 4, shift=4), "HiFuseGlobalStage: expected shift to be an int in [0, 4), got 4"),
    (lambda: HiFuseGlobalStage(8, 2, 2, in_dim=0), "HiFuseGlobalStage: expected in_dim to be a positive int, got 0"),
    (lambda: HiFuseGlobalStage(8, 2, 2, backend="gpu"), "HiFuseGlobalStage: expected backend to be one of "
                                                         "[None, 'reference', 'triton', 'cpp', 'cuda'], got 'gpu'"),
    (lambda: HiFuseGlobalBlock(8, 0), "HiFuseGlobalBlock: expected num_heads to be a positive int, got 0"),
    (lambda: HiFuseGlobalBlock(8, 2, 0), "HiFuseGlobalBlock: expected window_size to be a positive int, got 0"),
    (lambda: HiFuseGlobalBlock(8, 2, 4, -1), "HiFuseGlobalBlock: expected shift to be an int in [0, 4), got -1"),
])
def test_global_block_and_stage_errors_name_the_block_built(make, match):
    # the stage crashed on window_size // 2 (TypeError from None // 2) before any check; otherwise both named the
    # inner WindowAttention / PatchMerging / HiFuseGlobalBlock instead of the block the caller built
    with pytest.raises(ValueError, match="^" + re.escape(match) + "$"):
        make()
