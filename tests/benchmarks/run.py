"""Run the benchmarks and rewrite BENCHMARKS.md (`make bench`).

    python -m tests.benchmarks.run [NAME ...]     # e.g. `... run prepare`

Runs every ``tests/benchmarks/bench_<name>.py``, or only the named ones. Each
module has ``run() -> dict`` (its results) and ``markdown(results) -> str`` (a
section starting with ``## <title>``). Each section is printed, its raw results
are saved as ``tests/benchmarks/results/<name>.json``, and BENCHMARKS.md is
rewritten: a fresh intro describing this machine, then every section, where the
sections of benchmarks not run this time are kept from the previous file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.metadata
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

HERE = Path(__file__).resolve().parent
REPORT = HERE.parents[1] / "BENCHMARKS.md"
RESULTS = HERE / "results"
SECTION = re.compile(r"<!-- bench:(?P<name>[\w-]+) -->\n(?P<body>.*?)\n<!-- /bench:(?P=name) -->", re.S)


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def select(names: Sequence[str]) -> list[str]:
    known = available()
    wanted = [n.removeprefix("bench_").removesuffix(".py") for n in names] or known
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"unknown benchmark: {', '.join(unknown)} (available: {', '.join(known)})")
    return wanted


def machine() -> dict:
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": importlib.metadata.version("tensorflow"),
        "ray": importlib.metadata.version("ray"),
    }


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return platform.processor() or None


def _memory_gib() -> Optional[float]:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        return None


def intro(info: dict) -> str:
    return f"""# Benchmarks

Written by `make bench` (`python -m tests.benchmarks.run [NAME ...]`, for example
`.venv/bin/python -m tests.benchmarks.run prepare`). Running a benchmark rewrites
its section below and keeps the others; raw results are in
`tests/benchmarks/results/<name>.json`, from which `--render` rewrites the
sections without measuring again. Performance is stated as ratios measured
side by side in one run, never as timing assertions in tests.

Latest run: {info['date']} on {info['cpus']} CPUs ({info['cpu_model'] or 'unknown CPU'}),
{info['memory_gib']} GiB memory, {info['os']}; Python {info['python']},
TensorFlow {info['tensorflow']}, Ray {info['ray']}."""


def read_sections(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return {m["name"]: m["body"] for m in SECTION.finditer(path.read_text())}


def render(info: dict, sections: dict[str, str]) -> str:
    blocks = [intro(info)]
    blocks += [f"<!-- bench:{name} -->\n{sections[name]}\n<!-- /bench:{name} -->" for name in sorted(sections)]
    return "\n\n".join(blocks) + "\n"


def run_one(name: str, info: dict) -> str:
    module = importlib.import_module(f"tests.benchmarks.bench_{name}")
    results = module.run()
    RESULTS.mkdir(exist_ok=True)
    raw = {"machine": info, "results": results}
    (RESULTS / f"{name}.json").write_text(json.dumps(raw, indent=2) + "\n")
    return module.markdown(results).strip()


def _latest_saved_run() -> dict:
    """The machine record of the most recent saved result: what "Latest run" names."""
    runs = [json.loads(path.read_text())["machine"] for path in RESULTS.glob("*.json")]
    return max(runs, key=lambda run: run["date"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tests.benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all of {available()})")
    parser.add_argument("--render", action="store_true",
                        help="rewrite BENCHMARKS.md from the saved results without measuring again")
    args = parser.parse_args(argv)
    info = _latest_saved_run() if args.render else machine()
    for name in select(args.names):
        if args.render:
            saved = json.loads((RESULTS / f"{name}.json").read_text())
            section = importlib.import_module(f"tests.benchmarks.bench_{name}").markdown(saved["results"]).strip()
        else:
            section = run_one(name, info)
        print(f"\n{section}\n", flush=True)
        # Read just before writing: keeps sections that others rewrote meanwhile.
        sections = {**read_sections(REPORT), name: section}
        REPORT.write_text(render(info, sections))
    print(f"wrote {REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
