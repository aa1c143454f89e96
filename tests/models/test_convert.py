"""The rule helpers of ``fusionblocks.models.convert``: prefix_rules and join_rules."""
import re

import pytest
import torch

from fusionblocks.models.convert import convert_keys, join_rules, load_official, official_key_for, prefix_rules

RULES = [(r"conv(\d)\.(.*)", r"layer\1.\2")]


def _map(keys, rules, drop=()):
    return {official: ours for ours, (official, _) in convert_keys({k: torch.zeros(1) for k in keys}, rules, drop).items()}


def test_prefix_rules_escapes_the_prefix_and_keeps_group_numbers():
    rules, drop = prefix_rules("fu1.", "fusion.0.", RULES, [r"unused\..*"])
    assert drop == [re.escape("fu1.") + r"unused\..*"]
    got = _map(["fu1.conv2.weight", "fu1xconv2.weight", "fu1.other.bias", "fu1.unused.w"], rules, drop)
    assert got == {"fu1.conv2.weight": "fusion.0.layer2.weight", "fu1xconv2.weight": "fu1xconv2.weight",
                   "fu1.other.bias": "fu1.other.bias"}


def test_prefix_rules_rest_renames_the_other_keys_last():
    rules, _ = prefix_rules("stages2.0.", "global.0.", RULES, rest=True)
    assert rules[-1] == (re.escape("stages2.0.") + r"(.*)", r"global.0.\1")
    got = _map(["stages2.0.conv1.w", "stages2.0.norm.b", "stages2.1.norm.b"], rules)
    assert got == {"stages2.0.conv1.w": "global.0.layer1.w", "stages2.0.norm.b": "global.0.norm.b",
                   "stages2.1.norm.b": "stages2.1.norm.b"}


def test_join_rules_keeps_order_first_match_wins():
    rules, drop = join_rules(([(r"a\.(.*)", r"first.\1")], ["x"]), ([(r"a\.(.*)", r"second.\1")], ["y"]))
    assert drop == ["x", "y"]
    assert _map(["a.w"], rules) == {"a.w": "first.w"}
    with pytest.raises(KeyError, match="both map to"):
        _map(["a.w", "first.w"], rules)


class _Toy(torch.nn.Module):
    """Our names: ``body.0`` (conv), ``body.1`` (BatchNorm), ``fc``; official: ``conv1``, ``bn1``, ``head``."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
        self.fc = torch.nn.Linear(2, 3)


TOY_RULES = [(r"conv1\.(.*)", r"body.0.\1"), (r"bn1\.(.*)", r"body.1.\1"), (r"head\.(weight|bias)", r"fc.\1")]


def _toy_official():
    ours = _Toy().state_dict()
    back = {"body.0.": "conv1.", "body.1.": "bn1.", "fc.": "head."}
    # the official file lists the head first: errors must follow the file's order, not ours
    keys = sorted(ours, key=lambda k: not k.startswith("fc."))
    return {next(o + k[len(p):] for p, o in back.items() if k.startswith(p)): ours[k].clone() for k in keys}


def test_official_key_for_inverts_the_rules():
    assert official_key_for("body.1.running_mean", TOY_RULES) == "bn1.running_mean"
    assert official_key_for("fc.bias", TOY_RULES) == "head.bias"
    assert official_key_for("other.weight", TOY_RULES) == "other.weight"  # no rule renames it
    # a key that only a rule's output could name has no official spelling
    assert official_key_for("conv1.weight", TOY_RULES) is None


def test_missing_keys_are_named_officially_in_the_official_order():
    sd = _toy_official()
    assert list(sd)[:2] == ["head.weight", "head.bias"]
    for k in ("head.bias", "conv1.bias", "bn1.running_var"):
        del sd[k]
    with pytest.raises(KeyError, match=re.escape("missing official keys (3): ['head.bias', 'conv1.bias', 'bn1.running_var']")):
        load_official(_Toy(), sd, TOY_RULES, source="toy")
    sd = _toy_official()
    sd["head.extra"] = torch.zeros(1)
    with pytest.raises(KeyError, match=re.escape("unexpected official keys (1): ['head.extra']")):
        load_official(_Toy(), sd, TOY_RULES, source="toy")


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_a_wrapped_official_state_dict_loads(prefix):
    # the official code trained under DataParallel/DDP (or torch.compile) saves every key with the wrapper's prefix:
    # loading failed with every key missing and every key unexpected
    sd = _toy_official()
    model = _Toy()
    load_official(model, {prefix + k: v for k, v in sd.items()}, TOY_RULES, source="toy")
    torch.testing.assert_close(model.fc.weight, sd["head.weight"], rtol=0, atol=0)
    partly = {("module." + k if k.startswith("head.") else k): v for k, v in sd.items()}  # not a wrapper's prefix
    with pytest.raises(KeyError, match=re.escape("unexpected official keys (2): ['module.head.weight', 'module.head.bias']")):
        load_official(_Toy(), partly, TOY_RULES, source="toy")


def test_missing_num_batches_tracked_is_filled_as_torch_does():
    sd = _toy_official()
    del sd["bn1.num_batches_tracked"]
    model = _Toy()
    model.body[1].num_batches_tracked.fill_(5)
    load_official(model, sd, TOY_RULES, source="toy")
    assert model.body[1].num_batches_tracked.item() == 5  # kept, as nn.Module.load_state_dict keeps it
    torch.testing.assert_close(model.fc.weight, sd["head.weight"], rtol=0, atol=0)
    reference = _Toy()
    reference.body[1].num_batches_tracked.fill_(5)
    reference.load_state_dict({k: v for k, (_, v) in convert_keys(sd, TOY_RULES).items()}, strict=True)
    assert reference.body[1].num_batches_tracked.item() == 5
