"""Fine-tune InceptionV3 on prepared shards with Ray Train + MultiWorkerMirroredStrategy.

    python -m jobs.train --data s3://bucket/shards --output s3://bucket/runs/run-1 [--config FILE] [--set k=v ...]
    python -m jobs.train --data s3://bucket/shards --output s3://bucket/runs/run-2 \
        --config jobs/configs/inceptionv3_imagenet.yaml --registry s3://bucket/registry --name flowers
    python -m jobs.train --data demo_output/shards --output demo_output/runs/try --config jobs/configs/demo.yaml --dry-run

Re-running the same command with the same --output resumes an interrupted run
(a resume with another config or data is refused: train.allow_changed_resume).
One job at a time writes a run directory (``_lease.json``).
With --registry and --name the run is registered and promoted to production
when it passes the gate (registry.tolerance, train.min_val_accuracy).
"""

from __future__ import annotations

import sys
from typing import Sequence

from jobs._cli import dry_run_report, make_parser, resolve_config, run, setup_logging
from pipeline import storage as st
from pipeline.errors import QualityGateFailed
from pipeline.storage.lease import OutputLease
from pipeline.training.driver import (check_quality_gate, lease_args, plan_training, record_attempt, run_training,
                                      starts_own_ray)
from pipeline.runtime.cluster import ray_target, start_ray


def main(argv: Sequence[str]) -> int:
    parser = make_parser("jobs.train", __doc__)
    parser.add_argument("--data", required=True, help="prepared shards (folder holding manifest.json)")
    parser.add_argument("--output", required=True, help="run directory (local path or fsspec URI)")
    parser.add_argument("--registry", help="register the run in this model registry (any fsspec URI)")
    parser.add_argument("--name", help="model name in the registry")
    args = parser.parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    cfg = resolve_config(args, {"registry.uri": args.registry, "registry.name": args.name})
    if args.dry_run:
        with st.read_only():
            plan = plan_training(cfg, args.data, args.output)
        return dry_run_report("jobs.train", describe_plan(cfg, plan))
    plan = plan_training(cfg, args.data, args.output)
    lease = OutputLease(plan.output, lease_args(cfg, plan), cfg.storage, cfg.train.lease_timeout_s,
                        job="training", wait_s=cfg.train.lease_wait_s).acquire()
    try:
        record_attempt(cfg, plan)
        own_ray = starts_own_ray(cfg)
        start_ray(cfg)
        summary = run_training(cfg, plan, lease=lease, own_ray=own_ray,
                               export=serving_export(cfg) if cfg.train.export else None)
    finally:
        lease.release()
    print_summary(summary)
    gate = check_quality_gate(cfg, summary)
    if gate:
        raise QualityGateFailed(gate)
    return 0


def serving_export(cfg):
    """What the training driver calls with a published run when ``train.export``
    is on: ``pipeline.export.export_run`` to RUN/export/ (docs/export.md)."""

    def export(run_dir: str) -> str:
        from pipeline.export import export_run

        return export_run(run_dir, cfg.storage, check=False, top_k=cfg.train.top_k,
                          max_pixels=cfg.prepare.max_pixels)["output"]

    return export


def describe_plan(cfg, plan) -> list[str]:
    splits = plan.manifest["splits"]
    phases = ", ".join(f"{name} {phase.epochs} epochs" for name, phase in cfg.train.phases())
    workers = cfg.scaling.num_workers or "one per GPU (one on a cluster without GPUs)"
    lines = [
        f"train on {plan.data}: {len(plan.manifest['classes'])} classes, {splits['train']['num_examples']} "
        f"training and {splits['validation']['num_examples']} validation images",
        f"{'resume the run' if plan.resuming else 'start a new run'} in {plan.output} "
        f"({'from its last checkpoint' if plan.resuming else 'model, metrics, plots, summary.json'})",
        f"phases: {phases}; base weights: {cfg.model.weights}"
        + (f", warm start from {cfg.model.init_from}" if cfg.model.init_from else ""),
        f"Ray Train workers: {workers}, on {ray_target(cfg)}",
        f"hold the run directory's lease ({plan.output}/_lease.json) while running",
    ]
    if cfg.train.export:
        lines.append(f"write the serving export to {plan.output}/export/ before summary.json (train.export)")
    if plan.changes:
        lines.append("resume with changes (train.allow_changed_resume): " + "; ".join(plan.changes))
    if cfg.train.min_val_accuracy is not None:
        lines.append(f"exit 3 if validation accuracy < train.min_val_accuracy {cfg.train.min_val_accuracy}")
    if cfg.registry.uri:
        lines.append(f"register the run in {cfg.registry.uri}#{cfg.registry.name} and promote it if its accuracy "
                     f">= production's - {cfg.registry.tolerance}")
    return lines


def print_summary(summary: dict) -> None:
    print(f"\n{'phase':<9} {'epoch':>5} {'loss':>8} {'acc':>7} {'val_loss':>9} {'val_acc':>8} {'img/s':>8}")
    for h in summary["history"]:
        def f(key, width, digits=4):
            value = h.get(key)
            return f"{value:>{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"
        print(f"{h['phase']:<9} {h['epoch']:>5} {f('loss', 8)} {f('accuracy', 7)} {f('val_loss', 9)} "
              f"{f('val_accuracy', 8)} {f('images_per_s', 8, 1)}")
    m = summary["metrics"]
    print(f"\nvalidation (inference mode, {m['examples']} images): accuracy {m['accuracy']:.4f}, "
          f"top-{m['top_k']} {m['top_k_accuracy']:.4f}, macro F1 {m['macro_f1']:.4f}")
    extra = " (resumed from a checkpoint)" if summary["resumed"] else ""
    print(f"trained in {summary['train_seconds']:.0f}s on {summary['workers']} worker(s){extra}")
    print(f"model: {summary['model']}")
    print(f"plots: {summary['outputs'].get('training.png')}, {summary['outputs'].get('confusion.png')}")
    reg = summary.get("registry")
    if reg:
        prod = "none" if reg["production_accuracy"] is None else f"{reg['production_accuracy']:.4f}"
        print(f"registry: {reg['registry']}#{reg['name']} version {reg['version']}: accuracy {reg['accuracy']:.4f} "
              f"vs production {prod} -> {'PROMOTED' if reg['promoted'] else 'not promoted'} ({reg['reason']})")


if __name__ == "__main__":
    sys.exit(run(main))
