"""Crash consistency, resume checks, run-folder protection and damaged checkpoints."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusionblocks.training import checkpoint as C
from fusionblocks.training import engine as E

TIMING = ("seconds",)


def _cfg(out, model, **kw):
    base = dict(model=model, data="synthetic", out=str(out), epochs=3, batch_size=4, image_size=16, lr=1e-2,
                synthetic_samples=12, progress=False, log=False, tensorboard=False, plots=False, seed=1)
    base.update(kw)
    return E.TrainConfig(**base)


def _comparable(metrics):
    """metrics.json without wall-clock times and file sizes (the temporary's name length enters the zip)."""
    m = json.loads(json.dumps(metrics))
    for e in m["epochs"]:
        for k in TIMING:
            e.pop(k)
    m.pop("checkpoints")
    m["config"].pop("out")
    return m


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


_STRAIGHT = {}


@pytest.fixture
def straight(tmp_path_factory, tiny_model):
    """The uninterrupted run, trained once per module."""
    if not _STRAIGHT:
        out = tmp_path_factory.mktemp("straight") / "run"
        _STRAIGHT["run"] = out, E.train(_cfg(out, tiny_model))
    return _STRAIGHT["run"]


# every point of the end-of-epoch sequence: in the epoch that wrote the final best.pt, in a middle epoch and in
# the last one (the case: last.pt written, best.pt/metrics.json not yet), and before the final metrics
POINTS = ["before_best@2", "best.pt:written@{best}", "after_best@{best}", "last.pt:written@3", "after_last@3",
          "metrics.json:written@3", "after_outputs@2", "before_final_metrics", "last.pt:written@1"]
WITH_PLOTS = ("after_last@3", "after_outputs@2")  # plots cost most of a run's time here: checked at two points


@pytest.mark.parametrize("point", POINTS)
def test_a_crash_anywhere_resumes_to_the_uninterrupted_result(tmp_path, tiny_model, straight, monkeypatch, point):
    ref_out, ref = straight
    out = tmp_path / "run"
    plots = point in WITH_PLOTS
    point = point.format(best=ref["best_epoch"])
    monkeypatch.setenv(C.CRASH_ENV, point)
    with pytest.raises(C.SimulatedCrash):
        E.train(_cfg(out, tiny_model, plots=plots, tensorboard=plots))
    monkeypatch.delenv(C.CRASH_ENV)
    assert not list(out.glob(".*.tmp*"))  # a failed write removes its temporary
    # a kill before the first epoch is committed leaves nothing to resume: --resume auto starts again
    resumed = E.train(_cfg(out, tiny_model, plots=plots, tensorboard=plots,
                           resume="auto" if point.endswith("@1") else True))
    assert _comparable(resumed) == _comparable(ref)
    assert _comparable(json.loads((out / "metrics.json").read_text())) == _comparable(ref)
    for f in ("best.pt", "last.pt"):
        assert _same_weights(_weights(out / f), _weights(ref_out / f)), f
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == ref["best_epoch"]
    for f in ("curves.png", "confusion_matrix.png", "roc.png", "test_confusion_matrix.png", "test_roc.png"):
        assert (out / f).is_file() == plots, f
    if plots and importlib.util.find_spec("tensorboard") is not None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(out / "tensorboard"))
        acc.Reload()
        assert [e.step for e in acc.Scalars("val/accuracy")] == [1, 2, 3]  # each epoch once, none lost


_KILLED_RUN = """
import sys
sys.path.insert(0, {conftest!r})
from conftest import TinyNet
from fusionblocks.models import registry
from fusionblocks.training import engine as E
registry._load()
def tiny_test_net(num_classes=2, **kw):
    return TinyNet(num_classes, **kw)
registry.register_model(tiny_test_net)
E.train(E.TrainConfig(model="tiny_test_net", data="synthetic", out={out!r}, epochs=3, batch_size=4, image_size=16,
                      synthetic_samples=12, progress=False, log=False, tensorboard=False, seed=1, lr=1e-2, plots=False))
"""


def test_a_killed_write_leaves_a_temporary_that_the_next_run_removes(tmp_path, tiny_model, straight):
    ref_out, ref = straight
    out = tmp_path / "run"
    script = _KILLED_RUN.format(conftest=str(Path(__file__).parent), out=str(out))
    env = {**os.environ, C.CRASH_ENV: "last.pt:written@2", "FUSIONBLOCKS_TEST_CRASH_MODE": "exit",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 86, r.stderr[-2000:]
    left = list(out.glob(".last.pt.tmp*"))
    assert len(left) == 1  # os._exit: nothing cleaned up, as after a kill
    resumed = E.train(_cfg(out, tiny_model, resume=True, plots=False))
    assert not left[0].exists()  # its process is gone: removed
    assert _comparable(resumed) == _comparable(ref)
    assert _same_weights(_weights(out / "last.pt"), _weights(ref_out / "last.pt"))


def test_temporaries_of_live_processes_are_kept(tmp_path):
    mine = tmp_path / f".last.pt.tmp{os.getpid()}"
    mine.write_bytes(b"x")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".best.pt.tmp{int(dead.stdout)}"
    stale.write_bytes(b"x")
    assert C.remove_stale_temporaries(tmp_path) == [stale]
    assert mine.exists() and not stale.exists()


def test_resume_refuses_every_result_changing_setting(tmp_path, tiny_model):
    out = tmp_path / "run"
    E.train(_cfg(out, tiny_model, epochs=1))
    changed = dict(image_size=24, lr=0.02, batch_size=2, in_chans=1, recipe="hatr", augment="none", epochs=2, seed=6,
                   class_weights="balanced")
    with pytest.raises(ValueError) as e:
        E.train(_cfg(out, tiny_model, resume=True, **changed))
    msg = str(e.value)
    for line in ("--image-size: 16 in the saved run, 24 now", "--lr: 0.01 in the saved run, 0.02 now",
                 "--batch-size: 4 in the saved run, 2 now", "--in-chans: 3 in the saved run, 1 now",
                 "--recipe: 'hifuse' in the saved run, 'hatr' now", "--augment: 'recipe' in the saved run, 'none' now",
                 "--epochs: 1 in the saved run, 2 now", "--seed: 1 in the saved run, 6 now",
                 "--class-weights: recipe (weights None) in the saved run, balanced (weights [1.0, 1.0]) now"):
        assert line in msg, line
    saved = torch.load(out / "last.pt", weights_only=True)["config"]
    assert saved["image_size"] == 16 and saved["lr"] == 1e-2  # nothing was changed on disk
    E.train(_cfg(out, tiny_model, epochs=1, resume=True, num_workers=0, grad_checkpointing=False))  # same settings: fine


def test_resume_with_nothing_to_resume(tmp_path, tiny_model):
    with pytest.raises(ValueError, match=r"nothing to resume: .*run does not exist.*--resume auto"):
        E.train(_cfg(tmp_path / "run", tiny_model, resume=True))
    result = E.train(_cfg(tmp_path / "run", tiny_model, epochs=1, resume="auto"))
    assert len(result["epochs"]) == 1


def test_out_with_another_run_is_refused_unless_overwrite(tmp_path, tiny_model):
    out = tmp_path / "run"
    E.train(_cfg(out, tiny_model, epochs=1))
    (out / "gradcam").mkdir()
    (out / "gradcam" / "gradcam_000_x.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"already holds a run of another configuration:\n  --image-size: 16 in the saved run, 24 now"):
        E.train(_cfg(out, tiny_model, epochs=1, image_size=24))
    with pytest.raises(ValueError, match="already holds a run of this configuration: pass --resume"):
        E.train(_cfg(out, tiny_model, epochs=1))
    E.train(_cfg(out, tiny_model, epochs=1, image_size=24, overwrite=True))
    assert json.loads((out / "metrics.json").read_text())["config"]["image_size"] == 24
    assert not (out / "gradcam").exists()  # the old run's plots are gone
    assert (out / "notes.txt").read_text() == "mine"  # files the run did not write are left alone


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "foreign"])
def test_damaged_checkpoints_name_the_path_and_the_alternative(tmp_path, tiny_model, damage):
    out = tmp_path / "run"
    E.train(_cfg(out, tiny_model, epochs=1))
    for name in ("best.pt", "last.pt"):
        p = out / name
        if damage == "empty":
            p.write_bytes(b"")
        elif damage == "truncated":
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        elif damage == "garbage":
            p.write_bytes(os.urandom(300))
        else:
            torch.save({"weights": torch.zeros(2)}, p)
    with pytest.raises(C.CheckpointError) as e:
        C.load_inference(out / "best.pt")
    assert str(out / "best.pt") in str(e.value) and f"use {out / 'last.pt'}" in str(e.value)
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(C.CheckpointError) as e:
        E.train(_cfg(out, tiny_model, epochs=1, resume=True))
    assert str(out / "last.pt") in str(e.value) and "--overwrite" in str(e.value)


def test_load_inference_rebuilds_the_model(tmp_path, tiny_model, image_tree):
    out = tmp_path / "run"
    E.train(_cfg(out, tiny_model, data=str(image_tree), in_chans=1, epochs=1))
    ck = C.load_inference(out / "best.pt")
    assert ck.classes == ["normal", "pneumonia"] and ck.epoch == 1 and not ck.model.training
    assert ck.preprocessing["in_chans"] == 1 and ck.preprocessing["image_size"] == 16
    x = ck.load_image(image_tree / "test" / "normal" / "0.png")
    assert x.shape == (1, 16, 16)
    with torch.no_grad():
        assert ck.model(x[None]).shape == (1, 2)
