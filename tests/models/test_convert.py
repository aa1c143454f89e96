"""The rule helpers of ``fusionblocks.models.convert``: prefix_rules and join_rules."""
import re

import pytest
import torch

from fusionblocks.models.convert import convert_keys, join_rules, prefix_rules

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
