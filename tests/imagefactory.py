"""Real image files of every kind the jobs must handle, built in memory with PIL."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def solid(colour=(200, 30, 30), size=(40, 30), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def rgb_jpeg(colour=(200, 30, 30), size=(40, 30)) -> bytes:
    return encode(solid(colour, size), "JPEG", quality=95)


def cmyk_jpeg(size=(40, 30)) -> bytes:
    # Pure red in CMYK: no cyan, full magenta and yellow.
    return encode(Image.new("CMYK", size, (0, 255, 255, 0)), "JPEG", quality=95)


def gray_jpeg(level=128, size=(40, 30)) -> bytes:
    return encode(Image.new("L", size, level), "JPEG", quality=95)


def palette_png(size=(40, 30)) -> bytes:
    return encode(solid((30, 30, 200), size).convert("P", palette=Image.Palette.ADAPTIVE), "PNG")


def rgba_png(size=(40, 30)) -> bytes:
    # Fully transparent pixels must come out white, not black.
    return encode(Image.new("RGBA", size, (0, 0, 0, 0)), "PNG")


def png16(size=(40, 30), level=65535) -> bytes:
    arr = np.full((size[1], size[0]), level, dtype=np.uint16)
    return encode(Image.fromarray(arr), "PNG")


def bmp(size=(40, 30)) -> bytes:
    return encode(solid((30, 200, 30), size), "BMP")


def webp(size=(40, 30)) -> bytes:
    return encode(solid((30, 200, 30), size), "WEBP", lossless=True)


def animated_gif(size=(40, 30)) -> bytes:
    frames = [solid((255, 0, 0), size), solid((0, 0, 255), size)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def exif_rotated_jpeg(size=(40, 20)) -> bytes:
    """A wide image whose EXIF says "rotate 90°": it is tall once upright. Left half
    red, right half blue, so the rotation direction is checkable."""
    img = Image.new("RGB", size, (255, 0, 0))
    img.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def tiff(size=(40, 30)) -> bytes:
    return encode(solid(size=size), "TIFF")


def truncated_jpeg() -> bytes:
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    return data[: len(data) // 2]


def truncated_png() -> bytes:
    data = encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "PNG")
    return data[: len(data) // 2]


def corrupt_jpeg() -> bytes:
    data = bytearray(rgb_jpeg(size=(64, 64)))
    # Keep the SOI/header, wreck the entropy-coded data and drop the end marker.
    for i in range(len(data) // 2, len(data)):
        data[i] = 0xFF if i % 3 else 0x00
    return bytes(data)


def png_bomb(width=60000, height=60000) -> bytes:
    """A tiny PNG whose header declares a huge image (a decompression bomb)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def random_bytes(n=2048, seed=3) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# name -> (bytes, usable?) for a class folder; names include spaces and non-ASCII.
def bad_and_odd_corpus() -> dict[str, tuple[bytes, bool]]:
    return {
        "plain rgb.jpg": (rgb_jpeg(), True),
        "cmyk.jpg": (cmyk_jpeg(), True),
        "gray.jpeg": (gray_jpeg(), True),
        "palette.png": (palette_png(), True),
        "alpha.png": (rgba_png(), True),
        "sixteen-bit.png": (png16(), True),
        "image.bmp": (bmp(), True),
        "image.webp": (webp(), True),
        "animated.gif": (animated_gif(), True),
        "rotated.JPG": (exif_rotated_jpeg(), True),
        "wrong extension.png": (rgb_jpeg(), True),
        "ünïcödé 画像.jpg": (rgb_jpeg((10, 200, 10)), True),
        "tiny.png": (encode(solid(size=(1, 1)), "PNG"), True),
        "zero.jpg": (b"", False),
        "truncated.jpg": (truncated_jpeg(), False),
        "truncated.png": (truncated_png(), False),
        "random.jpg": (random_bytes(), False),
        "notes.txt": (b"not an image at all\n", False),
        "bomb.png": (png_bomb(), False),
        "scan.tiff": (tiff(), False),
    }


def write_tree(root: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def more_hostile_corpus() -> dict[str, tuple[bytes, bool]]:
    """Kinds beyond bad_and_odd_corpus: odd shapes, modes and encodings."""
    rng = np.random.default_rng(5)
    noise = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    return {
        "wide 1x2000.png": (encode(solid(size=(2000, 1)), "PNG"), True),
        "tall 3000x2.jpg": (encode(solid(size=(2, 3000)), "JPEG"), True),
        "progressive.jpg": (encode(noise, "JPEG", progressive=True, quality=80), True),
        "gray-alpha.png": (encode(Image.new("LA", (20, 20), (128, 0)), "PNG"), True),
        "one-bit.bmp": (encode(Image.new("1", (20, 20), 1), "BMP"), True),
        "lossy.webp": (encode(noise, "WEBP", quality=50), True),
        "transparent.gif": (encode(Image.new("P", (20, 20), 0), "GIF", transparency=0), True),
        "jpeg-named.bmp": (rgb_jpeg(), True),
        "corrupt.jpg": (corrupt_jpeg(), None),  # decodable with damage, or rejected: either is accounted
        "html.jpg": (b"<html><body>404 Not Found</body></html>", False),
        "png-header-only.png": (b"\x89PNG\r\n\x1a\n", False),
        "gif-bomb.gif": (gif_bomb(), False),
    }


def gif_bomb() -> bytes:
    """A GIF whose logical screen claims 65535x65535 pixels."""
    data = bytearray(encode(Image.new("P", (2, 2), 0), "GIF"))
    data[6:10] = b"\xff\xff\xff\xff"
    return bytes(data)
