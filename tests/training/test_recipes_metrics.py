import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from fusionblocks.training import recipes as R
from fusionblocks.training.metrics import classification_metrics


def test_recipes_match_the_papers():
    h, a = R.get_recipe("hifuse"), R.get_recipe("hatr")
    assert (h.optimizer, h.lr, h.weight_decay, h.min_lr, h.warmup_epochs, h.batch_size) == ("adamw", 1e-4, 0.01, 1e-6, 1.0, 32)
    assert h.mean == [0.5] and h.std == [0.5] and h.augment == {"random_resized_crop": True, "hflip": True}
    assert (a.optimizer, a.lr, a.batch_size, a.epochs) == ("adam", 1e-4, 32, 20)
    assert a.class_weights == {"normal": 3.0, "pneumonia": 1.0}
    assert a.mean == [0.485] and a.std == [0.229]
    assert a.augment == {"hflip": True, "rotation": 10.0, "brightness": 0.1}  # paper §2.2: horizontal flips only
    with pytest.raises(ValueError, match="unknown recipe 'sgd'"):
        R.get_recipe("sgd")


def test_no_weight_decay_on_norms_and_biases():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    m(torch.randn(1, 3, 5, 5))
    opt = R.build_optimizer(m, R.get_recipe("hifuse"))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.01 and opt.param_groups[1]["weight_decay"] == 0.0
    assert id(m[0].weight) in decayed and id(m[0].bias) not in decayed and id(m[1].weight) not in decayed


def test_optimizers_take_the_fused_step_on_cpu():
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    for recipe in ("hifuse", "hatr"):  # AdamW and Adam
        opt = R.build_optimizer(m, R.get_recipe(recipe))
        assert all(g["fused"] is True for g in opt.param_groups), recipe
    assert R.step_options(m.parameters()) == {"fused": True}
    assert R.step_options([{"params": [torch.zeros(2, device="meta")]}]) == {}  # no fused kernels there
    assert R.step_options([]) == {}


def _adamw_run(opt_kwargs, steps, state=None, load=None):
    torch.manual_seed(0)
    m = nn.Linear(5, 3)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.01, **opt_kwargs)
    if state is not None:
        m.load_state_dict(state[0])
        load(opt, copy.deepcopy(state[1]))  # a state_dict shares the optimizer's tensors, which steps update
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        m(torch.randn(4, 5, generator=g)).square().sum().backward()
        opt.step()
    return m, opt


@pytest.mark.parametrize("saved_with, resumed_with", [({}, {"fused": True}), ({"fused": True}, {"foreach": True})],
                         ids=["per-tensor-to-fused", "fused-to-foreach"])
def test_resuming_keeps_the_optimizers_own_implementation(saved_with, resumed_with):
    m, opt = _adamw_run(saved_with, 3)
    state = copy.deepcopy((m.state_dict(), opt.state_dict()))
    # torch's own load_state_dict takes the saved implementation; load_optimizer_state keeps the resumed one
    _, plain = _adamw_run(resumed_with, 0, state, torch.optim.Optimizer.load_state_dict)
    assert plain.param_groups[0]["fused"] == saved_with.get("fused")
    m2, opt2 = _adamw_run(resumed_with, 2, state, R.load_optimizer_state)
    for k, want in resumed_with.items():
        assert opt2.param_groups[0][k] is want
    assert all(int(s["step"]) == 5 for s in opt2.state.values())
    # the same update as going on with the implementation it was saved with
    m3, _ = _adamw_run(saved_with, 2, state, torch.optim.Optimizer.load_state_dict)
    for a, b in zip(m2.parameters(), m3.parameters()):
        torch.testing.assert_close(a, b)


def test_warmup_then_cosine_to_min_lr():
    f = lambda s: R.lr_factor(s, total_steps=100, warmup_steps=10, base_lr=1e-4, min_lr=1e-6)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.01 + 0.99 * 0.5, rel=1e-6)
    assert f(100) == pytest.approx(0.01)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_class_weights():
    w, why = R.resolve_class_weights({"normal": 3.0, "pneumonia": 1.0}, ["NORMAL", "PNEUMONIA"], [10, 30], "hatr")
    assert w == [3.0, 1.0] and why == "the hatr recipe's normal:pneumonia = 3:1"
    w, why = R.resolve_class_weights({"normal": 3.0, "pneumonia": 1.0}, ["a", "b"], [10, 30], "hatr")
    assert w == [2.0, 2 / 3]  # the switch to inverse frequency is stated, never silent
    assert why.startswith("balanced (inverse class frequency), because the hatr recipe's normal:pneumonia = 3:1")
    assert R.resolve_class_weights("none", ["a"], [1])[0] is None
    assert R.resolve_class_weights([2.0, 1.0], ["a", "b"], [1, 1]) == ([2.0, 1.0], "given on the command line")
    with pytest.raises(ValueError, match="expected 2 values"):
        R.resolve_class_weights([1.0], ["a", "b"], [1, 1])
    # a negative weight trained to raise that class's loss; NaN made the loss NaN, and so did 0 on any batch
    # holding only that class: all were taken
    for bad in ([-1.0, 1.0], [float("nan"), 1.0], [0.0, 1.0]):
        with pytest.raises(ValueError, match=r"expected numbers > 0 \(one per class \['a', 'b'\]\)"):
            R.resolve_class_weights(bad, ["a", "b"], [1, 1])


def test_default_recipes_and_augment_modes():
    assert R.default_recipe("hatr_conv2d") == R.default_recipe("hatr_resnet50") == "hatr"
    assert R.default_recipe("hifuse_tiny") == R.default_recipe("hemf") == "hifuse"
    hatr = R.get_recipe("hatr")
    assert R.augment_spec(hatr, "recipe") == hatr.augment
    assert R.augment_spec(hatr, "none") == {}
    assert R.augment_spec(hatr, "light") == {"hflip": True, "rotation": 5.0}
    assert R.describe_augment({}) == "none (resize only)"
    with pytest.raises(ValueError, match="unknown augment mode 'heavy'"):
        R.augment_spec(hatr, "heavy")


def test_metrics_binary_hand_checked():
    y = [0, 0, 1, 1, 1]
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    m = classification_metrics(y, probs, ["normal", "pneumonia"])
    # predictions 0,1,1,1,0: TP=2 FP=1 FN=1 TN=1
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["confusion_matrix"] == [[1, 1], [1, 2]]
    assert m["recall_macro"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["precision_macro"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["mcc"] == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))
    assert m["auc"] == pytest.approx(5 / 6)  # 5 of the 6 (pos, neg) pairs ranked right
    assert set(m["per_class"]) >= {"normal", "pneumonia", "macro avg"}


def test_metrics_multiclass_perfect_and_missing_class():
    probs = np.eye(3)[[0, 1, 2, 1]]
    m = classification_metrics([0, 1, 2, 1], probs, ["a", "b", "c"])
    assert m["accuracy"] == 1 and m["mcc"] == 1 and m["kappa"] == 1 and m["auc"] == 1
    m = classification_metrics([0, 0, 1], np.eye(3)[[0, 1, 1]], ["a", "b", "c"])
    assert m["auc"] is None and "auc_note" in m


def _groups(model, recipe="hifuse"):
    r = R.get_recipe(recipe)
    decay, no_decay = R.param_groups(model, r.weight_decay, r.no_decay_on_norm_and_bias)
    assert decay["weight_decay"] == r.weight_decay > 0 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    return {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}


def test_no_weight_decay_on_the_models_bias_tables():
    from fusionblocks.models.hifuse import HiFuse

    m = HiFuse((1, 1, 1, 1), num_classes=2)
    decay, no_decay = _groups(m)
    tables = {n for n, _ in m.named_parameters() if n.endswith("relative_position_bias_table")}
    assert len(tables) == 4 and tables <= no_decay and not tables & decay
    assert m.no_weight_decay() == tables
    # the 2-D tables are there only through no_weight_decay(); the rest of no_decay is the 1-D rule
    assert {n for n in no_decay if dict(m.named_parameters())[n].ndim > 1} == tables
    assert all(dict(m.named_parameters())[n].ndim > 1 for n in decay)


def test_no_weight_decay_through_a_compiled_or_ddp_wrapper():
    from fusionblocks.models.hatr import HATR

    m = HATR("conv2d", 2, img_size=32, vit_depth=1)
    _, no_decay = _groups(m)
    assert {"cls_token", "pos_embed"} <= no_decay
    class DDPLike(nn.Module):  # DistributedDataParallel keeps the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    for wrapped, prefix in ((torch.compile(m), "_orig_mod."), (DDPLike(m), "module."),
                            (DDPLike(torch.compile(m)), "module._orig_mod.")):
        _, got = _groups(wrapped)
        assert got == {prefix + n for n in no_decay}


def test_learnable_decay_and_keyword_conventions():
    from fusionblocks.models.hemf import HEMF

    m = HEMF((1, 1, 1, 1), (1, 1, 1, 1), num_classes=2, learnable_decay=True)
    gammas = {n for n, _ in m.named_parameters() if n.endswith("log_gamma")}
    assert gammas and m.no_weight_decay() == gammas and gammas <= _groups(m)[1]
    assert HEMF((1, 1, 1, 1), (1, 1, 1, 1), num_classes=2).no_weight_decay() == set()  # buffers: nothing to name

    class Keywords(nn.Module):  # Swin's / TinyViT's official convention, and timm's wildcards
        def __init__(self):
            super().__init__()
            self.attn = nn.Module()
            self.attn.attention_biases = nn.Parameter(torch.zeros(3, 4))
            self.pos = nn.Parameter(torch.zeros(1, 4, 4))
            self.proj = nn.Linear(4, 4)

        def no_weight_decay(self):
            return {"po*"}

        def no_weight_decay_keywords(self):
            return {"attention_biases"}

    decay, no_decay = _groups(Keywords())
    assert decay == {"proj.weight"} and no_decay == {"attn.attention_biases", "pos", "proj.bias"}


def test_no_weight_decay_must_return_names():
    m = nn.Linear(2, 2)
    m.no_weight_decay = lambda: "weight"
    with pytest.raises(TypeError, match=r"Linear.no_weight_decay\(\) should return a set of parameter names"):
        R.param_groups(m, 0.01, True)


def test_metrics_undefined_kappa_is_null_not_nan():
    # every label and every prediction is class b: chance agreement 1, kappa 0/0; NaN made metrics.json invalid JSON
    m = classification_metrics([1, 1, 1], np.array([[0.2, 0.8], [0.4, 0.6], [0.1, 0.9]]), ["a", "b"])
    assert m["kappa"] is None and "same class" in m["kappa_note"]
    assert m["accuracy"] == 1 and m["mcc"] == 0.0 and m["auc"] is None
    json.dumps(m, allow_nan=False)


def test_metrics_refuse_logits_and_mismatched_shapes():
    y = [0, 0, 1, 1]
    logits = np.array([[4.0, 3.0], [0.0, 2.5], [-3.0, 1.0], [-2.0, 2.0]])
    assert classification_metrics(y, torch.tensor(logits).softmax(-1).numpy(), ["a", "b"])["auc"] == 1
    # column 1 of the logits alone ranks every positive below every negative: the AUC was 0, silently
    with pytest.raises(ValueError, match=r"expected probabilities .* row 0 \[4.0, 3.0\] summing to 7: logits"):
        classification_metrics(y, logits, ["a", "b"])
    with pytest.raises(ValueError, match="expected probabilities"):  # multi-class: the AUC was None, 'undefined'
        classification_metrics([0, 1, 2], np.eye(3) * 5 - 1, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"expected probs of shape \(N, K\) = \(3, 3\) .* got \(3, 4\)"):
        classification_metrics([0, 1, 2], np.eye(4)[[0, 1, 3]], ["a", "b", "c"])
    with pytest.raises(ValueError, match="expected labels 0 .. 1, got 0 .. 2"):
        classification_metrics([0, 1, 2], np.eye(2)[[0, 1, 1]], ["a", "b"])
    m = classification_metrics([0, 1], np.array([[np.nan, np.nan], [0.2, 0.8]]), ["a", "b"])  # NaN rows still pass
    assert m["num_samples"] == 2
