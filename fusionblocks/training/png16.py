"""PNG decoding at 16 bits per channel for the colour types Pillow reads at 8 (RGB, RGBA, gray + alpha).

Pillow opens 16-bit RGB (48-bit), RGBA (64-bit) and gray+alpha (32-bit) PNGs as 8-bit ``RGB``/``RGBA`` images,
keeping each sample's high byte. :func:`decode_png16` reads them at full depth with the standard library
(``zlib``, ``struct``) and numpy: chunk CRCs checked, IDAT inflated, the five scanline filters undone (in
anti-diagonal wavefronts, so the loop runs ``H + W`` times over numpy vectors rather than once per byte),
Adam7 interlacing undone. Ancillary chunks (gamma, colour profiles, ``tRNS``, text) are skipped, as Pillow's
pixel data ignores them too. :func:`wants_png16` says whether a file is one of these PNGs.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import List, Tuple, Union

__all__ = ["wants_png16", "decode_png16"]

SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: colour type -> channels, for the 16-bit types Pillow truncates (0, 16-bit gray, Pillow reads as I;16)
CHANNELS = {2: 3, 4: 2, 6: 4}
#: Adam7 passes: (x0, y0, dx, dy)
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _ihdr(head: bytes):
    """``(width, height, bit_depth, colour_type, interlace)`` from the first 33 bytes, or ``None`` if not a PNG."""
    if len(head) < 33 or not head.startswith(SIGNATURE) or head[12:16] != b"IHDR":
        return None
    w, h, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", head[16:29])
    return w, h, depth, ctype, comp, filt, interlace


def wants_png16(path: Union[str, Path]) -> bool:
    """True for a PNG (by its signature, whatever the file name) with 16-bit RGB, RGBA or gray+alpha samples."""
    with open(path, "rb") as f:
        info = _ihdr(f.read(33))
    return info is not None and info[2] == 16 and info[3] in CHANNELS


def _chunks(data: bytes, name: str) -> List[Tuple[bytes, bytes]]:
    pos, out = len(SIGNATURE), []
    while True:
        if pos + 8 > len(data):
            raise ValueError(f"truncated PNG: {name} ends inside a chunk header at byte {pos}")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        crc = data[pos + 8 + length:pos + 12 + length]
        if len(body) < length or len(crc) < 4:
            raise ValueError(f"truncated PNG: {name} ends inside its {kind.decode('latin-1')!r} chunk")
        if zlib.crc32(kind + body) != struct.unpack(">I", crc)[0]:
            raise ValueError(f"corrupt PNG: CRC mismatch in the {kind.decode('latin-1')!r} chunk of {name}")
        out.append((kind, body))
        pos += 12 + length
        if kind == b"IEND":
            return out


def _unfilter(raw, height: int, width: int, bpp: int, name: str):
    """Scanlines ``(height, 1 + width·bpp)`` bytes -> ``(height, width, bpp)`` reconstructed bytes.

    Byte ``x`` of pixel ``p`` in row ``r`` depends on the same byte of pixels ``(r, p-1)``, ``(r-1, p)`` and
    ``(r-1, p-1)`` only, so every pixel with the same ``r + p`` is reconstructed at once.
    """
    import numpy as np

    ftype = raw[:, 0].astype(np.int32)
    bad = ftype[ftype > 4]
    if bad.size:
        raise ValueError(f"corrupt PNG: {name} has scanline filter type {int(bad[0])} (expected 0-4)")
    f = raw[:, 1:].reshape(height, width, bpp).astype(np.int32)
    out = np.zeros((height + 1, width + 1, bpp), dtype=np.int32)  # row 0 and column 0: the zero border
    for d in range(height + width - 1):
        r = np.arange(max(0, d - width + 1), min(height - 1, d) + 1)
        p = d - r
        a, b, c = out[r + 1, p], out[r, p + 1], out[r, p]
        t = ftype[r][:, None]
        pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        pred = np.where(t == 1, a, np.where(t == 2, b, np.where(t == 3, (a + b) >> 1, np.where(t == 4, paeth, 0))))
        out[r + 1, p + 1] = (f[r, p] + pred) & 255
    return out[1:, 1:].astype(np.uint8)


def decode_png16(path: Union[str, Path]):
    """Decode a 16-bit RGB / RGBA / gray+alpha PNG.

    Returns:
        ``(H, W, C)`` ``uint16`` numpy array (C = 3, 4 or 2) and its full-scale value, ``65535.0``.

    Raises:
        ValueError: not such a PNG, or a truncated or corrupt one (the file and the problem named).
    """
    import numpy as np

    name = str(path)
    data = Path(path).read_bytes()
    info = _ihdr(data[:33])
    if info is None:
        raise ValueError(f"not a PNG file: {name}")
    w, h, depth, ctype, comp, filt, interlace = info
    if depth != 16 or ctype not in CHANNELS:
        raise ValueError(f"decode_png16: {name} has bit depth {depth}, colour type {ctype}; expected bit depth "
                         f"16 and colour type 2 (RGB), 4 (gray+alpha) or 6 (RGBA)")
    if comp != 0 or filt != 0 or interlace not in (0, 1) or w == 0 or h == 0:
        raise ValueError(f"corrupt PNG: {name} has an invalid header (size {w}x{h}, compression {comp}, "
                         f"filter method {filt}, interlace {interlace})")
    idat = b"".join(body for kind, body in _chunks(data, name) if kind == b"IDAT")
    try:
        stream = zlib.decompress(idat)
    except zlib.error as e:
        raise ValueError(f"corrupt PNG: {name}: image data does not inflate ({e})") from None
    channels = CHANNELS[ctype]
    bpp = 2 * channels
    passes = ADAM7 if interlace else ((0, 0, 1, 1),)
    sizes = [(-(-(h - y0) // dy), -(-(w - x0) // dx)) for x0, y0, dx, dy in passes]
    need = sum(ph * (1 + pw * bpp) for ph, pw in sizes if ph > 0 and pw > 0)
    if len(stream) < need:
        raise ValueError(f"truncated PNG: {name} holds {len(stream)} bytes of scanlines, {w}x{h} needs {need}")
    buf = np.frombuffer(stream, dtype=np.uint8, count=need)
    img = np.zeros((h, w, bpp), dtype=np.uint8)
    pos = 0
    for (x0, y0, dx, dy), (ph, pw) in zip(passes, sizes):
        if ph <= 0 or pw <= 0:
            continue
        n = ph * (1 + pw * bpp)
        img[y0::dy, x0::dx] = _unfilter(buf[pos:pos + n].reshape(ph, 1 + pw * bpp), ph, pw, bpp, name)
        pos += n
    return img.reshape(h, w * bpp).view(">u2").reshape(h, w, channels).astype(np.uint16), 65535.0
