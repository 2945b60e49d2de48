"""Score every image under a folder/prefix (or in a list of URIs) into Parquet.

    python -m jobs.score --model s3://bucket/runs/2026-11-30 --images s3://bucket/images --output s3://bucket/scores \
                         --batch-size 64 --top-k 5
    python -m jobs.score --model 's3://bucket/registry#flowers' --images s3://bucket/incoming/ \
                         --output s3://bucket/scores/2026-12-01
    python -m jobs.score --model demo_output/runs/RUN --images demo_output/validation.txt \
                         --output demo_output/scores --dry-run

One row per input file (uri, label, score, top_k_labels, top_k_scores, error,
model); files that cannot be read or decoded get a row with ``error`` set.
Re-running with the same arguments resumes: committed Parquet files written by
the same model and settings are kept. A completed output holds ``_SUCCESS``;
re-run, it is left alone when its input is unchanged and refused (exit 2)
when the input changed, unless ``--overwrite``. One job at a time writes an
output folder (``_lease.json``).
"""

from __future__ import annotations

import sys
from typing import Sequence

from jobs._cli import dry_run_report, make_parser, resolve_config, run, setup_logging
from pipeline.errors import JobFailed
from pipeline.scoring.commit import SUMMARY_NAME
from pipeline.scoring.execute import predictor_pool, run_score
from pipeline.scoring.plan import plan_score
from pipeline.storage.lease import OutputLease
from pipeline import storage as st
from pipeline.runtime.cluster import ray_target, start_ray


def main(argv: Sequence[str]) -> int:
    parser = make_parser("jobs.score", __doc__)
    parser.add_argument("--model", required=True, help="run directory, model file, or REGISTRY#name (its production version)")
    parser.add_argument("--images", required=True,
                        help="folder/prefix scanned recursively for image files, or a list of URIs "
                             "(.txt, .csv with a 'uri' column, .parquet with 'uri' or 'bucket' and 'key' columns)")
    parser.add_argument("--output", required=True, help=f"folder/prefix for the Parquet files and {SUMMARY_NAME}")
    parser.add_argument("--batch-size", type=int,
                        help="images per model call (default 256 on GPU actors, 64 on CPU actors)")
    parser.add_argument("--top-k", type=int, help="classes kept per image (default 5)")
    parser.add_argument("--concurrency", type=int,
                        help="predictor actors (default: one per GPU, else one per 8 CPUs); more than the "
                             "cluster can place is refused")
    parser.add_argument("--cpus-per-actor", type=float,
                        help="CPUs each predictor actor reserves for feeding its device (default 4 on GPU "
                             "actors, 1 on CPU actors), kept from decode tasks")
    parser.add_argument("--rows-per-file", type=int,
                        help="the most rows per Parquet file (default: as many as fit in score.part_mb, 128 MiB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="list the images again and score everything, replacing what OUTPUT holds (needed "
                             "when the model, image source or top-k differ, or the images changed since)")
    parser.add_argument("--allow-unsafe", "--allow-unsafe-model", dest="allow_unsafe", action="store_true",
                        help="also load .h5 models and models that carry code (Lambda layers); "
                             "only for models you trust")
    args = parser.parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    cfg = resolve_config(
        args,
        {
            "score.batch_size": args.batch_size,
            "score.top_k": args.top_k,
            "score.concurrency": args.concurrency,
            "score.cpus_per_actor": args.cpus_per_actor,
            "score.rows_per_file": args.rows_per_file,
        },
    )
    if args.dry_run:
        with st.read_only():
            plan = plan_score(cfg, args.model, args.images, args.output,
                              overwrite=args.overwrite, allow_unsafe=args.allow_unsafe)
        return dry_run_report("jobs.score", [
            f"score the images {'listed in' if plan.is_list else 'under'} {plan.source} with {plan.model} "
            f"(top {plan.top_k}; listed by Ray tasks when it runs, or from the plan an earlier run left"
            + ("; the earlier run completed: its input is checked for changes" if plan.previous_complete is not None
               else "") + ")",
            f"write Parquet files of up to {plan.rows_per_file} rows"
            + (f" (about {plan.part_mb:g} MiB at most)" if plan.part_mb else "")
            + f" and {SUMMARY_NAME} to {plan.output}, "
            "holding its lease (_lease.json) meanwhile",
            f"run on {ray_target(cfg)}",
        ])
    plan = plan_score(cfg, args.model, args.images, args.output,
                      overwrite=args.overwrite, allow_unsafe=args.allow_unsafe)
    lease = OutputLease(args.output, plan.lease_args(), cfg.storage, cfg.score.lease_timeout_s,
                        wait_s=cfg.score.lease_wait_s).acquire()
    try:
        start_ray(cfg, data=True)
        predictor_pool(cfg)  # actors the cluster cannot place: exit 2 before any work
        summary = run_score(cfg, plan, lease=lease, allow_unsafe=args.allow_unsafe, overwrite=args.overwrite)
    finally:
        lease.release()
    print_summary(summary)
    if summary["images"] and not summary["scored"]:
        raise JobFailed(f"none of the {summary['images']} images could be scored; the error rows say why")
    return 0


def print_summary(summary: dict) -> None:
    if summary.get("nothing_to_score"):
        print(f"\n{summary['output']} is complete, nothing to score: {summary['scored']} of {summary['images']} "
              f"images scored, {summary['errors']} errors, in {summary['files']} files by {summary['model']}")
        print(f"summary: {st.join(summary['output'], SUMMARY_NAME)}")
        return
    rate = f", {summary['images_per_s']} images/s" if summary["images_per_s"] else ""
    print(f"\nscored {summary['scored']} of {summary['images']} images, {summary['errors']} errors "
          f"({summary['images_this_run']} this run in {summary['elapsed_s']:.1f}s{rate})")
    if summary["errors_by_reason"]:
        print("errors: " + "; ".join(f"{n} {r}" for r, n in summary["errors_by_reason"].items()))
    print(f"parquet: {summary['files']} files in {summary['output']} "
          f"({summary['files_written']} written now, {summary['files_kept']} kept from an earlier run"
          + (f", {summary['files_rescored']} of an earlier run scored again" if summary.get("files_rescored") else "")
          + (f", {summary['stale_files_removed']} of an earlier plan removed" if summary.get("stale_files_removed")
             else "") + ")")
    print(f"summary: {st.join(summary['output'], SUMMARY_NAME)}")


if __name__ == "__main__":
    sys.exit(run(main))
