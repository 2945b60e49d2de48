"""The embedded demo: no cloud, no GPU, local paths, a local Ray.

    python -m jobs.demo --workdir demo_output
    python -m jobs.demo --workdir /tmp/demo --per-class 30 --dry-run

Generates the built-in image tree, then runs the jobs on it exactly as a user
would (same entry points, same flags) and prints where the outputs are.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Sequence

from jobs import predict, prepare, score, train
from jobs._cli import dry_run_report, make_parser, resolve_config, run, setup_logging
from pipeline.data import demo_data
from pipeline.data.prepare import split_by_hash
from pipeline.runtime.cluster import start_ray


def main(argv: Sequence[str]) -> int:
    parser = make_parser("jobs.demo", __doc__, config=False)
    parser.add_argument("--workdir", default="demo_output", help="where images, shards and outputs go")
    parser.add_argument("--per-class", type=int, default=60, help="demo images per class")
    args = parser.parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    workdir = os.path.abspath(args.workdir)
    images = os.path.join(workdir, "images")
    shards = os.path.join(workdir, "shards")
    run_dir = os.path.join(workdir, "runs", time.strftime("run-%Y%m%d-%H%M%S"))
    config = os.path.join(os.path.dirname(__file__), "configs", "demo.yaml")
    if args.dry_run:
        # The later steps plan on what the earlier ones write: only the steps.
        have = os.path.isdir(images)
        return dry_run_report("jobs.demo", [
            f"reuse the images under {images}" if have else
            f"write {args.per_class} images per class ({len(demo_data.CLASSES)} classes) under {images}",
            "start a local Ray, then run:",
            f"  python -m jobs.prepare --src {images} --dst {shards} --overwrite",
            f"  python -m jobs.train --data {shards} --output {run_dir} --config {config}",
            f"  python -m jobs.predict --model {run_dir} <3 validation images> --top-k 3 "
            f"--plot {os.path.join(run_dir, 'predict.png')}",
            f"  python -m jobs.score --model {run_dir} --images {os.path.join(workdir, 'validation.txt')} "
            f"--output {os.path.join(run_dir, 'scores')}",
        ])

    if not os.path.isdir(images):
        count = demo_data.generate(images, per_class=args.per_class)
        print(f"demo: wrote {count} images in {len(demo_data.CLASSES)} classes under {images}")
    else:
        print(f"demo: reusing the images under {images}")
    cfg = resolve_config(args, {})
    start_ray(cfg, data=True)

    step(prepare.main, ["--src", images, "--dst", shards, "--overwrite"])
    step(train.main, ["--data", shards, "--output", run_dir, "--config", config])
    validation = validation_images(images, cfg.prepare.val_fraction)
    samples = [next(v for v in validation if f"{os.sep}{c}{os.sep}" in v) for c in ("circle", "stripes", "cross")]
    step(predict.main, ["--model", run_dir, *samples, "--top-k", "3", "--plot", os.path.join(run_dir, "predict.png")])

    # Score the validation images (prepare's own split) as a URI list.
    val_list = os.path.join(workdir, "validation.txt")
    with open(val_list, "w") as f:
        f.writelines(v + "\n" for v in validation)
    scores = os.path.join(run_dir, "scores")
    step(score.main, ["--model", run_dir, "--images", val_list, "--output", scores])
    import pyarrow.parquet as pq

    table = pq.read_table(scores).select(["uri", "label", "score", "error"]).slice(0, 8).to_pandas()
    table["uri"] = table["uri"].map(lambda u: os.path.relpath(u, images))
    table["error"] = table["error"].fillna("")
    print("\nfirst rows of the scores:")
    print(table.to_string(index=False))

    print("\ndemo outputs:")
    print(f"  images:   {images}")
    print(f"  shards:   {shards}  (manifest.json, summary.json)")
    print(f"  run:      {run_dir}  (model.keras, metrics.json, training.png, confusion.png, predict.png)")
    print(f"  scores:   {scores}/*.parquet  (_summary.json)")
    return 0


def validation_images(images: str, val_fraction: float) -> list[str]:
    """The demo images prepare put in the validation split (split by path hash)."""
    out = []
    for folder, _, names in os.walk(images):
        for name in sorted(names):
            path = os.path.join(folder, name)
            if split_by_hash(os.path.relpath(path, images), val_fraction) == "validation":
                out.append(path)
    return sorted(out)


def step(job_main, argv: list[str]) -> None:
    print(f"\n$ python -m {job_main.__module__} {' '.join(argv)}")
    code = run(job_main, argv)
    if code != 0:
        raise SystemExit(code)


if __name__ == "__main__":
    sys.exit(run(main))
