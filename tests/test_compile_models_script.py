"""``benchmarks/compile_models.py``: its arguments, and a smoke run on a tiny HEMF with dynamo's ``eager`` backend
(seconds; the inductor runs of the registered models are the script's own job, see benchmarks/results)."""
import json

import pytest
import torch

from fusionblocks import bench
from fusionblocks import EGFBlock


def tiny_net(name):
    """Conv + BatchNorm + one EGF block (decomposed decay attention) + head: what the script meets in HEMF, in
    a graph that dynamo traces in a second or two."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.BatchNorm2d(16),
                               EGFBlock(16, 2, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(16, 3))


def test_arguments(compile_models_script, capsys):
    args = compile_models_script.parse_args([])
    assert args.models == compile_models_script.list_models() and args.batch == 2 and args.threads == 1 and args.image_size is None
    args = compile_models_script.parse_args(["--models", "hemf", "hifuse_tiny", "--image-size", "64", "--batch", "1"])
    assert args.models == ["hemf", "hifuse_tiny"] and args.image_size == 64 and args.batch == 1
    for bad, says in [(["--models", "hifuse_huge"], "unknown model(s) hifuse_huge"),
                      (["--batch", "0"], "--batch must be a positive integer, got 0"),
                      (["--append"], "--append needs --out"), (["--render"], "--render needs --out")]:
        with pytest.raises(SystemExit):
            compile_models_script.parse_args(bad)
        assert says in capsys.readouterr().err


def test_registered_models_are_deterministic_in_training(compile_models_script):
    for name in ("hemf", "hatr_conv2d"):
        model = compile_models_script.build(name)
        assert compile_models_script.native_size(model) == 224
    assert compile_models_script.depth_of(compile_models_script.build("hemf")) == "4-4-4-4 + 3-3-3-3"


def test_build_refuses_stochastic_layers(compile_models_script, monkeypatch):
    monkeypatch.setitem(compile_models_script.DETERMINISTIC, "hemf", {"drop_path_rate": 0.1})
    with pytest.raises(ValueError, match="hemf has stochastic layers"):
        compile_models_script.build("hemf")


def test_smoke_run_writes_records_and_table(compile_models_script, tmp_path, one_thread, monkeypatch):
    monkeypatch.setenv("FUSIONBLOCKS_AUTOTUNE", "off")  # rule answers: no kernel timing inside a unit test
    out = tmp_path / "compile-{device}"
    # --models must name a registered model; build_model stands in a small network for it
    argv = ["--models", "hemf", "--image-size", "32", "--rounds", "1", "--backend", "eager", "--out", str(out)]
    assert compile_models_script.main(argv, build_model=tiny_net) == 0
    path = tmp_path / f"compile-{bench.device_slug(torch.device('cpu'))}"
    records = json.loads(path.with_suffix(".json").read_text())
    bench.validate_records(records)
    assert {(r["pass"], r["impl"]) for r in records} == {(p, i) for p in ("fwd", "train") for i in ("auto", "compiled")}
    for r in records:
        assert r["ms"] > 0 and r["shape"] == {"model": "hemf", "B": 2, "image_size": 32, "depth": "registered",
                                              "kernels": compile_models_script.kernels()}
        assert r["torch"] == torch.__version__ and r["threads"] == 1
    compiled = {r["pass"]: r for r in records if r["impl"] == "compiled"}
    assert compiled["fwd"]["compile_s"] > 0 and compiled["train"]["compile_s"] > 0
    assert compiled["fwd"]["max_abs_err"] < 1e-4 and 0 <= compiled["train"]["grad_err_ratio"] <= 1
    md = path.with_suffix(".md").read_text()
    assert f"| hemf | registered | {compile_models_script.kernels()} | 2 | 32² | {torch.__version__} | pass |" in md
    # --append: the records of another torch version (faked) are kept, those of the same one replaced
    old = [dict(r, torch="2.0.0") for r in records] + [dict(r, ms=1.0) for r in records]
    merged = compile_models_script._merge(old, records)
    assert len(merged) == 8 and sorted({r["torch"] for r in merged}) == sorted({"2.0.0", torch.__version__})
    assert all(r["ms"] != 1.0 for r in merged)
    assert compile_models_script.format_markdown(merged).count(" | pass |") == 2
    # --render rewrites the table from the records, with the notes
    assert compile_models_script.main(["--render", "--out", str(out), "--note", "First note.", "--note", "Second."]) == 0
    md2 = path.with_suffix(".md").read_text()
    assert "First note.\n\nSecond." in md2 and md2.count(" | pass |") == 1


def test_a_compiled_model_that_differs_fails(compile_models_script):
    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x.flatten(1)[:, :4])

    model = Small()
    x, y = torch.randn(2, 1, 2, 2), torch.tensor([0, 1])
    res = compile_models_script.check_model("wrong", model, x, y, backend="aot_eager", rounds=1)
    assert res["ok"] and res["grad_rel_err"] < 1e-6
    shift = compile_models_script.check_model("wrong", model, x, y, backend=_perturbing_backend, rounds=1)
    assert not shift["ok"] and "output differs from eager" in shift["error"]
    recs = compile_models_script.records_of("wrong", shift, batch=2, image_size=2, depth="-")
    bench.validate_records(recs)
    assert all(r["ms"] is None and r["error"] for r in recs)
    assert "FAIL: output differs from eager" in compile_models_script.format_markdown(recs)


def _perturbing_backend(gm, example_inputs):
    """A 'compiler' that returns a slightly wrong function: what the parity check exists to catch."""
    def run(*args):
        out = gm(*args)
        if isinstance(out, (list, tuple)):
            return type(out)(o + 1e-2 if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in out)
        return out + 1e-2
    return run
