"""Turn an image tree into TFRecord shards plus manifest.json.

    python -m jobs.prepare --src s3://bucket/raw --dst s3://bucket/shards [--val-fraction 0.2]
    python -m jobs.prepare --src s3://bucket/raw --dst s3://bucket/shards --dry-run
    python -m jobs.prepare --src raw/ --dst shards/ --overwrite   # replace shards prepared before

The source is laid out like Keras ``flow_from_directory``: ``SRC/<class>/...`` or
``SRC/train/<class>/...`` + ``SRC/validation/<class>/...``.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Sequence

from jobs._cli import dry_run_report, make_parser, resolve_config, run, setup_logging
from pipeline import storage as st
from pipeline.errors import UsageError
from pipeline.data.prepare import plan_prepare, run_prepare
from pipeline.data.shards import MANIFEST_NAME, SPLITS
from pipeline.runtime.cluster import ray_target, start_ray


def main(argv: Sequence[str]) -> int:
    parser = make_parser("jobs.prepare", __doc__)
    parser.add_argument("--src", required=True, help="image tree: local path or fsspec URI")
    parser.add_argument("--dst", required=True, help="where shards, manifest.json and summary.json go")
    parser.add_argument("--val-fraction", type=float, help="validation share when SRC has no train/validation split")
    parser.add_argument("--shard-size-mb", type=float, help="target shard size (default 100)")
    parser.add_argument("--max-side", type=int, help="downsize images whose longer side is larger (default: keep)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already prepared at DST")
    parser.add_argument("--skip-existing", action="store_true",
                        help="exit 0 at once when DST already holds prepared shards (its manifest.json, "
                             "written last), e.g. when a failed pipeline is retried")
    args = parser.parse_args(argv)
    if args.overwrite and args.skip_existing:
        raise UsageError("--overwrite and --skip-existing contradict each other")
    setup_logging(args.quiet, args.verbose)
    cfg = resolve_config(
        args,
        {
            "prepare.val_fraction": args.val_fraction,
            "prepare.shard_size_mb": args.shard_size_mb,
            "prepare.max_side": args.max_side,
        },
    )
    if args.skip_existing and _prepared(cfg, args.dst):
        print(f"{args.dst} already holds prepared shards ({MANIFEST_NAME}); nothing to do")
        return 0
    if args.dry_run:
        with st.read_only():
            plan = plan_prepare(cfg, args.src, args.dst, overwrite=args.overwrite)
        return dry_run_report("jobs.prepare", describe_plan(cfg, plan))
    plan = plan_prepare(cfg, args.src, args.dst, overwrite=args.overwrite)
    start_ray(cfg, data=True)
    summary = run_prepare(cfg, plan)
    print_summary(summary)
    return 0


def _prepared(cfg, dst: str) -> bool:
    try:
        return st.exists(st.join(dst, MANIFEST_NAME), cfg.storage)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read {dst}: {st.describe_error(exc)}") from None


def describe_plan(cfg, plan) -> list[str]:
    found = plan.discovery
    per_split = Counter(spec["split"] for spec in plan.specs)
    images = Counter(f.split for f in found.files)
    lines = [
        f"read {found.files_seen} files under {plan.src} ({found.layout} layout), "
        f"{len(found.classes)} classes: {', '.join(found.classes)}",
        "write " + ", ".join(f"{per_split.get(s, 0)} {s} shards ({images.get(s, 0)} images)" for s in SPLITS)
        + f" to {plan.dst}, then {MANIFEST_NAME} and summary.json",
    ]
    if found.rejected:
        lines.append(f"reject {len(found.rejected)} files already (see manifest.json after a real run)")
    if plan.old_manifest:
        lines.append(f"replace the shards prepared before at {plan.dst} (--overwrite)")
    lines.append(f"run on {ray_target(cfg)}")
    return lines


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
