"""Scaled JPEG decoding (``prepare.jpeg_scale_to``, recipe version 3) against a
full-size decode (recipe version 2), on the scoring path.

Photo-like 1600x1200 JPEGs (quality 90, ``tests.photos``) go from file bytes
on local disk to the model's uint8 input through the function a score job's
decode task runs (``pipeline.scoring.decode.read_and_decode``: read, Pillow
decode, the recipe's resize, rounding to uint8), ``BATCH`` files a call. Each
pair runs on the same files in this process, rounds alternating, after a
warm-up; a figure is CPU milliseconds per image (user + system time of this
process, all its threads), the fastest round of each. "Cores per A100" is what
a scoring job feeding one A100 at 4,000 images/s would need for this step:
ms/image x 4.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

ROUNDS = 5
IMAGES = 64  # decoded per round and recipe
DISTINCT = 16  # distinct photos, each read IMAGES / DISTINCT times a round
BATCH = 32
WIDTH, HEIGHT = 1600, 1200
QUALITY = 90
MODEL_SIZES = (75, 299)
LIMIT_PX = 89_478_485
A100_IMAGES_PER_S = 4000
TARGET = 4.0  # v3 at least this many times less CPU than v2


def _files(folder: str) -> list[str]:
    from tests.photos import photo

    rng = np.random.default_rng(0)
    paths = []
    for i in range(DISTINCT):
        path = Path(folder, f"photo-{i:02d}.jpg")
        path.write_bytes(photo(rng, WIDTH, HEIGHT, quality=QUALITY))
        paths.append(str(path))
    return [paths[i % DISTINCT] for i in range(IMAGES)]


def _decode_all(uris: list[str], recipe) -> int:
    from pipeline.config import StorageConfig
    from pipeline.scoring.decode import NO_ERROR, read_and_decode

    storage = StorageConfig()
    for start in range(0, len(uris), BATCH):
        chunk = uris[start:start + BATCH]
        out = read_and_decode({"uri": np.array(chunk, dtype=object), "size": np.full(len(chunk), -1)},
                              storage=storage, recipe=recipe, max_bytes=2**30, max_pixels=LIMIT_PX)
        assert list(out["error"]) == [NO_ERROR] * len(chunk)
        assert out["image"].shape == (len(chunk), recipe.image_size, recipe.image_size, 3)
    return len(uris)


def _decode_only(uris: list[str], recipe) -> int:
    """``file_pixels`` alone (the part of the above before the resize), on bytes already read."""
    from pipeline.data.preprocess import file_pixels

    blobs = {uri: Path(uri).read_bytes() for uri in set(uris)}
    start = time.process_time()
    for uri in uris:
        file_pixels(blobs[uri], recipe, LIMIT_PX)
    return time.process_time() - start


def _cpu_ms_per_image(uris: list[str], recipe, decode_only: bool = False) -> float:
    if decode_only:
        return 1000 * _decode_only(uris, recipe) / len(uris)
    start = time.process_time()
    n = _decode_all(uris, recipe)
    return 1000 * (time.process_time() - start) / n


def run() -> dict:
    from pipeline.data.images import jpeg_scale
    from pipeline.data.preprocess import current_recipe

    started = time.time()
    results: dict = {"rounds": ROUNDS, "images": IMAGES, "distinct": DISTINCT, "batch": BATCH,
                     "source": f"{WIDTH}x{HEIGHT}", "quality": QUALITY, "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        uris = _files(tmp)
        results["bytes_per_image"] = int(np.mean([Path(u).stat().st_size for u in uris[:DISTINCT]]))
        for size in MODEL_SIZES:
            v2 = current_recipe(size)  # version 2: no jpeg_scale_to, a full-size decode
            v3 = current_recipe(size, jpeg_scale_to=size)
            runs = {"v2": (v2, False), "v3": (v3, False), "v2 decode": (v2, True), "v3 decode": (v3, True)}
            for recipe, _ in runs.values():  # warm-up: tracing, thread pools, page cache
                _decode_all(uris[:BATCH], recipe)
            rounds: dict = {k: [] for k in runs}
            for r in range(ROUNDS):
                for key in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                    rounds[key].append(round(_cpu_ms_per_image(uris, *runs[key]), 4))
            scale = jpeg_scale(WIDTH, HEIGHT, size)
            results["sizes"][str(size)] = {"rounds": rounds, "scale": scale,
                                           "decoded": [-(-WIDTH // scale), -(-HEIGHT // scale)]}
    results["seconds"] = round(time.time() - started, 1)
    return results


def markdown(results: dict) -> str:
    rows, decode = [], []
    for size, data in results["sizes"].items():
        best = {k: min(v) for k, v in data["rounds"].items()}
        ratio = best["v2"] / best["v3"]
        cores = {k: best[k] * A100_IMAGES_PER_S / 1000 for k in best}
        width, height = data["decoded"]
        rows.append(f"| {size}x{size} | 1/{data['scale']} ({width}x{height}) | {best['v2']:.2f} | {best['v3']:.2f} | "
                    f"{ratio:.1f}x | >= {TARGET:.0f}x {'PASS' if ratio >= TARGET else 'MISS'} | "
                    f"{cores['v2']:.1f} | {cores['v3']:.1f} |")
        decode.append(f"{best['v2 decode']:.2f} ms full size vs {best['v3 decode']:.2f} ms at 1/{data['scale']} "
                      f"(for {size}x{size}; v2 / that decode alone: {best['v2'] / best['v3 decode']:.1f}x)")
    return f"""## Scaled JPEG decoding (`prepare.jpeg_scale_to`)

`python -m tests.benchmarks.run jpeg_scale` ({results['seconds']:.0f} s). Photo-like {results['source']} JPEGs
(quality {results['quality']}, `tests/photos.py`, {results['bytes_per_image'] // 1000} kB on average) from local
files to the model's uint8 input through the scoring path (`read_and_decode`: read, Pillow decode, the
recipe's resize, rounding), {results['batch']} files a call; CPU milliseconds per image of this process
(all threads), fastest of {results['rounds']} alternating rounds of {results['images']} images after a
warm-up. v2: a full-size decode (`jpeg_scale_to: null`; the default before recipe version 3). v3: `jpeg_scale_to` =
the model's input size, so libjpeg
decodes at the largest DCT scale that keeps the shorter side >= it. Cores per A100: CPU cores this step
needs to feed one A100 at {A100_IMAGES_PER_S:,} images/s (ms/image x {A100_IMAGES_PER_S // 1000}).

| model input | v3 decode scale | v2, CPU ms/image | v3, CPU ms/image | v2 / v3 | target | v2, cores per A100 | v3, cores per A100 |
|---|---|---:|---:|---:|---|---:|---:|
""" + "\n".join(rows) + """

The decode alone (`file_pixels` on bytes in memory) costs """ + "; ".join(decode) + """.
The scaled IDCT skips most of the inverse transform (at 1/8 one value per 8x8 block instead of 64) and
the colour conversion and upsampling run on the smaller image, and the area resize then starts from far
fewer pixels; but libjpeg still entropy-decodes every coefficient of the full-size image, and these
noisy quality-90 photos carry about 2.4 bits per pixel, so that Huffman decoding is a floor the scale
cannot remove. It is why the ratio stays below the 4x target here: even with nothing after the scaled
decode (the last ratio above), a libjpeg decode reaches about 4x at 75x75 and not at 299x299; files with fewer bits per pixel
(less noise, lower quality) should gain more.
""" + real_set_markdown()


def real_set_markdown() -> str:
    """The section's part on a real image set, from ``jpeg_scale_accuracy.py``'s
    saved results (that tool needs an image set ``make bench`` does not have)."""
    path = Path(__file__).resolve().parent / "results" / "by_hand" / "jpeg_scale_accuracy.json"
    if not path.exists():
        return "\nIts effect on accuracy: not measured on a real image set yet (`tests/benchmarks/jpeg_scale_accuracy.py`).\n"
    r = json.loads(path.read_text())
    size = r["size"]
    models = "\n".join(
        f"| {m['trained']} | {m['seed']} | {m['accuracy_own']:.3f} | {m['accuracy_other']:.3f} | "
        f"{m['only_own']} / {m['only_other']} | {m['p']:.2f} |" for m in r["models"])
    pairs = "\n".join(
        f"| {p['seed']} | {p['v2']:.3f} | {p['v3']:.3f} | {p['v3'] - p['v2']:+.3f} | {p['only_v2']} / {p['only_v3']} | "
        f"{p['p']:.2f} |" for p in r["pairs"])
    swap = max(abs(m["accuracy_own"] - m["accuracy_other"]) for m in r["models"])
    swap_p = min(m["p"] for m in r["models"])
    new_run = max(abs(p["v3"] - p["v2"]) for p in r["pairs"])
    spread = max(p["v2"] for p in r["pairs"]) - min(p["v2"] for p in r["pairs"])
    mean_v2 = float(np.mean([p["v2"] for p in r["pairs"]]))
    mean_v3 = float(np.mean([p["v3"] for p in r["pairs"]]))
    v2_spread = _spread([p["v2"] for p in r["pairs"]])
    v3_spread = _spread([p["v3"] for p in r["pairs"]])
    cpu = {k: min(v) for k, v in r["cpu"]["rounds"].items()}
    scales = ", ".join(f"1/{s}: {n}" for s, n in r["cpu"]["scales"].items())
    return f"""
### On a real image set: accuracy

`python -m tests.benchmarks.jpeg_scale_accuracy --src DIR` (run by hand, {r['date']}; `make bench` has no real
image set). Set: `{r['set']}`, {r['files']:,} JPEG photos in {len(r['classes'])} classes
({', '.join(r['classes'])}), median {r['median_width']}x{r['median_height']}, {r['bits_per_pixel']} bits per pixel;
{r['images']:,} of them validate. For each seed the set was prepared twice (v2: full-size decode; v3:
`jpeg_scale_to: {size}`) and the demo recipe (InceptionV3 from random weights, {size}x{size}, {r['epochs']} epochs,
`jobs/configs/demo.yaml`) trained on each with `jobs.prepare` and `jobs.train`; then every validation file was
scored by each model twice, with v2's and with v3's pixels (`file_pixels`, as score and predict make them),
and the answers counted against the folder names by the tool itself. p: exact two-sided McNemar test on the
images one way gets right and the other wrong.

Each model on its own recipe's pixels and on the other recipe's:

| trained on | seed | accuracy, own pixels | accuracy, other pixels | right only with own / only with other | p |
|---|---:|---:|---:|---:|---:|
{models}

A new run with v3 against one with v2, same seed:

| seed | v2 model, v2 pixels | v3 model, v3 pixels | v3 - v2 | right only with v2 / only with v3 | p |
|---|---:|---:|---:|---:|---:|
{pairs}

Seed to seed (same recipe, another seed): v2 {v2_spread}, v3 {v3_spread}. The model inputs of the two
recipes differ by {r['pixel_diff_mean']:.2f} levels of 255 on average (99th percentile {r['pixel_diff_p99']:.0f}).
CPU per image of the scoring decode path on {r['cpu']['images']} of these photos (v3 scales {scales}):
{cpu['v2']:.2f} ms (v2) vs {cpu['v3']:.2f} ms (v3), {cpu['v2'] / cpu['v3']:.1f}x.

Read as: given the other recipe's pixels, a model's accuracy moves by at most {swap:.3f} (smallest p {swap_p:.2f});
a new run with v3 lands within {new_run:.3f} of one with v2 at the same seed, against {spread:.3f} between
seeds of v2 alone; over the {len(r['pairs'])} seeds the mean accuracy is {mean_v2:.3f} (v2) and {mean_v3:.3f} (v3). The data: the filtered subset of Kaggle's "Dogs vs. Cats" (photos from Petfinder, through
Microsoft's Asirra) that TensorFlow's image classification tutorial uses, `cats_and_dogs_filtered`; it is not
in this repository. At {size}x{size} most of these photos decode at 1/4, a stronger scaling than the default
`jpeg_scale_to: 299` applies to photos of this size (none: a 1/2 decode needs a shorter side of at least 597).
"""


def _spread(values: list) -> str:
    if len(values) < 2:
        return "not measured (one seed)"
    return f"{min(values):.3f}-{max(values):.3f} ({max(values) - min(values):.3f} apart)"
