"""HiFuse Tiny/Small/Base vs the official code at 224x224 (fp32, CPU, eval): logits, tiny's fusion maps and
the parameter count. One forward per model: these are the slowest tests of the suite."""
import math
import re

import pytest
import torch

from fusionblocks.models import hifuse
from golden_utils import load, make_input, official_state_dict, rel_err

OFFICIAL_PARAMS = {"hifuse_tiny": 119_690_280, "hifuse_small": 123_271_128, "hifuse_base": 134_013_672}
BUFFER = re.compile(r".*(running_mean|running_var|num_batches_tracked|relative_position_index)")


@pytest.mark.parametrize("name", list(OFFICIAL_PARAMS))
def test_logits_match_official(name, dispatch_backend):
    rec = load(name)
    model = getattr(hifuse, name)(num_classes=rec["num_classes"]).eval()
    model.load_official_state_dict(official_state_dict(rec))
    with torch.no_grad():
        feats = model.forward_intermediates(make_input(rec["input"]))
        logits = model.forward_head(feats[-1])
    assert logits.shape == rec["logits"].shape
    assert rel_err(logits, rec["logits"]) <= 1e-5
    if "features_of_first_image" in rec:
        for i, key in enumerate(["fu1", "fu2", "fu3", "fu4"]):
            want = rec["features_of_first_image"][key]
            assert feats[i][:1].shape == want.shape
            assert rel_err(feats[i][:1], want) <= 1e-5, key

    # Parameter count: ours + the official parameters of the dropped (never-called) modules = official.
    ours = sum(p.numel() for p in model.parameters())
    _, drop = model.official_key_rules()
    dropped = [(k, s) for k, s, _ in rec["keys"] if any(re.fullmatch(d, k) for d in drop) and not BUFFER.fullmatch(k)]
    assert ours + sum(math.prod(s) for _, s in dropped) == OFFICIAL_PARAMS[name]
    assert all(re.search(r"norm2|^norm\.|^head\.|^fu\d\.(Updim|norm1|W3|W)\.", k) for k, _ in dropped)
