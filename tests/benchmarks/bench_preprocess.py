"""What the one preprocessing path costs, side by side with the path it replaced.

Each pair runs on the same bytes in this process, rounds alternating; a figure
is CPU milliseconds per image (user + system time of this process, which other
processes' load changes far less than wall time), the fastest round of each.

- Validation / evaluation input (``make_dataset``, ``training=False``, local
  shards, batch 32): today's recipe (accurate JPEG IDCT, area-then-bilinear
  resize) vs the recipe of models recorded before it (TensorFlow's default
  IDCT, bilinear without antialiasing), read by the same pipeline.
- Training input (augmentation on): records numbered and undecodable ones
  counted (``counted=True``, what training runs) vs skipped without counting.
- Scoring and predict (``file_pixels`` + ``model_inputs``, 32 files at a time):
  today's recipe (Pillow decode, area-then-bilinear) vs the older one.
"""

from __future__ import annotations

import io
import tempfile
import time
from typing import Callable

import numpy as np

ROUNDS = 7
IMAGES = 960
MODEL_SIZE = 75
SOURCES = {"128x128": (128, 128), "640x480": (640, 480)}
LIMIT_PX = 89_478_485


def _jpeg(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 127 + 60 * np.sin(x / (1.3 + seed % 5)) * np.cos(y / 2.1) + 40 * np.sin((x + 2 * y) / 7.0)
    arr = np.stack([base, np.roll(base, 3, axis=1), 255 - base], axis=-1) + rng.normal(0, 12, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def _shards(folder: str, blobs: list[bytes], size: tuple[int, int]) -> list[str]:
    import tensorflow as tf

    from pipeline.data.shards import make_example

    paths = []
    for s in range(4):
        path = f"{folder}/s{s}.tfrecord"
        with tf.io.TFRecordWriter(path) as writer:
            for i, blob in enumerate(blobs[s::4]):
                writer.write(make_example(blob, i % 5, "c", f"f{i}", size[1], size[0], image_format="jpeg"))
        paths.append(path)
    return paths


def _cpu_ms_per_image(go: Callable[[], int]) -> float:
    start = time.process_time()
    n = go()
    return 1000 * (time.process_time() - start) / n


def _pairs(shards: list[str], blobs: list[bytes]) -> dict[str, Callable[[], int]]:
    from pipeline.data import input as inp
    from pipeline.data import preprocess

    today, legacy = preprocess.current_recipe(MODEL_SIZE), preprocess.Recipe.from_dict({"image_size": MODEL_SIZE})
    aug = {"enabled": True, "rotation": 20.0, "width_shift": 0.1, "height_shift": 0.1, "shear": 5.0, "zoom": 0.1,
           "horizontal_flip": True}

    def validation(recipe):
        def go() -> int:
            ds = inp.make_dataset(shards, image_size=MODEL_SIZE, batch_size=32, training=False, repeat=False,
                                  recipe=recipe)
            return sum(int(b[0].shape[0]) for b in ds)
        return go

    def training(counted: bool):
        def go() -> int:
            ds = inp.make_dataset(shards, image_size=MODEL_SIZE, batch_size=32, training=True, repeat=False, aug=aug,
                                  seed=0, counted=counted)
            return sum(int(b[0].shape[0]) for b in ds)
        return go

    def scoring(recipe):
        def go() -> int:
            for i in range(0, len(blobs), 32):
                preprocess.model_inputs([preprocess.file_pixels(b, recipe, LIMIT_PX) for b in blobs[i:i + 32]], recipe)
            return len(blobs)
        return go

    return {
        "validation, today": validation(None), "validation, before": validation(legacy),
        "training, counted": training(True), "training, not counted": training(False),
        "scoring, today": scoring(today), "scoring, before": scoring(legacy),
    }


def run() -> dict:
    results: dict = {"rounds": ROUNDS, "images": IMAGES, "model_size": MODEL_SIZE, "sources": {}}
    start = time.time()
    for name, size in SOURCES.items():
        blobs = [_jpeg(*size, seed=i) for i in range(IMAGES)]
        with tempfile.TemporaryDirectory() as tmp:
            pairs = _pairs(_shards(tmp, blobs, size), blobs)
            for go in pairs.values():  # warm-up: tracing, thread pools
                go()
            rounds = {k: [] for k in pairs}
            for r in range(ROUNDS):
                order = list(pairs) if r % 2 == 0 else list(reversed(pairs))
                for key in order:
                    rounds[key].append(round(_cpu_ms_per_image(pairs[key]), 4))
        results["sources"][name] = {"bytes_per_image": int(np.mean([len(b) for b in blobs])), "rounds": rounds}
    results["seconds"] = round(time.time() - start, 1)
    return results


COMPARISONS = [
    ("validation and evaluation input (`make_dataset`, resize only)", "validation, today", "validation, before"),
    ("training input, augmented: bad records counted / not counted", "training, counted", "training, not counted"),
    ("scoring and predict: file to model input", "scoring, today", "scoring, before"),
]
LIMIT = 1.10


def markdown(results: dict) -> str:
    rows, extra = [], []
    for source, data in results["sources"].items():
        best = {k: min(v) for k, v in data["rounds"].items()}
        extra.append(f"{best['validation, today'] - best['validation, before']:.2f} ms ({source})")
        for label, new, old in COMPARISONS:
            ratio = best[new] / best[old]
            rows.append(f"| {label} | {source} JPEG | {best[new]:.3f} | {best[old]:.3f} | {ratio:.2f} | "
                        f"<= {LIMIT:.2f} | {'PASS' if ratio <= LIMIT else 'MISS'} |")
    return f"""## Preprocessing cost

`python -m tests.benchmarks.run preprocess` ({results['seconds']:.0f} s). {results['images']} JPEG
images (quality 90) per source size, to the {results['model_size']}x{results['model_size']} model input; CPU
milliseconds per image of this process, fastest of {results['rounds']} alternating rounds. "Before" is
the recipe of models recorded before the full recipe (TensorFlow's default JPEG IDCT, bilinear resize
without antialiasing), run by the same code, so the ratio is what the one preprocessing path costs.

| path | source | today, CPU ms/image | before, CPU ms/image | ratio | target | |
|---|---|---:|---:|---:|---|---|
""" + "\n".join(rows) + """

The antialiased shrink (area average) costs more than a bilinear resample that skips most source pixels,
and the more so the larger the source; it is what keeps fine detail from aliasing (a 4000x3000 photo
resized without it differs by 41 levels per pixel on average). In evaluation that is """ + " and ".join(extra) + """
more CPU per image, next to the model's forward pass of several milliseconds per image even at 75x75
(see Score throughput), which tf.data overlaps with it. Scoring with today's recipe decodes with
Pillow, which here costs less than the TensorFlow decode an older recipe needs for its JPEGs. Counting undecodable records numbers every
record and scans the numbers in order.
"""
