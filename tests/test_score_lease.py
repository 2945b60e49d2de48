"""One score job per output folder (the output lease), and URI lists that
cannot make the job read what their author could not name: each refusal is
exit 2 with one line, before any Ray work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest

from pipeline.config import StorageConfig
from pipeline.errors import JobFailed, UsageError
from pipeline.storage.lease import LEASE_NAME, OutputLease
from tests import imagefactory as fx
from tests.test_score import ROOT, make_images, tiny_model  # noqa: F401 - the session fixture

ARGS = {"model": "m", "images": "i", "top_k": 3, "rows_per_file": 10}


# ---------------------------------------------------------------- the lease itself (no Ray)


def test_local_lease_is_exclusive_and_a_stale_one_is_taken_over(tmp_path):
    out = str(tmp_path / "out")
    first = OutputLease(out, ARGS, StorageConfig(), timeout_s=60).acquire()
    try:
        record = json.loads((tmp_path / "out" / LEASE_NAME).read_text())
        assert record["holder"] == first.job_id and record["args"] == ARGS
        with pytest.raises(UsageError, match="same arguments"):
            OutputLease(out, ARGS, StorageConfig(), timeout_s=60).acquire()
        with pytest.raises(UsageError, match="other arguments .*top_k 3"):
            OutputLease(out, {**ARGS, "top_k": 5}, StorageConfig(), timeout_s=60).acquire()

        # The holder stops beating (it runs elsewhere and was last heard of long ago).
        record["host"] = "another-host"
        (tmp_path / "out" / LEASE_NAME).write_text(json.dumps(record))
        old = time.time() - 120
        os.utime(tmp_path / "out" / LEASE_NAME, (old, old))
        second = OutputLease(out, {**ARGS, "top_k": 5}, StorageConfig(), timeout_s=60).acquire()
        assert second.previous["holder"] == first.job_id
        first.heartbeat()  # the first job finds out
        with pytest.raises(JobFailed, match=f"lost the output lease on .* to job {second.job_id}"):
            first.check()
        second.release()
        assert not (tmp_path / "out" / LEASE_NAME).exists()
    finally:
        first._stop.set()


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    out = tmp_path / "out"
    out.mkdir()
    import socket

    (out / LEASE_NAME).write_text(json.dumps({"holder": "gone", "host": socket.gethostname(), "pid": dead,
                                              "args": ARGS, "heartbeat": time.time(), "timeout_s": 300}))
    lease = OutputLease(str(out), ARGS, StorageConfig(), timeout_s=300).acquire()
    assert lease.previous["holder"] == "gone"
    lease.release()


# ---------------------------------------------------------------- two jobs on S3


def _score(argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.score", *argv, "-q"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


SCORE_RACER = """
import json, os, sys, time
from jobs import score
from jobs._cli import run
from pipeline.storage import lease
stats_file, ready, go, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
stats, real = {"writes": 0, "lost": 0}, lease.write_if_unchanged

def write_if_unchanged(uri, data, token, storage):
    out = real(uri, data, token, storage)
    if uri.endswith(lease.LEASE_NAME):
        stats["writes"] += 1
        stats["lost"] += out is None  # the lease was not what this job read: another job's came first
    return out

lease.write_if_unchanged = write_if_unchanged
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
code = run(score.main, argv)
with open(stats_file, "w") as f:
    json.dump(stats, f)
sys.exit(code)
"""


@pytest.mark.slow
@pytest.mark.s3
def test_two_jobs_with_different_models_on_one_s3_output(ray_session, tiny_model, atomic_moto, s3_bucket, tmp_path):
    """Two score jobs, started together (both imported, then let go at once),
    on one S3 output: one takes the lease and writes every row, the other loses
    the conditional create of the lease and exits 2 with one line. Each job
    counts the lease writes it lost, so jobs that ran one after the other (both
    would win) fail the test as surely as two that both won the race."""
    fs, bucket = s3_bucket
    count = make_images(f"s3://{bucket}/images", per_class=4)
    other = tmp_path / "other-run"
    shutil.copytree(tiny_model, other)
    out = f"s3://{bucket}/scores"
    address = ray_session.get_runtime_context().gcs_address
    common = ["--images", f"s3://{bucket}/images", "--output", out, "--rows-per-file", "4", "--address", address,
              "-q"]
    go = tmp_path / "go"
    jobs = []
    for i, model in enumerate((tiny_model, str(other))):
        stats, ready = tmp_path / f"stats{i}.json", tmp_path / f"ready{i}"
        proc = subprocess.Popen([sys.executable, "-c", SCORE_RACER, str(stats), str(ready), str(go),
                                 "--model", model, *common], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        jobs.append((stats, ready, proc))
    deadline = time.time() + 120
    while not all(ready.exists() for _, ready, _ in jobs) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [p.communicate(timeout=600) for _, _, p in jobs]
    codes = [p.returncode for _, _, p in jobs]
    assert sorted(codes) == [0, 2], results  # exactly one winner and one clear refusal: never [0, 0]
    stats = [json.loads(s.read_text()) for s, _, _ in jobs]
    winner, loser = codes.index(0), codes.index(2)
    assert stats[loser]["lost"] >= 1, f"the refused job lost no conditional write of the lease: {stats}"
    assert stats[winner]["lost"] == 0, stats
    model = (tiny_model, str(other))[winner]
    loser_err = results[loser][1]
    lines = [line for line in loser_err.splitlines() if line.strip()]
    assert len(lines) == 1 and "is being written by another score job with other arguments" in lines[0], loser_err
    table = pq.read_table(f"{bucket}/scores", filesystem=fs)
    assert table.num_rows == count and len(set(table["uri"].to_pylist())) == count
    assert set(table["model"].to_pylist()) == {model}
    assert not fs.exists(f"{bucket}/scores/{LEASE_NAME}")  # released at the end


@pytest.mark.slow
@pytest.mark.s3
def test_a_live_s3_lease_refuses_and_a_stale_one_is_taken_over(ray_session, tiny_model, s3_bucket):
    fs, bucket = s3_bucket
    count = make_images(f"s3://{bucket}/images", per_class=2)
    out = f"s3://{bucket}/scores"
    held = {"holder": "elsewhere", "host": "another-host", "pid": 1, "args": {"model": "x"},
            "heartbeat": time.time(), "timeout_s": 1}
    fs.pipe(f"{bucket}/scores/{LEASE_NAME}", json.dumps(held).encode())
    address = ray_session.get_runtime_context().gcs_address
    argv = ["--model", tiny_model, "--images", f"s3://{bucket}/images", "--output", out, "--address", address]

    # Live: its heartbeat is younger than our timeout (300 s by default).
    proc = _score(argv)
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, err
    assert "job elsewhere on another-host" in lines[0] and "other arguments" in lines[0]
    assert not fs.glob(f"{bucket}/scores/*.parquet")

    # Stale: silent for longer than the timeout (by the store's clock).
    time.sleep(2.5)
    proc = _score([*argv, "--set", "score.lease_timeout_s=2"])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    table = pq.read_table(f"{bucket}/scores", filesystem=fs)
    assert table.num_rows == count and set(table["model"].to_pylist()) == {tiny_model}


# ---------------------------------------------------------------- hostile list entries


class _Counting(BaseHTTPRequestHandler):
    requests: list = []

    def do_GET(self):  # noqa: N802 - http.server API
        type(self).requests.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(fx.rgb_jpeg())

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


USAGE_SCRIPT = """
import json, sys
from jobs import score
from jobs._cli import run
codes = [run(score.main, argv) for argv in json.loads(sys.argv[1])]
print(json.dumps({"codes": codes, "ray": "ray" in sys.modules, "tensorflow": "tensorflow" in sys.modules}))
"""


def test_hostile_list_entries_are_refused_before_any_work(tiny_model, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    _Counting.requests = []
    try:
        lists = tmp_path / "lists" / "deep"
        lists.mkdir(parents=True)
        fx.write_tree(str(lists), {"ok.jpg": fx.rgb_jpeg()})
        (lists / "climb.txt").write_text("ok.jpg\n../../etc/passwd\n")
        (lists / "url.txt").write_text(f"ok.jpg\nhttp://127.0.0.1:{port}/x.jpg\n")
        (lists / "url.csv").write_text(f"uri\nhttp://127.0.0.1:{port}/y.jpg\n")
        (lists / "dots.txt").write_text("sub/../../ok.jpg\n")
        cases = {
            "climbs above the list's folder": "climb.txt",
            "uses http://": "url.txt",
            "uses http:// ": "url.csv",
            "climbs above the list's folder ": "dots.txt",
        }
        argvs = [["--model", tiny_model, "--images", str(lists / name), "--output", str(tmp_path / f"out-{i}")]
                 for i, name in enumerate(cases.values())]
        proc = subprocess.run([sys.executable, "-c", USAGE_SCRIPT, json.dumps(argvs)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["codes"] == [2] * len(cases) and not result["ray"] and not result["tensorflow"]
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == len(cases), proc.stderr
        for expected, line in zip(cases, lines):
            assert line.startswith("error: ") and expected.strip() in line, (expected, line)
        assert _Counting.requests == []
    finally:
        server.shutdown()
    for i in range(len(cases)):
        out = tmp_path / f"out-{i}"
        assert not out.exists() or not any(p.suffix == ".parquet" for p in out.rglob("*"))


@pytest.mark.slow
def test_a_hostile_entry_deep_in_a_long_list_is_refused_while_planning(ray_session, tiny_model, tmp_path):
    """Past the entries the driver checks before Ray starts, the planning tasks
    check the rest: still exit 2 with one line, and no file is read."""
    from pipeline.scoring.listing import HEAD_ENTRIES

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Counting.requests = []
    try:
        lines = [f"missing-{i}.jpg" for i in range(HEAD_ENTRIES + 10)]
        lines.append(f"http://127.0.0.1:{server.server_address[1]}/late.jpg")
        (tmp_path / "long.txt").write_text("\n".join(lines) + "\n")
        address = ray_session.get_runtime_context().gcs_address
        proc = _score(["--model", tiny_model, "--images", str(tmp_path / "long.txt"),
                       "--output", str(tmp_path / "out"), "--address", address])
        _, err = proc.communicate(timeout=300)
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2 and len(errors) == 1 and "uses http://" in errors[0], err[-3000:]
        assert _Counting.requests == []
        assert not list((tmp_path / "out").glob("part-*.parquet"))
    finally:
        server.shutdown()
