"""The ``fusionblocks`` command: argument errors, ``info``, ``summary``, ``bench`` and the bench engine."""
import json
import os
import subprocess
import sys

import time
import weakref

import pytest
import torch
import torch.nn as nn

import fusionblocks
from fusionblocks import bench, cli
from fusionblocks.ops import BACKENDS, cpp
from fusionblocks.ops import reference as ref
from fusionblocks.summary import activation_bytes, count_flops, summarize

try:
    MODELS = fusionblocks.list_models()
except Exception:  # a model module that fails to import must not hide the other tests; see test_models_are_listed
    MODELS = []

OPS_IN_INFO = ("decay_attention (full)", "decay_attention (decomposed)", "window_attention")


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    return e.value.code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ arguments


def test_module_help_via_subprocess():
    r = subprocess.run([sys.executable, "-m", "fusionblocks", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for cmd in ("info", "summary", "bench"):
        assert cmd in r.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required"),
        (["frobnicate"], "invalid choice"),
        (["summary"], "model"),
        (["summary", "hemf", "--image-size", "0"], "positive integer"),
        (["summary", "hemf", "--image-size", "big"], "positive integer"),
        (["bench", "--pass", "backward"], "invalid choice"),
        (["bench", "--steps", "-1"], "positive integer"),
    ],
)
def test_argparse_errors_exit_2_with_usage(capsys, argv, message):
    code, err = cli_error(capsys, *argv)
    assert code == 2
    assert "usage:" in err and message in err


def test_unknown_op_suggests_close_names(capsys):
    code, err = cli_error(capsys, "bench", "--quick", "--ops", "decay_ful")
    assert code == 2
    assert "unknown op 'decay_ful'" in err and "'decay_full'" in err


def test_unknown_dtype_is_an_error(capsys):
    code, err = cli_error(capsys, "bench", "--quick", "--dtype", "fp8")
    assert code == 2 and "unknown dtype 'fp8'" in err


@pytest.mark.parametrize("cmd", [["summary", "hifuse_tny"], ["bench", "--model", "hifuse_tny"]])
def test_unknown_model_suggests_close_names(capsys, cmd):
    code, err = cli_error(capsys, *cmd)
    assert code == 2
    assert "unknown model 'hifuse_tny'" in err and "hifuse_tiny" in err


@pytest.mark.parametrize("cmd,want", [
    (["summary", "hemf", "--image-size", "16"], "summary hemf at 16x16, batch 1: Expected more than 1 value per "
                                                "channel when training"),
    (["summary", "hatr_conv2d", "--image-size", "16"], "summary hatr_conv2d at 16x16, batch 1: hatr_conv2d: expected "
                                                       "an image of at least 31x31"),
])
def test_summary_of_a_size_the_model_cannot_take_is_one_line(capsys, cmd, want):
    code, err = cli_error(capsys, *cmd)
    assert code == 2 and want in err and "Traceback" not in err
    if "value per channel" in want:
        assert "use --batch-size 2 or a larger --image-size" in err


def test_bench_on_missing_cuda_is_an_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, err = cli_error(capsys, "bench", "--quick", "--device", "cuda")
    assert code == 2 and "no CUDA device" in err


def test_subcommands_from_other_modules_register(tmp_path, monkeypatch, capsys):
    (tmp_path / "fb_extra_cmds.py").write_text(
        "def add_cli_commands(sub):\n"
        "    p = sub.add_parser('hello')\n"
        "    p.add_argument('--name', default='world')\n"
        "    p.set_defaults(func=lambda args: print('hello', args.name) or 0)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "COMMAND_MODULES", cli.COMMAND_MODULES + ("fb_extra_cmds", "fb_absent_module"))
    code, out, _ = run_cli(capsys, "hello", "--name", "cli")
    assert code == 0 and out.strip() == "hello cli"


# ------------------------------------------------------------------------------------------------ info


def test_info_json_lists_every_backend_with_reasons(capsys):
    code, out, _ = run_cli(capsys, "info", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["torch"] == torch.__version__
    assert info["fusionblocks"] == fusionblocks.__version__
    assert isinstance(info["extension"]["built"], bool)
    assert info["models"] == MODELS
    assert set(info["ops"]) == set(OPS_IN_INFO)
    for label, op in info["ops"].items():
        assert set(op["backends"]) == set(BACKENDS), label
        for name, b in op["backends"].items():
            assert b["available"] == (not b["reasons"]), (label, name)
            assert all(isinstance(r, str) and r for r in b["reasons"])
        assert op["backends"]["reference"]["available"]
        assert op["auto"] in op["backends"] and op["backends"][op["auto"]]["available"]
        assert op["choice"]["how"] in ("only candidate", "measured", "cached", "rule") and op["choice"]["why"]
        if op["choice"]["how"] in ("measured", "cached"):
            assert "reference" in op["choice"]["times_ms"]
    assert info["autotune"]["mode"] == "on" and info["autotune"]["cache"].endswith(".json")


def test_info_clear_cache(capsys, tmp_path, monkeypatch):
    from fusionblocks.ops import autotune

    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setattr(autotune, "_memo", {})
    monkeypatch.setattr(autotune, "_disk", None)
    (tmp_path / "dispatch-0123.json").write_text("{}")
    code, out, err = run_cli(capsys, "info", "--clear-cache")
    assert code == 0 and "cleared 1 cache file(s)" in err and "why: " in out
    assert "dispatch-0123.json" not in os.listdir(tmp_path)


def test_info_clear_cache_says_what_it_could_not_remove(capsys, tmp_path, monkeypatch):
    # a cache file that could not be removed was passed over: "cleared 0", and its answers were used again
    from fusionblocks.ops import autotune

    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setattr(autotune, "_memo", {})
    monkeypatch.setattr(autotune, "_disk", None)
    (tmp_path / "dispatch-0123.json").mkdir()  # os.remove fails on it, as on a file of another user
    (tmp_path / "dispatch-4567.json").write_text("{}")
    code, err = cli_error(capsys, "info", "--clear-cache")
    assert code == 2 and "could not remove 1 cache file(s)" in err and "dispatch-0123.json" in err
    assert "removed 1" in err and os.listdir(tmp_path) == ["dispatch-0123.json"]


def test_info_text(capsys):
    code, out, _ = run_cli(capsys, "info")
    assert code == 0
    assert f"torch    {torch.__version__}" in out
    for label in OPS_IN_INFO:
        assert label in out
    assert "reference  can run" in out


# ------------------------------------------------------------------------------------------------ summary


def test_flops_and_activations_of_a_known_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    flops = count_flops(net, x)
    assert flops["0"] == 2 * 3 * 8 * 16 and flops["2"] == 2 * 3 * 16 * 4 and flops["1"] == 0
    assert flops["total"] == 2 * 3 * 8 * 16 + 2 * 3 * 16 * 4
    act = activation_bytes(net, x)
    # Linear 0 saves its input (3x8 fp32); ReLU saves its output (3x16), which Linear 2 saves again (counted once);
    # weights are parameters, not activations
    assert act == {"0": 3 * 8 * 4, "1": 3 * 16 * 4, "2": 0, "(top level)": 0}
    assert all(p.grad is None for p in net.parameters())


def test_summary_of_a_module_adds_up():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    net[0].weight.requires_grad_(False)
    s = summarize(net, (12, 10), 2)
    assert s.params_total == sum(p.numel() for p in net.parameters())
    assert s.params_trainable == s.params_total - net[0].weight.numel()
    assert s.params_official_unused is None
    assert s.flops == 2 * (2 * 12 * 10) * (8 * 3 * 9 + 4 * 8) and s.macs == s.flops // 2
    assert s.flops == sum(st.flops for st in s.stages)
    assert s.activation_bytes == sum(st.activation_bytes for st in s.stages) > 0


def test_models_are_listed():
    assert MODELS == fusionblocks.list_models() and MODELS


@pytest.mark.parametrize("name", MODELS)
def test_summary_of_every_registered_model(capsys, one_thread, name):
    code, out, _ = run_cli(capsys, "summary", name, "--image-size", "64", "--json")
    assert code == 0
    s = json.loads(out)
    model = fusionblocks.create_model(name, num_classes=7)
    assert s["params_total"] == sum(p.numel() for p in model.parameters())
    assert 0 < s["params_trainable"] <= s["params_total"]
    assert s["image_size"] == [64, 64] and s["batch_size"] == 1
    assert s["flops"] > 0 and s["macs"] == s["flops"] // 2
    assert sum(st["flops"] for st in s["stages"]) == s["flops"]
    assert sum(st["activation_bytes"] for st in s["stages"]) == s["activation_bytes"] > 0
    if name in ("hifuse_tiny", "hifuse_small", "hifuse_base", "hemf"):
        assert s["params_official_unused"] is not None and s["params_official_unused"] >= 0


# ------------------------------------------------------------------------------------------------ bench


def test_bench_out_without_jsonschema_fails_before_running(capsys, monkeypatch, tmp_path):
    """--out is checked with jsonschema when written: without it (the GPU image) the run must not start."""
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # `import jsonschema` raises ImportError
    ran = []
    monkeypatch.setattr(bench, "run", lambda *a, **k: ran.append(a) or bench.BenchResult([], []))
    code, err = cli_error(capsys, "bench", "--quick", "--no-progress", "--out", str(tmp_path / "r.json"))
    assert code == 2 and "jsonschema" in err
    assert ran == [] and not list(tmp_path.iterdir())


def test_bench_quick_writes_records_matching_the_schema(capsys, one_thread, tmp_path):
    pytest.importorskip("jsonschema")  # bench.validate_records checks with it
    out_json = tmp_path / "quick.json"
    argv = ["bench", "--quick", "--no-progress", "--out", str(out_json)]
    try:
        import matplotlib  # noqa: F401

        argv += ["--plot", str(tmp_path / "quick.png")]
    except ImportError:
        pass
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    records = json.loads(out_json.read_text())
    bench.validate_records(records)
    assert {r["op"] for r in records} == set(bench.OPS)
    for op in ("decay_attention_full", "decay_attention_decomposed", "window_attention"):
        for impl in ("reference", "sdpa"):
            assert {r["pass"] for r in records if r["op"] == op and r["impl"] == impl} == {"fwd", "fwd+bwd"}
    assert all(r["device"].startswith("CPU") for r in records) or torch.cuda.is_available()
    assert all(r["peak_mem_mb"] is None or r["peak_mem_mb"] > 0 for r in records)
    assert "vs reference" in out and "1.00x" in out
    assert (tmp_path / "quick.md").read_text().count("\n|") >= len(records)
    if "--plot" in argv:
        assert (tmp_path / "quick.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_model_one_step(capsys, one_thread, tmp_path):
    names = fusionblocks.list_models()
    name = "hatr_conv2d" if "hatr_conv2d" in names else names[0]
    out_json = tmp_path / "model.json"
    code, out, _ = run_cli(capsys, "bench", "--model", name, "--batch-size", "2", "--image-size", "64", "--steps", "1",
                           "--no-progress", "--out", str(out_json))
    assert code == 0
    records = json.loads(out_json.read_text())
    bench.validate_records(records)
    assert records and all(r["op"] == "model" for r in records)
    assert {r["pass"] for r in records} == {"fwd", "train"}
    for r in records:
        assert r["shape"] == {"model": name, "B": 2, "image_size": 64}
        assert r["img_per_s"] == pytest.approx(2 / (r["ms"] / 1e3))
    assert "img/s" in out


def test_bench_model_per_backend_choice_and_threads(capsys, tmp_path):
    """hemf dispatches decay attention: reference, the fast backends that run here and auto, side by side,
    inference and a training step, at 1 and 2 threads; auto's record names what it ran on."""
    out_json = tmp_path / "hemf.json"
    code, out, _ = run_cli(capsys, "bench", "--model", "hemf", "--batch-size", "2", "--image-size", "32", "--steps", "1",
                           "--threads", "1", "2", "--no-progress", "--out", str(out_json))
    assert code == 0
    records = json.loads(out_json.read_text())
    bench.validate_records(records)
    impls = {r["impl"] for r in records}
    assert {"reference", "auto"} <= impls and "triton" not in impls
    for nt in (1, 2):
        for p in ("fwd", "train"):
            got = {r["impl"] for r in records if r["threads"] == nt and r["pass"] == p}
            assert got == impls, (nt, p, got)
    auto = [r for r in records if r["impl"] == "auto"]
    assert all(r["chosen"].startswith("decay_attention: ") for r in auto)
    assert "threads=2" in out and "auto -> decay_attention" in out
    code, err = cli_error(capsys, "bench", "--model", "hemf", "--pass", "fwd+bwd")
    assert code == 2 and "passes are fwd (inference) and train" in err


def test_bench_model_backend_failing_with_an_error_of_its_own_is_skipped(monkeypatch, one_thread):
    """Triton's kernel errors (CompilationError, OutOfResources) are plain Exceptions: a backend failing so is reported
    as skipped with its error, and the other backends' records stay (the GPU run's models stage needs them)."""
    import dataclasses

    from fusionblocks.ops import dispatch

    class KernelError(Exception):
        pass

    def fails(*args, **kwargs):
        raise KernelError("out of resource: shared memory (simulated)")

    fast = dispatch.backends_for("decay_attention")["cpp"]
    monkeypatch.setitem(dispatch._REGISTRY["decay_attention"], "cpp",
                        dataclasses.replace(fast, fn=fails, check=lambda *a, **k: []))
    res = bench.run_model("hemf", batch_size=2, image_size=32, steps=1, backends=["reference", "cpp"], device="cpu",
                          progress=False)
    assert [(r["impl"], r["pass"]) for r in res.records] == [("reference", "train")]
    reason = "KernelError: out of resource: shared memory (simulated)"
    assert [(s.impl, s.reason) for s in res.skipped] == [("cpp", reason)]


def test_validate_records_rejects_bad_records():
    pytest.importorskip("jsonschema")  # bench.validate_records checks with it
    good = bench.make_record("window_attention", "sdpa", {"B": 1}, torch.float32, "fwd", 1.5, 2.0, "CPU x")
    failed = bench.make_record("window_attention", "flex", {"B": 1}, torch.float32, "fwd+bwd", None, None, "CPU x",
                               error="NotImplementedError: no backward on CPU")
    assert failed["ms"] is None and failed["peak_mem_mb"] is None and failed["error"].startswith("NotImpl")
    bench.validate_records([good, failed, {**good, "triton": None, "max_abs_err": 0.0, "tflops": 1.0}])
    for bad, name in [  # the error names the record and the offending field
        ({k: v for k, v in good.items() if k != "ms"}, "'ms' is a required property"),
        ({**good, "ms": -1.0}, "field ms"),
        ({**good, "pass": "bwd"}, "field pass"),
        ({**good, "shape": "B=1"}, "field shape"),
        ({**good, "dtype": "int8"}, "field dtype"),
        ({**good, "ms": None}, "field ms"),  # null without an error
        ({**failed, "ms": 1.0}, "field ms"),  # an error with a measurement
        ({**failed, "peak_mem_mb": 3.0}, "field peak_mem_mb"),
        ({**failed, "error": ""}, "field error"),
        ({**good, "max_err": 0.1}, "'max_err' was unexpected"),
        ({**good, "triton": "absent", "hbm_share": -0.5}, "field hbm_share"),
        ({**good, "threads": 0}, "field threads"),
    ]:
        with pytest.raises(ValueError, match=r"^bench record 1\b") as e:
            bench.validate_records([good, bad])
        assert name in str(e.value), (name, str(e.value))


def test_failed_runs_are_error_records_and_tables_show_them():
    def boom(x):
        raise RuntimeError("kernel exploded\nsecond line")

    def impls(shape, x, device, smoke=False):
        return [bench.Impl("reference", lambda x: x["q"] * 2), bench.Impl("broken", boom),
                bench.Impl("absent", boom, ["not built here"])]

    op = bench.OpBench("toy", (), lambda quick: [dict(B=1, D=4)], lambda s, d, t: {"q": torch.ones(2, 4, requires_grad=True)},
                       impls, grad_keys=("q",), spec=lambda x: x["q"] * 2)
    res = bench.run_case(op, dict(B=1, D=4), torch.float32, "cpu", budget_s=0.01, check=True)
    bench.validate_records(res.records)
    assert [(r["impl"], r["pass"]) for r in res.records] == [("reference", "fwd"), ("reference", "fwd+bwd"),
                                                              ("broken", "fwd"), ("broken", "fwd+bwd")]
    ok, _, broken, _ = res.records
    assert ok["ms"] > 0 and ok["max_abs_err"] == 0.0
    assert broken["ms"] is None and broken["error"] == "RuntimeError: kernel exploded"
    assert [(s.impl, s.reason) for s in res.skipped] == [("absent", "not built here")]
    table = bench.format_table(res.records)
    assert "RuntimeError: kernel exploded" in table and "n/a" in table
    assert bench.speedups(res.records)[id(broken)] is None
    md = bench.format_markdown(res.records, res.skipped_summary(), extra_columns=[("err", "max_abs_err")])
    assert "| error |" in md and "- `toy` absent: not built here" in md
    pivot = bench.format_pivot(res.records, "broken")
    assert "| broken ms | reference ms | broken vs reference |" in pivot and "n/a" in pivot


def test_interleaved_timing_takes_turns_and_reports_failures():
    calls = []
    x = torch.ones(3, requires_grad=True)

    def fast():
        assert x.grad is None  # gradients are reset before every call
        calls.append("fast")
        time.sleep(0.002)
        x.sum().backward()

    def slow():
        calls.append("slow")
        time.sleep(0.006)

    def broken():
        raise RuntimeError("no kernel")

    got = bench.time_interleaved_ms({"fast": fast, "slow": slow, "broken": broken}, grads=[x], budget_s=0.05,
                                    rounds=3)
    assert isinstance(got["broken"], RuntimeError)
    assert 1.5 < got["slow"] / got["fast"] < 10, got
    timed = calls[4:]  # after each one's warm-up and sizing call
    runs = [c for i, c in enumerate(timed) if i == 0 or timed[i - 1] != c]
    # rounds (fast, slow), (slow, fast), (fast, slow): blocks of consecutive calls, the order rotating
    assert runs == ["fast", "slow", "fast", "slow"], runs
    assert x.grad is None


def test_a_failed_contender_frees_what_it_allocated_before_the_others_run():
    # after an out-of-memory error, the failed call's frames (kept alive by a stored traceback) would hold the part
    # of the work it did allocate while the other contenders are timed, and push them out of memory too
    held = []

    def broken():
        scratch = torch.ones(64)
        held.append(weakref.ref(scratch))
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise RuntimeError("out of memory") from inner

    def after():
        assert all(r() is None for r in held), "the failed call's tensors are still alive"

    got = bench.time_interleaved_ms({"broken": broken, "after": after}, budget_s=0.01, rounds=2)
    assert isinstance(got["broken"], RuntimeError) and isinstance(got["after"], float)
    assert str(got["broken"]) == "out of memory" and isinstance(got["broken"].__cause__, KeyError)
    assert got["broken"].__traceback__ is None and got["broken"].__cause__.__traceback__ is None
    assert held and all(r() is None for r in held)


def test_timing_and_memory_helpers():
    x = torch.randn(256, 256)
    assert bench.time_ms(lambda: x @ x, torch.device("cpu"), budget_s=0.01) > 0
    mem = bench.peak_mem_mb(lambda: torch.empty(1024, 1024), torch.device("cpu"), [x])
    if mem is None:
        pytest.skip("torch.profiler reports no allocations on this torch")
    # 4 MiB allocated by the call + the 256 KiB input (a view of it counted once); other tensors alive are not counted
    unrelated = torch.ones(2048, 2048)
    assert bench.peak_mem_mb(lambda: torch.empty(1024, 1024), "cpu", [x, x[0]]) == pytest.approx(4.25, abs=0.01)
    del unrelated


# ------------------------------------------------------------------------------------------------ anchors


def _qkv(b, nh, n, d):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, nh, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("mode, hw", [("full", (5, 7)), ("decomposed", (5, 7)), ("decomposed", (6, 3))])
def test_decay_anchors_compute_the_reference(mode, hw):
    q, k, v = _qkv(2, 3, hw[0] * hw[1], 8)
    lg = bench._log_gamma(3, "cpu").double()
    want = ref.decay_attention(q, k, v, lg, hw=hw, mode=mode)
    torch.testing.assert_close(bench.decay_sdpa(q, k, v, lg, hw=hw, mode=mode), want, rtol=1e-10, atol=1e-12)
    got = bench.decay_flex(q, k, v, lg, hw=hw, mode=mode, compiled=False)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("ws, shift, hw", [(7, 3, (14, 21)), (4, 0, (8, 8)), (7, 3, (7, 7)), (3, 1, (6, 9))])
def test_window_anchors_compute_the_reference(ws, shift, hw):
    q, k, v = _qkv(2, 3, hw[0] * hw[1], 8)
    table = torch.randn((2 * ws - 1) ** 2, 3, dtype=torch.float64)
    want = ref.window_attention(q, k, v, table, hw=hw, window_size=ws, shift=shift)
    got = bench.window_sdpa(q, k, v, table, hw=hw, window_size=ws, shift=shift)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got = bench.window_flex(q, k, v, table, hw=hw, window_size=ws, shift=shift, compiled=False)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_summary_stages_count_what_runs_in_them_when_the_model_calls_their_parts():
    """A model that iterates a Sequential stage or calls a method of a stage (HATR's ``for block in
    self.blocks``, ``self.backbone.forward_intermediates``, HEMF's branches) must not move that stage's FLOPs
    and activations to '(top level)'."""
    import torch.nn as nn

    from fusionblocks.summary import TOP, summarize

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def features(self, x):
            return self.conv(x).relu()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Backbone()
            self.blocks = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            x = self.backbone.features(x).mean((2, 3))
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    s = summarize(Net(), 8)
    flops = {st.name: st.flops for st in s.stages}
    acts = {st.name: st.activation_bytes for st in s.stages}
    assert flops["backbone"] == 2 * 8 * 3 * 9 * 64 and flops["blocks"] == 2 * 2 * 8 * 8 and flops["head"] == 2 * 8 * 2
    assert flops.get(TOP, 0) == 0 and sum(flops.values()) == s.flops
    assert acts["backbone"] > 0 and acts["blocks"] > 0


@pytest.mark.parametrize("env, value, match", [
    ("FUSIONBLOCKS_BACKEND", "bogus", "FUSIONBLOCKS_BACKEND='bogus': expected one of"),
    ("FUSIONBLOCKS_AUTOTUNE", "sometimes", "FUSIONBLOCKS_AUTOTUNE='sometimes': expected one of"),
    pytest.param("FUSIONBLOCKS_CPU_ISA", "neon9", "fusionblocks cpp kernels: FUSIONBLOCKS_CPU_ISA=neon9 is not a CPU "
                 "ISA variant", marks=pytest.mark.skipif(not cpp.available(), reason="the extension is not built")),
])
def test_info_reports_an_invalid_environment_in_one_line(capsys, monkeypatch, env, value, match):
    monkeypatch.setenv(env, value)
    code, err = cli_error(capsys, "info")
    assert code == 2 and f"fusionblocks info: error: {match}" in err and "Traceback" not in err


@pytest.mark.parametrize("command", [("info",), ("summary", "hemf"), ("bench", "--quick")])
def test_a_device_a_command_cannot_use_is_one_line_before_anything_runs(capsys, monkeypatch, command):
    """info, summary and bench share train/evaluate/predict's --device check (fusionblocks._device.resolve_device):
    a string that is not a device, or CUDA where there is none, is one line naming the option, no traceback."""
    name = command[0]
    code, err = cli_error(capsys, *command, "--device", "gpu0")
    assert code == 2 and f"fusionblocks {name}: error: --device 'gpu0' is not a device: expected cpu, cuda" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = cli_error(capsys, *command, "--device", "cuda")
    assert code == 2 and f"fusionblocks {name}: error: --device cuda: no CUDA device here" in err
    assert "Traceback" not in err
