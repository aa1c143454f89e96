"""Images decoded at their stored bit depth, every image checked before training."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fusionblocks.training import data as D
from fusionblocks.training import engine as E


def _save(arr, path, mode=None):
    im = Image.fromarray(arr) if mode is None else Image.fromarray(arr, mode=mode)
    im.save(path)
    return path


def test_16bit_gray_png_keeps_its_values(tmp_path):
    arr = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 400 + 1002)
    p = _save(arr, tmp_path / "x16.png")
    gray = D.load_image(p, 1)
    assert gray.dtype == torch.float32 and gray.shape == (1, 3, 4)
    torch.testing.assert_close(gray[0], torch.from_numpy(arr.astype(np.float32) / 65535), rtol=0, atol=1e-7)
    rgb = D.load_image(p, 3)
    assert rgb.shape == (3, 3, 4) and torch.equal(rgb[0], rgb[2]) and torch.equal(rgb[1], gray[0])


def test_16bit_big_endian_tiff(tmp_path):
    arr = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)
    p = tmp_path / "x.tif"
    Image.frombytes("I;16B", (2, 2), arr.astype(">u2").tobytes()).save(p)
    torch.testing.assert_close(D.load_image(p, 1)[0], torch.from_numpy(arr / 65535.0).float(), rtol=0, atol=1e-7)


def test_8bit_modes_rgb_rgba_palette_cmyk_1bit(tmp_path):
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
    want = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(D.load_image(_save(rgb, tmp_path / "rgb.png"), 3), want)
    rgba = np.concatenate([rgb, np.full((2, 2, 1), 7, np.uint8)], -1)
    torch.testing.assert_close(D.load_image(_save(rgba, tmp_path / "rgba.png"), 3), want)  # alpha dropped
    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    assert Image.open(tmp_path / "pal.png").mode == "P"
    torch.testing.assert_close(D.load_image(tmp_path / "pal.png", 3), want)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    assert (D.load_image(tmp_path / "cmyk.jpg", 3) - want).abs().max() < 0.1  # JPEG is lossy
    luma = D.load_image(tmp_path / "rgb.png", 1)[0]
    torch.testing.assert_close(luma, torch.tensor([[0.299, 0.587], [0.114, 1.0]]), rtol=0, atol=1e-6)
    bits = np.array([[True, False], [False, True]])
    Image.fromarray(bits).save(tmp_path / "bits.png")
    assert torch.equal(D.load_image(tmp_path / "bits.png", 1)[0], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


@pytest.mark.parametrize("photometric,signed", [("MONOCHROME2", 0), ("MONOCHROME1", 0), ("MONOCHROME2", 1)])
def test_dicom_when_pydicom_is_importable(tmp_path, photometric, signed):
    pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = generate_uid()
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    stored = np.array([[0, 1000], [2000, 4095]], dtype=np.int64) - (2048 if signed else 0)  # 12 bits stored
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 2, 2, 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, signed
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(str(tmp_path / "x.dcm"), enforce_file_format=True)
    want = torch.tensor([[0, 1000], [2000, 4095]], dtype=torch.float32) / 4095
    if photometric == "MONOCHROME1":  # 0 is white
        want = 1 - want
    torch.testing.assert_close(D.load_image(tmp_path / "x.dcm", 1)[0], want)


def _tree(root, make):
    for split, n in (("train", 10), ("val", 4), ("test", 4)):
        for c, name in enumerate(("dim", "bright")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                make(root / split / name / f"{i}.png", c, i)
    return root


def test_every_bad_image_of_every_split_is_listed_before_training(tmp_path, tiny_model, image_tree):
    (image_tree / "train" / "normal" / "a_bad.png").write_bytes(b"not a png")
    (image_tree / "test" / "pneumonia" / "empty.png").write_bytes(b"")
    good = image_tree / "val" / "normal" / "0.png"
    (image_tree / "val" / "normal" / "cut.png").write_bytes(good.read_bytes()[:60])  # truncated
    cfg = E.TrainConfig(model=tiny_model, data=str(image_tree), out=str(tmp_path / "run"), epochs=1, batch_size=4,
                        image_size=16, progress=False, log=False)
    with pytest.raises(D.DataError) as e:
        E.train(cfg)
    msg = str(e.value)
    assert msg.startswith("3 of 27 images cannot be read")
    for split, name in (("train", "a_bad.png"), ("val", "cut.png"), ("test", "empty.png")):
        assert f"{split}: {image_tree / split}" in msg and name in msg
    assert "empty file" in msg
    assert not (tmp_path / "run" / "last.pt").exists()  # nothing trained


def test_16bit_classes_that_differ_only_in_intensity_are_learned(tmp_path, tiny_model):
    """Values 1000-3000 vs 4000-6000 of 65535: all white when read as 8 bits, separable at 16."""

    def make(path, c, i):
        g = np.random.default_rng([c, i, ("train", "val", "test").index(path.parent.parent.name)])
        base = 1000 + 3000 * c
        arr = (base + g.uniform(0, 2000, (12, 12))).astype(np.uint16)
        _save(arr, path)

    root = _tree(tmp_path / "data", make)
    result = E.train(E.TrainConfig(model=tiny_model, data=str(root), out=str(tmp_path / "run"), epochs=12, batch_size=4,
                                   image_size=12, in_chans=1, lr=1e-2, augment="none", progress=False, log=False,
                                   tensorboard=False, seed=1))
    assert result["test"]["accuracy"] >= 0.9, json.dumps(result["test"]["confusion_matrix"])
