"""timm and segmentation-models-pytorch with every fusionblocks model (marker ``integration``; skipped without them).

CI runs these in its second environment (torch 2.14.1, torchvision 0.29.1, timm, segmentation-models-pytorch).
Small widths keep each model at a few seconds on 2 CPU cores; the code paths are the full models'.
"""
import pytest
import torch

import fusionblocks

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.integration

SMALL = {
    "hifuse_tiny": dict(dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8)),
    "hifuse_small": dict(dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8)),
    "hifuse_base": dict(dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8)),
    "hemf": dict(dims=(16, 32, 64, 128), num_heads=2),
    "hatr_resnet50": dict(embed_dim=32, vit_depth=1, vit_heads=2),
    "hatr_conv2d": dict(embed_dim=32, vit_depth=1, vit_heads=2),
}
LEVELS = {"hatr_conv2d": 3}


def test_every_model_is_registered_in_timm():
    assert sorted(SMALL) == fusionblocks.list_models()
    for name in SMALL:
        assert timm.is_model(name), name
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.architecture == name and cfg.interpolation == "bilinear" and not cfg.has_weights


@pytest.mark.parametrize("name", sorted(SMALL))
def test_timm_create_model_and_data_config(name, tmp_path):
    torch.manual_seed(0)
    # timm passes its loader arguments (cache_dir, pretrained_cfg, pretrained_cfg_overlay) to every entry point
    m = timm.create_model(name, num_classes=3, cache_dir=str(tmp_path), pretrained_cfg_overlay={"notes": ("x",)}, **SMALL[name])
    recipe = fusionblocks.training.recipes.get_recipe("hatr" if name.startswith("hatr") else "hifuse")
    assert timm.data.resolve_data_config({}, model=m) == {
        "input_size": (3, 224, 224), "interpolation": "bilinear", "mean": (recipe.mean[0],) * 3,
        "std": (recipe.std[0],) * 3, "crop_pct": 1.0, "crop_mode": "squash",
    }
    assert m.pretrained_cfg["notes"] == ("x",) and m.default_cfg is m.pretrained_cfg
    x = torch.randn(2, 3, 64, 64)
    m.reset_classifier(4)
    assert m(x).shape == (2, 4) and m.get_classifier().out_features == 4
    # timm's train.py always passes drop_rate (its --drop, default 0.0)
    assert timm.create_model(name, num_classes=2, drop_rate=0.0, **SMALL[name])(x).shape == (2, 2)
    one = timm.create_model(name, in_chans=1, num_classes=2, **SMALL[name])
    assert timm.data.resolve_data_config({}, model=one)["mean"] == (recipe.mean[0],)
    assert one(torch.randn(1, 1, 64, 64)).shape == (1, 2)


@pytest.mark.parametrize("name", ["hemf", "hatr_conv2d"])
def test_timm_features_only(name):
    torch.manual_seed(0)
    n = LEVELS.get(name, 4)
    f = timm.create_model(name, features_only=True, out_indices=(1, -1), **SMALL[name])
    x = torch.randn(1, 3, 70, 90)
    feats = f(x)
    assert f.feature_info.reduction() == [8, 4 * 2 ** (n - 1)]
    assert [t.shape[1] for t in feats] == f.feature_info.channels()
    # pruned: only the levels up to the last asked for, no head
    assert not any(k.startswith(("model.head", "model.blocks")) for k in f.state_dict())
    full = timm.create_model(name, features_only=True, **SMALL[name])
    assert len(full(x)) == n and full.feature_info.reduction() == [4 * 2**i for i in range(n)]
    with pytest.raises(ValueError, match="publishes no timm weights"):
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_timm_train_py_drop_path_rate(name):
    # timm's train.py passes drop_path_rate=--drop-path to every model; HATR raised TypeError on it
    torch.manual_seed(0)
    ref = timm.create_model(name, num_classes=2, **SMALL[name])
    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=2, drop_rate=0.0, drop_path_rate=0.5, **{**SMALL[name], **VIT2.get(name, {})})
    if name.startswith("hatr"):
        assert [b.drop_path for b in m.blocks] == [0.0, 0.5]  # linear over the ViT blocks, as timm's ViT
        torch.manual_seed(0)
        ref = timm.create_model(name, num_classes=2, **{**SMALL[name], **VIT2[name]})
    x = torch.randn(4, 3, 64, 64)
    ref.load_state_dict(m.state_dict())  # stochastic depth adds no parameters
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), ref.eval()(x), rtol=0, atol=0)
        torch.manual_seed(1)
        a = m.train()(x)
        torch.manual_seed(1)
        assert not torch.equal(a, ref.train()(x))  # blocks are dropped in training
    with pytest.raises(ValueError, match=r"expected drop_path_rate in \[0, 1\), got 1.0"):
        timm.create_model(name, drop_path_rate=1.0, **SMALL[name])


@pytest.mark.parametrize("name", ["hifuse_tiny", "hemf", "hatr_conv2d"])
def test_timm_train_py_generic_arguments(name):
    # timm's train.py hands --gp, --drop-block and model_kwargs' img_size to any model (None when not set)
    own = "token" if name.startswith("hatr") else "avg"
    m = timm.create_model(name, num_classes=2, global_pool=own, drop_block_rate=0.0, bn_momentum=None,
                          img_size=(64, 96), **SMALL[name])
    assert m.pretrained_cfg["input_size"] == (3, 64, 96)
    assert timm.data.resolve_data_config({}, model=m)["input_size"] == (3, 64, 96)
    with torch.no_grad():
        assert m.eval()(torch.randn(1, 3, 64, 96)).shape == (1, 2)
    with pytest.raises(ValueError, match=rf"create_model: {name} pools its features with '{own}'"):
        timm.create_model(name, global_pool="max", **SMALL[name])
    with pytest.raises(ValueError, match=rf"create_model: {name} has no DropBlock layers"):
        timm.create_model(name, drop_block_rate=0.1, **SMALL[name])


VIT2 = {"hatr_resnet50": dict(vit_depth=2), "hatr_conv2d": dict(vit_depth=2)}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_timm_pretrained_error_names_a_route_that_exists(name, tmp_path):
    with pytest.raises(ValueError, match="publishes no timm weights") as err:
        timm.create_model(name, pretrained=True, **SMALL[name])
    msg = str(err.value)
    if name.startswith("hatr"):
        # HATR has no official code: create_model(..., pretrained_official=...) is refused, so it must not be offered
        assert "pretrained_official" not in msg and "no official code" in msg
        with pytest.raises(ValueError, match="has none"):
            fusionblocks.create_model(name, pretrained_official=str(tmp_path / "x.pth"), **SMALL[name])
        # the route it names instead works
        src = timm.create_model(name, num_classes=3, **SMALL[name])
        torch.save(src.state_dict(), tmp_path / "w.pth")
        dst = timm.create_model(name, num_classes=3, checkpoint_path=str(tmp_path / "w.pth"), **SMALL[name])
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    else:
        assert f"fusionblocks.create_model({name!r}, pretrained_official=PATH)" in msg
        assert hasattr(fusionblocks.create_model(name, **SMALL[name]), "load_official_state_dict")


@pytest.mark.parametrize("name", ["hifuse_tiny", "hatr_conv2d"])
def test_timm_pretrained_loads_the_file_the_caller_names(name, tmp_path):
    # timm's train.py --pretrained --pretrained-path PATH passes pretrained=True with
    # pretrained_cfg_overlay=dict(file=PATH, num_classes=-1); it was refused as "publishes no timm weights"
    torch.manual_seed(0)
    src = timm.create_model(name, num_classes=3, **SMALL[name])
    torch.save(src.state_dict(), tmp_path / "w.pth")
    m = timm.create_model(name, pretrained=True, num_classes=5, **SMALL[name],
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth"), num_classes=-1))
    head = m.pretrained_cfg["classifier"] + "."
    want = {k: v for k, v in src.state_dict().items() if not k.startswith(head)}
    got = m.state_dict()
    assert want and all(torch.equal(got[k], v) for k, v in want.items())  # all but the classifier of 3 classes
    assert m.get_classifier().out_features == 5
    enc = timm.create_model(name, pretrained=True, features_only=True, out_indices=(0,), **SMALL[name],
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth")))
    level0 = {k: v for k, v in enc.model.state_dict().items() if k.startswith(enc.feature_info.module_name()[0] + ".")}
    assert level0 and all(torch.equal(v, want[k]) for k, v in level0.items())
    with pytest.raises(ValueError, match=r"publishes no timm weights.*pretrained_cfg_overlay=dict\(file=PATH\)"):
        timm.create_model(name, pretrained=True, **SMALL[name])


@pytest.mark.parametrize("name", ["hifuse_tiny", "hatr_conv2d"])
def test_timm_pretrained_adapts_an_rgb_file_to_in_chans(name, tmp_path):
    # train.py --pretrained-path rgb.pth --in-chans 1: timm read the file's channels from pretrained_cfg's input_size,
    # which states the model's (1), and refused "weight shape (.., 3, ..) is inconsistent with input_size[0]=1"
    torch.manual_seed(0)
    src = timm.create_model(name, num_classes=3, **SMALL[name])
    torch.save(src.state_dict(), tmp_path / "rgb.pth")
    convs = src.pretrained_cfg["first_conv"]
    convs = (convs,) if isinstance(convs, str) else convs
    for chans in (1, 4):
        m = timm.create_model(name, pretrained=True, in_chans=chans, num_classes=2, **SMALL[name],
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "rgb.pth"), num_classes=-1))
        for conv in convs:
            rgb = src.get_submodule(conv).weight
            want = rgb.sum(1, keepdim=True) if chans == 1 else rgb.repeat(1, 2, 1, 1)[:, :4] * 3 / 4
            torch.testing.assert_close(m.get_submodule(conv).weight, want)
        with torch.no_grad():
            assert m.eval()(torch.randn(1, chans, 64, 64)).shape == (1, 2)
    lenient = timm.create_model(name, pretrained=True, in_chans=1, pretrained_strict=False, **SMALL[name],
                                pretrained_cfg_overlay=dict(file=str(tmp_path / "rgb.pth"), num_classes=-1))
    torch.testing.assert_close(lenient.get_submodule(convs[0]).weight, src.get_submodule(convs[0]).weight.sum(1, keepdim=True))


def test_timm_pretrained_refuses_a_file_without_the_models_weights(tmp_path):
    # timm loads what matches (strict=False once the classifier is left out) and leaves the rest at random init,
    # saying so only in a log: an official HEMF checkpoint (other key names) or another model's file trained nothing
    kw = dict(pretrained=True, num_classes=3, **SMALL["hemf"])
    torch.save(timm.create_model("hatr_conv2d", **SMALL["hatr_conv2d"]).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"hemf: expected a weights file with every weight of the model but the "
                                         r"classifier, got one without \d+ of them: local_branch\.stem\.0\.weight, .*"
                                         r"pretrained_official=PATH"):
        timm.create_model("hemf", pretrained_cfg_overlay=dict(file=str(tmp_path / "other.pth"), num_classes=-1), **kw)
    # pretrained_strict=False asks for timm's lenient load
    timm.create_model("hemf", pretrained_strict=False, pretrained_cfg_overlay=dict(file=str(tmp_path / "other.pth")), **kw)
    # a file without a classifier (a model built with num_classes=0) has every weight that is needed
    torch.save(timm.create_model("hemf", num_classes=0, **SMALL["hemf"]).state_dict(), tmp_path / "headless.pth")
    m = timm.create_model("hemf", pretrained_cfg_overlay=dict(file=str(tmp_path / "headless.pth"), num_classes=-1), **kw)
    assert m.get_classifier().out_features == 3


@pytest.mark.parametrize("name", ["hemf", "hatr_resnet50"])
def test_fusion_unet_takes_a_timm_features_only_encoder(name):
    from fusionblocks.models.unet import FusionUNet

    torch.manual_seed(0)
    net = FusionUNet(2, encoder=timm.create_model(name, features_only=True, **SMALL[name]), decoder_channels=(16, 16, 8, 8))
    y = net(torch.randn(2, 3, 70, 90))
    assert y.shape == (2, 2, 70, 90)
    y.square().mean().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []  # features_only pruned the head
    with pytest.raises(ValueError, match=r"FusionUNet: expected an encoder with 4 feature levels .* got FeatureGetterNet with 2 \(strides 8, 16\)$"):
        FusionUNet(encoder=timm.create_model(name, features_only=True, out_indices=(1, 2), **SMALL[name]))


def test_timm_optimizer_uses_groups_and_no_weight_decay():
    from timm.optim import create_optimizer_v2

    m = timm.create_model("hifuse_tiny", num_classes=2, **SMALL["hifuse_tiny"])
    opt = create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    no_wd = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    table = [p for n, p in m.named_parameters() if "relative_position_bias_table" in n]
    assert table and all(id(p) in no_wd for p in table)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) > 4 and scales[-1] == 1.0  # layer decay over stems, stages and head
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()


smp = pytest.importorskip("segmentation_models_pytorch")


@pytest.mark.parametrize(
    "arch,name",
    # hifuse_small/base share hifuse_tiny's code path (only depths differ): timm builds them above
    [("Unet", "hifuse_tiny"), ("FPN", "hemf"), ("Unet", "hatr_resnet50"), ("Unet", "hatr_conv2d")],
)
def test_smp_tu_encoder_trains(arch, name):
    torch.manual_seed(0)
    kw = dict(encoder_weights=None, classes=2, **SMALL[name])
    if arch == "Unet":
        kw["decoder_channels"] = (32, 16, 16, 8, 8)
    if name == "hatr_conv2d":  # three levels (strides 4, 8, 16): one U-Net stage fewer
        kw.update(encoder_depth=4, decoder_channels=(32, 16, 8, 8))
    net = getattr(smp, arch)(f"tu-{name}", **kw)
    x = torch.randn(2, 3, 64, 64)
    y = net(x)
    assert y.shape == (2, 2, 64, 64)
    y.square().mean().backward()
    grads = [p.grad for n, p in net.encoder.named_parameters()]
    assert grads and all(g is not None for g in grads)  # features_only pruned everything the maps do not use
    torch.optim.SGD(net.parameters(), lr=0.1).step()


def test_smp_decoders_the_readme_names():
    # README: Unet, UnetPlusPlus, FPN, PSPNet, Linknet, MAnet, UPerNet, Segformer run; DeepLabV3(+)/PAN are refused
    # (output stride 8/16); Unet takes any size, the others multiples of 32; hatr_conv2d: no FPN
    x = torch.randn(1, 3, 64, 64)
    kw = dict(encoder_weights=None, classes=2, **SMALL["hemf"])
    for arch in ("UnetPlusPlus", "PSPNet", "Linknet", "MAnet", "UPerNet", "Segformer"):
        torch.manual_seed(0)
        net = getattr(smp, arch)("tu-hemf", **kw).eval()
        with torch.no_grad():
            assert net(x).shape == (1, 2, 64, 64), arch
    for arch in ("DeepLabV3", "DeepLabV3Plus", "PAN"):
        with pytest.raises(ValueError, match=r"hemf: expected output_stride 32 \(no dilated variant exists\), got (8|16)"):
            getattr(smp, arch)("tu-hemf", **kw)
    with torch.no_grad():
        assert smp.Unet("tu-hemf", **kw).eval()(torch.randn(1, 3, 70, 90)).shape == (1, 2, 70, 90)
        with pytest.raises(RuntimeError, match="divisible by 32"):
            smp.FPN("tu-hemf", **kw).eval()(torch.randn(1, 3, 70, 90))
    with pytest.raises(RuntimeError):
        smp.FPN("tu-hatr_conv2d", encoder_weights=None, encoder_depth=4, **SMALL["hatr_conv2d"]).eval()(x)
