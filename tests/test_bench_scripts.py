"""The per-op benchmark scripts (GPU: ``benchmarks/bench_decay_attention.py``, ``bench_window_attention.py``;
CPU: ``benchmarks/bench_cpu.py``): their ``--quick`` smoke runs, in-process through ``main(argv)``, and the
records they write.

Under ``tests/conftest.py`` Triton runs in its interpreter here, so the smoke runs time every implementation:
the Triton kernels (interpreted), the reference, SDPA and FlexAttention (eager; its backward raises on CPU
and must come back as a record with ``error``).
"""
import json
import os
import sys

import pytest
import torch
from script_loader import load_benchmark_script as load_script

from fusionblocks import bench

IMPLS = {"triton", "reference", "sdpa", "flex"}


def run_quick(module, name, tmp_path, capsys):
    assert module.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    cpu = torch.device("cpu" if not torch.cuda.is_available() else "cuda")
    path = tmp_path / f"{name}-{bench.device_slug(cpu)}.json"
    assert path.exists(), sorted(os.listdir(tmp_path))
    pytest.importorskip("jsonschema")  # bench.validate_records checks with it
    records = json.loads(path.read_text())
    bench.validate_records(records)
    md = path.with_suffix(".md").read_text()
    return records, md, out


def check_common(records, md, shapes_by_op):
    assert {r["op"] for r in records} == set(shapes_by_op)
    for r in records:
        assert r["shape"] in shapes_by_op[r["op"]]
        assert "D" in r["shape"] and "d" not in r["shape"]
        assert r["device"] == bench.device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        assert r["torch"] == torch.__version__ and r["triton"] == bench.triton_version()
    for op, shapes in shapes_by_op.items():
        for shape in shapes:
            for p in bench.PASSES:
                got = {r["impl"] for r in records if r["op"] == op and r["shape"] == shape and r["pass"] == p}
                assert got == IMPLS, (op, shape, p)
    measured = [r for r in records if r["ms"] is not None]
    for r in measured:
        assert r["ms"] > 0 and "error" not in r
        assert r["max_abs_err"] < 1e-5, r  # float32 everywhere in the smoke run
    if not torch.cuda.is_available():
        flex_bwd = [r for r in records if r["impl"] == "flex" and r["pass"] == "fwd+bwd"]
        assert flex_bwd and all(r["ms"] is None and r["peak_mem_mb"] is None for r in flex_bwd)
        assert all(r["error"].startswith("NotImplementedError") for r in flex_bwd)
        assert {r["impl"] for r in measured} == IMPLS
    assert "| op | shape |" in md and "triton vs reference" in md
    assert md.count("\n| ") >= len(records) + 1


def test_decay_script_quick(tmp_path, capsys, one_thread):
    mod = load_script("bench_decay_attention")
    records, md, out = run_quick(mod, "decay_attention", tmp_path, capsys)
    check_common(records, md, {f"decay_attention_{m}": s for m, s in mod.QUICK_SHAPES.items()})
    for r in records:
        if r["ms"] is None:
            continue
        mode = r["op"].rsplit("_", 1)[1]
        s = r["shape"]
        n = s["H"] * s["W"]
        keys = n if mode == "full" else s["H"] + s["W"]
        flops = 4 * s["B"] * s["heads"] * n * keys * s["D"] * (3.5 if r["pass"] == "fwd+bwd" else 1)
        assert r["tflops"] == pytest.approx(flops / (r["ms"] * 1e-3) / 1e12)
        assert r["io_mb"] == pytest.approx(s["B"] * s["heads"] * n * s["D"] * 4 / 2**20 * (8 if r["pass"] == "fwd+bwd" else 4))
        assert "pct_of_dense_bf16_peak" not in r  # float32 only
    assert "decay_attention_full" in out and "wrote" in out


def test_window_script_quick(tmp_path, capsys, one_thread):
    mod = load_script("bench_window_attention")
    records, md, out = run_quick(mod, "window_attention", tmp_path, capsys)
    check_common(records, md, {"window_attention": mod.QUICK_SHAPES})
    assert {r["shape"]["shift"] for r in records} == {0, 3}
    for r in records:
        if r["ms"] is None:
            continue
        s = r["shape"]
        moved = (4 if r["pass"] == "fwd" else 12) * s["B"] * s["heads"] * s["H"] * s["W"] * s["D"] * 4
        assert r["gbps"] == pytest.approx(moved / (r["ms"] * 1e-3) / 1e9)
        assert ("hbm_share" in r) == torch.cuda.is_available()


def test_scripts_time_the_issues_shapes():
    decay, window = load_script("bench_decay_attention"), load_script("bench_window_attention")
    # issue 3: full at B=32, 4 heads, 56² and 28², d 16/32/64, plus B=2, 8 heads, 96², d 32
    full = [dict(B=32, heads=4, H=s, W=s, D=d) for s in (56, 28) for d in (16, 32, 64)]
    full.append(dict(B=2, heads=8, H=96, W=96, D=32))
    assert decay.shapes("full", False) == full
    # HEMF's four stages at batch 32: 56²/d12, 28²/d24, 14²/d48, 7²/d96
    assert decay.shapes("decomposed", False) == [
        dict(B=32, heads=8, H=s, W=s, D=d) for s, d in ((56, 12), (28, 24), (14, 48), (7, 96))
    ]
    # issue 4: HiFuse stages at batch 32 (56²/3 heads, 28²/6, 14²/12, 7²/24), d=32, window 7, shift 0 and 3
    stages = [(56, 3), (28, 6), (14, 12), (7, 24)]
    assert window.shapes(False) == [dict(B=32, heads=nh, H=s, W=s, D=32, ws=7, shift=sh)
                                    for s, nh in stages for sh in (0, 3)]
    assert window.shapes(False, stages=[1], shifts=[3]) == [dict(B=32, heads=3, H=56, W=56, D=32, ws=7, shift=3)]


@pytest.mark.parametrize("name", ["bench_decay_attention", "bench_window_attention"])
def test_full_run_needs_cuda(name, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit, match="no CUDA device"):
        load_script(name).main(["--out-dir", str(tmp_path)])
    assert not os.listdir(tmp_path)


def cpp_can_run() -> bool:
    from fusionblocks.ops import explain

    q = torch.zeros(1, 1, 4, 8)
    return not explain("decay_attention", q, q, q, torch.full((1,), -0.1), hw=(2, 2), mode="full", scale=None)["cpp"]


def test_cpu_script_quick(tmp_path, capsys, one_thread):
    mod = load_script("bench_cpu")
    if not cpp_can_run():
        with pytest.raises(SystemExit, match="cpp kernels are not built"):
            mod.main(["--quick", "--threads", "1", "--out-dir", str(tmp_path)])
        return
    from fusionblocks.ops import cpp

    assert mod.main(["--quick", "--threads", "1", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for isa in cpp.supported_isas():  # one file per ISA variant this machine runs
        path = tmp_path / f"cpu_kernels-{bench.device_slug(torch.device('cpu'))}-{isa}-1thread.json"
        assert path.exists(), sorted(os.listdir(tmp_path))
        pytest.importorskip("jsonschema")  # bench.validate_records checks with it
        records = json.loads(path.read_text())
        bench.validate_records(records)
        assert {r["op"] for r in records} == set(mod.QUICK_SHAPES)
        for op, shapes in mod.QUICK_SHAPES.items():
            for shape in shapes:
                for p in bench.PASSES:
                    got = [r for r in records if r["op"] == op and r["shape"] == dict(shape, isa=isa) and r["pass"] == p]
                    assert {r["impl"] for r in got} == {"reference", "cpp"} and len(got) == 2, (op, shape, p)
        for r in records:
            assert r["device"] == bench.device_name(torch.device("cpu")) and r["dtype"] == "float32"
            assert "error" not in r and r["ms"] > 0
            assert r["max_abs_err"] < 1e-5, r
            s = r["shape"]
            io = s["B"] * s["heads"] * s["H"] * s["W"] * s["D"] * 4 / 2**20 * (8 if r["pass"] == "fwd+bwd" else 4)
            assert r["io_mb"] == pytest.approx(io)
            # inputs are counted: q, k, v (+ the decay or the bias table) at the least
            assert r["peak_mem_mb"] >= 3 * s["B"] * s["heads"] * s["H"] * s["W"] * s["D"] * 4 / 2**20
        md = path.with_suffix(".md").read_text()
        assert "| op | shape |" in md and md.count("\n| ") >= len(records) + 1
        assert "cpp vs reference" in md
        assert f"cpp variant {isa} · 1 thread(s) on" in md and "wrote" in out


def test_cpu_script_times_every_variant_and_auto_in_the_same_rounds(tmp_path, one_thread, monkeypatch):
    mod = load_script("bench_cpu")
    if not cpp_can_run():
        pytest.skip("the cpp kernels are not built here")
    from fusionblocks.ops import autotune, cpp

    monkeypatch.setenv(autotune.ENV_TUNE, "memory")
    monkeypatch.setattr(autotune, "_memo", {})
    isas = cpp.supported_isas()
    assert mod.main(["--quick", "--threads", "1", "--impls", "reference", "cpp", "auto", "--out-dir", str(tmp_path)]) == 0
    slug = bench.device_slug(torch.device("cpu"))
    files = {isa: json.loads((tmp_path / f"cpu_kernels-{slug}-{isa}-1thread.json").read_text()) for isa in isas}
    shared = {}
    for isa, records in files.items():
        assert {r["impl"] for r in records} == {"reference", "cpp", "auto"}
        for r in records:
            assert r["shape"]["isa"] == isa and r["ms"] > 0
            if r["impl"] == "auto":
                assert r["chosen"] == "reference" or r["chosen"] in ("cpp", *(f"cpp[{i}]" for i in isas)), r["chosen"]
            else:
                assert "chosen" not in r
            if r["impl"] != "cpp":  # timed once, in the same rounds as every variant: one time in every file
                key = (r["op"], bench.shape_str({k: v for k, v in r["shape"].items() if k != "isa"}), r["pass"], r["impl"])
                assert shared.setdefault(key, r["ms"]) == r["ms"]


def test_cpu_script_times_the_model_shapes():
    mod = load_script("bench_cpu")
    shapes = mod.shapes(False)
    assert shapes["decay_attention_decomposed"] == [dict(B=2, heads=8, H=s, W=s, D=d)
                                                   for s, d in ((56, 12), (28, 24), (14, 48), (7, 96))]
    assert shapes["window_attention"] == [dict(B=2, heads=h, H=s, W=s, D=32, ws=7, shift=sh)
                                          for s, h in ((56, 3), (28, 6), (14, 12), (7, 24)) for sh in (0, 3)]
    assert shapes["decay_attention_full"] == [dict(B=1, heads=4, H=s, W=s, D=32) for s in (28, 56)]
    targets = mod.shapes(False, "targets")
    for op, ss in targets.items():
        assert all(s in shapes[op] for s in ss), op
    with pytest.raises(KeyError, match="unknown bench preset 'gpu'"):
        bench.preset("gpu")


def test_cpu_targets_preset_is_the_scripts_target_set():
    """``fusionblocks bench --preset cpu-targets`` (the anchors at issue 11's target shapes) times the same
    decomposed and window shapes as ``bench_cpu.py --set targets``, all of them model shapes."""
    mod = load_script("bench_cpu")
    targets, cpu = mod.shapes(False, "targets"), bench.preset("cpu")
    got = bench.preset("cpu-targets")
    assert set(got) == {"decay_attention_decomposed", "window_attention"}
    for op, ss in got.items():
        assert ss == targets[op], op
        assert all(s in cpu[op] for s in ss), op


def test_cpp_memory_is_seen_by_the_engine():
    """The CPU peak-memory method sees what the cpp kernels allocate through ATen: the backward's
    gradients (3 × q) show up on top of the inputs."""
    if not cpp_can_run():
        pytest.skip("the cpp extension is not built here")
    from fusionblocks.ops import decay_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 32, generator=g, requires_grad=True) for _ in range(3))
    lg = torch.full((2,), -0.2)
    inputs = [q, k, v, lg]
    tensor_mb = q.numel() * 4 / 2**20

    def fwd():
        with torch.no_grad():
            return decay_attention(q, k, v, lg, hw=(16, 16), mode="full", backend="cpp")

    def fwd_bwd():
        decay_attention(q, k, v, lg, hw=(16, 16), mode="full", backend="cpp").sum().backward()

    resident = bench._tensor_bytes(inputs) / 2**20
    mem_fwd = bench.peak_mem_mb(fwd, "cpu", inputs)
    mem_bwd = bench.peak_mem_mb(fwd_bwd, "cpu", inputs)
    if mem_fwd is None:
        pytest.skip("torch.profiler reports no memory events in this torch build")
    assert mem_fwd >= resident + tensor_mb  # the output
    assert mem_bwd >= resident + 4 * tensor_mb  # the output and dq, dk, dv


def test_dispatch_cost_script_runs(capsys, one_thread):
    mod = load_script("bench_dispatch")
    assert mod.main(["--budget", "0.01", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# CPU ") and "auto - cpp µs" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0][2:] for r in rows] == list(mod.CASES)
    from fusionblocks.ops import cpp

    for r in mod.run(budget_s=0.01, rounds=1):
        assert r["auto_us"] > 0 and r["reference_us"] > 0
        assert (r["cpp_us"] is not None and r["cpp_us"] > 0) == cpp.available()
        assert r["chosen"].split("[")[0] in ("reference", "cpp")


def test_script_without_jsonschema_fails_before_running(tmp_path, monkeypatch):
    """The GPU image has no jsonschema: a script must stop before it times anything, not lose it all at the write."""
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # `import jsonschema` raises ImportError
    ran = []
    monkeypatch.setattr(bench.runner, "run", lambda *a, **k: ran.append(a) or bench.BenchResult([], []))
    with pytest.raises(RuntimeError, match="jsonschema"):
        load_script("bench_window_attention").main(["--quick", "--out-dir", str(tmp_path)])
    assert ran == [] and not list(tmp_path.iterdir())
