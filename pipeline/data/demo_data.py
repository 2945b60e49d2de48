"""A small built-in dataset: shapes in class colours on noisy backgrounds.

Five visually distinct classes, generated locally and deterministically from a
seed, so the demo and the tests need no download. Most files are JPEG; every
seventh is PNG so the re-encoding path is exercised too.
"""

from __future__ import annotations

import io
import math
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from pipeline import storage as st
from pipeline.config import StorageConfig

# class name -> base colour (RGB); shape and colour both identify the class.
CLASSES = {
    "circle": (220, 60, 50),
    "square": (50, 170, 70),
    "triangle": (50, 90, 220),
    "stripes": (230, 200, 40),
    "cross": (160, 60, 190),
}


def draw(cls: str, rng: np.random.Generator, size: int = 128) -> Image.Image:
    background = rng.integers(20, 235)
    noise = rng.normal(0, 12, (size, size, 3))
    base = np.clip(background + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    d = ImageDraw.Draw(img)
    colour = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in CLASSES[cls])
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(rng.integers(r + 2, size - r - 2)) for _ in range(2))
    if cls == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif cls == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif cls == "triangle":
        a = rng.uniform(0, 2 * math.pi)
        pts = [(cx + r * math.cos(a + k * 2 * math.pi / 3), cy + r * math.sin(a + k * 2 * math.pi / 3)) for k in range(3)]
        d.polygon(pts, fill=colour)
    elif cls == "stripes":
        step = int(rng.integers(8, 16))
        for y in range(int(rng.integers(0, step)), size, step):
            d.rectangle([0, y, size, y + step // 2 - 1], fill=colour)
    elif cls == "cross":
        w = max(3, r // 3)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    return img


def generate(
    dst: str,
    per_class: int = 60,
    seed: int = 0,
    size: int = 128,
    storage: Optional[StorageConfig] = None,
    classes: Optional[list[str]] = None,
) -> int:
    """Write ``dst/<class>/<class>_NNNN.{jpg,png}``; returns the number of files."""
    storage = storage or StorageConfig()
    rng = np.random.default_rng(seed)
    n = 0
    for cls in classes or list(CLASSES):
        for i in range(per_class):
            img = draw(cls, rng, size)
            buf = io.BytesIO()
            ext = "png" if i % 7 == 3 else "jpg"
            img.save(buf, format="PNG" if ext == "png" else "JPEG", quality=90)
            st.write_bytes(st.join(dst, cls, f"{cls}_{i:04d}.{ext}"), buf.getvalue(), storage)
            n += 1
    return n

