"""Photo-like JPEGs for benchmarks and the GPU check: smooth shapes and
gradients with sensor-like noise, so that their size and decode cost are
those of real photos (a 500x375 JPEG at quality 90: about 70-100 kB)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def photo(rng: np.random.Generator, width: int = 500, height: int = 375, quality: int = 90) -> bytes:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([rng.uniform(40, 215) + rng.uniform(-60, 60) * np.sin(xx / rng.uniform(40, 160) + c)
                     * np.cos(yy / rng.uniform(40, 160)) for c in range(3)], axis=-1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 150))]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    arr = np.asarray(img, np.float32) + rng.normal(0, 9, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_photo_shard(path: str, n: int, classes: int = 5, seed: int = 0, width: int = 500,
                      height: int = 375) -> list[bytes]:
    """``n`` photo records (label i % classes) in one TFRecord shard; returns the JPEGs."""
    import tensorflow as tf

    from pipeline.data.shards import make_example

    rng = np.random.default_rng(seed)
    blobs = []
    with tf.io.TFRecordWriter(path) as writer:
        for i in range(n):
            blob = photo(rng, width, height)
            writer.write(make_example(blob, i % classes, f"c{i % classes}", f"photo-{i}.jpg", height, width))
            blobs.append(blob)
    return blobs
