import json

import pytest
import torch

from fusionblocks.training import engine as E


def _cfg(tmp_path, model, **kw):
    base = dict(model=model, data="synthetic", out=str(tmp_path / "run"), epochs=2, batch_size=8, image_size=32,
                synthetic_samples=24, progress=False, seed=3)
    base.update(kw)
    return E.TrainConfig(**base)


def test_train_writes_metrics_checkpoints_and_plots(tmp_path, tiny_model):
    result = E.train(_cfg(tmp_path, tiny_model))
    out = tmp_path / "run"
    for name in ("metrics.json", "last.pt", "best.pt", "curves.png", "confusion_matrix.png", "roc.png",
                 "test_confusion_matrix.png", "test_roc.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == result
    assert [e["epoch"] for e in saved["epochs"]] == [1, 2]
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "auc", "mcc", "kappa", "per_class"):
        assert key in saved["epochs"][-1]["val"]
    assert saved["test"]["num_samples"] == 6
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "config", "classes", "rng", "history", "preprocessing"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["config"]["model"] == tiny_model and ckpt["kind"] == "resume"
    best = torch.load(out / "best.pt", weights_only=True)
    assert {"model", "config", "classes", "preprocessing", "epoch"} <= set(best)
    assert "optimizer" not in best and "rng" not in best  # inference needs none of it
    assert best["preprocessing"]["image_size"] == 32 and best["preprocessing"]["mean"] == [0.5]
    assert saved["checkpoints"]["best.pt"]["bytes"] == (out / "best.pt").stat().st_size
    assert saved["checkpoints"]["last.pt"]["bytes"] == (out / "last.pt").stat().st_size > saved["checkpoints"]["best.pt"]["bytes"]
    assert not list(out.glob(".*.tmp*"))  # atomic writes leave no temporaries


def test_resume_continues_exactly(tmp_path, tiny_model, monkeypatch):
    straight = E.train(_cfg(tmp_path / "a", tiny_model, epochs=3))

    calls = {"n": 0}
    real_plot = E.plots.plot_curves

    def crash_after_two_epochs(history, path):  # the run dies after epoch 2 was checkpointed
        real_plot(history, path)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(E.plots, "plot_curves", crash_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        E.train(_cfg(tmp_path / "b", tiny_model, epochs=3))
    monkeypatch.setattr(E.plots, "plot_curves", real_plot)
    resumed = E.train(_cfg(tmp_path / "b", tiny_model, epochs=3, resume=True))
    assert [e["train_loss"] for e in resumed["epochs"]] == [e["train_loss"] for e in straight["epochs"]]
    a = torch.load(tmp_path / "a" / "run" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_another_model(tmp_path, tiny_model):
    E.train(_cfg(tmp_path, tiny_model, epochs=1))
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    ckpt["config"]["model"] = "hifuse_tiny"
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    with pytest.raises(ValueError, match="--model: 'hifuse_tiny' in the saved run, 'tiny_test_net' now"):
        E.train(_cfg(tmp_path, tiny_model, epochs=2, resume=True))


def test_training_learns_the_synthetic_task(tmp_path, tiny_model):
    result = E.train(_cfg(tmp_path, tiny_model, epochs=6, synthetic_samples=64, lr=3e-3, recipe="hatr"))
    losses = [e["train_loss"] for e in result["epochs"]]
    assert losses[-1] < losses[0]


def test_evaluate_with_gradcam_on_image_folder(tmp_path, tiny_model, image_tree):
    E.train(_cfg(tmp_path, tiny_model, data=str(image_tree), recipe="hatr", epochs=1, in_chans=1))
    m = E.evaluate(tmp_path / "run" / "best.pt", str(image_tree), tmp_path / "eval", gradcam=2, progress=False)
    assert m["num_samples"] == 6
    assert len(m["gradcam"]) == 2 and all((tmp_path / "eval" / "gradcam").glob("*.png"))
    assert [p.rsplit("_", 1)[-1] for p in m["gradcam"]] == ["normal.png", "pneumonia.png"]  # spread over classes
    assert (tmp_path / "eval" / "metrics.json").is_file() and (tmp_path / "eval" / "roc.png").is_file()
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ckpt["config"]["class_weights_resolved"] == [3.0, 1.0]  # HATR's normal:pneumonia = 3:1


def test_gradcam_heatmap_range(tiny_model):
    from fusionblocks import create_model

    model = create_model(tiny_model, num_classes=2).eval()
    cam, cls = E.gradcam(model, torch.rand(3, 32, 32))
    assert cam.shape == (32, 32) and 0 <= cam.min() and cam.max() <= 1 and cls in (0, 1)


def test_evaluate_rejects_other_classes(tmp_path, tiny_model, image_tree):
    E.train(_cfg(tmp_path, tiny_model, epochs=1))
    with pytest.raises(ValueError, match=r"has classes \['normal', 'pneumonia'\], the checkpoint was trained on"):
        E.evaluate(tmp_path / "run" / "last.pt", str(image_tree), tmp_path / "eval", progress=False)


def test_missing_checkpoint():
    with pytest.raises(FileNotFoundError, match="checkpoint not found: /nope.pt"):
        E.load_checkpoint("/nope.pt")
