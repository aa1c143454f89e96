"""16-bit-per-channel colour PNGs (which Pillow reads at 8 bits) are decoded at full depth; 16-bit colour TIFFs,
which Pillow can only truncate, are refused. The files are written here, byte by byte (zlib + struct)."""
import struct
import zlib

import numpy as np
import pytest
import torch

from fusionblocks.training import data as D
from fusionblocks.training import png16

ADAM7 = png16.ADAM7


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def _filter_rows(img: np.ndarray, first_filter: int) -> bytes:
    """Scanlines of ``img`` ((h, w, C) uint16), row ``r`` filtered with type ``(first_filter + r) % 5``."""
    h, w, c = img.shape
    bpp = 2 * c
    rows = img.astype(">u2").reshape(h, w * bpp // 2).view(np.uint8).reshape(h, w * bpp).astype(int).tolist()
    out = bytearray()
    for r, row in enumerate(rows):
        up = rows[r - 1] if r else [0] * len(row)
        t = (first_filter + r) % 5
        out.append(t)
        for i, x in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            b, cc = up[i], (up[i - bpp] if i >= bpp else 0)
            pred = [0, a, b, (a + b) // 2, _paeth(a, b, cc)][t]
            out.append((x - pred) % 256)
    return bytes(out)


def write_png16(path, img: np.ndarray, colour_type: int, interlace: bool = False) -> None:
    h, w, _ = img.shape
    if interlace:
        stream = b"".join(_filter_rows(img[y0::dy, x0::dx], k) for k, (x0, y0, dx, dy) in enumerate(ADAM7)
                          if img[y0::dy, x0::dx].size)
    else:
        stream = _filter_rows(img, 0)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, int(interlace))
    path.write_bytes(png16.SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"gAMA", struct.pack(">I", 45455))
                     + _chunk(b"IDAT", zlib.compress(stream)[:40]) + _chunk(b"IDAT", zlib.compress(stream)[40:])
                     + _chunk(b"IEND", b""))


def _image(h, w, c, seed=0):
    img = np.random.default_rng(seed).integers(0, 65536, size=(h, w, c), dtype=np.uint16)
    img[0, 0] = [0x1234] * c  # low bytes that an 8-bit read would lose
    return img


@pytest.mark.parametrize("colour_type,channels", [(2, 3), (6, 4), (4, 2)])
def test_16bit_colour_png_is_read_at_full_depth(tmp_path, colour_type, channels):
    img = _image(7, 13, channels)  # 7 rows: every filter type, a Paeth row after each of the others
    path = tmp_path / "x.png"
    write_png16(path, img, colour_type)
    assert png16.wants_png16(path)
    arr, full = D.decode_image(path)
    assert full == 65535.0 and arr.dtype == np.uint16 and arr.shape == (7, 13, channels)
    np.testing.assert_array_equal(arr, img)
    t = D.load_image(path, 3)
    colour = img[..., :3] if channels >= 3 else np.repeat(img[..., :1], 3, axis=-1)  # alpha dropped
    want = torch.from_numpy(colour.astype(np.float32) / 65535).permute(2, 0, 1)
    torch.testing.assert_close(t, want, rtol=0, atol=1e-7)
    assert abs(t[0, 0, 0].item() - 0x1234 / 65535) < 1e-7 and t[0, 0, 0].item() != 0x12 / 255


def test_interlaced_and_any_file_name(tmp_path):
    img = _image(9, 11, 3, seed=1)  # not a multiple of 8: every Adam7 pass partial
    path = tmp_path / "scan.tif"  # the signature decides, not the suffix
    write_png16(path, img, 2, interlace=True)
    arr, _ = D.decode_image(path)
    np.testing.assert_array_equal(arr, img)
    tiny = _image(1, 1, 3, seed=2)  # one pixel: only the first Adam7 pass has data
    write_png16(tmp_path / "one.png", tiny, 2, interlace=True)
    np.testing.assert_array_equal(D.decode_image(tmp_path / "one.png")[0], tiny)


def test_other_pngs_still_go_through_pillow(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((4, 5, 3), 200, np.uint8)).save(tmp_path / "rgb8.png")
    Image.fromarray(np.full((4, 5), 40000, np.uint16)).save(tmp_path / "gray16.png")
    assert not png16.wants_png16(tmp_path / "rgb8.png") and not png16.wants_png16(tmp_path / "gray16.png")
    assert D.decode_image(tmp_path / "rgb8.png")[1] == 255.0
    arr, full = D.decode_image(tmp_path / "gray16.png")
    assert full == 65535.0 and int(arr.max()) == 40000
    with pytest.raises(ValueError, match="expected bit depth 16 and colour type 2"):
        png16.decode_png16(tmp_path / "rgb8.png")


def test_corrupt_16bit_png_is_named(tmp_path):
    path = tmp_path / "x.png"
    write_png16(path, _image(5, 6, 3), 2)
    good = path.read_bytes()
    bad_crc = bytearray(good)
    bad_crc[good.index(b"IDAT") + 10] ^= 0xFF
    (tmp_path / "crc.png").write_bytes(bytes(bad_crc))
    with pytest.raises(D.DataError, match=r"unreadable image: .*crc\.png .*CRC mismatch in the 'IDAT' chunk"):
        D.load_image(tmp_path / "crc.png", 3)
    (tmp_path / "cut.png").write_bytes(good[: len(good) - 30])
    with pytest.raises(D.DataError, match=r"cut\.png .*truncated PNG"):
        D.load_image(tmp_path / "cut.png", 3)
    # a well-formed stream that holds too few scanlines
    short = png16.SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", 6, 5, 16, 2, 0, 0, 0)) \
        + _chunk(b"IDAT", zlib.compress(b"\0" * 20)) + _chunk(b"IEND", b"")
    (tmp_path / "short.png").write_bytes(short)
    with pytest.raises(D.DataError, match=r"short\.png holds 20 bytes of scanlines, 6x5 needs 185"):
        D.load_image(tmp_path / "short.png", 3)


def _tiff_rgb16(path, img: np.ndarray) -> None:
    """An uncompressed little-endian 16-bit RGB TIFF (what microscopes and scanners write)."""
    h, w, _ = img.shape
    pixels = img.astype("<u2").tobytes()
    ifd_end = 8 + 2 + 12 * 10 + 4  # header, then one IFD of 10 entries; BitsPerSample's 3 values, then pixels
    entries = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, ifd_end), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, ifd_end + 6), (277, 3, 1, 3), (278, 3, 1, h), (279, 4, 1, len(pixels)), (284, 3, 1, 1)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, typ, n) + (struct.pack("<HH", v, 0) if typ == 3 and n == 1 else struct.pack("<I", v))
        for tag, typ, n, v in entries) + struct.pack("<I", 0)
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<HHH", 16, 16, 16) + pixels)


def test_16bit_colour_tiff_is_refused_not_truncated(tmp_path):
    path = tmp_path / "rgb16.tif"
    _tiff_rgb16(path, _image(3, 4, 3))
    with pytest.raises(D.DataError, match=r"rgb16\.tif .*16 bits per colour channel .*RGB;16L.* save it as a 16-bit PNG"):
        D.load_image(path, 3)
