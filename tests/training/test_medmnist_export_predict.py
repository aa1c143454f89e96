"""MedMNIST .npz files, and a trained checkpoint taken through `fusionblocks export` and `fusionblocks predict`."""
import contextlib
import csv
import io
import sys
import types

import numpy as np
import pytest
import torch

from fusionblocks.training import medmnist
from fusionblocks.training.data import DataError, load_image, load_splits


def _npz(path, *, n=(12, 6, 6), size=16, rgb=False, classes=3, labels_shape=None, dtype=np.uint8, seed=0, **override):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        shape = (count, size, size, 3) if rgb else (count, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape).astype(dtype)
        lab = (np.arange(count) % classes)[:, None]
        arrays[f"{split}_labels"] = lab if labels_shape is None else rng.integers(0, 2, (count, labels_shape))
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_official_splits_labels_and_pixels(tmp_path):
    path = _npz(tmp_path / "toymnist_28.npz", rgb=True)
    s = load_splits(path, val_fraction=0.5, test_fraction=0.5)  # fractions do not apply: official splits
    assert (len(s.train), len(s.val), len(s.test)) == (12, 6, 6)
    assert s.classes == ["class_0", "class_1", "class_2"]
    assert [y for _, y in s.train[:4]] == [0, 1, 2, 0]
    raw = np.load(path)["val_images"][1]
    img = load_image(s.val[1][0], 3)
    assert img.shape == (3, 16, 16)
    torch.testing.assert_close(img, torch.from_numpy(raw).permute(2, 0, 1).float() / 255)
    gray = load_image(s.val[1][0], 1)
    want = (torch.from_numpy(raw).float() / 255 @ torch.tensor([0.299, 0.587, 0.114]))[None]
    torch.testing.assert_close(gray, want)


def test_gray_images_replicate_and_class_names(tmp_path, monkeypatch):
    path = _npz(tmp_path / "pneumoniamnist_224.npz", classes=2)
    s = load_splits(path, class_names=["normal", "pneumonia"])
    assert s.classes == ["normal", "pneumonia"]
    img = load_image(s.train[0][0], 3)
    assert img.shape == (3, 16, 16) and torch.equal(img[0], img[2])
    # medmnist's INFO names the classes when the package is importable (flag from the file stem)
    fake = types.ModuleType("medmnist")
    fake.INFO = {"pneumoniamnist": {"label": {"0": "normal", "1": "pneumonia"}, "task": "binary-class"},
                 "chestmnist": {"label": {str(i): f"f{i}" for i in range(14)}, "task": "multi-label, binary-class"}}
    monkeypatch.setitem(sys.modules, "medmnist", fake)
    assert load_splits(path).classes == ["normal", "pneumonia"]
    with pytest.raises(DataError, match="multi-label"):
        load_splits(_npz(tmp_path / "chestmnist.npz", classes=2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(labels_shape=14), r"14 labels per image .*ChestMNIST"),
        (dict(dtype=np.float32), "expected uint8 pixels, got float32"),
        (dict(train_images=None), "missing train_images"),
        (dict(val_labels=np.zeros((5, 1), np.int64)), "val has 6 images but 5 labels"),
        (dict(test_images=np.zeros((6, 16, 16, 4), np.uint8)), r"expected \(N, H, W\) or \(N, H, W, 3\)"),
        (dict(train_labels=-np.ones((12, 1), np.int64)), "negative label"),
        (dict(val_images=np.zeros((6, 8, 8), np.uint8)), "image shapes differ between splits"),
    ],
)
def test_bad_files_are_rejected_clearly(tmp_path, kwargs, match):
    path = _npz(tmp_path / "bad.npz", **kwargs)
    with pytest.raises(DataError, match=match):
        load_splits(path)


def test_class_names_must_cover_the_labels(tmp_path):
    path = _npz(tmp_path / "x.npz", classes=3)
    with pytest.raises(DataError, match="labels go up to 2, but there are only 2 class names"):
        load_splits(path, class_names=["a", "b"])


def _cli(*args):
    """``fusionblocks ARGS`` in this process (the installed entry point calls the same ``main``)."""
    from fusionblocks.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of hatr_conv2d on a small generated .npz, through the CLI, as a user would."""
    root = tmp_path_factory.mktemp("medmnist")
    data = _npz(root / "toymnist_28.npz", n=(8, 4, 4), classes=2)
    run = root / "run"
    r = _cli("train", "--model", "hatr_conv2d", "--recipe", "hatr", "--data", data, "--out", run, "--epochs", 1,
             "--image-size", 32, "--batch-size", 4, "--class-names", "normal,pneumonia", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    return root, data, run


def test_train_and_evaluate_on_npz(trained):
    import json

    root, data, run = trained
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["classes"] == ["normal", "pneumonia"]
    assert metrics["config"]["data"] == str(data)
    assert metrics["test"]["num_samples"] == 4  # the official test split
    r = _cli("evaluate", "--checkpoint", run / "best.pt", "--data", data, "--out", root / "eval", "--json",
             "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["num_samples"] == 4


def test_evaluate_names_the_npz_split_it_took(tmp_path, tiny_model):
    # the default (auto) is the official test split; metrics.json and the console said "auto"
    from fusionblocks.training import engine as E

    data = _npz(tmp_path / "toymnist.npz", n=(8, 4, 6), classes=2)
    E.train(E.TrainConfig(model=tiny_model, data=str(data), out=str(tmp_path / "run"), epochs=1, batch_size=4,
                          image_size=16, progress=False, log=False, plots=False, tensorboard=False))
    for split, n in (("auto", 6), ("val", 4), ("all", 18)):
        m = E.evaluate(tmp_path / "run" / "best.pt", str(data), tmp_path / "eval", split=split, progress=False)
        assert (m["split"], m["num_samples"]) == ("test" if split == "auto" else split, n)


def test_export_then_predict_from_checkpoint_and_from_onnx_alone(trained):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from PIL import Image

    root, data, run = trained
    onnx_path = root / "model.onnx"
    r = _cli("export", "--checkpoint", run / "best.pt", "--format", "onnx", "--out", onnx_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "max rel error" in r.stdout and "exported ->" in r.stdout

    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (20 + i, 24), dtype=np.uint8)).save(images / ("sub" if i % 2 else "") / f"im{i}.png")
    (images / "broken.png").write_bytes(b"not a png")

    rows = {}
    for flag, src in (("--checkpoint", run / "best.pt"), ("--onnx", onnx_path)):
        out = root / f"pred{flag}.csv"
        r = _cli("predict", flag, src, "--input", images, "--out", out, "--batch-size", 2, "--no-progress")
        assert r.returncode == 0, r.stderr[-3000:]
        assert "broken.png" in r.stderr and "1 unreadable" in r.stdout
        rows[flag] = _read_csv(out)
        assert len(rows[flag]) == 5
        assert list(rows[flag][0]) == ["path", "predicted", "normal", "pneumonia"]
        for row in rows[flag]:
            p = [float(row["normal"]), float(row["pneumonia"])]
            assert abs(sum(p) - 1) < 1e-5
            assert row["predicted"] == ["normal", "pneumonia"][int(np.argmax(p))]
    for a, b in zip(rows["--checkpoint"], rows["--onnx"]):
        assert a["path"] == b["path"]
        assert abs(float(a["normal"]) - float(b["normal"])) < 1e-4


def test_export_rejects_a_checkpoint_of_another_model_or_size(trained):
    root, data, run = trained
    r = _cli("export", "hifuse_tiny", "--checkpoint", run / "best.pt", "--out", root / "x.pt2")
    assert r.returncode == 2
    assert "trained as hatr_conv2d" in r.stderr and "asked for model 'hifuse_tiny'" in r.stderr
    r = _cli("export", "--checkpoint", run / "best.pt", "--num-classes", 5, "--out", root / "x.pt2")
    assert r.returncode == 2 and "asked for num_classes 5" in r.stderr
    sd = root / "sd.pt"
    torch.save(torch.load(run / "best.pt", weights_only=True)["model"], sd)
    r = _cli("export", "hatr_resnet50", "--checkpoint", sd, "--num-classes", 2, "--out", root / "x.pt2")
    assert r.returncode == 2 and "does not fit hatr_resnet50" in r.stderr


def test_weights_that_do_not_fit_are_named_in_one_short_line(tmp_path):
    """Weights of a wrapped model (every key prefixed) or of another class count: the counts and the first keys, not
    torch's list of every key (export: tens of kilobytes) nor its bare 'Error(s) in loading state_dict' (predict)."""
    from PIL import Image

    from fusionblocks import create_model

    sd = create_model("hatr_conv2d", num_classes=2).state_dict()
    wrapped = {f"net.{k}": v for k, v in sd.items()}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    missing = f"missing keys ({len(sd)}): {', '.join(list(sd)[:4])} ...; unexpected keys ({len(sd)}): net.{list(sd)[0]}"
    r = _cli("export", "hatr_conv2d", "--checkpoint", tmp_path / "wrapped.pt", "--num-classes", 2, "--out", tmp_path / "x.pt2")
    assert r.returncode == 2 and len(r.stderr) < 1000 and len(r.stderr.strip().splitlines()) == 1, r.stderr[:2000]
    assert f"does not fit hatr_conv2d (num_classes=2, in_chans=3): {missing}" in r.stderr
    torch.save(sd, tmp_path / "sd.pt")
    r = _cli("export", "hatr_conv2d", "--checkpoint", tmp_path / "sd.pt", "--num-classes", 3, "--out", tmp_path / "x.pt2")
    assert r.returncode == 2 and "shape mismatches (2): head.weight (2, 512) in the weights, (3, 512) in the model" in r.stderr
    torch.save({"model": wrapped, "classes": ["a", "b"],
                "config": {"model": "hatr_conv2d", "recipe": "hatr", "image_size": 32, "in_chans": 3}}, tmp_path / "best.pt")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    r = _cli("predict", "--checkpoint", tmp_path / "best.pt", "--device", "cpu", "--input", tmp_path / "a.png",
             "--out", tmp_path / "p.csv", "--no-progress")
    assert r.returncode == 2 and len(r.stderr) < 1000, r.stderr[:2000]
    assert f"{tmp_path / 'best.pt'}: weights do not fit model 'hatr_conv2d': {missing}" in r.stderr


def test_export_pt2_of_a_checkpoint(trained):
    from fusionblocks.export import read_metadata

    root, data, run = trained
    out = root / "model.pt2"
    r = _cli("export", "--checkpoint", run / "best.pt", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "torch.export.load" in r.stdout
    meta = read_metadata(out)
    assert meta["classes"] == ["normal", "pneumonia"] and meta["image_size"] == 32 and meta["mean"] == [0.485]


def _tiny_onnx(path, meta=None, size=8, classes=2, seed=0):
    """logits = flatten(image) @ W, built directly with onnx.helper (no exporter: fast)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).normal(size=(3 * size * size, classes)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "W"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if meta is not None:
        import json

        helper.set_model_props(model, {"fusionblocks": json.dumps(meta)})
    onnx.save(model, str(path))
    return w


def test_predict_onnx_applies_the_stored_preprocessing(tmp_path):
    pytest.importorskip("onnxruntime")
    from PIL import Image

    from fusionblocks.training.transforms import build

    meta = {"classes": ["benign", "malignant"], "image_size": 8, "in_chans": 3, "mean": [0.5], "std": [0.25]}
    w = _tiny_onnx(tmp_path / "m.onnx", meta)
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (13, 11, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    r = _cli("predict", "--onnx", tmp_path / "m.onnx", "--input", tmp_path / "a.png", "--out", tmp_path / "p.csv",
             "--no-progress")
    assert r.returncode == 0, r.stderr
    (row,) = _read_csv(tmp_path / "p.csv")
    x = build(False, {}, 8, [0.5], [0.25])(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    logits = x.reshape(1, -1).numpy() @ w
    want = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose([float(row["benign"]), float(row["malignant"])], want[0], atol=2e-6)
    assert row["predicted"] == meta["classes"][int(want.argmax())]


def test_predict_errors_are_clear(tmp_path):
    pytest.importorskip("onnxruntime")
    _tiny_onnx(tmp_path / "bare.onnx")
    (tmp_path / "img").mkdir()
    r = _cli("predict", "--onnx", tmp_path / "bare.onnx", "--input", tmp_path / "img", "--out", tmp_path / "p.csv")
    assert r.returncode == 2 and "carries no fusionblocks preprocessing metadata" in r.stderr
    meta = {"classes": ["a", "b", "c"], "image_size": 8, "in_chans": 3, "mean": [0.5], "std": [0.5]}
    _tiny_onnx(tmp_path / "three.onnx", meta)  # outputs 2 classes, names 3
    r = _cli("predict", "--onnx", tmp_path / "three.onnx", "--input", tmp_path / "img", "--out", tmp_path / "p.csv")
    assert r.returncode == 2 and "outputs 2 classes" in r.stderr
    meta["classes"] = ["a", "b"]
    _tiny_onnx(tmp_path / "ok.onnx", meta)
    r = _cli("predict", "--onnx", tmp_path / "ok.onnx", "--input", tmp_path / "img", "--out", tmp_path / "p.csv")
    assert r.returncode == 2 and "no images" in r.stderr
    r = _cli("predict", "--onnx", tmp_path / "ok.onnx", "--input", tmp_path / "nope.png", "--out", tmp_path / "p.csv")
    assert r.returncode == 2 and "input not found" in r.stderr
    r = _cli("predict", "--input", tmp_path / "img", "--out", tmp_path / "p.csv")
    assert r.returncode == 2 and "give --checkpoint" in r.stderr
    r = _cli("predict", "--onnx", tmp_path / "gone.onnx", "--input", tmp_path / "img", "--out", tmp_path / "p.csv")
    assert r.returncode == 2 and "fusionblocks predict: error: ONNX file not found" in r.stderr, r.stderr  # named once
    (tmp_path / "img" / "bad.jpg").write_bytes(b"\x00" * 10)
    r = _cli("predict", "--onnx", tmp_path / "ok.onnx", "--input", tmp_path / "img", "--out", tmp_path / "p.csv",
             "--no-progress")
    assert r.returncode == 1 and "bad.jpg" in r.stderr and "predicted 0 of 1 images" in r.stdout


def test_class_names_are_refused_for_a_folder(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="--class-names applies to a .npz file"):
        load_splits(tmp_path, class_names=["x"])


def test_exported_metadata_names_the_checkpoints_epoch(trained):
    pytest.importorskip("onnx")
    from fusionblocks.export import load_for_export

    root, data, run = trained
    _, meta = load_for_export(None, str(run / "best.pt"))
    assert meta["epoch"] == torch.load(run / "best.pt", weights_only=True)["epoch"] == 1  # 1-based already


def test_predict_and_export_with_a_damaged_checkpoint_give_one_line(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    for name, what in (("empty.pt", "empty checkpoint file (0 bytes)"), ("cut.pt", "damaged or truncated checkpoint")):
        r = _cli("predict", "--checkpoint", tmp_path / name, "--input", tmp_path / "img", "--out", tmp_path / "p.csv")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"fusionblocks predict: error: {tmp_path / name}: {what}" in r.stderr
    r = _cli("export", "--checkpoint", tmp_path / "empty.pt", "--out", tmp_path / "x.onnx")
    assert r.returncode == 2 and "empty checkpoint file (0 bytes)" in r.stderr


def _fake_checkpoint(path, classes=("a", "b"), image_size=8, in_chans=3):
    """The entries predict reads for preprocessing (no weights: enough for --onnx with --checkpoint)."""
    torch.save({"model": {}, "classes": list(classes),
                "config": {"model": "hifuse_tiny", "recipe": "hifuse", "image_size": image_size, "in_chans": in_chans}},
               path)
    return path


@pytest.mark.parametrize("image_size, in_chans, what", [(16, 3, "height 8 vs 16"), (8, 1, "channels 3 vs 1")])
def test_predict_onnx_refuses_preprocessing_that_does_not_fit_its_input(tmp_path, image_size, in_chans, what):
    """A checkpoint of another size or channel count (or metadata that disagrees with the graph) is a clear error,
    not ONNX Runtime's traceback on the first batch."""
    pytest.importorskip("onnxruntime")
    from PIL import Image

    _tiny_onnx(tmp_path / "m.onnx")  # input (batch, 3, 8, 8)
    _fake_checkpoint(tmp_path / "other.pt", image_size=image_size, in_chans=in_chans)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    r = _cli("predict", "--onnx", tmp_path / "m.onnx", "--checkpoint", tmp_path / "other.pt", "--input",
             tmp_path / "a.png", "--out", tmp_path / "p.csv", "--no-progress")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "takes input image of shape ['batch', 3, 8, 8]" in r.stderr and what in r.stderr
    assert f"checkpoint {tmp_path / 'other.pt'}" in r.stderr
    meta = {"classes": ["a", "b"], "image_size": image_size, "in_chans": in_chans, "mean": [0.5], "std": [0.5]}
    _tiny_onnx(tmp_path / "lying.onnx", meta)
    r = _cli("predict", "--onnx", tmp_path / "lying.onnx", "--input", tmp_path / "a.png", "--out", tmp_path / "p.csv",
             "--no-progress")
    assert r.returncode == 2 and what in r.stderr and "from its metadata" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("name, what, hint", [
    ("model.onnx", "an ONNX model (from `fusionblocks export`)", "fusionblocks predict --onnx"),
    ("model.pt2", "a torch.export program", "torch.export.load"),
    ("scan.png", "an image, not a training checkpoint", "images go to --input"),
])
def test_an_exported_model_or_image_given_as_checkpoint_is_named(tmp_path, name, what, hint):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"")
    (tmp_path / name).write_bytes(b"PK\x03\x04" + b"\x00" * 100)  # not a torch.save file: read, it looks damaged
    for cmd in (("predict", "--input", tmp_path / "img", "--out", tmp_path / "p.csv"), ("export", "--out", tmp_path / "x.onnx")):
        r = _cli(*cmd, "--checkpoint", tmp_path / name)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"fusionblocks {cmd[0]}: error: {tmp_path / name}: {what}" in r.stderr and hint in r.stderr
        assert "damaged" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_export_of_a_plain_state_dict_records_the_models_default_recipe(tmp_path):
    """A HATR state_dict gets the hatr recipe's normalization (what `train` uses for HATR), not HiFuse's."""
    from fusionblocks import create_model
    from fusionblocks.export import load_for_export
    from fusionblocks.training.recipes import get_recipe

    torch.save(create_model("hatr_conv2d", num_classes=2).state_dict(), tmp_path / "sd.pt")
    _, meta = load_for_export("hatr_conv2d", str(tmp_path / "sd.pt"), num_classes=2, image_size=32)
    hatr = get_recipe("hatr")
    assert (meta["recipe"], meta["mean"], meta["std"]) == ("hatr", list(hatr.mean), list(hatr.std)) == ("hatr", [0.485], [0.229])


def test_a_backend_that_cannot_run_is_an_error_of_export_and_predict_not_a_traceback(tmp_path, monkeypatch):
    """FUSIONBLOCKS_BACKEND=cuda on CPU tensors (as =cpp without the compiled extension): the dispatcher's reasons,
    as the command's error, exit status 2."""
    from PIL import Image

    from fusionblocks import create_model

    monkeypatch.setenv("FUSIONBLOCKS_BACKEND", "cuda")
    r = _cli("export", "hemf", "--num-classes", 2, "--image-size", 32, "--out", tmp_path / "m.pt2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith("fusionblocks export: error: hemf: ") and "backend 'cuda'" in r.stderr
    assert not (tmp_path / "m.pt2").exists()
    torch.save({"model": create_model("hemf", num_classes=2).state_dict(), "classes": ["a", "b"],
                "config": {"model": "hemf", "recipe": "hifuse", "image_size": 32, "in_chans": 3}}, tmp_path / "best.pt")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    r = _cli("predict", "--checkpoint", tmp_path / "best.pt", "--device", "cpu", "--input", tmp_path / "a.png",
             "--out", tmp_path / "p.csv", "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith(f"fusionblocks predict: error: checkpoint {tmp_path / 'best.pt'} (hemf): ")
    assert "backend 'cuda'" in r.stderr


def test_predict_and_export_use_the_preprocessing_the_checkpoint_records(tmp_path):
    """evaluate (load_inference) reads the checkpoint's ``preprocessing``; predict --checkpoint and export read the
    same entry, not the recipe table (which may change), and a config without a recipe is the hifuse one."""
    pytest.importorskip("onnxruntime")
    from PIL import Image

    from fusionblocks import create_model
    from fusionblocks.export import load_for_export
    from fusionblocks.training.checkpoint import load_inference
    from fusionblocks.training.transforms import build

    pre = {"image_size": 8, "in_chans": 3, "mean": [0.3], "std": [0.2]}
    w = _tiny_onnx(tmp_path / "m.onnx")
    torch.save({"model": {}, "classes": ["a", "b"], "preprocessing": pre,
                "config": {"model": "hifuse_tiny", "recipe": None, "image_size": 8, "in_chans": 3}}, tmp_path / "c.pt")
    pixels = np.random.default_rng(4).integers(0, 256, (9, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    r = _cli("predict", "--onnx", tmp_path / "m.onnx", "--checkpoint", tmp_path / "c.pt", "--input", tmp_path / "a.png",
             "--out", tmp_path / "p.csv", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = _read_csv(tmp_path / "p.csv")
    x = build(False, {}, 8, [0.3], [0.2])(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    logits = x.reshape(1, -1).numpy() @ w
    want = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose([float(row["a"]), float(row["b"])], want[0], atol=2e-6)

    model = create_model("hatr_conv2d", num_classes=2)
    ckpt = {"model": model.state_dict(), "classes": ["a", "b"], "preprocessing": pre | {"image_size": 32},
            "config": {"model": "hatr_conv2d", "recipe": "hatr", "image_size": 32, "in_chans": 3}, "version": 2, "epoch": 1}
    torch.save(ckpt, tmp_path / "best.pt")
    _, meta = load_for_export(None, str(tmp_path / "best.pt"))
    ev = load_inference(tmp_path / "best.pt").preprocessing
    assert (meta["mean"], meta["std"]) == (ev["mean"], ev["std"]) == ([0.3], [0.2])


def test_predict_device_that_is_not_here_is_an_error(tmp_path, monkeypatch):
    _fake_checkpoint(tmp_path / "c.pt")
    (tmp_path / "a.png").write_bytes(b"")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, what in (("gpu", "--device 'gpu' is not a device: expected cpu, cuda or cuda:N"),
                         ("cuda", "--device cuda: no CUDA device here")):
        r = _cli("predict", "--checkpoint", tmp_path / "c.pt", "--device", device, "--input", tmp_path / "a.png",
                 "--out", tmp_path / "p.csv", "--no-progress")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"fusionblocks predict: error: {what}" in r.stderr


def test_predict_out_that_is_a_folder_is_refused_before_predicting(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from PIL import Image

    from fusionblocks.training import predict

    _tiny_onnx(tmp_path / "m.onnx", {"classes": ["a", "b"], "image_size": 8, "in_chans": 3, "mean": [0.5], "std": [0.5]})
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "results").mkdir()
    ran = []
    monkeypatch.setattr(predict, "predict_images", lambda *a, **k: ran.append(1))
    r = _cli("predict", "--onnx", tmp_path / "m.onnx", "--input", tmp_path / "a.png", "--out", tmp_path / "results",
             "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"fusionblocks predict: error: --out {tmp_path / 'results'} is a folder" in r.stderr
    assert str(tmp_path / "results" / "predictions.csv") in r.stderr and not ran


def test_predict_folders_leave_hidden_files_out(tmp_path):
    # macOS AppleDouble "._x.png" files were listed as unreadable images in every prediction run
    from PIL import Image

    from fusionblocks.training.predict import collect_images

    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "._x.png").write_bytes(b"\x00\x05\x16\x07" + bytes(40))
    (tmp_path / ".ipynb_checkpoints").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / ".ipynb_checkpoints" / "x-checkpoint.png")
    assert collect_images([tmp_path]) == [tmp_path / "x.png"]
    assert collect_images([tmp_path / "._x.png"]) == [tmp_path / "._x.png"]  # named: taken as asked


def test_export_and_predict_refuse_an_out_they_cannot_write_before_any_work(tmp_path, monkeypatch):
    """A folder, a path under a file, or (export) a suffix of the other format: an error before the model is built
    (export raised IsADirectoryError / FileExistsError tracebacks after exporting, and wrote a .pt2 archive named
    .onnx that read_metadata and predict --onnx then took for ONNX; predict failed after predicting every image)."""
    from fusionblocks import export
    from fusionblocks.training import predict

    def work(*args, **kwargs):
        raise AssertionError("the command went to work")

    monkeypatch.setattr(export, "run_export", work)
    monkeypatch.setattr(predict, "predict_images", work)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    _fake_checkpoint(tmp_path / "c.pt")
    for cmd, what in [
        (("export", "hemf", "--format", "onnx", "--out", tmp_path / "folder"),
         f"--out {tmp_path / 'folder'} is a folder; expected the .onnx file to write, e.g. {tmp_path / 'folder' / 'model.onnx'}"),
        (("export", "hemf", "--out", tmp_path / "file" / "m.pt2"),
         f"--out {tmp_path / 'file' / 'm.pt2'}: {tmp_path / 'file'} is a file, not a folder"),
        (("export", "hemf", "--format", "pt2", "--out", tmp_path / "m.onnx"), "--format pt2, but --out"),
        (("predict", "--checkpoint", tmp_path / "c.pt", "--input", tmp_path / "file", "--out", tmp_path / "file" / "p.csv"),
         f"--out {tmp_path / 'file' / 'p.csv'}: {tmp_path / 'file'} is a file, not a folder"),
    ]:
        r = _cli(*cmd)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"fusionblocks {cmd[0]}: error: {what}" in r.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_export_to_onnx_refuses_a_named_backend_before_tracing(tmp_path, monkeypatch):
    """FUSIONBLOCKS_BACKEND=cpp puts fusionblocks' own ops in the graph, which ONNX cannot express: the exporter
    failed after tracing the whole model, with a ConversionError traceback ('No ONNX function found for
    fusionblocks_C.decay_dec_fwd')."""
    from fusionblocks import export

    def work(*args, **kwargs):
        raise AssertionError("the command went to work")

    monkeypatch.setattr(export, "load_for_export", work)
    monkeypatch.setenv("FUSIONBLOCKS_BACKEND", "cpp")
    r = _cli("export", "hemf", "--out", tmp_path / "m.onnx")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith("fusionblocks export: error: FUSIONBLOCKS_BACKEND=cpp: an ONNX file cannot hold")
    assert "--format pt2" in r.stderr


@pytest.mark.parametrize("name, what", [("model.pt2", "a torch.export program"), ("best.pt", "a torch.save file")])
def test_a_pt2_program_or_checkpoint_given_as_onnx_is_named(tmp_path, name, what):
    # ONNX Runtime said only "INVALID_PROTOBUF : Load model from model.pt2 failed:Protobuf parsing failed."
    pytest.importorskip("onnxruntime")
    (tmp_path / name).write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    r = _cli("predict", "--onnx", tmp_path / name, "--input", tmp_path, "--out", tmp_path / "p.csv")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"--onnx {tmp_path / name} is {what}" in r.stderr and "--checkpoint" in r.stderr
