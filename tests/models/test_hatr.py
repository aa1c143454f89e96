import re

import pytest
import torch
import torch.nn.functional as F

from fusionblocks.layers.tokens import OverlapTokenizer, TokenWeighting
from fusionblocks.models.backbones import Conv2DBackbone, ResNet50
from fusionblocks.models.registry import default_cfg
from fusionblocks.models.hatr import HATR, hatr_conv2d, hatr_resnet50


@pytest.fixture(scope="module")
def resnet_model():
    torch.manual_seed(0)
    return hatr_resnet50().eval()


@pytest.fixture(scope="module")
def conv_model():
    torch.manual_seed(0)
    return hatr_conv2d().eval()


def _stages(m, x):
    """Run every stage by hand from one backbone pass; check the model's own forward against it."""
    inter = m.forward_intermediates(x)
    f = inter[-1]
    r = m.reduce(f)
    t, hw = m.tokenizer(r, return_hw=True)
    wt, a = m.weighting(t, hw, return_weights=True)
    seq = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), wt], dim=1) + m._pos_embed(hw)
    feats = m.norm(m.blocks(seq))
    torch.testing.assert_close(m.forward_features(x), feats)
    return inter, f, r, t, hw, wt, a, feats


@pytest.mark.parametrize("size,fmap,grid", [((224, 224), (7, 7), (6, 6)), ((160, 192), (5, 6), (4, 5))])
def test_hatr_resnet50_stage_shapes(resnet_model, size, fmap, grid):
    m = resnet_model
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        inter, f, r, t, hw, wt, a, feats = _stages(m, x)
        logits = m.forward_head(feats)
    assert tuple(f.shape) == (2, 2048, *fmap)
    assert tuple(r.shape) == (2, 512, *fmap)
    assert hw == grid and tuple(t.shape) == (2, grid[0] * grid[1], 512)  # (H - 1)(W - 1) tokens
    assert wt.shape == t.shape and tuple(a.shape) == (2, grid[0] * grid[1])
    assert torch.all(a > 0) and torch.all(a < 1)
    assert tuple(feats.shape) == (2, 1 + grid[0] * grid[1], 512)
    assert tuple(logits.shape) == (2, 2)
    torch.testing.assert_close(logits, m.head(feats[:, 0]))
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats[:, 0])
    H, W = size
    assert [tuple(i.shape) for i in inter] == [
        (2, 256, H // 4, W // 4), (2, 512, H // 8, W // 8), (2, 1024, H // 16, W // 16), (2, 2048, H // 32, W // 32)
    ]
    assert [fi["reduction"] for fi in m.feature_info] == [4, 8, 16, 32]
    assert [fi["num_chs"] for fi in m.feature_info] == [256, 512, 1024, 2048]


@pytest.mark.parametrize("size,grid", [((224, 224), (13, 13)), ((160, 192), (9, 11))])
def test_hatr_conv2d_stage_shapes(conv_model, size, grid):
    m = conv_model
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        inter, f, r, t, hw, wt, a, feats = _stages(m, x)
        logits = m(x)
        weights = m.token_weights(x)
    H, W = size
    assert tuple(f.shape) == (2, 256, H // 16, W // 16) and r is not None and torch.equal(r, f)
    assert hw == grid and tuple(t.shape) == (2, grid[0] * grid[1], 512)
    assert tuple(a.shape) == (2, grid[0] * grid[1]) and torch.all(a > 0) and torch.all(a < 1)
    torch.testing.assert_close(weights, a.reshape(2, *grid))
    assert tuple(feats.shape) == (2, 1 + grid[0] * grid[1], 512)
    assert tuple(logits.shape) == (2, 2)
    assert [tuple(i.shape) for i in inter] == [(2, 64, H // 4, W // 4), (2, 128, H // 8, W // 8), (2, 256, H // 16, W // 16)]
    assert [fi["reduction"] for fi in m.feature_info] == [4, 8, 16]


def test_structure_and_defaults(resnet_model, conv_model):
    for m in (resnet_model, conv_model):
        assert isinstance(m.tokenizer, OverlapTokenizer) and isinstance(m.weighting, TokenWeighting)
        assert m.tokenizer.kernel_size == (2, 2) and m.tokenizer.stride == (1, 1)
        assert len(m.blocks) == 4 and m.blocks[0].attn.num_heads == 8 and m.embed_dim == 512
        assert m.cls_token.shape == (1, 1, 512)
    assert isinstance(resnet_model.backbone, ResNet50) and isinstance(conv_model.backbone, Conv2DBackbone)
    assert resnet_model.tokenizer.in_channels == 512 and resnet_model.reduce[0].in_channels == 2048
    assert conv_model.tokenizer.in_channels == 256
    assert resnet_model.pos_embed.shape == (1, 1 + 36, 512) and resnet_model.grid_size == (6, 6)
    assert conv_model.pos_embed.shape == (1, 1 + 169, 512) and conv_model.grid_size == (13, 13)
    n_backbone = sum(p.numel() for p in resnet_model.backbone.parameters())
    assert n_backbone == 23_508_032


def test_size_at_224_is_the_stated_one(resnet_model, conv_model):
    # the module docstring's parameters and FLOPs; torch's CPU attention used to count 0 FLOPs (9.28 / 5.42 G)
    from fusionblocks.summary import count_flops

    for m, params, gflops in ((resnet_model, 38_270_628, 9.30), (conv_model, 13_628_068, 5.66)):
        assert sum(p.numel() for p in m.parameters()) == params
        assert round(count_flops(m, torch.randn(1, 3, 224, 224))["total"] / 1e9, 2) == gflops


def test_min_input_size_is_the_models_own():
    # the registered models' smallest inputs (33 / 31 px), and a model's own where its tokenizer changes it: the cfg
    # said 31 for a k=3/s=2 tokenizer that needs 47
    for name, lo in (("hatr_resnet50", 33), ("hatr_conv2d", 31)):
        assert default_cfg(name)["min_input_size"] == (3, lo, lo)
    m = HATR("conv2d", tokenizer_kernel=3, tokenizer_stride=2, embed_dim=32, vit_heads=2, vit_depth=1)
    lo = m.pretrained_cfg["min_input_size"][-1]
    assert lo == m._min_side() == 47
    m.eval()(torch.randn(1, 3, lo, lo))
    with pytest.raises(ValueError, match="at least 47x47"):
        m(torch.randn(1, 3, lo - 1, lo - 1))


def test_pos_embed_interpolation(conv_model):
    m = conv_model
    assert m._pos_embed((13, 13)) is m.pos_embed
    pe = m._pos_embed((9, 11))
    assert tuple(pe.shape) == (1, 1 + 99, 512)
    torch.testing.assert_close(pe[:, :1], m.pos_embed[:, :1])
    grid = m.pos_embed[:, 1:].reshape(1, 13, 13, 512).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(9, 11), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pe[:, 1:], ref)


def test_img_size_sets_native_grid():
    m = hatr_conv2d(img_size=(160, 192), vit_depth=1, vit_heads=4)
    assert m.grid_size == (9, 11) and m.pos_embed.shape == (1, 100, 512)
    assert len(m.blocks) == 1 and m.blocks[0].attn.num_heads == 4
    with torch.no_grad():
        assert tuple(m.eval()(torch.randn(1, 3, 160, 192)).shape) == (1, 2)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    for m, size in ((hatr_resnet50(vit_depth=1), 96), (hatr_conv2d(vit_depth=1), 64)):
        m.train()
        x = torch.randn(2, 3, size, size + 8)
        out = m(x)
        (out * torch.randn_like(out)).sum().backward()
        for n, p in m.named_parameters():
            assert p.grad is not None, n
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def test_in_chans_1_and_num_classes():
    m = hatr_conv2d(in_chans=1, num_classes=3, vit_depth=1).eval()
    with torch.no_grad():
        assert tuple(m(torch.randn(2, 1, 48, 40)).shape) == (2, 3)
    with pytest.raises(ValueError, match=r"hatr_conv2d: expected x with 1 channels, got \(2, 3, 48, 40\)"):
        m(torch.randn(2, 3, 48, 40))
    m = hatr_resnet50(in_chans=1, num_classes=0, vit_depth=1).eval()
    assert m.backbone.conv1.weight.shape == (64, 1, 7, 7)
    with torch.no_grad():
        assert tuple(m(torch.randn(1, 1, 64, 64)).shape) == (1, 512)


def test_bad_inputs_name_the_model(conv_model, resnet_model):
    with pytest.raises(ValueError, match=r"hatr_resnet50: expected x with 3 channels, got \(1, 1, 224, 224\)"):
        resnet_model(torch.randn(1, 1, 224, 224))
    with pytest.raises(ValueError, match=r"hatr_resnet50: expected an image of at least 33x33.*got \(1, 3, 32, 64\)"):
        resnet_model(torch.randn(1, 3, 32, 64))
    with pytest.raises(ValueError, match=r"hatr_conv2d: expected an image of at least 31x31.*got \(1, 3, 30, 30\)"):
        conv_model(torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match=r"hatr_conv2d: expected x as a 4-D"):
        conv_model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"hatr_conv2d: expected an image of at least 31x31"):
        conv_model.forward_intermediates(torch.randn(1, 3, 16, 16))
    # the smallest accepted sizes run
    with torch.no_grad():
        assert resnet_model(torch.randn(1, 3, 33, 33)).shape == (1, 2)
        assert conv_model(torch.randn(1, 3, 31, 31)).shape == (1, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"HATR: expected backbone to be one of"):
        HATR("vgg16")
    with pytest.raises(ValueError, match=r"hatr_conv2d: expected embed_dim \(512\) to be divisible by vit_heads \(7\)"):
        hatr_conv2d(vit_heads=7)
    with pytest.raises(ValueError, match=r"hatr_conv2d: expected vit_depth"):
        hatr_conv2d(vit_depth=0)
    with pytest.raises(ValueError, match=r"hatr_conv2d: only the ResNet-50 backbone loads torchvision weights"):
        hatr_conv2d(vit_depth=1).load_backbone_state_dict({})
    # an img_size below the minimum built a negative or empty position-embedding grid, and every forward then
    # failed in a reshape; drop rates outside [0, 1) failed only in a training forward, in torch's words
    for size, lo, make in [(16, 31, hatr_conv2d), (8, 31, hatr_conv2d), ((224, 30), 31, hatr_conv2d), (32, 33, hatr_resnet50)]:
        with pytest.raises(ValueError, match=rf"^{make.__name__}: expected img_size of at least {lo}x{lo} .*got {re.escape(repr(size))}$"):
            make(vit_depth=1, img_size=size)
    for arg in ("drop_rate", "attn_drop_rate"):
        for rate in (1.5, -0.1):
            with pytest.raises(ValueError, match=rf"^hatr_conv2d: expected {arg} in \[0, 1\), got {rate}$"):
                hatr_conv2d(vit_depth=1, **{arg: rate})


def test_pretrained_official_without_official_code_is_named(tmp_path):
    from fusionblocks import create_model

    path = tmp_path / "ckpt.pth"
    torch.save({"model": {}}, path)
    with pytest.raises(ValueError, match=r"^create_model: expected pretrained_official only for a model with official "
                                         r"code .*hatr_conv2d has none"):
        create_model("hatr_conv2d", vit_depth=1, pretrained_official=str(path))


def test_create_model_registry():
    from fusionblocks import create_model, list_models

    assert {"hatr_resnet50", "hatr_conv2d"} <= set(list_models("hatr*"))
    m = create_model("hatr_conv2d", num_classes=2, vit_depth=2, vit_heads=4, in_chans=3, img_size=96)
    assert isinstance(m, HATR) and len(m.blocks) == 2 and m.grid_size == (5, 5) and m.num_classes == 2


def test_reduce_dim_options():
    m = hatr_conv2d(reduce_dim=128, vit_depth=1)
    assert m.reduce[0].in_channels == 256 and m.reduce[0].out_channels == 128 and m.tokenizer.in_channels == 128
    m = hatr_resnet50(reduce_dim=None, vit_depth=1)
    assert isinstance(m.reduce, torch.nn.Identity) and m.tokenizer.in_channels == 2048
    with pytest.raises(ValueError, match=r"hatr_conv2d: expected reduce_dim to be a positive int"):
        hatr_conv2d(reduce_dim=0)


def test_batch1_noncontiguous_input(conv_model):
    x = torch.randn(1, 45, 37, 3).permute(0, 3, 1, 2)  # (1, 3, 45, 37), non-contiguous
    assert not x.is_contiguous()
    with torch.no_grad():
        out = conv_model(x)
        torch.testing.assert_close(out, conv_model(x.contiguous()))
        torch.testing.assert_close(conv_model(torch.cat([x, torch.randn(2, 3, 45, 37)]))[:1], out, rtol=1e-4, atol=1e-5)
    assert out.shape == (1, 2)
