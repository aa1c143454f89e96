import importlib.util
import json
import os
import shutil

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
    if importlib.util.find_spec("tensorboard") is not None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(out / "tensorboard"))
        acc.Reload()
        assert [e.step for e in acc.Scalars("val/accuracy")] == [1, 2]
        assert {"train/loss", "val/loss", "val/f1_macro", "lr"} <= set(acc.Tags()["scalars"])


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


def test_resume_refuses_images_added_removed_or_relabelled_since(tmp_path, tiny_model, image_tree):
    import shutil

    cfg = dict(data=str(image_tree), recipe="hatr", in_chans=1, resume="auto")
    E.train(_cfg(tmp_path, tiny_model, epochs=2, **cfg))
    config = json.loads((tmp_path / "run" / "metrics.json").read_text())["config"]
    assert {k: config["data_files"][k] for k in ("train", "val", "test")} == {"train": 12, "val": 6, "test": 6}
    shutil.copy(image_tree / "train" / "normal" / "0.png", image_tree / "train" / "normal" / "new.png")
    with pytest.raises(ValueError, match=r"the images in --data: '12 train, 6 val, 6 test \(fingerprint \w+\)' in the "
                                         r"saved run, '13 train, 6 val, 6 test \(fingerprint \w+\)' now"):
        E.train(_cfg(tmp_path, tiny_model, epochs=2, **cfg))
    (image_tree / "train" / "normal" / "new.png").unlink()
    shutil.move(image_tree / "train" / "normal" / "5.png", image_tree / "train" / "pneumonia" / "moved.png")
    with pytest.raises(ValueError, match=r"the images in --data: '12 train, 6 val, 6 test \(fingerprint \w+\)' in the "
                                         r"saved run, '12 train, 6 val, 6 test \(fingerprint \w+\)' now"):
        E.train(_cfg(tmp_path, tiny_model, epochs=2, **cfg))  # the same counts, one image relabelled
    shutil.move(image_tree / "train" / "pneumonia" / "moved.png", image_tree / "train" / "normal" / "5.png")
    assert len(E.train(_cfg(tmp_path, tiny_model, epochs=2, **cfg))["epochs"]) == 2  # the same images: resumes (done)


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


def test_evaluate_loss_is_the_runs_own_weighted_loss(tmp_path, tiny_model, image_tree):
    # HATR's recipe weights the loss 3:1; evaluate reported the unweighted loss, which the run's own test loss is not
    result = E.train(_cfg(tmp_path, tiny_model, data=str(image_tree), recipe="hatr", epochs=1, in_chans=1))
    m = E.evaluate(tmp_path / "run" / "best.pt", str(image_tree), tmp_path / "eval", progress=False)
    assert m["split"] == "test" and m["num_samples"] == result["test"]["num_samples"]
    assert m["loss"] == pytest.approx(result["test"]["loss"], rel=1e-5)


def test_evaluate_on_synthetic_data_is_the_runs_test_set(tmp_path, tiny_model):
    result = E.train(_cfg(tmp_path, tiny_model, epochs=1, plots=False, tensorboard=False))
    m = E.evaluate(tmp_path / "run" / "best.pt", "synthetic", tmp_path / "eval", progress=False)
    assert m["split"] == "test" and m["num_samples"] == result["test"]["num_samples"]  # the split was "auto"
    assert m["accuracy"] == result["test"]["accuracy"]
    with pytest.raises(E.D.DataError, match="synthetic data has a test split only, got --split val"):
        E.evaluate(tmp_path / "run" / "best.pt", "synthetic", tmp_path / "eval", split="val", progress=False)


def test_gradcam_heatmap_range(tiny_model):
    from fusionblocks import create_model

    model = create_model(tiny_model, num_classes=2).eval()
    cam, cls = E.gradcam(model, torch.rand(3, 32, 32))
    assert cam.shape == (32, 32) and 0 <= cam.min() and cam.max() <= 1 and cls in (0, 1)


def test_evaluate_rejects_other_classes(tmp_path, tiny_model, image_tree):
    E.train(_cfg(tmp_path, tiny_model, epochs=1))
    with pytest.raises(ValueError, match=r"has classes \['normal', 'pneumonia'\], the checkpoint was trained on"):
        E.evaluate(tmp_path / "run" / "last.pt", str(image_tree), tmp_path / "eval", progress=False)


def test_evaluate_finds_the_seeded_splits_of_a_single_folder_again(tmp_path, tiny_model, image_tree):
    # ROOT/<class>/*, split by train with its seed: --split test evaluated the whole folder (training images
    # included) and called it the test split
    import shutil

    from fusionblocks.training import data as D

    flat = image_tree / "train"
    result = E.train(_cfg(tmp_path, tiny_model, data=str(flat), epochs=1, val_fraction=0.25, test_fraction=0.25))
    want = D.load_splits(flat, val_fraction=0.25, test_fraction=0.25, seed=3)
    ckpt, out = tmp_path / "run" / "best.pt", tmp_path / "eval"
    for split, n in (("test", len(want.test)), ("auto", len(want.test)), ("val", len(want.val)),
                     ("train", len(want.train)), ("all", 12)):
        m = E.evaluate(ckpt, str(flat), out, split=split, progress=False)
        assert m["num_samples"] == n and m["split"] == ("test" if split == "auto" else split), split
    assert len(want.test) == 4 and len(want.train) == 6
    m = E.evaluate(ckpt, str(flat), out, progress=False)
    assert m["split"] == "test" and m["loss"] == pytest.approx(result["test"]["loss"], rel=1e-5)
    other = shutil.copytree(flat, tmp_path / "other")  # not the folder the run trained on: auto takes all of it
    assert E.evaluate(ckpt, str(other), out, progress=False)["num_samples"] == 12


def test_evaluate_finds_the_validation_share_of_train_again_without_a_val_folder(tmp_path, tiny_model, image_tree):
    # train/ and test/ only: the run validated on a seeded share of train/; evaluate said "no val/ split", and its
    # train split held the validation images too
    shutil.rmtree(image_tree / "val")
    result = E.train(_cfg(tmp_path, tiny_model, data=str(image_tree), recipe="hatr", epochs=1, in_chans=1))
    val = result["epochs"][0]["val"]
    m = E.evaluate(tmp_path / "run" / "best.pt", str(image_tree), tmp_path / "eval", split="val", progress=False)
    assert (m["split"], m["num_samples"]) == ("val", val["num_samples"]) == ("val", 2)
    assert m["confusion_matrix"] == val["confusion_matrix"]
    assert m["loss"] == pytest.approx(result["epochs"][0]["val_loss"], rel=1e-5)
    m = E.evaluate(tmp_path / "run" / "best.pt", str(image_tree), tmp_path / "eval", split="train", progress=False)
    assert m["num_samples"] == result["epochs"][0]["train_samples"] == 10


def test_evaluate_split_all_takes_every_split_folder(tmp_path, tiny_model, image_tree):
    E.train(_cfg(tmp_path, tiny_model, data=str(image_tree), epochs=1))
    m = E.evaluate(tmp_path / "run" / "best.pt", str(image_tree), tmp_path / "eval", split="all", progress=False)
    assert m["split"] == "all" and m["num_samples"] == 24
    (image_tree / "val").rename(image_tree / "valid")
    with pytest.raises(ValueError, match=r"found valid/ \(next to train/, test/ they would be left out\)"):
        E.evaluate(tmp_path / "run" / "best.pt", str(image_tree), tmp_path / "eval", split="all", progress=False)


def test_missing_checkpoint():
    with pytest.raises(FileNotFoundError, match="checkpoint not found: /nope.pt"):
        E.load_checkpoint("/nope.pt")


def test_a_last_training_batch_of_one_is_dropped_and_evaluation_sees_every_sample(tmp_path, capsys):
    """A BatchNorm on a 1x1 map (HEMF's last stage at small sizes) cannot train on a batch of one."""
    import torch.nn as nn

    from fusionblocks.models import registry

    class PooledBN(nn.Module):
        def __init__(self, num_classes=2, in_chans=3):
            super().__init__()
            self.stage = nn.Sequential(nn.Conv2d(in_chans, 8, 3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(8))
            self.head = nn.Linear(8, num_classes)
            self.feature_info = [dict(num_chs=8, reduction=2, module="stage")]

        def forward(self, x):
            return self.head(self.stage(x).flatten(1))

    registry._load()

    def pooled_bn_net(num_classes=2, **kw):
        return PooledBN(num_classes, **kw)

    registry.register_model(pooled_bn_net)
    try:
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            PooledBN().train()(torch.randn(1, 3, 16, 16))
        result = E.train(_cfg(tmp_path, "pooled_bn_net", synthetic_samples=9, batch_size=4, image_size=16,
                              tensorboard=False, plots=False))
    finally:
        registry._MODELS.pop("pooled_bn_net", None)
    assert "the last training batch would hold 1 sample: it is left out each epoch" in capsys.readouterr().out
    assert result["test"]["num_samples"] == 2 and result["epochs"][-1]["val"]["num_samples"] == 2
    batches = E._Batches(list(range(9)), 4)
    assert [len(b) for b in batches] == [4, 4] and len(batches) == 2
    assert [len(b) for b in E._Batches(list(range(10)), 4)] == [4, 4, 2]
    assert [len(b) for b in E._Batches(list(range(5)), 1)] == [1] * 5
    loader = E._loader(torch.utils.data.TensorDataset(torch.zeros(9, 1)), 4, 0)  # evaluation: every sample
    assert sum(len(b[0]) for b in loader) == 9


def test_setup_is_stated_in_the_log(tmp_path, capsys):
    from fusionblocks.models import registry

    registry._load()
    cfg = _cfg(tmp_path, "hatr_conv2d", epochs=1, synthetic_samples=4, batch_size=2, image_size=32, augment="light",
               max_steps_per_epoch=1, tensorboard=False, plots=False,
               model_kwargs=dict(embed_dim=32, vit_depth=1, vit_heads=2, img_size=32))
    result = E.train(cfg)
    out = capsys.readouterr().out
    assert "recipe hatr (the model's default)" in out
    assert "augmentation (light): horizontal flip, rotation ±5°" in out
    assert "class weights: balanced (inverse class frequency), because the hatr recipe's normal:pneumonia = 3:1" in out
    assert result["config"]["class_weights_source"].startswith("balanced (inverse class frequency), because")
    assert result["config"]["recipe"] == "hatr" and result["config"]["augment_resolved"] == {"hflip": True, "rotation": 5.0}
    line = [l for l in out.splitlines() if l.startswith("epoch 1/1")][0]
    for part in ("train loss", "val loss", "acc", "F1", "AUC", "lr 1.00e-04", "s"):
        assert part in line
    assert "checkpoints: best.pt" in out


def test_files_left_out_of_the_class_folders_are_stated(tmp_path, tiny_model, image_tree, capsys):
    # a GIF or JFIF copy of an image, or a note, was left out without a word
    from PIL import Image

    Image.new("L", (20, 24)).save(image_tree / "train" / "normal" / "extra.gif")
    (image_tree / "val" / "pneumonia" / "notes.txt").write_text("x")
    E.train(_cfg(tmp_path, tiny_model, data=str(image_tree), epochs=1, tensorboard=False, plots=False))
    out = capsys.readouterr().out
    assert ("left out 2 files of the class folders that are not png/jpg/jpeg/bmp/tif/tiff/webp/dcm (.gif, .txt): "
            f"{image_tree}/train/normal/extra.gif, {image_tree}/val/pneumonia/notes.txt") in out


def test_a_class_missing_from_a_seeded_split_is_stated(tmp_path, tiny_model, image_tree, capsys):
    # a class too small for the split fractions had no val/test images: its 0 recall lowered the macro averages
    import shutil

    flat = image_tree / "train"
    for f in sorted((flat / "pneumonia").iterdir())[1:]:
        f.unlink()
    shutil.copytree(flat / "pneumonia", flat / "rare")
    E.train(_cfg(tmp_path, tiny_model, data=str(flat), epochs=1, batch_size=2, tensorboard=False, plots=False))
    out = capsys.readouterr().out
    assert ("note: no val images of classes 'pneumonia', 'rare' (too few images to split?): the val metrics' macro "
            "averages count them as 0 and the AUC is undefined") in out
    assert "note: no test images of classes 'pneumonia', 'rare'" in out and "no train images" not in out


def test_worker_processes_augment_with_each_epochs_seed_and_leave_the_global_rng_alone():
    """Persistent workers keep the dataset copy of the epoch they started in: the epoch must travel with the
    indices, or every epoch repeats the first one's augmentation (and a resumed run, whose workers start at a
    later epoch, differs from an uninterrupted one). A loader must not draw from the global RNG either: one
    iterator per run (persistent) or per epoch would shift dropout differently after a resume."""
    from fusionblocks.training import data as D
    from fusionblocks.training.recipes import augment_spec, get_recipe
    from fusionblocks.training.transforms import build

    r = get_recipe("hifuse")
    tf = build(True, augment_spec(r, "recipe"), 16, r.mean, r.std)

    def epochs(workers):
        ds = D.SyntheticDataset(8, 2, 16, 3, tf, 0)
        sampler = E._EpochSampler(len(ds), 0)
        loader = E._loader(ds, 4, workers, sampler)
        out = []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            ds.set_epoch(epoch)
            before = torch.get_rng_state()
            out.append(torch.cat([x for x, _ in loader]))
            assert torch.equal(torch.get_rng_state(), before)
        return out

    single, workers = epochs(0), epochs(2)
    assert not torch.equal(single[0], single[1])
    for a, b in zip(single, workers):
        assert torch.equal(a, b)


def test_eval_loss_is_the_weighted_cross_entropy_the_model_trains_with():
    """predict's loss is torch's weighted cross-entropy over the whole split, sum(w_y * l) / sum(w_y), the loss
    training minimizes (HATR's recipe: normal:pneumonia = 3:1); it divided by the number of samples, which put the
    validation and test losses of a weighted run on another scale than the training loss (x2 on a balanced split)."""
    torch.manual_seed(0)
    x = torch.randn(7, 4)
    y = torch.tensor([0, 0, 1, 1, 1, 1, 1])
    model = torch.nn.Linear(4, 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)  # batches 3, 3, 1
    w = torch.tensor([3.0, 1.0])
    with torch.no_grad():
        logits = model(x)
    loss, labels, probs = E.predict(model, loader, torch.device("cpu"), None, w)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, y, weight=w).item(), rel=1e-6)
    assert labels.tolist() == y.tolist() and probs.shape == (7, 2)
    loss, _, _ = E.predict(model, loader, torch.device("cpu"), None)  # unweighted: the plain mean, as before
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)


def test_data_workers_auto_uses_the_cores_on_a_gpu_and_none_on_cpu(monkeypatch):
    monkeypatch.setattr(E.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert E.data_workers("auto", cpu) == 0  # the model's threads use every core
    assert E.data_workers("auto", cuda) == E.MAX_AUTO_WORKERS == 8  # 15 cores left, capped
    assert E.data_workers("auto", cuda, world=4) == 3  # 16 cores shared by 4 processes, one kept for each
    assert E.data_workers("auto", cuda, world=32) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 2 nodes of 2 processes: this machine's 16 cores shared by 2
    assert E.data_workers("auto", cuda, world=4) == 7
    assert E.data_workers(5, cuda) == 5 and E.data_workers(0, cuda) == 0  # a count is taken as given
    for bad in (-1, 1.5, True, "many"):
        with pytest.raises(ValueError, match="expected num_workers as an int >= 0 or 'auto'"):
            E.data_workers(bad, cpu)


def test_an_image_size_below_the_models_smallest_input_is_refused_before_the_data_is_read(tmp_path, monkeypatch):
    # hatr_conv2d takes 31x31 and more; at 16 the first forward failed after every image had been decoded
    monkeypatch.setattr(E, "_datasets", lambda *a: pytest.fail("the data was read"))
    with pytest.raises(ValueError, match=r"^train: --image-size 16 is below the smallest input hatr_conv2d takes, 31x31$"):
        E.train(_cfg(tmp_path, "hatr_conv2d", image_size=16))
    assert not (tmp_path / "run").exists()


def test_workers_option_takes_auto_or_a_count():
    from fusionblocks.cli import build_parser

    parser = build_parser()
    base = ["train", "--model", "hatr_conv2d", "--data", "synthetic", "--out", "o"]
    assert parser.parse_args(base).workers == "auto"
    assert parser.parse_args(base + ["--workers", "3"]).workers == 3
    assert parser.parse_args(["evaluate", "--checkpoint", "c.pt", "--data", "d", "--out", "o"]).workers == "auto"
    predict = ["predict", "--checkpoint", "c.pt", "--input", "i", "--out", "p.csv"]
    assert parser.parse_args(predict).workers == "auto" and parser.parse_args(predict + ["--workers", "2"]).workers == 2


def test_predict_workers_auto_decodes_in_workers_only_for_a_gpu_model(monkeypatch, tmp_path):
    from fusionblocks.training import predict as P

    seen = []

    class Loader:
        def __init__(self, ds, batch_size, num_workers, collate_fn):
            seen.append(num_workers)

        def __iter__(self):
            return iter(())

    monkeypatch.setattr(torch.utils.data, "DataLoader", Loader)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    pred = P.Predictor(["a", "b"], 32, 3, [0.5] * 3, [0.5] * 3, run=lambda x: x, source="test")
    P.predict_images(pred, [], progress=False)
    P.predict_images(P.Predictor(**{**pred.__dict__, "device": "cuda:0"}), [], progress=False)
    P.predict_images(pred, [], num_workers=2, progress=False)
    assert seen == [0, 3, 2]  # CPU: none; GPU: 4 cores less one; a count as given
    with pytest.raises(ValueError, match=r"^predict: expected num_workers as an int >= 0 or 'auto', got -1"):
        P.predict_images(pred, [], num_workers=-1, progress=False)


def test_weighted_train_loss_is_the_epochs_weighted_mean_as_the_val_loss(tmp_path, image_tree):
    # the train loss was the mean of the batches' weighted means, which differs from sum(w_y * loss) / sum(w_y) over
    # the epoch (how the val loss is taken) when the batches hold the classes in other proportions
    from fusionblocks.models import registry
    from fusionblocks.training import data as D
    from fusionblocks.training.checkpoint import load_inference

    class Linear(torch.nn.Module):  # no BatchNorm or dropout: train mode computes what eval mode does
        def __init__(self, num_classes=2, in_chans=3):
            super().__init__()
            self.head = torch.nn.Linear(in_chans, num_classes)

        def forward(self, x):
            return self.head(x.mean((2, 3)))

    def linear_test_net(num_classes=2, **kw):
        return Linear(num_classes, **kw)

    registry._load()
    registry.register_model(linear_test_net)
    try:  # lr 0: the weights stay those of best.pt; augment none: the training transform is the evaluation one
        result = E.train(_cfg(tmp_path, "linear_test_net", data=str(image_tree), recipe="hatr", epochs=1, in_chans=1,
                              batch_size=4, lr=0.0, augment="none", plots=False, tensorboard=False))
        ck = load_inference(tmp_path / "run" / "best.pt")
    finally:
        registry._MODELS.pop("linear_test_net", None)
    ds = D.ImageFolderDataset(D.load_splits(image_tree).train, ck.classes, ck.transform(), 1)
    weight = torch.tensor(result["config"]["class_weights_resolved"])  # normal:pneumonia = 3:1
    want, _, _ = E.predict(ck.model, E._loader(ds, 32, 0), torch.device("cpu"), None, weight)
    assert result["epochs"][0]["train_samples"] == len(ds) == 12
    assert result["epochs"][0]["train_loss"] == pytest.approx(want, rel=1e-5)
