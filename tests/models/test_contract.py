"""The timm model contract of every model (ModelContract), checked without timm: cfg, classifier, intermediates, pruning."""
import re

import pytest
import torch

from fusionblocks import create_model
from fusionblocks.models.contract import adapt_cfg
from fusionblocks.models.registry import default_cfg
from fusionblocks.training.recipes import get_recipe

SMALL_FUSION = dict(dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8))
SMALL_VIT = dict(embed_dim=32, vit_depth=1, vit_heads=2)


def _hifuse(**kw):
    torch.manual_seed(0)
    return create_model("hifuse_tiny", num_classes=3, **SMALL_FUSION, **kw).eval()


def _hatr(**kw):
    torch.manual_seed(0)
    return create_model("hatr_conv2d", num_classes=3, **SMALL_VIT, **kw).eval()


@pytest.mark.parametrize("name,recipe", [("hifuse_tiny", "hifuse"), ("hemf", "hifuse"), ("hatr_resnet50", "hatr")])
def test_pretrained_cfg_is_the_recipes_data_config(name, recipe):
    r = get_recipe(recipe)
    cfg = default_cfg(name)
    assert cfg["architecture"] == name and cfg["input_size"] == (3, 224, 224)
    assert cfg["mean"] == (r.mean[0],) * 3 and cfg["std"] == (r.std[0],) * 3
    # the recipes' eval transform: resize the whole image to the size, bilinear, no crop
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"]) == ("bilinear", 1.0, "squash")
    assert adapt_cfg(cfg, 1)["mean"] == (r.mean[0],) and adapt_cfg(cfg, 1)["input_size"] == (1, 224, 224)


def test_model_cfg_follows_its_arguments():
    m = _hatr(in_chans=1, img_size=(96, 128))
    assert m.pretrained_cfg is m.default_cfg
    assert m.pretrained_cfg["architecture"] == "hatr_conv2d"
    assert m.pretrained_cfg["input_size"] == (1, 96, 128) and m.pretrained_cfg["mean"] == (0.485,)
    assert m.pretrained_cfg["min_input_size"] == (1, 31, 31) and m.pretrained_cfg["num_classes"] == 3
    names = dict(m.named_modules())
    assert m.pretrained_cfg["first_conv"] in names and m.pretrained_cfg["classifier"] in names
    h = _hifuse()
    assert all(c in dict(h.named_modules()) for c in h.pretrained_cfg["first_conv"])


@pytest.mark.parametrize("make", [_hifuse, _hatr])
def test_get_and_reset_classifier(make):
    m = make()
    x = torch.randn(2, 3, 64, 64)
    assert isinstance(m.get_classifier(), torch.nn.Linear) and m.get_classifier().out_features == 3
    m.reset_classifier(7)
    assert m.num_classes == 7 and m.pretrained_cfg["num_classes"] == 7
    with torch.no_grad():
        assert m(x).shape == (2, 7)
    m.reset_classifier(0, global_pool=m.global_pool_type)
    assert isinstance(m.get_classifier(), torch.nn.Identity)
    with torch.no_grad():
        assert m(x).shape == (2, m.num_features)
    with pytest.raises(ValueError, match=rf"reset_classifier supports global_pool=None or '{m.global_pool_type}'.*got 'max'"):
        m.reset_classifier(2, "max")
    with pytest.raises(ValueError, match="expected num_classes as an int >= 0, got -1"):
        m.reset_classifier(-1)


@pytest.mark.parametrize("make", [_hifuse, _hatr])
def test_forward_intermediates_timm_signature(make):
    m = make()
    x = torch.randn(1, 3, 70, 90)
    n = len(m.feature_info)
    with torch.no_grad():
        ours = m.forward_intermediates(x)  # fusionblocks' form: the list of every level
        assert len(ours) == n
        final, maps = m.forward_intermediates(x, intermediates_only=False)  # timm's default form
        torch.testing.assert_close(final, m.forward_features(x), rtol=0, atol=0)
        for a, b in zip(maps, ours):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        picked = m.forward_intermediates(x, indices=[0, -1], norm=True)
        assert [p.shape for p in picked] == [ours[0].shape, ours[-1].shape]
        last2 = m.forward_intermediates(x, indices=2, output_fmt="NHWC")
        assert [p.shape for p in last2] == [ours[i].permute(0, 2, 3, 1).shape for i in (n - 2, n - 1)]
        final, maps = m.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=False)
        torch.testing.assert_close(final, ours[1], rtol=0, atol=0)
    strides = ", ".join(str(f["reduction"]) for f in m.feature_info)
    with pytest.raises(ValueError, match=re.escape(f"has {n} feature levels (strides {strides}), got indices (0, {n})")):
        m.forward_intermediates(x, indices=(0, n))
    with pytest.raises(ValueError, match="expected output_fmt 'NCHW' or 'NHWC', got 'NLC'"):
        m.forward_intermediates(x, output_fmt="NLC")


@pytest.mark.parametrize("make", [_hifuse, _hatr])
def test_prune_intermediate_layers(make):
    m = make()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = m.forward_intermediates(x)
    params = sum(p.numel() for p in m.parameters())
    assert m.prune_intermediate_layers((0, 1)) == [0, 1]
    assert len(m.feature_info) == 2 and m.num_classes == 0
    assert m.num_features == m.feature_info[1]["num_chs"]
    assert sum(p.numel() for p in m.parameters()) < params
    with torch.no_grad():
        got = m.forward_intermediates(x)
    assert len(got) == 2
    for a, b in zip(got, full):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    m.forward_intermediates(x)[1].sum()  # still runs


def test_prune_keeps_all_levels_and_drops_only_the_head():
    m = _hifuse()
    levels = len(m.feature_info)
    assert m.prune_intermediate_layers(None, prune_norm=True) == list(range(levels))
    assert len(m.local_branch.stages) == levels
    assert isinstance(m.head.fc, torch.nn.Identity) and isinstance(m.head.norm, torch.nn.Identity)
    h = _hatr()
    h.prune_intermediate_layers(None)
    assert h.backbone_only and not any(n.startswith(("blocks", "tokenizer", "head")) for n, _ in h.named_parameters())
    with pytest.raises(RuntimeError, match="hatr_conv2d: forward_features needs the token path"):
        h(torch.randn(1, 3, 64, 64))


def _ordinal(matcher, name):
    """timm's grouping rule (timm.models._manipulate.group_with_matcher), kept here to test without timm."""
    for gi, (_, spec) in enumerate(matcher.items()):
        for pat, suffix in spec if isinstance(spec, (list, tuple)) else [(spec, None)]:
            r = re.match(pat, name)
            if r:
                return tuple(float(v) for part in ((gi,), r.groups(), suffix) if part for v in part)
    return (float("inf"),)


@pytest.mark.parametrize("make", [_hifuse, _hatr, lambda: create_model("hemf", num_classes=2, dims=(16, 32, 64, 128), num_heads=4)])
@pytest.mark.parametrize("coarse", [False, True])
def test_group_matcher_orders_stages(make, coarse):
    m = make()
    matcher = m.group_matcher(coarse)
    order = {n: _ordinal(matcher, n) for n, _ in m.named_parameters()}
    head = m.classifier_name
    assert all(o != (float("inf"),) for n, o in order.items() if not n.startswith(head)), order
    first = [order[n] for n, _ in m.named_parameters() if "stem" in n or "conv1" in n or n.startswith("backbone.layer1")]
    assert max(first) < min(order[n] for n, _ in m.named_parameters() if n.startswith(head))


def test_no_weight_decay():
    m = _hifuse()
    nwd = m.no_weight_decay()
    assert nwd and all(n.endswith("relative_position_bias_table") for n in nwd)
    assert nwd == {n for n, _ in m.named_parameters() if "relative_position_bias_table" in n}
    assert _hatr().no_weight_decay() == {"cls_token", "pos_embed"}


@pytest.mark.parametrize("name,arg,cls", [("hifuse_tiny", "drop_path_rate", "HiFuse"),
                                          ("hifuse_tiny", "conv_drop_path_rate", "HiFuse"),
                                          ("hemf", "drop_path_rate", "HEMF")])
@pytest.mark.parametrize("rate", [1.0, -0.1])
def test_drop_path_rate_outside_0_1_names_the_model_argument(name, arg, cls, rate):
    # a rate of 1 made the deepest block divide by a keep probability of 0 (NaN in training)
    small = SMALL_FUSION if name != "hemf" else dict(dims=SMALL_FUSION["dims"], num_heads=4)
    with pytest.raises(ValueError, match=rf"^{cls}: expected {arg} in \[0, 1\), got {rate}$"):
        create_model(name, num_classes=3, **small, **{arg: rate})
    m = create_model(name, num_classes=3, **small, **{arg: 0.5}).train()
    assert torch.isfinite(m(torch.randn(2, 3, 64, 64))).all()


@pytest.mark.parametrize("name,cls", [("hifuse_tiny", "HiFuse"), ("hemf", "HEMF")])
def test_drop_rate_is_classifier_dropout(name, cls):
    # timm's train.py passes drop_rate (default 0.0) to every model; HiFuse/HEMF raised TypeError
    small = SMALL_FUSION if name != "hemf" else dict(dims=SMALL_FUSION["dims"], num_heads=4)
    torch.manual_seed(0)
    plain = create_model(name, num_classes=3, **small).eval()
    torch.manual_seed(0)
    m = create_model(name, num_classes=3, drop_rate=0.5, **small).eval()
    assert m.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(x), plain(x))  # eval: the official function
        feats = m.forward_features(x)
        assert torch.equal(m.forward_head(feats, pre_logits=True), plain.forward_head(feats, pre_logits=True))
        m.train()
        torch.manual_seed(1)
        pre = m.forward_head(feats, pre_logits=True)
        assert (pre == 0).any() and not torch.equal(pre, plain.forward_head(feats, pre_logits=True))
    with pytest.raises(ValueError, match=rf"^{cls}: expected drop_rate in \[0, 1\), got 1.0$"):
        create_model(name, num_classes=3, drop_rate=1.0, **small)


def test_create_model_default_num_classes_is_the_models_own():
    # create_model("hatr_resnet50") built a 1000-class head while the factory, timm and default_cfg say 2
    for name, small, k in [("hatr_conv2d", SMALL_VIT, 2), ("hatr_resnet50", SMALL_VIT, 2),
                           ("hifuse_tiny", SMALL_FUSION, 1000)]:
        m = create_model(name, **small)
        assert m.num_classes == m.get_classifier().out_features == default_cfg(name)["num_classes"] == k, name
        assert m.pretrained_cfg["num_classes"] == k
