"""Scoring at bucket scale: per-row overhead and driver memory against the
number of input URIs.

    python -m tests.benchmarks.run score_scale

Inputs are URI lists of files that do not exist, so each row costs only the
job's own per-row work (listing/planning, a failed stat, an error row, the
Parquet write): no decoding, no model call. Runs, side by side in one run:

(a) per-row overhead: ``python -m jobs.score`` on a list of ``OVERHEAD_ROWS``
    missing files; rows per second of the job's own time (``elapsed_s`` in
    ``_summary.json``: planning, scoring, publishing; Ray start-up excluded);
(b) the same with the implementation at ``BASELINE`` (taken from this
    repository's history with ``git archive``): every file, missing or not,
    handed to a fetch thread;
(c) driver memory: the job on lists of ``SMALL`` and ``LARGE`` missing files;
    the driver's peak resident memory (``VmHWM`` of the driver process).

Each job runs in its own process with its own local Ray, like a user's run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
BASELINE = "4ffb088"  # before local missing files were stat-ed in the calling thread (decode.iter_files)
OVERHEAD_ROWS = 200_000
SMALL, LARGE = 100_000, 1_000_000
TARGETS = {"rows_per_s_min": 8000, "rss_ratio_max": 1.3}

# Runs the job's main in this process and reports the driver's own peak RSS:
# VmHWM, the high-water mark of this process image (ru_maxrss would carry over
# the peak of the process that started it, which survives exec).
DRIVER = """
import json, sys
from jobs import score
from jobs._cli import run
code = run(score.main, sys.argv[2:])
with open("/proc/self/status") as status:
    hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "maxrss_kb": hwm}, f)
sys.exit(code)
"""


def write_missing_list(path: str, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(f"/nonexistent/scoring-bench/{i // 1000:04d}/img-{i:08d}.jpg\n")


def missing_files_run(n: int, workdir: str, model_dir: str, *, address: Optional[str] = None,
                      code_root: Optional[str] = None) -> dict:
    """Score a list of ``n`` missing files; checks one error row per URI.
    ``code_root``: another checkout of the project to run (the baseline)."""
    listing = os.path.join(workdir, f"missing-{n}.txt")
    if not os.path.exists(listing):
        write_missing_list(listing, n)
    out = tempfile.mkdtemp(prefix=f"out-{n}-", dir=workdir)
    stats = os.path.join(workdir, f"driver-{os.path.basename(out)}.json")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=code_root or str(ROOT))
    # Parts of 100,000 rows both ways (the baseline's default; score.part_mb came later).
    cmd = [sys.executable, "-c", DRIVER, stats, "--model", model_dir, "--images", listing, "--output", out, "-q",
           "--rows-per-file", "100000"]
    if address:
        cmd += ["--address", address]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=code_root or ROOT, env=env, capture_output=True, text=True, timeout=7200)
    wall = time.perf_counter() - started
    # Every file is missing by design: a job that scored nothing exits 1 (older code: 0).
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and "could be scored" not in proc.stderr):
        raise RuntimeError(f"score job failed ({proc.returncode}): {proc.stderr[-3000:]}")
    summary = json.loads(Path(out, "_summary.json").read_text())
    rows = _count_rows(out, n)
    driver = json.loads(Path(stats).read_text())
    return {"rows": rows, "errors": summary["errors_by_reason"], "elapsed_s": summary["elapsed_s"],
            "wall_s": round(wall, 1), "rows_per_s": round(rows / summary["elapsed_s"], 1),
            "driver_peak_rss_mb": round(driver["maxrss_kb"] / 1024, 1)}


def _count_rows(out: str, n: int) -> int:
    import pyarrow.dataset as ds

    table = ds.dataset(out, format="parquet").to_table(columns=["uri", "error"])
    uris = table.column("uri")
    if table.num_rows != n or len(uris.unique()) != n:
        raise RuntimeError(f"{table.num_rows} rows ({len(uris.unique())} distinct) for {n} inputs")
    return table.num_rows


def baseline_tree(folder: str) -> str:
    """The project at BASELINE (pipeline/ and jobs/), unpacked into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    archive = os.path.join(folder, "baseline.tar")
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", archive, BASELINE, "pipeline", "jobs"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return folder


def run() -> dict:
    from tests.benchmarks.bench_score import build_model_dir

    with tempfile.TemporaryDirectory(prefix="bench-score-scale-") as tmp:
        model_dir = build_model_dir(os.path.join(tmp, "run"))
        legacy = baseline_tree(os.path.join(tmp, "baseline"))
        runs = {}
        for name, n, root in (("overhead", OVERHEAD_ROWS, None), ("overhead_baseline", OVERHEAD_ROWS, legacy),
                              ("small", SMALL, None), ("large", LARGE, None)):
            runs[name] = missing_files_run(n, tmp, model_dir, code_root=root)
            print(f"score_scale {name} ({n} URIs): {runs[name]}", file=sys.stderr, flush=True)
    return {
        "measured_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": len(os.sched_getaffinity(0)),
        "baseline": BASELINE,
        "runs": runs,
        "overhead_vs_baseline": round(runs["overhead"]["rows_per_s"] / runs["overhead_baseline"]["rows_per_s"], 2),
        "rss_ratio": round(runs["large"]["driver_peak_rss_mb"] / runs["small"]["driver_peak_rss_mb"], 2),
        "targets": TARGETS,
    }


def markdown(results: dict) -> str:
    r, t = results["runs"], results["targets"]

    def mark(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    rate, base = r["overhead"]["rows_per_s"], r["overhead_baseline"]["rows_per_s"]
    return f"""## Scoring at bucket scale

Measured {results['measured_at']} on {results['cpus']} CPUs. Inputs are URI lists (`.txt`) of files that do
not exist: every row is an error row, so the figures are the job's own per-row cost (planning, a failed
stat, the row, the Parquet write), with no decoding and no model call. Each job runs as its own process
with its own local Ray; rows/s is over the job's `elapsed_s` (Ray's start excluded, planning included).

| run | URIs | rows/s | driver peak RSS MB | job s | ratio | target | |
|---|---:|---:|---:|---:|---|---|---|
| (a) per-row overhead | {OVERHEAD_ROWS:,} | {rate} | {r['overhead']['driver_peak_rss_mb']} | {r['overhead']['elapsed_s']} | | ≥ {t['rows_per_s_min']:,} rows/s | {mark(rate >= t['rows_per_s_min'])} |
| (b) the same, implementation at `{results['baseline']}` (each missing file via a fetch thread) | {OVERHEAD_ROWS:,} | {base} | {r['overhead_baseline']['driver_peak_rss_mb']} | {r['overhead_baseline']['elapsed_s']} | (a)/(b) = {results['overhead_vs_baseline']:.2f} | | |
| (c) driver memory, small list | {SMALL:,} | {r['small']['rows_per_s']} | {r['small']['driver_peak_rss_mb']} | {r['small']['elapsed_s']} | | | |
| (c) driver memory, large list | {LARGE:,} | {r['large']['rows_per_s']} | {r['large']['driver_peak_rss_mb']} | {r['large']['elapsed_s']} | large/small = {results['rss_ratio']:.2f} | ≤ {t['rss_ratio_max']} | {mark(results['rss_ratio'] <= t['rss_ratio_max'])} |

- Driver peak RSS is `VmHWM` (the high-water mark of resident memory) of the job's driver process alone (Ray's services and workers are
  other processes). The driver holds one small descriptor per part; the list is read, checked and
  split into parts by Ray Data tasks that write `OUTPUT/_plan/`, and each part's rows are written by
  the task that scored them.
- At 200,000 URIs a fixed cost dominates: 100k, 200k and 1M URIs take about 26, 36 and 76 s here, so about
  26 s is fixed (reading and hashing the list with Ray Data, starting the predictor, Ray's scheduling) and
  each further row about 50 µs (about 20,000 rows/s). (a) and (b) differ in decode (a missing local file's
  stat in the calling thread: 18 vs 134 µs a file in `iter_files` on this machine), which the job's
  elapsed time at this size does not show; the machine was shared with other work during these runs.
- The correctness of (a) at 500 rows is part of `make test`
  (`tests/test_score_scale.py::test_per_row_overhead_run_is_correct_at_small_size`).
"""
