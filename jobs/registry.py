"""Look after the model registry: which versions exist and which is in production.

    python -m jobs.registry list     --registry URI --name NAME
    python -m jobs.registry show     --registry URI --name NAME [--version V]
    python -m jobs.registry promote  --registry URI --name NAME --version V
    python -m jobs.registry rollback --registry URI --name NAME
    python -m jobs.registry promote  --registry URI --name NAME --version V --dry-run

`show` prints the version's record with its lineage (data manifest digest, code,
libraries, recipe, warm-start parent) and "chain": the parents' lineages, nearest
first. With tracking.mlflow_model_name set (--set or --config), promote and
rollback also move that MLflow registered model's alias (tracking.mlflow_alias).

Here --version names a model version; `python -m jobs.registry --version` (or -V)
alone prints the package version.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from jobs._cli import dry_run_report, make_parser, resolve_config, run, setup_logging
from pipeline import registry as reg
from pipeline import storage as st
from pipeline.errors import UsageError
from pipeline.tracking import lineage, mlflow_runs


def main(argv: Sequence[str]) -> int:
    if list(argv) == ["--version"]:
        argv = ["-V"]  # alone, --version is the package's
    parser = make_parser("jobs.registry", __doc__, version_flags=("-V",))
    parser.add_argument("action", choices=["list", "show", "promote", "rollback"])
    parser.add_argument("--registry", required=True, help="registry URI")
    parser.add_argument("--name", required=True, help="model name")
    parser.add_argument("--version", help="model version for show (default: production) and promote")
    args = parser.parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    cfg = resolve_config(args, {})
    storage, uri, name = cfg.storage, args.registry, args.name
    if args.dry_run:
        with st.read_only():
            lines = plan_action(args.action, uri, name, args.version, storage)
        return dry_run_report("jobs.registry", lines)

    if args.action == "list":
        print_table(reg.list_versions(uri, name, storage), reg.read_production(uri, name, storage))
    elif args.action == "show":
        pointer = reg.read_production(uri, name, storage)
        version = args.version or (pointer or {}).get("version")
        if not version:
            raise UsageError(f"'{name}' has no production version; pass --version")
        record = reg.get_version(uri, name, version, storage)
        record["production"] = bool(pointer and pointer["version"] == version)
        record["uri"] = reg.version_uri(uri, name, version)
        # Where it came from: the warm-start parents' lineages, nearest first.
        record["chain"] = lineage.chain(record.get("lineage"), storage)
        print(json.dumps(record, indent=2))
    elif args.action == "promote":
        if not args.version:
            raise UsageError("promote needs --version")
        pointer = reg.promote(uri, name, args.version, storage, reason="promoted by hand")
        print(f"production of '{name}' is now {pointer['version']}")
        move_mlflow_alias(cfg, uri, name, pointer["version"])
    else:
        pointer = reg.rollback(uri, name, storage)
        print(f"production of '{name}' rolled back to {pointer['version']}")
        move_mlflow_alias(cfg, uri, name, pointer["version"])
    return 0


def move_mlflow_alias(cfg, uri: str, name: str, version: str) -> None:
    """With tracking.mlflow_model_name: the MLflow alias follows production."""
    if cfg.tracking.mlflow_model_name:
        moved = mlflow_runs.set_production_alias(cfg, uri, name, version, reg.version_uri(uri, name, version))
        if moved:
            print(f"mlflow: model '{moved['model']}' alias '{moved['alias']}' -> version {moved['version']}")


def plan_action(action: str, uri: str, name: str, version, storage) -> list[str]:
    """What ``action`` would do, checked against the registry as it is now."""
    pointer = reg.read_production(uri, name, storage)
    current = (pointer or {}).get("version")
    if action == "list":
        return [f"list the {len(reg.list_versions(uri, name, storage))} versions of '{name}' in {uri}"]
    if action == "show":
        version = version or current
        if not version:
            raise UsageError(f"'{name}' has no production version; pass --version")
        reg.get_version(uri, name, version, storage)
        return [f"show version {version} of '{name}'"]
    if action == "promote":
        if not version:
            raise UsageError("promote needs --version")
        reg.get_version(uri, name, version, storage)
        return [f"make version {version} the production version of '{name}' (now: {current or 'none'})"]
    if not pointer or not pointer.get("history"):
        raise UsageError(f"'{name}' has no earlier production version to roll back to")
    previous = pointer["history"][-1]
    reg.get_version(uri, name, previous, storage)
    return [f"roll '{name}' back from version {current} to {previous}"]


def print_table(versions: list[dict], pointer) -> None:
    if not versions:
        print("no versions")
        return
    prod = pointer["version"] if pointer else None
    print(f"  {'version':<24} {'created':<21} {'accuracy':>8} {'top-k':>7} {'images':>7}  run")
    for v in versions:
        m = v.get("metrics", {})
        mark = "*" if v["version"] == prod else " "
        acc = f"{m['accuracy']:.4f}" if "accuracy" in m else "-"
        topk = f"{m['top_k_accuracy']:.4f}" if "top_k_accuracy" in m else "-"
        print(f"{mark} {v['version']:<24} {v['created']:<21} {acc:>8} {topk:>7} {m.get('examples', '-'):>7}  {v['run']}")
    print("(* production)" if prod else "(no production version)")


if __name__ == "__main__":
    sys.exit(run(main))
