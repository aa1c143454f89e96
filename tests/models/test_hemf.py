"""The HEMF model: parity with the official Esgjgd/HEMF, official loading, any input size."""
from __future__ import annotations

import math
import re

import pytest
import torch

from fusionblocks import EGFBlock, create_model, list_models
from fusionblocks.layers.fusion import HEF
from fusionblocks.models.hemf import HEMF
from golden_utils import load, make_input, official_state_dict, rel_err

OFFICIAL_PARAMS = 68_269_367


@pytest.fixture(scope="module")
def official_hemf():
    record = load("hemf")
    model = create_model("hemf", num_classes=record["num_classes"]).eval()
    model.load_official_state_dict(official_state_dict(record))
    return model, record


def test_hemf_parity_logits_and_fusion_features(official_hemf, dispatch_backend):
    model, record = official_hemf
    x = make_input(record["input"])
    with torch.no_grad():
        feats = model.forward_intermediates(x)
        logits = model.forward_head(feats[-1])
    assert logits.shape == record["logits"].shape
    assert rel_err(logits, record["logits"]) <= 1e-5
    for i, f in enumerate(feats):
        ref = record["features_of_first_image"][f"fu{i + 1}"]
        assert f[:1].shape == ref.shape
        assert rel_err(f[:1], ref) <= 1e-5


def test_hemf_structure_and_parameter_count():
    model = create_model("hemf", num_classes=7)
    assert "hemf" in list_models()
    assert isinstance(model, HEMF)
    assert all(isinstance(b, EGFBlock) and b.depth == 3 for b in model.global_blocks())
    assert all(isinstance(f, HEF) for f in model.fusion)
    ours = sum(p.numel() for p in model.parameters())
    record = load("hemf")
    rules, drop = model.official_key_rules()
    params = [(k, s) for k, s, d in record["keys"]
              if "float" in d and not k.endswith(("running_mean", "running_var", ".angle", ".decay"))]
    assert sum(math.prod(s) for _, s in params) == OFFICIAL_PARAMS
    dropped = sum(math.prod(s) for k, s in params if any(re.fullmatch(p, k) for p in drop))
    assert dropped == 1_591_104  # fu1.{Updim,norm1,W3} + fu2..4.{norm2,W}: built, never called
    assert ours == OFFICIAL_PARAMS - dropped == 66_678_263
    assert model.feature_info == [
        {"num_chs": c, "reduction": r, "module": f"fusion.{i}"}
        for i, (c, r) in enumerate(zip((96, 192, 384, 768), (4, 8, 16, 32)))
    ]


def test_hemf_official_loading_is_strict():
    record = load("hemf")
    model = create_model("hemf", num_classes=7)
    sd = official_state_dict(record)
    missing = dict(sd)
    del missing["stages2.2.VRC.1.k_proj.bias"]
    with pytest.raises(KeyError, match=r"missing official keys \(1\): \['stages2\.2\.VRC\.1\.k_proj\.bias'\]"):
        model.load_official_state_dict(missing)
    extra = dict(sd)
    extra["stages2.0.VRC.3.q_proj.weight"] = torch.zeros(96, 96)
    with pytest.raises(KeyError, match=r"stages2\.0\.VRC\.3\.q_proj\.weight"):
        model.load_official_state_dict(extra)
    bad = dict(sd)
    bad["stages2.1.RetNetRelPos2d.decay"] = bad["stages2.1.RetNetRelPos2d.decay"] * 2
    with pytest.raises(ValueError, match=r"stages2\.1\.RetNetRelPos2d\.decay"):
        model.load_official_state_dict(bad)
    with pytest.raises(KeyError, match="missing official keys"):
        create_model("hemf", num_classes=5).load_official_state_dict({})


def test_hemf_learnable_decay_loads_official():
    record = load("hemf")
    model = create_model("hemf", num_classes=7, learnable_decay=True)
    model.load_official_state_dict(official_state_dict(record))
    for i, blk in enumerate(model.global_blocks()):
        for attn in blk.attn:
            assert isinstance(attn.log_gamma, torch.nn.Parameter)
            assert torch.equal(attn.log_gamma.detach(), record["buffers"][f"stages2.{i}.RetNetRelPos2d.decay"])


def _small(**kw) -> HEMF:
    torch.manual_seed(0)
    return HEMF((1, 1, 1, 1), (1, 1, 1, 1), dims=(16, 32, 64, 128), num_classes=3, **kw)


@pytest.mark.parametrize("hw", [(64, 96), (45, 70), (32, 32)])
def test_hemf_any_input_size(hw):
    model = _small().eval()
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        feats = model.forward_intermediates(x)
        logits = model(x)
    assert [tuple(f.shape) for f in feats] == [  # the cells that cover the input (of the zero-padded frame)
        (1, c, math.ceil(hw[0] / r), math.ceil(hw[1] / r)) for c, r in zip((16, 32, 64, 128), (4, 8, 16, 32))
    ]
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()
    assert torch.allclose(model.forward_head(feats[-1]), logits)
    assert model.forward_head(feats[-1], pre_logits=True).shape == (1, 128)


def test_hemf_full_hemf_non_square_forward():
    model = create_model("hemf", num_classes=4).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 64, 96))
    assert y.shape == (1, 4) and torch.isfinite(y).all()


def test_hemf_train_backward_reaches_decay_and_both_branches():
    model = _small(learnable_decay=True, mode="full").train()
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    blk = model.global_blocks()[1]
    assert blk.attn[0].log_gamma.grad is not None and blk.attn[0].log_gamma.grad.abs().sum() > 0
    assert model.local_branch.stem[0].weight.grad.abs().sum() > 0
    assert model.global_branch.stem[0].weight.grad.abs().sum() > 0


def test_hemf_errors():
    model = _small()
    with pytest.raises(ValueError, match=r"expected x with 3 channels, got \(1, 1, 32, 32\)"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="HEMF: expected 4 global_depths"):
        HEMF((4, 4, 4, 4), (3, 3, 3))
    with pytest.raises(ValueError, match="create_model: unknown model 'hemff'; did you mean 'hemf'"):
        create_model("hemff")
