"""The serving export's bytes signature against the score job's own path.

    python -m tests.benchmarks.run export

One process, the demo's model (InceptionV3 at 75x75, untrained weights: speed
does not depend on them) exported with ``pipeline.export.export_model``, and
IMAGES photo-like JPEGs (500x375, quality 90) on the local disk. Rounds
alternate between:

(a) score: what a ``jobs.score`` decode task and predictor actor do per batch,
    in-process: ``read_and_decode`` (read, Pillow decode, the recipe's resize)
    then ``ScoringPredictor.score`` (uint8 to the compiled model, top-k).
(b) export: the SavedModel's ``serving_default`` signature (decode and resize
    as TensorFlow ops inside the graph, the model, top-k) on the files' bytes,
    read beforehand, as a server receives them.

Both batched (BATCH images per call) and one image per call (the latency a
serving request of one image sees, median of SINGLE calls). Per run: images/s
and the process's CPU ms per image. Each figure is its fastest round.
"""

from __future__ import annotations

import datetime as dt
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from tests.benchmarks.bench_score import build_model_dir
from tests.photos import photo

IMAGES = 128
BATCH = 32
SINGLE = 30
ROUNDS = 3
TOP_K = 5


def run() -> dict:
    import tensorflow as tf

    from pipeline.artifact import load_artifact
    from pipeline.config import StorageConfig
    from pipeline.export.savedmodel import export_model
    from pipeline.scoring.decode import NO_ERROR, read_and_decode
    from pipeline.scoring.predictor import ScoringPredictor

    storage = StorageConfig()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        model_dir = build_model_dir(os.path.join(tmp, "run"))
        artifact = load_artifact(model_dir, storage)
        export_dir = os.path.join(tmp, "export")
        export_model(artifact, export_dir, top_k=TOP_K)
        served = tf.saved_model.load(export_dir).signatures["serving_default"]
        predictor = ScoringPredictor(model_dir, storage, top_k=TOP_K, device_batch=BATCH)
        recipe = artifact.recipe
        rng = np.random.default_rng(0)
        files = []
        for i in range(IMAGES):
            path = os.path.join(tmp, f"photo_{i:04d}.jpg")
            with open(path, "wb") as f:
                f.write(photo(rng))
            files.append(path)
        blobs = [open(p, "rb").read() for p in files]
        groups = [files[i : i + BATCH] for i in range(0, IMAGES, BATCH)]

        def score(uris: list[str]):
            out = read_and_decode({"uri": uris, "size": [os.path.getsize(u) for u in uris]}, storage=storage,
                                  recipe=recipe, max_bytes=64 << 20, max_pixels=50_000_000)
            ok = out["error"] == NO_ERROR
            return predictor.score(ok, out["image"][ok])

        def export(start: int, count: int):
            return served(image_bytes=tf.constant(blobs[start : start + count]))

        # Warm-up, and the two paths agree on top-1 (the parity tests check more).
        a, b = score(groups[0]), export(0, BATCH)
        agree = float(np.mean(a[0][:, 0] == b["class_ids"].numpy()[:, 0])) if "class_ids" in b else None
        export(0, 1), score(files[:1])
        rounds = []
        for r in range(ROUNDS):
            timings = {
                "score_batched": timed(lambda: [score(g) for g in groups], IMAGES),
                "export_batched": timed(lambda: [export(i, BATCH) for i in range(0, IMAGES, BATCH)], IMAGES),
                "score_single": latency(lambda i: score([files[i]])),
                "export_single": latency(lambda i: export(i, 1)),
            }
            print(f"export bench round {r + 1}/{ROUNDS}: {timings}", file=sys.stderr, flush=True)
            rounds.append(timings)
    best = {name: min((r[name] for r in rounds), key=lambda t: t["s"]) for name in rounds[0]}
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": len(os.sched_getaffinity(0)),
        "images": IMAGES, "batch": BATCH, "single_calls": SINGLE, "top_1_agreement": agree,
        "best": best, "rounds": rounds,
        "ratios": {
            "export_vs_score_batched_images_per_s": round(best["export_batched"]["images_per_s"]
                                                          / best["score_batched"]["images_per_s"], 3),
            "export_vs_score_single_latency": round(best["export_single"]["median_ms"]
                                                    / best["score_single"]["median_ms"], 3),
        },
    }


def timed(fn, images: int) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"s": round(wall, 4), "images_per_s": round(images / wall, 1),
            "cpu_ms_per_image": round(1000 * cpu / images, 2)}


def latency(fn) -> dict:
    times = []
    cpu = time.process_time()
    for i in range(SINGLE):
        start = time.perf_counter()
        fn(i)
        times.append(1000 * (time.perf_counter() - start))
    cpu = time.process_time() - cpu
    return {"s": round(sum(times) / 1000, 4), "median_ms": round(statistics.median(times), 2),
            "p90_ms": round(float(np.percentile(times, 90)), 2), "cpu_ms_per_image": round(1000 * cpu / SINGLE, 2)}


def markdown(res: dict) -> str:
    best, ratios = res["best"], res["ratios"]
    agree = res["top_1_agreement"]
    return "\n".join([
        "## Serving export: the SavedModel's bytes signature vs the score path",
        "",
        f"Measured {res['date']} on {res['cpus']} CPUs, in one process, on {res['images']} photo-like JPEGs "
        f"(500x375, q90) with InceptionV3 at 75x75 (untrained); each figure is its fastest of "
        f"{len(res['rounds'])} alternating rounds (`tests/benchmarks/bench_export.py`). (a) is what a score job's "
        "decode task and predictor do per batch (Pillow decode and the recipe's resize, then the compiled model "
        "and top-k); (b) is `serving_default` of the export (decode, resize, model and top-k as TensorFlow ops "
        "in one graph) on the files' bytes.",
        "",
        f"| path | batched ({res['batch']} a call): images/s | CPU ms / image | one image a call: median ms | p90 ms |",
        "|---|---:|---:|---:|---:|",
        f"| (a) score: read_and_decode + ScoringPredictor | {best['score_batched']['images_per_s']} | "
        f"{best['score_batched']['cpu_ms_per_image']} | {best['score_single']['median_ms']} | "
        f"{best['score_single']['p90_ms']} |",
        f"| (b) export: SavedModel serving_default on bytes | {best['export_batched']['images_per_s']} | "
        f"{best['export_batched']['cpu_ms_per_image']} | {best['export_single']['median_ms']} | "
        f"{best['export_single']['p90_ms']} |",
        "",
        f"Ratios: batched images/s (b)/(a) = {ratios['export_vs_score_batched_images_per_s']}; single-image "
        f"latency (b)/(a) = {ratios['export_vs_score_single_latency']}. Top-1 agreement on the warm-up batch: "
        f"{agree if agree is not None else 'not reported'} (`tests/test_export.py` checks parity).",
    ])
