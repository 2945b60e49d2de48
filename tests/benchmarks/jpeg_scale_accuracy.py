"""Does scaled JPEG decoding (``prepare.jpeg_scale_to``) change accuracy? Measured
on a real image set, which ``make bench`` does not have, so this is run by hand:

    python -m tests.benchmarks.jpeg_scale_accuracy --src DIR [--work DIR] [--seeds 0 1]

DIR is a class-per-folder image set with ``train/`` and ``validation/``
(e.g. ``cats_and_dogs_filtered``: 3,000 JPEG photos of the Kaggle "Dogs vs.
Cats" set, 2,000 to train and 1,000 to validate). The tool prepares the set
twice, full-size decoding (recipe version 2) and ``jpeg_scale_to`` = the model
input (version 3), trains the demo recipe (InceptionV3 from random weights,
``jobs/configs/demo.yaml``) on each for every seed with ``jobs.prepare`` and
``jobs.train`` as a user runs them, then scores every validation file with each
model twice, once with each recipe's pixels (``file_pixels``, the function
score and predict use), and counts the correct answers itself from the folder
names. It also times the scoring decode path on these files as
``bench_jpeg_scale`` does on synthetic photos. Results go to
``tests/benchmarks/results/by_hand/jpeg_scale_accuracy.json``; ``bench_jpeg_scale``'s
section of BENCHMARKS.md shows them (``python -m tests.benchmarks.run --render``).

Runs are kept in ``--work``: running the tool again reuses the shards and the
finished training runs and only adds what is missing (e.g. another seed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULT = HERE / "results" / "by_hand" / "jpeg_scale_accuracy.json"
LIMIT_PX = 89_478_485
RECIPES = ("v2", "v3")


def _run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), f"> {log}", flush=True)
    with open(log, "w") as out:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"{cmd[2]} failed (exit {rc}); see {log}")


def _prepare(src: Path, work: Path, size: int) -> dict[str, Path]:
    shards = {}
    for name in RECIPES:
        dst = work / f"shards_{name}"
        if not (dst / "manifest.json").exists():
            scale_to = size if name == "v3" else "null"  # v2: full size, whatever the default
            _run([sys.executable, "-m", "jobs.prepare", "--src", str(src), "--dst", str(dst),
                  "--set", f"prepare.jpeg_scale_to={scale_to}", "--set", f"data.image_size={size}"],
                 work / f"prepare_{name}.log")
        shards[name] = dst
    return shards


def _trained(run: Path) -> bool:
    return (run / "summary.json").exists() and (run / "model.keras").exists()  # summary.json comes last


def _train(shards: dict[str, Path], work: Path, seeds: list[int], epochs: int, size: int) -> dict:
    runs = {}
    for seed in seeds:
        for name in RECIPES:
            run = work / f"run_{name}_s{seed}"
            if not _trained(run):
                started = time.time()
                _run([sys.executable, "-m", "jobs.train", "--data", str(shards[name]), "--output", str(run),
                      "--config", "jobs/configs/demo.yaml", "--set", f"data.seed={seed}",
                      "--set", f"data.image_size={size}", "--set", f"train.finetune.epochs={epochs}",
                      "--set", "data.shuffle_buffer=2000"], work / f"train_{name}_s{seed}.log")
                print(f"  trained in {time.time() - started:.0f} s", flush=True)
            runs[(name, seed)] = run
    return runs


def _recipes(size: int) -> dict:
    """v2: a full-size decode (version 2); v3: JPEGs decoded down to ``size``."""
    from pipeline.data.preprocess import current_recipe

    return {"v2": current_recipe(size), "v3": current_recipe(size, jpeg_scale_to=size)}


def _validation_files(src: Path) -> tuple[list[Path], list[str]]:
    files, classes = [], []
    for folder in sorted(p for p in (src / "validation").iterdir() if p.is_dir()):
        for path in sorted(folder.iterdir()):
            if path.is_file():
                files.append(path)
                classes.append(folder.name)
    return files, classes


def _inputs(blobs: list[bytes], recipe) -> np.ndarray:
    from pipeline.data.preprocess import file_pixels, model_inputs

    out = []
    for start in range(0, len(blobs), 64):
        pixels = [file_pixels(b, recipe, LIMIT_PX) for b in blobs[start:start + 64]]
        out.extend(np.rint(np.asarray(model_inputs(pixels, recipe))).astype(np.uint8))
    return np.stack(out)


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test: the chance of a split of the discordant
    pairs at least this uneven if both ways were equally likely."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _evaluate(src: Path, runs: dict, size: int) -> dict:
    from pipeline.artifact import load_artifact
    from pipeline.config import StorageConfig

    files, classes = _validation_files(src)
    blobs = [f.read_bytes() for f in files]
    inputs = {name: _inputs(blobs, recipe) for name, recipe in _recipes(size).items()}
    diff = np.abs(inputs["v2"].astype(np.int16) - inputs["v3"].astype(np.int16))
    correct = {}
    for (trained, seed), run in runs.items():
        artifact = load_artifact(str(run), StorageConfig())
        assert artifact.recipe.jpeg_scale_to == (size if trained == "v3" else None), artifact.recipe
        labels = np.array([artifact.labels.index(c) for c in classes])
        for name in RECIPES:
            index, _ = artifact.predict_top_k(inputs[name], 1)
            correct[(trained, seed, name)] = index[:, 0] == labels
    models = []
    for (trained, seed) in runs:
        own = correct[(trained, seed, trained)]
        other_name = "v3" if trained == "v2" else "v2"
        other = correct[(trained, seed, other_name)]
        models.append({"trained": trained, "seed": seed, "accuracy_own": float(own.mean()),
                       "accuracy_other": float(other.mean()), "other": other_name,
                       "only_own": int((own & ~other).sum()), "only_other": int((other & ~own).sum()),
                       "p": mcnemar_p(int((own & ~other).sum()), int((other & ~own).sum()))})
    pairs = []
    for seed in sorted({s for _, s in runs}):
        a, b = correct[("v2", seed, "v2")], correct[("v3", seed, "v3")]
        pairs.append({"seed": seed, "v2": float(a.mean()), "v3": float(b.mean()),
                      "only_v2": int((a & ~b).sum()), "only_v3": int((b & ~a).sum()),
                      "p": mcnemar_p(int((a & ~b).sum()), int((b & ~a).sum()))})
    return {"images": len(files), "classes": sorted(set(classes)), "models": models, "pairs": pairs,
            "pixel_diff_mean": float(diff.mean()), "pixel_diff_p99": float(np.percentile(diff, 99))}


def _describe(src: Path) -> dict:
    from PIL import Image

    files = [p for p in src.glob("*/*/*") if p.is_file()]
    sizes = [Image.open(p).size for p in files]
    return {"files": len(files), "median_width": int(np.median([w for w, _ in sizes])),
            "median_height": int(np.median([h for _, h in sizes])),
            "bits_per_pixel": round(float(np.median([8 * p.stat().st_size / (w * h)
                                                     for p, (w, h) in zip(files, sizes)])), 2)}


def _cpu(src: Path, size: int) -> dict:
    """CPU ms per image of the scoring decode path on the validation files, v2
    vs v3, fastest of 5 alternating rounds (as bench_jpeg_scale)."""
    from PIL import Image

    from pipeline.data.images import jpeg_scale
    from tests.benchmarks.bench_jpeg_scale import _cpu_ms_per_image, _decode_all

    files, _ = _validation_files(src)
    uris = [str(f) for f in files[::4]]
    scales = [jpeg_scale(*Image.open(u).size, size) for u in uris]
    recipes = _recipes(size)
    for recipe in recipes.values():  # warm-up
        _decode_all(uris[:64], recipe)
    rounds: dict = {"v2": [], "v3": []}
    for r in range(5):
        for key in (("v2", "v3") if r % 2 == 0 else ("v3", "v2")):
            rounds[key].append(round(_cpu_ms_per_image(uris, recipes[key]), 4))
    return {"images": len(uris), "rounds": rounds,
            "scales": {str(s): scales.count(s) for s in sorted(set(scales))}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, type=Path, help="image set with train/ and validation/ class folders")
    parser.add_argument("--work", type=Path, default=Path("jpeg_scale_accuracy"), help="shards and runs (kept)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--size", type=int, default=75, help="model input (data.image_size) and jpeg_scale_to")
    parser.add_argument("--name", default=None, help="what to call the set in the results (default: SRC's name)")
    args = parser.parse_args(argv)
    src, work = args.src.resolve(), args.work.resolve()
    if not (src / "train").is_dir() or not (src / "validation").is_dir():
        raise SystemExit(f"{src} has no train/ and validation/ folders")
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.time()
    shards = _prepare(src, work, args.size)
    runs = _train(shards, work, args.seeds, args.epochs, args.size)
    result = {"set": args.name or src.name, "size": args.size, "epochs": args.epochs, **_describe(src),
              **_evaluate(src, runs, args.size), "cpu": _cpu(src, args.size),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "seconds_this_call": round(time.time() - started)}
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("cpu",)}, indent=1))
    print(f"wrote {RESULT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
