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


def test_compile_fullgraph_first_call_in_a_fresh_process():
    """Backends are loaded at import, so the first op call may happen inside torch.compile(fullgraph=True)."""
    import subprocess
    import sys

    code = (
        "import torch, fusionblocks.ops as O\n"
        "lg = torch.tensor([-0.5, -1.0]); q = torch.randn(1, 2, 6, 16); t = torch.randn(9, 2); w = torch.randn(1, 2, 16, 16)\n"
        "f = torch.compile(lambda q: O.decay_attention(q, q, q, lg, hw=(2, 3)), fullgraph=True, backend='aot_eager')\n"
        "g = torch.compile(lambda w: O.window_attention(w, w, w, t, hw=(4, 4), window_size=2, shift=1), fullgraph=True, backend='aot_eager')\n"
        "e1 = (f(q) - O.decay_attention(q, q, q, lg, hw=(2, 3), backend='reference')).abs().max().item()\n"
        "e2 = (g(w) - O.window_attention(w, w, w, t, hw=(4, 4), window_size=2, shift=1, backend='reference')).abs().max().item()\n"
        "assert e1 < 1e-5 and e2 < 1e-5, (e1, e2)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
