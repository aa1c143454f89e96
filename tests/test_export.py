"""ONNX and torch.export (pt2) export: the ops and every model, checked in ONNX Runtime / torch.export.load."""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn

from fusionblocks import create_model, list_models
from fusionblocks.ops import decay_attention, window_attention
from fusionblocks.ops.dispatch import ENV_VAR

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

HW = (6, 9)  # uneven grid; window 3 divides it, the decay ops take any grid


class _AllOps(nn.Module):
    """Every custom-op variant the models reach: decay full / decomposed, window attention with and without shift."""

    def __init__(self, heads: int = 2, ws: int = 3):
        super().__init__()
        self.log_gamma = nn.Parameter(torch.tensor([-0.1, -0.7])[:heads])
        self.table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, heads))
        self.ws = ws

    def forward(self, q, k, v):
        return (
            decay_attention(q, k, v, self.log_gamma, hw=HW, mode="full"),
            decay_attention(q, k, v, self.log_gamma, hw=HW, mode="decomposed"),
            window_attention(q, k, v, self.table, hw=HW, window_size=self.ws, shift=1),
            window_attention(q, k, v, None, hw=HW, window_size=self.ws, shift=0),
        )


def _qkv(batch, d=8, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, HW[0] * HW[1], d, generator=g) for _ in range(3))


def _batch_dims(n):
    b = torch.export.Dim("batch", min=1, max=64)
    return tuple({0: b} for _ in range(n))


def _fusionblocks_ops(program) -> list:
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function" and "fusionblocks" in str(n.target)]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_ops_onnx_match_eager_and_reference_with_dynamic_batch(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    m = _AllOps().eval()
    prog = torch.onnx.export(m, _qkv(2), dynamo=True, dynamic_shapes=_batch_dims(3), verbose=False)
    path = tmp_path / "ops.onnx"
    prog.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    for batch in (1, 3):
        q, k, v = _qkv(batch, seed=batch)
        outs = sess.run(None, dict(zip(names, (q.numpy(), k.numpy(), v.numpy()))))
        with torch.no_grad():
            eager = m(q, k, v)  # whatever backend dispatch picks here (cpp when built)
            monkeypatch.setenv(ENV_VAR, "reference")
            spec = m(q, k, v)
            monkeypatch.delenv(ENV_VAR)
        for got, e, s in zip(outs, eager, spec):
            got = torch.from_numpy(got)
            assert got.shape == s.shape
            assert _rel(got, s) <= 1e-4
            assert _rel(got, e) <= 1e-4


def test_legacy_torchscript_onnx_exporter_also_gets_the_reference(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    m = _AllOps().eval()
    path = tmp_path / "legacy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warning
        torch.onnx.export(m, _qkv(2), str(path), dynamo=False, input_names=["q", "k", "v"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    q, k, v = _qkv(2, seed=3)
    outs = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})
    with torch.no_grad():
        want = m(q, k, v)
    for got, w in zip(outs, want):
        assert _rel(torch.from_numpy(got), w) <= 1e-4


def test_export_traces_the_reference_unless_a_backend_is_named(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    m = _AllOps().eval()
    ep = torch.export.export(m, _qkv(2), dynamic_shapes=_batch_dims(3))
    assert _fusionblocks_ops(ep) == []
    from fusionblocks.ops import cpp

    if not cpp.available():
        pytest.skip("fusionblocks._C not built: the named-backend half needs it")
    monkeypatch.setenv(ENV_VAR, "cpp")
    ep = torch.export.export(m, _qkv(2))
    ops = _fusionblocks_ops(ep)
    assert any("decay_full_fwd" in o for o in ops) and any("window_fwd" in o for o in ops), ops


def test_pt2_program_loads_and_runs_without_fusionblocks(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    m = _AllOps().eval()
    ep = torch.export.export(m, _qkv(2), dynamic_shapes=_batch_dims(3))
    torch.export.save(ep, str(tmp_path / "ops.pt2"))
    q, k, v = _qkv(3, seed=5)
    with torch.no_grad():
        want = m(q, k, v)
    torch.save({"inputs": (q, k, v), "want": want}, tmp_path / "io.pt")
    script = textwrap.dedent(
        """
        import sys
        sys.modules["fusionblocks"] = None  # any import of fusionblocks now fails
        import torch
        io = torch.load("io.pt")
        got = torch.export.load("ops.pt2").module()(*io["inputs"])
        for g, w in zip(got, io["want"]):
            err = ((g - w).abs().max() / w.abs().max()).item()
            assert err <= 1e-5, err
        assert not any(name.startswith("fusionblocks") for name in sys.modules if sys.modules[name] is not None)
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")


# ONNX export traces a whole network: tens of seconds per model on a 2-core CPU. hifuse_tiny (window
# attention, HFF) and hemf (decomposed decay, HEF) run always, hatr_conv2d runs in tests/training (export
# CLI); hifuse_small/base (the same blocks, wider) and hatr_resnet50 run with FUSIONBLOCKS_SLOW_TESTS=1.
# the smallest input each model takes (hatr_resnet50: its tokenizer needs a backbone map of at least 2x2)
SIZES = {"hifuse_tiny": 32, "hifuse_small": 32, "hifuse_base": 32, "hemf": 32, "hatr_resnet50": 64, "hatr_conv2d": 32}


@pytest.mark.parametrize("name", [
    "hifuse_tiny", "hemf",
    pytest.param("hifuse_small", marks=pytest.mark.expensive),
    pytest.param("hifuse_base", marks=pytest.mark.expensive),
    pytest.param("hatr_resnet50", marks=pytest.mark.expensive),
    pytest.param("hatr_conv2d", marks=pytest.mark.expensive),
])
def test_model_onnx_parity_dynamic_batch(name, tmp_path, monkeypatch):
    from fusionblocks.export import check_exported, export_model, read_metadata

    monkeypatch.delenv(ENV_VAR, raising=False)
    assert sorted(SIZES) == list_models()
    size = SIZES[name]
    model = create_model(name, num_classes=3).eval()
    path = tmp_path / f"{name}.onnx"
    export_model(model, path, format="onnx", image_size=size, metadata={"model": name})
    assert read_metadata(path) == {"model": name}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert isinstance(sess.get_inputs()[0].shape[0], str)  # symbolic batch axis
    for batch, seed in ((3, 1), (1, 7)):
        _, rel = check_exported(path, "onnx", model, image_size=size, batch=batch, seed=seed)
        assert rel <= 1e-4, (name, batch, rel)


def test_export_model_leaves_the_model_in_the_mode_it_was_given(tmp_path):
    # the program is the eval-mode function (dropout off, BatchNorm's running statistics); the caller's model,
    # exported in the middle of training, goes on training (export_model used to leave it in eval mode)
    from fusionblocks.export import export_model, run_exported

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten())
    x = torch.randn(2, 3, 8, 8)
    for training in (True, False):
        model.train(training)
        export_model(model, tmp_path / "m.pt2", format="pt2", image_size=8)
        assert model.training is training
    model.eval()
    torch.testing.assert_close(run_exported(tmp_path / "m.pt2", "pt2", x), model(x))
