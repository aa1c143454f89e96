"""``benchmarks/gpu_check.sh`` (issue 12's one command for a GPU machine) cannot rot between GPU runs.

Runs its ``--quick`` dry run on this CPU: every stage (build, tests, kernels, models) and every code
path (records with throughput fields, the determinism check, the summary), tiny shapes, the Triton
interpreter where Triton is installed. One run, shared by the checks below.
"""
import json
import os
import re
import subprocess
import sys

import pytest
from script_loader import load_benchmark_script

from fusionblocks import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("build", "tests", "kernels", "models")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The dry run as the GPU machine's image would run it: that image has no jsonschema (hidden here by a
    package that fails to import, first on the path), so the records must still be written."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "out"
    shim = tmp / "no_jsonschema" / "jsonschema"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('jsonschema hidden: the GPU image has none')\n")
    path = os.pathsep.join([str(shim.parent)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=path)
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(out), "--quick"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    return r, out


def test_every_stage_runs_and_passes(dry_run):
    r, out = dry_run
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    summary = (out / "summary.md").read_text()
    for stage in STAGES:
        assert f"| {stage} | ok" in summary, summary[:2000]
        assert (out / "logs" / f"{stage}.log").stat().st_size > 0
    # the targets table, from the dry run's own records (the window case ran triton, reference and sdpa)
    targets = summary[summary.index("## Issue 12's targets"):summary.index("## Kernels")]
    window = [ln for ln in targets.splitlines() if ln.startswith("| window_attention fwd+bwd: 3x reference |")]
    assert len(window) == 1 and re.search(r"\| triton \| \d+\.\d\dx \| 3x \| (yes|\*\*no\*\*) \|$", window[0]), targets


def test_outdir_stays_within_what_comes_back(dry_run):
    _, out = dry_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, files
    assert all(len(p.relative_to(out).parts) <= 3 for p in files), files  # at most two folders deep
    assert not [p for p in files if p.name.endswith(".tmp.json")]


def test_records_are_valid_with_throughput_and_versions(dry_run):
    _, out = dry_run
    kernels = json.loads((out / "kernels.json").read_text())
    models = json.loads((out / "models.json").read_text())
    measured = [r for r in kernels if r["ms"] is not None]
    assert {r["op"] for r in measured} == {"window_attention", "decay_attention_full"}
    assert {r["impl"] for r in measured} >= {"reference", "sdpa"}
    assert {r["pass"] for r in measured} == {"fwd", "fwd+bwd"}
    for r in measured:
        assert r["tflops"] > 0 and r["gbps"] > 0 and r["io_mb"] > 0 and "hbm_share" not in r  # no peak known for a CPU
        assert r["torch"] and "triton" in r and r["device"].startswith("CPU")
    assert [(r["op"], r["pass"]) for r in models] == [("model", "train")] and models[0]["shape"]["model"] == "hifuse_tiny"
    assert models[0]["img_per_s"] > 0
    pytest.importorskip("jsonschema")  # bench.validate_records checks with it (the stages ran without it)
    bench.validate_records(kernels)
    bench.validate_records(models)


def test_determinism_is_checked_and_reported(dry_run):
    _, out = dry_run
    rows = json.loads((out / "determinism.json").read_text())
    assert {r["op"] for r in rows} == {"window_attention", "decay_attention_full"}
    for r in rows:
        assert "error" not in r, r
        assert r["bitwise_identical"] is True and r["max_abs_diff_between_runs"] == 0.0
        assert all(v < 1e-4 * max(1.0, r["grad_scale"][k]) for k, v in r["max_abs_err_vs_float64"].items()), r
    summary = (out / "summary.md").read_text()
    assert "## Determinism" in summary and "| yes |" in summary
    assert "To try next" in summary


def test_tuning_variants_timed_next_to_the_default(dry_run):
    """Issue 12's GPU-only performance items as tuning variants: each one and the default re-timed, fwd+bwd,
    correct (max_abs_err against the spec), tabulated default / variant in the summary."""
    _, out = dry_run
    gpu_check = load_benchmark_script("gpu_check")
    kernels = json.loads((out / "kernels.json").read_text())
    tuned = [r for r in kernels if r["impl"].startswith("triton[")]
    want = {(op, f"triton[{label}]") for op in ("window_attention", "decay_attention_full")
            for label, _ in [("default", {})] + gpu_check.VARIANTS[op]}
    assert {(r["op"], r["impl"]) for r in tuned} == want
    for r in tuned:
        assert r["pass"] == "fwd+bwd" and r["ms"] > 0 and r["max_abs_err"] < 1e-4, r
    summary = (out / "summary.md").read_text()
    section = summary.split("## Tuning variants", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and "default ms" not in ln]
    assert len(rows) == len(want) - 2, section  # one row per variant, against its op's default
    assert all("x |" in ln for ln in rows), section
    # the main tables keep to the backends and anchors
    main = summary.split("## Kernels", 1)[1].split("## Determinism", 1)[0]
    assert "triton[" not in main


def test_variant_cases_skip_what_a_variant_cannot_change():
    gpu_check = load_benchmark_script("gpu_check")
    cases = gpu_check.variant_cases(gpu_check.op_shapes(dry=False), dry=False)
    ops = {op for op, *_ in cases}
    assert ops == {"window_attention", "decay_attention_decomposed"}  # full decay at 56² and 28²: no line fits one tile
    assert all(s["shift"] == 3 for op, s, *_ in cases if op == "window_attention")
    assert len([c for c in cases if c[0] == "decay_attention_decomposed"]) == 4  # HEMF's four stages


def test_a_failing_variant_is_recorded_and_the_others_still_run(monkeypatch):
    gpu_check = load_benchmark_script("gpu_check")
    from fusionblocks.ops.triton._common import tuning

    seen = []

    def fake_run_case(op_bench, shape, dtype, device, **kw):
        value = tuning("window_backward_programs_per_sm")
        seen.append(value)
        if value == 8:
            raise RuntimeError("CUDA out of memory (simulated)")
        rec = bench.make_record(op_bench.name, "triton", shape, dtype, "fwd+bwd", 2.0 if value == 4 else 1.0, 1.0, "CPU test")
        return bench.BenchResult([rec], [])

    monkeypatch.setattr(bench, "run_case", fake_run_case)
    ops = {"window_attention": gpu_check.window_shapes(dry=True)}
    records, saves = [], []
    gpu_check.variants(records, ops, "float32", "cpu", "CPU test", None, 0.01, True, save=lambda: saves.append(len(records)))
    assert seen == [4, 8, 16, 4]  # default, 8 and 16 programs/SM, 4 warps (programs per SM back at its default)
    by_impl = {r["impl"]: r for r in records}
    assert set(by_impl) == {"triton[default]", "triton[8 programs/SM]", "triton[16 programs/SM]", "triton[4 warps]"}
    assert by_impl["triton[8 programs/SM]"]["ms"] is None and "out of memory" in by_impl["triton[8 programs/SM]"]["error"]
    assert saves == [4]
    rows = gpu_check.variant_rows(records)
    assert len(rows) == 3 and "2.00x" in rows[1] and "candidate default" in rows[1] and "out of memory" in rows[0]


def test_records_written_without_jsonschema_and_said_so(dry_run):
    # the records themselves are validated here (test_records_are_valid_with_throughput_and_versions)
    _, out = dry_run
    summary = (out / "summary.md").read_text()
    assert "without the schema check" in summary
    assert (out / "kernels.json").stat().st_size > 0 and (out / "models.json").stat().st_size > 0


def test_hbm_peak_table_and_flop_convention():
    gpu_check = load_benchmark_script("gpu_check")

    assert gpu_check.hbm_peak("NVIDIA H200") == 4800.0
    assert gpu_check.hbm_peak("NVIDIA H100 80GB HBM3") == 3350.0
    assert gpu_check.hbm_peak("CPU AMD EPYC") is None
    rec = bench.make_record("window_attention", "triton", dict(B=1, heads=1, H=7, W=7, D=32, ws=7, shift=0),
                            "bfloat16", "fwd", 1.0, None, "NVIDIA H200")
    gpu_check.add_throughput([rec], 4800.0)
    flops = 4 * 49 * 49 * 32  # two matmuls of 49 queries x 49 keys x 32
    assert rec["tflops"] == pytest.approx(flops / 1e-3 / 1e12)
    assert rec["gbps"] == pytest.approx(4 * 49 * 32 * 2 / 1e-3 / 1e9)
    assert rec["hbm_share"] == pytest.approx(rec["gbps"] / 4800.0)


def test_hbm_peak_names_that_contain_another_key():
    gpu_check = load_benchmark_script("gpu_check")

    assert gpu_check.hbm_peak("NVIDIA GH200 480GB") == 4000.0  # not the H200's 4800 that its name contains
    assert gpu_check.hbm_peak("NVIDIA H100 NVL") == 3900.0 and gpu_check.hbm_peak("NVIDIA H100 PCIe") == 2000.0
    for name in gpu_check.HBM_PEAK_GBPS:  # every key reaches its own entry
        assert gpu_check.hbm_peak(f"NVIDIA {name}") == gpu_check.HBM_PEAK_GBPS[name], name


def test_relative_outdir_is_the_callers(tmp_path):
    """``gpu_check.sh out`` run from another folder writes to that folder's ``out``, not the repository's."""
    stub = tmp_path / "python_stub"
    stub.write_text('#!/usr/bin/env bash\necho "$2"\n')  # prints the OUTDIR that gpu_check.py would get
    stub.chmod(0o755)
    caller = tmp_path / "caller"
    caller.mkdir()
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "out", "--dry-run"], cwd=caller,
                       env=dict(os.environ, PYTHON=str(stub)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(caller / "out") and (caller / "out").is_dir()
    assert not os.path.exists(os.path.join(ROOT, "out"))


def test_usage_error_without_outdir():
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


def test_gpu_tests_use_xdist_workers_only_on_the_real_run():
    gpu_check = load_benchmark_script("gpu_check")

    real = gpu_check.stage_command("tests", "/o", False, "python3", xdist=True)
    assert real[:3] == ["python3", "-m", "pytest"] and real[-1] == "tests"
    assert real[real.index("-n") + 1] == str(gpu_check.TEST_WORKERS) and real[real.index("-m", 3) + 1] == "gpu"
    assert "-n" not in gpu_check.stage_command("tests", "/o", False, "python3", xdist=False)
    assert "-n" not in gpu_check.stage_command("tests", "/o", True, "python3", xdist=True)


def test_a_stage_killed_mid_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A stage killed at its cap while saving leaves ``<name>.tmp``: it must not come back as a ninth file."""
    gpu_check = load_benchmark_script("gpu_check")

    def killed_while_saving(stage, out, dry, py, cap, quick=False):
        for name in ("kernels.json.tmp", "kernels_skipped.tmp.json"):
            (tmp_path / name).write_text("[")
        return dict(stage=stage, status=f"timed out after {cap} s (partial results kept)", rc=124, seconds=1.0, cap=cap)

    monkeypatch.setattr(gpu_check, "run_stage", killed_while_saving)
    assert gpu_check.main([str(tmp_path), "--stages", "kernels", "--dry-run"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "summary.md"]
    assert "timed out" in (tmp_path / "summary.md").read_text()


def test_gpu_tests_name_each_test_in_the_log():
    """``-v``: a tests stage cut at its cap still shows which tests ran and how they ended."""
    gpu_check = load_benchmark_script("gpu_check")

    for dry in (False, True):
        cmd = gpu_check.stage_command("tests", "/o", dry, "python3", xdist=True)
        assert "-v" in cmd and "-q" not in cmd


def test_targets_table_from_records():
    """Issue 12's targets, read off the records: the faster fast path per case, each contender's ratio, the HBM share,
    the models' img/s; a missing or failed record is "not measured", never a pass."""
    gpu_check = load_benchmark_script("gpu_check")

    def rec(op, impl, ms, hbm=None, **shape):
        return {"op": op, "impl": impl, "shape": shape, "dtype": "bfloat16", "pass": "fwd+bwd", "ms": ms, "hbm_share": hbm}

    full = dict(B=32, heads=8, H=56, W=56, D=12)
    win = dict(B=32, heads=3, H=56, W=56, D=32, ws=7, shift=3)
    kernels = [rec("decay_attention_full", "triton", 2.0, **full), rec("decay_attention_full", "reference", 30.0, **full),
               rec("decay_attention_full", "flex", 2.2, **full),
               rec("window_attention", "triton", 1.0, 0.4, **win), rec("window_attention", "cuda", 0.8, 0.55, **win),
               rec("window_attention", "reference", 4.0, **win), rec("window_attention", "sdpa", 1.0, **win),
               rec("window_attention", "flex", None, **win),  # failed: no time
               rec("window_attention", "triton[default]", 0.1, 0.9, **win),  # a tuning variant: not the fast path
               dict(rec("decay_attention_full", "reference", 1.0, **full), dtype="float32")]  # parity run: not a target
    models = [{"op": "model", "impl": impl, "shape": {"model": "hemf"}, "pass": "train", "img_per_s": ips}
              for impl, ips in (("reference", 100.0), ("triton", 160.0), ("cuda", 120.0))]
    rows = {(r[0], r[1]): r[2:] for r in gpu_check.target_rows(kernels, models, "bfloat16")}
    from fusionblocks import bench

    f, w = bench.shape_str(full), bench.shape_str(win)
    assert rows[("decay_attention_full fwd+bwd: 10x reference", f)] == ["triton", "15.00x", "10x", "yes"]
    assert rows[("decay_attention_full fwd+bwd: 1.2x flex", f)] == ["triton", "1.10x", "1.2x", "**no**"]
    assert rows[("decay_attention_decomposed fwd+bwd: 3x reference", "any")] == ["", "no record", "3x", "not measured"]
    assert rows[("window_attention fwd+bwd: 3x reference", w)] == ["cuda", "5.00x", "3x", "yes"]
    assert rows[("window_attention fwd+bwd: 1.5x sdpa", w)] == ["cuda", "1.25x", "1.5x", "**no**"]
    assert rows[("window_attention fwd+bwd: 1.5x flex", w)] == ["cuda", "no record", "1.5x", "not measured"]
    assert rows[("window_attention fwd+bwd: 50% of HBM bandwidth", w)] == ["cuda", "55%", "50%", "yes"]
    assert rows[("hemf training step: 1.5x the reference's img/s", "hemf")] == ["triton", "1.60x", "1.5x", "yes"]
    assert rows[("hifuse_tiny training step: 1.5x the reference's img/s", "hifuse_tiny")][-2:] == ["1.5x", "not measured"]
