"""Look after the model registry: which versions exist and which is in production.

    python -m jobs.registry list     --registry URI --name NAME
    python -m jobs.registry show     --registry URI --name NAME [--version V]
    python -m jobs.registry promote  --registry URI --name NAME --version V
    python -m jobs.registry rollback --registry URI --name NAME
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from jobs._cli import make_parser, resolve_config, run, setup_logging
from pipeline import registry as reg
from pipeline.errors import UsageError


def main(argv: Sequence[str]) -> int:
    parser = make_parser("jobs.registry", __doc__.splitlines()[0])
    parser.add_argument("action", choices=["list", "show", "promote", "rollback"])
    parser.add_argument("--registry", required=True, help="registry URI")
    parser.add_argument("--name", required=True, help="model name")
    parser.add_argument("--version", help="version for show (default: production) and promote")
    args = parser.parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    cfg = resolve_config(args, {})
    storage, uri, name = cfg.storage, args.registry, args.name

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
        print(json.dumps(record, indent=2))
    elif args.action == "promote":
        if not args.version:
            raise UsageError("promote needs --version")
        pointer = reg.promote(uri, name, args.version, storage, reason="promoted by hand")
        print(f"production of '{name}' is now {pointer['version']}")
    else:
        pointer = reg.rollback(uri, name, storage)
        print(f"production of '{name}' rolled back to {pointer['version']}")
    return 0


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
