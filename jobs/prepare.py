"""Turn an image tree into TFRecord shards plus manifest.json.

    python -m jobs.prepare --src s3://bucket/raw --dst s3://bucket/shards [--val-fraction 0.2]

The source is laid out like Keras ``flow_from_directory``: ``SRC/<class>/...`` or
``SRC/train/<class>/...`` + ``SRC/validation/<class>/...``.
"""

from __future__ import annotations

import sys
from typing import Sequence

from jobs._cli import make_parser, resolve_config, run, setup_logging, start_ray
from pipeline.prepare import plan_prepare, run_prepare
from pipeline.shards import SPLITS


def main(argv: Sequence[str]) -> int:
    parser = make_parser("jobs.prepare", __doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="image tree: local path or fsspec URI")
    parser.add_argument("--dst", required=True, help="where shards, manifest.json and summary.json go")
    parser.add_argument("--val-fraction", type=float, help="validation share when SRC has no train/validation split")
    parser.add_argument("--shard-size-mb", type=float, help="target shard size (default 100)")
    parser.add_argument("--max-side", type=int, help="downsize images whose longer side is larger (default: keep)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already prepared at DST")
    args = parser.parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    cfg = resolve_config(
        args,
        {
            "prepare.val_fraction": args.val_fraction,
            "prepare.shard_size_mb": args.shard_size_mb,
            "prepare.max_side": args.max_side,
        },
    )
    plan = plan_prepare(cfg, args.src, args.dst, overwrite=args.overwrite)
    start_ray(cfg)
    summary = run_prepare(cfg, plan)
    print_summary(summary)
    return 0


def print_summary(summary: dict) -> None:
    classes = summary["classes"]
    width = max([len(c) for c in classes] + [5])
    print(f"\nprepared {summary['accepted']} of {summary['files_seen']} files "
          f"in {summary['elapsed_s']:.1f}s ({summary['images_per_s']} files/s)")
    print(f"{'class':<{width}}  {'train':>7}  {'validation':>10}")
    for name in classes:
        counts = [summary["splits"][s]["class_counts"].get(name, 0) for s in SPLITS]
        print(f"{name:<{width}}  {counts[0]:>7}  {counts[1]:>10}")
    shards = ", ".join(f"{summary['splits'][s]['shards']} {s}" for s in SPLITS)
    print(f"shards: {shards}")
    if summary["rejected"]:
        reasons = "; ".join(f"{n} {r}" for r, n in summary["rejected_by_reason"].items())
        print(f"rejected {summary['rejected']}: {reasons} (details in manifest.json)")
    print(f"manifest: {summary['manifest']}")


if __name__ == "__main__":
    sys.exit(run(main))
