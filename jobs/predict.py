"""Top-k predictions for a few images, optionally drawn as bar charts.

    python -m jobs.predict --model RUN_URI IMAGE... [--plot out.png] [--top-k 5]
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np

from jobs._cli import make_parser, resolve_config, run, setup_logging
from pipeline import storage as st
from pipeline.errors import UsageError


def main(argv: Sequence[str]) -> int:
    parser = make_parser("jobs.predict", __doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="run directory, model file, or REGISTRY#name")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (local paths or URIs)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--plot", metavar="FILE.png", help="write the images with bar charts of their top-k")
    parser.add_argument("--allow-unsafe", "--allow-unsafe-model", dest="allow_unsafe", action="store_true",
                        help="also load .h5 models and models that carry code (Lambda layers); "
                             "only for models you trust")
    args = parser.parse_args(argv)
    setup_logging(args.quiet)
    cfg = resolve_config(args, {})
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
    (``pipeline.preprocess``: the same pixels and resize as scoring and
    evaluation): (URIs that decoded, float32 [N, size, size, 3], [(uri, [], [],
    reason)] for the files that cannot be used)."""
    from pipeline.images import ImageRejected
    from pipeline.preprocess import file_pixels, model_inputs

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
    from pipeline.images import decode_rgb
    from pipeline.reports import plot_predictions

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
