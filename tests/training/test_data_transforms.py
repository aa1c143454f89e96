import pytest
import torch

from fusionblocks.training import data as D
from fusionblocks.training import transforms as T


def test_transforms_are_seeded_and_keep_shape():
    img = torch.rand(3, 40, 50)
    tf = T.build(True, {"random_resized_crop": True, "hflip": True, "vflip": True, "rotation": 10.0, "brightness": 0.1},
                 32, [0.5], [0.5])
    a = tf(img, torch.Generator().manual_seed(1))
    b = tf(img, torch.Generator().manual_seed(1))
    c = tf(img, torch.Generator().manual_seed(2))
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_rotation_zero_is_identity_and_brightness_clamps():
    img = torch.rand(1, 9, 13)
    out = T.RandomRotation(0.0)(img, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, img, atol=1e-5, rtol=0)
    bright = T.RandomBrightness(0.5)(torch.ones(1, 4, 4), torch.Generator().manual_seed(0))
    assert bright.max() <= 1.0


def test_rotation_by_90_degrees_moves_top_centre_to_left_centre():
    img = torch.zeros(1, 9, 9)
    img[0, 0, 4] = 1.0
    out = T.rotate(img, 90.0)
    assert int(out[0].argmax()) == 4 * 9 + 0
    assert out[0, 4, 0] == pytest.approx(1.0, abs=1e-5)
    rect = T.rotate(torch.rand(2, 6, 10), 33.0)
    assert rect.shape == (2, 6, 10)


def test_normalize_single_value_broadcasts():
    out = T.Normalize([0.5], [0.25])(torch.full((3, 2, 2), 0.75))
    assert torch.allclose(out, torch.ones(3, 2, 2))


def test_image_folder_with_splits(image_tree):
    s = D.load_splits(image_tree)
    assert s.classes == ["normal", "pneumonia"]
    assert (len(s.train), len(s.val), len(s.test)) == (12, 6, 6)
    ds = D.ImageFolderDataset(s.train, s.classes, T.build(False, {}, 16, [0.5], [0.5]), channels=3)
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and y == 0


def test_single_folder_is_split_with_a_seed(image_tree):
    s1 = D.load_splits(image_tree / "train", val_fraction=0.34, test_fraction=0.0, seed=3)
    s2 = D.load_splits(image_tree / "train", val_fraction=0.34, test_fraction=0.0, seed=3)
    assert s1.val == s2.val and len(s1.val) == 4 and len(s1.train) == 8
    assert D.class_counts(s1.val, 2) == [2, 2]  # stratified


def test_empty_class_folder_is_named(image_tree):
    (image_tree / "train" / "covid").mkdir()
    with pytest.raises(D.DataError, match=r"empty class folder: .*train/covid"):
        D.load_splits(image_tree)


def test_mismatched_classes_are_named(image_tree):
    import shutil

    shutil.rmtree(image_tree / "val" / "pneumonia")
    with pytest.raises(D.DataError, match=r"class lists differ between splits: .*val has \['normal'\]"):
        D.load_splits(image_tree)


def test_unreadable_image_is_named(image_tree):
    bad = image_tree / "train" / "normal" / "broken.png"
    bad.write_bytes(b"not a png")
    s = D.load_splits(image_tree)
    ds = D.ImageFolderDataset(s.train, s.classes)
    idx = [i for i, (p, _) in enumerate(s.train) if p.name == "broken.png"][0]
    with pytest.raises(D.DataError, match=r"unreadable image: .*broken\.png"):
        ds[idx]


def test_hidden_files_are_not_taken_for_images(image_tree):
    # macOS leaves AppleDouble "._name.png" files (not images) next to every file copied to some disks
    (image_tree / "train" / "normal" / "._0.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    (image_tree / "train" / "normal" / ".DS_Store").write_bytes(b"Bud1")
    (image_tree / "train" / "pneumonia" / ".ipynb_checkpoints").mkdir()
    (image_tree / "train" / "pneumonia" / ".ipynb_checkpoints" / "0-checkpoint.png").write_bytes(b"x")
    s = D.load_splits(image_tree)
    assert len(s.train) == 12 and not any(p.name.startswith(".") for p, _ in s.train)
    assert D.check_images({"train": s.train}) == 12


def test_images_in_class_sub_folders_are_an_error_not_left_out(image_tree):
    import shutil

    sub = image_tree / "train" / "pneumonia" / "viral"
    sub.mkdir()
    shutil.copy(image_tree / "train" / "pneumonia" / "0.png", sub / "v0.png")
    with pytest.raises(D.DataError, match=r"train/pneumonia holds sub-folders with images \(viral\)"):
        D.load_splits(image_tree)
    (sub / "v0.png").unlink()
    (sub / "notes.txt").write_text("no images here")
    assert len(D.load_splits(image_tree).train) == 12


@pytest.mark.parametrize("names, said", [(("train", "valid", "test"), r"found valid/ \(next to train/, test/ they "
                                          r"would be left out\): rename valid/ -> val/"),
                                         (("Train", "Val", "Test"), r"found Test/, Train/, Val/ \(they would be taken "
                                          r"for classes\): rename Test/ -> test/, Train/ -> train/, Val/ -> val/")])
def test_split_folders_spelled_otherwise_are_named(image_tree, names, said):
    for split, name in zip(("train", "val", "test"), names):
        (image_tree / split).rename(image_tree / name)
    with pytest.raises(D.DataError, match="split folders must be named train/, val/, test/; " + said):
        D.load_splits(image_tree)


def test_a_single_class_is_refused(image_tree):
    import shutil

    for split in ("train", "val", "test"):
        shutil.rmtree(image_tree / split / "pneumonia")
    with pytest.raises(D.DataError, match=r"data/train has 1 class folder \('normal'\); a classifier needs 2 or more"):
        D.load_splits(image_tree)
    with pytest.raises(D.DataError, match=r"data/val has 1 class folder \('normal'\)"):
        D.load_splits(image_tree / "val")


def test_split_fractions_that_leave_no_training_images_are_refused(image_tree):
    with pytest.raises(D.DataError, match=r"--val-fraction 0.6 and --test-fraction 0.5 leave no training images in "
                                          r".*data/train: their sum must be below 1"):
        D.load_splits(image_tree / "train", val_fraction=0.6, test_fraction=0.5)


def test_missing_folder():
    with pytest.raises(D.DataError, match="data folder not found: /nonexistent"):
        D.load_splits("/nonexistent")


def test_synthetic_dataset_is_deterministic_and_labelled():
    ds = D.SyntheticDataset(8, num_classes=3, size=32, channels=1)
    x, y = ds[4]
    x2, _ = ds[4]
    assert x.shape == (1, 32, 32) and y == 1 and torch.equal(x, x2)
