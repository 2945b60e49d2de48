"""Top-k predictions for a few images, optionally drawn as bar charts.

    python -m jobs.predict --model RUN_URI IMAGE... [--plot out.png] [--top-k 5]
    python -m jobs.predict --model 's3://bucket/registry#flowers' photo1.jpg s3://bucket/photo2.png
    python -m jobs.predict --model demo_output/runs/RUN a.png b.png --plot predict.png --dry-run

Runs in this process (no Ray); --model is a run directory, a model file, or
REGISTRY#name (its production version).
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np

from jobs._cli import dry_run_report, make_parser, resolve_config, run, setup_logging
from pipeline import storage as st
from pipeline.errors import UsageError


def main(argv: Sequence[str]) -> int:
    parser = make_parser("jobs.predict", __doc__)
    parser.add_argument("--model", required=True, help="run directory, model file, or REGISTRY#name")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (local paths or URIs)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--plot", metavar="FILE.png", help="write the images with bar charts of their top-k")
    parser.add_argument("--allow-unsafe", "--allow-unsafe-model", dest="allow_unsafe", action="store_true",
                        help="also load .h5 models and models that carry code (Lambda layers); "
                             "only for models you trust")
    args = parser.parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    cfg = resolve_config(args, {})
    if args.dry_run:
        with st.read_only():
            lines = plan_predict(cfg, args.model, args.images, args.top_k, args.plot, args.allow_unsafe)
        return dry_run_report("jobs.predict", lines)
    results = predict_files(cfg, args.model, args.images, args.top_k, args.allow_unsafe)
    for uri, labels, scores, error in results:
        if error:
            print(f"{uri}: error: {error}")
            continue
        ranked = ", ".join(f"{label} {score:.3f}" for label, score in zip(labels, scores))
        print(f"{uri}: {ranked}")
    if args.plot:
        draw(cfg, results, args.plot)
        print(f"plot: {args.plot}")
    return 0 if any(r[3] is None for r in results) else 1


def plan_predict(cfg, model_uri: str, images: Sequence[str], top_k: int, plot, allow_unsafe: bool = False) -> list[str]:
    """What a real run would do, after checking the model (as a real run does)
    and that every image exists."""
    from pipeline.artifact import check_model_reference, check_model_uri

    location, shown = check_model_reference(model_uri, cfg.storage, allow_unsafe=allow_unsafe)
    model_file = check_model_uri(location, cfg.storage)
    for uri in images:
        try:
            found = st.exists(uri, cfg.storage)
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"cannot read {uri}: {st.describe_error(exc)}") from None
        if not found:
            raise UsageError(f"image not found: {uri}")
    lines = [f"load {shown} ({model_file})", f"print the top {top_k} classes of {len(images)} images"]
    if plot:
        lines.append(f"draw them with bar charts into {plot}")
    return lines


def predict_files(cfg, model_uri: str, images: Sequence[str], top_k: int, allow_unsafe: bool = False):
    """[(uri, top labels, top scores, error)] in input order."""
    from pipeline.artifact import check_model_reference, load_artifact

    location, shown = check_model_reference(model_uri, cfg.storage, allow_unsafe=allow_unsafe)
    artifact = load_artifact(location, cfg.storage, allow_unsafe=allow_unsafe, display_uri=shown)
    ok, inputs, results = read_inputs(cfg, images, artifact.recipe)
    probs = artifact.predict(inputs) if len(inputs) else np.zeros((0, len(artifact.labels)))
    k = min(top_k, len(artifact.labels))
    by_uri = {}
    for uri, p in zip(ok, probs):
        order = np.argsort(-p)[:k]
        by_uri[uri] = (uri, [artifact.labels[i] for i in order], [float(p[i]) for i in order], None)
    errors = {r[0]: r for r in results}
    return [by_uri.get(uri) or errors[uri] for uri in images]


def read_inputs(cfg, images: Sequence[str], recipe):
    """The model inputs of ``images`` made with the model's ``recipe``
    (``pipeline.data.preprocess``: the same pixels and resize as scoring and
    evaluation): (URIs that decoded, float32 [N, size, size, 3], [(uri, [], [],
    reason)] for the files that cannot be used)."""
    from pipeline.data.images import ImageRejected
    from pipeline.data.preprocess import file_pixels, model_inputs

    ok, pixels, rejected = [], [], []
    for uri in images:
        try:
            raw = st.read_bytes(uri, cfg.storage)
            pixels.append(file_pixels(raw, recipe, cfg.prepare.max_pixels))
            ok.append(uri)
        except FileNotFoundError:
            raise UsageError(f"image not found: {uri}") from None
        except ImageRejected as exc:
            rejected.append((uri, [], [], str(exc)))
    size = recipe.image_size
    inputs = np.stack(model_inputs(pixels, recipe)) if pixels else np.zeros((0, size, size, 3), np.float32)
    return ok, inputs, rejected


def draw(cfg, results, path: str) -> None:
    from pipeline.data.images import decode_rgb
    from pipeline.training.reports import plot_predictions

    items = []
    for uri, labels, scores, error in results:
        if error:
            continue
        image = np.asarray(decode_rgb(st.read_bytes(uri, cfg.storage), cfg.prepare.max_pixels))
        items.append((image, uri.rsplit("/", 1)[-1], labels, scores))
    if items:
        plot_predictions(items, path)


if __name__ == "__main__":
    sys.exit(run(main))
