import math

import pytest
import torch

from fusionblocks.models.backbones import Conv2DBackbone, ResNet50
from fusionblocks.models.hatr import hatr_resnet50


def torchvision_resnet50_layout(in_chans: int = 3):
    """Keys and shapes of ``torchvision.models.resnet50().state_dict()`` without ``fc.*``, written from torchvision's
    documented architecture (``torchvision/models/resnet.py``: ``_resnet(Bottleneck, [3, 4, 6, 3])``, Bottleneck with
    expansion 4, stride on ``conv2``, projection shortcut ``downsample = Sequential(conv1x1, norm)`` on the first block
    of each layer), independently of fusionblocks' module."""

    def bn(prefix, c):
        return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}

    keys = {"conv1.weight": (64, in_chans, 7, 7), **bn("bn1", 64)}
    inplanes = 64
    for li, (planes, n) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for bi in range(n):
            p = f"layer{li}.{bi}"
            keys[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            keys.update(bn(f"{p}.bn1", planes))
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            keys.update(bn(f"{p}.bn2", planes))
            keys[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            keys.update(bn(f"{p}.bn3", planes * 4))
            if bi == 0:
                keys[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                keys.update(bn(f"{p}.downsample.1", planes * 4))
            inplanes = planes * 4
    return keys


def test_resnet50_param_count_matches_torchvision():
    m = ResNet50()
    assert sum(p.numel() for p in m.parameters()) == 23_508_032  # torchvision resnet50: 25,557,032 minus fc (2,049,000)


def test_resnet50_state_dict_layout_is_torchvision():
    layout = torchvision_resnet50_layout()
    sd = ResNet50().state_dict()
    assert set(sd) == set(layout)
    for k, shape in layout.items():
        assert tuple(sd[k].shape) == shape, k
    # well-known keys spelled out
    assert tuple(sd["conv1.weight"].shape) == (64, 3, 7, 7)
    assert tuple(sd["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert tuple(sd["layer2.0.conv2.weight"].shape) == (128, 128, 3, 3)
    assert tuple(sd["layer3.5.bn3.running_var"].shape) == (1024,)
    assert tuple(sd["layer4.2.conv3.weight"].shape) == (2048, 512, 1, 1)
    assert "layer1.1.downsample.0.weight" not in sd and "fc.weight" not in sd
    n_params = sum(math.prod(s) for k, s in layout.items()
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert n_params == 23_508_032


def _fake_torchvision_sd(in_chans=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in torchvision_resnet50_layout(in_chans).items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(s, generator=g)
        else:
            sd[k] = 0.05 * torch.randn(s, generator=g)
    sd["fc.weight"] = torch.randn(1000, 2048, generator=g)
    sd["fc.bias"] = torch.randn(1000, generator=g)
    return sd


@pytest.fixture(scope="module")
def tv_sd():
    return _fake_torchvision_sd()


def test_resnet50_loads_torchvision_state_dict_strictly(tv_sd):
    sd = tv_sd
    m = ResNet50()
    m.load_torchvision_state_dict(sd)
    got = m.state_dict()
    for k, v in sd.items():
        if not k.startswith("fc."):
            assert torch.equal(got[k], v), k
    # a plain strict load into HATR's backbone works once fc is removed, and so does the model's helper
    hatr = hatr_resnet50(vit_depth=1)
    hatr.backbone.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")}, strict=True)
    assert torch.equal(hatr.backbone.layer4[2].conv3.weight, sd["layer4.2.conv3.weight"])
    hatr.load_backbone_state_dict(sd)
    bad = dict(sd)
    bad.pop("layer3.2.bn2.weight")
    with pytest.raises(RuntimeError, match="layer3.2.bn2.weight"):
        ResNet50().load_torchvision_state_dict(bad)


def test_resnet50_in_chans1_sums_rgb_conv1(tv_sd):
    sd = tv_sd
    rgb, gray = ResNet50().eval(), ResNet50(in_chans=1).eval()
    rgb.load_torchvision_state_dict(sd)
    gray.load_torchvision_state_dict(sd)
    assert tuple(gray.conv1.weight.shape) == (64, 1, 7, 7)
    x = torch.randn(1, 1, 40, 36)
    with torch.no_grad():
        torch.testing.assert_close(gray(x), rgb(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"ResNet50: expected conv1.weight with 2 input channels"):
        ResNet50(in_chans=2).load_torchvision_state_dict(sd)


def test_resnet50_stage_shapes_224_and_odd():
    m = ResNet50().eval()
    with torch.no_grad():
        feats = m.forward_intermediates(torch.randn(1, 3, 224, 224))
        assert [tuple(f.shape) for f in feats] == [(1, 256, 56, 56), (1, 512, 28, 28), (1, 1024, 14, 14), (1, 2048, 7, 7)]
        assert m.output_size(224, 224) == (7, 7)
        feats = m.forward_intermediates(torch.randn(2, 3, 97, 70))
    assert [tuple(f.shape[-2:]) for f in feats] == [(25, 18), (13, 9), (7, 5), (4, 3)]
    assert m.output_size(97, 70) == (4, 3)
    assert [f["reduction"] for f in m.feature_info] == [4, 8, 16, 32]
    assert [f["num_chs"] for f in m.feature_info] == [256, 512, 1024, 2048]
    with pytest.raises(ValueError, match=r"ResNet50: expected x with 3 channels, got \(1, 1, 64, 64\)"):
        m(torch.randn(1, 1, 64, 64))


def test_conv2d_backbone_shapes():
    m = Conv2DBackbone().eval()
    assert sum(p.numel() for p in m.parameters()) == (
        3 * 64 * 9 + 2 * 64 + 64 * 128 * 9 + 2 * 128 + 128 * 256 * 9 + 2 * 256
    )
    with torch.no_grad():
        feats = m.forward_intermediates(torch.randn(2, 3, 224, 224))
        assert [tuple(f.shape) for f in feats] == [(2, 64, 56, 56), (2, 128, 28, 28), (2, 256, 14, 14)]
        out = m(torch.randn(1, 3, 160, 192))
    assert tuple(out.shape) == (1, 256, 10, 12)
    assert m.output_size(224, 224) == (14, 14) and m.output_size(160, 192) == (10, 12)
    for hw in [(31, 45), (97, 57)]:
        with torch.no_grad():
            assert tuple(m(torch.randn(1, 3, *hw)).shape[-2:]) == m.output_size(*hw)
    assert [f["reduction"] for f in m.feature_info] == [4, 8, 16]
    with pytest.raises(ValueError, match=r"Conv2DBackbone: expected x with 3 channels"):
        m(torch.randn(1, 4, 64, 64))
