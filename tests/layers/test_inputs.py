"""Bad inputs to the Python API: dtype/device mismatches, zero head dims, non-integer sizes, NumPy scalars."""
import re

import numpy as np
import pytest
import torch

import fusionblocks as fb
from fusionblocks import ops
from fusionblocks.layers.fusion import HEF
from fusionblocks.layers.mlp import IRMLP
from fusionblocks.layers.tokens import OverlapTokenizer, TokenWeighting
from fusionblocks.layers.window import WindowAttention


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.uint8])
def test_wrong_dtype_names_the_block(dtype):
    block = IRMLP(8, 8)
    x = torch.ones(1, 8, 5, 5, dtype=dtype)
    kind = "as torch.float32 (the block's parameters), got torch.float64" if dtype == torch.float64 else \
        f"as a floating tensor, got {dtype}"
    with pytest.raises(TypeError, match="^" + re.escape(f"IRMLP: expected x {kind} (1, 8, 5, 5)")):
        block(x)


def test_every_input_of_a_two_input_block_is_checked():
    hef = HEF(16)
    l, g = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    with pytest.raises(TypeError, match=r"^HEF: expected g as torch.float32 .*got torch.float64"):
        hef(l, g.double())


def test_device_mismatch_names_the_block():
    block = WindowAttention(8, 2, window_size=4)
    with pytest.raises(ValueError, match=r"^WindowAttention: expected x on cpu \(where the block's parameters are\), "
                                         r"got x on meta"):
        block(torch.empty(1, 8, 8, 8, device="meta"))


def test_matching_dtypes_and_autocast_pass():
    block = IRMLP(8, 8)
    assert block.double()(torch.randn(1, 8, 5, 5, dtype=torch.float64)).dtype == torch.float64
    block = IRMLP(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block(torch.randn(1, 8, 5, 5, dtype=torch.bfloat16)).shape == (1, 8, 5, 5)
        with pytest.raises(TypeError, match="IRMLP: expected x as torch.float32"):
            block(torch.randn(1, 8, 5, 5, dtype=torch.float64))  # autocast never runs float64 in a float32 block


def test_token_weighting_rejects_non_integer_grids_and_takes_numpy_ints():
    tw = TokenWeighting(16, reduction=4)
    t = torch.randn(2, 12, 16)
    with pytest.raises(ValueError, match=r"TokenWeighting: expected hw as a pair of positive ints \(H, W\), got \(3.9, 4.2\)"):
        tw(t, (3.9, 4.2))
    torch.testing.assert_close(tw(t, (np.int64(3), np.int32(4))), tw(t, (3, 4)), rtol=0, atol=0)


def test_numpy_scalars_are_numbers_everywhere():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 4) for _ in range(3))
    lg = torch.full((2,), -0.2)
    want = ops.decay_attention(q, k, v, lg, hw=(3, 4), scale=0.3, backend="reference")
    got = ops.decay_attention(q, k, v, lg, hw=(np.int64(3), np.int16(4)), scale=np.float32(0.3), backend="reference")
    torch.testing.assert_close(got, want)
    q = torch.randn(1, 2, 16, 4)
    table = torch.zeros(9, 2)
    want = ops.window_attention(q, q, q, table, hw=(4, 4), window_size=2, shift=1, scale=0.5, backend="reference")
    got = ops.window_attention(q, q, q, table, hw=[np.int64(4), np.int64(4)], window_size=np.int64(2),
                               shift=np.int32(1), scale=np.float64(0.5), backend="reference")
    torch.testing.assert_close(got, want)
    block = WindowAttention(np.int64(8), np.int64(2), window_size=np.int64(4), shift=np.int64(2))
    assert type(block.window_size) is int and type(block.shift) is int and block.qkv.in_features == 8
    tok = OverlapTokenizer(np.int64(3), np.int64(8), kernel_size=np.int64(3), stride=(np.int8(2), 2))
    assert tok.stride == (2, 2) and type(tok.stride[0]) is int


@pytest.mark.parametrize("op", ["decay", "window"])
def test_zero_head_dim_is_a_clear_error(op):
    q = torch.randn(1, 2, 16, 0)
    with pytest.raises(ValueError, match=rf"{op}_attention: expected a head dim D >= 1 in q, k, v .* got \(1, 2, 16, 0\)"):
        if op == "decay":
            ops.decay_attention(q, q, q, torch.zeros(2), hw=(4, 4))
        else:
            ops.window_attention(q, q, q, None, hw=(4, 4), window_size=2)


@pytest.mark.parametrize("bad", [True, "0.5", torch.tensor(0.5)])
def test_scale_must_be_a_real_number(bad):
    q = torch.randn(1, 2, 12, 4)
    with pytest.raises(TypeError, match="decay_attention: expected scale as a float or None"):
        ops.decay_attention(q, q, q, torch.zeros(2), hw=(3, 4), scale=bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_scale_must_be_finite(bad):
    # NaN or infinity made every output NaN without a word
    q = torch.randn(1, 2, 12, 4)
    with pytest.raises(ValueError, match=r"^decay_attention: expected scale as a finite float or None, got (nan|inf|-inf)$"):
        ops.decay_attention(q, q, q, torch.zeros(2), hw=(3, 4), scale=bad)
    q = torch.randn(1, 2, 16, 4)
    with pytest.raises(ValueError, match=r"^window_attention: expected scale as a finite float or None"):
        ops.window_attention(q, q, q, None, hw=(4, 4), window_size=2, scale=bad)


_ONE_INPUT_BLOCKS = {
    "ChannelAttn": lambda: fb.ChannelAttn(8, 4), "SpatialAttn": lambda: fb.SpatialAttn(7),
    "LayerNorm2d": lambda: fb.LayerNorm2d(8), "ConvBN": lambda: fb.ConvBN(8, 8, 3), "IRMLP": lambda: fb.IRMLP(8, 8),
    "SIRMLP": lambda: fb.SIRMLP(8, 8, 8), "MultiHeadExternalAttention": lambda: fb.MultiHeadExternalAttention(8, 2),
    "MixedAttention": lambda: fb.MixedAttention(8, num_heads=2),
    "ManhattanSelfAttention": lambda: fb.ManhattanSelfAttention(8, 2),
    "WindowAttention": lambda: fb.WindowAttention(8, 2, 4), "LocalBlock": lambda: fb.LocalBlock(8),
    "ELFBlock": lambda: fb.ELFBlock(8), "HiFuseGlobalBlock": lambda: fb.HiFuseGlobalBlock(8, 2, 4),
    "HiFuseGlobalStage": lambda: fb.HiFuseGlobalStage(8, 1, 2, 4), "PatchMerging": lambda: fb.PatchMerging(8),
    "EGFBlock": lambda: fb.EGFBlock(8, 2, 1), "OverlapTokenizer": lambda: fb.OverlapTokenizer(8, 4),
}


@pytest.mark.parametrize("name", sorted(_ONE_INPUT_BLOCKS))
@pytest.mark.parametrize("shape", [(1, 8, 0, 6), (2, 8, 5, 0)])
def test_an_empty_map_is_named_by_the_block(name, shape):
    # was a traceback from a convolution ("Kernel size can't be greater than actual input size"), an op's error
    # (window_attention: ... hw) or, in some blocks, an empty result; a batch of 0 still runs
    block = _ONE_INPUT_BLOCKS[name]().eval()
    with pytest.raises(ValueError, match="^" + re.escape(f"{name}: expected x (B, C, H, W) with every size but B at "
                                                         f"least 1, got {shape}")):
        block(torch.randn(shape))
    block(torch.randn(0, 8, 5, 6))


def test_an_empty_map_is_named_in_every_input_and_layout():
    with pytest.raises(ValueError, match=r"^SpatialAttn: expected x \(B, C, H, W\) with every size but B at least 1, "
                                         r"got \(2, 0, 5, 5\)$"):
        fb.SpatialAttn()(torch.randn(2, 0, 5, 5))
    with pytest.raises(ValueError, match=r"^HEF: expected f \(B, C, H, W\) with every size but B at least 1"):
        HEF(16)(torch.randn(1, 16, 1, 1), torch.randn(1, 16, 1, 1), torch.randn(1, 8, 2, 0))
    for block in (fb.WindowAttention(8, 2, 4), fb.HiFuseGlobalBlock(8, 2, 4), fb.ManhattanSelfAttention(8, 2)):
        with pytest.raises(ValueError, match=rf"^{type(block).__name__}: expected x \(B, H, W, C\) with every size "
                                             r"but B at least 1, got \(1, 0, 3, 8\)$"):
            block.forward_channels_last(torch.randn(1, 0, 3, 8))


@pytest.mark.parametrize("make, match", [
    (lambda: fb.ConvBN(True, 8), "ConvBN: expected in_channels to be a positive int, got True"),
    (lambda: fb.ConvBN(0, 8), "ConvBN: expected in_channels to be a positive int, got 0"),
    (lambda: fb.ConvBN(8, 0), "ConvBN: expected out_channels to be a positive int, got 0"),
    (lambda: fb.ConvBN(8, 8, 3.0), "ConvBN: expected kernel_size to be a positive int, got 3.0"),
    (lambda: fb.ConvBN(8, 8, 3, 0), "ConvBN: expected stride to be a positive int, got 0"),
    (lambda: fb.ConvBN(8, 8, groups=3), "ConvBN: expected in_channels (8) to be divisible by groups (3)"),
    (lambda: fb.ConvBN(8, 6, groups=4), "ConvBN: expected out_channels (6) to be divisible by groups (4)"),
    (lambda: fb.LayerNorm2d(0), "LayerNorm2d: expected num_channels to be a positive int, got 0"),
    (lambda: fb.LayerNorm2d(True), "LayerNorm2d: expected num_channels to be a positive int, got True"),
    (lambda: fb.LayerNorm2d(-1), "LayerNorm2d: expected num_channels to be a positive int, got -1"),
])
def test_conv_bn_and_layer_norm_check_their_arguments(make, match):
    # were built silently (ConvBN(True, 8) as a 1-channel conv, ConvBN(0, 8), LayerNorm2d(0), stride 0) or failed
    # inside torch without the block's name
    with pytest.raises(ValueError, match="^" + re.escape(match) + "$"):
        make()
    assert fb.ConvBN(np.int64(8), 4, np.int64(3), groups=2).conv.weight.shape == (4, 4, 3, 3)
