"""features_only views of models, and timm registration (skipped where timm is not installed)."""
import importlib.util

import pytest
import torch
import torch.nn as nn

import fusionblocks
from fusionblocks import FeatureExtractor


class _Pyramid(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3 if i == 0 else 4 * i, 4 * (i + 1), 3, 4 if i == 0 else 2, 1) for i in range(4)])
        self.feature_info = [dict(num_chs=4 * (i + 1), reduction=2 ** (i + 2), module=f"convs.{i}") for i in range(4)]

    def forward_intermediates(self, x):
        out = []
        for c in self.convs:
            x = c(x)
            out.append(x)
        return out


def test_feature_extractor_selects_levels():
    fx = FeatureExtractor(_Pyramid(), out_indices=(1, -1))
    feats = fx(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 8, 8, 12), (2, 16, 2, 3)]
    assert fx.out_indices == (1, 3)


def _small_hemf():
    from fusionblocks.models.hemf import HEMF

    return HEMF(num_classes=3, local_depths=(1, 1, 1, 1), global_depths=(1, 1, 1, 1), drop_path_rate=0.0)


def test_feature_extractor_runs_only_the_levels_it_returns():
    torch.manual_seed(0)
    model = _small_hemf().eval()
    x = torch.randn(2, 3, 64, 64)
    ran = []
    model.fusion[3].register_forward_hook(lambda *a: ran.append(3))
    with torch.no_grad():
        want = model.forward_intermediates(x)
        ran.clear()
        got = FeatureExtractor(model, out_indices=(1, 0))(x)
    assert ran == []  # the deepest level asked for is 1: level 3's fusion never ran
    assert [torch.equal(g, want[i]) for g, i in zip(got, (1, 0))] == [True, True]
    assert hasattr(model, "head") and model(x).shape == (2, 3)  # prune=False: the model is still whole


def test_feature_extractor_prune_leaves_no_parameter_without_a_gradient():
    torch.manual_seed(0)
    model = _small_hemf()
    fx = FeatureExtractor(model, out_indices=(0, 1), prune=True)
    x = torch.randn(2, 3, 64, 64)
    sum(f.float().mean() for f in fx(x)).backward()
    unused = [n for n, p in fx.named_parameters() if p.grad is None]
    assert not unused, unused
    assert len(model.feature_info) == 2 and model.num_classes == 0
    with pytest.raises(TypeError, match="prune=True needs a model with prune_intermediate_layers, got _Pyramid"):
        FeatureExtractor(_Pyramid(), prune=True)


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (-1,), (1, 3)])
def test_feature_extractor_prune_of_the_last_level_drops_the_head_norm(out_indices):
    # with the last level kept nothing was cut but the classifier: the head's LayerNorm, which only the pooled
    # features pass through, stayed without a gradient (timm's features_only prunes it: prune_norm=not norm)
    model = _small_hemf()
    fx = FeatureExtractor(model, out_indices=out_indices, prune=True)
    sum(f.float().mean() for f in fx(torch.randn(2, 3, 64, 64))).backward()
    assert [n for n, p in fx.named_parameters() if p.grad is None] == []
    assert isinstance(model.head.norm, nn.Identity) and model.num_classes == 0


def test_feature_extractor_errors():
    with pytest.raises(ValueError, match=r"FeatureExtractor: _Pyramid has 4 feature levels, got out_indices \(0, 4\)"):
        FeatureExtractor(_Pyramid(), out_indices=(0, 4))
    with pytest.raises(TypeError, match="expected a model with forward_intermediates and feature_info, got Linear"):
        FeatureExtractor(nn.Linear(2, 2))


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_timm_create_model_features_only():
    import timm

    for name in fusionblocks.list_models():
        assert timm.is_model(name), name
    model = timm.create_model(
        "hifuse_tiny", features_only=True, out_indices=(1, 2, 3), num_classes=3, dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8)
    )
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [8, 4, 2]
    assert model.feature_info.channels() == [f.shape[1] for f in feats] == [32, 64, 128]
    assert model.feature_info.reduction() == [8, 16, 32]
    with pytest.raises(ValueError, match="publishes no timm weights"):
        timm.create_model("hifuse_tiny", pretrained=True)
