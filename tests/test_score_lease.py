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
from pipeline.storage import lease as lease_mod
from pipeline.storage.lease import LEASE_NAME, LeaseLost, OutputLease, _alive_here, check_holder, identity
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
        record["host"], record["boot_id"] = "another-host", "another-boot"
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

    (out / LEASE_NAME).write_text(json.dumps({"holder": "gone", **identity(), "host": socket.gethostname(),
                                              "pid": dead, "args": ARGS, "heartbeat": time.time(),
                                              "timeout_s": 300}))
    lease = OutputLease(str(out), ARGS, StorageConfig(), timeout_s=300).acquire()
    assert lease.previous["holder"] == "gone"
    lease.release()


OTHER = {**ARGS, "top_k": 5}


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def where(request, tmp_path):
    """An output folder on local disk, or a prefix in a fresh moto bucket (its
    conditional PutObject atomic, as on S3). Returns (output, put) where
    ``put(record, age_s)`` writes a lease record, ``age_s`` old where the store
    lets the test say so (local disk; S3 stamps its own time)."""
    if request.param == "local":
        out = tmp_path / "out"

        def put(record, age_s=0.0):
            out.mkdir(exist_ok=True)
            (out / LEASE_NAME).write_text(json.dumps(record))
            then = time.time() - age_s
            os.utime(out / LEASE_NAME, (then, then))

        return str(out), put
    request.getfixturevalue("atomic_moto")
    fs, bucket = request.getfixturevalue("s3_bucket")

    def put(record, age_s=0.0):
        fs.pipe(f"{bucket}/out/{LEASE_NAME}", json.dumps(record).encode())

    return f"s3://{bucket}/out", put


def _elsewhere(holder: str, args: dict, timeout_s: float, **changes) -> dict:
    """A lease written by a job on another machine (another boot id), with this
    host's name and this process's pid, as a pod's may look."""
    return {"holder": holder, **identity(), "boot_id": "another-machine", "args": args, "heartbeat": time.time(),
            "timeout_s": timeout_s, **changes}


def test_a_retried_job_waits_for_the_failed_attempts_heartbeat_then_takes_over(where, caplog):
    """KubeRay retries a failed RayJob on a new cluster with the same arguments:
    it finds the dead attempt's lease with a recent heartbeat, waits (saying
    whom for) until the heartbeat is older than the timeout, and takes over. A
    job with other arguments is refused at once."""
    out, put = where
    put(_elsewhere("failed-attempt", ARGS, timeout_s=2))
    started = time.monotonic()
    with pytest.raises(UsageError, match="other arguments .*top_k 3.*job failed-attempt"):
        OutputLease(out, OTHER, StorageConfig(), timeout_s=2).acquire()
    assert time.monotonic() - started < 1.9  # at once, not after the 2 s wait

    caplog.set_level("WARNING", logger="pipeline.storage.lease")
    started = time.monotonic()
    lease = OutputLease(out, ARGS, StorageConfig(), timeout_s=2).acquire()
    waited = time.monotonic() - started
    try:
        assert lease.previous["holder"] == "failed-attempt"
        assert 1.0 <= waited < 8, waited  # stale 2 s after it was written (S3: whole seconds)
        assert "job failed-attempt" in caplog.text and "waiting up to" in caplog.text, caplog.text
        check_holder(out, lease.job_id, StorageConfig())  # ours now
    finally:
        lease.release()


def test_a_same_arguments_holder_that_keeps_renewing_is_refused_after_the_wait(tmp_path):
    """A duplicate submission still running elsewhere keeps its heartbeat
    fresh: the second job waits for the holder's timeout plus the margin, then
    stops with exit 2 saying so; with lease_wait_s it waits that long."""
    out = str(tmp_path / "out")
    holder = OutputLease(out, ARGS, StorageConfig(), timeout_s=2)
    holder.identity = {**holder.identity, "boot_id": "another-machine"}  # its pid says nothing here
    holder.acquire()
    try:
        started = time.monotonic()
        with pytest.raises(UsageError, match="same arguments.*kept renewing its lease while this job waited [34] s"):
            OutputLease(out, ARGS, StorageConfig(), timeout_s=2).acquire()
        assert 3.0 <= time.monotonic() - started < 6  # 2 s - age + 0.5 s + 1 s
        started = time.monotonic()
        with pytest.raises(UsageError, match="score.lease_wait_s"):
            OutputLease(out, ARGS, StorageConfig(), timeout_s=2, wait_s=0.5).acquire()
        assert 0.4 <= time.monotonic() - started < 2
        holder.check()  # never lost its lease
        assert json.loads((tmp_path / "out" / LEASE_NAME).read_text())["holder"] == holder.job_id
    finally:
        holder.release()


def test_a_job_whose_lease_was_taken_over_cannot_publish(where):
    out, _ = where
    storage = StorageConfig()
    first = OutputLease(out, ARGS, storage, timeout_s=60).acquire()
    try:
        check_holder(out, first.job_id, storage)  # the fence passes while the lease is ours
        second = OutputLease(out, OTHER, storage, timeout_s=60)
        second._judge = lambda held: "stale"  # first has stopped beating, long ago
        second.acquire()
        assert second.previous["holder"] == first.job_id
        with pytest.raises(LeaseLost, match=f"to job {second.job_id}"):
            check_holder(out, first.job_id, storage)
        first.heartbeat()
        with pytest.raises(JobFailed, match=f"lost the output lease on .* to job {second.job_id}"):
            first.check()
        check_holder(out, second.job_id, storage)
        second.release()
    finally:
        first.release()


def test_fences_of_one_job_at_once_all_pass(where):
    """Several part tasks of one job fence at the same moment while its
    heartbeat runs: each rewrite that another of them overtook is tried again,
    so all pass and the heartbeat keeps the lease."""
    out, _ = where
    storage = StorageConfig()
    # A timeout long enough that a loaded machine renews in time (the fences,
    # not the clock, are what is tested here); heartbeats every 2.5 s.
    lease = OutputLease(out, ARGS, storage, timeout_s=10).acquire()
    try:
        errors, start = [], threading.Barrier(6, timeout=20)

        def fence():
            start.wait()
            try:
                for _ in range(3):
                    check_holder(out, lease.job_id, storage)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=fence) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        time.sleep(5.5)  # past two heartbeats, each after fences changed the token
        lease.check()
        check_holder(out, lease.job_id, storage)
    finally:
        lease.release()


def _stale_once(judge):
    calls = []

    def judged(held):
        calls.append(held)
        return "stale" if len(calls) == 1 else judge(held)

    return judged


def test_a_takeover_racing_a_fence_never_lets_both_win(where, monkeypatch):
    """The fence (check_holder) and a takeover both read the same lease, then
    both write: one conditional write wins, the other is refused. In half the
    rounds the takeover writes first (the fence must then raise LeaseLost), in
    the other half the fence does (the takeover must then fail)."""
    out, _ = where
    storage = StorageConfig()
    local = threading.local()
    real_read = lease_mod.read_for_update
    barrier = threading.Barrier(2, timeout=20)

    def read_for_update(uri, storage):
        out_ = real_read(uri, storage)
        if getattr(local, "first_read", False):  # each racer's first read: wait for the other's
            local.first_read = False
            barrier.wait()
            time.sleep(local.delay)
        return out_

    monkeypatch.setattr(lease_mod, "read_for_update", read_for_update)
    outcomes = []
    for n in range(4):
        barrier.reset()
        holder = OutputLease(out, ARGS, storage, timeout_s=60).acquire()
        taker = OutputLease(out, OTHER, storage, timeout_s=60)
        taker._judge = _stale_once(taker._judge)  # as if the holder had been silent for the timeout
        result = {}

        def racer(name, delay, fn):
            local.first_read, local.delay = True, delay
            try:
                fn()
                result[name] = "won"
            except (LeaseLost, UsageError) as exc:
                result[name] = f"lost: {exc}"

        fence_delay, take_delay = (0.4, 0.0) if n % 2 == 0 else (0.0, 0.4)
        threads = [threading.Thread(target=racer, args=("fence", fence_delay,
                                                        lambda: check_holder(out, holder.job_id, storage))),
                   threading.Thread(target=racer, args=("takeover", take_delay, taker.acquire))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        won = sorted(name for name, r in result.items() if r == "won")
        assert len(won) == 1, (n, result)  # never both, never neither
        outcomes.append(won[0])
        if won == ["takeover"]:
            assert taker.previous["holder"] == holder.job_id and f"to job {taker.job_id}" in result["fence"]
        else:
            assert "other arguments" in result["takeover"]  # it looked again: a fresh lease, not its own
        taker.release()
        holder.release()  # the lease is gone after each round
    assert outcomes == ["takeover", "fence", "takeover", "fence"], outcomes


def test_failing_heartbeats_make_the_lease_unsafe(tmp_path, monkeypatch):
    """The store refuses the heartbeat's writes: check() raises once half the
    timeout has passed without a renewal, and the fence refuses once the
    heartbeat in the lease is over half the timeout old (before another job
    could take the lease over)."""
    out, storage = str(tmp_path / "out"), StorageConfig()
    lease = OutputLease(out, ARGS, storage, timeout_s=2).acquire()
    real_write = lease_mod.write_if_unchanged

    def write_if_unchanged(uri, data, token, storage):
        if threading.current_thread().name.endswith("-lease"):
            raise OSError("the store is unreachable from the driver")
        return real_write(uri, data, token, storage)

    monkeypatch.setattr(lease_mod, "write_if_unchanged", write_if_unchanged)
    try:
        started = time.monotonic()
        check_holder(out, lease.job_id, storage)  # fresh yet
        raised = None
        while raised is None and time.monotonic() - started < 5:
            try:
                lease.check()
            except JobFailed as exc:
                raised = (time.monotonic() - started, str(exc))
            time.sleep(0.05)
        assert raised is not None, "check() never raised"
        assert raised[0] < 1.95 and "could not renew the output lease" in raised[1], raised  # before the timeout
        assert "the store is unreachable" in raised[1]
        refused = None
        while refused is None and time.monotonic() - started < 6:
            try:
                check_holder(out, lease.job_id, storage)
            except LeaseLost as exc:
                refused = (time.monotonic() - started, str(exc))
            time.sleep(0.1)
        assert refused is not None, "the fence never refused"
        assert refused[0] < 3.5 and "its heartbeat is failing" in refused[1], refused
    finally:
        lease.release()
    assert not os.path.exists(os.path.join(out, LEASE_NAME))  # still ours: removed, so a retry need not wait


@pytest.mark.parametrize("field", ["boot_id", "pid_ns"])
def test_a_holder_in_another_pid_namespace_or_boot_is_judged_by_its_heartbeat(field, tmp_path):
    """Pods share host names and pid numbers: a holder with this host's name
    but another boot id or pid namespace is neither alive because a process
    here has its pid, nor dead because none has."""
    assert _alive_here(identity()) is True
    assert _alive_here({**identity(), field: "another"}) is None
    out = tmp_path / "out"
    out.mkdir()
    # Its pid is this very process, yet its heartbeat is two minutes old: taken over.
    (out / LEASE_NAME).write_text(json.dumps({"holder": "pod-a", **identity(), field: "another", "args": OTHER,
                                              "heartbeat": time.time() - 120, "timeout_s": 60}))
    old = time.time() - 120
    os.utime(out / LEASE_NAME, (old, old))
    lease = OutputLease(str(out), ARGS, StorageConfig(), timeout_s=60).acquire()
    assert lease.previous["holder"] == "pod-a"
    lease.release()
    # Its pid is free here, yet its heartbeat is fresh: refused.
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LEASE_NAME).write_text(json.dumps({"holder": "pod-b", **identity(), "pid": int(proc.stdout),
                                              field: "another", "args": OTHER, "heartbeat": time.time(),
                                              "timeout_s": 60}))
    with pytest.raises(UsageError, match="other arguments.*job pod-b"):
        OutputLease(str(out), ARGS, StorageConfig(), timeout_s=60).acquire()


def test_no_lock_file_is_left_and_the_folder_lock_excludes(tmp_path):
    """Local compare-and-swap locks the object's folder, not a file beside it:
    nothing but the lease is in the output while a job holds it, nothing after;
    two writers in one folder still exclude each other."""
    from pipeline.storage import conditional

    out, storage = tmp_path / "out", StorageConfig()
    lease = OutputLease(str(out), ARGS, storage, timeout_s=60).acquire()
    lease.heartbeat()
    check_holder(str(out), lease.job_id, storage)
    assert sorted(os.listdir(out)) == [LEASE_NAME]
    lease.release()
    assert os.listdir(out) == []
    pointer = str(tmp_path / "registry" / "production.json")
    assert lease_mod.write_if_unchanged(pointer, b"1", None, storage)
    assert os.listdir(tmp_path / "registry") == ["production.json"]

    inside, times = threading.Event(), {}

    def hold():
        with conditional._local_lock(str(out / "a.json")) as locked:
            assert locked
            inside.set()
            time.sleep(0.5)
            times["released"] = time.monotonic()

    thread = threading.Thread(target=hold)
    thread.start()
    assert inside.wait(10)
    with conditional._local_lock(str(out / "b.json")) as locked:
        assert locked and time.monotonic() >= times["released"]
    thread.join()
    assert os.listdir(out) == []


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
        # The conditional create of the lease refused: another job's came first.
        # (A heartbeat refused after one of the job's own fences is not counted.)
        stats["lost"] += out is None and token is None
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
