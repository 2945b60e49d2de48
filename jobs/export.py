"""Export a trained model for serving: a TensorFlow SavedModel with the
preprocessing recipe and the labels inside, and optionally TFLite files.

    python -m jobs.export --model demo_output/runs/RUN
    python -m jobs.export --model s3://bucket/runs/2026-11-30 --tflite --quantize
    python -m jobs.export --model 's3://bucket/registry#flowers' --output s3://bucket/serving/flowers/1
    python -m jobs.export --model demo_output/runs/RUN --top-k 3 --dry-run

--model is a completed run directory, a model file in one, a registry version
folder (REGISTRY/NAME/versions/VERSION) or REGISTRY#name (its production
version); the export goes to
export/ in the run directory or registry version unless --output says
otherwise. Signatures: serving_default (= serving_bytes: encoded images ->
top-k labels and probabilities) and serving_pixels (uint8 pixels at model
size -> probabilities). --tflite adds model.tflite (float32), --quantize also
model-dynamic-range.tflite. export.json is written last (docs/export.md).
Runs in this process (no Ray).
"""

from __future__ import annotations

import sys
from typing import Sequence

from jobs._cli import dry_run_report, make_parser, resolve_config, run, setup_logging
from pipeline import storage as st


def main(argv: Sequence[str]) -> int:
    parser = make_parser("jobs.export", __doc__)
    parser.add_argument("--model", required=True,
                        help="run directory, model file, registry version folder, or REGISTRY#name")
    parser.add_argument("--output", help="folder/prefix for the export (default: export/ in the model's folder)")
    parser.add_argument("--tflite", action="store_true", help="also write model.tflite (float32)")
    parser.add_argument("--quantize", action="store_true",
                        help="also write model-dynamic-range.tflite (dynamic-range quantised; implies --tflite)")
    parser.add_argument("--top-k", type=int, help="labels the bytes signature returns per image (default 5)")
    parser.add_argument("--allow-unsafe", "--allow-unsafe-model", dest="allow_unsafe", action="store_true",
                        help="also load .h5 models and models that carry code (Lambda layers); "
                             "only for models you trust")
    args = parser.parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    cfg = resolve_config(args, {"score.top_k": args.top_k})
    from pipeline.artifact import check_model_reference, model_file_uri
    from pipeline.export import EXPORT_DIR, export_run

    if args.dry_run:
        with st.read_only():
            location, shown = check_model_reference(args.model, cfg.storage, allow_unsafe=args.allow_unsafe)
        output = args.output or st.join(model_file_uri(location).rsplit("/", 1)[0], EXPORT_DIR)
        files = "a SavedModel" + (" and model.tflite" if args.tflite or args.quantize else "") + (
            " and model-dynamic-range.tflite" if args.quantize else "")
        return dry_run_report("jobs.export", [
            f"load {shown}",
            f"write {files} to {output} (top {cfg.score.top_k} labels), export.json last",
        ])
    record = export_run(args.model, cfg.storage, output=args.output, tflite=args.tflite, quantize=args.quantize,
                        top_k=cfg.score.top_k, max_pixels=cfg.prepare.max_pixels, allow_unsafe=args.allow_unsafe)
    print(f"exported {record['model']} to {record['output']}: signatures serving_default (bytes), serving_pixels"
          + "".join(f"; {name}" for name in record["tflite"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
