"""FusionUNet: HEF/HFF-fused encoders as U-Net skips, trained a few steps on synthetic masks."""
import math

import pytest
import torch
import torch.nn.functional as F

from fusionblocks.models.hemf import HEMF
from fusionblocks.models.unet import FusionUNet


def _small_hemf():
    return HEMF((1, 1, 1, 1), (1, 1, 1, 1), dims=(16, 32, 64, 128), num_heads=4, num_classes=0)


def _disc_batch(n, size, g):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    imgs, masks = [], []
    for _ in range(n):
        cy, cx = (torch.rand(2, generator=g) * 0.5 + 0.25) * size
        r = (0.15 + 0.1 * torch.rand((), generator=g)) * size
        m = (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2).float()
        imgs.append((0.3 + 0.5 * m + 0.1 * torch.randn(size, size, generator=g)).expand(3, -1, -1))
        masks.append(m[None])
    return torch.stack(imgs), torch.stack(masks)


def test_shapes_any_size():
    net = FusionUNet(num_classes=2, encoder=_small_hemf(), decoder_channels=(32, 16, 16, 8)).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 96)).shape == (1, 2, 64, 96)
        assert net(torch.randn(2, 3, 45, 70)).shape == (2, 2, 45, 70)


def test_trains_on_synthetic_masks():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = FusionUNet(num_classes=1, encoder=_small_hemf(), decoder_channels=(32, 16, 16, 8))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    x, y = _disc_batch(4, 64, g)
    losses = []
    for _ in range(8):
        loss = F.binary_cross_entropy_with_logits(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    fusion_grads = [p.grad for n, p in net.named_parameters() if ".fusion." in f".{n}" and p.requires_grad]
    assert fusion_grads and all(gr is not None for gr in fusion_grads)


ENCODERS = {"hifuse_tiny": dict(dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8)),
            "hemf": dict(dims=(16, 32, 64, 128), num_heads=4),
            "hatr_resnet50": dict(embed_dim=32, vit_depth=1, vit_heads=2)}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_an_encoder_by_name_leaves_no_parameter_without_a_gradient(name):
    # DistributedDataParallel without find_unused_parameters fails on parameters that never get a gradient: the
    # classifier's norm (HiFuse, HEMF), HATR's token bridge, ViT, cls_token and pos_embed
    torch.manual_seed(0)
    net = FusionUNet(encoder=name, encoder_kwargs=ENCODERS[name], decoder_channels=(16, 16, 8, 8))
    net(torch.randn(2, 3, 64, 64)).sum().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []

    # a state_dict saved with the unpruned encoder (earlier versions) still loads strictly, to the same function
    torch.manual_seed(0)
    from fusionblocks import create_model

    old = FusionUNet(encoder=create_model(name, num_classes=0, **ENCODERS[name]), decoder_channels=(16, 16, 8, 8))
    assert set(old.state_dict()) > set(net.state_dict())
    net.load_state_dict(old.state_dict(), strict=True)
    old.eval(), net.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), old(x), rtol=0, atol=0)


def test_a_features_only_encoder_gives_the_same_net():
    # the README's FeatureExtractor(model, out_indices) route: its forward returns the maps
    from fusionblocks import FeatureExtractor

    torch.manual_seed(0)
    enc = _small_hemf()
    net = FusionUNet(num_classes=2, encoder=enc, decoder_channels=(16, 16, 8, 8)).eval()
    fx = FusionUNet(num_classes=2, encoder=FeatureExtractor(enc, (0, 1, 2, 3)), decoder_channels=(16, 16, 8, 8)).eval()
    fx.load_state_dict({k.replace("encoder.", "encoder.model.", 1): v for k, v in net.state_dict().items()})
    x = torch.randn(1, 3, 45, 70)
    with torch.no_grad():
        torch.testing.assert_close(fx(x), net(x), rtol=0, atol=0)
    assert fx(x).shape == (1, 2, 45, 70)
    with pytest.raises(ValueError, match=r"got FeatureExtractor with 2 \(strides 8, 32\)$"):
        FusionUNet(encoder=FeatureExtractor(enc, (1, 3)))


def test_encoder_by_name_and_errors():
    net = FusionUNet(encoder="hifuse_tiny", decoder_channels=(16, 16, 8, 8))
    assert [f["reduction"] for f in net.encoder.feature_info] == [4, 8, 16, 32]
    with pytest.raises(ValueError, match=r"FusionUNet: expected an encoder with 4 feature levels \(forward_intermediates .*, got Linear$"):
        FusionUNet(encoder=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"got HATR with 3 \(strides 4, 8, 16\)$"):
        FusionUNet(encoder="hatr_conv2d", encoder_kwargs=dict(embed_dim=32, vit_depth=1, vit_heads=2))
    with pytest.raises(ValueError, match=r"FusionUNet: expected 4 decoder_channels, got \(8, 8\)"):
        FusionUNet(encoder=_small_hemf(), decoder_channels=(8, 8))
    with pytest.raises(ValueError, match=r"FusionUNet: expected x as a 4-D"):
        FusionUNet(encoder=_small_hemf())(torch.randn(3, 64, 64))


class _PooledImage(torch.nn.Module):
    """An encoder with exactly known geometry: level ``i`` (stride ``s``) is the image averaged over the
    ``s x s`` cells of a top-left-aligned grid, ``ceil(H / s)`` cells (channel 0; channel 1 is zero). A 64-px
    square's centroid survives this pooling exactly (its partial end cells together cover one cell)."""

    def __init__(self):
        super().__init__()
        self.feature_info = [dict(num_chs=2, reduction=4 * 2**i, module=f"level{i}") for i in range(4)]

    def forward_intermediates(self, x):
        out = []
        for f in self.feature_info:
            s = f["reduction"]
            pooled = F.avg_pool2d(F.pad(x[:, :1], (0, -x.shape[-1] % s, 0, -x.shape[-2] % s)), s)
            out.append(torch.cat([pooled, torch.zeros_like(pooled)], 1))
        return out


def _route(net, level):
    """Set the decoder to carry channel 0 of encoder level ``level`` unchanged to the output: each 3x3 conv
    copies one input channel (centre tap 1), BatchNorm is the identity, ReLU sees non-negative maps."""

    def copy(unit, src):
        conv, bn = unit[0], unit[1]
        torch.nn.init.zeros_(conv.weight)
        if src is not None:
            conv.weight.data[0, src, 1, 1] = 1.0
        bn.running_mean.zero_()
        bn.running_var.fill_(1 - bn.eps)
        bn.weight.data.fill_(1.0)
        bn.bias.data.zero_()

    for skip_level, blk in zip((2, 1, 0), (net.up16, net.up8, net.up4)):
        from_below = blk.convs[0][0].in_channels - 2  # first channel of the skip in the concatenation
        src = None if skip_level > level else (from_below if skip_level == level else 0)
        if level == 3:
            src = 0
        copy(blk.convs[0], src)
        copy(blk.convs[1], None if src is None else 0)
    copy(net.refine, 0)
    torch.nn.init.zeros_(net.head.weight)
    net.head.weight.data[0, 0] = 1.0
    torch.nn.init.zeros_(net.head.bias)
    return net.eval()


def _centroid(m):
    ys, xs = (torch.arange(n, dtype=torch.float64) for n in m.shape)
    m = m.double()
    return ((m.sum(1) * ys).sum() / m.sum()).item(), ((m.sum(0) * xs).sum() / m.sum()).item()


@pytest.mark.parametrize("size,corner", [((200, 260), (69, 150)), ((210, 275), (101, 180)), ((224, 288), (101, 180))])
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_decoder_puts_a_bright_square_where_it_is(size, corner, level):
    # A 64-px square seen only through encoder level `level` (strides 4..32) must come out of the decoder
    # centred where it is in the image. Resizing the maps straight to the input size (the old decoder, with
    # maps of the zero-padded frame) put it 17.7 px off at 200x260 and 9.6 px at 210x275; resizing cropped maps
    # to each skip's size, up to 17 px. Exact ratio upsampling + crop: <= 0.23 px (the blur of the stride-32
    # level that falls past the image's right edge).
    (h, w), (top, left) = size, corner
    x = torch.zeros(1, 3, h, w)
    x[..., top : top + 64, left : left + 64] = 1.0
    net = _route(FusionUNet(num_classes=1, encoder=_PooledImage(), decoder_channels=(4, 4, 4, 4)), level)
    with torch.no_grad():
        y = net(x)[0, 0]
    assert y.shape == (h, w) and y.min() >= 0 and y.sum() > 0
    cy, cx = _centroid(y)
    assert abs(cy - (top + 31.5)) <= 0.5 and abs(cx - (left + 31.5)) <= 0.5, (cy, cx)


@pytest.mark.parametrize("size", [(200, 260), (210, 275), (45, 70)])
def test_fusion_maps_cover_the_input_from_its_top_left(size):
    # forward_intermediates crops the maps of the zero-padded frame to ceil(H/s) x ceil(W/s) cells from the
    # top-left: identical to running on the padded image and cropping the same cells.
    torch.manual_seed(0)
    enc = _small_hemf().eval()
    h, w = size
    x = torch.randn(1, 3, h, w)
    padded = F.pad(x, (0, -w % 32, 0, -h % 32))
    with torch.no_grad():
        got, full = enc.forward_intermediates(x), enc.forward_intermediates(padded)
    for f, g, info in zip(got, full, enc.feature_info):
        s = info["reduction"]
        assert f.shape[-2:] == (math.ceil(h / s), math.ceil(w / s))
        torch.testing.assert_close(f, g[..., : f.shape[-2], : f.shape[-1]], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), full[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_classes=0), r"^FusionUNet: expected num_classes to be a positive int, got 0$"),
    (dict(num_classes=True), r"^FusionUNet: expected num_classes to be a positive int, got True$"),
    (dict(num_classes=2.0), r"^FusionUNet: expected num_classes to be a positive int, got 2.0$"),
    (dict(decoder_channels=(16, 16, 8, 0)), r"^FusionUNet: expected 4 decoder_channels as positive ints, got \(16, 16, 8, 0\)$"),
    (dict(decoder_channels=(16, 16.0, 8, 8)), r"^FusionUNet: expected 4 decoder_channels as positive ints, got \(16, 16.0, 8, 8\)$"),
    (dict(decoder_channels=16), r"^FusionUNet: expected 4 decoder_channels, got 16$"),
    (dict(decoder_channels="abcd"), r"^FusionUNet: expected 4 decoder_channels, got 'abcd'$"),
    (dict(encoder="hemf", encoder_kwargs=dict(num_classes=3)),
     r"^FusionUNet: expected encoder_kwargs without num_classes \(the encoder is built without a classifier; "
     r"num_classes sets the mask channels\), got num_classes=3$"),
    (dict(encoder_kwargs=dict(in_chans=1)),
     r"^FusionUNet: encoder_kwargs are passed to create_model for an encoder given by name; got a HEMF instance "
     r"with encoder_kwargs \{'in_chans': 1\} \(build the encoder with them instead\)$"),
])
def test_arguments_are_checked_before_anything_is_built(kwargs, match):
    # num_classes / decoder_channels of 0, a bool or a float failed inside nn.Conv2d (at the first forward for
    # num_classes=0); encoder_kwargs holding num_classes failed in create_model ('multiple values'), and
    # encoder_kwargs next to an encoder instance were ignored without a word (in_chans=1 built a 3-channel net)
    args = dict(encoder=_small_hemf(), decoder_channels=(8, 8, 8, 8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        FusionUNet(**args)


def test_an_input_of_another_dtype_is_named():
    # was torch's 'Input type (double) and bias type (float) should be the same' from the encoder's first conv
    net = FusionUNet(encoder=_small_hemf(), decoder_channels=(8, 8, 8, 8)).eval()
    with pytest.raises(TypeError, match=r"^FusionUNet: expected x as torch.float32 \(the block's parameters\), got "
                                        r"torch.float64 \(1, 3, 45, 70\)"):
        net(torch.randn(1, 3, 45, 70, dtype=torch.float64))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts per op
        assert net(torch.randn(1, 3, 45, 70).bfloat16()).shape == (1, 1, 45, 70)


@pytest.mark.parametrize("name", ["hifuse_tiny", "hemf"])
def test_an_official_checkpoint_initialises_the_encoder(name, tmp_path):
    # the official checkpoints are classifiers (conv_norm, conv_head): loading one into the headless encoder
    # (encoder_kwargs=dict(pretrained_official=...), or net.encoder.load_official_state_dict after pruning) was a
    # KeyError for the unexpected conv_head (and conv_norm) keys, so no official weights could reach a FusionUNet
    from fusionblocks import create_model
    from fusionblocks.models.convert import official_key_for

    torch.manual_seed(0)
    src = create_model(name, num_classes=7, **ENCODERS[name])
    rules, drop = src.official_key_rules()
    official = {official_key_for(k, rules, drop): v for k, v in src.state_dict().items()}
    assert None not in official and "conv_head.weight" in official and "conv_norm.weight" in official
    path = tmp_path / f"{name}_official.pth"
    torch.save(official, path)

    net = FusionUNet(encoder=name, encoder_kwargs=dict(ENCODERS[name], pretrained_official=str(path)), decoder_channels=(8, 8, 8, 8))
    want = src.state_dict()
    got = net.encoder.state_dict()
    assert set(got) == set(want) - {"head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"}
    assert all(torch.equal(got[k], want[k]) for k in got)

    fresh = FusionUNet(encoder=name, encoder_kwargs=ENCODERS[name], decoder_channels=(8, 8, 8, 8))
    fresh.encoder.load_official_state_dict(official)
    assert all(torch.equal(v, got[k]) for k, v in fresh.encoder.state_dict().items())
    # a classifier still refuses a checkpoint without its head
    with pytest.raises(KeyError, match=r"missing official keys \(2\): \['conv_head.weight', 'conv_head.bias'\]"):
        create_model(name, num_classes=7, **ENCODERS[name]).load_official_state_dict(
            {k: v for k, v in official.items() if not k.startswith("conv_head.")})
