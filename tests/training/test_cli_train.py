"""``fusionblocks train`` / ``fusionblocks evaluate`` through the CLI entry point."""
import json

import pytest

from fusionblocks.cli import main


def test_train_then_evaluate_on_an_image_folder(tmp_path, tiny_model, image_tree, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--model", tiny_model, "--data", str(image_tree), "--epochs", "2", "--batch-size", "4",
               "--image-size", "32", "--out", str(out), "--recipe", "hatr", "--in-chans", "1", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"trained {tiny_model} for 2 epochs on 2 classes" in text and "test (best checkpoint, epoch" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 2 and metrics["classes"] == ["normal", "pneumonia"]
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file() and (out / "curves.png").is_file()

    rc = main(["evaluate", "--checkpoint", str(out / "best.pt"), "--data", str(image_tree), "--out", str(tmp_path / "ev"),
               "--gradcam", "1", "--json", "--no-progress"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    assert m["num_samples"] == 6 and len(m["gradcam"]) == 1
    assert {"accuracy", "precision_macro", "recall_macro", "f1_macro", "auc", "mcc", "kappa", "per_class"} <= set(m)


def test_train_resume_flag(tmp_path, tiny_model, capsys):
    args = ["train", "--model", tiny_model, "--data", "synthetic", "--batch-size", "8", "--image-size", "32",
            "--out", str(tmp_path / "r"), "--synthetic-samples", "16", "--no-progress", "--epochs", "2"]
    with pytest.raises(SystemExit) as e:
        main(args + ["--resume"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "--resume auto" in err
    assert main(args + ["--resume", "auto"]) == 0  # nothing there: starts fresh
    assert [e["epoch"] for e in json.loads((tmp_path / "r" / "metrics.json").read_text())["epochs"]] == [1, 2]
    assert main(args + ["--resume"]) == 0  # a finished run resumes to its final state
    assert [e["epoch"] for e in json.loads((tmp_path / "r" / "metrics.json").read_text())["epochs"]] == [1, 2]
    capsys.readouterr()
    with pytest.raises(SystemExit):  # the same run again without --resume: refused, nothing overwritten
        main(args)
    assert "already holds a run of this configuration" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args + ["--resume", "--lr", "0.01", "--batch-size", "4"])
    err = capsys.readouterr().err
    assert "--lr: 0.0001 in the saved run, 0.01 now" in err and "--batch-size: 8 in the saved run, 4 now" in err
    assert main(args + ["--overwrite", "--epochs", "1"]) == 0
    assert len(json.loads((tmp_path / "r" / "metrics.json").read_text())["epochs"]) == 1


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--data", "/no/such/folder"], "data folder not found: /no/such/folder"),
        (["--data", "synthetic", "--recipe", "sgd"], "unknown recipe 'sgd'"),
        (["--data", "synthetic", "--model", "hifuse_tinny"], "unknown model 'hifuse_tinny'; did you mean 'hifuse_tiny'"),
        # 0 was taken as "not given" (the recipe's 20 epochs / batch 32), negatives crashed later with a traceback
        (["--data", "synthetic", "--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
        (["--data", "synthetic", "--batch-size", "0"], "argument --batch-size: expected a positive integer, got '0'"),
        (["--data", "synthetic", "--batch-size", "-2"], "argument --batch-size: expected a positive integer, got '-2'"),
        (["--data", "synthetic", "--image-size", "-5"], "argument --image-size: expected a positive integer"),
        (["--data", "synthetic", "--max-steps", "0"], "argument --max-steps: expected a positive integer, got '0'"),
        (["--data", "synthetic", "--synthetic-classes", "0"], "argument --synthetic-classes: expected a positive"),
        (["--data", "synthetic", "--workers", "-1"], "argument --workers: expected auto or a non-negative integer, got '-1'"),
        (["--data", "synthetic", "--val-fraction", "1.5"], "argument --val-fraction: expected a fraction in [0, 1)"),
    ],
)
def test_train_errors_exit_2_with_a_message(tmp_path, extra, match, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "x"), "--no-progress"] + extra)
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_empty_class_folder_is_named(tmp_path, tiny_model, image_tree, capsys):
    (image_tree / "train" / "covid").mkdir()
    with pytest.raises(SystemExit):
        main(["train", "--model", tiny_model, "--data", str(image_tree), "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert "empty class folder" in err and str(image_tree / "train" / "covid") in err


def test_bad_class_weights_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", "synthetic", "--out", str(tmp_path), "--class-weights", "heavy"])
    assert e.value.code == 2 and "comma-separated numbers" in capsys.readouterr().err


def test_negative_class_weights_are_refused(tmp_path, tiny_model, capsys):
    with pytest.raises(SystemExit) as e:  # the run trained, raising class a's loss
        main(["train", "--model", tiny_model, "--data", "synthetic", "--epochs", "1", "--image-size", "32",
              "--synthetic-samples", "16", "--class-weights=-1,1", "--out", str(tmp_path / "x"), "--no-progress"])
    assert e.value.code == 2 and "class weights: expected numbers > 0" in capsys.readouterr().err


def test_zero_epochs_or_batch_size_in_the_api_is_refused(tmp_path):
    from fusionblocks.training import engine as E

    for kw, msg in ((dict(epochs=0), "expected epochs >= 1, got 0"), (dict(batch_size=0), "expected batch_size >= 1")):
        cfg = E.TrainConfig(model="hatr_conv2d", data="synthetic", out=str(tmp_path / "x"), image_size=16,
                            synthetic_samples=4, progress=False, log=False, **kw)
        with pytest.raises(ValueError, match=msg):
            E.train(cfg)


def test_evaluate_prints_an_undefined_kappa_as_n_a(tmp_path, monkeypatch, capsys):
    import numpy as np

    from fusionblocks.training import engine
    from fusionblocks.training.metrics import classification_metrics

    def fake_evaluate(checkpoint, data, out, **kw):  # a split whose labels and predictions are all one class
        m = classification_metrics([1, 1], np.array([[0.3, 0.7], [0.2, 0.8]]), ["a", "b"])
        return m | {"epoch": 1, "split": "test"}

    monkeypatch.setattr(engine, "evaluate", fake_evaluate)
    assert main(["evaluate", "--checkpoint", "best.pt", "--data", "d", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "AUC n/a  MCC 0.0000  kappa n/a" in capsys.readouterr().out
