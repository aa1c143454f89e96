"""``train --init``: starting a run from a run's checkpoint, an official HiFuse/HEMF checkpoint or torchvision
ResNet-50 weights (fusionblocks.training.warmstart)."""
import pytest
import torch

from fusionblocks.models.registry import create_model
from fusionblocks.training import engine as E
from fusionblocks.training.checkpoint import CheckpointError
from fusionblocks.training.warmstart import apply_init, read_init

SMALL = {"embed_dim": 32, "vit_heads": 2, "vit_depth": 1}


def _cfg(tmp_path, name, **kw):
    base = dict(model="hatr_conv2d", data="synthetic", out=str(tmp_path / name), epochs=1, batch_size=8, image_size=32,
                synthetic_samples=24, progress=False, plots=False, tensorboard=False, seed=3, model_kwargs=SMALL)
    base.update(kw)
    return E.TrainConfig(**base)


def _started(path, config, classes, seed=0):
    torch.manual_seed(seed)
    model = create_model(config["model"], num_classes=len(classes), **config.get("model_kwargs", {}))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    record, content = read_init(path, config)
    said = apply_init(model, record, content, config, classes)
    return model.state_dict(), fresh, said


def test_a_run_starts_from_another_runs_weights(tmp_path, capsys):
    E.train(_cfg(tmp_path, "a"))
    best = tmp_path / "a" / "best.pt"
    saved = torch.load(best, weights_only=True)
    config = {"model": "hatr_conv2d", "model_kwargs": SMALL, "in_chans": 3}
    # the same classes: every weight, the classifier included
    got, _, said = _started(best, config, saved["classes"])
    assert all(torch.equal(got[k], saved["model"][k]) for k in got) and "every weight (" not in said
    # other classes: every weight but the classifier, which keeps the model's own initialisation
    got, fresh, said = _started(best, config, ["x", "y", "z"])
    head = [k for k in got if k.startswith("head.")]
    assert head and all(torch.equal(got[k], fresh[k]) for k in head)
    assert all(torch.equal(got[k], saved["model"][k]) for k in got if k not in head)
    assert "but the classifier" in said
    # through train(): said in the log, recorded in the config; --resume with other starting weights is refused
    capsys.readouterr()
    result = E.train(_cfg(tmp_path, "b", init=str(best), synthetic_classes=3))
    assert "started from" in capsys.readouterr().out
    assert result["config"]["init"]["kind"] == "fusionblocks run" and len(result["config"]["init"]["sha256"]) == 64
    other = tmp_path / "other.pt"
    other.write_bytes(best.read_bytes() + b"")  # the same weights under another path
    with pytest.raises(ValueError, match="--init: "):
        E.train(_cfg(tmp_path, "b", init=str(other), synthetic_classes=3, epochs=2, resume=True))
    with pytest.raises(ValueError, match="--init: None in the saved run"):
        E.train(_cfg(tmp_path, "a", init=str(best), epochs=2, resume=True))


def test_runs_of_another_model_or_other_arguments_are_refused(tmp_path):
    E.train(_cfg(tmp_path, "a"))
    best = tmp_path / "a" / "best.pt"
    with pytest.raises(CheckpointError, match="a fusionblocks run of hatr_conv2d; expected one of hemf"):
        read_init(best, {"model": "hemf"})
    with pytest.raises(CheckpointError, match="with model arguments"):
        _started(best, {"model": "hatr_conv2d", "model_kwargs": {**SMALL, "vit_depth": 2}, "in_chans": 3}, ["a", "b"])
    with pytest.raises(FileNotFoundError):
        read_init(tmp_path / "missing.pt", {"model": "hatr_conv2d"})
    # weights of the right model that do not fit (a damaged or hand-edited file): one short line, not torch's list
    bad = torch.load(best, weights_only=True)
    bad["model"]["cls_token"] = torch.zeros(1, 1, 7)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"weights do not fit: shape mismatches \(1\): cls_token \(1, 1, 7\)"):
        _started(tmp_path / "bad.pt", {"model": "hatr_conv2d", "model_kwargs": SMALL, "in_chans": 3}, bad["classes"])
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="hatr_conv2d starts only from one"):
        read_init(plain, {"model": "hatr_conv2d"})
    # refused before any image is decoded or any model is built
    with pytest.raises(CheckpointError, match="expected one of hifuse_tiny"):
        E.train(_cfg(tmp_path, "c", model="hifuse_tiny", model_kwargs={}, init=str(best)))
    assert not (tmp_path / "c").exists()


def test_an_official_checkpoint_starts_every_weight_but_the_classifier(tmp_path):
    from golden_utils import load, official_state_dict

    sd = official_state_dict(load("hifuse_tiny"))
    path = tmp_path / "official.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)  # wrapped, as saved under DataParallel
    official = create_model("hifuse_tiny", num_classes=sd["conv_head.weight"].shape[0])
    official.load_official_state_dict(sd)
    want = official.state_dict()
    got, fresh, said = _started(path, {"model": "hifuse_tiny", "in_chans": 3}, ["a", "b", "c"])
    head = [k for k in got if k.startswith("head.fc.")]
    assert head and all(torch.equal(got[k], fresh[k]) for k in head) and got["head.fc.weight"].shape[0] == 3
    assert all(torch.equal(got[k], want[k]) for k in got if k not in head)
    assert "official checkpoint" in said
    # gray input: the stems' RGB filters are summed, so a gray image replicated to RGB gives the same stem output
    got, _, said = _started(path, {"model": "hifuse_tiny", "in_chans": 1, "model_kwargs": {"in_chans": 1}}, ["a", "b"])
    for conv in ("local_branch.stem.0", "global_branch.stem.proj"):
        assert torch.equal(got[f"{conv}.weight"], want[f"{conv}.weight"].sum(1, keepdim=True)), conv
    assert "summed" in said
    del sd["conv_norm.weight"]
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="missing official keys .*conv_norm.weight"):
        _started(path, {"model": "hifuse_tiny", "in_chans": 3}, ["a", "b"])


def test_torchvision_resnet50_weights_start_hatr_resnet50s_backbone(tmp_path):
    donor = create_model("hatr_resnet50").backbone
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in donor.state_dict().items()}
    sd.update({"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)})
    path = tmp_path / "resnet50.pth"
    torch.save(sd, path)
    got, fresh, said = _started(path, {"model": "hatr_resnet50", "in_chans": 3}, ["a", "b"])
    for k, v in got.items():
        if k.startswith("backbone."):
            assert torch.equal(v, sd[k[len("backbone."):]]), k
        else:
            assert torch.equal(v, fresh[k]), k
    assert "in the backbone" in said


def test_the_init_option_of_the_command(tmp_path, capsys):
    from fusionblocks.cli import main

    E.train(_cfg(tmp_path, "a"))
    args = ["train", "--model", "hatr_conv2d", "--data", "synthetic", "--batch-size", "8", "--image-size", "32",
            "--synthetic-samples", "24", "--epochs", "1", "--no-progress", "--no-plots", "--no-tensorboard",
            "--max-steps", "1"]
    with pytest.raises(SystemExit) as e:
        main(args + ["--out", str(tmp_path / "b"), "--init", str(tmp_path / "missing.pt")])
    assert e.value.code == 2 and "checkpoint not found" in capsys.readouterr().err
    # the run's model arguments differ (the default size, not SMALL): said, not a state_dict traceback
    with pytest.raises(SystemExit) as e:
        main(args + ["--out", str(tmp_path / "c"), "--init", str(tmp_path / "a" / "best.pt")])
    assert e.value.code == 2 and "with model arguments" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before the run folder is made
