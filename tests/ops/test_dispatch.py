"""The dispatch layer: automatic choice, forced backends, reasons, the environment override."""
import pytest
import torch

import fusionblocks.ops as ops
from fusionblocks.ops import dispatch


def _args():
    q = torch.randn(1, 2, 6, 4)
    return (q, q, q, torch.tensor([-0.5, -1.0])), dict(hw=(2, 3), mode="full", scale=None)


def test_explain_lists_every_backend_with_reasons():
    args, kw = _args()
    reasons = ops.explain("decay_attention", *args, **kw)
    assert list(reasons) == list(dispatch.BACKENDS)
    assert reasons["reference"] == []
    for name, r in reasons.items():
        assert isinstance(r, list) and all(isinstance(s, str) and s for s in r)


def test_auto_choice_can_run():
    args, kw = _args()
    chosen = dispatch.select("decay_attention", None, *args, **kw)
    assert chosen.reasons(*args, auto=True, **kw) == []


def test_unknown_backend_is_value_error():
    args, kw = _args()
    with pytest.raises(ValueError, match=r"decay_attention: unknown backend 'cudnn'"):
        ops.decay_attention(*args, hw=(2, 3), backend="cudnn")


def test_forced_backend_that_cannot_run_lists_candidates():
    q = torch.randn(1, 2, 6, 4)
    lg = torch.tensor([-0.5, -1.0])
    reasons = ops.explain("decay_attention", q, q, q, lg, hw=(2, 3), mode="full", scale=None)
    blocked = [n for n, r in reasons.items() if r]
    if not blocked:
        pytest.skip("every backend can run here")
    with pytest.raises(ops.BackendUnavailable) as e:
        ops.decay_attention(q, q, q, lg, hw=(2, 3), backend=blocked[0])
    msg = str(e.value)
    assert f"backend {blocked[0]!r} cannot run" in msg
    for name in dispatch.BACKENDS:
        assert f"  {name}:" in msg


def test_env_var_forces_backend(monkeypatch):
    args, kw = _args()
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.select("decay_attention", None, *args, **kw).name == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        dispatch.select("decay_attention", None, *args, **kw)


def test_register_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.register_backend("decay_attention", "magic", priority=1)
