"""The model API of FusionNet models (here HiFuse at a small width): intermediates, feature_info, input
sizes, the head, the registry and strict official loading."""
import pytest
import torch

from fusionblocks import create_model, list_models
from fusionblocks.models.fusionnet import FusionNet
from fusionblocks.models.hifuse import HiFuse
from golden_utils import load

DIMS = (16, 32, 64, 128)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HiFuse((2, 1, 1, 1), num_heads=(1, 2, 4, 8), dims=DIMS, num_classes=5).eval()


def test_feature_info(model):
    assert isinstance(model, FusionNet)
    assert model.feature_info == [
        {"num_chs": d, "reduction": r, "module": f"fusion.{i}"} for i, (d, r) in enumerate(zip(DIMS, (4, 8, 16, 32)))
    ]
    names = dict(model.named_modules())
    assert all(info["module"] in names for info in model.feature_info)


@pytest.mark.parametrize(
    "hw, cells",  # ceil(H / s) x ceil(W / s) at strides 4, 8, 16, 32
    [((64, 64), [(16, 16), (8, 8), (4, 4), (2, 2)]), ((96, 160), [(24, 40), (12, 20), (6, 10), (3, 5)]),
     ((100, 76), [(25, 19), (13, 10), (7, 5), (4, 3)]), ((32, 33), [(8, 9), (4, 5), (2, 3), (1, 2)])],
)
def test_intermediates_shapes_and_strides(model, hw, cells):
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        feats = model.forward_intermediates(x)
        logits = model(x)
    assert [tuple(f.shape) for f in feats] == [(1, info["num_chs"], *c) for info, c in zip(model.feature_info, cells)]
    assert logits.shape == (1, 5) and torch.isfinite(logits).all()


def test_forward_is_head_of_features_and_padding_is_explicit(model):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 100, 76)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.equal(model(x), model.forward_head(feats))
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, DIMS[-1])
        assert torch.equal(model.head.fc(pre), model.forward_head(feats))
        padded = torch.nn.functional.pad(x, (0, 20, 0, 28))
        assert torch.equal(model(padded), model(x))


def test_batch_items_are_independent(model):
    torch.manual_seed(2)
    x = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        both = model(x)
        one = model(x[1:2])
    assert torch.allclose(both[1:2], one, rtol=1e-5, atol=1e-6)


def test_backward_reaches_every_parameter():
    torch.manual_seed(3)
    m = HiFuse((2, 1, 1, 1), num_heads=(1, 2, 4, 8), dims=DIMS, num_classes=3).train()
    m(torch.randn(2, 3, 64, 64)).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert missing == []


def test_wrong_input_channels(model):
    with pytest.raises(ValueError, match=r"HiFuse: expected x with 3 channels, got \(1, 1, 64, 64\)"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"HiFuse: expected x as a 4-D"):
        model(torch.randn(3, 64, 64))


def test_registry():
    assert {"hifuse_tiny", "hifuse_small", "hifuse_base"} <= set(list_models("hifuse*"))
    with pytest.raises(ValueError, match=r"unknown model 'hifuse_tiyn'.*did you mean 'hifuse_tiny'"):
        create_model("hifuse_tiyn", num_classes=2)


@pytest.mark.parametrize("name", ["hemf", "hatr_conv2d"])
def test_create_model_takes_timms_generic_arguments_and_names_what_it_refuses(name):
    """timm.create_model (and timm's train.py) pass global_pool, drop_block_rate and img_size to any model; each
    is taken where it means what it says and refused, naming the model, where it cannot; a misspelt argument is a
    ValueError listing the ones the model takes, raised before the model is built."""
    small = dict(dims=(16, 32, 64, 128), num_heads=2) if name == "hemf" else dict(embed_dim=32, vit_depth=1, vit_heads=2)
    own = "avg" if name == "hemf" else "token"
    m = create_model(name, num_classes=2, global_pool=own, drop_block_rate=0.0, img_size=(96, 128), **small)
    assert m.pretrained_cfg["input_size"] == (3, 96, 128) and m.pretrained_cfg["architecture"] == name
    assert create_model(name, global_pool=None, drop_block_rate=None, img_size=None, in_chans=1,
                        **small).pretrained_cfg["input_size"] == (1, 224, 224)
    with torch.no_grad():
        assert m.eval()(torch.randn(1, 3, 96, 128)).shape == (1, 2)
    with pytest.raises(ValueError, match=rf"^create_model: {name} pools its features with '{own}'; expected "
                                         rf"global_pool None or '{own}', got 'max'$"):
        create_model(name, global_pool="max", **small)
    with pytest.raises(ValueError, match=rf"^create_model: {name} has no DropBlock layers; .* got 0.1"):
        create_model(name, drop_block_rate=0.1, **small)
    with pytest.raises(ValueError, match=rf"^{name}: expected img_size as a positive int or a pair \(H, W\)"):
        create_model(name, img_size=(96, 0), **small)
    with pytest.raises(ValueError, match=rf"^create_model: {name} takes no argument 'drop_path' \(did you mean "
                                         r"'drop_path_rate'\?\); it takes .*drop_path_rate, drop_rate"):
        create_model(name, drop_path=0.1, **small)


@pytest.mark.parametrize("name,fixed", [("hifuse_tiny", "depths"), ("hemf", "local_depths"), ("hatr_conv2d", "backbone")])
def test_a_variant_refuses_to_be_given_what_it_fixes(name, fixed):
    # create_model("hemf", local_depths=...) failed with "got multiple values for argument 'local_depths'"
    cls = {"hifuse_tiny": "hifuse.HiFuse", "hemf": "hemf.HEMF", "hatr_conv2d": "hatr.HATR"}[name]
    with pytest.raises(ValueError, match=rf"^create_model: {name} is the variant with {fixed}=.*, got {fixed}=.*; "
                                         rf"for other values build fusionblocks\.models\.{cls}\(\.\.\.\)$"):
        create_model(name, **{fixed: "resnet50" if fixed == "backbone" else (1, 1, 1, 1)})


def test_reset_classifier(model):
    m = HiFuse((2, 1, 1, 1), num_heads=(1, 2, 4, 8), dims=DIMS, num_classes=5).eval()
    m.reset_classifier(0)
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, DIMS[-1])


@pytest.fixture(scope="module")
def tiny_and_official_keys():
    rec = load("hifuse_tiny")
    sd = {k: torch.zeros(s, dtype=getattr(torch, d.split(".")[-1])) for k, s, d in rec["keys"]}
    return create_model("hifuse_tiny", num_classes=rec["num_classes"]), sd


def test_official_state_dict_missing_key_is_named(tiny_and_official_keys):
    m, sd = tiny_and_official_keys
    sd = dict(sd)
    del sd["layers3.blocks.1.attn.qkv.weight"]
    with pytest.raises(KeyError, match=r"HiFuse.*missing official keys \(1\): \['layers3\.blocks\.1\.attn\.qkv\.weight'\]"):
        m.load_official_state_dict(sd)


def test_official_state_dict_unexpected_key_is_named(tiny_and_official_keys):
    m, sd = tiny_and_official_keys
    sd = dict(sd, **{"layers1.blocks.0.mlp.fc2.weight": torch.zeros(96, 384)})
    with pytest.raises(KeyError, match=r"unexpected.*layers1\.blocks\.0\.mlp\.fc2\.weight"):
        m.load_official_state_dict(sd)


def test_official_state_dict_shape_mismatch_is_named(tiny_and_official_keys):
    m, sd = tiny_and_official_keys
    sd = dict(sd, **{"conv_head.weight": torch.zeros(8, 768)})
    with pytest.raises(ValueError, match=r"'conv_head.weight' -> 'head.fc.weight': expected shape \(7, 768\), got \(8, 768\)"):
        m.load_official_state_dict(sd)


@pytest.mark.parametrize(
    "name,kw,size",
    [("hatr_conv2d", dict(vit_depth=2), 64), ("hemf", {}, 64)],
)
def test_grad_checkpointing_gives_the_same_gradients(name, kw, size):
    from fusionblocks import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **kw).eval()  # eval: dropout/drop-path/BN deterministic
    x = torch.randn(2, 3, size, size)
    model(x).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    ckpt = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)


# sum of p.numel() of the official models at num_classes=7, never-called modules included (tests/golden/README.md)
OFFICIAL_PARAMS = {"hifuse_tiny": 119_690_280, "hifuse_small": 123_271_128, "hifuse_base": 134_013_672, "hemf": 68_269_367}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_official_parameter_count_is_reproduced(name):
    model = create_model(name, num_classes=7)
    ours = sum(p.numel() for p in model.parameters())
    assert model.official_unused_params() > 0
    assert ours + model.official_unused_params() == OFFICIAL_PARAMS[name]


def test_official_unused_params_follow_num_classes():
    # HiFuse's never-called Swin head is Linear(768, num_classes); HEMF has no such module
    a, b = create_model("hifuse_tiny", num_classes=7), create_model("hifuse_tiny", num_classes=10)
    assert b.official_unused_params() - a.official_unused_params() == 3 * 768 + 3
    assert create_model("hemf", num_classes=10).official_unused_params() == create_model("hemf", num_classes=7).official_unused_params()


def _small(name):
    from fusionblocks.models.hemf import HEMF

    if name == "hifuse":
        return HiFuse((2, 1, 1, 1), num_heads=(1, 2, 4, 8), dims=DIMS, num_classes=3)
    if name == "hemf":
        return HEMF((1, 1, 1, 1), (1, 1, 1, 1), dims=DIMS, num_heads=2, num_classes=3)
    return create_model("hatr_conv2d", num_classes=3, vit_depth=1)


@pytest.mark.parametrize("name", ["hifuse", "hemf", "hatr_conv2d"])
def test_jit_trace_runs_and_keeps_the_batch_dynamic(name):
    # torch.jit.trace (and so the legacy dynamo=False ONNX exporter) reads sizes as 0-dim tensors, which the hw checks
    # refused ("window_attention: expected hw as a pair of positive ints (H, W), got (tensor(14), tensor(14))"), and
    # its check that a second trace gives the same graph failed on the cached relative-position index
    torch.manual_seed(0)
    model = _small(name).eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(2, 3, 32, 32))
        x = torch.randn(3, 3, 32, 32)
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)
