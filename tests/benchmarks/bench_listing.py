"""Listing a flat prefix: one listing task for the whole level
(``split=False``, as before key ranges) against the level split into key
ranges listed in parallel; and the time a score job takes to commit its first
part for a flat prefix of 10x more keys. Side by side in one run:

    python -m tests.benchmarks.run listing

(a) ``KEYS`` empty objects in one folder on ``tests/benchmarks/s3server.py``
    (a purpose-built S3-protocol server in its own process: keys held sorted,
    each page found by bisection, requests served by threads in parallel),
    without added latency and with ``LATENCY_S`` per request; each way timed
    from the first request to the last part descriptor
    (``listing.list_prefix``, 1,000 keys a page, ``list_concurrency`` 16):
    one task, then split with Ray's worker processes started as it goes,
    then split with them running (``WAYS``), ``ROUNDS`` rounds after an
    untimed one, the best of each reported, with the requests the server
    answered;
(b) the same at ``MOTO_KEYS`` keys on moto's server (in this process), one
    round: the earlier measurement, for comparison;
(c) ``python -m jobs.score`` (its own process and local Ray, like a user's
    run) on flat prefixes of ``FIRST_PART_KEYS`` (small, 10x larger) empty
    objects on the bench server with ``LATENCY_S``, ``--rows-per-file
    FIRST_PART_ROWS``: the seconds from starting the job to the first part
    file in its (local) output; the job is then interrupted (every row would
    be an "empty file" error row).
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KEYS = int(os.environ.get("BENCH_LISTING_KEYS", "200000"))
MOTO_KEYS = int(os.environ.get("BENCH_LISTING_MOTO_KEYS", "20000"))
LATENCY_S = 0.03  # added to every request: S3 answers a list page in tens of ms
ROUNDS = 2
FIRST_PART_KEYS = (20_000, 200_000)
FIRST_PART_ROWS = 1000
TARGETS = {"speedup_min": 3.0, "first_part_ratio_max": 1.3}
ROOT = Path(__file__).resolve().parents[2]


def _keys(n: int) -> list[str]:
    return [f"flat/img-{i:07d}.jpg" for i in range(n)]


def _aws_env() -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


WAYS = (("single", False), ("split_cold", True), ("split", True))


def _time_listing(endpoint: str, keys: int, rounds: int, server=None) -> dict:
    """Each way of ``WAYS`` in turn, ``rounds`` times; {"seconds", "best_s",
    "tasks", "requests"}. "split_cold" follows the one task's run, during
    which Ray stopped the idle worker processes beyond one per CPU (after 1 s
    idle), so it starts processes for its tasks as it goes; "split" follows
    it, with them running: the listing itself, as in a job that lists more
    than one level or range (a job starts its processes once)."""
    from pipeline.config import StorageConfig
    from pipeline.scoring import listing

    storage = StorageConfig(endpoint_url=endpoint)
    with tempfile.TemporaryDirectory() as plan_dir:  # untimed: Ray's worker processes started and warm
        listing.list_prefix("s3://bench/flat", storage, plan_dir, 100_000, 16, split=True)
    times: dict[str, list[float]] = {name: [] for name, _ in WAYS}
    tasks: dict[str, int] = {}
    requests: dict[str, int] = {}
    for _ in range(rounds):
        for name, split in WAYS:
            with tempfile.TemporaryDirectory() as plan_dir:
                if server is not None:
                    server.reset()
                t0 = time.perf_counter()
                parts, _, n = listing.list_prefix("s3://bench/flat", storage, plan_dir, 100_000, 16, split=split)
                times[name].append(round(time.perf_counter() - t0, 3))
                assert sum(p["rows"] for p in parts) == keys
                tasks[name] = n
                if server is not None:
                    requests[name] = sum(server.stats().values())
    best = {k: min(v) for k, v in times.items()}
    return {"keys": keys, "rounds": rounds, "seconds": times, "best_s": best, "tasks": tasks, "requests": requests,
            "speedup": round(best["single"] / best["split"], 2),
            "speedup_cold": round(best["single"] / best["split_cold"], 2)}


def _moto(keys: int) -> dict:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://127.0.0.1:%d" % server.get_host_and_port()[1]
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="bench")
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda k: client.put_object(Bucket="bench", Key=k, Body=b""), _keys(keys)))
        return _time_listing(endpoint, keys, 1)
    finally:
        server.stop()


def first_part(keys: int, model_dir: str, workdir: str) -> dict:
    """Seconds from starting ``python -m jobs.score`` on a flat prefix of
    ``keys`` empty objects to its first part file; the job is then interrupted."""
    from tests.benchmarks.s3server import S3Server

    with S3Server({"bench": _keys(keys)}, latency_s=LATENCY_S) as server:
        out = tempfile.mkdtemp(prefix=f"first-part-{keys}-", dir=workdir)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT),
                   AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_DEFAULT_REGION="us-east-1")
        cmd = [sys.executable, "-m", "jobs.score", "--model", model_dir, "--images", "s3://bench/flat", "--output",
               out, "--rows-per-file", str(FIRST_PART_ROWS)]
        log = open(os.path.join(workdir, f"first-part-{keys}.log"), "w")
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        first = None
        try:
            while first is None and proc.poll() is None and time.perf_counter() - started < 600:
                if glob.glob(os.path.join(out, "part-*.parquet")):
                    first = time.perf_counter() - started
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            log.close()
        if first is None:
            raise RuntimeError(f"no part after {time.perf_counter() - started:.0f} s (exit {proc.returncode}): "
                               + Path(log.name).read_text()[-3000:])
        import pyarrow.parquet as pq

        part = sorted(glob.glob(os.path.join(out, "part-*.parquet")))[0]
        rows = pq.read_table(part, columns=["uri"]).num_rows
        return {"keys": keys, "first_part_s": round(first, 2), "rows": rows, "requests": server.stats()}


def run() -> dict:
    import ray

    from tests.benchmarks.bench_score import build_model_dir
    from tests.benchmarks.s3server import S3Server

    _aws_env()
    results: dict = {"latency_s": LATENCY_S, "targets": TARGETS, "first_part_rows": FIRST_PART_ROWS}
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, logging_level="WARNING")
    try:
        for name, latency in (("bench", 0.0), ("bench_latency", LATENCY_S)):
            with S3Server({"bench": _keys(KEYS)}, latency_s=latency) as server:
                results[name] = _time_listing(server.endpoint, KEYS, ROUNDS, server)
            print(f"listing {name}: {results[name]}", file=sys.stderr, flush=True)
        if MOTO_KEYS:
            results["moto"] = _moto(MOTO_KEYS)
            print(f"listing moto: {results['moto']}", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    with tempfile.TemporaryDirectory(prefix="bench-first-part-") as tmp:
        model_dir = build_model_dir(os.path.join(tmp, "model"))
        results["first_part"] = [first_part(n, model_dir, tmp) for n in FIRST_PART_KEYS]
    small, large = results["first_part"]
    results["first_part_ratio"] = round(large["first_part_s"] / small["first_part_s"], 2)
    print(f"listing first part: {results['first_part']}", file=sys.stderr, flush=True)
    return results


def markdown(r: dict) -> str:
    t = r["targets"]

    def mark(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    def rows(name: str, where: str) -> list[str]:
        x = r[name]
        req = x.get("requests", {})
        return [f"| {where}, {x['keys']:,} keys | one task for the level | {x['tasks']['single']} | "
                f"{req.get('single', '–')} | {x['best_s']['single']:.2f} | | |",
                f"| {where}, {x['keys']:,} keys | split, worker processes started as it goes | "
                f"{x['tasks']['split_cold']} | {req.get('split_cold', '–')} | {x['best_s']['split_cold']:.2f} | "
                f"{x['speedup_cold']}x | |",
                f"| {where}, {x['keys']:,} keys | split into key ranges | {x['tasks']['split']} | "
                f"{req.get('split', '–')} | {x['best_s']['split']:.2f} | **{x['speedup']}x** | "
                + (f"≥ {t['speedup_min']:g}x: {mark(x['speedup'] >= t['speedup_min'])}" if name == "bench_latency"
                   else "") + " |"]

    ms = round(r["latency_s"] * 1000)
    small, large = r["first_part"]
    lines = [
        "## Listing a flat prefix: one task vs key ranges",
        "",
        "Keys `flat/img-NNNNNNN.jpg` (empty objects) in one folder, listed by `listing.list_prefix` (1,000 keys a "
        "page, `list_concurrency` 16, local Ray on this machine's CPUs), the three ways in turn, best of "
        f"{r['bench']['rounds']} rounds (moto: 1 round) (`tests/benchmarks/bench_listing.py`). Bench server: "
        "`tests/benchmarks/s3server.py`, an S3-protocol server in its own process that holds the keys sorted "
        "and answers each `ListObjectsV2` page by bisection (constant cost per page, like S3), its threads "
        f"serving requests in parallel; \"+{ms} ms\" adds a fixed {ms} ms to every request, slept in the "
        "request's own thread, standing for S3's own time to answer (list pages take tens of ms there). "
        "Requests: as counted by the server (pages, `StartAfter` probes).",
        "",
        "| server | listing | tasks | requests | seconds | speed-up | target |",
        "|---|---|---:|---:|---:|---:|---|",
        *rows("bench", "bench server, no latency"),
        *rows("bench_latency", f"bench server, +{ms} ms a request"),
        *(rows("moto", "moto (in the bench process)") if "moto" in r else []),
        "",
        f"Time to the first committed part, `python -m jobs.score` (own process, own local Ray) on a flat prefix "
        f"of empty objects on the bench server (+{ms} ms a request), `--rows-per-file {r['first_part_rows']:,}`, "
        "local output; seconds from starting the job (interpreter, Ray and predictor start included) to the first "
        "`part-*.parquet` in the output:",
        "",
        "| keys | first part committed (s) | rows in it | ratio | target |",
        "|---:|---:|---:|---:|---|",
        f"| {small['keys']:,} | {small['first_part_s']:.2f} | {small['rows']:,} | | |",
        f"| {large['keys']:,} | {large['first_part_s']:.2f} | {large['rows']:,} | **{r['first_part_ratio']}x** | "
        f"≤ {t['first_part_ratio_max']}x: {mark(r['first_part_ratio'] <= t['first_part_ratio_max'])} |",
        "",
        "What the bench server models: a read-only bucket, path-style `ListObjectsV2` (prefix, delimiter, "
        "start-after, continuation-token, max-keys, URL encoding) with S3's XML, parsed by s3fs/aiobotocore "
        "unchanged (checked against moto's answers), HEAD/GET of objects (404 `NoSuchKey`), a page costing "
        "about the same at any bucket size, and parallel requests served in parallel. What it does not model: "
        "S3's variance in latency, throttling (503 SlowDown) and errors of the moment, bandwidth, signatures, "
        "writes. The client side is real: Ray tasks parsing every page's XML, which on this machine's CPUs "
        "bounds what parallel listing gains when the server adds no latency. moto answers each page by "
        "scanning the whole bucket and shares this process's interpreter lock, so its pages cost more as the "
        "bucket grows and parallel requests hardly overlap: there the split loses.",
        "",
        "What a page costs: the client's CPU bounds the split on these 2 CPUs. Measured in one process "
        "(`list_level` over 50 pages of 1,000 keys): 33 ms of CPU a page before, of which about 12 ms Python's "
        "cycle collector (a page is some 10,000 new objects, which set off collections that walk every object "
        "of the process) and about 9 ms botocore's generic walk of the response model, member by member for "
        "each key; now 15 ms (10 ms the request and its parsing): `pipeline/storage/s3parse.py` turns a page's "
        "keys into dicts with the model looked up once a page (results equal to botocore's parser, tested) "
        "and a listing task runs with the collector paused (what a page leaves is freed by reference "
        "counting). A task splitting a level sends its `StartAfter` probes 8 at a time (three round trips, "
        "about 0.2 s at +30 ms; one after another they took 0.4-0.8 s before other tasks started), and "
        "at most 3 listing tasks per CPU run at once (a task waits on the server for most of each page).",
        "",
        "Split \"with worker processes started as it goes\": Ray stops idle worker processes beyond one per "
        "CPU after about a second, so after the one task's run the split starts a process for each of its "
        "first tasks (Python, Ray, pyarrow and botocore's S3 model: 1-2 s of CPU each here), sharing the 2 "
        "CPUs with the listing; a job pays that once, not per level or range. The bench server answers as "
        "S3 would on its side: Nagle's algorithm off (before, a small answer's body waited for the client's "
        "delayed ACK, 44 ms for a one-key probe) and each key's XML built once (its CPU is not the client's). "
        "Without added latency one task is already CPU-bound (its 3.5 s are about 17 ms of CPU a page), so on "
        "2 CPUs no split can reach 2x there; the target is read on the row with S3's page times, where the "
        "ranges' requests overlap.",
        "",
        "What the first part waited for at 200,000 keys before (1.95x): the driver's check of the prefix "
        "before Ray starts (`storage.check_source`) asked s3fs whether it is a folder, and s3fs's `isdir` "
        "lists the whole level, every page, into its cache before it answers: about 200 requests one after "
        "another (21 s at +30 ms) before anything started. The check is now one `ListObjectsV2` of at most "
        "one key (a HEAD only when nothing is there), and the driver's first look at the level stops at its "
        "first page, so what is left of the difference is the listing tasks' page parsing sharing these 2 "
        "CPUs with the predictor's model load and the first part's decode.",
    ]
    return "\n".join(lines)
